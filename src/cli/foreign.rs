//! VMs burst-qemu did not start, on the command line: `adopt` (a QEMU started by anyone), and
//! the control of libvirt domains and adopted QEMUs by `ls`, `pause`, `resume` and `stop`
//! (through libvirt, or QMP when the adopted QEMU's socket is known).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use burst_qemu::control::{Control, Qmp};
use burst_qemu::procfs::Proc;
use burst_qemu::source::adopt::{self, Via};
use burst_qemu::state::{self, Source, VmRecord};

use super::agent_start::{ensure_agent, find_vm};
use super::*;

/// Take a QEMU that burst-qemu did not start (a script's, Proxmox's `qm`, Incus) into the
/// fleet: its vCPU threads are found (QMP when --qmp names a free socket, else the thread
/// names `CPU n/…` that `-name …,debug-threads=on` gives), and it is then listed, charged and
/// enforced like a VM whose launcher has gone; burst-qemu stops it only when asked
/// (`burst-qemu stop NAME`). A QEMU whose vCPU threads cannot be identified is refused.
#[derive(Debug, Args)]
pub(super) struct AdoptArgs {
    /// QEMU's pid.
    #[arg(long, value_name = "PID")]
    pid: u32,
    /// QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`), used to find the threads when
    /// free, and afterwards for `pause`, `resume`, `stop`, balloon and disk control.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// The VM's name [default: QEMU's -name, else qemu-PID].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Number of vCPUs (must be what QEMU runs) [default: vms/NAME.toml's, else QEMU's -smp].
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Baseline, percent per vCPU, in (0, 100] [default: vms/NAME.toml's].
    #[arg(long, value_name = "PCT", allow_negative_numbers = true)]
    baseline: Option<f64>,
    /// Launch credits when the VM has no ledger yet [default: 30 per vCPU].
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    credits: Option<f64>,
    /// `standard` or `unlimited` [default: standard].
    #[arg(long, value_parser = clap::value_parser!(burst_qemu::credit::Mode))]
    mode: Option<burst_qemu::credit::Mode>,
}

/// QEMU's command line, as its arguments.
fn cmdline(pid: u32) -> Option<Vec<OsString>> {
    use std::os::unix::ffi::OsStringExt;
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect(),
    )
}

pub(super) fn adopt_cmd(g: &Global, a: AdoptArgs) -> Result<(), Failure> {
    let state_dir = g.state_dir();
    if let Some((r, _)) = state::running(&state_dir)
        .into_iter()
        .find(|(r, _)| r.pid == a.pid)
    {
        return Err(Failure {
            code: EXIT_RUNNING,
            error: anyhow::anyhow!(
                "pid {} is already in the fleet as {} ({})",
                a.pid,
                r.name,
                r.source.label()
            ),
        });
    }
    let args = cmdline(a.pid).ok_or_else(|| Failure {
        code: EXIT_NO_SUCH_VM,
        error: anyhow::anyhow!("no process {}", a.pid),
    })?;
    let name = match &a.name {
        Some(n) => Some(n.clone()),
        None if args.iter().any(|x| x == "-name" || x == "--name") => None,
        None => Some(format!("qemu-{}", a.pid)),
    };
    let req = launch::Request {
        vms_dir: g.vms.clone(),
        state_dir: state_dir.clone(),
        name,
        vcpus: a.vcpus,
        baseline: a.baseline,
        credits: a.credits,
        mode: a.mode,
        force_config: false,
        shutdown_timeout: Duration::from_secs(30),
        qemu: args,
    };
    let (name, config_path, cfg, write) = launch::resolve_config(&req).map_err(|e| Failure {
        code: e.exit_code(),
        error: e.into(),
    })?;
    let vcpus = cfg.policy.vcpus();
    let qmp = a.qmp.as_deref().map(state::absolute);
    let found = adopt::find_vcpu_threads(Proc::host().root(), a.pid, qmp.as_deref(), vcpus)
        .map_err(|e| {
            Failure::usage(anyhow::Error::new(e).context(format!(
                "cannot adopt pid {}: its vCPU threads cannot be identified",
                a.pid
            )))
        })?;
    if write {
        burst_qemu::config::save(&config_path, &cfg)
            .with_context(|| format!("writing {}", config_path.display()))
            .map_err(Failure::host)?;
    }
    let record = VmRecord {
        name: name.clone(),
        pid: a.pid,
        wrapper_pid: 0,
        vcpus,
        baseline: cfg.policy.baseline().percent(),
        mode: cfg.policy.mode(),
        vcpu_tids: found.vcpu_tids.clone(),
        config: state::absolute(&config_path),
        qmp_socket: qmp.unwrap_or_default(),
        qemu_start: found.qemu_start,
        boot_id: Proc::host().boot_id(),
        source: Source::Adopted,
        agent_socket: None,
    };
    state::place_foreign(&state_dir, &record).map_err(|e| Failure {
        code: EXIT_RUNNING,
        error: e.into(),
    })?;
    if let Err(e) = ensure_agent(&state_dir, &g.data_dir()) {
        eprintln!(
            "burst-qemu: warning: cannot start the credit agent ({e:#}); credits are not enforced"
        );
    }
    let via = match &found.via {
        Via::Qmp => "its QMP socket".to_owned(),
        Via::ThreadNames { qmp_skipped: None } => "their names".to_owned(),
        Via::ThreadNames {
            qmp_skipped: Some(why),
        } => format!("their names ({why})"),
    };
    println!(
        "adopted {name} (QEMU pid {}, {vcpus} vCPUs at {} % baseline, vCPU threads {:?} found by {via}); stop it with burst-qemu stop {name}",
        a.pid,
        cfg.policy.baseline().percent(),
        found.vcpu_tids
    );
    Ok(())
}

