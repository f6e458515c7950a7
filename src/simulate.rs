//! `burst-qemu simulate`: the ledger run against a load trace on a simulated clock.
//!
//! A trace is a CSV of `minutes,percent` lines: hold the VM's demand at `percent` of all its
//! vCPUs (as CloudWatch's `CPUUtilization` counts it) for `minutes`. The simulation ticks the
//! very [`Ledger`] the agent uses, once per simulated second, with the CPU time the VM would use:
//! its demand, cut to the grant of the previous tick (demand above the grant is not served).

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

pub use crate::plot::PlotError;
use crate::plot::{self, CurvePoint};

use crate::credit::{Balances, Credits, Ledger, Rate, NS_PER_MIN, NS_PER_SEC};

/// The simulated tick: one second, as the agent's slowest tick.
pub const TICK_NS: u64 = NS_PER_SEC;
/// The longest trace accepted: ten years of simulated time.
pub const MAX_TRACE_MINUTES: f64 = 10.0 * 365.0 * 24.0 * 60.0;
/// At most this many points are drawn per series in a plot.
const PLOT_POINTS: u64 = 4000;

/// One line of a trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    /// The line's number in the file (1-based), for messages.
    pub line: usize,
    /// How long the demand holds, in nanoseconds.
    pub duration_ns: u64,
    /// The demand, in percent of all the VM's vCPUs (0–100).
    pub demand_pct: f64,
}

/// A trace that could not be read.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read trace {path}: {source}", path = .path.display())]
    Read {
        /// The trace's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is malformed or out of range.
    #[error("{path}:{line}: {field}: {message}", path = .path.display())]
    Line {
        /// The trace's path.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// `minutes`, `percent`, or `line` for the line as a whole.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The trace has no segments.
    #[error("{path}: the trace has no `minutes,percent` lines", path = .path.display())]
    Empty {
        /// The trace's path.
        path: PathBuf,
    },
    /// The trace is longer than [`MAX_TRACE_MINUTES`].
    #[error("{path}: the trace lasts more than {MAX_TRACE_MINUTES} minutes", path = .path.display())]
    TooLong {
        /// The trace's path.
        path: PathBuf,
    },
}

/// Parses a trace. `path` is only used in messages.
pub fn parse_trace(path: &Path, text: &str) -> Result<Vec<Segment>, TraceError> {
    let err = |line, field, message: String| TraceError::Line {
        path: path.to_owned(),
        line,
        field,
        message,
    };
    let mut segments = Vec::new();
    let mut total_minutes = 0.0;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let fields: Vec<&str> = content.split(',').map(str::trim).collect();
        let [minutes, percent] = fields[..] else {
            return Err(err(
                line,
                "line",
                format!(
                    "expected `minutes,percent`, got {content:?} ({} fields)",
                    fields.len()
                ),
            ));
        };
        let minutes: f64 = minutes
            .parse()
            .map_err(|_| err(line, "minutes", format!("{minutes:?} is not a number")))?;
        if !minutes.is_finite() || minutes < 0.0 {
            return Err(err(
                line,
                "minutes",
                format!("{minutes} is not a duration (must be ≥ 0)"),
            ));
        }
        let percent: f64 = percent
            .parse()
            .map_err(|_| err(line, "percent", format!("{percent:?} is not a number")))?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(err(line, "percent", format!("{percent} is outside 0–100")));
        }
        total_minutes += minutes;
        if total_minutes > MAX_TRACE_MINUTES {
            return Err(TraceError::TooLong {
                path: path.to_owned(),
            });
        }
        segments.push(Segment {
            line,
            duration_ns: (minutes * NS_PER_MIN as f64).round() as u64,
            demand_pct: percent,
        });
    }
    if segments.is_empty() {
        return Err(TraceError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(segments)
}

/// Reads and parses a trace file.
pub fn read_trace(path: &Path) -> Result<Vec<Segment>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_trace(path, &text)
}

/// One output row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Simulated time since the start, in nanoseconds.
    pub at_ns: u64,
    /// The demand at that moment, percent of all vCPUs.
    pub demand_pct: f64,
    /// The grant in force during the last tick, percent of all vCPUs.
    pub granted_pct: f64,
    /// Spendable balance (launch + earned).
    pub balance: Credits,
    /// Surplus credits outstanding.
    pub surplus: Credits,
    /// Surplus credits charged so far.
    pub charged: Credits,
}

impl Row {
    /// Simulated minutes since the start.
    pub fn minute(&self) -> f64 {
        self.at_ns as f64 / NS_PER_MIN as f64
    }
}

/// A row as JSON shows it: numbers rounded as in the CSV.
#[derive(Serialize)]
struct JsonRow {
    minute: f64,
    demand_pct: f64,
    granted_pct: f64,
    balance: f64,
    surplus: f64,
    charged: f64,
}

/// A point of the plot (sampled more finely than the rows).
#[derive(Clone, Copy, Debug)]
struct Sample {
    hours: f64,
    demand_pct: f64,
    granted_pct: f64,
    balance: f64,
    surplus: f64,
    baseline_pct: f64,
}

/// What a simulation produced.
#[derive(Debug)]
pub struct Outcome {
    /// Rows at the end of every trace line and every `--every` minutes.
    pub rows: Vec<Row>,
    samples: Vec<Sample>,
}

