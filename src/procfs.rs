//! What the kernel says about processes and threads: per-thread CPU time and run-queue wait
//! (`schedstat`), the CPU a thread last ran on and a process's start time (`stat`), thread names
//! (`comm`), the boot id, `MemAvailable`, CPU affinity, and pidfds (a process's exit, waited
//! on). One module, used by the agent, the launcher, the enforcers and the balancers alike.
//!
//! Every reader is a method of [`Proc`], whose root is `/proc` on a host ([`Proc::host`]) and a
//! directory of synthetic files in tests and simulations ([`Proc::at`]). A reader answers `None`
//! when the file is gone or unreadable (a thread that has exited, a zombie): never a panic, never
//! a guess.
//!
//! Measure with these, not with `/proc/PID/stat`'s tick counts: `schedstat` is in nanoseconds,
//! exact, and what `se.sum_exec_runtime` (and so the sched_ext scheduler) counts.

use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// A `/proc` to read from: the one place that says where the host's processes are. The agent
/// reads every VM's threads and start time through the `Proc` of its
/// [`Settings`](crate::agent::Settings) (the host's, or a synthetic tree in a simulation).
#[derive(Clone, Debug)]
pub struct Proc {
    root: PathBuf,
    /// The boot id, read at the first ask (it names the boot: it does not change under a
    /// running process).
    boot_id: OnceLock<String>,
}

impl PartialEq for Proc {
    fn eq(&self, other: &Proc) -> bool {
        self.root == other.root
    }
}

impl Eq for Proc {}

/// A thread's cumulative scheduler statistics, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    /// Time it ran on a CPU.
    pub run_ns: u64,
    /// Time it waited on a run queue while runnable (a thread throttled by its cgroup's quota is
    /// off the run queue, so this is what the *host* kept from it).
    pub wait_ns: u64,
}

impl Proc {
    /// The host's `/proc`.
    pub fn host() -> &'static Proc {
        static HOST: OnceLock<Proc> = OnceLock::new();
        HOST.get_or_init(|| Proc::at("/proc"))
    }

    /// A `/proc` rooted at `root` (fixtures, simulations).
    pub fn at(root: impl Into<PathBuf>) -> Proc {
        Proc {
            root: root.into(),
            boot_id: OnceLock::new(),
        }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn task(&self, pid: u32, tid: u32) -> PathBuf {
        self.root.join(format!("{pid}/task/{tid}"))
    }

    /// Thread `tid` of process `pid`'s `schedstat`; `None` once the thread is gone.
    pub fn thread_sched(&self, pid: u32, tid: u32) -> Option<SchedStat> {
        parse_schedstat(&fs::read_to_string(self.task(pid, tid).join("schedstat")).ok()?)
    }

    /// Cumulative CPU time of thread `tid` of `pid`, in ns; `None` once the thread is gone.
    pub fn thread_cpu_ns(&self, pid: u32, tid: u32) -> Option<u64> {
        self.thread_sched(pid, tid).map(|s| s.run_ns)
    }

    /// The CPU thread `tid` of `pid` last ran on (field 39 of its `stat`).
    pub fn thread_last_cpu(&self, pid: u32, tid: u32) -> Option<u32> {
        let text = fs::read_to_string(self.task(pid, tid).join("stat")).ok()?;
        stat_field(&text, 39)?.parse().ok()
    }

    /// Whether `tid` is a thread of process `pid` (a recorded id that is no longer one, because
    /// the process ended and the id was reused, is never to be acted on).
    pub fn is_thread_of(&self, pid: u32, tid: u32) -> bool {
        self.task(pid, tid).is_dir()
    }

    /// The thread ids of process `pid`, ascending; empty when it is gone.
    pub fn threads(&self, pid: u32) -> Vec<u32> {
        let mut tids: Vec<u32> = fs::read_dir(self.root.join(format!("{pid}/task")))
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        tids.sort_unstable();
        tids
    }

    /// Thread `tid`'s name (`comm`, at most 15 bytes: QEMU names its vCPU threads `CPU 0/TCG`
    /// or `CPU 0/KVM` with `-name …,debug-threads=on`).
    pub fn thread_name(&self, pid: u32, tid: u32) -> Option<String> {
        let text = fs::read_to_string(self.task(pid, tid).join("comm")).ok()?;
        Some(text.trim_end_matches('\n').to_owned())
    }

    /// A process's start time: field 22 of `/proc/PID/stat`, in clock ticks after boot; `None`
    /// when there is no such process, it is a zombie (it has exited and waits to be reaped), or
    /// the field reads 0 (never a real start time: it would match any process).
    pub fn process_start_time(&self, pid: u32) -> Option<u64> {
        let text = fs::read_to_string(self.root.join(format!("{pid}/stat"))).ok()?;
        if matches!(stat_field(&text, 3)?, "Z" | "X") {
            return None;
        }
        stat_field(&text, 22)?.parse().ok().filter(|&t| t != 0)
    }

    /// `MemAvailable` of `meminfo`, MiB.
    pub fn mem_available_mb(&self) -> Option<u64> {
        meminfo_available_mb(&fs::read_to_string(self.root.join("meminfo")).ok()?)
    }

    /// This boot's id (`sys/kernel/random/boot_id`), empty when unreadable; read once per
    /// `Proc` (the agent stamps every ledger save with it).
    pub fn boot_id(&self) -> String {
        self.boot_id
            .get_or_init(|| {
                fs::read_to_string(self.root.join("sys/kernel/random/boot_id"))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            })
            .clone()
    }
}

