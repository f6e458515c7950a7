//! What the fleet commands and the commands for VMs burst-qemu did not launch share: finding a
//! running VM by name, and making sure an agent serves the state dir.

use anyhow::Context;
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
