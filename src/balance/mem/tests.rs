use super::*;
use proptest::prelude::*;

/// A guest in the model: the balloon reaches its target at once; the kernel keeps 40 MiB out
/// of MemTotal and uses 30 MiB; a hog uses `hog` MiB and grows toward `want` at `rate` per
/// interval while MemAvailable stays above 32 MiB (the hog program's margin).
#[derive(Clone, Debug)]
struct Guest {
    vm: Vm,
    hog: u64,
    want: u64,
    rate: u64,
    activity: Activity,
}

const KERNEL: u64 = 40;
const BASE_USE: u64 = 30;
const HOG_MARGIN: u64 = 32;

impl Guest {
    fn new(name: &str, boot: u64, start: u64) -> Self {
        let mut g = Guest {
            vm: Vm {
                name: name.into(),
                floor: 200,
                ceiling: boot,
                shares: 1000,
                actual: start,
                stats: None,
                used_before: None,
                active: 0.0,
            },
            hog: 0,
            want: 0,
            rate: 0,
            activity: Activity::default(),
        };
        g.refresh();
        g
    }

    fn refresh(&mut self) {
        let total = self.vm.actual - KERNEL;
        let used = BASE_USE + self.hog;
        let available = total.saturating_sub(used);
        self.vm.used_before = self.vm.stats.map(|st| st.used());
        self.vm.stats = Some(Stats {
            free: available,
            available,
            total,
        });
        self.vm.active = self.activity.observe(used as f64 / total as f64);
    }

    fn run_hog(&mut self) {
        let total = self.vm.actual - KERNEL;
        let room = total.saturating_sub(BASE_USE + self.hog + HOG_MARGIN);
        if self.want > self.hog {
            self.hog += self.rate.min(self.want - self.hog).min(room);
        } else {
            self.hog = self.want;
        }
    }
}

/// Runs `steps` intervals; returns each interval's actual sizes, and checks the invariants on
/// every plan.
fn run(s: &Settings, guests: &mut [Guest], host: u64, steps: usize) -> Vec<Vec<u64>> {
    let mut curve = Vec::new();
    for _ in 0..steps {
        for g in guests.iter_mut() {
            g.run_hog();
            g.refresh();
        }
        let vms: Vec<Vm> = guests.iter().map(|g| g.vm.clone()).collect();
        let held: u64 = vms.iter().map(|v| v.actual).sum();
        let targets = plan(s, &vms, host - held);
        check_invariants(s, &vms, host - held, &targets);
        for t in targets {
            let g = guests.iter_mut().find(|g| g.vm.name == t.name).unwrap();
            g.vm.actual = t.target;
        }
        curve.push(guests.iter().map(|g| g.vm.actual).collect());
    }
    curve
}

fn check_invariants(s: &Settings, vms: &[Vm], host_available: u64, targets: &[Target]) {
    let held: u64 = vms.iter().map(|v| v.actual).sum();
    let mut after = held as i64;
    for t in targets {
        let v = vms.iter().find(|v| v.name == t.name).expect("a known VM");
        let stats = v.stats.expect("only VMs with stats move");
        assert!(t.target <= v.ceiling, "{t:?} above the ceiling of {v:?}");
        assert!(
            t.target >= v.floor.min(v.ceiling),
            "{t:?} below the floor of {v:?}"
        );
        let step = t.target.abs_diff(v.actual);
        if t.target > v.actual {
            assert!(step <= s.step_up, "{t:?}: a jump from {}", v.actual);
        } else {
            assert!(step <= s.step_down, "{t:?}: a jump from {}", v.actual);
            // Never the last keep_unused of unused memory.
            assert!(
                stats.available.saturating_sub(step) >= s.keep_unused.min(stats.available),
                "{t:?} takes the last unused memory of {v:?}"
            );
        }
        after += t.target as i64 - v.actual as i64;
    }
    let grew = after - held as i64;
    let budget = host_available as i64 - s.host_reserve as i64;
    if grew > 0 {
        assert!(
            grew <= budget,
            "growth {grew} over the host's budget {budget}"
        );
        if let Some(pool) = s.pool {
            assert!(after <= pool as i64, "{after} over the pool {pool}");
        }
    }
}

