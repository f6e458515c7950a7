//! The CPUs each thread may run on, as the mechanism learns them (a user pins a vCPU with
//! `taskset` or `virsh vcpupin`; the kernel refuses to run a thread elsewhere): the decisions
//! put a waiting thread only on a free CPU it may use, and take a thread of another VM off a
//! CPU only for one that may run there. A thread with no such set may run on any managed CPU.

use std::collections::HashSet;

use super::{Scheduler, ThreadId, VmId};

#[cfg(test)]
mod tests;

/// The CPUs a VM's thread is kept to by a mechanism that runs it only on `managed` CPUs: those
/// of them it may already use, so an operator's pin (libvirt's `<vcpupin>`, `taskset`) within
/// them is kept; all of them when it may use none (or its CPUs cannot be read), since on other
/// CPUs nothing would hold it to its budget. Also whether a pin is replaced (not narrowed).
/// The sched_ext enforcer and the ghOSt agent both apply it.
pub fn confined(current: Option<&[u32]>, managed: &[u32]) -> (Vec<u32>, bool) {
    let Some(current) = current else {
        return (managed.to_vec(), false);
    };
    let kept: Vec<u32> = managed
        .iter()
        .copied()
        .filter(|c| current.contains(c))
        .collect();
    if kept.is_empty() {
        (managed.to_vec(), true)
    } else {
        (kept, false)
    }
}

impl Scheduler {
    /// Thread `tid` may run only on `cpus` (the mechanism's CPU numbers) from now on; `None`,
    /// or a set holding every managed CPU, lifts the restriction. A set with none of the
    /// managed CPUs lifts it too: such a thread could never be given a CPU, and the mechanism
    /// is left to refuse its dispatches, as before it told the policy anything. Unknown
    /// threads are ignored.
    pub fn set_allowed(&mut self, tid: ThreadId, cpus: Option<&[u32]>) {
        let managed = &self.cpus;
        let allowed = cpus.and_then(|cpus| {
            let idx: Vec<usize> = (0..managed.len())
                .filter(|&i| cpus.contains(&managed[i]))
                .collect();
            (!idx.is_empty() && idx.len() < managed.len()).then_some(idx)
        });
        if let Some(t) = self.threads.get_mut(&tid) {
            t.allowed = allowed;
        }
    }

    /// The CPUs `tid` may run on, as set by [`Scheduler::set_allowed`] (`None`: all).
    pub fn allowed(&self, tid: ThreadId) -> Option<Vec<u32>> {
        let t = self.threads.get(&tid)?;
        t.allowed
            .as_ref()
            .map(|idx| idx.iter().map(|&i| self.cpus[i]).collect())
    }

    /// Whether `tid` may run on the managed CPU of index `cpu`.
    pub(super) fn may_use(&self, tid: ThreadId, cpu: usize) -> bool {
        self.threads
            .get(&tid)
            .is_none_or(|t| t.allowed.as_ref().is_none_or(|a| a.contains(&cpu)))
    }

    /// For a free CPU: the first of `vm`'s waiting threads that may use one, with the CPU (its
    /// last if free and allowed, for cache warmth, else the first free one it may use), as
    /// (its position in the VM's queue, the CPU's index). `None`: none of them may use a
    /// free CPU.
    pub(super) fn pick_free(&self, vm: VmId) -> Option<(usize, usize)> {
        let v = &self.vms[&vm];
        let free = |c: usize| self.current[c].is_none();
        v.waiting.iter().enumerate().find_map(|(pos, &tid)| {
            let last = self.threads[&tid].last_cpu;
            let cpu = last
                .filter(|&c| free(c) && self.may_use(tid, c))
                .or_else(|| (0..self.current.len()).find(|&c| free(c) && self.may_use(tid, c)))?;
            Some((pos, cpu))
        })
    }

    /// The CPUs (indices) some waiting thread of `vm` may use.
    pub(super) fn usable_by(&self, vm: VmId) -> HashSet<usize> {
        let v = &self.vms[&vm];
        (0..self.current.len())
            .filter(|&c| v.waiting.iter().any(|&t| self.may_use(t, c)))
            .collect()
    }

    /// The first of `vm`'s waiting threads that may use the CPU of index `cpu`.
    pub(super) fn waiting_for(&self, vm: VmId, cpu: usize) -> Option<usize> {
        self.vms[&vm]
            .waiting
            .iter()
            .position(|&t| self.may_use(t, cpu))
    }
}
