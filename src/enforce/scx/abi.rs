//! The BPF program's interface (`bpf/intf.h`), mirrored once: its constants and the values of
//! the maps the scheduler process reads and writes, as `repr(C)` structs with their layout
//! asserted at compile time. With the `scx` feature, build.rs measures the C header itself
//! (sizes, offsets and constants, compiled by the host's C compiler and checked under
//! `clang -target bpf`) and the asserts below compare these types with what it measured, so a
//! change on one side only fails the build. Types and constants only: no I/O.
//!
//! Map values cross the boundary as bytes (libbpf's `update`/`lookup`); [`Conf::to_bytes`],
//! [`Budget::to_bytes`], [`Usage::to_bytes`] and [`Usage::from_bytes`] convert field by field at the asserted
//! offsets, in the host's byte order (BPF maps are in the CPU's own), without `unsafe`.

use std::mem::{offset_of, size_of};

/// The most VMs one scheduler holds (its DSQs and map sizes; its loops run over the slots in
/// use only, the map `nr_vms`).
pub const MAX_VMS: u32 = 1024;
/// The most CPUs the program's per-CPU state covers.
pub const MAX_CPUS: u32 = 256;
/// The `tasks` map's answer for a thread of no VM.
pub const NO_VM: u32 = u32::MAX;

/// `struct conf`: the `conf` map's one value, written before the program is enabled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conf {
    /// The budget period, ns.
    pub period_ns: u64,
    /// The longest a thread runs before dispatch decides again, ns.
    pub slice_ns: u64,
    /// CPUs the refill timer kicks: 0 .. nr_cpus − 1.
    pub nr_cpus: u32,
    /// 1: the scheduler process decides every dispatch (the user-space mode, intf.h).
    pub user_dispatch: u32,
}

/// `struct budget`: a VM's entry in `budgets`, ns of CPU per period over all its vCPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Its baseline.
    pub base_ns: u64,
    /// Its grant; 0 marks the slot unused.
    pub grant_ns: u64,
    /// Its weight for the spare: in BPF dispatch, what the planner's split gives it above its
    /// baseline ([`crate::sched::dispatch_weights`]), ns per period; in user-space dispatch,
    /// the planner's weight ([`crate::contention::Entitlement::weight`]). Only the ratios
    /// between VMs matter; 0 is served last.
    pub weight: u64,
}

/// `struct usage`: a VM's entry in `usage`, written by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Charged this period (carries at most one period of overshoot).
    pub used_ns: u64,
    /// Charged since the program was loaded.
    pub total_ns: u64,
    /// Times one of its threads was held back for want of budget.
    pub held: u64,
}

// The layout, as the C compiler lays out bpf/intf.h for x86-64 and BPF alike.
const _: () = assert!(size_of::<Conf>() == 24);
const _: () = assert!(offset_of!(Conf, period_ns) == 0);
const _: () = assert!(offset_of!(Conf, slice_ns) == 8);
const _: () = assert!(offset_of!(Conf, nr_cpus) == 16);
const _: () = assert!(offset_of!(Conf, user_dispatch) == 20);
const _: () = assert!(size_of::<Budget>() == 24);
const _: () = assert!(offset_of!(Budget, base_ns) == 0);
const _: () = assert!(offset_of!(Budget, grant_ns) == 8);
const _: () = assert!(offset_of!(Budget, weight) == 16);
const _: () = assert!(size_of::<Usage>() == 24);
const _: () = assert!(offset_of!(Usage, used_ns) == 0);
const _: () = assert!(offset_of!(Usage, total_ns) == 8);
const _: () = assert!(offset_of!(Usage, held) == 16);

