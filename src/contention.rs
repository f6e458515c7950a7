//! Contention: what each VM may use when the VMs together want more of a resource than the
//! host has. Pure: no I/O, no clock; the agent calls [`Contention::period`] once a period with
//! what it measured.
//!
//! # Units and resources
//!
//! One stage per resource, generic over its [`Amount`]: CPU in [`Rate`]s, millionths of one CPU
//! (ppm), like the ledger's (the host's capacity is a rate too: 2 CPUs = 2 000 000); disk read
//! or write bandwidth in [`Bps`], bytes per second; memory in [`Mib`] (`--memory-policy rescoin`,
//! see [`crate::balance::mem_rescoin`]). Estimates and accumulated credit are
//! integers of the same unit (credit: unit × periods). The rule is the same for every resource;
//! only the EWMA weight differs (ResCoin's: 0.7 for CPU, 0.8 for disk).
//!
//! For CPU the grant is the ledger's and the template the VM's pooled baseline. For disk
//! (`disk_share` in a VM's config, `--disk-bandwidth` on the agent) the template is the VM's
//! share of the host's bandwidth and the grant the whole bandwidth (no credits for disk: the
//! stage only divides); without contention a disk is not throttled at all.
//!
//! # The rule (ResCoin, `../shared/seeds-001-003.md` §2)
//!
//! Each VM has a *template capacity* `tc` — here its pooled baseline — a demand estimate `est`
//! and an accumulated credit `ac`. Every period:
//!
//! 1. `est ← α·obs + (1−α)·est` (α = 0.7 for CPU; the first estimate is the first observation),
//!    and `ac` = Σ (tc − used) over the last k = 9 periods: what the VM left unused of its
//!    template (negative when it ran above it).
//! 2. No contention — Σ min(est, grant) ≤ capacity: every VM may use its whole grant, exactly as
//!    without this stage.
//! 3. Contention: every VM first gets `g = min(est, baseline)` (never above its grant); the spare
//!    `C_e = capacity − Σg` goes to the VMs that want more than `g`, in proportion to their
//!    weights under the [`SpareRule`] in force, never above a VM's grant; what a capped VM
//!    cannot take is shared again among the others (water-filling), so nothing is left idle
//!    while a VM under its grant wants it. ResCoin's weight is `|ac|` (the README's
//!    `‖ac_i‖ / Σ‖ac‖`, [`SpareRule::Rescoin`]); the default, [`SpareRule::Headroom`], weighs
//!    by grant − g and needs no history (see [`rule`] for the rules and why).
//!
//! # Why this shape
//!
//! * **Observation of a VM the host starves.** Three busy VMs on a host with no caps each
//!   measure their fair share, so their use sums to the capacity and shows no contention. So a
//!   VM is observed as wanting what it ran *plus what it waited on a run queue* (schedstat's
//!   second field: a thread throttled by its quota is off the run queue, so only the host's
//!   refusal counts), never more than its grant. Measured first without it: the stage never
//!   engaged, every VM got 66 % of one CPU, the 80 % VM 13 points short.
//! * **Observation of a held VM.** A VM held to its allocation measures exactly its allocation,
//!   which says nothing about what it wants: an estimate built from it would fall to the cap
//!   and the stage would see no contention, hand out the grants, see contention again — an
//!   oscillation. So a VM that used ≥ 90 % of the cap it was held to is observed as wanting its
//!   whole grant; below that, its use *is* its demand. A VM that wakes up thus claims its
//!   baseline within one period.
//! * **A VM that wants less than its baseline** (`est ≤ g`) keeps its baseline as its cap, so a
//!   waking vCPU runs at once, up to the baseline (AWS's promise); only what it is estimated to
//!   use is counted against the spare, so its idle baseline is not held back from the others.
//!   When it wakes, the host is overcommitted for at most a period, during which the kernel
//!   splits by the weights (below), and the next period gives it its baseline.
//! * **Period 1 s**, not ResCoin's 8 s: the agent measures exactly (per-thread counters, not
//!   samples) and a quota acts within 100 ms, so a short period costs nothing in accuracy and
//!   makes re-convergence after a phase change a matter of seconds. With α = 0.7, a VM that
//!   stops is estimated at 3 % of its old demand after 3 periods.
//! * **ResCoin's weights `|ac|` are neutral at the fixed point.** A VM that runs above its
//!   baseline by `s` each period accumulates `|ac| = 9·s`, so weights proportional to `|ac|`
//!   reproduce the split that produced them: the rule keeps the spare split where it settles,
//!   and moves it only as VMs save (run below their template) or stop. Starting from an even
//!   split under plain quotas, the VMs with the smallest baselines had overrun most and keep
//!   most of the spare. That is ResCoin's rule as written, and why it is no longer the default
//!   for CPU (`--contention rescoin` keeps it); disk and memory, which have no credits, still
//!   use it.
//!
//! # Deviations from ResCoin (README and code)
//!
//! 1. README step 3 allocates `tc + wr·C_e`, which can exceed the capacity (it counts a VM's
//!    template in full even when it uses less); we allocate `min(est, tc) + wr·C_e` to VMs that
//!    want more, which sums to the capacity (the code's form, `schedule.c`).
//! 2. The code checks `est ≤ tc` for VM 0 only (a `break` outside the braces); we check every
//!    VM.
//! 3. The code weighs by the *signed* `ac / Σac` and divides by zero when `Σac = 0`; we weigh by
//!    `|ac|` as the README says, and split equally when every `|ac|` is 0.
//! 4. The code's CPU quota omits a `/100`, so its caps never bind; ours is the allocation
//!    exactly. (Its disk and `schedwr` bugs do not concern CPU.)
//! 5. Ours, not ResCoin's: allocations never exceed a VM's grant (the credits decide the cap;
//!    contention only divides); a held VM is observed as wanting its grant (above); if the
//!    baselines alone exceed the capacity, every VM's guarantee is scaled down in proportion;
//!    the period is 1 s.
//!
//! All of the above is unit- and property-tested below.

