//! Raw Rust mirror of the ghOSt kernel ABI, version 91 (x86-64).
//!
//! Types, constants and ioctl numbers only: no I/O, no owners, no policy (the safe layer lives
//! in `burst_qemu::ghost`). Every struct is `#[repr(C)]` with compile-time checks of its size,
//! alignment and field offsets, and every ioctl number is computed from the `_IOC` encoding and
//! golden-tested against its literal value.
//!
//! # Sources
//!
//! The facts come from the project's fact sheet `shared/ghost-abi.md`, gathered from the public
//! google/ghost-userspace (HEAD 9ca0a1f, `abi/latest/kernel/ghost.h`, `GHOST_VERSION 91`) and
//! google/ghost-kernel (branch `ghost-v5.11`); the sizes and offsets were measured there by
//! compiling that header for x86-64 with gcc 12.2. ABI 90 is byte-identical but for the
//! version number. No ghOSt kernel was available where this crate was written: the layouts are
//! checked against the header's measured numbers, not against a running kernel.
//!
//! Field names follow the C header (so `type_` for C's `type`, and `errno_` for C's `errno`).
#![warn(missing_docs)]
#![allow(non_camel_case_types)]

use core::mem::{align_of, offset_of, size_of};

/// The ghOSt ABI version this crate mirrors.
pub const GHOST_VERSION: u32 = 91;
/// Version of the status-word region layout.
pub const GHOST_SW_REGION_VERSION: u32 = 0;
/// Version of the message queue layout.
pub const GHOST_QUEUE_VERSION: u32 = 0;
/// Version of the transaction layout (`ghost_txn.version`).
pub const GHOST_TXN_VERSION: i32 = 0;
/// Most elements a queue may have (a power of two).
pub const GHOST_MAX_QUEUE_ELEMS: u32 = 65536;
/// Most wakeup targets per queue.
pub const GHOST_MAX_WINFO: usize = 2;
/// The scheduling policy number of the ghOSt class.
pub const SCHED_GHOST: i32 = 18;
/// `sched_priority` the kernel uses for a regular (non-agent) task entering via `tasks`.
pub const GHOST_SCHED_TASK_PRIO: i32 = -2;

/// No task.
pub const GHOST_NULL_GTID: i64 = 0;
/// The agent of a CPU (in a transaction: ping / yield to the agent).
pub const GHOST_AGENT_GTID: i64 = -1;
/// The idle task (in a transaction: run idle).
pub const GHOST_IDLE_GTID: i64 = -2;
/// gtid = `(pid << GHOST_TID_SEQNUM_BITS) | seqnum`; 41 for `PID_MAX_LIMIT` 4 194 304.
pub const GHOST_TID_SEQNUM_BITS: u32 = 41;

/// Superblock magic of ghostfs.
pub const GHOSTFS_MAGIC: u32 = 0xBAD1_DEA2;

// ---------------------------------------------------------------------------------------------
// Shared-memory structures

/// Header of a status-word region (`sw_regions/sw_<id>`), followed by `capacity` status words.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ghost_sw_region_header {
    /// `GHOST_SW_REGION_VERSION`.
    pub version: u32,
    /// Region id.
    pub id: u32,
    /// NUMA node.
    pub numa_node: u32,
    /// Offset of the first status word from the header.
    pub start: u32,
    /// Number of status words.
    pub capacity: u32,
    /// Number not in use.
    pub available: u32,
}

/// A task's or an agent's status word, written by the kernel.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ghost_status_word {
    /// Bumped (release) after every other field; read with acquire.
    pub barrier: u32,
    /// `GHOST_SW_*` flags.
    pub flags: u32,
    /// The task's gtid.
    pub gtid: u64,
    /// When the task last switched on or off a CPU.
    pub switch_time: i64,
    /// Cumulative CPU time, ns.
    pub runtime: u64,
}

/// Header of a message queue mapping; the ring starts at `start`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ghost_queue_header {
    /// `GHOST_QUEUE_VERSION`.
    pub version: u32,
    /// Offset of the [`ghost_ring`] from the header (64).
    pub start: u32,
    /// Number of 8-byte slots (a power of two).
    pub nelems: u32,
}

/// A message header; `length` counts the header and the payload, in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ghost_msg {
    /// `MSG_*`.
    pub type_: u16,
    /// Header + payload bytes.
    pub length: u16,
    /// The task's (or, for CPU messages, the agent's) status-word barrier after increment.
    pub seqnum: u32,
    /// The payload follows.
    pub payload: [u32; 0],
}

