//! One ledger tick over 100 000 VMs (goal: under 10 ms here).
//!
//! `cargo bench --bench ledger_tick`; criterion prints the median time of one iteration, which
//! ticks every VM once. The VMs are a mix: sizes 1–8 vCPUs, baselines 5–40 %, both modes, and
//! balances spread from 0 through the decline zone to the cap, so the sqrt path of the decline
//! planner is exercised as well as the fast paths.

use burst_qemu::credit::{Baseline, Credits, Ledger, Mode, Policy, NS_PER_CREDIT, NS_PER_SEC};
use criterion::{criterion_group, criterion_main, Criterion};

const VMS: usize = 100_000;

fn fleet() -> Vec<Ledger> {
    (0..VMS)
        .map(|i| {
            let vcpus = 1 + (i % 8) as u32;
            let baseline = Baseline::from_percent(5.0 + (i % 36) as f64).unwrap();
            let mode = if i % 5 == 0 {
                Mode::Unlimited
            } else {
                Mode::Standard
            };
            let policy = Policy::new(vcpus, baseline).unwrap().with_mode(mode);
            let balance = Credits(
                (i as u64 * 7919) % (policy.max_credits().vcpu_ns() / NS_PER_CREDIT + 1)
                    * NS_PER_CREDIT,
            );
            Ledger::new(policy, balance)
        })
        .collect()
}

fn tick_all(c: &mut Criterion) {
    let mut vms = fleet();
    // Usage per VM per 1 s tick: a spread of loads from idle to every vCPU busy.
    let used: Vec<u64> = vms
        .iter()
        .enumerate()
        .map(|(i, l)| u64::from(l.policy().vcpus()) * NS_PER_SEC * (i as u64 % 11) / 10)
        .collect();
    c.bench_function("ledger tick, 100000 VMs", |b| {
        b.iter(|| {
            let mut limited = 0usize;
            for (ledger, &u) in vms.iter_mut().zip(&used) {
                limited += usize::from(ledger.tick(NS_PER_SEC, u).limited);
            }
            std::hint::black_box(limited)
        })
    });
}

criterion_group!(benches, tick_all);
criterion_main!(benches);
