//! The contention stage on real QEMU, the real agent and real cgroups: an overcommitted host
//! gives every VM its baseline, the stage plans what its default spare rule (`headroom`)
//! predicts, and the kernel delivers the plan. Runs in the `qemu` test group (one at a time):
//! it measures CPU shares on this machine's CPUs.
//!
//! The same scenarios run under every enforcer (issue 20's one-rule table): here under cgroup
//! v1, in the Debian 6.12 guest under cgroup v2 (tests/cgroup_v2.rs), and in the scx-6.12 guest
//! under the sched_ext scheduler (tests/scx.rs, `BURST_QEMU_ENFORCER=scx`), whose dispatch
//! takes the planner's entitlements instead of a stage's plan: there the split is compared with
//! the rule's prediction for the CPU the VMs received in all (the guest's own work on the
//! scheduler's CPUs runs first, in the fair class, and is no part of the rule).

mod common;

use std::time::Duration;

use burst_qemu::contention::{busy_split, SpareRule};
use burst_qemu::credit::{Rate, PPM_PER_CPU};
use burst_qemu::testguest::Behaviour::Busy;
use common::*;
use serde_json::Value;

/// One VM of a scenario: name, per-vCPU baseline (%), credits.
type Spec = (&'static str, &'static str, &'static str);

/// What one run measured, % of one CPU per VM.
struct Split {
    delivered: Vec<f64>,
    /// The stage's plan (its mean over the window); `None` where the enforcer dispatches by
    /// entitlements (sched_ext) and no stage runs.
    planned: Option<Vec<f64>>,
    /// The rule's prediction for the capacity the stage shares (cgroup) or for the CPU the
    /// VMs received in all (sched_ext).
    predicted: Vec<f64>,
}

fn under_scx() -> bool {
    std::env::var("BURST_QEMU_ENFORCER").as_deref() == Ok("scx")
}

/// Three 2-vCPU busy VMs launched paused, resumed together; once the split has settled, one
/// window of 6 s read from their vCPU threads.
fn overcommit(spec: &[Spec; 3]) -> Split {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let s = Scratch::new();
    let mut qemu = s.qemu_args(Busy);
    qemu.push("-S".into());
    // Three 2-vCPU guests want 6 CPUs: on up to 5 CPUs the host is contended. The agent
    // (started by the first launcher, inheriting this environment) shares 2 CPUs' worth at
    // most, so the test means the same on a bigger machine. In a nested guest under cgroup v2
    // (tests/cgroup_v2.rs) the guest kernel, the agent and QEMU's own threads take a tenth of
    // the two emulated CPUs: the VMs share 1.8. Under sched_ext the scheduler shares out its
    // own CPUs (a capacity is refused there).
    let capacity = if nested_guest() {
        1.8
    } else {
        cpus.min(2) as f64
    };
    if !under_scx() {
        std::env::set_var("BURST_QEMU_CAPACITY", capacity.to_string());
    }
    let vms: Vec<Launched> = spec
        .iter()
        .map(|(name, baseline, credits)| {
            let vm = Launched::start(
                &s,
                name,
                &["--vcpus", "2", "--baseline", baseline, "--credits", credits],
                &qemu,
            );
            view(&s, name);
            vm
        })
        .collect();
    for (name, _, _) in spec {
        assert!(s.cli(&["resume", name]).status.success());
    }
    let resumed = std::time::Instant::now();
    // A VM launched with 0 credits earned some while paused (below its baseline): back to 0,
    // now that it runs busy at or above its baseline and earns no more.
    for (name, _, credits) in spec {
        if *credits == "0" {
            assert!(s.cli(&["credits", name, "--set", "0"]).status.success());
        }
    }
    let plan_now = || -> Option<Vec<f64>> {
        spec.iter()
            .map(|(n, _, _)| view(&s, n)["allocation_pct"].as_f64().map(|a| a * 2.0))
            .collect()
    };
    if !under_scx() {
        settle(&plan_now);
    }
    // And not before the fleet's start-up has passed: under `headroom` the plan settles within
    // about 3 s, and windows starting then missed the plan by up to 7 points (and in two runs
    // every VM by half) in 4 of 6 runs, while the example's windows after 12 s were within 1.1
    // points in 4 of 4 (ResCoin's plan took 18 s to settle, so its windows always started late).
    std::thread::sleep(Duration::from_secs(10).saturating_sub(resumed.elapsed()));
    let (delivered, planned, host) = window(&vms, &plan_now);
    // Under sched_ext, for what the three received in all.
    let shared = if under_scx() {
        delivered.iter().sum::<f64>() / 100.0
    } else {
        capacity
    };
    let (grants, predicted) = predict(&s, spec, shared);
    eprintln!(
        "{}: delivered {delivered:.2?} % of one CPU; planned {planned:.2?}; predicted \
         {predicted:.2?} for {shared:.3} CPUs; grants {grants:?}; the host's CPUs idle {:.2}, \
         stolen {:.2} % of one CPU",
        if under_scx() { "sched_ext" } else { "cgroup" },
        host.0,
        host.1
    );
    // Visible: ls shows the allocation beside the grant.
    let ls: Vec<Value> = serde_json::from_slice(&s.cli(&["ls", "--json"]).stdout).unwrap();
    assert!(ls
        .iter()
        .all(|v| v["allocation_pct"].is_number() && v["grant_pct"].is_number()));
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(text.contains("ALLOC"), "{text}");
    Split {
        delivered,
        planned: (!under_scx()).then_some(planned),
        predicted,
    }
}

/// One measurement window of 6 s for all of `vms`, their threads read in this process at both
/// ends: what each received, % of one CPU, the stage's plan (its mean over the window: it
/// moves a little from period to period), and the host's CPUs idle and stolen by the
/// hypervisor in it, % of one CPU (printed, to tell a busy host from a VM held short).
fn window(
    vms: &[Launched],
    plan_now: &dyn Fn() -> Option<Vec<f64>>,
) -> (Vec<f64>, Vec<f64>, (f64, f64)) {
    let threads: Vec<(u32, Vec<u32>)> = vms
        .iter()
        .map(|v| (v.record.pid, v.record.vcpu_tids.clone()))
        .collect();
    let before: Vec<u64> = threads
        .iter()
        .map(|(p, t)| t.iter().map(|&t| thread_cpu_ns(*p, t)).sum())
        .collect();
    let ticks = idle_and_stolen_ticks();
    let start = std::time::Instant::now();
    let mut plans = Vec::new();
    while start.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(500));
        plans.push(plan_now().expect("every VM has an allocation"));
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
    let planned: Vec<f64> = (0..vms.len())
        .map(|i| plans.iter().map(|p| p[i]).sum::<f64>() / plans.len() as f64)
        .collect();
    let (idle, stolen) = idle_and_stolen_ticks();
    // USER_HZ is 100 on Linux: a tick is 1 % of one CPU for a second.
    let per_s = |t: u64| t as f64 / (ns / 1e9);
    let host = (per_s(idle - ticks.0), per_s(stolen - ticks.1));
    (delivered, planned, host)
}

