//! The steady-state split of the CPUs among VMs: what the [`super::Scheduler`] converges to
//! when every VM's demand is constant. Pure; used by the property tests as the expected
//! answer and by mechanisms or reports that want the target rates without running time. The
//! spare is split by the planner's own water-filling ([`crate::contention::water_fill`]) over
//! the weights of the VMs' [`Entitlement`]s, so a dispatcher that converges here gives what the
//! contention stage plans for the same rule.

use crate::contention::{water_fill, Entitlement};
use crate::credit::{Rate, PPM_PER_CPU};

/// One VM's inputs to [`fair_shares`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    /// What the planner entitles it to: cap, guarantee and weight for the spare.
    pub entitled: Entitlement,
    /// How much it would use unconstrained: runnable threads × one CPU, millionths of a CPU.
    pub wants: Rate,
}

/// Splits `cpus` whole CPUs among `vms`: first each VM gets `min(wants, guarantee, cap)`
/// (scaled down in proportion to the guarantees if even those exceed the CPUs), then what is
/// left is water-filled among the VMs still below `min(wants, cap)` in proportion to their
/// weights (a VM of weight 0 only what those with weight cannot take). Returns one rate per VM,
/// in order.
pub fn fair_shares(vms: &[Demand], cpus: u32) -> Vec<Rate> {
    let capacity = u64::from(cpus) * PPM_PER_CPU;
    let limit: Vec<u64> = vms
        .iter()
        .map(|v| v.wants.0.min(v.entitled.cap.0))
        .collect();
    let base: Vec<u64> = vms
        .iter()
        .zip(&limit)
        .map(|(v, &l)| v.entitled.guarantee.0.min(l))
        .collect();
    let base_total: u64 = base.iter().sum();
    if base_total >= capacity {
        // Overcommitted guarantees: in proportion to them (u128: no overflow).
        return base
            .iter()
            .map(|&b| Rate((u128::from(b) * u128::from(capacity) / u128::from(base_total)) as u64))
            .collect();
    }
    let mut share = base;
    let weight: Vec<u128> = vms
        .iter()
        .map(|v| u128::from(v.entitled.weight.0))
        .collect();
    // The VMs of weight 0 take only what the others cannot (the dispatch serves them last).
    let (weighted, unweighted) = (0..vms.len()).partition(|&i| weight[i] > 0);
    let left = water_fill(&mut share, &limit, &weight, weighted, capacity - base_total);
    water_fill(&mut share, &limit, &weight, unweighted, left);
    share.into_iter().map(Rate).collect()
}

/// The weights that make a dispatcher ordering by (used − guarantee) / weight within each
/// period (the sched_ext program's tier 1, `bpf/burst.bpf.c`) give busy VMs the planner's
/// split: each VM's [`fair_shares`] target with all its `threads` runnable, minus its
/// guarantee. Ordered by the planner's weights instead, VMs that regain their budget together
/// at a refill take the CPUs first and a VM of small weight runs only once they are out, when
/// it can use no more than its threads for what is left of the period: below its target on
/// CPUs with room to spare (the conformance test's case: 54 % of a CPU for a plan of 83 %).
/// With weights target − guarantee every VM reaches its target at the same point of the
/// period, the order the ghOSt scheduler takes ([`super::Scheduler`]'s tier 1). 0 for a VM
/// whose target is its guarantee: none of the spare, served last.
pub fn dispatch_weights(vms: &[(Entitlement, u32)], cpus: u32) -> Vec<Rate> {
    let demands: Vec<Demand> = vms
        .iter()
        .map(|&(entitled, threads)| Demand {
            entitled,
            wants: Rate(u64::from(threads) * PPM_PER_CPU),
        })
        .collect();
    fair_shares(&demands, cpus)
        .into_iter()
        .zip(vms)
        .map(|(target, (e, _))| Rate(target.0.saturating_sub(e.guarantee.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(grant: u64, baseline: u64, wants: u64) -> Demand {
        Demand {
            entitled: crate::contention::SpareRule::Headroom
                .entitlement(Rate(grant), Rate(baseline))
                .unwrap(),
            wants: Rate(wants),
        }
    }

    #[test]
    fn three_vm_overcommit_meets_baselines_and_splits_spare_by_headroom() {
        // Three 2-vCPU VMs, all busy, baselines 80/40/20 % of a CPU, full grants, 2 CPUs.
        let vms = [
            d(2_000_000, 800_000, 2_000_000),
            d(2_000_000, 400_000, 2_000_000),
            d(2_000_000, 200_000, 2_000_000),
        ];
        let s = fair_shares(&vms, 2);
        assert_eq!(s.iter().map(|r| r.0).sum::<u64>(), 2_000_000);
        // Spare 0.6 CPU by headroom 1.2 : 1.6 : 1.8.
        assert!(s[0].0.abs_diff(800_000 + 600_000 * 12 / 46) <= 1, "{s:?}");
        assert!(s.iter().zip(&vms).all(|(s, v)| *s >= v.entitled.guarantee));
    }

    #[test]
    fn caps_and_demand_bound_the_share_and_the_rest_is_redistributed() {
        let vms = [
            d(200_000, 200_000, 2_000_000), // held to its baseline
            d(2_000_000, 100_000, 300_000), // wants little
            d(2_000_000, 100_000, 2_000_000),
        ];
        let s = fair_shares(&vms, 2);
        assert_eq!(s[0], Rate(200_000));
        assert_eq!(s[1], Rate(300_000));
        assert_eq!(s[2], Rate(1_500_000));
    }

    #[test]
    fn overcommitted_baselines_scale_in_proportion() {
        let vms = [
            d(1_000_000, 1_000_000, 1_000_000),
            d(3_000_000, 3_000_000, 3_000_000),
        ];
        assert_eq!(fair_shares(&vms, 2), vec![Rate(500_000), Rate(1_500_000)]);
    }

    #[test]
    fn dispatch_weights_are_each_vms_busy_target_above_its_guarantee() {
        let e = |grant: u64, baseline: u64| {
            crate::contention::SpareRule::Baseline
                .entitlement(Rate(grant), Rate(baseline))
                .unwrap()
        };
        // 4 CPUs; grants 0.75 + 0.588 + 1.128 + 0.8725 = 3.3385 CPUs fit: every VM's target
        // is its grant, whatever its weight (the baseline's, 1 % for the first).
        let vms = [
            (e(750_000, 10_000), 1),
            (e(588_200, 420_000), 1),
            (e(1_128_000, 660_000), 3),
            (e(872_500, 490_000), 1),
        ];
        assert_eq!(
            dispatch_weights(&vms, 4),
            vec![Rate(740_000), Rate(168_200), Rate(468_000), Rate(382_500)]
        );
        // 1 CPU for two 1-vCPU VMs of baselines 0.2 and 0.4, full grants: the spare 0.4 goes
        // 1 : 2, so 0.333 and 0.667 in all (the odd ppm to the first).
        let two = [(e(1_000_000, 200_000), 1), (e(1_000_000, 400_000), 1)];
        assert_eq!(
            dispatch_weights(&two, 1),
            vec![Rate(133_334), Rate(266_666)]
        );
        // Without credits (grant = baseline): none of the spare.
        assert_eq!(
            dispatch_weights(&[(e(300_000, 300_000), 2)], 2),
            vec![Rate(0)]
        );
    }
}
