//! The balloon memory coordinator's mechanism: a thread of the agent that, every interval,
//! reads each memory-balanced VM's balloon and guest stats over QMP and the host's
//! MemAvailable, asks the pure planner ([`crate::balance::mem`]) for targets, sets them with
//! QMP `balloon`, and publishes `<state dir>/<name>/memory.json` for `burst-qemu mem`.
//!
//! It runs apart from the credit loop because QMP can block (a busy or dying QEMU answers
//! late, up to the timeout) and the credit tick must not wait for it. Each round opens one
//! short QMP session per VM and closes it, so `ls`, `pause` and other clients (QEMU serves one
//! at a time) get the monitor between rounds.
//!
//! Per VM and round: `qom-set guest-stats-polling-interval` (re-armed every round, as libvirt's
//! coordinators do, since QEMU's timer stops when the guest stops answering), `qom-get
//! guest-stats`, `query-balloon`; at adoption, `query-memory-size-summary` (the boot size, the
//! ceiling) and, for a VM not yet ballooned, `balloon memory_start`. Which VMs it balances, and
//! with which settings, it learns from the agent ([`Member`]s, updated whenever the agent adopts
//! a VM, lets one go or applies an edit): it reads no config file, so edits of `memory_*` apply
//! within one interval and a bad edit keeps the last good settings.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::balance::mem::{self, Activity, Stats, MIB};
use crate::config::MemoryConfig;
use crate::state::VmRecord;

