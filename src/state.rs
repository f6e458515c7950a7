//! On-disk runtime state: atomic writes, each running VM's runtime directory and its record.
//!
//! A running VM owns `<state dir>/<name>/` (mode 0700), holding:
//!
//! * `lock` — `flock`ed by the launcher for the VM's whole life. A directory whose lock can be
//!   taken belongs to no live launcher (it crashed) and is reclaimed; this is how names stay
//!   unique among running VMs without guessing from pids.
//! * `qmp.sock` — QEMU's QMP socket (unless the operator passed their own `-qmp unix:`).
//! * `vm.json` — the [`VmRecord`]: QEMU's pid and start time, the vCPU thread ids, the config
//!   in force.
//!
//! The directory is removed when the VM ends.
//!
//! # Orphans
//!
//! A VM must outlive its manager: if the launcher dies (kill -9, the OOM killer, a crash), QEMU
//! keeps running. Its directory's lock is then free but its record names a live QEMU, so the VM
//! is *orphaned*, not gone: it is still listed, charged and enforced, its name cannot be
//! launched again, and `stop`/`pause`/`resume` reach it through its QMP socket. QEMU is
//! identified by its pid *and* its start time (field 22 of `/proc/PID/stat`) in this boot, so
//! a reused pid is never mistaken for it. When QEMU finally exits, whoever sees it first (the
//! agent, `stop`, a new launch of the name) reaps the directory.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::procfs::Proc;

use crate::credit::Mode;

/// File name of the VM record in a runtime dir.
pub const RECORD: &str = "vm.json";
/// File name of the lock in a runtime dir.
pub const LOCK: &str = "lock";
/// File name of a balance-override request (`burst-qemu credits NAME --set C`).
pub const SET_CREDITS: &str = "set-credits";
/// A file in the state dir that `credits --set` touches after writing a request: the agent
/// watches the state dir, not each runtime dir, and looks for requests only when told (probing
/// every VM's dir for one each tick was a fifth of the idle agent's system calls).
pub const REQUESTS: &str = "agent.requests";

/// Tells the agent of `state_dir` that a request waits in a runtime dir ([`REQUESTS`]).
pub fn poke_agent(state_dir: &Path) -> std::io::Result<()> {
    // Closing a file opened for writing is the event the agent is told of (`IN_CLOSE_WRITE`).
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(state_dir.join(REQUESTS))
        .map(drop)
}
/// File name of the agent's summary of a VM's credits (JSON), refreshed every tick.
pub const CREDITS_JSON: &str = "credits.json";
/// File name of the reason a VM's config is stale (present only while it is).
pub const CONFIG_ERROR: &str = "config_error";
/// File name of the QMP socket burst-qemu adds.
pub const QMP_SOCKET: &str = "qmp.sock";
/// File name of the agent's own QMP monitor, which the launcher adds (see
/// `control::Qmp::for_agent`): as short as the events monitor's `ev.sock`, so a state dir that
/// holds [`QMP_SOCKET`]'s path holds this one. Only the agent connects to it.
pub const AGENT_SOCKET: &str = "ag.sock";
/// QEMU's run state (`running`, `paused`, …), kept current by the launcher (see
/// `launch::run_state`).
pub const RUN_STATE: &str = "run_state";

/// The run state the launcher published for `name`, if it did.
pub fn published_run_state(state_dir: &Path, name: &str) -> Option<String> {
    let s = std::fs::read_to_string(state_dir.join(name).join(RUN_STATE)).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The default state dir: `/run/burst-qemu` for root, else `$XDG_RUNTIME_DIR/burst-qemu`,
/// else `/tmp/burst-qemu-<uid>`.
pub fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/burst-qemu");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("burst-qemu"),
        _ => PathBuf::from(format!("/tmp/burst-qemu-{uid}")),
    }
}

