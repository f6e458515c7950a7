//! The sched_ext enforcer's own behaviour, on a real sched_ext kernel: run inside the scx-6.12
//! guest by tests/scx.rs (with BURST_QEMU_ENFORCER=scx), where the agent schedules the vCPU
//! threads with burst-qemu's BPF scheduler. Anywhere else (no sched_ext kernel, or a build
//! without the `scx` feature) these skip with a loud message: tests/scx.rs, which fails under
//! CI when the guest cannot run them, is what makes them count.

mod changes;
#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use burst_qemu::enforce::scx::{self, PERIOD};
use burst_qemu::testguest::Behaviour::Busy;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn ready() -> bool {
    let here = scx::BUILT
        && scx::kernel_supports()
        && std::env::var("BURST_QEMU_ENFORCER").as_deref() == Ok("scx");
    if !here {
        eprintln!(
            "\n*** SKIPPED: runs inside the scx-6.12 guest (tests/scx.rs, cargo test --features scx) ***\n"
        );
        return false;
    }
    require_qemu() && require_cgroups()
}

fn stats(s: &Scratch) -> scx::Stats {
    scx::read_stats(&s.state()).expect("the scheduler publishes scx.json")
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

/// Whether the kernel runs thread `tid` in the sched_ext class now (`ext.enabled` is not in
/// 6.12's /proc/PID/sched; the policy field of /proc/PID/task/TID/stat says SCHED_EXT, and the
/// scheduler being enabled in partial mode means such a thread is in the ext class).
fn policy(pid: u32, tid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    // Field 41 (policy); `after` starts at field 3.
    after.split(' ').nth(41 - 3).unwrap().parse().unwrap()
}

/// The quota in force on the VM's vCPU cgroup, in % of one CPU, and its period (s). Panics
/// when there is none (`max`, or no cgroup): a 2-vCPU VM could never exceed the 200 % that
/// would stand for it, so a comparison with it could not fail.
fn quota_pct(s: &Scratch, name: &str) -> (f64, f64) {
    let q = quota(s, name);
    let mut f = q.split_whitespace();
    match (
        f.next().and_then(|a| a.parse::<f64>().ok()),
        f.next().and_then(|p| p.parse::<f64>().ok()),
    ) {
        (Some(q), Some(p)) if q > 0.0 && p > 0.0 => (q * 100.0 / p, p / 1e6),
        _ => panic!("{name}: no CPU quota in force ({q:?}): nothing holds the VM"),
    }
}

/// A held VM measured against its cgroup quota over a window ([`against_quota`]), in % of one
/// CPU: what it used, the quota's mean over the window, and the most CFS bandwidth control lets
/// it use there.
struct AgainstQuota {
    used: f64,
    allowed: f64,
    bound: f64,
}

/// The most a VM held to `allowed` % of one CPU by a cgroup quota of period `period` (s) can
/// run in a window of `window` s: the quota of every period that starts in the window (a busy
/// VM spends each period's quota at its start: a window of 1.012 s holds 11 of them, 21.74 %
/// at 20 %), plus the 5-ms slice (kernel.sched_cfs_bandwidth_slice_us) that each CPU of its two
/// vCPUs may hold from before the window. Measured against it in this guest: 22.07 % at 20 %
/// over 1.012 s (CI run 73, a bound of 22.7), 19.90 and 20.25 % before; 24 % over about a
/// second when a new agent rewrote the quota (a rewrite refills the period's runtime,
/// examples/quota_writes.rs), which this bound fails.
fn quota_bound(allowed: f64, period: f64, window: f64) -> f64 {
    allowed * (window / period).ceil() * period / window + 2.0 * 0.005 * 100.0 / window
}

impl std::fmt::Display for AgainstQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{:.2} % of one CPU, quota {:.2} %, bound {:.2} %",
            self.used, self.allowed, self.bound
        )
    }
}

impl AgainstQuota {
    /// Asserts that the VM ran within [`quota_bound`]; `what` names the situation.
    fn assert_held(&self, what: &str) {
        assert!(self.used <= self.bound, "{what}: {self}");
    }
}

