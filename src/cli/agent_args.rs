//! `burst-qemu agent`'s flags (clap) and their value parsers; the configuration file
//! ([`super::agent_config`]) and the builder ([`super::agent_cmd`]) both read them.

use std::path::PathBuf;

use burst_qemu::balance::{disk, mem};
use burst_qemu::base::parse_cpu_list;
use burst_qemu::credit::{Rate, PPM_PER_CPU};
use clap::{Args, ValueEnum};

/// How grants are enforced (`--enforcer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum EnforcerKind {
    /// sched_ext where it can run, else cgroup.
    Auto,
    /// cgroup CPU bandwidth (v1 or v2).
    Cgroup,
    /// burst-qemu's sched_ext scheduler, cgroup quotas as a backstop.
    Scx,
    /// The centralized ghOSt agent.
    Ghost,
}

/// How the CPU is divided when the host is contended (`--contention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum ContentionRule {
    /// Every VM first gets its baseline; the rest in proportion to grant − baseline (the
    /// burst its credits buy).
    Headroom,
    /// Every VM first gets its baseline; the rest in proportion to the baselines.
    Baseline,
    /// Every VM first gets its baseline; the rest by ResCoin's rule (|credit accumulated over
    /// 9 periods|: depends on history).
    Rescoin,
    /// Each VM is capped by its credits alone.
    Off,
}

/// The pinning balancer (`--balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum BalanceKind {
    /// Pin every vCPU thread to one CPU, balancing demand.
    Cpu,
    /// Never pin.
    Off,
}

/// The memory coordinator's policy (`--memory-policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum MemoryPolicyArg {
    /// The published coordinator's rules.
    Thresholds,
    /// Shares with an idle-memory tax.
    IdleTax,
    /// ResCoin's rule, templates by `memory_shares`.
    Rescoin,
    /// Memory is not balanced.
    Off,
}

impl MemoryPolicyArg {
    pub(super) fn policy(self) -> Option<mem::Policy> {
        match self {
            MemoryPolicyArg::Thresholds => Some(mem::Policy::Thresholds),
            MemoryPolicyArg::IdleTax => Some(mem::Policy::IdleTax),
            MemoryPolicyArg::Rescoin => Some(mem::Policy::Rescoin),
            MemoryPolicyArg::Off => None,
        }
    }
}

/// The cgroup version at `--cgroup-mount`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum CgroupVersionArg {
    /// cgroup v1 (`cpu.cfs_quota_us`).
    V1,
    /// cgroup v2 (`cpu.max`).
    V2,
}