/// The ring: the kernel produces at `head`, the agent consumes at `tail`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ghost_ring {
    /// Producer index (free-running, masked by `nelems − 1`).
    pub head: u32,
    /// Consumer index.
    pub tail: u32,
    /// Messages dropped because the ring was full.
    pub overflow: u32,
    /// The slots follow.
    pub msgs: [ghost_msg; 0],
}

/// The union at the end of a transaction.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ghost_txn_u {
    /// The CPU that owns a sync-group commit.
    pub sync_group_owner: i32,
}

impl core::fmt::Debug for ghost_txn_u {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // SAFETY: the union's only member is a plain i32; every bit pattern is valid.
        f.debug_struct("ghost_txn_u")
            .field("sync_group_owner", unsafe { &self.sync_group_owner })
            .finish()
    }
}

/// A per-CPU transaction (in [`ghost_cpu_data`]).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct ghost_txn {
    /// `GHOST_TXN_VERSION`.
    pub version: i32,
    /// The CPU this transaction targets.
    pub cpu: i32,
    /// `GHOST_TXN_*` state (atomic: the kernel claims it with a compare-and-swap).
    pub state: i32,
    /// The agent's barrier (checked only for a local commit).
    pub agent_barrier: u32,
    /// The task's status-word barrier.
    pub task_barrier: u32,
    /// `RTLA_*`/`NEED_*`/… run flags.
    pub run_flags: u16,
    /// `COMMIT_*`/… commit flags.
    pub commit_flags: u8,
    /// Padding.
    pub unused: u8,
    /// The task to run (or `GHOST_NULL_GTID`, `GHOST_IDLE_GTID`).
    pub gtid: i64,
    /// When the kernel committed, ns.
    pub commit_time: i64,
    /// The CPU's sequence number at commit.
    pub cpu_seqnum: u64,
    /// Sync-group owner.
    pub u: ghost_txn_u,
}

/// One page of `cpu_data`: the CPU's transaction.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
pub struct ghost_cpu_data {
    /// The transaction.
    pub txn: ghost_txn,
}

// ---------------------------------------------------------------------------------------------
// Message types

/// Padding to the end of the ring.
pub const MSG_NOP: u16 = 0;
/// First task message type.
pub const _MSG_TASK_FIRST: u16 = 64;
/// The task died.
pub const MSG_TASK_DEAD: u16 = 64;
/// The task blocked.
pub const MSG_TASK_BLOCKED: u16 = 65;
/// The task woke up.
pub const MSG_TASK_WAKEUP: u16 = 66;
/// A task entered ghOSt (also synthesized by `discover tasks`).
pub const MSG_TASK_NEW: u16 = 67;
/// The task was preempted.
pub const MSG_TASK_PREEMPT: u16 = 68;
/// The task yielded.
pub const MSG_TASK_YIELD: u16 = 69;
/// The task left ghOSt.
pub const MSG_TASK_DEPARTED: u16 = 70;
/// Google-internal switchto.
pub const MSG_TASK_SWITCHTO: u16 = 71;
/// The task's affinity changed.
pub const MSG_TASK_AFFINITY_CHANGED: u16 = 72;
/// The task got on a CPU (`SEND_TASK_ON_CPU`).
pub const MSG_TASK_ON_CPU: u16 = 73;
/// The task's nice value changed.
pub const MSG_TASK_PRIORITY_CHANGED: u16 = 74;
/// A latched task could not run.
pub const MSG_TASK_LATCH_FAILURE: u16 = 75;
/// First CPU message type.
pub const _MSG_CPU_FIRST: u16 = 128;
/// A timer tick on an enclave CPU (`deliver_ticks`).
pub const MSG_CPU_TICK: u16 = 128;
/// A ghOSt timerfd expired.
pub const MSG_CPU_TIMER_EXPIRED: u16 = 129;
/// The CPU is no longer idle (`NEED_CPU_NOT_IDLE`).
pub const MSG_CPU_NOT_IDLE: u16 = 130;
/// The CPU became available to ghOSt.
pub const MSG_CPU_AVAILABLE: u16 = 131;
/// A higher class took the CPU.
pub const MSG_CPU_BUSY: u16 = 132;
/// The CPU's agent blocked.
pub const MSG_CPU_AGENT_BLOCKED: u16 = 133;
/// The CPU's agent woke up.
pub const MSG_CPU_AGENT_WAKEUP: u16 = 134;