/// The default data dir, where ledgers survive reboots: `/var/lib/burst-qemu` for root, else
/// `$XDG_DATA_HOME/burst-qemu`, else `~/.local/share/burst-qemu`.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/burst-qemu");
    }
    match (std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d).join("burst-qemu"),
        (_, Some(h)) => PathBuf::from(h).join(".local/share/burst-qemu"),
        _ => PathBuf::from("/var/tmp/burst-qemu"),
    }
}

/// Where VM `name`'s ledger is persisted.
pub fn ledger_path(data_dir: &Path, name: &str) -> PathBuf {
    ledger_dir(data_dir).join(format!("{name}.json"))
}

/// The directory of the ledgers.
pub fn ledger_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ledgers")
}

/// The agent's lock file in a state dir.
pub fn agent_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.lock")
}

/// Whether an agent holds the state dir's agent lock.
pub fn agent_running(state_dir: &Path) -> bool {
    lock_held(&agent_lock_path(state_dir))
}

mod lock;
pub use lock::{lock_held, recorded_holder, try_lock};
mod write;
pub use write::{
    remove_companion, write_atomic, write_atomic_all, write_published, write_swapping,
    write_swapping_at, SwapPair, BATCH_FDS,
};

/// `path` made absolute against the current directory (unchanged if that fails).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Whether a VM's directory belongs to a live launcher, to a live QEMU whose launcher is gone,
/// or to nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The launcher holds the lock.
    Managed,
    /// No launcher, but the recorded QEMU still runs.
    Orphaned,
    /// Neither: a leftover to reap.
    Gone,
}

/// Why a runtime dir could not be claimed.
#[derive(Debug, Error)]
pub enum ClaimError {
    /// A live launcher holds the name.
    #[error("a VM named {name:?} is already running (state dir {dir})", dir = .state_dir.display())]
    AlreadyRunning {
        /// The name.
        name: String,
        /// The state dir.
        state_dir: PathBuf,
    },
    /// A libvirt domain or an adopted QEMU holds the name.
    #[error(
        "a VM named {name:?} is running as {what} (QEMU pid {pid}, state dir {dir}); give this VM another name",
        dir = .state_dir.display()
    )]
    Foreign {
        /// The name.
        name: String,
        /// The state dir.
        state_dir: PathBuf,
        /// QEMU's pid.
        pid: u32,
        /// What it is: `a libvirt domain`, `an adopted QEMU`.
        what: &'static str,
    },
    /// The name's launcher died but its QEMU still runs.
    #[error(
        "a VM named {name:?} is still running without its launcher (QEMU pid {pid}, state dir {dir}): \
         stop it with `burst-qemu stop {name}` first",
        dir = .state_dir.display()
    )]
    Orphaned {
        /// The name.
        name: String,
        /// The state dir.
        state_dir: PathBuf,
        /// QEMU's pid.
        pid: u32,
    },
    /// The state dir cannot be created or written.
    #[error("state dir {dir} is not usable", dir = .dir.display())]
    Unwritable {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A claimed runtime dir; removed on drop (unless [`RuntimeDir::keep`] let it go).
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    _lock: File,
    kept: bool,
}

