//! QEMU as a process: a clean start (default signal dispositions, an empty mask, no inherited
//! descriptor but those it is handed), the QMP monitor reached without polling for a socket
//! file, and its life until it exits (signals turned into a graceful power-down, then `quit`,
//! then SIGKILL).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::SignalFd;
use nix::unistd::Pid;

use super::{LaunchError, QUIT_GRACE, STARTUP_TIMEOUT};
use crate::base::{IoContext, IoFailure};
use crate::state::{RuntimeDir, VmRecord};

/// How the launcher reaches QEMU's monitor.
pub(super) enum Monitor {
    /// We bound it and pass the listening socket to QEMU (ours is kept open until the
    /// handshake is done).
    Ours { _listener: UnixListener },
    /// The operator's `-qmp unix:` socket.
    Theirs,
}

/// A VM that registered: QEMU is running and its vCPU threads are recorded.
pub struct Running {
    pub(super) child: Child,
    pub(super) runtime: RuntimeDir,
    pub(super) record: VmRecord,
    pub(super) signals: SignalFd,
    pub(super) shutdown_timeout: Duration,
    /// The private monitor that keeps the published run state current (`None` once QEMU
    /// closed it).
    pub(super) run_state: Option<super::run_state::Watch>,
}

/// Run in the child between fork and exec: QEMU starts with the default disposition for every
/// signal and an empty signal mask (the launcher blocks INT, TERM, HUP and CHLD for its
/// signalfd, and a mask is inherited across exec: QEMU would otherwise ignore `kill`), and with
/// no descriptor above 2 but those in `keep` (the QMP listener, the operator's `fd=` ones).
///
/// # Safety
///
/// Only async-signal-safe calls: it must run between fork and exec.
pub(super) unsafe fn clean_child(keep: &[i32]) -> io::Result<()> {
    // The kernel's own sigaction (x86-64 and most 64-bit ABIs: handler, flags, restorer, a
    // 64-bit mask), all zero: SIG_DFL. Through the system call, not glibc's sigaction, which
    // refuses the two signals it keeps for itself (32 and 33): found ignored in a CI runner's
    // process tree, and QEMU would have inherited that.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..65 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction reads a kernel sigaction of the size given (8: the mask).
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
    // SAFETY: an empty set, built in place.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: valid set pointer; the old mask is not wanted.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes descriptor flags.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if !marked {
        // Kernels before 5.11: mark each possible descriptor.
        // SAFETY: a zeroed rlimit is a valid out-parameter.
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to an rlimit.
        let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur.min(65_536) as i32
        } else {
            1024
        };
        for fd in 3..max {
            // SAFETY: fcntl on a descriptor that may not be open answers EBADF, ignored.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    for &fd in keep {
        // SAFETY: fcntl on a descriptor number; a closed one answers EBADF.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(super) fn cpu_thread_id(cpu: &qmp::qapi::qmp::CpuInfoFast) -> i64 {
    // Every target's variant carries the same base; read it through JSON rather than match
    // some thirty variants.
    serde_json::to_value(cpu)
        .ok()
        .and_then(|v| v.get("thread-id").and_then(serde_json::Value::as_i64))
        .unwrap_or(-1)
}

/// Turns a QMP failure during start-up into "QEMU exited" when that is what happened.
pub(super) fn startup_failure(child: &mut Child, e: qmp::Error) -> LaunchError {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return LaunchError::QemuStartup { status };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    LaunchError::Qmp(e)
}

/// Connects to the monitor and waits until QEMU has something to say (its greeting), noticing
/// within milliseconds if QEMU exits instead.
pub(super) fn connect_monitor(
    child: &mut Child,
    path: &Path,
    monitor: &Monitor,
) -> Result<UnixStream, LaunchError> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            // The operator's socket does not exist until QEMU creates it.
            Err(_) if matches!(monitor, Monitor::Theirs) && Instant::now() < deadline => {
                if let Some(status) = child.try_wait().doing(|| "waiting for QEMU".into())? {
                    return Err(LaunchError::QemuStartup { status });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(IoFailure::of(format!("connecting to {}", path.display()), e).into())
            }
        }
    };
    loop {
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(20u8)).doing(|| "polling QMP".into())?;
        if ready > 0 {
            return Ok(stream);
        }
        if let Some(status) = child.try_wait().doing(|| "waiting for QEMU".into())? {
            return Err(LaunchError::QemuStartup { status });
        }
        if Instant::now() >= deadline {
            return Err(qmp::Error::Timeout {
                phase: qmp::Phase::Greeting,
                waited: STARTUP_TIMEOUT,
            }
            .into());
        }
    }
}

/// The shutdown steps, in order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    Running,
    PoweringDown(Instant),
    Quitting(Instant),
    Killed,
}

