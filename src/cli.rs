//! Command-line interface: clap definitions (their `///` docs are the `--help` text) and the
//! mapping of each command's errors to documented exit statuses.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use burst_qemu::agent::{self, Agent, AgentError, CreditsView, LedgerFile, Settings};
use burst_qemu::credit::{Baseline, Credits, Ledger, Mode, Policy, PolicyError, NS_PER_MIN};
use burst_qemu::enforce::cgroup::{self, CgroupEnforcer, Version};
use burst_qemu::launch::{self, LaunchError, Request};
use burst_qemu::simulate;
use burst_qemu::state::{self, VmRecord};
use burst_qemu::testguest::{self, Behaviour};
use clap::{Args, Parser, Subcommand};

/// Exit status for bad input: a flag, a file or a value out of range.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for a failure of the host (I/O that should have worked).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status when the named VM is not running.
pub const EXIT_NO_SUCH_VM: u8 = 4;
/// Exit status when a VM of that name, or an agent for that state dir, already runs.
pub const EXIT_RUNNING: u8 = 3;

/// Burstable CPU-credit instances for QEMU virtual machines.
///
/// Launch a VM:  burst-qemu [OPTIONS] --vcpus N --baseline PCT -- QEMU_BINARY QEMU_ARGS…
///
/// The launcher starts QEMU exactly as given, adding a QMP monitor in the VM's runtime dir,
/// `-smp N` when absent and `-name NAME,debug-threads=on` when absent; it learns the vCPU
/// threads over QMP, records them, and stays until QEMU exits. SIGINT/SIGTERM power the guest
/// down (`system_powerdown`, then `quit` after --shutdown-timeout, then SIGKILL).
///
/// Exit status: 0 on success; 1 when the host fails an operation (I/O, QMP); 2 for bad input
/// (a flag, file or value out of range, a contradicting -smp or config, a bad name, a socket
/// path too long); 3 when a VM of that name (or an agent for that state dir) is already
/// running; 4 when the named VM is not
/// running; 125 when QEMU exits during start-up (its own message is printed above ours); 126
/// when the QEMU binary cannot be executed; 127 when it does not exist. Once the VM has
/// started, the launcher exits with QEMU's own status (128 + N when QEMU was killed by
/// signal N).
#[derive(Debug, Parser)]
#[command(
    name = "burst-qemu",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Launch a VM (the default action when no command is given).
    Run(RunArgs),
    /// List the running VMs.
    Ls(LsArgs),
    /// Stop a VM gracefully (power-down, then quit, then kill) and wait until it has ended.
    Stop(StopArgs),
    /// Pause a VM's vCPUs (QMP `stop`).
    Pause(NameArgs),
    /// Resume a paused VM (QMP `cont`).
    Resume(NameArgs),
    /// Show a VM's credits (running or stopped), or set its balance with --set.
    Credits(CreditsArgs),
    /// Run the credit agent for a state dir in the foreground (launchers start one
    /// automatically when none runs).
    Agent(AgentArgs),
    /// Report what this host supports: QEMU, KVM, cgroup CPU bandwidth, ghOSt; and the fix for
    /// each missing piece.
    Check,
    Simulate(SimulateArgs),
    #[command(hide = true)]
    TestGuest(TestGuestArgs),
}

#[derive(Debug, Args)]
struct StateDirArg {
    /// Runtime state of running VMs [default: /run/burst-qemu as root, else
    /// $XDG_RUNTIME_DIR/burst-qemu].
    #[arg(long, value_name = "DIR", env = "BURST_QEMU_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl StateDirArg {
    /// Absolute: the state dir names the agent's cgroups, so `state` and `/tmp/x/state` must
    /// not become two instances.
    fn get(&self) -> PathBuf {
        state::absolute(
            &self
                .state_dir
                .clone()
                .unwrap_or_else(state::default_state_dir),
        )
    }
}

#[derive(Debug, Args)]
struct DataDirArg {
    /// Where ledgers are kept across restarts and reboots [default: /var/lib/burst-qemu as
    /// root, else $XDG_DATA_HOME/burst-qemu].
    #[arg(long, value_name = "DIR", env = "BURST_QEMU_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl DataDirArg {
    /// Absolute, so an agent started from another directory finds the same ledgers.
    fn get(&self) -> PathBuf {
        state::absolute(
            &self
                .data_dir
                .clone()
                .unwrap_or_else(state::default_data_dir),
        )
    }
}