impl RuntimeDir {
    /// Claims `<state_dir>/<name>/`, creating the state dir when needed. A leftover directory
    /// of a crashed launcher is cleaned and reused.
    pub fn claim(state_dir: &Path, name: &str) -> Result<Self, ClaimError> {
        let unwritable = |source| ClaimError::Unwritable {
            dir: state_dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(state_dir)
            .map_err(unwritable)?;
        let path = state_dir.join(name);
        let running = || ClaimError::AlreadyRunning {
            name: name.to_owned(),
            state_dir: state_dir.to_owned(),
        };
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(unwritable(e)),
        }
        // A reaper (see `reap`) holds the lock for a moment while it removes a dead VM's
        // directory: try a few times before calling the name taken.
        let mut lock = None;
        for _ in 0..20 {
            lock = try_lock(&path.join(LOCK), 0o600).map_err(unwritable)?;
            let reaping = || read_record(&path).is_some_and(|r| !r.qemu_alive());
            if lock.is_some() || !reaping() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let lock = lock.ok_or_else(running)?;
        // Ours now, unless the previous launcher died and left its QEMU running.
        if let Some(r) = read_record(&path) {
            if r.qemu_alive() && r.source != Source::Launcher {
                return Err(ClaimError::Foreign {
                    name: name.to_owned(),
                    state_dir: state_dir.to_owned(),
                    pid: r.pid,
                    what: r.source.what(),
                });
            }
            if r.qemu_alive() {
                return Err(ClaimError::Orphaned {
                    name: name.to_owned(),
                    state_dir: state_dir.to_owned(),
                    pid: r.pid,
                });
            }
        }
        // Anything else in it is a dead launcher's leftover.
        for entry in fs::read_dir(&path).map_err(unwritable)? {
            let entry = entry.map_err(unwritable)?;
            if entry.file_name() != LOCK {
                let p = entry.path();
                let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            }
        }
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(unwritable)?;
        Ok(RuntimeDir {
            path,
            _lock: lock,
            kept: false,
        })
    }

    /// Removes `<state_dir>/<name>/` if it belongs to nothing alive: no launcher holds it and
    /// the QEMU it records has exited. Returns whether it was removed.
    pub fn reap(state_dir: &Path, name: &str) -> bool {
        Self::reap_in(Proc::host(), state_dir, name)
    }

    /// [`RuntimeDir::reap`], the QEMU looked for in `proc`.
    fn reap_in(proc: &Proc, state_dir: &Path, name: &str) -> bool {
        let path = state_dir.join(name);
        let Some(record) = read_record(&path) else {
            return false;
        };
        if record.qemu_alive_in(proc) {
            return false;
        }
        matches!(Self::remove_unheld(path), Ok(true))
    }

    /// Removes the runtime dir at `path` unless a launcher holds its lock: `Ok(true)` when
    /// removed, `Ok(false)` when held.
    fn remove_unheld(path: PathBuf) -> io::Result<bool> {
        let Some(lock) = try_lock(&path.join(LOCK), 0o600)? else {
            return Ok(false);
        };
        drop(RuntimeDir {
            path,
            _lock: lock,
            kept: false,
        });
        Ok(true)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Releases the lock and leaves the directory in place: for a VM no launcher holds (a
    /// libvirt domain, an adopted QEMU), whose record alone says whether it lives.
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        self.path.clone()
    }

    /// Writes the VM record atomically. Not fsynced: it describes a live process and is
    /// meaningless after a crash, so durability would only slow the start-up.
    ///
    /// The directory's times are then set: the agent watches the state dir, not each runtime
    /// dir, and the change of a child's attributes is what tells it that the record is there
    /// (without it the agent found a record written after its scan of the new directory only at
    /// its next rescan, up to a second later).
    pub fn write_record(&self, record: &VmRecord) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        write_published(&self.path.join(RECORD), &json)?;
        File::open(&self.path)?.set_modified(std::time::SystemTime::now())
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // Remove everything but the lock first, then the lock and the directory, while the
        // lock is still held so no other launcher reclaims a half-removed directory.
        // The agent may publish a file into the directory while we empty it (it only ever
        // writes into an existing directory), so empty and remove until the removal holds.
        for _ in 0..50 {
            if let Ok(entries) = fs::read_dir(&self.path) {
                for entry in entries.flatten() {
                    if entry.file_name() != LOCK {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
            let _ = fs::remove_file(self.path.join(LOCK));
            match fs::remove_dir(&self.path) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => continue,
                _ => break,
            }
        }
    }
}

/// Where a running VM comes from: who started it and who controls it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// burst-qemu's own launcher, which holds the runtime dir's lock for the VM's life.
    #[default]
    Launcher,
    /// A libvirt domain, whose runtime dir the agent made (see [`crate::source::libvirt`]).
    Libvirt {
        /// The connection the agent watches it on.
        uri: String,
        /// The domain's UUID (its identity: names can be renamed and reused).
        uuid: String,
        /// The domain's cgroup directory in the hierarchy with the `cpu` controller
        /// (relative to its mount: `/machine/qemu-1-web.libvirt-qemu`), where the vCPU
        /// threads go home when burst-qemu lets the domain go.
        #[serde(default)]
        cgroup: Option<String>,
    },
    /// A QEMU started by something else (`burst-qemu adopt`): managed as an orphaned VM is.
    Adopted,
}

impl Source {
    /// `launcher`, `libvirt` or `adopted` (the `SOURCE` column of `ls`).
    pub fn label(&self) -> &'static str {
        match self {
            Source::Launcher => "launcher",
            Source::Libvirt { .. } => "libvirt",
            Source::Adopted => "adopted",
        }
    }

    /// The VM as a noun, for messages.
    pub fn what(&self) -> &'static str {
        match self {
            Source::Launcher => "a burst-qemu VM",
            Source::Libvirt { .. } => "a libvirt domain",
            Source::Adopted => "an adopted QEMU",
        }
    }

