//! The centralized agent against the model running time (`model/time.rs`).

use super::*;
use crate::contention::{busy_split, Entitlement, SpareRule};
use crate::credit::{Baseline, Credits, Ledger, Policy, Rate};
use crate::ghost::agent::GhostAgent;
use crate::sched::Config;
use model::time::{drive, Drive, Machine, Work};

const SEC: u64 = 1_000_000_000;

/// An enclave on CPU 0 (the global agent's) and `n` managed CPUs 1..=n, agents on all.
fn agent_enclave(s: &Setup, n: u32) -> Enclave<'_> {
    let e = s.fs.create_enclave(1).unwrap();
    let cpus: Vec<u32> = (0..=n).collect();
    e.set_cpus(&cpus).unwrap();
    e
}

fn become_agents(e: &Enclave<'_>, q: &Queue, n: u32) {
    for c in 0..=n {
        e.become_agent(c, q.fd()).unwrap();
    }
}

fn managed(n: u32) -> Vec<u32> {
    (1..=n).collect()
}

/// What the planner entitles a VM to under the default rule.
fn headroom(grant: Rate, baseline: Rate) -> Entitlement {
    SpareRule::Headroom.entitlement(grant, baseline).unwrap()
}

/// Registers VMs of `vcpus` busy threads each (tids from 1000 × (vm + 1)); their gtids.
fn add_vms(
    agent: &mut GhostAgent<'_>,
    m: &mut Machine,
    vms: &[(u32, Rate, Rate)],
) -> Vec<Vec<u64>> {
    let mut all = Vec::new();
    for (i, &(vcpus, grant, baseline)) in vms.iter().enumerate() {
        let tids: Vec<u32> = (0..vcpus).map(|v| 1000 * (i as u32 + 1) + v).collect();
        agent
            .add_vm(i as u32, &tids, headroom(grant, baseline))
            .unwrap();
        let gtids: Vec<u64> = tids.iter().map(|&t| Model::gtid(t)).collect();
        for &g in &gtids {
            m.set_work(g, Work::BUSY);
        }
        all.push(gtids);
    }
    all
}

fn rate(m: &Machine, gtids: &[u64], ns: u64) -> f64 {
    gtids
        .iter()
        .map(|g| m.used.get(g).copied().unwrap_or(0))
        .sum::<u64>() as f64
        / ns as f64
}

#[test]
fn two_busy_vcpus_are_held_to_20_percent_for_60_simulated_seconds() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    let vms = add_vms(&mut agent, &mut m, &[(2, Rate(200_000), Rate(200_000))]);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, 60 * SEC, &mut d).unwrap();
    let r = rate(&m, &vms[0], 60 * SEC);
    eprintln!(
        "two busy vCPUs at a 20 % grant: {:.3} % of a CPU",
        r * 100.0
    );
    assert!((r - 0.20).abs() <= 0.005, "{r}");
}

/// The one-rule scenarios (tests/contention.rs runs them under cgroup v1, v2 and sched_ext):
/// three busy 2-vCPU VMs at 80/40/20 % of one CPU on two CPUs, all with credits or the small
/// one without, under each history-free rule, 30 simulated seconds. Each gets its baseline and
/// what the planner predicts for the same rule. Measured, points from the prediction (big /
/// mid / small): headroom 0.38 / 1.03 / 0.65 with credits, 1.19 / 1.39 / 0.20 without;
/// baseline 0.01 / 0.01 / 0.00 and 0.29 / 0.49 / 0.20. Slices are indivisible (5 ms, 5 points
/// of a CPU a period each): the scheduler's property tests allow a slice per vCPU; 1.5 here.
#[test]
fn the_one_rule_scenarios_split_as_the_planner_predicts_on_two_cpus() {
    let full = Rate(2_000_000);
    let scenarios = [
        ("with credits", [full, full, full]),
        ("the small VM without", [full, full, Rate(200_000)]),
    ];
    for rule in [SpareRule::Headroom, SpareRule::Baseline] {
        for (what, grants) in scenarios {
            let s = setup(&[91]);
            let e = agent_enclave(&s, 2);
            let mut agent =
                GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
            become_agents(&e, agent.queue(), 2);
            let mut m = Machine::new(&s.model, e.id());
            let bases = [Rate(800_000), Rate(400_000), Rate(200_000)];
            let spec: Vec<(u32, Rate, Rate)> =
                grants.iter().zip(bases).map(|(&g, b)| (2, g, b)).collect();
            let vms = add_vms(&mut agent, &mut m, &spec);
            for (i, (&g, b)) in grants.iter().zip(bases).enumerate() {
                agent.entitle(i as u32, rule.entitlement(g, b).unwrap());
            }
            let mut d = Drive::default();
            drive(&mut m, &mut agent, 30 * SEC, &mut d).unwrap();
            let fleet: Vec<(Rate, Rate)> = grants.iter().copied().zip(bases).collect();
            let predicted = busy_split(crate::contention::cpus(2), rule, &fleet);
            let got: Vec<f64> = vms.iter().map(|g| rate(&m, g, 30 * SEC) * 100.0).collect();
            let want: Vec<f64> = predicted.iter().map(|r| r.0 as f64 / 1e4).collect();
            eprintln!("ghOSt model, {rule}, {what}: {got:.2?} % of a CPU; predicted {want:.2?}");
            for i in 0..3 {
                assert!(
                    got[i] >= bases[i].0 as f64 / 1e4 - 1.0,
                    "{rule} {what}: VM {i}"
                );
                assert!(
                    (got[i] - want[i]).abs() <= 1.5,
                    "{rule} {what}: VM {i}: {got:.2?} against {want:.2?}"
                );
            }
            let total: f64 = got.iter().sum();
            assert!(total > 199.0, "work-conserving: {total}");
        }
    }
}

