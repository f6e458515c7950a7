//! Enforcement: holding a VM's vCPU threads to a CPU rate. Mechanism only: how much a VM may
//! run is decided by the ledger; an [`Enforcer`] only makes the kernel keep to it.
//!
//! Implementations: [`cgroup::CgroupEnforcer`] (cgroup v1 and v2 CPU bandwidth) and
//! [`ghost::GhostEnforcer`] (the centralized ghOSt agent, scheduling the threads itself) and
//! [`scx::ScxEnforcer`] (burst-qemu's own sched_ext BPF scheduler, cgroup quota as backstop).
//!
//! CPU time used is measured by the agent from the kernel's own per-thread counters
//! ([`crate::procfs::Proc::thread_sched`]), the same for every enforcer: exact nanoseconds, not
//! samples.

pub mod cgroup;
pub mod ghost;
pub mod scx;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::contention::Entitlement;
use crate::credit::Rate;
use crate::state::VmRecord;

/// CLOCK_MONOTONIC, ns: the clock of the ghOSt agent and of the sched_ext program
/// (bpf_ktime_get_ns), which the dispatching enforcers give their policy.
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes the timespec it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An enforcement operation that failed. The message says what was being done and where; the
/// cause is kept as the source (print the chain with [`crate::base::chain`]).
#[derive(Debug, Error)]
pub enum EnforceError {
    /// A read or write of the kernel's interface (cgroup files, sysfs) failed.
    #[error("{what} {path}", path = .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The scheduler behind the enforcer (the sched_ext process, the ghOSt agent) failed or
    /// refused.
    #[error("{what} {path}", path = .path.display())]
    Scheduler {
        /// What was being done.
        what: &'static str,
        /// Where: the ghostfs root, the scheduler's binary, the VM's socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The host lacks what the enforcer needs.
    #[error("{what} {path}", path = .path.display())]
    Unsupported {
        /// What is missing.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The VM was never attached (or was detached).
    #[error("{vm} is not attached")]
    NotAttached {
        /// The VM.
        vm: String,
    },
}

/// Holds VMs' vCPU threads to CPU rates.
pub trait Enforcer: Send {
    /// A short name for logs and `check` (`cgroup v1`, `cgroup v2`, `ghost`).
    fn describe(&self) -> String;

    /// Puts `vm`'s vCPU threads (and nothing else) under enforcement. Idempotent: a restarted
    /// agent calls it again for VMs that are already attached.
    fn attach(&mut self, vm: &VmRecord) -> Result<(), EnforceError>;

    /// Holds `vm` to `rate` (millionths of one CPU) from now on; `full` is its full rate, at
    /// which no limit applies.
    fn apply(&mut self, vm: &str, rate: Rate, full: Rate) -> Result<(), EnforceError>;

    /// Releases what `attach` set up, for a VM that has ended.
    fn detach(&mut self, vm: &str) -> Result<(), EnforceError>;

    /// Removes what is left of VMs not in `live` (after an agent or host crash).
    fn cleanup(&mut self, live: &[&str]);

    /// Sets `vm`'s share of the CPU when the host is contended, in proportion to `rate` (its
    /// allocation), so that between two plans the kernel splits a busy host as the contention
    /// stage planned. Enforcers that schedule by themselves ignore it.
    fn weigh(&mut self, vm: &str, rate: Rate) -> Result<(), EnforceError> {
        let _ = (vm, rate);
        Ok(())
    }

    /// Tells the enforcer what the planner entitles `vm` to: its cap, its guarantee (the
    /// baseline, which changes with live config edits) and its weight for the spare under the
    /// rule in force, for enforcers that dispatch by themselves (sched_ext, ghOSt) and order
    /// the VMs by these numbers. Called with every `apply`, with the same cap.
    fn entitle(&mut self, vm: &str, entitled: Entitlement) -> Result<(), EnforceError> {
        let _ = (vm, entitled);
        Ok(())
    }

    /// Checks that what `attach` and `apply` set up for `vm` is still in place, and puts back
    /// what someone else removed or rewrote (a deleted cgroup, a thread moved out, a quota
    /// written by hand). Returns what was repaired, if anything. Called about once a second.
    fn verify(&mut self, vm: &VmRecord) -> Result<Option<String>, EnforceError> {
        let _ = vm;
        Ok(None)
    }
}