    /// The libvirt domain's UUID, for a libvirt VM.
    pub fn libvirt_uuid(&self) -> Option<&str> {
        match self {
            Source::Libvirt { uuid, .. } => Some(uuid),
            _ => None,
        }
    }
}

/// What a launcher records about its running VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's name.
    pub name: String,
    /// QEMU's pid.
    pub pid: u32,
    /// The launcher's pid (signal it to stop the VM gracefully).
    pub wrapper_pid: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Baseline, percent per vCPU.
    pub baseline: f64,
    /// Credit mode.
    pub mode: Mode,
    /// The vCPU thread ids, in vCPU order.
    pub vcpu_tids: Vec<u32>,
    /// The VM's config file.
    pub config: PathBuf,
    /// QEMU's QMP socket.
    pub qmp_socket: PathBuf,
    /// QEMU's start time ([`Proc::process_start_time`]); 0 (unknown) in records of older
    /// launchers, which then never identify a live process.
    #[serde(default)]
    pub qemu_start: u64,
    /// The boot the record was made in (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    pub boot_id: String,
    /// Where the VM comes from (records of older launchers: the launcher).
    #[serde(default)]
    pub source: Source,
    /// The agent's own QMP monitor ([`AGENT_SOCKET`] in the runtime dir), which the agent keeps
    /// one connection on; `None` (adopted QEMUs, libvirt domains, records of older launchers):
    /// the agent opens a short session on [`VmRecord::qmp_socket`] per use instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<PathBuf>,
}

impl VmRecord {
    /// Whether the QEMU this record describes still runs: same boot, same pid, same start time.
    /// A record without a start time (0) identifies nothing: the pid alone may be anyone's.
    pub fn qemu_alive(&self) -> bool {
        self.qemu_alive_in(Proc::host())
    }

    /// [`VmRecord::qemu_alive`] among the processes of `proc`.
    pub fn qemu_alive_in(&self, proc: &Proc) -> bool {
        if !self.boot_id.is_empty() && self.boot_id != proc.boot_id() {
            return false;
        }
        self.qemu_start != 0 && proc.process_start_time(self.pid) == Some(self.qemu_start)
    }
}

fn read_record(dir: &Path) -> Option<VmRecord> {
    serde_json::from_slice(&fs::read(dir.join(RECORD)).ok()?).ok()
}

/// Whether the VM in `dir` (whose record is `record`) is managed, orphaned or gone. A libvirt
/// domain is managed (by libvirt) while its QEMU lives; an adopted QEMU has no manager, so it
/// is orphaned while it lives (listed, charged, enforced; stopped only when asked). QEMU is
/// looked for in `proc`.
pub fn liveness(proc: &Proc, dir: &Path, record: &VmRecord) -> Liveness {
    liveness_by(
        &record.source,
        || is_locked(dir),
        || record.qemu_alive_in(proc),
    )
}

