//! `burst-qemu agent --take-over`: the service's agent takes the state dir from an agent that a
//! VM's launcher started.
//!
//! A launcher restarts a missing agent as soon as it has gone (it waits on the agent's pidfd),
//! with `--if-absent`.
//! When the service is restarted (`systemctl restart`, a package upgrade), a launcher may start
//! its agent in the moment between the old agent's exit and the new one's start; the service's
//! agent would then find the lock held and fail, again at every restart, while the launcher's
//! agent (no delegated cgroup, no service settings) ran on. With `--take-over` the service's
//! agent stops such an agent (SIGTERM: it saves the ledgers and leaves the VMs running) and
//! takes the lock when it is free. An agent started any other way (by hand, another service)
//! is never stopped: the lock stays its, and this one fails as without the flag.

use std::path::Path;
use std::time::{Duration, Instant};

use burst_qemu::agent::{self, AgentError, AgentLock};
use burst_qemu::state;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the lock is waited for: a stopped agent saves every ledger on its way out.
const WAIT: Duration = Duration::from_secs(30);
/// How often the lock is tried meanwhile.
const POLL: Duration = Duration::from_millis(10);

/// The state dir's agent lock, once any launcher-started agent holding it has gone.
pub(super) fn lock(state_dir: &Path) -> Result<AgentLock, AgentError> {
    let deadline = Instant::now() + WAIT;
    let mut stopped = None;
    loop {
        let busy = match agent::lock(state_dir) {
            Err(e @ AgentError::AlreadyRunning(_)) => e,
            other => return other,
        };
        if Instant::now() >= deadline {
            return Err(busy);
        }
        match holder(state_dir) {
            Holder::Launcher(pid) if stopped != Some(pid) => {
                tracing::info!(
                    "taking over from the agent a launcher started (pid {pid}): stopping it"
                );
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                stopped = Some(pid);
            }
            Holder::Launcher(_) | Holder::Unknown => {}
            Holder::Other => return Err(busy),
        }
        std::thread::sleep(POLL);
    }
}

enum Holder {
    /// An agent started by a launcher (its command line has `--if-absent`).
    Launcher(i32),
    /// Any other process.
    Other,
    /// Not known yet: the lock file's pid is gone or not yet written by a new holder.
    Unknown,
}

fn holder(state_dir: &Path) -> Holder {
    let Some(pid) = state::recorded_holder(&state::agent_lock_path(state_dir)) else {
        return Holder::Unknown;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Holder::Unknown;
    };
    classify(pid as i32, &cmdline)
}

fn classify(pid: i32, cmdline: &[u8]) -> Holder {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_agent = args.get(1) == Some(&&b"agent"[..]);
    if cmdline.is_empty() {
        Holder::Unknown
    } else if is_agent && args.contains(&&b"--if-absent"[..]) {
        Holder::Launcher(pid)
    } else {
        Holder::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_agent_a_launcher_started_is_taken_over() {
        let launcher = b"/usr/bin/burst-qemu\0agent\0--state-dir\0/run/burst-qemu\0--if-absent\0";
        assert!(matches!(classify(7, launcher), Holder::Launcher(7)));
        let by_hand = b"/usr/bin/burst-qemu\0agent\0--cgroup-parent\0self\0";
        assert!(matches!(classify(7, by_hand), Holder::Other));
        let not_agent = b"/usr/bin/burst-qemu\0ls\0--if-absent\0";
        assert!(matches!(classify(7, not_agent), Holder::Other));
        // A zombie's or kernel thread's empty command line: wait and look again.
        assert!(matches!(classify(7, b""), Holder::Unknown));
    }
}
