//! One adopted VM: its state, and what the loop does to it — measure and charge, persist the
//! ledger and its checkpoint, publish its view, keep its history.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use super::{history_file, Checkpoint, LedgerFile, TICK, USAGE_WINDOW_NS};
use crate::base::boottime_ns;
use crate::config::VmConfig;
use crate::contention::Allocation;
use crate::credit::{Baseline, Credits, Ledger, Policy, Rate, PPM_PER_CPU};
use crate::procfs::{Kept, Proc, SchedFile};
use crate::state::{self, VmRecord};
use crate::view::{self, CreditsView, DiskView, Facts, Live};

/// The file holding a running VM's history samples closed since its history file was last
/// saved, in its runtime dir: `plot` of a running VM reads the file and this tail.
pub const HISTORY_TAIL: &str = "history.tail";

/// A ledger that a restart would replay exactly is saved this often all the same (see
/// [`Vm::save_due`]): what a crash of the whole host can lose of it.
pub(super) const STEADY_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// One adopted VM.
pub(super) struct Vm {
    pub(super) record: VmRecord,
    pub(super) ledger: Ledger,
    /// The config in force (the last good one while an edit is bad).
    pub(super) config: VmConfig,
    pub(super) credits_applied: Option<Credits>,
    pub(super) used_total: Credits,
    pub(super) cpu: Vec<(u32, u64)>,
    pub(super) at_ns: u64,
    pub(super) usage: Rate,
    /// CPU and time accumulated toward the next `usage` figure.
    pub(super) window: (u64, u64),
    /// CPU and time accumulated toward the contention stage's next period.
    pub(super) period: (u64, u64),
    /// Run-queue wait of the vCPU threads over the same period: CPU the host kept from them.
    pub(super) period_waited: u64,
    /// Each vCPU thread's cumulative run-queue wait at the last measurement (as `cpu`).
    pub(super) waits: Vec<Option<u64>>,
    /// The contention stage's allocation in force.
    pub(super) allocation: Option<Allocation>,
    pub(super) last_grant: Rate,
    /// Why the config file is not in force, while an edit is bad.
    pub(super) stale: Option<String>,
    /// The launcher died; QEMU runs on (see [`crate::state`]'s "Orphans").
    pub(super) orphaned: bool,
    /// Its QEMU and launcher, held open to ask whether they live.
    pub(super) watch: super::liveness::Watch,
    /// Why the last save of the ledger failed, while it keeps failing.
    pub(super) ledger_error: Option<String>,
    /// The ledger file last saved (`None`: none yet by this agent).
    last_saved: Option<LedgerFile>,
    pub(super) last_publish: Instant,
    /// Each vCPU thread's `schedstat`, kept open.
    sched: HashMap<u32, SchedFile>,
    pub(super) published: HashMap<&'static str, String>,
    /// Its runtime dir, kept open for publishing (opened at a publish when it is not; let go
    /// when a write finds the dir removed).
    runtime: Option<Kept>,
    /// The published files rewritten more than once, each with its companion kept open (let
    /// go with `runtime`, or when a write through them fails).
    pairs: HashMap<&'static str, state::SwapPair>,
    pub(super) history: crate::history::History,
    /// The start of the newest fine sample in the saved history file.
    pub(super) history_saved_t: u64,
    /// Its disks under the disk stages (`None`: not managed).
    pub(super) disk: Option<DiskView>,
    /// Its vCPUs' pins and pin changes, when the pinning balancer runs.
    pub(super) pins: Option<(Vec<Option<u32>>, u64)>,
    /// Where its QEMU's threads are read (the agent's [`super::Settings::proc`]).
    proc: Proc,
}

impl Vm {
    /// A VM adopted with `ledger` and `config`; `cpu` is each vCPU thread's CPU time at `at_ns`;
    /// its threads are read in `proc`.
    pub(super) fn new(
        proc: &Proc,
        record: VmRecord,
        mut ledger: Ledger,
        config: VmConfig,
        cpu: Vec<(u32, u64)>,
        at_ns: u64,
    ) -> Vm {
        ledger.set_interval(TICK.as_nanos() as u64);
        Vm {
            last_grant: ledger.grant().rate,
            record,
            ledger,
            config,
            credits_applied: None,
            used_total: Credits::ZERO,
            cpu,
            at_ns,
            usage: Rate(0),
            window: (0, 0),
            period: (0, 0),
            period_waited: 0,
            waits: Vec::new(),
            allocation: None,
            stale: None,
            orphaned: false,
            watch: Default::default(),
            ledger_error: None,
            last_saved: None,
            last_publish: Instant::now(),
            sched: HashMap::new(),
            published: HashMap::new(),
            runtime: None,
            pairs: HashMap::new(),
            history: crate::history::History::new(),
            history_saved_t: 0,
            disk: None,
            pins: None,
            proc: proc.clone(),
        }
    }