/// The rule of [`liveness`], told how to ask its two questions: whether a launcher holds the
/// runtime dir (asked of a launcher's VM only, and first: QEMU's start time, a read of
/// `/proc/PID/stat`, is looked at only when no launcher holds the dir), and whether QEMU runs.
/// The agent asks them of the VMs it manages through descriptors it keeps open.
pub fn liveness_by(
    source: &Source,
    launcher_holds: impl FnOnce() -> bool,
    qemu_alive: impl Fn() -> bool,
) -> Liveness {
    match source {
        Source::Launcher => {}
        _ if !qemu_alive() => return Liveness::Gone,
        Source::Libvirt { .. } => return Liveness::Managed,
        Source::Adopted => return Liveness::Orphaned,
    }
    if launcher_holds() {
        Liveness::Managed
    } else if qemu_alive() {
        Liveness::Orphaned
    } else {
        Liveness::Gone
    }
}

/// The VMs running under `state_dir`, managed or orphaned, sorted by name. Unreadable entries
/// and those that are gone are skipped.
pub fn running(state_dir: &Path) -> Vec<(VmRecord, Liveness)> {
    survey(state_dir, Proc::host()).0
}

/// One pass over `state_dir`: the VMs running (as [`running`]) and the names of the runtime
/// dirs whose VM is gone (to reap with [`reap_named`]). The agent's rescan each second reads
/// every record once, where reading them for the running and again for the gone doubled its
/// per-VM opens. QEMUs are looked for in `proc`.
pub fn survey(state_dir: &Path, proc: &Proc) -> (Vec<(VmRecord, Liveness)>, Vec<String>) {
    let (vms, gone, _) = survey_except(state_dir, proc, |_| false);
    (vms, gone)
}

/// As [`survey`], but the runtime dirs named `known(name)` are only listed, not read: the
/// third part is which of them are there (the agent asks the VMs it manages itself).
pub fn survey_except(
    state_dir: &Path,
    proc: &Proc,
    known: impl Fn(&str) -> bool,
) -> (Vec<(VmRecord, Liveness)>, Vec<String>, HashSet<String>) {
    let mut vms: Vec<(VmRecord, Liveness)> = Vec::new();
    let mut gone = Vec::new();
    let mut present = HashSet::new();
    let Ok(entries) = fs::read_dir(state_dir) else {
        return (vms, gone, present);
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Some(name) = e.file_name().to_str().filter(|n| known(n)) {
            present.insert(name.to_owned());
            continue;
        }
        let Some(record) = read_record(&e.path()) else {
            continue;
        };
        match liveness(proc, &e.path(), &record) {
            Liveness::Gone => gone.extend(e.file_name().into_string().ok()),
            l => vms.push((record, l)),
        }
    }
    vms.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    (vms, gone, present)
}

/// The record of the running (managed or orphaned) VM `name`, if any.
pub fn find(state_dir: &Path, name: &str) -> Option<(VmRecord, Liveness)> {
    let dir = state_dir.join(name);
    let record = read_record(&dir)?;
    match liveness(Proc::host(), &dir, &record) {
        Liveness::Gone => None,
        l => Some((record, l)),
    }
}

/// Reaps those of the VM directories `names` under `state_dir` that belong to nothing alive
/// (each looked at again: a launcher may have claimed the name since; QEMU looked for in
/// `proc`); returns the reaped.
pub fn reap_named(state_dir: &Path, names: Vec<String>, proc: &Proc) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| RuntimeDir::reap_in(proc, state_dir, name))
        .collect()
}

