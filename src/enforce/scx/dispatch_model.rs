//! The sched_ext program's dispatch rule (`bpf/burst.bpf.c`) transcribed for the conformance
//! tests (`crate::conformance`), for busy vCPU threads: the same budget per 100-ms period
//! (baseline, grant and weight, as `struct budget` has them), the same charge of what ran at
//! every tick and stop, the same refill (overshoot carried, up to ten periods' grant), the
//! same pace of the baseline (`paced()`: the part owed by this point of the period), the same
//! choice of the next VM (tier 0 behind that pace by used / baseline, then tier 1 by
//! (used − paced baseline) / weight, none at or above its grant), the same slice end at a
//! tick (out of grant, or ahead of the pace while a VM of a better claim waits) and the same
//! slice. Time moves in kernel ticks of 1 ms. Not the program: a model of its rule, to be
//! kept in step with it (the comments name the C functions).

use std::collections::VecDeque;

/// One VM's budget and state, ns of CPU per period over all its vCPUs.
#[derive(Clone, Debug)]
pub(crate) struct Vm {
    pub(crate) base_ns: u64,
    pub(crate) grant_ns: u64,
    pub(crate) weight: u64,
    used_ns: u64,
    /// Its DSQ: the threads waiting, FIFO.
    dsq: VecDeque<usize>,
    /// CPU its threads ran in all, ns.
    pub(crate) ran_ns: u64,
}

/// A thread on a CPU: its VM, the thread, what is left of its slice.
#[derive(Clone, Copy, Debug)]
struct Running {
    vm: usize,
    thread: usize,
    slice_left: u64,
}

/// The machine: CPUs running the program's choices, every thread always runnable.
pub(crate) struct Machine {
    pub(crate) vms: Vec<Vm>,
    cpus: Vec<Option<Running>>,
    now_ns: u64,
    /// The last refill (`timer_slot.period_start`).
    period_start: u64,
}

const TICK_NS: u64 = 1_000_000;
const PERIOD_NS: u64 = 100_000_000;
const SLICE_NS: u64 = 5_000_000;

impl Machine {
    /// `cpus` CPUs and the VMs `(base_ns, grant_ns, weight, threads)`, all threads queued.
    pub(crate) fn new(cpus: usize, vms: &[(u64, u64, u64, usize)]) -> Machine {
        let mut next = 0;
        let vms = vms
            .iter()
            .map(|&(base_ns, grant_ns, weight, threads)| {
                let dsq = (next..next + threads).collect();
                next += threads;
                Vm {
                    base_ns,
                    grant_ns,
                    weight,
                    used_ns: 0,
                    dsq,
                    ran_ns: 0,
                }
            })
            .collect();
        Machine {
            vms,
            cpus: vec![None; cpus],
            now_ns: 0,
            period_start: 0,
        }
    }

    /// What user space writes to `budgets` (a live edit, a new grant or weight).
    pub(crate) fn set_budget(&mut self, vm: usize, base_ns: u64, grant_ns: u64, weight: u64) {
        let v = &mut self.vms[vm];
        (v.base_ns, v.grant_ns, v.weight) = (base_ns, grant_ns, weight);
    }

    /// Runs to `until` ns.
    pub(crate) fn run_until(&mut self, until: u64) {
        while self.now_ns < until {
            self.dispatch_idle();
            self.now_ns += TICK_NS;
            self.tick();
            if self.now_ns.is_multiple_of(PERIOD_NS) {
                self.refill();
            }
        }
    }

    /// `bq_tick` on every CPU (with the charge of `charge()`), and the slice's end.
    fn tick(&mut self) {
        for cpu in 0..self.cpus.len() {
            let Some(mut r) = self.cpus[cpu] else {
                continue;
            };
            let v = &mut self.vms[r.vm];
            v.used_ns += TICK_NS;
            v.ran_ns += TICK_NS;
            r.slice_left = r.slice_left.saturating_sub(TICK_NS);
            let (used, grant) = (v.used_ns, v.grant_ns);
            let base = self.base_now(r.vm);
            let end = used >= grant || (used >= base && self.someone_before(r.vm));
            if end || r.slice_left == 0 {
                // bq_stopping, then bq_enqueue: back to its VM's DSQ (held there when out of
                // budget, until the refill).
                self.vms[r.vm].dsq.push_back(r.thread);
                self.cpus[cpu] = None;
            } else {
                self.cpus[cpu] = Some(r);
            }
        }
    }

    /// `claim_of()`: `vm`'s claim to the next CPU, lower first.
    fn key(&self, i: usize) -> (u8, u128) {
        let v = &self.vms[i];
        let pb = self.base_now(i);
        if v.used_ns < pb {
            (0, (u128::from(v.used_ns) << 20) / u128::from(v.base_ns))
        } else if v.weight > 0 {
            (1, (u128::from(v.used_ns - pb) << 20) / u128::from(v.weight))
        } else {
            (1, u128::from(u64::MAX - 1))
        }
    }

    /// `someone_before()`: another VM below its grant, with a thread waiting and a better
    /// claim than `me`'s.
    fn someone_before(&self, me: usize) -> bool {
        let mine = self.key(me);
        self.vms.iter().enumerate().any(|(i, v)| {
            i != me
                && v.grant_ns > 0
                && v.used_ns < v.grant_ns
                && !v.dsq.is_empty()
                && self.key(i) < mine
        })
    }

    /// `paced()`: `vm`'s baseline owed by now, the period starting at the last refill.
    fn base_now(&self, vm: usize) -> u64 {
        let v = &self.vms[vm];
        let elapsed = (self.now_ns - self.period_start).min(PERIOD_NS);
        (u128::from(v.base_ns) * u128::from(elapsed) / u128::from(PERIOD_NS)) as u64
    }

    /// `bq_dispatch` on every idle CPU: the best VM by `pick_cb`'s key, its first thread.
    fn dispatch_idle(&mut self) {
        for cpu in 0..self.cpus.len() {
            if self.cpus[cpu].is_some() {
                continue;
            }
            let best = self
                .vms
                .iter()
                .enumerate()
                .filter(|(_, v)| v.grant_ns > 0 && v.used_ns < v.grant_ns && !v.dsq.is_empty())
                .map(|(i, _)| (self.key(i), i))
                .min();
            if let Some((_, vm)) = best {
                let thread = self.vms[vm].dsq.pop_front().expect("not empty");
                self.cpus[cpu] = Some(Running {
                    vm,
                    thread,
                    slice_left: SLICE_NS,
                });
            }
        }
    }

    /// `refill_vm_cb`: the overshoot carried, up to ten periods' grant.
    fn refill(&mut self) {
        self.period_start = self.now_ns;
        for v in &mut self.vms {
            let over = v.used_ns.saturating_sub(v.grant_ns);
            v.used_ns = over.min(10 * v.grant_ns);
        }
    }
}
