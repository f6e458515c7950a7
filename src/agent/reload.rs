//! Settings taken while the agent runs: an edit of its configuration file.
//!
//! The agent does not read the file itself (the command line owns its keys, their precedence
//! and their errors): it is handed a [`Reload`], watches the file's directory, and on an edit
//! asks it for the new [`Settings`]. It applies what can change under running VMs and keeps
//! the rest, saying that a restart is needed:
//!
//! | applied at once | needs a restart |
//! |---|---|
//! | the contention stage's capacity and spare rule | turning the stage on or off; the enforcer and its cgroups |
//! | the disk bandwidth's value | turning disk management on or off |
//! | the pinning balancer's interval | turning it on or off; its CPUs |
//! | the memory coordinator's interval, idle tax, host reserve, pool and trace file | turning it on or off; its policy |
//! | the idle exit | the state and data dirs; the metrics address |
//!
//! The command line's [`Reload`] already keeps the values of keys that need a restart (and
//! logs them, naming the file's line); the checks here keep the agent right on its own.

use std::path::PathBuf;

use super::{Agent, Settings};
use crate::credit::PPM_PER_CPU;

/// Where the agent's settings come from while it runs.
pub struct Reload {
    /// The file whose edits are read (absolute: compared with the watcher's paths).
    pub path: PathBuf,
    /// Reads the settings again: the new settings, or why they cannot be taken (logged; the
    /// settings in force stay).
    pub load: Box<dyn FnMut() -> Result<Settings, String>>,
}

impl Agent {
    /// Reads the settings again and applies them.
    pub(super) fn reload_settings(&mut self) {
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        match (reload.load)() {
            Ok(new) => self.apply_settings(new),
            Err(e) => tracing::error!("{e}; the settings in force stay"),
        }
    }

    /// Takes what can change at run time from `new`; logs what cannot.
    fn apply_settings(&mut self, new: Settings) {
        let restart = |what: &str| {
            tracing::warn!("{what} changed: restart the agent to apply it (kept as it was)");
        };
        let old = &self.settings;
        if new.state_dir != old.state_dir || new.data_dir != old.data_dir {
            restart("the state or data dir");
        }
        if new.metrics_listen != old.metrics_listen {
            restart("the metrics address");
        }
        match (self.contention.as_mut(), new.contention) {
            (Some(stage), Some(capacity)) if stage.capacity() != capacity => {
                stage.set_capacity(capacity);
                tracing::info!(
                    "contention stage: capacity {:.2} CPUs",
                    capacity.0 as f64 / PPM_PER_CPU as f64
                );
            }
            (Some(_), Some(_)) => {}
            (None, None) => {}
            _ => restart("turning the contention stage on or off"),
        }
        // The spare rule changes at once (the stage keeps every VM's window whatever the rule,
        // and a dispatcher takes the new weights with the next `entitle`), unless the stage
        // is being turned on or off, which waits for a restart with the rest of it.
        let rule_changes = new.spare_rule != old.spare_rule
            && self.contention.is_some() == new.contention.is_some();
        if rule_changes {
            if let Some(stage) = self.contention.as_mut() {
                stage.set_rule(new.spare_rule);
            }
            tracing::info!("spare rule: {}", new.spare_rule);
        }
        match (self.disks.as_mut(), new.disk_bandwidth) {
            (Some(disks), Some(bandwidth)) if disks.bandwidth() != bandwidth => {
                disks.set_bandwidth(bandwidth);
                tracing::info!(
                    "disk stage: bandwidth {} B/s read, {} B/s write",
                    bandwidth.read.0,
                    bandwidth.write.0
                );
            }
            (Some(_), Some(_)) => {}
            (None, None) => {}
            _ => restart("turning disk management on or off"),
        }
        match (self.balancer.as_mut(), &new.balance) {
            (Some(balancer), Some((cpus, interval))) => {
                if old.balance.as_ref().is_some_and(|(_, i)| i != interval) {
                    balancer.set_interval(*interval);
                    tracing::info!("pinning balancer: every {interval:?}");
                }
                if old.balance.as_ref().is_some_and(|(c, _)| c != cpus) {
                    restart("the pinning balancer's CPUs");
                }
            }
            (None, None) => {}
            _ => restart("turning the pinning balancer on or off"),
        }
        match (self.memory.as_ref(), &new.memory) {
            (Some(coordinator), Some(memory)) => {
                let policy = old.memory.as_ref().map(|m| m.planner.policy);
                if policy != Some(memory.planner.policy) {
                    restart("the memory policy");
                } else if old.memory.as_ref() != Some(memory) {
                    coordinator.update(memory.clone());
                }
            }
            (None, None) => {}
            _ => restart("turning the memory coordinator on or off"),
        }
        let settings = &mut self.settings;
        settings.idle_exit = new.idle_exit;
        if rule_changes {
            settings.spare_rule = new.spare_rule;
        }
        settings.contention = self.contention.as_ref().map(|c| c.capacity());
        settings.disk_bandwidth = self.disks.as_ref().map(|d| d.bandwidth());
        if let (Some(kept), Some((_, interval))) = (settings.balance.as_mut(), new.balance) {
            kept.1 = interval;
        }
        if let (Some(kept), Some(memory)) = (settings.memory.as_mut(), new.memory) {
            if kept.planner.policy == memory.planner.policy {
                *kept = memory;
            }
        }
    }
}
