//! Changes made to a running VM's threads from outside the scheduler (a re-pin, a renice),
//! under the sched_ext enforcer in both dispatch modes: run inside the scx-6.12 guest by
//! tests/scx.rs, like the rest of this binary (main.rs).

use std::time::{Duration, Instant};

use burst_qemu::testguest::Behaviour::Busy;
use nix::unistd::Pid;

use super::common::*;
use super::{at_stats_publish, in_sched_ext, ready, start_held_vm};

/// The managed CPUs of this guest (BURST_QEMU_SCX_CPUS, `1-2` in tests/scx.rs).
pub(super) fn managed_cpus() -> Vec<usize> {
    let list = std::env::var("BURST_QEMU_SCX_CPUS").unwrap_or_else(|_| "1-2".into());
    let cpus = burst_qemu::base::parse_cpu_list(&list).expect("BURST_QEMU_SCX_CPUS");
    cpus.into_iter().map(|c| c as usize).collect()
}

fn cpu_set(cpus: &[usize]) -> nix::sched::CpuSet {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).unwrap();
    }
    set
}

/// Pins thread `tid` to `cpus` and sets its nice value.
fn pin_and_renice(tid: u32, cpus: &nix::sched::CpuSet, nice: i32) {
    nix::sched::sched_setaffinity(Pid::from_raw(tid as i32), cpus).unwrap();
    // SAFETY: setpriority on one thread id; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    assert_eq!(rc, 0, "renice {tid}");
}

/// Calls `each` every 10 ms for `secs` seconds (with the round's number); returns the rounds
/// and the threads of `threads` (pid, tid) that ran nothing in one of the whole seconds. The
/// VMs are busy, so each of their threads always wants to run.
fn watch_threads(threads: &[(u32, u32)], secs: u64, mut each: impl FnMut(u64)) -> (u64, Vec<u32>) {
    let cpu = || -> Vec<u64> { threads.iter().map(|&(p, t)| thread_cpu_ns(p, t)).collect() };
    let (start, mut second, mut last) = (Instant::now(), Instant::now(), cpu());
    let (mut rounds, mut idle) = (0, Vec::new());
    while start.elapsed() < Duration::from_secs(secs) {
        each(rounds);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(10));
        if second.elapsed() >= Duration::from_secs(1) {
            second = Instant::now();
            let now = cpu();
            let ran = last.iter().zip(&now).zip(threads);
            idle.extend(ran.filter(|((a, b), _)| a == b).map(|(_, &(_, t))| t));
            last = now;
        }
    }
    (rounds, idle)
}