/// /proc/stat's idle (with iowait) and steal ticks, all CPUs.
fn idle_and_stolen_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    (f[3] + f[4], f[7])
}

/// The rule's prediction for the busy VMs of `spec` sharing `shared` CPUs, % of one CPU, with
/// each VM's (grant, baseline): the grant as the agent publishes it now (its 2 vCPUs with
/// credits, about its baseline without).
fn predict(s: &Scratch, spec: &[Spec; 3], shared: f64) -> (Vec<(Rate, Rate)>, Vec<f64>) {
    let grants: Vec<(Rate, Rate)> = spec
        .iter()
        .map(|(name, b, _)| {
            let baseline = Rate(b.parse::<u64>().unwrap() * 20_000);
            let grant = view(s, name)["grant_pct"].as_f64().unwrap();
            let grant = Rate((grant * 20_000.0).round() as u64);
            (grant, baseline)
        })
        .collect();
    let predicted = busy_split(
        Rate((shared * PPM_PER_CPU as f64).round() as u64),
        SpareRule::default(),
        &grants,
    )
    .iter()
    .map(|r| r.0 as f64 / 10_000.0)
    .collect();
    (grants, predicted)
}

/// Until the stage has engaged and settled: every VM has an allocation and the plan moved by
/// less than a point over the last 2 s (its estimates move by α = 0.7 a period; was a fixed
/// 12 s).
fn settle(plan_now: &dyn Fn() -> Option<Vec<f64>>) {
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
    eprintln!("the plan settled {settled:?} after the launch");
}

