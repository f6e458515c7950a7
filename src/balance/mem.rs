//! The balloon memory coordinator's planner: from each VM's balloon size and guest stats and
//! the host's free memory, the next balloon targets. Pure: no I/O, no clock; all sizes MiB.
//!
//! # Invariants (every policy; property-tested below)
//!
//! * a target is never below the VM's floor (`memory_min`) nor above its ceiling (boot size,
//!   or `memory_max` when lower): QEMU clamps a balloon target above the boot `-m` anyway;
//! * the host keeps its reserve: growth is only planned out of what donors give back in the
//!   same plan plus `min(host available − reserve, pool − Σ actual)`, and a host below its
//!   reserve (or a pool overdrawn) makes the planner take memory back;
//! * a VM is never left with less than `keep_unused` of unused memory by a shrink;
//! * a VM without usable stats (no balloon driver: QEMU reports −1) is left alone;
//! * every move is at most one step, so memory changes in steps, never in one jump.
//!
//! "Unused" is the guest's `stat-available-memory` (Linux `MemAvailable`), not
//! `stat-free-memory`: free memory leaves out the page cache the guest would drop at once, so a
//! VM with a warm cache would look needy forever. (The published coordinators read libvirt's
//! `unused`, i.e. free memory, on guests whose cache was small.)
//!
//! # `thresholds` (default): the published coordinator rules (fact sheet §1.7)
//!
//! A VM is *needy* when its unused memory falls below `grow_below` (100 MiB): it asks for one
//! `step_up`, up to its ceiling. A VM whose unused memory exceeds `keep_unused + hysteresis`
//! and whose use has not grown since the previous stats (by more than `min_change`; unknown at
//! the first stats) is a *donor*: it gives back at most `step_down`, down to `keep_unused +
//! hysteresis / 2` of unused memory and never below its floor. Needy VMs are fed, most needy
//! first, from what the donors give (the idle VMs first), then from the host's budget. Donors
//! shrink whether or not someone is needy: memory a VM does not use goes back to the host,
//! gradually. (The published rules shrink on the unused memory alone; a guest whose use grows
//! between two samples then loses the memory its program is taking, and the OOM killer runs.)
//!
//! # `idle-tax`: shares with an idle-memory tax (Waldspurger, OSDI 2002; fact sheet §3)
//!
//! Each VM has shares S, holds P pages and has an active fraction f (smoothed by the caller
//! with [`Activity`]: the max of a fast and a slow moving average). Its price is
//! ρ = S / (P·(f + k·(1 − f))), k = 1/(1 − τ) for a tax rate τ. A needy VM is fed from the
//! host's budget first; beyond that, memory is revoked from the VM with the lowest ρ, but only
//! while that VM is cheaper than the needy one, and only as far as equalises the two prices.
//! At equilibrium ρ is equal, so for equal shares P_active/P_idle = k·(1−f_i)+f_i over
//! k·(1−f_a)+f_a: 50/50 for τ = 0 and 80/20 for τ = 75 % with f ≈ 0 and 1. A victim never
//! loses more than τ of its share-proportional entitlement (the tax bound). Memory is taken
//! back from VMs without a needy VM only when the host is short.

use serde::{Deserialize, Serialize};

/// One MiB, in bytes.
pub const MIB: u64 = 1 << 20;

/// Which rules plan the targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The published coordinator rules.
    #[default]
    Thresholds,
    /// Shares with an idle-memory tax.
    IdleTax,
    /// ResCoin's rule on memory (templates by shares); stateful, so the coordinator plans it
    /// with [`super::mem_rescoin::Rescoin`], not [`plan`].
    Rescoin,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "thresholds" => Ok(Policy::Thresholds),
            "idle-tax" => Ok(Policy::IdleTax),
            "rescoin" => Ok(Policy::Rescoin),
            _ => Err(format!(
                "unknown memory policy {s:?}: give thresholds, idle-tax or rescoin"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Thresholds => "thresholds",
            Policy::IdleTax => "idle-tax",
            Policy::Rescoin => "rescoin",
        })
    }
}

