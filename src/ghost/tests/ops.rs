//! The agent operations (`ops.rs`) against the model.

use super::*;

#[test]
fn an_agent_thread_becomes_the_agent_of_its_cpu_with_its_own_status_word() {
    let s = setup(&[91]);
    let (e, q, sw) = enclave(&s, 64);
    e.become_agent(2, q.fd()).unwrap();
    let info = e.status_word_info(SwOwner::Agent(2)).unwrap();
    let word = sw.get(info.index).unwrap();
    assert_eq!(word.gtid, abi::GHOST_AGENT_GTID as u64);
    assert!(word.flags & abi::GHOST_SW_TASK_IS_AGENT != 0);
    assert!(word.flags & abi::GHOST_SW_CPU_AVAIL != 0);
    // A CPU outside the enclave has no agent to become.
    assert!(e.become_agent(6, q.fd()).is_err());
    assert!(e.status_word_info(SwOwner::Agent(1)).is_err());
}

#[test]
fn agent_online_admits_one_agent_process_until_it_dies() {
    let s = setup(&[91]);
    let (e, q, _) = enclave(&s, 64);
    e.become_agent(1, q.fd()).unwrap();
    assert!(!e.is_agent_online().unwrap());
    let online = e.agent_online().unwrap();
    assert!(e.is_agent_online().unwrap());
    match e.agent_online() {
        Err(GhostError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EBUSY)),
        other => panic!("second agent_online: {other:?}"),
    }
    drop(online);
    s.model.agent_process_died(e.id());
    assert!(!e.is_agent_online().unwrap());
    let _again = e.agent_online().unwrap();
}

#[test]
fn idle_wait_with_a_stale_agent_barrier_returns_stale_and_a_ping_moves_the_barrier() {
    let s = setup(&[91]);
    let (e, q, _) = enclave(&s, 64);
    e.become_agent(3, q.fd()).unwrap();
    let barrier = s.model.agent_barrier(e.id(), 3).unwrap();
    assert_eq!(e.idle_wait(3, barrier).unwrap(), RunOutcome::Returned);
    assert_eq!(e.ping(3).unwrap(), RunOutcome::Returned);
    assert_eq!(s.model.agent_barrier(e.id(), 3), Some(barrier + 1));
    assert_eq!(e.idle_wait(3, barrier).unwrap(), RunOutcome::Stale);
}

#[test]
fn cpu_time_and_task_status_words_are_looked_up_by_gtid() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let (gtid, _) = new_task(&s, &e, &mut q, 77);
    s.model.set_runtime(e.id(), gtid, 123_456);
    assert_eq!(e.cpu_time(gtid).unwrap(), 123_456);
    let index = s.model.task(e.id(), gtid).unwrap().sw_index;
    assert_eq!(
        e.status_word_info(SwOwner::Task(gtid)).unwrap().index,
        index
    );
    assert!(e.cpu_time(Model::gtid(78)).is_err());
}

#[test]
fn discovering_tasks_resends_task_new_with_current_barriers() {
    let s = setup(&[91]);
    let (e, mut q, sw) = enclave(&s, 64);
    let tasks: Vec<u64> = (10..13).map(|t| new_task(&s, &e, &mut q, t).0).collect();
    e.discover_tasks().unwrap();
    for &gtid in &tasks {
        let msg = q.pop().unwrap().expect("TASK_NEW again");
        let Message::TaskNew(p) = msg.message else {
            panic!("{msg:?}")
        };
        assert_eq!(p.gtid, gtid);
        let index = { p.sw_info }.index;
        assert_eq!(sw.get(index).unwrap().barrier, msg.seqnum);
    }
    assert!(q.pop().unwrap().is_none());
}

#[test]
fn a_sync_group_commits_all_or_poisons_the_rest() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    for c in [1, 2] {
        e.become_agent(c, q.fd()).unwrap();
    }
    let (a, sa) = new_task(&s, &e, &mut q, 21);
    let (b, sb) = new_task(&s, &e, &mut q, 22);
    cpu.open(1, run(a, sa)).unwrap();
    cpu.open(2, run(b, sb + 5)).unwrap();
    assert!(!e.commit_sync_group(&[1, 2]).unwrap());
    assert_eq!(cpu.outcome(1).unwrap(), Some(TxnOutcome::Poisoned));
    assert_eq!(cpu.outcome(2).unwrap(), Some(TxnOutcome::TargetStale));
    assert_eq!(s.model.task(e.id(), a).unwrap().on_cpu, None);
    cpu.open(1, run(a, sa)).unwrap();
    cpu.open(2, run(b, sb)).unwrap();
    assert!(e.commit_sync_group(&[1, 2]).unwrap());
    assert_eq!(cpu.outcome(1).unwrap(), Some(TxnOutcome::Complete));
    assert_eq!(cpu.outcome(2).unwrap(), Some(TxnOutcome::Complete));
}

#[test]
fn a_transaction_of_another_version_is_refused() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    let cpu = e.cpu_data(model::NCPUS).unwrap();
    e.become_agent(1, q.fd()).unwrap();
    let (a, sa) = new_task(&s, &e, &mut q, 31);
    cpu.open_versioned(1, run(a, sa), abi::GHOST_TXN_VERSION + 1)
        .unwrap();
    e.commit(&[1]).unwrap();
    assert_eq!(
        cpu.outcome(1).unwrap(),
        Some(TxnOutcome::UnsupportedVersion)
    );
}

#[test]
fn a_ghost_timerfd_delivers_its_type_and_cookie_to_the_agent() {
    let s = setup(&[91]);
    let (e, mut q, _) = enclave(&s, 64);
    e.become_agent(2, q.fd()).unwrap();
    // SAFETY: timerfd_create has no memory arguments; the fd is owned below.
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let before = s.model.agent_barrier(e.id(), 2).unwrap();
    e.timerfd_settime(
        &fd,
        2,
        Duration::from_millis(5),
        Duration::ZERO,
        7,
        0xC0FFEE,
    )
    .unwrap();
    assert!(s.model.fire_timer(e.id(), 0));
    let msg = q.pop().unwrap().expect("MSG_CPU_TIMER_EXPIRED");
    let Message::CpuTimerExpired(t) = msg.message else {
        panic!("{msg:?}")
    };
    assert_eq!(({ t.cpu }, { t.type_ }, { t.cookie }), (2, 7, 0xC0FFEE));
    assert_eq!(msg.seqnum, before + 1);
    assert!(e
        .timerfd_settime(&fd, 7, Duration::from_millis(5), Duration::ZERO, 0, 0)
        .is_err());
}
