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
//! the launcher's but the QMP listener (and those its arguments name with `fd=`).
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

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use thiserror::Error;

use crate::config::{self, ConfigError, VmConfig};
use crate::credit::{Baseline, Credits, Mode, Policy};
use crate::state::{self, ClaimError, RuntimeDir, VmRecord};

/// How long the launcher waits for QEMU's QMP greeting and each reply during start-up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after `quit` the launcher waits before SIGKILL.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How often a running launcher calls its watchdog (which restarts a dead agent).
pub const WATCHDOG_EVERY: Duration = Duration::from_millis(500);
/// Longest VM name, in bytes.
pub const MAX_NAME: usize = 64;
const CHARDEV_ID: &str = "burst-qemu-qmp";

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
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: io::Error,
    },
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
            LaunchError::Claim(ClaimError::AlreadyRunning { .. } | ClaimError::Orphaned { .. }) => {
                EXIT_RUNNING
            }
            LaunchError::QemuNotFound { .. } => EXIT_NOT_FOUND,
            LaunchError::QemuNotExecutable { .. } => EXIT_NOT_EXECUTABLE,
            LaunchError::QemuStartup { .. } => EXIT_QEMU_STARTUP,
            LaunchError::Claim(ClaimError::Unwritable { .. })
            | LaunchError::Qmp(_)
            | LaunchError::ForeignThread { .. }
            | LaunchError::Io { .. } => 1,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LaunchError {
    let context = context.into();
    move |source| LaunchError::Io { context, source }
}

/// Checks a VM name: letters, digits, `-`, `_`, `.`; not `.` or `..`; 1–64 bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "VM name {name:?} must be 1 to {MAX_NAME} bytes long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("VM name {name:?} is not allowed"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "VM name {name:?} contains {c:?}: use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The value of QEMU option `opt` (given as `-opt` or `--opt`), with its index.
/// The arguments a memory-balanced VM needs beyond the user's: a balloon device when QEMU has
/// none (`-device virtio-balloon-pci,id=balloon0`), and `-m memory_max` when QEMU has no `-m`
/// (the VM boots at its ceiling and is ballooned down to `memory_start`, as libvirt does for
/// currentMemory).
pub fn memory_args(args: &[OsString], m: &config::MemoryConfig) -> Vec<String> {
    let mut extra = Vec::new();
    let has_balloon = option(args, "device").iter().any(|(_, v)| {
        v.split(',')
            .next()
            .is_some_and(|d| d.starts_with("virtio-balloon"))
    });
    if !has_balloon {
        extra.extend(["-device".to_owned(), BALLOON_DEVICE.to_owned()]);
    }
    if let (Some(max), true) = (m.max, option(args, "m").is_empty()) {
        extra.extend(["-m".to_owned(), format!("{max}M")]);
    }
    extra
}

/// The balloon device the launcher adds (its QOM path is `/machine/peripheral/balloon0`).
pub const BALLOON_DEVICE: &str = "virtio-balloon-pci,id=balloon0";

fn option<'a>(args: &'a [OsString], opt: &str) -> Vec<(usize, &'a str)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        let bare = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        if bare == Some(opt) {
            if let Some(v) = args.get(i + 1).and_then(|v| v.to_str()) {
                found.push((i, v));
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    found
}

/// The number of vCPUs a `-smp` value starts with: `cpus` (or the leading bare number), else
/// the product of the topology given, as QEMU computes it.
pub fn smp_cpus(value: &str) -> Result<u32, String> {
    let mut product: Option<u64> = None;
    for (i, part) in value.split(',').enumerate() {
        let (key, val) = match part.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 => ("cpus", part),
            None => return Err(format!("-smp {value}: cannot read {part:?}")),
        };
        let n = || {
            val.parse::<u64>()
                .map_err(|_| format!("-smp {value}: {key}={val:?} is not a number"))
        };
        match key {
            "cpus" => {
                return u32::try_from(n()?).map_err(|_| format!("-smp {value}: too many CPUs"))
            }
            "sockets" | "dies" | "clusters" | "cores" | "threads" | "books" | "drawers" => {
                product = Some(product.unwrap_or(1) * n()?);
            }
            _ => {}
        }
    }
    u32::try_from(product.unwrap_or(1)).map_err(|_| format!("-smp {value}: too many CPUs"))
}

/// The guest name in a QEMU `-name` value (`foo`, `guest=foo,…` or `foo,debug-threads=on`).
pub fn qemu_name(value: &str) -> Option<&str> {
    value
        .split(',')
        .enumerate()
        .find_map(|(i, part)| match part.split_once('=') {
            Some(("guest", v)) => Some(v),
            None if i == 0 && !part.is_empty() => Some(part),
            _ => None,
        })
}