#[derive(Clone, Debug, Args)]
pub(super) struct AgentArgs {
    #[command(flatten)]
    pub(super) config: ConfigArg,
    /// Mount point of the cgroup hierarchy with the cpu controller [default: detected].
    #[arg(long, value_name = "DIR", env = "BURST_QEMU_CGROUP_MOUNT")]
    pub(super) cgroup_mount: Option<PathBuf>,
    /// The cgroup under which the agent makes its own (`PARENT/burst-qemu/INSTANCE/NAME`): a
    /// path under the mount, or `self` for the agent's own cgroup (a systemd unit with
    /// Delegate=yes; see contrib/burst-qemu-agent.service) [default: the mount's root].
    #[arg(long, value_name = "DIR|self", env = "BURST_QEMU_CGROUP_PARENT")]
    pub(super) cgroup_parent: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464) [default: off].
    #[arg(long, value_name = "ADDR", env = "BURST_QEMU_METRICS_LISTEN")]
    pub(super) metrics_listen: Option<std::net::SocketAddr>,
    /// How grants are enforced: cgroup CPU bandwidth; burst-qemu's sched_ext scheduler
    /// scheduling the vCPU threads from per-VM budgets, cgroup quotas kept as a backstop (needs
    /// Linux 6.12+ with sched_ext and a build with the `scx` feature); or the centralized ghOSt
    /// agent (needs a ghOSt kernel, ABI 91). `auto`: scx where it can run, else cgroup.
    #[arg(
        long,
        value_enum,
        value_name = "auto|cgroup|scx|ghost",
        default_value = "auto",
        env = "BURST_QEMU_ENFORCER"
    )]
    pub(super) enforcer: EnforcerKind,
    /// With --enforcer scx: the CPUs the vCPU threads run on, as a list (`0-3,6`; keep other
    /// busy threads off them: on 6.12 the normal scheduler runs before sched_ext) [default:
    /// all].
    #[arg(long, value_name = "LIST", env = "BURST_QEMU_SCX_CPUS", value_parser = cpu_list_text)]
    pub(super) scx_cpus: Option<String>,
    /// With --enforcer scx: who decides each dispatch of a vCPU thread. `bpf`: the BPF
    /// program, from the budgets the agent gives it. `user`: the scheduler process, by the
    /// same policy as the ghOSt agent's (src/sched), decision by decision, the program only
    /// carrying them out (sched_ext's user-space scheduling, as ghOSt does it).
    #[arg(
        long,
        value_name = "bpf|user",
        default_value = "bpf",
        value_parser = ["bpf", "user"],
        env = "BURST_QEMU_SCX_DISPATCH"
    )]
    pub(super) scx_dispatch: String,
    /// CPUs of the ghOSt enclave, as a list (`0-3,6`); the first runs the global agent
    /// [default: all].
    #[arg(long, value_name = "LIST", env = "BURST_QEMU_GHOST_CPUS", value_parser = cpu_list_text)]
    pub(super) ghost_cpus: Option<String>,
    /// The cgroup version at --cgroup-mount [default: detected from the mount].
    #[arg(
        long,
        value_enum,
        value_name = "v1|v2",
        env = "BURST_QEMU_CGROUP_VERSION"
    )]
    pub(super) cgroup_version: Option<CgroupVersionArg>,
    /// Exit quietly if an agent already runs for the state dir.
    #[arg(long, hide = true)]
    pub(super) if_absent: bool,
    /// Stop an agent that a launcher started for the state dir and take its place (the
    /// service's agent: see `takeover`).
    #[arg(long, hide = true)]
    pub(super) take_over: bool,
    /// Exit after this many seconds without VMs.
    #[arg(long, value_name = "SECONDS", value_parser = seconds(0.0, f64::MAX))]
    pub(super) idle_exit: Option<f64>,
    /// How the CPU is divided when the VMs together want more than the host has: every VM
    /// first gets its baseline, and the spare goes by `headroom` (in proportion to grant −
    /// baseline, the burst each VM's credits buy), `baseline` (in proportion to the baselines)
    /// or `rescoin` (ResCoin's rule: by the credit each VM accumulated over the last 9 s, so
    /// the split depends on history); `off`: each VM is capped by its credits alone, and the
    /// kernel splits the rest evenly. The sched_ext and ghOSt enforcers dispatch by the
    /// planner's weights and accept `headroom` and `baseline` (docs/contention.md).
    #[arg(
        long,
        value_enum,
        value_name = "headroom|baseline|rescoin|off",
        default_value = "headroom",
        env = "BURST_QEMU_CONTENTION"
    )]
    pub(super) contention: ContentionRule,
    /// The CPU the VMs share, for the contention stage: a number of CPUs (`2`, `1.5`) or a CPU
    /// list (`0-3,6`) [default: every CPU this agent may run on].
    #[arg(long, value_name = "CPUS", env = "BURST_QEMU_CAPACITY", value_parser = capacity_text)]
    pub(super) capacity: Option<String>,
    /// The host's disk bandwidth, bytes/s (`100M`, `1Gi`; `READ,WRITE` when they differ),
    /// shared by ResCoin's rule among the VMs whose config sets `disk_share`: while they
    /// together read (or write) more, each VM's drives are throttled to its allocation
    /// through QMP [default: disks are not managed].
    #[arg(long, value_name = "BYTES/S[,BYTES/S]", env = "BURST_QEMU_DISK_BANDWIDTH",
          value_parser = disk::parse_bandwidth)]
    pub(super) disk_bandwidth: Option<disk::DiskBandwidth>,
    /// `cpu`: run the vCPU pinning balancer, which pins every vCPU thread to one CPU so that
    /// the CPUs carry equal demand, and re-pins only when that is off by more than 5 % and a
    /// new plan is clearly better (docs/pinning.md); `off`: never pin.
    #[arg(
        long,
        value_enum,
        value_name = "cpu|off",
        default_value = "off",
        env = "BURST_QEMU_BALANCE"
    )]
    pub(super) balance: BalanceKind,
    /// The CPUs the pinning balancer uses, as a list (`0-3,6`) [default: every CPU this agent
    /// may run on].
    #[arg(long, value_name = "LIST", env = "BURST_QEMU_BALANCE_CPUS", value_parser = cpu_list_text)]
    pub(super) balance_cpus: Option<String>,
    /// Seconds between the pinning balancer's plans.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 2.0,
        env = "BURST_QEMU_BALANCE_INTERVAL",
        value_parser = seconds(0.2, f64::MAX)
    )]
    pub(super) balance_interval: f64,
    /// The balloon memory coordinator, for VMs whose config says `balance_memory = true`:
    /// `thresholds` (the published coordinator rules), `idle-tax` (shares with an idle-memory
    /// tax), `rescoin` (ResCoin's rule, templates by `memory_shares`, as for CPU and disk) or
    /// `off`.
    #[arg(
        long,
        value_enum,
        value_name = "thresholds|idle-tax|rescoin|off",
        default_value = "thresholds",
        env = "BURST_QEMU_MEMORY_POLICY"
    )]
    pub(super) memory_policy: MemoryPolicyArg,
    /// Seconds between memory coordinator rounds (and the guests' stats polling interval).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 2.0,
        env = "BURST_QEMU_MEMORY_INTERVAL",
        value_parser = seconds(0.5, 3600.0)
    )]
    pub(super) memory_interval: f64,
    /// The idle-memory tax rate, percent (idle-tax policy).
    #[arg(
        long,
        value_name = "PCT",
        default_value_t = 75.0,
        env = "BURST_QEMU_IDLE_TAX",
        value_parser = idle_tax_pct
    )]
    pub(super) idle_tax: f64,
    /// Host memory (MemAvailable) the coordinator never gives to VMs, MiB.
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 200,
        env = "BURST_QEMU_HOST_RESERVE"
    )]
    pub(super) host_reserve: u64,
    /// A cap on the memory all balanced VMs hold together, MiB [default: only the host limits].
    #[arg(long, value_name = "MIB", env = "BURST_QEMU_MEMORY_POOL")]
    pub(super) memory_pool: Option<u64>,
    /// Append each coordinator round (planner input and output) as a JSON line to FILE.
    #[arg(long, value_name = "FILE", env = "BURST_QEMU_MEMORY_TRACE")]
    pub(super) memory_trace: Option<PathBuf>,
    /// Watch the domains of this libvirt connection [URI default: qemu:///system]: those that
    /// opt in (a vms/NAME.toml, or burst-qemu's <config> element in the domain's <metadata>)
    /// join the fleet (docs/libvirt.md). Needs a build with the `libvirt`
    /// feature [default: libvirt is not watched].
    #[arg(
        long,
        value_name = "URI",
        num_args = 0..=1,
        default_missing_value = "qemu:///system",
        env = "BURST_QEMU_LIBVIRT"
    )]
    pub(super) libvirt: Option<String>,
    /// With --libvirt: only domains whose name matches this pattern (`*` matches any run of
    /// characters: `web-*`), e.g. to split one host's domains between agents [default: all].
    #[arg(long, value_name = "PATTERN", env = "BURST_QEMU_LIBVIRT_DOMAINS")]
    pub(super) libvirt_domains: Option<String>,
    /// With --libvirt: libvirt's run dir of QEMU domains, where its status files are
    /// [default: /run/libvirt/qemu for qemu:///system, $XDG_RUNTIME_DIR/libvirt/qemu/run for
    /// qemu:///session; required for other URIs].
    #[arg(long, value_name = "DIR", env = "BURST_QEMU_LIBVIRT_RUN_DIR")]
    pub(super) libvirt_run_dir: Option<PathBuf>,
}

