//! The launcher: starts QEMU exactly as the operator asked (plus a QMP monitor, `-smp` and
//! `-name` when missing), learns its vCPU threads over QMP, records them, and manages the VM's
//! life until QEMU exits.
//!
//! Start-up, in order: validate the name and the socket path; resolve the config
//! (`vms/NAME.toml` wins, a contradicting flag is an error); make `-smp` agree; claim the
//! runtime dir; bind the QMP socket ourselves and hand QEMU the listening fd
//! (`-chardev socket,fd=N,server=on`), so the launcher connects at once and never polls for a
//! socket file; wait for the greeting while watching for QEMU's death; `query-cpus-fast`;
//! check every thread id is a thread of QEMU; write `vm.json`; write `vms/NAME.toml` when it
//! was absent. The QMP connection is then closed so `pause`, `resume` and `ls` can use it.
//!
//! QEMU starts clean: default signal dispositions, an empty signal mask, and no descriptor of
//! the launcher's but the monitors' listeners (and those its arguments name with `fd=`).
//!
//! Besides the main monitor QEMU gets two private ones, each a listener bound in the runtime
//! dir and handed over as `fd=`: the launcher's run-state watch (`run_state`), and the agent's
//! (`ag.sock`, mode 0600, recorded as `agent_socket` in `vm.json`), on which the agent keeps one
//! connection for its disk and memory workers (see `control::Qmp::for_agent`). QEMU serves one
//! client per monitor, so neither takes the main one from `pause`, `resume` or the operator's
//! tools.
//!
//! Life: SIGINT, SIGTERM and SIGCHLD are blocked and read from a signalfd. SIGCHLD means
//! QEMU may have exited: it is reaped at once. SIGINT/SIGTERM become `system_powerdown`; if
//! QEMU is still there after `--shutdown-timeout`, `quit` (or SIGTERM to QEMU when QMP is
//! unreachable); 5 s later, SIGKILL. A second signal skips straight to `quit`. The launcher
//! exits with QEMU's status (128 + N when QEMU was killed by signal N).
//!
//! Process group: QEMU gets its own process group so that a terminal's Ctrl-C reaches only the
//! launcher, which turns it into a graceful power-down — except when stdin is a terminal and
//! QEMU puts a console on stdio (`-nographic`, `stdio` in its arguments): then QEMU stays in
//! the terminal's foreground group so the console keeps working (QEMU sets the terminal raw,
//! so Ctrl-C goes to the guest).
//!
//! Files: [`args`] reads QEMU's command line, [`config`] resolves the name and the config,
//! [`process`] starts and watches QEMU; this module runs the start-up in order.

mod args;
mod config;
mod process;
mod run_state;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use thiserror::Error;

pub use args::{memory_args, qemu_name, smp_cpus, user_qmp_socket, BALLOON_DEVICE};
pub use process::{exit_code, Running, Watchdog};

use crate::base::{IoContext, IoFailure};
use crate::config::{ConfigError, VmConfig};
use crate::credit::Mode;
use crate::procfs::Proc;
use crate::state::{self, ClaimError, RuntimeDir, VmRecord};
use args::{console_on_terminal, option, passed_fds};
use process::{clean_child, connect_monitor, cpu_thread_id, startup_failure, Monitor};

/// How long the launcher waits for QEMU's QMP greeting and each reply during start-up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after `quit` the launcher waits before SIGKILL.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);
const CHARDEV_ID: &str = "burst-qemu-qmp";
/// The chardev id of the agent's monitor.
const AGENT_CHARDEV_ID: &str = "burst-qemu-agent";

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct Request {
    /// Directory of the per-VM config files.
    pub vms_dir: PathBuf,
    /// The state dir (runtime dirs of running VMs).
    pub state_dir: PathBuf,
    /// `--name`.
    pub name: Option<String>,
    /// `--vcpus`.
    pub vcpus: Option<u32>,
    /// `--baseline`.
    pub baseline: Option<f64>,
    /// `--credits`: launch credits of a new VM.
    pub credits: Option<f64>,
    /// `--mode`.
    pub mode: Option<Mode>,
    /// `--force-config`: rewrite `vms/NAME.toml` from the flags.
    pub force_config: bool,
    /// `--shutdown-timeout`.
    pub shutdown_timeout: Duration,
    /// QEMU's binary, then its arguments.
    pub qemu: Vec<OsString>,
}

