//! The model running time: a simulated clock, CPUs that run the tasks committed to them,
//! tasks that compute, block and wake, runtimes that advance, and the kernel's `TASK_*`
//! messages with their status-word barriers. A commit onto a CPU preempts what ran there
//! (`TASK_PREEMPT`), as the kernel's resched does.

use std::collections::HashMap;

use ghost_sys as abi;

use super::{as_bytes, KEnclave, Model};

/// A task's behaviour: compute `run` ns, sleep `sleep` ns, forever (`sleep` 0: always busy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    /// CPU per burst, ns.
    pub run: u64,
    /// Sleep between bursts, ns (0: never sleeps).
    pub sleep: u64,
}

impl Work {
    /// Always runnable.
    pub const BUSY: Work = Work { run: 1, sleep: 0 };
}

#[derive(Clone, Copy, Debug)]
struct Load {
    work: Work,
    left: u64,
    wake_at: Option<u64>,
}

/// Takes whatever task other than `next` runs on `cpu` off it: `TASK_PREEMPT`, still
/// runnable.
pub(super) fn preempt_cpu(e: &mut KEnclave, cpu: u32, next: u64) {
    let victim = e
        .tasks
        .iter()
        .find(|(&g, t)| g != next && t.on_cpu == Some(cpu))
        .map(|(&g, _)| g);
    if let Some(gtid) = victim {
        let t = e.tasks.get_mut(&gtid).expect("found");
        t.on_cpu = None;
        let t = t.clone();
        let p = abi::ghost_msg_payload_task_preempt {
            gtid,
            runtime: t.runtime,
            cpu: cpu as i32,
            ..Default::default()
        };
        let flags = abi::GHOST_SW_F_INUSE | abi::GHOST_SW_TASK_RUNNABLE;
        e.tell(&t, flags, t.runtime, abi::MSG_TASK_PREEMPT, as_bytes(&p));
    }
}

/// A simulated machine over one enclave of the model.
pub struct Machine {
    model: Model,
    id: u64,
    now: u64,
    load: HashMap<u64, Load>,
    /// CPU time each task received, ns.
    pub used: HashMap<u64, u64>,
    /// CPU time each task received on each CPU, ns.
    pub used_on: HashMap<(u64, u32), u64>,
    /// `deliver_ticks`: a `CPU_TICK` per enclave CPU every this many ns.
    tick: Option<u64>,
    /// Ticks delivered (and dropped on a full queue).
    pub ticks: u64,
}

impl Machine {
    /// Starts the clock at 0 for enclave `id`.
    pub fn new(model: &Model, id: u64) -> Machine {
        model.with(id, |e| e.timed = true);
        Machine {
            model: model.clone(),
            id,
            now: 0,
            load: HashMap::new(),
            used: HashMap::new(),
            used_on: HashMap::new(),
            tick: None,
            ticks: 0,
        }
    }

    /// Turns on `deliver_ticks`: every `period` ns each enclave CPU with an agent sends
    /// `MSG_CPU_TICK` to the default queue, bumping its agent's barrier.
    pub fn deliver_ticks(&mut self, period: u64) {
        self.tick = Some(period);
    }

    fn next_tick(&self) -> Option<u64> {
        self.tick.map(|p| (self.now / p + 1) * p)
    }

    fn produce_ticks(&mut self) {
        let produced = self.model.with(self.id, |e| {
            let Some(path) = e.default_queue.clone() else {
                return 0;
            };
            let mut cpus: Vec<(u32, u32)> = e.agent_sw.iter().map(|(&c, &i)| (c, i)).collect();
            cpus.sort_unstable();
            let mut n = 0;
            for (cpu, index) in cpus {
                let (barrier, _, _) = e.sw(index);
                let seq = barrier.fetch_add(1, std::sync::atomic::Ordering::Release) + 1;
                let msg = abi::ghost_msg_payload_cpu_tick {
                    cpu: cpu as i32,
                    is_agent: 0,
                };
                if let Some(q) = e.queue(&path) {
                    q.produce(abi::MSG_CPU_TICK, seq, as_bytes(&msg));
                    n += 1;
                }
            }
            n
        });
        self.ticks += produced;
    }

    /// The simulated time, ns.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Gives task `gtid` a behaviour.
    pub fn set_work(&mut self, gtid: u64, work: Work) {
        self.load.insert(
            gtid,
            Load {
                work,
                left: work.run,
                wake_at: None,
            },
        );
    }

    /// The next time something happens on its own: a burst ends or a sleeper wakes.
    pub fn next_event(&self) -> Option<u64> {
        let tasks = self.model.with(self.id, |e| {
            self.load
                .iter()
                .filter_map(|(g, l)| {
                    let on = e.tasks.get(g).is_some_and(|t| t.on_cpu.is_some());
                    if on && l.work.sleep > 0 {
                        Some(self.now + l.left)
                    } else {
                        l.wake_at
                    }
                })
                .min()
        });
        [tasks, self.next_tick()].into_iter().flatten().min()
    }

