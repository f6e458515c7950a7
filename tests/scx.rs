//! sched_ext on a real kernel: the enforcement suite and the scx enforcer's own suite
//! (tests/scx_inside/) run inside the `scx-6.12` guest kernel (Linux 6.12 with
//! CONFIG_SCHED_CLASS_EXT), booted by the guest harness (`tests/guest/run`) with this machine's
//! root shared read-only, so the guest runs these very test binaries and the burst-qemu just
//! built with `--features scx`. The agent there runs `--enforcer scx` (BURST_QEMU_ENFORCER),
//! with the vCPU threads on CPUs 1-2 of 3 (on 6.12 the fair class runs before sched_ext, so the
//! guest's own busy threads stay on CPU 0 as much as the kernel lets them).
//!
//! One boot runs both suites, the contention scenarios (tests/contention.rs) and `check`, one
//! after the other (each test starts and ends its own agent, whose scheduler unloads when its
//! VMs are gone).
//!
//! This guest runs on single-threaded TCG (`-accel tcg,thread=single`). Each scheduler load and
//! unload flips sched_ext's static keys, which the kernel patches in place through an `int3`
//! while the other CPUs run; multi-threaded TCG may then run a stale translation of the patched
//! code on another vCPU, and the guest dies of "Oops: int3" (the known emulator fault,
//! tests/common/guest.rs). The stop-25 CI lost two boots of this test to it in one run, at
//! about 32 s, in `swapper/2`. With one thread for all vCPUs a patch is seen by every vCPU
//! before it next runs, so the fault has no way to happen; the cost measured here is 197 s for
//! this test against 150-157 s multi-threaded (ci-2, ci-3). A death of the guest of that fault
//! would still be retried once a run and counted.
//!
//! Built only with the `scx` feature (Cargo.toml `required-features`). Under CI a missing
//! QEMU, busybox or kernel fails.

mod common;

use common::guest::{self, Part};

const KERNEL: &str = "scx-6.12";

#[test]
fn the_enforcement_and_scx_suites_and_check_pass_on_linux_6_12_with_sched_ext() {
    if !common::require_harness() {
        return;
    }
    let mut parts = Part::each_test("enforcement", &[]);
    parts.extend(Part::each_test("scx_inside", &[]));
    // The one-rule scenarios: the split by the planner's entitlements (issue 20).
    parts.extend(Part::each_test("contention", &[]));
    // The user-space dispatch mode (`--scx-dispatch user`): the cap, and identical VMs'
    // equal shares. Its split of an overcommitted host is not run here: a debug build's
    // scheduler process (a plain `cargo nextest run`) takes about 15 ms of CPU a decision in
    // this emulated guest, the VMs receive 1.7–1.9 CPUs of 2 and the split is 3–4 points off;
    // the release build's (what `.ci/run` gives the guests, `common::bin_path`) is 1.30–1.76
    // points off, too near a 2-point bound to assert from two boots (the README's enforcer
    // section has the figures).
    for (binary, test) in [
        (
            "scx_inside",
            "the_bpf_scheduler_not_cpu_max_holds_the_vcpu_threads",
        ),
        ("contention", "identical_busy_vms_get_equal_shares"),
        (
            "scx_inside",
            "changes::vcpu_threads_repinned_and_reniced_all_the_time_keep_running_and_held",
        ),
    ] {
        let bin = common::sibling(binary);
        parts.push(Part::new(
            &format!("user-dispatch::{binary}::{test}"),
            &[
                "env",
                "BURST_QEMU_SCX_DISPATCH=user",
                bin.to_str().unwrap(),
                "--exact",
                test,
                "--nocapture",
            ],
        ));
    }
    parts.push(Part::new("check", &[&common::bin_arg(), "check"]));
    // 3 CPUs: the vCPU threads on 1-2, the rest of the guest on 0.
    let ended = guest::run(
        KERNEL,
        3,
        2048,
        &[
            ("BURST_QEMU_ENFORCER", "scx"),
            ("BURST_QEMU_SCX_CPUS", "1-2"),
            // Read by tests/guest/run: see the module docs.
            ("BURST_QEMU_GUEST_ACCEL", "tcg,thread=single"),
        ],
        &parts,
    );
    let (check, tests) = ended.split_last().unwrap();
    guest::assert_all_passed(KERNEL, tests);
    for part in tests {
        // The kernel's console lines land in the part that ran meanwhile. A vCPU thread the
        // scheduler held until the watchdog disabled it leaves a VM's share whole when its
        // other vCPU takes it, so the tests could pass: 2 of 5 boots of the user-space
        // identical-VMs test before the process found such threads itself
        // (docs/sched-ext.md, "Threads whose reports were lost").
        assert!(
            !part.output.contains("runnable task stall"),
            "{}: a thread the scheduler never ran until the watchdog:\n{}",
            part.label,
            part.output
        );
    }
    assert!(
        check.output.contains("ok  sched_ext              kernel supports sched_ext (state disabled, no BPF scheduler loaded); this build has the sched_ext scheduler (feature scx); agent --enforcer scx can run"),
        "{}",
        check.output
    );
}

/// What `agent --enforcer scx` refuses before it looks at the kernel (here, on the host).
#[test]
fn agent_enforcer_scx_refuses_cpu_pinning_and_a_bad_cpu_list_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, says) in [
        (
            &["--balance", "cpu"][..],
            "--balance cpu: with --enforcer scx, the sched_ext scheduler places the vCPU threads itself",
        ),
        (
            &["--scx-cpus", "3-1"][..],
            "invalid value '3-1' for '--scx-cpus",
        ),
    ] {
        let out = common::bin()
            .args(["agent", "--enforcer", "scx", "--state-dir"])
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}
