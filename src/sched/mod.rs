//! The scheduling policy: which VM's vCPU thread runs on which managed CPU, and for how long.
//! Pure: no I/O, no clock. One policy, driven by the ghOSt agent (and by any mechanism that
//! reports what the kernel does in the same terms), which reports what the
//! kernel did ([`Scheduler::wake`], [`Scheduler::stop`], …) with the time it happened, and
//! carry out what [`Scheduler::decide`] returns.
//!
//! # Units
//!
//! * Rates are [`Rate`]s, millionths of one CPU, as in [`crate::credit`]: a VM's **grant** (its
//!   cap, from the ledger or a contention stage) and its **baseline**, pooled over its vCPUs
//!   (2 vCPUs × 20 % = 400 000).
//! * Times are nanoseconds on the mechanism's clock (`now`), CPU time in CPU-ns.
//! * The **period** `P` (default 100 ms, the cgroup period) is the window of every guarantee;
//!   a VM's **budget** in a window is `rate × P / 10⁶` CPU-ns.
//!
//! # Algorithm
//!
//! Every VM keeps the segments its threads ran (or were *committed* to run: a dispatch
//! records its whole slice at once) over the last period. Its **usage** `U` is their CPU time
//! inside the window that starts one period ago and extends into the future.
//!
//! 1. **Cap.** A thread is dispatched for `min(slice, cap − U)` and not at all if that is
//!    below the minimum slice. Since committed time is counted before it is run, every window
//!    of one period — sliding, not only aligned — holds at most the grant: for any window
//!    ending after `now`, what it can hold is what was already counted plus the new slice.
//! 2. **Order.** Among VMs with a waiting thread and budget, the next CPU goes to the best
//!    key: first *tier 0*, VMs below their baseline budget, lowest `U / baseline` first; then
//!    *tier 1*, VMs between baseline and cap, lowest `(U − baseline) / (target − baseline)`
//!    first, `U` taken over the [`Scheduler::share_window`] (the period, or 20 slices when
//!    that is longer). A VM's **target** is its [`fair_shares`] part of the CPUs for what its
//!    threads want now (one CPU per running or waiting thread), which water-fills the spare
//!    by the planner's weight for the rule in force ([`Entitlement`]: by default
//!    `grant − baseline`): among VMs the cap does not stop, the order is the weights'; a VM
//!    the cap stops short of the water level is ordered by how far it is below its cap, so a
//!    VM of small weight still gets its whole cap when the CPUs have room for it. (Ordered by
//!    `(U − baseline) / weight` alone, VMs that regain budget at the same moment crowded
//!    such a VM out and left a CPU idle afterwards: 55 % for a 60 % cap with 2 CPUs for
//!    1.5 CPUs of demand, and 70 % for 91 % in a random load.) The key is recomputed after each
//!    dispatch, so one `decide` spreads the CPUs.
//! 3. **Preemption.** A waiting thread of a tier-0 VM takes the CPU of the running thread
//!    with the worst tier-1 key when no CPU is free; a thread whose slice has ended is taken
//!    off (and may be dispatched again at once if it is still the best choice).
//! 4. **Work conservation.** A CPU is left idle only when no waiting thread has a VM with at
//!    least the minimum slice of budget; [`Scheduler::next_deadline`] says when to call
//!    [`Scheduler::decide`] again (a slice ends, a budget-blocked VM's old segments leave
//!    the window, or a waiting VM's window slides a fifth of a slice below its baseline, when
//!    it may preempt: without that last one, a VM held at its baseline beside busy VMs waited
//!    for some slice to end each time and got 19.07 % for 20 %; now 19.80 %).
//!
//! # Why this shape
//!
//! * *The numbers are the planner's*: the cap, the guarantee and the weight come from
//!   [`crate::contention::SpareRule::entitlement`], so the rule (`--contention headroom` or
//!   `baseline`) is chosen once for every enforcer, and [`fair_shares`] is the planner's own
//!   water-filling. What follows is why `headroom`, the default, weighs as it does.
//! * *Spare CPU in proportion to `grant − baseline`*: the headroom is what the VM's credits
//!   buy; a VM held to its baseline (no credits, `grant = baseline`) gets no spare, a VM with
//!   a full grant gets the most. An even split would hand spare to VMs whose credits are
//!   nearly gone as fast as to VMs with plenty, and a split by baseline would favour the VMs
//!   that already have the largest guarantee. [`fair_shares`] is the steady state, computed
//!   directly (water-filling), and the tests check the running scheduler against it.
//! * *Sliding-window usage instead of per-period budgets*: a refill at period boundaries lets
//!   a VM run at the end of one period and the start of the next, up to twice its cap in a
//!   window; and a refill needs a timer, which the two mechanisms provide differently.
//! * *Committed, not yet run, time counts*: several CPUs can be handed to one VM in one
//!   decision without overrunning, and a mechanism that reports late can only make a VM run
//!   *less*: a stop truncates the segment to when the thread really stopped.
//!
//! # Consequences, all tested (`tests.rs`, property tests over random loads)
//!
//! * No VM ever holds more than its grant in any window of one period.
//! * When demand exceeds the CPUs, every busy VM gets at least its baseline (less one slice
//!   of rounding) and no VM above its baseline is served while another is below it.
//! * Busy VMs converge to [`fair_shares`] within one slice per period per vCPU (5 points of a
//!   CPU each on random loads; 1.1 points in the three-VM overcommit): slices are indivisible.
//!   Below its baseline a VM's slice covers only what is left of the baseline, so the
//!   guarantee does not hand out spare time ahead of the tier-1 order.
//! * No CPU is idle while a thread of a VM with budget waits; a waking thread of such a VM
//!   gets an idle CPU in the same `decide`.

