//! The centralized ghOSt agent at scale, against the kernel model running simulated time:
//! 100 VMs of 2 vCPUs on 16 managed CPUs (plus the global agent's CPU). Half the VMs have
//! credits (grant = full rate), half are held to their baseline; vCPUs alternate bursts and
//! sleeps, a fifth of them are always busy. Reports the agent's wall-clock decision time per
//! message (median, p90, p99), and what the VMs received against their baselines and grants.
//!
//! `cargo run --release --features ghost-model --example ghost_model [SECONDS]`

use burst_qemu::contention::SpareRule;
use burst_qemu::credit::Rate;
use burst_qemu::ghost::agent::GhostAgent;
use burst_qemu::ghost::model::time::{drive, Drive, Machine, Work};
use burst_qemu::ghost::model::{Model, NCPUS};
use burst_qemu::ghost::Ghostfs;
use burst_qemu::sched::Config;

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("burst-qemu-ghost-model-{}", std::process::id()));
    let root = dir.join("ghost");
    let model = Model::new(&root, &[91]);
    let fs = Ghostfs::new(&root, Box::new(model.clone()));
    let e = fs.create_enclave(1)?;
    let cpus: Vec<u32> = (0..=16).collect();
    e.set_cpus(&cpus)?;
    let mut agent = GhostAgent::new(&e, &cpus[1..], NCPUS, Config::default())?;
    for &c in &cpus {
        e.become_agent(c, agent.queue().fd())?;
    }
    let mut m = Machine::new(&model, e.id());
    let base = Rate(100_000); // 2 vCPUs × 5 %
    let mut vms = Vec::new();
    for vm in 0..100u32 {
        let grant = if vm.is_multiple_of(2) {
            Rate(2_000_000)
        } else {
            base
        };
        let tids: Vec<u32> = (0..2).map(|v| 10_000 + 10 * vm + v).collect();
        let entitled = SpareRule::Headroom
            .entitlement(grant, base)
            .expect("a history-free rule");
        agent.add_vm(vm, &tids, entitled)?;
        for (v, &t) in tids.iter().enumerate() {
            let work = if (vm + v as u32).is_multiple_of(5) {
                Work::BUSY
            } else {
                Work {
                    run: (1 + u64::from(vm % 7)) * MS,
                    sleep: (3 + u64::from(vm % 11)) * MS,
                }
            };
            m.set_work(Model::gtid(t), work);
        }
        vms.push((grant, tids));
    }
    let mut d = Drive::default();
    let wall = std::time::Instant::now();
    drive(&mut m, &mut agent, seconds * SEC, &mut d)?;
    let wall = wall.elapsed();
    let mut t = d.per_message_ns.clone();
    t.sort_unstable();
    let messages: usize = t.len();
    println!(
        "100 VMs × 2 vCPUs on 16 simulated CPUs, {seconds} s simulated in {:.1} s wall",
        wall.as_secs_f64()
    );
    println!(
        "agent steps {}, steps with messages {messages}, failed transactions {}",
        d.steps, d.failed
    );
    if !t.is_empty() {
        println!(
            "decision time per message: median {:.2} µs, p90 {:.2} µs, p99 {:.2} µs",
            percentile(&t, 0.5) as f64 / 1e3,
            percentile(&t, 0.9) as f64 / 1e3,
            percentile(&t, 0.99) as f64 / 1e3
        );
    }
    let mut total = 0.0;
    let mut worst_base = f64::MAX;
    let mut over_grant = 0;
    for (grant, tids) in &vms {
        let used: u64 = tids
            .iter()
            .map(|&t| m.used.get(&Model::gtid(t)).copied().unwrap_or(0))
            .sum();
        let rate = used as f64 / (seconds * SEC) as f64;
        total += rate;
        worst_base = worst_base.min(rate / (base.0 as f64 / 1e6));
        if rate > grant.0 as f64 / 1e6 + 1e-3 {
            over_grant += 1;
        }
    }
    println!(
        "CPU used {total:.2} of 16; lowest VM at {:.2}× its baseline (demand may be lower); VMs over their grant: {over_grant}",
        worst_base
    );
    drop(agent);
    drop(e);
    std::fs::remove_dir_all(&dir)?;
    anyhow::ensure!(over_grant == 0, "{over_grant} VMs ran above their grant");
    anyhow::ensure!(
        total > 15.5,
        "the CPUs were left idle: {total:.2} of 16 used"
    );
    Ok(())
}
