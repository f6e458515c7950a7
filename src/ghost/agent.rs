//! The centralized ghOSt agent (global-agent style, fact sheet §4) driving the policy of
//! [`crate::sched`]: one agent makes every decision for the enclave's CPUs. Each
//! [`GhostAgent::step`] drains the queue into the policy, asks it what to change, and commits
//! the transactions as one group; failed ones go back to the policy. The clock is the
//! caller's: the agent thread passes `CLOCK_MONOTONIC`, the model's driver its simulated time.
//!
//! Run against the kernel model only: no ghOSt kernel exists on the development or CI
//! machines.

use std::collections::HashMap;

use ghost_sys as abi;

use super::{CpuData, Enclave, GhostError, Message, Queue, StatusWords, TxnRequest};
use crate::contention::Entitlement;
use crate::sched::{Action, Config, Scheduler, VmId};

/// A task the agent knows: its VM, status word and the seqnum of its last message.
#[derive(Clone, Copy, Debug)]
struct Task {
    sw: abi::ghost_sw_info,
    seq: u32,
}

/// What one [`GhostAgent::step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Messages handled.
    pub messages: u32,
    /// Transactions committed.
    pub committed: u32,
    /// Of which failed (the policy retries them).
    pub failed: u32,
}

/// The agent's state over one enclave.
pub struct GhostAgent<'a> {
    enclave: &'a Enclave<'a>,
    queue: Queue,
    sw: StatusWords,
    cpu_data: CpuData,
    sched: Scheduler,
    tasks: HashMap<u64, Task>,
    /// VM of each thread id (a gtid's upper bits are its tid).
    vm_of_tid: HashMap<u32, VmId>,
    /// When the tasks' CPUs were last read (the caller's clock, ns).
    cpus_read_at: u64,
}

/// How often every task's CPUs are read again: `TASK_AFFINITY_CHANGED` is sent before the
/// kernel stores the new mask, so the read it prompts may see the old one.
const CPUS_READ_EVERY: u64 = 1_000_000_000;

/// The thread id in a gtid.
pub fn tid_of(gtid: u64) -> u32 {
    (gtid >> abi::GHOST_TID_SEQNUM_BITS) as u32
}

impl<'a> GhostAgent<'a> {
    /// An agent for `enclave`, scheduling `cpus` with `config`. Status-word region 0 and a
    /// default queue are created; `become agent` for each CPU is the caller's (it must come
    /// from the thread pinned to that CPU); `discover` then learns tasks already there.
    pub fn new(
        enclave: &'a Enclave<'a>,
        cpus: &[u32],
        possible_cpus: usize,
        config: Config,
    ) -> Result<Self, GhostError> {
        Self::with_queue(
            enclave,
            cpus,
            possible_cpus,
            config,
            abi::GHOST_MAX_QUEUE_ELEMS,
        )
    }

    /// [`GhostAgent::new`] with a queue of `elems` slots (a power of two).
    pub fn with_queue(
        enclave: &'a Enclave<'a>,
        cpus: &[u32],
        possible_cpus: usize,
        config: Config,
        elems: u32,
    ) -> Result<Self, GhostError> {
        let sw = enclave.sw_region(0, 0)?;
        Self::over(enclave, sw, elems, cpus, possible_cpus, config)
    }

    /// A restarted agent over an enclave whose region 0 and default queue exist: it maps
    /// them again (`queue` from a new `CREATE_QUEUE` made default) and asks the kernel for
    /// its tasks.
    pub fn restart(
        enclave: &'a Enclave<'a>,
        sw: StatusWords,
        cpus: &[u32],
        possible_cpus: usize,
        config: Config,
    ) -> Result<Self, GhostError> {
        Self::over(
            enclave,
            sw,
            abi::GHOST_MAX_QUEUE_ELEMS,
            cpus,
            possible_cpus,
            config,
        )
    }

    /// An agent over `sw` with a new default queue of `elems` slots and no tasks yet.
    fn over(
        enclave: &'a Enclave<'a>,
        sw: StatusWords,
        elems: u32,
        cpus: &[u32],
        possible_cpus: usize,
        config: Config,
    ) -> Result<Self, GhostError> {
        let queue = enclave.create_queue(elems, 0)?;
        enclave.set_default_queue(&queue)?;
        let cpu_data = enclave.cpu_data(possible_cpus)?;
        Ok(GhostAgent {
            enclave,
            queue,
            sw,
            cpu_data,
            sched: Scheduler::new(config, cpus),
            tasks: HashMap::new(),
            vm_of_tid: HashMap::new(),
            cpus_read_at: 0,
        })
    }

