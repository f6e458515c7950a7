//! Command-line interface: clap definitions (their `///` docs are the `--help` text) and the
//! mapping of each command's errors to documented exit statuses.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use burst_qemu::credit::{Baseline, Credits, Ledger, Mode, Policy, PolicyError, NS_PER_MIN};
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
/// path too long); 3 when a VM of that name is already running; 4 when the named VM is not
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
    fn get(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(state::default_state_dir)
    }
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
        vms_dir: a.vms,
        state_dir: a.state.get(),
        name: a.name,
        vcpus: a.vcpus,
        baseline: a.baseline,
        credits: a.credits,
        mode: a.mode,
        force_config: a.force_config,
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
        qemu: a.qemu,
    };
    let launched = |e: LaunchError| Failure {
        code: e.exit_code(),
        error: e.into(),
    };
    let vm = launch::start(&req).map_err(launched)?;
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
    let vms = state::running(&a.state.get());
    let out = if a.json {
        let rows: Vec<serde_json::Value> = vms
            .iter()
            .map(|vm| {
                let mut v = serde_json::to_value(vm).expect("records are plain data");
                v["state"] = vm_state(vm).into();
                v
            })
            .collect();
        serde_json::to_string_pretty(&rows).expect("plain data") + "\n"
    } else {
        let mut out = format!(
            "{:<20} {:>8} {:>5} {:>9} {:<9} {:<8} VCPU TIDS\n",
            "NAME", "PID", "VCPUS", "BASELINE", "MODE", "STATE"
        );
        for vm in &vms {
            let tids: Vec<String> = vm.vcpu_tids.iter().map(u32::to_string).collect();
            out.push_str(&format!(
                "{:<20} {:>8} {:>5} {:>8}% {:<9} {:<8} {}\n",
                vm.name,
                vm.pid,
                vm.vcpus,
                vm.baseline,
                vm.mode,
                vm_state(vm),
                tids.join(",")
            ));
        }
        out
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
