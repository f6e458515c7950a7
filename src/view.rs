//! What a VM looks like from outside: the one view that the per-VM files (`credits.json` and
//! the one-value files), `burst-qemu credits`, `ls`, `top`, `plot` and the metrics all show, and
//! the agent's health. Pure value types and their one builder ([`build`]): the agent builds a
//! running VM's view from its live state, the CLI a stopped VM's from its saved ledger, both
//! through [`build`], so they cannot disagree.

use serde::{Deserialize, Serialize};

use crate::credit::{Credits, Ledger, Mode, Policy, Rate, NS_PER_SEC, PPM_PER_CPU};

/// A VM's credits and what the agent does with it, as `credits --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreditsView {
    /// The VM's name.
    pub name: String,
    /// Spendable balance, credits.
    pub balance: f64,
    /// Surplus outstanding, credits.
    pub surplus: f64,
    /// Surplus charged so far, credits.
    pub charged: f64,
    /// Credits earned per hour.
    pub earn_per_hour: f64,
    /// CPU used over the last tick, percent of all the VM's vCPUs (`None` for a stopped VM).
    pub usage_pct: Option<f64>,
    /// The grant over the last tick, percent of all the VM's vCPUs (`None` for a stopped VM).
    pub grant_pct: Option<f64>,
    /// Seconds until the balance is spent at the current usage; `None` when not draining.
    pub time_to_empty_s: Option<f64>,
    /// `running` or `stopped`.
    pub state: String,
    /// Mode.
    pub mode: Mode,
    /// Baseline, percent per vCPU.
    pub baseline: f64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU time charged since the ledger was created, vCPU-seconds.
    pub used_total_s: f64,
    /// Why the config file is not in force, when a bad edit is being ignored.
    pub config_error: Option<String>,
    /// Why the agent cannot save the ledger (a full or read-only data dir), while it cannot.
    #[serde(default)]
    pub ledger_error: Option<String>,
    /// What the contention stage lets the VM use, percent of all its vCPUs: the grant unless
    /// the host is contended (`None` for a stopped VM).
    #[serde(default)]
    pub allocation_pct: Option<f64>,
    /// The contention stage's estimate of the VM's demand, percent of all its vCPUs (`None`
    /// when the stage is off or has not run yet).
    #[serde(default)]
    pub demand_pct: Option<f64>,
    /// The demand the stage observed over its last period (what the VM ran and waited for, or
    /// its grant when held to its cap), percent of all its vCPUs.
    #[serde(default)]
    pub observed_demand_pct: Option<f64>,
    /// Its disks, when the agent manages them (`disk_share` and `--disk-bandwidth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskView>,
    /// The CPU each vCPU is pinned to (`null` while not pinned to one), when the agent runs the
    /// pinning balancer (`--balance cpu`).
    #[serde(default)]
    pub pins: Option<Vec<Option<u32>>>,
    /// Pin changes the balancer made to this VM's vCPUs since the agent started.
    #[serde(default)]
    pub pin_changes: Option<u64>,
}

/// What a running VM's view shows beyond its ledger: rates over the last tick and what the
/// agent's stages decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// CPU its vCPU threads used over the last tick.
    pub usage: Rate,
    /// The grant over the last tick.
    pub grant: Rate,
    /// The cap the contention stage set while the host is contended (`None`: uncontended or the
    /// stage is off, so the grant is the cap).
    pub allocation: Option<Rate>,
    /// The contention stage's demand estimate and the demand it observed over its last period
    /// (`None` when the stage is off or has not run).
    pub demand: Option<(Rate, Rate)>,
}

/// Everything a VM's view is built from.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The VM's name.
    pub name: &'a str,
    /// Its ledger (policy and balances).
    pub ledger: &'a Ledger,
    /// CPU time charged since the ledger was created.
    pub used_total: Credits,
    /// `Some` for a running VM.
    pub live: Option<Live>,
    /// Why its config file is not in force.
    pub config_error: Option<&'a str>,
    /// Why its ledger cannot be saved.
    pub ledger_error: Option<&'a str>,
    /// Its disks, when managed.
    pub disk: Option<&'a DiskView>,
    /// Its vCPUs' pins and the balancer's pin changes, when the pinning balancer runs.
    pub pins: Option<(&'a [Option<u32>], u64)>,
}

impl<'a> Facts<'a> {
    /// The facts of a VM known only by its ledger (stopped, or not yet measured).
    pub fn ledger(name: &'a str, ledger: &'a Ledger, used_total: Credits) -> Self {
        Facts {
            name,
            ledger,
            used_total,
            live: None,
            config_error: None,
            ledger_error: None,
            disk: None,
            pins: None,
        }
    }
}

/// Rounded to what is shown (credits to 0.001, percentages to 0.01, seconds to 1): an unchanged
/// figure is then not rewritten every tick.
fn round(x: f64, d: i32) -> f64 {
    (x * 10f64.powi(d)).round() / 10f64.powi(d)
}