    /// The queue (for `become agent`).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The policy (read-only).
    pub fn policy(&self) -> &Scheduler {
        &self.sched
    }

    /// Registers `vm` with what the planner entitles it to (cap, guarantee, weight) and moves
    /// its vCPU threads into the enclave; they arrive as `TASK_NEW`.
    pub fn add_vm(
        &mut self,
        vm: VmId,
        tids: &[u32],
        entitled: Entitlement,
    ) -> Result<(), GhostError> {
        self.sched.set_vm(vm, entitled);
        for &tid in tids {
            self.vm_of_tid.insert(tid, vm);
            self.enclave.add_task(tid)?;
        }
        Ok(())
    }

    /// Tells the agent which VM threads belong to, for threads already in the enclave (a
    /// restarted agent, before [`Enclave::discover_tasks`]).
    pub fn adopt_vm(&mut self, vm: VmId, tids: &[u32], entitled: Entitlement) {
        self.sched.set_vm(vm, entitled);
        for &tid in tids {
            self.vm_of_tid.insert(tid, vm);
        }
    }

    /// Learns the tasks already in the enclave (a restarted agent), as userspace's
    /// `DiscoverTasks`: every in-use, non-agent status word is associated with this agent's
    /// queue at its current barrier (`ESTALE`: a message slipped in, read the word again)
    /// and enters the policy as if `TASK_NEW` had come. Threads of no registered VM are left
    /// alone. Returns how many tasks were found.
    pub fn discover(&mut self, now: u64) -> Result<usize, GhostError> {
        let mut found = 0;
        let mut index = 0;
        while let Some(word) = self.sw.get(index) {
            let i = index;
            index += 1;
            let ours = word.flags & abi::GHOST_SW_F_INUSE != 0
                && word.flags & abi::GHOST_SW_TASK_IS_AGENT == 0
                && word.gtid != 0;
            let Some(&vm) = self.vm_of_tid.get(&tid_of(word.gtid)) else {
                continue;
            };
            if !ours || self.tasks.contains_key(&word.gtid) {
                continue;
            }
            let mut word = word;
            for attempt in 0.. {
                match self.enclave.associate(&self.queue, word.gtid, word.barrier) {
                    Ok(_) => break,
                    Err(GhostError::Io { source, .. })
                        if source.raw_os_error() == Some(libc::ESTALE) && attempt < 16 =>
                    {
                        word = self.sw.get(i).expect("index in range");
                    }
                    Err(e) => return Err(e),
                }
            }
            self.tasks.insert(
                word.gtid,
                Task {
                    sw: abi::ghost_sw_info { id: 0, index: i },
                    seq: word.barrier,
                },
            );
            let runnable = word.flags & abi::GHOST_SW_TASK_RUNNABLE != 0;
            self.sched.add_thread(vm, word.gtid, runnable, now);
            self.read_cpus(word.gtid);
            found += 1;
        }
        Ok(found)
    }

    /// What the planner entitles `vm` to now (a new grant, a live edit of its baseline, the
    /// rule's weight).
    pub fn entitle(&mut self, vm: VmId, entitled: Entitlement) {
        self.sched.set_vm(vm, entitled);
    }

    /// Moves `vm`'s threads back to CFS through `to_cfs` (the caller's `sched_setscheduler`;
    /// [`Enclave::remove_task`] on a real kernel) and forgets the VM.
    pub fn remove_vm(
        &mut self,
        vm: VmId,
        mut to_cfs: impl FnMut(u32) -> Result<(), GhostError>,
    ) -> Result<(), GhostError> {
        let tids: Vec<u32> = self
            .vm_of_tid
            .iter()
            .filter(|(_, &v)| v == vm)
            .map(|(&t, _)| t)
            .collect();
        self.sched.remove_vm(vm);
        for tid in tids {
            self.vm_of_tid.remove(&tid);
            to_cfs(tid)?;
        }
        Ok(())
    }

