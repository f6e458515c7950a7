//! The agent's libvirt watcher (`agent --libvirt [URI]`, feature `libvirt`): which domains of
//! the connection are in the fleet, and what happens to them as they start, stop, move and
//! change.
//!
//! Once a second (with the agent's rescan) one `virConnectGetAllDomainStats` call lists every
//! domain's state, id and vCPU count. A running domain is in the fleet when it opts in — a
//! `vms/NAME.toml`, or burst-qemu's `<config>` element in its `<metadata>` (read from libvirt's
//! status file, so no call per domain) — with a valid config, and the two agreeing when both
//! exist. The watcher then writes the domain's record into a runtime dir of the state dir
//! (`state::place_foreign`), and from there it is a VM like any other: the agent's scan adopts
//! it, charges it, enforces it, publishes it. What only a domain needs is decided here and
//! carried out by the agent ([`Action`]):
//!
//! - a departure (shut down, destroyed, crashed, saved, migrated away, undefined, restarted):
//!   the VM ends at once (nothing more is charged here), its checkpoint goes into the persistent
//!   definition, its runtime dir is removed (libvirt removes its cgroups);
//! - an edit of the `<config>` element (the status file changes): the config is applied, as a
//!   file edit is; the element and the file both gone: the domain is let go while it runs
//!   (threads back to libvirt's groups);
//! - a vCPU count change (hotplug): the VM is taken again with its new threads, balance kept;
//! - every [`CHECKPOINT_EVERY`] (when the balance moved) and when the agent stops: the
//!   checkpoint into the running domain's metadata (live, and persistent when it has a
//!   definition), so that a saved image or a migrated domain carries its credits.
//!
//! A VM stays alive while its QEMU does (pid and start time), not while libvirtd answers:
//! with libvirtd down the agent goes on charging and enforcing from `/proc` and cgroups and
//! reconnects every couple of seconds; the first poll after it is back reconciles whatever
//! happened meanwhile. The same reconciliation runs when the agent starts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::domain::{checkpoint_now, checkpoint_of, combined_config, host_name, CHECKPOINT_EVERY};
use super::vm_config::Unusable;
use super::{Agent, Events, LedgerFile, LibvirtSettings};
use crate::base::{chain, validate_name};
use crate::control::{Control, Unavailable};
use crate::credit::Balances;
use crate::enforce::cgroup::{self, Version};
use crate::procfs::Proc;
use crate::source::libvirt::control::{state_name, LibvirtControl, Pool};
use crate::source::libvirt::discover::{discover, Expected, Found};
use crate::source::libvirt::lifecycle::{self, Departure, Event, Seen};
use crate::source::libvirt::metadata::{self, Checkpoint, CHECKPOINT_NS, CONFIG_NS, KEY};
use crate::source::libvirt::{conn::Scope, status};
use crate::state::{self, Source, VmRecord};

/// The file in the state dir where the watcher says what it sees (for `burst-qemu check`).
pub const LIBVIRT_JSON: &str = "libvirt.json";

/// What the watcher publishes in [`LIBVIRT_JSON`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// The connection.
    pub uri: String,
    /// Whether libvirtd answered the last poll.
    pub connected: bool,
    /// Why it did not, when it did not.
    pub error: Option<String>,
    /// Every running domain the agent may consider (after `--libvirt-domains`).
    pub domains: Vec<PublishedDomain>,
    /// The agent's pid.
    pub pid: u32,
}

/// One running domain in [`Published`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PublishedDomain {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// libvirt's state.
    pub state: String,
    /// Whether it is in the fleet.
    pub in_fleet: bool,
    /// Why not, when it is not (not opted in, or refused and why).
    pub why_not: Option<String>,
}

/// What the agent does for the watcher.
enum Action {
    /// A domain arrives: its record goes into the state dir (the scan adopts it).
    Place(Box<VmRecord>),
    /// A domain stopped running here.
    Depart {
        uuid: String,
        name: String,
        how: String,
    },
    /// A running domain leaves the fleet (it opted out).
    Release { uuid: String, name: String },
    /// Its `<config>` element changed.
    Reload(String),
    /// Its vCPUs changed: taken again with these threads.
    Readopt(Box<VmRecord>),
}

