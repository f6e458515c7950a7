//! An in-process model of the ghOSt kernel's side, faithful to the fact sheet, for testing the
//! safe layer honestly: a ghostfs tree in a temp dir whose control files it interprets, shared
//! files for `cpu_data`, status-word regions and queues (mapped by both sides), a ring producer
//! that lays messages out byte for byte as `_produce` does (slots, NOP padding at the wrap,
//! overflow), status words whose barrier is bumped with release after the other fields, and
//! `GHOST_IOC_COMMIT_TXN` claiming and validating transactions in the kernel's order.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ghost_sys as abi;

use super::{GhostKernel, Mapping};

mod agents;
pub mod time;

/// CPUs the model's machine has (cpu_data pages).
pub const NCPUS: usize = 17;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A queue as the kernel holds it.
struct KQueue {
    path: PathBuf,
    map: Mapping,
    nelems: u32,
    wakeup: Vec<i32>,
}

impl KQueue {
    fn ring(&self, field: usize) -> &AtomicU32 {
        self.map.atomic_u32(64 + field * 4)
    }

    fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        let p = self.map.at(offset, bytes.len()).expect("within the queue");
        // SAFETY: in bounds of the model's own shared mapping; the agent reads these slots only
        // after the release store of `head` that follows.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    fn write_msg(&self, slot: u32, type_: u16, length: u16, seqnum: u32, payload: &[u8]) {
        let at = 64 + size_of::<abi::ghost_ring>() + slot as usize * 8;
        let mut header = [0u8; 8];
        header[0..2].copy_from_slice(&type_.to_ne_bytes());
        header[2..4].copy_from_slice(&length.to_ne_bytes());
        header[4..8].copy_from_slice(&seqnum.to_ne_bytes());
        self.write_bytes(at, &header);
        self.write_bytes(at + 8, payload);
    }

    /// The kernel's `_produce`: a message of `8 + payload` bytes takes `roundup(len, 8) / 8`
    /// slots; one that does not fit before the end of the ring is preceded by a NOP covering
    /// the remaining slots; when the ring has no room the message is dropped and `overflow`
    /// counted. Returns whether it was queued.
    fn produce(&self, type_: u16, seqnum: u32, payload: &[u8]) -> bool {
        let len = 8 + payload.len();
        let slots = len.div_ceil(8) as u32;
        let head = self.ring(0).load(Ordering::Relaxed);
        let tail = self.ring(1).load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        let idx = head & (self.nelems - 1);
        let pad = if idx + slots > self.nelems {
            self.nelems - idx
        } else {
            0
        };
        if used + pad + slots > self.nelems {
            self.ring(2).fetch_add(1, Ordering::Release);
            return false;
        }
        let mut head = head;
        if pad > 0 {
            self.write_msg(idx, abi::MSG_NOP, (pad * 8) as u16, 0, &[]);
            head = head.wrapping_add(pad);
        }
        self.write_msg(head & (self.nelems - 1), type_, len as u16, seqnum, payload);
        // Release: the agent's acquire of `head` then sees the whole message.
        self.ring(0)
            .store(head.wrapping_add(slots), Ordering::Release);
        true
    }
}

/// A task as the kernel holds it.
#[derive(Clone, Debug)]
pub struct KTask {
    /// Its status word's index in region 0.
    pub sw_index: u32,
    /// Runnable.
    pub runnable: bool,
    /// The CPU it runs on, if any.
    pub on_cpu: Option<u32>,
    /// Its queue (the default queue's fd path when it entered).
    queue: Option<PathBuf>,
    associated: bool,
    /// Cumulative CPU time, ns (`GHOST_IOC_GET_CPU_TIME`).
    pub runtime: u64,
    /// The CPUs it may run on (`sched_setaffinity`; `None`: every CPU).
    pub allowed: Option<Vec<u32>>,
}

impl KTask {
    /// Its status word's flags: in use, and runnable when it is.
    fn sw_flags(&self) -> u32 {
        abi::GHOST_SW_F_INUSE
            | if self.runnable {
                abi::GHOST_SW_TASK_RUNNABLE
            } else {
                0
            }
    }
}

