//! The fleet commands: `ls`, `stop`, `pause`, `resume`, `credits`, and starting the agent.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use burst_qemu::state::{self, VmRecord};

use super::agent_start::find_vm;
use super::foreign::LibvirtStates;
use super::*;

/// A running VM's state: `running`, `paused`, another run state, or `unknown` when its monitor
/// does not answer. A launched VM's launcher keeps it in the runtime dir (no QMP session per VM
/// per `ls`); an orphan and an adopted QEMU are asked over QMP; a libvirt domain's comes from
/// `libvirt`, asked once for the whole fleet.
pub(super) fn vm_state(
    state_dir: &Path,
    vm: &VmRecord,
    liveness: state::Liveness,
    libvirt: &LibvirtStates,
) -> String {
    if vm.source == state::Source::Launcher && liveness == state::Liveness::Managed {
        if let Some(s) = state::published_run_state(state_dir, &vm.name) {
            return s;
        }
    }
    super::foreign::run_state(vm, libvirt)
}

/// Why a VM is orphaned (or, adopted, has no launcher), for `ls`.
pub(super) fn orphan_reason(vm: &VmRecord) -> String {
    if let Some(why) = super::foreign::foreign_reason(vm) {
        return why;
    }
    format!(
        "its launcher (pid {}) is gone; QEMU (pid {}) runs on and is still charged and enforced (burst-qemu stop {} ends it)",
        vm.wrapper_pid, vm.pid, vm.name
    )
}

/// Starts an agent when VMs run and none does (after a crash, or when the agent was killed
/// with its launchers): fleet commands bring enforcement back rather than report on a fleet
/// nobody charges.
pub(super) fn revive_agent(g: &Global, vms: usize) {
    let dir = g.state_dir();
    if vms > 0 && !state::agent_running(&dir) {
        match ensure_agent(&dir, &g.data_dir()) {
            Ok(()) => eprintln!(
                "burst-qemu: no credit agent was running for {}: started one",
                dir.display()
            ),
            Err(e) => eprintln!(
                "burst-qemu: warning: no credit agent runs and none could be started: {e:#}"
            ),
        }
    }
}

pub(super) fn ls(g: &Global, a: LsArgs) -> Result<(), Failure> {
    let dir = g.state_dir();
    let vms = state::running(&dir);
    revive_agent(g, vms.len());
    let libvirt = LibvirtStates::of(vms.iter().map(|(vm, _)| vm));
    let out = if a.json {
        let rows: Vec<serde_json::Value> = vms
            .iter()
            .map(|(vm, liveness)| ls_row(&dir, vm, *liveness, &libvirt))
            .collect();
        serde_json::to_string_pretty(&rows).expect("plain data") + "\n"
    } else {
        let mut out = format!(
            "{:<20} {:>8} {:>5} {:>9} {:<9} {:<8} {:<8} {:>9} {:>7} {:>7} {:<6} {:<7} VCPU TIDS\n",
            "NAME",
            "PID",
            "VCPUS",
            "BASELINE",
            "MODE",
            "STATE",
            "SOURCE",
            "BALANCE",
            "GRANT",
            "ALLOC",
            "CONFIG",
            "PINS"
        );
        let mut stale = String::new();
        let pct = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1}%"));
        for (vm, liveness) in &vms {
            let tids: Vec<String> = vm.vcpu_tids.iter().map(u32::to_string).collect();
            let live = read_view(&dir, &vm.name);
            let error = config_error(&dir, &vm.name);
            if let Some(e) = &error {
                stale.push_str(&format!("{}: config stale: {e}\n", vm.name));
            }
            let orphaned =
                *liveness == state::Liveness::Orphaned && vm.source == state::Source::Launcher;
            if orphaned {
                stale.push_str(&format!("{}: orphaned: {}\n", vm.name, orphan_reason(vm)));
            } else if let Some(why) = super::foreign::foreign_reason(vm) {
                stale.push_str(&format!("{}: {why}\n", vm.name));
            }
            if let Some(e) = live.as_ref().and_then(|v| v.ledger_error.as_ref()) {
                stale.push_str(&format!("{}: ledger not saved: {e}\n", vm.name));
            }
            out.push_str(&format!(
                "{:<20} {:>8} {:>5} {:>8}% {:<9} {:<8} {:<8} {:>9} {:>7} {:>7} {:<6} {:<7} {}\n",
                vm.name,
                vm.pid,
                vm.vcpus,
                live.as_ref().map_or(vm.baseline, |v| v.baseline),
                live.as_ref().map_or(vm.mode, |v| v.mode),
                if orphaned {
                    "orphaned".into()
                } else {
                    vm_state(&dir, vm, *liveness, &libvirt)
                },
                vm.source.label(),
                live.as_ref()
                    .map_or("-".into(), |v| format!("{:.3}", v.balance)),
                pct(live.as_ref().and_then(|v| v.grant_pct)),
                pct(live.as_ref().and_then(|v| v.allocation_pct)),
                if error.is_some() { "stale" } else { "ok" },
                pins_text(live.as_ref().and_then(|v| v.pins.as_deref())),
                tids.join(",")
            ));
        }
        out + &stale
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)
}

