//! The model's side of agents: `become agent`, `agent_online`, `discover tasks`, agent status
//! words, `GHOST_IOC_RUN`, `SW_GET_INFO`, `GET_CPU_TIME`, ghOSt timerfds and sync-group
//! commits, as the fact sheet describes them.

use std::ffi::c_void;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use ghost_sys as abi;

use super::{as_bytes, errno, KEnclave, Model, NCPUS};

/// Changes status word `index` (fields, then the barrier with release); the new barrier.
fn bump_index(e: &KEnclave, index: u32, flags: u32) -> u32 {
    let (barrier, flag_word, _) = e.sw(index);
    flag_word.store(flags, Ordering::Release);
    barrier.fetch_add(1, Ordering::Release) + 1
}

impl Model {
    /// `ctl` commands of agents: `become agent <cpu> <qfd>`, `discover tasks`.
    pub(super) fn agent_ctl(&self, id: u64, parts: &[&str]) -> io::Result<()> {
        match parts {
            ["become", "agent", cpu, _qfd] => {
                let cpu: u32 = cpu.parse().map_err(|_| errno(libc::EINVAL))?;
                self.with(id, |e| {
                    if !e.cpus.contains(&cpu) {
                        return Err(errno(libc::EINVAL));
                    }
                    if e.agent_sw.contains_key(&cpu) {
                        return Err(errno(libc::EBUSY));
                    }
                    if e.sw.is_none() {
                        return Err(errno(libc::ENOSPC));
                    }
                    let index = e.next_sw;
                    e.next_sw += 1;
                    let (_, _, p) = e.sw(index);
                    // SAFETY: the model's own mapping of the region.
                    unsafe {
                        std::ptr::addr_of_mut!((*p).gtid)
                            .write_volatile(abi::GHOST_AGENT_GTID as u64)
                    };
                    bump_index(
                        e,
                        index,
                        abi::GHOST_SW_F_INUSE
                            | abi::GHOST_SW_TASK_IS_AGENT
                            | abi::GHOST_SW_CPU_AVAIL,
                    );
                    e.agent_sw.insert(cpu, index);
                    if !e.agents.contains(&cpu) {
                        e.agents.push(cpu);
                    }
                    Ok(())
                })
            }
            ["discover", "tasks"] => self.with(id, |e| {
                let mut tasks: Vec<(u64, super::KTask)> =
                    e.tasks.iter().map(|(&g, t)| (g, t.clone())).collect();
                tasks.sort_by_key(|t| t.1.sw_index);
                for (gtid, t) in tasks {
                    let (_, flags, _) = e.sw(t.sw_index);
                    let seq = bump_index(e, t.sw_index, flags.load(Ordering::Acquire));
                    let new = abi::ghost_msg_payload_task_new {
                        gtid,
                        runnable: u16::from(t.runnable),
                        runtime: t.runtime,
                        sw_info: abi::ghost_sw_info {
                            id: 0,
                            index: t.sw_index,
                        },
                        ..Default::default()
                    };
                    if let Some(q) = t.queue.as_ref().and_then(|p| e.queue(p)) {
                        q.produce(abi::MSG_TASK_NEW, seq, as_bytes(&new));
                    }
                }
                Ok(())
            }),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// `agent_online`: one read-write open per enclave (the second is `EBUSY`).
    pub(super) fn open_agent_online(&self, path: &Path) -> io::Result<File> {
        let id = self.enclave_of(path).ok_or_else(|| errno(libc::ENOENT))?;
        if path.file_name().and_then(|n| n.to_str()) != Some("agent_online") {
            return OpenOptions::new().read(true).write(true).open(path);
        }
        self.with(id, |e| {
            if e.online {
                return Err(errno(libc::EBUSY));
            }
            e.online = true;
            fs::write(path, "1\n")?;
            OpenOptions::new().read(true).write(true).open(path)
        })
    }

    /// The agent process died: its agents leave (their CPUs have none), `agent_online` is
    /// closed. Tasks stay in the enclave, as in the kernel.
    pub fn agent_process_died(&self, id: u64) {
        self.with(id, |e| {
            let gone: Vec<u32> = e.agent_sw.drain().map(|(_, index)| index).collect();
            for index in gone {
                let (_, flags, _) = e.sw(index);
                flags.store(0, Ordering::Release);
            }
            e.agents.clear();
            e.online = false;
            let _ = fs::write(e.dir.join("agent_online"), "0\n");
        });
    }

    /// Sets a task's cumulative CPU time.
    pub fn set_runtime(&self, id: u64, gtid: u64, ns: u64) {
        self.with(id, |e| {
            if let Some(t) = e.tasks.get_mut(&gtid) {
                t.runtime = ns;
            }
        });
    }

    /// The barrier of `cpu`'s agent status word.
    pub fn agent_barrier(&self, id: u64, cpu: u32) -> Option<u32> {
        self.with(id, |e| {
            let index = *e.agent_sw.get(&cpu)?;
            Some(e.sw(index).0.load(Ordering::Acquire))
        })
    }

    /// Fires armed timer `n`: `MSG_CPU_TIMER_EXPIRED` to the default queue, the agent barrier
    /// of its CPU bumped (a CPU message). Returns whether it was queued.
    pub fn fire_timer(&self, id: u64, n: usize) -> bool {
        self.with(id, |e| {
            let Some(&(cpu, type_, cookie)) = e.timers.get(n) else {
                return false;
            };
            let Some(&index) = e.agent_sw.get(&(cpu as u32)) else {
                return false;
            };
            let (_, flags, _) = e.sw(index);
            let seq = bump_index(e, index, flags.load(Ordering::Acquire));
            let msg = abi::ghost_msg_payload_timer { cpu, type_, cookie };
            let Some(path) = e.default_queue.clone() else {
                return false;
            };
            e.queue(&path)
                .is_some_and(|q| q.produce(abi::MSG_CPU_TIMER_EXPIRED, seq, as_bytes(&msg)))
        })
    }

    /// `GHOST_IOC_RUN` as an agent uses it: a ping moves the agent's barrier; an idle wait
    /// (`GHOST_NULL_GTID`) fails `ESTALE` on a barrier that moved before it, else blocks as the
    /// kernel does, until the barrier moves (a ping, a message for that CPU) or the enclave
    /// dies (`ENODEV`, also when it is already gone). The model has no scheduler to wake the
    /// sleeper: it looks every 200 µs, and returns after 20 ms in any case (a spurious wakeup,
    /// which an agent must take anyway).
    fn run(&self, id: u64, a: &abi::ghost_ioc_run) -> io::Result<i32> {
        let cpu = u32::try_from(a.run_cpu).map_err(|_| errno(libc::EINVAL))?;
        let barrier = |e: &mut KEnclave| -> io::Result<u32> {
            let index = *e.agent_sw.get(&cpu).ok_or_else(|| errno(libc::EINVAL))?;
            Ok(e.sw(index).0.load(Ordering::Acquire))
        };
        match a.gtid {
            abi::GHOST_AGENT_GTID => self.try_with(id, |e| {
                // Ping: the agent's barrier moves and it wakes.
                let index = *e.agent_sw.get(&cpu).ok_or_else(|| errno(libc::EINVAL))?;
                let (_, flags, _) = e.sw(index);
                bump_index(e, index, flags.load(Ordering::Acquire));
                Ok(0)
            })?,
            abi::GHOST_NULL_GTID => {
                if self.try_with(id, barrier)?? != a.agent_barrier {
                    return Err(errno(libc::ESTALE));
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(20);
                while std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    if self.try_with(id, barrier)?? != a.agent_barrier {
                        break;
                    }
                }
                Ok(0)
            }
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// The ioctls of agents.
    ///
    /// # Safety
    ///
    /// `arg` points to the argument struct `request` encodes.
    pub(super) unsafe fn agent_ioctl(
        &self,
        id: u64,
        request: u32,
        arg: *mut c_void,
    ) -> io::Result<i32> {
        match request {
            abi::GHOST_IOC_SW_GET_INFO => {
                // SAFETY: the caller passes a ghost_ioc_sw_get_info for this request.
                let a = unsafe { &mut *(arg as *mut abi::ghost_ioc_sw_get_info) };
                self.with(id, |e| {
                    let index = match a.request.type_ {
                        abi::GHOST_AGENT => *e
                            .agent_sw
                            .get(&(a.request.arg as u32))
                            .ok_or_else(|| errno(libc::ENOENT))?,
                        abi::GHOST_TASK => {
                            e.tasks
                                .get(&a.request.arg)
                                .ok_or_else(|| errno(libc::ENOENT))?
                                .sw_index
                        }
                        _ => return Err(errno(libc::EINVAL)),
                    };
                    a.response = abi::ghost_sw_info { id: 0, index };
                    Ok(0)
                })
            }
            abi::GHOST_IOC_GET_CPU_TIME => {
                // SAFETY: the caller passes a ghost_ioc_get_cpu_time for this request.
                let a = unsafe { &mut *(arg as *mut abi::ghost_ioc_get_cpu_time) };
                self.with(id, |e| {
                    a.runtime = e
                        .tasks
                        .get(&(a.gtid as u64))
                        .ok_or_else(|| errno(libc::ENOENT))?
                        .runtime;
                    Ok(0)
                })
            }
            abi::GHOST_IOC_RUN => {
                // SAFETY: the caller passes a ghost_ioc_run for this request.
                let a = unsafe { &*(arg as *const abi::ghost_ioc_run) };
                self.run(id, a)
            }
            abi::GHOST_IOC_TIMERFD_SETTIME => {
                // SAFETY: the caller passes a ghost_ioc_timerfd_settime for this request.
                let a = unsafe { &*(arg as *const abi::ghost_ioc_timerfd_settime) };
                if a.in_tmr.is_null() || a.timerfd_ghost.flags & !abi::TIMERFD_GHOST_ENABLED != 0 {
                    return Err(errno(libc::EINVAL));
                }
                let g = a.timerfd_ghost;
                self.with(id, |e| {
                    if g.flags & abi::TIMERFD_GHOST_ENABLED != 0 {
                        if !e.cpus.contains(&(g.cpu as u32)) {
                            return Err(errno(libc::EINVAL));
                        }
                        e.timers.push((g.cpu, g.type_, g.cookie));
                    }
                    Ok(0)
                })
            }
            abi::GHOST_IOC_SYNC_GROUP_TXN => {
                // SAFETY: the caller passes a ghost_ioc_commit_txn for this request.
                let a = unsafe { &*(arg as *const abi::ghost_ioc_commit_txn) };
                if a.mask_len as usize != size_of::<libc::cpu_set_t>() || a.mask_ptr.is_null() {
                    return Err(errno(libc::EINVAL));
                }
                // SAFETY: mask_ptr points to a cpu_set_t of mask_len bytes (checked above).
                let set = unsafe { &*a.mask_ptr };
                Ok(i32::from(self.sync_group(id, set)))
            }
            _ => Err(errno(libc::ENOTTY)),
        }
    }

    /// All or nothing: every claimed transaction is validated first; if one fails, it keeps
    /// its failure and the others read `POISONED`.
    fn sync_group(&self, id: u64, set: &libc::cpu_set_t) -> bool {
        self.with(id, |e| {
            let mut claimed = Vec::new();
            for cpu in 0..NCPUS {
                // SAFETY: CPU_ISSET reads within the set.
                if !unsafe { libc::CPU_ISSET(cpu, set) } {
                    continue;
                }
                let state = e.cpu_data.atomic_u32(cpu * 4096 + 8);
                if state
                    .compare_exchange(
                        abi::GHOST_TXN_READY as u32,
                        cpu as u32,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    let base = e.cpu_data.at(cpu * 4096, 64).expect("txn") as *mut abi::ghost_txn;
                    // SAFETY: claimed: the agent does not touch the txn until its final state.
                    let txn = unsafe { std::ptr::read_volatile(base) };
                    claimed.push((cpu, base, Self::validate(e, cpu as u32, &txn), txn.gtid));
                }
            }
            let ok = !claimed.is_empty() && claimed.iter().all(|c| c.2 == abi::GHOST_TXN_COMPLETE);
            for (cpu, base, outcome, gtid) in claimed {
                let state = e.cpu_data.atomic_u32(cpu * 4096 + 8);
                let outcome = if ok {
                    if let Some(t) = e.tasks.get_mut(&(gtid as u64)) {
                        t.on_cpu = Some(cpu as u32);
                    }
                    // SAFETY: claimed; commit_time is written before the release of the state.
                    unsafe { std::ptr::addr_of_mut!((*base).commit_time).write_volatile(1) };
                    abi::GHOST_TXN_COMPLETE
                } else if outcome == abi::GHOST_TXN_COMPLETE {
                    abi::GHOST_TXN_POISONED
                } else {
                    outcome
                };
                state.store(outcome as u32, Ordering::Release);
            }
            ok
        })
    }
}
