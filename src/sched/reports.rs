//! What the mechanism reports of the kernel, applied to the policy's state: a thread woke,
//! started, stopped, was paused by a higher class and resumed, ran past an end the policy had
//! set, or a dispatch failed. The decisions themselves are in the parent module.

use super::{Pause, Scheduler, Segment, State, ThreadId};

impl Scheduler {
    /// `tid` became runnable.
    pub fn wake(&mut self, tid: ThreadId, _now: u64) {
        let Some(t) = self.threads.get_mut(&tid) else {
            return;
        };
        if t.state == State::Blocked {
            t.state = State::Waiting;
            self.vms.entry(t.vm).or_default().waiting.push_back(tid);
        }
    }

    /// `tid` got off its CPU at `now`: blocked (`runnable` false), or preempted or yielded.
    /// Harmless for a thread the policy already took off.
    pub fn stop(&mut self, tid: ThreadId, now: u64, runnable: bool) {
        self.off_cpu(tid, now);
        let Some(t) = self.threads.get_mut(&tid) else {
            return;
        };
        match (t.state, runnable) {
            (State::Waiting, false) => {
                t.state = State::Blocked;
                let vm = t.vm;
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.waiting.retain(|&w| w != tid);
                }
            }
            (State::Blocked, true) => self.wake(tid, now),
            _ => {}
        }
    }

    /// `tid`, dispatched, really started at `at` (a mechanism that reports when the kernel
    /// put it on its CPU): its slice is moved to start then, whole, and ends as much later.
    /// The time between the decision and the start is not counted against its VM, and the
    /// thread is not robbed of it either: the kernel (the sched_ext program) runs an ordered
    /// slice for its length from the thread's start, and a turn the policy ended at the
    /// decided time instead lost what the order's latency took from it. In the emulated
    /// scx-6.12 guest that latency was about 5 ms a kick, and the VM that preempted most (the
    /// largest baseline, back below it most often) lost it on every preemption: 90 % for a
    /// predicted 95.6 % (src/enforce/scx/user.rs). Only ever later: a report of an earlier
    /// start, or of a thread not running, changes nothing.
    pub fn started(&mut self, tid: ThreadId, at: u64) {
        let Some(t) = self.threads.get(&tid) else {
            return;
        };
        let State::Running { cpu } = t.state else {
            return;
        };
        let vm = self.vms.get_mut(&t.vm).expect("a thread's VM exists");
        let Some(s) = vm.segments.iter_mut().rev().find(|s| s.tid == tid) else {
            return;
        };
        let late = at.saturating_sub(s.start);
        s.start += late;
        s.end += late;
        if let Some(r) = self.current[cpu].as_mut().filter(|r| r.tid == tid) {
            r.until += late;
        }
    }

    /// `tid`, running, lost its CPU at `at` to something the policy does not order (a higher
    /// scheduling class), and keeps its slice: its segments end at `at`, so what it does not
    /// run is not charged to its VM (and is free for its other threads under the cap), until
    /// [`Scheduler::resumed`] gives back what is left of them. A mechanism whose kernel hands
    /// the CPU back without a decision reports both. Only ever earlier: a pause after what it
    /// was given changes nothing.
    ///
    /// All of its segments from `at` on, not only the last: a look ahead may have extended
    /// it already, and a pause reported from before the extension's start then cut only the
    /// extension while the slice under way went on being charged, and the return added that
    /// time again. In the scx-6.12 guest the policy charged the three busy VMs 222 % of a CPU
    /// in a 400-ms window of 2 CPUs (`BURST_QEMU_SCX_TRACE`, a segment of one thread
    /// overlapping its own).
    pub fn paused(&mut self, tid: ThreadId, at: u64) {
        let Some(t) = self.threads.get_mut(&tid) else {
            return;
        };
        if !matches!(t.state, State::Running { .. }) || t.paused.is_some() {
            return;
        }
        let vm = self.vms.get_mut(&t.vm).expect("a thread's VM exists");
        let taken = vm.cut(tid, at);
        if !taken.is_empty() {
            t.paused = Some(Pause { at, owed: taken });
        }
    }

    /// `tid`, paused, has its CPU back at `at`: what the pause took from its segments is
    /// charged again from then.
    pub fn resumed(&mut self, tid: ThreadId, at: u64) {
        let Some(t) = self.threads.get_mut(&tid) else {
            return;
        };
        let (State::Running { .. }, Some(pause)) = (t.state, t.paused.take()) else {
            return;
        };
        let vm = self.vms.get_mut(&t.vm).expect("a thread's VM exists");
        for (start, end) in pause.owed {
            if at < end {
                vm.segments.push_back(Segment {
                    tid,
                    start: start.max(at),
                    end,
                    provisional: false,
                });
            }
        }
    }

    /// Whether `tid`'s VM could start another slice (of at least the minimum) at `at`, with
    /// what is committed now: when it could not, a slice of it ending at `at` ends where its
    /// VM's cap does, which a mechanism that enforces ends itself must keep to.
    pub fn may_run_at(&self, tid: ThreadId, at: u64) -> bool {
        self.threads
            .get(&tid)
            .and_then(|t| self.vms.get(&t.vm))
            .is_some_and(|v| self.budget(v, at) >= self.config.min_slice_ns)
    }

    /// `tid` was reported off a CPU at `at`. A segment the policy had already ended earlier
    /// (it took the thread off, and the mechanism carried that out late: a kick's latency) is
    /// charged up to `at`, for the thread ran until then; never past the start of its next
    /// segment. The segment running now is [`Scheduler::stop`]'s. `unstarted`: the thread's
    /// last segment is one it was ordered to and has not started (the mechanism reports its
    /// start, [`Scheduler::started`], which moves it after this stop): not a next segment
    /// that bounds the charge. (Bounded by it, the time a thread ran on where it was ordered
    /// off, late, went uncharged: 4–5 ms a switch in the scx-6.12 guest, whose ticks come
    /// late under the emulator.)
    pub fn ran_until(&mut self, tid: ThreadId, at: u64, unstarted: bool) {
        let Some(t) = self.threads.get(&tid) else {
            return;
        };
        let running = matches!(t.state, State::Running { .. }) && !unstarted;
        let vm = self.vms.get_mut(&t.vm).expect("a thread's VM exists");
        let mut mine: Vec<usize> = (0..vm.segments.len())
            .filter(|&i| vm.segments[i].tid == tid)
            .collect();
        if unstarted {
            mine.pop();
        }
        // The last segment that started before `at`, if it is not the one running now.
        let Some(pos) = mine.iter().rposition(|&i| vm.segments[i].start <= at) else {
            return;
        };
        if running && pos + 1 == mine.len() {
            return;
        }
        let next = mine
            .get(pos + 1)
            .map_or(u64::MAX, |&i| vm.segments[i].start);
        let s = &mut vm.segments[mine[pos]];
        if s.provisional {
            // What the decision expected: now the stop itself.
            s.end = at.min(next).max(s.start);
            s.provisional = false;
        } else {
            s.end = s.end.max(at.min(next));
        }
    }

    /// A dispatch of `tid` did not happen (the mechanism's commit failed): it ran nothing and
    /// waits again.
    pub fn failed(&mut self, tid: ThreadId, at: u64) {
        self.stop(tid, at, true);
    }

    /// The mechanism found `tid` runnable and waiting for a dispatch since `at` with none on
    /// its way: a report of it was lost, or never made. It is taken as waiting, off any CPU the
    /// policy had it on (charged to `at`), as its reports would have made it. Returns what the
    /// policy had believed (for the mechanism to say), or `None` when it knew (waiting) or
    /// does not know the thread.
    pub fn found_waiting(&mut self, tid: ThreadId, at: u64) -> Option<&'static str> {
        match self.threads.get(&tid)?.state {
            State::Waiting => None,
            State::Running { .. } => {
                self.stop(tid, at, true);
                Some("running")
            }
            State::Blocked => {
                self.wake(tid, at);
                Some("blocked")
            }
        }
    }

    /// Takes `tid` off its CPU at `now` if it runs, ending its segment then: earlier than its
    /// slice (it blocked, was preempted) or later (a mechanism that acts late, as a ghOSt
    /// agent does when a decision takes longer than a slice's remainder: the kernel runs the
    /// thread until it is told otherwise, and the cap must count that). It becomes waiting.
    /// Returns the CPU's index.
    pub(super) fn off_cpu(&mut self, tid: ThreadId, now: u64) -> Option<usize> {
        let t = self.threads.get_mut(&tid)?;
        let State::Running { cpu } = t.state else {
            return None;
        };
        self.current[cpu] = None;
        t.state = State::Waiting;
        // A paused thread ran until its pause.
        let paused = t.paused.take().map(|p| p.at);
        let end = paused.unwrap_or(now);
        let vm = self.vms.get_mut(&t.vm).expect("a thread's VM exists");
        vm.waiting.push_back(tid);
        // Nothing of it after `end` (what a look ahead gave it beyond a report from before
        // then included), and, unless a pause ended it, its last segment up to `end`.
        vm.cut(tid, end);
        if paused.is_none() {
            if let Some(s) = vm.segments.iter_mut().rev().find(|s| s.tid == tid) {
                s.end = s.end.max(end);
            }
        }
        Some(cpu)
    }
}
