//! The vCPU pinning balancer's mechanism, run by the agent (`--balance cpu`): every interval
//! it reads each vCPU thread's run time and run-queue wait (`/proc/PID/task/TID/schedstat`),
//! its affinity (`sched_getaffinity`) and the CPU it last ran on (`stat` field 39), asks the
//! planner ([`super::cpu::plan`]) and applies the plan with `sched_setaffinity`. Every pin
//! change is logged and counted; the state is published in `<state dir>/balance.json`.
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

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::cpu::{self, Decision, Params, Placement, Spread, Vcpu};

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

/// The CPUs this process may run on (the default set of managed CPUs).
pub fn own_cpus() -> Vec<u32> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count() as u32)
            .filter(|&c| set.is_set(c as usize).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get()) as u32).collect(),
    }
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

    /// One interval: measure, plan, pin. The first interval (and a new thread's first) only
    /// takes the readings that the next one subtracts.
    pub fn step(&mut self, vms: &[VmInput], state_dir: &Path) {
        let now = Instant::now();
        let elapsed = self.last.map(|t| now.duration_since(t).as_nanos() as f64);
        self.last = Some(now);
        self.published.intervals += 1;
        // Forget threads of VMs that ended.
        let live: std::collections::HashSet<u32> =
            vms.iter().flat_map(|v| v.tids.iter().copied()).collect();
        self.threads.retain(|tid, _| live.contains(tid));
        self.changes
            .retain(|name, _| vms.iter().any(|v| v.name == name));

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
        let mut vcpus: Vec<Vcpu> = Vec::new();
        let mut owners: Vec<(usize, usize, u32, u32)> = Vec::new(); // (vm, vcpu, pid, tid)
        let mut pins = std::collections::BTreeMap::new();
        let mut complete = true;
        for (vi, vm) in vms.iter().enumerate() {
            let mut raw = Vec::with_capacity(vm.tids.len());
            let mut places = Vec::with_capacity(vm.tids.len());
            for &tid in vm.tids {
                let Some((run, wait)) = crate::enforce::thread_sched_ns(vm.pid, tid) else {
                    complete = false;
                    raw.push(None);
                    places.push(None);
                    continue;
                };
                // A thread first seen now (or a reused id) has no reading until the next one.
                let fresh = self.threads.get(&tid).is_none_or(|t| t.pid != vm.pid);
                let t = self.threads.entry(tid).or_insert(Thread {
                    pid: vm.pid,
                    run,
                    wait,
                    demand: None,
                });
                let reading = match elapsed {
                    Some(dt) if !fresh && dt > 0.0 => {
                        Some((run.saturating_sub(t.run) + wait.saturating_sub(t.wait)) as f64 / dt)
                    }
                    _ => None,
                };
                *t = Thread {
                    pid: vm.pid,
                    run,
                    wait,
                    demand: if fresh { None } else { t.demand },
                };
                raw.push(reading);
                places.push(placement(vm.pid, tid));
            }
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
                    complete = false;
                    continue;
                };
                let t = self.threads.get_mut(&tid).expect("inserted above");
                let d = match t.demand {
                    Some(old) => SMOOTHING * capped[i] + (1.0 - SMOOTHING) * old,
                    None => capped[i],
                };
                t.demand = Some(d);
                vcpus.push(Vcpu {
                    demand: d,
                    now: place,
                    allowed: vm.allowed.map(<[u32]>::to_vec).unwrap_or_default(),
                });
                owners.push((vi, i, vm.pid, tid));
            }
        }
        self.published.pins = pins;
        let decision = if complete {
            cpu::plan(&self.cpus, &vcpus, &self.params)
        } else {
            // A thread without a reading yet (a new VM, the first interval): measure once more
            // before planning with it.
            let at: Vec<u32> = vcpus.iter().map(|v| v.now.cpu()).collect();
            let d: Vec<f64> = vcpus.iter().map(|v| v.demand).collect();
            Decision::Keep(Spread::of(&cpu::loads(&self.cpus, &d, &at)))
        };
        let spread = match &decision {
            Decision::Keep(s) => *s,
            Decision::Apply(plan) => plan.before,
        };
        let demands: Vec<f64> = vcpus.iter().map(|v| v.demand).collect();
        let at: Vec<u32> = vcpus.iter().map(|v| v.now.cpu()).collect();
        self.published.loads = cpu::loads(&self.cpus, &demands, &at)
            .iter()
            .map(|l| (l * 1e4).round() / 1e4)
            .collect();
        self.published.mean = spread.mean;
        self.published.sigma = spread.sigma;
        self.published.balanced = spread.balanced(&self.params);
        let decision = self.confirm.admit(decision);
        if let Decision::Apply(plan) = decision {
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
                let (vi, i, pid, tid) = owners[k];
                let was = vcpus[k].now;
                if was == Placement::Pinned(cpu) {
                    continue;
                }
                let name = vms[vi].name;
                match pin(tid, cpu) {
                    Ok(()) => {
                        self.published.pin_changes += 1;
                        *self.changes.entry(name.to_owned()).or_default() += 1;
                        if let Some(p) = self.published.pins.get_mut(name) {
                            p[i] = Some(cpu);
                        }
                        tracing::info!(
                            "{name}: vCPU {i} (thread {tid}, demand {:.1} %) pinned to CPU {cpu} (was {})",
                            vcpus[k].demand * 100.0,
                            match was {
                                Placement::Pinned(c) => format!("pinned to CPU {c}"),
                                Placement::Floating { last } => format!("floating, last on CPU {last}"),
                            }
                        );
                    }
                    // The thread may have just ended with its VM.
                    Err(e) if std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {
                        tracing::error!(
                            "{name}: cannot pin vCPU {i} (thread {tid}) to CPU {cpu}: {e}"
                        )
                    }
                    Err(_) => {}
                }
            }
        }
        let path = state_dir.join(BALANCE_JSON);
        if let Ok(text) = serde_json::to_string_pretty(&self.published) {
            let _ = crate::state::write_published(&path, (text + "\n").as_bytes());
        }
    }
}