/// One VM's row of `ls --json`.
fn ls_row(
    dir: &Path,
    vm: &VmRecord,
    liveness: state::Liveness,
    libvirt: &LibvirtStates,
) -> serde_json::Value {
    let mut v = serde_json::to_value(vm).expect("records are plain data");
    let run_state = vm_state(dir, vm, liveness, libvirt);
    let orphaned = liveness == state::Liveness::Orphaned && vm.source == state::Source::Launcher;
    v["state"] = if orphaned {
        "orphaned".into()
    } else {
        run_state.clone()
    }
    .into();
    v["run_state"] = run_state.into();
    v["launcher"] = match vm.source {
        state::Source::Launcher if orphaned => "gone",
        state::Source::Launcher => "running",
        _ => "none",
    }
    .into();
    v["from"] = vm.source.label().into();
    v["orphan_reason"] = orphaned.then(|| orphan_reason(vm)).into();
    let live = read_view(dir, &vm.name);
    v["grant_pct"] = live.as_ref().and_then(|v| v.grant_pct).into();
    v["allocation_pct"] = live.as_ref().and_then(|v| v.allocation_pct).into();
    v["pins"] = live.as_ref().and_then(|v| v.pins.clone()).into();
    v["pin_changes"] = live.as_ref().and_then(|v| v.pin_changes).into();
    v["ledger_error"] = live.and_then(|v| v.ledger_error).into();
    v["memory"] = serde_json::to_value(super::mem::read_memory(dir, &vm.name)).unwrap_or_default();
    let error = config_error(dir, &vm.name);
    v["config_state"] = if error.is_some() { "stale" } else { "ok" }.into();
    v["config_error"] = error.into();
    v
}

/// The `PINS` column: each vCPU's CPU (`*` while not pinned to one), `-` when the agent does
/// not balance.
fn pins_text(pins: Option<&[Option<u32>]>) -> String {
    match pins {
        None => "-".into(),
        Some(p) => p
            .iter()
            .map(|c| c.map_or("*".to_owned(), |c| c.to_string()))
            .collect::<Vec<_>>()
            .join(","),
    }
}

