//! The vCPU pinning balancer's mechanism, run by the agent (`--balance cpu`): every interval
//! it reads each vCPU thread's run time and run-queue wait (`/proc/PID/task/TID/schedstat`),
//! its affinity (`sched_getaffinity`) and the CPU it last ran on (`stat` field 39), asks the
//! planner ([`super::cpu::plan`]) and applies the plan through each VM's [`Control`] handle
//! (`sched_setaffinity` for burst-qemu's own VMs; libvirt's `virDomainPinVcpuFlags` for a
//! libvirt domain, so that `virsh vcpupin` shows the same pin and libvirt's cpuset allows it).
//! Every pin change is logged and counted; the state is published in
//! `<state dir>/balance.json`.
//!
//! Demand per vCPU (see [`super::cpu`]): (Δrun + Δwait) / Δt, capped at one CPU, scaled into
//! the VM's credit grant and smoothed over intervals (half the new reading, half the old).
//!
//! A plan chosen for a better balance (not one that must pin a floating vCPU) is applied only
//! when the interval before also asked for one: a single noisy interval (a neighbour's burst,
//! a VM starting) never moves anything, at the cost of one interval's delay.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cpu::{self, Decision, Params, Placement, Spread, Vcpu};
use crate::control::Control;
use crate::procfs::Proc;

/// The default interval between plans.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// The file in the state dir where the balancer publishes its state.
pub const BALANCE_JSON: &str = "balance.json";
/// Weight of the newest reading in the smoothed demand.
const SMOOTHING: f64 = 0.5;

/// What the agent passes for one VM.
pub struct VmInput<'a> {
    /// The VM's name (for logs).
    pub name: &'a str,
    /// QEMU's pid.
    pub pid: u32,
    /// Its vCPU threads, in vCPU order.
    pub tids: &'a [u32],
    /// The CPUs its config allows (`cpus`); `None`: every managed CPU.
    pub allowed: Option<&'a [u32]>,
    /// What its credit grant lets it run now, in CPUs.
    pub cap_cpus: f64,
    /// How its vCPUs are pinned.
    pub control: &'a dyn Control,
}

/// The published state (`balance.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// The managed CPUs.
    pub cpus: Vec<u32>,
    /// The demand placed on each managed CPU at the last interval, CPUs.
    pub loads: Vec<f64>,
    /// Mean of `loads`.
    pub mean: f64,
    /// Standard deviation of `loads`.
    pub sigma: f64,
    /// Whether σ ≤ 5 % of the mean (or ≤ the idle floor).
    pub balanced: bool,
    /// Pin changes since the agent started.
    pub pin_changes: u64,
    /// Plans applied since the agent started.
    pub plans: u64,
    /// Intervals measured.
    pub intervals: u64,
    /// Each VM's vCPUs' pins (the CPU, or `null` while not pinned to one).
    pub pins: std::collections::BTreeMap<String, Vec<Option<u32>>>,
}

struct Thread {
    pid: u32,
    run: u64,
    wait: u64,
    demand: Option<f64>,
}

/// The balancer's state between intervals.
pub struct PinBalancer {
    cpus: Vec<u32>,
    interval: Duration,
    params: Params,
    last: Option<Instant>,
    threads: HashMap<u32, Thread>,
    /// Pin changes per VM name.
    changes: HashMap<String, u64>,
    published: Published,
    /// Plans for a better balance wait for a second interval.
    confirm: cpu::Confirm,
    /// VMs whose CPU list names none of the managed CPUs (warned once each).
    warned: std::collections::HashSet<String>,
}

impl PinBalancer {
    /// A balancer over `cpus` (non-empty) planning every `interval`.
    pub fn new(cpus: Vec<u32>, interval: Duration) -> Self {
        PinBalancer {
            published: Published {
                cpus: cpus.clone(),
                ..Published::default()
            },
            cpus,
            interval,
            params: Params::default(),
            last: None,
            threads: HashMap::new(),
            changes: HashMap::new(),
            confirm: cpu::Confirm::default(),
            warned: Default::default(),
        }
    }

