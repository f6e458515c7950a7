//! A VM's life in the agent: found by a scan of the state dir, adopted (its ledger restored and
//! charged for the gap, its config read, its threads put under the enforcer), its config
//! reloaded on every edit (the last good one kept), and ended (ledger and history saved, its
//! enforcement removed).
//!
//! A VM's config takes one path, at adoption and at every edit: the file is parsed and
//! validated ([`crate::config::load`]), checked against the running VM
//! ([`read_config`](super::vm_config::read_config)), and applied
//! ([`Agent::apply_config`]): policy, balance override, CPU list, disk share and memory
//! settings, each to the stage that uses it. Files are read only then: never once per tick.

use std::fs;
use std::sync::Arc;

use super::liveness::Watch;
use super::vm::{fallback_config, load_history, read_cpu, Vm};
use super::vm_config::{read_config, Unusable};
use super::{Agent, Checkpoint, Events, LedgerFile};
use crate::base::{boottime_ns, chain};
use crate::config::VmConfig;
use crate::credit::{Credits, Ledger};
use crate::state::{self, Liveness, VmRecord};

impl Agent {
    /// Adopts VMs that appeared and lets go of those that ended. The records of the VMs the
    /// agent manages are not read again: their runtime dirs' presence (the listing) and their
    /// watches (a pidfd poll and a lock probe, no file opened) say whether they live.
    pub(super) fn scan(&mut self, events: &mut Events) {
        let (records, mut gone, present) =
            state::survey_except(&self.settings.state_dir, &self.settings.proc, |n| {
                self.vms.contains_key(n)
            });
        let mut ended = Vec::new();
        for (name, vm) in &mut self.vms {
            let liveness = if present.contains(name) {
                vm.watch.liveness(&vm.record, &self.settings.proc)
            } else {
                Liveness::Gone
            };
            if liveness == Liveness::Gone {
                ended.push(name.clone());
                continue;
            }
            let orphaned = liveness == Liveness::Orphaned;
            if orphaned && !vm.orphaned {
                tracing::warn!(
                    "{}: its launcher (pid {}) is gone; QEMU (pid {}) runs on, and its credits are still charged and enforced",
                    name,
                    vm.record.wrapper_pid,
                    vm.record.pid
                );
            }
            vm.orphaned = orphaned;
        }
        for name in ended {
            self.end(&name);
            if present.contains(&name) {
                gone.push(name);
            }
        }
        // Orphans whose QEMU has exited have no launcher to remove their directory (each is
        // looked at again before it is removed).
        for name in state::reap_named(&self.settings.state_dir, gone, &self.settings.proc) {
            tracing::info!("{name}: QEMU has exited without its launcher; runtime dir removed");
        }
        for (record, liveness) in records {
            self.adopt(record, liveness == Liveness::Orphaned, events);
        }
    }

    /// A VM's config: its file, and for a libvirt domain its `<metadata>` element too.
    fn config_of(&self, record: &VmRecord) -> Result<VmConfig, Unusable> {
        match record.source.libvirt_uuid() {
            Some(uuid) => {
                super::domain::combined_config(record, self.metadata_element(uuid).as_deref())
            }
            None => read_config(record),
        }
    }

