//! What the fleet commands and the commands for VMs burst-qemu did not launch share: finding a
//! running VM by name, and making sure an agent serves the state dir (at once, and for as long
//! as a launcher's VM runs: [`AgentWatch`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use burst_qemu::launch::Watchdog;
use burst_qemu::procfs::{pidfd_exited, pidfd_open};
use burst_qemu::state::{self, VmRecord};

use super::{Failure, Global, EXIT_NO_SUCH_VM};

/// A running VM of the state dir, by name.
pub(super) fn find_vm(g: &Global, name: &str) -> Result<(VmRecord, state::Liveness), Failure> {
    let dir = g.state_dir();
    state::find(&dir, name).ok_or_else(|| Failure {
        code: EXIT_NO_SUCH_VM,
        error: anyhow::anyhow!("no running VM named {name:?} in {}", dir.display()),
    })
}

/// This program's path, to start an agent from. Once a package upgrade has replaced the binary,
/// the kernel names the running one `/usr/bin/burst-qemu (deleted)`: the launchers of VMs
/// started before the upgrade then start the new binary from the same path.
fn own_exe() -> std::io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) if std::path::Path::new(path).is_file() => Ok(path.into()),
        _ => Ok(exe),
    }
}

/// Starts an agent for the state dir unless one runs: a grandchild in its own session, so it
/// outlives this launcher and leaves no zombie; its log is `<state dir>/agent.log`.
pub(super) fn ensure_agent(
    state_dir: &std::path::Path,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    if state::agent_running(state_dir) {
        return Ok(());
    }
    let log_path = state_dir.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(own_exe().context("finding burst-qemu's own path")?);
    cmd.arg("agent")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--if-absent", "--idle-exit", "30"]);
    // An agent that watched libvirt and died: its successor watches the same connection, so
    // that the domains it left in the state dir stay in the fleet.
    let uris: std::collections::BTreeSet<String> = state::running(state_dir)
        .into_iter()
        .filter_map(|(r, _)| match r.source {
            state::Source::Libvirt { uri, .. } => Some(uri),
            _ => None,
        })
        .collect();
    if let Some(uri) = uris.into_iter().next() {
        cmd.arg("--libvirt").arg(uri);
    }
    cmd
        // The agent's log is for the operator: what it adopted, charged and repaired.
        .env(
            "BURST_QEMU_LOG",
            std::env::var_os("BURST_QEMU_LOG").unwrap_or_else(|| "info".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions
    // (setsid, fork, _exit).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut middle = cmd.spawn().context("starting the agent")?;
    middle.wait().context("starting the agent")?;
    Ok(())
}

/// How often a launcher looks for its agent while it cannot wait on the agent's pidfd (no agent
/// yet, one still taking its lock, or a lock that names no pid).
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// How often it looks anyway while it waits on the pidfd. The pidfd is of the pid the lock
/// names, opened while the lock was held and named it; it could be another process's only if
/// the holder died, a new agent took the lock and the old pid was reused, all before the new
/// agent wrote its own pid, which this look catches.
const LOOK_ANYWAY: Duration = Duration::from_secs(10);
/// How long after starting an agent a launcher waits for it to take its lock before starting
/// another (seconds on a loaded or emulated host).
const START_GRACE: Duration = Duration::from_secs(5);

/// A launcher's watch over the state dir's agent: a dead agent (killed, crashed) is restarted at
/// once, so a VM is never left uncharged for longer than a new agent takes to start; the new
/// agent charges the gap from the ledger's checkpoint. The launcher waits on the agent's pidfd,
/// so an idle fleet's launchers do not wake to ask (100 launchers asking twice a second cost as
/// much CPU as the agent: docs/scale.md). Only an agent seen running and gone is restarted, or
/// one still absent [`START_GRACE`] after the last start.
pub(super) struct AgentWatch<'a> {
    state_dir: &'a Path,
    data_dir: &'a Path,
    /// A pidfd of the agent holding the lock, when known.
    agent: Option<OwnedFd>,
    seen: bool,
    grace_until: Instant,
    warned: bool,
}

impl<'a> AgentWatch<'a> {
    /// A watch of the agent that [`ensure_agent`] has just made sure of (or failed to).
    pub(super) fn new(state_dir: &'a Path, data_dir: &'a Path) -> Self {
        AgentWatch {
            state_dir,
            data_dir,
            agent: None,
            seen: false,
            grace_until: Instant::now() + START_GRACE,
            warned: false,
        }
    }
}

impl Watchdog for AgentWatch<'_> {
    fn look(&mut self) {
        let alive = |fd: &OwnedFd| !pidfd_exited(fd.as_fd());
        if self.agent.as_ref().is_some_and(alive) && state::agent_running(self.state_dir) {
            return;
        }
        self.agent = None;
        if state::agent_running(self.state_dir) {
            self.seen = true;
            self.agent = holder_pidfd(self.state_dir);
            return;
        }
        if !self.seen && Instant::now() < self.grace_until {
            return;
        }
        (self.seen, self.grace_until) = (false, Instant::now() + START_GRACE);
        match ensure_agent(self.state_dir, self.data_dir) {
            Ok(()) => tracing::warn!("the credit agent was not running: restarted it"),
            Err(e) if !self.warned => {
                self.warned = true;
                tracing::error!("the credit agent is not running and cannot be restarted: {e:#}");
            }
            Err(_) => {}
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.agent.as_ref().map(AsFd::as_fd)
    }

    fn period(&self) -> Duration {
        match self.agent {
            Some(_) => LOOK_ANYWAY,
            None => LOOK_EVERY,
        }
    }
}

/// A pidfd of the process holding the state dir's agent lock: the pid the lock names, opened,
/// and the lock still held and naming it afterwards. `None` when the lock names no pid (yet)
/// or another one by then.
fn holder_pidfd(state_dir: &Path) -> Option<OwnedFd> {
    let lock = state::agent_lock_path(state_dir);
    let pid = state::recorded_holder(&lock)?;
    let fd = pidfd_open(pid)?;
    let still = state::lock_held(&lock) && state::recorded_holder(&lock) == Some(pid);
    (still && !pidfd_exited(fd.as_fd())).then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// The lock's holder as an agent is: a process holding `agent.lock` that names its pid.
    fn holder(lock: &Path) -> std::process::Child {
        // -o: the lock stays flock's own, not its command's.
        let child = std::process::Command::new("flock")
            .arg("-o")
            .arg(lock)
            .args(["sleep", "30"])
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("flock(1)");
        std::fs::write(lock, format!("{}\n", child.id())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !state::lock_held(lock) {
            assert!(Instant::now() < deadline, "flock never took the lock");
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn the_launcher_waits_on_the_lock_holders_pidfd_which_wakes_it_when_the_holder_dies() {
        let dir = tempfile::tempdir().unwrap();
        let lock = state::agent_lock_path(dir.path());
        // A lock naming a pid that does not hold it: no pidfd, looked at every 0.5 s.
        std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
        assert!(holder_pidfd(dir.path()).is_none());

        let mut agent = holder(&lock);
        let mut watch = AgentWatch::new(dir.path(), dir.path());
        assert_eq!(watch.period(), LOOK_EVERY);
        watch.look();
        assert!(watch.seen);
        let fd = watch.fd().expect("a pidfd of the holder");
        assert_eq!(watch.period(), LOOK_ANYWAY);
        assert!(!pidfd_exited(fd));

        // The holder and its command, as `kill -9` of an agent's process group would.
        let group = nix::unistd::Pid::from_raw(agent.id() as i32);
        nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).unwrap();
        let t = Instant::now();
        let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let n = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert_eq!(n, 1, "the pidfd did not wake the launcher in 5 s");
        eprintln!("woken {:?} after the kill", t.elapsed());
        agent.wait().unwrap();
    }
}
