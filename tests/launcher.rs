//! The launcher against real QEMU and the project's test guest: under TCG (no KVM needed), and
//! again under KVM by tests/kvm.rs (`BURST_QEMU_TEST_ACCEL=kvm`).
//! These run one at a time (.config/nextest.toml): they measure CPU shares on 2 cores.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::state;
use burst_qemu::testguest::Behaviour::{Busy, Halt};
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn sig(pid: u32, s: Signal) {
    kill(Pid::from_raw(pid as i32), s).unwrap();
}

#[test]
fn recorded_tids_are_vcpu_threads_of_that_qemu_and_burn_cpu() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "busy",
        &["--vcpus", "2", "--baseline", "10"],
        &s.qemu_args(Busy),
    );
    let r = &vm.record;
    assert_eq!(r.vcpu_tids.len(), 2);
    for (i, tid) in r.vcpu_tids.iter().enumerate() {
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", r.pid)).unwrap();
        assert_eq!(
            comm.trim(),
            vcpu_thread_name(i),
            "thread {tid} is not vCPU {i}"
        );
    }
    let busy = shares(r.pid, &r.vcpu_tids, Duration::from_secs(1));
    assert!(busy.iter().all(|&p| p > 30.0), "vCPU shares {busy:?}");
}

#[test]
fn halting_guest_uses_no_cpu() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "idle",
        &["--vcpus", "2", "--baseline", "10"],
        &s.qemu_args(Halt),
    );
    let idle = shares(
        vm.record.pid,
        &vm.record.vcpu_tids,
        Duration::from_millis(500),
    );
    assert!(idle.iter().all(|&p| p < 2.0), "vCPU shares {idle:?}");
}

