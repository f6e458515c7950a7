//! Command-line interface: clap definitions (their `///` docs are the `--help` text) and the
//! mapping of each command's errors to documented exit statuses.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use burst_qemu::credit::{Baseline, Credits, Ledger, Mode, Policy, PolicyError, NS_PER_MIN};
use burst_qemu::simulate;
use burst_qemu::testguest::{self, Behaviour};
use clap::{Args, Parser, Subcommand};

/// Exit status for bad input: a flag, a file or a value out of range.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for a failure of the host (I/O that should have worked).
pub const EXIT_FAILURE: u8 = 1;

/// Burstable CPU-credit instances for QEMU virtual machines.
///
/// Exit status: 0 on success, 1 when the host fails an operation, 2 for bad input (a flag,
/// file or value out of range; the message names it).
#[derive(Debug, Parser)]
#[command(name = "burst-qemu", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Simulate(SimulateArgs),
    #[command(hide = true)]
    TestGuest(TestGuestArgs),
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
        Command::Simulate(args) => simulate_cmd(args),
        Command::TestGuest(a) => {
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