    /// Takes a VM under management: its ledger (restored, or new), its config, its threads.
    pub(super) fn adopt(&mut self, mut record: VmRecord, orphaned: bool, events: &mut Events) {
        let name = record.name.clone();
        if let state::Source::Libvirt { uri, .. } = &record.source {
            if !self.serves_libvirt(uri) {
                self.release_unwatched(&record);
                return;
            }
        }
        // Watch before reading, so an edit made between the two is not missed.
        events.watch_config(&record.config);
        let (cfg, stale) = match self.config_of(&record) {
            Ok(c) => (c, None),
            Err(Unusable::Missing) => (
                fallback_config(&record),
                Some(format!("{}: no such file", record.config.display())),
            ),
            Err(Unusable::Invalid(why)) => (fallback_config(&record), Some(why)),
        };
        if let Some(why) = &stale {
            tracing::error!("{name}: {why}; using the launch settings");
        }
        // Only threads of this QEMU are ever moved: a recorded id that is no longer one of its
        // threads (reused by another process) is dropped, never enforced on.
        record.vcpu_tids.retain(|&tid| {
            let own = self.settings.proc.is_thread_of(record.pid, tid);
            if !own {
                tracing::error!(
                    "{name}: vCPU thread {tid} is not a thread of QEMU (pid {}); not enforced",
                    record.pid
                );
            }
            own
        });
        // A new handle, unless this QEMU has one already (a VM of this name that ran before
        // had its own QEMU).
        if !self.qmp.get(&name).is_some_and(|h| h.serves(&record)) {
            self.qmp.insert(
                name.clone(),
                Arc::new(crate::control::Qmp::for_agent(&record)),
            );
        }
        let mut vm = self.restore(record, &cfg);
        vm.watch = Watch::new(
            &self.settings.state_dir.join(&name),
            &vm.record,
            &self.settings.proc,
        );
        vm.stale = stale;
        vm.orphaned = orphaned;
        vm.history = load_history(&self.settings.data_dir, &name);
        vm.history_saved_t = vm.history.fine().samples().last().map_or(0, |s| s.t);
        if let Err(e) = self.enforcer.attach(&vm.record) {
            tracing::error!("{name}: cannot enforce credits: {}", chain(&e));
        }
        tracing::info!(
            "{name}: adopted (pid {}, vCPU threads {:?}), balance {}",
            vm.record.pid,
            vm.record.vcpu_tids,
            vm.ledger.balances().balance()
        );
        let _ = self.apply_config(&mut vm, cfg);
        vm.publish(&self.settings.state_dir);
        self.persist(&mut vm);
        self.vms.insert(name, vm);
        // A `credits --set` may have come before the VM was adopted.
        self.requests_due = true;
        self.share_memory_members();
    }

    /// The VM with its saved ledger (charged exactly for the gap since the last save when it is
    /// the same QEMU of the same boot), or a new ledger with the config's launch credits. A
    /// libvirt domain continues only its own ledger, or its metadata checkpoint when that is
    /// newer (see [`super::domain`]); its vCPU count may change (hotplug) with its balance kept.
    fn restore(&mut self, record: VmRecord, cfg: &VmConfig) -> Vm {
        let name = record.name.clone();
        let path = state::ledger_path(&self.settings.data_dir, &name);
        let mut saved = LedgerFile::load(&path).unwrap_or_else(|e| {
            tracing::error!(
                "{name}: unreadable ledger {e}; starting a new one (the old file is kept as .bad)"
            );
            let _ = fs::rename(&path, path.with_extension("json.bad"));
            None
        });
        let checkpoint = match record.source.libvirt_uuid().map(str::to_owned) {
            Some(uuid) => {
                saved = super::domain::own_ledger(&path, saved, &uuid);
                self.take_arrival_checkpoint(&uuid)
            }
            None => None,
        };
        let domain = checkpoint.is_some() || record.source.libvirt_uuid().is_some();
        let now_ns = boottime_ns();
        let cpu = read_cpu(&self.settings.proc, &record);
        let saved = saved.filter(|s| s.vcpus == record.vcpus || domain);
        let ledger = match &saved {
            Some(s) => Ledger::restore(cfg.policy.clone(), s.balances),
            None => Ledger::new(cfg.policy.clone(), cfg.initial_credits),
        };
        let mut vm = Vm::new(
            &self.settings.proc,
            record,
            ledger,
            cfg.clone(),
            cpu,
            now_ns,
        );
        let Some(s) = saved else {
            super::domain::continue_from_checkpoint(&mut vm, checkpoint, 0);
            return vm;
        };
        let local_saved_ns = s.saved_unix_ns;
        vm.credits_applied = s.credits_applied;
        vm.used_total = s.used_total;
        // Same QEMU, same boot: charge exactly what happened since the last save.
        let now = Checkpoint {
            boot_id: self.settings.proc.boot_id(),
            boottime_ns: now_ns,
            qemu_pid: vm.record.pid,
            qemu_start: vm.record.qemu_start,
            cpu_ns: vm.cpu.clone(),
        };
        let gap = s.checkpoint.and_then(|c| c.gap_to(&now));
        if let Some((elapsed, used)) = gap {
            vm.ledger.tick(elapsed, used);
            vm.used_total = Credits(vm.used_total.vcpu_ns() + used);
            tracing::info!(
                "{name}: re-adopted; charged {:.3} s of CPU over {:.1} s since the last save",
                used as f64 / 1e9,
                elapsed as f64 / 1e9
            );
        } else {
            super::domain::continue_from_checkpoint(&mut vm, checkpoint, local_saved_ns);
        }
        vm
    }