mod affinity;
mod reports;
mod shares;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

pub use affinity::confined;
pub use shares::{dispatch_weights, fair_shares, Demand};

use crate::contention::Entitlement;
use crate::credit::{Rate, PPM_PER_CPU};

/// A VM, as the mechanism names it.
pub type VmId = u32;
/// A thread (a tid, or a ghOSt gtid), as the mechanism names it.
pub type ThreadId = u64;

/// Slices per CPU that the tier-1 order's window holds at least ([`Scheduler::share_window`]).
pub const SHARE_TURNS: u64 = 20;

/// Tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The window of the cap and the baseline guarantee, ns.
    pub period_ns: u64,
    /// The longest slice, ns: how long a thread runs before the policy looks again.
    pub slice_ns: u64,
    /// The shortest slice worth dispatching, ns. 1 ms: at 100 µs a VM alone at its cap was
    /// dispatched each time 100 µs of budget came back, paid the agent's round trip each time,
    /// and the ghOSt enforcer on the kernel model held a VM alone at its 60 % baseline to
    /// 52.1–53.8 % in a release build (57–59 % in a debug one, whose slower agent loop let more
    /// budget gather); at 1 ms, 59.56 and 59.75 %.
    pub min_slice_ns: u64,
    /// How long a thread a decision takes off its CPU is expected to run on there, until the
    /// mechanism has carried the decision out and reported the stop: charged at once, then
    /// set to the reported stop ([`Scheduler::ran_until`]). 0 for a mechanism whose stops the
    /// policy learns of before it decides again (the ghOSt agent's commits). Without it, a VM
    /// at its cap under the user-space dispatch mode got 21.07 % for 20 %: each of its slices
    /// overran by about a tick (0.93 ms on average, 1-ms ticks) and the slice of its other
    /// thread was granted before that stop was reported, so every window held one overrun
    /// more than the cap.
    pub stop_lag_ns: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            period_ns: 100_000_000,
            slice_ns: 5_000_000,
            min_slice_ns: 1_000_000,
            stop_lag_ns: 0,
        }
    }
}