/// The view of a VM.
pub fn build(f: &Facts) -> CreditsView {
    let p = f.ledger.policy();
    let b = f.ledger.balances();
    let pct = |r: Rate| round(r.percent_of(p.vcpus()), 2);
    let time_to_empty_s = f
        .live
        .and_then(|l| time_to_empty_s(p, b.balance(), l.usage));
    CreditsView {
        name: f.name.to_owned(),
        balance: round(b.balance().as_credits(), 3),
        surplus: round(b.surplus.as_credits(), 3),
        charged: round(b.charged.as_credits(), 3),
        earn_per_hour: round(p.earn_per_hour().as_credits(), 3),
        // At most all the vCPUs: a tick's figure reads a little above that now and then (the
        // threads' CPU time and the tick's clock are read a moment apart; 100.34 % in a CI
        // run), which the ledger charges as measured but no VM can use.
        usage_pct: f.live.map(|l| pct(l.usage).min(100.0)),
        grant_pct: f.live.map(|l| pct(l.grant)),
        time_to_empty_s: time_to_empty_s.map(f64::round),
        state: if f.live.is_some() {
            "running"
        } else {
            "stopped"
        }
        .into(),
        mode: p.mode(),
        baseline: p.baseline().percent(),
        vcpus: p.vcpus(),
        used_total_s: round(f.used_total.vcpu_ns() as f64 / NS_PER_SEC as f64, 3),
        config_error: f.config_error.map(str::to_owned),
        ledger_error: f.ledger_error.map(str::to_owned),
        // The cap in force: the allocation never lifts it above the grant.
        allocation_pct: f
            .live
            .map(|l| pct(l.allocation.map_or(l.grant, |a| a.min(l.grant)))),
        demand_pct: f.live.and_then(|l| l.demand).map(|(e, _)| pct(e)),
        observed_demand_pct: f.live.and_then(|l| l.demand).map(|(_, o)| pct(o)),
        disk: f.disk.cloned(),
        pins: f.pins.map(|(p, _)| p.to_vec()),
        pin_changes: f.pins.map(|(_, c)| c),
    }
}

/// Seconds until a VM that keeps using `usage` (or its grant, when that is less) spends
/// `balance`; `None` when it is not draining.
///
/// In unlimited mode the grant is the full rate, so the balance falls at the net drain
/// `d = usage − baseline`: `B / d`. In standard mode the grant declines (see [`crate::credit`]):
/// above the baseline it is `√(2·B·k)`, `k = (full − baseline) / D`. While that exceeds `d`,
/// i.e. while `B ≥ B_d = d² / (2k)`, the VM uses `usage` and the balance falls at `d`, which
/// takes `(B − B_d) / d`; from there it follows the grant down, `dB/dt = −√(2·B·k)`, so `√B`
/// falls at the constant rate `√(k/2)` and reaches 0 after `√(2·B_d/k) = d / k`. A balance
/// already below `B_d` is spent in `√(2·B/k)`. (The planner's `−k·dt/2` makes the discrete
/// decline end on the continuous schedule, so the continuous law is the right one.)
pub fn time_to_empty_s(p: &Policy, balance: Credits, usage: Rate) -> Option<f64> {
    let drain = usage.0.saturating_sub(p.baseline_rate().0);
    if drain == 0 || balance == Credits::ZERO {
        return None;
    }
    let b = balance.vcpu_ns() as f64 / NS_PER_SEC as f64; // vCPU-s
    let d = drain as f64 / PPM_PER_CPU as f64; // vCPU
    let decline_s = p.decline_ns() as f64 / NS_PER_SEC as f64;
    if p.mode() == Mode::Unlimited || decline_s == 0.0 {
        return Some(b / d);
    }
    let k = (p.full_rate().0 - p.baseline_rate().0) as f64 / PPM_PER_CPU as f64 / decline_s;
    let b_d = d * d / (2.0 * k);
    Some(if b >= b_d {
        (b - b_d) / d + d / k
    } else {
        (2.0 * b / k).sqrt()
    })
}

/// What `credits --json` shows of a VM's disks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskView {
    /// Its share of the host's disk bandwidth, percent.
    pub share_pct: f64,
    /// Bytes read per second over the last period.
    pub read_bps: Option<u64>,
    /// Bytes written per second over the last period.
    pub write_bps: Option<u64>,
    /// The read limit in force (`None`: not throttled).
    pub read_limit_bps: Option<u64>,
    /// The write limit in force (`None`: not throttled).
    pub write_limit_bps: Option<u64>,
    /// Why its disks cannot be measured or throttled, while they cannot.
    pub error: Option<String>,
}

/// Upper bounds of the tick-duration histogram's buckets, seconds.
pub const TICK_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25];

/// The agent's health.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Ticks per bucket of [`TICK_BUCKETS`] (not cumulative), and above the last.
    pub tick_counts: [u64; TICK_BUCKETS.len() + 1],
    /// Sum of tick durations, seconds.
    pub tick_sum_s: f64,
    /// Ledger saves that failed since the agent started.
    pub ledger_save_failures: u64,
}