/// Every VM at least its baseline; what it received near the plan (cgroup) or the rule's
/// prediction (sched_ext); the plan what the rule predicts, for the whole capacity.
fn check(spec: &[Spec; 3], split: &Split) {
    for ((name, baseline, _), d) in spec.iter().zip(&split.delivered) {
        let baseline: f64 = baseline.parse::<f64>().unwrap() * 2.0;
        assert!(
            *d >= baseline - 1.0,
            "{name} got {d:.2} % of one CPU, below its baseline {baseline}"
        );
    }
    let Some(planned) = &split.planned else {
        // sched_ext, in the scx-6.12 guest, points from the prediction (big / mid / small):
        // 0.42 / 0.36 / 0.05 with credits, 0.93 / 0.88 / 0.06 with the small VM at none; 1.57
        // / 1.20 / 0.37 in a first run (docs/contention.md's table).
        // User-space dispatch (BURST_QEMU_SCX_DISPATCH=user, tests/scx.rs runs only the
        // identical VMs there): 1.0 and 2.92 points off on the slower host of CI run 19's
        // week, where the VMs received about 1 CPU of 2. Since 69c361d, with this debug
        // build's scheduler process (about 15 ms of CPU a decision under the emulator):
        // identical VMs 0.95 and 1.08 points off in boots of their own, 4.02 after the two
        // other scenarios in one boot (1.86 CPUs received); with a release build 0.62–1.76 in
        // all three scenarios (the README's table).
        let user = std::env::var("BURST_QEMU_SCX_DISPATCH").as_deref() == Ok("user");
        let bound = if user { 4.5 } else { 2.5 };
        for ((name, _, _), (d, p)) in spec
            .iter()
            .zip(split.delivered.iter().zip(&split.predicted))
        {
            assert!(
                (d - p).abs() <= bound,
                "{name}: received {d:.2}, the rule predicts {p:.2}"
            );
        }
        return;
    };
    // The plan shares the capacity; the VMs receive that less what the host's other work and
    // the hypervisor take in the window (the agent, QEMU's main threads, this test, CI's other
    // phases; steal). Their quotas are their parts of the plan, so a VM that loses time to
    // other work on its CPU cannot make it up. On this host autogroup is on: a process outside
    // the cpu hierarchy's groups weighs, in its session's group, as much as all the VMs
    // together, whatever its nice. So each VM against its part of the plan scaled to what the
    // three received in all. Unscaled, points below the plan reached 3.79 here (86 windows, CI
    // runs 38-79, the three receiving 192.4-198.9 % of 200) and 5.91 on the project's CI
    // (41537cc: 191.2 % received; it failed the 4.0 of then). Scaled, those 88 windows are
    // within 1.89 points (mean -0.17 to +0.17 per VM); with a process in another session
    // taking 14 points of the window (a 16 % duty cycle), 3.05 (2026-12-07).
    let received: f64 = split.delivered.iter().sum();
    let shared: f64 = planned.iter().sum();
    for ((name, _, _), (d, p)) in spec.iter().zip(split.delivered.iter().zip(planned)) {
        let part = p * received / shared;
        assert!(
            (d - part).abs() <= 3.0,
            "{name}: delivered {d:.2}, planned {p:.2}: {part:.2} of the {received:.2} received"
        );
    }
    // And the three received the plan but for that other work: 95.6-99.5 % of it in the 88
    // windows, 93 % beside the 16 % duty cycle.
    assert!(
        received >= 0.9 * shared,
        "the VMs received {received:.2} % of one CPU of the {shared:.2} planned"
    );
    // The stage plans what the rule predicts: measured on the 2-core host (cgroup v1), seven
    // runs, planned 95.66 / 60.86 / 43.48 against 95.65 / 60.87 / 43.48 (0.01 apart; the bound
    // leaves a point for the plan's mean over a window that starts as it settles).
    for ((name, _, _), (p, want)) in spec.iter().zip(planned.iter().zip(&split.predicted)) {
        assert!(
            (p - want).abs() <= 1.0,
            "{name}: planned {p:.2}, the rule predicts {want:.2}"
        );
    }
    // The whole capacity, which is what the prediction shares when the grants exceed it.
    let (total, capacity): (f64, f64) = (planned.iter().sum(), split.predicted.iter().sum());
    assert!(
        (total - capacity).abs() <= 1.0,
        "the plan shares {capacity:.2} % of one CPU: {total:.2}"
    );
}