/// The two first fields of a `schedstat` line.
pub fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut f = text.split_ascii_whitespace();
    Some(SchedStat {
        run_ns: f.next()?.parse().ok()?,
        wait_ns: f.next()?.parse().ok()?,
    })
}

/// A host thread's `schedstat`, kept open between reads: a read is then one `pread` instead of an
/// open, a read and a close (the path walk through `/proc` costs more than the read itself, and
/// the agent reads every vCPU thread five times a second). The descriptor names the thread, not
/// its number: once the thread exits, reads fail (`ESRCH`) even if the number is reused, so a
/// kept file never reads another thread. At most half the process's descriptor limit is kept
/// open (see [`kept_limit`]); beyond that a read opens the file by its path, as before.
#[derive(Debug)]
pub struct SchedFile {
    /// The file's path, read by path when it is not kept open.
    path: PathBuf,
    file: Option<Kept>,
}

/// Descriptors held open as [`Kept`] in this process.
static KEPT: AtomicUsize = AtomicUsize::new(0);

/// A descriptor kept open between uses (a vCPU thread's `schedstat`, a cgroup's bandwidth file,
/// a VM's runtime dir), counted against one budget for the process, [`kept_limit`], so that
/// kept files never take the descriptors the agent must still open (ledger saves, new VMs).
/// Without room, callers open by path each time. Files read every tick ([`Kept::open`]) may
/// fill the budget; files used once a second ([`Kept::open_spare`]) only its first half, so
/// that a fleet larger than the budget keeps the files it reads most often.
#[derive(Debug)]
pub struct Kept(fs::File);

impl Kept {
    /// The file `open` opens, kept, when the budget has room; `None` without room or when the
    /// open fails.
    pub fn open(open: impl FnOnce() -> std::io::Result<fs::File>) -> Option<Kept> {
        Kept::open_within(kept_limit(), open)
    }

    /// As [`Kept::open`] for a file used once a second: kept while the budget is less than
    /// half spent.
    pub fn open_spare(open: impl FnOnce() -> std::io::Result<fs::File>) -> Option<Kept> {
        Kept::open_within(kept_limit() / 2, open)
    }

    fn open_within(limit: usize, open: impl FnOnce() -> std::io::Result<fs::File>) -> Option<Kept> {
        if KEPT.fetch_add(1, Ordering::Relaxed) < limit {
            if let Ok(f) = open() {
                return Some(Kept(f));
            }
        }
        KEPT.fetch_sub(1, Ordering::Relaxed);
        None
    }
}

impl std::ops::Deref for Kept {
    type Target = fs::File;
    fn deref(&self) -> &fs::File {
        &self.0
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        KEPT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many descriptors may be [`Kept`] open: half the soft `RLIMIT_NOFILE` as it is at the
/// first call (an agent raises its soft limit to the hard one before it adopts a VM).
pub fn kept_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| match nofile() {
        Some((soft, _)) => (soft / 2).min(1 << 20) as usize,
        None => 512,
    })
}

