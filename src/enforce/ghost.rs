//! The ghOSt enforcer: the centralized agent ([`crate::ghost::agent`]) on a real ghOSt
//! kernel, behind the [`Enforcer`] trait. One thread pinned to the first managed CPU is the
//! global agent: it spins, draining the queue and committing the policy's decisions for the
//! other CPUs. One thread per other CPU becomes that CPU's agent and idle-waits in
//! `GHOST_IOC_RUN` (the kernel runs the committed vCPU threads there). The `Enforcer` calls
//! reach the global agent as commands over a channel; it applies them between rounds.
//!
//! Attaching a VM moves its vCPU threads (only those) into the enclave; detaching moves them
//! back to CFS; dropping the enforcer destroys the enclave, which sends every task back to
//! CFS and kills the agents.
//!
//! Never run on a real ghOSt kernel (none exists on the development or CI machines); the
//! agent it drives is tested against the kernel model.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{EnforceError, Enforcer};
use crate::contention::Entitlement;
use crate::credit::Rate;
use crate::ghost::agent::GhostAgent;
use crate::ghost::{Enclave, GhostError, GhostKernel, Ghostfs, RealKernel, RunOutcome, SwOwner};
use crate::sched::{Config, VmId};
use crate::state::VmRecord;

enum Cmd {
    Attach {
        vm: VmId,
        tids: Vec<u32>,
        entitled: Entitlement,
    },
    Entitle {
        vm: VmId,
        entitled: Entitlement,
    },
    Detach {
        vm: VmId,
    },
}

/// What the enforcer runs on: the kernel that interprets ghostfs writes and ioctls, how many
/// CPUs it has `cpu_data` for, and whether the agents' threads are pinned to the CPUs they
/// serve. [`GhostHost::real`] for a ghOSt kernel; the tests give the kernel model, whose CPUs
/// are its own (pinning this process's threads to them means nothing).
#[derive(Clone)]
pub struct GhostHost {
    /// Makes a handle on the kernel (one per [`Ghostfs`]).
    pub kernel: Arc<dyn Fn() -> Box<dyn GhostKernel> + Send + Sync>,
    /// CPUs the kernel keeps `cpu_data` for.
    pub possible_cpus: usize,
    /// Pin each agent thread to its CPU.
    pub pin: bool,
}

impl GhostHost {
    /// This machine's ghOSt kernel.
    pub fn real() -> GhostHost {
        GhostHost {
            kernel: Arc::new(|| Box::new(RealKernel)),
            possible_cpus: std::thread::available_parallelism().map_or(1024, |n| n.get().max(1024)),
            pin: true,
        }
    }
}

/// The ghOSt enforcer.
pub struct GhostEnforcer {
    root: PathBuf,
    cpus: Vec<u32>,
    tx: Sender<Cmd>,
    stop: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
    /// Each attached VM's id, and the entitlement last sent for it (the agent calls
    /// `entitle` every tick; an unchanged one is not sent again).
    ids: HashMap<String, (VmId, Entitlement)>,
    next_id: VmId,
}

fn failed(
    what: &'static str,
    path: &Path,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> EnforceError {
    EnforceError::Scheduler {
        what,
        path: path.to_owned(),
        source: e.into(),
    }
}

impl GhostEnforcer {
    /// Creates an enclave on `cpus` (at least two: the first runs the global agent) under the
    /// ghostfs at `root` and starts the agents. Fails at once, with the reason, when there is
    /// no ghOSt kernel with ABI 91.
    pub fn start(root: &Path, cpus: &[u32]) -> Result<Self, EnforceError> {
        Self::start_on(root, cpus, GhostHost::real())
    }

    /// [`GhostEnforcer::start`] on `host`'s kernel.
    pub fn start_on(root: &Path, cpus: &[u32], host: GhostHost) -> Result<Self, EnforceError> {
        if cpus.len() < 2 || cpus.iter().any(|&c| c >= 1024) {
            return Err(failed(
                "needs at least two CPUs below 1024 (the first is the global agent's) for",
                root,
                format!("{cpus:?}"),
            ));
        }
        Ghostfs::new(root, (host.kernel)())
            .check_version()
            .map_err(|e| failed("checking ghOSt at", root, e))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let thread = {
            let (root_dir, cpus, stop, failure) = (
                root.to_owned(),
                cpus.to_vec(),
                stop.clone(),
                failure.clone(),
            );
            std::thread::Builder::new()
                .name("ghost-agent".into())
                .spawn(move || {
                    if let Err(e) = global_agent(&root_dir, &cpus, &host, &rx, &stop) {
                        tracing::error!("ghOSt agent: {e}");
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    }
                })
                .map_err(|e| failed("starting the ghOSt agent thread for", root, e))?
        };
        Ok(GhostEnforcer {
            root: root.to_owned(),
            cpus: cpus.to_vec(),
            tx,
            stop,
            failure,
            thread: Some(thread),
            ids: HashMap::new(),
            next_id: 0,
        })
    }

    fn id(&self, vm: &str) -> Result<VmId, EnforceError> {
        self.ids
            .get(vm)
            .map(|&(id, _)| id)
            .ok_or_else(|| EnforceError::NotAttached { vm: vm.to_owned() })
    }

    fn send(&self, cmd: Cmd) -> Result<(), EnforceError> {
        if let Some(f) = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(failed("the ghOSt agent failed at", &self.root, f));
        }
        self.tx.send(cmd).map_err(|_| {
            failed(
                "the ghOSt agent has stopped at",
                &self.root,
                "channel closed",
            )
        })
    }
}

