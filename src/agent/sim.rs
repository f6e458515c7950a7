//! The agent's loop driven step by step, for `benches/agent_scale.rs`, which times it on a
//! synthetic host (a `/proc` and a cgroup tree of plain files, given by [`Settings::proc`] and
//! the enforcer's mount), and for `tests/ghost_agent.rs`, which runs it with the ghOSt
//! enforcer on the kernel model ([`SyntheticHost`] for both). Not an interface: hidden from
//! the docs, used by nothing else.
//!
//! [`Agent::run`] does, each second: a rescan, and five ticks of which one finds the ledgers'
//! save, each VM's publish and the contention period due. Its clock decides what is due; a
//! bench's seconds do not follow the clock (faster with few VMs, slower with many, where the
//! agent would fall behind and save and publish at every tick), so [`Driver::due`] says before
//! each tick whether the once-a-second work is due. The metrics are kept as with `--metrics-listen`, without the
//! server (a scrape is the scraper's cost, not the loop's).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Agent, AgentError, Events, Settings};
use crate::config::{self, VmConfig};
use crate::contention::SpareRule;
use crate::enforce::Enforcer;
use crate::procfs::Proc;
use crate::state::{self, Source, VmRecord};

/// An agent and its event sources, stepped by hand.
pub struct Driver {
    agent: Agent,
    events: Events,
    /// The history's clock: one second per due tick.
    now_s: u64,
}

impl Driver {
    /// An agent over `enforcer` that has adopted the VMs of its state dir (the scan of
    /// [`Agent::run`]'s start). Like the agent, it blocks SIGINT and SIGTERM in the calling
    /// thread: [`Driver::rescan`] says when one arrived.
    pub fn start(settings: Settings, enforcer: Box<dyn Enforcer>) -> Result<Driver, AgentError> {
        let mut events = Events::start(&settings.state_dir)?;
        let mut agent = Agent::new(settings, enforcer);
        agent.metrics = Some(Arc::default());
        agent.scan(&mut events);
        Ok(Driver {
            agent,
            events,
            now_s: crate::base::unix_now(),
        })
    }

    /// How many VMs the agent holds.
    pub fn vms(&self) -> usize {
        self.agent.vms.len()
    }

    /// Ledger saves that failed so far (the agent's health counter).
    pub fn save_failures(&self) -> u64 {
        self.agent.health.ledger_save_failures
    }

    /// Whether the next tick is the one of its second that saves the ledgers, publishes every
    /// VM and ends a contention period (`true`: the history's clock also moves one second on),
    /// or one that does none of these. Every fifth such second also saves the steady ledgers
    /// (the agent's [`super::vm::STEADY_SAVE_EVERY`]).
    pub fn due(&mut self, due: bool) {
        let now = Instant::now();
        let ago = |d: Duration| now.checked_sub(d).unwrap_or(now);
        let when = if due {
            ago(Duration::from_secs(1))
        } else {
            now
        };
        self.agent.last_persist = when;
        self.agent.last_period = when;
        for vm in self.agent.vms.values_mut() {
            vm.last_publish = when;
        }
        self.now_s += u64::from(due);
        let steady = super::vm::STEADY_SAVE_EVERY;
        self.agent.last_steady_round = match due && self.now_s.is_multiple_of(steady.as_secs()) {
            true => ago(steady),
            false => now,
        };
    }

    /// The loop's once-a-second work besides its ticks: the file-system events that arrived,
    /// then the rescan (records, liveness, verification of enforcement, cleanup). `false` when
    /// SIGINT or SIGTERM arrived.
    pub fn rescan(&mut self) -> bool {
        let Some(changed) = self.events.wait(Instant::now()) else {
            return false;
        };
        if !changed.is_empty() {
            self.agent.handle_changes(&changed, &mut self.events);
        }
        self.agent.rescan(&mut self.events);
        true
    }

    /// One tick as [`Agent::run`] makes it: measure and charge every VM, contend, enforce,
    /// publish and save what is due, record the history; then the metrics.
    pub fn tick(&mut self) {
        let started = Instant::now();
        self.agent.tick(self.now_s);
        self.agent
            .health
            .observe_tick(started.elapsed().as_secs_f64());
        self.agent.update_metrics();
    }
}

