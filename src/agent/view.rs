//! What `burst-qemu credits` shows of a VM: the view of its ledger, as published each tick.

use serde::{Deserialize, Serialize};

use crate::credit::{Credits, Ledger, Mode, Policy, Rate, NS_PER_SEC, PPM_PER_CPU};

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
    pub disk: Option<super::disk::DiskView>,
    /// The CPU each vCPU is pinned to (`null` while not pinned to one), when the agent runs the
    /// pinning balancer (`--balance cpu`).
    #[serde(default)]
    pub pins: Option<Vec<Option<u32>>>,
    /// Pin changes the balancer made to this VM's vCPUs since the agent started.
    #[serde(default)]
    pub pin_changes: Option<u64>,
}

/// The view of a ledger; `usage` and `grant` are rates over the last tick (running VMs only).
pub fn view(
    name: &str,
    ledger: &Ledger,
    used_total: Credits,
    live: Option<(Rate, Rate)>,
    config_error: Option<String>,
) -> CreditsView {
    let p = ledger.policy();
    let b = ledger.balances();
    let pct = |r: Rate| r.percent_of(p.vcpus());
    let time_to_empty_s = live.and_then(|(usage, _)| time_to_empty_s(p, b.balance(), usage));
    // Rounded to what is shown (credits to 0.001, percentages to 0.01, seconds to 1): an
    // unchanged figure is then not rewritten every tick.
    let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
    CreditsView {
        name: name.to_owned(),
        balance: round(b.balance().as_credits(), 3),
        surplus: round(b.surplus.as_credits(), 3),
        charged: round(b.charged.as_credits(), 3),
        earn_per_hour: round(p.earn_per_hour().as_credits(), 3),
        usage_pct: live.map(|(u, _)| round(pct(u), 2)),
        grant_pct: live.map(|(_, g)| round(pct(g), 2)),
        time_to_empty_s: time_to_empty_s.map(f64::round),
        state: if live.is_some() { "running" } else { "stopped" }.into(),
        mode: p.mode(),
        baseline: p.baseline().percent(),
        vcpus: p.vcpus(),
        used_total_s: round(used_total.vcpu_ns() as f64 / NS_PER_SEC as f64, 3),
        config_error,
        ledger_error: None,
        allocation_pct: None,
        demand_pct: None,
        observed_demand_pct: None,
        disk: None,
        pins: None,
        pin_changes: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::test_ledger as ledger;
    use crate::credit::{Baseline, Policy};

    #[test]
    fn time_to_empty_counts_the_decline() {
        // 12 credits = 720 vCPU-s; using 1 vCPU against a 0.2 vCPU baseline drains 0.8/s until
        // the grant (k = 1.8 vCPU / 1200 s) meets it at B_d = 0.64 / 0.003 = 213.3 vCPU-s, then
        // follows the grant down for 0.8 / 0.0015 = 533.3 s: 633.3 + 533.3 s in all.
        let v = view(
            "a",
            &ledger(12.0),
            Credits::ZERO,
            Some((Rate(1_000_000), Rate(2_000_000))),
            None,
        );
        assert_eq!(v.time_to_empty_s, Some(1167.0));
        assert_eq!(v.usage_pct, Some(50.0));
        assert_eq!(v.grant_pct, Some(100.0));
        assert!((v.earn_per_hour - 12.0).abs() < 1e-9);
    }

    #[test]
    fn time_to_empty_is_null_when_not_draining() {
        let v = view(
            "a",
            &ledger(12.0),
            Credits::ZERO,
            Some((Rate(100_000), Rate(2_000_000))),
            None,
        );
        assert_eq!(v.time_to_empty_s, None);
        let stopped = view("a", &ledger(12.0), Credits::ZERO, None, None);
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
}