/// What build.rs measured of bpf/intf.h (feature `scx`: the header is compiled only then).
/// `EV_*` of intf.h: what an [`Event`] says of its thread.
pub const EV_WAKE: u32 = 1;
/// On `cpu`.
pub const EV_RUNNING: u32 = 2;
/// Off `cpu`, still runnable.
pub const EV_STOP: u32 = 3;
/// Off `cpu`, blocked.
pub const EV_BLOCK: u32 = 4;
/// An order to run it found it not waiting.
pub const EV_FAILED: u32 = 5;
/// Off `cpu` for a higher class; it goes on there after (no order needed).
pub const EV_PAUSE: u32 = 6;
/// `ENQ_*` of intf.h: the flags in the low bits of an `enq_at` value (the rest is when its
/// thread was enqueued, ns).
pub const ENQ_FLAGS: u64 = 3;
/// In the user-space mode, an order took the thread already; present without it, the thread is
/// held for one.
pub const ENQ_TAKEN: u64 = 2;
/// `ORDER_*` of intf.h: run `tid` on `cpu` until `until`.
pub const ORDER_RUN: u32 = 1;
/// The thread on `cpu` runs on until `until`.
pub const ORDER_EXTEND: u32 = 2;
/// Take the thread off `cpu`.
pub const ORDER_PREEMPT: u32 = 3;
/// Or'ed into `ORDER_RUN`/`ORDER_EXTEND`: `until` is a hard end (the VM's budget ends there).
pub const ORDER_HARD: u32 = 0x100;
/// Or'ed into `ORDER_RUN`/`ORDER_PREEMPT`: decided ahead of the end of the slice running on
/// the CPU, taking effect there (intf.h).
pub const ORDER_DEFER: u32 = 0x200;
/// Buckets of [`Latency::hist`].
pub const LAT_BUCKETS: usize = 24;

/// `struct event`: one record of the `events` ring buffer (user-space mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC ns.
    pub at: u64,
    /// The thread.
    pub tid: u32,
    /// The CPU.
    pub cpu: u32,
    /// `EV_*`.
    pub kind: u32,
    /// Unused.
    pub pad: u32,
}

/// `struct order`: the context of the `bq_order` program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Order {
    /// CLOCK_MONOTONIC ns.
    pub until: u64,
    /// `ORDER_*`.
    pub op: u32,
    /// The CPU.
    pub cpu: u32,
    /// The thread (ORDER_RUN).
    pub tid: u32,
    /// Out: the thread of an earlier ORDER_RUN the CPU had not taken, or 0.
    pub replaced: u32,
    /// ORDER_RUN: when it was decided, CLOCK_MONOTONIC ns. The slice is `until − from`, run
    /// from the thread's start on the CPU (an order decided ahead of a slice's end reaches
    /// the CPU before the time it was decided for).
    pub from: u64,
}

/// `struct latency`: the `latency` map's one value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Waits of a runnable thread with budget counted.
    pub waits: u64,
    /// Their waits, summed, ns.
    pub sum_ns: u64,
    /// The longest wait, ns.
    pub max_ns: u64,
    /// Times a VM's thread was put on a CPU.
    pub runs: u64,
    /// Waits of [2^i, 2^(i+1)) µs.
    pub hist: [u64; LAT_BUCKETS],
}

/// `struct plan`: a CPU's entry in the `plans` map (user-space mode), the fields the process
/// reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The thread ordered to run there next, not taken yet (0: none).
    pub next: u64,
    /// Its slice's end, hard flag and decision time.
    pub next_until: u64,
    pub next_hard: u64,
    pub next_at: u64,
    /// The thread ordered there last (0: none).
    pub cur: u64,
    /// Its slice's end and hard flag.
    pub cur_until: u64,
    pub cur_hard: u64,
}

impl Plan {
    /// The entry in `bytes` (a short one reads as zeros past its end).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Plan {
            next: u64_at(bytes, offset_of!(Plan, next)),
            cur: u64_at(bytes, offset_of!(Plan, cur)),
            cur_until: u64_at(bytes, offset_of!(Plan, cur_until)),
            ..Plan::default()
        }
    }
}

const _: () = assert!(size_of::<Event>() == 24);
const _: () = assert!(size_of::<Plan>() == 56);
const _: () = assert!(size_of::<Order>() == 32);
const _: () = assert!(size_of::<Latency>() == 32 + 8 * LAT_BUCKETS);