/// The file each memory-balanced VM's view is published in, in its runtime dir.
pub const MEMORY_JSON: &str = "memory.json";
/// How many intervals a VM may go without stats after adoption before it is shown as having no
/// balloon driver (at the default 2 s, 20 s: a Linux guest under TCG loads its driver within
/// a few seconds of boot).
pub const DRIVER_GRACE_ROUNDS: u32 = 10;
/// How long one QMP answer may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// The coordinator's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MemorySettings {
    /// The planner's settings.
    pub planner: mem::Settings,
    /// How often the coordinator runs (and the guest's stats polling interval).
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
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// The running VM.
    pub record: VmRecord,
    /// Its memory settings.
    pub config: MemoryConfig,
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
    /// The balloon's size in the previous round.
    last_actual: Option<u64>,
    /// (actual, MemTotal) in the previous round with stats.
    last_sample: Option<(u64, u64)>,
    /// actual − MemTotal, learned from two identical samples in a row: constant for a VM (the
    /// balloon driver takes inflated pages out of MemTotal), so stats that disagree with it
    /// describe another balloon size.
    overhead: Option<u64>,
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
            if let Err(e) = self.set(&m.record, target, &inputs) {
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
        for Member { record, config } in members {
            if !self.vms.contains_key(&record.name) {
                match adopt(record, config, s) {
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
            let r = read(record, t, s);
            if let Some(actual) = r.actual {
                inputs.push(observe(&record.name, t, actual, r.stats.as_ref(), s));
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
        record: &VmRecord,
        target: &mem::Target,
        inputs: &[mem::Vm],
    ) -> Result<(), qmp::Error> {
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
        set_target(record, target.target)?;
        tracing::debug!(
            "{}: balloon {} MiB ({})",
            target.name,
            target.target,
            target.why
        );
        t.target = Some(target.target);
        t.target_at = Instant::now();
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
    if let Some(st) = &stats {
        t.activity.observe(st.used_fraction());
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
        active: t.activity.value(),
    }
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

fn qmp(record: &VmRecord) -> Result<qmp::Client, qmp::Error> {
    qmp::Client::connect(&record.qmp_socket, QMP_TIMEOUT)
}

fn adopt(record: &VmRecord, cfg: &MemoryConfig, s: &MemorySettings) -> Result<Tracked, qmp::Error> {
    let mut c = qmp(record)?;
    let boot = c.execute(qmp::qapi::qmp::query_memory_size_summary {})?;
    let boot_mb = boot.base_memory / MIB;
    let balloon_path = find_balloon(&mut c);
    let actual = c
        .execute(qmp::qapi::qmp::query_balloon {})
        .map(|b| b.actual.max(0) as u64 / MIB)
        .ok();
    let mut target = None;
    match (&balloon_path, cfg.start) {
        (None, _) => tracing::warn!(
            "{}: memory balancing asked for, but QEMU has no virtio-balloon device",
            record.name
        ),
        // Boot at the ceiling, then down to memory_start — once: a VM already ballooned (an
        // agent restart) keeps its size.
        (Some(_), Some(start)) if actual == Some(boot_mb) && start < boot_mb => {
            c.execute(qmp::qapi::qmp::balloon {
                value: (start * MIB) as i64,
            })?;
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
        balloon_path.as_deref().unwrap_or("none")
    );
    Ok(Tracked {
        pid: record.pid,
        qemu_start: record.qemu_start,
        adopted: Instant::now(),
        balloon_path,
        boot_mb,
        config: cfg.clone(),
        target,
        target_at: Instant::now(),
        last_actual: None,
        last_sample: None,
        overhead: None,
        activity: Activity::default(),
        last_change: target.map(|_| "memory_start".to_owned()),
        allocation: None,
        published: None,
    })
}

/// The QOM path of the VM's virtio-balloon device, if it has one.
fn find_balloon(c: &mut qmp::Client) -> Option<String> {
    for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let Ok(children) = c.execute(qmp::qapi::qmp::qom_list {
            path: parent.into(),
        }) else {
            continue;
        };
        for child in children {
            if child.type_.starts_with("child<virtio-balloon") {
                return Some(format!("{parent}/{}", child.name));
            }
        }
    }
    None
}

fn read(record: &VmRecord, t: &Tracked, s: &MemorySettings) -> Reading {
    let mut r = Reading {
        actual: None,
        stats: None,
        error: None,
    };
    let Some(path) = &t.balloon_path else {
        r.error = Some("no virtio-balloon device".into());
        return r;
    };
    let result = qmp(record).and_then(|mut c| {
        c.execute(qmp::qapi::qmp::qom_set {
            path: path.clone(),
            property: "guest-stats-polling-interval".into(),
            value: Value::from(s.interval.as_secs().max(1)),
        })?;
        let stats = c.execute(qmp::qapi::qmp::qom_get {
            path: path.clone(),
            property: "guest-stats".into(),
        })?;
        let actual = c.execute(qmp::qapi::qmp::query_balloon {})?;
        Ok((stats, actual.actual))
    });
    match result {
        Ok((stats, actual)) => {
            r.actual = Some(actual.max(0) as u64 / MIB);
            r.stats = parse_stats(&stats, crate::base::unix_now_f64(), s.interval);
        }
        Err(e) => r.error = Some(e.to_string()),
    }
    r
}

/// The guest's stats from `qom-get guest-stats`, MiB; `None` while the guest has not answered
/// (`last-update` 0), when it stopped answering (3 intervals and 5 s behind `now`), or when a
/// stat the planner needs is −1 (unsupported: QEMU sends −1, or 2⁶⁴−1 read unsigned).
pub fn parse_stats(v: &Value, now: f64, interval: Duration) -> Option<Stats> {
    let updated = v.get("last-update")?.as_i64()?;
    if updated <= 0 || now - updated as f64 > 3.0 * interval.as_secs_f64() + 5.0 {
        return None;
    }
    let stat = |k: &str| {
        let x = v.get("stats")?.get(k)?;
        x.as_i64()
            .filter(|&n| n >= 0)
            .map(|n| n as u64)
            .or_else(|| x.as_u64().filter(|&n| n < 1 << 62))
            .map(|b| b / MIB)
    };
    Some(Stats {
        free: stat("stat-free-memory")?,
        available: stat("stat-available-memory")?,
        total: stat("stat-total-memory")?,
    })
}

fn set_target(record: &VmRecord, target_mb: u64) -> Result<(), qmp::Error> {
    qmp(record)?
        .execute(qmp::qapi::qmp::balloon {
            value: (target_mb * MIB) as i64,
        })
        .map(drop)
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
    fn guest_stats_are_read_in_mib_and_minus_one_is_no_stats() {
        let v = serde_json::json!({
            "stats": {
                "stat-free-memory": 300u64 << 20,
                "stat-available-memory": 400u64 << 20,
                "stat-total-memory": 1000u64 << 20,
                "stat-swap-in": -1,
            },
            "last-update": 1000,
        });
        let s = parse_stats(&v, 1001.0, Duration::from_secs(2)).unwrap();
        assert_eq!((s.free, s.available, s.total), (300, 400, 1000));
        // Stale (the guest stopped answering) or never answered.
        assert_eq!(parse_stats(&v, 1012.0, Duration::from_secs(2)), None);
        let mut never = v.clone();
        never["last-update"] = 0.into();
        assert_eq!(parse_stats(&never, 1.0, Duration::from_secs(2)), None);
        let mut minus = v.clone();
        minus["stats"]["stat-available-memory"] = (-1).into();
        assert_eq!(parse_stats(&minus, 1001.0, Duration::from_secs(2)), None);
        minus["stats"]["stat-available-memory"] = u64::MAX.into();
        assert_eq!(parse_stats(&minus, 1001.0, Duration::from_secs(2)), None);
        assert_eq!(
            parse_stats(&serde_json::json!("garbage"), 1.0, Duration::from_secs(2)),
            None
        );
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
            last_actual,
            last_sample: None,
            overhead: Some(40),
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