struct KEnclave {
    dir: PathBuf,
    cpus: Vec<u32>,
    tasks: HashMap<u64, KTask>,
    cpu_data: Mapping,
    sw: Option<Mapping>,
    next_sw: u32,
    queues: Vec<KQueue>,
    default_queue: Option<PathBuf>,
    agents: Vec<u32>,
    unavailable: Vec<u32>,
    busy_cpulist_writes: u32,
    /// Each agent CPU's status-word index.
    agent_sw: HashMap<u32, u32>,
    /// `agent_online` is held open.
    online: bool,
    /// Armed ghOSt timerfds: (cpu, type, cookie).
    timers: Vec<(i32, u64, u64)>,
    /// Driven by a [`time::Machine`]: commits preempt what runs on the CPU.
    timed: bool,
    /// Commits that put a task on a CPU outside its affinity. The kernel does not check a
    /// commit against the task's CPUs (`_ghost_commit_txn` moves it all the same), so each is
    /// an operator's pin broken by the agent.
    outside_affinity: u64,
    /// Running in real time ([`Model::run_in_real_time`]): when the tasks on CPUs were last
    /// charged their runtime.
    real_time: Option<std::time::Instant>,
}

impl KEnclave {
    /// In real time: charges the tasks on CPUs the time since they were last charged.
    fn catch_up(&mut self) {
        let Some(last) = self.real_time else {
            return;
        };
        let now = std::time::Instant::now();
        let dt = now.duration_since(last).as_nanos() as u64;
        for t in self.tasks.values_mut().filter(|t| t.on_cpu.is_some()) {
            t.runtime += dt;
        }
        self.real_time = Some(now);
    }

    fn queue(&self, path: &Path) -> Option<&KQueue> {
        self.queues.iter().find(|q| q.path == path)
    }

    fn sw(&self, index: u32) -> (&AtomicU32, &AtomicU32, *mut abi::ghost_status_word) {
        let map = self.sw.as_ref().expect("a status-word region");
        let at = 64 + index as usize * size_of::<abi::ghost_status_word>();
        let p = map.at(at, 32).expect("status word in region") as *mut abi::ghost_status_word;
        (map.atomic_u32(at), map.atomic_u32(at + 4), p)
    }

    /// Changes a task's status word as the kernel does: fields first, then the barrier with
    /// release. Returns the new barrier.
    fn bump(&self, task: &KTask, flags: u32, runtime: u64) -> u32 {
        let (barrier, flag_word, p) = self.sw(task.sw_index);
        // SAFETY: the model's own writable mapping of the region; fields the agent reads only
        // between two acquire loads of the barrier.
        unsafe { std::ptr::addr_of_mut!((*p).runtime).write_volatile(runtime) };
        flag_word.store(flags, Ordering::Release);
        barrier.fetch_add(1, Ordering::Release) + 1
    }

    /// A task message as the kernel sends it: the task's status word changed first ([`bump`]),
    /// then the message, the new barrier its seqnum, to the task's queue. The seqnum, if the
    /// message was queued.
    ///
    /// [`bump`]: KEnclave::bump
    fn tell(&self, t: &KTask, flags: u32, runtime: u64, type_: u16, payload: &[u8]) -> Option<u32> {
        let seq = self.bump(t, flags, runtime);
        let q = t.queue.as_ref().and_then(|p| self.queue(p))?;
        q.produce(type_, seq, payload).then_some(seq)
    }
}

#[derive(Default)]
struct KState {
    enclaves: HashMap<u64, KEnclave>,
    next_queue: u32,
}

/// The model kernel. Clone the `Arc` to keep a handle for kernel-side actions while the safe
/// layer owns the `Box<dyn GhostKernel>`.
#[derive(Clone)]
pub struct Model {
    root: PathBuf,
    state: Arc<Mutex<KState>>,
}

impl Model {
    /// A ghostfs tree at `root` offering `versions`.
    pub fn new(root: &Path, versions: &[u32]) -> Self {
        fs::create_dir_all(root).unwrap();
        let v: String = versions.iter().map(|v| format!("{v}\n")).collect();
        fs::write(root.join("version"), v).unwrap();
        fs::write(root.join("ctl"), "").unwrap();
        Model {
            root: root.to_owned(),
            state: Arc::default(),
        }
    }