// ---------------------------------------------------------------------------------------------
// Payloads

/// `ghost_sw_info`: a status word's region and index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_sw_info {
    /// Region id.
    pub id: u32,
    /// Index in the region.
    pub index: u32,
}

/// `MSG_TASK_NEW`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_new {
    /// Task.
    pub gtid: u64,
    /// Parent task.
    pub parent_gtid: u64,
    /// CPU time, ns.
    pub runtime: u64,
    /// Runnable now.
    pub runnable: u16,
    /// Nice value.
    pub nice: i32,
    /// Its status word.
    pub sw_info: ghost_sw_info,
    /// BPF-set agent data.
    pub agent_data: u64,
}

/// `MSG_TASK_PREEMPT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_preempt {
    /// Task.
    pub gtid: u64,
    /// CPU time, ns.
    pub runtime: u64,
    /// CPU sequence number.
    pub cpu_seqnum: u64,
    /// BPF-set agent data.
    pub agent_data: u64,
    /// CPU.
    pub cpu: i32,
    /// From a switchto chain.
    pub from_switchto: i8,
    /// Was latched (not yet running).
    pub was_latched: i8,
}

/// `MSG_TASK_YIELD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_yield {
    /// Task.
    pub gtid: u64,
    /// CPU time, ns.
    pub runtime: u64,
    /// CPU sequence number.
    pub cpu_seqnum: u64,
    /// BPF-set agent data.
    pub agent_data: u64,
    /// CPU.
    pub cpu: i32,
    /// From a switchto chain.
    pub from_switchto: i8,
}

/// `MSG_TASK_BLOCKED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_blocked {
    /// Task.
    pub gtid: u64,
    /// CPU time, ns.
    pub runtime: u64,
    /// CPU sequence number.
    pub cpu_seqnum: u64,
    /// CPU.
    pub cpu: i32,
    /// From a switchto chain.
    pub from_switchto: i8,
}

/// `MSG_TASK_DEAD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_dead {
    /// Task.
    pub gtid: u64,
    /// CPU.
    pub cpu: i32,
}

/// `MSG_TASK_DEPARTED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_departed {
    /// Task.
    pub gtid: u64,
    /// CPU sequence number.
    pub cpu_seqnum: u64,
    /// CPU.
    pub cpu: i32,
    /// From a switchto chain.
    pub from_switchto: i8,
    /// Was running when it left.
    pub was_current: i8,
}

/// `MSG_TASK_AFFINITY_CHANGED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_affinity_changed {
    /// Task.
    pub gtid: u64,
}

/// `MSG_TASK_PRIORITY_CHANGED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_priority_changed {
    /// Task.
    pub gtid: u64,
    /// New nice value.
    pub nice: i32,
}

/// `MSG_TASK_WAKEUP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_wakeup {
    /// Task.
    pub gtid: u64,
    /// BPF-set agent data.
    pub agent_data: u64,
    /// The waker may run again soon.
    pub deferrable: i8,
    /// Last CPU it ran on.
    pub last_ran_cpu: i32,
    /// CPU the wakeup targets.
    pub wake_up_cpu: i32,
    /// The waker's CPU.
    pub waker_cpu: i32,
}

/// `MSG_TASK_SWITCHTO`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_switchto {
    /// Task.
    pub gtid: u64,
    /// CPU time, ns.
    pub runtime: u64,
    /// CPU sequence number.
    pub cpu_seqnum: u64,
    /// CPU.
    pub cpu: i32,
}

/// `MSG_TASK_ON_CPU`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_on_cpu {
    /// Task.
    pub gtid: u64,
    /// Commit time, ns.
    pub commit_time: u64,
    /// CPU sequence number.
    pub cpu_seqnum: u64,
    /// CPU.
    pub cpu: i32,
}

/// `MSG_TASK_LATCH_FAILURE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_task_latch_failure {
    /// Task.
    pub gtid: u64,
    /// Why (C field `errno`).
    pub errno_: i32,
}

/// `MSG_CPU_NOT_IDLE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_cpu_not_idle {
    /// CPU.
    pub cpu: i32,
    /// The task about to run.
    pub next_gtid: u64,
}

/// `MSG_CPU_TICK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_cpu_tick {
    /// CPU.
    pub cpu: i32,
    /// The tick interrupted an agent.
    pub is_agent: i32,
}

