use super::*;
use proptest::prelude::*;

pub(super) const CPU: u64 = PPM_PER_CPU;

pub(super) fn obs(grant: u64, baseline: u64, used: u64) -> Observed {
    Observed {
        grant: Rate(grant),
        baseline: Rate(baseline),
        used: Rate(used),
        waited: Rate(0),
    }
}

/// Runs `periods` periods of VMs that each want `want` (and use min(want, cap)).
pub(super) fn run(
    c: &mut Contention,
    vms: &[(&str, u64, u64, u64)],
    periods: usize,
) -> Vec<Allocation> {
    let mut caps: Vec<u64> = vms.iter().map(|v| v.1).collect();
    let mut out = Vec::new();
    for _ in 0..periods {
        let o: Vec<(&str, Observed)> = vms
            .iter()
            .zip(&caps)
            .map(|(&(n, grant, base, want), &cap)| (n, obs(grant, base, want.min(cap))))
            .collect();
        out = c.period(&o);
        caps = out.iter().map(|a| a.rate.0).collect();
    }
    out
}

#[test]
fn without_contention_allocations_are_the_grants() {
    let mut c = Contention::new(cpus(2), SpareRule::Rescoin);
    let a = run(
        &mut c,
        &[
            ("a", 2 * CPU, CPU / 5, CPU / 2),
            ("b", 2 * CPU, CPU / 5, CPU / 2),
        ],
        5,
    );
    assert!(a.iter().all(|x| !x.contended && x.rate == Rate(2 * CPU)));
}

#[test]
fn three_busy_vms_get_their_baselines_and_share_the_rest_on_two_cpus() {
    // Baselines 80/40/20 % of one CPU, all with credits (grant = 2 CPUs), all busy.
    let mut c = Contention::new(cpus(2), SpareRule::Rescoin);
    let vms = [
        ("a", 2 * CPU, 800_000, 2 * CPU),
        ("b", 2 * CPU, 400_000, 2 * CPU),
        ("c", 2 * CPU, 200_000, 2 * CPU),
    ];
    let a = run(&mut c, &vms, 30);
    let total: u64 = a.iter().map(|x| x.rate.0).sum();
    assert!(a.iter().all(|x| x.contended));
    assert_eq!(total, 2 * CPU, "{a:?}");
    for (x, v) in a.iter().zip(&vms) {
        assert!(x.rate.0 >= v.2, "{} below its baseline: {a:?}", v.0);
    }
}

#[test]
fn an_idle_vm_releases_its_share_and_gets_its_baseline_back_when_it_returns() {
    let mut c = Contention::new(cpus(2), SpareRule::Rescoin);
    let busy = [
        ("a", 2 * CPU, 800_000, 2 * CPU),
        ("b", 2 * CPU, 400_000, 2 * CPU),
        ("c", 2 * CPU, 200_000, 2 * CPU),
    ];
    run(&mut c, &busy, 10);
    let mut idle = busy;
    idle[0].3 = 0;
    let a = run(&mut c, &idle, 4);
    assert!(a[0].estimate.0 < 30_000, "{a:?}");
    assert_eq!(a[0].rate.0, 800_000, "keeps its baseline as a cap");
    assert_eq!(a[1].rate.0 + a[2].rate.0, 2 * CPU - a[0].estimate.0);
    let a = run(&mut c, &busy, 2);
    assert!(a[0].rate.0 >= 800_000, "{a:?}");
}

#[test]
fn baselines_beyond_the_capacity_are_scaled_down_in_proportion() {
    let mut c = Contention::new(cpus(1), SpareRule::Rescoin);
    let a = run(
        &mut c,
        &[("a", 2 * CPU, CPU, 2 * CPU), ("b", 2 * CPU, CPU, 2 * CPU)],
        5,
    );
    assert_eq!(a[0].rate.0 + a[1].rate.0, CPU);
    assert!(a[0].rate.0.abs_diff(a[1].rate.0) <= 1);
}

#[test]
fn the_spare_follows_the_magnitude_of_the_accumulated_credit() {
    let mut c = Contention::new(cpus(2), SpareRule::Rescoin);
    // Seed the window: a saved (used 0 of 1 CPU), b overran (used 2 of 0.5).
    let o = [
        ("a", obs(2 * CPU, CPU, 0)),
        ("b", obs(2 * CPU, CPU / 2, 2 * CPU)),
    ];
    c.period(&o);
    let held = [
        ("a", obs(2 * CPU, CPU, 2 * CPU)),
        ("b", obs(2 * CPU, CPU / 2, 2 * CPU)),
    ];
    let a = c.period(&held);
    // The window: a saved 1 CPU then overran by 1 (ac 0); b overran by 1.5 twice.
    assert_eq!(a[0].credit, 0);
    assert_eq!(a[1].credit, -3_000_000);
    // Guarantees 1 + 0.5, spare 0.5 all to b (a's |ac| is 0).
    assert_eq!(a[0].rate.0, CPU);
    assert_eq!(a[1].rate.0, CPU);
}