/// A domain in the fleet.
struct Member {
    name: String,
    id: Option<u32>,
    pid: u32,
    qemu_start: u64,
    vcpus: u32,
    status_mtime: Option<SystemTime>,
    /// The `<config>` element in force (from the status file).
    element: Option<String>,
    /// Whether its `vms/NAME.toml` existed at the last poll.
    file: bool,
    /// The metadata checkpoint it arrived with, until the agent's restore takes it.
    arrival: Option<Checkpoint>,
    /// When and with which balances the last checkpoint was written.
    checkpointed: Option<(Instant, Balances)>,
    /// Whether it has a persistent definition (asked once).
    persistent: Option<bool>,
}

/// A running domain not in the fleet: why, and the status file's time when that was decided.
struct Other {
    mtime: Option<SystemTime>,
    /// Its `vms/NAME.toml`'s modification time (`None`: no file): an edit that makes a refused
    /// file agree with the element is seen at the next poll.
    file: Option<SystemTime>,
    why: String,
}

/// The watcher of one libvirt connection.
pub(super) struct Watch {
    settings: LibvirtSettings,
    pool: Arc<Pool>,
    version: Option<Version>,
    last: Option<Vec<Seen>>,
    members: HashMap<String, Member>,
    others: HashMap<String, Other>,
    down: Option<String>,
    host: String,
    published: Published,
    /// Domains whose checkpoint is written at the next chance, not at its interval (their
    /// balance was set, their config applied).
    urgent: std::collections::HashSet<String>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

impl Watch {
    /// A watcher for `settings`, knowing the libvirt VMs already in `state_dir` (an agent that
    /// restarts picks them up where the last one left them).
    pub(super) fn new(settings: LibvirtSettings, state_dir: &Path) -> Watch {
        let mut w = Watch {
            pool: Pool::new(&settings.uri),
            version: cgroup::detect_host().map(|(v, _)| v),
            last: None,
            members: HashMap::new(),
            others: HashMap::new(),
            down: None,
            host: host_name(),
            urgent: Default::default(),
            published: Published {
                uri: settings.uri.clone(),
                pid: std::process::id(),
                ..Published::default()
            },
            settings,
        };
        for (record, _) in state::running(state_dir) {
            if let Source::Libvirt { uri, uuid, .. } = &record.source {
                if *uri == w.settings.uri {
                    let path = status::path(&w.settings.run_dir, &record.name);
                    let element = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|x| metadata::find_in_domain_xml(&x, CONFIG_NS));
                    w.members.insert(
                        uuid.clone(),
                        Member {
                            name: record.name.clone(),
                            id: None,
                            pid: record.pid,
                            qemu_start: record.qemu_start,
                            vcpus: record.vcpus,
                            // The first poll reads the status file and the config file
                            // again: an opt-out made while no agent ran is seen then.
                            status_mtime: None,
                            file: record.config.exists(),
                            element,
                            arrival: None,
                            checkpointed: None,
                            persistent: None,
                        },
                    );
                }
            }
        }
        w
    }

    /// The connection's URI.
    pub(super) fn uri(&self) -> &str {
        &self.settings.uri
    }

    /// The `<config>` element in force for domain `uuid`.
    pub(super) fn element(&self, uuid: &str) -> Option<String> {
        self.members.get(uuid).and_then(|m| m.element.clone())
    }

    /// The checkpoint domain `uuid` arrived with (once).
    pub(super) fn take_arrival(&mut self, uuid: &str) -> Option<Checkpoint> {
        self.members.get_mut(uuid).and_then(|m| m.arrival.take())
    }

    /// A control handle for domain `uuid`.
    pub(super) fn control(&self, name: &str, uuid: &str) -> Arc<dyn Control> {
        Arc::new(LibvirtControl::new(name, uuid, Arc::clone(&self.pool)))
    }