#[derive(Debug, Args)]
struct CreditsArgs {
    #[command(flatten)]
    state: StateDirArg,
    #[command(flatten)]
    data: DataDirArg,
    /// The VM's name.
    name: String,
    /// Print JSON (keys: name, balance, surplus, charged, earn_per_hour, usage_pct, grant_pct,
    /// time_to_empty_s, …; percentages of all the VM's vCPUs).
    #[arg(long)]
    json: bool,
    /// Set the balance to C credits.
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    set: Option<f64>,
}

#[derive(Debug, Args)]
struct AgentArgs {
    #[command(flatten)]
    state: StateDirArg,
    #[command(flatten)]
    data: DataDirArg,
    /// Mount point of the cgroup hierarchy with the cpu controller [default: detected].
    #[arg(long, value_name = "DIR", env = "BURST_QEMU_CGROUP_MOUNT")]
    cgroup_mount: Option<PathBuf>,
    /// The cgroup version at --cgroup-mount.
    #[arg(long, value_name = "v1|v2", env = "BURST_QEMU_CGROUP_VERSION", value_parser = ["v1", "v2"])]
    cgroup_version: Option<String>,
    /// Exit quietly if an agent already runs for the state dir.
    #[arg(long, hide = true)]
    if_absent: bool,
    /// Exit after this many seconds without VMs.
    #[arg(long, value_name = "SECONDS")]
    idle_exit: Option<f64>,
    /// How grants are enforced: cgroup CPU bandwidth, or the centralized ghOSt agent
    /// scheduling the vCPU threads itself (needs a ghOSt kernel, ABI 91).
    #[arg(long, value_name = "cgroup|ghost", default_value = "cgroup", value_parser = ["cgroup", "ghost"])]
    enforcer: String,
    /// CPUs of the ghOSt enclave, comma-separated; the first runs the global agent [default: all].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    ghost_cpus: Option<Vec<u32>>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Directory of the per-VM config files (NAME.toml).
    #[arg(
        long,
        value_name = "DIR",
        env = "BURST_QEMU_VMS",
        default_value = "vms"
    )]
    vms: PathBuf,
    #[command(flatten)]
    state: StateDirArg,
    #[command(flatten)]
    data: DataDirArg,
    /// The VM's name [default: QEMU's -name, else vm-PID]: letters, digits, '-', '_', '.',
    /// at most 64 bytes, unique among the running VMs of the state dir.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Number of vCPUs (QEMU's -smp must agree; added when absent).
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Baseline, percent per vCPU, in (0, 100]; pooled over the VM's vCPUs.
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    baseline: Option<f64>,
    /// Launch credits of a new VM [default: 30 per vCPU].
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    credits: Option<f64>,
    /// `standard` or `unlimited` [default: standard].
    #[arg(long, value_parser = clap::value_parser!(Mode))]
    mode: Option<Mode>,
    /// Rewrite vms/NAME.toml from the flags instead of refusing flags that contradict it.
    #[arg(long)]
    force_config: bool,
    /// Seconds to wait after system_powerdown before `quit`.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// QEMU's binary and arguments, after `--`.
    #[arg(last = true, value_name = "QEMU_BINARY QEMU_ARGS")]
    qemu: Vec<OsString>,
}

#[derive(Debug, Args)]
struct LsArgs {
    #[command(flatten)]
    state: StateDirArg,
    /// Print a JSON array of objects (name, pid, vcpus, baseline, mode, state, vcpu_tids, …).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NameArgs {
    #[command(flatten)]
    state: StateDirArg,
    /// The VM's name.
    name: String,
}

#[derive(Debug, Args)]
struct StopArgs {
    #[command(flatten)]
    state: StateDirArg,
    /// The VM's name.
    name: String,
    /// Seconds to wait for the VM to end (beyond its launcher's own escalation).
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    wait: f64,
}

/// Write the project's test firmware (for QEMU's `-bios`): every vCPU busy, or every vCPU
/// halted with --halt.
#[derive(Debug, Args)]
struct TestGuestArgs {
    /// Halt every vCPU instead of spinning.
    #[arg(long)]
    halt: bool,
    /// Where to write the 64 KiB image.
    #[arg(value_name = "FILE")]
    out: PathBuf,
}

