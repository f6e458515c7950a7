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

use std::collections::HashMap;
use std::fs;

use super::vm::{fallback_config, load_history, read_cpu, Vm};
use super::vm_config::{read_config, Unusable};
use super::{Agent, Events, LedgerFile};
use crate::base::{boottime_ns, chain};
use crate::config::VmConfig;
use crate::credit::{Credits, Ledger};
use crate::state::{self, Liveness, VmRecord};

impl Agent {
    /// Adopts VMs that appeared and lets go of those that ended.
    pub(super) fn scan(&mut self, events: &mut Events) {
        let (records, gone) = state::survey(&self.settings.state_dir, &self.settings.proc);
        // Looked up by name: a search of the records per VM made the rescan quadratic.
        let found: HashMap<&str, (u32, u64)> = records
            .iter()
            .map(|(r, _)| (r.name.as_str(), (r.pid, r.qemu_start)))
            .collect();
        let ended: Vec<String> = self
            .vms
            .iter()
            .filter(|(name, vm)| {
                found.get(name.as_str()) != Some(&(vm.record.pid, vm.record.qemu_start))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in ended {
            self.end(&name);
        }
        // Orphans whose QEMU has exited have no launcher to remove their directory.
        for name in state::reap_named(&self.settings.state_dir, gone, &self.settings.proc) {
            tracing::info!("{name}: QEMU has exited without its launcher; runtime dir removed");
        }
        for (record, liveness) in records {
            let orphaned = liveness == Liveness::Orphaned;
            match self.vms.get_mut(&record.name) {
                Some(vm) => {
                    if orphaned && !vm.orphaned {
                        tracing::warn!(
                            "{}: its launcher (pid {}) is gone; QEMU (pid {}) runs on, and its credits are still charged and enforced",
                            record.name,
                            record.wrapper_pid,
                            record.pid
                        );
                    }
                    vm.orphaned = orphaned;
                }
                None => self.adopt(record, orphaned, events),
            }
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
        let mut vm = self.restore(record, &cfg);
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
        let Some(s) = saved.filter(|s| s.vcpus == record.vcpus || domain) else {
            let ledger = Ledger::new(cfg.policy.clone(), cfg.initial_credits);
            let mut vm = Vm::new(
                &self.settings.proc,
                record,
                ledger,
                cfg.clone(),
                cpu,
                now_ns,
            );
            super::domain::continue_from_checkpoint(&mut vm, checkpoint, 0);
            return vm;
        };
        let local_saved_ns = s.saved_unix_ns;
        let ledger = Ledger::restore(cfg.policy.clone(), s.balances);
        let mut vm = Vm::new(
            &self.settings.proc,
            record,
            ledger,
            cfg.clone(),
            cpu,
            now_ns,
        );
        vm.credits_applied = s.credits_applied;
        vm.used_total = s.used_total;
        // Same QEMU, same boot: charge exactly what happened since the last save.
        let same = s.checkpoint.filter(|c| {
            c.boot_id == self.settings.proc.boot_id()
                && c.qemu_pid == vm.record.pid
                // A start time of 0 (unknown) identifies no process.
                && c.qemu_start != 0
                && c.qemu_start == vm.record.qemu_start
        });
        if let Some(c) = same {
            let used: u64 = vm
                .cpu
                .iter()
                .map(|(tid, ns)| {
                    let before = c
                        .cpu_ns
                        .iter()
                        .find(|(t, _)| t == tid)
                        .map_or(*ns, |(_, b)| *b);
                    ns.saturating_sub(before)
                })
                .sum();
            let elapsed = now_ns.saturating_sub(c.boottime_ns);
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
        if let Some(disks) = self.disks.as_mut() {
            disks.set_share(
                &vm.record.name,
                cfg.disk_share,
                vm.record.qmp_socket.clone(),
            );
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