use std::collections::{BTreeMap, VecDeque};

use crate::credit::{Rate, PPM_PER_CPU};

pub mod rule;
pub use rule::{Entitlement, SpareRule};

/// A quantity one stage shares: a resource's unit per second.
pub trait Amount: Copy + std::fmt::Debug + PartialEq + Eq {
    /// The EWMA weight of a new observation, in tenths (ResCoin's α for the resource).
    const ALPHA_TENTHS: u64;
    /// The amount's value in its unit.
    fn get(self) -> u64;
    /// An amount of `v` units.
    fn of(v: u64) -> Self;
}

impl Amount for Rate {
    /// ResCoin: α = 0.7 for CPU.
    const ALPHA_TENTHS: u64 = 7;
    fn get(self) -> u64 {
        self.0
    }
    fn of(v: u64) -> Self {
        Rate(v)
    }
}

/// Disk bandwidth, bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bps(pub u64);

impl Amount for Bps {
    /// ResCoin: α = 0.8 for disk reads and writes.
    const ALPHA_TENTHS: u64 = 8;
    fn get(self) -> u64 {
        self.0
    }
    fn of(v: u64) -> Self {
        Bps(v)
    }
}

/// Memory, MiB (the balloon's unit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mib(pub u64);

impl Amount for Mib {
    /// ResCoin: α = 0.8 for memory.
    const ALPHA_TENTHS: u64 = 8;
    fn get(self) -> u64 {
        self.0
    }
    fn of(v: u64) -> Self {
        Mib(v)
    }
}

/// The EWMA weight of a new CPU observation, in tenths (ResCoin: α = 0.7 for CPU).
pub const ALPHA_TENTHS: u64 = <Rate as Amount>::ALPHA_TENTHS;
/// Periods in the accumulated-credit window (ResCoin's `WINSZ 10` keeps k = 9).
pub const WINDOW: usize = 9;
/// A VM that used at least this share (per mille) of the cap it was held to is held, not idle.
pub const HELD_PERMILLE: u64 = 900;

/// What the agent measured of one VM over the last period, and what the ledger grants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed<U = Rate> {
    /// The ledger's grant (the most the VM may use).
    pub grant: U,
    /// The VM's pooled baseline (ResCoin's template capacity).
    pub baseline: U,
    /// What its vCPU threads used over the period.
    pub used: U,
    /// How long its vCPU threads waited on a run queue while runnable, as a rate: CPU the
    /// host (not its cap) kept from it (0 for disk: QEMU does not say).
    pub waited: U,
}

/// One VM's allocation for the next period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation<U = Rate> {
    /// The cap to enforce: never above the grant.
    pub rate: U,
    /// Whether the host was contended (otherwise `rate` is the grant).
    pub contended: bool,
    /// The demand observed over the period just ended (see "Observation" above).
    pub observed: U,
    /// The demand estimate for the next period.
    pub estimate: U,
    /// The accumulated credit (ppm × periods).
    pub credit: i64,
}

#[derive(Clone, Debug, Default)]
struct History {
    estimate: Option<u64>,
    unused: VecDeque<i64>,
    cap: Option<u64>,
}

