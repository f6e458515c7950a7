//! The agent's own QMP monitor on real QEMU: the launcher gives QEMU a third monitor
//! (`ag.sock` in the runtime dir, recorded in `vm.json`); the agent keeps one session on it,
//! shared by its disk and memory workers, and leaves the main monitor free for `pause`,
//! `resume` and the operator's tools. Records without one (older launchers) are reached per use
//! on the main socket, as before.
//!
//! Each test runs one firmware guest (tests/guest's `halt` image, no Linux) under TCG; the
//! agent is the one the launcher starts, given the disk stage and a 0.5 s memory round through
//! the environment.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burst_qemu::control::{Control, Qmp};
use burst_qemu::state::{self, VmRecord};
use burst_qemu::testguest::Behaviour;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What the log line of each new session on a VM's agent monitor starts with.
fn connected(name: &str) -> String {
    format!("{name}: connected to its agent monitor")
}

/// How many sessions the agents of `s` opened on `name`'s agent monitor (their log).
fn sessions(s: &Scratch, name: &str) -> usize {
    std::fs::read_to_string(s.state().join("agent.log"))
        .unwrap_or_default()
        .matches(&connected(name))
        .count()
}

fn agent_log(s: &Scratch) -> String {
    std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default()
}

/// Launches `name` (the halt firmware with 128 MiB and a 1 MiB virtio disk) with the agent the
/// launcher starts running the disk stage (100 MB/s) and a memory round every 0.5 s, traced to
/// `<scratch>/trace.jsonl`.
fn launch(s: &Scratch, name: &str, config: &str) -> Launched {
    write_config(s, name, &format!("vcpus = 1\nbaseline = 100\n{config}"));
    let disk = s.path().join(format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut qemu: Vec<String> = s
        .qemu_args(Behaviour::Halt)
        .into_iter()
        .map(|a| if a == "16" { "128".into() } else { a })
        .collect();
    qemu.extend([
        "-drive".into(),
        format!("file={},if=virtio,format=raw", disk.display()),
    ]);
    let mut child = s
        .launcher(&["--name", name, "--shutdown-timeout", "1"], &qemu)
        .env("BURST_QEMU_DISK_BANDWIDTH", "100M")
        .env("BURST_QEMU_MEMORY_INTERVAL", "0.5")
        .env("BURST_QEMU_MEMORY_TRACE", s.path().join("trace.jsonl"))
        .env("BURST_QEMU_LOG", "info")
        .spawn()
        .unwrap();
    let record = s.wait_registered(name, &mut child);
    Launched { child, record }
}

/// One `query-status` on the VM's main socket, as an operator's tool would ask it.
fn main_run_state(record: &VmRecord) -> String {
    Qmp::new(record).run_state().unwrap()
}

fn memory_rounds(s: &Scratch) -> usize {
    std::fs::read_to_string(s.path().join("trace.jsonl"))
        .unwrap_or_default()
        .lines()
        .count()
}

/// The agent's pid once a live one holds the lock (the launcher restarts a dead one).
fn live_agent(s: &Scratch, not: Option<i32>) -> i32 {
    let mut pid = 0;
    wait_until("a live agent", Duration::from_secs(15), || {
        pid = std::fs::read_to_string(s.state().join("agent.lock"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        pid > 0 && Some(pid) != not && kill(Pid::from_raw(pid), None).is_ok()
    });
    pid
}

fn disk_ok(s: &Scratch, name: &str) -> bool {
    let v = view(s, name);
    v["disk"]["error"].is_null() && v["disk"]["read_bps"].is_u64()
}

/// (a), (b), (c) with the agent: the disk and memory workers reach a launcher VM over one
/// session on its agent monitor, period after period, while the main monitor stays free for
/// `pause`, `resume` and anyone's `query-status`; a restarted agent connects again; a stopped
/// QEMU is an error in both workers' views, not a stuck agent; a killed one ends the VM, not
/// the agent.
#[test]
fn the_workers_share_one_kept_session_and_leave_the_main_monitor_free() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let s = Scratch::new();
    let mut vm = launch(
        &s,
        "keep",
        "disk_share = 50\nbalance_memory = true\nmemory_min = 64\nmemory_start = 96\n",
    );
    let sock = vm.record.agent_socket.clone().expect("an agent monitor");
    assert_eq!(sock, s.state().join("keep").join(state::AGENT_SOCKET));
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let memory_json = s.state().join("keep").join("memory.json");
    wait_until("both workers at work", Duration::from_secs(30), || {
        disk_ok(&s, "keep") && memory_json.exists() && memory_rounds(&s) >= 2
    });
    let agent = live_agent(&s, None);

    // 6 s: 6 disk periods, 12 memory rounds; meanwhile the main monitor answers every 100 ms
    // and takes a pause and a resume.
    let rounds0 = memory_rounds(&s);
    let t0 = Instant::now();
    let mut asked = 0;
    while t0.elapsed() < Duration::from_secs(6) {
        assert_eq!(main_run_state(&vm.record), "running");
        asked += 1;
        if asked == 10 {
            assert!(s.cli(&["pause", "keep"]).status.success());
            assert_eq!(main_run_state(&vm.record), "paused");
            assert!(s.cli(&["resume", "keep"]).status.success());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rounds = memory_rounds(&s) - rounds0;
    eprintln!("{asked} main-monitor queries, {rounds} memory rounds in 6 s");
    // 12 expected; a round can be late on 2 shared cores (CI runs this beside Linux guests).
    assert!(rounds >= 6, "only {rounds} memory rounds in 6 s");
    assert!(disk_ok(&s, "keep"), "{}", view(&s, "keep"));
    let mem: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&memory_json).unwrap()).unwrap();
    assert!(mem["error"].is_null(), "{mem}");
    assert_eq!(sessions(&s, "keep"), 1, "{}", agent_log(&s));

    // The agent dies; the launcher starts another, which QEMU lets connect (the old session
    // closed with its process).
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    let agent = live_agent(&s, Some(agent));
    wait_until("the new agent's session", Duration::from_secs(20), || {
        sessions(&s, "keep") == 2 && disk_ok(&s, "keep")
    });

    // QEMU stops answering (SIGSTOP): both workers show the timeout; the agent's tick goes on.
    kill(Pid::from_raw(vm.record.pid as i32), Signal::SIGSTOP).unwrap();
    wait_until("the workers to report", Duration::from_secs(20), || {
        let mem: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&memory_json).unwrap_or_default())
                .unwrap_or_default();
        let disk = view(&s, "keep")["disk"]["error"].clone();
        disk.as_str().is_some_and(|e| e.contains("no answer")) && mem["state"] == "error"
    });
    at_next_publish(&s, "keep", &vm);
    kill(Pid::from_raw(vm.record.pid as i32), Signal::SIGCONT).unwrap();
    wait_until("the workers to recover", Duration::from_secs(20), || {
        let mem: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&memory_json).unwrap_or_default())
                .unwrap_or_default();
        disk_ok(&s, "keep") && mem["error"].is_null()
    });
    // A timeout keeps the session (a late answer is known by its id).
    assert_eq!(sessions(&s, "keep"), 2, "{}", agent_log(&s));

    // QEMU is killed: the VM ends; the agent lives on, its workers did not panic.
    kill(Pid::from_raw(vm.record.pid as i32), Signal::SIGKILL).unwrap();
    vm.wait(Duration::from_secs(10));
    wait_until("the VM to end", Duration::from_secs(10), || {
        !s.state().join("keep").exists()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(kill(Pid::from_raw(agent), None).is_ok(), "the agent died");
    let log = agent_log(&s);
    assert!(!log.contains("panicked"), "{log}");
    stop_agent(agent);
}

/// The handle itself on a launcher VM whose agent leaves its agent monitor alone (no disk
/// share, no memory balancing): two threads share one session; `pause` and `resume` on the
/// main socket meanwhile; a new handle connects once the old one is gone (an agent restart); a
/// record without an agent monitor is reached per use; a killed QEMU is an error at once and
/// is not reconnected to.
#[test]
fn one_handle_one_session_and_errors_not_hangs_when_qemu_dies() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let s = Scratch::new();
    let mut vm = launch(&s, "hand", "");
    let h = Arc::new(Qmp::for_agent(&vm.record));
    assert!(h.keeps_session());
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let h = Arc::clone(&h);
            std::thread::spawn(move || {
                for _ in 0..25 {
                    h.run_state().unwrap();
                    let probe = h.balloon_probe().unwrap();
                    assert_eq!(probe.boot_mb, 128);
                }
            })
        })
        .collect();
    for _ in 0..3 {
        assert!(s.cli(&["pause", "hand"]).status.success());
        assert_eq!(h.run_state().unwrap(), "paused");
        assert!(s.cli(&["resume", "hand"]).status.success());
        assert_eq!(h.run_state().unwrap(), "running");
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.connections(), 1);

    // The agent restarts: its new handle gets the monitor the old one closed.
    drop(h);
    let h = Qmp::for_agent(&vm.record);
    assert_eq!(h.run_state().unwrap(), "running");
    assert_eq!(h.connections(), 1);

    // An older launcher's record: the main socket, a session per call (it is free between
    // them: the CLI's pause goes through).
    let mut old = vm.record.clone();
    old.agent_socket = None;
    let per_use = Qmp::for_agent(&old);
    assert!(!per_use.keeps_session());
    for _ in 0..5 {
        assert_eq!(per_use.run_state().unwrap(), "running");
    }
    assert!(s.cli(&["pause", "hand"]).status.success());
    assert_eq!(per_use.run_state().unwrap(), "paused");
    assert!(s.cli(&["resume", "hand"]).status.success());
    assert_eq!(per_use.connections(), 0);

    // QEMU killed: an error, at once, every time; nothing to connect to.
    kill(Pid::from_raw(vm.record.pid as i32), Signal::SIGKILL).unwrap();
    vm.wait(Duration::from_secs(10));
    for _ in 0..3 {
        let t = Instant::now();
        let e = h.run_state().unwrap_err();
        eprintln!("after the kill: {e} ({:?})", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    assert_eq!(h.connections(), 1);
    stop_agent(live_agent(&s, None));
}

/// (d) with the agent: a VM whose record has no agent monitor (an older launcher's) gets its
/// disk stage per use on the main socket, which stays free between periods.
#[test]
fn a_record_without_an_agent_monitor_is_reached_per_use_on_the_main_socket() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let s = Scratch::new();
    let vm = launch(&s, "old", "");
    let first = live_agent(&s, None);
    // The record as an older launcher wrote it, read by the next agent.
    let path = s.state().join("old").join(state::RECORD);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("agent_socket");
    write_replacing(&path, &serde_json::to_vec(&json).unwrap());
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let agent = live_agent(&s, Some(first));
    write_config(&s, "old", "vcpus = 1\nbaseline = 100\ndisk_share = 50\n");
    wait_until(
        "the disk stage on the main socket",
        Duration::from_secs(20),
        || disk_ok(&s, "old"),
    );
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(main_run_state(&vm.record), "running");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(s.cli(&["pause", "old"]).status.success());
    assert!(s.cli(&["resume", "old"]).status.success());
    assert!(disk_ok(&s, "old"), "{}", view(&s, "old"));
    assert_eq!(sessions(&s, "old"), 0, "{}", agent_log(&s));
    drop(vm);
    stop_agent(agent);
}