/// The VM's CPU share over `secs`, or until `holds()` turns false (say, a new BPF scheduler
/// starts loading: while it enables, the kernel runs every SCHED_EXT thread in its bypass mode,
/// held by neither), and the mean of its cgroup quota sampled every 20 ms over the same time,
/// both in % of one CPU, with the bound [`quota_bound`] sets for the window. The window must
/// last `min_secs` and hold 10 samples at least (a window of a few periods says nothing: one
/// period's quota is 2 points of a second).
fn against_quota(
    s: &Scratch,
    name: &str,
    vm: &Launched,
    secs: f64,
    min_secs: f64,
    holds: impl Fn() -> bool,
) -> AgainstQuota {
    let cpu = || vm.vcpu_cpu_ns();
    // The window runs from before the first read of the threads' CPU time to after the last:
    // it holds both reads even when this thread waits between a read and its clock (this
    // guest's three vCPUs share one emulator thread), at the price of the reads' own time
    // (printed: microseconds when nothing waits).
    let t0 = Instant::now();
    let before = cpu();
    let read0 = t0.elapsed();
    let mut samples = Vec::new();
    while t0.elapsed().as_secs_f64() < secs && holds() {
        samples.push(quota_pct(s, name));
        std::thread::sleep(Duration::from_millis(20));
    }
    let t1 = Instant::now();
    let after = cpu();
    let window = t0.elapsed();
    let used = (after - before) as f64 * 100.0 / window.as_nanos() as f64;
    eprintln!(
        "(measured over {window:?}, {} quota samples; the reads took {read0:?} and {:?})",
        samples.len(),
        t1.elapsed()
    );
    assert!(
        window.as_secs_f64() >= min_secs && samples.len() >= 10,
        "a window of {window:?} with {} samples: too short to compare with the quota",
        samples.len()
    );
    let allowed = samples.iter().map(|q| q.0).sum::<f64>() / samples.len() as f64;
    let period = samples.iter().map(|q| q.1).fold(0.0, f64::max);
    AgainstQuota {
        used,
        allowed,
        bound: quota_bound(allowed, period, window.as_secs_f64()),
    }
}

/// Waits for the scheduler's next publish of its stats (`scx.json`, once a second), then reads
/// the VM's vCPU threads' CPU at once: (stats, CPU ns, when).
fn at_stats_publish(s: &Scratch, vm: &Launched) -> (scx::Stats, u64, Instant) {
    let path = scx::stats_path(&s.state());
    let first = std::fs::read(&path).unwrap_or_default();
    wait_until("a stats publish", Duration::from_secs(5), || {
        std::fs::read(&path).is_ok_and(|b| b != first)
    });
    (stats(s), vm.vcpu_cpu_ns(), Instant::now())
}

fn scheduler_gone() -> bool {
    scx::kernel_state().is_some_and(|(st, _)| st == "disabled")
}

/// Waits up to `within` for every vCPU thread of `vms` to be in SCHED_EXT (the agent moves
/// them once its scheduler is enabled, at its next tick), then 300 ms more for the scheduler
/// to have them in hand.
fn in_sched_ext(vms: &[&Launched], within: Duration) {
    wait_until("the vCPU threads in SCHED_EXT", within, || {
        vms.iter().all(|vm| {
            vm.record
                .vcpu_tids
                .iter()
                .all(|&t| policy(vm.record.pid, t) == 7)
        })
    });
    std::thread::sleep(Duration::from_millis(300));
}