/// The coordinator's settings (MiB unless said otherwise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The policy.
    pub policy: Policy,
    /// The idle-memory tax rate τ in [0, 1) (`idle-tax` only); default 0.75.
    pub tax: f64,
    /// Host memory (MemAvailable) never planned away; default 200.
    pub host_reserve: u64,
    /// A cap on the memory all balanced VMs hold together (`None`: only the host limits).
    pub pool: Option<u64>,
    /// Unused memory a shrink never takes from a VM; default 100.
    pub keep_unused: u64,
    /// A VM with less unused memory is needy; default 100.
    pub grow_below: u64,
    /// A VM gives back only when its unused memory exceeds `keep_unused + hysteresis`;
    /// default 50.
    pub hysteresis: u64,
    /// The largest growth per plan; default 128.
    pub step_up: u64,
    /// The largest shrink per plan; default 128.
    pub step_down: u64,
    /// Moves smaller than this are not made; default 16.
    pub min_change: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: Policy::Thresholds,
            tax: 0.75,
            host_reserve: 200,
            pool: None,
            keep_unused: 100,
            grow_below: 100,
            hysteresis: 50,
            step_up: 128,
            step_down: 128,
            min_change: 16,
        }
    }
}

/// What the guest's balloon driver reports, MiB.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// `stat-free-memory`.
    pub free: u64,
    /// `stat-available-memory` (MemAvailable): the unused memory the planner reads.
    pub available: u64,
    /// `stat-total-memory` (MemTotal; shrinks as the balloon inflates).
    pub total: u64,
}

impl Stats {
    /// The guest's used memory, MemTotal − MemAvailable: unchanged by the balloon (which takes
    /// inflated pages out of both).
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    /// The used fraction of the guest's memory, 1 − available/total, in [0, 1].
    pub fn used_fraction(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        (1.0 - self.available as f64 / self.total as f64).clamp(0.0, 1.0)
    }
}

/// One VM as the planner sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// Its name.
    pub name: String,
    /// Never below this (`memory_min`).
    pub floor: u64,
    /// Never above this (boot size, or `memory_max` when lower).
    pub ceiling: u64,
    /// Shares (`memory_shares`), for `idle-tax`.
    pub shares: u64,
    /// `query-balloon`'s `actual`.
    pub actual: u64,
    /// The guest's stats; `None` when it has none (no driver yet, or none at all).
    pub stats: Option<Stats>,
    /// The guest's used memory ([`Stats::used`]) in the previous usable stats; `None` before
    /// the second. A VM gives back only when its use is known not to be growing.
    #[serde(default)]
    pub used_before: Option<u64>,
    /// The smoothed active fraction in [0, 1] (see [`Activity`]), for `idle-tax`.
    pub active: f64,
}

/// One plan's decision for a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// The VM.
    pub name: String,
    /// The new balloon target, MiB.
    pub target: u64,
    /// Why (for the log; not read back from a trace).
    #[serde(skip_deserializing, default)]
    pub why: &'static str,
}

/// Plans the next targets for the VMs whose balloon should move (VMs left out keep theirs).
/// `host_available` is the host's MemAvailable, MiB.
pub fn plan(settings: &Settings, vms: &[Vm], host_available: u64) -> Vec<Target> {
    let mut work: Vec<Work> = vms.iter().map(Work::new).collect();
    let held: u64 = vms.iter().map(|v| v.actual).sum();
    let mut budget = host_available as i64 - settings.host_reserve as i64;
    if let Some(pool) = settings.pool {
        budget = budget.min(pool as i64 - held as i64);
    }
    match settings.policy {
        Policy::Thresholds => thresholds(settings, &mut work, budget),
        Policy::IdleTax => idle_tax(settings, &mut work, budget, held),
        // Stateless callers get the published rules; the coordinator plans `rescoin` itself.
        Policy::Rescoin => thresholds(settings, &mut work, budget),
    }
    work.iter()
        .filter_map(|w| {
            let why = w.why?;
            let target = w.target.clamp(w.vm.floor.min(w.vm.ceiling), w.vm.ceiling);
            (target != w.vm.actual).then(|| Target {
                name: w.vm.name.clone(),
                target,
                why,
            })
        })
        .collect()
}

struct Work<'a> {
    vm: &'a Vm,
    target: u64,
    why: Option<&'static str>,
}

impl<'a> Work<'a> {
    fn new(vm: &'a Vm) -> Self {
        Work {
            vm,
            target: vm.actual,
            why: None,
        }
    }

    fn unused(&self) -> Option<u64> {
        self.vm.stats.map(|s| s.available)
    }

