//! The credit checkpoints of the libvirt domains in the fleet, written into their `<metadata>`
//! (live, and into the persistent definition when there is one): every
//! [`CHECKPOINT_EVERY`] when the balance moved, at once when it was set or the config applied,
//! and for all as the agent stops; a saved image or a migrated domain carries its credits.

use std::time::Instant;

use super::watch::Watch;
use crate::agent::domain::{checkpoint_now, CHECKPOINT_EVERY};
use crate::agent::Agent;
use crate::source::libvirt::conn::Scope;
use crate::source::libvirt::metadata::{self, Checkpoint, CHECKPOINT_NS, KEY};
use crate::state::VmRecord;

impl Watch {
    /// Writes domain `uuid`'s checkpoint `cp` into its metadata: `live` into the running
    /// domain, and into its persistent definition when it has one.
    pub(super) fn write_checkpoint(
        &mut self,
        uuid: &str,
        cp: &Checkpoint,
        live: bool,
    ) -> Result<(), String> {
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
    /// Writes domain `uuid`'s checkpoint from its running VM (`force`: even when its balance
    /// has not moved since the last).
    pub(super) fn checkpoint_one(&mut self, uuid: &str, force: bool) {
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
    pub(in crate::agent) fn checkpoint_soon(&mut self, record: &VmRecord) {
        if let (Some(w), Some(uuid)) = (self.libvirt.as_mut(), record.source.libvirt_uuid()) {
            w.urgent.insert(uuid.to_owned());
        }
    }

    /// Writes the checkpoints that are due (`force`: all, as the agent stops).
    pub(in crate::agent) fn checkpoint_domains(&mut self, force: bool) {
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
