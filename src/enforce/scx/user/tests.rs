//! The user-space mode's translation between the program's reports, the policy and its
//! orders, against a kernel played by hand.

use super::*;
use crate::enforce::scx::abi::Event;

const MS: u64 = 1_000_000;

fn ev(kind: u32, tid: u32, cpu: u32, at: u64) -> Event {
    Event {
        at,
        tid,
        cpu,
        kind,
        pad: 0,
    }
}

/// A policy over CPUs 1 and 2 with VM slot 0 (2 vCPUs: threads 100, 101) granted 150 % of
/// a CPU, 20 % of it its baseline, weight for the spare 130 %.
fn busy_vm() -> UserPolicy {
    let mut p = UserPolicy::new(&[1, 2]);
    let cmds = [
        Command::Vm {
            idx: 0,
            base_ns: 20 * MS,
            grant_ns: 150 * MS,
            weight: 130 * MS,
            name: "a".into(),
        },
        Command::Tid { tid: 100, idx: 0 },
        Command::Tid { tid: 101, idx: 0 },
    ];
    for c in &cmds {
        assert!(p.command(c, 0).is_empty());
    }
    p
}

#[test]
fn woken_threads_are_ordered_onto_the_managed_cpus_and_extended_while_budget_lasts() {
    let mut p = busy_vm();
    assert!(p.decide(0).is_empty(), "nothing reported runnable yet");
    p.event(&ev(EV_WAKE, 100, 1, 0));
    p.event(&ev(EV_WAKE, 101, 2, 0));
    let orders = p.decide(MS);
    assert_eq!(orders.len(), 2, "{orders:?}");
    let mut cpus: Vec<u32> = orders.iter().map(|o| o.cpu).collect();
    cpus.sort();
    assert_eq!(cpus, [1, 2]);
    for o in &orders {
        assert_eq!(o.op, ORDER_RUN, "a full slice: a turn, not a hard end");
        // The mode's turn: 20 ms, from when it was decided (the program runs it whole from
        // the thread's start).
        assert_eq!((o.from, o.until), (MS, 21 * MS), "{o:?}");
    }
    // They start 50 µs after the order: each turn runs its 20 ms from then.
    let start = MS + 50_000;
    for o in &orders {
        p.event(&ev(EV_RUNNING, o.tid, o.cpu, start));
    }
    assert_eq!(p.counts.unordered, 0);
    // At the end of the turn both go on: 2 × 20 ms of 150 ms.
    let next = p.next_deadline(2 * MS).unwrap();
    assert_eq!(next, start + 20 * MS);
    let orders = p.decide(next);
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert!(orders
        .iter()
        .all(|o| o.op == ORDER_EXTEND && o.until == start + 40 * MS));
}

#[test]
fn a_stop_from_a_cpu_the_thread_was_ordered_off_is_stale() {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let run = p.decide(0);
    assert_eq!(run.len(), 1);
    let first = run[0].cpu;
    p.event(&ev(EV_RUNNING, 100, first, 10_000));
    // It blocks there and wakes at once; the policy orders it again, maybe elsewhere.
    p.event(&ev(EV_BLOCK, 100, first, MS));
    p.event(&ev(EV_WAKE, 100, first, MS));
    let again = p.decide(MS);
    assert_eq!(again.len(), 1, "{again:?}");
    // Back on the CPU it last ran on (the policy's cache warmth).
    assert_eq!(again[0].cpu, first);
    let other = if first == 1 { 2 } else { 1 };
    // A late stop from the other CPU does not take it off where the policy has it.
    p.event(&ev(EV_STOP, 100, other, MS + 1));
    assert_eq!(p.counts.stale, 1);
    assert_eq!(p.policy().running_on(first), Some(100));
}

#[test]
fn a_failed_order_leaves_the_thread_blocked_until_it_is_reported_again() {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let run = p.decide(0);
    let cpu = run[0].cpu;
    p.event(&ev(EV_FAILED, 100, cpu, 100_000));
    assert_eq!(p.counts.failed, 1);
    assert_eq!(p.policy().running_on(cpu), None);
    assert!(p.decide(200_000).is_empty(), "not runnable until reported");
    p.event(&ev(EV_WAKE, 100, cpu, 300_000));
    assert_eq!(p.decide(300_000).len(), 1);
}