/// Where thread `tid` of `pid` runs now: pinned when its affinity is one CPU.
fn placement(pid: u32, tid: u32) -> Option<Placement> {
    let set = sched_getaffinity(Pid::from_raw(tid as i32)).ok()?;
    let allowed: Vec<u32> = (0..CpuSet::count() as u32)
        .filter(|&c| set.is_set(c as usize).unwrap_or(false))
        .collect();
    if let [one] = allowed[..] {
        return Some(Placement::Pinned(one));
    }
    Some(Placement::Floating {
        last: last_cpu(pid, tid).unwrap_or(allowed.first().copied().unwrap_or(0)),
    })
}

/// The CPU thread `tid` last ran on: field 39 (`processor`) of its `stat`.
pub fn last_cpu(pid: u32, tid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // Fields after the command (which may hold spaces and parentheses) start at field 3.
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(39 - 3)?.parse().ok()
}

/// Pins thread `tid` to `cpu`.
pub fn pin(tid: u32, cpu: u32) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu as usize)?;
    sched_setaffinity(Pid::from_raw(tid as i32), &set)
}

/// Parses a CPU list: `0-3,6` or `2`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|&c| (c as usize) < CpuSet::count())
                .ok_or_else(|| {
                    format!(
                        "{part:?} is not a CPU number or range (0–{})",
                        CpuSet::count() - 1
                    )
                })
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if b < a {
            return Err(format!("{part:?}: the range runs backwards"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err("an empty CPU list".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_refuse_garbage() {
        assert_eq!(parse_cpu_list("0-1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("3, 0-1,1").unwrap(), vec![0, 1, 3]);
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("99999").is_err());
        assert!(parse_cpu_list("-1").is_err());
    }

    #[test]
    fn this_threads_last_cpu_is_one_it_may_use() {
        let pid = std::process::id();
        let tid = nix::unistd::gettid().as_raw() as u32;
        let c = last_cpu(pid, tid).unwrap();
        assert!(own_cpus().contains(&c), "{c} not in {:?}", own_cpus());
    }
}