#[test]
fn burst_then_decline_to_the_baseline_with_the_ledger() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    let policy = Policy::new(2, Baseline::from_percent(10.0).unwrap())
        .unwrap()
        .with_decline_minutes(0.5)
        .unwrap();
    let full = policy.full_rate();
    let base = policy.baseline_rate();
    // Enough credit for 20 s at full speed plus the 30-s decline.
    let mut ledger = Ledger::new(policy, Credits::from_credits(1.0).unwrap());
    let vms = add_vms(&mut agent, &mut m, &[(2, full, base)]);
    let tick = SEC / 5;
    let mut d = Drive::default();
    let mut last_used = 0;
    let mut rates = Vec::new();
    for k in 1..=(120 * SEC / tick) {
        drive(&mut m, &mut agent, k * tick, &mut d).unwrap();
        let used: u64 = vms[0]
            .iter()
            .map(|g| m.used.get(g).copied().unwrap_or(0))
            .sum();
        let grant = ledger.tick(tick, used - last_used);
        rates.push((used - last_used) as f64 / tick as f64);
        last_used = used;
        agent.entitle(0, headroom(grant.rate, base));
    }
    let first: f64 = rates[..25].iter().sum::<f64>() / 25.0;
    let last: f64 = rates[rates.len() - 50..].iter().sum::<f64>() / 50.0;
    eprintln!(
        "burst {:.1} %, after the decline {:.2} % of a CPU",
        first * 100.0,
        last * 100.0
    );
    assert!(first > 1.95, "burst at full speed: {first}");
    assert!((last - 0.2).abs() < 0.005, "held to the baseline: {last}");
    // The decline is smooth: no step between ticks larger than 2 % of the full rate.
    let steps = rates
        .windows(10)
        .map(|w| w.iter().sum::<f64>() / 10.0)
        .collect::<Vec<_>>();
    assert!(
        steps.windows(2).all(|w| (w[0] - w[1]).abs() < 0.1),
        "{steps:?}"
    );
}

