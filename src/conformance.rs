//! Conformance of the one CPU policy across its mechanisms (issue 20): one trace — a fleet of
//! busy VMs, then a live edit of one VM's baseline and grant — driven through the planner and
//! each enforcer's rule, property-tested to agree:
//!
//! - the planner: the contention stage's split for busy VMs ([`busy_split`]), which is also
//!   the dispatchers' steady state ([`fair_shares`], 1 ppm per VM apart: `contention::rule`);
//! - the cgroup enforcer's arithmetic: the plan as a quota per period (`cgroup::bandwidth`),
//!   which the kernel's CFS bandwidth control enforces as a cap;
//! - the ghOSt scheduler (`src/sched/`), on its exact discrete-event machine;
//! - the sched_ext program's rule, transcribed (`enforce::scx::dispatch_model`), fed the
//!   budgets the scx enforcer writes (`scx::budget_ns`, and the weights of
//!   [`crate::sched::dispatch_weights`]).
//!
//! What each mechanism delivers is compared with the plan over the second half of each phase
//! (each phase is 2 s; the first second lets it settle).
//!
//! **Measured** (`PROPTEST_CASES=300`, seeds `PROPTEST_RNG_SEED=1` to `6`: 11 016 VM-phases;
//! % of one CPU per vCPU of the VM, the largest difference from the plan; the p99 in brackets):
//! the quota exact to 10 ppm; the ghOSt scheduler 5.8 (3.6) points under `headroom` and 16.2
//! (3.2) under `baseline`; the sched_ext rule 2.0 (0.8) and 2.8 (1.0). The sched_ext rule
//! before it paced the baseline, took the dispatch weights
//! ([`crate::sched::dispatch_weights`]) and gave a CPU back at the tick a better claim waited
//! (seeds 1 to 4, 7 330 VM-phases): 22.4 (4.2) and 35.2 (9.1), 36 VM-phases above 10 points.
//! VMs refilled together with more runnable threads than their share of CPUs took their
//! baselines at the start of each period, and a VM of few threads (or of small weight) could
//! then use no more than its threads for what was left of it; with pace and weights alone,
//! 5.6 (3.5) and 10.1 (4.7): the spare moved in 5-ms slices of a 100-ms period. The ghOSt
//! differences above 6 points (10 VM-phases, all under `baseline`) are VMs of one vCPU whose
//! spare waits behind the guarantees of VMs with many threads
//! (`sched::tests::vms_held_to_their_baselines_do_not_preempt_each_other_without_end`). Rare
//! larger sched_ext differences remain for the same kind of VM (one vCPU, a target near a whole
//! CPU: 12.3 points once in about 25 000 VM-phases; ordering by laxity, what is left to run
//! against the threads and the time left, is the fix they ask for). The bounds below are the
//! largest seen with a quarter more or so for what was not reached.

use proptest::prelude::*;

use crate::contention::{busy_split, cpus, SpareRule};
use crate::credit::{Rate, PPM_PER_CPU};
use crate::enforce::cgroup::bandwidth;
use crate::enforce::scx::{budget_ns, dispatch_model};
use crate::sched::tests::{busy, Sim, VmSpec};
use crate::sched::Config;

const S: u64 = 1_000_000_000;
/// The ghOSt scheduler's largest difference from the plan per vCPU, ppm (measured 16.2 points;
/// see the module's docs).
const GHOST_PPM_PER_VCPU: f64 = 200_000.0;
/// The sched_ext rule's, ppm (measured 2.8 points in the six seeds' 11 016 VM-phases, and
/// 12.3 once in 180 runs of the default 24 cases, about 25 000 VM-phases: a 1-vCPU VM whose
/// target is nearly a whole CPU, which loses at each preemption what its one thread cannot
/// catch up; 4.0 and 4.1 twice more).
const SCX_PPM_PER_VCPU: f64 = 160_000.0;

/// A busy fleet that fits its baselines in `cpus`: (vCPUs, baseline, grant) per VM, ppm.
fn fleet() -> impl Strategy<Value = (u32, Vec<(u64, u64, u64)>)> {
    (1u32..5).prop_flat_map(|cpus| {
        let vm = (1u64..4, 1u64..=100, 0u64..=100);
        (Just(cpus), prop::collection::vec(vm, 1..6)).prop_map(|(cpus, vms)| {
            let n = vms.len() as u64;
            let vms = vms
                .into_iter()
                .map(|(vcpus, b, g)| {
                    let full = vcpus * PPM_PER_CPU;
                    let baseline = (u64::from(cpus) * PPM_PER_CPU * b / 100 / n).min(full);
                    (vcpus, baseline, baseline + (full - baseline) * g / 100)
                })
                .collect();
            (cpus, vms)
        })
    })
}

/// Each mechanism's rates (ppm) over the second half of a phase.
fn rates(ran_ns: &[u64], secs: u64) -> Vec<f64> {
    ran_ns
        .iter()
        .map(|&ns| ns as f64 * PPM_PER_CPU as f64 / (secs * S) as f64)
        .collect()
}