impl Event {
    /// The record in `bytes` (a short one reads as zeros past its end).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Event {
            at: u64_at(bytes, offset_of!(Event, at)),
            tid: u32_at(bytes, offset_of!(Event, tid)),
            cpu: u32_at(bytes, offset_of!(Event, cpu)),
            kind: u32_at(bytes, offset_of!(Event, kind)),
            pad: 0,
        }
    }
}

impl Order {
    /// The context bytes.
    pub fn to_bytes(&self) -> [u8; size_of::<Order>()] {
        let mut b = [0; size_of::<Order>()];
        put(&mut b, offset_of!(Order, until), &self.until.to_ne_bytes());
        put(&mut b, offset_of!(Order, op), &self.op.to_ne_bytes());
        put(&mut b, offset_of!(Order, cpu), &self.cpu.to_ne_bytes());
        put(&mut b, offset_of!(Order, tid), &self.tid.to_ne_bytes());
        put(
            &mut b,
            offset_of!(Order, replaced),
            &self.replaced.to_ne_bytes(),
        );
        put(&mut b, offset_of!(Order, from), &self.from.to_ne_bytes());
        b
    }

    /// What the program left in the context.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Order {
            until: u64_at(bytes, offset_of!(Order, until)),
            op: u32_at(bytes, offset_of!(Order, op)),
            cpu: u32_at(bytes, offset_of!(Order, cpu)),
            tid: u32_at(bytes, offset_of!(Order, tid)),
            replaced: u32_at(bytes, offset_of!(Order, replaced)),
            from: u64_at(bytes, offset_of!(Order, from)),
        }
    }
}