/// What a mechanism must make the kernel do on one CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run `tid` on `cpu` until `until` (preempting whatever runs there).
    Run {
        /// The CPU.
        cpu: u32,
        /// The thread.
        tid: ThreadId,
        /// When its slice ends.
        until: u64,
    },
    /// `tid` keeps running on `cpu`, now until `until` (no context switch needed).
    Extend {
        /// The CPU.
        cpu: u32,
        /// The thread.
        tid: ThreadId,
        /// When its slice ends.
        until: u64,
    },
    /// Take `tid` off `cpu` and leave the CPU idle.
    Preempt {
        /// The CPU.
        cpu: u32,
        /// The thread.
        tid: ThreadId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Blocked,
    Waiting,
    Running { cpu: usize },
}

#[derive(Debug)]
struct Thread {
    vm: VmId,
    state: State,
    last_cpu: Option<usize>,
    /// Running, but off its CPU: a higher class took it for a while ([`Scheduler::paused`]).
    paused: Option<Pause>,
    /// The CPUs (indices) it may run on, when not all ([`Scheduler::set_allowed`]).
    allowed: Option<Vec<usize>>,
}

/// A running thread's pause: since when, and what it took out of the thread's segments, given
/// back from its return ([`Scheduler::resumed`]).
#[derive(Debug)]
struct Pause {
    at: u64,
    owed: Vec<(u64, u64)>,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    tid: ThreadId,
    start: u64,
    end: u64,
    /// Its end is [`Config::stop_lag_ns`] after the decision that took it off, not yet the
    /// reported stop.
    provisional: bool,
}

#[derive(Debug, Default)]
struct Vm {
    grant: Rate,
    baseline: Rate,
    weight: Rate,
    /// Its share of the CPUs at the water level, for what its threads want now
    /// ([`fair_shares`]; set at each decision).
    target: Rate,
    waiting: VecDeque<ThreadId>,
    segments: VecDeque<Segment>,
}

impl Vm {
    /// CPU time of the segments after `from`, what the running threads were given included.
    fn usage(&self, from: u64) -> u64 {
        self.ran(from, u64::MAX)
    }

    /// Ends `tid`'s segments at `at`: nothing of it counts from then on, what it was given
    /// beyond `at` included (a report can come from before the time a look ahead decided
    /// at: a thread extended at the end of its slice and reported paused or blocked just
    /// before that end). Returns what was taken out.
    fn cut(&mut self, tid: ThreadId, at: u64) -> Vec<(u64, u64)> {
        let mut taken = Vec::new();
        for s in self.segments.iter_mut().filter(|s| s.tid == tid) {
            if s.end > at {
                taken.push((s.start.max(at), s.end));
                s.end = s.start.max(at);
            }
        }
        self.segments.retain(|s| s.end > s.start || s.tid != tid);
        taken
    }

    /// CPU time of the segments in [from, to): what it ran, without what its running threads
    /// were given beyond `to`.
    fn ran(&self, from: u64, to: u64) -> u64 {
        self.segments
            .iter()
            .map(|s| s.end.min(to).saturating_sub(s.start.max(from)))
            .sum()
    }
}

#[derive(Clone, Copy, Debug)]
struct Running {
    tid: ThreadId,
    until: u64,
}

/// The policy's state: VMs, their threads, the managed CPUs.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    cpus: Vec<u32>,
    current: Vec<Option<Running>>,
    vms: BTreeMap<VmId, Vm>,
    threads: HashMap<ThreadId, Thread>,
}

/// How good a VM's claim to the next CPU is: lower is better.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
struct Key {
    tier: u8,
    ratio: f64,
}

impl Scheduler {
    /// A scheduler for the managed `cpus` (the mechanism's CPU numbers).
    pub fn new(config: Config, cpus: &[u32]) -> Self {
        Scheduler {
            config,
            cpus: cpus.to_vec(),
            current: vec![None; cpus.len()],
            vms: BTreeMap::new(),
            threads: HashMap::new(),
        }
    }

