//! `burst-qemu agent`: the enforcer and the contention stage from the flags, then the loop.

use std::time::Duration;

use anyhow::Context;
use burst_qemu::agent::{self, Agent, AgentError, Settings};
use burst_qemu::enforce::cgroup::{self, CgroupEnforcer, Version};
use burst_qemu::enforce::scx;

use super::*;

/// The CPU capacity `--capacity` names, or the CPUs this process may run on.
pub(super) fn capacity(arg: Option<&str>) -> Result<burst_qemu::credit::Rate, Failure> {
    use burst_qemu::credit::{Rate, PPM_PER_CPU};
    let Some(text) = arg else {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return Ok(Rate(n as u64 * PPM_PER_CPU));
    };
    let bad = || {
        Failure::usage(anyhow::anyhow!(
            "--capacity {text:?}: give a number of CPUs (2, 1.5) or a CPU list (0-3,6)"
        ))
    };
    if let Ok(cpus) = text.parse::<f64>() {
        if cpus.is_finite() && cpus > 0.0 && !text.contains('-') {
            return Ok(Rate((cpus * PPM_PER_CPU as f64).round() as u64));
        }
    }
    let mut count = 0u64;
    for part in text.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u64, u64) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if b < a {
            return Err(bad());
        }
        count += b - a + 1;
    }
    Ok(Rate(count * PPM_PER_CPU))
}

/// The memory coordinator's settings from the flags (`None` for `--memory-policy off`).
fn memory_settings(a: &AgentArgs) -> Result<Option<agent::memory::MemorySettings>, Failure> {
    use burst_qemu::balance::mem;
    if a.memory_policy == "off" {
        return Ok(None);
    }
    let bad = |what: String| Failure::usage(anyhow::anyhow!(what));
    let policy: mem::Policy = a.memory_policy.parse().map_err(bad)?;
    if !(0.0..=95.0).contains(&a.idle_tax) {
        return Err(bad(format!(
            "--idle-tax {}: give a percentage from 0 to 95",
            a.idle_tax
        )));
    }
    if !(a.memory_interval >= 0.5 && a.memory_interval <= 3600.0) {
        return Err(bad(format!(
            "--memory-interval {}: give 0.5 to 3600 seconds",
            a.memory_interval
        )));
    }
    Ok(Some(agent::memory::MemorySettings {
        planner: mem::Settings {
            policy,
            tax: a.idle_tax / 100.0,
            host_reserve: a.host_reserve,
            pool: a.memory_pool,
            ..mem::Settings::default()
        },
        interval: Duration::from_secs_f64(a.memory_interval),
        meminfo: "/proc/meminfo".into(),
        trace: a.memory_trace.clone(),
    }))
}

pub(super) fn run_agent(g: &Global, a: AgentArgs) -> Result<(), Failure> {
    let state_dir = g.state_dir();
    let _lock = match agent::lock(&state_dir) {
        Ok(l) => l,
        Err(AgentError::AlreadyRunning(_)) if a.if_absent => return Ok(()),
        Err(e @ AgentError::AlreadyRunning(_)) => {
            return Err(Failure {
                code: EXIT_RUNNING,
                error: e.into(),
            })
        }
        Err(e) => return Err(Failure::host(e)),
    };
    if a.enforcer == "ghost" {
        if a.balance == "cpu" {
            return Err(Failure::usage(anyhow::anyhow!(
                "--balance cpu pins vCPU threads, which the ghOSt agent schedules itself: use it with --enforcer cgroup"
            )));
        }
        return run_ghost_agent(g, a, state_dir);
    }
    let scx = match a.enforcer.as_str() {
        "scx" => true,
        // Not when another BPF scheduler holds sched_ext: ours could not load.
        "auto" => {
            scx::BUILT
                && scx::kernel_state()
                    .is_some_and(|(_, ops)| ops.is_empty() || ops == scx::OPS_NAME)
        }
        _ => false,
    };
    if scx && !scx::BUILT {
        return Err(Failure::usage(anyhow::anyhow!(
            "--enforcer scx: this burst-qemu was built without the `scx` feature \
             (cargo build --features scx; needs clang-19)"
        )));
    }
    if scx && a.balance == "cpu" {
        return Err(Failure::usage(anyhow::anyhow!(
            "--balance cpu pins vCPU threads, which the sched_ext scheduler places itself: use it with --enforcer cgroup"
        )));
    }
    let balance = balance_settings(&a)?;
    let (version, mount) = match (&a.cgroup_mount, a.cgroup_version.as_deref()) {
        (Some(m), Some("v2")) => (Version::V2, m.clone()),
        (Some(m), Some(_)) => (Version::V1, m.clone()),
        (Some(m), None) => {
            let v = if m.join("cgroup.controllers").exists() { Version::V2 } else { Version::V1 };
            (v, m.clone())
        }
        (None, _) => cgroup::detect_host().ok_or_else(|| {
            Failure::host(anyhow::anyhow!(
                "no cgroup hierarchy with the cpu controller is mounted (run burst-qemu check for the fix)"
            ))
        })?,
    };
    let parent = match a.cgroup_parent.as_deref() {
        None => mount.clone(),
        Some("self") => CgroupEnforcer::own_cgroup(&mount).ok_or_else(|| {
            Failure::usage(anyhow::anyhow!(
                "--cgroup-parent self: this process has no cgroup v2 path in /proc/self/cgroup"
            ))
        })?,
        Some(p) => {
            let p = std::path::Path::new(p);
            let p = if p.is_absolute() {
                p.to_owned()
            } else {
                mount.join(p)
            };
            if !p.starts_with(&mount) || !p.is_dir() {
                return Err(Failure::usage(anyhow::anyhow!(
                    "--cgroup-parent {}: not a cgroup under {}",
                    p.display(),
                    mount.display()
                )));
            }
            p
        }
    };
    let enforcer =
        CgroupEnforcer::with_parent(version, &mount, &parent, &cgroup::instance_name(&state_dir))
            .context("setting up cgroup CPU bandwidth (run burst-qemu check)")
            .map_err(Failure::host)?;
    let settings = Settings {
        state_dir,
        data_dir: g.data_dir(),
        idle_exit: a.idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
        metrics_listen: a.metrics_listen,
        disk_bandwidth: a.disk_bandwidth.filter(|_| a.contention != "off"),
        memory: memory_settings(&a)?,
        // The sched_ext scheduler guarantees baselines and splits the spare itself.
        contention: if a.contention == "off" || scx {
            None
        } else {
            Some(capacity(a.capacity.as_deref())?)
        },
        balance,
    };
    if scx {
        let cpus = a
            .scx_cpus
            .as_deref()
            .map(|l| {
                burst_qemu::balance::pin::parse_cpu_list(l)
                    .map_err(|e| Failure::usage(anyhow::anyhow!("--scx-cpus {l:?}: {e}")))
            })
            .transpose()?;
        let exe = std::env::current_exe().map_err(Failure::host)?;
        let enforcer = scx::ScxEnforcer::start(enforcer, &exe, cpus, &settings.state_dir)
            .context("starting the sched_ext scheduler (run burst-qemu check)")
            .map_err(Failure::host)?;
        tracing::info!(
            "enforcer: {}",
            burst_qemu::enforce::Enforcer::describe(&enforcer)
        );
        return Agent::new(settings, Box::new(enforcer))
            .run()
            .map_err(Failure::host);
    }
    Agent::new(settings, Box::new(enforcer))
        .run()
        .map_err(Failure::host)
}