    fn status_path(&self, name: &str) -> PathBuf {
        status::path(&self.settings.run_dir, name)
    }

    fn discover(&self, s: &Seen) -> Result<Found, String> {
        let id = s.id.ok_or("not running")?;
        discover(
            &self.settings.run_dir,
            Proc::host().root(),
            &Expected {
                uuid: &s.uuid,
                name: &s.name,
                id,
                vcpus: s.vcpus,
            },
        )
        .map_err(|e| chain(&e))
    }

    /// The record of a running domain with the settings `cfg`.
    fn record(&self, s: &Seen, f: &Found, baseline: f64, mode: crate::credit::Mode) -> VmRecord {
        let cgroup = match self.version {
            Some(Version::V1) => f.cgroups.v1_cpu.clone(),
            Some(Version::V2) => f.cgroups.unified.clone(),
            None => None,
        };
        VmRecord {
            name: s.name.clone(),
            pid: f.pid,
            wrapper_pid: 0,
            vcpus: f.vcpu_tids.len() as u32,
            baseline,
            mode,
            vcpu_tids: f.vcpu_tids.clone(),
            config: self.settings.vms_dir.join(format!("{}.toml", s.name)),
            qmp_socket: PathBuf::new(),
            qemu_start: f.qemu_start,
            boot_id: Proc::host().boot_id(),
            source: Source::Libvirt {
                uri: self.settings.uri.clone(),
                uuid: s.uuid.clone(),
                cgroup,
            },
            agent_socket: None,
        }
    }

    /// One poll: what happened since the last, as actions for the agent.
    fn poll(&mut self) -> Vec<Action> {
        let seen = match self.pool.get().and_then(|c| c.poll()) {
            Ok(seen) => seen,
            Err(e) => {
                self.pool.reset();
                if self.down.is_none() {
                    tracing::error!(
                        "libvirt at {}: {e}; its domains in the fleet are still charged and enforced; retrying",
                        self.settings.uri
                    );
                }
                self.down = Some(e.to_string());
                self.published.connected = false;
                self.published.error = self.down.clone();
                return Vec::new();
            }
        };
        if let Some(why) = self.down.take() {
            tracing::info!(
                "libvirt at {} answers again (it did not: {why})",
                self.settings.uri
            );
        }
        let departures: HashMap<String, Departure> = lifecycle::diff(self.last.as_deref(), &seen)
            .into_iter()
            .filter_map(|e| match e {
                Event::Departed { uuid, how } => Some((uuid, how)),
                _ => None,
            })
            .collect();
        let mut actions = Vec::new();
        let uuids: Vec<String> = self.members.keys().cloned().collect();
        for uuid in uuids {
            let now = seen.iter().find(|s| s.uuid == uuid);
            self.check_member(&uuid, now, departures.get(&uuid).copied(), &mut actions);
        }
        for s in seen.iter().filter(|s| s.id.is_some()) {
            if !self.members.contains_key(&s.uuid) {
                if let Some(a) = self.arrival(s) {
                    actions.push(a);
                }
            }
        }
        self.others
            .retain(|uuid, _| seen.iter().any(|s| s.uuid == *uuid && s.id.is_some()));
        self.publish_view(&seen);
        self.last = Some(seen);
        actions
    }

