//! The decisions keep to the CPUs a thread may use.

use super::super::*;

const MS: u64 = 1_000_000;

fn entitled(cap_pct: u64, base_pct: u64) -> Entitlement {
    let pct = |p: u64| Rate(p * PPM_PER_CPU / 100);
    Entitlement {
        cap: pct(cap_pct),
        guarantee: pct(base_pct),
        weight: pct(cap_pct - base_pct),
    }
}

/// CPUs 10 and 11; VM 0 with threads 1 and 2, VM 1 with thread 3, all waiting.
fn two_vms(base0: u64, base1: u64) -> Scheduler {
    let config = Config {
        period_ns: 100 * MS,
        slice_ns: 5 * MS,
        min_slice_ns: MS,
        stop_lag_ns: 0,
    };
    let mut s = Scheduler::new(config, &[10, 11]);
    s.set_vm(0, entitled(200, base0));
    s.set_vm(1, entitled(100, base1));
    for (vm, tid) in [(0, 1), (0, 2), (1, 3)] {
        s.add_thread(vm, tid, true, 0);
    }
    s
}

fn runs(actions: &[Action]) -> Vec<(u32, ThreadId)> {
    let mut r: Vec<(u32, ThreadId)> = actions
        .iter()
        .filter_map(|a| match *a {
            Action::Run { cpu, tid, .. } => Some((cpu, tid)),
            _ => None,
        })
        .collect();
    r.sort();
    r
}

#[test]
fn a_pinned_thread_is_given_only_its_cpu_and_the_others_take_the_rest() {
    let mut s = two_vms(100, 20);
    // Both of VM 0's threads pinned to CPU 11: one runs there, the other waits; VM 1's thread
    // takes CPU 10, which VM 0 may not use.
    s.set_allowed(1, Some(&[11]));
    s.set_allowed(2, Some(&[11, 12]));
    assert_eq!(s.allowed(2), Some(vec![11]));
    assert_eq!(runs(&s.decide(0)), [(10, 3), (11, 1)]);
    // Unpinned again (every managed CPU): no restriction left.
    s.set_allowed(2, Some(&[10, 11]));
    assert_eq!(s.allowed(2), None);
}

#[test]
fn without_pins_the_decisions_are_unchanged() {
    let (mut a, mut b) = (two_vms(100, 20), two_vms(100, 20));
    // Pinned outside the managed CPUs: lifted, as a thread never given a CPU would starve.
    b.set_allowed(3, Some(&[0]));
    assert_eq!(b.allowed(3), None);
    for t in [0, 5 * MS, 10 * MS] {
        assert_eq!(a.decide(t), b.decide(t));
    }
}

#[test]
fn a_vm_below_its_baseline_takes_the_cpu_its_thread_may_use_from_one_above() {
    // VM 1 (thread 3) runs on CPU 10 only; VM 0's threads take both CPUs first while thread 3
    // is blocked.
    let mut s = two_vms(50, 50);
    s.stop(3, 0, false);
    assert_eq!(runs(&s.decide(0)), [(10, 1), (11, 2)]);
    for t in (5..=35).step_by(5) {
        assert!(runs(&s.decide(t * MS)).is_empty(), "extended, not moved");
    }
    s.set_allowed(3, Some(&[10]));
    // VM 0 has run 2 CPUs × 37 ms: above its baseline (50 % of a period); thread 3 wakes
    // below its own, with no CPU free, and takes CPU 10, its only one, from VM 0.
    s.wake(3, 37 * MS);
    let actions = s.decide(37 * MS);
    assert_eq!(runs(&actions), [(10, 3)], "{actions:?}");
    // The same on CPU 11 when that is its only one.
    let mut s = two_vms(50, 50);
    s.stop(3, 0, false);
    s.decide(0);
    for t in (5..=35).step_by(5) {
        s.decide(t * MS);
    }
    s.set_allowed(3, Some(&[11]));
    s.wake(3, 37 * MS);
    assert_eq!(runs(&s.decide(37 * MS)), [(11, 3)]);
}

#[test]
fn a_pin_within_the_managed_cpus_is_kept_and_one_outside_them_replaced() {
    let managed = [1, 2];
    // A fresh QEMU's thread may use every CPU: confined to the scheduler's.
    assert_eq!(confined(Some(&[0, 1, 2, 3]), &managed), (vec![1, 2], false));
    // `<vcpupin cpuset='2'>` before the agent adopted the domain: kept.
    assert_eq!(confined(Some(&[2]), &managed), (vec![2], false));
    // Pinned across the boundary: the part on the scheduler's CPUs.
    assert_eq!(confined(Some(&[0, 1]), &managed), (vec![1], false));
    // Pinned only to CPUs the scheduler does not run: it could not be held; replaced.
    assert_eq!(confined(Some(&[0, 3]), &managed), (vec![1, 2], true));
    // Unreadable (the thread ended): the scheduler's CPUs, nothing said.
    assert_eq!(confined(None, &managed), (vec![1, 2], false));
}