    /// The VM's view, as every reader shows it.
    pub(super) fn view(&self) -> CreditsView {
        let allocation = self.allocation;
        view::build(&Facts {
            name: &self.record.name,
            ledger: &self.ledger,
            used_total: self.used_total,
            live: Some(Live {
                usage: self.usage,
                grant: self.last_grant,
                allocation: allocation.filter(|a| a.contended).map(|a| a.rate),
                demand: allocation.map(|a| (a.estimate, a.observed)),
            }),
            config_error: self.stale.as_deref(),
            ledger_error: self.ledger_error.as_deref(),
            disk: self.disk.as_ref(),
            pins: self.pins.as_ref().map(|(p, c)| (p.as_slice(), *c)),
        })
    }

    /// Charges the VM for the CPU its vCPU threads used since the last measurement.
    pub(super) fn measure_and_tick(&mut self) {
        let now = boottime_ns();
        let elapsed = now.saturating_sub(self.at_ns);
        if elapsed == 0 {
            return;
        }
        let mut used = 0u64;
        let mut waited = 0u64;
        self.waits.resize(self.cpu.len(), None);
        for ((tid, last), last_wait) in self.cpu.iter_mut().zip(self.waits.iter_mut()) {
            let file = self
                .sched
                .entry(*tid)
                .or_insert_with(|| SchedFile::open(&self.proc, self.record.pid, *tid));
            if let Some(s) = file.read() {
                used += s.run_ns.saturating_sub(*last);
                *last = s.run_ns;
                if let Some(w) = *last_wait {
                    waited += s.wait_ns.saturating_sub(w);
                }
                *last_wait = Some(s.wait_ns);
            }
        }
        self.last_grant = self.ledger.grant().rate;
        self.ledger.tick(elapsed, used);
        self.used_total = Credits(self.used_total.vcpu_ns() + used);
        // The published usage is a rate over at least USAGE_WINDOW: schedstat advances at
        // scheduler ticks, so two measurements a few microseconds apart (a config edit just
        // after a tick) would read as idle.
        self.window = (self.window.0 + used, self.window.1 + elapsed);
        self.period = (self.period.0 + used, self.period.1 + elapsed);
        self.period_waited += waited;
        if self.window.1 >= USAGE_WINDOW_NS {
            self.usage = Rate(
                (u128::from(self.window.0) * u128::from(PPM_PER_CPU) / u128::from(self.window.1))
                    as u64,
            );
            self.window = (0, 0);
        }
        self.at_ns = now;
    }

    /// The ledger file as it stands: balances and a checkpoint of the accounting.
    pub(super) fn ledger_file(&self) -> LedgerFile {
        LedgerFile {
            name: self.record.name.clone(),
            vcpus: self.record.vcpus,
            policy: Some(self.ledger.policy().clone()),
            balances: self.ledger.balances(),
            credits_applied: self.credits_applied,
            used_total: self.used_total,
            checkpoint: Some(Checkpoint {
                boot_id: self.proc.boot_id(),
                qemu_start: self.record.qemu_start,
                boottime_ns: self.at_ns,
                qemu_pid: self.record.pid,
                cpu_ns: self.cpu.clone(),
            }),
            uuid: self.record.source.libvirt_uuid().map(str::to_owned),
            saved_unix_ns: crate::base::unix_now_ns(),
        }
    }