#[test]
fn pause_and_resume_take_vcpus_to_zero_and_back() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "pr",
        &["--vcpus", "2", "--baseline", "10"],
        &s.qemu_args(Busy),
    );
    let (pid, tids) = (vm.record.pid, vm.record.vcpu_tids.clone());
    assert!(s.cli(&["pause", "pr"]).status.success());
    let paused = shares(pid, &tids, Duration::from_millis(700));
    assert!(paused.iter().all(|&p| p < 2.0), "paused shares {paused:?}");
    let ls: serde_json::Value = serde_json::from_slice(&s.cli(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(ls[0]["state"], "paused");
    let published = std::fs::read_to_string(s.state().join("pr").join(state::RUN_STATE));
    assert_eq!(
        published.unwrap(),
        "paused\n",
        "pause waits until it is published"
    );
    assert!(s.cli(&["resume", "pr"]).status.success());
    let resumed = shares(pid, &tids, Duration::from_millis(700));
    assert!(
        resumed.iter().all(|&p| p > 30.0),
        "resumed shares {resumed:?}"
    );
    assert_eq!(
        state::find(&s.state(), "pr").unwrap().0.vcpu_tids,
        tids,
        "same threads after resume"
    );
}

#[test]
fn the_launcher_publishes_every_run_state_change_from_qemus_events() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "ev",
        &["--vcpus", "1", "--baseline", "10"],
        &s.qemu_args(Halt),
    );
    let dir = s.state().join("ev");
    let published = || {
        std::fs::read_to_string(dir.join(state::RUN_STATE))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert_eq!(published(), "running", "published before the record");
    assert!(
        !dir.join("ev.sock").exists(),
        "the private monitor's socket is unlinked once connected"
    );
    // Someone else's QMP session, not burst-qemu's CLI: only QEMU's event tells the launcher.
    let mut c = qmp::Client::connect(&vm.record.qmp_socket, Duration::from_secs(2)).unwrap();
    for (command, want) in [("stop", "paused"), ("cont", "running")] {
        let t = Instant::now();
        match command {
            "stop" => c.execute(qmp::qapi::qmp::stop {}).map(drop),
            _ => c.execute(qmp::qapi::qmp::cont {}).map(drop),
        }
        .unwrap();
        while published() != want {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{command}: still {:?}",
                published()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        eprintln!("{command}: published {want} after {:?}", t.elapsed());
    }
    drop(c);
    let ls: serde_json::Value = serde_json::from_slice(&s.cli(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(ls[0]["run_state"], "running");
}

#[test]
fn smp_is_added_when_absent_and_a_contradicting_smp_is_refused() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let vm = Launched::start(
        &s,
        "three",
        &["--vcpus", "3", "--baseline", "5"],
        &s.qemu_args(Halt),
    );
    assert_eq!(vm.record.vcpu_tids.len(), 3);
    drop(vm);

    let mut qemu = s.qemu_args(Halt);
    qemu.extend(["-smp".into(), "cpus=2,maxcpus=4".into()]);
    let vm = Launched::start(&s, "agrees", &["--vcpus", "2", "--baseline", "5"], &qemu);
    assert_eq!(vm.record.vcpu_tids.len(), 2);
    drop(vm);

    let mut qemu = s.qemu_args(Halt);
    qemu.extend(["-smp".into(), "4".into()]);
    let out = s
        .launcher(
            &["--name", "contra", "--vcpus", "2", "--baseline", "5"],
            &qemu,
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-smp gives 4 vCPUs") && err.contains("has 2"),
        "{err}"
    );
    assert!(!s.state().join("contra").exists());

    // Without --vcpus and without a config file, -smp decides.
    let mut qemu = s.qemu_args(Halt);
    qemu.extend(["-smp".into(), "2".into()]);
    let vm = Launched::start(&s, "fromsmp", &["--baseline", "5"], &qemu);
    assert_eq!(vm.record.vcpus, 2);
}

#[test]
fn names_come_from_flag_or_qemu_and_are_unique_among_running_vms() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let mut qemu = s.qemu_args(Halt);
    qemu.extend(["-name".into(), "guest=fromqemu".into()]);
    let mut child = s
        .launcher(&["--vcpus", "1", "--baseline", "5"], &qemu)
        .spawn()
        .unwrap();
    let rec = s.wait_registered("fromqemu", &mut child);
    let _vm = Launched { child, record: rec };

    let out = s
        .launcher(
            &["--name", "fromqemu", "--vcpus", "1", "--baseline", "5"],
            &s.qemu_args(Halt),
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));

    for bad in ["a/b", "..", "has space", &"x".repeat(65)] {
        let out = s
            .launcher(
                &["--name", bad, "--vcpus", "1", "--baseline", "5"],
                &s.qemu_args(Halt),
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "name {bad:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
}

#[test]
fn stop_powers_down_then_quits_and_removes_the_runtime_dir() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let mut vm = Launched::start(
        &s,
        "stopme",
        &["--vcpus", "1", "--baseline", "5"],
        &s.qemu_args(Busy),
    );
    let t = Instant::now();
    let out = s.cli(&["stop", "stopme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The firmware ignores ACPI power-down: quit follows after --shutdown-timeout (1 s).
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "quit came before the timeout"
    );
    assert_eq!(vm.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(!s.state().join("stopme").exists());
    assert!(!Path::new(&format!("/proc/{}", vm.record.pid)).exists());
}

#[test]
fn sigterm_to_the_launcher_is_a_graceful_stop() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let mut vm = Launched::start(
        &s,
        "term",
        &["--vcpus", "1", "--baseline", "5"],
        &s.qemu_args(Halt),
    );
    sig(vm.child.id(), Signal::SIGTERM);
    assert_eq!(vm.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(!s.state().join("term").exists());
}

#[test]
fn qemu_killed_under_the_launcher_is_noticed_at_once() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let mut vm = Launched::start(
        &s,
        "kill9",
        &["--vcpus", "1", "--baseline", "5"],
        &s.qemu_args(Busy),
    );
    let t = Instant::now();
    sig(vm.record.pid, Signal::SIGKILL);
    let status = vm.wait(Duration::from_secs(5));
    let noticed = t.elapsed();
    assert_eq!(status.code(), Some(128 + 9));
    assert!(noticed < Duration::from_millis(500), "took {noticed:?}");
    assert!(!s.state().join("kill9").exists());
}

#[test]
fn ls_json_lists_running_vms() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let a = Launched::start(
        &s,
        "a",
        &["--vcpus", "2", "--baseline", "10", "--mode", "unlimited"],
        &s.qemu_args(Halt),
    );
    let _b = Launched::start(
        &s,
        "b",
        &["--vcpus", "1", "--baseline", "5"],
        &s.qemu_args(Halt),
    );
    let out = s.cli(&["ls", "--json"]);
    let vms: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vms.len(), 2);
    let v = &vms[0];
    assert_eq!(v["name"], "a");
    assert_eq!(v["pid"], a.record.pid);
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["baseline"], 10.0);
    assert_eq!(v["mode"], "unlimited");
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpu_tids"], serde_json::json!(a.record.vcpu_tids));
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(text.lines().nth(1).unwrap().starts_with("a "), "{text}");
}

