//! A running VM's control handle: the operations burst-qemu performs on a VM beyond its
//! threads and cgroups — its run state, pause and resume, pinning a vCPU, the balloon and the
//! guest's memory figures. One trait, two implementations:
//!
//! | VM | implementation | how |
//! |---|---|---|
//! | launched, adopted with `--qmp` | [`Qmp`] | for the agent, one session kept on a launcher VM's agent monitor ([`Qmp::for_agent`]); otherwise a short QMP session per call on the VM's main socket; pins with `sched_setaffinity` (QEMU has no pin command) |
//! | libvirt domain | `source::libvirt::control` (feature `libvirt`) | the libvirt API: libvirt holds the domain's monitor, and a pin must go through it so that `virsh vcpupin` agrees |
//!
//! The agent keeps no session on a VM's main socket: QEMU serves one client per monitor, so a
//! kept session there would lock out `pause`, `resume`, the launcher and the operator's tools.
//! The launcher gives QEMU a monitor of the agent's own instead (`ag.sock`, see
//! `launch`); docs/agent.md ("QMP: how the agent reaches QEMU") has the failure cases and the
//! measured saving.
//!
//! The balancers and the CLI hold a `dyn Control` and never ask where a VM comes from. The
//! trait sits below the balancers (they call it) and above the sources (libvirt implements it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::state::VmRecord;

/// 1 MiB in bytes.
const MIB: u64 = 1 << 20;
/// How long one QMP answer may take.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest's stats polling interval, seconds (QEMU, or libvirt, asks the balloon driver this
/// often).
pub const STATS_POLL_S: u64 = 1;
/// Figures stamped more than this many seconds before they are read are stale: the guest
/// answers every [`STATS_POLL_S`], and QEMU stamps in whole seconds.
pub const STATS_MAX_AGE_S: i64 = 3;

/// A control operation that failed: what was done, on which VM, and why.
#[derive(Debug, Error)]
#[error("{vm}: {what}: {why}")]
pub struct ControlError {
    /// The VM.
    pub vm: String,
    /// The operation (`query-balloon`, `virDomainPinVcpuFlags`, …).
    pub what: String,
    /// The cause as its layer printed it.
    pub why: String,
}

impl ControlError {
    /// An error of `what` on `vm`.
    pub fn new(vm: &str, what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        ControlError {
            vm: vm.to_owned(),
            what: what.into(),
            why: why.to_string(),
        }
    }
}

/// A VM's balloon as found when the memory coordinator takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonProbe {
    /// The boot size (the most the balloon can give), MiB.
    pub boot_mb: u64,
    /// The balloon device (its QOM path over QMP; `memballoon` through libvirt); `None`: the
    /// VM has none.
    pub device: Option<String>,
    /// The balloon's size now, MiB.
    pub actual_mb: Option<u64>,
}

/// The guest's own memory figures, MiB, as its balloon driver reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMemory {
    /// MemFree.
    pub free: u64,
    /// MemAvailable.
    pub available: u64,
    /// MemTotal.
    pub total: u64,
}

/// One reading of a VM's balloon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonReading {
    /// The balloon's size, MiB.
    pub actual_mb: u64,
    /// The guest's figures; `None` while it has not reported (no driver yet, or stale).
    pub guest: Option<GuestMemory>,
    /// When the guest's figures arrived (QEMU's `last-update`), whole Unix seconds.
    pub stamp: Option<i64>,
}

/// What burst-qemu does to a running VM besides enforcing its grant.
pub trait Control: Send + Sync {
    /// `running`, `paused`, or another run state of QEMU's or libvirt's.
    fn run_state(&self) -> Result<String, ControlError>;
    /// Stops the vCPUs.
    fn pause(&self) -> Result<(), ControlError>;
    /// Lets them run again.
    fn resume(&self) -> Result<(), ControlError>;
    /// Pins vCPU `vcpu` (thread `tid`) to host CPU `cpu`.
    fn pin_vcpu(&self, vcpu: u32, tid: u32, cpu: u32) -> Result<(), ControlError>;
    /// The balloon and the boot size.
    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError>;
    /// Asks the guest for its figures every [`STATS_POLL_S`] (re-armed on each call: QEMU's
    /// timer stops when the guest stops answering) and reads the balloon and the latest
    /// figures.
    fn balloon_read(&self, device: &str) -> Result<BalloonReading, ControlError>;
    /// Sets the balloon's target, MiB.
    fn set_balloon(&self, mb: u64) -> Result<(), ControlError>;
}