    fn with<R>(&self, id: u64, f: impl FnOnce(&mut KEnclave) -> R) -> R {
        let mut st = self.state.lock().unwrap();
        let e = st.enclaves.get_mut(&id).expect("enclave exists");
        e.catch_up();
        f(e)
    }

    /// Runs enclave `id`'s CPUs in real time from now: every task on a CPU is charged the real
    /// time that passes, brought up to date at every entry into the model (a commit, an ioctl,
    /// a read of a task), so a switch is charged to the nanosecond of the call that made it;
    /// commits preempt what runs (as under a [`time::Machine`]). For running an agent that
    /// reads the real clock, threads and all (the ghOSt enforcer's tests).
    pub fn run_in_real_time(&self, id: u64) {
        self.with(id, |e| {
            e.timed = true;
            e.real_time = Some(std::time::Instant::now());
        });
    }

    /// [`Model::with`] for a call that may come after the enclave was destroyed: `ENODEV`
    /// then, as the kernel answers for a dying enclave.
    fn try_with<R>(&self, id: u64, f: impl FnOnce(&mut KEnclave) -> R) -> io::Result<R> {
        let mut st = self.state.lock().unwrap();
        let e = st
            .enclaves
            .get_mut(&id)
            .ok_or_else(|| errno(libc::ENODEV))?;
        e.catch_up();
        Ok(f(e))
    }

