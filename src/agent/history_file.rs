//! A VM's history on disk: `<data dir>/history/NAME.bqh`, beside the ledgers, written atomically
//! when a minute closes (every VM's together, as the ledgers), when the VM ends and when the
//! agent stops (see [`crate::history`]); and
//! a running VM's tail, the 10-second samples closed since that save, in its runtime dir.

use std::io;
use std::path::{Path, PathBuf};

use crate::credit::{Ledger, Rate, NS_PER_CREDIT};
use crate::history::{History, Point, Sample};
use crate::state;

/// The directory of the VMs' history files.
pub fn history_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("history")
}

/// Where VM `name`'s history is kept.
pub fn history_path(data_dir: &Path, name: &str) -> PathBuf {
    history_dir(data_dir).join(format!("{name}.bqh"))
}

/// Reads a history file; `Ok(None)` when there is none.
pub fn load(path: &Path) -> io::Result<Option<History>> {
    match std::fs::read(path) {
        Ok(bytes) => History::decode(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves atomically, creating the directory when missing.
pub fn save(path: &Path, h: &History) -> io::Result<()> {
    let bytes = h.encode();
    match state::write_atomic(path, &bytes, 0o644) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            state::write_atomic(path, &bytes, 0o644)
        }
        other => other,
    }
}

/// A running VM's tail (its 10-second samples since the history file was saved) in the
/// history encoding, as the agent writes it into the runtime dir. Not synced: the history file
/// is the durable copy, the tail only makes a running VM's curve current.
pub fn encode_tail(samples: &[Sample]) -> Vec<u8> {
    let mut h = History::new();
    h.extend_fine(samples);
    h.encode()
}

/// A running VM's tail; empty when there is none (or it is unreadable: it is only a cache).
pub fn load_tail(path: &Path) -> Vec<Sample> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| History::decode(&bytes).ok())
        .map(|h| h.fine().samples().copied().collect())
        .unwrap_or_default()
}

/// The point to record for a ledger and its last measured usage and grant.
pub fn point(ledger: &Ledger, usage: Rate, grant: Rate) -> Point {
    let b = ledger.balances();
    let mc = |c: crate::credit::Credits| c.vcpu_ns() / (NS_PER_CREDIT / 1000);
    Point {
        balance_mc: mc(b.balance()),
        surplus_mc: mc(b.surplus),
        charged_mc: mc(b.charged),
        usage_ppm: usage.0,
        grant_ppm: grant.0,
        baseline_ppm: ledger.policy().baseline_rate().0,
    }
}
