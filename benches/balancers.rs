//! The fleet balancers' pure planners at 100, 500 and 1 000 VMs (issue 22: "the pinning
//! balancer and the memory coordinator checked at the same counts"; docs/scale.md).
//!
//! `cargo bench --bench balancers`; criterion prints the median time of one plan. Both planners
//! run once per interval (2 s by default), on the agent's balancer and memory threads, so a
//! plan of `t` ms costs `t / 20` % of a core.
//!
//! The fleet is the dense host of the issue: 2-vCPU VMs on a 64-CPU host, most of them idle
//! (1–5 % per vCPU), one in ten busy (30–100 %). The pinning planner is timed three ways:
//! - `first`: every vCPU floats (a fresh fleet): a forced plan from scratch;
//! - `steady`: every vCPU pinned where the first plan put it, demands unchanged: nothing to do;
//! - `shift`: pinned as planned, then one VM in ten changes its demand: a re-plan.
//!
//! The memory coordinator's planner is timed with each policy (`thresholds`, `idle-tax`,
//! `rescoin`) over VMs of 512–2 048 MiB ballooned to three quarters of that and using 40–95 %
//! of what they hold, on a host that can give each 32 MiB more.

use burst_qemu::balance::cpu::{self, Decision, Params, Placement, Vcpu};
use burst_qemu::balance::mem::{self, Policy, Settings, Stats, Vm};
use burst_qemu::balance::mem_rescoin::Rescoin;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const CPUS: u32 = 64;
const SIZES: [usize; 3] = [100, 500, 1000];

/// A deterministic spread in [0, 1) for index `i` and stream `k` (no random crate, the same
/// fleet every run).
fn spread(i: usize, k: u64) -> f64 {
    let mut x = (i as u64 + 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(k.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    (x % 1_000_000) as f64 / 1_000_000.0
}

fn demand(vm: usize, vcpu: usize, k: u64) -> f64 {
    let r = spread(2 * vm + vcpu, k);
    if vm.is_multiple_of(10) {
        0.3 + 0.7 * r
    } else {
        0.01 + 0.04 * r
    }
}

fn floating(vms: usize) -> Vec<Vcpu> {
    (0..vms * 2)
        .map(|i| Vcpu {
            demand: demand(i / 2, i % 2, 1),
            now: Placement::Floating {
                last: (i as u32) % CPUS,
            },
            allowed: Vec::new(),
        })
        .collect()
}

fn pinned(from: &[Vcpu], pins: &[u32]) -> Vec<Vcpu> {
    from.iter()
        .zip(pins)
        .map(|(v, &c)| Vcpu {
            now: Placement::Pinned(c),
            ..v.clone()
        })
        .collect()
}

fn pinning(c: &mut Criterion) {
    let cpus: Vec<u32> = (0..CPUS).collect();
    let p = Params::default();
    let mut g = c.benchmark_group("pinning plan");
    g.sample_size(10);
    for vms in SIZES {
        let first = floating(vms);
        let Decision::Apply(plan) = cpu::plan(&cpus, &first, &p) else {
            panic!("a floating fleet is always pinned");
        };
        let steady = pinned(&first, &plan.pins);
        assert!(
            matches!(cpu::plan(&cpus, &steady, &p), Decision::Keep(_)),
            "the plan is a fixed point"
        );
        let mut shift = steady.clone();
        for (i, v) in shift.iter_mut().enumerate() {
            if (i / 2) % 10 == 5 {
                v.demand = demand(i / 2, i % 2, 2).max(0.5);
            }
        }
        eprintln!(
            "{vms} VMs: first plan σ {:.3} → {:.3} CPUs, {} pins; after the shift: {}",
            plan.before.sigma,
            plan.after.sigma,
            plan.changes,
            match cpu::plan(&cpus, &shift, &p) {
                Decision::Apply(p) => format!(
                    "{} moves, σ {:.3} → {:.3}",
                    p.changes, p.before.sigma, p.after.sigma
                ),
                Decision::Keep(s) => format!("kept, σ {:.3}", s.sigma),
            }
        );
        for (case, input) in [("first", &first), ("steady", &steady), ("shift", &shift)] {
            g.bench_with_input(BenchmarkId::new(case, vms), input, |b, v| {
                b.iter(|| cpu::plan(&cpus, v, &p))
            });
        }
    }
    g.finish();
}

fn memory_fleet(vms: usize) -> Vec<Vm> {
    (0..vms)
        .map(|i| {
            let size: u64 = 512 << (i % 3);
            // Ballooned to three quarters of its size, using 40–95 % of what it holds.
            let actual = size * 3 / 4;
            let used = (actual as f64 * (0.4 + 0.55 * spread(i, 3))) as u64;
            let available = actual - used;
            Vm {
                name: format!("vm{i}"),
                floor: 256,
                ceiling: size,
                shares: 1000 * (1 + (i % 4) as u64),
                actual,
                stats: Some(Stats {
                    free: available / 2,
                    available,
                    total: actual,
                }),
                used_before: Some(used.saturating_sub((spread(i, 4) * 64.0) as u64)),
                active: spread(i, 5),
            }
        })
        .collect()
}

fn memory(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory plan");
    for vms in SIZES {
        let fleet = memory_fleet(vms);
        // A host that can give each VM 32 MiB more: not all the needy ones can grow.
        let host = 200 + 32 * vms as u64;
        for policy in [Policy::Thresholds, Policy::IdleTax] {
            let s = Settings {
                policy,
                ..Settings::default()
            };
            eprintln!(
                "{vms} VMs, {policy}: {} targets",
                mem::plan(&s, &fleet, host).len()
            );
            g.bench_with_input(BenchmarkId::new(policy.to_string(), vms), &fleet, |b, f| {
                b.iter(|| mem::plan(&s, f, host))
            });
        }
        let s = Settings {
            policy: Policy::Rescoin,
            ..Settings::default()
        };
        // ResCoin keeps a history: each iteration is one more period of the same planner.
        let mut rescoin = Rescoin::default();
        eprintln!(
            "{vms} VMs, rescoin: {} targets",
            rescoin.plan(&s, &fleet, host).0.len()
        );
        g.bench_with_input(BenchmarkId::new("rescoin", vms), &fleet, |b, f| {
            b.iter(|| rescoin.plan(&s, f, host))
        });
    }
    g.finish();
}

criterion_group!(benches, pinning, memory);
criterion_main!(benches);
