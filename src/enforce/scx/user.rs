//! The user-space dispatch mode's decisions (`scx-scheduler --dispatch user`): the scheduler
//! process turns what the BPF program reports of the VMs' threads ([`Event`]s) into calls of
//! the one scheduling policy, [`crate::sched::Scheduler`] (the ghOSt agent's), and its actions
//! into [`Order`]s for the program's `bq_order`. Pure: no I/O, no clock; the process
//! ([`super::loader`]) reads the ring buffer, runs the orders and gives the time.
//!
//! How the kernel's side keeps to the policy (bpf/burst.bpf.c): a VM's runnable thread is
//! held in BPF custody (no queue) and reported ([`EV_WAKE`]); an order puts it on one CPU's
//! local queue with the slice the policy gave, kicking whatever of ours runs there off it; the
//! CPU's tick keeps that slice's end as the policy extends it (to the tick when the VM's cap
//! ends there, one slice later otherwise: the process ends turns itself); a thread the fair
//! class takes the CPU from for a while waits at the head of that CPU's queue and goes on
//! (reported, [`EV_PAUSE`], and still running as the policy sees it). So the policy decides
//! every dispatch of a vCPU thread, which CPU, and for how long.
//!
//! A thread pinned to some of the managed CPUs is ordered only onto those: the process reads
//! its affinity ([`UserPolicy::set_allowed`]).
//!
//! Reports arrive a little after the fact, so a report is applied only when it agrees with
//! what the policy believes: a stop reported from a CPU other than the one the policy has the
//! thread on now (it ordered it elsewhere meanwhile) is stale and dropped; an order that
//! found its thread not held ([`EV_FAILED`]: it ran, blocked or left before the order came, or
//! may not run on that CPU), or whose dispatch a change of the thread's attributes undid
//! before it ran, takes it off and leaves it blocked until its next wake report, which the
//! program sends at once when the thread is held (so a failure reported after the thread's
//! own wake, or an order for a CPU it is not allowed on, does not leave it waiting unseen).

use std::collections::{HashMap, HashSet};

use super::abi::{
    Event, Order, EV_BLOCK, EV_FAILED, EV_PAUSE, EV_RUNNING, EV_STOP, EV_WAKE, ORDER_DEFER,
    ORDER_EXTEND, ORDER_HARD, ORDER_PREEMPT, ORDER_RUN,
};
use super::{Command, PERIOD};
use crate::contention::Entitlement;
use crate::credit::{Rate, PPM_PER_CPU};
use crate::sched::{self, Action, Scheduler, ThreadId};

/// What the mode counted, published with the scheduler's stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Reports read.
    pub events: u64,
    /// Runs ordered (each a decision that puts a thread on a CPU).
    pub runs: u64,
    /// Slices extended and threads taken off without a replacement.
    pub extends: u64,
    /// Preemptions ordered without a run.
    pub preempts: u64,
    /// Orders whose thread was not held any more.
    pub failed: u64,
    /// Reports dropped as stale (a stop from a CPU the thread was ordered off).
    pub stale: u64,
    /// Runs reported on a CPU the policy had not ordered the thread to.
    pub unordered: u64,
    /// Rounds of the process's loop (a wait for reports or a deadline, then the decision).
    pub rounds: u64,
    /// Times a higher class took a CPU from a thread for a while.
    pub paused: u64,
    /// Threads found held for an order the policy was not going to give, their reports lost
    /// ([`UserPolicy::found_held`]).
    #[serde(default)]
    pub recovered: u64,
}

/// The policy and what it knows of the program's threads (see the module docs).
#[derive(Debug)]
pub struct UserPolicy {
    sched: Scheduler,
    slot_of: HashMap<u32, u32>,
    /// Threads ordered to run whose start was not reported yet.
    ordered: HashSet<ThreadId>,
    /// The policy's time: the latest it decided at (ahead of the clock after a look ahead).
    clock: u64,
    /// What the mode counted.
    pub counts: Counts,
}

/// The longest slice (a turn among threads) in this mode: 20 ms, four times the BPF mode's
/// and the ghOSt agent's. Every turn's end is a round trip through this process, which took
/// 4–6 ms in the scx-6.12 guest (a TCG-emulated machine, where a decision, the kick of
/// another CPU and its report each wait for that CPU's turn on the emulator); with 5-ms turns
/// three busy VMs got 1.2–1.5 of their 2 CPUs, the rest idle between a turn and the next.
pub const TURN_NS: u64 = 20_000_000;

