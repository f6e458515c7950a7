//! The scheduler process (`burst-qemu scx-scheduler`, started by the agent): loads
//! `bpf/burst.bpf.c` with libbpf, enables it, prints `ready`, then applies the agent's
//! commands (one per line on stdin, [`super::Command`]) to the BPF maps until its input ends.
//! Exits non-zero when the kernel disables the scheduler (an error, the watchdog, SysRq-S), so
//! that the agent restarts it.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use libbpf_rs::{MapCore, MapFlags, ObjectBuilder};

use std::collections::HashMap;
use std::path::Path;

use super::abi::{Budget, Conf, Usage, MAX_CPUS};
use super::{kernel_state, Command, Stats, VmStats, OPS_NAME, PERIOD};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/burst.bpf.o"));

/// How long a thread runs before dispatch decides again (BPF `conf.slice_ns`).
const SLICE: Duration = Duration::from_millis(5);

fn find<'a>(obj: &'a libbpf_rs::Object, name: &str) -> anyhow::Result<libbpf_rs::Map<'a>> {
    obj.maps()
        .find(|m| m.name() == name)
        .with_context(|| format!("BPF map {name} missing from the object"))
}

/// The program's `nr_vms` for the slots of `names`: the highest in use + 1 (0 when none).
fn slots_in_use(names: &HashMap<u32, String>) -> u32 {
    names.keys().max().map_or(0, |&top| top + 1)
}

/// Writes the program's `nr_vms` when the slots in use moved it from `was`.
fn set_slots_in_use(
    obj: &libbpf_rs::Object,
    was: u32,
    names: &HashMap<u32, String>,
) -> anyhow::Result<()> {
    let now = slots_in_use(names);
    if now != was {
        find(obj, "nr_vms")?.update(&0u32.to_ne_bytes(), &now.to_ne_bytes(), MapFlags::ANY)?;
    }
    Ok(())
}

/// Applies one command of the agent; a failure is said and the scheduler goes on. A thread
/// the full `tasks` map cannot take stays no VM's (FIFO, held by its VM's cgroup quota): exiting
/// instead made the agent restart the scheduler, which failed again on the same thread, while
/// every VM went without it.
fn applied(obj: &libbpf_rs::Object, names: &mut HashMap<u32, String>, cmd: Command, line: &str) {
    if let Err(e) = apply(obj, names, cmd) {
        eprintln!("burst-qemu scx-scheduler: applying {line:?}: {e:#}; going on without it");
    }
}

fn apply(
    obj: &libbpf_rs::Object,
    names: &mut HashMap<u32, String>,
    cmd: Command,
) -> anyhow::Result<()> {
    let was = slots_in_use(names);
    match cmd {
        Command::Vm {
            idx,
            base_ns,
            grant_ns,
            weight,
            name,
        } => {
            if names.insert(idx, name).is_none() {
                // A slot newly taken starts from nothing: a freed slot above `nr_vms` was not
                // refilled since, and its charges were another VM's. (No thread of it runs
                // yet: its threads come after this, with `tid`.)
                let zero = Usage::default().to_bytes();
                find(obj, "usage")?.update(&idx.to_ne_bytes(), &zero, MapFlags::ANY)?;
            }
            let budget = Budget {
                base_ns,
                grant_ns,
                weight,
            };
            find(obj, "budgets")?.update(&idx.to_ne_bytes(), &budget.to_bytes(), MapFlags::ANY)?;
            // Raised after its budget is in place and before its threads are in `tasks`: the
            // program sees no thread of a slot it does not loop over (intf.h).
            set_slots_in_use(obj, was, names)?;
        }
        Command::Free { idx } => {
            names.remove(&idx);
            // Grant 0 marks the slot unused.
            let free = Budget::default().to_bytes();
            find(obj, "budgets")?.update(&idx.to_ne_bytes(), &free, MapFlags::ANY)?;
            // Lowered after the agent's `untid` of its threads (sent before `free`).
            set_slots_in_use(obj, was, names)?;
        }
        Command::Tid { tid, idx } => {
            find(obj, "tasks")?.update(&tid.to_ne_bytes(), &idx.to_ne_bytes(), MapFlags::ANY)?;
        }
        Command::Untid { tid } => {
            // Absent already is fine.
            let _ = find(obj, "tasks")?.delete(&tid.to_ne_bytes());
        }
    }
    Ok(())
}

/// What the kernel counted of the loaded BPF program `name` (a function of
/// bpf/burst.bpf.c: `bq_dispatch`, `bq_tick`, …): (ns run, runs) since it was loaded, counted
/// only while `kernel.bpf_stats_enabled` is 1. `None` when no program of that name is loaded;
/// of several, the newest. For measurements (tests/scx_inside.rs): the scheduler itself does
/// not read it.
pub fn program_runtime(name: &str) -> Option<(u64, u64)> {
    libbpf_rs::query::ProgInfoIter::default()
        .filter(|p| p.name.as_os_str() == name)
        .max_by_key(|p| p.id)
        .map(|p| (p.run_time_ns, p.run_cnt))
}