    /// Whether `file` (this VM's ledger file as it stands) must be saved at this interval. Not
    /// when a restarted agent would make it, to the nanosecond, out of the file last saved (see
    /// [`LedgerFile::replays_to`]): an idle VM's earnings or a steady burst, between two
    /// ticks that neither emptied nor filled the balance. Such a VM is saved at each
    /// `steady_round` all the same (every [`STEADY_SAVE_EVERY`], the same interval for all VMs,
    /// so their saves share one batch): a crash of the agent alone loses nothing either way
    /// (the restart charges the gap exactly), but one of the host, or of the agent and QEMU
    /// together, keeps only what was saved.
    pub(super) fn save_due(&self, file: &LedgerFile, steady_round: bool) -> bool {
        match &self.last_saved {
            Some(saved) => self.ledger_error.is_some() || steady_round || !saved.replays_to(file),
            None => true,
        }
    }

    /// Saves the ledger and its checkpoint; `false` when the save failed (the VM goes on being
    /// charged and enforced from memory, and says why in its view until a save succeeds).
    pub(super) fn persist(&mut self, data_dir: &Path) -> bool {
        let path = state::ledger_path(data_dir, &self.record.name);
        let file = self.ledger_file();
        let saved = file.save(&path);
        self.saved(&path, file, saved)
    }

    /// Takes the outcome of a save of `file` to `path` (alone, or in a batch); whether it
    /// succeeded.
    pub(super) fn saved(&mut self, path: &Path, file: LedgerFile, result: io::Result<()>) -> bool {
        match result {
            Ok(()) => {
                if let Some(e) = self.ledger_error.take() {
                    tracing::info!("{}: ledger saved again (after: {e})", self.record.name);
                }
                self.last_saved = Some(file);
                true
            }
            Err(e) => {
                // The temporary file is removed and the old ledger stays whole.
                if self.ledger_error.is_none() {
                    tracing::error!(
                        "{}: cannot save the ledger to {}: {e}; enforcing from memory until it can",
                        self.record.name,
                        path.display()
                    );
                }
                self.ledger_error = Some(format!("{}: {e}", path.display()));
                false
            }
        }
    }

