//! One adopted VM: its state, and what the loop does to it — measure and charge, persist the
//! ledger and its checkpoint, publish the one-value files, keep its history.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::time::Instant;

use super::*;
use crate::config::VmConfig;
use crate::contention::Allocation;
use crate::credit::{Baseline, Credits, Ledger, Policy, Rate, PPM_PER_CPU};
use crate::enforce::{thread_cpu_ns, thread_sched_ns};
use crate::state::{self, VmRecord};

/// One adopted VM.
pub(super) struct Vm {
    pub(super) record: VmRecord,
    pub(super) ledger: Ledger,
    pub(super) credits_applied: Option<Credits>,
    pub(super) used_total: Credits,
    pub(super) cpu: Vec<(u32, u64)>,
    pub(super) at_ns: u64,
    pub(super) usage: Rate,
    /// CPU and time accumulated toward the next `usage` figure.
    pub(super) window: (u64, u64),
    /// CPU and time accumulated toward the contention stage's next period.
    pub(super) period: (u64, u64),
    /// Run-queue wait of the vCPU threads over the same period: CPU the host kept from them.
    pub(super) period_waited: u64,
    /// Each vCPU thread's cumulative run-queue wait at the last measurement (as `cpu`).
    pub(super) waits: Vec<Option<u64>>,
    /// The contention stage's allocation in force.
    pub(super) allocation: Option<Allocation>,
    pub(super) last_grant: Rate,
    pub(super) stale: Option<String>,
    /// The launcher died; QEMU runs on (see [`crate::state`]'s "Orphans").
    pub(super) orphaned: bool,
    /// Why the last save of the ledger failed, while it keeps failing.
    pub(super) ledger_error: Option<String>,
    pub(super) last_persist: Instant,
    pub(super) last_publish: Instant,
    pub(super) published: HashMap<&'static str, String>,
    pub(super) history: crate::history::History,
    /// Its disks under the disk stages (`None`: not managed).
    pub(super) disk: Option<super::disk::DiskView>,
    /// The CPUs its config lets the pinning balancer use (`cpus`).
    pub(super) cpus: Option<Vec<u32>>,
    /// Its vCPUs' pins and pin changes, when the pinning balancer runs.
    pub(super) pins: Option<(Vec<Option<u32>>, u64)>,
}

pub(super) fn new_vm(record: VmRecord, mut ledger: Ledger, cpu: Vec<(u32, u64)>, at_ns: u64) -> Vm {
    ledger.set_interval(TICK.as_nanos() as u64);
    Vm {
        last_grant: ledger.grant().rate,
        record,
        ledger,
        credits_applied: None,
        used_total: Credits::ZERO,
        cpu,
        at_ns,
        usage: Rate(0),
        window: (0, 0),
        period: (0, 0),
        period_waited: 0,
        waits: Vec::new(),
        allocation: None,
        stale: None,
        orphaned: false,
        ledger_error: None,
        last_persist: Instant::now(),
        last_publish: Instant::now(),
        published: HashMap::new(),
        history: crate::history::History::new(),
        disk: None,
        cpus: None,
        pins: None,
    }
}

/// The VM's saved history, or a new one (an unreadable file is kept as `.bad`).
pub(super) fn load_history(data_dir: &Path, name: &str) -> crate::history::History {
    let path = history_file::history_path(data_dir, name);
    history_file::load(&path)
        .unwrap_or_else(|e| {
            tracing::error!("{name}: unreadable history {e}; starting a new one (kept as .bad)");
            let _ = fs::rename(&path, path.with_extension("bqh.bad"));
            None
        })
        .unwrap_or_default()
}

/// Saves the VM's history: at each closed minute, and (`close`) when it ends or the agent stops.
pub(super) fn save_history(data_dir: &Path, vm: &mut Vm, close: bool) {
    if close {
        vm.history.flush();
    }
    let path = history_file::history_path(data_dir, &vm.record.name);
    if let Err(e) = history_file::save(&path, &vm.history) {
        tracing::error!("saving {}: {e}", path.display());
    }
}

