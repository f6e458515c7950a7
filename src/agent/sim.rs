//! The agent's loop driven step by step, for `benches/agent_scale.rs`, which times it on a
//! synthetic host (a `/proc` and a cgroup tree of plain files, given by [`Settings::proc`] and
//! the enforcer's mount). Not an interface: hidden from the docs, used by nothing else.
//!
//! [`Agent::run`] does, each second: a rescan, and five ticks of which one finds the ledgers'
//! save, each VM's publish and the contention period due. Its clock decides what is due; a
//! bench runs seconds back to back, faster than the clock, so [`Driver::make_due`] says when a
//! second has passed instead. The metrics are kept as with `--metrics-listen`, without the
//! server (a scrape is the scraper's cost, not the loop's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Agent, AgentError, Events, Settings};
use crate::enforce::Enforcer;

/// An agent and its event sources, stepped by hand.
pub struct Driver {
    agent: Agent,
    events: Events,
    /// The history's clock: one second per [`Driver::make_due`].
    now_s: u64,
}

impl Driver {
    /// An agent over `enforcer` that has adopted the VMs of its state dir (the scan of
    /// [`Agent::run`]'s start). Like the agent, it blocks SIGINT and SIGTERM in the calling
    /// thread: [`Driver::rescan`] says when one arrived.
    pub fn start(settings: Settings, enforcer: Box<dyn Enforcer>) -> Result<Driver, AgentError> {
        let mut events = Events::start(&settings.state_dir)?;
        let mut agent = Agent::new(settings, enforcer);
        agent.metrics = Some(Arc::default());
        agent.scan(&mut events);
        Ok(Driver {
            agent,
            events,
            now_s: crate::base::unix_now(),
        })
    }

    /// How many VMs the agent holds.
    pub fn vms(&self) -> usize {
        self.agent.vms.len()
    }

    /// Ledger saves that failed so far (the agent's health counter).
    pub fn save_failures(&self) -> u64 {
        self.agent.health.ledger_save_failures
    }

    /// A second has passed: the next tick saves the ledgers, publishes every VM and ends a
    /// contention period, and the history's clock moves one second on.
    pub fn make_due(&mut self) {
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        self.agent.last_persist = past;
        self.agent.last_period = past;
        for vm in self.agent.vms.values_mut() {
            vm.last_publish = past;
        }
        self.now_s += 1;
    }

    /// The loop's once-a-second work besides its ticks: the file-system events that arrived,
    /// then the rescan (records, liveness, verification of enforcement, cleanup). `false` when
    /// SIGINT or SIGTERM arrived.
    pub fn rescan(&mut self) -> bool {
        let Some(changed) = self.events.wait(Instant::now()) else {
            return false;
        };
        if !changed.is_empty() {
            self.agent.handle_changes(&changed, &mut self.events);
        }
        self.agent.rescan(&mut self.events);
        true
    }

    /// One tick as [`Agent::run`] makes it: measure and charge every VM, contend, enforce,
    /// publish and save what is due, record the history; then the metrics.
    pub fn tick(&mut self) {
        let started = Instant::now();
        self.agent.tick(self.now_s);
        self.agent
            .health
            .observe_tick(started.elapsed().as_secs_f64());
        self.agent.update_metrics();
    }
}