/// Operators change a running VM's threads: `virsh vcpupin` or `taskset` pin them, `renice`
/// or `virsh schedinfo` reweigh them, and the kernel itself narrows a thread's CPUs to one
/// while it is switched out with migration disabled. Each such change takes the thread out of
/// the scheduler's hands and gives it back (a dequeue and an enqueue), at any moment: between
/// an order and its CPU's dispatch, after the dispatch and before the run, or while it runs,
/// from another CPU. Here every vCPU thread of two busy VMs is re-pinned (one managed CPU, the
/// other, both) and reniced every 10 ms for 4 s, then each is left pinned to one CPU for 3 s
/// (one VM's two threads on different CPUs): the scheduler must keep every thread running
/// (none held for an order that never comes: the user-space mode also counts those it finds
/// itself, `recovered`), stay loaded, and keep the held VM at its cap.
#[test]
fn vcpu_threads_repinned_and_reniced_all_the_time_keep_running_and_held() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let held = start_held_vm(&s, "pinned");
    let free = Launched::start(
        &s,
        "free",
        &["--vcpus", "2", "--baseline", "50", "--credits", "100000"],
        &s.qemu_args(Busy),
    );
    view(&s, "free");
    expect_enforcer(&s, "free");
    let threads: Vec<(u32, u32)> = [&held, &free]
        .iter()
        .flat_map(|vm| vm.record.vcpu_tids.iter().map(|&t| (vm.record.pid, t)))
        .collect();
    in_sched_ext(&[&held, &free], Duration::from_secs(3));
    let cpus = managed_cpus();
    let (first, last) = (cpus[0], cpus[cpus.len() - 1]);
    let masks = [cpu_set(&[first]), cpu_set(&[last]), cpu_set(&cpus)];
    let mut phases = Vec::new();
    for phase in [
        "re-pinned and reniced every 10 ms",
        "each pinned to one CPU",
    ] {
        let (s0, cpu0, t0) = at_stats_publish(&s, &held);
        let (rounds, idle) = if phase.starts_with("re-pinned") {
            watch_threads(&threads, 4, |round| {
                for (i, &(_, tid)) in threads.iter().enumerate() {
                    let mask = &masks[(round as usize + i) % masks.len()];
                    pin_and_renice(tid, mask, (round % 2) as i32);
                }
            })
        } else {
            for (i, &(_, tid)) in threads.iter().enumerate() {
                pin_and_renice(tid, &masks[i % 2], 0);
            }
            watch_threads(&threads, 3, |_| {})
        };
        let (s1, cpu1, t1) = at_stats_publish(&s, &held);
        let window = (t1 - t0).as_secs_f64();
        let measured = (cpu1 - cpu0) as f64 / 1e7 / window;
        let charged = (s1.vms["pinned"].cpu_ns - s0.vms["pinned"].cpu_ns) as f64 / 1e7 / window;
        eprintln!(
            "{phase} ({rounds} rounds), {window:.2} s: the held VM {measured:.2} % of one CPU \
             (cap 20 %), charged {charged:.2} %; threads that ran nothing for a second: \
             {idle:?}; user-space counts before {:?} after {:?}",
            s0.user, s1.user
        );
        phases.push((phase, measured, charged, idle, s0, s1));
    }
    let all = cpu_set(&cpus);
    for &(_, tid) in &threads {
        pin_and_renice(tid, &all, 0);
    }
    for (phase, measured, charged, idle, s0, s1) in phases {
        assert_eq!(
            s1.state, "enabled",
            "{phase}: the scheduler was unloaded: {s1:?}"
        );
        assert!(
            idle.is_empty(),
            "{phase}: threads that ran nothing for a second: {idle:?}"
        );
        if let (Some(u0), Some(u1)) = (s0.user, s1.user) {
            assert_eq!(
                u1.recovered, u0.recovered,
                "{phase}: threads held for no order"
            );
        }
        // BPF dispatch (scx-6.12 guest, 2026-12-07): 19.92, 19.95 and 20.00 % re-pinned,
        // 19.59 % pinned, charged within 0.13 points of it; before the program charged the
        // thread's own CPU (ops.running and ops.stopping called from the CPU that made the
        // change charged the next thread to run there from this one's runtime): 3.20, 6.55 and
        // 8.35 % re-pinned, charged 47 and 132 %. User-space dispatch: 15.59-17.23 % re-pinned
        // in nine runs before its policy knew a thread's CPUs (orders for a CPU a thread may
        // not use failed and were given again, 400-700 a second here), 18.64 and 19.56 %
        // pinned; since (the process reads a thread's affinity at a failed order and each
        // second): 15.53, 17.31 and 17.77 % re-pinned (65 failed orders a second), 17.33, 20.13
        // and 20.52 % pinned (4 a second). Before the program said a refused thread still
        // waits, pinned threads waited for the process to find them (1-4 s each,
        // `recovered`). So 1.5 points either way for the program, and for the process 2.5
        // under its lowest and its cap's 2 over (the held test's).
        let (under, over) = if s1.dispatch == "bpf" {
            (18.5, 21.5)
        } else {
            (13.0, 22.0)
        };
        assert!(
            (under..=over).contains(&measured),
            "{phase}: the held VM at {measured:.2} %"
        );
        if s1.dispatch == "bpf" {
            assert!(
                (charged - measured).abs() <= 1.0,
                "{phase}: charged {charged:.2} %"
            );
        }
    }
}
