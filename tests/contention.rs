//! The contention stage on real QEMU, the real agent and real cgroups: an overcommitted host
//! gives every VM its baseline, the stage plans what its default spare rule (`headroom`)
//! predicts, and the kernel delivers the plan. Runs in the `qemu` test group (one at a time):
//! it measures CPU shares on this machine's CPUs.

mod common;

use std::time::Duration;

use burst_qemu::contention::{busy_split, SpareRule};
use burst_qemu::credit::{Rate, PPM_PER_CPU};
use burst_qemu::testguest::Behaviour::Busy;
use common::*;
use serde_json::Value;

#[test]
fn three_busy_vms_on_an_overcommitted_host_each_get_their_baseline_and_the_plan() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let s = Scratch::new();
    // 80, 40 and 20 % of one CPU; all with credits, so each may use its two vCPUs in full.
    let spec = [("big", "40"), ("mid", "20"), ("small", "10")];
    let mut qemu = s.qemu_args(Busy);
    qemu.push("-S".into());
    // Three 2-vCPU guests want 6 CPUs: on up to 5 CPUs the host is contended. The agent
    // (started by the first launcher, inheriting this environment) shares 2 CPUs' worth at
    // most, so the test means the same on a bigger machine. The only test in this binary.
    // In a nested guest (tests/cgroup_v2.rs) the guest kernel, the agent and QEMU's own
    // threads take a tenth of the two emulated CPUs: the VMs share 1.8.
    let capacity = if nested_guest() {
        1.8
    } else {
        cpus.min(2) as f64
    };
    std::env::set_var("BURST_QEMU_CAPACITY", capacity.to_string());
    let vms: Vec<Launched> = spec
        .iter()
        .map(|(name, baseline)| {
            let vm = Launched::start(
                &s,
                name,
                &["--vcpus", "2", "--baseline", baseline, "--credits", "500"],
                &qemu,
            );
            view(&s, name);
            vm
        })
        .collect();
    for (name, _) in spec {
        assert!(s.cli(&["resume", name]).status.success());
    }
    let resumed = std::time::Instant::now();
    // Until the stage has engaged and settled: every VM has an allocation and the plan moved
    // by less than a point over the last 2 s (its estimates move by α = 0.7 a period; was a
    // fixed 12 s).
    let plan_now = || -> Option<Vec<f64>> {
        spec.iter()
            .map(|(n, _)| view(&s, n)["allocation_pct"].as_f64().map(|a| a * 2.0))
            .collect()
    };
    let mut history: Vec<(std::time::Instant, Vec<f64>)> = Vec::new();
    let settled = wait_until("the plan settled", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(200));
        let Some(p) = plan_now() else { return false };
        let now = std::time::Instant::now();
        history.push((now, p.clone()));
        let old: Vec<&Vec<f64>> = history
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= Duration::from_secs(2))
            .map(|(_, p)| p)
            .collect();
        history
            .first()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(2))
            && old
                .iter()
                .all(|o| o.iter().zip(&p).all(|(a, b)| (a - b).abs() < 1.0))
    });
    eprintln!("the plan settled {settled:?} after the resume");
    // And not before the fleet's start-up has passed: under `headroom` the plan settles within
    // about 3 s, and windows starting then missed the plan by up to 7 points (and in two runs
    // every VM by half) in 4 of 6 runs, while the example's windows after 12 s were within 1.1
    // points in 4 of 4 (ResCoin's plan took 18 s to settle, so its windows always started late).
    std::thread::sleep(Duration::from_secs(10).saturating_sub(resumed.elapsed()));
    // One measurement window for all three, read in this process at both ends.
    let threads: Vec<(u32, Vec<u32>)> = vms
        .iter()
        .map(|v| (v.record.pid, v.record.vcpu_tids.clone()))
        .collect();
    let before: Vec<u64> = threads
        .iter()
        .map(|(p, t)| t.iter().map(|&t| thread_cpu_ns(*p, t)).sum())
        .collect();
    // The plan moves a little from period to period: compare with its mean over the window.
    let start = std::time::Instant::now();
    let mut plans = Vec::new();
    while start.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(500));
        plans.push(
            spec.iter()
                .map(|(n, _)| view(&s, n)["allocation_pct"].as_f64().unwrap() * 2.0)
                .collect::<Vec<f64>>(),
        );
    }
    let ns = start.elapsed().as_nanos() as f64;
    let delivered: Vec<f64> = threads
        .iter()
        .zip(&before)
        .map(|((p, t), b)| {
            let a: u64 = t.iter().map(|&t| thread_cpu_ns(*p, t)).sum();
            (a - b) as f64 * 100.0 / ns
        })
        .collect();
    let plan: Vec<f64> = (0..spec.len())
        .map(|i| plans.iter().map(|p| p[i]).sum::<f64>() / plans.len() as f64)
        .collect();
    // What the planner predicts for busy VMs under the default spare rule (`headroom`: the
    // spare by grant − baseline; all three have credits, so each grant is its 2 vCPUs).
    let predicted: Vec<f64> = busy_split(
        Rate((capacity * PPM_PER_CPU as f64).round() as u64),
        SpareRule::default(),
        &spec.map(|(_, b)| {
            (
                Rate(2 * PPM_PER_CPU),
                Rate(b.parse::<u64>().unwrap() * 20_000),
            )
        }),
    )
    .iter()
    .map(|r| r.0 as f64 / 10_000.0)
    .collect();
    eprintln!(
        "delivered {delivered:.2?} % of one CPU; planned {plan:.2?}; predicted {predicted:.2?}"
    );
    for ((name, baseline), (d, p)) in spec.iter().zip(delivered.iter().zip(&plan)) {
        let baseline: f64 = baseline.parse::<f64>().unwrap() * 2.0;
        assert!(
            *d >= baseline - 1.0,
            "{name} got {d:.2} % of one CPU, below its baseline {baseline}"
        );
        // Measured under headroom, points below the plan (big / mid / small): 0.49 / 2.18 /
        // 0.93 and 0.76 / 1.35 / 1.20 with the window at 3 s, 1.06 / 3.50 / 1.91 and 0.36 /
        // 2.20 / 0.74 with it at 10 s. The host's own CPU (agent, QEMU's other threads, this
        // test) is not in the plan, and the kernel takes most of it from the mid VM; 3 points
        // (the bound under ResCoin, whose run measured 1.33 / 0.44 / 1.12) failed one run.
        assert!(
            (d - p).abs() <= 4.0,
            "{name}: delivered {d:.2}, planned {p:.2}"
        );
    }
    // The stage plans what the rule predicts: measured on the 2-core host (cgroup v1), seven
    // runs, planned 95.66 / 60.86 / 43.48 against 95.65 / 60.87 / 43.48 (0.01 apart; the bound
    // leaves a point for the plan's mean over a window that starts as it settles).
    for ((name, _), (p, want)) in spec.iter().zip(plan.iter().zip(&predicted)) {
        assert!(
            (p - want).abs() <= 1.0,
            "{name}: planned {p:.2}, the rule predicts {want:.2}"
        );
    }
    let total: f64 = plan.iter().sum();
    assert!(
        (total - capacity * 100.0).abs() <= 1.0,
        "the plan shares {capacity} CPUs: {total:.2}"
    );
    // Visible: ls shows the allocation beside the grant.
    let ls: Vec<Value> = serde_json::from_slice(&s.cli(&["ls", "--json"]).stdout).unwrap();
    assert!(ls
        .iter()
        .all(|v| v["allocation_pct"].is_number() && v["grant_pct"].is_number()));
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(text.contains("ALLOC"), "{text}");
}