/// The shortest slice this mode orders: 1 ms, ten times the ghOSt agent's. A VM at its cap
/// regains budget as its old slices leave the window, and each slice costs the time its order
/// takes to reach the CPU (measured 3–5 ms in the scx-6.12 guest): slices of 0.1 ms, ordered
/// as soon as that much came back, held a VM capped at 20 % to 12–16 %.
pub const MIN_SLICE_NS: u64 = 1_000_000;

/// How long a thread this mode takes off a CPU runs on there, expected ([`sched::Config`]'s
/// `stop_lag_ns`): a tick of the scx-6.12 guest kernel (1 ms), which ends the slices; their
/// overruns were 0.93 ms on average there for slices the program ends, 1.44 ms for turns the
/// process ends.
pub const STOP_LAG_NS: u64 = 1_000_000;

/// A rate from ns of CPU per [`PERIOD`].
fn rate(ns_per_period: u64) -> Rate {
    Rate((u128::from(ns_per_period) * u128::from(PPM_PER_CPU) / PERIOD.as_nanos()) as u64)
}

/// An order decided at `from` (the program runs an ordered slice for `until − from` from the
/// thread's start, as [`Scheduler::started`] has it).
fn order(op: u32, cpu: u32, tid: ThreadId, until: u64, from: u64) -> Order {
    Order {
        until,
        from,
        op,
        cpu,
        tid: tid as u32,
        replaced: 0,
    }
}

impl UserPolicy {
    /// The policy over the managed `cpus`, with the budget period of the program.
    pub fn new(cpus: &[u32]) -> Self {
        let config = sched::Config {
            period_ns: PERIOD.as_nanos() as u64,
            slice_ns: TURN_NS,
            min_slice_ns: MIN_SLICE_NS,
            stop_lag_ns: STOP_LAG_NS,
        };
        UserPolicy {
            sched: Scheduler::new(config, cpus),
            slot_of: HashMap::new(),
            ordered: HashSet::new(),
            clock: 0,
            counts: Counts::default(),
        }
    }

    /// The policy itself.
    pub fn policy(&self) -> &Scheduler {
        &self.sched
    }

    /// Applies one of the agent's commands (the process also writes it to the maps); returns
    /// the orders it needs (a thread that left a CPU it ran on).
    pub fn command(&mut self, cmd: &Command, now: u64) -> Vec<Order> {
        let vacated: Vec<(u32, ThreadId)> = match *cmd {
            Command::Vm {
                idx,
                base_ns,
                grant_ns,
                weight,
                ..
            } => {
                self.sched.set_vm(
                    idx,
                    Entitlement {
                        cap: rate(grant_ns),
                        guarantee: rate(base_ns),
                        weight: rate(weight),
                    },
                );
                Vec::new()
            }
            Command::Free { idx } => {
                let tids: Vec<u32> = self
                    .slot_of
                    .iter()
                    .filter(|(_, &s)| s == idx)
                    .map(|(&t, _)| t)
                    .collect();
                let held: Vec<(u32, ThreadId)> = tids
                    .iter()
                    .filter_map(|&t| self.on_cpu(t.into()).map(|c| (c, t.into())))
                    .collect();
                for t in tids {
                    self.slot_of.remove(&t);
                }
                self.sched.remove_vm(idx);
                held
            }
            Command::Tid { tid, idx } => {
                if self.slot_of.get(&tid) == Some(&idx) {
                    return Vec::new();
                }
                let was = self.on_cpu(tid.into()).map(|c| (c, tid.into()));
                self.slot_of.insert(tid, idx);
                // Blocked until its next report: a thread the program already holds is
                // reported again at its next change (it runs as no VM's until then).
                self.sched.add_thread(idx, tid.into(), false, now);
                was.into_iter().collect()
            }
            Command::Untid { tid } => {
                self.slot_of.remove(&tid);
                let cpu = self.sched.remove_thread(tid.into(), now);
                cpu.map(|c| (c, tid.into())).into_iter().collect()
            }
        };
        vacated
            .into_iter()
            .map(|(cpu, tid)| order(ORDER_PREEMPT, cpu, tid, now, now))
            .collect()
    }