proptest! {
    // 24 cases: about a minute in a debug build (each simulates 4 s of both schedulers).
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn one_trace_through_the_planner_and_every_mechanism_agrees(
        (cpu_count, vms) in fleet(),
        rule in prop_oneof![Just(SpareRule::Headroom), Just(SpareRule::Baseline)],
        edit in (0u64..=100, 0u64..=100),
    ) {
        // The edit: VM 0's baseline and grant move (a config edit, a grant falling).
        let mut edited = vms.clone();
        {
            let (vcpus, _, _) = edited[0];
            let full = vcpus * PPM_PER_CPU;
            let others: u64 = vms[1..].iter().map(|v| v.1).sum();
            let room = (u64::from(cpu_count) * PPM_PER_CPU).saturating_sub(others).min(full);
            // At least 1 % of a CPU (a grant of 0 pauses the VM with QMP instead, under every
            // enforcer).
            let baseline = room * edit.0 / 100;
            edited[0].1 = baseline;
            edited[0].2 = (baseline + (full - baseline) * edit.1 / 100).max(PPM_PER_CPU / 100);
        }
        let entitled = |v: &[(u64, u64, u64)]| -> Vec<_> {
            v.iter()
                .map(|&(_, b, g)| rule.entitlement(Rate(g), Rate(b)).unwrap())
                .collect()
        };
        let specs: Vec<VmSpec> = vms
            .iter()
            .map(|&(vcpus, baseline, grant)| VmSpec {
                grant,
                baseline,
                threads: busy(vcpus as usize),
            })
            .collect();
        let mut ghost = Sim::under(rule, &specs, cpu_count, Config::default());
        let scx_budgets = |v: &[(u64, u64, u64)]| -> Vec<(u64, u64, u64, usize)> {
            let e = entitled(v);
            let threads: Vec<_> = e.iter().zip(v).map(|(e, &(vcpus, _, _))| (*e, vcpus as u32)).collect();
            let w = crate::sched::dispatch_weights(&threads, cpu_count);
            e.iter()
                .zip(v)
                .zip(w)
                .map(|((e, &(vcpus, _, _)), w)| {
                    let grant = budget_ns(e.cap).max(budget_ns(Rate(PPM_PER_CPU / 100)));
                    (budget_ns(e.guarantee).min(grant), grant, budget_ns(w), vcpus as usize)
                })
                .collect()
        };
        let mut scx = dispatch_model::Machine::new(cpu_count as usize, &scx_budgets(&vms));
        for (phase, v) in [(0u64, &vms), (1, &edited)] {
            let start = phase * 2 * S;
            if phase == 1 {
                for (i, e) in entitled(v).into_iter().enumerate() {
                    ghost.entitle(i, e);
                }
                for (i, &(b, g, w, _)) in scx_budgets(v).iter().enumerate() {
                    scx.set_budget(i, b, g, w);
                }
            }
            let fleet: Vec<(Rate, Rate)> = v.iter().map(|&(_, b, g)| (Rate(g), Rate(b))).collect();
            let plan = busy_split(cpus(cpu_count), rule, &fleet);
            // The cgroup enforcer: the plan as a quota per period, to the microsecond (and never
            // below the kernel's smallest, 1 ms a second).
            for (a, &(vcpus, _, _)) in plan.iter().zip(v.iter()) {
                let (quota, period) = bandwidth(*a, Rate(vcpus * PPM_PER_CPU));
                let cap = quota.map_or((vcpus * PPM_PER_CPU) as f64, |q| {
                    q as f64 * PPM_PER_CPU as f64 / period as f64
                });
                let want = a.0.max(1_000) as f64;
                prop_assert!((cap - want).abs() <= 10.0, "quota {quota:?}/{period} for {a:?}");
            }
            ghost.run_until(start + 2 * S);
            scx.run_until(start + S);
            let mid: Vec<u64> = scx.vms.iter().map(|m| m.ran_ns).collect();
            scx.run_until(start + 2 * S);
            let scx_ran: Vec<u64> = scx.vms.iter().zip(&mid).map(|(m, b)| m.ran_ns - b).collect();
            let ghost_ran: Vec<u64> = (0..v.len())
                .map(|i| ghost.used(i, start + S, start + 2 * S))
                .collect();
            let (g, x) = (rates(&ghost_ran, 1), rates(&scx_ran, 1));
            for (i, &(vcpus, _, _)) in v.iter().enumerate() {
                let p = plan[i].0 as f64;
                prop_assert!((g[i] - p).abs() <= vcpus as f64 * GHOST_PPM_PER_VCPU,
                    "{rule}, phase {phase}, VM {i}: ghOSt {:.0} ppm, plan {p}", g[i]);
                prop_assert!((x[i] - p).abs() <= vcpus as f64 * SCX_PPM_PER_VCPU,
                    "{rule}, phase {phase}, VM {i}: sched_ext {:.0} ppm, plan {p}", x[i]);
            }
        }
    }
}