    /// What became of a member: gone, restarted, resized, edited, or nothing.
    fn check_member(
        &mut self,
        uuid: &str,
        now: Option<&Seen>,
        departed: Option<Departure>,
        actions: &mut Vec<Action>,
    ) {
        let Some(m) = self.members.get(uuid) else {
            return;
        };
        let depart = |how: String| Action::Depart {
            uuid: uuid.to_owned(),
            name: m.name.clone(),
            how,
        };
        let Some(s) = now else {
            actions.push(depart("undefined".into()));
            return;
        };
        if s.id.is_none() {
            let how = departed.map_or_else(
                || format!("{} (reason {})", state_name(s.state), s.reason),
                |d| format!("{d:?}").to_lowercase(),
            );
            actions.push(depart(how));
            return;
        }
        if s.id != m.id {
            // Known from its record only (the agent restarted), or restarted between polls.
            match self.discover(s) {
                Ok(f) if f.pid == m.pid && f.qemu_start == m.qemu_start => {}
                Ok(_) => {
                    actions.push(depart("restarted".into()));
                    return;
                }
                // The status file is being rewritten: next poll.
                Err(_) => return,
            }
            if let Some(m) = self.members.get_mut(uuid) {
                m.id = s.id;
            }
        }
        let Some(m) = self.members.get(uuid) else {
            return;
        };
        if s.vcpus != m.vcpus && s.vcpus > 0 {
            if let Ok(f) = self.discover(s) {
                tracing::info!(
                    "{}: its vCPUs changed from {} to {}: taken again with threads {:?}",
                    m.name,
                    m.vcpus,
                    s.vcpus,
                    f.vcpu_tids
                );
                let r = self.record(s, &f, 0.0, crate::credit::Mode::Standard);
                if let Some(m) = self.members.get_mut(uuid) {
                    m.vcpus = s.vcpus;
                }
                actions.push(Action::Readopt(Box::new(r)));
            }
            return;
        }
        let path = self.status_path(&m.name);
        let t = mtime(&path);
        let file = self
            .settings
            .vms_dir
            .join(format!("{}.toml", m.name))
            .exists();
        if t == m.status_mtime && file == m.file {
            return;
        }
        let element = if t == m.status_mtime {
            m.element.clone()
        } else {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|x| metadata::find_in_domain_xml(&x, CONFIG_NS))
        };
        let name = m.name.clone();
        // A file that appears or goes is the agent's file watcher's to apply; the element is
        // the watcher's.
        let changed = element != m.element;
        if let Some(m) = self.members.get_mut(uuid) {
            m.status_mtime = t;
            m.element = element.clone();
            m.file = file;
        }
        if element.is_none() && !file {
            actions.push(Action::Release {
                uuid: uuid.to_owned(),
                name,
            });
        } else if changed {
            actions.push(Action::Reload(name));
        }
    }

    /// Whether a running domain joins the fleet now (and if not, why, remembered for `check`).
    fn arrival(&mut self, s: &Seen) -> Option<Action> {
        if let Some(pattern) = &self.settings.domains {
            if !glob(pattern, &s.name) {
                return None;
            }
        }
        let path = self.status_path(&s.name);
        let t = mtime(&path);
        let file_path = self.settings.vms_dir.join(format!("{}.toml", s.name));
        let file_t = mtime(&file_path);
        let file = file_t.is_some();
        if let Some(o) = self.others.get(&s.uuid) {
            if o.mtime == t && o.file == file_t && t.is_some() {
                return None;
            }
        }
        let text = std::fs::read_to_string(&path).ok();
        let element = text
            .as_deref()
            .and_then(|x| metadata::find_in_domain_xml(x, CONFIG_NS));
        let verdict = self.admit(s, element.as_deref(), file);
        match verdict {
            Ok(record) => {
                self.others.remove(&s.uuid);
                let arrival = text
                    .as_deref()
                    .and_then(|x| metadata::find_in_domain_xml(x, CHECKPOINT_NS))
                    .and_then(|x| metadata::parse_checkpoint(&x).ok());
                self.members.insert(
                    s.uuid.clone(),
                    Member {
                        name: s.name.clone(),
                        id: s.id,
                        pid: record.pid,
                        qemu_start: record.qemu_start,
                        vcpus: record.vcpus,
                        status_mtime: t,
                        file,
                        element,
                        arrival,
                        checkpointed: None,
                        persistent: None,
                    },
                );
                Some(Action::Place(Box::new(record)))
            }
            Err((why, refused)) => {
                if refused && self.others.get(&s.uuid).is_none_or(|o| o.why != why) {
                    tracing::error!("{}: libvirt domain not taken: {why}", s.name);
                }
                self.others.insert(
                    s.uuid.clone(),
                    Other {
                        mtime: t,
                        file: file_t,
                        why,
                    },
                );
                None
            }
        }
    }

    /// The record of a domain that opted in with a usable config; else why not, and whether
    /// that is a refusal (to log) rather than no opt-in.
    fn admit(
        &self,
        s: &Seen,
        element: Option<&str>,
        file: bool,
    ) -> Result<VmRecord, (String, bool)> {
        if element.is_none() && !file {
            return Err((
                format!(
                    "not opted in (no {} and no <metadata> element {CONFIG_NS})",
                    self.settings
                        .vms_dir
                        .join(format!("{}.toml", s.name))
                        .display()
                ),
                false,
            ));
        }
        validate_name(&s.name).map_err(|e| (e, true))?;
        let f = self.discover(s).map_err(|e| (e, true))?;
        let mut record = self.record(s, &f, 0.0, crate::credit::Mode::Standard);
        match combined_config(&record, element) {
            Ok(cfg) => {
                record.baseline = cfg.policy.baseline().percent();
                record.mode = cfg.policy.mode();
                Ok(record)
            }
            Err(Unusable::Invalid(why)) => Err((why, true)),
            Err(Unusable::Missing) => Err((format!("{} vanished", record.config.display()), false)),
        }
    }

    fn publish_view(&mut self, seen: &[Seen]) {
        let mut domains: Vec<PublishedDomain> = seen
            .iter()
            .filter(|s| s.id.is_some())
            .filter(|s| {
                self.settings
                    .domains
                    .as_deref()
                    .is_none_or(|p| glob(p, &s.name))
            })
            .map(|s| PublishedDomain {
                name: s.name.clone(),
                uuid: s.uuid.clone(),
                state: state_name(s.state),
                in_fleet: self.members.contains_key(&s.uuid),
                why_not: self.others.get(&s.uuid).map(|o| o.why.clone()),
            })
            .collect();
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        self.published.connected = true;
        self.published.error = None;
        self.published.domains = domains;
    }

    /// Writes domain `uuid`'s checkpoint `cp` into its metadata: `live` into the running
    /// domain, and into its persistent definition when it has one.
    fn write_checkpoint(&mut self, uuid: &str, cp: &Checkpoint, live: bool) -> Result<(), String> {
        let conn = self.pool.get().map_err(|e| e.to_string())?;
        let d = conn.domain_by_uuid(uuid).map_err(|e| e.to_string())?;
        let persistent = match self.members.get(uuid).and_then(|m| m.persistent) {
            Some(p) => p,
            None => d.is_persistent().map_err(|e| e.to_string())?,
        };
        if let Some(m) = self.members.get_mut(uuid) {
            m.persistent = Some(persistent);
        }
        let scope = match (live, persistent) {
            (true, true) => Scope::Both,
            (true, false) => Scope::Live,
            (false, true) => Scope::Config,
            (false, false) => return Ok(()),
        };
        let xml = metadata::render_checkpoint(cp);
        d.set_metadata(CHECKPOINT_NS, KEY, Some(&xml), scope)
            .map_err(|e| e.to_string())
    }
}