/// Runs `ledger` through `trace`; with `every_ns`, also emits a row every `every_ns`.
pub fn run(ledger: &mut Ledger, trace: &[Segment], every_ns: Option<u64>) -> Outcome {
    let vcpus = ledger.policy().vcpus();
    let total_ns: u64 = trace.iter().map(|s| s.duration_ns).sum();
    let sample_every = (total_ns / PLOT_POINTS).max(TICK_NS);
    let every_ns = every_ns.filter(|&e| e > 0);

    let mut rows = Vec::new();
    let mut samples = Vec::new();
    let mut now = 0u64;
    let mut next_every = every_ns.unwrap_or(u64::MAX);
    let mut next_sample = 0u64;
    let mut last_grant = ledger.grant().rate;

    let row = |at_ns: u64, demand_pct: f64, grant: Rate, b: Balances| Row {
        at_ns,
        demand_pct,
        granted_pct: grant.percent_of(vcpus),
        balance: b.balance(),
        surplus: b.surplus,
        charged: b.charged,
    };

    for seg in trace {
        let demand = Rate::from_percent_of(seg.demand_pct, vcpus);
        let end = now + seg.duration_ns;
        while now < end {
            let step = TICK_NS.min(end - now).min(next_every - now);
            let grant = ledger.grant().rate;
            let served = demand.min(grant);
            ledger.tick(step, served.over(step));
            now += step;
            last_grant = grant;
            if now >= next_sample {
                let b = ledger.balances();
                samples.push(Sample {
                    hours: now as f64 / (60 * NS_PER_MIN) as f64,
                    demand_pct: seg.demand_pct,
                    granted_pct: grant.percent_of(vcpus),
                    balance: b.balance().as_credits(),
                    surplus: b.surplus.as_credits(),
                    baseline_pct: ledger.policy().baseline().percent(),
                });
                next_sample = now + sample_every;
            }
            if now == next_every {
                if now != end {
                    rows.push(row(now, seg.demand_pct, last_grant, ledger.balances()));
                }
                next_every = now.saturating_add(every_ns.unwrap_or(u64::MAX));
            }
        }
        rows.push(row(now, seg.demand_pct, last_grant, ledger.balances()));
    }
    Outcome { rows, samples }
}

impl Outcome {
    /// The rows as CSV with the header `minute,demand_pct,granted_pct,balance,surplus,charged`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("minute,demand_pct,granted_pct,balance,surplus,charged\n");
        for r in &self.rows {
            out.push_str(&format!(
                "{:.3},{:.2},{:.2},{},{},{}\n",
                r.minute(),
                r.demand_pct,
                r.granted_pct,
                r.balance,
                r.surplus,
                r.charged,
            ));
        }
        out
    }

    /// The rows as a JSON array of objects with the CSV's keys.
    pub fn to_json(&self) -> String {
        let rounded: Vec<JsonRow> = self
            .rows
            .iter()
            .map(|r| JsonRow {
                minute: round_to(r.minute(), 3),
                demand_pct: round_to(r.demand_pct, 2),
                granted_pct: round_to(r.granted_pct, 2),
                balance: round_to(r.balance.as_credits(), 3),
                surplus: round_to(r.surplus.as_credits(), 3),
                charged: round_to(r.charged.as_credits(), 3),
            })
            .collect();
        serde_json::to_string_pretty(&rounded).expect("rows are plain numbers") + "\n"
    }

    /// Draws the credit curve: balance and surplus (credits) above, demand and grant (percent
    /// of all vCPUs) below, both over simulated hours, the baseline marked.
    pub fn plot(&self, path: &Path, title: &str) -> Result<(), PlotError> {
        let points: Vec<CurvePoint> = self
            .samples
            .iter()
            .map(|s| CurvePoint {
                hours: s.hours,
                balance: s.balance,
                surplus: s.surplus,
                usage_pct: s.demand_pct,
                grant_pct: s.granted_pct,
                baseline_pct: s.baseline_pct,
            })
            .collect();
        plot::credit_curve(path, title, &points, "demand", "time (hours)")
    }
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Segment>, TraceError> {
        parse_trace(Path::new("t.csv"), text)
    }

    #[test]
    fn comments_blank_lines_and_fractions_parse() {
        let s = parse("# header\n\n1.5, 20 # busy\n0,0\n").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].line, 3);
        assert_eq!(s[0].duration_ns, 90 * NS_PER_SEC);
        assert_eq!(s[0].demand_pct, 20.0);
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let msg = |t: &str| parse(t).unwrap_err().to_string();
        assert_eq!(
            msg("1,2\n-3,4\n"),
            "t.csv:2: minutes: -3 is not a duration (must be ≥ 0)"
        );
        assert_eq!(msg("1,101\n"), "t.csv:1: percent: 101 is outside 0–100");
        assert_eq!(msg("x,5\n"), "t.csv:1: minutes: \"x\" is not a number");
        assert_eq!(
            msg("1,5,6\n"),
            "t.csv:1: line: expected `minutes,percent`, got \"1,5,6\" (3 fields)"
        );
        assert_eq!(
            msg("# nothing\n"),
            "t.csv: the trace has no `minutes,percent` lines"
        );
        assert!(msg("nan,5\n").contains("minutes"));
        assert!(msg("1,NaN\n").contains("percent"));
    }
}