impl Health {
    /// Counts one tick of `seconds`.
    pub fn observe_tick(&mut self, seconds: f64) {
        let i = TICK_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(TICK_BUCKETS.len());
        self.tick_counts[i] += 1;
        self.tick_sum_s += seconds;
    }
}

/// What the metrics show: the view of each VM, and the agent's health when known.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// One view per VM.
    pub vms: Vec<CreditsView>,
    /// The agent's health (`None` when rendered without an agent).
    pub health: Option<Health>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::Baseline;

    /// A 2-vCPU, 10 % ledger holding `balance` credits.
    fn ledger(balance: f64) -> Ledger {
        let p = Policy::new(2, Baseline::from_percent(10.0).unwrap()).unwrap();
        Ledger::new(p, Credits::from_credits(balance).unwrap())
    }

    fn live(ledger: &Ledger, usage: Rate, grant: Rate) -> CreditsView {
        build(&Facts {
            live: Some(Live {
                usage,
                grant,
                ..Live::default()
            }),
            ..Facts::ledger("a", ledger, Credits::ZERO)
        })
    }

    #[test]
    fn time_to_empty_counts_the_decline() {
        // 12 credits = 720 vCPU-s; using 1 vCPU against a 0.2 vCPU baseline drains 0.8/s until
        // the grant (k = 1.8 vCPU / 1200 s) meets it at B_d = 0.64 / 0.003 = 213.3 vCPU-s, then
        // follows the grant down for 0.8 / 0.0015 = 533.3 s: 633.3 + 533.3 s in all.
        let v = live(&ledger(12.0), Rate(1_000_000), Rate(2_000_000));
        assert_eq!(v.time_to_empty_s, Some(1167.0));
        assert_eq!(v.usage_pct, Some(50.0));
        assert_eq!(v.grant_pct, Some(100.0));
        assert!((v.earn_per_hour - 12.0).abs() < 1e-9);
    }

    #[test]
    fn usage_read_above_all_vcpus_is_shown_as_all() {
        // 2 vCPUs measured at 2.0068 CPUs in a tick (CI: the gauge read 1.0034).
        let v = live(&ledger(12.0), Rate(2_006_800), Rate(2_000_000));
        assert_eq!(v.usage_pct, Some(100.0));
    }

    #[test]
    fn time_to_empty_is_null_when_not_draining() {
        let v = live(&ledger(12.0), Rate(100_000), Rate(2_000_000));
        assert_eq!(v.time_to_empty_s, None);
        let l = ledger(12.0);
        let stopped = build(&Facts::ledger("a", &l, Credits::ZERO));
        assert_eq!(
            (
                stopped.usage_pct,
                stopped.time_to_empty_s,
                stopped.state.as_str()
            ),
            (None, None, "stopped")
        );
    }

    /// The closed form against the ledger itself, ticked once a second with min(usage, grant).
    #[test]
    fn time_to_empty_matches_the_ledger() {
        use crate::credit::NS_PER_MIN;
        for (mode, balance, usage_pct) in [
            (Mode::Standard, 12.0, 50.0),
            (Mode::Standard, 2.0, 100.0),
            (Mode::Standard, 40.0, 30.0),
            (Mode::Unlimited, 5.0, 80.0),
        ] {
            let p = Policy::new(2, Baseline::from_percent(10.0).unwrap())
                .unwrap()
                .with_mode(mode);
            let mut l = Ledger::new(p.clone(), Credits::from_credits(balance).unwrap());
            l.set_interval(NS_PER_SEC);
            let usage = Rate::from_percent_of(usage_pct, 2);
            let predicted = time_to_empty_s(&p, l.balances().balance(), usage).unwrap();
            let mut t = 0u64;
            while l.balances().balance() > Credits::ZERO && t < 1000 * NS_PER_MIN {
                let served = usage.min(l.grant().rate);
                l.tick(NS_PER_SEC, served.over(NS_PER_SEC));
                t += NS_PER_SEC;
            }
            let actual = t as f64 / NS_PER_SEC as f64;
            assert!(
                (actual - predicted).abs() <= 3.0,
                "{mode} {balance} credits at {usage_pct} %: predicted {predicted:.1} s, ledger {actual} s"
            );
        }
    }

    #[test]
    fn the_cap_shown_is_the_allocation_never_above_the_grant() {
        let l = ledger(12.0);
        let v = |allocation| {
            build(&Facts {
                live: Some(Live {
                    usage: Rate(100_000),
                    grant: Rate(400_000),
                    allocation,
                    demand: Some((Rate(300_000), Rate(350_000))),
                }),
                ..Facts::ledger("a", &l, Credits::ZERO)
            })
        };
        assert_eq!(v(None).allocation_pct, Some(20.0));
        assert_eq!(v(Some(Rate(250_000))).allocation_pct, Some(12.5));
        assert_eq!(v(Some(Rate(900_000))).allocation_pct, Some(20.0));
        assert_eq!(v(None).demand_pct, Some(15.0));
        assert_eq!(v(None).observed_demand_pct, Some(17.5));
        let stopped = build(&Facts::ledger("a", &l, Credits::ZERO));
        assert_eq!(stopped.allocation_pct, None);
    }
}
