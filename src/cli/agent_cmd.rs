//! `burst-qemu agent`: its flags, the one builder that turns them into the agent's settings and
//! enforcer (whichever enforcer runs), then the loop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use burst_qemu::agent::{self, Agent, AgentError, Settings};
use burst_qemu::balance::{mem, memory};
use burst_qemu::base::parse_cpu_list;
use burst_qemu::contention::SpareRule;
use burst_qemu::credit::{Rate, PPM_PER_CPU};
use burst_qemu::enforce::cgroup::{self, CgroupEnforcer, Version};
use burst_qemu::enforce::{scx, Enforcer};
use clap::ValueEnum;

use super::agent_args::{
    parse_capacity, AgentArgs, BalanceKind, CgroupVersionArg, ContentionRule, EnforcerKind,
};
use super::agent_config::{self, Layers, Resolved};
use super::{Failure, Global, EXIT_RUNNING};

fn usage(message: String) -> Failure {
    Failure::usage(anyhow::anyhow!(message))
}

/// A CPU list flag, parsed by the one CPU-list parser.
fn cpu_list(flag: &str, text: &str) -> Result<Vec<u32>, Failure> {
    parse_cpu_list(text).map_err(|e| usage(format!("{flag} {text:?}: {e}")))
}

/// The CPU capacity `--capacity` names (a number of CPUs, or a CPU list), or the CPUs this
/// process may run on.
pub(super) fn capacity(arg: Option<&str>) -> Result<Rate, Failure> {
    let Some(text) = arg else {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return Ok(Rate(n as u64 * PPM_PER_CPU));
    };
    parse_capacity(text).map_err(|e| usage(format!("--capacity {text:?}: {e}")))
}