impl Agent {
    /// Starts the watcher when the settings ask for one.
    pub(super) fn start_libvirt(&mut self) {
        if let Some(s) = self.settings.libvirt.clone() {
            tracing::info!(
                "watching libvirt at {} (status files in {}, configs in {}{})",
                s.uri,
                s.run_dir.display(),
                s.vms_dir.display(),
                s.domains
                    .as_deref()
                    .map_or(String::new(), |p| format!(", domains {p}"))
            );
            self.libvirt = Some(Watch::new(s, &self.settings.state_dir));
        }
    }

    /// Whether this agent watches libvirt connection `uri`.
    pub(super) fn serves_libvirt(&self, uri: &str) -> bool {
        self.libvirt.as_ref().is_some_and(|w| w.uri() == uri)
    }

    /// The `<config>` element in force for domain `uuid`.
    pub(super) fn metadata_element(&self, uuid: &str) -> Option<String> {
        self.libvirt.as_ref().and_then(|w| w.element(uuid))
    }

    /// The checkpoint domain `uuid` arrived with (once).
    pub(super) fn take_arrival_checkpoint(&mut self, uuid: &str) -> Option<Checkpoint> {
        self.libvirt.as_mut().and_then(|w| w.take_arrival(uuid))
    }

    /// A libvirt VM's control handle.
    pub(super) fn libvirt_control(&self, record: &VmRecord) -> Arc<dyn Control> {
        match (&self.libvirt, record.source.libvirt_uuid()) {
            (Some(w), Some(uuid)) => w.control(&record.name, uuid),
            _ => Arc::new(Unavailable {
                name: record.name.clone(),
                why: "no libvirt connection is watched for this domain".into(),
            }),
        }
    }