    /// The tunables.
    pub fn config(&self) -> Config {
        self.config
    }

    /// The managed CPUs.
    pub fn cpus(&self) -> &[u32] {
        &self.cpus
    }

    /// Adds `vm` or changes what the planner entitles it to: its cap (the grant), its
    /// guarantee (the pooled baseline) and its weight for the spare.
    pub fn set_vm(&mut self, vm: VmId, entitled: Entitlement) {
        let v = self.vms.entry(vm).or_default();
        v.grant = entitled.cap;
        v.baseline = entitled.guarantee.min(entitled.cap);
        v.weight = entitled.weight;
    }

    /// Removes `vm` and its threads; returns the CPUs its running threads held, to be
    /// vacated by the mechanism (which moves the threads out of its control).
    pub fn remove_vm(&mut self, vm: VmId) -> Vec<u32> {
        let tids: Vec<ThreadId> = self
            .threads
            .iter()
            .filter(|(_, t)| t.vm == vm)
            .map(|(&tid, _)| tid)
            .collect();
        let mut cpus = Vec::new();
        for tid in tids {
            if let Some(cpu) = self.remove_thread(tid, 0) {
                cpus.push(cpu);
            }
        }
        self.vms.remove(&vm);
        cpus
    }

    /// Adds thread `tid` of `vm` (which must have been set), runnable or blocked. A thread
    /// already known is moved to `vm` and its state set.
    pub fn add_thread(&mut self, vm: VmId, tid: ThreadId, runnable: bool, now: u64) {
        self.remove_thread(tid, now);
        self.vms.entry(vm).or_default();
        self.threads.insert(
            tid,
            Thread {
                vm,
                state: State::Blocked,
                last_cpu: None,
                paused: None,
                allowed: None,
            },
        );
        if runnable {
            self.wake(tid, now);
        }
    }

    /// Forgets thread `tid` (it died or left); returns the CPU it was running on.
    pub fn remove_thread(&mut self, tid: ThreadId, now: u64) -> Option<u32> {
        let cpu = self.off_cpu(tid, now);
        if let Some(t) = self.threads.remove(&tid) {
            if let Some(vm) = self.vms.get_mut(&t.vm) {
                vm.waiting.retain(|&w| w != tid);
            }
        }
        cpu.map(|c| self.cpus[c])
    }

    /// Whether `tid` is known.
    pub fn knows(&self, tid: ThreadId) -> bool {
        self.threads.contains_key(&tid)
    }

    /// The thread running on `cpu`, as the policy believes.
    pub fn running_on(&self, cpu: u32) -> Option<ThreadId> {
        let i = self.cpus.iter().position(|&c| c == cpu)?;
        self.current[i].map(|r| r.tid)
    }

    /// When the slice of the thread running on `cpu` ends, as the policy has it.
    pub fn slice_end(&self, cpu: u32) -> Option<u64> {
        let i = self.cpus.iter().position(|&c| c == cpu)?;
        self.current[i].map(|r| r.until)
    }

    fn window_start(&self, now: u64) -> u64 {
        now.saturating_sub(self.config.period_ns)
    }

    /// The longest slice (up to `slice_ns`) a new thread of `v` may start at `now` without
    /// any window of one period ending in `(now, now + s]` holding more than the cap. With
    /// `f(t') = U(t' − P) + (t' − now)` (committed usage from one period before `t'`, plus
    /// the new slice so far), the slice is allowed while `f ≤ cap` on all of `(now, now + s]`.
    /// `f` is linear between its breakpoints (a segment boundary plus `P`), with slope 1 − k
    /// where k segments cover `t' − P`: it rises only where none does, and then by 1 a ns. So
    /// the first piece whose end exceeds the cap is crossed at `a + (cap − f(a))` from its start
    /// `a`, exactly, with one evaluation of `f` a breakpoint. (A binary search of the last
    /// piece gave the same ns for 25 more evaluations; these evaluations, asked for by the
    /// deadlines' searches, were most of a decision's time: 24 ms of CPU a run of the debug
    /// scheduler process in the emulated scx-6.12 guest.)
    fn budget(&self, v: &Vm, now: u64) -> u64 {
        self.budget_up_to(v, now, self.config.slice_ns)
    }