    /// Runs the CPUs to `t` (no event strictly before it, see [`Machine::next_event`]), then
    /// delivers what happens at `t`: bursts that end block (`TASK_BLOCKED`), sleepers wake
    /// (`TASK_WAKEUP`).
    pub fn advance_to(&mut self, t: u64) {
        let dt = t.saturating_sub(self.now);
        let tick_due = self.next_tick().is_some_and(|k| k <= t);
        self.now = t;
        if tick_due {
            self.produce_ticks();
        }
        let now = self.now;
        let load = &mut self.load;
        let used = &mut self.used;
        let used_on = &mut self.used_on;
        self.model.with(self.id, |e| {
            let gtids: Vec<u64> = e.tasks.keys().copied().collect();
            for gtid in gtids {
                let t = e.tasks.get_mut(&gtid).expect("listed");
                if let Some(cpu) = t.on_cpu {
                    t.runtime += dt;
                    *used.entry(gtid).or_default() += dt;
                    *used_on.entry((gtid, cpu)).or_default() += dt;
                }
                let on = t.on_cpu.is_some();
                let Some(l) = load.get_mut(&gtid) else {
                    continue;
                };
                if on && l.work.sleep > 0 {
                    l.left = l.left.saturating_sub(dt);
                    if l.left == 0 {
                        l.wake_at = Some(now + l.work.sleep);
                        let t = e.tasks.get_mut(&gtid).expect("listed");
                        t.on_cpu = None;
                        t.runnable = false;
                        let t = t.clone();
                        let p = abi::ghost_msg_payload_task_blocked {
                            gtid,
                            runtime: t.runtime,
                            ..Default::default()
                        };
                        let blocked = abi::MSG_TASK_BLOCKED;
                        e.tell(&t, abi::GHOST_SW_F_INUSE, t.runtime, blocked, as_bytes(&p));
                    }
                } else if l.wake_at.is_some_and(|w| w <= now) {
                    l.wake_at = None;
                    l.left = l.work.run;
                    let t = e.tasks.get_mut(&gtid).expect("listed");
                    t.runnable = true;
                    let t = t.clone();
                    let p = abi::ghost_msg_payload_task_wakeup {
                        gtid,
                        ..Default::default()
                    };
                    let flags = abi::GHOST_SW_F_INUSE | abi::GHOST_SW_TASK_RUNNABLE;
                    e.tell(&t, flags, t.runtime, abi::MSG_TASK_WAKEUP, as_bytes(&p));
                }
            }
        });
    }

    /// The task running on `cpu`, as the kernel has it.
    pub fn running_on(&self, cpu: u32) -> Option<u64> {
        self.model.with(self.id, |e| {
            e.tasks
                .iter()
                .find(|(_, t)| t.on_cpu == Some(cpu))
                .map(|(&g, _)| g)
        })
    }

    /// The task running `gtid` yields its CPU (`sched_yield`): `TASK_YIELD`, still runnable.
    pub fn yield_task(&mut self, gtid: u64) -> bool {
        let id = self.id;
        self.model.with(id, |e| {
            let Some(t) = e.tasks.get_mut(&gtid) else {
                return false;
            };
            let Some(cpu) = t.on_cpu.take() else {
                return false;
            };
            let t = t.clone();
            let p = abi::ghost_msg_payload_task_yield {
                gtid,
                runtime: t.runtime,
                cpu: cpu as i32,
                ..Default::default()
            };
            let flags = abi::GHOST_SW_F_INUSE | abi::GHOST_SW_TASK_RUNNABLE;
            e.tell(&t, flags, t.runtime, abi::MSG_TASK_YIELD, as_bytes(&p))
                .is_some()
        })
    }

    /// `sched_setaffinity` on the task ([`Model::set_task_cpus`]).
    pub fn set_affinity(&mut self, gtid: u64, cpus: &[u32]) {
        self.model.set_task_cpus(self.id, gtid, cpus);
    }

    /// The task dies (exits): `TASK_DEAD`, off its CPU, its status word freeable.
    pub fn kill(&mut self, gtid: u64) {
        self.load.remove(&gtid);
        let p = abi::ghost_msg_payload_task_dead {
            gtid,
            ..Default::default()
        };
        self.model
            .task_event(self.id, gtid, abi::MSG_TASK_DEAD, as_bytes(&p), false);
    }
}

/// What [`drive`] measured: wall-clock ns of each agent step that handled messages, divided by
/// the messages it handled.
#[derive(Debug, Default)]
pub struct Drive {
    /// Per-message decision times, ns.
    pub per_message_ns: Vec<u64>,
    /// Steps taken.
    pub steps: u64,
    /// Transactions that failed (and were retried).
    pub failed: u64,
}

/// Runs `machine` and `agent` together until `until`: the machine advances to the next event
/// (a burst ending, a wake-up, the agent's next deadline) and the agent steps at that time,
/// again at once while its commits fail or leave messages (preemptions) behind.
pub fn drive(
    machine: &mut Machine,
    agent: &mut crate::ghost::agent::GhostAgent<'_>,
    until: u64,
    out: &mut Drive,
) -> Result<(), crate::ghost::GhostError> {
    loop {
        let now = machine.now();
        for _ in 0..4 {
            let start = std::time::Instant::now();
            let r = agent.step(now)?;
            out.steps += 1;
            out.failed += u64::from(r.failed);
            if r.messages > 0 {
                out.per_message_ns
                    .push(start.elapsed().as_nanos() as u64 / u64::from(r.messages));
            }
            if r.failed == 0 && r.committed == 0 {
                break;
            }
        }
        if now >= until {
            return Ok(());
        }
        let next = [agent.next_deadline(now), machine.next_event(), Some(until)]
            .into_iter()
            .flatten()
            .min()
            .expect("until is there")
            .clamp(now + 1, until);
        machine.advance_to(next);
    }
}
