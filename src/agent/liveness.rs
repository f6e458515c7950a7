//! Whether a VM the agent already manages lives on, asked each second without opening a file:
//! its QEMU through a pidfd (readable once the process has exited), its launcher through the
//! runtime dir's lock, kept open and probed. What [`crate::state::liveness`] answers by path
//! (a read of `/proc/PID/stat`, an open of the lock), which the rescan did for every VM every
//! second.

use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::procfs::{pidfd_exited, pidfd_open, Proc};
use crate::state::{self, Liveness, Source, VmRecord};

/// A known VM's processes, held open.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// A pidfd of the VM's QEMU (`None`: pidfds unavailable, or QEMU gone at adoption).
    qemu: Option<OwnedFd>,
    /// The runtime dir's lock, for a launcher's VM.
    lock: Option<File>,
    /// The runtime dir: its lock is probed by path when it could not be kept open.
    dir: Option<PathBuf>,
}

impl Watch {
    /// Watches `record`'s QEMU (found in `proc`) and, for a launcher's VM, the lock in `dir`.
    /// The pidfd is taken before QEMU's start time is checked, so it cannot name a process
    /// that reused the pid; there is none for a `proc` other than the host's (a simulation's),
    /// whose processes are asked by start time each time.
    pub(super) fn new(dir: &Path, record: &VmRecord, proc: &Proc) -> Watch {
        let qemu = (proc == Proc::host())
            .then(|| pidfd_open(record.pid))
            .flatten()
            .filter(|_| record.qemu_alive_in(proc));
        let lock = match record.source {
            Source::Launcher => File::open(dir.join(state::LOCK)).ok(),
            _ => None,
        };
        Watch {
            qemu,
            lock,
            dir: Some(dir.to_owned()),
        }
    }

    /// The VM's liveness: [`state::liveness`]'s rule, asked through the kept descriptors.
    pub(super) fn liveness(&self, record: &VmRecord, proc: &Proc) -> Liveness {
        let launcher_holds = || match (&self.lock, &self.dir) {
            (Some(lock), _) => held(lock),
            (None, Some(dir)) => state::is_locked(dir),
            (None, None) => false,
        };
        let qemu_alive = || match &self.qemu {
            Some(fd) => !pidfd_exited(fd.as_fd()),
            None => record.qemu_alive_in(proc),
        };
        state::liveness_by(&record.source, launcher_holds, qemu_alive)
    }
}

/// Whether another process holds `lock` (the probe's own shared lock, when it gets one, is let
/// go at once; [`state::try_lock`] tells such a probe from a holder).
fn held(lock: &File) -> bool {
    match lock.try_lock_shared() {
        Ok(()) => {
            let _ = lock.unlock();
            false
        }
        Err(fs::TryLockError::WouldBlock) => true,
        Err(fs::TryLockError::Error(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_lock_probe_sees_a_holder_come_and_go_and_never_keeps_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(state::LOCK);
        let holder = state::try_lock(&path, 0o644).unwrap().expect("free");
        let probe = File::open(&path).unwrap();
        assert!(held(&probe));
        drop(holder);
        assert!(!held(&probe));
        // The probe let its shared lock go: a claimant gets the lock at its first try.
        let f = File::options().read(true).write(true).open(&path).unwrap();
        assert!(f.try_lock().is_ok());
        assert!(held(&probe));
    }
}