    /// Polls libvirt and carries out what the poll found.
    pub(super) fn poll_libvirt(&mut self, events: &mut Events) {
        let Some(w) = self.libvirt.as_mut() else {
            return;
        };
        let actions = w.poll();
        let published = w.published.clone();
        for a in actions {
            self.carry_out(a, events);
        }
        let path = self.settings.state_dir.join(LIBVIRT_JSON);
        if let Ok(text) = serde_json::to_string_pretty(&published) {
            let _ = state::write_published(&path, (text + "\n").as_bytes());
        }
    }

    fn carry_out(&mut self, a: Action, events: &mut Events) {
        match a {
            Action::Place(record) => self.place(&record),
            Action::Depart { uuid, name, how } => self.depart(&uuid, &name, &how),
            Action::Release { uuid, name } => {
                tracing::info!("{name}: opted out (no config file, no <metadata> element): let go");
                self.checkpoint_one(&uuid, true);
                if self.owns(&name, &uuid) {
                    self.end(&name);
                }
                self.remove_dir(&name, &uuid);
                if let Some(w) = self.libvirt.as_mut() {
                    w.members.remove(&uuid);
                }
            }
            Action::Reload(name) => {
                tracing::info!("{name}: its <metadata> element changed");
                self.reload(&name);
            }
            Action::Readopt(mut record) => {
                if let Some(uuid) = record.source.libvirt_uuid() {
                    if self.owns(&record.name, uuid) {
                        if let Some(vm) = self.vms.get(&record.name) {
                            record.baseline = vm.record.baseline;
                            record.mode = vm.record.mode;
                        }
                        self.end(&record.name);
                    }
                }
                self.place(&record);
                self.scan(events);
            }
        }
    }

    /// Whether the agent's VM `name` is domain `uuid`.
    fn owns(&self, name: &str, uuid: &str) -> bool {
        self.vms
            .get(name)
            .is_some_and(|vm| vm.record.source.libvirt_uuid() == Some(uuid))
    }

    fn place(&mut self, record: &VmRecord) {
        match state::place_foreign(&self.settings.state_dir, record) {
            Ok(_) => {}
            Err(e) => {
                tracing::error!("{}: libvirt domain not taken: {e}", record.name);
                if let (Some(w), Some(uuid)) = (self.libvirt.as_mut(), record.source.libvirt_uuid())
                {
                    w.members.remove(uuid);
                    w.others.insert(
                        uuid.to_owned(),
                        Other {
                            mtime: None,
                            file: None,
                            why: e.to_string(),
                        },
                    );
                }
            }
        }
    }

