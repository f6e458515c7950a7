//! The agent: measure each VM's vCPU CPU time → [`Ledger::tick`] → [`Enforcer::apply`], publish
//! the balances, persist the ledgers. One agent per state dir, held by an `flock` on
//! `<state dir>/agent.lock`; it does not know which enforcer it drives.
//!
//! # Tick and period
//!
//! The cgroup period is 100 ms (see [`crate::enforce::cgroup`]): the kernel's default,
//! measured exact on these machines, and a new quota is in force within one period.
//!
//! The tick is **200 ms: exactly two periods**. A VM held to its quota runs at the start of each
//! period and is throttled for the rest, so CPU time comes in per-period bursts; a tick that is a
//! whole number of periods always contains the same number of bursts and measures the same
//! usage. (A 250 ms tick alternately held two and three bursts: the ledger saw the short ticks
//! as savings and spent them, and every spend rewrote the quota, which the kernel answers by
//! refilling the runtime — measured 26 % of one CPU for a 20 % baseline.) Beyond that,
//! enforcement accuracy does not depend on the tick: at a constant grant nothing changes from
//! tick to tick. The tick bounds how stale the published balances are, the step of a decline
//! (a 20-minute decline moves 0.02 % of the full rate per tick), and how long `credits --set`
//! waits; config edits and new VMs do not wait for it, they arrive as file-system events and
//! are applied at once. With 10 VMs a tick costs a few hundred small reads and writes per
//! second. Five ticks fit in each 1-second persistence interval.
//!
//! # Crashes
//!
//! If the agent dies, VMs keep running at their last grant (the quota stays in the kernel). The
//! ledger file records, with the balances, a checkpoint: the boot id, the boot-time clock and
//! every vCPU thread's CPU time. A restarted agent that finds the same QEMU process charges it
//! exactly for the time and CPU since that checkpoint, so nothing is lost beyond what happened
//! after the last save (at most one second of accounting, and in practice nothing). A ledger
//! that such a restart would make exactly out of the file already saved is saved every 5 s
//! rather than every second (`STEADY_SAVE_EVERY`): only a crash of the whole host
//! loses more than nothing of it, and at most those 5 s.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::balance::memory;
use crate::base::{chain, IoContext, IoFailure};
use crate::contention::{Contention, Observed, SpareRule};
use crate::credit::{Credits, Rate, PPM_PER_CPU};
use crate::enforce::Enforcer;
use crate::procfs::Proc;
use crate::state;
use crate::view::{Health, Snapshot};

mod domain;
mod events;
pub mod history_file;
mod ledger_file;
#[cfg(feature = "libvirt")]
pub mod libvirt;
mod lifecycle;
mod liveness;
mod persist;
mod pinning;
mod reload;
#[doc(hidden)]
pub mod sim;
mod vm;
mod vm_config;

use events::Events;
use vm::Vm;

pub use crate::view::CreditsView;
pub use domain::{checkpoint_of, host_name, CHECKPOINT_EVERY};
pub use ledger_file::{Checkpoint, LedgerFile};
pub use reload::Reload;
pub use vm::HISTORY_TAIL;

/// The agent's tick.
pub const TICK: Duration = Duration::from_millis(200);
/// The shortest interval over which the published usage rate is computed, ns.
const USAGE_WINDOW_NS: u64 = 200_000_000;
/// How often the agent rescans the state dir in case an event was missed.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// How often the runtime dirs are looked in for `credits --set` requests that no touch of
/// [`state::REQUESTS`] announced (those of an older burst-qemu, which waits 5 s for its request
/// to be taken): 100 VMs cost 50 failed opens a second, where looking every tick cost 500.
const REQUESTS_SWEEP: Duration = Duration::from_secs(2);
/// How often each ledger is saved.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How often a VM's one-value files and `credits.json` are refreshed between events (an edit,
/// a `credits --set`, adoption publish at once). Every tick would cost the agent a rename per
/// changed file five times a second: measured 1.65 % of a core for 10 VMs with the state dir
/// on disk, against 0.80 % on tmpfs.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How often the contention stage re-plans (see [`crate::contention`]'s "Why this shape").
pub const CONTENTION_PERIOD: Duration = Duration::from_secs(1);

