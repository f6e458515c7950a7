//! The safe layer against the kernel model (`model.rs`).

use super::model::{as_bytes, Model};
use super::*;

struct Setup {
    _dir: tempfile::TempDir,
    model: Model,
    fs: Ghostfs,
}

fn setup(versions: &[u32]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ghost");
    let model = Model::new(&root, versions);
    let fs = Ghostfs::new(&root, Box::new(model.clone()));
    Setup {
        _dir: dir,
        model,
        fs,
    }
}

/// An enclave on CPUs 0–3 with status-word region 0 and a default queue of `elems` slots.
fn enclave(s: &Setup, elems: u32) -> (Enclave<'_>, Queue, StatusWords) {
    let e = s.fs.create_enclave(1).unwrap();
    e.set_cpus(&[0, 1, 2, 3]).unwrap();
    let sw = e.sw_region(0, 0).unwrap();
    let q = e.create_queue(elems, 0).unwrap();
    e.set_default_queue(&q).unwrap();
    (e, q, sw)
}

#[test]
fn versions_are_read_and_a_kernel_without_91_is_refused() {
    let s = setup(&[90, 91]);
    assert_eq!(s.fs.versions().unwrap(), vec![90, 91]);
    s.fs.check_version().unwrap();
    let old = setup(&[83, 84]);
    match old.fs.create_enclave(1) {
        Err(GhostError::Unsupported { offered, wanted }) => {
            assert_eq!((offered, wanted), (vec![83, 84], 91))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an ABI-84 kernel was accepted"),
    }
    let none = Ghostfs::new("/nonexistent/ghost", Box::new(RealKernel));
    assert!(matches!(none.versions(), Err(GhostError::NotPresent(_))));
}

#[test]
fn enclave_ids_in_use_are_skipped_and_destroy_removes_the_enclave() {
    let s = setup(&[91]);
    s.model
        .write(&s._dir.path().join("ghost/ctl"), b"create 1 91")
        .unwrap();
    let e = s.fs.create_enclave(1).unwrap();
    assert_eq!(e.id(), 2);
    let dir = e.dir().to_owned();
    assert!(dir.join("cpu_data").exists());
    e.destroy().unwrap();
    assert!(!dir.exists());
}

#[test]
fn cpulist_busy_from_a_dying_enclave_is_retried() {
    let s = setup(&[91]);
    let e = s.fs.create_enclave(1).unwrap();
    s.model.busy_cpulist(e.id(), 3);
    e.set_cpus(&[1, 2]).unwrap();
    assert_eq!(s.model.cpus(e.id()), vec![1, 2]);
    s.model.busy_cpulist(e.id(), 50);
    assert!(matches!(e.set_cpus(&[1]), Err(GhostError::Io { .. })));
}

#[test]
fn ring_is_consumed_exactly_across_many_wrap_arounds() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 16);
    // Messages of 2, 4 and 7 slots in a 16-slot ring: the kernel pads with NOPs at the end.
    let mut expected = Vec::new();
    for i in 0..20_000u32 {
        let (ty, payload): (u16, Vec<u8>) = match i % 3 {
            0 => (
                abi::MSG_CPU_TICK,
                as_bytes(&abi::ghost_msg_payload_cpu_tick {
                    cpu: (i % 7) as i32,
                    is_agent: 0,
                })
                .to_vec(),
            ),
            1 => (
                abi::MSG_CPU_TIMER_EXPIRED,
                as_bytes(&abi::ghost_msg_payload_timer {
                    cpu: 1,
                    type_: u64::from(i),
                    cookie: u64::MAX - u64::from(i),
                })
                .to_vec(),
            ),
            _ => (
                abi::MSG_TASK_NEW,
                as_bytes(&abi::ghost_msg_payload_task_new {
                    gtid: u64::from(i) << 41,
                    runtime: 7,
                    nice: -5,
                    ..Default::default()
                })
                .to_vec(),
            ),
        };
        assert!(s.model.produce(e.id(), ty, i, &payload), "overflow at {i}");
        expected.push((i, ty));
        // Consume in lockstep every other message, so the ring holds 1–2 messages and wraps
        // thousands of times at every offset.
        if i % 2 == 1 {
            for (seq, ty) in expected.drain(..) {
                let got = q.pop().unwrap().expect("a message");
                assert_eq!(got.seqnum, seq);
                let ok = match (&got.message, ty) {
                    (Message::CpuTick(p), abi::MSG_CPU_TICK) => p.cpu == (seq % 7) as i32,
                    (Message::CpuTimerExpired(p), abi::MSG_CPU_TIMER_EXPIRED) => {
                        p.type_ == u64::from(seq) && p.cookie == u64::MAX - u64::from(seq)
                    }
                    (Message::TaskNew(p), abi::MSG_TASK_NEW) => {
                        p.gtid == u64::from(seq) << 41 && p.nice == -5
                    }
                    _ => false,
                };
                assert!(ok, "message {seq}: {:?}", got.message);
            }
            assert_eq!(q.pop().unwrap(), None);
        }
    }
    assert_eq!(q.take_overflow(), 0);
}

