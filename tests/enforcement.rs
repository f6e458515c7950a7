//! Credits enforced on real VMs: real QEMU (TCG, guests that spin every vCPU), the real agent,
//! real cgroups. These run one at a time (.config/nextest.toml): they measure CPU shares.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use burst_qemu::testguest::Behaviour::{Busy, Halt};
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn ready() -> bool {
    require_qemu() && require_cgroups()
}

/// Waits until the agent has adopted the VM and applied its first grant (it publishes the
/// VM's credits right after).
fn enforced(s: &Scratch, name: &str) {
    view(s, name);
    expect_enforcer(s, name);
}

fn share(vm: &Launched, secs: f64) -> f64 {
    shares(
        vm.record.pid,
        &vm.record.vcpu_tids,
        Duration::from_secs_f64(secs),
    )
    .iter()
    .sum()
}

#[test]
fn with_no_credits_a_vm_is_held_to_its_pooled_baseline() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "base",
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "base");
    std::thread::sleep(Duration::from_millis(300));
    // 5 s: 50 periods of 100 ms; one period's quota more or less is 0.4 points.
    let measured = share(&vm, 5.0);
    eprintln!("2 vCPU at 10 % baseline, 0 credits: {measured:.2} % of one CPU over 5 s");
    assert!(
        (measured - 20.0).abs() <= 1.5,
        "measured {measured:.2} % of one CPU, expected 20 ± 1.5"
    );
}