/// The path of a QMP Unix socket the operator passed with `-qmp unix:PATH,server…`.
pub fn user_qmp_socket(args: &[OsString]) -> Option<PathBuf> {
    option(args, "qmp").into_iter().find_map(|(_, v)| {
        let rest = v.strip_prefix("unix:")?;
        let mut parts = rest.split(',');
        let path = parts.next()?;
        parts
            .any(|p| p == "server" || p.starts_with("server=on"))
            .then(|| PathBuf::from(path))
    })
}

/// Resolves the VM's name from `--name`, QEMU's `-name`, or generates one.
fn resolve_name(req: &Request) -> Result<String, LaunchError> {
    let args = &req.qemu[1..];
    let name = match (&req.name, option(args, "name").first()) {
        (Some(n), _) => n.clone(),
        (None, Some((_, v))) => qemu_name(v)
            .ok_or_else(|| {
                LaunchError::Usage(format!("cannot read a guest name from QEMU's -name {v:?}"))
            })?
            .to_owned(),
        (None, None) => format!("vm-{}", std::process::id()),
    };
    validate_name(&name).map_err(LaunchError::Usage)?;
    Ok(name)
}

/// The config in force: the file's when it exists (flags must agree, unless
/// `--force-config`), else built from the flags. Returns whether the file must be written.
fn resolve_config(
    req: &Request,
    path: &Path,
    smp: Option<u32>,
) -> Result<(VmConfig, bool), LaunchError> {
    let usage = LaunchError::Usage;
    let flag_credits = req
        .credits
        .map(|c| {
            Credits::from_credits(c)
                .ok_or_else(|| usage(format!("--credits {c}: not a number of credits ≥ 0")))
        })
        .transpose()?;
    let flag_baseline = req
        .baseline
        .map(|b| Baseline::from_percent(b).map_err(|e| usage(format!("--baseline: {e}"))))
        .transpose()?;

    if path.exists() {
        let file = config::load(path)?;
        if !req.force_config {
            let mut conflicts = Vec::new();
            let p = &file.policy;
            if let Some(v) = req.vcpus.filter(|&v| v != p.vcpus()) {
                conflicts.push(format!("--vcpus {v} contradicts vcpus = {}", p.vcpus()));
            }
            if let Some(b) = flag_baseline.filter(|&b| b != p.baseline()) {
                conflicts.push(format!(
                    "--baseline {} contradicts baseline = {}",
                    b.percent(),
                    p.baseline().percent()
                ));
            }
            if let Some(m) = req.mode.filter(|&m| m != p.mode()) {
                conflicts.push(format!("--mode {m} contradicts mode = \"{}\"", p.mode()));
            }
            if let Some(c) = flag_credits.filter(|&c| c != file.initial_credits) {
                conflicts.push(format!(
                    "--credits {c} contradicts initial_credits = {}",
                    file.initial_credits
                ));
            }
            if !conflicts.is_empty() {
                return Err(usage(format!(
                    "{} in {} (edit the file, drop the flag, or pass --force-config to rewrite the file from the flags)",
                    conflicts.join("; "),
                    path.display()
                )));
            }
            return Ok((file, false));
        }
        // --force-config: the flags win, the file's other settings stay.
        let vcpus = req.vcpus.unwrap_or(file.policy.vcpus());
        let baseline = flag_baseline.unwrap_or(file.policy.baseline());
        let policy = Policy::new(vcpus, baseline)
            .map_err(|e| usage(format!("--vcpus: {e}")))?
            .with_mode(req.mode.unwrap_or(file.policy.mode()))
            .with_max_credits(file.policy.max_credits())
            .with_max_surplus(file.policy.max_surplus())
            .with_decline_minutes(
                file.policy.decline_ns() as f64 / crate::credit::NS_PER_MIN as f64,
            )
            .map_err(|e| usage(e.to_string()))?;
        let cfg = VmConfig {
            policy,
            initial_credits: flag_credits.unwrap_or(file.initial_credits),
            credits: file.credits,
            disk_share: file.disk_share,
            cpus: file.cpus,
            memory: file.memory,
        };
        return Ok((cfg, true));
    }

    let vcpus = req.vcpus.or(smp).ok_or_else(|| {
        usage(format!(
            "--vcpus is required: {} does not exist and QEMU has no -smp",
            path.display()
        ))
    })?;
    let baseline = flag_baseline.ok_or_else(|| {
        usage(format!(
            "--baseline is required: {} does not exist",
            path.display()
        ))
    })?;
    let policy = Policy::new(vcpus, baseline)
        .map_err(|e| usage(format!("--vcpus: {e}")))?
        .with_mode(req.mode.unwrap_or_default());
    let cfg = VmConfig {
        initial_credits: flag_credits.unwrap_or(Policy::default_initial_credits(vcpus)),
        policy,
        credits: None,
        disk_share: None,
        cpus: None,
        memory: None,
    };
    Ok((cfg, true))
}

