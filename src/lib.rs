//! burst-qemu: CPU-credit ("burstable instance") scheduling for QEMU virtual machines.
//!
//! Each VM has a baseline CPU share per vCPU, earns credits while it runs below it, spends them
//! to run above it, and is held to its baseline — after a smooth decline, never a cliff — when
//! they are gone, like AWS T3, Azure B and Alibaba t6 instances.
//!
//! Map of the crate:
//!
//! | module | owns |
//! |---|---|
//! | [`agent`] | the loop: measure → `Ledger::tick` → `Enforcer::apply`; publishing; persistence |
//! | [`balance`] | fleet balancers: balloon memory coordinator (pure planners) |
//! | [`config`] | `vms/NAME.toml`: parse, validate, render; errors name file, line and field |
//! | [`credit`] | the ledger and the decline planner: pure integer arithmetic, no I/O, no clock |
//! | [`enforce`] | the `Enforcer` trait and its cgroup v1/v2 implementation: mechanism only |
//! | [`balance`] | the vCPU pinning balancer: a pure planner and the agent's `sched_setaffinity` mechanism |
//! | [`ghost`] | the safe layer over `ghost-sys`: ghostfs, enclaves, mappings, queues, status words, transactions |
//! | [`launch`] | QEMU argv, QMP handshake, vCPU thread ids, lifecycle and signals |
//! | [`sched`] | the scheduling policy (cap, baseline guarantee, spare by credits): pure, for ghOSt and sched_ext |
//! | [`source`] | VMs burst-qemu did not start: libvirt domains (status XML, metadata, lifecycle, the libvirt API with feature `libvirt`) and foreign QEMUs (`adopt`) |
//! | [`simulate`] | the ledger run on a load trace with a simulated clock, CSV/JSON/SVG output |
//! | [`state`] | runtime dirs of running VMs, their records and locks, atomic writes |
//! | [`testguest`] | the project's own firmware guest that keeps every vCPU busy, or halts them |
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
pub mod config;
pub mod contention;
pub mod credit;
pub mod enforce;
pub mod ghost;
pub mod history;
pub mod launch;
pub mod metrics;
pub mod orphan;
pub mod plot;
pub mod sched;
pub mod simulate;
pub mod source;
pub mod state;
pub mod testguest;