    /// Whether `v` has a minimum slice of budget at `now` ([`Scheduler::budget`] `≥
    /// min_slice_ns`), looking no further than that slice: the breakpoints of the next
    /// minimum slice only, not of a whole one. The deadlines' binary searches ask this 27
    /// times a waiting VM at each decision, most of a decision's time.
    fn has_min_slice(&self, v: &Vm, now: u64) -> bool {
        let min = self.config.min_slice_ns;
        self.budget_up_to(v, now, min.min(self.config.slice_ns)) >= min
    }

    /// [`Scheduler::budget`], for slices up to `most` ns.
    fn budget_up_to(&self, v: &Vm, now: u64, most: u64) -> u64 {
        let p = self.config.period_ns;
        let cap = v.grant.over(p);
        let f = |t: u64| v.usage(t.saturating_sub(p)) + (t - now);
        let (mut a, mut fa) = (now, f(now));
        if fa > cap {
            return 0;
        }
        let horizon = now + most;
        let mut breaks: Vec<u64> = v
            .segments
            .iter()
            .flat_map(|s| [s.start + p, s.end + p])
            .filter(|&b| b > now && b < horizon)
            .collect();
        breaks.sort_unstable();
        breaks.dedup();
        breaks.push(horizon);
        for b in breaks {
            let fb = f(b);
            if fb > cap {
                return (a + (cap - fa)).min(b - 1) - now;
            }
            (a, fa) = (b, fb);
        }
        horizon - now
    }

    /// `v`'s claim if it ran a slice of `slice` ns next. The ratio is taken at the middle of
    /// that slice: taken before it, a VM whose headroom is small compared with a slice would
    /// win half a slice more than its share every time (measured: 19 % instead of 15.4 % of
    /// a CPU for a VM with 0.23 CPU of headroom beside one with 2.4).
    ///
    /// The tier is the period's (the guarantee's window); the tier-1 ratio is taken over the
    /// [`Scheduler::share_window`], as long as the time since the start when that is shorter.
    fn key(&self, v: &Vm, now: u64, slice: u64) -> Key {
        let half = slice as f64 / 2.0;
        let used = v.usage(self.window_start(now)) as f64;
        let base = v.baseline.over(self.config.period_ns) as f64;
        if used < base {
            return Key {
                tier: 0,
                ratio: (used + half) / base,
            };
        }
        let span = self.share_window().min(now.max(self.config.period_ns));
        let used = v.usage(now.saturating_sub(span)) as f64;
        let base = v.baseline.over(span) as f64;
        let target = v.target.over(span) as f64;
        Key {
            tier: 1,
            ratio: if target > base {
                (used + half - base) / (target - base)
            } else {
                f64::INFINITY
            },
        }
    }

    /// The window of the tier-1 order (who gets spare CPU next): the period, or
    /// [`SHARE_TURNS`] slices when that is longer. Over a window of few slices the order is
    /// coarse: with 20-ms turns (the user-space dispatch mode's) the period holds five per
    /// CPU, usage moves in steps of a fifth of it, and the exact simulation of three busy VMs
    /// at baselines 80/40/20 % split 83.4 / 66.6 / 50.0 % for a fair 95.7 / 60.9 / 43.5 (with
    /// 5-ms slices: 95.3 / 61.9 / 42.8). Over 400 ms (20 turns): 95.6 / 61.8 / 42.6, and
    /// 95.2 / 61.8 / 43.0 with the target-share order (`tests.rs`, the three-VM overcommit).
    /// The cap and the baseline guarantee stay the period's.
    pub fn share_window(&self) -> u64 {
        self.config
            .period_ns
            .max(SHARE_TURNS * self.config.slice_ns)
    }

