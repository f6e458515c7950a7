//! Fleet balancers: pure planners that move resources between VMs (no I/O, no clock), and the
//! pinning balancer's mechanism.
//!
//! | module | plans |
//! |---|---|
//! | [`cpu`] | vCPU pins: per-CPU demand balanced within 5 % of the mean, stable (the planner) |
//! | [`pin`] | the agent's side of the pinning balancer: measures vCPU threads and pins them |
//! | [`mem`] | balloon targets: the memory coordinator (`thresholds`) and the idle-memory tax (`idle-tax`) |
//! | [`mem_rescoin`] | balloon targets by ResCoin's rule (`rescoin`): memory as the contention stage's third resource |

pub mod cpu;
pub mod mem;
pub mod mem_rescoin;
pub mod pin;
