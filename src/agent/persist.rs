//! The agent's durable saves: each VM's ledger (alone after an edit or a request, together
//! once a second otherwise) and their histories when a minute closes, batched so that a fleet
//! costs a few fsyncs a second, not a few per VM (see [`state::write_atomic_all`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{history_file, Agent, LedgerFile, Vm};
use crate::state;

impl Agent {
    /// Saves a VM's ledger, counting failures in the agent's health.
    pub(super) fn persist(&mut self, vm: &mut Vm) {
        if !vm.persist(&self.settings.data_dir) {
            self.health.ledger_save_failures += 1;
        }
    }

    /// Saves the histories of the VMs `names` whose minute closed, together (see
    /// [`state::write_atomic_all`]): every VM's minute closes in the same tick, and a save per
    /// VM made a new file and fsynced it and the directory, 500 VMs at once every minute.
    pub(super) fn save_histories(&mut self, names: &[String]) {
        let data_dir = &self.settings.data_dir;
        let (saved, files): (Vec<&String>, Vec<(PathBuf, Vec<u8>)>) = names
            .iter()
            .filter_map(|n| {
                let vm = self.vms.get(n)?;
                Some((
                    n,
                    (history_file::history_path(data_dir, n), vm.history.encode()),
                ))
            })
            .unzip();
        let (results, dir_synced) = write_batch(&history_file::history_dir(data_dir), &files);
        if !dir_synced {
            return;
        }
        for ((name, (path, _)), result) in saved.into_iter().zip(&files).zip(results) {
            match (result, self.vms.get_mut(name)) {
                (Ok(()), Some(vm)) => vm.history_saved(),
                (Err(e), _) => tracing::error!("saving {}: {e}", path.display()),
                (Ok(()), None) => {}
            }
        }
    }

    /// Saves the ledgers due at once (see [`state::write_atomic_all`]): one fsync of the
    /// ledger directory per interval, where a save per VM fsynced it once per VM (half the
    /// agent's CPU with 150 idle VMs, with the file fsyncs). A ledger that a restart would
    /// replay exactly waits (see [`Vm::save_due`]). A crash of the agent alone loses nothing.
    pub(super) fn persist_all(&mut self) {
        self.last_persist = Instant::now();
        // Steady ledgers are saved together, in one batch every STEADY_SAVE_EVERY: each file's
        // write-back is started before the first one is waited for, and one directory fsync
        // serves them all (saved each on its own 5-s clock, 100 idle VMs made a batch of 20
        // every second, each batch paying its waits and its directory fsync).
        let steady_round = self.last_steady_round.elapsed() >= super::vm::STEADY_SAVE_EVERY;
        if steady_round {
            self.last_steady_round = Instant::now();
        }
        let data_dir = &self.settings.data_dir;
        let mut due: Vec<(String, LedgerFile)> = Vec::new();
        let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        for (name, vm) in &self.vms {
            let file = vm.ledger_file();
            if !vm.save_due(&file, steady_round) {
                continue;
            }
            // Plain data always serializes; were it ever not, the VM is retried next interval.
            if let Ok(bytes) = file.to_bytes() {
                files.push((state::ledger_path(data_dir, name), bytes));
                due.push((name.clone(), file));
            }
        }
        if files.is_empty() {
            return;
        }
        let (results, dir_synced) = write_batch(&state::ledger_dir(data_dir), &files);
        if !dir_synced {
            self.health.ledger_save_failures += 1;
        }
        for (((name, file), (path, _)), result) in due.into_iter().zip(&files).zip(results) {
            let saved = self
                .vms
                .get_mut(&name)
                .is_some_and(|vm| vm.saved(path, file, result));
            if !saved {
                self.health.ledger_save_failures += 1;
            }
        }
    }
}

/// Writes `files`, all in `dir` (made when missing), as one [`state::write_atomic_all`] batch:
/// each file's result, and whether the directory's fsync succeeded (a failure is logged).
fn write_batch(dir: &Path, files: &[(PathBuf, Vec<u8>)]) -> (Vec<io::Result<()>>, bool) {
    if let Err(e) = fs::create_dir_all(dir) {
        tracing::debug!("creating {}: {e}", dir.display());
    }
    let (results, dir_synced) = state::write_atomic_all(dir, files, 0o644);
    if let Err(e) = &dir_synced {
        tracing::error!("cannot fsync {}: {e}", dir.display());
    }
    (results, dir_synced.is_ok())
}