/// How the launcher reaches QEMU's monitor.
enum Monitor {
    /// We bound it and pass the listening socket to QEMU (ours is kept open until the
    /// handshake is done).
    Ours { _listener: UnixListener },
    /// The operator's `-qmp unix:` socket.
    Theirs,
}

/// A VM that registered: QEMU is running and its vCPU threads are recorded.
pub struct Running {
    child: Child,
    runtime: RuntimeDir,
    record: VmRecord,
    signals: SignalFd,
    shutdown_timeout: Duration,
}

/// Starts the VM and returns once it is registered.
pub fn start(req: &Request) -> Result<Running, LaunchError> {
    let binary = req
        .qemu
        .first()
        .ok_or_else(|| LaunchError::Usage("no QEMU command: put it after `--`".into()))?;
    let args = &req.qemu[1..];
    let name = resolve_name(req)?;

    let user_socket = user_qmp_socket(args);
    let qmp_socket = match &user_socket {
        Some(p) => p.clone(),
        None => req.state_dir.join(&name).join(state::QMP_SOCKET),
    };
    let socket_len = qmp_socket.as_os_str().len();
    if socket_len > state::MAX_SOCKET_PATH {
        return Err(LaunchError::Usage(format!(
            "QMP socket path {} is {socket_len} bytes, more than a Unix socket holds ({}): use a shorter --state-dir",
            qmp_socket.display(),
            state::MAX_SOCKET_PATH
        )));
    }

    let smp = match option(args, "smp").as_slice() {
        [] => None,
        [(_, v)] => Some(smp_cpus(v).map_err(LaunchError::Usage)?),
        _ => return Err(LaunchError::Usage("QEMU has more than one -smp".into())),
    };
    let config_path = req.vms_dir.join(format!("{name}.toml"));
    let (cfg, write_config) = resolve_config(req, &config_path, smp)?;
    let vcpus = cfg.policy.vcpus();
    if let Some(n) = smp.filter(|&n| n != vcpus) {
        return Err(LaunchError::Usage(format!(
            "QEMU's -smp gives {n} vCPUs, but the VM has {vcpus} (--vcpus or {})",
            config_path.display()
        )));
    }

    // Signals are read from a signalfd; block them before QEMU exists so no SIGCHLD is missed.
    // The child inherits the mask: `clean_child` empties it before exec. An ignored signal is
    // discarded even while blocked (never reaching the signalfd; an ignored SIGCHLD also
    // reaps QEMU behind our back): a parent's SIG_IGN on these is undone first.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ] {
        // SAFETY: SIG_DFL installs no handler.
        unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl) }
            .map_err(|e| io_err("resetting a signal's disposition")(e.into()))?;
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| io_err("blocking signals")(e.into()))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| io_err("creating a signalfd")(e.into()))?;

    let runtime = RuntimeDir::claim(&req.state_dir, &name)?;

    let mut cmd = Command::new(binary);
    cmd.args(args);
    if smp.is_none() {
        cmd.arg("-smp").arg(vcpus.to_string());
    }
    if option(args, "name").is_empty() {
        cmd.arg("-name").arg(format!("{name},debug-threads=on"));
    }
    if let Some(m) = &cfg.memory {
        cmd.args(memory_args(args, m));
    }
    let mut keep_fds = passed_fds(args);
    let monitor = match user_socket {
        Some(_) => Monitor::Theirs,
        None => {
            let listener = UnixListener::bind(&qmp_socket)
                .map_err(io_err(format!("binding {}", qmp_socket.display())))?;
            let fd = listener.as_raw_fd();
            cmd.arg("-chardev")
                .arg(format!("socket,id={CHARDEV_ID},fd={fd},server=on,wait=off"))
                .arg("-mon")
                .arg(format!("chardev={CHARDEV_ID},mode=control"));
            keep_fds.push(fd);
            Monitor::Ours {
                _listener: listener,
            }
        }
    };
    // SAFETY: `clean_child` runs in the child between fork and exec and calls only
    // async-signal-safe functions (sigaction, sigprocmask, syscall, fcntl, getrlimit); it reads
    // `keep_fds`, which was allocated before the fork and is not freed in the child.
    unsafe {
        cmd.pre_exec(move || clean_child(&keep_fds));
    }
    if !console_on_terminal(args) {
        cmd.process_group(0);
    }

    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => LaunchError::QemuNotFound {
            binary: binary.clone(),
        },
        _ => LaunchError::QemuNotExecutable {
            binary: binary.clone(),
            source,
        },
    })?;
    let pid = child.id();

    let registered = (|| {
        let stream = connect_monitor(&mut child, &qmp_socket, &monitor)?;
        let mut qmp = qmp::Client::handshake(stream, STARTUP_TIMEOUT)
            .map_err(|e| startup_failure(&mut child, e))?;
        // QEMU answers, so it runs: its start time identifies it (with its pid) from here on;
        // a record without one could match whatever process reuses the pid later.
        let qemu_start = state::process_start_time(pid).ok_or_else(|| LaunchError::Io {
            context: format!("reading QEMU's start time from /proc/{pid}/stat"),
            source: io::Error::other("unreadable"),
        })?;
        let cpus = qmp
            .execute(qmp::qapi::qmp::query_cpus_fast {})
            .map_err(|e| startup_failure(&mut child, e))?;
        let mut vcpu_tids = Vec::with_capacity(cpus.len());
        for cpu in &cpus {
            let tid = cpu_thread_id(cpu);
            let own = u32::try_from(tid)
                .ok()
                .filter(|t| Path::new(&format!("/proc/{pid}/task/{t}")).exists());
            vcpu_tids.push(own.ok_or(LaunchError::ForeignThread { tid, pid })?);
        }
        Ok::<_, LaunchError>((vcpu_tids, qemu_start))
    })();
    let (vcpu_tids, qemu_start) = match registered {
        Ok(t) => t,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    drop(monitor);

    let record = VmRecord {
        name: name.clone(),
        pid,
        wrapper_pid: std::process::id(),
        vcpus,
        baseline: cfg.policy.baseline().percent(),
        mode: cfg.policy.mode(),
        vcpu_tids,
        config: state::absolute(&config_path),
        qmp_socket: state::absolute(&qmp_socket),
        qemu_start,
        boot_id: state::boot_id(),
    };
    let result = (|| {
        if write_config {
            fs::create_dir_all(&req.vms_dir)
                .map_err(io_err(format!("creating {}", req.vms_dir.display())))?;
            config::save(&config_path, &cfg)?;
        }
        runtime.write_record(&record).map_err(io_err(format!(
            "writing {}",
            runtime.path().join(state::RECORD).display()
        )))
    })();
    if let Err(e) = result {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    tracing::info!(
        "VM {name} registered in {:?}: QEMU pid {pid}, vCPU threads {:?}",
        started.elapsed(),
        record.vcpu_tids
    );
    Ok(Running {
        child,
        runtime,
        record,
        signals,
        shutdown_timeout: req.shutdown_timeout,
    })
}

/// The descriptors QEMU's arguments name as inherited: `fd=N`, `fds=N:M…`, `vhostfd=N`,
/// `vhostfds=N:M…` in any option (`-netdev tap,fd=3`, `-add-fd fd=4,set=1`). They stay open in
/// QEMU; every other descriptor above 2 is closed on exec.
fn passed_fds(args: &[OsString]) -> Vec<i32> {
    let mut fds = Vec::new();
    for arg in args {
        for part in arg.to_string_lossy().split(',') {
            if let Some((key, value)) = part.split_once('=') {
                if matches!(key, "fd" | "fds" | "vhostfd" | "vhostfds") {
                    fds.extend(value.split(':').filter_map(|v| v.parse::<i32>().ok()));
                }
            }
        }
    }
    fds.retain(|&fd| fd > 2);
    fds
}

/// Run in the child between fork and exec: QEMU starts with the default disposition for every
/// signal and an empty signal mask (the launcher blocks INT, TERM, HUP and CHLD for its
/// signalfd, and a mask is inherited across exec: QEMU would otherwise ignore `kill`), and with
/// no descriptor above 2 but those in `keep` (the QMP listener, the operator's `fd=` ones).
///
/// # Safety
///
/// Only async-signal-safe calls: it must run between fork and exec.
unsafe fn clean_child(keep: &[i32]) -> io::Result<()> {
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

fn cpu_thread_id(cpu: &qmp::qapi::qmp::CpuInfoFast) -> i64 {
    // Every target's variant carries the same base; read it through JSON rather than match
    // some thirty variants.
    serde_json::to_value(cpu)
        .ok()
        .and_then(|v| v.get("thread-id").and_then(serde_json::Value::as_i64))
        .unwrap_or(-1)
}

/// Whether QEMU puts a console on the terminal the launcher was started from.
fn console_on_terminal(args: &[OsString]) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(0) } == 1;
    tty && args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == "-nographic" || a == "--nographic" || a.contains("stdio")
    })
}

