//! The rest of the ghOSt operations an agent needs (fact sheet §1, §3, §4): agent threads
//! that become agents, `agent_online`, their own status words, `GHOST_IOC_RUN` (idle-wait,
//! ping), `GHOST_IOC_GET_CPU_TIME`, ghOSt timerfds, sync-group commits, discovering the tasks
//! already in the enclave, and transactions with an explicit version.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use ghost_sys as abi;

use super::{CpuData, Enclave, GhostError, Queue, TxnRequest};

/// Whose status word [`Enclave::status_word_info`] looks up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwOwner {
    /// The agent of a CPU.
    Agent(u32),
    /// A task.
    Task(u64),
}

/// How a `GHOST_IOC_RUN` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// It ran (an idle-wait returned: a ping, a message or a barrier change).
    Returned,
    /// The agent barrier was stale: the agent has messages to read first (`ESTALE`).
    Stale,
    /// The enclave is being destroyed (`ENODEV`).
    EnclaveDying,
}

/// `agent_online` held open: while it is, the enclave has an online agent. Dropping it
/// advertises the agent as gone (a successor waits for that).
#[derive(Debug)]
pub struct AgentOnline {
    _file: File,
}

fn cpu_set(cpus: &[u32]) -> Result<libc::cpu_set_t, GhostError> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if (cpu as usize) < 8 * size_of::<libc::cpu_set_t>() {
            // SAFETY: CPU_SET writes within the set: the CPU is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        } else {
            return Err(GhostError::Misuse(format!("CPU {cpu} is beyond cpu_set_t")));
        }
    }
    Ok(set)
}