/// A launch that failed, with its exit status.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// Bad flags or arguments.
    #[error("{0}")]
    Usage(String),
    /// The config file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The name is taken or the state dir unusable.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The QEMU binary does not exist.
    #[error("QEMU binary {binary:?} not found")]
    QemuNotFound {
        /// The binary.
        binary: OsString,
    },
    /// The QEMU binary cannot be executed.
    #[error("cannot execute QEMU binary {binary:?}")]
    QemuNotExecutable {
        /// The binary.
        binary: OsString,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// QEMU exited before its QMP monitor answered.
    #[error("QEMU exited during start-up ({status}); its own message is above")]
    QemuStartup {
        /// How it exited.
        status: ExitStatus,
    },
    /// QMP failed during start-up.
    #[error("QMP start-up conversation with QEMU failed")]
    Qmp(#[from] qmp::Error),
    /// A thread id from QMP is not a thread of QEMU.
    #[error("QMP reported vCPU thread {tid}, which is not a thread of QEMU (pid {pid})")]
    ForeignThread {
        /// The thread id.
        tid: i64,
        /// QEMU's pid.
        pid: u32,
    },
    /// Host I/O failed.
    #[error(transparent)]
    Io(#[from] IoFailure),
}

/// Exit status: bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the name is already running.
pub const EXIT_RUNNING: u8 = 3;
/// Exit status: QEMU exited during start-up.
pub const EXIT_QEMU_STARTUP: u8 = 125;
/// Exit status: the QEMU binary cannot be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
/// Exit status: the QEMU binary does not exist.
pub const EXIT_NOT_FOUND: u8 = 127;

impl LaunchError {
    /// The launcher's exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Usage(_) | LaunchError::Config(_) => EXIT_USAGE,
            LaunchError::Claim(
                ClaimError::AlreadyRunning { .. }
                | ClaimError::Orphaned { .. }
                | ClaimError::Foreign { .. },
            ) => EXIT_RUNNING,
            LaunchError::QemuNotFound { .. } => EXIT_NOT_FOUND,
            LaunchError::QemuNotExecutable { .. } => EXIT_NOT_EXECUTABLE,
            LaunchError::QemuStartup { .. } => EXIT_QEMU_STARTUP,
            LaunchError::Claim(ClaimError::Unwritable { .. })
            | LaunchError::Qmp(_)
            | LaunchError::ForeignThread { .. }
            | LaunchError::Io(_) => 1,
        }
    }
}

/// A launch resolved from the request, before anything runs.
struct Plan {
    name: String,
    qmp_socket: PathBuf,
    /// The operator passed their own `-qmp unix:` socket.
    user_socket: bool,
    /// `-smp` as given, if it was.
    smp: Option<u32>,
    config_path: PathBuf,
    cfg: VmConfig,
    /// `vms/NAME.toml` must be written (it was absent, or `--force-config`).
    write_config: bool,
}

/// Starts the VM and returns once it is registered.
pub fn start(req: &Request) -> Result<Running, LaunchError> {
    let plan = prepare(req)?;
    // Signals are read from a signalfd; block them before QEMU exists so no SIGCHLD is missed.
    // The child inherits the mask: `clean_child` empties it before exec.
    let signals = block_signals()?;
    let runtime = RuntimeDir::claim(&req.state_dir, &plan.name)?;
    let (mut cmd, monitor, events, agent_monitor) = command(req, &plan, &runtime)?;
    let started = Instant::now();
    let binary = &req.qemu[0];
    let mut child = cmd.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => LaunchError::QemuNotFound {
            binary: binary.clone(),
        },
        _ => LaunchError::QemuNotExecutable {
            binary: binary.clone(),
            source,
        },
    })?;
    // QEMU has its own copy of the agent monitor's listener.
    drop(agent_monitor);
    let pid = child.id();
    let registered = register(&mut child, &plan.qmp_socket, &monitor).and_then(|tids| {
        // QEMU answers, so it runs: its start time identifies it (with its pid) from here on;
        // a record without one could match whatever process reuses the pid later.
        let start = Proc::host().process_start_time(pid).ok_or_else(|| {
            LaunchError::Io(IoFailure {
                context: format!("reading QEMU's start time from /proc/{pid}/stat"),
                source: io::Error::other("unreadable"),
            })
        })?;
        Ok((tids, start))
    });
    drop(monitor);
    // Before the record: a VM that `ls` lists has its run state published.
    let registered = registered.and_then(|r| Ok((r, events.connect(runtime.path())?)));
    let (record, watch) = match registered {
        Ok(((vcpu_tids, qemu_start), watch)) => (
            VmRecord {
                name: plan.name.clone(),
                pid,
                wrapper_pid: std::process::id(),
                vcpus: plan.cfg.policy.vcpus(),
                baseline: plan.cfg.policy.baseline().percent(),
                mode: plan.cfg.policy.mode(),
                vcpu_tids,
                config: state::absolute(&plan.config_path),
                qmp_socket: state::absolute(&plan.qmp_socket),
                qemu_start,
                boot_id: Proc::host().boot_id(),
                source: state::Source::Launcher,
                agent_socket: Some(state::absolute(&runtime.path().join(state::AGENT_SOCKET))),
            },
            watch,
        ),
        Err(e) => return Err(kill_child(&mut child, e)),
    };
    if let Err(e) = save(req, &plan, &runtime, &record) {
        return Err(kill_child(&mut child, e));
    }
    tracing::info!(
        "VM {} registered in {:?}: QEMU pid {pid}, vCPU threads {:?}",
        plan.name,
        started.elapsed(),
        record.vcpu_tids
    );
    Ok(Running {
        child,
        runtime,
        record,
        signals,
        shutdown_timeout: req.shutdown_timeout,
        run_state: Some(watch),
    })
}

