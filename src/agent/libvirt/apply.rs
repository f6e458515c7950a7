//! The agent's side of the libvirt watcher: starting it, answering for its domains (their
//! config element, arrival checkpoint, control handle), and carrying out what each poll found
//! (a domain placed in the state dir, departed, released, reloaded, taken again).

use std::sync::Arc;

use super::publish;
use super::watch::{Action, Other, Watch};
use crate::agent::domain::checkpoint_of;
use crate::agent::{Agent, Events, LedgerFile};
use crate::control::{Control, Unavailable};
use crate::source::libvirt::metadata::Checkpoint;
use crate::state::{self, VmRecord};

impl Agent {
    /// Starts the watcher when the settings ask for one.
    pub(in crate::agent) fn start_libvirt(&mut self) {
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
            let proc = self.settings.proc.clone();
            self.libvirt = Some(Watch::new(s, proc, &self.settings.state_dir));
        }
    }

    /// Whether this agent watches libvirt connection `uri`.
    pub(in crate::agent) fn serves_libvirt(&self, uri: &str) -> bool {
        self.libvirt.as_ref().is_some_and(|w| w.uri() == uri)
    }

    /// The `<config>` element in force for domain `uuid`.
    pub(in crate::agent) fn metadata_element(&self, uuid: &str) -> Option<String> {
        self.libvirt.as_ref().and_then(|w| w.element(uuid))
    }

    /// The checkpoint domain `uuid` arrived with (once).
    pub(in crate::agent) fn take_arrival_checkpoint(&mut self, uuid: &str) -> Option<Checkpoint> {
        self.libvirt.as_mut().and_then(|w| w.take_arrival(uuid))
    }

    /// A libvirt VM's control handle.
    pub(in crate::agent) fn libvirt_control(&self, record: &VmRecord) -> Arc<dyn Control> {
        match (&self.libvirt, record.source.libvirt_uuid()) {
            (Some(w), Some(uuid)) => w.control(&record.name, uuid),
            _ => Arc::new(Unavailable {
                name: record.name.clone(),
                why: "no libvirt connection is watched for this domain".into(),
            }),
        }
    }

    /// Polls libvirt and carries out what the poll found.
    pub(in crate::agent) fn poll_libvirt(&mut self, events: &mut Events) {
        let Some(w) = self.libvirt.as_mut() else {
            return;
        };
        let actions = w.poll();
        let published = w.published.clone();
        for a in actions {
            self.carry_out(a, events);
        }
        publish::write(&self.settings.state_dir, &published);
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
}