/// Writes `bytes` to `path` through a rename, as the launcher writes its record.
fn write_replacing(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Stops the agent the launcher started (it would otherwise idle 30 s before exiting).
fn stop_agent(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
}

/// Not a check: what a conversation costs per use on the main socket and over the kept
/// session (`cargo test --release --test agent_monitor -- --ignored --nocapture`). Five
/// launcher VMs; each round asks every VM `query-status` (one command, like the disk worker's
/// `query-blockstats`) through the handle; prints the median round's wall time and QEMU's CPU
/// time per conversation.
#[test]
#[ignore]
fn measure_session_cost() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let s = Scratch::new();
    let vms: Vec<Launched> = (0..5).map(|i| launch(&s, &format!("m{i}"), "")).collect();
    let qemu_cpu = || -> u64 {
        vms.iter()
            .map(|v| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", v.record.pid)).unwrap();
                let f: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .collect();
                f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
            })
            .sum()
    };
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for kept in [false, true, false, true] {
        let handles: Vec<Qmp> = vms
            .iter()
            .map(|v| {
                let mut r = v.record.clone();
                if !kept {
                    r.agent_socket = None;
                }
                Qmp::for_agent(&r)
            })
            .collect();
        let rounds = 400;
        let cpu0 = qemu_cpu();
        let mut times: Vec<f64> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                for h in &handles {
                    h.run_state().unwrap();
                }
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let cpu = (qemu_cpu() - cpu0) as f64 / tick;
        times.sort_by(f64::total_cmp);
        println!(
            "{}: round of 5 VMs median {:.3} ms (p90 {:.3}); QEMU CPU {:.1} µs per conversation",
            if kept { "kept session" } else { "per use     " },
            times[rounds / 2],
            times[rounds * 9 / 10],
            cpu * 1e6 / (rounds * handles.len()) as f64
        );
    }
    stop_agent(live_agent(&s, None));
}