/// The soft and hard `RLIMIT_NOFILE`.
fn nofile() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    ok.then_some((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft descriptor limit to the hard one (an agent keeps a file open per vCPU
/// thread, see [`SchedFile`]); the soft limit in force after.
pub fn raise_nofile() -> Option<u64> {
    let (soft, hard) = nofile()?;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one rlimit through a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Some(soft);
        }
    }
    Some(hard.max(soft))
}

impl SchedFile {
    /// Thread `tid` of `pid` in `proc`, its file opened now when the bound allows.
    pub fn open(proc: &Proc, pid: u32, tid: u32) -> SchedFile {
        let path = proc.task(pid, tid).join("schedstat");
        SchedFile {
            file: Kept::open(|| fs::File::open(&path)),
            path,
        }
    }

    /// The thread's statistics now; `None` once it is gone.
    pub fn read(&self) -> Option<SchedStat> {
        let Some(file) = &self.file else {
            return parse_schedstat(&fs::read_to_string(&self.path).ok()?);
        };
        let mut buf = [0u8; 128];
        let n = std::os::unix::fs::FileExt::read_at(&**file, &mut buf, 0).ok()?;
        parse_schedstat(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

/// Field `n` (1-based, as proc(5) numbers them) of a `stat` line. The command (field 2) is in
/// parentheses and may hold spaces and parentheses itself: the fields after it start after its
/// last `)`.
pub fn stat_field(text: &str, n: usize) -> Option<&str> {
    let close = text.rfind(')')?;
    match n {
        0 => None,
        1 => text.split_ascii_whitespace().next(),
        2 => Some(&text[text.find('(')? + 1..close]),
        _ => text[close + 1..].split_ascii_whitespace().nth(n - 3),
    }
}

/// `MemAvailable` of a `meminfo` text, MiB.
pub fn meminfo_available_mb(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The CPUs thread `tid` may run on (its affinity mask; `0` is the calling thread); `None` when
/// it is gone.
pub fn affinity(tid: u32) -> Option<Vec<u32>> {
    let set = sched_getaffinity(Pid::from_raw(tid as i32)).ok()?;
    Some(
        (0..CpuSet::count() as u32)
            .filter(|&c| set.is_set(c as usize).unwrap_or(false))
            .collect(),
    )
}

/// Lets thread `tid` (`0`: the calling thread) run only on `cpus` (`sched_setaffinity`).
pub fn set_affinity(tid: u32, cpus: &[u32]) -> nix::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize)?;
    }
    sched_setaffinity(Pid::from_raw(tid as i32), &set)
}

/// The CPUs this process may run on.
pub fn own_cpus() -> Vec<u32> {
    affinity(0).unwrap_or_else(|| {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get()) as u32).collect()
    })
}

/// The host's online CPUs (`/sys/devices/system/cpu/online`), when readable.
pub fn online_cpus() -> Option<Vec<u32>> {
    let text = fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    crate::base::parse_cpu_list(text.trim()).ok()
}