/// Turns a QMP failure during start-up into "QEMU exited" when that is what happened.
fn startup_failure(child: &mut Child, e: qmp::Error) -> LaunchError {
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
fn connect_monitor(
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
                if let Some(status) = child.try_wait().map_err(io_err("waiting for QEMU"))? {
                    return Err(LaunchError::QemuStartup { status });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_err(format!("connecting to {}", path.display()))(e)),
        }
    };
    loop {
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        let ready =
            poll(&mut fds, PollTimeout::from(20u8)).map_err(|e| io_err("polling QMP")(e.into()))?;
        if ready > 0 {
            return Ok(stream);
        }
        if let Some(status) = child.try_wait().map_err(io_err("waiting for QEMU"))? {
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

impl Running {
    /// The VM's record.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// Runs until QEMU exits; returns the launcher's exit status (QEMU's, or 128 + signal).
    /// The runtime dir is removed. `watchdog` is called every [`WATCHDOG_EVERY`] while the VM
    /// runs (the binary restarts a dead agent from it).
    pub fn wait(mut self, mut watchdog: impl FnMut()) -> Result<u8, LaunchError> {
        let mut stage = Stage::Running;
        let mut next_watch = Instant::now() + WATCHDOG_EVERY;
        let status = loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("waiting for QEMU"))? {
                break status;
            }
            if stage == Stage::Running && Instant::now() >= next_watch {
                watchdog();
                next_watch = Instant::now() + WATCHDOG_EVERY;
            }
            let timeout = match stage {
                Stage::Killed => PollTimeout::NONE,
                Stage::Running => PollTimeout::try_from(WATCHDOG_EVERY.as_millis() as i32)
                    .unwrap_or(PollTimeout::NONE),
                Stage::PoweringDown(t) | Stage::Quitting(t) => {
                    let ms = t.saturating_duration_since(Instant::now()).as_millis();
                    PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::ZERO)
                }
            };
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io_err("polling signals")(e.into())),
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

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn smp_counts_cpus_as_qemu_does() {
        assert_eq!(smp_cpus("2"), Ok(2));
        assert_eq!(smp_cpus("4,maxcpus=8"), Ok(4));
        assert_eq!(smp_cpus("cpus=3,sockets=1"), Ok(3));
        assert_eq!(smp_cpus("sockets=2,cores=2,threads=2"), Ok(8));
        assert_eq!(smp_cpus("maxcpus=4"), Ok(1));
        assert!(smp_cpus("two").is_err());
    }

    #[test]
    fn names_follow_the_rules() {
        assert!(validate_name("web-1_a.b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").unwrap_err().contains("'/'"));
        assert!(validate_name(&"x".repeat(65)).is_err());
        assert!(validate_name(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn qemu_names_are_read_from_every_form() {
        assert_eq!(qemu_name("web"), Some("web"));
        assert_eq!(qemu_name("web,debug-threads=on"), Some("web"));
        assert_eq!(qemu_name("process=p,guest=db"), Some("db"));
        assert_eq!(qemu_name("process=p"), None);
    }

    #[test]
    fn user_qmp_unix_server_sockets_are_found() {
        let args = os(&[
            "-m",
            "64",
            "-qmp",
            "tcp:localhost:4444,server",
            "--qmp",
            "unix:/tmp/q.sock,server=on,wait=off",
        ]);
        assert_eq!(user_qmp_socket(&args), Some(PathBuf::from("/tmp/q.sock")));
        assert_eq!(user_qmp_socket(&os(&["-qmp", "unix:/tmp/q.sock"])), None);
        assert_eq!(
            user_qmp_socket(&os(&["-qmp", "unix:/tmp/q.sock,server,nowait"])),
            Some(PathBuf::from("/tmp/q.sock"))
        );
    }

    #[test]
    fn memory_balanced_vms_get_a_balloon_and_boot_at_their_max() {
        let m = config::MemoryConfig {
            min: 200,
            max: Some(2048),
            start: Some(512),
            shares: 1000,
        };
        assert_eq!(
            memory_args(&os(&["-kernel", "k"]), &m),
            ["-device", BALLOON_DEVICE, "-m", "2048M"]
        );
        assert!(
            memory_args(&os(&["-m", "1G", "-device", "virtio-balloon-pci,id=b"]), &m).is_empty()
        );
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
