//! `adopt`'s groundwork on real QEMU started by a plain shell command (as a script, Proxmox's
//! `qm` or Incus would): its vCPU threads found through a free QMP socket, else by their names,
//! and refused with the reason when they cannot be identified.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use burst_qemu::source::adopt::{self, AdoptError, Via};
use burst_qemu::source::threads;
use burst_qemu::testguest::{self, Behaviour};

/// A QEMU started in the background by `sh -c '… &'`, so that it is no child of this test
/// (the shell exits at once); killed on drop.
struct ShellQemu {
    pid: u32,
    qmp: Option<PathBuf>,
}

impl ShellQemu {
    /// `extra` are QEMU arguments beyond the test guest's; `qmp`: a socket to serve.
    /// `named`: how many vCPU-named threads it will have (see `wait_ready`).
    fn start(dir: &Path, tag: &str, extra: &[&str], qmp: bool, named: usize) -> ShellQemu {
        let image = dir.join("busy.bin");
        if !image.exists() {
            testguest::write(&image, Behaviour::Busy).unwrap();
        }
        // An `-accel` in `extra` replaces the default (QEMU takes the first one given).
        let accel = extra
            .iter()
            .position(|a| *a == "-accel")
            .map_or("tcg,thread=multi", |i| extra[i + 1]);
        let mut args = testguest::qemu_command(&image, accel, 16);
        let mut rest = extra.iter();
        while let Some(a) = rest.next() {
            if *a == "-accel" {
                rest.next();
            } else {
                args.push(a.to_string());
            }
        }
        let socket = dir.join(format!("{tag}.qmp"));
        if qmp {
            args.extend([
                "-qmp".to_owned(),
                format!("unix:{},server=on,wait=off", socket.display()),
            ]);
        }
        let line = format!("{} >/dev/null 2>&1 & echo $!", args.join(" "));
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let q = ShellQemu {
            pid,
            qmp: qmp.then_some(socket),
        };
        q.wait_ready(named);
        q
    }

    /// Until `named` threads are named `CPU n/…` or `ALL CPUs/TCG` (0: QEMU names none; then
    /// until it has the main thread, RCU and a vCPU) and its socket exists.
    fn wait_ready(&self, named: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let threads = threads::list(Path::new("/proc"), self.pid).unwrap_or_default();
            let vcpu_named = threads
                .iter()
                .filter(|(_, c)| c.starts_with("CPU ") || c == "ALL CPUs/TCG")
                .count();
            let ready = if named == 0 {
                threads.len() >= 3
            } else {
                vcpu_named >= named
            };
            if ready && self.qmp.as_ref().is_none_or(|s| s.exists()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU {} did not come up",
                self.pid
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ShellQemu {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let Some(s) = &self.qmp {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn proc() -> &'static Path {
    Path::new("/proc")
}

#[test]
fn a_free_qmp_socket_gives_the_vcpu_threads_and_they_burn_cpu() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = ShellQemu::start(
        dir.path(),
        "a",
        &["-smp", "2", "-name", "a,debug-threads=on"],
        true,
        2,
    );
    let found = adopt::find_vcpu_threads(proc(), q.pid, q.qmp.as_deref(), 2).unwrap();
    assert_eq!(found.via, Via::Qmp);
    assert_eq!(found.pid, q.pid);
    // The names agree with QMP.
    assert_eq!(
        threads::vcpu_threads(proc(), q.pid).unwrap().unwrap(),
        found.vcpu_tids
    );
    // Busy vCPUs: well above 0.2 s of CPU each over a second (measured 0.99 s with the machine
    // to ourselves, 0.50 s while other developers built beside us).
    let read = || -> Vec<u64> {
        found
            .vcpu_tids
            .iter()
            .map(|&t| {
                burst_qemu::procfs::Proc::host()
                    .thread_cpu_ns(q.pid, t)
                    .unwrap()
            })
            .collect()
    };
    let before = read();
    sleep(Duration::from_secs(1));
    let used: Vec<u64> = read().iter().zip(before).map(|(a, b)| a - b).collect();
    eprintln!("vCPU threads used {used:?} ns in 1 s");
    let floor = if common::nested_guest() {
        50_000_000
    } else {
        200_000_000
    };
    assert!(used.iter().all(|&n| n > floor), "{used:?}");
}

#[test]
fn a_busy_qmp_socket_falls_back_to_the_thread_names() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = ShellQemu::start(
        dir.path(),
        "b",
        &["-smp", "2", "-name", "b,debug-threads=on"],
        true,
        2,
    );
    // A manager holds the monitor (QEMU serves one client).
    let _holder = qmp::Client::connect(q.qmp.as_ref().unwrap(), Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    let found = adopt::find_vcpu_threads(proc(), q.pid, q.qmp.as_deref(), 2).unwrap();
    let waited = started.elapsed();
    match &found.via {
        Via::ThreadNames {
            qmp_skipped: Some(why),
        } => assert!(why.contains("b.qmp"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(found.vcpu_tids.len(), 2);
    assert!(
        waited < adopt::QMP_TIMEOUT + Duration::from_secs(2),
        "{waited:?}"
    );
}

#[test]
fn a_qemu_without_names_or_qmp_is_refused_with_what_would_help() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = ShellQemu::start(dir.path(), "c", &["-smp", "2"], false, 0);
    let e = adopt::find_vcpu_threads(proc(), q.pid, None, 2).unwrap_err();
    assert!(matches!(e, AdoptError::Unidentified { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("debug-threads=on") && text.contains("--qmp"),
        "{text}"
    );
}

#[test]
fn single_threaded_tcg_is_refused_by_qmp_and_by_names() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = ShellQemu::start(
        dir.path(),
        "d",
        &[
            "-smp",
            "2",
            "-name",
            "d,debug-threads=on",
            "-accel",
            "tcg,thread=single",
        ],
        true,
        1,
    );
    let by_qmp = adopt::find_vcpu_threads(proc(), q.pid, q.qmp.as_deref(), 2)
        .unwrap_err()
        .to_string();
    assert!(by_qmp.contains("one thread runs several vCPUs"), "{by_qmp}");
    let by_names = adopt::find_vcpu_threads(proc(), q.pid, None, 2)
        .unwrap_err()
        .to_string();
    assert!(by_names.contains("ALL CPUs/TCG"), "{by_names}");
}

#[test]
fn another_qemus_socket_and_a_wrong_count_are_refused() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = ShellQemu::start(
        dir.path(),
        "e",
        &["-smp", "1", "-name", "e,debug-threads=on"],
        false,
        1,
    );
    let b = ShellQemu::start(
        dir.path(),
        "f",
        &["-smp", "1", "-name", "f,debug-threads=on"],
        true,
        1,
    );
    let e = adopt::find_vcpu_threads(proc(), a.pid, b.qmp.as_deref(), 1).unwrap_err();
    assert!(matches!(e, AdoptError::ForeignSocket { .. }), "{e}");
    assert!(e.to_string().contains("belongs to another QEMU"), "{e}");
    let e = adopt::find_vcpu_threads(proc(), b.pid, b.qmp.as_deref(), 3)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "pid {}: --vcpus is 3 but 1 vCPU threads were found (QMP query-cpus-fast)",
            b.pid
        )
    );
}