/// What a running launcher looks after besides QEMU (the binary's: that a credit agent runs).
pub trait Watchdog {
    /// Looks, and acts on what it sees.
    fn look(&mut self);
    /// A descriptor that polls readable when a look is due at once (a pidfd of the agent).
    fn fd(&self) -> Option<BorrowedFd<'_>>;
    /// The longest wait from one look to the next.
    fn period(&self) -> Duration;
}

/// Which of the launcher's descriptors besides its signals polled readable.
struct Woke {
    run_state: bool,
    watchdog: bool,
}

impl Running {
    /// The VM's record.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// Runs until QEMU exits; returns the launcher's exit status (QEMU's, or 128 + signal).
    /// The runtime dir is removed. While the VM runs, `watchdog` looks when its descriptor
    /// polls readable and its period after its last look at the latest.
    pub fn wait(mut self, watchdog: &mut dyn Watchdog) -> Result<u8, LaunchError> {
        let mut stage = Stage::Running;
        let mut next_look = Instant::now() + watchdog.period();
        let status = loop {
            if let Some(status) = self.child.try_wait().doing(|| "waiting for QEMU".into())? {
                break status;
            }
            if stage == Stage::Running && Instant::now() >= next_look {
                watchdog.look();
                next_look = Instant::now() + watchdog.period();
            }
            let until = match stage {
                Stage::Killed => None,
                Stage::Running => Some(next_look),
                Stage::PoweringDown(t) | Stage::Quitting(t) => Some(t),
            };
            let timeout = until.map_or(PollTimeout::NONE, |t| {
                let ms = t.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::ZERO)
            });
            let watched = match stage {
                Stage::Running => watchdog.fd(),
                _ => None,
            };
            let woke = self.wait_for_signals(timeout, watched)?;
            if woke.run_state {
                self.watch_run_state();
            }
            if woke.watchdog {
                next_look = Instant::now();
            }
            let mut asked_to_stop = false;
            while let Ok(Some(info)) = self.signals.read_signal() {
                let sig = info.ssi_signo as i32;
                if sig == libc::SIGINT || sig == libc::SIGTERM || sig == libc::SIGHUP {
                    asked_to_stop = true;
                }
            }
            let now = Instant::now();
            stage = match stage {
                Stage::Running if asked_to_stop => {
                    tracing::info!("powering {} down", self.record.name);
                    if let Err(e) = self.qmp(qmp::qapi::qmp::system_powerdown {}) {
                        tracing::warn!("system_powerdown failed: {e}");
                    }
                    Stage::PoweringDown(now + self.shutdown_timeout)
                }
                Stage::PoweringDown(t) if asked_to_stop || now >= t => {
                    tracing::info!("{} did not power down: quit", self.record.name);
                    if let Err(e) = self.qmp(qmp::qapi::qmp::quit {}) {
                        tracing::warn!("quit failed ({e}): SIGTERM to QEMU");
                        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
                    }
                    Stage::Quitting(now + QUIT_GRACE)
                }
                Stage::Quitting(t) if now >= t => {
                    tracing::warn!("{} still running after quit: SIGKILL", self.record.name);
                    let _ = self.child.kill();
                    Stage::Killed
                }
                s => s,
            };
        };
        drop(self.runtime);
        Ok(exit_code(status))
    }

    /// Waits for a signal, an event on the private monitor or the watchdog's descriptor; which
    /// of the latter two polled readable.
    fn wait_for_signals(
        &self,
        timeout: PollTimeout,
        watchdog: Option<BorrowedFd<'_>>,
    ) -> Result<Woke, LaunchError> {
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        let run_state = self.run_state.as_ref().map(|w| {
            fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let watched = watchdog.map(|fd| {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            fds.len() - 1
        });
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(IoFailure::of("polling signals", e).into()),
        }
        let readable = |i: Option<usize>| {
            i.and_then(|i| fds[i].revents())
                .is_some_and(|r| !r.is_empty())
        };
        Ok(Woke {
            run_state: readable(run_state),
            watchdog: readable(watched),
        })
    }

    /// Publishes a run state change; a closed monitor (QEMU exiting) is let go.
    fn watch_run_state(&mut self) {
        if let Some(w) = self.run_state.as_mut() {
            if let Err(e) = w.on_readable() {
                tracing::debug!("{}: run state no longer watched: {e}", self.record.name);
                if let Some(w) = self.run_state.take() {
                    w.abandon();
                }
            }
        }
    }

    fn qmp<C: qmp::qapi::Command>(&self, command: C) -> Result<C::Ok, qmp::Error> {
        qmp::Client::connect(&self.record.qmp_socket, Duration::from_secs(2))?.execute(command)
    }
}

/// QEMU's exit status as the launcher's: its code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128u8.wrapping_add(s as u8),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