#[test]
fn three_busy_vms_on_an_overcommitted_host_each_get_their_baseline_and_the_plan() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    // 80, 40 and 20 % of one CPU; all with credits, so each may use its two vCPUs in full.
    let spec = [
        ("big", "40", "500"),
        ("mid", "20", "500"),
        ("small", "10", "500"),
    ];
    let split = overcommit(&spec);
    check(&spec, &split);
}

/// The README's scenario with the smallest VM out of credits: it is held to its baseline and
/// the other two share the spare by the rule (105.71 / 74.29 / 20 on two CPUs).
#[test]
fn a_vm_without_credits_gets_its_baseline_and_the_others_share_the_spare() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let spec = [
        ("big", "40", "500"),
        ("mid", "20", "500"),
        ("small", "10", "0"),
    ];
    let split = overcommit(&spec);
    check(&spec, &split);
    // Held to its grant, which is its baseline (20 % of one CPU) but for the little it earns
    // back in ticks it runs below it (the smooth decline's square root makes that a point or
    // so: grants of 21.3 and 21.5 % measured here), and none of the spare. Under sched_ext (the
    // scx-6.12 guest) it received 0.17-1.09 points more than the rule's share (mean 0.58;
    // grants 22.4-24.2 %; six runs in one guest and CI run 69's 1.06, 2026-12-07). On this
    // host (cgroup v1) it received less: -1.05 to +0.20 points in 24 CI runs (38 and 51-74,
    // mean -0.37; run 74 failed the 1.0 of then), the three VMs getting 194.0-198.7 % of the
    // 200 (the rest went to the host's other work, the guest phase's idle cgroup among it, and
    // the small VM, starved within its periods, lost the most of it). 1.5 both ways, the upper
    // limit below apart.
    assert!(
        (split.delivered[2] - split.predicted[2]).abs() <= 1.5 && split.delivered[2] < 23.0,
        "small, without credits: {:.2}, predicted {:.2}",
        split.delivered[2],
        split.predicted[2]
    );
}

/// Issue 20: three identical busy VMs (2 vCPUs, 10 % a vCPU, 5 credits) were split 48.4 / 28.0
/// / 23.6 % in one run and 37.8 / 30.3 / 31.9 % in the next under ResCoin's rule. Under the
/// default rule they get equal shares: Jain's index over the window at least 0.99.
#[test]
fn identical_busy_vms_get_equal_shares() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let spec = [("a", "5", "5"), ("b", "5", "5"), ("c", "5", "5")];
    let split = overcommit(&spec);
    check(&spec, &split);
    let jain = burst_qemu::contention::jain(&split.delivered);
    eprintln!("Jain's index {jain:.4}");
    assert!(jain >= 0.99, "{:.2?}: Jain {jain:.4}", split.delivered);
}