impl Latency {
    /// The map's value in `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut hist = [0; LAT_BUCKETS];
        for (i, h) in hist.iter_mut().enumerate() {
            *h = u64_at(bytes, offset_of!(Latency, hist) + 8 * i);
        }
        Latency {
            waits: u64_at(bytes, offset_of!(Latency, waits)),
            sum_ns: u64_at(bytes, offset_of!(Latency, sum_ns)),
            max_ns: u64_at(bytes, offset_of!(Latency, max_ns)),
            runs: u64_at(bytes, offset_of!(Latency, runs)),
            hist,
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

#[cfg(feature = "scx")]
mod measured {
    include!(concat!(env!("OUT_DIR"), "/intf_layout.rs"));
}

/// The size of what `_field` returns: of a field, given `|s: S| s.field`.
#[cfg(feature = "scx")]
const fn size_of_field<S, F>(_field: fn(S) -> F) -> u64 {
    size_of::<F>() as u64
}

/// Asserts that a field of a `repr(C)` type sits where build.rs measured the C field, with the
/// same size.
#[cfg(feature = "scx")]
macro_rules! same_field {
    ($ty:ident . $field:ident, $offset:ident, $size:ident) => {
        assert!(
            measured::$offset == offset_of!($ty, $field) as u64
                && measured::$size == size_of_field(|s: $ty| s.$field),
            concat!(
                "bpf/intf.h and abi.rs disagree: ",
                stringify!($ty),
                ".",
                stringify!($field)
            )
        );
    };
}

#[cfg(feature = "scx")]
const _: () = {
    use measured as c;
    let disagree = "bpf/intf.h and abi.rs disagree on a constant or a struct's size";
    assert!(c::MAX_VMS == MAX_VMS as u64, "{}", disagree);
    assert!(c::MAX_CPUS == MAX_CPUS as u64, "{}", disagree);
    assert!(c::NO_VM == NO_VM as u64, "{}", disagree);
    assert!(c::CONF_SIZE == size_of::<Conf>() as u64, "{}", disagree);
    assert!(c::BUDGET_SIZE == size_of::<Budget>() as u64, "{}", disagree);
    assert!(c::USAGE_SIZE == size_of::<Usage>() as u64, "{}", disagree);
    same_field!(Conf.period_ns, CONF_PERIOD_NS, CONF_PERIOD_NS_SIZE);
    same_field!(Conf.slice_ns, CONF_SLICE_NS, CONF_SLICE_NS_SIZE);
    same_field!(Conf.nr_cpus, CONF_NR_CPUS, CONF_NR_CPUS_SIZE);
    same_field!(
        Conf.user_dispatch,
        CONF_USER_DISPATCH,
        CONF_USER_DISPATCH_SIZE
    );
    assert!(c::EVENT_SIZE == size_of::<Event>() as u64, "{}", disagree);
    assert!(c::ORDER_SIZE == size_of::<Order>() as u64, "{}", disagree);
    assert!(
        c::LATENCY_SIZE == size_of::<Latency>() as u64,
        "{}",
        disagree
    );
    assert!(c::LAT_BUCKETS == LAT_BUCKETS as u64, "{}", disagree);
    assert!(c::EV_WAKE == EV_WAKE as u64, "{}", disagree);
    assert!(c::EV_RUNNING == EV_RUNNING as u64, "{}", disagree);
    assert!(c::EV_STOP == EV_STOP as u64, "{}", disagree);
    assert!(c::EV_BLOCK == EV_BLOCK as u64, "{}", disagree);
    assert!(c::EV_FAILED == EV_FAILED as u64, "{}", disagree);
    assert!(c::EV_PAUSE == EV_PAUSE as u64, "{}", disagree);
    assert!(c::ORDER_RUN == ORDER_RUN as u64, "{}", disagree);
    assert!(c::ORDER_EXTEND == ORDER_EXTEND as u64, "{}", disagree);
    assert!(c::ORDER_PREEMPT == ORDER_PREEMPT as u64, "{}", disagree);
    assert!(c::ORDER_HARD == ORDER_HARD as u64, "{}", disagree);
    assert!(c::ORDER_DEFER == ORDER_DEFER as u64, "{}", disagree);
    assert!(c::ENQ_TAKEN == ENQ_TAKEN, "{}", disagree);
    assert!(c::ENQ_FLAGS == ENQ_FLAGS, "{}", disagree);
    same_field!(Event.at, EVENT_AT, EVENT_AT_SIZE);
    same_field!(Event.tid, EVENT_TID, EVENT_TID_SIZE);
    same_field!(Event.cpu, EVENT_CPU, EVENT_CPU_SIZE);
    same_field!(Event.kind, EVENT_KIND, EVENT_KIND_SIZE);
    same_field!(Order.until, ORDER_UNTIL, ORDER_UNTIL_SIZE);
    same_field!(Order.op, ORDER_OP, ORDER_OP_SIZE);
    same_field!(Order.cpu, ORDER_CPU, ORDER_CPU_SIZE);
    same_field!(Order.tid, ORDER_TID, ORDER_TID_SIZE);
    same_field!(Order.replaced, ORDER_REPLACED, ORDER_REPLACED_SIZE);
    same_field!(Order.from, ORDER_FROM, ORDER_FROM_SIZE);
    same_field!(Latency.waits, LATENCY_WAITS, LATENCY_WAITS_SIZE);
    same_field!(Latency.sum_ns, LATENCY_SUM_NS, LATENCY_SUM_NS_SIZE);
    same_field!(Latency.max_ns, LATENCY_MAX_NS, LATENCY_MAX_NS_SIZE);
    same_field!(Latency.runs, LATENCY_RUNS, LATENCY_RUNS_SIZE);
    same_field!(Latency.hist, LATENCY_HIST, LATENCY_HIST_SIZE);
    same_field!(Budget.base_ns, BUDGET_BASE_NS, BUDGET_BASE_NS_SIZE);
    same_field!(Budget.grant_ns, BUDGET_GRANT_NS, BUDGET_GRANT_NS_SIZE);
    same_field!(Budget.weight, BUDGET_WEIGHT, BUDGET_WEIGHT_SIZE);
    same_field!(Usage.used_ns, USAGE_USED_NS, USAGE_USED_NS_SIZE);
    same_field!(Usage.total_ns, USAGE_TOTAL_NS, USAGE_TOTAL_NS_SIZE);
    same_field!(Usage.held, USAGE_HELD, USAGE_HELD_SIZE);
    assert!(c::PLAN_SIZE == size_of::<Plan>() as u64, "{}", disagree);
    same_field!(Plan.next, PLAN_NEXT, PLAN_NEXT_SIZE);
    same_field!(Plan.cur, PLAN_CUR, PLAN_CUR_SIZE);
    same_field!(Plan.cur_until, PLAN_CUR_UNTIL, PLAN_CUR_UNTIL_SIZE);
};

/// `bytes[at..at + 8]` as a u64 in the host's byte order (0 when the value is too short).
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

/// Writes `v` at `at` in the host's byte order.
fn put(bytes: &mut [u8], at: usize, v: &[u8]) {
    bytes[at..at + v.len()].copy_from_slice(v);
}

impl Conf {
    /// The map value.
    pub fn to_bytes(&self) -> [u8; size_of::<Conf>()] {
        let mut b = [0; size_of::<Conf>()];
        put(
            &mut b,
            offset_of!(Conf, period_ns),
            &self.period_ns.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(Conf, slice_ns),
            &self.slice_ns.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(Conf, nr_cpus),
            &self.nr_cpus.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(Conf, user_dispatch),
            &self.user_dispatch.to_ne_bytes(),
        );
        b
    }
}

impl Budget {
    /// The map value.
    pub fn to_bytes(&self) -> [u8; size_of::<Budget>()] {
        let mut b = [0; size_of::<Budget>()];
        put(
            &mut b,
            offset_of!(Budget, base_ns),
            &self.base_ns.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(Budget, grant_ns),
            &self.grant_ns.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(Budget, weight),
            &self.weight.to_ne_bytes(),
        );
        b
    }

    /// From a map value (fields beyond a short value read 0).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Budget {
            base_ns: u64_at(bytes, offset_of!(Budget, base_ns)),
            grant_ns: u64_at(bytes, offset_of!(Budget, grant_ns)),
            weight: u64_at(bytes, offset_of!(Budget, weight)),
        }
    }
}

