//! A VM's life in the agent: found by a scan of the state dir, adopted (its ledger restored and
//! charged for the gap, its config read, its threads put under the enforcer), its config
//! reloaded on every edit (the last good one kept), and ended (ledger and history saved, its
//! enforcement removed).

use std::fs;
use std::io;
use std::path::Path;

use super::*;
use crate::config;
use crate::credit::{Credits, Ledger};
use crate::state::{self, Liveness, VmRecord};

impl Agent {
    /// Adopts VMs that appeared and lets go of those that ended.
    pub(super) fn scan(&mut self, watcher: &mut notify::RecommendedWatcher) {
        let records = state::running(&self.settings.state_dir);
        let ended: Vec<String> = self
            .vms
            .iter()
            .filter(|(name, vm)| {
                !records.iter().any(|(r, _)| {
                    r.name == **name
                        && r.pid == vm.record.pid
                        && r.qemu_start == vm.record.qemu_start
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in ended {
            self.end(&name);
        }
        // Orphans whose QEMU has exited have no launcher to remove their directory.
        for name in state::reap_gone(&self.settings.state_dir) {
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
                None => self.adopt(record, orphaned, watcher),
            }
        }
    }

    pub(super) fn adopt(
        &mut self,
        record: VmRecord,
        orphaned: bool,
        watcher: &mut notify::RecommendedWatcher,
    ) {
        let name = record.name.clone();
        // Watch before reading, so an edit made between the two is not missed.
        self.watch_config(&record.config, watcher);
        let (cfg, stale) = match config::load(&record.config) {
            Ok(c) if c.policy.vcpus() == record.vcpus => (c, None),
            Ok(c) => (
                fallback_config(&record),
                Some(vcpus_mismatch(&c, record.vcpus)),
            ),
            Err(e) => (fallback_config(&record), Some(e.to_string())),
        };
        if let Some(why) = &stale {
            tracing::error!("{name}: {why}; using the launch settings");
        }
        let path = state::ledger_path(&self.settings.data_dir, &name);
        let saved = LedgerFile::load(&path).unwrap_or_else(|e| {
            tracing::error!(
                "{name}: unreadable ledger {e}; starting a new one (the old file is kept as .bad)"
            );
            let _ = fs::rename(&path, path.with_extension("json.bad"));
            None
        });
        let now_ns = boottime_ns();
        let cpu = read_cpu(&record);
        let mut vm = match saved.filter(|s| s.vcpus == record.vcpus) {
            Some(s) => {
                let mut vm = new_vm(
                    record,
                    Ledger::restore(cfg.policy.clone(), s.balances),
                    cpu,
                    now_ns,
                );
                vm.credits_applied = s.credits_applied;
                vm.used_total = s.used_total;
                // Same QEMU, same boot: charge exactly what happened since the last save.
                if let Some(c) = s.checkpoint.filter(|c| {
                    c.boot_id == state::boot_id()
                        && c.qemu_pid == vm.record.pid
                        // A start time of 0 (unknown) identifies no process.
                        && c.qemu_start != 0
                        && c.qemu_start == vm.record.qemu_start
                }) {
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
                        "{}: re-adopted; charged {:.3} s of CPU over {:.1} s since the last save",
                        vm.record.name,
                        used as f64 / 1e9,
                        elapsed as f64 / 1e9
                    );
                }
                vm
            }
            None => new_vm(
                record,
                Ledger::new(cfg.policy.clone(), cfg.initial_credits),
                cpu,
                now_ns,
            ),
        };
        vm.stale = stale;
        vm.orphaned = orphaned;
        apply_override(&mut vm, &cfg);
        self.manage_disks(&mut vm, cfg.disk_share);
        // Only threads of this QEMU are ever moved: a recorded id that is no longer one of its
        // threads (reused by another process) is dropped, never enforced on.
        vm.record.vcpu_tids.retain(|&tid| {
            let own = Path::new(&format!("/proc/{}/task/{tid}", vm.record.pid)).exists();
            if !own {
                tracing::error!(
                    "{name}: vCPU thread {tid} is not a thread of QEMU (pid {}); not enforced",
                    vm.record.pid
                );
            }
            own
        });
        if let Err(e) = self.enforcer.attach(&vm.record) {
            tracing::error!("{name}: cannot enforce credits: {e:#}");
        }
        tracing::info!(
            "{name}: adopted (pid {}, vCPU threads {:?}), balance {}",
            vm.record.pid,
            vm.record.vcpu_tids,
            vm.ledger.balances().balance()
        );
        vm.history = load_history(&self.settings.data_dir, &name);
        self.enforce(&mut vm);
        publish(&self.settings.state_dir, &mut vm);
        persist(&self.settings.data_dir, &mut vm);
        self.vms.insert(name, vm);
    }

    pub(super) fn watch_config(&mut self, config: &Path, watcher: &mut notify::RecommendedWatcher) {
        use notify::Watcher;
        let Some(dir) = config.parent() else { return };
        if self.watched.insert(dir.to_owned()) {
            if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::error!("cannot watch {} for edits: {e}", dir.display());
                self.watched.remove(dir);
            }
        }
    }

    /// Puts the VM's disks under the disk stages, or takes them out (`share` `None`).
    pub(super) fn manage_disks(&mut self, vm: &mut Vm, share: Option<f64>) {
        if let Some(disks) = self.disks.as_mut() {
            disks.set_share(&vm.record.name, share, vm.record.qmp_socket.clone());
            vm.disk = disks.view(&vm.record.name);
        }
    }

    pub(super) fn end(&mut self, name: &str) {
        if let Some(d) = self.disks.as_mut() {
            d.forget(name);
        }
        if let Some(mut vm) = self.vms.remove(name) {
            measure_and_tick(&mut vm);
            persist(&self.settings.data_dir, &mut vm);
            save_history(&self.settings.data_dir, &mut vm, true);
            if let Err(e) = self.enforcer.detach(name) {
                tracing::warn!("{name}: {e:#}");
            }
            tracing::info!(
                "{name}: ended; balance {} saved",
                vm.ledger.balances().balance()
            );
        }
    }

    /// Applies an edit of the VM's config file, or records why it cannot be.
    pub(super) fn reload(&mut self, name: &str) {
        let Some(mut vm) = self.vms.remove(name) else {
            return;
        };
        match config::load(&vm.record.config) {
            Ok(cfg) if cfg.policy.vcpus() != vm.record.vcpus => {
                let why = vcpus_mismatch(&cfg, vm.record.vcpus);
                tracing::error!("{name}: {why}; the last good config stays in force");
                vm.stale = Some(why);
            }
            Ok(cfg) => {
                // Account up to now under the old policy, then switch.
                measure_and_tick(&mut vm);
                if let Err(e) = vm.ledger.set_policy(cfg.policy.clone()) {
                    tracing::error!("{name}: {e}");
                }
                apply_override(&mut vm, &cfg);
                self.manage_disks(&mut vm, cfg.disk_share);
                if vm.stale.take().is_some() {
                    tracing::info!("{name}: config valid again");
                }
                tracing::info!(
                    "{name}: config applied: baseline {} %, {} mode, grant {:.2} %",
                    cfg.policy.baseline().percent(),
                    cfg.policy.mode(),
                    vm.ledger.grant().rate.percent_of(vm.record.vcpus)
                );
                self.enforce(&mut vm);
                persist(&self.settings.data_dir, &mut vm);
            }
            Err(e) if matches!(&e, config::ConfigError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound) =>
            {
                // An editor between unlink and rename; the next event brings the new file.
            }
            Err(e) => {
                tracing::error!("{e}; the last good config stays in force");
                vm.stale = Some(e.to_string());
            }
        }
        publish(&self.settings.state_dir, &mut vm);
        self.vms.insert(name.to_owned(), vm);
    }
}