/// `MSG_CPU_TIMER_EXPIRED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_timer {
    /// CPU.
    pub cpu: i32,
    /// Timer type (from `timerfd_ghost.type`).
    pub type_: u64,
    /// Cookie (from `timerfd_ghost.cookie`).
    pub cookie: u64,
}

/// `MSG_CPU_AVAILABLE`, `MSG_CPU_BUSY`, `MSG_CPU_AGENT_BLOCKED`, `MSG_CPU_AGENT_WAKEUP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_payload_cpu {
    /// CPU.
    pub cpu: i32,
}

// ---------------------------------------------------------------------------------------------
// Status-word flags

/// In use.
pub const GHOST_SW_F_INUSE: u32 = 1 << 0;
/// May be freed with `GHOST_IOC_SW_FREE`.
pub const GHOST_SW_F_CANFREE: u32 = 1 << 1;
/// Allocated.
pub const GHOST_SW_F_ALLOCATED: u32 = 1 << 2;
/// Agent SW: the CPU is available to ghOSt (no higher class running).
pub const GHOST_SW_CPU_AVAIL: u32 = 1 << 8;
/// Agent SW: the agent is boosted (CFS wants the CPU).
pub const GHOST_SW_BOOST_PRIO: u32 = 1 << 9;
/// Task SW: on a CPU.
pub const GHOST_SW_TASK_ONCPU: u32 = 1 << 16;
/// Task SW: runnable.
pub const GHOST_SW_TASK_RUNNABLE: u32 = 1 << 17;
/// The SW belongs to an agent.
pub const GHOST_SW_TASK_IS_AGENT: u32 = 1 << 18;
/// Messages of a re-entered task are gated until the SW is freed.
pub const GHOST_SW_TASK_MSG_GATED: u32 = 1 << 19;

// ---------------------------------------------------------------------------------------------
// Transactions

/// Committed successfully.
pub const GHOST_TXN_COMPLETE: i32 = i32::MIN;
/// Aborted by the agent.
pub const GHOST_TXN_ABORTED: i32 = i32::MIN + 1;
/// The target runs on another CPU.
pub const GHOST_TXN_TARGET_ONCPU: i32 = i32::MIN + 2;
/// `task_barrier` did not match the task's status word.
pub const GHOST_TXN_TARGET_STALE: i32 = i32::MIN + 3;
/// No such task.
pub const GHOST_TXN_TARGET_NOT_FOUND: i32 = i32::MIN + 4;
/// The task is not runnable.
pub const GHOST_TXN_TARGET_NOT_RUNNABLE: i32 = i32::MIN + 5;
/// `agent_barrier` did not match (local commit).
pub const GHOST_TXN_AGENT_STALE: i32 = i32::MIN + 6;
/// The CPU is offline.
pub const GHOST_TXN_CPU_OFFLINE: i32 = i32::MIN + 7;
/// A higher scheduling class runs on the CPU.
pub const GHOST_TXN_CPU_UNAVAIL: i32 = i32::MIN + 8;
/// Bad flags.
pub const GHOST_TXN_INVALID_FLAGS: i32 = i32::MIN + 9;
/// Bad target (an agent, say).
pub const GHOST_TXN_INVALID_TARGET: i32 = i32::MIN + 10;
/// Not permitted.
pub const GHOST_TXN_NOT_PERMITTED: i32 = i32::MIN + 11;
/// Bad CPU.
pub const GHOST_TXN_INVALID_CPU: i32 = i32::MIN + 12;
/// The CPU has no agent.
pub const GHOST_TXN_NO_AGENT: i32 = i32::MIN + 13;
/// Bad `version`.
pub const GHOST_TXN_UNSUPPORTED_VERSION: i32 = i32::MIN + 14;
/// A sync group failed.
pub const GHOST_TXN_POISONED: i32 = i32::MIN + 15;
/// Open, ready to commit. Values `0..nr_cpus` mean "claimed by that CPU".
pub const GHOST_TXN_READY: i32 = i32::MAX;

/// Commit at the next schedule on the CPU.
pub const COMMIT_AT_SCHEDULE: u8 = 1 << 0;
/// Commit in the `GHOST_IOC_COMMIT_TXN` ioctl.
pub const COMMIT_AT_TXN_COMMIT: u8 = 1 << 1;
/// Allow a target that is on a CPU.
pub const ALLOW_TASK_ONCPU: u8 = 1 << 2;
/// Do not increment the agent barrier.
pub const ELIDE_AGENT_BARRIER_INC: u8 = 1 << 3;
/// Increment the agent barrier on failure.
pub const INC_AGENT_BARRIER_ON_FAILURE: u8 = 1 << 4;