fn start_held_vm(s: &Scratch, name: &str) -> Launched {
    let vm = Launched::start(
        s,
        name,
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    view(s, name);
    expect_enforcer(s, name);
    vm
}

#[test]
fn the_bpf_scheduler_not_cpu_max_holds_the_vcpu_threads() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = start_held_vm(&s, "held");
    in_sched_ext(&[&vm], Duration::from_secs(2));
    // The scheduler's count and the threads' own, read at its publishes (once a second): the
    // same moments, within the 5 ms poll.
    let (whole0, cpu0, t0) = at_stats_publish(&s, &vm);
    std::thread::sleep(Duration::from_secs(4));
    let (whole1, cpu1, t1) = at_stats_publish(&s, &vm);
    let (before, after) = (whole0.vms["held"].clone(), whole1.vms["held"].clone());
    let window = (t1 - t0).as_nanos() as f64;
    let measured = (cpu1 - cpu0) as f64 * 100.0 / window;
    let charged = (after.cpu_ns - before.cpu_ns) as f64 * 100.0 / window;
    eprintln!(
        "held to 20 %: measured {measured:.2} %, charged by the BPF scheduler {charged:.2} % \
         over {:.2} s, held back {} times; grant {} then {} ns per period",
        window / 1e9,
        after.held - before.held,
        before.grant_ns,
        after.grant_ns
    );
    report_decisions(&whole0, &whole1);
    // BPF dispatch: 19.3–20.7 % in CI runs, 19.99 and 20.03 % in the last two. User-space
    // dispatch (BURST_QEMU_SCX_DISPATCH=user, tests/scx.rs): 18.30, 19.44, 19.67 and 22.21 %
    // in the four runs of its final shape, then on the slower host of CI run 19 (where the
    // runnable-to-run waits averaged 54–69 ms, not 5–6) 19.52, 19.03, 17.74 and 14.97 %: its
    // decisions and the reports they rest on cross CPUs late in this emulated guest (a debug
    // build, TCG), and a thread that waits for its order waits past its window's budget.
    // Since: 15.96, 16.14, 17.38, 18.14 (2026-12-06 morning), 18.22, 16.31 and 14.02 % (the
    // afternoon's boots, waits of 58-66 ms), so the bound below is 6.5 points under; and once
    // 105.39 % (charged 103.41 %, 161 runs, nothing failed or stale in the counts), which the
    // upper bound catches and which is not explained. Since 69c361d (a slice runs whole from
    // its reported start, and the kernel runs what was ordered): 19.99, 20.28 and 20.41 %
    // (this debug build), 21.18 and 21.03 % (a release build); 20.45 and 20.86 % (release)
    // once a thread taken off is charged a tick more until its stop is reported. So 3 points
    // under and 2 over.
    let user = whole1.dispatch == "user";
    let (under, over) = if user { (3.0, 2.0) } else { (1.5, 1.5) };
    assert!(
        (-under..=over).contains(&(measured - 20.0)),
        "measured {measured:.2} %"
    );
    // Every CPU ns the threads ran went through the BPF scheduler, and it held them back. It
    // charges a thread when it stops running, so a slice in progress at either end may be
    // missing: measured 0.28 points apart over 5 s, twice (BPF dispatch; 5-ms slices), and
    // 0.00 and 0.50 with user-space dispatch, whose turns are 20 ms.
    let apart = if user { 1.0 } else { 0.5 };
    assert!(
        (charged - measured).abs() <= apart,
        "charged {charged:.2} % against {measured:.2} % measured"
    );
    if whole1.dispatch == "user" {
        // The process decided every run: each run the kernel made was ordered, or is a
        // thread going on where it was paused (the fair class took its CPU for a while; the
        // thread waits at the head of that CPU's queue). CI run 19 (a slower guest, more of
        // the fair class on the managed CPUs) counted 54 such resumptions among 194 runs, and
        // a check of the orders alone (90 %) failed there.
        let (u0, u1) = (whole0.user.unwrap(), whole1.user.unwrap());
        let runs = whole1.latency.runs - whole0.latency.runs;
        assert!(runs > 0, "no run in the window");
        let decided = (u1.runs - u0.runs) + (u1.paused - u0.paused);
        assert!(
            decided >= runs * 9 / 10,
            "{u0:?} then {u1:?}: {decided} ordered or resumed for {runs} runs"
        );
    } else {
        // The program holds the threads back itself (the user-space mode has no such count:
        // the process never orders a run the budget does not allow).
        assert!(after.held > before.held, "never held: {after:?}");
    }
    // The grant stays the baseline while the VM runs all of it. A VM that runs short of its
    // baseline earns credits, which the smooth decline turns into a grant above it: what the
    // ledger owes, not an error of the grant. User-space dispatch ran this VM short (14.85 % in
    // one boot of 2026-12-06, whose grant then rose to 21.47 %; its shortfall is issue 20's).
    if user && measured < 19.0 {
        assert!(after.grant_ns >= 20_000_000, "{after:?}");
    } else {
        assert_eq!(after.grant_ns, 20_000_000, "{after:?}");
    }
}

