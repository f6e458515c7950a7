//! sched_ext on a real kernel: the enforcement suite and the scx enforcer's own suite
//! (tests/scx_inside.rs) run inside the shared `scx-6.12` guest kernel (Linux 6.12.117 with
//! CONFIG_SCHED_CLASS_EXT), booted by the guest harness (`tests/guest/run`) with this machine's
//! root shared read-only, so the guest runs these very test binaries and the burst-qemu just
//! built with `--features scx`. The agent there runs `--enforcer scx` (BURST_QEMU_ENFORCER),
//! with the vCPU threads on CPUs 1-2 of 3 (on 6.12 the fair class runs before sched_ext, so the
//! guest's own busy threads stay on CPU 0 as much as the kernel lets them).
//!
//! Built only with the `scx` feature (Cargo.toml `required-features`). Under CI a missing
//! QEMU, busybox or kernel fails.

mod common;

use std::process::Command;

/// Runs `command` in the guest; panics with its output unless it exits 0. Up to two more
/// boots, each said loudly, when the guest kernel panicked: QEMU 7.2's multi-threaded TCG
/// sometimes runs stale code while the kernel patches a static key (an `int3` oops, or an
/// invalid opcode at a half-patched jump; sched_ext flips several keys whenever a scheduler
/// loads or unloads, boot flips some too, and a loaded host makes it likelier), which no real
/// CPU does. Our BPF code cannot panic the kernel: a BPF scheduler's error only unloads it.
fn in_guest(command: &[&str]) -> String {
    for attempt in 1..=3 {
        // 3 CPUs: the vCPU threads on 1-2, the rest of the guest on 0.
        let (text, ok) = common::boot_guest(
            "scx-6.12",
            3,
            command,
            &[
                ("BURST_QEMU_ENFORCER", "scx"),
                ("BURST_QEMU_SCX_CPUS", "1-2"),
            ],
        );
        if !ok && text.contains("Kernel panic") && attempt < 3 {
            eprintln!(
                "*** attempt {attempt}: the guest kernel panicked (TCG's code-patching race, see above); booting again ***\n"
            );
            continue;
        }
        assert!(ok, "in the scx-6.12 guest (attempt {attempt})");
        return text;
    }
    unreachable!()
}

/// Runs each test of sibling binary `binary` in a guest of its own (a short run, so that an
/// emulator fault costs one test's boot, not the suite's).
fn suite(binary: &str) {
    if !common::require_harness() {
        return;
    }
    let bin = common::sibling(binary);
    let list = Command::new(&bin)
        .args(["--list", "--format", "terse"])
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test").map(str::to_owned))
        .collect();
    assert!(!names.is_empty(), "no tests listed by {}", bin.display());
    for name in &names {
        let text = in_guest(&[bin.to_str().unwrap(), "--exact", name, "--nocapture"]);
        assert!(text.contains("test result: ok. 1 passed"), "{name}: {text}");
        assert!(
            !text.contains("SKIPPED"),
            "{name} skipped in the guest: {text}"
        );
    }
}

#[test]
fn the_enforcement_suite_passes_on_the_scx_enforcer_on_linux_6_12() {
    suite("enforcement");
}

#[test]
fn the_scx_enforcers_own_suite_passes_on_linux_6_12() {
    suite("scx_inside");
}

#[test]
fn check_reports_sched_ext_inside_the_guest() {
    if !common::require_harness() {
        return;
    }
    let text = in_guest(&[env!("CARGO_BIN_EXE_burst-qemu"), "check"]);
    assert!(
        text.contains("ok  sched_ext              kernel supports sched_ext (state disabled, no BPF scheduler loaded); this build has the sched_ext scheduler (feature scx); agent --enforcer scx can run"),
        "{text}"
    );
}