/// The contention stage's state: each VM's estimate and window.
#[derive(Clone, Debug)]
pub struct Contention<U = Rate> {
    capacity: U,
    rule: SpareRule,
    vms: BTreeMap<String, History>,
}

impl<U: Amount> Contention<U> {
    /// A stage for a host whose VMs may use `capacity` in all, sharing the spare by `rule`.
    pub fn new(capacity: U, rule: SpareRule) -> Self {
        Contention {
            capacity,
            rule,
            vms: BTreeMap::new(),
        }
    }

    /// The spare rule in force.
    pub fn rule(&self) -> SpareRule {
        self.rule
    }

    /// Shares the spare by `rule` from the next period on (every VM's window is kept whatever
    /// the rule, so ResCoin's weights are ready at once).
    pub fn set_rule(&mut self, rule: SpareRule) {
        self.rule = rule;
    }

    /// The capacity shared.
    pub fn capacity(&self) -> U {
        self.capacity
    }

    /// Changes the capacity shared from the next period on (memory: what the host can spare
    /// changes as it runs).
    pub fn set_capacity(&mut self, capacity: U) {
        self.capacity = capacity;
    }

    /// Ends a period: takes each VM's observation, returns the allocations for the next one, in
    /// the same order. VMs not named are forgotten.
    pub fn period(&mut self, observed: &[(&str, Observed<U>)]) -> Vec<Allocation<U>> {
        let observed: Vec<(&str, Observed<u64>)> = observed
            .iter()
            .map(|(n, o)| {
                let o = Observed {
                    grant: o.grant.get(),
                    baseline: o.baseline.get(),
                    used: o.used.get(),
                    waited: o.waited.get(),
                };
                (*n, o)
            })
            .collect();
        self.period_raw(&observed, U::ALPHA_TENTHS)
            .into_iter()
            .map(|a| Allocation {
                rate: U::of(a.rate),
                contended: a.contended,
                observed: U::of(a.observed),
                estimate: U::of(a.estimate),
                credit: a.credit,
            })
            .collect()
    }

    fn period_raw(
        &mut self,
        observed: &[(&str, Observed<u64>)],
        alpha_tenths: u64,
    ) -> Vec<Allocation<u64>> {
        let names: std::collections::HashSet<&str> = observed.iter().map(|(n, _)| *n).collect();
        self.vms.retain(|name, _| names.contains(name.as_str()));
        let mut est = Vec::with_capacity(observed.len());
        let mut seen = Vec::with_capacity(observed.len());
        let mut credit = Vec::with_capacity(observed.len());
        for (name, o) in observed {
            let h = self.vms.entry((*name).to_owned()).or_default();
            let held = h.cap.is_some_and(|cap| {
                u128::from(o.used) * 1000 >= u128::from(cap) * u128::from(HELD_PERMILLE)
            });
            // Held to its cap: it wants its grant. Otherwise what it ran plus what it waited
            // for (a busy VM on a busy host measures only its fair share of it).
            let obs = if held {
                o.grant.max(o.used)
            } else {
                o.used.saturating_add(o.waited).min(o.grant.max(o.used))
            };
            let e = match h.estimate {
                None => obs,
                Some(prev) => {
                    ((u128::from(alpha_tenths) * u128::from(obs)
                        + u128::from(10 - alpha_tenths) * u128::from(prev))
                        / 10) as u64
                }
            };
            h.estimate = Some(e);
            seen.push(obs);
            h.unused.push_back(
                o.baseline.min(i64::MAX as u64) as i64 - o.used.min(i64::MAX as u64) as i64,
            );
            while h.unused.len() > WINDOW {
                h.unused.pop_front();
            }
            est.push(e);
            credit.push(h.unused.iter().sum::<i64>());
        }
        let rates = plan(self.capacity.get(), self.rule, observed, &est, &credit);
        let contended = rates.is_some();
        let rates = rates.unwrap_or_else(|| observed.iter().map(|(_, o)| o.grant).collect());
        observed
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                if let Some(h) = self.vms.get_mut(*name) {
                    h.cap = Some(rates[i]);
                }
                Allocation {
                    rate: rates[i],
                    contended,
                    observed: seen[i],
                    estimate: est[i],
                    credit: credit[i],
                }
            })
            .collect()
    }
}