impl Usage {
    /// The map value.
    pub fn to_bytes(&self) -> [u8; size_of::<Usage>()] {
        let mut b = [0; size_of::<Usage>()];
        put(
            &mut b,
            offset_of!(Usage, used_ns),
            &self.used_ns.to_ne_bytes(),
        );
        put(
            &mut b,
            offset_of!(Usage, total_ns),
            &self.total_ns.to_ne_bytes(),
        );
        put(&mut b, offset_of!(Usage, held), &self.held.to_ne_bytes());
        b
    }

    /// From a map value (fields beyond a short value read 0).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Usage {
            used_ns: u64_at(bytes, offset_of!(Usage, used_ns)),
            total_ns: u64_at(bytes, offset_of!(Usage, total_ns)),
            held: u64_at(bytes, offset_of!(Usage, held)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cross_as_the_c_layout_has_them() {
        let b = Budget {
            base_ns: 20_000_000,
            grant_ns: 100_000_000,
            weight: 80_000_000,
        };
        let bytes = b.to_bytes();
        assert_eq!(&bytes[..8], &20_000_000u64.to_ne_bytes());
        assert_eq!(&bytes[8..16], &100_000_000u64.to_ne_bytes());
        assert_eq!(&bytes[16..], &80_000_000u64.to_ne_bytes());
        assert_eq!(Budget::from_bytes(&bytes), b);
        let c = Conf {
            period_ns: 100_000_000,
            slice_ns: 5_000_000,
            nr_cpus: 3,
            user_dispatch: 0,
        }
        .to_bytes();
        assert_eq!(&c[16..20], &3u32.to_ne_bytes());
        assert_eq!(&c[20..], &[0; 4]);
        let mut u = [0u8; 24];
        u[8..16].copy_from_slice(&7u64.to_ne_bytes());
        u[16..].copy_from_slice(&2u64.to_ne_bytes());
        let usage = Usage {
            used_ns: 0,
            total_ns: 7,
            held: 2,
        };
        assert_eq!(Usage::from_bytes(&u), usage);
        assert_eq!(usage.to_bytes(), u);
        // A value shorter than the struct (an empty lookup) reads as zeros.
        assert_eq!(Usage::from_bytes(&[]), Usage::default());
    }
}