    /// Writes the VM's one-value files and `credits.json` into its runtime dir (each only when
    /// its text changed), and its `config_error` file while an edit is bad.
    pub(super) fn publish(&mut self, state_dir: &Path) {
        self.last_publish = Instant::now();
        // A runtime dir that is gone (its VM ending) fails the writes below, which are then
        // tried again at the next publish: no stat of it each second.
        let dir = state_dir.join(&self.record.name);
        let v = self.view();
        let num = |x: Option<f64>, d: usize| x.map_or("null".to_owned(), |x| format!("{x:.d$}"));
        let values: [(&'static str, String); 8] = [
            ("balance", num(Some(v.balance), 3)),
            ("surplus", num(Some(v.surplus), 3)),
            ("charged", num(Some(v.charged), 3)),
            ("earn_per_hour", num(Some(v.earn_per_hour), 3)),
            ("usage_pct", num(v.usage_pct, 2)),
            ("grant_pct", num(v.grant_pct, 2)),
            ("time_to_empty_s", num(v.time_to_empty_s, 0)),
            (
                state::CREDITS_JSON,
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
            ),
        ];
        for (file, value) in values {
            if self.published.get(file) != Some(&value) {
                let text = if file == state::CREDITS_JSON {
                    value.clone()
                } else {
                    format!("{value}\n")
                };
                // A file written again (not for the first time) is likely to change every
                // second: it gets a kept pair; one that never changes keeps none.
                let again = self.published.contains_key(file);
                if self
                    .write_runtime(&dir, file, text.as_bytes(), again)
                    .is_ok()
                {
                    self.published.insert(file, value);
                }
            }
        }
        self.publish_config_error(&dir);
    }

    /// Rewrites the file `name` of the VM's runtime dir `dir` (see [`state::write_swapping`]):
    /// through its kept pair when it has one, else through the dir kept open, else by path; a
    /// file written with `pair` then gets a pair when the descriptor budget has room. A dir found
    /// gone lets go of its descriptors (it is opened again at the next write).
    fn write_runtime(
        &mut self,
        dir: &Path,
        name: &'static str,
        bytes: &[u8],
        pair: bool,
    ) -> io::Result<()> {
        if self.runtime.is_none() {
            self.runtime = Kept::open_spare(|| fs::File::open(dir));
        }
        let Some(d) = &self.runtime else {
            return state::write_swapping(&dir.join(name), bytes);
        };
        let d = d.as_fd();
        if let Some(p) = self.pairs.get_mut(name) {
            if p.write(d, name, bytes).is_ok() {
                return Ok(());
            }
            self.pairs.remove(name);
        }
        match state::write_swapping_at(d, name, bytes) {
            Ok(()) if pair => {
                if let Some(p) = state::SwapPair::open(d, name) {
                    self.pairs.insert(name, p);
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.runtime = None;
                self.pairs.clear();
                Err(e)
            }
            other => other,
        }
    }

    fn publish_config_error(&mut self, dir: &Path) {
        let error_file = dir.join(state::CONFIG_ERROR);
        let stale = self.stale.clone().unwrap_or_default();
        if self.published.get(state::CONFIG_ERROR) == Some(&stale) {
            return;
        }
        let done = match &self.stale {
            Some(why) => state::write_published(&error_file, format!("{why}\n").as_bytes()),
            None => match fs::remove_file(&error_file) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if done.is_ok() {
            self.published.insert(state::CONFIG_ERROR, stale);
        }
    }

    /// Records this tick in the history: a closed minute saves the history file, a closed
    /// 10-second sample rewrites the runtime dir's tail, so `plot` of a running VM is current to
    /// its last 10-second sample without a file-system sync every 10 s.
    /// Whether its history file is due (a minute closed): the agent saves the due ones together
    /// and then says so ([`Vm::history_saved`]).
    pub(super) fn record_history(&mut self, state_dir: &Path, now_s: u64) -> bool {
        let point = history_file::point(&self.ledger, self.usage, self.last_grant);
        let closed = self.history.record(now_s, point);
        if closed.fine {
            let tail: Vec<_> = self
                .history
                .fine()
                .samples()
                .filter(|s| s.t > self.history_saved_t)
                .copied()
                .collect();
            let dir = state_dir.join(&self.record.name);
            let bytes = history_file::encode_tail(&tail);
            if let Err(e) = self.write_runtime(&dir, HISTORY_TAIL, &bytes, false) {
                tracing::debug!("{}: writing {HISTORY_TAIL}: {e}", self.record.name);
            }
        }
        closed.minute
    }

    /// The history file holds every sample closed so far: the tail starts after them.
    pub(super) fn history_saved(&mut self) {
        self.history_saved_t = self.history.fine().samples().last().map_or(0, |s| s.t);
    }

    /// Saves the VM's history: at each closed minute, and (`close`) when it ends or the agent
    /// stops.
    pub(super) fn save_history(&mut self, data_dir: &Path, close: bool) {
        if close {
            self.history.flush();
        }
        let path = history_file::history_path(data_dir, &self.record.name);
        match history_file::save(&path, &self.history) {
            Ok(()) => self.history_saved(),
            Err(e) => tracing::error!("saving {}: {e}", path.display()),
        }
    }
}

/// The VM's saved history, or a new one (an unreadable file is kept as `.bad`).
pub(super) fn load_history(data_dir: &Path, name: &str) -> crate::history::History {
    let path = history_file::history_path(data_dir, name);
    history_file::load(&path)
        .unwrap_or_else(|e| {
            tracing::error!("{name}: unreadable history {e}; starting a new one (kept as .bad)");
            let _ = fs::rename(&path, path.with_extension("bqh.bad"));
            None
        })
        .unwrap_or_default()
}

/// The launch settings from the VM record, for a VM whose config file is unusable at adoption.
pub(super) fn fallback_config(r: &VmRecord) -> VmConfig {
    let policy = Baseline::from_percent(r.baseline)
        .and_then(|b| Policy::new(r.vcpus, b))
        .map(|p| p.with_mode(r.mode))
        .unwrap_or_else(|_| {
            Policy::new(
                r.vcpus.max(1),
                Baseline::from_percent(100.0).expect("valid"),
            )
            .expect("valid")
        });
    VmConfig {
        initial_credits: Policy::default_initial_credits(r.vcpus.max(1)),
        policy,
        credits: None,
        disk_share: None,
        cpus: None,
        memory: None,
    }
}

/// Each vCPU thread's CPU time now in `proc` (0 for a thread that is gone).
pub(super) fn read_cpu(proc: &Proc, r: &VmRecord) -> Vec<(u32, u64)> {
    r.vcpu_tids
        .iter()
        .map(|&t| (t, proc.thread_cpu_ns(r.pid, t).unwrap_or(0)))
        .collect()
}