/// Return to the local agent when the task is preempted.
pub const RTLA_ON_PREEMPT: u16 = 1 << 0;
/// … when it blocks.
pub const RTLA_ON_BLOCKED: u16 = 1 << 1;
/// … when it yields.
pub const RTLA_ON_YIELD: u16 = 1 << 2;
/// … when the CPU goes idle.
pub const RTLA_ON_IDLE: u16 = 1 << 5;
/// Flush L1D before entering the guest.
pub const NEED_L1D_FLUSH: u16 = 1 << 6;
/// Send `MSG_CPU_NOT_IDLE`.
pub const NEED_CPU_NOT_IDLE: u16 = 1 << 7;
/// Do not send `MSG_TASK_PREEMPT`.
pub const ELIDE_PREEMPT: u16 = 1 << 9;
/// Send `MSG_TASK_ON_CPU`.
pub const SEND_TASK_ON_CPU: u16 = 1 << 10;
/// Let the agent preempt a latched task.
pub const DEFER_LATCHED_PREEMPTION_BY_AGENT: u16 = 1 << 11;
/// Do not preempt the current task.
pub const DO_NOT_PREEMPT: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// ioctl arguments

/// `enum ghost_type` in [`ghost_msg_src`]: an agent (arg = CPU).
pub const GHOST_AGENT: i32 = 0;
/// `enum ghost_type`: a task (arg = gtid).
pub const GHOST_TASK: i32 = 1;

/// The source of messages: an agent's CPU or a task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_msg_src {
    /// `GHOST_AGENT` or `GHOST_TASK`.
    pub type_: i32,
    /// CPU or gtid.
    pub arg: u64,
}

/// `GHOST_IOC_SW_GET_INFO`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_ioc_sw_get_info {
    /// Whose status word.
    pub request: ghost_msg_src,
    /// Where it is.
    pub response: ghost_sw_info,
}

/// `GHOST_IOC_CREATE_QUEUE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_ioc_create_queue {
    /// Slots: a power of two, at most `GHOST_MAX_QUEUE_ELEMS`.
    pub elems: i32,
    /// NUMA node.
    pub node: i32,
    /// Must be 0.
    pub flags: i32,
    /// Out: bytes to map.
    pub mapsize: u64,
}

/// `GHOST_IOC_ASSOC_QUEUE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_ioc_assoc_queue {
    /// Queue fd.
    pub fd: i32,
    /// A task (`GHOST_TASK` only).
    pub src: ghost_msg_src,
    /// The task's status-word barrier (`ESTALE` on mismatch).
    pub barrier: u32,
    /// Flags.
    pub flags: i32,
}

/// Returned by `GHOST_IOC_ASSOC_QUEUE`: already associated.
pub const GHOST_ASSOC_SF_ALREADY: i32 = 1 << 0;
/// Returned by `GHOST_IOC_ASSOC_QUEUE`: the task is brand new.
pub const GHOST_ASSOC_SF_BRAND_NEW: i32 = 1 << 1;

/// `GHOST_IOC_SET_DEFAULT_QUEUE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_ioc_set_default_queue {
    /// Queue fd.
    pub fd: i32,
}

/// A CPU to wake when a queue gets a message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_agent_wakeup {
    /// CPU.
    pub cpu: i32,
    /// Must be 0.
    pub prio: i32,
}

/// `GHOST_IOC_CONFIG_QUEUE_WAKEUP`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ghost_ioc_config_queue_wakeup {
    /// Queue fd.
    pub qfd: i32,
    /// Array of `ninfo` wakeup targets.
    pub w: *mut ghost_agent_wakeup,
    /// 0 (polling) to `GHOST_MAX_WINFO`.
    pub ninfo: i32,
    /// Flags.
    pub flags: i32,
}

/// `GHOST_IOC_GET_CPU_TIME`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_ioc_get_cpu_time {
    /// Task.
    pub gtid: i64,
    /// Out: `task_sched_runtime`, ns.
    pub runtime: u64,
}

/// `GHOST_IOC_COMMIT_TXN` and `GHOST_IOC_SYNC_GROUP_TXN`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ghost_ioc_commit_txn {
    /// CPUs whose transactions to commit.
    pub mask_ptr: *mut libc::cpu_set_t,
    /// `size_of::<cpu_set_t>()` (128).
    pub mask_len: u32,
    /// Flags.
    pub flags: i32,
}

