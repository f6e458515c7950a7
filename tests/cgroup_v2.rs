//! cgroup v2 on real kernels: the enforcement, fault and contention suites run again inside
//! Debian 12's own 6.1 and 6.12 kernels, booted cgroup-v2-only by the guest harness
//! (`tests/guest/run`), with this machine's root file system shared read-only into the guest,
//! so the guest runs these very test binaries, the burst-qemu just built and the host's QEMU
//! (nested, TCG). This machine's own v2 hierarchy has no cpu controller; these guests have.
//!
//! Each test boots one guest and runs one sibling test binary in it, one test at a time; a
//! failure prints the guest's output. Under CI a missing QEMU, busybox or kernel package fails.

mod common;

/// Boots `kernel` and runs `command` in it; panics with the guest's output unless it exits 0.
fn in_guest(kernel: &str, command: &[&str]) -> String {
    let (text, ok) = common::boot_guest(kernel, 2, command, &[]);
    assert!(ok, "in the {kernel} guest: failed");
    text
}

fn suite(kernel: &str, binary: &str, extra: &[&str]) {
    if !common::require_harness() {
        return;
    }
    let bin = common::sibling(binary);
    let mut command = vec![bin.to_str().unwrap(), "--test-threads", "1"];
    command.extend_from_slice(extra);
    let text = in_guest(kernel, &command);
    assert!(text.contains("test result: ok"), "{text}");
}

#[test]
fn the_enforcement_suite_passes_on_debian_6_12_with_cgroup_v2() {
    suite("debian-6.12", "enforcement", &[]);
}

#[test]
fn the_enforcement_suite_passes_on_debian_6_1_with_cgroup_v2() {
    suite("debian-6.1", "enforcement", &[]);
}

#[test]
fn the_fault_suite_passes_on_debian_6_12_with_cgroup_v2() {
    // Fifty nested TCG guests would only measure the nesting.
    suite("debian-6.12", "faults", &["--skip", "fifty_vms"]);
}

#[test]
fn the_contention_test_passes_on_debian_6_12_with_cgroup_v2() {
    suite("debian-6.12", "contention", &[]);
}

#[test]
fn check_reports_cgroup_v2_usable_inside_the_guest() {
    if !common::require_harness() {
        return;
    }
    let text = in_guest("debian-6.1", &[env!("CARGO_BIN_EXE_burst-qemu"), "check"]);
    assert!(
        text.contains(
            "ok  cgroup CPU bandwidth   cgroup v2 cpu controller at /sys/fs/cgroup is writable"
        ),
        "{text}"
    );
}