/// The name, config file and config that `req`'s flags and QEMU command line give by the
/// launcher's own rules (flags that contradict the file refused), and whether the file must be
/// written: for `burst-qemu adopt`, which takes a QEMU someone else started.
pub fn resolve_config(
    req: &Request,
) -> Result<(String, std::path::PathBuf, crate::config::VmConfig, bool), LaunchError> {
    let name = config::resolve_name(req)?;
    let args = &req.qemu[1..];
    let smp = match option(args, "smp").as_slice() {
        [(_, v)] => smp_cpus(v).ok(),
        _ => None,
    };
    let path = req.vms_dir.join(format!("{name}.toml"));
    let (cfg, write) = config::resolve_config(req, &path, smp)?;
    Ok((name, path, cfg, write))
}

/// Name, QMP socket, `-smp` and config, checked against each other.
fn prepare(req: &Request) -> Result<Plan, LaunchError> {
    if req.qemu.is_empty() {
        return Err(LaunchError::Usage(
            "no QEMU command: put it after `--`".into(),
        ));
    }
    let args = &req.qemu[1..];
    let name = config::resolve_name(req)?;
    let user_socket = user_qmp_socket(args);
    let qmp_socket = match &user_socket {
        Some(p) => p.clone(),
        None => req.state_dir.join(&name).join(state::QMP_SOCKET),
    };
    let events_socket = req.state_dir.join(&name).join(run_state::SOCKET);
    let agent_socket = req.state_dir.join(&name).join(state::AGENT_SOCKET);
    for socket in [&qmp_socket, &events_socket, &agent_socket] {
        let socket_len = socket.as_os_str().len();
        if socket_len > state::MAX_SOCKET_PATH {
            return Err(LaunchError::Usage(format!(
                "QMP socket path {} is {socket_len} bytes, more than a Unix socket holds ({}): use a shorter --state-dir",
                socket.display(),
                state::MAX_SOCKET_PATH
            )));
        }
    }
    let smp = match option(args, "smp").as_slice() {
        [] => None,
        [(_, v)] => Some(smp_cpus(v).map_err(LaunchError::Usage)?),
        _ => return Err(LaunchError::Usage("QEMU has more than one -smp".into())),
    };
    let config_path = req.vms_dir.join(format!("{name}.toml"));
    let (cfg, write_config) = config::resolve_config(req, &config_path, smp)?;
    let vcpus = cfg.policy.vcpus();
    if let Some(n) = smp.filter(|&n| n != vcpus) {
        return Err(LaunchError::Usage(format!(
            "QEMU's -smp gives {n} vCPUs, but the VM has {vcpus} (--vcpus or {})",
            config_path.display()
        )));
    }
    Ok(Plan {
        name,
        qmp_socket,
        user_socket: user_socket.is_some(),
        smp,
        config_path,
        cfg,
        write_config,
    })
}

/// Blocks the signals the launcher reads from its signalfd.
fn block_signals() -> Result<SignalFd, LaunchError> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ] {
        // An ignored signal is discarded even while blocked (never reaching the signalfd; an
        // ignored SIGCHLD also reaps QEMU behind our back): a parent's SIG_IGN is undone first.
        // SAFETY: SIG_DFL installs no handler.
        unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl) }
            .doing(|| "resetting a signal's disposition".into())?;
        mask.add(s);
    }
    mask.thread_block().doing(|| "blocking signals".into())?;
    Ok(
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .doing(|| "creating a signalfd".into())?,
    )
}