#[test]
fn a_thread_or_vm_that_leaves_while_running_is_preempted_off_its_cpu() {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    p.event(&ev(EV_WAKE, 101, 2, 0));
    let run = p.decide(0);
    let cpu_of = |tid: u32| run.iter().find(|o| o.tid == tid).unwrap().cpu;
    let off = p.command(&Command::Untid { tid: 100 }, MS);
    assert_eq!(off.len(), 1);
    assert_eq!((off[0].op, off[0].cpu), (ORDER_PREEMPT, cpu_of(100)));
    let off = p.command(&Command::Free { idx: 0 }, MS);
    assert_eq!(off.len(), 1);
    assert_eq!((off[0].op, off[0].cpu), (ORDER_PREEMPT, cpu_of(101)));
    // Reports of the gone threads change nothing.
    p.event(&ev(EV_WAKE, 100, 1, 2 * MS));
    assert!(p.decide(2 * MS).is_empty());
}

/// A policy over `cpus` with VM slot 0 held to `cap_ns` a period (its baseline too) and one
/// thread, `tid`, reported runnable at 0.
fn capped(cpus: &[u32], cap_ns: u64, tid: u32) -> UserPolicy {
    let mut p = UserPolicy::new(cpus);
    p.command(
        &Command::Vm {
            idx: 0,
            base_ns: cap_ns,
            grant_ns: cap_ns,
            weight: 0,
            name: "capped".into(),
        },
        0,
    );
    p.command(&Command::Tid { tid, idx: 0 }, 0);
    p.event(&ev(EV_WAKE, tid, 1, 0));
    p
}

#[test]
fn the_cap_holds_when_the_kernel_carries_out_every_order() {
    // One thread of a VM capped at 20 % of a CPU (baseline 20 %), always runnable: over
    // 1 s of orders carried out at once, it runs 200 ms.
    let mut p = capped(&[1], 20 * MS, 7);
    let (mut now, mut ran, mut since) = (0u64, 0u64, None::<u64>);
    while now < 1000 * MS {
        for o in p.decide(now) {
            match o.op & !ORDER_HARD {
                ORDER_RUN | ORDER_EXTEND => {
                    since.get_or_insert(now);
                }
                _ => {
                    ran += now - since.take().unwrap();
                    p.event(&ev(EV_STOP, 7, 1, now));
                }
            }
        }
        now = p.next_deadline(now).unwrap_or(now + MS).max(now + 1);
    }
    if let Some(s) = since {
        ran += 1000 * MS - s;
    }
    // Within a minimum slice (0.1 ms) a period of 200 ms: every end is the cap's, kept.
    assert!((195 * MS..=205 * MS).contains(&ran), "ran {} ms", ran / MS);
}

#[test]
fn the_end_of_a_turn_is_decided_ahead_and_deferred_to_the_cpu() {
    // Two VMs, one thread each, one CPU: at the end of A's turn B follows, decided a lead
    // before it and carried out by the CPU itself (deferred).
    let mut p = UserPolicy::new(&[1]);
    for (idx, tid) in [(0, 7), (1, 8)] {
        p.command(
            &Command::Vm {
                idx,
                base_ns: 10 * MS,
                grant_ns: 100 * MS,
                weight: 90 * MS,
                name: format!("v{idx}"),
            },
            0,
        );
        p.command(&Command::Tid { tid, idx }, 0);
        p.event(&ev(EV_WAKE, tid, 1, 0));
    }
    let first = p.decide(0);
    assert_eq!(first.len(), 1, "{first:?}");
    let (a, end) = (first[0].tid, first[0].until);
    // Not ahead of a slice whose start was not reported (its order would be replaced).
    assert_eq!(p.next_wake(MS, 6 * MS), Some(end));
    assert!(p.look_ahead(end - 5 * MS, 6 * MS).is_empty());
    p.event(&ev(EV_RUNNING, a, 1, 100_000));
    // Its turn runs whole from its start, 100 µs after the order.
    let end = end + 100_000;
    // Woken a lead before the end of the turn, not at it.
    assert_eq!(p.next_wake(MS, 6 * MS), Some(end - 6 * MS));
    assert!(p.look_ahead(MS, 6 * MS).is_empty(), "too early");
    let ahead = p.look_ahead(end - 5 * MS, 6 * MS);
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert_eq!(ahead[0].op & !ORDER_HARD, ORDER_RUN | ORDER_DEFER);
    assert_ne!(ahead[0].tid, a);
    // B's slice starts where A's ends (below its baseline, it covers what is left of it),
    // decided for then: the CPU runs it for until − from.
    assert_eq!((ahead[0].from, ahead[0].until), (end, end + 10 * MS));
    // Later decisions never go back before it.
    let later = p.decide(end - 4 * MS);
    assert!(later.iter().all(|o| o.until > end), "{later:?}");
}