#[test]
fn thresholds_one_hog_grows_to_its_max_fed_by_idle_vms_then_gives_back_in_steps() {
    let s = Settings::default();
    let mut g: Vec<Guest> = (1..=4)
        .map(|i| Guest::new(&format!("vm{i}"), 2048, 512))
        .collect();
    (g[0].want, g[0].rate) = (1900, 100);
    let curve = run(&s, &mut g, 24_000, 60);
    let peak = curve.iter().map(|c| c[0]).max().unwrap();
    assert_eq!(peak, 2048, "the hog reaches its ceiling");
    for c in &curve {
        for &idle in &c[1..] {
            assert!(idle >= 200);
        }
    }
    // Idle VMs gave memory (down to keep_unused + band), and kept ≥ 100 MiB unused.
    for idle in &g[1..] {
        assert!(idle.vm.actual < 512);
        assert!(idle.vm.stats.unwrap().available >= s.keep_unused);
    }
    // The hog frees: memory goes back in steps of at most step_down, to about the band.
    g[0].want = 0;
    let after = run(&s, &mut g, 24_000, 40);
    let mut prev = 2048;
    let mut steps = 0;
    for c in &after {
        assert!(prev - c[0].min(prev) <= s.step_down);
        if c[0] < prev {
            steps += 1;
        }
        prev = c[0];
    }
    assert!(steps >= 10, "given back in {steps} steps");
    let unused = g[0].vm.stats.unwrap().available;
    assert!(
        (100..=200).contains(&unused),
        "settles with {unused} unused"
    );
}

#[test]
fn thresholds_four_hogs_stop_at_the_pool() {
    let s = Settings {
        pool: Some(4000),
        ..Settings::default()
    };
    let mut g: Vec<Guest> = (1..=4)
        .map(|i| Guest::new(&format!("vm{i}"), 2048, 512))
        .collect();
    for h in &mut g {
        (h.want, h.rate) = (1900, 100);
    }
    let curve = run(&s, &mut g, 24_000, 60);
    let last = curve.last().unwrap();
    let sum: u64 = last.iter().sum();
    assert!(sum <= 4000 && sum >= 4000 - 4 * s.min_change, "{last:?}");
    assert!(
        last.iter().all(|a| (900..2048).contains(a)),
        "shared: {last:?}"
    );
}

#[test]
fn thresholds_keeps_the_host_reserve_and_takes_back_when_the_host_is_short() {
    let s = Settings::default();
    let mut g = [Guest::new("a", 2048, 1500), Guest::new("b", 2048, 512)];
    g[1].hog = 512 - KERNEL - BASE_USE - 50;
    g[1].refresh();
    // The host has 150 MiB free: 50 below its reserve. a gives back; b grows only by what a
    // gives beyond those 50.
    let vms: Vec<Vm> = g.iter().map(|g| g.vm.clone()).collect();
    let t = plan(&s, &vms, 150);
    check_invariants(&s, &vms, 150, &t);
    let net: i64 = t
        .iter()
        .map(|t| t.target as i64 - vms.iter().find(|v| v.name == t.name).unwrap().actual as i64)
        .sum();
    assert!(net <= -50, "{t:?}");
    // 250 MiB free: b grows, but the host keeps its reserve.
    let vms: Vec<Vm> = g.iter().map(|g| g.vm.clone()).collect();
    let t = plan(&s, &vms, 250);
    check_invariants(&s, &vms, 250, &t);
    let b = t.iter().find(|t| t.name == "b").unwrap();
    assert!(b.target > 512);
}

#[test]
fn thresholds_one_hog_stops_and_frees_while_another_grows() {
    let s = Settings {
        pool: Some(3000),
        ..Settings::default()
    };
    let mut g: Vec<Guest> = (1..=4)
        .map(|i| Guest::new(&format!("vm{i}"), 2048, 512))
        .collect();
    (g[0].want, g[0].rate) = (480, 100);
    (g[1].want, g[1].rate) = (1900, 100);
    run(&s, &mut g, 24_000, 20);
    g[0].want = 0;
    let curve = run(&s, &mut g, 24_000, 60);
    let last = curve.last().unwrap();
    assert!(last[1] >= 1900, "B reaches about its max: {last:?}");
    assert!(last[0] < 512, "A gave its memory back: {last:?}");
}

