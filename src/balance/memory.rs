//! The balloon memory coordinator's mechanism: a thread of the agent that, every interval,
//! reads each memory-balanced VM's balloon and guest stats over QMP and the host's
//! MemAvailable, asks the pure planner ([`crate::balance::mem`]) for targets, sets them with
//! QMP `balloon`, and publishes `<state dir>/<name>/memory.json` for `burst-qemu mem`.
//!
//! It runs apart from the credit loop because QMP can block (a busy or dying QEMU answers
//! late, up to the timeout) and the credit tick must not wait for it. A launcher VM is reached
//! over the session the agent keeps on its agent monitor (shared with the disk worker); any
//! other VM gets a short session on its main socket per round, closed at once, so `pause` and
//! other clients (QEMU serves one at a time) get that monitor between rounds.
//!
//! Every VM is reached through its [`Control`] handle: QMP for burst-qemu's own VMs, the
//! libvirt API for libvirt domains (libvirt holds their monitor). Per VM and round: the stats
//! polling interval re-armed (1 s, as libvirt's coordinators do, since QEMU's timer stops when
//! the guest stops answering), the guest's figures and the balloon's size read; at adoption,
//! the boot size (the ceiling) and, for a VM not yet ballooned, the balloon set to
//! `memory_start`. Which VMs it balances, and
//! with which settings, it learns from the agent ([`Member`]s, updated whenever the agent adopts
//! a VM, lets one go or applies an edit): it reads no config file, so edits of `memory_*` apply
//! within one interval and a bad edit keeps the last good settings.
//!
//! Stale stats are never planned from: a VM's stats count only when the guest answered them
//! after the VM's last balloon move (QEMU stamps them with the second they arrived: stamped
//! later than the move) and at most [`STATS_MAX_AGE_S`](crate::control::STATS_MAX_AGE_S) before the round; otherwise the
//! planner leaves the VM alone that round.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::balance::mem::{self, Activity, Stats};
use crate::config::MemoryConfig;
use crate::control::{Control, ControlError};
use crate::state::VmRecord;

/// The file each memory-balanced VM's view is published in, in its runtime dir.
pub const MEMORY_JSON: &str = "memory.json";
/// How many intervals a VM may go without stats after adoption before it is shown as having no
/// balloon driver (at the default 2 s, 20 s: a Linux guest under TCG loads its driver within
/// a few seconds of boot).
pub const DRIVER_GRACE_ROUNDS: u32 = 10;

/// The coordinator's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MemorySettings {
    /// The planner's settings.
    pub planner: mem::Settings,
    /// How often the coordinator runs.
    pub interval: Duration,
    /// Where the host's MemAvailable is read (`/proc/meminfo`).
    pub meminfo: PathBuf,
    /// Append each round's planner input and output as a JSON line here (`--memory-trace`).
    pub trace: Option<PathBuf>,
}

/// What `burst-qemu mem` shows of a VM (`memory.json`); sizes MiB.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryView {
    /// The VM.
    pub name: String,
    /// `balanced`, `waiting` (no stats yet), `no-driver` (no stats after the grace period:
    /// left alone), or `error` (QMP failed this round).
    pub state: String,
    /// The policy in force.
    pub policy: String,
    /// The floor (`memory_min`).
    pub floor_mb: u64,
    /// The ceiling: boot size, or `memory_max` when lower.
    pub ceiling_mb: u64,
    /// Shares (`memory_shares`).
    pub shares: u64,
    /// The last balloon target set (`None` before any).
    pub target_mb: Option<u64>,
    /// The balloon's actual size (`query-balloon`).
    pub actual_mb: Option<u64>,
    /// The guest's unused memory (MemAvailable, `stat-available-memory`).
    pub unused_mb: Option<u64>,
    /// The guest's free memory (`stat-free-memory`).
    pub free_mb: Option<u64>,
    /// The guest's MemTotal (`stat-total-memory`).
    pub total_mb: Option<u64>,
    /// The smoothed active fraction (idle-tax's f).
    pub active_fraction: Option<f64>,
    /// ResCoin's allocation (`rescoin` policy only): what the VM should hold, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_mb: Option<u64>,
    /// Why the target last moved.
    pub last_change: Option<String>,
    /// The QMP error of this round, if any.
    pub error: Option<String>,
    /// Unix time of this view.
    pub at: f64,
}