/// The global agent's thread: enclave, satellites, then the loop.
fn global_agent(
    root: &Path,
    cpus: &[u32],
    host: &GhostHost,
    rx: &Receiver<Cmd>,
    stop: &AtomicBool,
) -> Result<(), GhostError> {
    let fs = Ghostfs::new(root, (host.kernel)());
    let enclave = fs.create_enclave(1)?;
    enclave.set_cpus(cpus)?;
    let result = std::thread::scope(|scope| -> Result<(), GhostError> {
        let mut agent =
            GhostAgent::new(&enclave, &cpus[1..], host.possible_cpus, Config::default())?;
        if host.pin {
            crate::procfs::set_affinity(0, &[cpus[0]])
                .map_err(|e| GhostError::Misuse(format!("pinning to CPU {}: {e}", cpus[0])))?;
        }
        let fd = agent.queue().fd();
        for &cpu in &cpus[1..] {
            let (enclave, pin) = (&enclave, host.pin);
            scope.spawn(move || satellite(enclave, cpu, pin, fd, stop));
        }
        enclave.become_agent(cpus[0], fd)?;
        let _online = enclave.agent_online()?;
        while !stop.load(Ordering::Relaxed) {
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Cmd::Attach { vm, tids, entitled } => agent.add_vm(vm, &tids, entitled)?,
                    Cmd::Entitle { vm, entitled } => agent.entitle(vm, entitled),
                    Cmd::Detach { vm } => agent.remove_vm(vm, |tid| enclave.remove_task(tid))?,
                }
            }
            agent.step(super::monotonic_ns())?;
            std::hint::spin_loop();
        }
        Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    let destroyed = enclave.destroy();
    result.and(destroyed)
}

/// A satellite: become `cpu`'s agent, then idle-wait until the enclave dies or `stop`.
fn satellite(enclave: &Enclave<'_>, cpu: u32, pin: bool, queue: RawFd, stop: &AtomicBool) {
    let run = || -> Result<(), GhostError> {
        if pin {
            crate::procfs::set_affinity(0, &[cpu])
                .map_err(|e| GhostError::Misuse(format!("pinning to CPU {cpu}: {e}")))?;
        }
        enclave.become_agent(cpu, queue)?;
        let index = enclave.status_word_info(SwOwner::Agent(cpu))?.index;
        let words = enclave.map_sw_region(0)?;
        while !stop.load(Ordering::Relaxed) {
            let barrier = words.get(index).map_or(0, |w| w.barrier);
            if enclave.idle_wait(cpu, barrier)? == RunOutcome::EnclaveDying {
                break;
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        tracing::error!(cpu, "ghOSt satellite agent: {e}");
        stop.store(true, Ordering::Relaxed);
    }
}

impl Enforcer for GhostEnforcer {
    fn describe(&self) -> String {
        format!(
            "ghost (global agent on CPU {}, CPUs {:?})",
            self.cpus[0],
            &self.cpus[1..]
        )
    }

    fn attach(&mut self, vm: &VmRecord) -> Result<(), EnforceError> {
        if self.ids.contains_key(&vm.name) {
            return Ok(());
        }
        let id = self.next_id;
        self.next_id += 1;
        // Until the agent's first `entitle` (at once, with its first `apply`): its baseline,
        // the whole of it guaranteed and no spare.
        let baseline = Rate::from_percent_of(vm.baseline, vm.vcpus);
        let entitled = Entitlement {
            cap: baseline,
            guarantee: baseline,
            weight: Rate(0),
        };
        self.ids.insert(vm.name.clone(), (id, entitled));
        self.send(Cmd::Attach {
            vm: id,
            tids: vm.vcpu_tids.clone(),
            entitled,
        })
    }

    fn apply(&mut self, vm: &str, _rate: Rate, _full: Rate) -> Result<(), EnforceError> {
        // The cap comes with `entitle`, beside the guarantee and the weight it goes with.
        self.id(vm).map(|_| ())
    }

    fn entitle(&mut self, vm: &str, entitled: Entitlement) -> Result<(), EnforceError> {
        let id = self.id(vm)?;
        if self.ids.get(vm).is_some_and(|&(_, sent)| sent == entitled) {
            return Ok(());
        }
        self.send(Cmd::Entitle { vm: id, entitled })?;
        self.ids.insert(vm.to_owned(), (id, entitled));
        Ok(())
    }

    fn detach(&mut self, vm: &str) -> Result<(), EnforceError> {
        match self.ids.remove(vm) {
            Some((id, _)) => self.send(Cmd::Detach { vm: id }),
            None => Ok(()),
        }
    }

    fn cleanup(&mut self, live: &[&str]) {
        let live: std::collections::HashSet<&str> = live.iter().copied().collect();
        let gone: Vec<String> = self
            .ids
            .keys()
            .filter(|n| !live.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            let _ = self.detach(&name);
        }
    }
}

impl Drop for GhostEnforcer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