/// The ghOSt part of `GHOST_IOC_TIMERFD_SETTIME`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct timerfd_ghost {
    /// The CPU whose agent gets `MSG_CPU_TIMER_EXPIRED`.
    pub cpu: i32,
    /// `TIMERFD_GHOST_ENABLED`.
    pub flags: i32,
    /// Copied into the message.
    pub type_: u64,
    /// Copied into the message.
    pub cookie: u64,
}

/// `timerfd_ghost.flags`: deliver expiries to the agent.
pub const TIMERFD_GHOST_ENABLED: i32 = 1 << 0;

/// `GHOST_IOC_TIMERFD_SETTIME`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ghost_ioc_timerfd_settime {
    /// The timerfd.
    pub timerfd: i32,
    /// `timerfd_settime` flags.
    pub flags: i32,
    /// New setting.
    pub in_tmr: *const libc::itimerspec,
    /// Out: old setting.
    pub out_tmr: *mut libc::itimerspec,
    /// ghOSt delivery.
    pub timerfd_ghost: timerfd_ghost,
}

/// `GHOST_IOC_RUN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ghost_ioc_run {
    /// 0 = yield own CPU (blocks), -1 = ping the agent on `run_cpu`, else a task.
    pub gtid: i64,
    /// The agent's barrier.
    pub agent_barrier: u32,
    /// The task's barrier.
    pub task_barrier: u32,
    /// CPU.
    pub run_cpu: i32,
    /// Run flags.
    pub run_flags: i32,
}

// ---------------------------------------------------------------------------------------------
// ioctl numbers (type 'g', issued on an enclave's `ctl` fd opened O_RDWR)

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux's `_IOC(dir, type, nr, size)` on x86-64.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}
const G: u8 = b'g';

/// `_IO('g', 0)`.
pub const GHOST_IOC_NULL: u32 = ioc(IOC_NONE, G, 0, 0);
/// `_IOWR('g', 1, struct ghost_ioc_sw_get_info)`.
pub const GHOST_IOC_SW_GET_INFO: u32 = ioc(
    IOC_READ | IOC_WRITE,
    G,
    1,
    size_of::<ghost_ioc_sw_get_info>(),
);
/// `_IOW('g', 2, struct ghost_sw_info)`.
pub const GHOST_IOC_SW_FREE: u32 = ioc(IOC_WRITE, G, 2, size_of::<ghost_sw_info>());
/// `_IOWR('g', 3, struct ghost_ioc_create_queue)`.
pub const GHOST_IOC_CREATE_QUEUE: u32 = ioc(
    IOC_READ | IOC_WRITE,
    G,
    3,
    size_of::<ghost_ioc_create_queue>(),
);
/// `_IOW('g', 4, struct ghost_ioc_assoc_queue)`.
pub const GHOST_IOC_ASSOC_QUEUE: u32 = ioc(IOC_WRITE, G, 4, size_of::<ghost_ioc_assoc_queue>());
/// `_IOW('g', 5, struct ghost_ioc_set_default_queue)`.
pub const GHOST_IOC_SET_DEFAULT_QUEUE: u32 =
    ioc(IOC_WRITE, G, 5, size_of::<ghost_ioc_set_default_queue>());
/// `_IOW('g', 6, struct ghost_ioc_config_queue_wakeup)`.
pub const GHOST_IOC_CONFIG_QUEUE_WAKEUP: u32 =
    ioc(IOC_WRITE, G, 6, size_of::<ghost_ioc_config_queue_wakeup>());
/// `_IOWR('g', 7, struct ghost_ioc_get_cpu_time)`.
pub const GHOST_IOC_GET_CPU_TIME: u32 = ioc(
    IOC_READ | IOC_WRITE,
    G,
    7,
    size_of::<ghost_ioc_get_cpu_time>(),
);
/// `_IOW('g', 8, struct ghost_ioc_commit_txn)`.
pub const GHOST_IOC_COMMIT_TXN: u32 = ioc(IOC_WRITE, G, 8, size_of::<ghost_ioc_commit_txn>());
/// `_IOW('g', 9, struct ghost_ioc_commit_txn)`.
pub const GHOST_IOC_SYNC_GROUP_TXN: u32 = ioc(IOC_WRITE, G, 9, size_of::<ghost_ioc_commit_txn>());
/// `_IOWR('g', 10, struct ghost_ioc_timerfd_settime)`.
pub const GHOST_IOC_TIMERFD_SETTIME: u32 = ioc(
    IOC_READ | IOC_WRITE,
    G,
    10,
    size_of::<ghost_ioc_timerfd_settime>(),
);
/// `_IOW('g', 11, struct ghost_ioc_run)`.
pub const GHOST_IOC_RUN: u32 = ioc(IOC_WRITE, G, 11, size_of::<ghost_ioc_run>());