/// A host of plain files for an agent: a `/proc` (the boot id, and per VM its QEMU's `stat`
/// and its vCPU threads' `comm` and `schedstat`), a state dir where each VM is placed as
/// `burst-qemu adopt` places one ([`state::place_foreign`]: live while its pid and start time
/// match), a data dir and a directory of VM configs written by [`config::save`], so neither
/// format can drift. Pids above the kernel's largest `pid_max` (2^22) can never be a real
/// process's; nothing here acts on one.
pub struct SyntheticHost {
    /// Everything is below it.
    pub root: PathBuf,
    /// The `/proc` of [`Settings::proc`].
    pub proc_dir: PathBuf,
    /// The state dir.
    pub state_dir: PathBuf,
    /// The data dir (ledgers).
    pub data_dir: PathBuf,
    /// The VMs' config files.
    pub vms_dir: PathBuf,
    boot_id: String,
}

impl SyntheticHost {
    /// An empty host under `root` (made; whatever was there is removed).
    pub fn new(root: &Path) -> SyntheticHost {
        let _ = fs::remove_dir_all(root);
        let host = SyntheticHost {
            root: root.to_owned(),
            proc_dir: root.join("proc"),
            state_dir: root.join("state"),
            data_dir: root.join("data"),
            vms_dir: root.join("vms"),
            boot_id: Proc::host().boot_id(),
        };
        let random = host.proc_dir.join("sys/kernel/random");
        for d in [&random, &host.state_dir, &host.data_dir, &host.vms_dir] {
            fs::create_dir_all(d).expect("a synthetic host's dirs");
        }
        fs::write(random.join("boot_id"), format!("{}\n", host.boot_id)).expect("boot id");
        host
    }

    /// Places VM `name`: QEMU `pid` started at `start` (clock ticks), its vCPU threads `tids`
    /// (counters at 0), its config `cfg`. Returns its record.
    pub fn add_vm(
        &self,
        name: &str,
        pid: u32,
        start: u64,
        tids: &[u32],
        cfg: &VmConfig,
    ) -> VmRecord {
        let pid_dir = self.proc_dir.join(pid.to_string());
        fs::create_dir_all(&pid_dir).expect("a synthetic pid dir");
        let stat = format!(
            "{pid} (qemu-system-x86) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 9 0 {start} 0 0\n"
        );
        fs::write(pid_dir.join("stat"), stat).expect("a synthetic stat");
        for (k, &tid) in tids.iter().enumerate() {
            let task = pid_dir.join(format!("task/{tid}"));
            fs::create_dir_all(&task).expect("a synthetic task dir");
            fs::write(task.join("comm"), format!("CPU {k}/KVM\n")).expect("comm");
            self.write_schedstat(pid, tid, 0, 0);
        }
        let config = self.vms_dir.join(format!("{name}.toml"));
        config::save(&config, cfg).expect("a synthetic VM's config");
        let record = VmRecord {
            name: name.to_owned(),
            pid,
            wrapper_pid: 0,
            vcpus: tids.len() as u32,
            baseline: cfg.policy.baseline().percent(),
            mode: cfg.policy.mode(),
            vcpu_tids: tids.to_vec(),
            config,
            qmp_socket: PathBuf::new(),
            qemu_start: start,
            boot_id: self.boot_id.clone(),
            source: Source::Adopted,
            agent_socket: None,
        };
        state::place_foreign(&self.state_dir, &record).expect("a synthetic VM placed");
        record
    }

    /// Writes thread `tid`'s `schedstat` (ns run, ns waited) in place, at a fixed width: no
    /// truncation, whose freeing and reallocating of blocks (and ext4's flush on close after
    /// it) would load the disk under the agent's fsyncs.
    pub fn write_schedstat(&self, pid: u32, tid: u32, run: u64, wait: u64) {
        let path = self.proc_dir.join(format!("{pid}/task/{tid}/schedstat"));
        let line = format!("{run:020} {wait:020} 100\n");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("a synthetic schedstat");
        f.write_all(line.as_bytes()).expect("a synthetic schedstat");
    }

    /// The agent's settings on this host: no stage, balancer or memory coordinator (the
    /// caller turns on what it wants).
    pub fn settings(&self) -> Settings {
        Settings {
            state_dir: self.state_dir.clone(),
            data_dir: self.data_dir.clone(),
            idle_exit: None,
            contention: None,
            spare_rule: SpareRule::default(),
            metrics_listen: None,
            disk_bandwidth: None,
            balance: None,
            memory: None,
            libvirt: None,
            proc: Proc::at(&self.proc_dir),
        }
    }
}

impl Drop for SyntheticHost {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}