    /// One round at `now`: drain, decide, commit. Returns what it did.
    pub fn step(&mut self, now: u64) -> Result<StepReport, GhostError> {
        let mut report = StepReport::default();
        if self.queue.take_overflow() > 0 {
            // Messages were dropped: the status words still hold the truth.
            tracing::warn!("ghOSt queue overflowed; resynchronizing from the status words");
            self.drain(now, &mut report)?;
            self.resync(now);
            self.discover(now)?;
        }
        self.drain(now, &mut report)?;
        if now >= self.cpus_read_at + CPUS_READ_EVERY {
            self.cpus_read_at = now;
            let gtids: Vec<u64> = self.tasks.keys().copied().collect();
            for gtid in gtids {
                self.read_cpus(gtid);
            }
        }
        let actions = self.sched.decide(now);
        let mut cpus = Vec::new();
        let mut runs = Vec::new();
        for a in actions {
            let (cpu, gtid, barrier) = match a {
                Action::Extend { .. } => continue,
                Action::Preempt { cpu, .. } => (cpu, abi::GHOST_NULL_GTID, 0),
                Action::Run { cpu, tid, .. } => {
                    let Some(t) = self.tasks.get(&tid) else {
                        self.sched.remove_thread(tid, now);
                        continue;
                    };
                    runs.push((cpu, tid));
                    (cpu, tid as i64, t.seq)
                }
            };
            self.cpu_data.open(
                cpu,
                TxnRequest {
                    gtid,
                    task_barrier: barrier,
                    agent_barrier: 0,
                    run_flags: 0,
                    commit_flags: abi::COMMIT_AT_TXN_COMMIT,
                },
            )?;
            cpus.push(cpu);
        }
        if cpus.is_empty() {
            return Ok(report);
        }
        report.committed = cpus.len() as u32;
        let failed = self.commit_and_wait(&cpus)?;
        let mut vacate = Vec::new();
        for (cpu, outcome) in failed {
            report.failed += 1;
            if !outcome.is_expected_failure() {
                tracing::warn!(cpu, ?outcome, "unexpected transaction failure");
            }
            if let Some(&(_, tid)) = runs.iter().find(|r| r.0 == cpu) {
                self.sched.failed(tid, now);
                vacate.push(cpu);
            }
        }
        // A failed run leaves the CPU's previous task running in the kernel, while the policy
        // took it off (and charged it up to now): preempt it, so kernel and policy agree and
        // nothing runs uncharged.
        if !vacate.is_empty() {
            for &cpu in &vacate {
                self.cpu_data.open(
                    cpu,
                    TxnRequest {
                        gtid: abi::GHOST_NULL_GTID,
                        task_barrier: 0,
                        agent_barrier: 0,
                        run_flags: 0,
                        commit_flags: abi::COMMIT_AT_TXN_COMMIT,
                    },
                )?;
            }
            for (cpu, outcome) in self.commit_and_wait(&vacate)? {
                tracing::warn!(cpu, ?outcome, "could not vacate a CPU after a failed run");
            }
        }
        Ok(report)
    }

    /// Commits the open transactions of `cpus` as a group and waits for each; the failures.
    fn commit_and_wait(&self, cpus: &[u32]) -> Result<Vec<(u32, super::TxnOutcome)>, GhostError> {
        self.enclave.commit(cpus)?;
        let mut failed = Vec::new();
        for &cpu in cpus {
            let outcome = loop {
                if let Some(o) = self.cpu_data.outcome(cpu)? {
                    break o;
                }
                std::hint::spin_loop();
            };
            if outcome != super::TxnOutcome::Complete {
                failed.push((cpu, outcome));
            }
        }
        Ok(failed)
    }

    fn drain(&mut self, now: u64, report: &mut StepReport) -> Result<(), GhostError> {
        while let Some(msg) = self.queue.pop()? {
            report.messages += 1;
            self.handle(msg.seqnum, msg.message, now)?;
        }
        Ok(())
    }

    /// After lost messages: every known task's seqnum and runnability from its status word.
    fn resync(&mut self, now: u64) {
        let known: Vec<(u64, u32)> = self.tasks.iter().map(|(&g, t)| (g, t.sw.index)).collect();
        for (gtid, index) in known {
            let Some(word) = self.sw.get(index) else {
                continue;
            };
            if word.gtid != gtid || word.flags & abi::GHOST_SW_F_INUSE == 0 {
                self.sched.remove_thread(gtid, now);
                self.tasks.remove(&gtid);
                continue;
            }
            if let Some(t) = self.tasks.get_mut(&gtid) {
                t.seq = word.barrier;
            }
            if word.flags & abi::GHOST_SW_TASK_RUNNABLE != 0 {
                self.sched.wake(gtid, now);
            } else {
                self.sched.stop(gtid, now, false);
            }
        }
    }

