//! Whether a VM the agent already manages lives on, asked each second without opening a file:
//! its QEMU through a pidfd (readable once the process has exited), its launcher through the
//! runtime dir's lock, kept open and probed. What [`crate::state::liveness`] answers by path
//! (a read of `/proc/PID/stat`, an open of the lock), which the rescan did for every VM every
//! second.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::procfs::Proc;
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
            Some(fd) => !exited(fd),
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

/// A pidfd of `pid` (Linux 5.3 and later), `None` when there is no such process or the kernel
/// has no pidfds.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has exited (the pidfd polls readable then).
fn exited(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_tells_a_running_process_from_an_exited_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).expect("pidfds (Linux 5.3+)");
        assert!(!exited(&fd));
        child.kill().unwrap();
        // Exited (a zombie until waited for) is exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !exited(&fd) {
            assert!(std::time::Instant::now() < deadline, "not seen to exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(exited(&fd));
    }

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