/// Writes the record of a VM no launcher holds (a libvirt domain, an adopted QEMU) into its
/// runtime dir, claiming the dir when it is not already this QEMU's (a name held by a live
/// launcher or another live QEMU is refused), and leaves it unlocked: the record's QEMU alone
/// says whether it lives (see [`liveness`]).
pub fn place_foreign(state_dir: &Path, record: &VmRecord) -> Result<PathBuf, ClaimError> {
    let path = state_dir.join(&record.name);
    if let Some(r) = read_record(&path) {
        let same =
            r.pid == record.pid && r.qemu_start == record.qemu_start && r.source == record.source;
        if same && r.qemu_alive() && !is_locked(&path) {
            let json = serde_json::to_vec_pretty(record).map_err(io::Error::other);
            return json
                .and_then(|j| write_published(&path.join(RECORD), &j))
                .map(|()| path)
                .map_err(|source| ClaimError::Unwritable {
                    dir: state_dir.to_owned(),
                    source,
                });
        }
    }
    let dir = RuntimeDir::claim(state_dir, &record.name)?;
    dir.write_record(record)
        .map_err(|source| ClaimError::Unwritable {
            dir: state_dir.to_owned(),
            source,
        })?;
    Ok(dir.keep())
}

/// Removes the runtime dir of a VM no launcher holds, once it has left burst-qemu's care
/// (a departed or released libvirt domain); `false` when a launcher holds the name.
pub fn remove_foreign(state_dir: &Path, name: &str) -> bool {
    let path = state_dir.join(name);
    RuntimeDir::remove_unheld(path.clone()).unwrap_or_else(|_| !path.exists())
}

/// Whether a live launcher holds the runtime dir's lock.
pub fn is_locked(dir: &Path) -> bool {
    lock_held(&dir.join(LOCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written by launchers from before the agent monitor (no `agent_socket`) still
    /// load, as VMs without one; a record without one is written as before.
    #[test]
    fn the_agent_socket_is_optional_in_records() {
        let mut r = VmRecord {
            name: "web".into(),
            pid: 10,
            wrapper_pid: 9,
            vcpus: 1,
            baseline: 50.0,
            mode: Mode::default(),
            vcpu_tids: vec![11],
            config: "/vms/web.toml".into(),
            qmp_socket: "/run/bq/web/qmp.sock".into(),
            qemu_start: 5,
            boot_id: "b".into(),
            source: Source::Launcher,
            agent_socket: Some("/run/bq/web/ag.sock".into()),
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["agent_socket"], "/run/bq/web/ag.sock");
        assert_eq!(serde_json::from_value::<VmRecord>(json).unwrap(), r);
        r.agent_socket = None;
        let mut json = serde_json::to_value(&r).unwrap();
        assert!(json.get("agent_socket").is_none(), "{json}");
        // An older launcher's record: no agent_socket (nor the later fields).
        for key in ["qemu_start", "boot_id", "source"] {
            json.as_object_mut().unwrap().remove(key);
        }
        let old: VmRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.agent_socket, None);
        assert_eq!(old.source, Source::Launcher);
        // A wrong type is an error, not a guess.
        let mut bad = serde_json::to_value(&r).unwrap();
        bad["agent_socket"] = 7.into();
        assert!(serde_json::from_value::<VmRecord>(bad).is_err());
    }

    #[test]
    fn a_name_is_claimed_once_and_freed_on_drop() {
        let state = tempfile::tempdir().unwrap();
        let first = RuntimeDir::claim(state.path(), "a").unwrap();
        assert!(matches!(
            RuntimeDir::claim(state.path(), "a"),
            Err(ClaimError::AlreadyRunning { .. })
        ));
        assert!(is_locked(first.path()));
        let path = first.path().to_owned();
        drop(first);
        assert!(!path.exists());
        RuntimeDir::claim(state.path(), "a").unwrap();
    }

    #[test]
    fn a_crashed_launchers_directory_is_reclaimed_and_cleaned() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("b");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(LOCK), "").unwrap();
        fs::write(dir.join(RECORD), "{stale").unwrap();
        let claimed = RuntimeDir::claim(state.path(), "b").unwrap();
        assert!(!claimed.path().join(RECORD).exists());
        assert_eq!(running(state.path()), vec![]);
    }

    #[test]
    fn runtime_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let d = RuntimeDir::claim(state.path(), "c").unwrap();
        assert_eq!(
            fs::metadata(d.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
