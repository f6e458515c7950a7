//! CPU bandwidth through cgroups, v1 and v2, detected at run time.
//!
//! Layout, under the hierarchy that has the `cpu` controller (`MOUNT`):
//!
//! ```text
//! v1: MOUNT/burst-qemu/INSTANCE/NAME/            tasks ← each vCPU TID
//!                                                cpu.cfs_period_us, cpu.cfs_quota_us
//! v2: MOUNT/burst-qemu/INSTANCE/NAME/            cgroup.procs ← QEMU's pid (threaded domain)
//!                                  NAME/vcpus/   cgroup.type = threaded
//!                                                cgroup.threads ← each vCPU TID
//!                                                cpu.max
//! ```
//!
//! `INSTANCE` is the agent's state dir spelled as one path component, so that two state dirs
//! on one host never share (or clean up) each other's cgroups.
//!
//! A libvirt domain's QEMU stays where libvirt put it (libvirt finds a domain's cgroup from
//! its process when it reconnects); only its vCPU threads move, out of libvirt's per-vCPU
//! `vcpuN` groups into one group that holds them all under one quota (the pooled grant):
//!
//! ```text
//! v1: MOUNT/burst-qemu/INSTANCE/NAME/                 tasks ← each vCPU TID (as above)
//! v2: MOUNT/machine/qemu-ID-NAME.libvirt-qemu/burst-qemu/  cgroup.type = threaded
//!                                                     cgroup.threads ← each vCPU TID, cpu.max
//! ```
//!
//! (v2 lets a thread move only inside its process's threaded subtree: the domain's cgroup.)
//! When the domain is let go while it runs, each thread goes back to its `vcpuN`.
//!
//! Emulator and I/O threads are not charged. On v1 they stay in whatever cpu cgroup QEMU was
//! started in, since v1 moves single threads. v2 moves threads only inside a threaded subtree,
//! so the whole QEMU process moves to the VM's domain cgroup `NAME/`, which has no CPU limit,
//! and only the vCPU threads go down to `NAME/vcpus/`, which has the VM's `cpu.max`. (On v2 the
//! QEMU process therefore leaves its original cgroup; limits set there by a service manager no
//! longer apply to it.)
//!
//! The CFS period is 100 ms, the kernel's default, which measured exact on these machines
//! (20 % quota → 19.98 % over 10 s) and takes effect within a period. A grant whose quota would
//! fall below the kernel's 1 ms minimum gets a longer period instead (at most 1 s) so small
//! baselines keep their exact rate. The full rate is written as no limit (`-1` / `max`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

mod domain;

use super::{EnforceError, Enforcer};
use crate::credit::{Rate, PPM_PER_CPU};
use crate::procfs::Kept;
use crate::state::VmRecord;
use domain::libvirt_cgroup;

/// The CFS period normally used, in µs.
pub const PERIOD_US: u64 = 100_000;
/// The longest period used, in µs (the kernel's maximum is 1 s).
pub const MAX_PERIOD_US: u64 = 1_000_000;
/// The kernel's smallest quota, in µs.
pub const MIN_QUOTA_US: u64 = 1_000;

/// Which cgroup interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The quota (µs per period, `None` for no limit) and period (µs) that hold threads to `rate`.
pub fn bandwidth(rate: Rate, full: Rate) -> (Option<u64>, u64) {
    if rate >= full {
        return (None, PERIOD_US);
    }
    let ppm = rate.0.max(1);
    let quota =
        |period: u64| (u128::from(ppm) * u128::from(period) / u128::from(PPM_PER_CPU)) as u64;
    if quota(PERIOD_US) >= MIN_QUOTA_US {
        return (Some(quota(PERIOD_US)), PERIOD_US);
    }
    let period = (MIN_QUOTA_US * PPM_PER_CPU)
        .div_ceil(ppm)
        .min(MAX_PERIOD_US);
    (Some(quota(period).max(MIN_QUOTA_US)), period)
}

