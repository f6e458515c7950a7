//! The message queue: the agent's side of the kernel's ring, and the decoded messages.

use std::fs::File;
use std::sync::atomic::{AtomicU32, Ordering};

use ghost_sys as abi;

use super::{GhostError, Mapping};

/// A decoded message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// `MSG_TASK_NEW`.
    TaskNew(abi::ghost_msg_payload_task_new),
    /// `MSG_TASK_WAKEUP`.
    TaskWakeup(abi::ghost_msg_payload_task_wakeup),
    /// `MSG_TASK_BLOCKED`.
    TaskBlocked(abi::ghost_msg_payload_task_blocked),
    /// `MSG_TASK_PREEMPT`.
    TaskPreempt(abi::ghost_msg_payload_task_preempt),
    /// `MSG_TASK_YIELD`.
    TaskYield(abi::ghost_msg_payload_task_yield),
    /// `MSG_TASK_DEAD`.
    TaskDead(abi::ghost_msg_payload_task_dead),
    /// `MSG_TASK_DEPARTED`.
    TaskDeparted(abi::ghost_msg_payload_task_departed),
    /// `MSG_TASK_SWITCHTO`.
    TaskSwitchto(abi::ghost_msg_payload_task_switchto),
    /// `MSG_TASK_AFFINITY_CHANGED`.
    TaskAffinityChanged(abi::ghost_msg_payload_task_affinity_changed),
    /// `MSG_TASK_ON_CPU`.
    TaskOnCpu(abi::ghost_msg_payload_task_on_cpu),
    /// `MSG_TASK_PRIORITY_CHANGED`.
    TaskPriorityChanged(abi::ghost_msg_payload_task_priority_changed),
    /// `MSG_TASK_LATCH_FAILURE`.
    TaskLatchFailure(abi::ghost_msg_payload_task_latch_failure),
    /// `MSG_CPU_TICK`.
    CpuTick(abi::ghost_msg_payload_cpu_tick),
    /// `MSG_CPU_TIMER_EXPIRED`.
    CpuTimerExpired(abi::ghost_msg_payload_timer),
    /// `MSG_CPU_NOT_IDLE`.
    CpuNotIdle(abi::ghost_msg_payload_cpu_not_idle),
    /// `MSG_CPU_AVAILABLE`.
    CpuAvailable(abi::ghost_msg_payload_cpu),
    /// `MSG_CPU_BUSY`.
    CpuBusy(abi::ghost_msg_payload_cpu),
    /// `MSG_CPU_AGENT_BLOCKED`.
    CpuAgentBlocked(abi::ghost_msg_payload_cpu),
    /// `MSG_CPU_AGENT_WAKEUP`.
    CpuAgentWakeup(abi::ghost_msg_payload_cpu),
    /// A type this ABI does not know.
    Unknown {
        /// Its type number.
        type_: u16,
        /// Its payload.
        payload: Vec<u8>,
    },
}

/// A message with its sequence number.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    /// The task's (or agent's) status-word barrier after the kernel's increment.
    pub seqnum: u32,
    /// The message.
    pub message: Message,
}

/// A message queue: the agent's side of the kernel's ring.
#[derive(Debug)]
pub struct Queue {
    map: Mapping,
    pub(super) file: File,
    ring: usize,
    nelems: u32,
    overflow_seen: u32,
}

impl Queue {
    pub(super) fn new(map: Mapping, file: File) -> Result<Self, GhostError> {
        let header: abi::ghost_queue_header = map
            .read(0)
            .ok_or_else(|| GhostError::Corrupt("queue mapping smaller than its header".into()))?;
        let ring = header.start as usize;
        let nelems = header.nelems;
        let fits = map
            .at(
                ring,
                size_of::<abi::ghost_ring>() + nelems as usize * size_of::<abi::ghost_msg>(),
            )
            .is_some();
        if header.version != abi::GHOST_QUEUE_VERSION
            || !nelems.is_power_of_two()
            || !fits
            || !ring.is_multiple_of(4)
        {
            return Err(GhostError::Corrupt(format!(
                "queue header version {}, start {ring}, nelems {nelems} in a {}-byte mapping",
                header.version,
                map.len()
            )));
        }
        Ok(Queue {
            map,
            file,
            ring,
            nelems,
            overflow_seen: 0,
        })
    }

    fn head(&self) -> &AtomicU32 {
        self.map.atomic_u32(self.ring)
    }
    fn tail(&self) -> &AtomicU32 {
        self.map.atomic_u32(self.ring + 4)
    }

    /// Messages the kernel dropped because the ring was full, since the last call (the ring's
    /// `overflow` counter only grows).
    pub fn take_overflow(&mut self) -> u32 {
        let total = self.map.atomic_u32(self.ring + 8).load(Ordering::Acquire);
        let new = total.wrapping_sub(self.overflow_seen);
        self.overflow_seen = total;
        new
    }