#[test]
fn ten_vms_started_concurrently_from_a_shell_loop_all_register() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let qemu = s.qemu_args(Halt).join(" ");
    let script = format!(
        "for i in 0 1 2 3 4 5 6 7 8 9; do \"$BQ\" --state-dir {st} --vms {vms} --name vm$i --vcpus 1 --baseline 5 --shutdown-timeout 1 -- {qemu} & done; wait",
        st = s.state().display(),
        vms = s.vms().display(),
    );
    let mut shell = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("BQ", bin_path())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while state::running(&s.state()).len() < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} registered",
            state::running(&s.state()).len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vms = state::running(&s.state());
    let names: Vec<&str> = vms.iter().map(|v| v.0.name.as_str()).collect();
    assert_eq!(
        names,
        ["vm0", "vm1", "vm2", "vm3", "vm4", "vm5", "vm6", "vm7", "vm8", "vm9"]
    );
    for v in &vms {
        assert!(s.cli(&["stop", &v.0.name]).status.success());
    }
    assert!(shell.wait().unwrap().success());
    assert!(state::running(&s.state()).is_empty());
}

#[test]
fn config_file_is_written_then_authoritative() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    drop(Launched::start(
        &s,
        "cfg",
        &["--vcpus", "2", "--baseline", "10", "--credits", "7"],
        &s.qemu_args(Halt),
    ));
    let text = std::fs::read_to_string(s.vms().join("cfg.toml")).unwrap();
    assert!(
        text.contains("baseline = 10") && text.contains("initial_credits = 7"),
        "{text}"
    );

    // Same flags, or none: fine. A contradicting flag: an error naming both values.
    drop(Launched::start(&s, "cfg", &[], &s.qemu_args(Halt)));
    let out = s
        .launcher(&["--name", "cfg", "--baseline", "20"], &s.qemu_args(Halt))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--baseline 20 contradicts baseline = 10"),
        "{err}"
    );
    assert!(
        err.contains("cfg.toml") && err.contains("--force-config"),
        "{err}"
    );

    drop(Launched::start(
        &s,
        "cfg",
        &["--baseline", "20", "--force-config"],
        &s.qemu_args(Halt),
    ));
    let text = std::fs::read_to_string(s.vms().join("cfg.toml")).unwrap();
    assert!(
        text.contains("baseline = 20") && text.contains("vcpus = 2"),
        "{text}"
    );
}

/// Bad input: a clear one-line error, the documented status, no runtime dir left.
fn assert_refused(s: &Scratch, out: std::process::Output, code: i32, mentions: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("burst-qemu:"))
        .collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(ours[0].contains(mentions), "{err}");
    let left: Vec<_> = std::fs::read_dir(s.state())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "runtime dirs left behind: {left:?}");
}

#[test]
fn bad_input_is_refused_cleanly() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let flags = ["--name", "bad", "--vcpus", "1", "--baseline", "5"];

    let out = s
        .launcher(&flags, &["/no/such/qemu".to_string()])
        .output()
        .unwrap();
    assert_refused(&s, out, 127, "not found");

    let mut qemu = s.qemu_args(Halt);
    qemu.push("-no-such-option".into());
    let out = s.launcher(&flags, &qemu).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("-no-such-option"),
        "QEMU's own message is shown: {err}"
    );
    assert_refused(&s, out, 125, "QEMU exited during start-up");

    let deep = s.path().join("d".repeat(100));
    let out = bin()
        .arg("--state-dir")
        .arg(&deep)
        .args(flags)
        .arg("--")
        .args(s.qemu_args(Halt))
        .output()
        .unwrap();
    assert_refused(&s, out, 2, "more than a Unix socket holds");
    assert!(!deep.exists());

    let file = s.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = bin()
        .arg("--state-dir")
        .arg(file.join("state"))
        .args(flags)
        .arg("--")
        .args(s.qemu_args(Halt))
        .output()
        .unwrap();
    assert_refused(&s, out, 1, "not usable");

    let out = s
        .launcher(&["--name", "bad", "--vcpus", "1"], &s.qemu_args(Halt))
        .output()
        .unwrap();
    assert_refused(&s, out, 2, "--baseline is required");
}
