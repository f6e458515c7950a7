//! The sched_ext enforcer: burst-qemu's own BPF scheduler (`bpf/burst.bpf.c`, loaded by
//! [`loader`] in a child process, `burst-qemu scx-scheduler`) schedules the VMs' vCPU threads
//! (only those: partial mode) from per-VM budgets, with the cgroup quota kept as a backstop.
//!
//! Why a child process: the loaded scheduler lives as long as the process holding its
//! struct_ops link, and sched_ext unloads it (every thread back to the fair class) when that
//! process dies; a small process of its own keeps libbpf out of the agent, can be killed and
//! restarted on its own, and dies with the agent (`PR_SET_PDEATHSIG`, and end of input).
//!
//! The agent talks to it over a pipe, one line per command (see [`Command`]); it applies the
//! commands to the BPF maps. Every rate the agent applies is also written as the cgroup quota
//! ([`CgroupEnforcer`]): while the BPF scheduler runs, 6.12 does not apply `cpu.max` to
//! SCHED_EXT threads; when it dies the threads fall back to the fair class and `cpu.max` holds
//! them at once. The agent restarts a dead scheduler within about a second ([`Enforcer::verify`]).
//! The vCPU threads are SCHED_EXT only while *our* scheduler is enabled: another sched_ext
//! scheduler holding the kernel (ours then cannot load) would run them without any limit, so
//! until ours says `ready` they stay SCHED_OTHER, under the quota.
//!
//! A VM whose grant is 0 is paused with QMP `stop` rather than starved (a runnable thread held
//! past `timeout_ms` would make the kernel abort the scheduler), and resumed with `cont`.

pub mod abi;
mod command;
#[cfg(test)]
pub(crate) mod dispatch_model;
#[cfg(feature = "scx")]
pub mod loader;
mod stats;
pub mod user;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use super::cgroup::CgroupEnforcer;
use super::{EnforceError, Enforcer};
use crate::contention::Entitlement;
use crate::credit::{Rate, PPM_PER_CPU};
use crate::sched::dispatch_weights;
use crate::state::VmRecord;

/// Where the kernel shows sched_ext (`state`: `enabled`, `disabled`, …).
pub const SYSFS: &str = "/sys/kernel/sched_ext";
/// The scheduler's name, as `/sys/kernel/sched_ext/root/ops` shows it.
pub const OPS_NAME: &str = "burst_qemu";
/// The scheduling policy number of SCHED_EXT (uapi).
pub const SCHED_EXT: i32 = 7;
/// The most VMs one scheduler holds (its DSQs and map sizes; `MAX_VMS` of bpf/intf.h).
pub use abi::MAX_VMS;
pub use command::Command;
pub use stats::{read_stats, stats_path, LatencyStats, Stats, VmStats};
/// The error of an attach past [`MAX_VMS`] (the number is checked by a unit test).
const TOO_MANY: &str =
    "too many VMs for the sched_ext scheduler (1024, MAX_VMS of bpf/intf.h); not scheduling";
/// The budget period.
pub const PERIOD: Duration = Duration::from_millis(100);

/// Whether the running kernel offers sched_ext.
pub fn kernel_supports() -> bool {
    Path::new(SYSFS).join("state").exists()
}

/// Whether this binary was built with the sched_ext scheduler (feature `scx`).
pub const BUILT: bool = cfg!(feature = "scx");

/// The kernel's sched_ext state and the loaded scheduler's name, if any.
pub fn kernel_state() -> Option<(String, String)> {
    let state = std::fs::read_to_string(Path::new(SYSFS).join("state")).ok()?;
    let ops = std::fs::read_to_string(Path::new(SYSFS).join("root/ops")).unwrap_or_default();
    Some((state.trim().to_owned(), ops.trim().to_owned()))
}

/// ns of CPU per [`PERIOD`] at `rate`.
pub fn budget_ns(rate: Rate) -> u64 {
    (u128::from(rate.0) * PERIOD.as_nanos() / u128::from(PPM_PER_CPU)) as u64
}

