//! burst-qemu: CPU-credit ("burstable instance") scheduling for QEMU virtual machines.
//!
//! Each VM has a baseline CPU share per vCPU, earns credits while it runs below it, spends them
//! to run above it, and is held to its baseline — after a smooth decline, never a cliff — when
//! they are gone, like AWS T3, Azure B and Alibaba t6 instances.
//!
//! Map of the crate, from the bottom up (a module uses only those above it in its group and
//! the groups before it):
//!
//! | layer | module | owns |
//! |---|---|---|
//! | base | [`base`] | VM names, CPU lists, clocks, I/O errors with their context |
//! | | [`procfs`] | what the kernel says of threads and processes: `schedstat`, `stat`, start times, boot id, affinity |
//! | pure | [`credit`] | the ledger and the decline planner: integer arithmetic, no I/O, no clock |
//! | | [`contention`] | the contention stage: baselines first, the spare by a named rule (`headroom`, `baseline`, ResCoin's) over CPU, disk and memory |
//! | | [`sched`] | the scheduling policy (cap, baseline guarantee, spare): for ghOSt and sched_ext |
//! | | [`history`] | a VM's credit history: 10-s and 1-min rings, downsampling, compact encoding |
//! | | [`view`] | what a VM looks like to `ls`, `credits`, `top`, `plot` and the metrics; the agent's health |
//! | | [`simulate`] | the ledger run on a load trace with a simulated clock |
//! | | [`plot`] | the credit-curve SVG |
//! | files | [`state`] | runtime dirs of running VMs, their records and locks, atomic writes |
//! | | [`config`] | `vms/NAME.toml`: parse, then validate; errors name file, line and field |
//! | | [`metrics`] | Prometheus text of the views, and its small HTTP server |
//! | mechanism | [`control`] | a running VM's control handle (run state, pause, pin, balloon): one trait, by QMP here and by libvirt in [`source`] |
//! | | [`ghost`] | the safe layer over `ghost-sys`: ghostfs, enclaves, queues, status words, transactions; the centralized agent |
//! | | [`enforce`] | the `Enforcer` trait: cgroup v1/v2, sched_ext, ghOSt — mechanism only |
//! | | [`balance`] | fleet balancers: vCPU pinning, balloon memory, disk bandwidth (pure planners and their mechanisms) |
//! | sources | [`launch`] | the launcher: QEMU's arguments and config, QMP handshake, vCPU threads, lifecycle and signals |
//! | | [`source`] | VMs burst-qemu did not start: libvirt domains (status XML, metadata, lifecycle, the libvirt API with feature `libvirt`) and foreign QEMUs (`adopt`) |
//! | | [`orphan`] | stopping a VM whose launcher died |
//! | | [`testguest`] | the project's own firmware guest: every vCPU busy, halted, or busy a duty cycle |
//! | loop | [`agent`] | measure → `Ledger::tick` → contention → `Enforcer::apply`; publishing, persistence, history |
//!
//! ```
//! use burst_qemu::credit::{Baseline, Credits, Ledger, Policy, NS_PER_MIN};
//!
//! // The seed example: 2 vCPUs, 5 % baseline, 2 % use for an hour from 0 → +3.6 credits.
//! let policy = Policy::new(2, Baseline::from_percent(5.0).unwrap()).unwrap();
//! let mut ledger = Ledger::new(policy, Credits::ZERO);
//! let hour = 60 * NS_PER_MIN;
//! ledger.tick(hour, hour * 2 * 2 / 100); // 2 % of 2 vCPUs for an hour
//! assert_eq!(ledger.balances().balance().to_string(), "3.600");
//! ```

pub mod agent;
pub mod balance;
pub mod base;
pub mod config;
pub mod contention;
pub mod control;
pub mod credit;
pub mod enforce;
pub mod ghost;
pub mod history;
pub mod launch;
pub mod metrics;
pub mod orphan;
pub mod plot;
pub mod procfs;
pub mod sched;
pub mod simulate;
pub mod source;
pub mod state;
pub mod testguest;
pub mod view;

#[cfg(test)]
mod conformance;
