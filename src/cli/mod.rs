//! Command-line interface: clap definitions (their `///` docs are the `--help` text) and the
//! mapping of each command's errors to documented exit statuses.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use burst_qemu::agent::{CreditsView, LedgerFile};
use burst_qemu::credit::{Baseline, Credits, Ledger, Mode, Policy, PolicyError, NS_PER_MIN};

use burst_qemu::launch::{self, LaunchError, Request};
use burst_qemu::simulate;
use burst_qemu::state;
use burst_qemu::testguest::{self, Behaviour};
use clap::{Args, Parser, Subcommand};

mod agent_args;
mod agent_cmd;
mod agent_config;
mod agent_start;
mod check;
#[cfg(test)]
mod docs_check;
mod fleet;
mod foreign;
mod generate;
mod mem;
mod observe;
mod takeover;
mod top;

use agent_args::AgentArgs;
use agent_cmd::run_agent;
use agent_start::ensure_agent;
use check::check;
use fleet::{credits, ls, stop};

/// `burst-qemu --version`: the crate's version and the commit it was built from (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BURST_QEMU_COMMIT"),
    ")"
);

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
#[command(name = "burst-qemu", version = VERSION, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// Where the fleet lives: accepted before or after any command (`burst-qemu --state-dir D ls`
/// and `burst-qemu ls --state-dir D` alike).
#[derive(Clone, Debug, Args)]
struct Global {
    /// Directory of the per-VM config files (NAME.toml).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "BURST_QEMU_VMS",
        default_value = "vms"
    )]
    vms: PathBuf,
    /// Runtime state of running VMs [default: /run/burst-qemu as root, else
    /// $XDG_RUNTIME_DIR/burst-qemu].
    #[arg(long, global = true, value_name = "DIR", env = "BURST_QEMU_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Where ledgers are kept across restarts and reboots [default: /var/lib/burst-qemu as
    /// root, else $XDG_DATA_HOME/burst-qemu].
    #[arg(long, global = true, value_name = "DIR", env = "BURST_QEMU_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl Global {
    /// Absolute: the state dir names the agent's cgroups, so `state` and `/tmp/x/state` must
    /// not become two instances.
    fn state_dir(&self) -> PathBuf {
        state::absolute(
            &self
                .state_dir
                .clone()
                .unwrap_or_else(state::default_state_dir),
        )
    }

    /// Absolute, so an agent started from another directory finds the same ledgers.
    fn data_dir(&self) -> PathBuf {
        state::absolute(
            &self
                .data_dir
                .clone()
                .unwrap_or_else(state::default_data_dir),
        )
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Launch a VM (the default action when no command is given).
    Run(RunArgs),
    /// List the running VMs.
    Ls(LsArgs),
    /// Stop a VM gracefully (power-down, then quit, then kill) and wait until it has ended.
    Stop(StopArgs),
    /// Pause a VM's vCPUs (QMP `stop`; a libvirt domain through libvirt).
    Pause(NameArgs),
    /// Resume a paused VM (QMP `cont`).
    Resume(NameArgs),
    Adopt(foreign::AdoptArgs),
    /// Show a VM's credits (running or stopped), or set its balance with --set.
    Credits(CreditsArgs),
    /// Show the memory coordinator's view of the memory-balanced VMs (sizes in MiB): balloon
    /// target, actual size, unused memory, floor, ceiling, shares, active fraction.
    Mem(LsArgs),
    /// Run the credit agent for a state dir in the foreground (launchers start one
    /// automatically when none runs).
    #[command(after_long_help = agent_args::CONFIG_HELP)]
    Agent(Box<AgentArgs>),
    /// Report what this host supports: QEMU, KVM, cgroup CPU bandwidth, ghOSt; and the fix for
    /// each missing piece; then the agent's settings and where each comes from.
    Check(check::CheckArgs),
    Simulate(SimulateArgs),
    /// Plot a VM's real credit curve from its history (balance and surplus above, usage and
    /// grant below, baseline marked) as SVG, or print the samples with --json/--csv.
    Plot(PlotArgs),
    /// Print the Prometheus metrics once (the serving agent's text when it runs with
    /// --metrics-listen, else the VMs' metrics from their published credits and ledgers).
    Metrics,
    /// Live full-screen view of the fleet's credits (q quits).
    Top,
    #[command(hide = true)]
    TestGuest(TestGuestArgs),
    /// Write the man pages and shell completions (for packaging: contrib/deb/build).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
    /// The sched_ext scheduler process (started by `agent --enforcer scx`).
    #[command(hide = true)]
    ScxScheduler(ScxSchedulerArgs),
}