    /// The best VM with a waiting thread and at least a minimum slice of budget.
    fn best_waiting(&self, now: u64, skip: &HashSet<VmId>) -> Option<(Key, VmId)> {
        self.vms
            .iter()
            .filter(|(id, v)| !v.waiting.is_empty() && !skip.contains(id))
            .filter_map(|(&id, v)| {
                let budget = self.budget(v, now);
                let base_left = v
                    .baseline
                    .over(self.config.period_ns)
                    .saturating_sub(v.usage(self.window_start(now)));
                let slice = if base_left > 0 {
                    budget.min(base_left)
                } else {
                    budget
                };
                (budget >= self.config.min_slice_ns).then(|| (self.key(v, now, slice), id))
            })
            .min_by(|a, b| a.0.partial_cmp(&b.0).expect("keys are not NaN"))
    }

    /// What to change at `now`. The policy assumes every action takes effect at `now`; a
    /// mechanism that fails one reports it with [`Scheduler::failed`].
    pub fn decide(&mut self, now: u64) -> Vec<Action> {
        // Segments are kept for the share window, never shorter than the cap's period.
        let floor = now.saturating_sub(self.share_window());
        for v in self.vms.values_mut() {
            while v.segments.front().is_some_and(|s| s.end <= floor) {
                v.segments.pop_front();
            }
        }
        self.retarget();
        let mut actions = Vec::new();
        // Slices that ended come off (and may be dispatched again below).
        let mut expired = Vec::new();
        for (i, r) in self.current.iter().enumerate() {
            if let Some(r) = r {
                if r.until <= now {
                    expired.push((i, r.tid));
                }
            }
        }
        for &(_, tid) in &expired {
            self.off_cpu(tid, now);
        }
        let mut victims = Vec::new();
        // VMs none of whose waiting threads may use a CPU to be had in this decision.
        let mut skip = HashSet::new();
        while let Some((key, vm)) = self.best_waiting(now, &skip) {
            let free = self.current.iter().any(Option::is_none);
            let picked = if free { self.pick_free(vm) } else { None };
            let (pos, cpu) = match picked {
                Some(picked) => picked,
                // Below its baseline: a thread of a VM above its own gives way, on a CPU this
                // VM's thread may use.
                None if key.tier == 0 => {
                    let usable = self.usable_by(vm);
                    let Some((cpu, victim)) = self.worst_tier1(now, &actions, &usable) else {
                        skip.insert(vm);
                        continue;
                    };
                    self.off_cpu(victim, now);
                    victims.push((cpu, victim));
                    let pos = self.waiting_for(vm, cpu).expect("a usable CPU");
                    (pos, cpu)
                }
                None => {
                    skip.insert(vm);
                    continue;
                }
            };
            let v = &self.vms[&vm];
            let mut slice = self.budget(v, now);
            if key.tier == 0 {
                // Below the baseline, a slice covers only what is left of it: the rest of a
                // VM's time is spare and waits its turn by the tier-1 key.
                let left = v.baseline.over(self.config.period_ns) - v.usage(self.window_start(now));
                slice = slice.min(left.max(self.config.min_slice_ns));
            }
            let tid = self.vms.get_mut(&vm).expect("chosen").waiting.remove(pos);
            let tid = tid.expect("a waiting thread");
            let until = now + slice;
            let t = self
                .threads
                .get_mut(&tid)
                .expect("a waiting thread is known");
            t.state = State::Running { cpu };
            t.last_cpu = Some(cpu);
            self.current[cpu] = Some(Running { tid, until });
            self.vms
                .get_mut(&vm)
                .expect("chosen")
                .segments
                .push_back(Segment {
                    tid,
                    start: now,
                    end: until,
                    provisional: false,
                });
            actions.push((cpu, tid, until));
        }
        self.expect_stops(now, expired.iter().chain(&victims), &actions);
        // Report per CPU: a thread that expired and was dispatched again on the same CPU is
        // an extension; an expired CPU left empty is a preemption.
        let mut out = Vec::new();
        for &(cpu, tid) in &expired {
            if !actions.iter().any(|&(c, _, _)| c == cpu) {
                out.push(Action::Preempt {
                    cpu: self.cpus[cpu],
                    tid,
                });
            }
        }
        for (cpu, tid, until) in actions {
            let cpu_id = self.cpus[cpu];
            if expired.contains(&(cpu, tid)) {
                out.push(Action::Extend {
                    cpu: cpu_id,
                    tid,
                    until,
                });
            } else {
                out.push(Action::Run {
                    cpu: cpu_id,
                    tid,
                    until,
                });
            }
        }
        // A thread dispatched on a CPU other than the one it expired on, or a victim of a
        // tier-0 preemption, is replaced there by the Run on that CPU.
        out
    }