/// Whether moving from the bandwidth `written` to `new` is too small to be worth a write.
///
/// Every write of a quota makes the kernel refill the group's runtime and unthrottle it, so a
/// quota rewritten every tick hands out up to one extra quota each time (measured here: a
/// 20.6 % grant rewritten every 250 ms with sub-percent jitter ran at 25 %). Changes under
/// 0.5 % of the VM's full rate, at an unchanged period, are therefore left unwritten; the
/// ledger charges what the threads actually use, so nothing is lost, and a decline still moves
/// the quota every few seconds.
fn negligible(written: Option<(Option<u64>, u64)>, new: (Option<u64>, u64), full: Rate) -> bool {
    match (written, new) {
        (Some((Some(old), old_period)), (Some(q), period)) if old_period == period => {
            let full_quota = u128::from(full.0) * u128::from(period) / u128::from(PPM_PER_CPU);
            u128::from(old.abs_diff(q)) * 200 < full_quota
        }
        _ => false,
    }
}

/// Finds the hierarchy with the `cpu` controller in a `/proc/self/mountinfo` text: v2 when the
/// unified hierarchy offers `cpu` (`controllers` reads a mount's `cgroup.controllers`), else
/// the v1 hierarchy mounted with `cpu`.
pub fn detect(
    mountinfo: &str,
    controllers: impl Fn(&Path) -> Option<String>,
) -> Option<(Version, PathBuf)> {
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (fstype, _source, options) = (right.next(), right.next(), right.next().unwrap_or(""));
        let mount = PathBuf::from(mount.replace("\\040", " "));
        match fstype {
            Some("cgroup2")
                if controllers(&mount)
                    .is_some_and(|c| c.split_whitespace().any(|c| c == "cpu")) =>
            {
                return Some((Version::V2, mount));
            }
            Some("cgroup") if options.split(',').any(|o| o == "cpu") => {
                v1.get_or_insert((Version::V1, mount));
            }
            _ => {}
        }
    }
    v1
}

/// Detects this host's CPU-bandwidth hierarchy.
pub fn detect_host() -> Option<(Version, PathBuf)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    detect(&mountinfo, |m| {
        fs::read_to_string(m.join("cgroup.controllers")).ok()
    })
}

/// The state dir as one path component: `/run/burst-qemu` → `run-burst-qemu`.
pub fn instance_name(state_dir: &Path) -> String {
    let s: String = state_dir
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    let s = &s[s.len().saturating_sub(120)..];
    if s.is_empty() {
        "root".into()
    } else {
        s.into()
    }
}

#[derive(Debug)]
struct Attached {
    /// The cgroup holding the vCPU threads (with the bandwidth files).
    vcpus: PathBuf,
    /// For a libvirt domain: its vCPU threads, and the `vcpuN` group each goes back to.
    home: Vec<(u32, PathBuf)>,
    /// The threads live inside the domain's own cgroup (v2): the weight is libvirt's.
    in_domain: bool,
    /// The last (quota, period) written.
    written: Option<(Option<u64>, u64)>,
    /// The last CPU weight written (`cpu.shares` on v1, `cpu.weight` on v2).
    weight: Option<u64>,
    /// The bandwidth files the verification reads each second, kept open (see [`read_kept`]).
    kept: [Option<Kept>; 2],
}

/// Cgroup CPU-bandwidth enforcement.
#[derive(Debug)]
pub struct CgroupEnforcer {
    version: Version,
    mount: PathBuf,
    root: PathBuf,
    vms: HashMap<String, Attached>,
    /// Every write made, in order (path, value): for logs and for fixture tests.
    pub journal: Vec<(PathBuf, String)>,
}