pub(super) fn vcpus_mismatch(cfg: &VmConfig, running: u32) -> String {
    format!(
        "vcpus = {} differs from the running VM's {running} vCPUs; restart the VM to change it",
        cfg.policy.vcpus()
    )
}

/// The launch settings from the VM record, for a VM whose config file is unusable at adoption.
pub(super) fn fallback_config(r: &VmRecord) -> VmConfig {
    let policy = Baseline::from_percent(r.baseline)
        .and_then(|b| Policy::new(r.vcpus, b))
        .map(|p| p.with_mode(r.mode))
        .unwrap_or_else(|_| {
            Policy::new(
                r.vcpus.max(1),
                Baseline::from_percent(100.0).expect("valid"),
            )
            .expect("valid")
        });
    VmConfig {
        initial_credits: Policy::default_initial_credits(r.vcpus.max(1)),
        policy,
        credits: None,
        disk_share: None,
        cpus: None,
        memory: None,
    }
}

/// Applies `credits = N` once per change of its value.
pub(super) fn apply_override(vm: &mut Vm, cfg: &VmConfig) {
    vm.cpus = cfg.cpus.clone();
    if cfg.credits != vm.credits_applied {
        if let Some(c) = cfg.credits {
            vm.ledger.set_balance(c);
            tracing::info!(
                "{}: balance set to {c} (credits = in {})",
                vm.record.name,
                vm.record.config.display()
            );
        }
        vm.credits_applied = cfg.credits;
    }
}

pub(super) fn read_cpu(r: &VmRecord) -> Vec<(u32, u64)> {
    r.vcpu_tids
        .iter()
        .map(|&t| (t, thread_cpu_ns(r.pid, t).unwrap_or(0)))
        .collect()
}

/// Charges the VM for the CPU its vCPU threads used since the last measurement.
pub(super) fn measure_and_tick(vm: &mut Vm) {
    let now = boottime_ns();
    let elapsed = now.saturating_sub(vm.at_ns);
    if elapsed == 0 {
        return;
    }
    let mut used = 0u64;
    let mut waited = 0u64;
    vm.waits.resize(vm.cpu.len(), None);
    for ((tid, last), last_wait) in vm.cpu.iter_mut().zip(vm.waits.iter_mut()) {
        if let Some((ns, wait)) = thread_sched_ns(vm.record.pid, *tid) {
            used += ns.saturating_sub(*last);
            *last = ns;
            if let Some(w) = *last_wait {
                waited += wait.saturating_sub(w);
            }
            *last_wait = Some(wait);
        }
    }
    vm.last_grant = vm.ledger.grant().rate;
    vm.ledger.tick(elapsed, used);
    vm.used_total = Credits(vm.used_total.vcpu_ns() + used);
    // The published usage is a rate over at least USAGE_WINDOW: schedstat advances at scheduler
    // ticks, so two measurements a few microseconds apart (a config edit just after a tick)
    // would read as idle.
    vm.window = (vm.window.0 + used, vm.window.1 + elapsed);
    vm.period = (vm.period.0 + used, vm.period.1 + elapsed);
    vm.period_waited += waited;
    if vm.window.1 >= USAGE_WINDOW_NS {
        vm.usage = Rate(
            (u128::from(vm.window.0) * u128::from(PPM_PER_CPU) / u128::from(vm.window.1)) as u64,
        );
        vm.window = (0, 0);
    }
    vm.at_ns = now;
}