    fn handle(&mut self, seq: u32, msg: Message, now: u64) -> Result<(), GhostError> {
        let gtid = match &msg {
            Message::TaskNew(p) => {
                let gtid = p.gtid;
                let Some(&vm) = self.vm_of_tid.get(&tid_of(gtid)) else {
                    // Not a vCPU thread of ours: leave it unscheduled; it goes back to CFS
                    // with the enclave.
                    tracing::warn!(gtid, "task of no registered VM in the enclave");
                    return Ok(());
                };
                self.tasks.insert(gtid, Task { sw: p.sw_info, seq });
                let runnable = p.runnable != 0;
                self.sched.add_thread(vm, gtid, runnable, now);
                self.read_cpus(gtid);
                return Ok(());
            }
            Message::TaskWakeup(p) => p.gtid,
            Message::TaskBlocked(p) => p.gtid,
            Message::TaskPreempt(p) => p.gtid,
            Message::TaskYield(p) => p.gtid,
            Message::TaskDead(p) => p.gtid,
            Message::TaskDeparted(p) => p.gtid,
            Message::TaskOnCpu(p) => p.gtid,
            Message::TaskLatchFailure(p) => p.gtid,
            Message::TaskAffinityChanged(p) => p.gtid,
            _ => return Ok(()), // CPU messages: ticks and timers only wake the agent.
        };
        let Some(task) = self.tasks.get_mut(&gtid) else {
            return Ok(());
        };
        task.seq = seq;
        let sw = task.sw;
        match msg {
            Message::TaskWakeup(_) => self.sched.wake(gtid, now),
            Message::TaskBlocked(_) => self.sched.stop(gtid, now, false),
            // Only if the policy still has it there: it may have moved the task already.
            Message::TaskPreempt(p) if self.sched.running_on(p.cpu as u32) == Some(gtid) => {
                self.sched.stop(gtid, now, true)
            }
            Message::TaskYield(p) if self.sched.running_on(p.cpu as u32) == Some(gtid) => {
                self.sched.stop(gtid, now, true)
            }
            Message::TaskLatchFailure(_) => self.sched.failed(gtid, now),
            // A running task is also taken off its CPU (TASK_PREEMPT follows).
            Message::TaskAffinityChanged(_) => self.read_cpus(gtid),
            Message::TaskDead(_) | Message::TaskDeparted(_) => {
                self.sched.remove_thread(gtid, now);
                self.tasks.remove(&gtid);
                self.enclave.free_status_word(sw)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Tells the policy the CPUs task `gtid` may run on: the kernel would move it onto any
    /// CPU committed, against the operator's pin (`taskset`, `virsh vcpupin`). A task pinned
    /// only to CPUs the agent does not run, where nothing would hold it, is given the agent's
    /// CPUs ([`crate::sched::confined`], the sched_ext enforcer's rule).
    fn read_cpus(&mut self, gtid: u64) {
        let tid = tid_of(gtid);
        let mut cpus = self.enclave.task_cpus(tid);
        if let Some(current) = &cpus {
            let (managed, replaced) = crate::sched::confined(Some(current), self.sched.cpus());
            if replaced {
                match self.enclave.set_task_cpus(tid, &managed) {
                    Ok(()) => {
                        tracing::warn!(
                            "vCPU thread {tid} was pinned to CPUs {current:?}, none of the \
                             agent's {managed:?}: moved to those"
                        );
                        cpus = Some(managed);
                    }
                    Err(e) => tracing::warn!("vCPU thread {tid}: {e}"),
                }
            }
        }
        self.sched.set_allowed(gtid, cpus.as_deref());
    }

    /// When to step again if no message comes (a slice ends or a budget refills).
    pub fn next_deadline(&self, now: u64) -> Option<u64> {
        self.sched.next_deadline(now)
    }

    /// Status words (for tests and reports).
    pub fn status_words(&self) -> &StatusWords {
        &self.sw
    }

    /// How many tasks the agent holds.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }
}