/// A failure that stops the agent.
#[derive(Debug, Error)]
pub enum AgentError {
    /// Another agent holds the state dir.
    #[error("an agent is already running for state dir {dir}", dir = .0.display())]
    AlreadyRunning(PathBuf),
    /// Host I/O failed.
    #[error(transparent)]
    Io(#[from] IoFailure),
    /// The file watcher could not start.
    #[error("watching the state dir for new VMs and config edits")]
    Watch(#[source] std::io::Error),
}

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The state dir whose VMs the agent serves.
    pub state_dir: PathBuf,
    /// Where ledgers are persisted.
    pub data_dir: PathBuf,
    /// Exit after this long with no VMs (auto-started agents); `None`: run until signalled.
    pub idle_exit: Option<Duration>,
    /// The CPU the VMs share, for the contention stage; `None` turns the stage off (each VM
    /// is held to its grant alone).
    pub contention: Option<Rate>,
    /// How the contention stage shares the spare (`--contention`; see
    /// [`crate::contention::rule`]).
    pub spare_rule: SpareRule,
    /// Serve Prometheus metrics here (`--metrics-listen`); `None`: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The disk bandwidth the VMs with a `disk_share` share (`--disk-bandwidth`); `None`:
    /// disks are not managed.
    pub disk_bandwidth: Option<crate::balance::disk::DiskBandwidth>,
    /// The vCPU pinning balancer (`--balance cpu`): the CPUs it manages and its interval;
    /// `None`: off.
    pub balance: Option<(Vec<u32>, Duration)>,
    /// The balloon memory coordinator ([`memory`]); `None`: off.
    pub memory: Option<memory::MemorySettings>,
    /// The libvirt connection whose opted-in domains join the fleet (`--libvirt`, feature
    /// `libvirt`); `None`: libvirt is not watched.
    pub libvirt: Option<LibvirtSettings>,
    /// Where the VMs' processes are read: the host's `/proc` ([`Proc::host`]); a synthetic
    /// tree in a simulation (`benches/agent_scale.rs`). (Where their cgroups are is the
    /// enforcer's: [`crate::enforce::cgroup::CgroupEnforcer::new`] takes the mount.)
    pub proc: Proc,
}

/// What `agent --libvirt` watches.
#[derive(Clone, Debug)]
pub struct LibvirtSettings {
    /// The connection (`qemu:///system`).
    pub uri: String,
    /// libvirt's run dir of QEMU domains on this host, where its status files are
    /// (`/run/libvirt/qemu` for `qemu:///system`).
    pub run_dir: PathBuf,
    /// Where `vms/NAME.toml` opt-ins are (absolute).
    pub vms_dir: PathBuf,
    /// Only domains whose name matches this pattern (`*` for any run of characters).
    pub domains: Option<String>,
}

/// The agent's lock on a state dir.
pub struct AgentLock(#[allow(dead_code)] File);

/// Takes the state dir's agent lock.
pub fn lock(state_dir: &Path) -> Result<AgentLock, AgentError> {
    fs::create_dir_all(state_dir).doing(|| format!("creating {}", state_dir.display()))?;
    let path = state::agent_lock_path(state_dir);
    match state::try_lock(&path, 0o644).doing(|| format!("locking {}", path.display()))? {
        Some(f) => {
            let _ = fs::write(&path, format!("{}\n", std::process::id()));
            Ok(AgentLock(f))
        }
        None => Err(AgentError::AlreadyRunning(state_dir.to_owned())),
    }
}

/// The agent.
pub struct Agent {
    settings: Settings,
    enforcer: Box<dyn Enforcer>,
    contention: Option<Contention>,
    disks: Option<crate::balance::disk::Disks>,
    last_period: Instant,
    /// When the ledgers were last saved together.
    last_persist: Instant,
    /// When the steady ledgers were last saved (see [`Vm::save_due`]).
    last_steady_round: Instant,
    vms: HashMap<String, Vm>,
    /// Each VM's QMP handle, shared by the disk and memory workers (a launcher VM's keeps one
    /// session on its agent monitor): made at adoption, dropped when the VM ends.
    qmp: HashMap<String, Arc<crate::control::Qmp>>,
    /// What the metrics server shows, when one runs.
    metrics: Option<Arc<Mutex<Snapshot>>>,
    health: Health,
    balancer: Option<crate::balance::pin::PinBalancer>,
    /// The memory-balanced VMs and their settings, shared with the memory coordinator's thread
    /// (`None` when it is off).
    memory_members: Option<Arc<Mutex<Vec<memory::Member>>>>,
    /// The libvirt watcher, when the agent watches libvirt.
    #[cfg(feature = "libvirt")]
    libvirt: Option<libvirt::Watch>,
    /// The memory coordinator's thread, while it runs.
    memory: Option<memory::Coordinator>,
    /// Where new settings come from while the agent runs (its config file).
    reload: Option<Reload>,
    /// Whether a `credits --set` request may wait in a runtime dir ([`state::REQUESTS`] was
    /// touched, events were lost, or the agent just started): the next tick looks.
    requests_due: bool,
    /// When the runtime dirs were last looked in for requests.
    requests_seen: Instant,
}

impl Agent {
    /// An agent over `enforcer`. The caller holds the [`AgentLock`].
    pub fn new(settings: Settings, enforcer: Box<dyn Enforcer>) -> Self {
        let balancer = settings
            .balance
            .clone()
            .map(|(cpus, every)| crate::balance::pin::PinBalancer::new(cpus, every));
        Agent {
            balancer,
            contention: settings
                .contention
                .map(|capacity| Contention::new(capacity, settings.spare_rule)),
            disks: settings
                .disk_bandwidth
                .map(crate::balance::disk::Disks::new),
            last_period: Instant::now(),
            last_persist: Instant::now(),
            last_steady_round: Instant::now(),
            settings,
            enforcer,
            vms: HashMap::new(),
            qmp: HashMap::new(),
            metrics: None,
            health: Health::default(),
            memory_members: None,
            #[cfg(feature = "libvirt")]
            libvirt: None,
            memory: None,
            reload: None,
            requests_due: true,
            requests_seen: Instant::now(),
        }
    }

    /// Takes new settings from `reload` on each edit of its file (see [`reload`]).
    pub fn with_reload(mut self, reload: Reload) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Runs until SIGINT/SIGTERM (or idle exit); ledgers are saved on the way out. Cgroups of
    /// running VMs are left in place, so they keep their last grant.
    pub fn run(mut self) -> Result<(), AgentError> {
        if let Some(n) = crate::procfs::raise_nofile() {
            tracing::debug!("descriptor limit {n}");
        }
        let mut events = Events::start(&self.settings.state_dir)?;
        tracing::info!(
            "agent for {} using {}",
            self.settings.state_dir.display(),
            self.enforcer.describe()
        );
        self.serve_metrics()?;
        // Its own thread (QMP may block); stopped when the agent is dropped.
        self.memory = self.start_memory_coordinator();
        if let Some(reload) = &self.reload {
            events.watch_config(&reload.path);
        }
        // libvirt first: it says which of the libvirt records in the state dir are still in
        // the fleet before the scan adopts them.
        self.start_libvirt();
        self.poll_libvirt(&mut events);
        self.scan(&mut events);
        let live: Vec<String> = self.vms.keys().cloned().collect();
        self.enforcer
            .cleanup(&live.iter().map(String::as_str).collect::<Vec<_>>());

        let mut next_tick = Instant::now() + TICK;
        let mut last_scan = Instant::now();
        let mut idle_since = Instant::now();
        while let Some(changed) = events.wait(next_tick) {
            if !changed.is_empty() {
                self.handle_changes(&changed, &mut events);
            }
            if Instant::now() < next_tick {
                continue;
            }
            if !self.settings.state_dir.is_dir() {
                tracing::info!(
                    "state dir {} is gone: exiting",
                    self.settings.state_dir.display()
                );
                break;
            }
            // New and ended VMs arrive as state-dir events; the full scan each second is a
            // safety net (it reads every runtime dir, the agent's largest per-tick cost).
            if last_scan.elapsed() >= RESCAN_EVERY {
                self.rescan(&mut events);
                last_scan = Instant::now();
            }
            let started = Instant::now();
            self.tick(crate::base::unix_now());
            self.health.observe_tick(started.elapsed().as_secs_f64());
            self.update_metrics();
            next_tick += TICK;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + TICK;
            }
            if !self.vms.is_empty() {
                idle_since = Instant::now();
            } else if let Some(d) = self
                .settings
                .idle_exit
                .filter(|&d| idle_since.elapsed() >= d)
            {
                tracing::info!("no VMs for {d:?}: exiting");
                break;
            }
        }
        self.shutdown();
        Ok(())
    }

    /// Serves Prometheus metrics when asked to, and says where in the state dir (for
    /// `burst-qemu metrics`, which fetches the same text).
    fn serve_metrics(&mut self) -> Result<(), AgentError> {
        let Some(addr) = self.settings.metrics_listen else {
            return Ok(());
        };
        let snap = Arc::default();
        let bound = crate::metrics::serve(addr, Arc::clone(&snap))
            .doing(|| format!("serving metrics on {addr}"))?;
        let _ = fs::write(
            self.settings.state_dir.join(crate::metrics::ADDR_FILE),
            format!("{bound}\n"),
        );
        tracing::info!("serving Prometheus metrics on http://{bound}/metrics");
        self.metrics = Some(snap);
        Ok(())
    }

    /// Starts the memory coordinator's thread when it is on.
    fn start_memory_coordinator(&mut self) -> Option<memory::Coordinator> {
        let settings = self.settings.memory.clone()?;
        let members = Arc::default();
        self.memory_members = Some(Arc::clone(&members));
        Some(memory::spawn(
            self.settings.state_dir.clone(),
            settings,
            members,
        ))
    }

    /// Tells the memory coordinator which VMs it balances, with the settings in force (after
    /// each adoption, end and applied edit: it reads no config file itself).
    fn share_memory_members(&self) {
        let Some(shared) = &self.memory_members else {
            return;
        };
        let mut members: Vec<memory::Member> = self
            .vms
            .values()
            .filter_map(|vm| {
                Some(memory::Member {
                    record: vm.record.clone(),
                    config: vm.config.memory.clone()?,
                    control: self.control_of(&vm.record),
                })
            })
            .collect();
        members.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        if let Ok(mut m) = shared.lock() {
            *m = members;
        }
    }

    /// A VM's control handle: QMP for burst-qemu's own and adopted VMs (the handle made at
    /// adoption, see [`Agent::qmp_of`]), the libvirt API for a libvirt domain.
    fn control_of(&self, record: &crate::state::VmRecord) -> Arc<dyn crate::control::Control> {
        match record.source {
            crate::state::Source::Libvirt { .. } => self.libvirt_control(record),
            _ => self.qmp_of(record),
        }
    }

    /// The VM's QMP handle (one made now if it has none: a VM not adopted).
    fn qmp_of(&self, record: &crate::state::VmRecord) -> Arc<crate::control::Qmp> {
        self.qmp
            .get(&record.name)
            .cloned()
            .unwrap_or_else(|| Arc::new(crate::control::Qmp::for_agent(record)))
    }

    /// The safety-net scan, repairs of enforcement, and cleanup of what ended VMs left.
    fn rescan(&mut self, events: &mut Events) {
        self.poll_libvirt(events);
        self.checkpoint_domains(false);
        self.scan(events);
        self.verify();
        // What could not be removed when its VM ended (a thread not yet gone, a zombie QEMU no
        // one has reaped) is tried again until it goes.
        let live: Vec<&str> = self.vms.keys().map(String::as_str).collect();
        self.enforcer.cleanup(&live);
    }

    /// On the way out: VMs that are still running keep their cgroup and last grant; those that
    /// ended are let go (their ledgers saved, their cgroups removed).
    fn shutdown(&mut self) {
        self.checkpoint_domains(true);
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let alive = self
                .vms
                .get(&name)
                .is_some_and(|vm| vm.record.qemu_alive_in(&self.settings.proc));
            if !alive {
                self.end(&name);
                continue;
            }
            if let Some(mut vm) = self.vms.remove(&name) {
                vm.measure_and_tick();
                self.persist(&mut vm);
                vm.save_history(&self.settings.data_dir, true);
                self.vms.insert(name, vm);
            }
        }
        if self.vms.is_empty() {
            self.enforcer.cleanup(&[]);
        }
        if self.metrics.is_some() {
            let _ = fs::remove_file(self.settings.state_dir.join(crate::metrics::ADDR_FILE));
        }
        tracing::info!("agent stopped; running VMs keep their last grant");
    }