/// The allocations under contention, or `None` when there is none.
fn plan(
    capacity: u64,
    rule: SpareRule,
    observed: &[(&str, Observed<u64>)],
    est: &[u64],
    credit: &[i64],
) -> Option<Vec<u64>> {
    let n = observed.len();
    let grant: Vec<u64> = observed.iter().map(|(_, o)| o.grant).collect();
    let baseline: Vec<u64> = observed.iter().map(|(_, o)| o.baseline).collect();
    let wanted: u64 = (0..n).map(|i| est[i].min(grant[i])).sum();
    if wanted <= capacity {
        return None;
    }
    // The guarantee, scaled down in proportion if the baselines alone exceed the capacity.
    let mut g: Vec<u64> = (0..n)
        .map(|i| est[i].min(baseline[i]).min(grant[i]))
        .collect();
    let total_g: u64 = g.iter().sum();
    if total_g > capacity {
        for x in &mut g {
            *x = (u128::from(*x) * u128::from(capacity) / u128::from(total_g)) as u64;
        }
    }
    let hungry: Vec<bool> = (0..n).map(|i| est[i] > g[i] && grant[i] > g[i]).collect();
    let counted: u64 = (0..n)
        .map(|i| if hungry[i] { g[i] } else { est[i].min(g[i]) })
        .sum();
    let spare = capacity.saturating_sub(counted);
    let mut alloc = g.clone();
    let open: Vec<usize> = (0..n).filter(|&i| hungry[i]).collect();
    let weight: Vec<u128> = (0..n)
        .map(|i| rule.weight(grant[i], baseline[i], g[i], credit[i]))
        .collect();
    water_fill(&mut alloc, &grant, &weight, open, spare);
    // VMs that want no more than their guarantee keep their baseline as their cap.
    for i in 0..n {
        if !hungry[i] {
            alloc[i] = alloc[i].max(baseline[i].min(grant[i]));
        }
    }
    Some(alloc)
}

/// Water-fills `spare` over the VMs in `open`, adding to `alloc`: each round shares what is left
/// among them in proportion to `weight` (equally when every weight is 0), never lifting a VM
/// above its `limit`; a VM that reaches its limit leaves and what it could not take goes round
/// again, so nothing is left while an open VM has room. Returns what is left (only when every
/// open VM reached its limit). The one split of the spare: the stage's plan and the
/// dispatchers' steady state ([`crate::sched::fair_shares`]) both are this.
pub fn water_fill(
    alloc: &mut [u64],
    limit: &[u64],
    weight: &[u128],
    mut open: Vec<usize>,
    mut spare: u64,
) -> u64 {
    open.retain(|&i| alloc[i] < limit[i]);
    while spare > 0 && !open.is_empty() {
        let sum: u128 = open.iter().map(|&i| weight[i]).sum();
        let mut given = 0;
        for &i in &open {
            let share = (u128::from(spare) * weight[i])
                .checked_div(sum)
                .unwrap_or(u128::from(spare) / open.len() as u128) as u64;
            let take = share.min(limit[i] - alloc[i]);
            alloc[i] += take;
            given += take;
        }
        if given == 0 {
            // Less than one unit each after rounding: one unit each, in order, till none is
            // left (at most one unit more than its share for any VM).
            for &i in &open {
                if spare > 0 && alloc[i] < limit[i] {
                    alloc[i] += 1;
                    spare -= 1;
                }
            }
        }
        spare -= given;
        open.retain(|&i| alloc[i] < limit[i]);
    }
    spare
}

/// The plan for VMs that all want their whole grant, from a fresh stage: `vms` are each VM's
/// (grant, baseline). Under a history-free rule this is the split of every period while they
/// stay busy (what a measurement of busy VMs is compared with); under ResCoin's, only the
/// first period's.
pub fn busy_split(capacity: Rate, rule: SpareRule, vms: &[(Rate, Rate)]) -> Vec<Rate> {
    let names: Vec<String> = (0..vms.len()).map(|i| format!("vm{i}")).collect();
    let observed: Vec<(&str, Observed)> = names
        .iter()
        .zip(vms)
        .map(|(n, &(grant, baseline))| {
            let o = Observed {
                grant,
                baseline,
                used: grant,
                waited: Rate(0),
            };
            (n.as_str(), o)
        })
        .collect();
    Contention::new(capacity, rule)
        .period(&observed)
        .into_iter()
        .map(|a| a.rate)
        .collect()
}

/// The capacity of `cpus` whole CPUs.
pub fn cpus(cpus: u32) -> Rate {
    Rate(u64::from(cpus) * PPM_PER_CPU)
}

/// Jain's fairness index of `x` (1 when all equal; 1/n at worst), for the measurements.
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares == 0.0 {
        return 1.0;
    }
    sum * sum / (x.len() as f64 * squares)
}

#[cfg(test)]
mod tests;