#[test]
fn threads_pinned_by_the_operator_run_only_on_their_cpus_and_the_caps_hold() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    // Two VMs of two busy vCPUs, each granted one CPU of the two.
    let one = Rate(1_000_000);
    let vms = add_vms(&mut agent, &mut m, &[(2, one, one), (2, one, one)]);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, 2 * SEC, &mut d).unwrap();
    // `taskset` / `virsh vcpupin`: a vCPU of each VM to one CPU, the other VM's to the other.
    let pins = [(vms[0][0], 2), (vms[1][0], 1)];
    for &(g, cpu) in &pins {
        m.set_affinity(g, &[cpu]);
    }
    let on = |m: &Machine, g: u64, cpu: u32| m.used_on.get(&(g, cpu)).copied().unwrap_or(0);
    let before: Vec<(u64, u64)> = pins
        .iter()
        .map(|&(g, cpu)| (on(&m, g, 3 - cpu), m.used.get(&g).copied().unwrap_or(0)))
        .collect();
    let used = |m: &Machine, vm: usize| -> u64 { vms[vm].iter().map(|g| m.used[g]).sum() };
    let vm_before = [used(&m, 0), used(&m, 1)];
    drive(&mut m, &mut agent, 12 * SEC, &mut d).unwrap();
    // The kernel would have run a pinned thread wherever it was committed.
    assert_eq!(s.model.runs_outside_affinity(e.id()), 0, "a pin broken");
    for (&(g, cpu), &(elsewhere, ran)) in pins.iter().zip(&before) {
        assert_eq!(
            on(&m, g, 3 - cpu),
            elsewhere,
            "thread {g:#x} ran off CPU {cpu}"
        );
        let share = (m.used[&g] - ran) as f64 / (10 * SEC) as f64;
        eprintln!("thread pinned to CPU {cpu}: {:.1} % of it", share * 100.0);
        assert!(share > 0.3, "{share}");
    }
    for (vm, b) in vm_before.iter().enumerate() {
        let r = (used(&m, vm) - b) as f64 / (10 * SEC) as f64;
        eprintln!("VM {vm} with a pinned vCPU: {:.2} CPUs for a grant of 1", r);
        assert!((r - 1.0).abs() < 0.01, "VM {vm}: {r}");
    }
    // Pinned to CPU 0, the global agent's, where nothing would hold it: given the agent's
    // CPUs back (the sched_ext enforcer's rule), and no pin broken meanwhile.
    let outside = vms[1][1];
    m.set_affinity(outside, &[0]);
    drive(&mut m, &mut agent, 14 * SEC, &mut d).unwrap();
    let k = s.model.task(e.id(), outside).unwrap();
    assert_eq!(k.allowed, Some(managed(2)), "the pin to CPU 0 replaced");
    assert_eq!(s.model.runs_outside_affinity(e.id()), 0, "a pin broken");
}

#[test]
fn a_restarted_agent_finds_every_task_and_keeps_the_cap() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut m = Machine::new(&s.model, e.id());
    let spec = [
        (2, Rate(500_000), Rate(200_000)),
        (2, Rate(300_000), Rate(100_000)),
    ];
    let vms;
    {
        let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
        become_agents(&e, agent.queue(), 2);
        vms = add_vms(&mut agent, &mut m, &spec);
        let mut d = Drive::default();
        drive(&mut m, &mut agent, 5 * SEC, &mut d).unwrap();
        // The agent process dies with tasks latched on CPUs.
    }
    s.model.agent_process_died(e.id());
    let before: Vec<u64> = vms.iter().flatten().map(|g| m.used[g]).collect();
    let sw = e.map_sw_region(0).unwrap();
    let mut agent =
        GhostAgent::restart(&e, sw, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let _online = e.agent_online().unwrap();
    for (i, &(vcpus, grant, base)) in spec.iter().enumerate() {
        let tids: Vec<u32> = (0..vcpus).map(|v| 1000 * (i as u32 + 1) + v).collect();
        agent.adopt_vm(i as u32, &tids, headroom(grant, base));
    }
    assert_eq!(agent.discover(m.now()).unwrap(), 4);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, 15 * SEC, &mut d).unwrap();
    assert_eq!(agent.tasks(), 4, "every task rediscovered");
    let after: Vec<u64> = vms.iter().flatten().map(|g| m.used[g]).collect();
    assert!(
        after.iter().zip(&before).all(|(a, b)| a > b),
        "every task ran again"
    );
    for (i, (_, grant, _)) in spec.iter().enumerate() {
        let got: u64 = vms[i].iter().map(|g| m.used[g]).sum::<u64>()
            - vms[i]
                .iter()
                .map(|g| before[vms.iter().flatten().position(|x| x == g).unwrap()])
                .sum::<u64>();
        let r = got as f64 / (10 * SEC) as f64;
        assert!(
            (r - grant.0 as f64 / 1e6).abs() < 0.01,
            "VM {i} after restart: {r}"
        );
    }
}

#[test]
fn a_task_dying_while_latched_is_forgotten_and_the_others_run_on() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    let vms = add_vms(&mut agent, &mut m, &[(3, Rate(3_000_000), Rate(300_000))]);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, SEC, &mut d).unwrap();
    let victim = (1..=2)
        .find_map(|c| m.running_on(c))
        .expect("a task is latched");
    m.kill(victim);
    drive(&mut m, &mut agent, 3 * SEC, &mut d).unwrap();
    assert_eq!(agent.tasks(), 2);
    assert!(
        s.model.task(e.id(), victim).is_none(),
        "its status word was freed"
    );
    let others: Vec<u64> = vms[0].iter().copied().filter(|&g| g != victim).collect();
    let r = rate(&m, &others, 3 * SEC);
    assert!(r > 1.2, "the two others keep both CPUs: {r}");
}

