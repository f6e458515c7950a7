//! cgroup v2 on real kernels: the enforcement, fault and contention suites run again inside
//! Debian 12's own 6.1 and 6.12 kernels, booted cgroup-v2-only by the guest harness
//! (`tests/guest/run`), with this machine's root file system shared read-only into the guest,
//! so the guest runs these very test binaries, the burst-qemu just built and the host's QEMU
//! (nested, TCG). This machine's own v2 hierarchy has no cpu controller; these guests have.
//!
//! One boot per kernel runs its suites one after the other (each test binary with one test at
//! a time); a failure prints the part's output. A guest that dies of the known emulator fault is
//! booted again, once a run at most, for what had not finished (tests/common/guest.rs). Under
//! CI a missing QEMU, busybox or kernel package fails.

mod common;

use common::guest::{self, Part};

#[test]
fn the_enforcement_fault_and_contention_suites_pass_on_debian_6_12_with_cgroup_v2() {
    if !common::require_harness() {
        return;
    }
    let kernel = "debian-6.12";
    let mut parts = Part::each_test("enforcement", &[]);
    // Fifty nested TCG guests would only measure the nesting.
    parts.extend(Part::each_test("faults", &["fifty_vms"]));
    parts.extend(Part::each_test("contention", &[]));
    // Debian's kernels have no sched_ext: the scx enforcer refuses by name.
    parts.push(Part::new(
        "refusal",
        &[
            &common::bin_arg(),
            "agent",
            "--enforcer",
            "scx",
            "--state-dir",
            "/tmp/refusal",
        ],
    ));
    let ended = guest::run(kernel, 2, 2048, &[], &parts);
    let (refusal, tests) = ended.split_last().unwrap();
    guest::assert_all_passed(kernel, tests);
    assert!(
        refusal.status != 0
            && refusal
                .output
                .contains("this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT, Linux 6.12+)"),
        "agent --enforcer scx on a kernel without sched_ext (exit {}): {}",
        refusal.status,
        refusal.output
    );
}

#[test]
fn the_enforcement_suite_and_check_pass_on_debian_6_1_with_cgroup_v2() {
    if !common::require_harness() {
        return;
    }
    let kernel = "debian-6.1";
    let mut parts = Part::each_test("enforcement", &[]);
    parts.push(Part::new("check", &[&common::bin_arg(), "check"]));
    let ended = guest::run(kernel, 2, 2048, &[], &parts);
    let (check, tests) = ended.split_last().unwrap();
    guest::assert_all_passed(kernel, tests);
    assert!(
        check.output.contains(
            "ok  cgroup CPU bandwidth   cgroup v2 cpu controller at /sys/fs/cgroup is writable"
        ),
        "{}",
        check.output
    );
}
