//! The safe layer over the ghOSt kernel ABI (`ghost-sys`, version 91): ghostfs, enclaves,
//! threads in and out, owners of the shared mappings, the message-queue reader, status words
//! and transactions. A ghOSt agent is built on these; this module holds no policy.
//!
//! Everything the kernel *interprets* — writes to ghostfs control files and the `GHOST_IOC_*`
//! ioctls — goes through [`GhostKernel`], so the same code runs against a real ghOSt kernel
//! ([`RealKernel`]) and against the in-process model of the kernel used by the tests. Reads of
//! ghostfs files and the mappings are ordinary file operations either way; the model backs
//! `cpu_data`, status-word regions and queues with real files, which both sides map shared.
//!
//! The shape follows the centralized agent of the fact sheet: drain a [`Queue`] with
//! [`Queue::pop`], read tasks' [`StatusWords`], open transactions on idle CPUs with
//! [`CpuData::open`], commit them as a group with [`Enclave::commit`], then poll each with
//! [`CpuData::outcome`] and handle the typed failures.
//!
//! Not run on a real ghOSt kernel: none exists on the development or CI machines.

use std::ffi::c_void;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicI32, Ordering};
use std::time::Duration;

use ghost_sys as abi;
use thiserror::Error;

pub mod agent;
mod mapping;
#[cfg(any(test, feature = "ghost-model"))]
pub mod model;
mod ops;
mod queue;

pub use mapping::Mapping;
pub use ops::{AgentOnline, RunOutcome, SwOwner};
pub use queue::{Message, Queue, Received};
#[cfg(test)]
mod tests;

/// Where ghostfs is mounted.
pub const DEFAULT_ROOT: &str = "/sys/fs/ghost";

/// A ghOSt operation that failed.
#[derive(Debug, Error)]
pub enum GhostError {
    /// No ghostfs at the root.
    #[error("ghOSt is not present: no ghostfs at {0}")]
    NotPresent(PathBuf),
    /// The kernel does not offer ABI 91.
    #[error("the ghOSt kernel offers ABI versions {offered:?}, not {wanted}")]
    Unsupported {
        /// What it offers.
        offered: Vec<u32>,
        /// What this build speaks.
        wanted: u32,
    },
    /// A file or ioctl failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Shared memory is not laid out as the ABI says.
    #[error("{0}")]
    Corrupt(String),
    /// A transaction was used out of turn (opened while in flight, bad CPU).
    #[error("{0}")]
    Misuse(String),
}

