//! What `burst-qemu credits` shows of a VM: the view of its ledger, as published each tick.

use serde::{Deserialize, Serialize};

use crate::credit::{Credits, Ledger, Mode, Rate, NS_PER_SEC, PPM_PER_CPU};

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
    let time_to_empty_s = live.and_then(|(usage, _)| {
        let drain = usage.0.saturating_sub(p.baseline_rate().0);
        if drain == 0 || (p.mode() == Mode::Standard && b.balance() == Credits::ZERO) {
            return None;
        }
        // balance (vCPU-ns) / drain (vCPU-ns per ns), in seconds.
        Some(b.balance().vcpu_ns() as f64 * PPM_PER_CPU as f64 / drain as f64 / NS_PER_SEC as f64)
    });
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
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::{Baseline, Policy};

    fn ledger(balance: f64) -> Ledger {
        let p = Policy::new(2, Baseline::from_percent(10.0).unwrap()).unwrap();
        Ledger::new(p, Credits::from_credits(balance).unwrap())
    }

    #[test]
    fn time_to_empty_is_balance_over_net_drain() {
        // 12 credits = 720 vCPU-s; using 1 vCPU against a 0.2 vCPU baseline drains 0.8/s.
        let v = view(
            "a",
            &ledger(12.0),
            Credits::ZERO,
            Some((Rate(1_000_000), Rate(2_000_000))),
            None,
        );
        assert!((v.time_to_empty_s.unwrap() - 900.0).abs() < 1e-6);
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
}