pub(super) fn stop(g: &Global, a: StopArgs) -> Result<(), Failure> {
    let (vm, liveness) = find_vm(g, &a.name)?;
    if matches!(vm.source, state::Source::Libvirt { .. }) {
        return super::foreign::stop_libvirt(
            &g.state_dir(),
            &vm,
            Duration::from_secs_f64(a.shutdown_timeout.max(0.0)),
        );
    }
    if liveness == state::Liveness::Orphaned {
        let ended = burst_qemu::orphan::stop(
            &g.state_dir(),
            &vm,
            Duration::from_secs_f64(a.shutdown_timeout.max(0.0)),
        )
        .map_err(|e| Failure::host(anyhow::anyhow!("stopping {}: {e}", vm.name)))?;
        tracing::info!("{} (orphaned) ended: {ended:?}", vm.name);
        return Ok(());
    }
    let dir = g.state_dir().join(&vm.name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.wrapper_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| {
        format!(
            "signalling the launcher of {} (pid {})",
            vm.name, vm.wrapper_pid
        )
    })
    .map_err(Failure::host)?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.wait.max(0.0));
    while state::is_locked(&dir) {
        if Instant::now() >= deadline {
            return Err(Failure::host(anyhow::anyhow!(
                "{} is still running after {} s",
                vm.name,
                a.wait
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(super) fn config_error(state_dir: &std::path::Path, name: &str) -> Option<String> {
    std::fs::read_to_string(state_dir.join(name).join(state::CONFIG_ERROR))
        .ok()
        .map(|s| s.trim().to_owned())
}

pub(super) fn read_view(state_dir: &std::path::Path, name: &str) -> Option<CreditsView> {
    let bytes = std::fs::read(state_dir.join(name).join(state::CREDITS_JSON)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) fn credits(g: &Global, a: CreditsArgs) -> Result<(), Failure> {
    let state_dir = g.state_dir();
    let data_dir = g.data_dir();
    let set = a
        .set
        .map(|c| {
            Credits::from_credits(c).ok_or_else(|| {
                Failure::usage(PolicyError::Credits {
                    field: "--set",
                    value: c,
                })
            })
        })
        .transpose()?;
    let running = state::find(&state_dir, &a.name).is_some();
    revive_agent(g, usize::from(running));
    let view = if running {
        if let Some(c) = set {
            ask_agent_to_set(&state_dir, &a.name, c)?;
        }
        published_view(&state_dir, &a.name)?
    } else {
        stopped_view(&data_dir, &a.name, set)?
    };
    let text = if a.json {
        let mut v = serde_json::to_value(&view).expect("plain data");
        v["time_to_empty_s"] = view.time_to_empty_s.map(f64::round).into();
        serde_json::to_string_pretty(&v).expect("plain data") + "\n"
    } else {
        credits_text(&view)
    };
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)
}

/// Asks the running agent to set a running VM's balance, and waits until it has.
fn ask_agent_to_set(state_dir: &std::path::Path, name: &str, c: Credits) -> Result<(), Failure> {
    if !state::agent_running(state_dir) {
        return Err(Failure::host(anyhow::anyhow!(
            "no agent runs for {}: start one with burst-qemu agent",
            state_dir.display()
        )));
    }
    let request = state_dir.join(name).join(state::SET_CREDITS);
    state::write_atomic(&request, format!("{}\n", c.as_credits()).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", request.display()))
        .map_err(Failure::host)?;
    state::poke_agent(state_dir)
        .with_context(|| format!("writing {}", state_dir.join(state::REQUESTS).display()))
        .map_err(Failure::host)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while request.exists() {
        if Instant::now() >= deadline {
            return Err(Failure::host(anyhow::anyhow!(
                "the agent did not take the new balance within 5 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A running VM's view as its agent published it (waiting up to 3 s for a first one).
fn published_view(state_dir: &std::path::Path, name: &str) -> Result<CreditsView, Failure> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(v) = read_view(state_dir, name) {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Failure::host(anyhow::anyhow!(
                "{name} is running but no agent has published its credits (is the agent running? see {})",
                state_dir.join("agent.log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A stopped VM's view from its saved ledger, after setting its balance when asked.
fn stopped_view(
    data_dir: &std::path::Path,
    name: &str,
    set: Option<Credits>,
) -> Result<CreditsView, Failure> {
    let path = state::ledger_path(data_dir, name);
    let file = LedgerFile::load(&path)
        .with_context(|| format!("reading {}", path.display()))
        .map_err(Failure::host)?
        .ok_or_else(|| Failure {
            code: EXIT_NO_SUCH_VM,
            error: anyhow::anyhow!(
                "no VM named {name:?}: not running and no ledger in {}",
                data_dir.display()
            ),
        })?;
    let policy = file
        .policy
        .clone()
        .ok_or_else(|| Failure::host(anyhow::anyhow!("{} has no policy", path.display())))?;
    let mut ledger = Ledger::restore(policy, file.balances);
    if let Some(c) = set {
        ledger.set_balance(c);
        let saved = LedgerFile {
            balances: ledger.balances(),
            ..file.clone()
        };
        saved
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))
            .map_err(Failure::host)?;
    }
    Ok(burst_qemu::view::build(&burst_qemu::view::Facts::ledger(
        name,
        &ledger,
        file.used_total,
    )))
}

/// `credits` without `--json`.
fn credits_text(view: &CreditsView) -> String {
    let pct = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2} %"));
    let empty = view.time_to_empty_s.map_or("not draining".to_owned(), |s| {
        let s = s.round() as u64;
        format!("in {}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
    });
    format!(
        "{} ({}, {} mode, {} vCPU at {} % baseline)\n\
         balance        {:.3} credits\n\
         surplus        {:.3}\n\
         charged        {:.3}\n\
         earn rate      {:.3} credits/hour\n\
         usage          {} of all vCPUs (grant {})\n\
         empty          {}\n{}",
        view.name,
        view.state,
        view.mode,
        view.vcpus,
        view.baseline,
        view.balance,
        view.surplus,
        view.charged,
        view.earn_per_hour,
        pct(view.usage_pct),
        pct(view.grant_pct),
        empty,
        view.config_error
            .as_ref()
            .map_or(String::new(), |e| format!("config stale: {e}\n")),
    )
}