/// QEMU's command: the operator's, plus `-smp`, `-name`, the memory coordinator's arguments
/// and our QMP monitor when they are missing, and always the two private monitors (the
/// launcher's run-state events, the agent's); with the agent monitor's listener, which must
/// stay open until QEMU is spawned.
fn command(
    req: &Request,
    plan: &Plan,
    runtime: &RuntimeDir,
) -> Result<(Command, Monitor, run_state::Listener, UnixListener), LaunchError> {
    let args = &req.qemu[1..];
    let mut cmd = Command::new(&req.qemu[0]);
    cmd.args(args);
    if plan.smp.is_none() {
        cmd.arg("-smp").arg(plan.cfg.policy.vcpus().to_string());
    }
    if option(args, "name").is_empty() {
        cmd.arg("-name")
            .arg(format!("{},debug-threads=on", plan.name));
    }
    if let Some(m) = &plan.cfg.memory {
        cmd.args(memory_args(args, m));
    }
    let mut keep_fds = passed_fds(args);
    let monitor = if plan.user_socket {
        Monitor::Theirs
    } else {
        let listener = UnixListener::bind(&plan.qmp_socket)
            .doing(|| format!("binding {}", plan.qmp_socket.display()))?;
        let fd = listener.as_raw_fd();
        cmd.arg("-chardev")
            .arg(format!("socket,id={CHARDEV_ID},fd={fd},server=on,wait=off"))
            .arg("-mon")
            .arg(format!("chardev={CHARDEV_ID},mode=control"));
        keep_fds.push(fd);
        Monitor::Ours {
            _listener: listener,
        }
    };
    let agent = agent_monitor(runtime.path())?;
    let fd = agent.as_raw_fd();
    cmd.arg("-chardev")
        .arg(format!(
            "socket,id={AGENT_CHARDEV_ID},fd={fd},server=on,wait=off"
        ))
        .arg("-mon")
        .arg(format!("chardev={AGENT_CHARDEV_ID},mode=control"));
    keep_fds.push(fd);
    let events_path = runtime.path().join(run_state::SOCKET);
    let events = run_state::Listener::bind(events_path.clone())
        .doing(|| format!("binding {}", events_path.display()))?;
    let fd = events.fd().as_raw_fd();
    cmd.arg("-chardev")
        .arg(format!(
            "socket,id={},fd={fd},server=on,wait=off",
            run_state::CHARDEV_ID
        ))
        .arg("-mon")
        .arg(format!("chardev={},mode=control", run_state::CHARDEV_ID));
    keep_fds.push(fd);
    // SAFETY: `clean_child` runs in the child between fork and exec and calls only
    // async-signal-safe functions (sigaction, sigprocmask, syscall, fcntl, getrlimit); it reads
    // `keep_fds`, which was allocated before the fork and is not freed in the child.
    unsafe {
        cmd.pre_exec(move || clean_child(&keep_fds));
    }
    if !console_on_terminal(args) {
        cmd.process_group(0);
    }
    Ok((cmd, monitor, events, agent))
}

/// Binds the agent's monitor (see `control::Qmp::for_agent`) in the runtime dir, owner only:
/// unlike the events monitor it stays reachable for QEMU's life, since a restarted agent
/// connects again.
fn agent_monitor(runtime_dir: &Path) -> Result<UnixListener, LaunchError> {
    use std::os::unix::fs::PermissionsExt;
    let path = runtime_dir.join(state::AGENT_SOCKET);
    let listener = UnixListener::bind(&path).doing(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .doing(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Learns the vCPU thread ids over QMP (`query-cpus-fast`), each checked to be a thread of QEMU.
fn register(
    child: &mut Child,
    qmp_socket: &Path,
    monitor: &Monitor,
) -> Result<Vec<u32>, LaunchError> {
    let pid = child.id();
    let stream = connect_monitor(child, qmp_socket, monitor)?;
    let mut qmp =
        qmp::Client::handshake(stream, STARTUP_TIMEOUT).map_err(|e| startup_failure(child, e))?;
    let cpus = qmp
        .execute(qmp::qapi::qmp::query_cpus_fast {})
        .map_err(|e| startup_failure(child, e))?;
    let mut vcpu_tids = Vec::with_capacity(cpus.len());
    for cpu in &cpus {
        let tid = cpu_thread_id(cpu);
        let own = u32::try_from(tid)
            .ok()
            .filter(|&t| Proc::host().is_thread_of(pid, t));
        vcpu_tids.push(own.ok_or(LaunchError::ForeignThread { tid, pid })?);
    }
    Ok(vcpu_tids)
}

/// Writes `vms/NAME.toml` when it must be, then the VM record (which the agent adopts).
fn save(
    req: &Request,
    plan: &Plan,
    runtime: &RuntimeDir,
    record: &VmRecord,
) -> Result<(), LaunchError> {
    if plan.write_config {
        fs::create_dir_all(&req.vms_dir).doing(|| format!("creating {}", req.vms_dir.display()))?;
        crate::config::save(&plan.config_path, &plan.cfg)?;
    }
    runtime
        .write_record(record)
        .doing(|| format!("writing {}", runtime.path().join(state::RECORD).display()))?;
    Ok(())
}

/// Kills a QEMU whose start-up failed, and returns the failure.
fn kill_child(child: &mut Child, e: LaunchError) -> LaunchError {
    let _ = child.kill();
    let _ = child.wait();
    e
}
