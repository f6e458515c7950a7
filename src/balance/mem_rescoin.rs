//! Memory as ResCoin's third resource (`--memory-policy rescoin`): the contention stage of
//! [`crate::contention`], in MiB, drives the balloon targets. Pure: no I/O, no clock; the
//! coordinator calls [`Rescoin::plan`] once a round. State: each VM's demand estimate and its
//! accumulated credit, kept by the stage.
//!
//! # The mapping
//!
//! * **Capacity** `C_h`: the memory the balanced VMs may hold together: the pool
//!   (`--memory-pool`) when given, else what they hold plus the host's MemAvailable above its
//!   reserve. VMs without stats (no balloon driver) keep what they hold, which is taken off.
//! * **Template** `tc_i`: the VM's part of the capacity by its `memory_shares`.
//! * **Demand**: what the guest uses (balloon size − MemAvailable) plus the unused memory it is
//!   always left (`keep_unused`, 100 MiB): a VM asks for room to grow. ResCoin's α for memory is
//!   0.8. A guest short of unused memory (below `grow_below`, the coordinator's "needy") asks
//!   for its ceiling, as a CPU VM held at its cap asks for its grant: what it holds says
//!   nothing of what it wants.
//! * **Grant**: the VM's ceiling (boot size or `memory_max`): there are no credits for memory.
//! * **Allocation**: uncontended, the estimate itself (ResCoin's step 2), so idle memory goes
//!   back to the host rather than every VM being inflated to its ceiling. Contended, the
//!   stage's allocation but never above the template: **the spare is not lent**. CPU or disk
//!   lent to a VM beyond its template is taken back within a period when its owner wants it;
//!   memory a guest has filled cannot be taken back without the guest swapping or being
//!   OOM-killed, so a VM lent its neighbour's idle template would keep it (measured on real
//!   guests: two hungry VMs with shares 2:1 ended at the same size, each having grabbed what
//!   the other left while it freed). The capacity being the sum of the templates, reserving
//!   templates leaves no spare under contention; the accumulated credit still steers the
//!   stage's view of who is hungry. A deviation from both ResCoin's README (`tc + wr·C_e`) and
//!   code (`min(est, tc) + wr·C_e`), for memory only.
//!
//! # What the balloon does with it
//!
//! The targets move toward the allocations under the coordinator's invariants, the same as for
//! the other policies: one step at a time (`step_up`/`step_down`), never below the floor nor
//! above the ceiling, never leaving a VM less than `keep_unused` of unused memory (so a VM over
//! its allocation is squeezed only down to what it uses: the balloon cannot take memory a guest
//! holds without swapping or killing, and a burstable host must do neither), and growth only
//! out of what the host can spare above its reserve plus what others give back in the same round.

use crate::contention::{Contention, Mib, Observed, SpareRule};

use super::mem::{Settings, Stats, Target, Vm};

/// The ResCoin memory planner's state.
#[derive(Debug)]
pub struct Rescoin {
    stage: Contention<Mib>,
}

impl Default for Rescoin {
    fn default() -> Self {
        Rescoin {
            stage: Contention::new(Mib(0), SpareRule::Rescoin),
        }
    }
}

/// One VM's allocation, with what the stage saw, for the log and the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allotted {
    /// MiB the VM should hold.
    pub allocation: u64,
    /// Its template, MiB.
    pub template: u64,
    /// Whether the host's memory was contended.
    pub contended: bool,
}