/// Prints what the scheduler's decisions cost between two of its publishes: the waits of a
/// runnable vCPU thread with budget until it ran (the program's histogram, in both modes) and
/// the CPU the scheduler process used per 1 000 runs of a vCPU thread (the README's
/// comparison of the two modes).
fn report_decisions(a: &scx::Stats, b: &scx::Stats) {
    let (l0, l1) = (&a.latency, &b.latency);
    let waits = l1.waits - l0.waits;
    let runs = (l1.runs - l0.runs).max(1) as f64;
    let process = (b.process_cpu_ns - a.process_cpu_ns) as f64;
    eprintln!(
        "dispatch by {}: {waits} waits, {:.0} µs on average, median below {:?} µs, 99th \
         percentile below {:?} µs; {runs} runs; the process's CPU per 1 000 runs {:.2} ms; {:?}",
        b.dispatch,
        (l1.sum_ns - l0.sum_ns) as f64 / waits.max(1) as f64 / 1e3,
        l1.quantile_us_since(l0, 0.5),
        l1.quantile_us_since(l0, 0.99),
        process / runs / 1e3,
        b.user
    );
}

#[test]
fn when_the_scheduler_dies_cpu_max_holds_the_vm_and_the_agent_restarts_it() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = start_held_vm(&s, "back");
    std::thread::sleep(Duration::from_millis(500));
    let first = stats(&s).pid;
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let t0 = Instant::now();
    // The kernel unloads the scheduler; the threads fall back to the fair class, under the
    // cgroup quota the agent keeps written.
    let fell_back = wait_until(
        "the scheduler unloaded",
        Duration::from_secs(5),
        scheduler_gone,
    );
    // Held again within one period (100 ms): measured over the next second.
    std::thread::sleep(PERIOD);
    let gap = against_quota(&s, "back", &vm, 1.0, 0.5, scheduler_gone);
    eprintln!(
        "scheduler killed: unloaded after {fell_back:?}; from one period later until the new \
         scheduler (at most 1 s): {gap}"
    );
    // The quota's bound for the window (the steady state's worst 1-s windows in this guest:
    // 21.1-21.8 % at 20 %; here 19.90, 20.25 and 22.07 %).
    gap.assert_held("not held while the scheduler was gone");
    wait_until("a new scheduler", Duration::from_secs(10), || {
        scx::read_stats(&s.state()).is_some_and(|st| {
            st.pid != first && st.state == "enabled" && st.vms.contains_key("back")
        })
    });
    eprintln!("restarted after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    let after = share(&vm, 4.0);
    let held = stats(&s).vms["back"].held;
    eprintln!("after the restart: {after:.2} % of one CPU, held back {held} times");
    assert!(
        (after - 20.0).abs() <= 1.5,
        "after the restart: {after:.2} %"
    );
    assert!(held > 0);
}