/// Writes [`Stats`] to `path` (atomically, not synced: it is rewritten each second).
fn publish(
    obj: &libbpf_rs::Object,
    names: &HashMap<u32, String>,
    path: &Path,
) -> anyhow::Result<()> {
    let (state, ops) = kernel_state().unwrap_or_default();
    let mut stats = Stats {
        pid: std::process::id(),
        state,
        ops,
        vms: Default::default(),
    };
    let (usage, budgets) = (find(obj, "usage")?, find(obj, "budgets")?);
    for (idx, name) in names {
        let key = idx.to_ne_bytes();
        let u = Usage::from_bytes(&usage.lookup(&key, MapFlags::ANY)?.unwrap_or_default());
        let b = Budget::from_bytes(&budgets.lookup(&key, MapFlags::ANY)?.unwrap_or_default());
        stats.vms.insert(
            name.clone(),
            VmStats {
                slot: *idx,
                cpu_ns: u.total_ns,
                held: u.held,
                base_ns: b.base_ns,
                grant_ns: b.grant_ns,
                weight: b.weight,
            },
        );
    }
    crate::state::write_published(path, &serde_json::to_vec(&stats)?)?;
    Ok(())
}

/// Writes the program's `conf` (before it is enabled); returns the CPUs its timer kicks.
fn configure(obj: &libbpf_rs::Object) -> anyhow::Result<u32> {
    let cpus = libbpf_rs::num_possible_cpus().context("counting CPUs")? as u32;
    if cpus > MAX_CPUS {
        eprintln!(
            "burst-qemu scx-scheduler: {cpus} CPUs; the refill timer kicks the first {MAX_CPUS}"
        );
    }
    let conf = Conf {
        period_ns: PERIOD.as_nanos() as u64,
        slice_ns: SLICE.as_nanos() as u64,
        nr_cpus: cpus,
        pad: 0,
    };
    find(obj, "conf")?.update(&0u32.to_ne_bytes(), &conf.to_bytes(), MapFlags::ANY)?;
    Ok(cpus)
}

/// Runs the scheduler process (see the module docs); publishes [`Stats`] to `stats` each
/// second.
pub fn run(stats: Option<&Path>) -> anyhow::Result<()> {
    // Die with the agent that started us (its pipe closing is the other signal).
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // A scheduler whose process just died (a restarted agent's) takes a moment to unload.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match kernel_state() {
            None => bail!("this kernel has no sched_ext (/sys/kernel/sched_ext missing)"),
            Some((state, _)) if state == "disabled" => break,
            Some((state, ops)) if std::time::Instant::now() > deadline => {
                bail!("sched_ext is {state} (scheduler {ops:?}): another BPF scheduler is loaded")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let open = ObjectBuilder::default()
        .open_memory(OBJECT)
        .context("opening the BPF object")?;
    let mut obj = open
        .load()
        .context("loading the BPF scheduler (verifier or kernel BTF mismatch)")?;
    let cpus = configure(&obj)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The VMs the agent sent with the start (all of them, after a restart) go into the maps
    // before the scheduler is enabled: a thread it does not know yet would run uncapped.
    let mut names = HashMap::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => match Command::parse(&line) {
                Ok(cmd) => applied(&obj, &mut names, cmd, &line),
                Err(e) => eprintln!("burst-qemu scx-scheduler: ignored {line:?}: {e}"),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
    let mut ops = obj
        .maps_mut()
        .find(|m| m.name() == "burst_ops")
        .context("struct_ops map burst_ops missing")?;
    let _link = ops
        .attach_struct_ops()
        .context("enabling the BPF scheduler (struct_ops)")?;
    match kernel_state() {
        Some((state, ops)) if state == "enabled" && ops == OPS_NAME => {}
        other => bail!("the BPF scheduler did not become enabled: {other:?}"),
    }
    eprintln!("burst-qemu scx-scheduler: BPF scheduler {OPS_NAME} enabled on {cpus} CPUs");
    println!("ready");
    std::io::stdout().flush()?;

    let mut checked = std::time::Instant::now() - Duration::from_secs(2);
    loop {
        // Once a second: is the scheduler still enabled, and the figures for the agent.
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            match kernel_state() {
                Some((state, ops)) if state == "enabled" && ops == OPS_NAME => {}
                other => bail!("the kernel disabled the BPF scheduler (see dmesg): {other:?}"),
            }
            if let Some(path) = stats {
                if let Err(e) = publish(&obj, &names, path) {
                    eprintln!("burst-qemu scx-scheduler: {}: {e:#}", path.display());
                }
            }
        }
        match rx.recv_timeout(Duration::from_secs(1).saturating_sub(checked.elapsed())) {
            Ok(line) => match Command::parse(&line) {
                Ok(cmd) => applied(&obj, &mut names, cmd, &line),
                Err(e) => eprintln!("burst-qemu scx-scheduler: ignored {line:?}: {e}"),
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                eprintln!("burst-qemu scx-scheduler: input closed; unloading");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}