    /// What a shrink may take: down to `keep` unused, never below the floor.
    fn givable(&self, keep: u64) -> u64 {
        let Some(unused) = self.unused() else {
            return 0;
        };
        let taken = self.vm.actual.saturating_sub(self.target);
        unused
            .saturating_sub(keep)
            .saturating_sub(taken)
            .min(self.target.saturating_sub(self.vm.floor))
    }

    /// Whether the guest's use is known and not growing since the previous stats: only then is
    /// its unused memory idle. A hog that starts between two samples allocates the very memory a
    /// shrink would take, and the balloon's inflation then left the guest nothing: the OOM
    /// killer ran in a VM shrunk on its first stats while its hog grew at 64 MiB/s.
    fn steady(&self, s: &Settings) -> bool {
        match (self.vm.stats, self.vm.used_before) {
            (Some(now), Some(before)) => now.used() <= before + s.min_change,
            _ => false,
        }
    }

    fn needy(&self, s: &Settings) -> bool {
        self.unused().is_some_and(|u| u < s.grow_below) && self.vm.actual < self.vm.ceiling
    }

    fn wants(&self, s: &Settings) -> u64 {
        s.step_up.min(self.vm.ceiling.saturating_sub(self.target))
    }
}

fn thresholds(s: &Settings, work: &mut [Work], budget: i64) {
    // Donors: everything above keep_unused + hysteresis, one step at most, down to the middle
    // of the band so the VM is not needy at once. A host below its reserve takes back down to
    // keep_unused itself.
    let mut given = 0u64;
    let keep = s.keep_unused + s.hysteresis / 2;
    for w in work.iter_mut() {
        let excess = w.unused().unwrap_or(0);
        if w.needy(s) || !w.steady(s) || excess <= s.keep_unused + s.hysteresis {
            continue;
        }
        let give = s.step_down.min(w.givable(keep));
        if give >= s.min_change {
            w.target -= give;
            w.why = Some("unused above the band: giving back");
            given += give;
        }
    }
    let deficit = (-budget).max(0) as u64;
    let supply = if deficit > given {
        // The host is short (below its reserve, or the pool overdrawn): take from everyone's
        // unused memory down to keep_unused, one step each, most unused first; no growth.
        let mut deficit = deficit - given;
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(work[i].unused().unwrap_or(0)));
        for i in order {
            let w = &mut work[i];
            let room = s.step_down.saturating_sub(w.vm.actual - w.target);
            let give = room.min(w.givable(s.keep_unused)).min(deficit);
            if give > 0 {
                w.target -= give;
                w.why = Some("host short: taking back");
                deficit -= give;
            }
            if deficit == 0 {
                break;
            }
        }
        0
    } else {
        given - deficit + budget.max(0) as u64
    };
    // Needy VMs, most needy first, from the donors then the host.
    let mut supply = supply;
    let mut order: Vec<usize> = (0..work.len()).filter(|&i| work[i].needy(s)).collect();
    order.sort_by_key(|&i| work[i].unused().unwrap_or(0));
    for i in order {
        let w = &mut work[i];
        let grow = w.wants(s).min(supply);
        if grow >= s.min_change.min(w.wants(s)) && grow > 0 {
            w.target += grow;
            w.why = Some("unused below the band: growing");
            supply -= grow;
        }
    }
}

/// The idle-memory tax's price ρ = S / (P·(f + k(1 − f))).
pub fn price(shares: u64, pages: u64, active: f64, tax: f64) -> f64 {
    let k = 1.0 / (1.0 - tax.clamp(0.0, 0.99));
    let f = active.clamp(0.0, 1.0);
    shares as f64 / (pages.max(1) as f64 * (f + k * (1.0 - f)))
}