    /// Plans every `interval` from now on (an edit of the agent's config file).
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Whether an interval has passed since the last step.
    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.interval)
    }

    /// The pins of `tids` as last read or set.
    pub fn pins(&self, name: &str) -> Option<&Vec<Option<u32>>> {
        self.published.pins.get(name)
    }

    /// The pin changes made to VM `name`'s vCPUs.
    pub fn changes(&self, name: &str) -> u64 {
        self.changes.get(name).copied().unwrap_or(0)
    }

    /// The published state.
    pub fn state(&self) -> &Published {
        &self.published
    }

    /// One interval: measure, plan, pin, publish. The first interval (and a new thread's
    /// first) only takes the readings that the next one subtracts.
    pub fn step(&mut self, vms: &[VmInput], state_dir: &Path) {
        let now = Instant::now();
        let elapsed = self.last.map(|t| now.duration_since(t).as_nanos() as f64);
        self.last = Some(now);
        self.published.intervals += 1;
        self.forget_ended(vms);
        self.warn_outside(vms);
        let m = self.measure(vms, elapsed);
        let decision = self.decide(&m);
        if let Decision::Apply(plan) = self.confirm.admit(decision) {
            self.apply(&plan, &m, vms);
        }
        let path = state_dir.join(BALANCE_JSON);
        if let Ok(text) = serde_json::to_string_pretty(&self.published) {
            let _ = crate::state::write_published(&path, (text + "\n").as_bytes());
        }
    }

    /// Forgets the threads and counts of VMs that ended.
    fn forget_ended(&mut self, vms: &[VmInput]) {
        let live: std::collections::HashSet<u32> =
            vms.iter().flat_map(|v| v.tids.iter().copied()).collect();
        self.threads.retain(|tid, _| live.contains(tid));
        self.changes
            .retain(|name, _| vms.iter().any(|v| v.name == name));
    }

    /// Warns once per VM whose CPU list names none of the managed CPUs.
    fn warn_outside(&mut self, vms: &[VmInput]) {
        for vm in vms {
            let outside = vm
                .allowed
                .is_some_and(|a| !a.iter().any(|c| self.cpus.contains(c)));
            if outside && self.warned.insert(vm.name.to_owned()) {
                tracing::warn!(
                    "{}: its cpus = {:?} names none of the CPUs the balancer manages ({:?}): any of those is used",
                    vm.name,
                    vm.allowed.unwrap_or_default(),
                    self.cpus
                );
            } else if !outside {
                self.warned.remove(vm.name);
            }
        }
    }

    /// Reads every vCPU thread's run and wait and where it is placed: the smoothed, capped
    /// demands for the planner, and the pins to publish.
    fn measure(&mut self, vms: &[VmInput], elapsed: Option<f64>) -> Measured {
        let mut m = Measured {
            vcpus: Vec::new(),
            owners: Vec::new(),
            complete: true,
        };
        let mut pins = std::collections::BTreeMap::new();
        for (vi, vm) in vms.iter().enumerate() {
            let (raw, places) = self.read_vm(vm, elapsed);
            pins.insert(
                vm.name.to_owned(),
                places
                    .iter()
                    .map(|p| match p {
                        Some(Placement::Pinned(c)) => Some(*c),
                        _ => None,
                    })
                    .collect(),
            );
            let readings: Vec<f64> = raw.iter().map(|r| r.unwrap_or(0.0)).collect();
            let capped = cpu::vm_demands(&readings, vm.cap_cpus);
            for (i, &tid) in vm.tids.iter().enumerate() {
                let (Some(_), Some(place)) = (raw[i], places[i]) else {
                    m.complete = false;
                    continue;
                };
                let Some(t) = self.threads.get_mut(&tid) else {
                    m.complete = false;
                    continue;
                };
                let d = match t.demand {
                    Some(old) => SMOOTHING * capped[i] + (1.0 - SMOOTHING) * old,
                    None => capped[i],
                };
                t.demand = Some(d);
                m.vcpus.push(Vcpu {
                    demand: d,
                    now: place,
                    allowed: vm.allowed.map(<[u32]>::to_vec).unwrap_or_default(),
                });
                m.owners.push((vi, i, vm.pid, tid));
            }
        }
        self.published.pins = pins;
        m
    }

    /// One VM's threads: each one's demand over the interval (run + run-queue wait, `None`
    /// for a thread first seen now or gone) and its placement.
    fn read_vm(
        &mut self,
        vm: &VmInput,
        elapsed: Option<f64>,
    ) -> (Vec<Option<f64>>, Vec<Option<Placement>>) {
        let mut raw = Vec::with_capacity(vm.tids.len());
        let mut places = Vec::with_capacity(vm.tids.len());
        for &tid in vm.tids {
            let Some(s) = Proc::host().thread_sched(vm.pid, tid) else {
                raw.push(None);
                places.push(None);
                continue;
            };
            // A thread first seen now (or a reused id) has no reading until the next one.
            let fresh = self.threads.get(&tid).is_none_or(|t| t.pid != vm.pid);
            let t = self.threads.entry(tid).or_insert(Thread {
                pid: vm.pid,
                run: s.run_ns,
                wait: s.wait_ns,
                demand: None,
            });
            let reading = match elapsed {
                Some(dt) if !fresh && dt > 0.0 => Some(
                    (s.run_ns.saturating_sub(t.run) + s.wait_ns.saturating_sub(t.wait)) as f64 / dt,
                ),
                _ => None,
            };
            *t = Thread {
                pid: vm.pid,
                run: s.run_ns,
                wait: s.wait_ns,
                demand: if fresh { None } else { t.demand },
            };
            raw.push(reading);
            places.push(placement(vm.pid, tid));
        }
        (raw, places)
    }

    /// The planner's decision on what was measured, and the published loads and spread.
    fn decide(&mut self, m: &Measured) -> Decision {
        let demands: Vec<f64> = m.vcpus.iter().map(|v| v.demand).collect();
        let at: Vec<u32> = m.vcpus.iter().map(|v| v.now.cpu()).collect();
        let decision = if m.complete {
            cpu::plan(&self.cpus, &m.vcpus, &self.params)
        } else {
            // A thread without a reading yet (a new VM, the first interval): measure once more
            // before planning with it.
            Decision::Keep(Spread::of(&cpu::loads(&self.cpus, &demands, &at)))
        };
        let spread = match &decision {
            Decision::Keep(s) => *s,
            Decision::Apply(plan) => plan.before,
        };
        self.published.loads = cpu::loads(&self.cpus, &demands, &at)
            .iter()
            .map(|l| (l * 1e4).round() / 1e4)
            .collect();
        self.published.mean = spread.mean;
        self.published.sigma = spread.sigma;
        self.published.balanced = spread.balanced(&self.params);
        decision
    }

    /// Pins the threads whose placement the plan changes, logging and counting each change.
    fn apply(&mut self, plan: &cpu::Plan, m: &Measured, vms: &[VmInput]) {
        self.published.plans += 1;
        tracing::info!(
            "balance: plan {}: {} pin change(s); per-CPU demand σ {:.3} → {:.3} CPUs (mean {:.3}, {:.1} % → {:.1} %)",
            self.published.plans,
            plan.changes,
            plan.before.sigma,
            plan.after.sigma,
            plan.before.mean,
            plan.before.relative() * 100.0,
            plan.after.relative() * 100.0
        );
        for (k, &cpu) in plan.pins.iter().enumerate() {
            let (vi, i, pid, tid) = m.owners[k];
            let was = m.vcpus[k].now;
            if was == Placement::Pinned(cpu) {
                continue;
            }
            let name = vms[vi].name;
            match vms[vi].control.pin_vcpu(i as u32, tid, cpu) {
                Ok(()) => {
                    self.published.pin_changes += 1;
                    *self.changes.entry(name.to_owned()).or_default() += 1;
                    if let Some(p) = self.published.pins.get_mut(name) {
                        p[i] = Some(cpu);
                    }
                    tracing::info!(
                        "{name}: vCPU {i} (thread {tid}, demand {:.1} %) pinned to CPU {cpu} (was {})",
                        m.vcpus[k].demand * 100.0,
                        match was {
                            Placement::Pinned(c) => format!("pinned to CPU {c}"),
                            Placement::Floating { last } => format!("floating, last on CPU {last}"),
                        }
                    );
                }
                // The thread may have just ended with its VM.
                Err(e) if Proc::host().is_thread_of(pid, tid) => {
                    tracing::error!("{name}: cannot pin vCPU {i} (thread {tid}) to CPU {cpu}: {e}")
                }
                Err(_) => {}
            }
        }
    }
}

/// One interval's measurement: the planner's vCPUs, whose each one is, and whether every
/// thread had a reading.
struct Measured {
    vcpus: Vec<Vcpu>,
    /// `(vm index, vCPU index, pid, tid)` of each of `vcpus`.
    owners: Vec<(usize, usize, u32, u32)>,
    complete: bool,
}

/// Where thread `tid` of `pid` runs now: pinned when its affinity is one CPU.
fn placement(pid: u32, tid: u32) -> Option<Placement> {
    let allowed = crate::procfs::affinity(tid)?;
    if let [one] = allowed[..] {
        return Some(Placement::Pinned(one));
    }
    Some(Placement::Floating {
        last: Proc::host()
            .thread_last_cpu(pid, tid)
            .unwrap_or(allowed.first().copied().unwrap_or(0)),
    })
}