/// `--capacity`'s value parser: the text, once [`parse_capacity`] reads it.
fn capacity_text(text: &str) -> Result<String, String> {
    parse_capacity(text).map(|_| text.to_owned())
}

/// A CPU list's value parser (`0-3,6`): the text, once it parses.
pub(super) fn cpu_list_text(text: &str) -> Result<String, String> {
    parse_cpu_list(text).map(|_| text.to_owned())
}

/// A value parser of seconds in `[min, max]`.
fn seconds(min: f64, max: f64) -> impl Fn(&str) -> Result<f64, String> + Clone {
    move |text| match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (min..=max).contains(&s) => Ok(s),
        _ if max == f64::MAX => Err(format!("give a number of seconds ≥ {min}")),
        _ => Err(format!("give {min} to {max} seconds")),
    }
}

/// `--idle-tax`'s value parser: a percentage from 0 to 95.
fn idle_tax_pct(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=95.0).contains(&p) => Ok(p),
        _ => Err("give a percentage from 0 to 95".into()),
    }
}

/// The agent's `--help` epilogue (and its man page's): the configuration file.
pub(super) const CONFIG_HELP: &str = "\
Configuration file: every long option above is also a key of /etc/burst-qemu/agent.toml \
(root's; other users' is $XDG_CONFIG_HOME/burst-qemu/agent.toml; --config FILE or \
BURST_QEMU_AGENT_CONFIG name another), spelled with _ for - \
(memory_interval = 5, balance_cpus = \"0-3\" or [0, 1, 2, 3]), as are state_dir and data_dir. \
A flag wins over its environment variable, which wins over the file, which wins over the \
built-in default; `burst-qemu check` shows each setting in force and where it comes from. \
A missing file at the default path means the defaults; a missing file named explicitly, an \
unknown key or a bad value is an error naming the file, line and key.

