//! Fleet balancers: pure planners that move resources between VMs (no I/O, no clock).
//!
//! | module | plans |
//! |---|---|
//! | [`mem`] | balloon targets: the memory coordinator (`thresholds`) and the idle-memory tax (`idle-tax`) |

pub mod mem;