    /// Refreshes what the metrics server shows (nothing when it is off), every tick: the
    /// utilisation gauge is the last tick's usage, which a scrape then sees. (Once a second was
    /// tried: a scrape then sees one tick of the second before, and the gauge no longer
    /// follows the VM's CPU over a few seconds of scrapes, `tests/observe.rs`.)
    fn update_metrics(&mut self) {
        let Some(snap) = &self.metrics else { return };
        let mut vms: Vec<CreditsView> = self.vms.values().map(Vm::view).collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        if let Ok(mut s) = snap.lock() {
            *s = Snapshot {
                vms,
                health: Some(self.health.clone()),
            };
        }
    }

    fn handle_changes(&mut self, changed: &events::Changed, events: &mut Events) {
        let configs: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, vm)| changed.contains(&vm.record.config))
            .map(|(n, _)| n.clone())
            .collect();
        for name in configs {
            self.reload(&name);
        }
        if self
            .reload
            .as_ref()
            .is_some_and(|r| changed.contains(&r.path))
        {
            self.reload_settings();
        }
        let requests = self.settings.state_dir.join(state::REQUESTS);
        if changed.contains(&requests) {
            self.requests_due = true;
        }
        let own = |p: &Path| {
            p == requests
                || p.file_name()
                    .is_some_and(|n| n == "agent.log" || n == "agent.lock")
        };
        if changed.everything
            || changed
                .paths
                .iter()
                .any(|p| p.parent() == Some(self.settings.state_dir.as_path()) && !own(p))
        {
            self.scan(events);
        }
    }

    /// Puts back what someone else changed of the VMs' enforcement (see [`Enforcer::verify`]).
    fn verify(&mut self) {
        for vm in self.vms.values() {
            match self.enforcer.verify(&vm.record) {
                Ok(Some(what)) => tracing::warn!("{}: {what}: repaired", vm.record.name),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(
                        "{}: cannot repair its enforcement: {}",
                        vm.record.name,
                        chain(&e)
                    )
                }
            }
        }
    }

    fn enforce(&mut self, vm: &mut Vm) {
        let grant = vm.ledger.grant().rate;
        // The contention stage's allocation, when the host is contended, never lifts the cap
        // above the grant (which may have fallen since the stage ran).
        let cap = match vm.allocation {
            Some(a) if a.contended => a.rate.min(grant),
            _ => grant,
        };
        let name = &vm.record.name;
        if let Err(e) = self
            .enforcer
            .apply(name, cap, vm.ledger.policy().full_rate())
        {
            tracing::error!("{name}: {}", chain(&e));
        }
        if let Err(e) = self.enforcer.weigh(name, cap) {
            tracing::error!("{name}: {}", chain(&e));
        }
        // What a dispatching enforcer orders by: the same cap, the baseline, the rule's
        // weight (none for ResCoin's, whose history only the stage keeps: refused for them).
        let baseline = vm.ledger.policy().baseline_rate();
        if let Some(entitled) = self.settings.spare_rule.entitlement(cap, baseline) {
            if let Err(e) = self.enforcer.entitle(name, entitled) {
                tracing::error!("{name}: {}", chain(&e));
            }
        }
    }

    /// Ends a contention period: plans every VM's allocation from what it used.
    fn contend(&mut self) {
        let Some(stage) = self.contention.as_mut() else {
            return;
        };
        let names: Vec<String> = self.vms.keys().cloned().collect();
        let observed: Vec<(&str, Observed)> = names
            .iter()
            .filter_map(|n| {
                let vm = self.vms.get(n)?;
                let (used, elapsed) = vm.period;
                let rate = |ns: u64| {
                    Rate(
                        (u128::from(ns) * u128::from(PPM_PER_CPU) / u128::from(elapsed.max(1)))
                            as u64,
                    )
                };
                Some((
                    n.as_str(),
                    Observed {
                        grant: vm.ledger.grant().rate,
                        baseline: vm.ledger.policy().baseline_rate(),
                        used: rate(used),
                        waited: rate(vm.period_waited),
                    },
                ))
            })
            .collect();
        let plan = stage.period(&observed);
        for ((name, _), a) in observed.iter().zip(plan) {
            if let Some(vm) = self.vms.get_mut(*name) {
                if a.contended != vm.allocation.is_some_and(|p| p.contended) {
                    tracing::info!(
                        "{name}: host {}: allocation {:.2} % of its vCPUs",
                        if a.contended {
                            "contended"
                        } else {
                            "no longer contended"
                        },
                        a.rate.percent_of(vm.record.vcpus)
                    );
                }
                vm.allocation = Some(a);
                vm.period = (0, 0);
                vm.period_waited = 0;
            }
        }
    }

    /// One tick; `now_s` is the wall clock's second, for the history.
    fn tick(&mut self, now_s: u64) {
        // Measure and charge every VM first: the contention stage plans them together.
        for vm in self.vms.values_mut() {
            vm.measure_and_tick();
        }
        if self.last_period.elapsed() >= CONTENTION_PERIOD {
            self.last_period = Instant::now();
            self.contend();
            if let Some(disks) = self.disks.as_mut() {
                disks.period();
                for (name, vm) in self.vms.iter_mut() {
                    vm.disk = disks.view(name);
                }
            }
        }
        self.balance_cpus();
        // Requests are looked for when announced, and every REQUESTS_SWEEP in any case: a
        // `credits --set` of an older burst-qemu does not touch the file that announces it.
        let requests = std::mem::take(&mut self.requests_due)
            || self.requests_seen.elapsed() >= REQUESTS_SWEEP;
        if requests {
            self.requests_seen = Instant::now();
        }
        let names: Vec<String> = self.vms.keys().cloned().collect();
        let mut histories = Vec::new();
        for name in names {
            let Some(mut vm) = self.vms.remove(&name) else {
                continue;
            };
            if self.tend(&mut vm, now_s, requests) {
                histories.push(name.clone());
            }
            self.vms.insert(name, vm);
        }
        if self.last_persist.elapsed() >= PERSIST_EVERY {
            self.persist_all();
        }
        if !histories.is_empty() {
            self.save_histories(&histories);
        }
    }

    /// A VM's share of a tick after measuring: a balance request (looked for when `requests`
    /// may wait), enforcement, publishing, persistence and history, each when due.
    /// Whether its history file is due.
    fn tend(&mut self, vm: &mut Vm, now_s: u64, requests: bool) -> bool {
        let requested = requests && self.take_balance_request(vm);
        self.enforce(vm);
        if requested || vm.last_publish.elapsed() >= PUBLISH_EVERY {
            vm.publish(&self.settings.state_dir);
        }
        if requested {
            // Only now: `credits --set` waits for the request to go, then reads the published
            // balance.
            let request = self
                .settings
                .state_dir
                .join(&vm.record.name)
                .join(state::SET_CREDITS);
            let _ = fs::remove_file(&request);
        }
        vm.record_history(&self.settings.state_dir, now_s)
    }

    /// Applies a `burst-qemu credits --set` request waiting in the VM's runtime dir; whether
    /// there was one.
    fn take_balance_request(&mut self, vm: &mut Vm) -> bool {
        let name = vm.record.name.clone();
        let request = self.settings.state_dir.join(&name).join(state::SET_CREDITS);
        let Ok(text) = fs::read_to_string(&request) else {
            return false;
        };
        match text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(Credits::from_credits)
        {
            Some(c) => {
                vm.ledger.set_balance(c);
                tracing::info!("{name}: balance set to {c} (burst-qemu credits --set)");
                self.persist(vm);
                self.checkpoint_soon(&vm.record);
            }
            None => tracing::error!("{name}: ignoring balance request {text:?}"),
        }
        true
    }
}