While the agent runs, an edit of the file applies at once to capacity, contention (between \
rules; to or from off needs a restart), disk_bandwidth (its value), balance_interval, memory_interval, idle_tax, host_reserve, memory_pool, memory_trace \
and idle_exit; a change of any other key is logged as needing a restart and the value in \
force stays.";

/// A number of CPUs (`2`, `1.5`) or a CPU list (`0-3,6`).
pub(super) fn parse_capacity(text: &str) -> Result<Rate, String> {
    if let Ok(cpus) = text.trim().parse::<f64>() {
        if cpus.is_finite() && cpus > 0.0 && !text.contains('-') {
            return Ok(Rate((cpus * PPM_PER_CPU as f64).round() as u64));
        }
    }
    let cpus = parse_cpu_list(text)
        .map_err(|e| format!("give a number of CPUs (2, 1.5) or a CPU list (0-3,6): {e}"))?;
    Ok(Rate(cpus.len() as u64 * PPM_PER_CPU))
}

/// `--config FILE`.
#[derive(Clone, Debug, Args)]
pub(super) struct ConfigArg {
    /// The agent's configuration file: each long option is a key with `_` for `-`
    /// (`memory_interval = 5`); flags and BURST_QEMU_* variables override it [default:
    /// /etc/burst-qemu/agent.toml as root, else $XDG_CONFIG_HOME/burst-qemu/agent.toml;
    /// built-in defaults when that file does not exist].
    #[arg(long = "config", value_name = "FILE", env = "BURST_QEMU_AGENT_CONFIG")]
    pub(super) config: Option<PathBuf>,
}