    /// Puts a valid config in force: the policy (the ledger re-plans its grant), a balance
    /// override once per change of its value, the CPU list, the disk share, the memory
    /// settings; then enforces the new grant. The one path for adoption and every edit. The
    /// caller, once the VM is back among the agent's, tells the memory coordinator when this
    /// returns `true` (its memory settings changed).
    #[must_use]
    pub(super) fn apply_config(&mut self, vm: &mut Vm, cfg: VmConfig) -> bool {
        if let Err(e) = vm.ledger.set_policy(cfg.policy.clone()) {
            tracing::error!("{}: {e}", vm.record.name);
        }
        if cfg.credits != vm.credits_applied {
            if let Some(c) = cfg.credits {
                vm.ledger.set_balance(c);
                tracing::info!(
                    "{}: balance set to {c} (credits = in {})",
                    vm.record.name,
                    vm.record.config.display()
                );
            }
            vm.credits_applied = cfg.credits;
        }
        let qmp = self.qmp_of(&vm.record);
        if let Some(disks) = self.disks.as_mut() {
            disks.set_share(&vm.record.name, cfg.disk_share, &qmp);
            vm.disk = disks.view(&vm.record.name);
        }
        let memory_changed = vm.config.memory != cfg.memory;
        vm.config = cfg;
        self.enforce(vm);
        memory_changed
    }

    /// Lets go of a VM that ended: its ledger and history saved, its enforcement removed.
    pub(super) fn end(&mut self, name: &str) {
        if let Some(d) = self.disks.as_mut() {
            d.forget(name);
        }
        // The kept session closes with the handle's last holder (the workers drop theirs on
        // their next round).
        self.qmp.remove(name);
        if let Some(mut vm) = self.vms.remove(name) {
            vm.measure_and_tick();
            self.persist(&mut vm);
            state::remove_companion(&state::ledger_path(&self.settings.data_dir, name));
            vm.save_history(&self.settings.data_dir, true);
            if let Err(e) = self.enforcer.detach(name) {
                tracing::warn!("{name}: {}", chain(&e));
            }
            tracing::info!(
                "{name}: ended; balance {} saved",
                vm.ledger.balances().balance()
            );
            self.share_memory_members();
        }
    }

    /// Applies an edit of the VM's config file, or records why it cannot be (the last good
    /// config stays in force).
    pub(super) fn reload(&mut self, name: &str) {
        let Some(mut vm) = self.vms.remove(name) else {
            return;
        };
        let mut memory_changed = false;
        match self.config_of(&vm.record) {
            Ok(cfg) => {
                // Account up to now under the old policy, then switch.
                vm.measure_and_tick();
                memory_changed = self.apply_config(&mut vm, cfg);
                if vm.stale.take().is_some() {
                    tracing::info!("{name}: config valid again");
                }
                let p = &vm.config.policy;
                tracing::info!(
                    "{name}: config applied: baseline {} %, {} mode, grant {:.2} %",
                    p.baseline().percent(),
                    p.mode(),
                    vm.ledger.grant().rate.percent_of(vm.record.vcpus)
                );
                self.persist(&mut vm);
                self.checkpoint_soon(&vm.record);
            }
            Err(Unusable::Missing) => {}
            Err(Unusable::Invalid(why)) => {
                tracing::error!("{name}: {why}; the last good config stays in force");
                vm.stale = Some(why);
            }
        }
        vm.publish(&self.settings.state_dir);
        self.vms.insert(name.to_owned(), vm);
        if memory_changed {
            self.share_memory_members();
        }
    }
}
