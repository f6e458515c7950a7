//! What the scheduler process publishes each second (`<state dir>/scx.json`), for the agent,
//! `check` and the tests: its state, each VM's figures, and what its decisions cost.

use std::path::{Path, PathBuf};

use super::user;

/// What the scheduler process publishes about itself each second (`<state dir>/scx.json`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// The scheduler process.
    pub pid: u32,
    /// The kernel's sched_ext state and scheduler (`enabled`, `burst_qemu`).
    pub state: String,
    pub ops: String,
    /// Per VM: CPU charged by the BPF scheduler since it loaded, and how often one of its
    /// threads was held back for want of budget.
    pub vms: std::collections::BTreeMap<String, VmStats>,
    /// Who decides the dispatches: `bpf` (the program) or `user` (this process, [`user`]).
    #[serde(default)]
    pub dispatch: String,
    /// Runnable-to-run waits of the VMs' threads and their runs, since load (both modes).
    #[serde(default)]
    pub latency: LatencyStats,
    /// The process's own CPU time since it started, ns (user + system).
    #[serde(default)]
    pub process_cpu_ns: u64,
    /// The user-space mode's counts (absent in the BPF mode).
    #[serde(default)]
    pub user: Option<user::Counts>,
}

/// The program's `latency` (bpf/intf.h), as published in [`Stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LatencyStats {
    /// Waits counted: a VM's runnable thread with budget, from enqueue to run.
    pub waits: u64,
    /// Their waits, summed, ns.
    pub sum_ns: u64,
    /// The longest, ns.
    pub max_ns: u64,
    /// Times a VM's thread was put on a CPU.
    pub runs: u64,
    /// Waits of [2^i, 2^(i+1)) µs (the first bucket also those below 1 µs).
    pub hist: Vec<u64>,
}

impl LatencyStats {
    /// The upper edge, µs, of the bucket holding the `q` quantile (0..=1) of the waits
    /// counted between `earlier` and `self`; `None` when none were.
    pub fn quantile_us_since(&self, earlier: &LatencyStats, q: f64) -> Option<u64> {
        let diff: Vec<u64> = self
            .hist
            .iter()
            .enumerate()
            .map(|(i, &n)| n.saturating_sub(earlier.hist.get(i).copied().unwrap_or(0)))
            .collect();
        let total: u64 = diff.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in diff.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(2u64 << i);
            }
        }
        None
    }
}

/// One VM in [`Stats`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VmStats {
    /// Its slot in the BPF maps (its DSQ is `slot + 1`).
    #[serde(default)]
    pub slot: u32,
    pub cpu_ns: u64,
    /// Times the BPF program held one of its threads back for want of budget. Always 0 in
    /// the user-space mode, whose process holds a thread by not ordering it (and counts no
    /// such thing).
    pub held: u64,
    pub base_ns: u64,
    pub grant_ns: u64,
    /// Its weight for the spare, as written to the program.
    #[serde(default)]
    pub weight: u64,
}

/// Where the scheduler process of the agent of `state_dir` publishes its [`Stats`].
pub fn stats_path(state_dir: &Path) -> PathBuf {
    state_dir.join("scx.json")
}

/// The published [`Stats`], if any.
pub fn read_stats(state_dir: &Path) -> Option<Stats> {
    serde_json::from_slice(&std::fs::read(stats_path(state_dir)).ok()?).ok()
}