/// A thread a higher class takes its CPU from for a while is charged only what it ran: from
/// the order's start to the pause, and from its return to the slice's end.
#[test]
fn a_paused_thread_is_charged_only_what_it_ran() {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let run = p.decide(0);
    assert_eq!(run.len(), 1, "{run:?}");
    let cpu = run[0].cpu;
    assert_eq!(run[0].until, 20 * MS);
    p.event(&ev(EV_RUNNING, 100, cpu, 0));
    assert_eq!(
        p.policy().usage(0, MS),
        20 * MS,
        "the whole turn, committed"
    );
    // Paused from 5 to 9 ms: 4 ms not charged.
    p.event(&ev(EV_PAUSE, 100, cpu, 5 * MS));
    assert_eq!(p.policy().usage(0, 6 * MS), 5 * MS);
    p.event(&ev(EV_RUNNING, 100, cpu, 9 * MS));
    assert_eq!(p.counts.paused, 1);
    assert_eq!(p.counts.unordered, 0);
    assert_eq!(p.policy().usage(0, 10 * MS), 16 * MS);
    // Still the policy's running thread there: the turn ends at 20 ms, as ordered.
    assert_eq!(p.policy().running_on(cpu), Some(100));
    assert_eq!(p.next_deadline(10 * MS), Some(20 * MS));
    // Paused again and stopped while off its CPU: charged until the pause.
    p.event(&ev(EV_PAUSE, 100, cpu, 12 * MS));
    p.event(&ev(EV_BLOCK, 100, cpu, 15 * MS));
    assert_eq!(p.policy().usage(0, 16 * MS), 8 * MS);
    assert_eq!(p.policy().running_on(cpu), None);
}

/// Thread 100 running from 0 on the CPU returned, its turn (to 20 ms) extended to 40 ms by a
/// look ahead at 15 ms.
fn extended_ahead_of_its_end() -> (UserPolicy, u32) {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let cpu = p.decide(0)[0].cpu;
    p.event(&ev(EV_RUNNING, 100, cpu, 0));
    let ahead = p.look_ahead(15 * MS, 6 * MS);
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert_eq!(
        (ahead[0].op & 0xff, ahead[0].until),
        (ORDER_EXTEND, 40 * MS)
    );
    assert_eq!(
        p.policy().usage(0, 20 * MS),
        40 * MS,
        "two turns, committed"
    );
    (p, cpu)
}

/// A thread extended by a look ahead (decided at its slice's end, 20 ms, before it came) and
/// then reported paused from before that end: the slice under way is cut at the pause as well
/// as the extension, and the return gives back both from then, once. (Before, only the
/// extension was cut and the return added the rest of the slice again: in the scx-6.12 guest
/// the policy charged three busy VMs 222 % of a CPU in a 400-ms window of 2 CPUs.)
#[test]
fn a_pause_reported_from_before_a_look_ahead_cuts_the_slice_under_way() {
    let (mut p, cpu) = extended_ahead_of_its_end();
    p.event(&ev(EV_PAUSE, 100, cpu, 17 * MS));
    assert_eq!(p.policy().usage(0, 20 * MS), 17 * MS);
    p.event(&ev(EV_RUNNING, 100, cpu, 18 * MS));
    assert_eq!(p.policy().usage(0, 20 * MS), 17 * MS + 22 * MS);
}

/// The same with a block: nothing of the thread counts after it, the extension included.
#[test]
fn a_block_reported_from_before_a_look_ahead_ends_the_charge_there() {
    let (mut p, cpu) = extended_ahead_of_its_end();
    p.event(&ev(EV_BLOCK, 100, cpu, 17 * MS));
    assert_eq!(p.policy().usage(0, 20 * MS), 17 * MS);
    assert_eq!(p.policy().running_on(cpu), None);
}

