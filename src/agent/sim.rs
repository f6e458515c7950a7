//! The agent's loop driven step by step, for `benches/agent_scale.rs`, which times it on a
//! synthetic host (a `/proc` and a cgroup tree of plain files, given by [`Settings::proc`] and
//! the enforcer's mount). Not an interface: hidden from the docs, used by nothing else.
//!
//! [`Agent::run`] does, each second: a rescan, and five ticks of which one finds the ledgers'
//! save, each VM's publish and the contention period due. Its clock decides what is due; a
//! bench's seconds do not follow the clock (faster with few VMs, slower with many, where the
//! agent would fall behind and save and publish at every tick), so [`Driver::due`] says before
//! each tick whether the once-a-second work is due. The metrics are kept as with `--metrics-listen`, without the
//! server (a scrape is the scraper's cost, not the loop's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Agent, AgentError, Events, Settings};
use crate::enforce::Enforcer;

/// An agent and its event sources, stepped by hand.
pub struct Driver {
    agent: Agent,
    events: Events,
    /// The history's clock: one second per due tick.
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

    /// Whether the next tick is the one of its second that saves the ledgers, publishes every
    /// VM and ends a contention period (`true`: the history's clock also moves one second on),
    /// or one that does none of these. Every fifth such second also saves the steady ledgers
    /// (the agent's [`super::vm::STEADY_SAVE_EVERY`]).
    pub fn due(&mut self, due: bool) {
        let now = Instant::now();
        let ago = |d: Duration| now.checked_sub(d).unwrap_or(now);
        let when = if due {
            ago(Duration::from_secs(1))
        } else {
            now
        };
        self.agent.last_persist = when;
        self.agent.last_period = when;
        for vm in self.agent.vms.values_mut() {
            vm.last_publish = when;
        }
        self.now_s += u64::from(due);
        let steady = super::vm::STEADY_SAVE_EVERY;
        self.agent.last_steady_round = match due && self.now_s.is_multiple_of(steady.as_secs()) {
            true => ago(steady),
            false => now,
        };
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