fn two_vm_split(tax: f64) -> f64 {
    let s = Settings {
        policy: Policy::IdleTax,
        tax,
        pool: Some(2000),
        ..Settings::default()
    };
    // The idle VM starts with most of the pool; the active one is hungry.
    let mut g = vec![
        Guest::new("idle", 2048, 1400),
        Guest::new("active", 2048, 600),
    ];
    (g[1].want, g[1].rate) = (1950, 100);
    let curve = run(&s, &mut g, 24_000, 120);
    let last = curve.last().unwrap();
    last[1] as f64 / (last[0] + last[1]) as f64
}

#[test]
fn idle_tax_settles_at_50_50_without_tax_and_80_20_at_75_percent() {
    let zero = two_vm_split(0.0);
    assert!((zero - 0.5).abs() <= 0.05, "τ = 0: active holds {zero:.3}");
    let taxed = two_vm_split(0.75);
    // The oracle P_a/P_i = c_i/c_a with the model's own active fractions (the idle guest uses
    // its kernel's 30 MiB, so f_i is not 0): within 5 points of 80/20.
    assert!(
        (taxed - 0.8).abs() <= 0.05,
        "τ = 75 %: active holds {taxed:.3}"
    );
}

#[test]
fn idle_tax_equilibrium_equalises_prices() {
    let s = Settings {
        policy: Policy::IdleTax,
        tax: 0.75,
        pool: Some(2000),
        ..Settings::default()
    };
    let mut g = vec![
        Guest::new("idle", 2048, 1400),
        Guest::new("active", 2048, 600),
    ];
    (g[1].want, g[1].rate) = (1950, 100);
    run(&s, &mut g, 24_000, 120);
    let p: Vec<f64> = g
        .iter()
        .map(|g| price(g.vm.shares, g.vm.actual, g.vm.active, s.tax))
        .collect();
    assert!((p[0] / p[1] - 1.0).abs() < 0.05, "prices {p:?}");
}

#[test]
fn vms_without_stats_are_left_alone() {
    let s = Settings::default();
    let mut a = Guest::new("nodriver", 2048, 2048);
    a.vm.stats = None;
    let mut b = Guest::new("hog", 2048, 300);
    b.hog = 300 - KERNEL - BASE_USE - 10;
    b.refresh();
    for policy in [Policy::Thresholds, Policy::IdleTax] {
        let s = Settings {
            policy,
            pool: Some(2348),
            ..s.clone()
        };
        let t = plan(&s, &[a.vm.clone(), b.vm.clone()], 24_000);
        assert!(t.iter().all(|t| t.name != "nodriver"), "{t:?}");
    }
}

#[test]
fn activity_rises_fast_and_falls_slowly() {
    let mut a = Activity::default();
    assert_eq!(a.observe(0.1), 0.1);
    assert!(a.observe(1.0) >= 0.55, "a rise shows at once");
    for _ in 0..30 {
        a.observe(1.0);
    }
    for _ in 0..5 {
        a.observe(0.0);
    }
    // The fast average has dropped to ~3 %; the slow one still holds most of the rise.
    assert!(a.value() > 0.5, "{}", a.value());
}

#[test]
fn policy_names_parse() {
    assert_eq!("idle-tax".parse::<Policy>().unwrap(), Policy::IdleTax);
    assert_eq!("thresholds".parse::<Policy>().unwrap(), Policy::Thresholds);
    assert!("greedy".parse::<Policy>().is_err());
}

fn arb_vm(i: usize) -> impl Strategy<Value = Vm> {
    (
        200u64..=600,
        0u64..=3000,
        prop::option::weighted(0.9, (0u64..=3000, 0u64..=3000)),
        1u64..=4000,
        0.0f64..=1.0,
        prop::option::weighted(0.8, 0u64..=3000),
    )
        .prop_map(move |(floor, extra, stats, shares, active, used_before)| {
            let ceiling = floor + extra;
            let actual = (floor + extra / 2).min(ceiling);
            Vm {
                name: format!("vm{i}"),
                floor,
                ceiling,
                shares,
                actual,
                stats: stats.map(|(a, f)| {
                    let total = actual.saturating_sub(40);
                    Stats {
                        free: f.min(total),
                        available: a.min(total),
                        total,
                    }
                }),
                used_before,
                active,
            }
        })
}