    /// Waits (up to `within`) for enclave `id` to be created, as by an agent on another
    /// thread; whether it exists.
    pub fn wait_for_enclave(&self, id: u64, within: std::time::Duration) -> bool {
        let t = std::time::Instant::now();
        while !self.has_enclave(id) {
            if t.elapsed() >= within {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Whether enclave `id` exists (created and not destroyed).
    pub fn has_enclave(&self, id: u64) -> bool {
        self.state.lock().unwrap().enclaves.contains_key(&id)
    }

    /// The CPUs written to the enclave's `cpulist`.
    pub fn cpus(&self, id: u64) -> Vec<u32> {
        self.with(id, |e| e.cpus.clone())
    }

    /// Makes the next `n` writes of `cpulist` fail with `EBUSY` (a dying enclave's CPUs).
    pub fn busy_cpulist(&self, id: u64, n: u32) {
        self.with(id, |e| e.busy_cpulist_writes = n);
    }

    /// An agent attaches on `cpu`.
    pub fn attach_agent(&self, id: u64, cpu: u32) {
        self.with(id, |e| e.agents.push(cpu));
    }

    /// A higher scheduling class takes `cpu`.
    pub fn make_unavailable(&self, id: u64, cpu: u32) {
        self.with(id, |e| e.unavailable.push(cpu));
    }

    /// The task of thread `tid`'s gtid (`tid << 41 | 1`).
    pub fn gtid(tid: u32) -> u64 {
        (u64::from(tid) << abi::GHOST_TID_SEQNUM_BITS) | 1
    }

    /// `sched_setaffinity(tid, cpus)` on task `gtid`: `TASK_AFFINITY_CHANGED` (its barrier
    /// bumped), then, if it runs, it is taken off its CPU (`TASK_PREEMPT`, still runnable), as
    /// the kernel does for any change of a running task's CPUs.
    pub fn set_task_cpus(&self, id: u64, gtid: u64, cpus: &[u32]) {
        self.with(id, |e| {
            let t = e.tasks.get_mut(&gtid).expect("task exists");
            t.allowed = Some(cpus.to_vec());
            let t = t.clone();
            let p = abi::ghost_msg_payload_task_affinity_changed { gtid };
            let changed = abi::MSG_TASK_AFFINITY_CHANGED;
            e.tell(&t, t.sw_flags(), t.runtime, changed, as_bytes(&p));
            if let Some(cpu) = t.on_cpu {
                time::preempt_cpu(e, cpu, 0);
            }
        });
    }

    /// The enclave that has task `gtid`; `ESRCH` when none has.
    fn enclave_holding(&self, gtid: u64) -> io::Result<u64> {
        let st = self.state.lock().unwrap();
        st.enclaves
            .iter()
            .find(|(_, e)| e.tasks.contains_key(&gtid))
            .map(|(&id, _)| id)
            .ok_or_else(|| errno(libc::ESRCH))
    }

    /// Commits that put a task on a CPU outside its affinity (each one a pin broken).
    pub fn runs_outside_affinity(&self, id: u64) -> u64 {
        self.with(id, |e| e.outside_affinity)
    }

    /// The kernel's view of a task.
    pub fn task(&self, id: u64, gtid: u64) -> Option<KTask> {
        self.with(id, |e| e.tasks.get(&gtid).cloned())
    }

    /// A task event: bumps the task's status word and sends `type_` with `payload` (its gtid
    /// first, as every task message) to the task's queue. Returns the message's seqnum, or
    /// `None` if the ring overflowed.
    pub fn task_event(
        &self,
        id: u64,
        gtid: u64,
        type_: u16,
        payload: &[u8],
        runnable: bool,
    ) -> Option<u32> {
        self.with(id, |e| {
            let task = e.tasks.get_mut(&gtid).expect("task exists");
            task.runnable = runnable;
            if type_ == abi::MSG_TASK_DEPARTED || type_ == abi::MSG_TASK_DEAD {
                task.on_cpu = None;
            }
            let t = task.clone();
            let mut flags = t.sw_flags();
            if type_ == abi::MSG_TASK_DEPARTED || type_ == abi::MSG_TASK_DEAD {
                flags |= abi::GHOST_SW_F_CANFREE;
            }
            e.tell(&t, flags, 1000, type_, payload)
        })
    }

    /// Sends a raw message straight into the enclave's default queue (for ring tests).
    pub fn produce(&self, id: u64, type_: u16, seqnum: u32, payload: &[u8]) -> bool {
        self.with(id, |e| {
            let path = e.default_queue.clone().expect("a default queue");
            e.queue(&path)
                .expect("queue")
                .produce(type_, seqnum, payload)
        })
    }

    /// The wakeup CPUs configured on the default queue.
    pub fn wakeups(&self, id: u64) -> Vec<i32> {
        self.with(id, |e| {
            let path = e.default_queue.clone().expect("a default queue");
            e.queue(&path).map(|q| q.wakeup.clone()).unwrap_or_default()
        })
    }

    fn enclave_of(&self, path: &Path) -> Option<u64> {
        let name = path.strip_prefix(&self.root).ok()?.components().next()?;
        name.as_os_str()
            .to_str()?
            .strip_prefix("enclave_")?
            .parse()
            .ok()
    }

    fn create_enclave(&self, id: u64, abi_version: u32) -> io::Result<()> {
        let offered = fs::read_to_string(self.root.join("version"))?;
        if !offered
            .split_whitespace()
            .any(|v| v == abi_version.to_string())
        {
            return Err(errno(libc::ESRCH));
        }
        let mut st = self.state.lock().unwrap();
        if st.enclaves.contains_key(&id) {
            return Err(errno(libc::EEXIST));
        }
        let dir = self.root.join(format!("enclave_{id}"));
        fs::create_dir_all(dir.join("sw_regions"))?;
        fs::write(dir.join("ctl"), format!("{id}\n"))?;
        fs::write(dir.join("abi_version"), format!("{abi_version}\n"))?;
        fs::write(dir.join("tasks"), "")?;
        fs::write(dir.join("cpulist"), "")?;
        fs::write(dir.join("agent_online"), "0\n")?;
        fs::write(
            dir.join("status"),
            format!("version {abi_version}\nactive no\nnr_tasks 0\n"),
        )?;
        let (_, map) = shared_file(&dir.join("cpu_data"), NCPUS * 4096)?;
        // Transactions start out committed (not in flight).
        for cpu in 0..NCPUS {
            let p = map.at(cpu * 4096 + 8, 4).expect("txn state");
            // SAFETY: in bounds and aligned within the model's own mapping.
            unsafe { (*(p as *const AtomicI32)).store(abi::GHOST_TXN_COMPLETE, Ordering::Release) };
        }
        st.enclaves.insert(
            id,
            KEnclave {
                dir,
                cpus: Vec::new(),
                tasks: HashMap::new(),
                cpu_data: map,
                sw: None,
                next_sw: 0,
                queues: Vec::new(),
                default_queue: None,
                agents: Vec::new(),
                unavailable: Vec::new(),
                busy_cpulist_writes: 0,
                agent_sw: HashMap::new(),
                online: false,
                timers: Vec::new(),
                timed: false,
                outside_affinity: 0,
                real_time: None,
            },
        );
        Ok(())
    }

    fn enclave_ctl(&self, id: u64, cmd: &str) -> io::Result<()> {
        if cmd.trim() == "destroy" {
            let mut st = self.state.lock().unwrap();
            let e = st.enclaves.remove(&id).ok_or_else(|| errno(libc::ENOENT))?;
            drop(e.sw);
            return fs::remove_dir_all(&e.dir);
        }
        let parts: Vec<&str> = cmd.split_whitespace().collect();
        if let ["create", "sw_region", rid, node] = parts[..] {
            let rid: u32 = rid.parse().map_err(|_| errno(libc::EINVAL))?;
            let node: u32 = node.parse().map_err(|_| errno(libc::EINVAL))?;
            return self.with(id, |e| {
                let path = e.dir.join("sw_regions").join(format!("sw_{rid}"));
                let (_, map) = shared_file(&path, abi::GHOST_SW_REGION_SIZE)?;
                let header = abi::ghost_sw_region_header {
                    version: abi::GHOST_SW_REGION_VERSION,
                    id: rid,
                    numa_node: node,
                    start: 64,
                    capacity: abi::GHOST_SW_REGION_CAPACITY,
                    available: abi::GHOST_SW_REGION_CAPACITY,
                };
                // SAFETY: the header is at offset 0 of the model's own page-aligned mapping.
                unsafe {
                    std::ptr::write(
                        map.at(0, 64).expect("header") as *mut abi::ghost_sw_region_header,
                        header,
                    )
                };
                e.sw = Some(map);
                Ok(())
            });
        }
        self.agent_ctl(id, &parts)
    }

    fn add_task(&self, id: u64, tid: u32) -> io::Result<()> {
        let gtid = Self::gtid(tid);
        self.with(id, |e| {
            if e.sw.is_none() {
                return Err(errno(libc::ENOSPC));
            }
            let index = e.next_sw;
            e.next_sw += 1;
            let task = KTask {
                sw_index: index,
                runnable: true,
                on_cpu: None,
                queue: e.default_queue.clone(),
                associated: false,
                runtime: 0,
                allowed: None,
            };
            let (_, _, p) = e.sw(index);
            // SAFETY: the model's own mapping of the region.
            unsafe { std::ptr::addr_of_mut!((*p).gtid).write_volatile(gtid) };
            let new = abi::ghost_msg_payload_task_new {
                gtid,
                runnable: 1,
                sw_info: abi::ghost_sw_info { id: 0, index },
                ..Default::default()
            };
            e.tell(&task, task.sw_flags(), 0, abi::MSG_TASK_NEW, as_bytes(&new));
            e.tasks.insert(gtid, task);
            Ok(())
        })
    }

    fn fd_path(fd: i32) -> io::Result<PathBuf> {
        fs::read_link(format!("/proc/self/fd/{fd}"))
    }

    fn commit(&self, id: u64, set: &libc::cpu_set_t) {
        self.with(id, |e| {
            for cpu in 0..NCPUS {
                // SAFETY: CPU_ISSET reads within the set.
                if !unsafe { libc::CPU_ISSET(cpu, set) } {
                    continue;
                }
                let base = e.cpu_data.at(cpu * 4096, 64).expect("txn") as *mut abi::ghost_txn;
                let state = e.cpu_data.atomic_u32(cpu * 4096 + 8);
                // Claim: READY → this CPU.
                let claimed = state
                    .compare_exchange(
                        abi::GHOST_TXN_READY as u32,
                        cpu as u32,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok();
                if !claimed {
                    continue;
                }
                // SAFETY: claimed, so the agent does not touch the txn until the final state.
                let txn = unsafe { std::ptr::read_volatile(base) };
                let outcome = Self::validate(e, cpu as u32, &txn);
                if outcome == abi::GHOST_TXN_COMPLETE {
                    if let Some(t) = e.tasks.get_mut(&(txn.gtid as u64)) {
                        t.on_cpu = Some(cpu as u32);
                        if t.allowed
                            .as_ref()
                            .is_some_and(|a| !a.contains(&(cpu as u32)))
                        {
                            e.outside_affinity += 1;
                        }
                    }
                    // SAFETY: as above; commit_time is written before the release of the state.
                    unsafe {
                        std::ptr::addr_of_mut!((*base).commit_time).write_volatile(123_456_789)
                    };
                }
                state.store(outcome as u32, Ordering::Release);
                if outcome == abi::GHOST_TXN_COMPLETE && e.timed {
                    time::preempt_cpu(e, cpu as u32, txn.gtid as u64);
                }
            }
        });
    }

    /// `_ghost_commit_txn`'s checks, in order.
    fn validate(e: &KEnclave, cpu: u32, txn: &abi::ghost_txn) -> i32 {
        if txn.version != abi::GHOST_TXN_VERSION {
            return abi::GHOST_TXN_UNSUPPORTED_VERSION;
        }
        if txn.cpu != cpu as i32 || !e.cpus.contains(&cpu) {
            return abi::GHOST_TXN_INVALID_CPU;
        }
        let known = abi::COMMIT_AT_SCHEDULE
            | abi::COMMIT_AT_TXN_COMMIT
            | abi::ALLOW_TASK_ONCPU
            | abi::ELIDE_AGENT_BARRIER_INC
            | abi::INC_AGENT_BARRIER_ON_FAILURE;
        if txn.commit_flags & !known != 0 {
            return abi::GHOST_TXN_INVALID_FLAGS;
        }
        if txn.gtid == abi::GHOST_IDLE_GTID || txn.gtid == abi::GHOST_NULL_GTID {
            return abi::GHOST_TXN_COMPLETE;
        }
        let Some(task) = e.tasks.get(&(txn.gtid as u64)) else {
            return abi::GHOST_TXN_TARGET_NOT_FOUND;
        };
        let (barrier, _, _) = e.sw(task.sw_index);
        if txn.task_barrier != barrier.load(Ordering::Acquire) {
            return abi::GHOST_TXN_TARGET_STALE;
        }
        if !task.runnable {
            return abi::GHOST_TXN_TARGET_NOT_RUNNABLE;
        }
        if task.on_cpu.is_some_and(|c| c != cpu) && txn.commit_flags & abi::ALLOW_TASK_ONCPU == 0 {
            return abi::GHOST_TXN_TARGET_ONCPU;
        }
        if !e.agents.contains(&cpu) {
            return abi::GHOST_TXN_NO_AGENT;
        }
        if e.unavailable.contains(&cpu) {
            return abi::GHOST_TXN_CPU_UNAVAIL;
        }
        abi::GHOST_TXN_COMPLETE
    }
}

/// A zeroed file of `len` bytes at `path`, mapped shared and writable: the kernel's side of
/// memory an agent maps too.
fn shared_file(path: &Path, len: usize) -> io::Result<(File, Mapping)> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(len as u64)?;
    let map = Mapping::new(&f, len, true)?;
    Ok((f, map))
}

/// The bytes of a plain-data ABI struct.
pub fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) plain-data struct; reading its bytes (padding included, zeroed by
    // Default construction) is how the kernel copies payloads.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

impl Model {
    /// GHOST_IOC_CREATE_QUEUE: a power-of-two queue mapped from a file of its own, its header
    /// written; answers the queue's descriptor and its map size in `a`.
    fn create_queue(&self, id: u64, a: &mut abi::ghost_ioc_create_queue) -> io::Result<i32> {
        let elems = u32::try_from(a.elems).map_err(|_| errno(libc::EINVAL))?;
        if !elems.is_power_of_two() || elems > abi::GHOST_MAX_QUEUE_ELEMS || a.flags != 0 {
            return Err(errno(libc::EINVAL));
        }
        let mapsize = abi::queue_mapsize(elems, 4096);
        let n = {
            let mut st = self.state.lock().unwrap();
            st.next_queue += 1;
            st.next_queue
        };
        let path = self.with(id, |e| e.dir.join(format!(".queue_{n}")));
        let (f, map) = shared_file(&path, mapsize)?;
        let header = abi::ghost_queue_header {
            version: abi::GHOST_QUEUE_VERSION,
            start: 64,
            nelems: elems,
        };
        // SAFETY: the header is at offset 0 of the model's own page-aligned mapping.
        unsafe {
            std::ptr::write(
                map.at(0, 64).expect("header") as *mut abi::ghost_queue_header,
                header,
            )
        };
        self.with(id, |e| {
            e.queues.push(KQueue {
                path: path.clone(),
                map,
                nelems: elems,
                wakeup: Vec::new(),
            })
        });
        a.mapsize = mapsize as u64;
        Ok(f.into_raw_fd())
    }

    /// GHOST_IOC_ASSOC_QUEUE: a task's messages to the queue `a.fd`, refused (ESTALE) when the
    /// task's status word has moved past `a.barrier`; answers the ALREADY/BRAND_NEW flags.
    fn assoc_queue(&self, id: u64, a: &abi::ghost_ioc_assoc_queue) -> io::Result<i32> {
        if a.src.type_ != abi::GHOST_TASK {
            return Err(errno(libc::EINVAL));
        }
        let path = Self::fd_path(a.fd)?;
        self.with(id, |e| {
            e.queue(&path).ok_or_else(|| errno(libc::EBADF))?;
            let index = e
                .tasks
                .get(&a.src.arg)
                .ok_or_else(|| errno(libc::ENOENT))?
                .sw_index;
            let (barrier, _, _) = e.sw(index);
            if barrier.load(Ordering::Acquire) != a.barrier {
                return Err(errno(libc::ESTALE));
            }
            let t = e.tasks.get_mut(&a.src.arg).expect("checked");
            let mut status = 0;
            if t.queue.as_ref() == Some(&path) {
                status |= abi::GHOST_ASSOC_SF_ALREADY;
            }
            if !t.associated {
                status |= abi::GHOST_ASSOC_SF_BRAND_NEW;
            }
            t.associated = true;
            t.queue = Some(path);
            Ok(status)
        })
    }
}

impl GhostKernel for Model {
    fn set_affinity(&self, tid: u32, cpus: &[u32]) -> io::Result<()> {
        let gtid = Self::gtid(tid);
        let id = self.enclave_holding(gtid)?;
        self.set_task_cpus(id, gtid, cpus);
        Ok(())
    }

    /// The task's CPUs as the model has them (every CPU of the machine unless pinned).
    fn affinity(&self, tid: u32) -> Option<Vec<u32>> {
        let st = self.state.lock().unwrap();
        st.enclaves.values().find_map(|e| {
            let t = e.tasks.get(&Self::gtid(tid))?;
            Some(
                t.allowed
                    .clone()
                    .unwrap_or_else(|| (0..NCPUS as u32).collect()),
            )
        })
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(data).map_err(|_| errno(libc::EINVAL))?;
        if path == self.root.join("ctl") {
            let parts: Vec<&str> = text.split_whitespace().collect();
            return match parts[..] {
                ["create", id, abi_version, ..] => {
                    let id: u64 = id.parse().map_err(|_| errno(libc::EINVAL))?;
                    let v: u32 = abi_version.parse().map_err(|_| errno(libc::EINVAL))?;
                    self.create_enclave(id, v)
                }
                _ => Err(errno(libc::EINVAL)),
            };
        }
        let id = self.enclave_of(path).ok_or_else(|| errno(libc::ENOENT))?;
        match path.file_name().and_then(|n| n.to_str()) {
            Some("ctl") => self.enclave_ctl(id, text),
            Some("tasks") => {
                self.add_task(id, text.trim().parse().map_err(|_| errno(libc::EINVAL))?)
            }
            Some("cpulist") => self.with(id, |e| {
                if e.busy_cpulist_writes > 0 {
                    e.busy_cpulist_writes -= 1;
                    return Err(errno(libc::EBUSY));
                }
                let cpus: Result<Vec<u32>, _> = text.trim().split(',').map(str::parse).collect();
                let cpus = cpus.map_err(|_| errno(libc::EINVAL))?;
                if cpus.iter().any(|&c| c as usize >= NCPUS) {
                    return Err(errno(libc::ENODEV));
                }
                e.cpus = cpus;
                fs::write(path, text)
            }),
            _ => Err(errno(libc::EACCES)),
        }
    }

    unsafe fn ioctl(&self, ctl: RawFd, request: u32, arg: *mut c_void) -> io::Result<i32> {
        let id = self
            .enclave_of(&Self::fd_path(ctl)?)
            .ok_or_else(|| errno(libc::ENOTTY))?;
        match request {
            abi::GHOST_IOC_CREATE_QUEUE => {
                // SAFETY: the caller passes a ghost_ioc_create_queue for this request.
                self.create_queue(id, unsafe {
                    &mut *(arg as *mut abi::ghost_ioc_create_queue)
                })
            }
            abi::GHOST_IOC_SET_DEFAULT_QUEUE => {
                // SAFETY: the caller passes a ghost_ioc_set_default_queue for this request.
                let a = unsafe { &*(arg as *const abi::ghost_ioc_set_default_queue) };
                let path = Self::fd_path(a.fd)?;
                self.with(id, |e| {
                    e.queue(&path).ok_or_else(|| errno(libc::EBADF))?;
                    e.default_queue = Some(path);
                    Ok(0)
                })
            }
            abi::GHOST_IOC_CONFIG_QUEUE_WAKEUP => {
                // SAFETY: the caller passes a ghost_ioc_config_queue_wakeup for this request.
                let a = unsafe { &*(arg as *const abi::ghost_ioc_config_queue_wakeup) };
                if a.ninfo < 0 || a.ninfo as usize > abi::GHOST_MAX_WINFO {
                    return Err(errno(libc::EINVAL));
                }
                // SAFETY: `w` points to `ninfo` wakeup entries (the caller's contract).
                let w = unsafe { std::slice::from_raw_parts(a.w, a.ninfo as usize) };
                if w.iter().any(|w| w.prio != 0) {
                    return Err(errno(libc::EINVAL));
                }
                let path = Self::fd_path(a.qfd)?;
                self.with(id, |e| {
                    let q = e
                        .queues
                        .iter_mut()
                        .find(|q| q.path == path)
                        .ok_or_else(|| errno(libc::EBADF))?;
                    q.wakeup = w.iter().map(|w| w.cpu).collect();
                    Ok(0)
                })
            }
            abi::GHOST_IOC_ASSOC_QUEUE => {
                // SAFETY: the caller passes a ghost_ioc_assoc_queue for this request.
                self.assoc_queue(id, unsafe { &*(arg as *const abi::ghost_ioc_assoc_queue) })
            }
            abi::GHOST_IOC_COMMIT_TXN => {
                // SAFETY: the caller passes a ghost_ioc_commit_txn for this request.
                let a = unsafe { &*(arg as *const abi::ghost_ioc_commit_txn) };
                if a.mask_len as usize != size_of::<libc::cpu_set_t>() || a.mask_ptr.is_null() {
                    return Err(errno(libc::EINVAL));
                }
                // SAFETY: mask_ptr points to a cpu_set_t of mask_len bytes (checked above).
                self.commit(id, unsafe { &*a.mask_ptr });
                Ok(0)
            }
            abi::GHOST_IOC_SW_FREE => {
                // SAFETY: the caller passes a ghost_sw_info for this request.
                let info = unsafe { &*(arg as *const abi::ghost_sw_info) };
                self.with(id, |e| {
                    let (_, flags, _) = e.sw(info.index);
                    if flags.load(Ordering::Acquire) & abi::GHOST_SW_F_CANFREE == 0 {
                        return Err(errno(libc::EINVAL));
                    }
                    flags.store(0, Ordering::Release);
                    e.tasks.retain(|_, t| t.sw_index != info.index);
                    Ok(0)
                })
            }
            // SAFETY: the caller's contract for `arg` is passed on unchanged.
            _ => unsafe { self.agent_ioctl(id, request, arg) },
        }
    }

    fn open_rw(&self, path: &Path) -> io::Result<File> {
        self.open_agent_online(path)
    }

    /// The thread leaves the enclave that has it: `TASK_DEPARTED` (its status word may then
    /// be freed); `ESRCH` when no enclave has it.
    fn to_cfs(&self, tid: u32) -> io::Result<()> {
        let gtid = Self::gtid(tid);
        let id = self.enclave_holding(gtid)?;
        let departed = abi::ghost_msg_payload_task_departed {
            gtid,
            ..Default::default()
        };
        self.task_event(id, gtid, abi::MSG_TASK_DEPARTED, as_bytes(&departed), false);
        Ok(())
    }
}