/// A 2-vCPU, 10 % ledger holding `balance` credits, for the agent's module tests.
#[cfg(test)]
pub(crate) fn test_ledger(balance: f64) -> crate::credit::Ledger {
    let p = crate::credit::Policy::new(2, crate::credit::Baseline::from_percent(10.0).unwrap())
        .unwrap();
    crate::credit::Ledger::new(p, Credits::from_credits(balance).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_agent_in_a_state_dir_is_a_refused_vm_name() {
        let dir = Path::new("/s");
        let files = [
            state::agent_lock_path(dir),
            dir.join("agent.log"),
            dir.join(state::REQUESTS),
            dir.join(crate::metrics::ADDR_FILE),
            crate::enforce::scx::stats_path(dir),
            #[cfg(feature = "libvirt")]
            dir.join(libvirt::LIBVIRT_JSON),
        ];
        for f in files {
            let name = f.file_name().unwrap().to_str().unwrap();
            assert!(crate::base::validate_name(name).is_err(), "{name} accepted");
        }
        assert!(crate::base::validate_name("agent.logs").is_ok());
    }

    #[test]
    fn a_second_agent_on_a_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = lock(dir.path()).unwrap();
        assert!(matches!(
            lock(dir.path()),
            Err(AgentError::AlreadyRunning(_))
        ));
        assert!(state::agent_running(dir.path()));
    }
}