proptest! {
    #[test]
    fn every_plan_keeps_the_invariants(
        vms in (1usize..6).prop_flat_map(|n| (0..n).map(arb_vm).collect::<Vec<_>>()),
        host in 0u64..8000,
        pool in prop::option::of(500u64..12000),
        tax in 0.0f64..0.95,
        idle_tax in any::<bool>(),
    ) {
        let s = Settings {
            policy: if idle_tax { Policy::IdleTax } else { Policy::Thresholds },
            tax,
            pool,
            ..Settings::default()
        };
        let t = plan(&s, &vms, host);
        check_invariants(&s, &vms, host, &t);
    }
}

/// A recorded run (`agent --memory-trace`, thresholds, no pool): one Debian 6.1 guest running
/// `burst-qemu-memhog --rate 64 --max 900` and one idle guest, both `-m 1024` started at 384
/// MiB. Each round's recorded input, planned again, gives the targets worked out by hand below
/// from the published rules (not the targets the planner recorded) and keeps the invariants.
#[test]
fn recorded_rounds_plan_the_targets_the_published_rules_give() {
    // Defaults: a donor has unused (MemAvailable) above keep_unused 100 + hysteresis 50 = 150,
    // a use (MemTotal − MemAvailable) not above the previous round's + min_change 16 (none at
    // its first stats), and gives back min(step_down 128, unused − (100 + 50/2)); a needy VM
    // (unused below grow_below 100) grows by step_up 128 up to its ceiling (1024 here); the host
    // has ~22 GiB available, so growth is never short. Between 100 and 150 unused: no move.
    // (The recorded run shrank the hog three times while its use grew 104 → 337 MiB, then grew
    // it back: rounds 1-4 below keep it.)
    const EXPECTED: [&[(&str, u64)]; 31] = [
        &[],                            // hog unused 856 but first stats: no use known
        &[],                            // hog use 104 → 209: growing; idle: first stats
        &[("idle", 384)],               // hog use 209 → 337; idle needy (88): 256 + 128
        &[("hog", 750)],                // hog needy (93): 622 + 128; idle use 104 → 146
        &[("hog", 878), ("idle", 293)], // hog 750 + 128; idle (use 146 → 104) 335 − (167 − 125)
        &[("hog", 1006)],               // hog 878 + 128; idle unused 125: inside the band
        &[("hog", 1024)],               // hog 1006 + 128, clamped to its ceiling
        &[],                            // 8-15: hog needy but at its ceiling; idle in the band
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[("hog", 896)], // 16: the hog freed (unused 811): 1024 − 128
        &[("hog", 768)], // unused 699
        &[("hog", 640)], // 571
        &[("hog", 512)], // 443
        &[("hog", 384)], // 315
        &[("hog", 322)], // 21: unused 187: 384 − (187 − 125), less than a step
        &[],             // 22-31: both with 125 unused, in the band
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
        &[],
    ];
    let text = include_str!("traces/one-hog-two-vms.jsonl");
    let s = Settings::default();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), EXPECTED.len());
    let mut used: std::collections::HashMap<String, u64> = Default::default();
    for (round, (line, expected)) in lines.iter().zip(EXPECTED).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let mut vms: Vec<Vm> = serde_json::from_value(v["vms"].clone()).unwrap();
        // The trace predates `used_before`: the coordinator's value, the previous round's use.
        for vm in &mut vms {
            vm.used_before = used.get(&vm.name).copied();
            if let Some(st) = vm.stats {
                used.insert(vm.name.clone(), st.used());
            }
        }
        let host = v["host_available"].as_u64().unwrap();
        let planned = plan(&s, &vms, host);
        check_invariants(&s, &vms, host, &planned);
        let planned: Vec<(&str, u64)> = planned
            .iter()
            .map(|t| (t.name.as_str(), t.target))
            .collect();
        assert_eq!(planned, expected, "round {}: {line}", round + 1);
    }
}