/// What a decision costs the process, natively: three busy 2-vCPU VMs on two CPUs, 10 s of
/// the kernel carrying out every order at once, and the wall time of the policy's calls per
/// run ordered. A measurement, not a check (the README's figures):
/// `cargo test --release --lib cost_of_a_decision -- --ignored --nocapture`.
#[test]
#[ignore]
fn cost_of_a_decision() {
    let mut p = UserPolicy::new(&[1, 2]);
    for (idx, base) in [(0u32, 80), (1, 40), (2, 20)] {
        p.command(
            &Command::Vm {
                idx,
                base_ns: base * MS,
                grant_ns: 200 * MS,
                weight: (200 - base) * MS,
                name: format!("v{idx}"),
            },
            0,
        );
        for t in 0..2 {
            let tid = 100 + idx * 2 + t;
            p.command(&Command::Tid { tid, idx }, 0);
            p.event(&ev(EV_WAKE, tid, 1, 0));
        }
    }
    let started = std::time::Instant::now();
    let mut now = 0;
    let mut on: HashMap<u32, u32> = HashMap::new();
    while now < 10_000 * MS {
        let mut orders = p.decide(now);
        orders.extend(p.look_ahead(now, 6 * MS));
        for o in orders {
            let op = o.op & !(ORDER_HARD | ORDER_DEFER);
            if op == ORDER_RUN || op == ORDER_PREEMPT {
                if let Some(old) = on.remove(&o.cpu) {
                    p.event(&ev(EV_STOP, old, o.cpu, now));
                    p.event(&ev(EV_WAKE, old, o.cpu, now));
                }
            }
            if op == ORDER_RUN {
                on.insert(o.cpu, o.tid);
                p.event(&ev(EV_RUNNING, o.tid, o.cpu, now));
            }
        }
        now = p.next_wake(now, 6 * MS).unwrap_or(now + MS).max(now + 1000);
    }
    let ns = started.elapsed().as_nanos() as f64;
    eprintln!(
        "{} runs ordered in 10 simulated s ({} rounds): {:.1} µs of CPU per run, {:.1} ms per \
         1 000",
        p.counts.runs,
        p.counts.rounds,
        ns / p.counts.runs as f64 / 1e3,
        ns / p.counts.runs as f64 / 1e3
    );
}

/// A thread the policy takes off at its cap runs on until its CPU's tick: charged a
/// [`STOP_LAG_NS`] past the decision at once, so that its VM's other thread is not granted
/// that time meanwhile, and then exactly to the reported stop.
#[test]
fn a_thread_taken_off_is_charged_until_its_stop_is_reported() {
    let mut p = capped(&[1, 2], 10 * MS, 100);
    let run = p.decide(0);
    assert_eq!(run.len(), 1, "{run:?}");
    assert_eq!(
        run[0].op,
        ORDER_RUN | ORDER_HARD,
        "its whole cap: a hard end"
    );
    let cpu = run[0].cpu;
    p.event(&ev(EV_RUNNING, 100, cpu, 0));
    let off = p.decide(10 * MS);
    assert_eq!(off.len(), 1, "{off:?}");
    assert_eq!(off[0].op & 0xff, ORDER_PREEMPT);
    assert_eq!(p.policy().usage(0, 10 * MS), 10 * MS + STOP_LAG_NS);
    p.event(&ev(EV_STOP, 100, cpu, 10 * MS + 400_000));
    assert_eq!(p.policy().usage(0, 10 * MS), 10 * MS + 400_000);
}

#[test]
fn a_thread_whose_wake_report_was_lost_is_ordered_once_found_held() {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let run = p.decide(0);
    let cpu = run[0].cpu;
    p.event(&ev(EV_RUNNING, 100, cpu, 50_000));
    p.event(&ev(EV_BLOCK, 100, cpu, MS));
    // It wakes at 2 ms and the program holds it, but the report is lost: the policy, which
    // has it blocked, never orders it (in the guest, until the kernel's watchdog, 30 s).
    let mut now = 2 * MS;
    while now < 1000 * MS {
        assert!(
            p.decide(now).is_empty(),
            "ordered at {now} ns without a report"
        );
        now += 10 * MS;
    }
    // Found held since 2 ms (the process reads `enq_at`): ordered at once.
    assert_eq!(p.found_held(100, 2 * MS), Some("blocked"));
    assert_eq!(p.counts.recovered, 1);
    let run = p.decide(now);
    assert_eq!(run.len(), 1, "{run:?}");
    assert_eq!((run[0].op & !ORDER_HARD, run[0].tid), (ORDER_RUN, 100));
    // Still held long after that order (the order lost too): taken off the CPU it was
    // ordered to, and ordered again.
    assert_eq!(p.found_held(100, 2 * MS), Some("running"));
    assert_eq!(p.policy().running_on(run[0].cpu), None);
    let again = p.decide(now + MS);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((again[0].op & !ORDER_HARD, again[0].tid), (ORDER_RUN, 100));
}