/// The memory coordinator's settings from the flags (`None` for `--memory-policy off`).
fn memory_settings(a: &AgentArgs) -> Result<Option<memory::MemorySettings>, Failure> {
    let Some(policy) = a.memory_policy.policy() else {
        return Ok(None);
    };
    Ok(Some(memory::MemorySettings {
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

/// The pinning balancer's settings from `--balance`, `--balance-cpus`, `--balance-interval`.
fn balance_settings(a: &AgentArgs) -> Result<Option<(Vec<u32>, Duration)>, Failure> {
    if a.balance == BalanceKind::Off {
        return Ok(None);
    }
    let cpus = match a.balance_cpus.as_deref() {
        Some(text) => cpu_list("--balance-cpus", text)?,
        None => burst_qemu::procfs::own_cpus(),
    };
    // A CPU that is not online would fail every sched_setaffinity to it.
    if let Some(online) = burst_qemu::procfs::online_cpus() {
        let offline: Vec<u32> = cpus
            .iter()
            .copied()
            .filter(|c| !online.contains(c))
            .collect();
        if !offline.is_empty() {
            return Err(usage(format!(
                "--balance-cpus: CPU(s) {offline:?} are not online (online: {online:?})"
            )));
        }
    }
    Ok(Some((cpus, Duration::from_secs_f64(a.balance_interval))))
}

/// The enforcer `auto` picks: the cgroup enforcer when a setting only it applies is given
/// ([`cgroup_only`], said in the log), else sched_ext where this build has it and the kernel
/// offers it with no other BPF scheduler loaded (ours could not load beside it), else cgroup.
fn resolve_enforcer(a: &AgentArgs) -> EnforcerKind {
    match a.enforcer {
        EnforcerKind::Auto => {
            if let Some(setting) = cgroup_only(a) {
                tracing::info!(
                    "--enforcer auto: {} is applied by the cgroup enforcer only: using it",
                    setting.flag
                );
                EnforcerKind::Cgroup
            } else if scx::BUILT
                && scx::kernel_state()
                    .is_some_and(|(_, ops)| ops.is_empty() || ops == scx::OPS_NAME)
            {
                EnforcerKind::Scx
            } else {
                EnforcerKind::Cgroup
            }
        }
        k => k,
    }
}

/// The flags' contradictions, refused by name before anything starts.
fn refuse_contradictions(kind: EnforcerKind, a: &AgentArgs) -> Result<(), Failure> {
    if kind == EnforcerKind::Scx && !scx::BUILT {
        return Err(usage(
            "--enforcer scx: this burst-qemu was built without the `scx` feature \
             (cargo build --features scx; needs clang-19)"
                .into(),
        ));
    }
    let (enforcer, what, cpus) = match kind {
        EnforcerKind::Scx => ("scx", "the sched_ext scheduler", "--scx-cpus"),
        EnforcerKind::Ghost => ("ghost", "the ghOSt agent", "--ghost-cpus"),
        EnforcerKind::Cgroup | EnforcerKind::Auto => return Ok(()),
    };
    match cgroup_only(a) {
        Some(setting) => Err(usage(format!(
            "{}: with --enforcer {enforcer}, {what} {}: use --enforcer cgroup for it{}",
            setting.flag,
            setting.why,
            match setting.kind {
                CgroupOnly::Rule => ", or --contention headroom or baseline".to_owned(),
                CgroupOnly::Capacity => format!(", or give {what} its CPUs with {cpus}"),
                CgroupOnly::Pinning => String::new(),
            }
        ))),
        None => Ok(()),
    }
}

/// A setting only the cgroup enforcer applies: its flag as given, and why the others cannot.
struct CgroupOnlySetting {
    flag: String,
    why: &'static str,
    kind: CgroupOnly,
}

enum CgroupOnly {
    Rule,
    Capacity,
    Pinning,
}

/// The first setting of `a` that only the cgroup enforcer applies. The cgroup enforcer takes
/// the contention stage's plan as quotas and weights, for every rule and capacity. The
/// sched_ext program and the ghOSt scheduler decide every dispatch themselves, over the CPUs
/// they are given, by the numbers the planner gives each VM (`contention::Entitlement`: cap,
/// guarantee, weight for the spare), so they honour the history-free rules (`headroom`,
/// `baseline`). ResCoin's weight is the stage's 9-period history and changes every period
/// with what the VMs ran, and `off` leaves the split to the kernel's fair class: neither is
/// what their dispatch could run. A capacity of its own would be silently not what runs; and
/// they place the threads themselves, so pinning is not theirs.
fn cgroup_only(a: &AgentArgs) -> Option<CgroupOnlySetting> {
    let why = match a.contention {
        ContentionRule::Headroom | ContentionRule::Baseline => None,
        ContentionRule::Rescoin => Some(
            "guarantees every baseline and splits the spare by the weights the planner gives \
             it at each change, and ResCoin's weights are a history of every period that only \
             the cgroup enforcer's contention stage keeps",
        ),
        ContentionRule::Off => Some(
            "always guarantees every baseline and splits the spare by a rule in its own \
             dispatch; off leaves the split to the kernel's fair class, which only the cgroup \
             enforcer runs",
        ),
    };
    if let Some(why) = why {
        let name = a
            .contention
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned());
        return Some(CgroupOnlySetting {
            flag: format!("--contention {name}"),
            why,
            kind: CgroupOnly::Rule,
        });
    }
    if let Some(capacity) = &a.capacity {
        return Some(CgroupOnlySetting {
            flag: format!("--capacity {capacity}"),
            why: "shares out the CPUs it runs the VMs on, which are its capacity",
            kind: CgroupOnly::Capacity,
        });
    }
    if a.balance == BalanceKind::Cpu {
        return Some(CgroupOnlySetting {
            flag: "--balance cpu".into(),
            why: "places the vCPU threads itself, and --balance cpu pins them",
            kind: CgroupOnly::Pinning,
        });
    }
    None
}

/// The cgroup hierarchy to use: `--cgroup-mount` (its version given or read from the mount),
/// or the host's.
fn cgroup_hierarchy(a: &AgentArgs) -> Result<(Version, PathBuf), Failure> {
    match (&a.cgroup_mount, a.cgroup_version) {
        (Some(m), Some(CgroupVersionArg::V2)) => Ok((Version::V2, m.clone())),
        (Some(m), Some(CgroupVersionArg::V1)) => Ok((Version::V1, m.clone())),
        (Some(m), None) => {
            let v = if m.join("cgroup.controllers").exists() {
                Version::V2
            } else {
                Version::V1
            };
            Ok((v, m.clone()))
        }
        (None, _) => cgroup::detect_host().ok_or_else(|| {
            Failure::host(anyhow::anyhow!(
                "no cgroup hierarchy with the cpu controller is mounted (run burst-qemu check for the fix)"
            ))
        }),
    }
}

/// The cgroup under which the agent makes its own: `--cgroup-parent`, checked.
fn cgroup_parent(a: &AgentArgs, mount: &Path) -> Result<PathBuf, Failure> {
    match a.cgroup_parent.as_deref() {
        None => Ok(mount.to_owned()),
        Some("self") => CgroupEnforcer::own_cgroup(mount).ok_or_else(|| {
            usage(
                "--cgroup-parent self: this process has no cgroup v2 path in /proc/self/cgroup"
                    .into(),
            )
        }),
        Some(p) => {
            let p = Path::new(p);
            let p = if p.is_absolute() {
                p.to_owned()
            } else {
                mount.join(p)
            };
            if !p.starts_with(mount) || !p.is_dir() {
                return Err(usage(format!(
                    "--cgroup-parent {}: not a cgroup under {}",
                    p.display(),
                    mount.display()
                )));
            }
            Ok(p)
        }
    }
}

/// The cgroup enforcer (alone, or as the sched_ext scheduler's backstop).
fn cgroup_enforcer(a: &AgentArgs, state_dir: &Path) -> Result<CgroupEnforcer, Failure> {
    let (version, mount) = cgroup_hierarchy(a)?;
    let parent = cgroup_parent(a, &mount)?;
    CgroupEnforcer::with_parent(version, &mount, &parent, &cgroup::instance_name(state_dir))
        .context("setting up cgroup CPU bandwidth (run burst-qemu check)")
        .map_err(Failure::host)
}

/// The enforcer the flags ask for, started.
fn enforcer(
    kind: EnforcerKind,
    a: &AgentArgs,
    state_dir: &Path,
) -> Result<Box<dyn Enforcer>, Failure> {
    match kind {
        EnforcerKind::Ghost => {
            let root = PathBuf::from(
                std::env::var_os("BURST_QEMU_GHOST_ROOT")
                    .unwrap_or_else(|| burst_qemu::ghost::DEFAULT_ROOT.into()),
            );
            let cpus = match a.ghost_cpus.as_deref() {
                Some(text) => cpu_list("--ghost-cpus", text)?,
                None => {
                    let all = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
                    (0..all).collect()
                }
            };
            let e = burst_qemu::enforce::ghost::GhostEnforcer::start(&root, &cpus)
                .context("starting the ghOSt agent (run burst-qemu check)")
                .map_err(Failure::host)?;
            Ok(Box::new(e))
        }
        EnforcerKind::Scx => {
            let cpus = a
                .scx_cpus
                .as_deref()
                .map(|l| cpu_list("--scx-cpus", l))
                .transpose()?;
            let exe = std::env::current_exe().map_err(Failure::host)?;
            let dispatch = match a.scx_dispatch.as_str() {
                "user" => scx::Dispatch::User,
                _ => scx::Dispatch::Bpf,
            };
            let backstop = cgroup_enforcer(a, state_dir)?;
            let e = scx::ScxEnforcer::start(backstop, &exe, cpus, dispatch, state_dir)
                .context("starting the sched_ext scheduler (run burst-qemu check)")
                .map_err(Failure::host)?;
            tracing::info!("enforcer: {}", e.describe());
            Ok(Box::new(e))
        }
        EnforcerKind::Cgroup | EnforcerKind::Auto => Ok(Box::new(cgroup_enforcer(a, state_dir)?)),
    }
}

/// The libvirt watcher's settings (`None` without `--libvirt`).
fn libvirt_settings(g: &Global, a: &AgentArgs) -> Result<Option<agent::LibvirtSettings>, Failure> {
    let Some(uri) = a.libvirt.clone() else {
        return Ok(None);
    };
    if !cfg!(feature = "libvirt") {
        return Err(usage(format!(
            "--libvirt {uri}: this burst-qemu was built without the `libvirt` feature (cargo build --features libvirt; needs libvirt-dev)"
        )));
    }
    let run_dir = match (&a.libvirt_run_dir, uri.as_str()) {
        (Some(d), _) => d.clone(),
        (None, "qemu:///system") => {
            PathBuf::from(burst_qemu::source::libvirt::status::SYSTEM_RUN_DIR)
        }
        (None, "qemu:///session") => match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) => PathBuf::from(d).join("libvirt/qemu/run"),
            None => {
                return Err(usage(
                    "--libvirt qemu:///session: XDG_RUNTIME_DIR is unset; give --libvirt-run-dir"
                        .into(),
                ))
            }
        },
        (None, other) => {
            return Err(usage(format!(
                "--libvirt {other}: the agent reads libvirt's status files on the domains' own host: give --libvirt-run-dir (where that libvirtd keeps NAME.xml of running domains)"
            )))
        }
    };
    Ok(Some(agent::LibvirtSettings {
        uri,
        run_dir,
        vms_dir: burst_qemu::state::absolute(&g.vms),
        domains: a.libvirt_domains.clone(),
    }))
}

/// The contention stage's spare rule for `--contention` (`None`: the stage is off).
fn spare_rule(rule: ContentionRule) -> Option<SpareRule> {
    match rule {
        ContentionRule::Headroom => Some(SpareRule::Headroom),
        ContentionRule::Baseline => Some(SpareRule::Baseline),
        ContentionRule::Rescoin => Some(SpareRule::Rescoin),
        ContentionRule::Off => None,
    }
}

/// The agent's settings from the flags, for whichever enforcer runs.
fn settings(g: &Global, a: &AgentArgs, kind: EnforcerKind) -> Result<Settings, Failure> {
    // The sched_ext scheduler and the ghOSt agent guarantee baselines and split the spare
    // themselves, by each VM's entitlement under the rule (`settings.spare_rule`); ResCoin's
    // rule, `off` and a capacity are refused (`cgroup_only`).
    let contention = match (spare_rule(a.contention), kind) {
        (None, _) | (_, EnforcerKind::Scx | EnforcerKind::Ghost) => None,
        (Some(_), _) => Some(capacity(a.capacity.as_deref())?),
    };
    Ok(Settings {
        state_dir: g.state_dir(),
        data_dir: g.data_dir(),
        idle_exit: a.idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
        metrics_listen: a.metrics_listen,
        disk_bandwidth: a
            .disk_bandwidth
            .filter(|_| a.contention != ContentionRule::Off),
        memory: memory_settings(a)?,
        libvirt: libvirt_settings(g, a)?,
        contention,
        spare_rule: spare_rule(a.contention).unwrap_or_default(),
        proc: burst_qemu::procfs::Proc::host().clone(),
        balance: if kind == EnforcerKind::Cgroup {
            balance_settings(a)?
        } else {
            None
        },
    })
}

/// `burst-qemu agent`, from its command line `argv` (flags, then the environment, then the
/// config file, then the defaults: [`agent_config`]).
pub(super) fn run_agent(argv: Vec<std::ffi::OsString>) -> Result<(), Failure> {
    let layers = Layers::new(argv)?;
    let file = layers.read().map_err(Failure::usage)?;
    let resolved = layers.resolve(file.as_ref())?;
    let (g, a) = (&resolved.global, &resolved.args);
    let state_dir = g.state_dir();
    let locked = if a.take_over {
        super::takeover::lock(&state_dir)
    } else {
        agent::lock(&state_dir)
    };
    let _lock = match locked {
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
    let kind = resolve_enforcer(a);
    refuse_contradictions(kind, a).map_err(|f| resolved.blame(f))?;
    let in_force = settings(g, a, kind).map_err(|f| resolved.blame(f))?;
    let enforcer = enforcer(kind, a, &state_dir).map_err(|f| resolved.blame(f))?;
    let mut agent = Agent::new(in_force, enforcer);
    // Edits are watched where the file's directory exists (a file created later in a new
    // directory needs a restart).
    if layers.path().parent().is_some_and(Path::is_dir) {
        // An edit that asks this enforcer for what it cannot apply is refused like the flag.
        let build = move |r: &Resolved| {
            refuse_contradictions(kind, &r.args)?;
            settings(&r.global, &r.args, kind)
        };
        agent = agent.with_reload(agent_config::reloader(layers, file, &resolved, build));
    }
    agent.run().map_err(Failure::host)
}

/// `burst-qemu scx-scheduler`: the sched_ext scheduler process the scx enforcer starts.
pub(super) fn run_scx_scheduler(
    stats: Option<&Path>,
    dispatch: &str,
    cpus: Option<&str>,
) -> Result<(), Failure> {
    #[cfg(feature = "scx")]
    {
        let cpus = cpus.map(|l| cpu_list("--cpus", l)).transpose()?;
        scx::loader::run(stats, dispatch == "user", cpus).map_err(Failure::host)
    }
    #[cfg(not(feature = "scx"))]
    {
        let _ = (stats, dispatch, cpus);
        Err(usage(
            "built without the `scx` feature (cargo build --features scx)".into(),
        ))
    }
}

#[cfg(test)]
#[path = "agent_cmd_tests.rs"]
mod tests;