impl Rescoin {
    /// The next targets (VMs left out keep theirs) and each planned VM's allocation.
    /// `host_available` is the host's MemAvailable, MiB.
    pub fn plan(
        &mut self,
        s: &Settings,
        vms: &[Vm],
        host_available: u64,
    ) -> (Vec<Target>, Vec<(String, Allotted)>) {
        let held: u64 = vms.iter().map(|v| v.actual).sum();
        let spare_host = host_available.saturating_sub(s.host_reserve);
        let fixed: u64 = vms
            .iter()
            .filter(|v| v.stats.is_none())
            .map(|v| v.actual)
            .sum();
        let capacity = s.pool.unwrap_or(held + spare_host).saturating_sub(fixed);
        self.stage.set_capacity(Mib(capacity));
        let planned: Vec<(&Vm, Stats)> = vms.iter().filter_map(|v| Some((v, v.stats?))).collect();
        let observed = observe(s, &planned, capacity);
        let plan = self.stage.period(&observed);
        let allotted: Vec<(String, Allotted)> = observed
            .iter()
            .zip(&plan)
            .map(|((name, o), a)| {
                let allocation = if a.contended {
                    // Memory lent is not called back: the spare is never lent (see above).
                    a.rate.0.min(o.baseline.0)
                } else {
                    a.estimate.0.min(o.grant.0)
                };
                (
                    (*name).to_owned(),
                    Allotted {
                        allocation,
                        template: o.baseline.0,
                        contended: a.contended,
                    },
                )
            })
            .collect();
        // Shrinks first: what they give back, with the host's spare above its reserve, is all
        // growth may take this round.
        let (mut next, given) = shrinks(s, &planned, &allotted);
        let budget = given
            + match s.pool {
                Some(pool) => pool.saturating_sub(held).min(spare_host),
                None => spare_host,
            };
        next.extend(growth(s, &planned, &allotted, budget));
        let targets = next
            .into_iter()
            .map(|(i, target, why)| Target {
                name: planned[i].0.name.clone(),
                target,
                why,
            })
            .collect();
        (targets, allotted)
    }
}

/// Memory a guest uses: its balloon's size less what it leaves unused.
fn used(v: &Vm, st: &Stats) -> u64 {
    v.actual.saturating_sub(st.available.min(v.actual))
}