/// Predict a VM's credit balance under a load trace, on a simulated clock.
///
/// TRACE.csv has lines `minutes,percent`: hold the VM's demand at PERCENT of all its vCPUs for
/// MINUTES (fractions allowed); `#` starts a comment. Output is CSV on stdout with the header
/// `minute,demand_pct,granted_pct,balance,surplus,charged`, one row at the end of each trace
/// line (and every M minutes with --every). Percentages are of all the VM's vCPUs; demand above
/// the grant is not served. Defaults are those of a real VM, so the simulation predicts what
/// the VM will do; replay published examples with --initial-credits 0.
#[derive(Debug, Args)]
struct SimulateArgs {
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: u32,
    /// Baseline, percent per vCPU, in (0, 100]; pooled over the VM's vCPUs.
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    baseline: f64,
    /// What happens at a zero balance: `standard` holds the VM to its baseline, `unlimited`
    /// keeps bursting on surplus credits.
    #[arg(long, default_value = "standard", value_parser = clap::value_parser!(Mode))]
    mode: Mode,
    /// Launch credits granted at creation, spent first [default: 30 per vCPU].
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    initial_credits: Option<f64>,
    /// Cap on earned credits [default: 24 hours of earnings].
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    max_credits: Option<f64>,
    /// Minutes over which the grant falls from the full rate to the baseline as the balance
    /// runs out.
    #[arg(
        long,
        value_name = "M",
        default_value_t = 20.0,
        allow_negative_numbers = true
    )]
    decline_minutes: f64,
    /// Also print a row every M simulated minutes.
    #[arg(long, value_name = "M", allow_negative_numbers = true)]
    every: Option<f64>,
    /// Print the rows as a JSON array of objects instead of CSV.
    #[arg(long)]
    json: bool,
    /// Also draw the credit curve (balance, surplus, demand and grant over time) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// The load trace.
    #[arg(value_name = "TRACE.csv")]
    trace: PathBuf,
}

/// A command's failure with the exit status it maps to.
#[derive(Debug)]
pub struct Failure {
    /// Exit status.
    pub code: u8,
    /// What went wrong, with its causes.
    pub error: anyhow::Error,
}

impl Failure {
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }
    fn host(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: EXIT_FAILURE,
            error: error.into(),
        }
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        None => run_vm(cli.run),
        Some(Command::Run(args)) => run_vm(args),
        Some(Command::Ls(args)) => ls(args),
        Some(Command::Stop(args)) => stop(args),
        Some(Command::Pause(a)) => qmp_on(&a, qmp::qapi::qmp::stop {}),
        Some(Command::Resume(a)) => qmp_on(&a, qmp::qapi::qmp::cont {}),
        Some(Command::Credits(a)) => credits(a),
        Some(Command::Agent(a)) => run_agent(a),
        Some(Command::Check) => check(),
        Some(Command::Simulate(args)) => simulate_cmd(args),
        Some(Command::TestGuest(a)) => {
            let kind = if a.halt {
                Behaviour::Halt
            } else {
                Behaviour::Busy
            };
            testguest::write(&a.out, kind)
                .with_context(|| format!("writing {}", a.out.display()))
                .map_err(Failure::host)
        }
    }
}

fn run_vm(a: RunArgs) -> Result<(), Failure> {
    if a.qemu.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "no QEMU command: burst-qemu --vcpus N --baseline PCT -- QEMU_BINARY QEMU_ARGS… (see --help)"
        )));
    }
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--shutdown-timeout must be a number of seconds ≥ 0"
        )));
    }
    let req = Request {
        vms_dir: a.vms.clone(),
        state_dir: a.state.get(),
        name: a.name,
        vcpus: a.vcpus,
        baseline: a.baseline,
        credits: a.credits,
        mode: a.mode,
        force_config: a.force_config,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        qemu: a.qemu.clone(),
    };
    let launched = |e: LaunchError| Failure {
        code: e.exit_code(),
        error: e.into(),
    };
    let vm = launch::start(&req).map_err(launched)?;
    if let Err(e) = ensure_agent(&req.state_dir, &a.data.get()) {
        eprintln!(
            "burst-qemu: warning: cannot start the credit agent ({e:#}); credits are not enforced"
        );
    }
    let code = vm.wait().map_err(launched)?;
    if code != 0 {
        // QEMU's own status; QEMU has said why.
        std::process::exit(i32::from(code));
    }
    Ok(())
}