impl Enclave<'_> {
    /// The calling thread becomes the agent of `cpu`, taking its messages from the queue
    /// `queue_fd` ([`Queue::fd`])
    /// (`become agent <cpu> <qfd>`). `EBUSY` (the previous agent still leaving) is retried
    /// 10 times, 50 ms apart, as userspace does.
    pub fn become_agent(&self, cpu: u32, queue_fd: RawFd) -> Result<(), GhostError> {
        let cmd = format!("become agent {cpu} {queue_fd}");
        for attempt in 0.. {
            match self.write("ctl", &cmd) {
                Err(GhostError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && attempt < 9 =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// Opens `agent_online` read-write: the enclave's agent is online while the result lives.
    /// `EBUSY` if another agent process holds it.
    pub fn agent_online(&self) -> Result<AgentOnline, GhostError> {
        let path = self.dir.join("agent_online");
        let file = self
            .fs
            .kernel
            .open_rw(&path)
            .map_err(super::io_at("opening", &path))?;
        Ok(AgentOnline { _file: file })
    }

    /// Whether an agent is online (`agent_online` reads 1).
    pub fn is_agent_online(&self) -> Result<bool, GhostError> {
        let path = self.dir.join("agent_online");
        let text = std::fs::read_to_string(&path).map_err(super::io_at("reading", &path))?;
        Ok(text.trim() == "1")
    }

    /// Asks the kernel to send `TASK_NEW` again for every task in the enclave (`discover
    /// tasks`): how a restarted agent learns the tasks its predecessor had.
    pub fn discover_tasks(&self) -> Result<(), GhostError> {
        self.write("ctl", "discover tasks")
    }

    /// Where the status word of an agent or task is (`GHOST_IOC_SW_GET_INFO`).
    pub fn status_word_info(&self, owner: SwOwner) -> Result<abi::ghost_sw_info, GhostError> {
        let request = match owner {
            SwOwner::Agent(cpu) => abi::ghost_msg_src {
                type_: abi::GHOST_AGENT,
                arg: u64::from(cpu),
            },
            SwOwner::Task(gtid) => abi::ghost_msg_src {
                type_: abi::GHOST_TASK,
                arg: gtid,
            },
        };
        let mut arg = abi::ghost_ioc_sw_get_info {
            request,
            response: abi::ghost_sw_info::default(),
        };
        // SAFETY: GHOST_IOC_SW_GET_INFO takes a ghost_ioc_sw_get_info.
        unsafe { self.ioctl(abi::GHOST_IOC_SW_GET_INFO, &mut arg) }?;
        Ok(arg.response)
    }

    /// A task's cumulative CPU time, ns (`GHOST_IOC_GET_CPU_TIME`).
    pub fn cpu_time(&self, gtid: u64) -> Result<u64, GhostError> {
        let mut arg = abi::ghost_ioc_get_cpu_time {
            gtid: gtid as i64,
            runtime: 0,
        };
        // SAFETY: GHOST_IOC_GET_CPU_TIME takes a ghost_ioc_get_cpu_time.
        unsafe { self.ioctl(abi::GHOST_IOC_GET_CPU_TIME, &mut arg) }?;
        Ok(arg.runtime)
    }

    fn run(&self, mut arg: abi::ghost_ioc_run) -> Result<RunOutcome, GhostError> {
        // SAFETY: GHOST_IOC_RUN takes a ghost_ioc_run.
        match unsafe { self.ioctl(abi::GHOST_IOC_RUN, &mut arg) } {
            Ok(_) => Ok(RunOutcome::Returned),
            Err(GhostError::Io { source, .. }) if source.raw_os_error() == Some(libc::ESTALE) => {
                Ok(RunOutcome::Stale)
            }
            Err(GhostError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
                Ok(RunOutcome::EnclaveDying)
            }
            Err(e) => Err(e),
        }
    }

    /// The calling agent yields its CPU `cpu` and sleeps until pinged or its barrier moves
    /// (`GHOST_IOC_RUN` with gtid 0): how the satellite agents of a centralized agent wait.
    /// `agent_barrier` is the barrier read *before* the agent last looked at its messages.
    pub fn idle_wait(&self, cpu: u32, agent_barrier: u32) -> Result<RunOutcome, GhostError> {
        self.run(abi::ghost_ioc_run {
            gtid: abi::GHOST_NULL_GTID,
            agent_barrier,
            task_barrier: 0,
            run_cpu: cpu as i32,
            run_flags: 0,
        })
    }

    /// Wakes the agent of `cpu` (`GHOST_IOC_RUN` with gtid −1).
    pub fn ping(&self, cpu: u32) -> Result<RunOutcome, GhostError> {
        self.run(abi::ghost_ioc_run {
            gtid: abi::GHOST_AGENT_GTID,
            agent_barrier: 0,
            task_barrier: 0,
            run_cpu: cpu as i32,
            run_flags: 0,
        })
    }

    /// Arms `timerfd` to expire at `value` (then every `interval`, zero = once) and deliver
    /// `MSG_CPU_TIMER_EXPIRED` with `type_` and `cookie` to the agent of `cpu`
    /// (`GHOST_IOC_TIMERFD_SETTIME`, relative time).
    pub fn timerfd_settime(
        &self,
        timerfd: &impl AsRawFd,
        cpu: u32,
        value: Duration,
        interval: Duration,
        type_: u64,
        cookie: u64,
    ) -> Result<(), GhostError> {
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let new = libc::itimerspec {
            it_interval: ts(interval),
            it_value: ts(value),
        };
        // SAFETY: an all-zero itimerspec is a valid value for the kernel to overwrite.
        let mut old: libc::itimerspec = unsafe { std::mem::zeroed() };
        let mut arg = abi::ghost_ioc_timerfd_settime {
            timerfd: timerfd.as_raw_fd(),
            flags: 0,
            in_tmr: &new,
            out_tmr: &mut old,
            timerfd_ghost: abi::timerfd_ghost {
                cpu: cpu as i32,
                flags: abi::TIMERFD_GHOST_ENABLED,
                type_,
                cookie,
            },
        };
        // SAFETY: GHOST_IOC_TIMERFD_SETTIME takes a ghost_ioc_timerfd_settime whose timer
        // pointers point to `new` and `old`, which outlive the call.
        unsafe { self.ioctl(abi::GHOST_IOC_TIMERFD_SETTIME, &mut arg) }.map(drop)
    }

    /// Commits the open transactions of `cpus` all or none (`GHOST_IOC_SYNC_GROUP_TXN`):
    /// `true` if every one completed; on failure each reads a failure state (the ones that
    /// would have succeeded read `Poisoned`).
    pub fn commit_sync_group(&self, cpus: &[u32]) -> Result<bool, GhostError> {
        let mut set = cpu_set(cpus)?;
        let mut arg = abi::ghost_ioc_commit_txn {
            mask_ptr: &mut set,
            mask_len: size_of::<libc::cpu_set_t>() as u32,
            flags: 0,
        };
        // SAFETY: GHOST_IOC_SYNC_GROUP_TXN takes a ghost_ioc_commit_txn whose mask points to
        // a cpu_set_t of mask_len bytes that outlives the call.
        let r = unsafe { self.ioctl(abi::GHOST_IOC_SYNC_GROUP_TXN, &mut arg) }?;
        Ok(r == 1)
    }
}

impl CpuData {
    /// [`CpuData::open`] with an explicit transaction `version` (the ABI's is
    /// [`abi::GHOST_TXN_VERSION`]; any other is refused by the kernel with
    /// `UnsupportedVersion`).
    pub fn open_versioned(
        &self,
        cpu: u32,
        req: TxnRequest,
        version: i32,
    ) -> Result<(), GhostError> {
        self.open(cpu, req)?;
        let at = self.txn_at(cpu)?;
        let p = self
            .map
            .at(at, size_of::<abi::ghost_txn>())
            .expect("txn within the mapping") as *mut abi::ghost_txn;
        // Reopen: back to not-READY while the version changes, then publish again.
        self.state(at)
            .store(abi::GHOST_TXN_ABORTED, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the txn page is ours to write while it is not READY (set just above).
        unsafe { std::ptr::addr_of_mut!((*p).version).write_volatile(version) };
        self.state(at)
            .store(abi::GHOST_TXN_READY, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

impl Enclave<'_> {
    /// Maps the existing status-word region `id` read-only (a restarted agent's view of the
    /// words its predecessor created).
    pub fn map_sw_region(&self, id: u32) -> Result<super::StatusWords, GhostError> {
        let path = self.dir.join("sw_regions").join(format!("sw_{id}"));
        let file = File::open(&path).map_err(super::io_at("opening", &path))?;
        let map = super::Mapping::new(&file, abi::GHOST_SW_REGION_SIZE, false)
            .map_err(super::io_at("mapping", &path))?;
        super::StatusWords::new(map)
    }
}

impl Queue {
    /// The queue's fd, for `become agent` (it stays open as long as the queue).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
