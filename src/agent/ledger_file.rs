//! A VM's ledger on disk: the balances and a checkpoint of where the accounting stood, so a
//! restarted agent charges the gap exactly (see the agent's "Crashes").

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::credit::{Balances, Credits, Policy};
use crate::state;

/// Where a ledger was last saved, so a restarted agent can charge the gap exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// `/proc/sys/kernel/random/boot_id` at the save.
    pub boot_id: String,
    /// `CLOCK_BOOTTIME` at the save, ns.
    pub boottime_ns: u64,
    /// QEMU's pid.
    pub qemu_pid: u32,
    /// QEMU's start time (see [`crate::procfs::Proc::process_start_time`]); 0 in older files.
    #[serde(default)]
    pub qemu_start: u64,
    /// `(tid, cumulative CPU ns)` of each vCPU thread.
    pub cpu_ns: Vec<(u32, u64)>,
}

/// A VM's persisted ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerFile {
    /// The VM's name.
    pub name: String,
    /// Its vCPUs when saved.
    pub vcpus: u32,
    /// The policy in force when saved (to show a stopped VM's credits).
    pub policy: Option<Policy>,
    /// The balances.
    pub balances: Balances,
    /// The last `credits = N` override applied (applied again only when the value changes).
    pub credits_applied: Option<Credits>,
    /// CPU time charged since the ledger was created, vCPU-ns.
    pub used_total: Credits,
    /// Where the accounting stood at the save.
    pub checkpoint: Option<Checkpoint>,
    /// The libvirt domain that owns this ledger (`None`: a burst-qemu or adopted VM's, whose
    /// name is its identity). A domain never takes over another domain's ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Wall-clock time of the save, ns since the Unix epoch (0 in older files): set against a
    /// domain's metadata checkpoint, the newer of the two wins.
    #[serde(default)]
    pub saved_unix_ns: u64,
}

impl LedgerFile {
    /// Reads a ledger file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> io::Result<Option<Self>> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The file's content.
    pub fn to_bytes(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(io::Error::other)
    }

    /// Saves atomically (write, fsync, rename), creating the directory when missing.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let json = self.to_bytes()?;
        match state::write_atomic(path, &json, 0o644) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir)?;
                }
                state::write_atomic(path, &json, 0o644)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::test_ledger as ledger;

    #[test]
    fn ledger_files_round_trip_and_garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledgers/a.json");
        assert_eq!(LedgerFile::load(&path).unwrap(), None);
        let f = LedgerFile {
            name: "a".into(),
            vcpus: 2,
            policy: Some(ledger(1.0).policy().clone()),
            balances: ledger(5.0).balances(),
            credits_applied: Some(Credits(7)),
            used_total: Credits(9),
            checkpoint: Some(Checkpoint {
                boot_id: "b".into(),
                boottime_ns: 1,
                qemu_pid: 2,
                qemu_start: 5,
                cpu_ns: vec![(3, 4)],
            }),
            uuid: Some("u".into()),
            saved_unix_ns: 6,
        };
        f.save(&path).unwrap();
        assert_eq!(LedgerFile::load(&path).unwrap(), Some(f));
        fs::write(&path, "{\"name\": 3, garbage").unwrap();
        assert!(LedgerFile::load(&path).is_err());
    }
}
