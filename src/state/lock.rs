//! The `flock` locks of the state dir (the agent's, each VM's runtime dir's): taken without
//! waiting for a holder, and told apart from a probe that only looks at them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::procfs::Proc;

/// How many times [`try_lock`] tries before it believes the lock held (1, 2, 3 ms apart): a
/// probe ([`lock_held`]) holds a shared lock for the moment of one `flock` call, tens of
/// microseconds, so a lock still busy at four tries over 6 ms has a holder.
const LOCK_TRIES: u64 = 4;

/// How long [`try_lock`] goes on trying (5 ms apart) a lock that stayed busy at its
/// [`LOCK_TRIES`] although the process recorded in it is gone: what holds it then is a probe
/// or a holder in its last moment. A probe is not always "an instant": in a single-threaded
/// TCG guest (the scx-6.12 one: three vCPUs taking turns on one host thread) a probe whose
/// vCPU loses the host thread holds its shared lock until the vCPU's next turn, and one exec
/// of burst-qemu there takes a second. A launcher's restarted agent that believed such a probe
/// exits as if another agent ran, and the next restart comes 5 s later.
const LOCK_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens (creating) the lock file at `path` and takes an exclusive `flock` on it without
/// waiting for a holder: `Ok(None)` when another process holds it. The lock lasts as long as
/// the file. A probe that is looking at the lock this instant (`ls`, a launcher's watchdog,
/// a script polling `agent_running`) is not mistaken for a holder: a busy lock is tried again
/// a few times, a few milliseconds apart ([`LOCK_TRIES`]), and, when the file records the pid
/// of its holder (the agent's lock does) and that process is gone, for up to [`LOCK_SETTLE`].
pub fn try_lock(path: &Path, mode: u32) -> io::Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)?;
    for attempt in 1..=LOCK_TRIES {
        match f.try_lock() {
            Ok(()) => return Ok(Some(f)),
            Err(fs::TryLockError::WouldBlock) if attempt < LOCK_TRIES => {
                std::thread::sleep(std::time::Duration::from_millis(attempt))
            }
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    if !recorded_holder_gone(path) {
        return Ok(None);
    }
    let until = std::time::Instant::now() + LOCK_SETTLE;
    while std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
        match f.try_lock() {
            Ok(()) => return Ok(Some(f)),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    Ok(None)
}

/// The pid a lock file names as its holder ([`crate::agent::lock`] writes it after taking
/// the lock); `None` for a file that names no one (a VM's lock), a missing one, or a number
/// no pid can be (0, or above `i32::MAX`: callers signal it as an `i32`, where a negative
/// value would name a process group).
pub fn recorded_holder(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|&p| p > 0 && i32::try_from(p).is_ok())
}

/// Whether the lock file at `path` names its holder and that process no longer runs (gone,
/// or a zombie). A file that names no one says nothing: `false`.
fn recorded_holder_gone(path: &Path) -> bool {
    recorded_holder(path).is_some_and(|pid| Proc::host().process_start_time(pid).is_none())
}

/// Whether another process holds the lock file at `path` (a missing file is not held). The
/// probe takes a shared lock for an instant, which [`try_lock`] tells from a holder.
pub fn lock_held(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => matches!(f.try_lock_shared(), Err(fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stop-25 CI: a launcher-started agent (`--if-absent`) found its lock busy because
    /// the test was polling `agent_running` (every 5 ms) at that instant, and exited as if
    /// another agent ran. Two probes every millisecond, five times the test's pace, must never
    /// make a free lock look held (with a single try this failed at try 77, 82 and 494).
    #[test]
    fn a_probe_looking_at_a_free_lock_never_makes_it_look_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        drop(try_lock(&path, 0o600).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probes: Vec<_> = (0..2)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::black_box(lock_held(&path));
                        n += 1;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    n
                })
            })
            .collect();
        for i in 0..20_000 {
            let held = try_lock(&path, 0o600).unwrap();
            assert!(
                held.is_some(),
                "try {i}: a probe made the free lock look held"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let probed: u64 = probes.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(probed > 0);
    }

    /// Inside a single-threaded TCG guest a probe can hold its shared lock for tens of
    /// milliseconds (its vCPU loses the host thread meanwhile), longer than the four quick
    /// tries. When the file names a holder that is gone, the lock is waited for.
    #[test]
    fn a_slow_probe_does_not_keep_a_dead_agents_successor_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        fs::write(&path, format!("{}\n", dead.id())).unwrap();
        let probe = File::open(&path).unwrap();
        probe.lock_shared().unwrap();
        let slow = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(probe);
        });
        let t = std::time::Instant::now();
        let got = try_lock(&path, 0o600).unwrap();
        let waited = t.elapsed();
        slow.join().unwrap();
        assert!(got.is_some(), "the successor gave up after {waited:?}");
        assert!(
            waited >= std::time::Duration::from_millis(250),
            "{waited:?}"
        );

        // A live holder (this process, through another open file) is believed at once.
        drop(got);
        fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        let holder = File::open(&path).unwrap();
        holder.lock().unwrap();
        let t = std::time::Instant::now();
        assert!(try_lock(&path, 0o600).unwrap().is_none());
        assert!(t.elapsed() < LOCK_SETTLE / 2, "{:?}", t.elapsed());
        // A file naming no one (a VM's lock) does not wait either.
        fs::write(&path, "").unwrap();
        let t = std::time::Instant::now();
        assert!(try_lock(&path, 0o600).unwrap().is_none());
        assert!(t.elapsed() < LOCK_SETTLE / 2, "{:?}", t.elapsed());
    }
}
