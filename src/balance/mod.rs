//! Fleet balancers: the vCPU pinning balancer's pure planner ([`cpu`]) and the agent's
//! mechanism that measures vCPU threads and pins them ([`pin`]).

pub mod cpu;
pub mod pin;
