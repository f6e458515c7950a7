//! `burst-qemu mem`: the memory coordinator's view of each memory-balanced VM.

use burst_qemu::balance::memory::{MemoryView, MEMORY_JSON};

use super::*;

/// Reads a VM's published `memory.json` (`None` when its memory is not balanced).
pub(super) fn read_memory(dir: &std::path::Path, name: &str) -> Option<MemoryView> {
    let text = std::fs::read_to_string(dir.join(name).join(MEMORY_JSON)).ok()?;
    serde_json::from_str(&text).ok()
}

pub(super) fn mem(g: &Global, a: LsArgs) -> Result<(), Failure> {
    let dir = g.state_dir();
    let views: Vec<MemoryView> = state::running(&dir)
        .iter()
        .filter_map(|(vm, _)| read_memory(&dir, &vm.name))
        .collect();
    let out = if a.json {
        serde_json::to_string_pretty(&views).expect("plain data") + "\n"
    } else {
        let mb = |x: Option<u64>| x.map_or("-".to_owned(), |x| x.to_string());
        let mut out = format!(
            "{:<20} {:<10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} POLICY\n",
            "NAME", "STATE", "TARGET", "ACTUAL", "UNUSED", "FLOOR", "CEILING", "SHARES", "ACTIVE"
        );
        for v in &views {
            out += &format!(
                "{:<20} {:<10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {}\n",
                v.name,
                v.state,
                mb(v.target_mb),
                mb(v.actual_mb),
                mb(v.unused_mb),
                v.floor_mb,
                v.ceiling_mb,
                v.shares,
                v.active_fraction
                    .map_or("-".to_owned(), |f| format!("{:.0}%", f * 100.0)),
                v.policy
            );
        }
        out
    };
    print!("{out}");
    Ok(())
}