    /// The threads a decision at `now` took off their CPUs (`off`), and did not give the
    /// same CPU again (`dispatched`), run on there until the mechanism stops them: their
    /// segments end [`Config::stop_lag_ns`] later, provisionally, until the stop is reported.
    fn expect_stops<'a>(
        &mut self,
        now: u64,
        off: impl Iterator<Item = &'a (usize, ThreadId)>,
        dispatched: &[(usize, ThreadId, u64)],
    ) {
        let lag = self.config.stop_lag_ns;
        if lag == 0 {
            return;
        }
        for &(cpu, tid) in off {
            if dispatched.iter().any(|&(c, t, _)| c == cpu && t == tid) {
                continue;
            }
            let Some(vm) = self.threads.get(&tid).map(|t| t.vm) else {
                continue;
            };
            let v = self.vms.get_mut(&vm).expect("a thread's VM exists");
            if let Some(s) = v
                .segments
                .iter_mut()
                .rev()
                .find(|s| s.tid == tid && s.end == now && s.start < now)
            {
                s.end = now + lag;
                s.provisional = true;
            }
        }
    }

    /// Sets each VM's [`Vm::target`]: [`fair_shares`] of the managed CPUs for what its
    /// threads want now (one CPU for each running or waiting thread).
    fn retarget(&mut self) {
        // Runnable: waiting, or running on one of the (few) managed CPUs; blocked threads,
        // most of a fleet's, are not walked.
        let mut running: HashMap<VmId, u64> = HashMap::new();
        for r in self.current.iter().flatten() {
            *running.entry(self.threads[&r.tid].vm).or_default() += 1;
        }
        let demands: Vec<Demand> = self
            .vms
            .iter()
            .map(|(id, v)| {
                let runnable = v.waiting.len() as u64 + running.get(id).copied().unwrap_or(0);
                Demand {
                    entitled: Entitlement {
                        cap: v.grant,
                        guarantee: v.baseline,
                        weight: v.weight,
                    },
                    wants: Rate(runnable * PPM_PER_CPU),
                }
            })
            .collect();
        let shares = fair_shares(&demands, self.cpus.len() as u32);
        for (v, share) in self.vms.values_mut().zip(shares) {
            v.target = share;
        }
    }

    /// The running thread whose VM is above its baseline with the worst key, not one
    /// dispatched in this decision (`fresh`): a dispatch counts its whole slice at once, so
    /// its VM may look above its baseline while it is not.
    fn worst_tier1(
        &self,
        now: u64,
        fresh: &[(usize, ThreadId, u64)],
        usable: &HashSet<usize>,
    ) -> Option<(usize, ThreadId)> {
        self.current
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let r = (*r)?;
                if fresh.iter().any(|f| f.0 == i) || !usable.contains(&i) {
                    return None;
                }
                let v = &self.vms[&self.threads[&r.tid].vm];
                let k = self.key(v, now, 0);
                // Above its baseline by what it ran, not by the slices it was given: with a
                // slice counted whole from its dispatch, two VMs held to their baselines (grant
                // = baseline) beside busy ones each looked above it the moment it was given a
                // CPU, and preempted each other every nanosecond (the conformance test's
                // 3 + 1 + 3 vCPUs on 4 CPUs: the simulation never ended).
                let ran = v.ran(self.window_start(now), now);
                let above = ran >= v.baseline.over(self.config.period_ns);
                (k.tier == 1 && above).then_some((k, i, r.tid))
            })
            .max_by(|a, b| a.0.partial_cmp(&b.0).expect("keys are not NaN"))
            .map(|(_, i, tid)| (i, tid))
    }

    /// When [`Scheduler::decide`] must be called next if nothing else happens: the earliest
    /// end of a slice, or the earliest time a VM with a waiting thread regains a minimum slice
    /// of budget. `None`: nothing to do until an event.
    pub fn next_deadline(&self, now: u64) -> Option<u64> {
        let slice_end = self.current.iter().flatten().map(|r| r.until).min();
        let refill = self
            .vms
            .values()
            .filter(|v| !v.waiting.is_empty() && !self.has_min_slice(v, now))
            .filter_map(|v| self.refill_at(v, now));
        // A waiting VM at or above its baseline may claim a CPU again (tier 0, preempting)
        // once its window slides below the baseline: without a decision then, it waited
        // for the next slice to end somewhere, and a VM held to its baseline beside busy ones
        // got 19.07 % for 20 % with 5-ms slices (16.67 % with 20-ms ones).
        let below = self
            .vms
            .values()
            .filter(|v| !v.waiting.is_empty())
            .filter_map(|v| self.below_baseline_at(v, now));
        refill.chain(below).chain(slice_end).min()
    }

    /// The first time after `now` at which `v` is a [`Scheduler::reclaim_ns`] below its
    /// baseline in the window, if it is not now (usage only falls as the window slides);
    /// `None` when it is already, or its baseline is less than that.
    fn below_baseline_at(&self, v: &Vm, now: u64) -> Option<u64> {
        let min = self.reclaim_ns();
        let base = v.baseline.over(self.config.period_ns);
        let left = |t: u64| base.saturating_sub(v.usage(self.window_start(t)));
        if base < min || left(now) >= min {
            return None;
        }
        Some(self.first_at(now, min, |t| left(t) >= min))
    }

    /// The first time after `now`, within a period and `margin`, at which `ok` holds, for a
    /// condition that, once true, stays true as the window slides on (usage only falls): a
    /// binary search; the end of that span when it never holds.
    fn first_at(&self, now: u64, margin: u64, ok: impl Fn(u64) -> bool) -> u64 {
        let (mut lo, mut hi) = (now, now + self.config.period_ns + margin);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if ok(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }

    /// How far below its baseline a waiting VM must be for the policy to decide again on its
    /// behalf: a fifth of a slice (1 ms by default), not the minimum slice, so that a VM held
    /// at its baseline beside busy ones takes its time back in pieces of about that size (at
    /// 100 µs, every piece a decision, the exact simulation of 30 s took minutes).
    fn reclaim_ns(&self) -> u64 {
        (self.config.slice_ns / 5).max(self.config.min_slice_ns)
    }

    /// The first time ≥ `now` at which `v` has a minimum slice of budget (usage only falls as
    /// the window slides, so a binary search over one period finds it).
    fn refill_at(&self, v: &Vm, now: u64) -> Option<u64> {
        let min = self.config.min_slice_ns;
        if v.grant.over(self.config.period_ns) < min {
            return None; // paused: never
        }
        Some(self.first_at(now, min, |t| self.has_min_slice(v, t)))
    }

    /// CPU time `vm` used (or was committed) in the window of one period ending at `now`
    /// and beyond: for reports and tests.
    pub fn usage(&self, vm: VmId, now: u64) -> u64 {
        self.vms
            .get(&vm)
            .map_or(0, |v| v.usage(self.window_start(now)))
    }
}
