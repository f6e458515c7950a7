//! Stopping a VM whose launcher died (see [`crate::state`]'s "Orphans"), or an adopted QEMU:
//! the steps the launcher would have taken, done by `burst-qemu stop` through QEMU's QMP socket
//! (SIGTERM first for an adopted QEMU whose socket is unknown). QEMU is not our
//! child, so every signal is sent only after checking, by pid and start time, that the process
//! is still that QEMU.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::launch::QUIT_GRACE;
use crate::state::{RuntimeDir, VmRecord};

/// How an orphan ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It powered down after `system_powerdown`.
    PoweredDown,
    /// It left after `quit`.
    Quit,
    /// It had to be killed.
    Killed,
}

/// Powers the orphaned VM down (`system_powerdown`), then `quit` after `shutdown_timeout`, then
/// SIGKILL after [`QUIT_GRACE`]; waits until QEMU has exited and reaps its runtime dir.
/// `Err` when QEMU is still alive after all of that (it cannot be, short of a process stuck in
/// the kernel).
pub fn stop(
    state_dir: &Path,
    record: &VmRecord,
    shutdown_timeout: Duration,
) -> Result<Ended, String> {
    let qmp = |what: &str, r: Result<(), qmp::Error>| {
        if let Err(e) = r {
            tracing::warn!("{}: {what}: {e}", record.name);
        }
    };
    let client = || qmp::Client::connect(&record.qmp_socket, Duration::from_secs(2));
    if record.qmp_socket.as_os_str().is_empty() {
        // An adopted QEMU without a known monitor: SIGTERM is QEMU's own clean exit (as
        // `quit`), after checking the process is still that QEMU.
        if record.qemu_alive() {
            let _ = kill(Pid::from_raw(record.pid as i32), Signal::SIGTERM);
        }
        if gone_within(record, QUIT_GRACE) {
            RuntimeDir::reap(state_dir, &record.name);
            return Ok(Ended::Quit);
        }
    }
    qmp(
        "system_powerdown",
        client().and_then(|mut c| c.execute(qmp::qapi::qmp::system_powerdown {}).map(drop)),
    );
    let mut ended = Ended::PoweredDown;
    if !gone_within(record, shutdown_timeout) {
        ended = Ended::Quit;
        qmp(
            "quit",
            client().and_then(|mut c| c.execute(qmp::qapi::qmp::quit {}).map(drop)),
        );
        if !gone_within(record, QUIT_GRACE) {
            ended = Ended::Killed;
            if record.qemu_alive() {
                let _ = kill(Pid::from_raw(record.pid as i32), Signal::SIGKILL);
            }
            if !gone_within(record, Duration::from_secs(5)) {
                return Err(format!(
                    "QEMU (pid {}) is still alive after SIGKILL",
                    record.pid
                ));
            }
        }
    }
    RuntimeDir::reap(state_dir, &record.name);
    Ok(ended)
}

fn gone_within(record: &VmRecord, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !record.qemu_alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
