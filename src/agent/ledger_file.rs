//! A VM's ledger on disk: the balances and a checkpoint of where the accounting stood, so a
//! restarted agent charges the gap exactly (see the agent's "Crashes").

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::credit::{Balances, Credits, Ledger, Policy};
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

impl Checkpoint {
    /// The gap from this checkpoint to `now` (a later one taken of the running VM): the time
    /// (ns) and the vCPU threads' CPU (ns) since, or `None` when `now` is not the same QEMU
    /// on the same boot (a pid alone, or a start time of 0, identifies no process). A thread
    /// this checkpoint does not know is charged from `now` on.
    pub fn gap_to(&self, now: &Checkpoint) -> Option<(u64, u64)> {
        let same = self.boot_id == now.boot_id
            && self.qemu_pid == now.qemu_pid
            && self.qemu_start != 0
            && self.qemu_start == now.qemu_start;
        if !same {
            return None;
        }
        let used = now
            .cpu_ns
            .iter()
            .map(|(tid, ns)| {
                let before = self
                    .cpu_ns
                    .iter()
                    .find(|(t, _)| t == tid)
                    .map_or(*ns, |(_, b)| *b);
                ns.saturating_sub(before)
            })
            .sum();
        Some((now.boottime_ns.saturating_sub(self.boottime_ns), used))
    }
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

    /// Whether an agent restarted now would make `later` (this VM's ledger as it stands now)
    /// out of this file: the same VM, policy and overrides, and the gap charge from this
    /// file's checkpoint to `later`'s (one lump of earnings and CPU, as at a restart) giving
    /// `later`'s balances and CPU total exactly. The ledger's earnings carry their fraction of
    /// a vCPU-ns, so a steady run (no balance reaching zero, no cap cut between the ticks)
    /// replays to the nanosecond; then `later` need not be saved for a restart to lose nothing.
    pub fn replays_to(&self, later: &LedgerFile) -> bool {
        let same = self.name == later.name
            && self.vcpus == later.vcpus
            && self.policy == later.policy
            && self.credits_applied == later.credits_applied
            && self.uuid == later.uuid;
        let (Some(policy), Some(from), Some(to)) =
            (&later.policy, &self.checkpoint, &later.checkpoint)
        else {
            return false;
        };
        let Some((elapsed, used)) = from.gap_to(to).filter(|_| same) else {
            return false;
        };
        let mut ledger = Ledger::restore(policy.clone(), self.balances);
        ledger.tick(elapsed, used);
        ledger.balances() == later.balances
            && self.used_total.vcpu_ns().checked_add(used) == Some(later.used_total.vcpu_ns())
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

    /// The ledger file of `ledger` at `at_ns` with its one vCPU thread at `cpu_ns`.
    fn file_of(ledger: &Ledger, at_ns: u64, cpu_ns: u64, used_total: u64) -> LedgerFile {
        LedgerFile {
            name: "a".into(),
            vcpus: 2,
            policy: Some(ledger.policy().clone()),
            balances: ledger.balances(),
            credits_applied: None,
            used_total: Credits(used_total),
            checkpoint: Some(Checkpoint {
                boot_id: "boot".into(),
                boottime_ns: at_ns,
                qemu_pid: 40,
                qemu_start: 7,
                cpu_ns: vec![(41, cpu_ns)],
            }),
            uuid: None,
            saved_unix_ns: at_ns,
        }
    }

    /// Runs `ledger` through 200-ms ticks using `used_ms[i]` of CPU in tick i, from `saved`;
    /// the file it stands at after.
    fn run(ledger: &mut Ledger, saved: &LedgerFile, used_ms: &[u64]) -> LedgerFile {
        let (mut at, mut cpu) = (1_000_000_000, 5_000_000);
        let mut total = saved.used_total.vcpu_ns();
        for &u in used_ms {
            ledger.tick(200_000_000, u * 1_000_000);
            at += 200_000_000;
            cpu += u * 1_000_000;
            total += u * 1_000_000;
        }
        file_of(ledger, at, cpu, total)
    }

    #[test]
    fn a_steady_ledger_replays_exactly_and_one_that_hit_a_bound_or_changed_does_not() {
        // 2 vCPUs at 10 %: 40 ms earned per 200-ms tick.
        let start = |balance: f64| {
            let l = ledger(balance);
            let saved = file_of(&l, 1_000_000_000, 5_000_000, 3);
            (l, saved)
        };
        // Idle, earning (25 ticks: 5 s); uneven use that never empties the balance.
        for used in [vec![0; 25], vec![7, 0, 300, 12, 0, 399, 1, 0, 0, 55]] {
            let (mut l, saved) = start(5.0);
            let later = run(&mut l, &saved, &used);
            assert!(saved.replays_to(&later), "{used:?}");
        }
        // Full at the cap and idle: both stay at the cap.
        let (mut full, _) = start(0.0);
        full.set_balance(full.policy().max_credits());
        let saved = file_of(&full, 1_000_000_000, 5_000_000, 3);
        assert!(saved.replays_to(&run(&mut full, &saved, &[0; 25])));

        // Bursting from an empty balance until the debt's bound (one second of the full rate)
        // forgave CPU, then idle: one lump of the same ticks forgives more.
        let (mut l, saved) = start(0.0);
        let mut used = vec![400; 10];
        used.extend([0; 10]);
        assert!(!saved.replays_to(&run(&mut l, &saved, &used)));

        // An edit, another QEMU, or a start time of 0 (no identity): saved at once.
        let (mut l, saved) = start(5.0);
        let later = run(&mut l, &saved, &[0; 5]);
        let mut edited = later.clone();
        edited.credits_applied = Some(Credits(1));
        let mut other = later.clone();
        other.checkpoint.as_mut().unwrap().qemu_pid = 41;
        let mut unknown = saved.clone();
        unknown.checkpoint.as_mut().unwrap().qemu_start = 0;
        assert!(!saved.replays_to(&edited));
        assert!(!saved.replays_to(&other));
        assert!(!unknown.replays_to(&later));
        // A balance off by one vCPU-ns: not the same.
        let mut off = later.clone();
        off.balances.earned = Credits(off.balances.earned.vcpu_ns() + 1);
        assert!(!saved.replays_to(&off));
    }
}