#[test]
fn credits_buy_full_speed_then_a_smooth_decline_to_baseline() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    // The credits are given once the VM is enforced: 0.25 credits = 15 vCPU-s, about 7.5 s at
    // full speed; a 3-second decline: about 11 s in all. (Given at the start, they were spent
    // before the measurement began in the scx-6.12 guest, where loading the BPF scheduler
    // beside a busy VM takes 6–21 s: 24.4 % with 0.1 credits, and 28.6 % with 0.25 in the
    // stop-30 CI, the decline already under way.)
    write_config(
        &s,
        "burst",
        "vcpus = 2\nbaseline = 10\ninitial_credits = 0\ndecline_minutes = 0.05\n",
    );
    let vm = Launched::start(&s, "burst", &[], &s.qemu_args(Busy));
    enforced(&s, "burst");
    assert!(s
        .cli(&["credits", "burst", "--set", "0.25"])
        .status
        .success());
    // Applied when the backstop quota is lifted (the scheduler's budget goes with it).
    wait_until(
        "the grant of a VM with credits",
        Duration::from_secs(5),
        || {
            let q = quota(&s, "burst");
            q == "-1" || q.starts_with("max")
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    let fast = share(&vm, 1.5);
    assert!(fast > 120.0, "with credits: {fast:.1} % of one CPU");

    let mut grants = Vec::new();
    wait_until("balance spent", Duration::from_secs(30), || {
        let v = view(&s, "burst");
        let g = v["grant_pct"].as_f64().unwrap_or(100.0);
        if grants.last() != Some(&g) {
            grants.push(g);
        }
        v["balance"].as_f64() == Some(0.0)
    });
    std::thread::sleep(Duration::from_millis(500));
    let slow = share(&vm, 3.0);
    eprintln!(
        "with credits {fast:.1} %, after them {slow:.1} % of one CPU; grants seen {grants:?}"
    );
    assert!(
        (slow - 20.0).abs() <= 3.0,
        "after the credits: {slow:.1} % of one CPU"
    );
    // No cliff: the grant passed through intermediate values on its way down.
    assert!(
        grants.iter().any(|&g| g > 20.0 && g < 80.0),
        "no intermediate grant seen: {grants:?}"
    );
}

#[test]
fn set_and_baseline_edits_change_the_measured_usage_within_a_tick_and_a_period() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "live",
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "live");
    let before = quota(&s, "live");

    let config = s.vms().join("live.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("baseline = 10", "baseline = 40");
    std::fs::write(&config, text).unwrap();
    let applied = wait_until("baseline edit applied", Duration::from_secs(2), || {
        quota(&s, "live") != before
    });
    std::thread::sleep(Duration::from_millis(100)); // one cgroup period
    let at_40 = share(&vm, 2.0);
    eprintln!("baseline edit → quota written in {applied:?}; then {at_40:.1} % of one CPU");
    assert!(
        applied < Duration::from_millis(350),
        "edit took {applied:?} (tick 250 ms + period 100 ms)"
    );
    assert!(
        (at_40 - 80.0).abs() <= 5.0,
        "at a 40 % baseline: {at_40:.1} %"
    );

    let t = Instant::now();
    let out = s.cli(&["credits", "live", "--set", "100", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((set["balance"].as_f64().unwrap() - 100.0).abs() < 0.1);
    wait_until("--set applied", Duration::from_millis(350), || {
        let q = quota(&s, "live");
        q == "-1" || q.starts_with("max")
    });
    eprintln!("credits --set → no limit in {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(100));
    let burst = share(&vm, 1.0);
    assert!(burst > 120.0, "after --set 100: {burst:.1} %");

    // A request as a burst-qemu older than `agent.requests` writes it (the file alone, put in
    // place whole, nothing announced): the agent's sweep sees it within 2 s (REQUESTS_SWEEP),
    // plus the time an announced request takes, which in CI's debian-6.1 guest (TCG) was
    // 0.98 s above (86 ms on the host): 3.3 s. Without the sweep it is never seen. The agent
    // removes a request after applying it, so the quota changes first.
    let request = s.state().join("live").join(burst_qemu::state::SET_CREDITS);
    let part = request.with_extension("part");
    std::fs::write(&part, "0\n").unwrap();
    std::fs::rename(&part, &request).unwrap();
    let seen = wait_until(
        "an unannounced --set 0 applied",
        Duration::from_secs(5),
        || {
            let q = quota(&s, "live");
            q != "-1" && !q.starts_with("max")
        },
    );
    wait_until("the request taken", Duration::from_secs(1), || {
        !request.exists()
    });
    eprintln!("unannounced credits --set 0 → limited in {seen:?}");
    assert!(seen <= Duration::from_millis(3_300), "seen after {seen:?}");
}

#[test]
fn the_ledger_charges_what_the_threads_measured_to_a_hundredth_of_a_second() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    // Start paused (-S) so nothing runs before the agent adopts the VM; unlimited so nothing is
    // throttled and the charge is pure accounting.
    let mut qemu = s.qemu_args(Busy);
    qemu.push("-S".into());
    let vm = Launched::start(
        &s,
        "acct",
        &["--vcpus", "2", "--baseline", "10", "--mode", "unlimited"],
        &qemu,
    );
    enforced(&s, "acct");
    // What ran before the agent adopted the VM (QEMU starting its vCPU threads: milliseconds
    // on a host, a tenth of a second in an emulated guest) is not the ledger's: compare what
    // both counted from here, each end read at rest (paused, after the threads stopped, at the
    // agent's next publish: the same state exactly).
    let (v0, cpu0) = at_rest(&s, "acct", &vm);
    assert!(s.cli(&["resume", "acct"]).status.success());
    std::thread::sleep(Duration::from_secs(3));
    let (v1, cpu1) = at_rest(&s, "acct", &vm);
    let charged = v1["used_total_s"].as_f64().unwrap() - v0["used_total_s"].as_f64().unwrap();
    let measured = (cpu1 - cpu0) as f64 / 1e9;
    eprintln!("ledger charged {charged:.4} vCPU-s, threads measured {measured:.4} s");
    assert!(measured > 3.0, "the guest hardly ran: {measured} s");
    // At rest the two count the same nanoseconds; `used_total_s` is published with three
    // decimals, so two readings differ by 0.001 s at most. (Paired at publishes while running
    // instead, they differed by what ran between the agent's reading and its write: 0.005 s
    // here, 0.044 s in a 6.12 guest.)
    assert!(
        (charged - measured).abs() <= 0.0011,
        "charged {charged:.4} vs measured {measured:.4} vCPU-s"
    );
}

#[test]
fn agent_killed_the_launcher_restarts_it_and_the_new_agent_resumes_exactly() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "crash",
        &["--vcpus", "1", "--baseline", "10", "--credits", "50"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "crash");
    // Balance and thread CPU read at rest (paused, at a publish), before and after.
    let (v1, cpu1) = at_rest(&s, "crash", &vm);
    let t1 = Instant::now();
    let b1 = v1["balance"].as_f64().unwrap();
    assert!(s.cli(&["resume", "crash"]).status.success());

    let first = agent_pid(&s);
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    // The launcher waits on the agent's pidfd; the new agent then has to start. In the scx-6.12 guest
    // (single-threaded TCG, the busy VM beside it; any exec of burst-qemu there takes 1.0 s
    // when the guest is idle) the new agent held the lock 2.7, 2.8, 3.0, 3.2 and 3.6 s after
    // the kill, where the stop-30 CI's bound of 3 s ran out.
    let back = wait_until(
        "agent restarted by the launcher",
        Duration::from_secs(15),
        || burst_qemu::state::agent_running(&s.state()) && agent_pid(&s) != first,
    );
    eprintln!("agent restarted by the launcher's watchdog {back:?} after kill -9");
    // The new agent has re-adopted the VM and charged the gap.
    wait_until("the new agent re-adopts", Duration::from_secs(10), || {
        std::fs::read_to_string(s.state().join("agent.log"))
            .is_ok_and(|l| l.contains("re-adopted; charged"))
    });
    let (v2, cpu2) = at_rest(&s, "crash", &vm);
    let t2 = Instant::now();
    let b2 = v2["balance"].as_f64().unwrap();
    assert!(s.cli(&["resume", "crash"]).status.success());
    // Uninterrupted, the balance would have moved by earnings minus use over the same time.
    let earned = (t2 - t1).as_secs_f64() * 0.10 / 60.0;
    let used = (cpu2 - cpu1) as f64 / 60e9;
    let expected = b1 + earned - used;
    let charged = v2["used_total_s"].as_f64().unwrap() - v1["used_total_s"].as_f64().unwrap();
    let ran = (cpu2 - cpu1) as f64 / 1e9;
    eprintln!(
        "balance {b1:.5} → {b2:.5} across an agent crash, uninterrupted {expected:.5} (off by \
         {:+.5} credits); charged {charged:.4} vCPU-s for {ran:.4} s measured",
        b2 - expected
    );
    // At rest both count the same nanoseconds; `used_total_s` has three decimals (0.001 s
    // between two readings at most).
    assert!(
        (charged - ran).abs() <= 0.0011,
        "charged {charged:.4} vCPU-s for {ran:.4} s measured"
    );
    // The published balance has three decimals too: two readings can be 0.001 credits off,
    // and the earnings are timed by this test's clock (each end a publish late at most, a
    // second: 0.00003 credits). Measured −0.00075 (this host), +0.00046 and +0.00070 (6.12
    // and 6.1 guests).
    assert!(
        (b2 - expected).abs() <= 0.0011,
        "off by {:.5} credits",
        b2 - expected
    );
    let q = quota(&s, "crash");
    assert!(
        q == "-1" || q.starts_with("max"),
        "a new agent enforces again: {q}"
    );
    // The new agent also lets go of the VM when it ends.
    let cgroup = vcpu_cgroup(&s, "crash");
    drop(vm);
    // The agent sees the end at its next tick and removes the cgroup once QEMU's threads have
    // left it; under `--enforcer scx` it also stops its scheduler. Measured 2.2, 2.9 and
    // 3.1 s in the scx-6.12 guest (single-threaded TCG), where a bound of 3 s failed.
    let gone = wait_until(
        "cgroup removed by the new agent",
        Duration::from_secs(15),
        || !cgroup.exists(),
    );
    eprintln!("the VM's cgroup removed {gone:?} after QEMU was killed");
}

#[test]
fn qemu_killed_its_cgroup_goes_and_its_ledger_stays() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let mut vm = Launched::start(
        &s,
        "gone",
        &["--vcpus", "1", "--baseline", "10", "--credits", "3"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "gone");
    // Until it has spent some of its credits, saved.
    wait_until("credits spent", Duration::from_secs(10), || {
        view(&s, "gone")["balance"]
            .as_f64()
            .is_some_and(|b| b < 2.999)
    });
    let cgroup = vcpu_cgroup(&s, "gone");
    assert!(cgroup.exists());
    kill(Pid::from_raw(vm.record.pid as i32), Signal::SIGKILL).unwrap();
    assert_eq!(vm.wait(Duration::from_secs(5)).code(), Some(137));
    wait_until("cgroup removed", Duration::from_secs(2), || {
        !cgroup.exists()
    });
    let out = s.cli(&["credits", "gone", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "stopped");
    let balance = v["balance"].as_f64().unwrap();
    assert!(
        balance > 0.0 && balance < 3.0,
        "persisted balance {balance}"
    );

    // Started again under the same name, it continues that balance (no new launch credits).
    let _again = Launched::start(&s, "gone", &[], &s.qemu_args(Halt));
    let again = view(&s, "gone")["balance"].as_f64().unwrap();
    assert!(
        (again - balance).abs() < 0.05,
        "restarted with {again}, had {balance}"
    );
}

#[test]
fn a_bad_edit_keeps_the_last_good_config_enforced() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "bad",
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "bad");
    let config = s.vms().join("bad.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("baseline = 10", "baseline = 250")).unwrap();
    wait_until("stale reported", Duration::from_secs(2), || {
        s.state().join("bad/config_error").exists()
    });
    let ls: Value = serde_json::from_slice(&s.cli(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(ls[0]["config_state"], "stale");
    let why = ls[0]["config_error"].as_str().unwrap().to_owned();
    assert!(
        why.contains("bad.toml:") && why.contains("baseline"),
        "{why}"
    );
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(
        text.contains("stale") && text.contains("config stale:"),
        "{text}"
    );
    std::fs::write(&config, "vcpus = 4\nbaseline = 10\n").unwrap();
    wait_until(
        "the second bad edit reported",
        Duration::from_secs(2),
        || {
            std::fs::read_to_string(s.state().join("bad/config_error"))
                .is_ok_and(|why| why.contains("vcpus = 4 differs"))
        },
    );
    let measured = share(&vm, 2.0);
    assert!(
        (measured - 20.0).abs() <= 1.5,
        "after bad edits: {measured:.2} %"
    );
    std::fs::write(&config, good).unwrap();
    wait_until("valid again", Duration::from_secs(2), || {
        !s.state().join("bad/config_error").exists()
    });
}

#[test]
fn a_second_agent_on_the_same_state_dir_refuses_to_start() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let _vm = Launched::start(
        &s,
        "one",
        &["--vcpus", "1", "--baseline", "10"],
        &s.qemu_args(Halt),
    );
    wait_until("agent up", Duration::from_secs(20), || {
        burst_qemu::state::agent_running(&s.state())
    });
    let out = s.cli(&["agent"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
}

#[test]
fn check_reports_this_hosts_capabilities() {
    if !ready() {
        return;
    }
    let out = bin().arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("QEMU") && text.contains("QEMU emulator version"),
        "{text}"
    );
    assert!(
        text.contains("cgroup CPU bandwidth") && text.contains("is writable"),
        "{text}"
    );
    assert!(
        text.contains("ghOSt") && text.contains("sched_ext"),
        "{text}"
    );
}

#[test]
fn the_cgroup_layout_read_back_from_the_kernel_is_the_documented_one() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "lay",
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "lay");
    let (version, _) = burst_qemu::enforce::cgroup::detect_host().unwrap();
    let vcpus = vcpu_cgroup(&s, "lay");
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ids = |text: String| -> Vec<u32> {
        let mut v: Vec<u32> = text
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        v.sort();
        v
    };
    let mut tids = vm.record.vcpu_tids.clone();
    tids.sort();
    match version {
        burst_qemu::enforce::cgroup::Version::V1 => {
            assert_eq!(
                ids(read(vcpus.join("tasks"))),
                tids,
                "exactly the vCPU threads"
            );
            assert_eq!(read(vcpus.join("cpu.cfs_period_us")).trim(), "100000");
            assert_eq!(read(vcpus.join("cpu.cfs_quota_us")).trim(), "20000");
        }
        burst_qemu::enforce::cgroup::Version::V2 => {
            let domain = vcpus.parent().unwrap().to_owned();
            assert_eq!(
                ids(read(domain.join("cgroup.procs"))),
                vec![vm.record.pid],
                "QEMU in the domain"
            );
            assert_eq!(read(vcpus.join("cgroup.type")).trim(), "threaded");
            assert_eq!(
                ids(read(vcpus.join("cgroup.threads"))),
                tids,
                "exactly the vCPU threads"
            );
            assert_eq!(read(vcpus.join("cpu.max")).trim(), "20000 100000");
            assert!(read(domain.join("cgroup.subtree_control")).contains("cpu"));
            // QEMU's other threads stay in the domain, unlimited.
            let others = ids(read(domain.join("cgroup.threads")));
            assert!(!others.is_empty() && others.iter().all(|t| !tids.contains(t)));
            assert_eq!(read(domain.join("cpu.max")).trim(), "max 100000");
        }
    }
}

/// cgroup v2 only (it runs in the guests of tests/cgroup_v2.rs; this host has no v2 cpu
/// controller): an agent inside a delegated cgroup, as systemd's `Delegate=yes` starts it,
/// keeps its VMs under that cgroup and moves itself to a leaf.
#[test]
fn a_delegated_cgroup_parent_holds_the_agent_and_its_vms() {
    if !ready() {
        return;
    }
    let (version, mount) = burst_qemu::enforce::cgroup::detect_host().unwrap();
    if version == burst_qemu::enforce::cgroup::Version::V1 {
        eprintln!("cgroup v1 here: this test runs in the v2 guests of tests/cgroup_v2.rs");
        return;
    }
    let s = Scratch::new();
    let delegated = mount.join(format!("bq-delegated-{}", std::process::id()));
    std::fs::create_dir_all(&delegated).unwrap();
    std::fs::write(mount.join("cgroup.subtree_control"), "+cpu").unwrap();
    std::fs::create_dir_all(s.state()).unwrap();
    // Like systemd: the agent's process starts inside the delegated cgroup.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} agent --state-dir {} --cgroup-parent self",
        delegated.display(),
        bin_path().display(),
        s.state().display()
    );
    let log = std::fs::File::create(s.state().join("agent.log")).unwrap();
    let mut agent = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("BURST_QEMU_DATA_DIR", s.data())
        .env("BURST_QEMU_LOG", "info")
        .stderr(log)
        .spawn()
        .unwrap();
    // 20 s: an emulated guest on a busy host starts it slowly; its log says why if it never
    // comes up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !burst_qemu::state::agent_running(&s.state()) {
        if std::time::Instant::now() > deadline || agent.try_wait().unwrap().is_some() {
            let log = std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default();
            panic!(
                "the agent in {} did not come up; its log:\n{log}",
                delegated.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let vm = Launched::start(
        &s,
        "del",
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    enforced(&s, "del");
    let instance = burst_qemu::enforce::cgroup::instance_name(&s.state());
    let vcpus = delegated
        .join("burst-qemu")
        .join(instance)
        .join("del/vcpus");
    let log = || std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default();
    assert!(
        vcpus.is_dir(),
        "no {}; agent log:\n{}",
        vcpus.display(),
        log()
    );
    assert_eq!(
        std::fs::read_to_string(vcpus.join("cpu.max"))
            .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", log()))
            .trim(),
        "20000 100000"
    );
    let agent_leaf = std::fs::read_to_string(delegated.join("agent/cgroup.procs")).unwrap();
    assert!(
        agent_leaf.contains(&agent.id().to_string()),
        "the agent moved itself to a leaf"
    );
    let share = shares(vm.record.pid, &vm.record.vcpu_tids, Duration::from_secs(5))
        .iter()
        .sum::<f64>();
    assert!(
        (share - 20.0).abs() <= 1.5,
        "held under the delegated parent: {share:.2} %"
    );
    drop(vm);
    let _ = nix::sys::signal::kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
    agent.wait().unwrap();
}
