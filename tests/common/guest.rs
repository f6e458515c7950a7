//! Test binaries run inside guest kernels (tests/guest/run): one boot runs several independent
//! parts (whole test binaries, `burst-qemu check`), one after the other, and says which ended
//! how. A guest that dies with the known emulator fault (see [`emulator_fault`]) is booted again
//! for the parts that had not finished: said loudly with the console's trace, and counted in
//! `BURST_QEMU_GUEST_RETRIES` (a file `.ci/run` sets for the whole run; at most one retry a run,
//! or the test fails). Any other death of the guest fails at once.
//!
//! In CI's guest phase (nextest test group `guest-lanes`, `.config/nextest.toml`) as many
//! guests run at once as the host has CPUs, on single-threaded TCG with a clock that counts
//! the guest's instructions ([`lane_icount`]): a guest's vCPUs take turns on one host thread,
//! and what its suites measure is measured against that clock, which stands still while the
//! host runs something else. So the phase runs beside the others, in a cgroup that takes only
//! CPU time they leave idle (`.ci/run`).

mod warm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One thing to run in the guest: `argv` under `label`.
pub struct Part {
    pub label: String,
    pub argv: Vec<String>,
}

impl Part {
    pub fn new(label: &str, argv: &[&str]) -> Self {
        Part {
            label: label.to_owned(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Test `name` of sibling test binary `binary` (`binary::name`, run with `--exact` and
    /// `--nocapture`).
    pub fn test(binary: &str, name: &str) -> Self {
        let bin = super::sibling(binary);
        Part::new(
            &format!("{binary}::{name}"),
            &[bin.to_str().unwrap(), "--exact", name, "--nocapture"],
        )
    }

    /// Each test of sibling test binary `binary` but those whose names contain one of `skip`,
    /// a part apiece ([`Part::test`]): each is timed, and a retry after the emulator fault
    /// reruns only the tests that had not ended.
    pub fn each_test(binary: &str, skip: &[&str]) -> Vec<Self> {
        let bin = super::sibling(binary);
        let list = Command::new(&bin)
            .args(["--list", "--format", "terse"])
            .output()
            .unwrap();
        let parts: Vec<Part> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .filter(|name| !skip.iter().any(|s| name.contains(s)))
            .map(|name| Part::test(binary, name))
            .collect();
        assert!(!parts.is_empty(), "no tests listed by {}", bin.display());
        parts
    }
}

/// How a part ended: its exit status, its output and how long it ran (s, guest time).
pub struct Ended {
    pub label: String,
    pub status: i32,
    pub output: String,
    pub secs: f64,
}

impl Ended {
    /// Why this part did not pass: `None` when it exited 0, said `test result: ok. 1 passed`
    /// (one test of a test binary) and skipped nothing.
    fn failure(&self) -> Option<&'static str> {
        if self.status != 0 || !self.output.contains("test result: ok. 1 passed") {
            Some("failed")
        } else if self.output.contains("SKIPPED") {
            Some("skipped tests")
        } else {
            None
        }
    }
}

/// Panics unless every part of `ended` passed (see [`Ended::failure`]), naming all that did
/// not at the top of the message (a CI log cut to its head and tail still shows which), then
/// each one's exit status and output.
pub fn assert_all_passed(kernel: &str, ended: &[Ended]) {
    let failed: Vec<(&Ended, &str)> = ended
        .iter()
        .filter_map(|e| e.failure().map(|why| (e, why)))
        .collect();
    if failed.is_empty() {
        return;
    }
    let names: Vec<String> = failed
        .iter()
        .map(|(e, why)| format!("{} ({why}, exit {})", e.label, e.status))
        .collect();
    let outputs: Vec<String> = failed
        .iter()
        .map(|(e, why)| format!("=== {} {why} in the {kernel} guest:\n{}", e.label, e.output))
        .collect();
    panic!(
        "{} of {} parts did not pass in the {kernel} guest: {}\n\n{}",
        failed.len(),
        ended.len(),
        names.join(", "),
        outputs.join("\n")
    );
}

const BEGIN: &str = "BQ-PART-BEGIN ";
const END: &str = "BQ-PART-END ";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell script that runs `parts` in order, each between markers: one line (the harness
/// passes it quoted by bash's `printf %q`, whose `$'…\n…'` form busybox sh does not read).
fn script(parts: &[&Part]) -> String {
    parts
        .iter()
        .map(|p| {
            let argv: Vec<String> = p.argv.iter().map(|a| quote(a)).collect();
            format!(
                "echo \"{BEGIN}{label} $(cut -d' ' -f1 /proc/uptime)\"; {cmd} 2>&1; \
                 s=$?; echo \"{END}{label} $s $(cut -d' ' -f1 /proc/uptime)\"",
                label = p.label,
                cmd = argv.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The parts that ended in `output` (the harness's copy of the command's output).
fn ended(output: &str) -> Vec<Ended> {
    let mut done = Vec::new();
    let mut current: Option<(String, f64, String)> = None;
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix(BEGIN) {
            let mut f = rest.split_whitespace();
            let label = f.next().unwrap_or("").to_owned();
            let at = f.next().and_then(|t| t.parse().ok()).unwrap_or(0.0);
            current = Some((label, at, String::new()));
        } else if let Some(rest) = line.strip_prefix(END) {
            let mut f = rest.split_whitespace();
            let label = f.next().unwrap_or("");
            let status = f.next().and_then(|s| s.parse().ok());
            let at: f64 = f.next().and_then(|t| t.parse().ok()).unwrap_or(0.0);
            if let (Some((l, began, out)), Some(status)) = (current.take(), status) {
                if l == label {
                    done.push(Ended {
                        label: l,
                        status,
                        output: out,
                        secs: at - began,
                    });
                }
            }
        } else if let Some((_, _, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    done
}

/// The known emulator fault: QEMU 7.2's multi-threaded TCG runs a stale translation of kernel
/// text that the guest patched a moment before (a static key flipped through an `int3` and a
/// second write while another vCPU runs that code), which no real CPU does. Captured whole:
/// "Oops: int3: 0000 [#1]" at `update_curr+0x5e` (the `cfs_bandwidth_used()` key, flipped by
/// the first CPU quota), then "Kernel panic - not syncing: Fatal exception in interrupt".
/// tests/guest/run now flips that key at boot, before anything runs; sched_ext still flips
/// its own keys whenever a scheduler loads or unloads. Matches an `int3` trap or an invalid
/// opcode in kernel mode followed by the fatal-exception panic, and returns the console's trace
/// of it; `None` for any other death.
pub fn emulator_fault(console: &str) -> Option<String> {
    let panic = console.find("Kernel panic - not syncing: Fatal exception")?;
    let before = &console[..panic];
    let oops = [
        "int3: 0000 [#",
        "Oops: int3: 0000 [#",
        "invalid opcode: 0000 [#",
    ]
    .iter()
    .filter_map(|s| before.rfind(s))
    .max()?;
    // The whole trace: from the line before the oops line to the end of the panic.
    let start = before[..oops]
        .rfind("------------[ cut here ]")
        .unwrap_or_else(|| {
            before[..oops]
                .rfind('\n')
                .map_or(0, |n| before[..n].rfind('\n').map_or(0, |m| m + 1))
        });
    let end = console[panic..]
        .find("---[ end Kernel panic")
        .map_or(console.len(), |e| panic + e + 60)
        .min(console.len());
    Some(console[start..end].to_owned())
}

/// Counts one retry in this run's ledger; panics past the one a run allows.
fn count_retry(kernel: &str, test: &str) {
    let n = match std::env::var_os("BURST_QEMU_GUEST_RETRIES") {
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            writeln!(f, "{kernel} {test}").unwrap();
            drop(f);
            std::fs::read_to_string(&path).unwrap().lines().count()
        }
        None => {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
        }
    };
    eprintln!(
        "\n*** GUEST RETRY {n} of this run ({kernel}, {test}): the known TCG code-patching fault; at most 1 allowed ***\n"
    );
    assert!(
        n <= 1,
        "{n} guest boots of this run died of the emulator fault: more than the one allowed"
    );
}

/// QEMU's `-icount` for `kernel`'s guests in CI's guest lanes (tests/guest/run;
/// BURST_QEMU_GUEST_ICOUNT overrides it): 2^shift ns of guest time per instruction, and time
/// skipped while every vCPU sleeps (`sleep=off`). Measured on the 2-core machine (2026-12-07),
/// the guest phase alone: on the host's clock with each guest pinned to a CPU, 546 s (CI run
/// 55); unpinned with `shift=2`, 519 s, every test passed; with `shift=3` (a guest CPU of half
/// the speed, so half the host time for a busy second), 474 s, the Debian guests' suites passed
/// with the same figures (the debian-6.12 one-rule rows 0.2-0.5 points from the prediction, the
/// ledger within 0.0004 vCPU-s of the threads) in 127 s instead of 156 (balance 101 s instead of
/// 136, the package 109 instead of 120), but the scx-6.12 guest failed twice: a scheduler the
/// agent reloads took more than the 10 s liveness bound, and a one-rule row came out 3.6
/// points under (BPF dispatch costs twice the guest time there). So 2 for sched_ext.
fn lane_icount(kernel: &str) -> &'static str {
    if kernel.starts_with("scx") {
        "shift=2,sleep=off"
    } else {
        "shift=3,sleep=off"
    }
}

/// The CPU model of CI's guest lanes for `kernel` (tests/guest/run's BURST_QEMU_GUEST_CPU; a
/// value set outside wins): QEMU's `qemu64` for Debian's kernels rather than the harness's
/// `max`. The debian-6.12 suites in a lane alone took 104.8 and 106.2 s of the host's time with
/// it, against 129.5 and 124.6 s with `max` (2026-12-07, 7242a0e, one after the other), with
/// the same figures (one-rule rows within 1.3 points of the plan with both); the whole guest
/// phase alone, every Debian guest 10-20 % faster. Why was not measured: presumably the kernel
/// and the C library take their baseline x86-64 paths on a CPU with fewer features (no AVX2
/// copies, no speculation-control MSR writes, no XSAVE of wide registers), which the emulator
/// runs for less. The scx-6.12 guest keeps `max`: with `qemu64` a held VM once measured
/// 22.07 % for 20 (bound 1.5 points) after the bad-edit test's edits, not explained; that test
/// then passed 6 times of 6 on `qemu64`, and the suites took 353 and 370 s against 382-393 s
/// with `max`, a gain within one run's noise (docs/testing.md, the guest lanes).
fn lane_cpu(kernel: &str) -> String {
    std::env::var("BURST_QEMU_GUEST_CPU").unwrap_or_else(|_| {
        if kernel.starts_with("scx") {
            "max"
        } else {
            "qemu64"
        }
        .to_owned()
    })
}

/// Whether this test runs in CI's guest phase: nextest's `guest-lanes` test group.
fn in_lane() -> bool {
    std::env::var("NEXTEST_TEST_GROUP").as_deref() == Ok("guest-lanes")
}

/// In CI's guest lanes ([`in_lane`]), moves this test's process, and so all it starts, into
/// the cgroup that `BURST_QEMU_GUEST_CGROUP` names (`.ci/run`'s, which gets only the CPU time
/// the other phases leave idle); elsewhere does nothing. Called first by every guest test
/// (`require_harness`), before any work of its own: the package test's .deb build, done outside
/// beside phase 3, failed a share measured there (CI run 65). The guest phase's cargo and
/// nextest stay outside: starved in the cgroup beside phase 1, they held the first guest back
/// 74 s (CI run 64; docs/testing.md, the guest lanes).
pub fn enter_lane_cgroup() {
    let Some(dir) = std::env::var_os("BURST_QEMU_GUEST_CGROUP").filter(|_| in_lane()) else {
        return;
    };
    let procs = Path::new(&dir).join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
        panic!("moving this guest test into {}: {e}", procs.display());
    }
}

/// Where a guest's whole console is kept when it died: target/guest-consoles/.
fn console_dir() -> PathBuf {
    let me = std::env::current_exe().unwrap();
    // target/debug/deps/<binary> → target/guest-consoles
    let target = me.ancestors().nth(3).unwrap_or(Path::new("/tmp"));
    target.join("guest-consoles")
}

/// Boots `kernel` with `cpus` CPUs and `mem_mb`, with CI set and `env`, and runs `parts` in it
/// in order; returns how each ended. A guest that dies with the known emulator fault is booted
/// again once for the parts not yet ended (counted, see the module docs).
pub fn run(
    kernel: &str,
    cpus: u32,
    mem_mb: u32,
    env: &[(&str, &str)],
    parts: &[Part],
) -> Vec<Ended> {
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    // A guest lane: single-threaded TCG on an instruction-counting clock (see [`lane_icount`]).
    let icount = in_lane().then(|| {
        std::env::var("BURST_QEMU_GUEST_ICOUNT").unwrap_or_else(|_| lane_icount(kernel).to_owned())
    });
    let cpu = lane_cpu(kernel);
    if let Some(icount) = &icount {
        eprintln!(
            "{kernel} guest: in a guest lane, tcg,thread=single, -icount {icount}, -cpu {cpu}"
        );
    }
    // On a lane's clock a wait on the host's file system lasts many guest timers: what the
    // parts run is copied into the guest (see [`warm`]) before they start.
    let warm = match &icount {
        Some(_) => {
            let programs: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.argv.first())
                .map(String::as_str)
                .filter(|a| a.starts_with('/'))
                .collect();
            let warm = warm::Warm::new(&programs, &super::bin_arg(), super::QEMU);
            eprintln!("{kernel} guest: {}", warm.summary());
            warm.script(quote)
        }
        None => String::new(),
    };
    let mut done: Vec<Ended> = Vec::new();
    for attempt in 1.. {
        let pending: Vec<&Part> = parts
            .iter()
            .filter(|p| !done.iter().any(|d| d.label == p.label))
            .collect();
        if pending.is_empty() {
            break;
        }
        let dir = console_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join(format!("{kernel}-{}-{attempt}.log", std::process::id()));
        let t0 = Instant::now();
        let mut harness = Command::new(super::harness());
        if let Some(icount) = &icount {
            harness
                .env("BURST_QEMU_GUEST_ACCEL", "tcg,thread=single")
                .env("BURST_QEMU_GUEST_ICOUNT", icount)
                .env("BURST_QEMU_GUEST_CPU", &cpu);
        }
        let out = harness
            .args(["--kernel", kernel, "--cpus", &cpus.to_string()])
            // A hung guest's bound: the scx-6.12 suite took 1 038 s in CI run 19.
            .args(["--mem", &mem_mb.to_string(), "--timeout", "1700"])
            .arg("--keep-log")
            .arg(&console)
            .args(["--", "sh", "-c", &(warm.clone() + &script(&pending))])
            .env("CI", "1")
            .env("BURST_QEMU_GUEST_TIMING", "1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!(
            "{kernel} guest, boot {attempt}, {:.0} s: {}\n{stdout}{stderr}",
            t0.elapsed().as_secs_f64(),
            pending
                .iter()
                .map(|p| p.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let got = ended(&stdout);
        // Each part's output is kept (target/guest-output/KERNEL-LABEL.log): the measurements
        // the suites print inside the guest.
        let out_dir = console_dir().with_file_name("guest-output");
        std::fs::create_dir_all(&out_dir).unwrap();
        for e in &got {
            let name = e.label.replace("::", "-");
            let _ = std::fs::write(out_dir.join(format!("{kernel}-{name}.log")), &e.output);
        }
        let mut timings: Vec<String> = got
            .iter()
            .map(|e| format!("{:7.1} s  {}", e.secs, e.label))
            .collect();
        timings.sort();
        eprintln!(
            "{kernel} guest, boot {attempt}: each part's time\n{}",
            timings.join("\n")
        );
        let finished = got.len();
        done.extend(got);
        if finished == pending.len() {
            let _ = std::fs::remove_file(&console);
            break;
        }
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        match emulator_fault(&text) {
            Some(trace) => {
                eprintln!(
                    "*** the {kernel} guest died of the known emulator fault (whole console: {}); its trace:\n{trace}",
                    console.display()
                );
                count_retry(kernel, &test);
            }
            None => panic!(
                "the {kernel} guest ended before its parts did (harness exit {:?}; whole console in {}):\n{stderr}",
                out.status.code(),
                console.display()
            ),
        }
    }
    parts
        .iter()
        .map(|p| {
            let i = done.iter().position(|d| d.label == p.label).unwrap();
            done.swap_remove(i)
        })
        .collect()
}