/// A running VM's state as QMP reports it: `running`, `paused`, another QEMU run state, or
/// `unknown` when its monitor does not answer.
fn vm_state(vm: &VmRecord) -> String {
    let status = qmp::Client::connect(&vm.qmp_socket, Duration::from_secs(2))
        .and_then(|mut c| c.execute(qmp::qapi::qmp::query_status {}));
    match status {
        Ok(s) if s.running => "running".into(),
        Ok(s) => serde_json::to_value(s.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "paused".into()),
        Err(e) => {
            tracing::debug!("{}: {e}", vm.name);
            "unknown".into()
        }
    }
}

fn ls(a: LsArgs) -> Result<(), Failure> {
    let dir = a.state.get();
    let vms = state::running(&dir);
    let out = if a.json {
        let rows: Vec<serde_json::Value> = vms
            .iter()
            .map(|vm| {
                let mut v = serde_json::to_value(vm).expect("records are plain data");
                v["state"] = vm_state(vm).into();
                let error = config_error(&dir, &vm.name);
                v["config_state"] = if error.is_some() { "stale" } else { "ok" }.into();
                v["config_error"] = error.into();
                v
            })
            .collect();
        serde_json::to_string_pretty(&rows).expect("plain data") + "\n"
    } else {
        let mut out = format!(
            "{:<20} {:>8} {:>5} {:>9} {:<9} {:<8} {:>9} {:<6} VCPU TIDS\n",
            "NAME", "PID", "VCPUS", "BASELINE", "MODE", "STATE", "BALANCE", "CONFIG"
        );
        let mut stale = String::new();
        for vm in &vms {
            let tids: Vec<String> = vm.vcpu_tids.iter().map(u32::to_string).collect();
            let live = read_view(&dir, &vm.name);
            let error = config_error(&dir, &vm.name);
            if let Some(e) = &error {
                stale.push_str(&format!("{}: config stale: {e}\n", vm.name));
            }
            out.push_str(&format!(
                "{:<20} {:>8} {:>5} {:>8}% {:<9} {:<8} {:>9} {:<6} {}\n",
                vm.name,
                vm.pid,
                vm.vcpus,
                live.as_ref().map_or(vm.baseline, |v| v.baseline),
                live.as_ref().map_or(vm.mode, |v| v.mode),
                vm_state(vm),
                live.as_ref()
                    .map_or("-".into(), |v| format!("{:.3}", v.balance)),
                if error.is_some() { "stale" } else { "ok" },
                tids.join(",")
            ));
        }
        out + &stale
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)
}

fn find_vm(state: &StateDirArg, name: &str) -> Result<VmRecord, Failure> {
    let dir = state.get();
    state::find(&dir, name).ok_or_else(|| Failure {
        code: EXIT_NO_SUCH_VM,
        error: anyhow::anyhow!("no running VM named {name:?} in {}", dir.display()),
    })
}