/// A running VM's control handle, for the CLI.
pub(super) fn control_of(record: &VmRecord) -> Arc<dyn Control> {
    match &record.source {
        Source::Libvirt { uri, uuid, .. } => libvirt_control(record, uri, uuid),
        _ => Arc::new(Qmp::new(record)),
    }
}

#[cfg(feature = "libvirt")]
fn libvirt_control(record: &VmRecord, uri: &str, uuid: &str) -> Arc<dyn Control> {
    use burst_qemu::source::libvirt::control::{LibvirtControl, Pool};
    Arc::new(LibvirtControl::new(&record.name, uuid, Pool::new(uri)))
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_control(record: &VmRecord, uri: &str, _uuid: &str) -> Arc<dyn Control> {
    Arc::new(burst_qemu::control::Unavailable {
        name: record.name.clone(),
        why: format!("a libvirt domain of {uri}: this burst-qemu was built without the `libvirt` feature (virsh reaches it)"),
    })
}

/// The run states of the listed libvirt domains, read with one libvirt call per connection
/// (`virConnectGetAllDomainStats`, state group) for the whole fleet, rather than a connection,
/// a lookup and a `virDomainGetState` per domain.
#[derive(Debug, Default)]
pub(super) struct LibvirtStates {
    /// `(URI, lowercase UUID)` → libvirt's state name; a connection that failed has none.
    states: HashMap<(String, String), String>,
}

impl LibvirtStates {
    /// Asks each connection the libvirt VMs among `vms` belong to (none without them).
    pub(super) fn of<'a>(vms: impl IntoIterator<Item = &'a VmRecord>) -> LibvirtStates {
        let uris: BTreeSet<&str> = vms
            .into_iter()
            .filter_map(|vm| match &vm.source {
                Source::Libvirt { uri, .. } => Some(uri.as_str()),
                _ => None,
            })
            .collect();
        let mut states = HashMap::new();
        for uri in uris {
            match libvirt_states(uri) {
                Ok(found) => states.extend(
                    found
                        .into_iter()
                        .map(|(uuid, s)| ((uri.to_owned(), uuid.to_ascii_lowercase()), s)),
                ),
                Err(e) => tracing::debug!("{uri}: {e}"),
            }
        }
        LibvirtStates { states }
    }

    fn get(&self, uri: &str, uuid: &str) -> Option<&str> {
        self.states
            .get(&(uri.to_owned(), uuid.to_ascii_lowercase()))
            .map(String::as_str)
    }
}