    /// The CPU the policy has `tid` running on.
    fn on_cpu(&self, tid: ThreadId) -> Option<u32> {
        self.sched
            .cpus()
            .iter()
            .copied()
            .find(|&c| self.sched.running_on(c) == Some(tid))
    }

    /// Applies one report of the program.
    pub fn event(&mut self, e: &Event) {
        self.counts.events += 1;
        let tid = ThreadId::from(e.tid);
        if !self.sched.knows(tid) {
            return;
        }
        let on = self.on_cpu(tid);
        match e.kind {
            EV_WAKE => self.sched.wake(tid, e.at),
            EV_RUNNING => {
                if on != Some(e.cpu) {
                    self.counts.unordered += 1;
                } else if self.ordered.remove(&tid) {
                    // The first start since the order.
                    self.sched.started(tid, e.at);
                } else {
                    // A return after a pause.
                    self.sched.resumed(tid, e.at);
                }
            }
            // It stays on its CPU's queue and goes on there: still running, as the policy
            // has it, but not charged until it runs again (the kernel's own figures count
            // only what ran; charged, the time the guest's own tasks took from the VMs in the
            // scx-6.12 guest, about 5 % of the two CPUs, came mostly off the VM that ran most).
            EV_PAUSE => {
                self.counts.paused += 1;
                if on == Some(e.cpu) {
                    self.sched.paused(tid, e.at);
                }
            }
            EV_STOP | EV_BLOCK => {
                // Ordered to run and not started yet: the stop is of an earlier run, and the
                // start is still to come (cleared here, that start was taken for a return
                // after a pause, and its slice charged from the decision, not from it).
                // (Only while the policy has it on a CPU: an order it took back before the
                // start leaves its thread in `ordered`.)
                let unstarted = on.is_some() && self.ordered.contains(&tid);
                if on == Some(e.cpu) && !unstarted {
                    self.sched.stop(tid, e.at, e.kind == EV_STOP);
                } else {
                    // Off a CPU the policy had ordered it off already: it ran there until
                    // now (the order's latency), which is charged.
                    self.sched.ran_until(tid, e.at, unstarted);
                    if on.is_some() {
                        // It runs (or will) where it was ordered to since, and that CPU
                        // reports its own stop.
                        self.counts.stale += 1;
                    } else {
                        self.ordered.remove(&tid);
                        self.sched.stop(tid, e.at, e.kind == EV_STOP);
                    }
                }
            }
            EV_FAILED => {
                self.ordered.remove(&tid);
                self.counts.failed += 1;
                if on.is_none_or(|c| c == e.cpu) {
                    self.sched.stop(tid, e.at, false);
                }
            }
            _ => {}
        }
    }