/// A pidfd of `pid` (Linux 5.3 and later): it polls readable once the process has exited.
/// `None` when there is no such process or the kernel has no pidfds. A pidfd names the process
/// that had `pid` when it was opened, never one that reuses the pid later: check that it is
/// the one meant (its start time, the lock it holds) after opening, not before.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has exited (a zombie has), without waiting.
pub fn pidfd_exited(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_tells_a_running_process_from_an_exited_one() {
        use std::os::fd::AsFd;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).expect("pidfds (Linux 5.3+)");
        assert!(!pidfd_exited(fd.as_fd()));
        child.kill().unwrap();
        // Exited (a zombie until waited for) is exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !pidfd_exited(fd.as_fd()) {
            assert!(std::time::Instant::now() < deadline, "not seen to exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(pidfd_exited(fd.as_fd()));
        assert!(pidfd_open(0).is_none() && pidfd_open(u32::MAX).is_none());
    }

    #[test]
    fn stat_fields_survive_commands_with_spaces_and_parentheses() {
        let line = "4242 (CPU 0/KVM (x)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 20";
        assert_eq!(stat_field(line, 1), Some("4242"));
        assert_eq!(stat_field(line, 2), Some("CPU 0/KVM (x)"));
        assert_eq!(stat_field(line, 3), Some("S"));
        assert_eq!(stat_field(line, 22), Some("777"));
        assert_eq!(stat_field(line, 40), None);
        assert_eq!(stat_field("garbage", 3), None);
    }

    #[test]
    fn a_fixture_tree_is_read_like_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let task = dir.path().join("10/task/11");
        fs::create_dir_all(&task).unwrap();
        fs::write(task.join("schedstat"), "500 70 3\n").unwrap();
        fs::write(task.join("comm"), "CPU 0/TCG\n").unwrap();
        fs::write(
            dir.path().join("10/stat"),
            "10 (qemu) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 9 0 4321 0 0",
        )
        .unwrap();
        fs::write(
            dir.path().join("meminfo"),
            "MemTotal: 100 kB\nMemAvailable: 2097152 kB\n",
        )
        .unwrap();
        let p = Proc::at(dir.path());
        assert_eq!(
            p.thread_sched(10, 11),
            Some(SchedStat {
                run_ns: 500,
                wait_ns: 70
            })
        );
        assert_eq!(p.thread_sched(10, 12), None);
        assert_eq!(p.thread_name(10, 11).as_deref(), Some("CPU 0/TCG"));
        assert_eq!(p.threads(10), vec![11]);
        assert_eq!(p.process_start_time(10), Some(4321));
        assert!(p.is_thread_of(10, 11) && !p.is_thread_of(10, 12));
        assert_eq!(p.mem_available_mb(), Some(2048));
    }

    #[test]
    fn zombies_and_a_zero_start_time_identify_no_process() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("7")).unwrap();
        fs::create_dir_all(dir.path().join("8")).unwrap();
        let fields = "1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 9 0";
        fs::write(dir.path().join("7/stat"), format!("7 (q) Z {fields} 99 0")).unwrap();
        fs::write(dir.path().join("8/stat"), format!("8 (q) S {fields} 0 0")).unwrap();
        let p = Proc::at(dir.path());
        assert_eq!(p.process_start_time(7), None);
        assert_eq!(p.process_start_time(8), None);
        assert_eq!(p.process_start_time(9), None);
    }

    #[test]
    fn this_threads_last_cpu_is_one_it_may_use() {
        let pid = std::process::id();
        let tid = nix::unistd::gettid().as_raw() as u32;
        let c = Proc::host().thread_last_cpu(pid, tid).unwrap();
        assert!(own_cpus().contains(&c), "{c} not in {:?}", own_cpus());
        assert!(Proc::host().thread_sched(pid, tid).is_some());
        assert!(Proc::host().process_start_time(pid).is_some());
    }

    #[test]
    fn kept_descriptors_stop_at_the_budget_and_free_it_when_dropped() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let open = || fs::File::open(file.path());
        let mut kept = Vec::new();
        while let Some(k) = Kept::open(open) {
            kept.push(k);
            assert!(kept.len() <= kept_limit(), "more kept than the budget");
        }
        assert!(!kept.is_empty());
        assert!(Kept::open(open).is_none(), "the budget is spent");
        kept.pop();
        assert!(
            Kept::open(open).is_some(),
            "a dropped one's place is free again"
        );
        assert!(Kept::open(|| fs::File::open("/nonexistent/burst-qemu")).is_none());
        // Once a tick's files hold more than half the budget, a once-a-second file is not kept.
        kept.truncate(kept_limit() / 2 + 1);
        assert!(Kept::open_spare(open).is_none(), "past half the budget");
        assert!(Kept::open(open).is_some(), "a tick's file still is");
        // (Well below: under `cargo test` other tests' threads may hold a few.)
        kept.truncate(kept_limit() / 2 - 16);
        assert!(Kept::open_spare(open).is_some(), "below half the budget");
    }

    #[test]
    fn a_kept_schedstat_file_reads_fresh_figures_and_nothing_once_its_thread_is_gone() {
        let pid = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let f = SchedFile::open(Proc::host(), pid, tid);
        assert!(f.file.is_some(), "kept open");
        let first = f.read().unwrap();
        assert_eq!(Some(first), Proc::host().thread_sched(pid, tid));
        // This thread's own file: each read regenerates it. Spin until a fresh open shows 5 ms
        // more CPU; the kept file must show at least as much.
        // SAFETY: gettid has no preconditions.
        let me_tid = unsafe { libc::gettid() } as u32;
        let me = SchedFile::open(Proc::host(), pid, me_tid);
        let before = me.read().unwrap().run_ns;
        let fresh = loop {
            let now = Proc::host().thread_sched(pid, me_tid).unwrap().run_ns;
            if now >= before + 5_000_000 {
                break now;
            }
        };
        let after = me.read().unwrap().run_ns;
        assert!(
            after >= fresh,
            "kept {after} < fresh {fresh} (first {before})"
        );
        done_tx.send(()).unwrap();
        worker.join().unwrap();
        assert_eq!(f.read(), None, "the thread is gone");
    }
}
