//! `plot`, `metrics` and the fleet reading they share with `top`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burst_qemu::agent::history_file::{self, history_path};
use burst_qemu::agent::{CreditsView, LedgerFile, HISTORY_TAIL};
use burst_qemu::base::unix_now;
use burst_qemu::credit::Ledger;
use burst_qemu::history::Sample;
use burst_qemu::metrics;
use burst_qemu::plot::{self, CurvePoint};
use burst_qemu::state;
use burst_qemu::view::{self, Facts};
use serde::Serialize;

use super::{Failure, EXIT_NO_SUCH_VM};

/// Parses `90s`, `30m`, `6h`, `7d` (a bare number is seconds) into seconds.
pub fn parse_since(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let mult = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86400.0,
        _ => return Err(format!("{text:?}: unit must be s, m, h or d")),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n * mult <= 365.0 * 86400.0 => Ok((n * mult) as u64),
        _ => Err(format!(
            "{text:?}: expected a positive duration of at most a year such as 90s, 30m, 6h or 7d"
        )),
    }
}

/// Every VM known to the state dir (running, as published) or the data dir (stopped, from its
/// ledger), sorted by name.
pub fn fleet(state_dir: &Path, data_dir: &Path) -> Vec<CreditsView> {
    let mut out: Vec<CreditsView> = state::running(state_dir)
        .iter()
        .filter_map(|(r, _)| super::fleet::read_view(state_dir, &r.name))
        .collect();
    if let Ok(dir) = std::fs::read_dir(data_dir.join("ledgers")) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(name) = p.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if out.iter().any(|v| v.name == name) || state::find(state_dir, name).is_some() {
                continue;
            }
            if let Ok(Some(f)) = LedgerFile::load(&p) {
                if let Some(policy) = f.policy.clone() {
                    let l = Ledger::restore(policy, f.balances);
                    out.push(view::build(&Facts::ledger(name, &l, f.used_total)));
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A history sample as `plot --json/--csv` shows it.
#[derive(Serialize)]
pub struct Row {
    /// Bucket start, Unix seconds.
    pub t: u64,
    /// Bucket length, seconds.
    pub period_s: u64,
    pub balance: f64,
    pub surplus: f64,
    pub charged: f64,
    pub usage_pct: f64,
    pub grant_pct: f64,
    pub baseline_pct: f64,
}

/// VM `name`'s samples since `since_s` seconds ago: its history file and, while it runs, the
/// samples the agent closed since it last saved the file (so the curve is current to the last
/// 10-second sample).
pub fn rows(
    state_dir: &Path,
    data_dir: &Path,
    name: &str,
    since_s: u64,
) -> Result<Vec<Row>, Failure> {
    let path = history_path(data_dir, name);
    let tail = history_file::load_tail(&state_dir.join(name).join(HISTORY_TAIL));
    let saved = history_file::load(&path)
        .with_context(|| format!("reading {}", path.display()))
        .map_err(Failure::host)?;
    let h = match (saved, tail.is_empty()) {
        (Some(mut h), _) => {
            h.extend_fine(&tail);
            Some(h)
        }
        (None, false) => {
            let mut h = burst_qemu::history::History::new();
            h.extend_fine(&tail);
            Some(h)
        }
        (None, true) => None,
    };
    let h = h.ok_or_else(|| Failure {
            code: EXIT_NO_SUCH_VM,
            error: anyhow::anyhow!(
                "no history for {name:?} in {} (the agent records it every 10 seconds while the VM runs)",
                data_dir.display()
            ),
        })?;
    let vcpus = LedgerFile::load(&state::ledger_path(data_dir, name))
        .ok()
        .flatten()
        .map_or(1, |f| f.vcpus.max(1));
    let samples: Vec<Sample> = h.since(unix_now().saturating_sub(since_s));
    let fine_start = h.fine().samples().next().map_or(u64::MAX, |s| s.t);
    let pct = |ppm: u64| (ppm as f64 / (f64::from(vcpus) * 1e4) * 100.0).round() / 100.0;
    Ok(samples
        .iter()
        .map(|s| Row {
            t: s.t,
            period_s: if s.t >= fine_start { 10 } else { 60 },
            balance: s.p.balance_mc as f64 / 1000.0,
            surplus: s.p.surplus_mc as f64 / 1000.0,
            charged: s.p.charged_mc as f64 / 1000.0,
            usage_pct: pct(s.p.usage_ppm),
            grant_pct: pct(s.p.grant_ppm),
            baseline_pct: pct(s.p.baseline_ppm),
        })
        .collect())
}

/// `burst-qemu plot`.
pub fn plot_cmd(
    state_dir: &Path,
    data_dir: &Path,
    name: &str,
    since: &str,
    out: Option<PathBuf>,
    json: bool,
    csv: bool,
) -> Result<(), Failure> {
    let since_s = parse_since(since).map_err(|e| Failure::usage(anyhow::anyhow!("--since {e}")))?;
    let rows = rows(state_dir, data_dir, name, since_s)?;
    let mut stdout = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&rows).expect("plain data") + "\n";
        stdout
            .write_all(text.as_bytes())
            .context("writing to stdout")
            .map_err(Failure::host)?;
    } else if csv {
        let mut text =
            String::from("t,period_s,balance,surplus,charged,usage_pct,grant_pct,baseline_pct\n");
        for r in &rows {
            text.push_str(&format!(
                "{},{},{:.3},{:.3},{:.3},{:.2},{:.2},{:.2}\n",
                r.t,
                r.period_s,
                r.balance,
                r.surplus,
                r.charged,
                r.usage_pct,
                r.grant_pct,
                r.baseline_pct
            ));
        }
        stdout
            .write_all(text.as_bytes())
            .context("writing to stdout")
            .map_err(Failure::host)?;
    }
    if out.is_some() || !(json || csv) {
        let path = out.unwrap_or_else(|| PathBuf::from(format!("{name}.svg")));
        let now = unix_now() as f64;
        let points: Vec<CurvePoint> = rows
            .iter()
            .map(|r| CurvePoint {
                hours: (r.t as f64 - now) / 3600.0,
                balance: r.balance,
                surplus: r.surplus,
                usage_pct: r.usage_pct,
                grant_pct: r.grant_pct,
                baseline_pct: r.baseline_pct,
            })
            .collect();
        let title = format!("{name}: CPU credits over the last {since}");
        plot::credit_curve(&path, &title, &points, "usage", "hours before now").map_err(
            |mut e| {
                e.flag = "-o";
                Failure::usage(e)
            },
        )?;
        if !(json || csv) {
            eprintln!("wrote {} ({} samples)", path.display(), rows.len());
        }
    }
    Ok(())
}

/// `burst-qemu metrics`: the serving agent's text, or (no agent serving) the VMs' metrics
/// rendered from what is published and saved.
pub fn metrics_cmd(state_dir: &Path, data_dir: &Path) -> Result<(), Failure> {
    let served = std::fs::read_to_string(state_dir.join(metrics::ADDR_FILE))
        .ok()
        .and_then(|a| a.trim().parse().ok())
        .and_then(|addr| metrics::scrape(addr).ok());
    let text = served.unwrap_or_else(|| {
        metrics::render(&burst_qemu::view::Snapshot {
            vms: fleet(state_dir, data_dir),
            health: None,
        })
    });
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_garbage_is_refused() {
        assert_eq!(parse_since("90s"), Ok(90));
        assert_eq!(parse_since("6h"), Ok(21600));
        assert_eq!(parse_since("7d"), Ok(604800));
        assert_eq!(parse_since("120"), Ok(120));
        assert!(parse_since("6x").is_err());
        assert!(parse_since("-1h").is_err());
        assert!(parse_since("h").is_err());
    }
}
