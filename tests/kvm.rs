//! The launcher and enforcement suites again under KVM (`BURST_QEMU_TEST_ACCEL=kvm`: the test
//! guest runs with `-accel kvm`, its vCPU threads named `CPU n/KVM`), wherever `/dev/kvm` can
//! run the project's test guest. It can on these machines, whose `/dev/kvm` is a software KVM
//! (kvm-pvm) on which Linux guests do not boot; a host without a usable `/dev/kvm` skips these
//! with the reason, loudly. Under CI that is a failure unless `BURST_QEMU_NO_KVM=1` says the CI
//! machine has no KVM on purpose (then the skip is still printed).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use burst_qemu::testguest::Behaviour::Busy;
use common::*;

/// Whether `/dev/kvm` runs the test guest: a 2-vCPU spinning guest under `-accel kvm` whose
/// vCPU threads are named `CPU n/KVM` and both run (more than a third of a CPU each over a
/// second); otherwise why not.
fn kvm_runs_the_test_guest() -> Result<(), String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm".into());
    }
    let s = Scratch::new();
    let mut args =
        burst_qemu::testguest::qemu_command(std::path::Path::new(&s.firmware(Busy)), "kvm", 16);
    // QEMU names its vCPU threads only with debug-threads=on (the launcher adds it).
    args.extend([
        "-smp".into(),
        "2".into(),
        "-name".into(),
        "bq-kvm-probe,debug-threads=on".into(),
    ]);
    let mut qemu = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args[0]))?;
    let pid = qemu.id();
    let result = (|| {
        let mut tids = Vec::new();
        for _ in 0..200 {
            tids = (0..2)
                .filter_map(|i| {
                    std::fs::read_dir(format!("/proc/{pid}/task"))
                        .ok()?
                        .flatten()
                        .find(|t| {
                            std::fs::read_to_string(t.path().join("comm"))
                                .is_ok_and(|c| c.trim() == format!("CPU {i}/KVM"))
                        })
                        .and_then(|t| t.file_name().to_str()?.parse::<u32>().ok())
                })
                .collect();
            if tids.len() == 2 {
                break;
            }
            if qemu.try_wait().ok().flatten().is_some() {
                return Err("QEMU exited at once under -accel kvm".to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if tids.len() != 2 {
            return Err("no threads named CPU 0/KVM and CPU 1/KVM under -accel kvm".into());
        }
        let busy = shares(pid, &tids, Duration::from_secs(1));
        if busy.iter().all(|&p| p > 33.0) {
            Ok(())
        } else {
            Err(format!(
                "the test guest's vCPUs hardly run under KVM: {busy:?} % of a CPU"
            ))
        }
    })();
    let _ = qemu.kill();
    let out = qemu.wait_with_output().unwrap();
    result.map_err(|e| format!("{e}; QEMU said: {}", String::from_utf8_lossy(&out.stderr)))
}

fn require_kvm() -> bool {
    if !require_qemu() {
        return false;
    }
    match kvm_runs_the_test_guest() {
        Ok(()) => true,
        Err(why) => {
            let why = format!("KVM cannot run the test guest here ({why}): the KVM variants of the launcher and enforcement suites did not run");
            if std::env::var_os("BURST_QEMU_NO_KVM").is_some() {
                eprintln!("\n*** SKIPPED (BURST_QEMU_NO_KVM set): {why} ***\n");
            } else {
                skip_or_fail(&format!(
                    "{why}; set BURST_QEMU_NO_KVM=1 where CI has no KVM on purpose"
                ));
            }
            false
        }
    }
}

/// Runs sibling test binary `binary` with the test guest under KVM, one test at a time.
fn suite(binary: &str) {
    if !require_kvm() {
        return;
    }
    let out = Command::new(sibling(binary))
        .args(["--test-threads", "1"])
        .env("BURST_QEMU_TEST_ACCEL", "kvm")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success() && text.contains("test result: ok"),
        "the {binary} suite under KVM failed"
    );
    assert!(
        !text.contains("SKIPPED"),
        "the {binary} suite skipped tests under KVM"
    );
}

#[test]
fn the_launcher_suite_passes_under_kvm() {
    suite("launcher");
}

#[test]
fn the_enforcement_suite_passes_under_kvm() {
    suite("enforcement");
}