    /// A domain that stopped running here: the VM ends now (nothing after this is charged
    /// here), its final balance goes into its persistent definition, its dir goes.
    fn depart(&mut self, uuid: &str, name: &str, how: &str) {
        if self.owns(name, uuid) {
            self.end(name);
        }
        let path = state::ledger_path(&self.settings.data_dir, name);
        let host = self
            .libvirt
            .as_ref()
            .map(|w| w.host.clone())
            .unwrap_or_default();
        let cp = LedgerFile::load(&path)
            .ok()
            .flatten()
            .filter(|f| {
                f.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
            })
            .and_then(|f| checkpoint_of(&f, uuid, &host));
        if let (Some(cp), Some(w)) = (cp, self.libvirt.as_mut()) {
            match w.write_checkpoint(uuid, &cp, false) {
                Ok(()) => {}
                // Undefined, or migrated away with its definition: the checkpoint went with it.
                Err(e) => tracing::debug!("{name}: departure checkpoint not written: {e}"),
            }
        }
        self.remove_dir(name, uuid);
        if let Some(w) = self.libvirt.as_mut() {
            w.members.remove(uuid);
        }
        tracing::info!("{name}: libvirt domain left ({how})");
    }

    /// Removes domain `uuid`'s runtime dir `name` (never a dir another VM holds).
    fn remove_dir(&mut self, name: &str, uuid: &str) {
        let ours = state::find(&self.settings.state_dir, name)
            .is_none_or(|(r, _)| r.source.libvirt_uuid() == Some(uuid));
        if ours {
            state::remove_foreign(&self.settings.state_dir, name);
        }
    }

    /// Writes domain `uuid`'s checkpoint from its running VM (`force`: even when its balance
    /// has not moved since the last).
    fn checkpoint_one(&mut self, uuid: &str, force: bool) {
        let Some(w) = self.libvirt.as_mut() else {
            return;
        };
        let Some(m) = w.members.get(uuid) else {
            return;
        };
        let Some(vm) = self
            .vms
            .get(&m.name)
            .filter(|vm| vm.record.source.libvirt_uuid() == Some(uuid))
        else {
            return;
        };
        let cp = checkpoint_now(vm, uuid, &w.host);
        let due = force
            || w.urgent.contains(uuid)
            || m.checkpointed
                .as_ref()
                .is_none_or(|(at, b)| at.elapsed() >= CHECKPOINT_EVERY && *b != cp.balances);
        if !due {
            return;
        }
        let name = m.name.clone();
        match w.write_checkpoint(uuid, &cp, true) {
            Ok(()) => {
                w.urgent.remove(uuid);
                if let Some(m) = w.members.get_mut(uuid) {
                    m.checkpointed = Some((Instant::now(), cp.balances));
                }
            }
            Err(e) => tracing::warn!("{name}: checkpoint not written into its metadata: {e}"),
        }
    }

    /// Asks for `record`'s checkpoint at the next rescan (its balance was set, its config
    /// applied): a domain saved or migrated right after carries it.
    pub(super) fn checkpoint_soon(&mut self, record: &VmRecord) {
        if let (Some(w), Some(uuid)) = (self.libvirt.as_mut(), record.source.libvirt_uuid()) {
            w.urgent.insert(uuid.to_owned());
        }
    }

    /// Writes the checkpoints that are due (`force`: all, as the agent stops).
    pub(super) fn checkpoint_domains(&mut self, force: bool) {
        let uuids: Vec<String> = self
            .libvirt
            .as_ref()
            .map(|w| w.members.keys().cloned().collect())
            .unwrap_or_default();
        for uuid in uuids {
            self.checkpoint_one(&uuid, force);
        }
    }
}

/// A summary of [`Published`] for `check`: the domains in the fleet and the others with why.
pub fn read_published(state_dir: &Path) -> Option<Published> {
    let bytes = std::fs::read(state_dir.join(LIBVIRT_JSON)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The domains [`read_published`] lists, by name.
pub fn by_name(p: &Published) -> BTreeMap<String, &PublishedDomain> {
    p.domains.iter().map(|d| (d.name.clone(), d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_patterns_match_with_stars() {
        assert!(glob("web-*", "web-1"));
        assert!(!glob("web-*", "db-1"));
        assert!(glob("*-test-*-b", "bq-test-12-b"));
        assert!(!glob("*-test-*-b", "bq-test-12-c"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
        assert!(glob("*", "anything") && glob("a*a", "aa") && !glob("a*a", "a"));
    }
}
