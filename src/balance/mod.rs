//! Fleet balancers: pure planners that move resources between VMs (no I/O, no clock), and their
//! mechanisms, which carry the plans out through each VM's control (QMP) and the kernel.
//!
//! | module | what |
//! |---|---|
//! | [`cpu`] | vCPU pins: per-CPU demand balanced within 5 % of the mean, stable (pure planner) |
//! | [`pin`] | the pinning balancer's mechanism: measures vCPU threads and pins them |
//! | [`mem`] | balloon targets: the memory coordinator (`thresholds`) and the idle-memory tax (`idle-tax`) (pure planner) |
//! | [`mem_rescoin`] | balloon targets by ResCoin's rule (`rescoin`): memory as the contention stage's third resource (pure planner) |
//! | [`memory`] | the memory coordinator's mechanism: its own thread, balloons and guest stats over QMP |
//! | [`disk`] | disk bandwidth under contention: the disk stages' mechanism (QMP blockstats and throttling) |

pub mod cpu;
pub mod disk;
pub mod mem;
pub mod mem_rescoin;
pub mod memory;
pub mod pin;