    /// Thread `tid`, found held in the program's custody since `at` (the process reads its
    /// `enq_at` map) while the policy has no order of it on its way: its reports were lost, or
    /// never made. Without this, it waited for the kernel's watchdog (30 s), which then
    /// disabled the scheduler: a vCPU without a CPU that long, seen in the scx-6.12 guest
    /// (docs/sched-ext.md). It is taken as waiting; returns what the policy had believed of
    /// it, or `None` when it knew (waiting) or does not know the thread.
    pub fn found_held(&mut self, tid: u32, at: u64) -> Option<&'static str> {
        let tid = ThreadId::from(tid);
        let was = self.sched.found_waiting(tid, at)?;
        self.ordered.remove(&tid);
        self.counts.recovered += 1;
        Some(was)
    }

    /// Thread `tid` may run only on `cpus` (its affinity, read by the process): the policy
    /// orders it only onto those of the managed CPUs. Before, the policy did not know, and an
    /// order for a CPU a pinned thread may not use failed and was given again: 400–700 times
    /// a second in the scx-6.12 guest with threads re-pinned every 10 ms
    /// (tests/scx_inside/changes.rs).
    pub fn set_allowed(&mut self, tid: u32, cpus: &[u32]) {
        self.sched.set_allowed(ThreadId::from(tid), Some(cpus));
    }

    /// The threads the policy knows (the process reads their affinity each second).
    pub fn threads(&self) -> Vec<u32> {
        self.slot_of.keys().copied().collect()
    }

    /// What to order at `now`: the policy's decision, one order a CPU whose thread changes
    /// or whose slice moves.
    ///
    ///
    /// A slice after which its VM could not run on ends where the VM's cap does: its order
    /// says so ([`ORDER_HARD`]) and the kernel ends it there, to the tick (1 ms on the scx-6.12
    /// guest kernel). Any other slice is a turn: the process ends or extends it itself at its
    /// next look, and the kernel only bounds it (a kernel end would leave the CPU idle until
    /// the next order, a round trip). Measured in the scx-6.12 guest with every end left to
    /// the process (woken 2–5 ms late there): a VM held to 20 % got 24.3–25.2 %.
    pub fn decide(&mut self, now: u64) -> Vec<Order> {
        self.counts.rounds += 1;
        // Never back in time: a look ahead decided up to a slice's end already.
        let now = now.max(self.clock);
        self.clock = now;
        let actions = self.sched.decide(now);
        let sched = &self.sched;
        let hard = |tid: ThreadId, until: u64| {
            if sched.may_run_at(tid, until) {
                0
            } else {
                ORDER_HARD
            }
        };
        let orders: Vec<Order> = actions
            .into_iter()
            .map(|a| match a {
                Action::Run { cpu, tid, until } => {
                    order(ORDER_RUN | hard(tid, until), cpu, tid, until, now)
                }
                Action::Extend { cpu, tid, until } => {
                    order(ORDER_EXTEND | hard(tid, until), cpu, tid, until, now)
                }
                Action::Preempt { cpu, tid } => order(ORDER_PREEMPT, cpu, tid, now, now),
            })
            .collect();
        for o in &orders {
            match o.op & !ORDER_HARD {
                ORDER_RUN => {
                    self.counts.runs += 1;
                    self.ordered.insert(ThreadId::from(o.tid));
                }
                ORDER_EXTEND => self.counts.extends += 1,
                _ => self.counts.preempts += 1,
            }
        }
        orders
    }

    /// Decides now what happens at the end of the next slice when it ends within `lead` of
    /// `now`: the orders for the CPUs whose slice ends then are deferred ([`ORDER_DEFER`]),
    /// so each of those CPUs ends its slice itself, to the tick, and goes straight on to the
    /// thread ordered next, without the round trip through this process (4–6 ms in the
    /// scx-6.12 guest, where a CPU idled through it at each end of a turn). Nothing when no
    /// slice ends that soon.
    pub fn look_ahead(&mut self, now: u64, lead: u64) -> Vec<Order> {
        let now = now.max(self.clock);
        let Some(at) = self.sched.next_deadline(now) else {
            return Vec::new();
        };
        if at <= now || at > now + lead {
            return Vec::new();
        }
        let ending: Vec<u32> = self
            .sched
            .cpus()
            .iter()
            .copied()
            .filter(|&c| self.sched.slice_end(c) == Some(at))
            .collect();
        // Only for slices already under way: an order the CPU has not taken yet would be
        // replaced by the deferred one (the CPU holds one order), and its thread never run.
        let unstarted = ending.iter().any(|&c| {
            self.sched
                .running_on(c)
                .is_some_and(|t| self.ordered.contains(&t))
        });
        if ending.is_empty() || unstarted {
            return Vec::new();
        }
        let mut orders = self.decide(at);
        for o in &mut orders {
            let op = o.op & !ORDER_HARD;
            if ending.contains(&o.cpu) && (op == ORDER_RUN || op == ORDER_PREEMPT) {
                o.op |= ORDER_DEFER;
            }
        }
        orders
    }

    /// When the process must look again if no report comes: `lead` before the next deadline
    /// when a slice ends there ([`UserPolicy::look_ahead`]), else at it.
    pub fn next_wake(&self, now: u64, lead: u64) -> Option<u64> {
        let at = self.sched.next_deadline(now.max(self.clock))?;
        let ahead = self.sched.cpus().iter().any(|&c| {
            self.sched.slice_end(c) == Some(at)
                && self
                    .sched
                    .running_on(c)
                    .is_some_and(|t| !self.ordered.contains(&t))
        });
        Some(if ahead { at.saturating_sub(lead) } else { at })
    }

    /// When [`UserPolicy::decide`] must run again if no report comes.
    pub fn next_deadline(&self, now: u64) -> Option<u64> {
        self.sched.next_deadline(now)
    }
}

#[cfg(test)]
mod tests;