/// Every domain of `uri` as `(UUID, state name)`: one connection, one call.
#[cfg(feature = "libvirt")]
fn libvirt_states(uri: &str) -> anyhow::Result<Vec<(String, String)>> {
    use burst_qemu::source::libvirt::conn::Connection;
    use burst_qemu::source::libvirt::control::state_name;
    let conn = Connection::open(uri)?;
    Ok(conn
        .states()?
        .into_iter()
        .map(|s| (s.uuid, state_name(s.state)))
        .collect())
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_states(uri: &str) -> anyhow::Result<Vec<(String, String)>> {
    anyhow::bail!("a libvirt domain of {uri}: this burst-qemu was built without the `libvirt` feature (virsh reaches it)")
}

/// A running VM's state for `ls`: `running`, `paused`, … or `unknown` when it cannot be asked
/// (a libvirt domain's from `libvirt`, asked beforehand for the whole fleet).
pub(super) fn run_state(record: &VmRecord, libvirt: &LibvirtStates) -> String {
    if record.source == Source::Adopted && record.qmp_socket.as_os_str().is_empty() {
        // No monitor to ask: it runs as long as its process does.
        return "running".into();
    }
    if let Source::Libvirt { uri, uuid, .. } = &record.source {
        return libvirt.get(uri, uuid).unwrap_or("unknown").to_owned();
    }
    match control_of(record).run_state() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("{e}");
            "unknown".into()
        }
    }
}

/// `pause` and `resume`.
pub(super) fn pause_or_resume(g: &Global, name: &str, pause: bool) -> Result<(), Failure> {
    let (vm, _) = find_vm(g, name)?;
    let c = control_of(&vm);
    if pause { c.pause() } else { c.resume() }
        .context(if pause { "pausing" } else { "resuming" })
        .map_err(Failure::host)?;
    // The launcher publishes the change from QEMU's event, a moment after QEMU's answer: an
    // `ls` right after `pause` must already say so.
    let dir = g.state_dir();
    let deadline = Instant::now() + burst_qemu::control::QMP_TIMEOUT;
    while let Some(s) = state::published_run_state(&dir, name) {
        if (s == "running") != pause || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Why an adopted or libvirt VM is listed as it is, for `ls` and `check`.
pub(super) fn foreign_reason(vm: &VmRecord) -> Option<String> {
    match &vm.source {
        Source::Launcher => None,
        Source::Adopted => Some(format!(
            "adopted: burst-qemu did not start QEMU (pid {}); it is charged and enforced, and stopped only by burst-qemu stop {}",
            vm.pid, vm.name
        )),
        Source::Libvirt { uri, uuid, .. } => Some(format!("libvirt domain {uuid} of {uri}")),
    }
}

/// `stop` of a libvirt domain: `virsh shutdown`, then destroy after `shutdown_timeout`.
pub(super) fn stop_libvirt(
    state_dir: &Path,
    vm: &VmRecord,
    shutdown_timeout: Duration,
) -> Result<(), Failure> {
    #[cfg(feature = "libvirt")]
    {
        use burst_qemu::source::libvirt::conn::Connection;
        let Source::Libvirt { uri, uuid, .. } = &vm.source else {
            return Ok(());
        };
        let conn = Connection::open(uri)
            .with_context(|| format!("connecting to {uri}"))
            .map_err(Failure::host)?;
        let d = conn
            .domain_by_uuid(uuid)
            .with_context(|| format!("{}: domain {uuid}", vm.name))
            .map_err(Failure::host)?;
        d.shutdown()
            .with_context(|| format!("shutting {} down", vm.name))
            .map_err(Failure::host)?;
        let deadline = Instant::now() + shutdown_timeout;
        while vm.qemu_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if vm.qemu_alive() {
            let _ = d.destroy();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while vm.qemu_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = state_dir;
        Ok(())
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = (state_dir, shutdown_timeout, Instant::now());
        Err(Failure::host(anyhow::anyhow!(
            "{} is a libvirt domain and this burst-qemu was built without the `libvirt` feature: virsh shutdown {}",
            vm.name,
            vm.name
        )))
    }
}