#[test]
fn a_full_ring_drops_and_counts_overflow_then_recovers() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 16);
    let tick = as_bytes(&abi::ghost_msg_payload_cpu_tick {
        cpu: 3,
        is_agent: 1,
    })
    .to_vec();
    let queued = (0..20)
        .filter(|&i| s.model.produce(e.id(), abi::MSG_CPU_TICK, i, &tick))
        .count();
    assert_eq!(queued, 8, "16 slots hold eight 2-slot messages");
    assert_eq!(q.take_overflow(), 12);
    assert_eq!(q.take_overflow(), 0, "overflow is reported once");
    for i in 0..8 {
        assert_eq!(q.pop().unwrap().unwrap().seqnum, i);
    }
    assert_eq!(q.pop().unwrap(), None);
    assert!(s.model.produce(e.id(), abi::MSG_CPU_TICK, 99, &tick));
    assert_eq!(q.pop().unwrap().unwrap().seqnum, 99);
}

#[test]
fn every_payload_decodes_from_the_kernels_bytes() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 256);
    let g = 0x0123_4567_89ab_cdef;
    let cases: Vec<(u16, Vec<u8>, Message)> = vec![
        {
            let p = abi::ghost_msg_payload_task_new {
                gtid: g,
                parent_gtid: 2,
                runtime: 3,
                runnable: 1,
                nice: -20,
                sw_info: abi::ghost_sw_info { id: 4, index: 5 },
                agent_data: 6,
            };
            (
                abi::MSG_TASK_NEW,
                as_bytes(&p).to_vec(),
                Message::TaskNew(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_wakeup {
                gtid: g,
                agent_data: 9,
                deferrable: 1,
                last_ran_cpu: 2,
                wake_up_cpu: 3,
                waker_cpu: 4,
            };
            (
                abi::MSG_TASK_WAKEUP,
                as_bytes(&p).to_vec(),
                Message::TaskWakeup(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_blocked {
                gtid: g,
                runtime: 1,
                cpu_seqnum: 2,
                cpu: 3,
                from_switchto: 1,
            };
            (
                abi::MSG_TASK_BLOCKED,
                as_bytes(&p).to_vec(),
                Message::TaskBlocked(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_preempt {
                gtid: g,
                runtime: 1,
                cpu_seqnum: 2,
                agent_data: 3,
                cpu: 4,
                from_switchto: 0,
                was_latched: 1,
            };
            (
                abi::MSG_TASK_PREEMPT,
                as_bytes(&p).to_vec(),
                Message::TaskPreempt(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_yield {
                gtid: g,
                runtime: 1,
                cpu_seqnum: 2,
                agent_data: 3,
                cpu: 4,
                from_switchto: 1,
            };
            (
                abi::MSG_TASK_YIELD,
                as_bytes(&p).to_vec(),
                Message::TaskYield(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_dead { gtid: g, cpu: 7 };
            (
                abi::MSG_TASK_DEAD,
                as_bytes(&p).to_vec(),
                Message::TaskDead(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_departed {
                gtid: g,
                cpu_seqnum: 5,
                cpu: 6,
                from_switchto: 0,
                was_current: 1,
            };
            (
                abi::MSG_TASK_DEPARTED,
                as_bytes(&p).to_vec(),
                Message::TaskDeparted(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_switchto {
                gtid: g,
                runtime: 1,
                cpu_seqnum: 2,
                cpu: 3,
            };
            (
                abi::MSG_TASK_SWITCHTO,
                as_bytes(&p).to_vec(),
                Message::TaskSwitchto(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_affinity_changed { gtid: g };
            (
                abi::MSG_TASK_AFFINITY_CHANGED,
                as_bytes(&p).to_vec(),
                Message::TaskAffinityChanged(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_on_cpu {
                gtid: g,
                commit_time: 8,
                cpu_seqnum: 9,
                cpu: 1,
            };
            (
                abi::MSG_TASK_ON_CPU,
                as_bytes(&p).to_vec(),
                Message::TaskOnCpu(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_priority_changed { gtid: g, nice: 19 };
            (
                abi::MSG_TASK_PRIORITY_CHANGED,
                as_bytes(&p).to_vec(),
                Message::TaskPriorityChanged(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_task_latch_failure {
                gtid: g,
                errno_: libc::EAGAIN,
            };
            (
                abi::MSG_TASK_LATCH_FAILURE,
                as_bytes(&p).to_vec(),
                Message::TaskLatchFailure(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_cpu_tick {
                cpu: 2,
                is_agent: 1,
            };
            (
                abi::MSG_CPU_TICK,
                as_bytes(&p).to_vec(),
                Message::CpuTick(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_timer {
                cpu: 3,
                type_: 4,
                cookie: 5,
            };
            (
                abi::MSG_CPU_TIMER_EXPIRED,
                as_bytes(&p).to_vec(),
                Message::CpuTimerExpired(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_cpu_not_idle {
                cpu: 1,
                next_gtid: g,
            };
            (
                abi::MSG_CPU_NOT_IDLE,
                as_bytes(&p).to_vec(),
                Message::CpuNotIdle(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_cpu { cpu: 5 };
            (
                abi::MSG_CPU_AVAILABLE,
                as_bytes(&p).to_vec(),
                Message::CpuAvailable(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_cpu { cpu: 6 };
            (
                abi::MSG_CPU_BUSY,
                as_bytes(&p).to_vec(),
                Message::CpuBusy(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_cpu { cpu: 7 };
            (
                abi::MSG_CPU_AGENT_BLOCKED,
                as_bytes(&p).to_vec(),
                Message::CpuAgentBlocked(p),
            )
        },
        {
            let p = abi::ghost_msg_payload_cpu { cpu: 0 };
            (
                abi::MSG_CPU_AGENT_WAKEUP,
                as_bytes(&p).to_vec(),
                Message::CpuAgentWakeup(p),
            )
        },
        (
            200,
            vec![1, 2, 3],
            Message::Unknown {
                type_: 200,
                payload: vec![1, 2, 3],
            },
        ),
    ];
    for (i, (ty, bytes, _)) in cases.iter().enumerate() {
        assert!(s.model.produce(e.id(), *ty, i as u32, bytes));
    }
    for (i, (_, _, want)) in cases.into_iter().enumerate() {
        let got = q.pop().unwrap().unwrap();
        assert_eq!((got.seqnum, got.message), (i as u32, want));
    }
}

#[test]
fn a_message_shorter_than_its_payload_is_corrupt_not_a_panic() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 16);
    // A TASK_NEW with a 4-byte payload.
    assert!(s.model.produce(e.id(), abi::MSG_TASK_NEW, 1, &[0; 4]));
    assert!(matches!(q.pop(), Err(GhostError::Corrupt(_))));
}

/// A task in the enclave: (gtid, the seqnum of its TASK_NEW).
fn new_task(s: &Setup, e: &Enclave<'_>, q: &mut Queue, tid: u32) -> (u64, u32) {
    e.add_task(tid).unwrap();
    let msg = q.pop().unwrap().expect("TASK_NEW");
    let Message::TaskNew(p) = msg.message else {
        panic!("{msg:?}")
    };
    assert_eq!(p.gtid, Model::gtid(tid));
    let _ = s;
    (p.gtid, msg.seqnum)
}

#[test]
fn status_words_carry_the_barrier_of_the_last_message() {
    let s = setup(&[91]);
    let (e, mut q, sw) = enclave(&s, 64);
    let (gtid, seq) = new_task(&s, &e, &mut q, 4242);
    let index = s.model.task(e.id(), gtid).unwrap().sw_index;
    let word = sw.get(index).unwrap();
    assert_eq!((word.barrier, word.gtid), (seq, gtid));
    assert!(word.flags & abi::GHOST_SW_TASK_RUNNABLE != 0);
    let wakeup = abi::ghost_msg_payload_task_wakeup {
        gtid,
        ..Default::default()
    };
    let next = s
        .model
        .task_event(e.id(), gtid, abi::MSG_TASK_WAKEUP, as_bytes(&wakeup), true)
        .unwrap();
    assert_eq!(next, seq + 1);
    assert_eq!(sw.get(index).unwrap().barrier, next);
    assert_eq!(sw.get(abi::GHOST_SW_REGION_CAPACITY), None);
}

fn run(gtid: u64, barrier: u32) -> TxnRequest {
    TxnRequest {
        gtid: gtid as i64,
        task_barrier: barrier,
        agent_barrier: 0,
        run_flags: 0,
        commit_flags: abi::COMMIT_AT_TXN_COMMIT,
    }
}

#[test]
fn a_transaction_with_the_current_barrier_completes_and_a_stale_one_fails() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    s.model.attach_agent(e.id(), 1);
    let (gtid, seq) = new_task(&s, &e, &mut q, 77);
    // A message the agent has not read yet makes its barrier stale.
    let blocked = abi::ghost_msg_payload_task_blocked {
        gtid,
        ..Default::default()
    };
    s.model
        .task_event(
            e.id(),
            gtid,
            abi::MSG_TASK_BLOCKED,
            as_bytes(&blocked),
            true,
        )
        .unwrap();
    cpu.open(1, run(gtid, seq)).unwrap();
    assert_eq!(cpu.outcome(1).unwrap(), None, "open, not committed");
    e.commit(&[1]).unwrap();
    assert_eq!(cpu.outcome(1).unwrap(), Some(TxnOutcome::TargetStale));
    assert!(TxnOutcome::TargetStale.is_expected_failure());
    // Read the message, retry with its seqnum.
    let read = q.pop().unwrap().unwrap();
    cpu.open(1, run(gtid, read.seqnum)).unwrap();
    e.commit(&[1]).unwrap();
    assert_eq!(cpu.outcome(1).unwrap(), Some(TxnOutcome::Complete));
    assert_eq!(cpu.commit_time(1).unwrap(), 123_456_789);
    assert_eq!(s.model.task(e.id(), gtid).unwrap().on_cpu, Some(1));
}

#[test]
fn every_failure_state_is_surfaced_as_a_typed_outcome() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    for c in [0, 1, 2] {
        s.model.attach_agent(e.id(), c);
    }
    s.model.make_unavailable(e.id(), 2);
    let (a, a_seq) = new_task(&s, &e, &mut q, 100);
    let (b, _) = new_task(&s, &e, &mut q, 101);
    // b blocks: not runnable.
    let blocked = abi::ghost_msg_payload_task_blocked {
        gtid: b,
        ..Default::default()
    };
    let b_seq = s
        .model
        .task_event(e.id(), b, abi::MSG_TASK_BLOCKED, as_bytes(&blocked), false)
        .unwrap();
    q.pop().unwrap();

    let check = |c: u32, req: TxnRequest, want: TxnOutcome| {
        cpu.open(c, req).unwrap();
        e.commit(&[c]).unwrap();
        assert_eq!(cpu.outcome(c).unwrap(), Some(want), "cpu {c}, {req:?}");
    };
    check(0, run(Model::gtid(999), 1), TxnOutcome::TargetNotFound);
    check(0, run(b, b_seq), TxnOutcome::TargetNotRunnable);
    check(3, run(a, a_seq), TxnOutcome::NoAgent);
    check(2, run(a, a_seq), TxnOutcome::CpuUnavailable);
    check(4, run(a, a_seq), TxnOutcome::InvalidCpu); // not in the enclave's cpulist
    check(
        0,
        TxnRequest {
            commit_flags: 0x80,
            ..run(a, a_seq)
        },
        TxnOutcome::InvalidFlags,
    );
    check(0, run(a, a_seq), TxnOutcome::Complete);
    check(1, run(a, a_seq), TxnOutcome::TargetOnCpu); // a runs on CPU 0
    check(
        1,
        TxnRequest {
            commit_flags: abi::COMMIT_AT_TXN_COMMIT | abi::ALLOW_TASK_ONCPU,
            ..run(a, a_seq)
        },
        TxnOutcome::Complete,
    );
    // Aborted before the commit: the kernel does not claim it.
    cpu.open(0, run(a, a_seq)).unwrap();
    assert!(cpu.abort(0).unwrap());
    e.commit(&[0]).unwrap();
    assert_eq!(cpu.outcome(0).unwrap(), Some(TxnOutcome::Aborted));
    assert!(!cpu.abort(0).unwrap(), "nothing open to abort");
}

#[test]
fn a_transaction_in_flight_cannot_be_reopened() {
    let s = setup(&[91]);
    let (e, _, _) = enclave(&s, 16);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    cpu.open(0, run(1, 1)).unwrap();
    assert!(matches!(cpu.open(0, run(1, 1)), Err(GhostError::Misuse(_))));
    assert!(matches!(
        cpu.open(model::NCPUS as u32, run(1, 1)),
        Err(GhostError::Misuse(_))
    ));
}

#[test]
fn group_commit_settles_every_cpu_in_the_mask() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    for c in [1, 2, 3] {
        s.model.attach_agent(e.id(), c);
    }
    let tasks: Vec<(u64, u32)> = (0..3).map(|i| new_task(&s, &e, &mut q, 500 + i)).collect();
    for (c, (g, b)) in (1..).zip(&tasks) {
        cpu.open(c, run(*g, *b)).unwrap();
    }
    e.commit(&[1, 2, 3]).unwrap();
    for c in 1..=3 {
        assert_eq!(cpu.outcome(c).unwrap(), Some(TxnOutcome::Complete));
    }
}

#[test]
fn queues_associate_with_tasks_and_configure_wakeups() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let (gtid, seq) = new_task(&s, &e, &mut q, 31);
    let other = e.create_queue(32, 0).unwrap();
    assert!(
        matches!(e.associate(&other, gtid, seq + 5), Err(GhostError::Io { source, .. }) if source.raw_os_error() == Some(libc::ESTALE))
    );
    assert_eq!(
        e.associate(&other, gtid, seq).unwrap(),
        Association {
            already: false,
            brand_new: true
        }
    );
    assert_eq!(
        e.associate(&other, gtid, seq).unwrap(),
        Association {
            already: true,
            brand_new: false
        }
    );
    e.config_queue_wakeup(&q, &[2]).unwrap();
    assert_eq!(s.model.wakeups(e.id()), vec![2]);
    assert!(matches!(
        e.config_queue_wakeup(&q, &[1, 2, 3]),
        Err(GhostError::Misuse(_))
    ));
    assert!(matches!(e.create_queue(100, 0), Err(GhostError::Misuse(_))));
}

#[test]
fn a_status_word_is_freed_only_once_the_kernel_allows_it() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let (gtid, _) = new_task(&s, &e, &mut q, 9);
    let index = s.model.task(e.id(), gtid).unwrap().sw_index;
    let info = abi::ghost_sw_info { id: 0, index };
    assert!(
        matches!(e.free_status_word(info), Err(GhostError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL))
    );
    let dead = abi::ghost_msg_payload_task_dead { gtid, cpu: 0 };
    s.model
        .task_event(e.id(), gtid, abi::MSG_TASK_DEAD, as_bytes(&dead), false)
        .unwrap();
    assert!(matches!(
        q.pop().unwrap().unwrap().message,
        Message::TaskDead(_)
    ));
    e.free_status_word(info).unwrap();
    assert!(s.model.task(e.id(), gtid).is_none());
}

#[test]
fn mappings_are_released_when_their_owners_drop() {
    let s = setup(&[91]);
    let (e, q, sw) = enclave(&s, 16);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();
    let ours = |m: &str, p: &str| m.lines().filter(|l| l.ends_with(p)).count();
    let sw_path = e.dir().join("sw_regions/sw_0").display().to_string();
    let cpu_path = e.dir().join("cpu_data").display().to_string();
    // The model maps each file too: one mapping is the model's, one the agent's.
    assert_eq!(ours(&maps(), &sw_path), 2);
    assert_eq!(ours(&maps(), &cpu_path), 2);
    drop((q, sw, cpu));
    assert_eq!(ours(&maps(), &sw_path), 1);
    assert_eq!(ours(&maps(), &cpu_path), 1);
}

#[test]
fn threads_move_to_cfs() {
    // On a real kernel: sched_setscheduler(SCHED_OTHER) on the thread.
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    RealKernel.to_cfs(tid).unwrap();
    // SAFETY: sched_getscheduler only reads.
    assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    // On the model: the task departs (TASK_DEPARTED, its status word may be freed), and the
    // model touches no real thread; a thread in no enclave is ESRCH.
    let s = setup(&[91]);
    let (e, mut q, sw) = enclave(&s, 16);
    e.add_task(4242).unwrap();
    e.remove_task(4242).unwrap();
    let gtid = Model::gtid(4242);
    let types: Vec<bool> = std::iter::from_fn(|| q.pop().unwrap())
        .map(|m| matches!(m.message, Message::TaskDeparted(p) if p.gtid == gtid))
        .collect();
    assert_eq!(types, [false, true], "TASK_NEW, then TASK_DEPARTED");
    let index = s.model.task(1, gtid).unwrap().sw_index;
    assert_ne!(sw.get(index).unwrap().flags & abi::GHOST_SW_F_CANFREE, 0);
    let err = e.remove_task(4343).unwrap_err();
    assert!(err.to_string().contains("thread 4343"), "{err}");
}

mod ops;

mod agent;