// ---------------------------------------------------------------------------------------------
// Layout checks against the sizes and offsets measured from the C header (x86-64).

macro_rules! layout {
    ($t:ty, size $s:expr, align $a:expr $(, $f:ident @ $o:expr)* $(,)?) => {
        const _: () = assert!(size_of::<$t>() == $s);
        const _: () = assert!(align_of::<$t>() == $a);
        $(const _: () = assert!(offset_of!($t, $f) == $o);)*
    };
}

layout!(ghost_sw_region_header, size 64, align 64, version @ 0, id @ 4, numa_node @ 8, start @ 12, capacity @ 16, available @ 20);
layout!(ghost_status_word, size 32, align 32, barrier @ 0, flags @ 4, gtid @ 8, switch_time @ 16, runtime @ 24);
layout!(ghost_queue_header, size 64, align 64, version @ 0, start @ 4, nelems @ 8);
layout!(ghost_ring, size 12, align 4, head @ 0, tail @ 4, overflow @ 8, msgs @ 12);
layout!(ghost_msg, size 8, align 4, type_ @ 0, length @ 2, seqnum @ 4, payload @ 8);
layout!(ghost_txn, size 64, align 64, version @ 0, cpu @ 4, state @ 8, agent_barrier @ 12, task_barrier @ 16,
    run_flags @ 20, commit_flags @ 22, unused @ 23, gtid @ 24, commit_time @ 32, cpu_seqnum @ 40, u @ 48);
layout!(ghost_cpu_data, size 4096, align 4096, txn @ 0);
layout!(ghost_sw_info, size 8, align 4, id @ 0, index @ 4);
layout!(ghost_msg_payload_task_new, size 48, align 8, gtid @ 0, parent_gtid @ 8, runtime @ 16, runnable @ 24,
    nice @ 28, sw_info @ 32, agent_data @ 40);
layout!(ghost_msg_payload_task_preempt, size 40, align 8, gtid @ 0, runtime @ 8, cpu_seqnum @ 16, agent_data @ 24,
    cpu @ 32, from_switchto @ 36, was_latched @ 37);
layout!(ghost_msg_payload_task_yield, size 40, align 8, gtid @ 0, runtime @ 8, cpu_seqnum @ 16, agent_data @ 24,
    cpu @ 32, from_switchto @ 36);
layout!(ghost_msg_payload_task_blocked, size 32, align 8, gtid @ 0, runtime @ 8, cpu_seqnum @ 16, cpu @ 24,
    from_switchto @ 28);
layout!(ghost_msg_payload_task_dead, size 16, align 8, gtid @ 0, cpu @ 8);
layout!(ghost_msg_payload_task_departed, size 24, align 8, gtid @ 0, cpu_seqnum @ 8, cpu @ 16, from_switchto @ 20,
    was_current @ 21);
layout!(ghost_msg_payload_task_affinity_changed, size 8, align 8, gtid @ 0);
layout!(ghost_msg_payload_task_priority_changed, size 16, align 8, gtid @ 0, nice @ 8);
layout!(ghost_msg_payload_task_wakeup, size 32, align 8, gtid @ 0, agent_data @ 8, deferrable @ 16,
    last_ran_cpu @ 20, wake_up_cpu @ 24, waker_cpu @ 28);