/// The pinning balancer's settings from `--balance`, `--balance-cpus`, `--balance-interval`.
fn balance_settings(a: &AgentArgs) -> Result<Option<(Vec<u32>, Duration)>, Failure> {
    use burst_qemu::balance::pin;
    if a.balance != "cpu" {
        return Ok(None);
    }
    let cpus = match a.balance_cpus.as_deref() {
        Some(text) => pin::parse_cpu_list(text)
            .map_err(|e| Failure::usage(anyhow::anyhow!("--balance-cpus: {e}")))?,
        None => pin::own_cpus(),
    };
    // A CPU that is not online would fail every sched_setaffinity to it.
    if let Some(online) = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|t| pin::parse_cpu_list(t.trim()).ok())
    {
        let offline: Vec<u32> = cpus
            .iter()
            .copied()
            .filter(|c| !online.contains(c))
            .collect();
        if !offline.is_empty() {
            return Err(Failure::usage(anyhow::anyhow!(
                "--balance-cpus: CPU(s) {offline:?} are not online (online: {online:?})"
            )));
        }
    }
    let every = a.balance_interval;
    if !(every.is_finite() && every >= 0.2) {
        return Err(Failure::usage(anyhow::anyhow!(
            "--balance-interval must be a number of seconds ≥ 0.2"
        )));
    }
    Ok(Some((cpus, Duration::from_secs_f64(every))))
}

/// `burst-qemu scx-scheduler`: the sched_ext scheduler process the scx enforcer starts.
pub(super) fn run_scx_scheduler(stats: Option<&std::path::Path>) -> Result<(), Failure> {
    #[cfg(feature = "scx")]
    {
        scx::loader::run(stats).map_err(Failure::host)
    }
    #[cfg(not(feature = "scx"))]
    {
        let _ = stats;
        Err(Failure::usage(anyhow::anyhow!(
            "built without the `scx` feature (cargo build --features scx)"
        )))
    }
}

/// The agent with the centralized ghOSt agent as its enforcer. The scheduling policy
/// (`src/sched/`) guarantees baselines and shares the spare itself, so the cgroup contention
/// stage is off.
fn run_ghost_agent(g: &Global, a: AgentArgs, state_dir: std::path::PathBuf) -> Result<(), Failure> {
    let root = std::path::PathBuf::from(
        std::env::var_os("BURST_QEMU_GHOST_ROOT")
            .unwrap_or_else(|| burst_qemu::ghost::DEFAULT_ROOT.into()),
    );
    let all = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let cpus = a.ghost_cpus.clone().unwrap_or_else(|| (0..all).collect());
    let enforcer = burst_qemu::enforce::ghost::GhostEnforcer::start(&root, &cpus)
        .context("starting the ghOSt agent (run burst-qemu check)")
        .map_err(Failure::host)?;
    let settings = Settings {
        state_dir,
        data_dir: g.data_dir(),
        idle_exit: a.idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
        contention: None,
        metrics_listen: a.metrics_listen,
        disk_bandwidth: a.disk_bandwidth.filter(|_| a.contention != "off"),
        balance: None,
        memory: memory_settings(&a)?,
    };
    Agent::new(settings, Box::new(enforcer))
        .run()
        .map_err(Failure::host)
}