fn err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EnforceError + 'a {
    move |source| EnforceError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl CgroupEnforcer {
    /// An enforcer on the hierarchy mounted at `mount`, with its cgroups under
    /// `mount/burst-qemu/instance`, which it creates (on v2 with the `cpu` controller enabled
    /// down to it).
    pub fn new(version: Version, mount: &Path, instance: &str) -> Result<Self, EnforceError> {
        Self::with_parent(version, mount, mount, instance)
    }

    /// An enforcer whose cgroups live under `parent/burst-qemu/instance`, `parent` being a
    /// cgroup of the hierarchy at `mount` (a subtree delegated to the agent, e.g. by systemd's
    /// `Delegate=yes`). On v2 the `cpu` controller must be available in `parent` (its
    /// ancestors' business, done by whoever delegated it) and is enabled from there down. A
    /// v2 cgroup with processes in it cannot enable controllers for its children, so if the
    /// agent itself sits in `parent` (as a service's main process does) it first moves to the
    /// leaf `parent/agent`.
    pub fn with_parent(
        version: Version,
        mount: &Path,
        parent: &Path,
        instance: &str,
    ) -> Result<Self, EnforceError> {
        let mut e = CgroupEnforcer {
            version,
            mount: mount.to_owned(),
            root: parent.join("burst-qemu").join(instance),
            vms: HashMap::new(),
            journal: Vec::new(),
        };
        if version == Version::V2 && parent != mount {
            let controllers = fs::read_to_string(parent.join("cgroup.controllers"))
                .map_err(err("reading", &parent.join("cgroup.controllers")))?;
            if !controllers.split_whitespace().any(|c| c == "cpu") {
                return Err(EnforceError::Unsupported {
                    what: "the cpu controller is not available (enable it in the parent's cgroup.subtree_control, or delegate it) in",
                    path: parent.to_owned(),
                });
            }
            let procs = parent.join("cgroup.procs");
            let inside = fs::read_to_string(&procs).unwrap_or_default();
            let me = std::process::id().to_string();
            if inside.split_whitespace().any(|p| p == me) {
                let leaf = parent.join("agent");
                fs::create_dir_all(&leaf).map_err(err("creating", &leaf))?;
                e.write(&leaf.join("cgroup.procs"), &me)?;
            }
        }
        fs::create_dir_all(&e.root).map_err(err("creating", &e.root))?;
        if version == Version::V2 {
            let mut dir = parent.to_owned();
            for part in ["burst-qemu", instance] {
                e.write(&dir.join("cgroup.subtree_control"), "+cpu")?;
                dir.push(part);
            }
            e.write(&e.root.join("cgroup.subtree_control"), "+cpu")?;
        }
        Ok(e)
    }

    /// The cgroup the calling process is in, on the v2 hierarchy at `mount` (for
    /// `--cgroup-parent self`: the subtree systemd delegated to the agent's unit).
    pub fn own_cgroup(mount: &Path) -> Option<PathBuf> {
        let text = fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(mount.join(path.trim_start_matches('/')))
    }

    /// Where this enforcer's cgroups live.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup that holds `vm`'s vCPU threads.
    pub fn vcpu_cgroup(&self, vm: &str) -> PathBuf {
        match self.version {
            Version::V1 => self.root.join(vm),
            Version::V2 => self.root.join(vm).join("vcpus"),
        }
    }

    fn write(&mut self, path: &Path, value: &str) -> Result<(), EnforceError> {
        tracing::debug!("cgroup: {} ← {value}", path.display());
        self.journal.push((path.to_owned(), value.to_owned()));
        fs::write(path, value).map_err(err("writing", path))
    }

    /// Removes a cgroup directory. On cgroupfs `rmdir` removes it with its control files; on a
    /// fixture (a plain directory) those are real files, hence the fallback.
    fn remove(dir: &Path) -> io::Result<()> {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => fs::remove_dir_all(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Writes a quota and period into `dir`; `old_period` is the period in force, when known.
    fn write_bandwidth(
        &mut self,
        dir: &Path,
        quota: Option<u64>,
        period: u64,
        old_period: Option<u64>,
    ) -> Result<(), EnforceError> {
        match self.version {
            Version::V1 => {
                // Lift the limit before changing the period so no intermediate pair is refused.
                if old_period != Some(period) {
                    self.write(&dir.join("cpu.cfs_quota_us"), "-1")?;
                    self.write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                }
                let q = quota.map_or("-1".to_owned(), |q| q.to_string());
                self.write(&dir.join("cpu.cfs_quota_us"), &q)
            }
            Version::V2 => {
                let q = quota.map_or("max".to_owned(), |q| q.to_string());
                self.write(&dir.join("cpu.max"), &format!("{q} {period}"))
            }
        }
    }

    /// The (quota, period) in force in `dir`, read from the kernel's files (`None` for no
    /// quota); `None` when unreadable.
    fn read_bandwidth(&self, dir: &Path) -> Option<(Option<u64>, u64)> {
        let (quota, period) = match self.version {
            Version::V1 => {
                let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
                let q: i64 = read("cpu.cfs_quota_us")?.trim().parse().ok()?;
                (q, read("cpu.cfs_period_us")?.trim().parse().ok()?)
            }
            Version::V2 => {
                let text = fs::read_to_string(dir.join("cpu.max")).ok()?;
                let mut f = text.split_whitespace();
                let q = match f.next()? {
                    "max" => -1,
                    q => q.parse().ok()?,
                };
                (q, f.next()?.parse().ok()?)
            }
        };
        Some((u64::try_from(quota).ok(), period))
    }

    /// Moves any thread still in `dir` to the hierarchy's root, then removes `dir`.
    fn evacuate_and_remove(&mut self, dir: &Path) -> Result<(), EnforceError> {
        if Self::remove(dir).is_ok() {
            return Ok(());
        }
        let (list, target) = match self.version {
            Version::V1 => ("tasks", self.mount.join("tasks")),
            Version::V2 => ("cgroup.procs", self.mount.join("cgroup.procs")),
        };
        let left = fs::read_to_string(dir.join(list)).unwrap_or_default();
        for id in left.split_whitespace() {
            let _ = self.write(&target, id);
        }
        Self::remove(dir).map_err(err("removing", dir))
    }
}

impl Enforcer for CgroupEnforcer {
    fn describe(&self) -> String {
        format!("cgroup {} at {}", self.version, self.root.display())
    }

    fn attach(&mut self, vm: &VmRecord) -> Result<(), EnforceError> {
        // `cleanup` removes the instance directory when no VM is left (an agent that starts
        // before any VM does so at once): on v2 a directory made again by `create_dir_all`
        // below would have no `cpu` for its children, and every attach would fail (found on
        // a real 6.12 kernel with the agent started first, as a systemd unit is).
        if !self.root.is_dir() {
            fs::create_dir_all(&self.root).map_err(err("creating", &self.root))?;
            if self.version == Version::V2 {
                self.write(&self.root.join("cgroup.subtree_control"), "+cpu")?;
            }
        }
        let home = self.home_of(vm);
        if let (Version::V2, Some(dir)) = (self.version, libvirt_cgroup(vm)) {
            return self.attach_in_domain(vm, &self.mount.join(dir), home);
        }
        let domain = self.root.join(&vm.name);
        let vcpus = self.vcpu_cgroup(&vm.name);
        fs::create_dir_all(&vcpus).map_err(err("creating", &vcpus))?;
        // Exactly this VM's vCPU threads: what else is there (say, the threads of an earlier VM
        // of the same name that is still shutting down) is moved out after ours are in.
        let (list, out) = match self.version {
            Version::V1 => (vcpus.join("tasks"), self.mount.join("tasks")),
            Version::V2 => (vcpus.join("cgroup.threads"), domain.join("cgroup.threads")),
        };
        let inside = fs::read_to_string(&list).unwrap_or_default();
        let foreign: Vec<String> = inside
            .split_whitespace()
            .filter(|id| id.parse().is_ok_and(|t: u32| !vm.vcpu_tids.contains(&t)))
            .map(str::to_owned)
            .collect();
        // Only what is not so already: a new agent re-adopting a VM finds it in place, and
        // moving it again is not free (on v2, QEMU's move into its domain cgroup takes the
        // vCPU threads out of `vcpus/` with it, unlimited until they are moved back: measured
        // a 100 ms period at 68 % of one CPU, held to 20 %, in a 6.12 guest).
        let listed = |text: &str, id: u32| text.split_whitespace().any(|x| x == id.to_string());
        let missing: Vec<u32> = vm
            .vcpu_tids
            .iter()
            .copied()
            .filter(|&t| !listed(&inside, t))
            .collect();
        match self.version {
            Version::V1 => {
                for tid in missing {
                    self.write(&vcpus.join("tasks"), &tid.to_string())?;
                }
            }
            Version::V2 => {
                let read = |p: PathBuf| fs::read_to_string(p).unwrap_or_default();
                if read(vcpus.join("cgroup.type")).trim() != "threaded" {
                    self.write(&vcpus.join("cgroup.type"), "threaded")?;
                }
                let control = read(domain.join("cgroup.subtree_control"));
                if !control
                    .split_whitespace()
                    .any(|c| c.trim_start_matches('+') == "cpu")
                {
                    self.write(&domain.join("cgroup.subtree_control"), "+cpu")?;
                }
                if !listed(&read(domain.join("cgroup.procs")), vm.pid) {
                    self.write(&domain.join("cgroup.procs"), &vm.pid.to_string())?;
                }
                for tid in missing {
                    self.write(&vcpus.join("cgroup.threads"), &tid.to_string())?;
                }
            }
        }
        for id in foreign {
            tracing::warn!(
                "{}: moving foreign thread {id} out of {}",
                vm.name,
                vcpus.display()
            );
            let _ = self.write(&out, &id);
        }
        self.vms.insert(
            vm.name.clone(),
            Attached {
                vcpus,
                home,
                in_domain: false,
                written: None,
                weight: None,
                kept: Default::default(),
            },
        );
        Ok(())
    }

    fn apply(&mut self, vm: &str, rate: Rate, full: Rate) -> Result<(), EnforceError> {
        let Some(a) = self.vms.get(vm) else {
            return Err(EnforceError::NotAttached { vm: vm.to_owned() });
        };
        let (quota, period) = bandwidth(rate, full);
        if a.written == Some((quota, period)) || negligible(a.written, (quota, period), full) {
            return Ok(());
        }
        let dir = a.vcpus.clone();
        let mut old_period = a.written.map(|w| w.1);
        if a.written.is_none() {
            // A fresh attach, such as a new agent taking over a VM its predecessor held: a
            // quota already in force is not written again. Every write of a quota refills the
            // period's runtime at once (v1 also lifts the limit for a moment when the period
            // is set): the same 20 % quota written every 200 ms let a busy VM run 26 % (v1,
            // this host) and 32 % (v2, 6.12 guest) of one CPU (examples/quota_writes.rs).
            if let Some(current) = self.read_bandwidth(&dir) {
                if current == (quota, period) {
                    if let Some(a) = self.vms.get_mut(vm) {
                        a.written = Some(current);
                    }
                    return Ok(());
                }
                old_period = Some(current.1);
            }
        }
        self.write_bandwidth(&dir, quota, period, old_period)?;
        if let Some(a) = self.vms.get_mut(vm) {
            a.written = Some((quota, period));
        }
        Ok(())
    }

    fn weigh(&mut self, vm: &str, rate: Rate) -> Result<(), EnforceError> {
        let Some(a) = self.vms.get(vm).filter(|a| !a.in_domain) else {
            return Ok(());
        };
        // One CPU's worth is the kernel's default weight (1024 shares, weight 100), so an
        // uncontended VM at one CPU keeps the default and weights compare as the rates do.
        let (file, weight) = match self.version {
            Version::V1 => (
                "cpu.shares",
                (rate.0 * 1024 / PPM_PER_CPU).clamp(2, 262_144),
            ),
            Version::V2 => ("cpu.weight", (rate.0 * 100 / PPM_PER_CPU).clamp(1, 10_000)),
        };
        // Within 2 % of what is written: not worth a write.
        if a.weight.is_some_and(|w| w.abs_diff(weight) * 50 <= w) {
            return Ok(());
        }
        let path = self.root.join(vm).join(file);
        self.write(&path, &weight.to_string())?;
        if let Some(a) = self.vms.get_mut(vm) {
            a.weight = Some(weight);
        }
        Ok(())
    }

    fn verify(&mut self, vm: &VmRecord) -> Result<Option<String>, EnforceError> {
        let Some(a) = self.vms.get(&vm.name) else {
            return Ok(None);
        };
        let (dir, written) = (a.vcpus.clone(), a.written);
        let list = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.threads",
        };
        // The thread list read, not a stat first: a cgroup that is gone has none.
        let repaired = match fs::read_to_string(dir.join(list)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("cgroup {} was removed", dir.display()))
            }
            inside => {
                let inside = inside.unwrap_or_default();
                let inside: Vec<u32> = inside
                    .split_whitespace()
                    .filter_map(|t| t.parse().ok())
                    .collect();
                vm.vcpu_tids
                    .iter()
                    .find(|t| !inside.contains(t))
                    .map(|t| format!("vCPU thread {t} was moved out of {}", dir.display()))
            }
        };
        if let Some(why) = repaired {
            let weight = self.vms.get(&vm.name).and_then(|a| a.weight);
            self.attach(vm)?;
            if let Some(a) = self.vms.get_mut(&vm.name) {
                a.weight = weight;
            }
            if let Some((quota, period)) = written {
                self.write_bandwidth(&dir, quota, period, None)?;
                if let Some(a) = self.vms.get_mut(&vm.name) {
                    a.written = written;
                }
            }
            return Ok(Some(why));
        }
        let Some((quota, period)) = written else {
            return Ok(None);
        };
        let Some(a) = self.vms.get_mut(&vm.name) else {
            return Ok(None);
        };
        let [q, p] = &mut a.kept;
        let found = match self.version {
            Version::V1 => {
                let quota = read_kept(q, &dir.join("cpu.cfs_quota_us"));
                let period = read_kept(p, &dir.join("cpu.cfs_period_us"));
                Some((
                    quota.and_then(|t| t.trim().parse::<i64>().ok()),
                    period.and_then(|t| t.trim().parse::<u64>().ok()),
                ))
            }
            Version::V2 => read_kept(q, &dir.join("cpu.max")).and_then(|t| {
                let mut f = t.split_whitespace();
                let q = match f.next()? {
                    "max" => -1,
                    q => q.parse().ok()?,
                };
                Some((Some(q), f.next()?.parse().ok()))
            }),
        };
        let expected = (Some(quota.map_or(-1, |q| q as i64)), Some(period));
        if found == Some(expected) {
            return Ok(None);
        }
        self.write_bandwidth(&dir, quota, period, None)?;
        Ok(Some(format!(
            "the bandwidth of {} was changed to {found:?}; put back to {expected:?}",
            dir.display()
        )))
    }

    fn detach(&mut self, vm: &str) -> Result<(), EnforceError> {
        if let Some(a) = self.vms.remove(vm) {
            self.send_home(&a);
            if a.in_domain {
                // libvirt removes the domain's whole tree (ours included) when it stops.
                return match Self::remove(&a.vcpus) {
                    Err(e) if a.vcpus.parent().is_some_and(Path::is_dir) => {
                        Err(err("removing", &a.vcpus)(e))
                    }
                    _ => Ok(()),
                };
            }
        }
        let domain = self.root.join(vm);
        if self.version == Version::V2 {
            let vcpus = domain.join("vcpus");
            if vcpus.exists() {
                // Threads cannot leave a threaded subtree: hand them back to the domain first.
                let left = fs::read_to_string(vcpus.join("cgroup.threads")).unwrap_or_default();
                for tid in left.split_whitespace() {
                    let _ = self.write(&domain.join("cgroup.threads"), tid);
                }
                self.evacuate_and_remove(&vcpus)?;
            }
        }
        self.evacuate_and_remove(&domain)
    }

    fn cleanup(&mut self, live: &[&str]) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        // The entries' types come with the listing (no stat of each: this runs every second).
        let is_dir = |e: &fs::DirEntry| e.file_type().is_ok_and(|t| t.is_dir());
        let entries: Vec<fs::DirEntry> = entries.flatten().filter(is_dir).collect();
        if live.is_empty() && entries.is_empty() {
            // Nothing of ours is left: remove the instance directory too.
            let _ = Self::remove(&self.root);
            return;
        }
        // Looked up by name: a search of the live VMs per cgroup made the cleanup quadratic.
        let live: HashSet<&str> = live.iter().copied().collect();
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if !live.contains(name.as_str()) {
                tracing::info!("removing leftover cgroup {}", e.path().display());
                if let Err(error) = self.detach(&name) {
                    tracing::warn!("{error}");
                }
            }
        }
    }
}

/// Reads a small cgroup file through a descriptor kept open after the first read, from offset
/// 0 (a cgroup file read again from the start shows its value now), or opens it again when
/// there is none or reading fails (its cgroup removed, and perhaps made again). Not for the
/// thread lists: cgroup v1 serves `tasks` again from a list it keeps while the file is read
/// at least once a second.
/// Without room in the process's budget of kept descriptors ([`Kept`]), it is read by path.
fn read_kept(kept: &mut Option<Kept>, path: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    for fresh in [false, true] {
        if fresh || kept.is_none() {
            *kept = Kept::open_spare(|| fs::File::open(path));
        }
        let Some(file) = kept.as_ref() else {
            return fs::read_to_string(path).ok();
        };
        let mut buf = [0u8; 128];
        match file.read_at(&mut buf, 0) {
            Ok(n) if n < buf.len() => return String::from_utf8(buf[..n].to_vec()).ok(),
            _ => *kept = None,
        }
    }
    None
}

#[cfg(test)]
mod tests;