#[test]
fn a_full_queue_loses_messages_and_the_agent_recovers_from_the_status_words() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    // 16 slots hold two TASK_NEWs (7 slots each): the other six are dropped.
    let mut agent =
        GhostAgent::with_queue(&e, &managed(2), model::NCPUS, Config::default(), 16).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    let vms = add_vms(&mut agent, &mut m, &[(8, Rate(8_000_000), Rate(800_000))]);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, 2 * SEC, &mut d).unwrap();
    assert_eq!(agent.tasks(), 8, "every task found despite the overflow");
    assert!(vms[0]
        .iter()
        .all(|g| m.used.get(g).copied().unwrap_or(0) > 0));
    assert!(rate(&m, &vms[0], 2 * SEC) > 1.95, "both CPUs busy");
}

#[test]
fn with_ticks_delivered_the_agent_reads_them_and_still_holds_the_cap() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    m.deliver_ticks(1_000_000);
    let vms = add_vms(&mut agent, &mut m, &[(2, Rate(300_000), Rate(100_000))]);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, 5 * SEC, &mut d).unwrap();
    // 3 CPUs with agents × 1 000 ticks a second × 5 s.
    assert_eq!(m.ticks, 15_000);
    let r = rate(&m, &vms[0], 5 * SEC);
    assert!((r - 0.3).abs() <= 0.005, "{r}");
    // Every tick bumped its agent's barrier: CPU 1's agent barrier counts them.
    assert!(s.model.agent_barrier(e.id(), 1).unwrap() >= 5_000);
}

#[test]
fn a_yielding_task_leaves_its_cpu_and_is_run_again() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    let vms = add_vms(&mut agent, &mut m, &[(1, Rate(1_000_000), Rate(100_000))]);
    let mut d = Drive::default();
    drive(&mut m, &mut agent, SEC / 10, &mut d).unwrap();
    let g = vms[0][0];
    assert!((1..=2).any(|c| m.running_on(c) == Some(g)));
    assert!(m.yield_task(g));
    assert!((1..=2).all(|c| m.running_on(c) != Some(g)), "off its CPU");
    drive(&mut m, &mut agent, SEC / 10 + 1, &mut d).unwrap();
    assert!(
        (1..=2).any(|c| m.running_on(c) == Some(g)),
        "run again at once"
    );
    drive(&mut m, &mut agent, SEC, &mut d).unwrap();
    assert!(rate(&m, &vms[0], SEC) > 0.99);
}

#[test]
fn a_vm_that_leaves_goes_back_to_cfs_and_its_cpu_goes_to_the_others() {
    let s = setup(&[91]);
    let e = agent_enclave(&s, 2);
    let mut agent = GhostAgent::new(&e, &managed(2), model::NCPUS, Config::default()).unwrap();
    become_agents(&e, agent.queue(), 2);
    let mut m = Machine::new(&s.model, e.id());
    let vms = add_vms(
        &mut agent,
        &mut m,
        &[
            (2, Rate(2_000_000), Rate(200_000)),
            (2, Rate(2_000_000), Rate(200_000)),
        ],
    );
    let mut d = Drive::default();
    drive(&mut m, &mut agent, SEC, &mut d).unwrap();
    // Leaving: the kernel answers sched_setscheduler(SCHED_OTHER) with TASK_DEPARTED.
    let model = s.model.clone();
    let id = e.id();
    let mut moved = Vec::new();
    agent
        .remove_vm(0, |tid| {
            moved.push(tid);
            let p = abi::ghost_msg_payload_task_departed {
                gtid: Model::gtid(tid),
                ..Default::default()
            };
            model.task_event(
                id,
                Model::gtid(tid),
                abi::MSG_TASK_DEPARTED,
                as_bytes(&p),
                false,
            );
            Ok(())
        })
        .unwrap();
    moved.sort_unstable();
    assert_eq!(moved, vec![1000, 1001]);
    let before: Vec<u64> = vms[1].iter().map(|g| m.used[g]).collect();
    drive(&mut m, &mut agent, 3 * SEC, &mut d).unwrap();
    assert_eq!(agent.tasks(), 2, "the departed tasks are forgotten");
    assert!(
        vms[0].iter().all(|&g| s.model.task(id, g).is_none()),
        "status words freed"
    );
    let got: u64 = vms[1].iter().zip(&before).map(|(g, b)| m.used[g] - b).sum();
    assert!(
        got as f64 / (2 * SEC) as f64 > 1.95,
        "the other VM has both CPUs"
    );
}