fn idle_tax(s: &Settings, work: &mut [Work], budget: i64, held: u64) {
    let k = 1.0 / (1.0 - s.tax.clamp(0.0, 0.99));
    let cost = |w: &Work| {
        let f = w.vm.active.clamp(0.0, 1.0);
        f + k * (1.0 - f)
    };
    let balanced: Vec<usize> = (0..work.len())
        .filter(|&i| work[i].vm.stats.is_some())
        .collect();
    let total_shares: u64 = balanced
        .iter()
        .map(|&i| work[i].vm.shares)
        .sum::<u64>()
        .max(1);
    let pool = s.pool.unwrap_or(held + budget.max(0) as u64);
    // The tax bound: revocation leaves a VM at least (1 − τ) of its entitlement.
    let bound =
        |w: &Work| ((1.0 - s.tax) * pool as f64 * w.vm.shares as f64 / total_shares as f64) as u64;
    let revocable = |w: &Work| {
        w.givable(s.keep_unused)
            .min(w.target.saturating_sub(bound(w)))
    };
    let mut host = budget;
    // A short host: take back from the cheapest VMs first.
    while host < 0 {
        let victim = balanced
            .iter()
            .copied()
            .filter(|&i| {
                work[i].vm.actual - work[i].target < s.step_down && revocable(&work[i]) > 0
            })
            .min_by(|&a, &b| {
                let pa = price(work[a].vm.shares, work[a].target, work[a].vm.active, s.tax);
                let pb = price(work[b].vm.shares, work[b].target, work[b].vm.active, s.tax);
                pa.total_cmp(&pb)
            });
        let Some(v) = victim else { break };
        let w = &mut work[v];
        let give = revocable(w)
            .min(s.step_down - (w.vm.actual - w.target))
            .min((-host) as u64);
        w.target -= give;
        w.why = Some("host short: revoking from the lowest price");
        host += give as i64;
    }
    let mut order: Vec<usize> = balanced
        .iter()
        .copied()
        .filter(|&i| work[i].needy(s))
        .collect();
    order.sort_by_key(|&i| work[i].unused().unwrap_or(0));
    for r in order {
        let mut want = work[r].wants(s);
        let from_host = want.min(host.max(0) as u64);
        if from_host > 0 {
            work[r].target += from_host;
            work[r].why = Some("needy: growing from the host");
            host -= from_host as i64;
            want -= from_host;
        }
        while want >= s.min_change {
            let pr = price(work[r].vm.shares, work[r].target, work[r].vm.active, s.tax);
            let victim = balanced
                .iter()
                .copied()
                .filter(|&i| i != r && revocable(&work[i]) > 0)
                .filter(|&i| work[i].vm.actual - work[i].target < s.step_down)
                .map(|i| {
                    let p = price(work[i].vm.shares, work[i].target, work[i].vm.active, s.tax);
                    (i, p)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let Some((v, pv)) = victim else { break };
            if pv >= pr {
                break; // the needy VM is the cheapest: it may not take from others
            }
            // The move that equalises the two prices: S_v(P_r+Δ)c_r = S_r(P_v−Δ)c_v.
            let (sv, sr) = (work[v].vm.shares as f64, work[r].vm.shares as f64);
            let (cv, cr) = (cost(&work[v]), cost(&work[r]));
            let (pv_pages, pr_pages) = (work[v].target as f64, work[r].target as f64);
            let equalise = (sr * pv_pages * cv - sv * pr_pages * cr) / (sv * cr + sr * cv);
            let room = s.step_down - (work[v].vm.actual - work[v].target);
            let delta = want
                .min(room)
                .min(revocable(&work[v]))
                .min(equalise.max(0.0) as u64);
            if delta < s.min_change {
                break;
            }
            work[v].target -= delta;
            work[v].why = Some("revoked: lowest price (shares per active-adjusted page)");
            work[r].target += delta;
            work[r].why = Some("needy: growing from the lowest-price VM");
            want -= delta;
        }
    }
}

/// A VM's active fraction, smoothed as the max of a fast and a slow moving average (fact sheet
/// §3.1): it follows a rise at once and a fall slowly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    fast: Option<f64>,
    slow: Option<f64>,
}

impl Activity {
    /// Weight of a new sample in the fast average.
    pub const FAST: f64 = 0.5;
    /// Weight of a new sample in the slow average.
    pub const SLOW: f64 = 0.1;

    /// Adds one sample of the used fraction; returns the smoothed active fraction.
    pub fn observe(&mut self, sample: f64) -> f64 {
        let sample = sample.clamp(0.0, 1.0);
        let ewma = |old: Option<f64>, w: f64| old.map_or(sample, |o| o + w * (sample - o));
        self.fast = Some(ewma(self.fast, Self::FAST));
        self.slow = Some(ewma(self.slow, Self::SLOW));
        self.value()
    }

    /// The smoothed active fraction (0 before any sample).
    pub fn value(&self) -> f64 {
        self.fast.unwrap_or(0.0).max(self.slow.unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests;