/// The running coordinator; dropping it stops the thread.
pub struct Coordinator {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    settings: Arc<Mutex<MemorySettings>>,
}

impl Coordinator {
    /// Takes new settings (an edit of the agent's config file) from the next round on.
    pub fn update(&self, settings: MemorySettings) {
        tracing::info!("memory coordinator: {}", describe(&settings));
        if let Ok(mut s) = self.settings.lock() {
            *s = settings;
        }
    }
}

/// The settings as the agent's log shows them.
fn describe(s: &MemorySettings) -> String {
    format!(
        "{} policy, every {:?}, host reserve {} MiB{}{}",
        s.planner.policy,
        s.interval,
        s.planner.host_reserve,
        s.planner
            .pool
            .map_or(String::new(), |p| format!(", pool {p} MiB")),
        if s.planner.policy == mem::Policy::IdleTax {
            format!(", idle tax {} %", s.planner.tax * 100.0)
        } else {
            String::new()
        }
    )
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A VM the coordinator balances, with the memory settings in force.
#[derive(Clone)]
pub struct Member {
    /// The running VM.
    pub record: VmRecord,
    /// Its memory settings.
    pub config: MemoryConfig,
    /// How its balloon is reached.
    pub control: Arc<dyn Control>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("record", &self.record)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Starts the coordinator thread for the `members` of `state_dir` (the agent keeps the list
/// current).
pub fn spawn(
    state_dir: PathBuf,
    settings: MemorySettings,
    members: Arc<Mutex<Vec<Member>>>,
) -> Coordinator {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    tracing::info!("memory coordinator: {}", describe(&settings));
    let shared = Arc::new(Mutex::new(settings));
    let current = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("memory".into())
        .spawn(move || {
            let mut c = State::default();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                // The settings in force this round (the agent may have taken an edit).
                let Ok(settings) = current.lock().map(|s| s.clone()) else {
                    return;
                };
                let now = members.lock().map(|m| m.clone()).unwrap_or_default();
                c.round(&state_dir, &settings, &now);
                // Sleep in short slices so that a stopping agent is not held up.
                while started.elapsed() < settings.interval && !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .ok();
    Coordinator {
        stop,
        thread,
        settings: shared,
    }
}

/// One balanced VM, as the coordinator knows it between rounds.
struct Tracked {
    pid: u32,
    qemu_start: u64,
    adopted: Instant,
    balloon_path: Option<String>,
    boot_mb: u64,
    config: MemoryConfig,
    target: Option<u64>,
    /// When `target` was set.
    target_at: Instant,
    /// When the last balloon move was commanded, Unix seconds: stats stamped no later describe
    /// the VM before it.
    moved_unix: Option<f64>,
    /// The balloon's size in the previous round.
    last_actual: Option<u64>,
    /// (actual, MemTotal) in the previous round with stats.
    last_sample: Option<(u64, u64)>,
    /// actual − MemTotal, learned from two identical samples in a row: constant for a VM (the
    /// balloon driver takes inflated pages out of MemTotal), so stats that disagree with it
    /// describe another balloon size.
    overhead: Option<u64>,
    /// The guest's used memory (MemTotal − MemAvailable) in the last usable stats.
    last_used: Option<u64>,
    activity: Activity,
    last_change: Option<String>,
    /// ResCoin's last allocation (`rescoin` policy).
    allocation: Option<u64>,
    published: Option<MemoryView>,
}

#[derive(Default)]
struct State {
    vms: HashMap<String, Tracked>,
    /// ResCoin's state (estimates, accumulated credit), for the `rescoin` policy.
    rescoin: crate::balance::mem_rescoin::Rescoin,
}

/// One round's reading of a VM.
struct Reading {
    actual: Option<u64>,
    stats: Option<Stats>,
    /// When QEMU received `stats` from the guest (`last-update`), Unix seconds.
    stats_stamp: Option<i64>,
    error: Option<String>,
}

impl State {
    fn round(&mut self, state_dir: &Path, s: &MemorySettings, members: &[Member]) {
        self.forget_gone(state_dir, members);
        let (inputs, mut readings) = self.read_all(members, s);
        let host = host_available_mb(&s.meminfo);
        let targets = self.plan(s, &inputs, host);
        for target in &targets {
            let Some(m) = members.iter().find(|m| m.record.name == target.name) else {
                continue;
            };
            if let Err(e) = self.set(m.control.as_ref(), target, &inputs) {
                if let Some(r) = readings.get_mut(&target.name) {
                    r.error = Some(format!("balloon: {e}"));
                }
            }
        }
        if let Some(path) = &s.trace {
            trace(path, host, &inputs, &targets);
        }
        for (name, r) in readings {
            if let Some(t) = self.vms.get_mut(&name) {
                publish(state_dir, &name, t, &r, s);
            }
        }
    }

    /// Forgets the VMs that ended or are no longer balanced.
    fn forget_gone(&mut self, state_dir: &Path, members: &[Member]) {
        self.vms.retain(|name, t| {
            let kept = members.iter().any(|m| {
                &m.record.name == name
                    && m.record.pid == t.pid
                    && m.record.qemu_start == t.qemu_start
            });
            if !kept {
                tracing::info!(
                    "{name}: memory no longer balanced (the VM ended, or balance_memory is off)"
                );
                let _ = std::fs::remove_file(state_dir.join(name).join(MEMORY_JSON));
            }
            kept
        });
    }

    /// Adopts new members and reads every member's balloon and stats: the planner's inputs
    /// (VMs whose balloon answered) and each VM's reading.
    fn read_all(
        &mut self,
        members: &[Member],
        s: &MemorySettings,
    ) -> (Vec<mem::Vm>, HashMap<String, Reading>) {
        let mut inputs = Vec::new();
        let mut readings = HashMap::new();
        for Member {
            record,
            config,
            control,
        } in members
        {
            if !self.vms.contains_key(&record.name) {
                match adopt(record, control.as_ref(), config, s) {
                    Ok(t) => {
                        self.vms.insert(record.name.clone(), t);
                    }
                    Err(e) => {
                        tracing::warn!("{}: memory: cannot adopt yet: {e}", record.name);
                        continue;
                    }
                }
            }
            let Some(t) = self.vms.get_mut(&record.name) else {
                continue;
            };
            if &t.config != config {
                tracing::info!("{}: memory settings applied: {config:?}", record.name);
                t.config = config.clone();
            }
            let r = read(control.as_ref(), t);
            if let Some(actual) = r.actual {
                // Only stats the guest sent after the last balloon move (and recent: see
                // `parse_stats`) describe the VM as it is.
                let after_move = after_the_last_move(r.stats_stamp, t.moved_unix);
                let stats = r.stats.as_ref().filter(|_| after_move);
                inputs.push(observe(&record.name, t, actual, stats, s));
            }
            readings.insert(record.name.clone(), r);
        }
        (inputs, readings)
    }

    /// The policy's balloon targets (none when the host's memory cannot be read).
    fn plan(
        &mut self,
        s: &MemorySettings,
        inputs: &[mem::Vm],
        host: Option<u64>,
    ) -> Vec<mem::Target> {
        match host {
            Some(h) if !inputs.is_empty() && s.planner.policy == mem::Policy::Rescoin => {
                let (targets, allotted) = self.rescoin.plan(&s.planner, inputs, h);
                for (name, a) in allotted {
                    if let Some(t) = self.vms.get_mut(&name) {
                        t.allocation = Some(a.allocation);
                    }
                }
                targets
            }
            Some(h) if !inputs.is_empty() => mem::plan(&s.planner, inputs, h),
            None => {
                tracing::error!(
                    "memory: cannot read MemAvailable from {}: no balloon moves",
                    s.meminfo.display()
                );
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Sets one balloon target, unless it would undo a shrink still in flight.
    fn set(
        &mut self,
        control: &dyn Control,
        target: &mem::Target,
        inputs: &[mem::Vm],
    ) -> Result<(), ControlError> {
        let Some(t) = self.vms.get_mut(&target.name) else {
            return Ok(());
        };
        let actual = inputs
            .iter()
            .find(|v| v.name == target.name)
            .map_or(0, |v| v.actual);
        if t.target
            .is_some_and(|pending| pending <= target.target && target.target < actual)
        {
            // A shrink to above a shrink still in flight (a guest slow to inflate to
            // memory_start): it would undo part of it.
            return Ok(());
        }
        control.set_balloon(target.target)?;
        tracing::debug!(
            "{}: balloon {} MiB ({})",
            target.name,
            target.target,
            target.why
        );
        t.target = Some(target.target);
        t.target_at = Instant::now();
        t.moved_unix = Some(crate::base::unix_now_f64());
        t.last_change = Some(target.why.to_owned());
        Ok(())
    }
}

/// The planner's view of a VM whose balloon answered: its stats are used only when they
/// describe the balloon as it is (see [`settling`]).
fn observe(
    name: &str,
    t: &mut Tracked,
    actual: u64,
    stats: Option<&Stats>,
    s: &MemorySettings,
) -> mem::Vm {
    if let Some(st) = stats {
        if t.last_sample == Some((actual, st.total)) && actual >= st.total {
            t.overhead = Some(actual - st.total);
        }
        t.last_sample = Some((actual, st.total));
    }
    let stats = stats
        .filter(|st| !settling(t, actual, st, s.interval))
        .copied();
    t.last_actual = Some(actual);
    let used_before = t.last_used;
    if let Some(st) = &stats {
        t.activity.observe(st.used_fraction());
        t.last_used = Some(st.used());
    }
    let ceiling = t.config.max.map_or(t.boot_mb, |m| m.min(t.boot_mb));
    // A VM without usable stats this round is still counted (its memory is held), but the
    // planner leaves it alone.
    mem::Vm {
        name: name.to_owned(),
        floor: t.config.min.min(ceiling),
        ceiling,
        shares: t.config.shares,
        actual,
        stats,
        used_before,
        active: t.activity.value(),
    }
}

/// Whether stats stamped `stamp` (QEMU's `last-update`, whole Unix seconds, the second the
/// guest's answer arrived in) came after a balloon move commanded at `moved` (Unix seconds):
/// stamped in a later second than the move. Without a move yet, any stamp will do.
fn after_the_last_move(stamp: Option<i64>, moved: Option<f64>) -> bool {
    stamp.is_some_and(|u| moved.is_none_or(|m| u as f64 > m))
}

/// Whether a VM's balloon is still moving, so that planning from its size would undo the move
/// in flight (a slow inflation to `memory_start` read as unused memory), or its stats describe
/// another size: the last target is not reached yet and the balloon moved toward it since the
/// last round or was set less than 3 intervals ago (a guest that cannot inflate further must
/// not freeze its VM); or the stats are from another balloon size (the guest polls its stats on
/// its own clock: MemTotal disagrees with the balloon's size by more than the VM's constant
/// overhead, or is above it).
fn settling(t: &Tracked, actual: u64, stats: &Stats, interval: Duration) -> bool {
    let moving = t.target.is_some_and(|tg| {
        let progressed = t
            .last_actual
            .is_some_and(|last| tg.abs_diff(actual) + 4 < tg.abs_diff(last));
        tg.abs_diff(actual) > 16 && (progressed || t.target_at.elapsed() < 3 * interval)
    });
    let stale = t
        .overhead
        .is_some_and(|o| (actual as i64 - stats.total as i64 - o as i64).abs() > 8);
    moving || stale || stats.total > actual
}

fn adopt(
    record: &VmRecord,
    control: &dyn Control,
    cfg: &MemoryConfig,
    s: &MemorySettings,
) -> Result<Tracked, ControlError> {
    let probe = control.balloon_probe()?;
    let boot_mb = probe.boot_mb;
    let mut target = None;
    match (&probe.device, cfg.start) {
        (None, _) => tracing::warn!(
            "{}: memory balancing asked for, but QEMU has no virtio-balloon device",
            record.name
        ),
        // Boot at the ceiling, then down to memory_start — once: a VM already ballooned (an
        // agent restart) keeps its size.
        (Some(_), Some(start)) if probe.actual_mb == Some(boot_mb) && start < boot_mb => {
            control.set_balloon(start)?;
            target = Some(start);
        }
        _ => {}
    }
    tracing::info!(
        "{}: memory balanced ({} policy): boot {boot_mb} MiB, floor {} MiB, start {}, balloon {}",
        record.name,
        s.planner.policy,
        cfg.min,
        target.map_or("unchanged".to_owned(), |t| format!("{t} MiB")),
        probe.device.as_deref().unwrap_or("none")
    );
    Ok(Tracked {
        pid: record.pid,
        qemu_start: record.qemu_start,
        adopted: Instant::now(),
        balloon_path: probe.device,
        boot_mb,
        config: cfg.clone(),
        target,
        target_at: Instant::now(),
        moved_unix: target.map(|_| crate::base::unix_now_f64()),
        last_actual: None,
        last_sample: None,
        overhead: None,
        last_used: None,
        activity: Activity::default(),
        last_change: target.map(|_| "memory_start".to_owned()),
        allocation: None,
        published: None,
    })
}

fn read(control: &dyn Control, t: &Tracked) -> Reading {
    let mut r = Reading {
        actual: None,
        stats: None,
        stats_stamp: None,
        error: None,
    };
    let Some(device) = &t.balloon_path else {
        r.error = Some("no virtio-balloon device".into());
        return r;
    };
    match control.balloon_read(device) {
        Ok(reading) => {
            r.actual = Some(reading.actual_mb);
            r.stats = reading.guest.map(|g| Stats {
                free: g.free,
                available: g.available,
                total: g.total,
            });
            r.stats_stamp = reading.stamp;
        }
        Err(e) => r.error = Some(format!("{}: {}", e.what, e.why)),
    }
    r
}

/// The host's MemAvailable, MiB.
pub fn host_available_mb(meminfo: &Path) -> Option<u64> {
    crate::procfs::meminfo_available_mb(&std::fs::read_to_string(meminfo).ok()?)
}

fn publish(state_dir: &Path, name: &str, t: &mut Tracked, r: &Reading, s: &MemorySettings) {
    let ceiling = t.config.max.map_or(t.boot_mb, |m| m.min(t.boot_mb));
    let state = match (&r.error, &r.stats) {
        (Some(_), _) if t.balloon_path.is_some() => "error",
        (_, Some(_)) => "balanced",
        _ if t.balloon_path.is_none()
            || t.adopted.elapsed() >= DRIVER_GRACE_ROUNDS * s.interval =>
        {
            "no-driver"
        }
        _ => "waiting",
    };
    let view = MemoryView {
        name: name.to_owned(),
        state: state.into(),
        policy: s.planner.policy.to_string(),
        floor_mb: t.config.min,
        ceiling_mb: ceiling,
        shares: t.config.shares,
        target_mb: t.target,
        actual_mb: r.actual,
        unused_mb: r.stats.map(|x| x.available),
        free_mb: r.stats.map(|x| x.free),
        total_mb: r.stats.map(|x| x.total),
        active_fraction: r
            .stats
            .map(|_| (t.activity.value() * 1000.0).round() / 1000.0),
        allocation_mb: t.allocation,
        last_change: t.last_change.clone(),
        error: r.error.clone(),
        at: (crate::base::unix_now_f64() * 10.0).round() / 10.0,
    };
    if t.published.as_ref().map(|p| &p.state) != Some(&view.state) {
        tracing::info!(
            "{name}: memory {state}{}",
            match &view.error {
                Some(e) => format!(": {e}"),
                None => String::new(),
            }
        );
    }
    let dir = state_dir.join(name);
    if dir.is_dir() {
        let text = serde_json::to_string_pretty(&view).unwrap_or_default() + "\n";
        let _ = crate::state::write_published(&dir.join(MEMORY_JSON), text.as_bytes());
    }
    t.published = Some(view);
}

/// One round of the coordinator, as `--memory-trace` records it (a JSON line); replayed by the
/// planner's tests.
#[derive(Debug, Serialize, Deserialize)]
pub struct TraceLine {
    /// Unix time.
    pub at: f64,
    /// The host's MemAvailable, MiB.
    pub host_available: Option<u64>,
    /// The planner's input.
    pub vms: Vec<mem::Vm>,
    /// Its output.
    pub targets: Vec<mem::Target>,
}

fn trace(path: &Path, host: Option<u64>, vms: &[mem::Vm], targets: &[mem::Target]) {
    let line = serde_json::json!({
        "at": (crate::base::unix_now_f64() * 10.0).round() / 10.0,
        "host_available": host,
        "vms": vms,
        "targets": targets,
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        tracing::warn!("memory trace {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stats_stamped_after_the_last_move_count() {
        // Moved at 1000.4: an answer stamped 1000 may have arrived at 1000.1, before it.
        assert!(!after_the_last_move(Some(1000), Some(1000.4)));
        assert!(!after_the_last_move(Some(999), Some(1000.4)));
        assert!(after_the_last_move(Some(1001), Some(1000.4)));
        // Moved exactly at a second's start: stamped that second may still be older.
        assert!(!after_the_last_move(Some(1000), Some(1000.0)));
        assert!(after_the_last_move(Some(5), None));
        assert!(!after_the_last_move(None, None));
    }

    fn tracked(target: u64, set_ago: Duration, last_actual: Option<u64>) -> Tracked {
        Tracked {
            pid: 1,
            qemu_start: 1,
            adopted: Instant::now(),
            balloon_path: Some("/machine/peripheral/balloon0".into()),
            boot_mb: 1024,
            config: MemoryConfig {
                min: 200,
                max: None,
                start: Some(384),
                shares: 1000,
            },
            target: Some(target),
            target_at: Instant::now().checked_sub(set_ago).unwrap(),
            moved_unix: None,
            last_actual,
            last_sample: None,
            overhead: Some(40),
            last_used: None,
            activity: Activity::default(),
            last_change: None,
            allocation: None,
            published: None,
        }
    }

    #[test]
    fn a_balloon_on_its_way_is_not_planned_from() {
        let i = Duration::from_secs(2);
        let st = |total| Stats {
            free: 500,
            available: 500,
            total,
        };
        // Just set, or still moving toward its target: settling.
        assert!(settling(
            &tracked(384, Duration::ZERO, None),
            1000,
            &st(900),
            i
        ));
        assert!(settling(
            &tracked(384, 30 * i, Some(1010)),
            900,
            &st(860),
            i
        ));
        // Stuck for long (a guest that cannot inflate): planned from where it is.
        assert!(!settling(
            &tracked(384, 30 * i, Some(900)),
            900,
            &st(860),
            i
        ));
        // Reached: planned.
        assert!(!settling(
            &tracked(384, Duration::ZERO, Some(390)),
            390,
            &st(350),
            i
        ));
        // Stats from before an inflation (MemTotal above the balloon's size), or from another
        // size (MemTotal off the VM's overhead of 40 MiB).
        assert!(settling(&tracked(384, 30 * i, Some(384)), 384, &st(900), i));
        assert!(settling(&tracked(384, 30 * i, Some(384)), 384, &st(300), i));
    }

    #[test]
    fn host_memavailable_is_read_from_meminfo() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meminfo");
        std::fs::write(
            &p,
            "MemTotal: 24000000 kB\nMemFree: 1 kB\nMemAvailable:   2048000 kB\n",
        )
        .unwrap();
        assert_eq!(host_available_mb(&p), Some(2000));
        std::fs::write(&p, "MemTotal: 1 kB\n").unwrap();
        assert_eq!(host_available_mb(&p), None);
    }
}