struct Managed {
    idx: u32,
    tids: Vec<u32>,
    baseline: Rate,
    grant: Rate,
    /// The planner's weight for the spare.
    weight: Rate,
    /// The weight the program orders by ([`ScxEnforcer::reweigh`]).
    dispatch_weight: Rate,
    qmp: PathBuf,
    paused: bool,
}

impl Managed {
    fn commands(&self, name: &str) -> Vec<Command> {
        // A held thread must never wait past the watchdog: a grant of 0 pauses the VM, and
        // the scheduler always gets a budget of at least 1 % of one CPU.
        let grant = budget_ns(self.grant).max(budget_ns(Rate(PPM_PER_CPU / 100)));
        let mut cmds = vec![Command::Vm {
            idx: self.idx,
            base_ns: budget_ns(self.baseline).min(grant),
            grant_ns: grant,
            weight: budget_ns(self.dispatch_weight),
            name: name.to_owned(),
        }];
        cmds.extend(
            self.tids
                .iter()
                .map(|&tid| Command::Tid { tid, idx: self.idx }),
        );
        cmds
    }
}

struct Scheduler {
    child: Child,
    stdin: ChildStdin,
    /// Set once the process says its BPF scheduler is enabled.
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Who decides each dispatch of a vCPU thread (`agent --scx-dispatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// The BPF program, from the budgets the agent gives it (the default: see the README's
    /// enforcer section for the figures of both).
    Bpf,
    /// The scheduler process, by the one scheduling policy ([`crate::sched`], the ghOSt
    /// agent's), decision by decision ([`user`]).
    User,
}

/// The sched_ext enforcer (see the module docs).
pub struct ScxEnforcer {
    backstop: CgroupEnforcer,
    cpus: Option<Vec<u32>>,
    /// How many CPUs the program dispatches the vCPU threads to: `cpus`, or those online at
    /// start (the program's own count is taken once too, `loader::configure`).
    cpu_count: u32,
    dispatch: Dispatch,
    exe: PathBuf,
    stats: PathBuf,
    sched: Option<Scheduler>,
    vms: HashMap<String, Managed>,
    last_start: Instant,
    restarts: u32,
    /// Consecutive scheduler processes that died before enabling their BPF scheduler (a
    /// foreign one loaded, a kernel that refuses ours): each doubles the wait before the next
    /// start, up to a minute.
    quick_deaths: u32,
    /// Whether the vCPU threads were last put in SCHED_EXT ([`ScxEnforcer::sync_policies`]).
    threads_ext: bool,
}

fn failed(
    what: &'static str,
    path: &Path,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> EnforceError {
    EnforceError::Scheduler {
        what,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// Sets thread `tid`'s policy to SCHED_EXT (kept when the scheduler dies: the thread returns
/// to the fair class until one loads again) or, with `ext` false, back to SCHED_OTHER.
fn set_ext(tid: u32, ext: bool) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if ext { SCHED_EXT } else { libc::SCHED_OTHER };
    // SAFETY: sched_setscheduler reads the sched_param it is given.
    if unsafe { libc::sched_setscheduler(tid as libc::pid_t, policy, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn policy_of(tid: u32) -> i32 {
    // SAFETY: sched_getscheduler takes a thread id and returns a number or -1.
    unsafe { libc::sched_getscheduler(tid as libc::pid_t) }
}

impl ScxEnforcer {
    /// Keeps vCPU thread `tid` of `vm` on the scheduler's CPUs ([`crate::sched::confined`]), when they are
    /// given: at adoption, and at every check, since a pin made later to CPUs the scheduler
    /// does not run would leave the thread where nothing holds it. What was changed, if
    /// anything, and whether a pin was replaced (not only narrowed).
    fn confine(&self, vm: &VmRecord, tid: u32) -> Result<Option<(String, bool)>, EnforceError> {
        let Some(cpus) = &self.cpus else {
            return Ok(None);
        };
        let current = crate::procfs::affinity(tid);
        let (confine, replaced) = crate::sched::confined(current.as_deref(), cpus);
        if current.as_deref() == Some(&confine[..]) {
            return Ok(None);
        }
        crate::procfs::set_affinity(tid, &confine)
            .map_err(|e| failed("setting the CPUs of vCPU thread", &vm.qmp_socket, e))?;
        let was = current.as_deref().unwrap_or_default();
        let said = if replaced {
            format!(
                "vCPU thread {tid} was pinned to CPUs {was:?}, none of the scheduler's \
                 {cpus:?}: moved to those"
            )
        } else {
            format!("vCPU thread {tid} could run on CPUs {was:?}: kept to {confine:?}")
        };
        Ok(Some((said, replaced)))
    }

    /// The enforcer; its scheduler process (`exe scx-scheduler`) runs while it has VMs: the
    /// kernel runs one BPF scheduler at a time, and an agent without VMs (each state dir has
    /// its own) should not hold it. `cpus`: the CPUs the vCPU threads are confined to (keep
    /// other busy threads off them: on 6.12 the fair class runs before sched_ext); `None`
    /// leaves affinities alone.
    pub fn start(
        backstop: CgroupEnforcer,
        exe: &Path,
        cpus: Option<Vec<u32>>,
        dispatch: Dispatch,
        state_dir: &Path,
    ) -> Result<Self, EnforceError> {
        if !kernel_supports() {
            return Err(failed(
                "this kernel has no sched_ext (CONFIG_SCHED_CLASS_EXT, Linux 6.12+):",
                Path::new(SYSFS),
                "missing",
            ));
        }
        let cpu_count = match &cpus {
            Some(cpus) => cpus.len(),
            None => crate::procfs::online_cpus().map_or(1, |c| c.len()),
        }
        .max(1) as u32;
        Ok(ScxEnforcer {
            backstop,
            cpus,
            cpu_count,
            dispatch,
            exe: exe.to_owned(),
            stats: stats_path(state_dir),
            sched: None,
            vms: HashMap::new(),
            last_start: Instant::now() - Duration::from_secs(60),
            restarts: 0,
            quick_deaths: 0,
            threads_ext: false,
        })
    }

    /// The scheduler process's pid, while it runs.
    pub fn scheduler_pid(&self) -> Option<u32> {
        self.sched.as_ref().map(|s| s.child.id())
    }

    /// Whether our BPF scheduler is enabled: only then are the vCPU threads SCHED_EXT. Before
    /// (and while another sched_ext scheduler holds the kernel, which would run them unlimited:
    /// `cpu.max` does not apply to SCHED_EXT threads) they stay in the fair class, under the
    /// cgroup quota.
    fn ours_enabled(&self) -> bool {
        self.sched
            .as_ref()
            .is_some_and(|s| s.ready.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Moves every VM's vCPU threads into SCHED_EXT when our scheduler has just been enabled,
    /// and back to SCHED_OTHER when it is gone.
    fn sync_policies(&mut self) {
        let ext = self.ours_enabled();
        if ext == self.threads_ext {
            return;
        }
        self.threads_ext = ext;
        for (name, m) in &self.vms {
            for &tid in &m.tids {
                if let Err(e) = set_ext(tid, ext) {
                    tracing::error!("{name}: vCPU thread {tid}: setting its policy: {e}");
                }
            }
        }
        tracing::info!(
            "vCPU threads {}",
            if ext {
                "in SCHED_EXT: our scheduler is enabled"
            } else {
                "in the fair class under their cgroup quotas: our scheduler is not enabled"
            }
        );
    }

    /// Sets every VM's [`Managed::dispatch_weight`] from the entitlements and sends the VMs
    /// whose budget line changed (besides `changed`, whose own did). BPF dispatch orders the
    /// spare by (used − baseline) / weight within a period, so it is given each VM's target
    /// for busy vCPUs above its guarantee ([`dispatch_weights`]): ordered by the planner's
    /// weights, VMs refilled together crowded out one of small weight, which then ran below
    /// its target on CPUs with room (src/conformance.rs). User-space dispatch runs the policy,
    /// which computes the targets itself from what is runnable: it gets the planner's weight.
    fn reweigh(&mut self, changed: Option<&str>) {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        let weights: Vec<Rate> = match self.dispatch {
            Dispatch::User => names.iter().map(|n| self.vms[n].weight).collect(),
            Dispatch::Bpf => {
                let fleet: Vec<(Entitlement, u32)> = names
                    .iter()
                    .map(|n| {
                        let m = &self.vms[n];
                        let e = Entitlement {
                            cap: m.grant,
                            guarantee: m.baseline.min(m.grant),
                            weight: m.weight,
                        };
                        (e, m.tids.len() as u32)
                    })
                    .collect();
                dispatch_weights(&fleet, self.cpu_count)
            }
        };
        let mut cmds = Vec::new();
        for (name, w) in names.iter().zip(weights) {
            let m = self.vms.get_mut(name).expect("listed");
            if m.dispatch_weight != w || changed == Some(name.as_str()) {
                m.dispatch_weight = w;
                cmds.push(m.commands(name).swap_remove(0));
            }
        }
        self.send(&cmds);
    }

    fn send(&mut self, cmds: &[Command]) {
        let Some(s) = self.sched.as_mut() else { return };
        let text: String = cmds.iter().map(Command::line).collect();
        if let Err(e) = s
            .stdin
            .write_all(text.as_bytes())
            .and_then(|_| s.stdin.flush())
        {
            tracing::error!(
                "sched_ext scheduler (pid {}) unreachable: {e}; the cgroup quotas hold the VMs",
                s.child.id()
            );
            self.reap();
        }
    }

    fn reap(&mut self) {
        if let Some(mut s) = self.sched.take() {
            let _ = s.child.kill();
            let status = s.child.wait();
            tracing::error!("sched_ext scheduler ended ({status:?})");
        }
    }

    /// Starts the scheduler process when there are VMs and none runs (after a death: a second
    /// later, longer after repeated quick deaths), and sends it every VM. Returns whether it
    /// started one.
    fn keep_alive(&mut self) -> Result<bool, EnforceError> {
        if self.vms.is_empty() {
            return Ok(false);
        }
        if let Some(s) = self.sched.as_mut() {
            match s.child.try_wait() {
                Ok(None) => return Ok(false),
                Ok(Some(status)) => tracing::error!(
                    "sched_ext scheduler (pid {}) exited ({status}); the cgroup quotas hold the \
                     VMs until it is restarted",
                    s.child.id()
                ),
                Err(e) => tracing::error!("sched_ext scheduler: {e}"),
            }
            if s.ready.load(std::sync::atomic::Ordering::Relaxed) {
                self.quick_deaths = 0;
            } else {
                self.quick_deaths += 1;
            }
            self.sched = None;
        }
        let wait = Duration::from_secs(1 << self.quick_deaths.min(6)).min(Duration::from_secs(60));
        if self.last_start.elapsed() < wait {
            return Ok(false);
        }
        self.last_start = Instant::now();
        let sched = spawn(&self.exe, &self.stats, self.dispatch, self.cpus.as_deref())?;
        if self.restarts > 0 {
            tracing::warn!(
                "sched_ext scheduler restarted (pid {}, start {})",
                sched.child.id(),
                self.restarts + 1
            );
        } else {
            tracing::info!("sched_ext scheduler started (pid {})", sched.child.id());
        }
        self.restarts += 1;
        self.sched = Some(sched);
        let all: Vec<Command> = self.vms.iter().flat_map(|(n, m)| m.commands(n)).collect();
        self.send(&all);
        Ok(true)
    }

    fn pause(&mut self, vm: &str, pause: bool) {
        let Some(m) = self.vms.get_mut(vm) else {
            return;
        };
        if m.paused == pause {
            return;
        }
        let result = qmp::Client::connect(&m.qmp, Duration::from_secs(2)).and_then(|mut c| {
            if pause {
                c.execute(qmp::qapi::qmp::stop {}).map(|_| ())
            } else {
                c.execute(qmp::qapi::qmp::cont {}).map(|_| ())
            }
        });
        match result {
            Ok(()) => {
                m.paused = pause;
                tracing::info!(
                    "{vm}: {} (grant {})",
                    if pause {
                        "paused: no CPU granted"
                    } else {
                        "resumed"
                    },
                    m.grant.0
                );
            }
            Err(e) => tracing::error!("{vm}: QMP {}: {e}", if pause { "stop" } else { "cont" }),
        }
    }
}

fn spawn(
    exe: &Path,
    stats: &Path,
    dispatch: Dispatch,
    cpus: Option<&[u32]>,
) -> Result<Scheduler, EnforceError> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("scx-scheduler").arg("--stats").arg(stats);
    if dispatch == Dispatch::User {
        cmd.args(["--dispatch", "user"]);
        if let Some(cpus) = cpus {
            let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
            cmd.args(["--cpus", &list.join(",")]);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| failed("starting the sched_ext scheduler", exe, e))?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    // Loading runs the verifier (seconds under TCG): the agent goes on meanwhile (the pipe
    // holds its commands; the cgroup quotas hold the VMs). Whether it worked is logged here,
    // and a process that failed is seen dead by `keep_alive`.
    let pid = child.id();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() == "ready" {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("sched_ext scheduler (pid {pid}) enabled");
        } else {
            tracing::error!(
                "sched_ext scheduler (pid {pid}) failed to start (its error is above); the \
                 cgroup quotas hold the VMs"
            );
        }
    });
    Ok(Scheduler {
        child,
        stdin,
        ready,
    })
}

impl Enforcer for ScxEnforcer {
    fn describe(&self) -> String {
        format!(
            "sched_ext ({} dispatch, scheduler pid {}, CPUs {}), backstop {}",
            match self.dispatch {
                Dispatch::Bpf => "BPF",
                Dispatch::User => "user-space",
            },
            self.scheduler_pid()
                .map_or("none".into(), |p| p.to_string()),
            self.cpus
                .as_ref()
                .map_or("all".into(), |c| format!("{c:?}")),
            self.backstop.describe()
        )
    }

    fn attach(&mut self, vm: &VmRecord) -> Result<(), EnforceError> {
        self.backstop.attach(vm)?;
        for &tid in &vm.vcpu_tids {
            // A fresh thread may run anywhere: its narrowing is the rule, a replaced pin news.
            if let Some((said, true)) = self.confine(vm, tid)? {
                tracing::warn!("{}: {said}", vm.name);
            }
            set_ext(tid, self.ours_enabled())
                .map_err(|e| failed("setting the policy of a vCPU thread of", &vm.qmp_socket, e))?;
        }
        if self.vms.contains_key(&vm.name) {
            return Ok(());
        }
        // The lowest free slot: the program loops over the slots up to the highest in use.
        let used: std::collections::HashSet<u32> = self.vms.values().map(|m| m.idx).collect();
        let Some(idx) = (0..MAX_VMS).find(|i| !used.contains(i)) else {
            return Err(failed(TOO_MANY, &vm.qmp_socket, vm.name.clone()));
        };
        let baseline = Rate::from_percent_of(vm.baseline, vm.vcpus);
        let m = Managed {
            idx,
            tids: vm.vcpu_tids.clone(),
            baseline,
            grant: baseline,
            // No spare until the agent's first `entitle` (with its first `apply`).
            weight: Rate(0),
            dispatch_weight: Rate(0),
            qmp: vm.qmp_socket.clone(),
            paused: false,
        };
        let cmds = m.commands(&vm.name);
        self.vms.insert(vm.name.clone(), m);
        if self.sched.is_none() {
            // Sends every VM when it starts. A failure leaves the cgroup quota in force.
            self.reweigh(None);
            return self.keep_alive().map(|_| ());
        }
        self.send(&cmds);
        // Its demand moves the others' targets.
        self.reweigh(None);
        Ok(())
    }

    fn apply(&mut self, vm: &str, rate: Rate, full: Rate) -> Result<(), EnforceError> {
        self.backstop.apply(vm, rate, full)?;
        self.sync_policies();
        let Some(m) = self.vms.get_mut(vm) else {
            return Err(failed(
                "applying a rate to a VM not attached:",
                Path::new(vm),
                vm,
            ));
        };
        if m.grant != rate {
            m.grant = rate;
            self.reweigh(Some(vm));
        }
        self.pause(vm, rate.0 == 0);
        Ok(())
    }

    fn detach(&mut self, vm: &str) -> Result<(), EnforceError> {
        if let Some(m) = self.vms.remove(vm) {
            // A VM let go while its QEMU lives (released, opted out) returns to the fair class
            // first: a thread still queued in the VM's DSQ when its slot is freed would never be
            // dispatched again (a freed slot is skipped), until sched_ext's watchdog disabled the
            // scheduler for every VM. Threads that have exited are no matter.
            for &tid in &m.tids {
                match set_ext(tid, false) {
                    Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                        tracing::warn!("{vm}: vCPU thread {tid}: back to the fair class: {e}")
                    }
                    _ => {}
                }
            }
            let mut cmds: Vec<Command> = m.tids.iter().map(|&tid| Command::Untid { tid }).collect();
            cmds.push(Command::Free { idx: m.idx });
            self.send(&cmds);
            self.reweigh(None);
        }
        if self.vms.is_empty() {
            self.stop();
        }
        self.backstop.detach(vm)
    }

    fn cleanup(&mut self, live: &[&str]) {
        self.backstop.cleanup(live);
    }

    fn weigh(&mut self, vm: &str, rate: Rate) -> Result<(), EnforceError> {
        self.backstop.weigh(vm, rate)
    }

    fn entitle(&mut self, vm: &str, entitled: Entitlement) -> Result<(), EnforceError> {
        // The cap came with `apply` (which also pauses a VM granted nothing and sets the
        // backstop's quota); the guarantee and the weight come here.
        if let Some(m) = self.vms.get_mut(vm) {
            if (m.baseline, m.weight) != (entitled.guarantee, entitled.weight) {
                m.baseline = entitled.guarantee;
                m.weight = entitled.weight;
                self.reweigh(Some(vm));
            }
        }
        Ok(())
    }

    fn verify(&mut self, vm: &VmRecord) -> Result<Option<String>, EnforceError> {
        let mut repaired = Vec::new();
        if self.keep_alive()? {
            repaired.push("the sched_ext scheduler had died: restarted".to_owned());
        }
        self.sync_policies();
        if let Some(r) = self.backstop.verify(vm)? {
            repaired.push(r);
        }
        let (want, name) = if self.threads_ext {
            (SCHED_EXT, "SCHED_EXT")
        } else {
            (libc::SCHED_OTHER, "SCHED_OTHER")
        };
        for &tid in &vm.vcpu_tids {
            if let Some((said, _)) = self.confine(vm, tid)? {
                repaired.push(said);
            }
            let p = policy_of(tid);
            if p >= 0 && p != want {
                set_ext(tid, self.threads_ext).map_err(|e| {
                    failed("setting the policy of a vCPU thread of", &vm.qmp_socket, e)
                })?;
                repaired.push(format!("thread {tid} had policy {p}, not {name}"));
            }
        }
        Ok((!repaired.is_empty()).then(|| repaired.join("; ")))
    }
}

impl Drop for ScxEnforcer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ScxEnforcer {
    fn stop(&mut self) {
        // End of input: the scheduler process unloads the BPF scheduler and exits.
        if let Some(mut s) = self.sched.take() {
            drop(s.stdin);
            let _ = std::fs::remove_file(&self.stats);
            tracing::info!(
                "no VMs left: sched_ext scheduler (pid {}) stopped",
                s.child.id()
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = s.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_too_many_vms_error_says_the_real_limit() {
        assert!(
            TOO_MANY.contains(&format!("({MAX_VMS}, MAX_VMS")),
            "{TOO_MANY}"
        );
    }

    #[test]
    fn budgets_are_per_period_and_never_zero() {
        assert_eq!(budget_ns(Rate(PPM_PER_CPU)), 100_000_000);
        assert_eq!(budget_ns(Rate(200_000)), 20_000_000);
        let m = Managed {
            idx: 1,
            tids: vec![10, 11],
            baseline: Rate(400_000),
            grant: Rate(0),
            weight: Rate(100_000),
            dispatch_weight: Rate(300_000),
            qmp: PathBuf::new(),
            paused: false,
        };
        let cmds = m.commands("v");
        assert_eq!(
            cmds[0],
            Command::Vm {
                idx: 1,
                base_ns: 1_000_000,
                grant_ns: 1_000_000,
                weight: 30_000_000,
                name: "v".into(),
            }
        );
        assert_eq!(cmds.len(), 3);
    }
}
