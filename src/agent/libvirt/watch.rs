//! The watcher of one libvirt connection: which running domains are in the fleet, and at each
//! poll what became of them, as [`Action`]s for the agent (`apply.rs` carries them out).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::publish::{self, Published};
use crate::agent::domain::{combined_config, host_name};
use crate::agent::vm_config::Unusable;
use crate::agent::LibvirtSettings;
use crate::base::{chain, validate_name};
use crate::control::Control;
use crate::credit::Balances;
use crate::enforce::cgroup::{self, Version};
use crate::procfs::Proc;
use crate::source::libvirt::control::{state_name, LibvirtControl, Pool};
use crate::source::libvirt::discover::{discover, Expected, Found};
use crate::source::libvirt::lifecycle::{self, Departure, Event, Seen};
use crate::source::libvirt::metadata::{self, Checkpoint, CHECKPOINT_NS, CONFIG_NS};
use crate::source::libvirt::status;
use crate::state::{self, Source, VmRecord};

/// What the agent does for the watcher.
pub(super) enum Action {
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
pub(super) struct Member {
    pub(super) name: String,
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
    pub(super) checkpointed: Option<(Instant, Balances)>,
    /// Whether it has a persistent definition (asked once).
    pub(super) persistent: Option<bool>,
}

/// A running domain not in the fleet: why, and the status file's time when that was decided.
pub(super) struct Other {
    pub(super) mtime: Option<SystemTime>,
    /// Its `vms/NAME.toml`'s modification time (`None`: no file): an edit that makes a refused
    /// file agree with the element is seen at the next poll.
    pub(super) file: Option<SystemTime>,
    pub(super) why: String,
}

/// The watcher of one libvirt connection.
pub(in crate::agent) struct Watch {
    settings: LibvirtSettings,
    /// Where the domains' processes are read (the agent's [`super::Settings::proc`]).
    proc: Proc,
    pub(super) pool: Arc<Pool>,
    version: Option<Version>,
    last: Option<Vec<Seen>>,
    pub(super) members: HashMap<String, Member>,
    pub(super) others: HashMap<String, Other>,
    down: Option<String>,
    pub(super) host: String,
    pub(super) published: Published,
    /// Domains whose checkpoint is written at the next chance, not at its interval (their
    /// balance was set, their config applied).
    pub(super) urgent: std::collections::HashSet<String>,
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
    /// A watcher for `settings`, reading processes under `proc`, knowing the libvirt VMs
    /// already in `state_dir` (an agent that restarts picks them up where the last one left
    /// them).
    pub(super) fn new(settings: LibvirtSettings, proc: Proc, state_dir: &Path) -> Watch {
        let mut w = Watch {
            proc,
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
            self.proc.root(),
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
            boot_id: self.proc.boot_id(),
            source: Source::Libvirt {
                uri: self.settings.uri.clone(),
                uuid: s.uuid.clone(),
                cgroup,
            },
            agent_socket: None,
        }
    }

    /// One poll: what happened since the last, as actions for the agent.
    pub(super) fn poll(&mut self) -> Vec<Action> {
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
        let pattern = self.settings.domains.as_deref();
        let domains = publish::running(
            seen.iter()
                .filter(|s| pattern.is_none_or(|p| glob(p, &s.name))),
            |uuid| self.members.contains_key(uuid),
            |uuid| self.others.get(uuid).map(|o| o.why.clone()),
        );
        self.published.connected = true;
        self.published.error = None;
        self.published.domains = domains;
    }
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

    #[test]
    fn a_domain_is_found_in_the_agents_proc_not_the_hosts() {
        use crate::source::libvirt::discover::fixture::{fixture, status, UUID as uuid};
        use crate::source::libvirt::lifecycle::State;
        use std::fs;
        // pid 100 and its threads exist only in this tree (the host's pid 100, if any, is not
        // a QEMU with thread 101 named `CPU 0/TCG`).
        let f = fixture(
            &status("<vcpu id='0' pid='101'/>"),
            &[(100, "qemu-system-x86"), (101, "CPU 0/TCG")],
        );
        let (dir, run, proc) = (f.dir.path(), f.run.clone(), f.proc.clone());
        fs::create_dir_all(proc.join("sys/kernel/random")).unwrap();
        fs::write(proc.join("sys/kernel/random/boot_id"), "sim-boot\n").unwrap();
        let settings = LibvirtSettings {
            uri: "test:///default".into(),
            run_dir: run,
            vms_dir: dir.join("vms"),
            domains: None,
        };
        let w = Watch::new(settings, Proc::at(&proc), &dir.join("state"));
        let seen = Seen {
            uuid: uuid.into(),
            name: "dom".into(),
            id: Some(7),
            state: State::Running,
            reason: 1,
            vcpus: 1,
        };
        let found = w.discover(&seen).unwrap();
        assert_eq!((found.pid, found.qemu_start), (100, 4242));
        assert_eq!(found.vcpu_tids, [101]);
        let record = w.record(&seen, &found, 20.0, crate::credit::Mode::Standard);
        assert_eq!(record.boot_id, "sim-boot");
    }
}