/// A step of a QMP conversation that failed: the command, and why.
pub type Step<T> = Result<T, (&'static str, qmp::Error)>;

/// Runs `command` on `c`, naming it in the failure.
pub fn step<C: qmp::qapi::Command>(c: &mut qmp::Client, command: C) -> Step<C::Ok> {
    c.execute(command).map_err(|e| (C::NAME, e))
}

/// A QMP error with its cause (`Connection refused`, …), which its own message leaves out.
pub fn qmp_why(e: &qmp::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A VM controlled through QMP (burst-qemu's own VMs, adopted QEMUs), in one of two ways:
///
/// * **Per use** ([`Qmp::new`], and [`Qmp::for_agent`] of a VM without an agent monitor): each
///   call opens a session on the VM's main socket (greeting, `qmp_capabilities`, commands) and
///   closes it, so the monitor is free between calls for `pause`, `resume`, the launcher and the
///   operator's tools (QEMU serves one client per monitor).
/// * **Kept** ([`Qmp::for_agent`] of a VM with `agent_socket`): one session on the agent's own
///   monitor, opened at first use and kept for the VM's life, shared by the threads that hold
///   the handle (the disk and memory workers) one conversation at a time. A kept session that
///   QEMU closed, or that broke, is dropped; a call that finds it closed opens a new one and
///   runs once more on it (every conversation is idempotent: reads, and absolute settings).
///   QEMU's events, which every monitor gets, are read with the answers and dropped.
#[derive(Debug)]
pub struct Qmp {
    name: String,
    /// The QEMU: its pid and start time (0, 0 when not known).
    qemu: (u32, u64),
    socket: PathBuf,
    kept: Option<Kept>,
}

/// A kept session and the agent monitor it is on.
#[derive(Debug)]
struct Kept {
    socket: PathBuf,
    session: Mutex<Option<qmp::Client>>,
    connects: AtomicU64,
}

impl Qmp {
    /// A per-use handle on `record`'s main socket (the CLI's).
    pub fn new(record: &VmRecord) -> Qmp {
        Qmp {
            qemu: (record.pid, record.qemu_start),
            ..Qmp::per_use(&record.name, &record.qmp_socket)
        }
    }

    /// A per-use handle on `socket`, for VM `name`.
    pub fn per_use(name: &str, socket: &Path) -> Qmp {
        Qmp {
            name: name.to_owned(),
            qemu: (0, 0),
            socket: socket.to_owned(),
            kept: None,
        }
    }

    /// The agent's handle of `record`'s VM: a kept session on its agent monitor when it has
    /// one, else per use on the main socket.
    pub fn for_agent(record: &VmRecord) -> Qmp {
        Qmp {
            kept: record.agent_socket.as_ref().map(|socket| Kept {
                socket: socket.clone(),
                session: Mutex::new(None),
                connects: AtomicU64::new(0),
            }),
            ..Qmp::new(record)
        }
    }

    /// Whether this is [`Qmp::for_agent`]'s handle of `record`'s QEMU (a VM adopted again, as
    /// the same QEMU, keeps its handle and session).
    pub fn serves(&self, record: &VmRecord) -> bool {
        self.qemu == (record.pid, record.qemu_start)
            && self.socket == record.qmp_socket
            && self.kept.as_ref().map(|k| &k.socket) == record.agent_socket.as_ref()
    }

    /// Whether calls go through a kept session on the agent monitor.
    pub fn keeps_session(&self) -> bool {
        self.kept.is_some()
    }

    /// How many sessions this handle opened on the agent monitor.
    pub fn connections(&self) -> u64 {
        self.kept
            .as_ref()
            .map_or(0, |k| k.connects.load(Ordering::Relaxed))
    }

    fn connect(&self, socket: &Path) -> Result<qmp::Client, ControlError> {
        if socket.as_os_str().is_empty() {
            return Err(ControlError::new(
                &self.name,
                "QMP",
                "no QMP socket is known for this VM (adopt --qmp names one)",
            ));
        }
        qmp::Client::connect(socket, QMP_TIMEOUT).map_err(|e| {
            ControlError::new(
                &self.name,
                format!("connecting to {}", socket.display()),
                qmp_why(&e),
            )
        })
    }

    /// Runs the conversation `f` on a session: the kept one (opened when there is none, and
    /// opened again once when QEMU had closed it), or a new one for this call. Each command
    /// waits at most [`QMP_TIMEOUT`]; a thread waits for another's conversation to end.
    pub fn converse<T>(
        &self,
        mut f: impl FnMut(&mut qmp::Client) -> Step<T>,
    ) -> Result<T, ControlError> {
        let fail = |(what, e): (&str, qmp::Error)| ControlError::new(&self.name, what, qmp_why(&e));
        let Some(kept) = &self.kept else {
            return f(&mut self.connect(&self.socket)?).map_err(fail);
        };
        let mut session = kept.session.lock().unwrap_or_else(|poisoned| {
            // A conversation panicked midway: its session is in an unknown state.
            kept.session.clear_poison();
            let mut s = poisoned.into_inner();
            *s = None;
            s
        });
        let mut retried = false;
        loop {
            let fresh = session.is_none();
            let client = match session.as_mut() {
                Some(c) => c,
                None => {
                    let c = self.connect(&kept.socket)?;
                    let n = kept.connects.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(
                        "{}: connected to its agent monitor {} (connection {n})",
                        self.name,
                        kept.socket.display()
                    );
                    session.insert(c)
                }
            };
            let result = f(client);
            client.take_events();
            let Err((what, e)) = result else {
                return result.map_err(fail);
            };
            // A refusal leaves the session as it was; a timeout too (a late answer is known by
            // its id and dropped). Anything else leaves it unusable.
            if matches!(e, qmp::Error::Qmp { .. } | qmp::Error::Timeout { .. }) {
                return Err(fail((what, e)));
            }
            *session = None;
            let closed = matches!(e, qmp::Error::Closed(_) | qmp::Error::Io { .. });
            if fresh || retried || !closed {
                return Err(fail((what, e)));
            }
            tracing::info!(
                "{}: its agent monitor session ended ({}); connecting again",
                self.name,
                qmp_why(&e)
            );
            retried = true;
        }
    }

    fn execute<C: qmp::qapi::Command + Clone>(&self, command: C) -> Result<C::Ok, ControlError> {
        self.converse(|c| step(c, command.clone()))
    }
}

impl Control for Qmp {
    fn run_state(&self) -> Result<String, ControlError> {
        Ok(run_state_name(
            &self.execute(qmp::qapi::qmp::query_status {})?,
        ))
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.execute(qmp::qapi::qmp::stop {}).map(drop)
    }

    fn resume(&self) -> Result<(), ControlError> {
        self.execute(qmp::qapi::qmp::cont {}).map(drop)
    }

    fn pin_vcpu(&self, vcpu: u32, tid: u32, cpu: u32) -> Result<(), ControlError> {
        crate::procfs::set_affinity(tid, &[cpu]).map_err(|e| {
            ControlError::new(
                &self.name,
                format!("sched_setaffinity of vCPU {vcpu} (thread {tid})"),
                e,
            )
        })
    }

    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError> {
        self.converse(|c| {
            let boot = step(c, qmp::qapi::qmp::query_memory_size_summary {})?;
            let device = find_balloon(c)?;
            let actual_mb = refused_as_none(step(c, qmp::qapi::qmp::query_balloon {}))?
                .map(|b| b.actual.max(0) as u64 / MIB);
            Ok(BalloonProbe {
                boot_mb: boot.base_memory / MIB,
                device,
                actual_mb,
            })
        })
    }

    fn balloon_read(&self, device: &str) -> Result<BalloonReading, ControlError> {
        self.converse(|c| {
            c.execute(qmp::qapi::qmp::qom_set {
                path: device.to_owned(),
                property: "guest-stats-polling-interval".into(),
                value: Value::from(STATS_POLL_S),
            })
            .map_err(|e| ("qom-set guest-stats-polling-interval", e))?;
            let stats = c
                .execute(qmp::qapi::qmp::qom_get {
                    path: device.to_owned(),
                    property: "guest-stats".into(),
                })
                .map_err(|e| ("qom-get guest-stats", e))?;
            let actual = step(c, qmp::qapi::qmp::query_balloon {})?;
            Ok(BalloonReading {
                actual_mb: actual.actual.max(0) as u64 / MIB,
                guest: parse_guest_stats(&stats, crate::base::unix_now_f64()),
                stamp: stats.get("last-update").and_then(Value::as_i64),
            })
        })
    }

    fn set_balloon(&self, mb: u64) -> Result<(), ControlError> {
        self.execute(qmp::qapi::qmp::balloon {
            value: (mb * MIB) as i64,
        })
        .map(drop)
    }
}

/// QEMU's refusal as `None` (a device it does not have); a failed conversation stays an error.
fn refused_as_none<T>(r: Step<T>) -> Step<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err((_, qmp::Error::Qmp { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `running`, or QEMU's name of the state it is in (`paused`, `shutdown`, `suspended`, …), from
/// a `query-status` answer.
pub fn run_state_name(s: &qmp::qapi::qmp::StatusInfo) -> String {
    if s.running {
        return "running".into();
    }
    serde_json::to_value(s.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "paused".into())
}

/// The QOM path of the VM's virtio-balloon device, if it has one.
fn find_balloon(c: &mut qmp::Client) -> Step<Option<String>> {
    for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let listed = step(
            c,
            qmp::qapi::qmp::qom_list {
                path: parent.into(),
            },
        );
        let Some(children) = refused_as_none(listed)? else {
            continue;
        };
        for child in children {
            if child.type_.starts_with("child<virtio-balloon") {
                return Ok(Some(format!("{parent}/{}", child.name)));
            }
        }
    }
    Ok(None)
}

/// Whether figures the guest stamped at `updated` (Unix seconds) are fresh at `now`: the guest
/// has answered at all (`updated` > 0), at most [`STATS_MAX_AGE_S`] before `now`.
pub fn fresh(updated: i64, now: f64) -> bool {
    updated > 0 && now - updated as f64 <= STATS_MAX_AGE_S as f64
}

/// The guest's figures from `qom-get guest-stats`, MiB; `None` while the guest has not
/// answered (`last-update` 0), when it stopped answering (see [`fresh`]), or when a figure is
/// −1 (unsupported: QEMU sends −1, or 2⁶⁴−1 read unsigned).
pub fn parse_guest_stats(v: &Value, now: f64) -> Option<GuestMemory> {
    let updated = v.get("last-update")?.as_i64()?;
    if !fresh(updated, now) {
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
    Some(GuestMemory {
        free: stat("stat-free-memory")?,
        available: stat("stat-available-memory")?,
        total: stat("stat-total-memory")?,
    })
}

/// A handle whose every operation fails with `why` (a libvirt VM in a build without libvirt,
/// a connection that cannot be opened).
#[derive(Clone, Debug)]
pub struct Unavailable {
    /// The VM.
    pub name: String,
    /// Why it cannot be controlled.
    pub why: String,
}

impl Unavailable {
    fn fail<T>(&self, what: &str) -> Result<T, ControlError> {
        Err(ControlError::new(&self.name, what, &self.why))
    }
}

impl Control for Unavailable {
    fn run_state(&self) -> Result<String, ControlError> {
        self.fail("run state")
    }
    fn pause(&self) -> Result<(), ControlError> {
        self.fail("pause")
    }
    fn resume(&self) -> Result<(), ControlError> {
        self.fail("resume")
    }
    fn pin_vcpu(&self, _: u32, _: u32, _: u32) -> Result<(), ControlError> {
        self.fail("pin")
    }
    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError> {
        self.fail("balloon")
    }
    fn balloon_read(&self, _: &str) -> Result<BalloonReading, ControlError> {
        self.fail("balloon")
    }
    fn set_balloon(&self, _: u64) -> Result<(), ControlError> {
        self.fail("balloon")
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
        let s = parse_guest_stats(&v, 1001.0).unwrap();
        assert_eq!((s.free, s.available, s.total), (300, 400, 1000));
        // Stale: stamped more than 3 s before the round (the guest stopped answering its
        // 1-second polls), or never answered.
        assert!(parse_guest_stats(&v, 1003.0).is_some());
        assert_eq!(parse_guest_stats(&v, 1003.5), None);
        let mut never = v.clone();
        never["last-update"] = 0.into();
        assert_eq!(parse_guest_stats(&never, 1.0), None);
        let mut minus = v.clone();
        minus["stats"]["stat-available-memory"] = (-1).into();
        assert_eq!(parse_guest_stats(&minus, 1001.0), None);
        minus["stats"]["stat-available-memory"] = u64::MAX.into();
        assert_eq!(parse_guest_stats(&minus, 1001.0), None);
        assert_eq!(parse_guest_stats(&serde_json::json!("garbage"), 1.0), None);
        assert!(!fresh(996, 1000.0) && fresh(997, 1000.0));
    }

    /// A fake QEMU monitor on `path`: greets each client, answers `qmp_capabilities` and
    /// `query-status` (with a `STOP` event before each answer), and closes a session after
    /// `per_session` answers to `query-status` (0: never); it answers nothing at all while
    /// `mute` is set. Returns the number of sessions it accepted.
    fn fake_monitor(
        path: &Path,
        per_session: usize,
        mute: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::sync::Arc<AtomicU64> {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let sessions = std::sync::Arc::new(AtomicU64::new(0));
        let counted = std::sync::Arc::clone(&sessions);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut out) = stream else { return };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut lines = BufReader::new(out.try_clone().unwrap()).lines();
                let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
                let _ = writeln!(out, "{greeting}");
                let mut answered = 0;
                while let Some(Ok(line)) = lines.next() {
                    if mute.load(Ordering::SeqCst) {
                        continue;
                    }
                    let cmd: Value = serde_json::from_str(&line).unwrap();
                    let id = &cmd["id"];
                    if cmd["execute"] == "query-status" {
                        let _ = writeln!(
                            out,
                            r#"{{"event": "STOP", "data": {{}}, "timestamp": {{"seconds": 1, "microseconds": 0}}}}"#
                        );
                        let _ = writeln!(
                            out,
                            r#"{{"return": {{"status": "running", "singlestep": false, "running": true}}, "id": {id}}}"#
                        );
                        answered += 1;
                        if answered == per_session {
                            break;
                        }
                    } else {
                        let _ = writeln!(out, r#"{{"return": {{}}, "id": {id}}}"#);
                    }
                }
            }
        });
        sessions
    }

    fn kept(dir: &Path) -> Qmp {
        Qmp::for_agent(&VmRecord {
            name: "vm".into(),
            pid: 1,
            wrapper_pid: 1,
            vcpus: 1,
            baseline: 100.0,
            mode: Default::default(),
            vcpu_tids: vec![],
            config: dir.join("vm.toml"),
            qmp_socket: dir.join("qmp.sock"),
            qemu_start: 0,
            boot_id: String::new(),
            source: Default::default(),
            agent_socket: Some(dir.join("ag.sock")),
        })
    }

    #[test]
    fn a_kept_session_is_reused_across_threads_and_opened_again_once_when_qemu_closed_it() {
        let dir = tempfile::tempdir().unwrap();
        let mute = std::sync::Arc::default();
        // QEMU closes each session after 50 answers.
        let sessions = fake_monitor(&dir.path().join("ag.sock"), 50, mute);
        let h = std::sync::Arc::new(kept(dir.path()));
        assert!(h.keeps_session());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let h = std::sync::Arc::clone(&h);
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        assert_eq!(h.run_state().unwrap(), "running");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((h.connections(), sessions.load(Ordering::SeqCst)), (1, 1));
        // The 50th answer ends the session; the 51st call finds it closed, opens a new one
        // and succeeds on it.
        for _ in 0..11 {
            assert_eq!(h.run_state().unwrap(), "running");
        }
        assert_eq!((h.connections(), sessions.load(Ordering::SeqCst)), (2, 2));
        // The events QEMU sent with each answer were not kept.
        let events = h
            .kept
            .as_ref()
            .unwrap()
            .session
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .take_events();
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn a_silent_or_gone_monitor_is_an_error_within_the_timeout_and_no_one_is_reconnected_to() {
        let dir = tempfile::tempdir().unwrap();
        let mute = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sessions = fake_monitor(&dir.path().join("ag.sock"), 0, std::sync::Arc::clone(&mute));
        let h = kept(dir.path());
        h.run_state().unwrap();
        // Silent (a stopped QEMU): the call waits QMP_TIMEOUT, then fails; the session is kept
        // (a late answer is dropped by its id) and serves again once QEMU answers.
        mute.store(true, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let e = h.run_state().unwrap_err();
        let waited = t.elapsed();
        assert!(e.why.contains("no answer"), "{e}");
        assert!(
            waited >= QMP_TIMEOUT && waited < QMP_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
        mute.store(false, Ordering::SeqCst);
        assert_eq!(h.run_state().unwrap(), "running");
        assert_eq!(h.connections(), 1);
        // Gone (its socket removed, as when QEMU and its launcher ended): an error at once,
        // every time, naming the socket.
        std::fs::remove_file(dir.path().join("ag.sock")).unwrap();
        *h.kept.as_ref().unwrap().session.lock().unwrap() = None;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let e = h.run_state().unwrap_err();
            assert!(e.what.contains("ag.sock"), "{e}");
            assert!(t.elapsed() < Duration::from_millis(100));
        }
        assert_eq!((h.connections(), sessions.load(Ordering::SeqCst)), (1, 1));
    }

    #[test]
    fn without_an_agent_socket_each_call_is_a_session_of_its_own_on_the_main_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = fake_monitor(&dir.path().join("qmp.sock"), 0, Default::default());
        // A record as a launcher from before the agent monitor wrote it.
        let mut record: VmRecord = serde_json::from_value(serde_json::json!({
            "name": "old", "pid": 1, "wrapper_pid": 1, "vcpus": 1, "baseline": 100.0,
            "mode": crate::credit::Mode::default(), "vcpu_tids": [], "config": "/c",
            "qmp_socket": dir.path().join("qmp.sock"),
        }))
        .unwrap();
        let h = Qmp::for_agent(&record);
        assert!(!h.keeps_session());
        for _ in 0..3 {
            assert_eq!(h.run_state().unwrap(), "running");
        }
        assert_eq!((h.connections(), sessions.load(Ordering::SeqCst)), (0, 3));
        record.agent_socket = Some(dir.path().join("ag.sock"));
        let h = Qmp::for_agent(&record);
        assert!(h.keeps_session() && h.serves(&record));
        // Another QEMU under the same name is not this handle's.
        record.qemu_start += 1;
        assert!(!h.serves(&record));
    }

    #[test]
    fn a_vm_without_a_socket_says_so_instead_of_connecting() {
        let h = Qmp::per_use("a", Path::new(""));
        let e = h.pause().unwrap_err();
        assert!(e.to_string().contains("no QMP socket"), "{e}");
    }
}