pub(super) fn persist(data_dir: &Path, vm: &mut Vm) {
    let file = LedgerFile {
        name: vm.record.name.clone(),
        vcpus: vm.record.vcpus,
        policy: Some(vm.ledger.policy().clone()),
        balances: vm.ledger.balances(),
        credits_applied: vm.credits_applied,
        used_total: vm.used_total,
        checkpoint: Some(Checkpoint {
            boot_id: state::boot_id(),
            qemu_start: vm.record.qemu_start,
            boottime_ns: vm.at_ns,
            qemu_pid: vm.record.pid,
            cpu_ns: vm.cpu.clone(),
        }),
    };
    let path = state::ledger_path(data_dir, &vm.record.name);
    // Retried once per persistence interval, not every tick, while the disk refuses.
    vm.last_persist = Instant::now();
    match file.save(&path) {
        Ok(()) => {
            if let Some(e) = vm.ledger_error.take() {
                tracing::info!("{}: ledger saved again (after: {e})", vm.record.name);
            }
        }
        Err(e) => {
            crate::metrics::LEDGER_SAVE_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The temporary file is removed and the old ledger stays whole; the agent goes on
            // charging and enforcing from memory and says so once, in its log, `ls` and `check`.
            if vm.ledger_error.is_none() {
                tracing::error!(
                    "{}: cannot save the ledger to {}: {e}; enforcing from memory until it can",
                    vm.record.name,
                    path.display()
                );
            }
            vm.ledger_error = Some(format!("{}: {e}", path.display()));
        }
    }
}

/// Writes the VM's one-value files and `credits.json` into its runtime dir.
pub(super) fn publish(state_dir: &Path, vm: &mut Vm) {
    vm.last_publish = Instant::now();
    let dir = state_dir.join(&vm.record.name);
    if !dir.is_dir() {
        return;
    }
    let v = view(
        &vm.record.name,
        &vm.ledger,
        vm.used_total,
        Some((vm.usage, vm.last_grant)),
        vm.stale.clone(),
    );
    let v = CreditsView {
        ledger_error: vm.ledger_error.clone(),
        allocation_pct: Some(
            vm.allocation
                .filter(|a| a.contended)
                .map_or(vm.last_grant, |a| a.rate.min(vm.last_grant))
                .percent_of(vm.record.vcpus),
        )
        .map(|p| (p * 100.0).round() / 100.0),
        demand_pct: vm
            .allocation
            .map(|a| (a.estimate.percent_of(vm.record.vcpus) * 100.0).round() / 100.0),
        observed_demand_pct: vm
            .allocation
            .map(|a| (a.observed.percent_of(vm.record.vcpus) * 100.0).round() / 100.0),
        disk: vm.disk.clone(),
        pins: vm.pins.as_ref().map(|p| p.0.clone()),
        pin_changes: vm.pins.as_ref().map(|p| p.1),
        ..v
    };
    let num = |x: Option<f64>, d: usize| x.map_or("null".to_owned(), |x| format!("{x:.d$}"));
    let values: [(&'static str, String); 8] = [
        ("balance", num(Some(v.balance), 3)),
        ("surplus", num(Some(v.surplus), 3)),
        ("charged", num(Some(v.charged), 3)),
        ("earn_per_hour", num(Some(v.earn_per_hour), 3)),
        ("usage_pct", num(v.usage_pct, 2)),
        ("grant_pct", num(v.grant_pct, 2)),
        ("time_to_empty_s", num(v.time_to_empty_s, 0)),
        (
            state::CREDITS_JSON,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        ),
    ];
    for (file, value) in values {
        if vm.published.get(file) != Some(&value) {
            let text = if file == state::CREDITS_JSON {
                value.clone()
            } else {
                format!("{value}\n")
            };
            if state::write_published(&dir.join(file), text.as_bytes()).is_ok() {
                vm.published.insert(file, value);
            }
        }
    }
    let error_file = dir.join(state::CONFIG_ERROR);
    let stale = vm.stale.clone().unwrap_or_default();
    if vm.published.get(state::CONFIG_ERROR) != Some(&stale) {
        let done = match &vm.stale {
            Some(why) => state::write_published(&error_file, format!("{why}\n").as_bytes()),
            None => match fs::remove_file(&error_file) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if done.is_ok() {
            vm.published.insert(state::CONFIG_ERROR, stale);
        }
    }
}