fn io_at(what: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> GhostError + '_ {
    let what = what.into();
    move |source| GhostError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the kernel interprets: control-file writes and ioctls.
pub trait GhostKernel: Send + Sync {
    /// Writes `data` to a ghostfs file in one `write(2)`.
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// `ioctl(ctl, request, arg)`; returns the ioctl's non-negative result.
    ///
    /// # Safety
    ///
    /// `arg` must point to a valid, live value of the argument struct that `request` encodes.
    unsafe fn ioctl(&self, ctl: RawFd, request: u32, arg: *mut c_void) -> io::Result<i32>;

    /// Moves thread `tid` out of ghOSt, back to CFS (`sched_setscheduler(SCHED_OTHER)`; the
    /// kernel then sends the enclave's agent `TASK_DEPARTED`).
    fn to_cfs(&self, tid: u32) -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param`, which lives across the call.
        let r = unsafe { libc::sched_setscheduler(tid as libc::pid_t, libc::SCHED_OTHER, &param) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The CPUs thread `tid` may run on (`sched_getaffinity`), `None` when it cannot be read.
    /// The kernel does not check a commit against them (the task is moved all the same), so
    /// the agent must.
    fn affinity(&self, tid: u32) -> Option<Vec<u32>> {
        crate::procfs::affinity(tid)
    }

    /// Lets thread `tid` run only on `cpus` (`sched_setaffinity`).
    fn set_affinity(&self, tid: u32, cpus: &[u32]) -> io::Result<()> {
        crate::procfs::set_affinity(tid, cpus).map_err(io::Error::from)
    }

    /// Opens a ghostfs file read-write where the open itself means something to the kernel
    /// (`agent_online`: holding it open is being the online agent).
    fn open_rw(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(path)
    }
}

/// The real kernel: plain `write(2)` and `ioctl(2)`.
#[derive(Debug, Default)]
pub struct RealKernel;

impl GhostKernel for RealKernel {
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).open(path)?;
        let n = f.write(data)?;
        if n != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to a ghostfs file",
            ));
        }
        Ok(())
    }

    unsafe fn ioctl(&self, ctl: RawFd, request: u32, arg: *mut c_void) -> io::Result<i32> {
        // SAFETY: the caller guarantees `arg` points to the struct `request` encodes.
        let r = unsafe { libc::ioctl(ctl, request as libc::c_ulong, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

/// ghostfs at a root.
pub struct Ghostfs {
    root: PathBuf,
    kernel: Box<dyn GhostKernel>,
}

impl Ghostfs {
    /// ghostfs at `root` (normally [`DEFAULT_ROOT`]) through `kernel`.
    pub fn new(root: impl Into<PathBuf>, kernel: Box<dyn GhostKernel>) -> Self {
        Ghostfs {
            root: root.into(),
            kernel,
        }
    }

    /// The ABI versions the kernel offers (`version`, one per line).
    pub fn versions(&self) -> Result<Vec<u32>, GhostError> {
        let path = self.root.join("version");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(GhostError::NotPresent(self.root.clone()))
            }
            Err(e) => return Err(io_at("reading", &path)(e)),
        };
        text.split_whitespace()
            .map(|v| {
                v.parse().map_err(|_| {
                    GhostError::Corrupt(format!("{}: {v:?} is not a version", path.display()))
                })
            })
            .collect()
    }

    /// Fails unless the kernel offers [`abi::GHOST_VERSION`].
    pub fn check_version(&self) -> Result<(), GhostError> {
        let offered = self.versions()?;
        if offered.contains(&abi::GHOST_VERSION) {
            Ok(())
        } else {
            Err(GhostError::Unsupported {
                offered,
                wanted: abi::GHOST_VERSION,
            })
        }
    }

    /// Creates an enclave with the first free id from `first_id` (`EEXIST` → next id, as
    /// userspace's `MakeNextEnclave` does) and opens it.
    pub fn create_enclave(&self, first_id: u64) -> Result<Enclave<'_>, GhostError> {
        self.check_version()?;
        let ctl = self.root.join("ctl");
        let mut id = first_id;
        loop {
            let cmd = format!("create {id} {}", abi::GHOST_VERSION);
            match self.kernel.write(&ctl, cmd.as_bytes()) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && id < first_id + 1024 => id += 1,
                Err(e) => return Err(io_at(format!("{cmd:?} to"), &ctl)(e)),
            }
        }
        self.open_enclave(id)
    }

    /// Opens the existing enclave `id` and checks its ABI version.
    pub fn open_enclave(&self, id: u64) -> Result<Enclave<'_>, GhostError> {
        let dir = self.root.join(format!("enclave_{id}"));
        let abi_path = dir.join("abi_version");
        let abi_version = fs::read_to_string(&abi_path).map_err(io_at("reading", &abi_path))?;
        if abi_version.trim() != abi::GHOST_VERSION.to_string() {
            return Err(GhostError::Unsupported {
                offered: abi_version.trim().parse().into_iter().collect(),
                wanted: abi::GHOST_VERSION,
            });
        }
        let ctl_path = dir.join("ctl");
        // ioctls need FMODE_WRITE: O_RDWR.
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&ctl_path)
            .map_err(io_at("opening", &ctl_path))?;
        Ok(Enclave {
            fs: self,
            dir,
            id,
            ctl,
        })
    }
}

/// An open enclave: its directory and its `ctl` fd (for ioctls).
pub struct Enclave<'a> {
    fs: &'a Ghostfs,
    dir: PathBuf,
    id: u64,
    ctl: File,
}

/// What `GHOST_IOC_ASSOC_QUEUE` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Association {
    /// The task was already associated with that queue.
    pub already: bool,
    /// The task is brand new.
    pub brand_new: bool,
}

impl<'a> Enclave<'a> {
    /// The enclave's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The enclave's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, file: &str, data: &str) -> Result<(), GhostError> {
        let path = self.dir.join(file);
        self.fs
            .kernel
            .write(&path, data.as_bytes())
            .map_err(io_at(format!("writing {data:?} to"), &path))
    }

    /// # Safety
    ///
    /// `arg` must be the argument struct that `request` encodes.
    unsafe fn ioctl<T>(&self, request: u32, arg: &mut T) -> Result<i32, GhostError> {
        // SAFETY: `arg` is a live, exclusive reference to the struct `request` encodes (caller).
        unsafe {
            self.fs
                .kernel
                .ioctl(self.ctl.as_raw_fd(), request, (arg as *mut T).cast())
        }
        .map_err(io_at(
            format!("ioctl {request:#x} on"),
            &self.dir.join("ctl"),
        ))
    }

    /// Sets the enclave's CPUs (`cpulist`). A CPU still being released by a destroyed enclave
    /// answers `EBUSY`: retried 10 times, 50 ms apart, as userspace does.
    pub fn set_cpus(&self, cpus: &[u32]) -> Result<(), GhostError> {
        let list = cpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        for attempt in 0.. {
            match self.write("cpulist", &list) {
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

    /// Moves thread `tid` into the enclave (`tasks`); it enters `SCHED_GHOST`.
    pub fn add_task(&self, tid: u32) -> Result<(), GhostError> {
        self.write("tasks", &tid.to_string())
    }

    /// The CPUs thread `tid` may run on, when they can be read.
    pub fn task_cpus(&self, tid: u32) -> Option<Vec<u32>> {
        self.fs.kernel.affinity(tid)
    }

    /// Lets thread `tid` run only on `cpus`.
    pub fn set_task_cpus(&self, tid: u32, cpus: &[u32]) -> Result<(), GhostError> {
        self.fs.kernel.set_affinity(tid, cpus).map_err(io_at(
            format!("sched_setaffinity for thread {tid} in"),
            &self.dir,
        ))
    }

    /// Moves thread `tid` back to CFS (`sched_setscheduler(SCHED_OTHER)`).
    pub fn remove_task(&self, tid: u32) -> Result<(), GhostError> {
        self.fs.kernel.to_cfs(tid).map_err(io_at(
            format!("sched_setscheduler(SCHED_OTHER) for thread {tid} in"),
            &self.dir,
        ))
    }

    /// Destroys the enclave (its tasks go back to CFS, its agents are killed).
    pub fn destroy(self) -> Result<(), GhostError> {
        self.write("ctl", "destroy")
    }

    /// Maps `cpu_data`: one page (a transaction) per possible CPU.
    pub fn cpu_data(&self, cpus: usize) -> Result<CpuData, GhostError> {
        let path = self.dir.join("cpu_data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at("opening", &path))?;
        let map = Mapping::new(&file, cpus * size_of::<abi::ghost_cpu_data>(), true)
            .map_err(io_at("mapping", &path))?;
        Ok(CpuData { map, cpus })
    }

    /// Creates status-word region `id` on `node` and maps it read-only.
    pub fn sw_region(&self, id: u32, node: u32) -> Result<StatusWords, GhostError> {
        self.write("ctl", &format!("create sw_region {id} {node}"))?;
        let path = self.dir.join("sw_regions").join(format!("sw_{id}"));
        let file = File::open(&path).map_err(io_at("opening", &path))?;
        let map = Mapping::new(&file, abi::GHOST_SW_REGION_SIZE, false)
            .map_err(io_at("mapping", &path))?;
        StatusWords::new(map)
    }

    /// Creates a message queue of `elems` slots (a power of two) and maps it.
    pub fn create_queue(&self, elems: u32, node: i32) -> Result<Queue, GhostError> {
        if !elems.is_power_of_two() || elems > abi::GHOST_MAX_QUEUE_ELEMS {
            return Err(GhostError::Misuse(format!(
                "queue of {elems} slots: not a power of two ≤ 65536"
            )));
        }
        let mut arg = abi::ghost_ioc_create_queue {
            elems: elems as i32,
            node,
            flags: 0,
            mapsize: 0,
        };
        // SAFETY: GHOST_IOC_CREATE_QUEUE takes a ghost_ioc_create_queue.
        let fd = unsafe { self.ioctl(abi::GHOST_IOC_CREATE_QUEUE, &mut arg) }?;
        // SAFETY: on success the kernel returns a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(fd);
        let map = Mapping::new(&file, arg.mapsize as usize, true)
            .map_err(io_at("mapping queue", &self.dir))?;
        Queue::new(map, file)
    }

    /// Associates task `gtid` (whose status-word barrier is `barrier`) with `queue`.
    pub fn associate(
        &self,
        queue: &Queue,
        gtid: u64,
        barrier: u32,
    ) -> Result<Association, GhostError> {
        let mut arg = abi::ghost_ioc_assoc_queue {
            fd: queue.file.as_raw_fd(),
            src: abi::ghost_msg_src {
                type_: abi::GHOST_TASK,
                arg: gtid,
            },
            barrier,
            flags: 0,
        };
        // SAFETY: GHOST_IOC_ASSOC_QUEUE takes a ghost_ioc_assoc_queue.
        let status = unsafe { self.ioctl(abi::GHOST_IOC_ASSOC_QUEUE, &mut arg) }?;
        Ok(Association {
            already: status & abi::GHOST_ASSOC_SF_ALREADY != 0,
            brand_new: status & abi::GHOST_ASSOC_SF_BRAND_NEW != 0,
        })
    }

    /// Makes `queue` the enclave's default queue.
    pub fn set_default_queue(&self, queue: &Queue) -> Result<(), GhostError> {
        let mut arg = abi::ghost_ioc_set_default_queue {
            fd: queue.file.as_raw_fd(),
        };
        // SAFETY: GHOST_IOC_SET_DEFAULT_QUEUE takes a ghost_ioc_set_default_queue.
        unsafe { self.ioctl(abi::GHOST_IOC_SET_DEFAULT_QUEUE, &mut arg) }.map(drop)
    }

    /// Wakes the agents of `cpus` (at most 2) on new messages in `queue`; none = polling.
    pub fn config_queue_wakeup(&self, queue: &Queue, cpus: &[i32]) -> Result<(), GhostError> {
        if cpus.len() > abi::GHOST_MAX_WINFO {
            return Err(GhostError::Misuse(format!(
                "{} wakeup CPUs; at most {}",
                cpus.len(),
                abi::GHOST_MAX_WINFO
            )));
        }
        let mut w: Vec<abi::ghost_agent_wakeup> = cpus
            .iter()
            .map(|&cpu| abi::ghost_agent_wakeup { cpu, prio: 0 })
            .collect();
        let mut arg = abi::ghost_ioc_config_queue_wakeup {
            qfd: queue.file.as_raw_fd(),
            w: w.as_mut_ptr(),
            ninfo: w.len() as i32,
            flags: 0,
        };
        // SAFETY: GHOST_IOC_CONFIG_QUEUE_WAKEUP takes a ghost_ioc_config_queue_wakeup whose `w`
        // points to `ninfo` elements; `w` outlives the call.
        unsafe { self.ioctl(abi::GHOST_IOC_CONFIG_QUEUE_WAKEUP, &mut arg) }.map(drop)
    }

    /// Commits the open transactions of `cpus` in one `GHOST_IOC_COMMIT_TXN`; read each result
    /// with [`CpuData::outcome`].
    pub fn commit(&self, cpus: &[u32]) -> Result<(), GhostError> {
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
        let mut arg = abi::ghost_ioc_commit_txn {
            mask_ptr: &mut set,
            mask_len: size_of::<libc::cpu_set_t>() as u32,
            flags: 0,
        };
        // SAFETY: GHOST_IOC_COMMIT_TXN takes a ghost_ioc_commit_txn whose mask points to a
        // cpu_set_t of mask_len bytes that outlives the call.
        unsafe { self.ioctl(abi::GHOST_IOC_COMMIT_TXN, &mut arg) }.map(drop)
    }

    /// Frees a status word the kernel marked `CANFREE` (after `TASK_DEAD`/`TASK_DEPARTED`).
    pub fn free_status_word(&self, info: abi::ghost_sw_info) -> Result<(), GhostError> {
        let mut arg = info;
        // SAFETY: GHOST_IOC_SW_FREE takes a ghost_sw_info.
        unsafe { self.ioctl(abi::GHOST_IOC_SW_FREE, &mut arg) }.map(drop)
    }
}

// ---------------------------------------------------------------------------------------------

/// A consistent copy of a status word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusWord {
    /// The barrier (compare with a task's last message `seqnum`: unequal = unread messages).
    pub barrier: u32,
    /// `GHOST_SW_*` flags.
    pub flags: u32,
    /// The task.
    pub gtid: u64,
    /// Last switch time.
    pub switch_time: i64,
    /// Cumulative CPU time, ns.
    pub runtime: u64,
}

/// A status-word region, mapped read-only.
#[derive(Debug)]
pub struct StatusWords {
    map: Mapping,
    start: usize,
    capacity: u32,
}

impl StatusWords {
    fn new(map: Mapping) -> Result<Self, GhostError> {
        let h: abi::ghost_sw_region_header = map.read(0).ok_or_else(|| {
            GhostError::Corrupt("status-word region smaller than its header".into())
        })?;
        let start = h.start as usize;
        let fits = map
            .at(
                start,
                h.capacity as usize * size_of::<abi::ghost_status_word>(),
            )
            .is_some();
        if h.version != abi::GHOST_SW_REGION_VERSION || !fits || !start.is_multiple_of(32) {
            return Err(GhostError::Corrupt(format!(
                "status-word region version {}, start {start}, capacity {}",
                h.version, h.capacity
            )));
        }
        Ok(StatusWords {
            map,
            start,
            capacity: h.capacity,
        })
    }

    /// The status word at `index`, read consistently: the barrier (acquire) before and after
    /// the fields must agree, since the kernel bumps it (release) after changing them.
    pub fn get(&self, index: u32) -> Option<StatusWord> {
        if index >= self.capacity {
            return None;
        }
        let at = self.start + index as usize * size_of::<abi::ghost_status_word>();
        let barrier = self.map.atomic_u32(at);
        let flags = self.map.atomic_u32(at + 4);
        loop {
            let before = barrier.load(Ordering::Acquire);
            let f = flags.load(Ordering::Acquire);
            let sw: abi::ghost_status_word = self.map.read(at)?;
            fence(Ordering::Acquire);
            if barrier.load(Ordering::Relaxed) == before {
                return Some(StatusWord {
                    barrier: before,
                    flags: f,
                    gtid: sw.gtid,
                    switch_time: sw.switch_time,
                    runtime: sw.runtime,
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// What to run on a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnRequest {
    /// The task (or `GHOST_NULL_GTID` to preempt, `GHOST_IDLE_GTID` to idle).
    pub gtid: i64,
    /// The task's barrier as the agent last saw it (its last message's seqnum).
    pub task_barrier: u32,
    /// The agent's barrier (checked only for a local commit).
    pub agent_barrier: u32,
    /// Run flags.
    pub run_flags: u16,
    /// Commit flags (`COMMIT_AT_TXN_COMMIT` for a commit in the ioctl).
    pub commit_flags: u8,
}

/// How a committed transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The task is latched on the CPU.
    Complete,
    /// Aborted by the agent.
    Aborted,
    /// The task is on another CPU.
    TargetOnCpu,
    /// The task has messages the agent has not read (barrier mismatch).
    TargetStale,
    /// No such task.
    TargetNotFound,
    /// The task is not runnable.
    TargetNotRunnable,
    /// The agent's barrier is stale.
    AgentStale,
    /// The CPU is offline.
    CpuOffline,
    /// A higher scheduling class runs on the CPU.
    CpuUnavailable,
    /// Bad flags.
    InvalidFlags,
    /// Bad target.
    InvalidTarget,
    /// Not permitted.
    NotPermitted,
    /// Bad CPU.
    InvalidCpu,
    /// The CPU has no agent.
    NoAgent,
    /// Unsupported transaction version.
    UnsupportedVersion,
    /// A sync group failed.
    Poisoned,
    /// A state this ABI does not name.
    Unknown(i32),
}

impl TxnOutcome {
    fn from_state(state: i32) -> Self {
        use TxnOutcome::*;
        match state {
            abi::GHOST_TXN_COMPLETE => Complete,
            abi::GHOST_TXN_ABORTED => Aborted,
            abi::GHOST_TXN_TARGET_ONCPU => TargetOnCpu,
            abi::GHOST_TXN_TARGET_STALE => TargetStale,
            abi::GHOST_TXN_TARGET_NOT_FOUND => TargetNotFound,
            abi::GHOST_TXN_TARGET_NOT_RUNNABLE => TargetNotRunnable,
            abi::GHOST_TXN_AGENT_STALE => AgentStale,
            abi::GHOST_TXN_CPU_OFFLINE => CpuOffline,
            abi::GHOST_TXN_CPU_UNAVAIL => CpuUnavailable,
            abi::GHOST_TXN_INVALID_FLAGS => InvalidFlags,
            abi::GHOST_TXN_INVALID_TARGET => InvalidTarget,
            abi::GHOST_TXN_NOT_PERMITTED => NotPermitted,
            abi::GHOST_TXN_INVALID_CPU => InvalidCpu,
            abi::GHOST_TXN_NO_AGENT => NoAgent,
            abi::GHOST_TXN_UNSUPPORTED_VERSION => UnsupportedVersion,
            abi::GHOST_TXN_POISONED => Poisoned,
            other => Unknown(other),
        }
    }

    /// Failures the centralized agent expects in normal operation (retry next round); others
    /// indicate a bug and are worth logging as errors.
    pub fn is_expected_failure(self) -> bool {
        use TxnOutcome::*;
        matches!(
            self,
            TargetNotFound
                | TargetStale
                | AgentStale
                | NoAgent
                | CpuUnavailable
                | Poisoned
                | Aborted
        )
    }
}

/// The per-CPU transactions (`cpu_data`), mapped read-write.
#[derive(Debug)]
pub struct CpuData {
    map: Mapping,
    cpus: usize,
}

impl CpuData {
    fn txn_at(&self, cpu: u32) -> Result<usize, GhostError> {
        if cpu as usize >= self.cpus {
            return Err(GhostError::Misuse(format!(
                "CPU {cpu} beyond the {} mapped",
                self.cpus
            )));
        }
        Ok(cpu as usize * size_of::<abi::ghost_cpu_data>())
    }

    fn state(&self, at: usize) -> &AtomicI32 {
        let p = self.map.at(at + 8, 4).expect("txn within the mapping");
        // SAFETY: in bounds, 4-aligned (pages are page-aligned), lives as long as the mapping;
        // the state is shared with the kernel and only accessed atomically.
        unsafe { &*(p as *const AtomicI32) }
    }

    /// Opens a transaction on `cpu`: writes the request, then publishes it by storing
    /// `READY` with release. Refused while the CPU's previous transaction is still open or
    /// being committed.
    pub fn open(&self, cpu: u32, req: TxnRequest) -> Result<(), GhostError> {
        let at = self.txn_at(cpu)?;
        let state = self.state(at).load(Ordering::Acquire);
        if state == abi::GHOST_TXN_READY || state >= 0 {
            return Err(GhostError::Misuse(format!(
                "CPU {cpu}: a transaction is still in flight"
            )));
        }
        let base = self
            .map
            .at(at, size_of::<abi::ghost_txn>())
            .expect("txn within the mapping");
        // SAFETY: the txn page is ours to write while its state is not READY/claimed (the
        // kernel touches it only after READY); volatile writes because the memory is shared.
        unsafe {
            let t = base as *mut abi::ghost_txn;
            std::ptr::addr_of_mut!((*t).version).write_volatile(abi::GHOST_TXN_VERSION);
            std::ptr::addr_of_mut!((*t).cpu).write_volatile(cpu as i32);
            std::ptr::addr_of_mut!((*t).agent_barrier).write_volatile(req.agent_barrier);
            std::ptr::addr_of_mut!((*t).task_barrier).write_volatile(req.task_barrier);
            std::ptr::addr_of_mut!((*t).run_flags).write_volatile(req.run_flags);
            std::ptr::addr_of_mut!((*t).commit_flags).write_volatile(req.commit_flags);
            std::ptr::addr_of_mut!((*t).gtid).write_volatile(req.gtid);
        }
        self.state(at)
            .store(abi::GHOST_TXN_READY, Ordering::Release);
        Ok(())
    }

    /// Aborts an open, unclaimed transaction (`READY` → `ABORTED`); `false` if the kernel
    /// already claimed it.
    pub fn abort(&self, cpu: u32) -> Result<bool, GhostError> {
        let at = self.txn_at(cpu)?;
        Ok(self
            .state(at)
            .compare_exchange(
                abi::GHOST_TXN_READY,
                abi::GHOST_TXN_ABORTED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok())
    }

    /// The outcome of `cpu`'s transaction once committed (`None` while still open or being
    /// committed).
    pub fn outcome(&self, cpu: u32) -> Result<Option<TxnOutcome>, GhostError> {
        let at = self.txn_at(cpu)?;
        let state = self.state(at).load(Ordering::Acquire);
        Ok((state < 0).then(|| TxnOutcome::from_state(state)))
    }

    /// When the kernel committed `cpu`'s transaction (valid after `Complete`).
    pub fn commit_time(&self, cpu: u32) -> Result<i64, GhostError> {
        let at = self.txn_at(cpu)?;
        self.map
            .read(at + std::mem::offset_of!(abi::ghost_txn, commit_time))
            .ok_or_else(|| GhostError::Corrupt("txn beyond mapping".into()))
    }
}

/// What `burst-qemu check` reports about ghOSt at `root`.
pub fn describe(root: &Path) -> Result<Vec<u32>, GhostError> {
    Ghostfs::new(root, Box::new(RealKernel)).versions()
}