    /// The next message, consumed; `Ok(None)` when the ring is empty. NOPs (the kernel's padding
    /// to the end of the ring) are consumed silently.
    pub fn pop(&mut self) -> Result<Option<Received>, GhostError> {
        loop {
            // Acquire pairs with the kernel's release of `head` after writing the message.
            let head = self.head().load(Ordering::Acquire);
            let tail = self.tail().load(Ordering::Relaxed);
            if head == tail {
                return Ok(None);
            }
            let slot = (tail & (self.nelems - 1)) as usize;
            let offset =
                self.ring + size_of::<abi::ghost_ring>() + slot * size_of::<abi::ghost_msg>();
            // The ring starts at byte 76 of the mapping: payload fields are not 8-aligned.
            let header: abi::ghost_msg = self.map.read(offset).expect("slot within the ring");
            let len = header.length as usize;
            let slots = len.div_ceil(size_of::<abi::ghost_msg>());
            if len < size_of::<abi::ghost_msg>()
                || slot + slots > self.nelems as usize
                || slots as u32 > head.wrapping_sub(tail)
            {
                return Err(GhostError::Corrupt(format!(
                    "message type {} of {len} bytes at slot {slot} of {} (head {head}, tail {tail})",
                    header.type_, self.nelems
                )));
            }
            let payload_at = offset + size_of::<abi::ghost_msg>();
            let payload_len = len - size_of::<abi::ghost_msg>();
            let message = if header.type_ == abi::MSG_NOP {
                None
            } else {
                Some(self.decode(header.type_, payload_at, payload_len)?)
            };
            // Release: the kernel may reuse the slots only after we are done reading them.
            self.tail()
                .store(tail.wrapping_add(slots as u32), Ordering::Release);
            if let Some(message) = message {
                return Ok(Some(Received {
                    seqnum: header.seqnum,
                    message,
                }));
            }
        }
    }

    fn decode(&self, type_: u16, at: usize, len: usize) -> Result<Message, GhostError> {
        fn payload<T: Copy>(q: &Queue, type_: u16, at: usize, len: usize) -> Result<T, GhostError> {
            if len < size_of::<T>() {
                return Err(GhostError::Corrupt(format!(
                    "message type {type_}: {len}-byte payload, expected {}",
                    size_of::<T>()
                )));
            }
            Ok(q.map.read(at).expect("payload within the ring"))
        }
        use Message::*;
        Ok(match type_ {
            abi::MSG_TASK_NEW => TaskNew(payload(self, type_, at, len)?),
            abi::MSG_TASK_WAKEUP => TaskWakeup(payload(self, type_, at, len)?),
            abi::MSG_TASK_BLOCKED => TaskBlocked(payload(self, type_, at, len)?),
            abi::MSG_TASK_PREEMPT => TaskPreempt(payload(self, type_, at, len)?),
            abi::MSG_TASK_YIELD => TaskYield(payload(self, type_, at, len)?),
            abi::MSG_TASK_DEAD => TaskDead(payload(self, type_, at, len)?),
            abi::MSG_TASK_DEPARTED => TaskDeparted(payload(self, type_, at, len)?),
            abi::MSG_TASK_SWITCHTO => TaskSwitchto(payload(self, type_, at, len)?),
            abi::MSG_TASK_AFFINITY_CHANGED => TaskAffinityChanged(payload(self, type_, at, len)?),
            abi::MSG_TASK_ON_CPU => TaskOnCpu(payload(self, type_, at, len)?),
            abi::MSG_TASK_PRIORITY_CHANGED => TaskPriorityChanged(payload(self, type_, at, len)?),
            abi::MSG_TASK_LATCH_FAILURE => TaskLatchFailure(payload(self, type_, at, len)?),
            abi::MSG_CPU_TICK => CpuTick(payload(self, type_, at, len)?),
            abi::MSG_CPU_TIMER_EXPIRED => CpuTimerExpired(payload(self, type_, at, len)?),
            abi::MSG_CPU_NOT_IDLE => CpuNotIdle(payload(self, type_, at, len)?),
            abi::MSG_CPU_AVAILABLE => CpuAvailable(payload(self, type_, at, len)?),
            abi::MSG_CPU_BUSY => CpuBusy(payload(self, type_, at, len)?),
            abi::MSG_CPU_AGENT_BLOCKED => CpuAgentBlocked(payload(self, type_, at, len)?),
            abi::MSG_CPU_AGENT_WAKEUP => CpuAgentWakeup(payload(self, type_, at, len)?),
            _ => Unknown {
                type_,
                payload: (0..len)
                    .map(|i| self.map.read::<u8>(at + i).unwrap_or(0))
                    .collect(),
            },
        })
    }
}