#[test]
fn a_thread_the_policy_has_waiting_or_does_not_know_is_left_as_it_is_when_found_held() {
    // Two threads of a VM capped at 10 % of one CPU on one CPU: one runs, the other waits for
    // its turn, held by the program, as the policy knows.
    let mut p = capped(&[1], 10 * MS, 100);
    p.command(&Command::Tid { tid: 101, idx: 0 }, 0);
    p.event(&ev(EV_WAKE, 101, 1, 0));
    let run = p.decide(0);
    assert_eq!(run.len(), 1, "{run:?}");
    let waiting = if run[0].tid == 100 { 101 } else { 100 };
    assert_eq!(p.found_held(waiting, 0), None);
    assert_eq!(p.found_held(999, 0), None, "not a thread of the policy");
    assert_eq!(p.counts.recovered, 0);
}

/// The sequences the program reports since a thread's failure or undone dispatch is followed
/// by a wake when it is held (bpf/user_dispatch.h, `still_held` and `hold_for_order`): the
/// thread is ordered again at once. Before, the failure alone left it blocked while held: the
/// stall of the scx-6.12 guest's trace (docs/sched-ext.md, "Threads left waiting").
#[test]
fn a_failure_reported_after_the_threads_own_wake_is_followed_by_a_wake_and_ordered_again() {
    let mut p = busy_vm();
    // 100 runs on CPU 1; the policy moves it to CPU 2 (101 takes CPU 1).
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let run = p.decide(0);
    let on = run[0].cpu;
    p.event(&ev(EV_RUNNING, 100, on, 10_000));
    // Its stop and wake (another CPU held it again) come before the failure of an order the
    // policy never made here, as in the trace: the order's CPU found it not held.
    p.event(&ev(EV_STOP, 100, on, 25 * MS));
    p.event(&ev(EV_WAKE, 100, on, 25 * MS));
    let again = p.decide(25 * MS);
    assert_eq!(again.len(), 1, "{again:?}");
    let to = again[0].cpu;
    p.event(&ev(EV_FAILED, 100, to, 26 * MS));
    assert!(p.decide(26 * MS).is_empty(), "the failure alone: blocked");
    // The program's wake after the failure: ordered again.
    p.event(&ev(EV_WAKE, 100, to, 26 * MS));
    let orders = p.decide(26 * MS);
    assert!(
        orders
            .iter()
            .any(|o| o.tid == 100 && o.op & !ORDER_HARD == ORDER_RUN),
        "{orders:?}"
    );
}

/// A paused thread (the fair class took its CPU) whose attributes changed meanwhile is back in
/// the program's custody: the program reports the order failed on that CPU, then the wake.
#[test]
fn a_paused_thread_given_back_to_the_program_is_taken_off_its_cpu_and_ordered_again() {
    let mut p = busy_vm();
    p.event(&ev(EV_WAKE, 100, 1, 0));
    let run = p.decide(0);
    let on = run[0].cpu;
    p.event(&ev(EV_RUNNING, 100, on, 10_000));
    p.event(&ev(EV_PAUSE, 100, on, 5 * MS));
    // A wake alone (as before the program reported the failure) changed nothing: the policy
    // kept it running on `on`.
    let mut alone = busy_vm();
    alone.event(&ev(EV_WAKE, 100, 1, 0));
    let first = alone.decide(0)[0].cpu;
    alone.event(&ev(EV_RUNNING, 100, first, 10_000));
    alone.event(&ev(EV_PAUSE, 100, first, 5 * MS));
    alone.event(&ev(EV_WAKE, 100, 2, 6 * MS));
    assert_eq!(alone.policy().running_on(first), Some(100));
    // Now: the failure from the CPU it was paused on, then the wake.
    p.event(&ev(EV_FAILED, 100, on, 6 * MS));
    p.event(&ev(EV_WAKE, 100, 2, 6 * MS));
    assert_eq!(p.policy().running_on(on), None);
    let orders = p.decide(6 * MS);
    assert!(
        orders
            .iter()
            .any(|o| o.tid == 100 && o.op & !ORDER_HARD == ORDER_RUN),
        "{orders:?}"
    );
}