#[test]
fn a_restarted_agent_takes_the_vms_over_again() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let vm = start_held_vm(&s, "again");
    let agent = agent_pid(&s);
    let sched = stats(&s).pid;
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    // While no agent runs, an operator pins the VM's threads (`taskset`, libvirt's `vcpupin`):
    // the first to the last managed CPU, the second to CPU 0, which the scheduler does not
    // run. The new agent adopts the VM after these pins: it keeps the first (it is within the
    // scheduler's CPUs) and moves the second onto them (where it could not be held).
    let managed = changes::managed_cpus();
    let (kept, moved) = (vm.record.vcpu_tids[0], vm.record.vcpu_tids[1]);
    let last = *managed.last().unwrap();
    for (tid, cpu) in [(kept, last), (moved, 0)] {
        burst_qemu::procfs::set_affinity(tid, &[cpu as u32]).unwrap();
    }
    // Its scheduler process dies with it (PR_SET_PDEATHSIG), the kernel unloads the scheduler.
    wait_until(
        "the scheduler unloaded",
        Duration::from_secs(5),
        scheduler_gone,
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{sched}")).exists() || {
            std::thread::sleep(Duration::from_millis(200));
            !std::path::Path::new(&format!("/proc/{sched}/exe")).exists()
        }
    );
    std::thread::sleep(PERIOD);
    // The new agent may grant a little more than the baseline at first (the credits the VM
    // earned while no agent ran): compare with the quota in force, sampled through the second.
    let without = against_quota(&s, "again", &vm, 1.0, 0.5, scheduler_gone);
    eprintln!(
        "agent and scheduler killed: from one period later, 1 s: {without} (cgroup, until the \
         new agent's scheduler)"
    );
    // As after a scheduler's death. (Measured 24 % at 20 % before a new agent left the VM's
    // cgroups and quota in place: it moved QEMU through its unlimited domain cgroup and
    // rewrote the quota, which refills the period's runtime; examples/quota_writes.rs. Since,
    // 19.51-21.55 % in CI, and once 23.14 % over 1.020 s against a bound of 22.54 (CI run 86,
    // while this guest's window began after the first read of the threads' CPU time: a wait of
    // this thread between the read and its clock counted the threads' time and not the wait).
    // With the window holding both reads, 19.80-20.74 % in 8 runs in this guest alone, the
    // reads 0.18 ms each but once 3.2 ms, 2026-12-08.)
    without.assert_held("not held while the agent and its scheduler were gone");
    // The launcher's watchdog starts a new agent, which loads a new scheduler.
    wait_until("the new agent's scheduler", Duration::from_secs(20), || {
        scx::read_stats(&s.state()).is_some_and(|st| {
            st.pid != sched && st.state == "enabled" && st.vms.contains_key("again")
        })
    });
    assert_ne!(agent_pid(&s), agent);
    let cpus_of = |tid: u32| -> Vec<usize> {
        let cpus = burst_qemu::procfs::affinity(tid).unwrap();
        cpus.into_iter().map(|c| c as usize).collect()
    };
    assert_eq!(
        cpus_of(kept),
        vec![last],
        "the pin within the managed CPUs is kept"
    );
    assert_eq!(cpus_of(moved), managed, "the pin outside them is replaced");
    // A pin made to CPU 0 while the agent runs is undone at its next check (about a second).
    burst_qemu::procfs::set_affinity(kept, &[0]).unwrap();
    wait_until(
        "the new pin to CPU 0 undone",
        Duration::from_secs(5),
        || cpus_of(kept) == managed,
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = stats(&s).vms["again"].clone();
    let taken = share(&vm, 4.0);
    let after = stats(&s).vms["again"].clone();
    eprintln!("new agent: {taken:.2} % of one CPU");
    assert!((taken - 20.0).abs() <= 1.5, "{taken:.2} %");
    assert!(
        after.held > before.held && after.cpu_ns > before.cpu_ns,
        "{after:?}"
    );
}

/// Another sched_ext scheduler already holds the kernel (here a second instance of ours,
/// started by hand, which knows nothing of the VM: like any foreign scheduler it would run the
/// VM's SCHED_EXT threads unlimited, where `cpu.max` does not reach them). Ours cannot load
/// (the kernel runs one at a time): the agent leaves the vCPU threads in the fair class, where
/// the cgroup quota holds them, and retries; once the other scheduler is gone, ours loads and
/// holds the VM.
#[test]
fn a_scheduler_already_loaded_leaves_the_vm_to_cpu_max_until_ours_loads() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let mut foreign = std::process::Command::new(bin_path())
        .arg("scx-scheduler")
        .arg("--stats")
        .arg(s.path().join("foreign.json"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the other scheduler enabled",
        Duration::from_secs(60),
        || scx::kernel_state().is_some_and(|(st, ops)| st == "enabled" && ops == scx::OPS_NAME),
    );
    let vm = Launched::start(
        &s,
        "fore",
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &s.qemu_args(Busy),
    );
    view(&s, "fore");
    // Until the agent has tried to load its own scheduler and failed at least once.
    wait_until(
        "the agent's scheduler refused",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(s.state().join("agent.log"))
                .is_ok_and(|l| l.contains("failed to start"))
        },
    );
    std::thread::sleep(PERIOD);
    for &tid in &vm.record.vcpu_tids {
        assert_ne!(
            policy(vm.record.pid, tid),
            7,
            "thread {tid} is SCHED_EXT under a scheduler that is not ours"
        );
    }
    let other_holds =
        || scx::kernel_state().is_some_and(|(st, ops)| st == "enabled" && ops == scx::OPS_NAME);
    let held = against_quota(&s, "fore", &vm, 2.0, 2.0, other_holds);
    eprintln!("another scheduler loaded: {held}");
    // Measured 19.90 % and 19.82 % (a bound of about 21.3 % over 2.02 s).
    held.assert_held("not held while another scheduler holds sched_ext");
    // The other one goes (end of its input): ours loads on the agent's next try.
    drop(foreign.stdin.take());
    let _ = foreign.wait();
    wait_until("our scheduler", Duration::from_secs(90), || {
        scx::read_stats(&s.state())
            .is_some_and(|st| st.state == "enabled" && st.vms.contains_key("fore"))
    });
    in_sched_ext(&[&vm], Duration::from_secs(5));
    let before = stats(&s).vms["fore"].held;
    let ours = share(&vm, 3.0);
    let held = stats(&s).vms["fore"].held;
    eprintln!(
        "our scheduler loaded: {ours:.2} % of one CPU, held back {} times",
        held - before
    );
    assert!((ours - 20.0).abs() <= 1.5, "{ours:.2} %");
    assert!(held > before, "never held by our scheduler");
}