/// What the stage sees of each VM: its ceiling as the grant, its share of the capacity as its
/// template, and what it wants.
fn observe<'a>(
    s: &Settings,
    planned: &[(&'a Vm, Stats)],
    capacity: u64,
) -> Vec<(&'a str, Observed<Mib>)> {
    let shares: u64 = planned
        .iter()
        .map(|(v, _)| v.shares.max(1))
        .sum::<u64>()
        .max(1);
    planned
        .iter()
        .map(|(v, st)| {
            let template =
                (u128::from(capacity) * u128::from(v.shares.max(1)) / u128::from(shares)) as u64;
            // A guest short of unused memory wants more than it shows: like a CPU VM held at
            // its cap, it asks for its ceiling (else one VM's freeing makes the host look
            // uncontended and the other takes the memory for good).
            let want = if st.available < s.grow_below {
                v.ceiling
            } else {
                (used(v, st) + s.keep_unused).min(v.ceiling)
            };
            (
                v.name.as_str(),
                Observed {
                    grant: Mib(v.ceiling),
                    baseline: Mib(template.min(v.ceiling)),
                    used: Mib(want),
                    waited: Mib(0),
                },
            )
        })
        .collect()
}

/// The donors' shrinks toward their allocation, and the MiB they give back.
fn shrinks(
    s: &Settings,
    planned: &[(&Vm, Stats)],
    allotted: &[(String, Allotted)],
) -> (Vec<(usize, u64, &'static str)>, u64) {
    let mut next = Vec::new();
    let mut given = 0u64;
    for (i, (v, st)) in planned.iter().enumerate() {
        // Only a donor gives back (unused above keep_unused + hysteresis, as in `thresholds`),
        // and only down to the middle of that band: the stats are up to an interval old, and a
        // guest growing meanwhile would be squeezed into an OOM kill (seen on a real guest when
        // this took all but keep_unused).
        if st.available <= s.keep_unused + s.hysteresis {
            continue;
        }
        let lowest = (used(v, st) + s.keep_unused + s.hysteresis / 2)
            .max(v.floor)
            .min(v.ceiling);
        let want = allotted[i]
            .1
            .allocation
            .clamp(v.floor.min(v.ceiling), v.ceiling);
        if want + s.min_change <= v.actual {
            let to = want.max(lowest).max(v.actual.saturating_sub(s.step_down));
            if to < v.actual {
                given += v.actual - to;
                next.push((i, to, "above its allocation: giving back"));
            }
        }
    }
    (next, given)
}

/// Growth within `budget`, the VMs furthest below their allocation first.
fn growth(
    s: &Settings,
    planned: &[(&Vm, Stats)],
    allotted: &[(String, Allotted)],
    mut budget: u64,
) -> Vec<(usize, u64, &'static str)> {
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by_key(|&i| {
        std::cmp::Reverse(allotted[i].1.allocation.saturating_sub(planned[i].0.actual))
    });
    let mut next = Vec::new();
    for i in order {
        let v = planned[i].0;
        let want = allotted[i].1.allocation.min(v.ceiling);
        if want >= v.actual + s.min_change {
            let grow = (want - v.actual).min(s.step_up).min(budget);
            if grow > 0 {
                budget -= grow;
                next.push((i, v.actual + grow, "below its allocation: growing"));
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::mem::Stats;

    fn vm(name: &str, shares: u64, actual: u64, used: u64) -> Vm {
        Vm {
            name: name.into(),
            floor: 200,
            ceiling: 2048,
            shares,
            actual,
            stats: Some(Stats {
                free: actual.saturating_sub(used),
                available: actual.saturating_sub(used),
                total: actual,
            }),
            used_before: Some(used),
            active: 1.0,
        }
    }

    /// Rounds of guests that each want `want` MiB and use what they get up to it; with
    /// `cycle`, each frees everything every `cycle` rounds (at staggered rounds) and grows again,
    /// as the published hogs do. Returns the most each held over the last two cycles.
    fn run(
        s: &Settings,
        want: &[(&str, u64, u64)],
        rounds: usize,
        host: u64,
        cycle: Option<usize>,
    ) -> Vec<u64> {
        let mut r = Rescoin::default();
        let mut actual: Vec<u64> = want.iter().map(|_| 512).collect();
        let mut peak = vec![0; want.len()];
        for round in 0..rounds {
            let vms: Vec<Vm> = want
                .iter()
                .zip(&actual)
                .enumerate()
                .map(|(i, (&(n, sh, w), &a))| {
                    let freed = cycle.is_some_and(|c| (round + i * c / 2) % c == 0);
                    let used = if freed {
                        50
                    } else {
                        w.min(a.saturating_sub(20))
                    };
                    vm(n, sh, a, used)
                })
                .collect();
            let (targets, _) = r.plan(s, &vms, host);
            for t in targets {
                let i = want.iter().position(|w| w.0 == t.name).unwrap();
                actual[i] = t.target;
            }
            if rounds - round <= 2 * cycle.unwrap_or(1) {
                for (p, a) in peak.iter_mut().zip(&actual) {
                    *p = (*p).max(*a);
                }
            }
        }
        peak
    }

    #[test]
    fn memory_in_use_is_never_taken_back() {
        // Both hogs fill what they get and never free: what they hold stays theirs, and the
        // pool is never exceeded.
        let s = Settings {
            pool: Some(1800),
            ..Settings::default()
        };
        let got = run(
            &s,
            &[("a", 2000, 4000), ("b", 1000, 4000)],
            60,
            100_000,
            None,
        );
        assert!(got.iter().sum::<u64>() <= 1800, "{got:?}");
    }

    #[test]
    fn hungry_vms_that_free_and_grow_again_split_a_pool_by_their_shares() {
        let s = Settings {
            pool: Some(1800),
            ..Settings::default()
        };
        // Shares 2:1, both want far more than the pool; each frees all every 30 rounds.
        let got = run(
            &s,
            &[("a", 2000, 4000), ("b", 1000, 4000)],
            300,
            100_000,
            Some(30),
        );
        assert!(got.iter().sum::<u64>() <= 1800 + 128, "{got:?}");
        let ratio = got[0] as f64 / got[1] as f64;
        eprintln!("peaks {got:?}");
        assert!((ratio - 2.0).abs() <= 0.2, "{got:?}");
    }

    #[test]
    fn uncontended_vms_hold_their_use_plus_headroom_not_their_ceiling() {
        let s = Settings::default();
        let got = run(&s, &[("a", 1000, 300), ("b", 1000, 300)], 40, 100_000, None);
        for g in got {
            assert!((380..=460).contains(&g), "{g}");
        }
    }

    #[test]
    fn the_host_reserve_bounds_growth() {
        let s = Settings::default();
        // The host has 300 MiB available: 100 above the reserve.
        let mut r = Rescoin::default();
        let vms = [vm("a", 1000, 512, 500)];
        let (targets, _) = r.plan(&s, &vms, 300);
        assert!(targets.iter().all(|t| t.target <= 612), "{targets:?}");
    }
}