layout!(ghost_msg_payload_task_switchto, size 32, align 8, gtid @ 0, runtime @ 8, cpu_seqnum @ 16, cpu @ 24);
layout!(ghost_msg_payload_task_on_cpu, size 32, align 8, gtid @ 0, commit_time @ 8, cpu_seqnum @ 16, cpu @ 24);
layout!(ghost_msg_payload_task_latch_failure, size 16, align 8, gtid @ 0, errno_ @ 8);
layout!(ghost_msg_payload_cpu_not_idle, size 16, align 8, cpu @ 0, next_gtid @ 8);
layout!(ghost_msg_payload_cpu_tick, size 8, align 4, cpu @ 0, is_agent @ 4);
layout!(ghost_msg_payload_timer, size 24, align 8, cpu @ 0, type_ @ 8, cookie @ 16);
layout!(ghost_msg_payload_cpu, size 4, align 4, cpu @ 0);
layout!(ghost_msg_src, size 16, align 8, type_ @ 0, arg @ 8);
layout!(ghost_ioc_sw_get_info, size 24, align 8, request @ 0, response @ 16);
layout!(ghost_ioc_create_queue, size 24, align 8, elems @ 0, node @ 4, flags @ 8, mapsize @ 16);
layout!(ghost_ioc_assoc_queue, size 32, align 8, fd @ 0, src @ 8, barrier @ 24, flags @ 28);
layout!(ghost_ioc_set_default_queue, size 4, align 4, fd @ 0);
layout!(ghost_agent_wakeup, size 8, align 4, cpu @ 0, prio @ 4);
layout!(ghost_ioc_config_queue_wakeup, size 24, align 8, qfd @ 0, w @ 8, ninfo @ 16, flags @ 20);
layout!(ghost_ioc_get_cpu_time, size 16, align 8, gtid @ 0, runtime @ 8);
layout!(ghost_ioc_commit_txn, size 16, align 8, mask_ptr @ 0, mask_len @ 8, flags @ 12);
layout!(timerfd_ghost, size 24, align 8, cpu @ 0, flags @ 4, type_ @ 8, cookie @ 16);
layout!(ghost_ioc_timerfd_settime, size 48, align 8, timerfd @ 0, flags @ 4, in_tmr @ 8, out_tmr @ 16, timerfd_ghost @ 24);
layout!(ghost_ioc_run, size 24, align 8, gtid @ 0, agent_barrier @ 8, task_barrier @ 12, run_cpu @ 16, run_flags @ 20);

/// Size of a status-word region: 64-byte header + 65 534 status words (ABI-69 kernel code).
pub const GHOST_SW_REGION_SIZE: usize = 2_097_152;
/// Status words in a region.
pub const GHOST_SW_REGION_CAPACITY: u32 = 65534;
const _: () = assert!(
    size_of::<ghost_sw_region_header>()
        + GHOST_SW_REGION_CAPACITY as usize * size_of::<ghost_status_word>()
        == GHOST_SW_REGION_SIZE
);

/// Bytes to map for a queue of `elems` slots: `PAGE_ALIGN(64 + 12 + elems × 8)`.
pub const fn queue_mapsize(elems: u32, page: usize) -> usize {
    let raw = size_of::<ghost_queue_header>()
        + size_of::<ghost_ring>()
        + elems as usize * size_of::<ghost_msg>();
    raw.div_ceil(page) * page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_their_literal_values() {
        assert_eq!(GHOST_IOC_NULL, 0x0000_6700);
        assert_eq!(GHOST_IOC_SW_GET_INFO, 0xc018_6701);
        assert_eq!(GHOST_IOC_SW_FREE, 0x4008_6702);
        assert_eq!(GHOST_IOC_CREATE_QUEUE, 0xc018_6703);
        assert_eq!(GHOST_IOC_ASSOC_QUEUE, 0x4020_6704);
        assert_eq!(GHOST_IOC_SET_DEFAULT_QUEUE, 0x4004_6705);
        assert_eq!(GHOST_IOC_CONFIG_QUEUE_WAKEUP, 0x4018_6706);
        assert_eq!(GHOST_IOC_GET_CPU_TIME, 0xc010_6707);
        assert_eq!(GHOST_IOC_COMMIT_TXN, 0x4010_6708);
        assert_eq!(GHOST_IOC_SYNC_GROUP_TXN, 0x4010_6709);
        assert_eq!(GHOST_IOC_TIMERFD_SETTIME, 0xc030_670a);
        assert_eq!(GHOST_IOC_RUN, 0x4018_670b);
    }

    #[test]
    fn transaction_states_are_the_kernels() {
        assert_eq!(GHOST_TXN_COMPLETE, -2_147_483_648);
        assert_eq!(GHOST_TXN_POISONED, GHOST_TXN_COMPLETE + 15);
        assert_eq!(GHOST_TXN_READY, 2_147_483_647);
    }

    #[test]
    fn queue_mapsize_is_page_aligned() {
        assert_eq!(queue_mapsize(GHOST_MAX_QUEUE_ELEMS, 4096), 528_384);
        assert_eq!(queue_mapsize(16, 4096), 4096);
    }

    #[test]
    fn cpu_set_is_128_bytes() {
        assert_eq!(size_of::<libc::cpu_set_t>(), 128);
    }
}