/// `kernel.bpf_stats_enabled` set to 1 for as long as this lives (then back to what it was):
/// the kernel counts each BPF program's runs and run time only then.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";
    fn enable() -> Self {
        let was = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, "1").unwrap();
        BpfStats(was.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// Windows read for a dispatch's cost, and how long each (six seconds, as three of 2 s were).
const DISPATCH_READINGS: usize = 5;
#[cfg(feature = "scx")]
const DISPATCH_WINDOW: Duration = Duration::from_millis(1200);

/// ns per run of the scheduler's `bq_dispatch`, over [`DISPATCH_READINGS`] windows of
/// [`DISPATCH_WINDOW`], and the least of them: (least, all, runs per second). The least, not the
/// median: in this guest a window's figure only goes up from what the program costs (a run that the
/// single-threaded TCG suspends for another vCPU is charged the other's time too, by the guest's
/// clock), and the windows of one reading scatter by 2-3 times (9.9, 12.0 and 25.2 us in one of
/// CI's).
#[cfg(feature = "scx")]
fn dispatch_cost() -> (f64, Vec<f64>, f64) {
    use burst_qemu::enforce::scx::loader::program_runtime;
    let mut each = Vec::new();
    let mut runs = 0;
    for _ in 0..DISPATCH_READINGS {
        let (ns0, n0) = program_runtime("bq_dispatch").expect("bq_dispatch loaded");
        std::thread::sleep(DISPATCH_WINDOW);
        let (ns1, n1) = program_runtime("bq_dispatch").expect("bq_dispatch loaded");
        assert!(n1 > n0, "bq_dispatch never ran in {DISPATCH_WINDOW:?}");
        each.push((ns1 - ns0) as f64 / (n1 - n0) as f64);
        runs += n1 - n0;
    }
    let least = each.iter().copied().fold(f64::INFINITY, f64::min);
    let per_sec = runs as f64 / (DISPATCH_READINGS as f64 * DISPATCH_WINDOW.as_secs_f64());
    (least, each, per_sec)
}

#[cfg(not(feature = "scx"))]
fn dispatch_cost() -> (f64, Vec<f64>, f64) {
    unreachable!("ready() is false without the scx feature")
}

/// VMs named `{prefix}{i}` for `i` in `range`, of one vCPU, started paused (`-S`: QEMU never
/// runs their guest): attached and given a slot like any VM, at the cost of QEMU's start only.
/// Launched [`BATCH`] at a time (more at once starve each other past the launcher's 30 s wait
/// for QEMU's greeting in this guest); returns once every VM is registered.
fn paused_vms(s: &Scratch, prefix: &str, range: std::ops::Range<usize>) -> Vec<Launched> {
    const BATCH: usize = 6;
    let mut all = Vec::new();
    let ids: Vec<usize> = range.collect();
    for batch in ids.chunks(BATCH) {
        all.extend(paused_batch(s, prefix, batch));
    }
    all
}

fn paused_batch(s: &Scratch, prefix: &str, ids: &[usize]) -> Vec<Launched> {
    let mut qemu = s.qemu_args(burst_qemu::testguest::Behaviour::Halt);
    qemu.push("-S".into());
    let children: Vec<(String, std::process::Child)> = ids
        .iter()
        .map(|i| {
            let name = format!("{prefix}{i}");
            let flags = [
                "--name",
                &name,
                "--shutdown-timeout",
                "1",
                "--vcpus",
                "1",
                "--baseline",
                "10",
            ];
            let child = s.launcher(&flags, &qemu).spawn().unwrap();
            (name, child)
        })
        .collect();
    children
        .into_iter()
        .map(|(name, mut child)| {
            let record = s.wait_registered(&name, &mut child);
            Launched { child, record }
        })
        .collect()
}

/// Waits until the scheduler publishes exactly the VMs `want` (by count) with `has` among
/// them; returns its stats.
fn scheduled(s: &Scratch, within: Duration, want: usize, has: &str) -> scx::Stats {
    let mut last = None;
    wait_until("the VMs in the scheduler's stats", within, || {
        last = scx::read_stats(&s.state());
        last.as_ref().is_some_and(|st| {
            st.state == "enabled" && st.vms.len() == want && st.vms.contains_key(has)
        })
    });
    last.unwrap()
}

/// More VMs than the 64 the scheduler once held: 68 paused fillers and a busy VM in slot 69.
/// The BPF program schedules the busy VM there (its stats charge and hold it) and holds it to
/// its baseline as in the tests above; and the cost of a dispatch, which walks the VMs with a
/// thread waiting (the ready bitmap), not the idle ones, is measured with 3 slots in use and
/// with 70 (68 of them paused VMs), and compared (figures in docs/scale.md).
///
/// The slowest test of the scx guest: each paused QEMU takes 2.5-2.9 s of this single-threaded
/// TCG guest to start and be attached (67 in 170 s and 197 s; the test 220 s and 242 s).
#[test]
fn a_vm_in_a_slot_above_64_is_held_and_idle_vms_do_not_slow_a_dispatch() {
    if !ready() {
        return;
    }
    // The VMs at the high point: 70 in the suite; `BURST_QEMU_TEST_SCX_VMS` sets another count
    // for a measurement (docs/scale.md: 110 in a guest of 3072 MiB).
    let n: usize = std::env::var("BURST_QEMU_TEST_SCX_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 65)
        .unwrap_or(70);
    // This thread, and what it starts (the launchers, QEMU's main threads, the agent), on CPU 0,
    // off the vCPU threads' CPUs (1-2), as docs/sched-ext.md asks of a host's other busy
    // threads: on 6.12 the fair class runs before sched_ext, and 66 QEMUs starting on every CPU
    // kept a vCPU thread of `low` from running for 36 s, past the watchdog (30 s), which then
    // disabled the scheduler.
    burst_qemu::procfs::set_affinity(0, &[0]).unwrap();
    let s = Scratch::new();
    let _bpf_stats = BpfStats::enable();
    let t0 = Instant::now();
    // 3 slots in use: two fillers and a busy VM of 2 vCPUs held to 20 % of one CPU.
    // Each VM is started once the agent has given the ones before it their slots.
    let mut fillers = paused_vms(&s, "fill", 0..2);
    scheduled(&s, Duration::from_secs(60), 2, "fill1");
    let low = start_held_vm(&s, "low");
    let st = scheduled(&s, Duration::from_secs(30), 3, "low");
    assert_eq!(st.vms["low"].slot, 2, "{st:?}");
    std::thread::sleep(Duration::from_millis(300));
    let (at3, each3, rate3) = dispatch_cost();
    eprintln!(
        "3 slots in use: bq_dispatch {at3:.0} ns per run (least of {each3:.0?}), \
         {rate3:.0} runs/s"
    );
    // 70: 66 more fillers, then the busy VM of the high slot; then the low one goes (its slot,
    // 2, is free again, and the slots in use still reach 69).
    let t1 = Instant::now();
    fillers.extend(paused_vms(&s, "fill", 2..n - 2));
    scheduled(
        &s,
        Duration::from_secs(60),
        n - 1,
        &format!("fill{}", n - 3),
    );
    let high = start_held_vm(&s, "high");
    let st = scheduled(&s, Duration::from_secs(60), n, "high");
    eprintln!(
        "{} more VMs attached in {:?} ({:?} since the start)",
        n - 3,
        t1.elapsed(),
        t0.elapsed()
    );
    assert_eq!(st.vms["high"].slot as usize, n - 1, "{st:?}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let available = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .unwrap_or_default();
    eprintln!("with {n} VMs: {available}");
    assert!(
        s.cli(&["stop", "low", "--shutdown-timeout", "1"])
            .status
            .success(),
        "stop low"
    );
    drop(low);
    scheduled(&s, Duration::from_secs(20), n - 1, "high");
    std::thread::sleep(Duration::from_millis(300));
    let (before, cpu0, t_a) = at_stats_publish(&s, &high);
    let measured = share(&high, 4.0);
    let (after, cpu1, t_b) = at_stats_publish(&s, &high);
    let (before, after) = (before.vms["high"].clone(), after.vms["high"].clone());
    let window = (t_b - t_a).as_nanos() as f64;
    let charged = (after.cpu_ns - before.cpu_ns) as f64 * 100.0 / window;
    let threads = (cpu1 - cpu0) as f64 * 100.0 / window;
    eprintln!(
        "slot {} held to 20 %: {measured:.2} % of one CPU over 4 s; charged by the BPF \
         scheduler {charged:.2} % against {threads:.2} % run, held back {} times",
        n - 1,
        after.held - before.held
    );
    // The bound of the held tests above; measured 19.98 % here twice (slot 69, 69 VMs).
    assert!((measured - 20.0).abs() <= 1.5, "measured {measured:.2} %");
    // The charge against the threads is printed, not bounded here: measured 0.00 and 0.45
    // points apart (19.81 % charged against 19.81 % run, 19.92 % against 19.47 %), too near
    // the 0.5 that the_bpf_scheduler_not_cpu_max_holds_the_vcpu_threads asserts with 3 slots
    // (measured 0.28 there) to call a bound from two runs; the charge itself does not depend on
    // the slot (the same `usage` entry, by index).
    assert!(after.held > before.held, "never held: {after:?}");
    let (at70, each70, rate70) = dispatch_cost();
    eprintln!(
        "{n} slots in use ({} VMs): bq_dispatch {at70:.0} ns per run (least of {each70:.0?}), \
         {rate70:.0} runs/s, {:+.0} ns on the 3-slot figure; test {:?}",
        n - 1,
        at70 - at3,
        t0.elapsed()
    );
    // A dispatch walks the ready VMs only (bpf/burst.bpf.c, `ready`), not the 68 paused ones.
    // Walking every slot in use, the 67 more slots added 28-31 us to the 3-slot figure (0.44 us
    // each; docs/scale.md), by the least reading too (13.0 -> 44.0 us, 8.1 -> 37.3 us). With
    // the walk, both figures now come from the same mix of runs (188-193 runs/s at 3 and at
    // 70): until the launchers waited on the agent's pidfd, their 134 wake-ups a second at 70
    // VMs added about 100 cheap runs a second (285-316 runs/s), which pulled the 70-slot
    // median down to 6.8-8.7 us against 8.8-25.2 us at 3. Since, three boots (medians of three
    // 2-s windows, least in brackets): 70 slots 25.4 (14.3), 8.1 (7.0), 11.1 (11.1) us against
    // 12.0 (9.9), 11.6 (10.1), 13.2 (9.7) at 3, the first one past this bound by its medians
    // (+13.4 us; +4.4 by the least). So the least of five windows, and a bound on the
    // difference: 10 us, a third of what the idle slots cost the loops.
    assert!(
        at70 <= at3 + 10_000.0,
        "bq_dispatch {at70:.0} ns per run with {n} slots in use against {at3:.0} with 3 \
         (the least of {DISPATCH_READINGS} windows each)"
    );
    drop(fillers);
}