#[test]
fn busy_vms_that_the_host_starves_are_seen_as_contended() {
    // No caps yet; each ran 2/3 of a CPU and waited 4/3 on a run queue.
    let mut c = Contention::new(cpus(2), SpareRule::Rescoin);
    let o = |base| obs_waited(2 * CPU, base, 666_667, 1_333_333);
    let a = c.period(&[("a", o(800_000)), ("b", o(400_000)), ("c", o(200_000))]);
    assert!(
        a.iter().all(|x| x.contended && x.observed == Rate(2 * CPU)),
        "{a:?}"
    );
    assert!(a[0].rate.0 >= 800_000);
}

fn obs_waited(grant: u64, baseline: u64, used: u64, waited: u64) -> Observed {
    Observed {
        waited: Rate(waited),
        ..obs(grant, baseline, used)
    }
}

#[test]
fn disk_bandwidth_is_shared_by_the_same_rule_in_bytes_per_second() {
    // 60 MB/s shared; templates 2:1 (40 and 20 MB/s); both read as fast as they may.
    const MB: u64 = 1_000_000;
    let mut c = Contention::new(Bps(60 * MB), SpareRule::Rescoin);
    let mut caps = [60 * MB, 60 * MB];
    let mut a = Vec::new();
    for _ in 0..20 {
        let o = [
            (
                "a",
                Observed {
                    grant: Bps(60 * MB),
                    baseline: Bps(40 * MB),
                    used: Bps(caps[0].min(900 * MB)),
                    waited: Bps(0),
                },
            ),
            (
                "b",
                Observed {
                    grant: Bps(60 * MB),
                    baseline: Bps(20 * MB),
                    used: Bps(caps[1].min(900 * MB)),
                    waited: Bps(0),
                },
            ),
        ];
        a = c.period(&o);
        caps = [a[0].rate.0, a[1].rate.0];
    }
    assert!(a.iter().all(|x| x.contended));
    assert_eq!((a[0].rate, a[1].rate), (Bps(40 * MB), Bps(20 * MB)));
}

#[test]
fn jain_is_one_for_equal_shares() {
    assert!((jain(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
    assert!((jain(&[1.0, 0.0]) - 0.5).abs() < 1e-12);
}

proptest! {
    #[test]
    fn allocations_fit_the_host_respect_grants_and_guarantee_baselines(
        capacity in 1u32..8,
        vms in prop::collection::vec((1u64..8, 1u64..100, 0u64..101, 0u64..101), 1..12),
        periods in 1usize..15,
        rule in rules(),
    ) {
        // (vcpus, baseline %, credits-or-not as grant % of full, demand % of full)
        let cap = u64::from(capacity) * CPU;
        let spec: Vec<(String, u64, u64, u64)> = vms
            .iter()
            .enumerate()
            .map(|(i, &(v, b, g, d))| {
                let full = v * CPU;
                let base = full * b / 100;
                let grant = (full * g / 100).max(base);
                (format!("vm{i}"), grant, base, full * d / 100)
            })
            .collect();
        let named: Vec<(&str, u64, u64, u64)> =
            spec.iter().map(|(n, g, b, d)| (n.as_str(), *g, *b, *d)).collect();
        let mut c = Contention::new(Rate(cap), rule);
        let a = run(&mut c, &named, periods);
        let sum_base: u64 = named.iter().map(|v| v.2.min(v.1)).sum();
        for (x, v) in a.iter().zip(&named) {
            prop_assert!(x.rate.0 <= v.1, "above its grant");
            if !x.contended {
                prop_assert_eq!(x.rate.0, v.1);
            } else if sum_base <= cap {
                // Every VM at least min(estimate, baseline).
                prop_assert!(x.rate.0 >= x.estimate.0.min(v.2).min(v.1), "{:?} {:?}", x, v);
            }
        }
        if a.iter().any(|x| x.contended) {
            // What the plan counts (hungry: allocation; others: their estimate) fits, and
            // is the whole capacity unless every hungry VM is at its grant.
            let counted: u64 = a
                .iter()
                .zip(&named)
                .map(|(x, v)| {
                    let g = x.estimate.0.min(v.2).min(v.1);
                    if x.estimate.0 > g && v.1 > g { x.rate.0 } else { x.estimate.0.min(x.rate.0) }
                })
                .sum();
            let all_capped = a.iter().zip(&named).all(|(x, v)| {
                let g = x.estimate.0.min(v.2).min(v.1);
                !(x.estimate.0 > g && v.1 > g) || x.rate.0 == v.1
            });
            prop_assert!(counted <= cap + named.len() as u64, "{counted} > {cap}");
            if sum_base <= cap && !all_capped {
                prop_assert!(counted + named.len() as u64 >= cap, "idle capacity: {counted} < {cap}");
            }
        }
    }
}

/// Any spare rule.
pub(super) fn rules() -> impl Strategy<Value = SpareRule> {
    prop::sample::select(SpareRule::ALL.to_vec())
}