fn stop(a: StopArgs) -> Result<(), Failure> {
    let vm = find_vm(&a.state, &a.name)?;
    let dir = a.state.get().join(&vm.name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.wrapper_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| {
        format!(
            "signalling the launcher of {} (pid {})",
            vm.name, vm.wrapper_pid
        )
    })
    .map_err(Failure::host)?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.wait.max(0.0));
    while state::is_locked(&dir) {
        if Instant::now() >= deadline {
            return Err(Failure::host(anyhow::anyhow!(
                "{} is still running after {} s",
                vm.name,
                a.wait
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn qmp_on<C: qmp::qapi::Command>(a: &NameArgs, command: C) -> Result<(), Failure> {
    let vm = find_vm(&a.state, &a.name)?;
    qmp::Client::connect(&vm.qmp_socket, Duration::from_secs(5))
        .and_then(|mut c| c.execute(command))
        .with_context(|| format!("{} on {}", C::NAME, vm.name))
        .map_err(Failure::host)?;
    Ok(())
}

fn credits_flag(flag: &'static str, value: f64) -> Result<Credits, Failure> {
    Credits::from_credits(value)
        .ok_or_else(|| Failure::usage(PolicyError::Credits { field: flag, value }))
}

fn simulate_cmd(a: SimulateArgs) -> Result<(), Failure> {
    let flag = |name: &'static str| {
        move |e: PolicyError| Failure::usage(anyhow::Error::new(e).context(name))
    };
    let baseline = Baseline::from_percent(a.baseline).map_err(flag("--baseline"))?;
    let mut policy = Policy::new(a.vcpus, baseline)
        .map_err(flag("--vcpus"))?
        .with_mode(a.mode)
        .with_decline_minutes(a.decline_minutes)
        .map_err(flag("--decline-minutes"))?;
    if let Some(max) = a.max_credits {
        policy = policy.with_max_credits(credits_flag("--max-credits", max)?);
    }
    let initial = match a.initial_credits {
        Some(c) => credits_flag("--initial-credits", c)?,
        None => Policy::default_initial_credits(a.vcpus),
    };
    let every_ns = match a.every {
        None => None,
        Some(m) if m.is_finite() && m > 0.0 => {
            Some(((m * NS_PER_MIN as f64).round() as u64).max(1))
        }
        Some(m) => {
            return Err(Failure::usage(anyhow::anyhow!(
                "--every: {m} is not a positive number of minutes"
            )))
        }
    };
    let trace = simulate::read_trace(&a.trace).map_err(Failure::usage)?;

    let mut ledger = Ledger::new(policy, initial);
    let outcome = simulate::run(&mut ledger, &trace, every_ns);
    if let Some(path) = &a.plot {
        let title = format!(
            "{} vCPU, {} % baseline, {} mode: {}",
            a.vcpus,
            baseline.percent(),
            a.mode,
            a.trace.display()
        );
        outcome.plot(path, &title).map_err(Failure::usage)?;
    }
    let text = if a.json {
        outcome.to_json()
    } else {
        outcome.to_csv()
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)
}

fn config_error(state_dir: &std::path::Path, name: &str) -> Option<String> {
    std::fs::read_to_string(state_dir.join(name).join(state::CONFIG_ERROR))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn read_view(state_dir: &std::path::Path, name: &str) -> Option<CreditsView> {
    let bytes = std::fs::read(state_dir.join(name).join(state::CREDITS_JSON)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Starts an agent for the state dir unless one runs: a grandchild in its own session, so it
/// outlives this launcher and leaves no zombie; its log is `<state dir>/agent.log`.
fn ensure_agent(state_dir: &std::path::Path, data_dir: &std::path::Path) -> anyhow::Result<()> {
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
    let mut cmd = std::process::Command::new(
        std::env::current_exe().context("finding burst-qemu's own path")?,
    );
    cmd.arg("agent")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--if-absent", "--idle-exit", "30"])
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

fn run_agent(a: AgentArgs) -> Result<(), Failure> {
    let state_dir = a.state.get();
    let _lock = match agent::lock(&state_dir) {
        Ok(l) => l,
        Err(AgentError::AlreadyRunning(_)) if a.if_absent => return Ok(()),
        Err(e @ AgentError::AlreadyRunning(_)) => {
            return Err(Failure {
                code: EXIT_RUNNING,
                error: e.into(),
            })
        }
        Err(e) => return Err(Failure::host(e)),
    };
    if a.enforcer == "ghost" {
        return run_ghost_agent(a, state_dir);
    }
    let (version, mount) = match (&a.cgroup_mount, a.cgroup_version.as_deref()) {
        (Some(m), Some("v2")) => (Version::V2, m.clone()),
        (Some(m), Some(_)) => (Version::V1, m.clone()),
        (Some(m), None) => {
            let v = if m.join("cgroup.controllers").exists() { Version::V2 } else { Version::V1 };
            (v, m.clone())
        }
        (None, _) => cgroup::detect_host().ok_or_else(|| {
            Failure::host(anyhow::anyhow!(
                "no cgroup hierarchy with the cpu controller is mounted (run burst-qemu check for the fix)"
            ))
        })?,
    };
    let enforcer = CgroupEnforcer::new(version, &mount, &cgroup::instance_name(&state_dir))
        .context("setting up cgroup CPU bandwidth (run burst-qemu check)")
        .map_err(Failure::host)?;
    let settings = Settings {
        state_dir,
        data_dir: a.data.get(),
        idle_exit: a.idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
    };
    Agent::new(settings, Box::new(enforcer))
        .run()
        .map_err(Failure::host)
}

fn run_ghost_agent(a: AgentArgs, state_dir: PathBuf) -> Result<(), Failure> {
    let root = PathBuf::from(
        std::env::var_os("BURST_QEMU_GHOST_ROOT")
            .unwrap_or_else(|| burst_qemu::ghost::DEFAULT_ROOT.into()),
    );
    let all = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let cpus = a.ghost_cpus.clone().unwrap_or_else(|| (0..all).collect());
    let enforcer = burst_qemu::enforce::ghost::GhostEnforcer::start(&root, &cpus)
        .context("starting the ghOSt agent (run burst-qemu check)")
        .map_err(Failure::host)?;
    let settings = Settings {
        state_dir,
        data_dir: a.data.get(),
        idle_exit: a.idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
    };
    Agent::new(settings, Box::new(enforcer))
        .run()
        .map_err(Failure::host)
}

fn credits(a: CreditsArgs) -> Result<(), Failure> {
    let state_dir = a.state.get();
    let data_dir = a.data.get();
    let set = a
        .set
        .map(|c| {
            Credits::from_credits(c).ok_or_else(|| {
                Failure::usage(PolicyError::Credits {
                    field: "--set",
                    value: c,
                })
            })
        })
        .transpose()?;
    let view = if state::find(&state_dir, &a.name).is_some() {
        if let Some(c) = set {
            if !state::agent_running(&state_dir) {
                return Err(Failure::host(anyhow::anyhow!(
                    "no agent runs for {}: start one with burst-qemu agent",
                    state_dir.display()
                )));
            }
            let request = state_dir.join(&a.name).join(state::SET_CREDITS);
            state::write_atomic(&request, format!("{}\n", c.as_credits()).as_bytes(), 0o600)
                .with_context(|| format!("writing {}", request.display()))
                .map_err(Failure::host)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while request.exists() {
                if Instant::now() >= deadline {
                    return Err(Failure::host(anyhow::anyhow!(
                        "the agent did not take the new balance within 5 s"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(v) = read_view(&state_dir, &a.name) {
                break v;
            }
            if Instant::now() >= deadline {
                return Err(Failure::host(anyhow::anyhow!(
                    "{} is running but no agent has published its credits (is the agent running? see {})",
                    a.name,
                    state_dir.join("agent.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        let path = state::ledger_path(&data_dir, &a.name);
        let file = LedgerFile::load(&path)
            .with_context(|| format!("reading {}", path.display()))
            .map_err(Failure::host)?
            .ok_or_else(|| Failure {
                code: EXIT_NO_SUCH_VM,
                error: anyhow::anyhow!(
                    "no VM named {:?}: not running and no ledger in {}",
                    a.name,
                    data_dir.display()
                ),
            })?;
        let policy = file
            .policy
            .clone()
            .ok_or_else(|| Failure::host(anyhow::anyhow!("{} has no policy", path.display())))?;
        let mut ledger = Ledger::restore(policy, file.balances);
        if let Some(c) = set {
            ledger.set_balance(c);
            let saved = LedgerFile {
                balances: ledger.balances(),
                ..file.clone()
            };
            saved
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))
                .map_err(Failure::host)?;
        }
        agent::view(&a.name, &ledger, file.used_total, None, None)
    };
    let text = if a.json {
        let mut v = serde_json::to_value(&view).expect("plain data");
        v["time_to_empty_s"] = view.time_to_empty_s.map(f64::round).into();
        serde_json::to_string_pretty(&v).expect("plain data") + "\n"
    } else {
        let pct = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2} %"));
        let empty = view.time_to_empty_s.map_or("not draining".to_owned(), |s| {
            let s = s.round() as u64;
            format!("in {}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
        });
        format!(
            "{} ({}, {} mode, {} vCPU at {} % baseline)\n\
             balance        {:.3} credits\n\
             surplus        {:.3}\n\
             charged        {:.3}\n\
             earn rate      {:.3} credits/hour\n\
             usage          {} of all vCPUs (grant {})\n\
             empty          {}\n{}",
            view.name,
            view.state,
            view.mode,
            view.vcpus,
            view.baseline,
            view.balance,
            view.surplus,
            view.charged,
            view.earn_per_hour,
            pct(view.usage_pct),
            pct(view.grant_pct),
            empty,
            view.config_error
                .as_ref()
                .map_or(String::new(), |e| format!("config stale: {e}\n")),
        )
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)
}

fn check() -> Result<(), Failure> {
    let mut lines = Vec::new();
    let mut required_ok = true;
    let mut line = |ok: bool, what: &str, detail: String| {
        lines.push(format!(
            "{} {what:<22} {detail}",
            if ok { "ok " } else { "-- " }
        ))
    };

    match std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            line(
                true,
                "QEMU",
                v.lines().next().unwrap_or("").trim().to_owned(),
            );
        }
        _ => {
            required_ok = false;
            line(
                false,
                "QEMU",
                "qemu-system-x86_64 not found. Fix: apt-get install qemu-system-x86".into(),
            );
        }
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => line(true, "KVM", "/dev/kvm is usable".into()),
        Err(e) => line(
            false,
            "KVM",
            format!("/dev/kvm: {e}. Optional: TCG (-accel tcg,thread=multi) works without it. Fix: load kvm_intel or kvm_amd, and add the user to group kvm"),
        ),
    }
    match cgroup::detect_host() {
        Some((version, mount)) => {
            let probe = mount
                .join("burst-qemu")
                .join(format!(".check-{}", std::process::id()));
            let writable =
                std::fs::create_dir_all(&probe).and_then(|()| std::fs::remove_dir(&probe));
            match writable {
                Ok(()) => line(
                    true,
                    "cgroup CPU bandwidth",
                    format!(
                        "cgroup {version} cpu controller at {} is writable",
                        mount.display()
                    ),
                ),
                Err(e) => {
                    required_ok = false;
                    line(false, "cgroup CPU bandwidth", format!("cgroup {version} at {}: {e}. Fix: run burst-qemu as root, or delegate that cgroup to this user", mount.display()));
                }
            }
        }
        None => {
            required_ok = false;
            line(
                false,
                "cgroup CPU bandwidth",
                "no hierarchy with the cpu controller. Fix (v2): echo +cpu > /sys/fs/cgroup/cgroup.subtree_control; (v1): mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu".into(),
            );
        }
    }
    let ghost_root = PathBuf::from(
        std::env::var_os("BURST_QEMU_GHOST_ROOT")
            .unwrap_or_else(|| burst_qemu::ghost::DEFAULT_ROOT.into()),
    );
    let ghost_root = ghost_root.as_path();
    match burst_qemu::ghost::describe(ghost_root) {
        Ok(versions) => {
            let wanted = ghost_sys::GHOST_VERSION;
            let list = versions.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            if versions.contains(&wanted) {
                line(true, "ghOSt", format!("ghOSt kernel present: ghostfs at {}, ABI versions {list} (this build speaks {wanted}); agent --enforcer ghost can run", ghost_root.display()));
            } else {
                line(false, "ghOSt", format!("ghostfs at {} offers ABI versions {list}, not {wanted}. Fix: a ghOSt kernel with ABI {wanted} (ghost-kernel branch ghost-v5.11)", ghost_root.display()));
            }
        }
        Err(e) => line(
            false,
            "ghOSt",
            format!("{e}. Optional: needs a ghOSt kernel (CONFIG_SCHED_CLASS_GHOST) with ghostfs mounted at /sys/fs/ghost (mount -t ghost ghost /sys/fs/ghost); cgroup enforcement is used without it"),
        ),
    }
    let mut text = lines.join("\n") + "\n";
    text.push_str(if required_ok {
        "burst-qemu can run and enforce credits on this host\n"
    } else {
        "burst-qemu cannot enforce credits here until the pieces above marked -- are fixed\n"
    });
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)?;
    if required_ok {
        Ok(())
    } else {
        Err(Failure::host(anyhow::anyhow!(
            "required pieces are missing"
        )))
    }
}