#[derive(Debug, Args)]
struct ScxSchedulerArgs {
    /// Publish the scheduler's state and per-VM figures to this JSON file each second.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Who decides each dispatch of a vCPU thread: the BPF program, or this process
    /// (`user`: the agent's scheduling policy, decision by decision).
    #[arg(long, value_name = "bpf|user", default_value = "bpf", value_parser = ["bpf", "user"])]
    dispatch: String,
    /// With --dispatch user: the CPUs the policy manages (the vCPU threads') [default: all].
    #[arg(long, value_name = "LIST", value_parser = agent_args::cpu_list_text)]
    cpus: Option<String>,
}

#[derive(Debug, Args)]
struct CreditsArgs {
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
struct PlotArgs {
    /// The VM's name (running or stopped).
    name: String,
    /// How far back: 90s, 30m, 6h, 7d (10-second samples for the last hour, 1-minute ones
    /// for 8 days).
    #[arg(long, value_name = "DURATION", default_value = "6h")]
    since: String,
    /// Where to write the SVG [default: NAME.svg, unless --json or --csv].
    #[arg(short = 'o', long = "output", value_name = "FILE.svg")]
    out: Option<PathBuf>,
    /// Print the samples as a JSON array (t, period_s, balance, surplus, charged, usage_pct,
    /// grant_pct, baseline_pct; percentages of all the VM's vCPUs).
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print the samples as CSV with the --json keys as header.
    #[arg(long)]
    csv: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
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
    /// Seconds to wait after system_powerdown before `quit` [default: 30].
    #[arg(long, value_name = "SECONDS")]
    shutdown_timeout: Option<f64>,
    /// QEMU's binary and arguments, after `--`.
    #[arg(last = true, value_name = "QEMU_BINARY QEMU_ARGS")]
    qemu: Vec<OsString>,
}

impl RunArgs {
    /// The first launch option given, if any (they mean nothing beside a command).
    fn first_given(&self) -> Option<&'static str> {
        [
            (self.name.is_some(), "--name"),
            (self.vcpus.is_some(), "--vcpus"),
            (self.baseline.is_some(), "--baseline"),
            (self.credits.is_some(), "--credits"),
            (self.mode.is_some(), "--mode"),
            (self.force_config, "--force-config"),
            (self.shutdown_timeout.is_some(), "--shutdown-timeout"),
            (!self.qemu.is_empty(), "-- QEMU…"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Print a JSON array of objects (name, pid, vcpus, baseline, mode, state, vcpu_tids, …).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct NameArgs {
    /// The VM's name.
    name: String,
}

#[derive(Debug, Args)]
struct StopArgs {
    /// The VM's name.
    name: String,
    /// Seconds to wait for the VM to end (beyond its launcher's own escalation).
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    wait: f64,
    /// For a VM whose launcher is gone (orphaned): seconds after system_powerdown before
    /// `quit` (then SIGKILL 5 s later). A VM with a launcher uses the launcher's own.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    shutdown_timeout: f64,
}

/// Write the project's test firmware (for QEMU's `-bios`): every vCPU busy, every vCPU
/// halted with --halt, or busy a share of the time with --duty PCT.
#[derive(Debug, Args)]
struct TestGuestArgs {
    /// Halt every vCPU instead of spinning.
    #[arg(long, conflicts_with = "duty")]
    halt: bool,
    /// Keep every vCPU busy PCT % of each 20 ms (1–99), halted the rest (local APIC timer).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(1..=99))]
    duty: Option<u8>,
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
    let g = &cli.global;
    // The fleet options are global (before or after a command); launch options are not.
    if let (Some(_), Some(flag)) = (&cli.command, cli.run.first_given()) {
        return Err(Failure::usage(anyhow::anyhow!(
            "{flag} is a launch option: it cannot be given with a command (see --help)"
        )));
    }
    match cli.command {
        None => run_vm(g, cli.run),
        Some(Command::Run(args)) => run_vm(g, args),
        Some(Command::Ls(args)) => ls(g, args),
        Some(Command::Stop(args)) => stop(g, args),
        Some(Command::Pause(a)) => foreign::pause_or_resume(g, &a.name, true),
        Some(Command::Resume(a)) => foreign::pause_or_resume(g, &a.name, false),
        Some(Command::Adopt(a)) => foreign::adopt_cmd(g, a),
        Some(Command::Credits(a)) => credits(g, a),
        Some(Command::Mem(a)) => mem::mem(g, a),
        // The agent reads its command line again, with its config file's values.
        Some(Command::Agent(_)) => run_agent(std::env::args_os().collect()),
        Some(Command::Check(a)) => check(g, &a),
        Some(Command::Simulate(args)) => simulate_cmd(args),
        Some(Command::Plot(a)) => observe::plot_cmd(
            &g.state_dir(),
            &g.data_dir(),
            &a.name,
            &a.since,
            a.out,
            a.json,
            a.csv,
        ),
        Some(Command::Metrics) => observe::metrics_cmd(&g.state_dir(), &g.data_dir()),
        Some(Command::Top) => top::run(&g.state_dir(), &g.data_dir()),
        Some(Command::ScxScheduler(a)) => {
            agent_cmd::run_scx_scheduler(a.stats.as_deref(), &a.dispatch, a.cpus.as_deref())
        }
        Some(Command::Generate(a)) => generate::generate(&a),
        Some(Command::TestGuest(a)) => {
            let kind = match (a.halt, a.duty) {
                (true, _) => Behaviour::Halt,
                (false, Some(pct)) => Behaviour::Duty(pct),
                (false, None) => Behaviour::Busy,
            };
            testguest::write(&a.out, kind)
                .with_context(|| format!("writing {}", a.out.display()))
                .map_err(Failure::host)
        }
    }
}

fn run_vm(g: &Global, a: RunArgs) -> Result<(), Failure> {
    if a.qemu.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "no QEMU command: burst-qemu --vcpus N --baseline PCT -- QEMU_BINARY QEMU_ARGS… (see --help)"
        )));
    }
    let shutdown_timeout = a.shutdown_timeout.unwrap_or(30.0);
    if !(shutdown_timeout.is_finite() && shutdown_timeout >= 0.0) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--shutdown-timeout must be a number of seconds ≥ 0"
        )));
    }
    let req = Request {
        vms_dir: g.vms.clone(),
        state_dir: g.state_dir(),
        name: a.name,
        vcpus: a.vcpus,
        baseline: a.baseline,
        credits: a.credits,
        mode: a.mode,
        force_config: a.force_config,
        shutdown_timeout: Duration::from_secs_f64(shutdown_timeout),
        qemu: a.qemu.clone(),
    };
    let launched = |e: LaunchError| Failure {
        code: e.exit_code(),
        error: e.into(),
    };
    let vm = launch::start(&req).map_err(launched)?;
    let data_dir = g.data_dir();
    if let Err(e) = ensure_agent(&req.state_dir, &data_dir) {
        eprintln!(
            "burst-qemu: warning: cannot start the credit agent ({e:#}); credits are not enforced"
        );
    }
    let mut watch = agent_start::AgentWatch::new(&req.state_dir, &data_dir);
    let code = vm.wait(&mut watch).map_err(launched)?;
    if code != 0 {
        // QEMU's own status; QEMU has said why.
        std::process::exit(i32::from(code));
    }
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
