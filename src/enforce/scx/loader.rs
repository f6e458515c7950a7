//! The scheduler process (`burst-qemu scx-scheduler`, started by the agent): loads
//! `bpf/burst.bpf.c` with libbpf, enables it, prints `ready`, then applies the agent's
//! commands (one per line on stdin, [`super::Command`]) to the BPF maps until its input ends.
//! Exits non-zero when the kernel disables the scheduler (an error, the watchdog, SysRq-S), so
//! that the agent restarts it.
//!
//! With `--dispatch user` it also decides every dispatch of the vCPU threads itself
//! ([`super::user`]): it reads the program's reports from the `events` ring buffer, runs the
//! policy, and orders each run, extension and preemption through the `bq_order` program
//! (BPF_PROG_RUN). It then keeps off the CPUs it manages, when there are others.

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use libbpf_rs::{MapCore, MapFlags, ObjectBuilder};

use std::collections::HashMap;
use std::path::Path;

use super::abi::{
    Budget, Conf, Event, Latency, Order, Plan, Usage, ENQ_FLAGS, ENQ_TAKEN, EV_FAILED, MAX_CPUS,
};
use super::user::UserPolicy;
use super::{kernel_state, Command, LatencyStats, Stats, VmStats, OPS_NAME, PERIOD};
use crate::enforce::monotonic_ns;

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
/// of several, the newest. For measurements (tests/scx_inside/): the scheduler itself does
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
    user: Option<&UserPolicy>,
    path: &Path,
) -> anyhow::Result<()> {
    let (state, ops) = kernel_state().unwrap_or_default();
    let l = Latency::from_bytes(
        &find(obj, "latency")?
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)?
            .unwrap_or_default(),
    );
    let mut stats = Stats {
        pid: std::process::id(),
        state,
        ops,
        vms: Default::default(),
        dispatch: if user.is_some() { "user" } else { "bpf" }.into(),
        latency: LatencyStats {
            waits: l.waits,
            sum_ns: l.sum_ns,
            max_ns: l.max_ns,
            runs: l.runs,
            hist: l.hist.to_vec(),
        },
        process_cpu_ns: process_cpu_ns(),
        user: user.map(|u| u.counts),
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

/// This process's CPU time, ns (user + system, all threads).
fn process_cpu_ns() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime) + us(ru.ru_stime)) * 1000
}

/// Keeps this process (the threads it starts after this) off the managed `cpus` when the
/// machine has others: on 6.12 the fair class runs before sched_ext, so a decision taken on a
/// managed CPU would push a vCPU thread off it.
fn keep_off(cpus: &[u32]) {
    let online = libbpf_rs::num_possible_cpus().unwrap_or(0) as u32;
    let others: Vec<u32> = (0..online.min(1024))
        .filter(|c| !cpus.contains(c))
        .collect();
    if others.is_empty() {
        return;
    }
    if let Err(e) = crate::procfs::set_affinity(0, &others) {
        eprintln!("burst-qemu scx-scheduler: keeping off CPUs {cpus:?}: {e}");
    }
}

/// Puts the deciding thread in SCHED_FIFO (priority 1), as a ghOSt agent runs above the
/// threads it schedules: a decision waits for nothing of the fair class on its CPU. Measured in
/// the scx-6.12 guest before this: one round of decisions every 20 ms for slices of 5 ms, and
/// the VMs got 1.5 of their 2 CPUs. The kernel's RT throttling (95 %) bounds a runaway loop.
fn realtime() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads the sched_param it is given; 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        eprintln!(
            "burst-qemu scx-scheduler: SCHED_FIFO: {}; deciding in the fair class",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs one order through `bq_order`; returns what the program left in it.
fn run_order(prog: &libbpf_rs::ProgramMut, o: &Order) -> anyhow::Result<Order> {
    // A syscall program takes no separate output context: the kernel copies the context back
    // into the input's buffer.
    let mut ctx = o.to_bytes();
    let input = libbpf_rs::ProgramInput {
        context_in: Some(&mut ctx),
        ..Default::default()
    };
    let ran = prog.test_run(input).context("running bq_order")?;
    if ran.return_value != 0 {
        bail!("bq_order refused {o:?} ({})", ran.return_value as i32);
    }
    Ok(Order::from_bytes(&ctx))
}

/// Writes the program's `conf` (before it is enabled); returns the CPUs its timer kicks.
fn configure(obj: &libbpf_rs::Object, user: bool) -> anyhow::Result<u32> {
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
        user_dispatch: user.into(),
    };
    find(obj, "conf")?.update(&0u32.to_ne_bytes(), &conf.to_bytes(), MapFlags::ANY)?;
    Ok(cpus)
}

/// Parses and applies one line of the agent's (to the maps, and to the policy in the
/// user-space mode, at `now`); returns the orders the policy needs for it.
fn handle(
    obj: &libbpf_rs::Object,
    names: &mut HashMap<u32, String>,
    policy: Option<&mut UserPolicy>,
    line: &str,
    now: u64,
) -> Vec<Order> {
    match Command::parse(line) {
        Ok(cmd) => {
            let orders = policy.map_or_else(Vec::new, |p| p.command(&cmd, now));
            applied(obj, names, cmd, line);
            orders
        }
        Err(e) => {
            eprintln!("burst-qemu scx-scheduler: ignored {line:?}: {e}");
            Vec::new()
        }
    }
}

/// Once a second: fails when the kernel disabled the scheduler, and publishes the figures.
fn every_second(
    obj: &libbpf_rs::Object,
    names: &HashMap<u32, String>,
    policy: Option<&UserPolicy>,
    stats: Option<&Path>,
) -> anyhow::Result<()> {
    match kernel_state() {
        Some((state, ops)) if state == "enabled" && ops == OPS_NAME => {}
        other => bail!("the kernel disabled the BPF scheduler (see dmesg): {other:?}"),
    }
    if let Some(path) = stats {
        if let Err(e) = publish(obj, names, policy, path) {
            eprintln!("burst-qemu scx-scheduler: {}: {e:#}", path.display());
        }
    }
    Ok(())
}

/// Runs the scheduler process (see the module docs); publishes [`Stats`] to `stats` each
/// second. `user`: the user-space mode, deciding for `cpus` (those the vCPU threads are
/// confined to; all when `None`).
pub fn run(stats: Option<&Path>, user: bool, managed: Option<Vec<u32>>) -> anyhow::Result<()> {
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
    let cpus = configure(&obj, user)?;
    let user_cpus = user.then(|| managed.unwrap_or_else(|| (0..cpus.min(MAX_CPUS)).collect()));
    if let Some(managed) = &user_cpus {
        keep_off(managed);
    }
    let mut policy = user_cpus.as_deref().map(UserPolicy::new);
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
            Ok(line) => drop(handle(
                &obj,
                &mut names,
                policy.as_mut(),
                &line,
                monotonic_ns(),
            )),
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
    let mode = if policy.is_some() {
        "user-space dispatch"
    } else {
        "BPF dispatch"
    };
    eprintln!("burst-qemu scx-scheduler: BPF scheduler {OPS_NAME} enabled on {cpus} CPUs ({mode})");
    println!("ready");
    std::io::stdout().flush()?;
    match policy {
        None => serve_bpf(&obj, &mut names, &rx, stats),
        Some(p) => serve_user(&obj, &mut names, &rx, stats, p),
    }
}

/// The BPF-dispatch mode's loop: the agent's commands, and the figures each second.
fn serve_bpf(
    obj: &libbpf_rs::Object,
    names: &mut HashMap<u32, String>,
    rx: &mpsc::Receiver<String>,
    stats: Option<&Path>,
) -> anyhow::Result<()> {
    let mut checked = std::time::Instant::now() - Duration::from_secs(2);
    loop {
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            every_second(obj, names, None, stats)?;
        }
        match rx.recv_timeout(Duration::from_secs(1).saturating_sub(checked.elapsed())) {
            Ok(line) => drop(handle(obj, names, None, &line, monotonic_ns())),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                eprintln!("burst-qemu scx-scheduler: input closed; unloading");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// The longest the user-space mode waits for a report before it looks at the agent's
/// commands again.
const MAX_WAIT: Duration = Duration::from_millis(5);

/// How far ahead of a slice's end the user-space mode decides what follows it
/// ([`UserPolicy::look_ahead`]): more than the process's lateness measured in the scx-6.12
/// guest (2–5 ms; microseconds on a real machine).
const LEAD: Duration = Duration::from_millis(6);

/// Waits up to `wait` for the ring buffer's epoll descriptor to be readable (ns resolution:
/// epoll's own timeout has ms).
fn wait_readable(fd: i32, wait: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
}

/// How long a thread may wait in the program's custody with no order of it on its way before
/// the process takes its reports as lost ([`UserPolicy::found_held`]): far above an order's way
/// to its CPU in the scx-6.12 guest (median 5.5 ms, 90th percentile 12 ms: docs/sched-ext.md).
/// A VM's thread waiting for budget is held too, but the policy has it waiting and is not
/// told anything.
const HELD_LIMIT: Duration = Duration::from_millis(500);

/// The threads the program has held for an order for longer than [`HELD_LIMIT`] at `now`,
/// with since when: its `enq_at` entries without `ENQ_TAKEN`. Read once a second.
fn held_long(obj: &libbpf_rs::Object, now: u64) -> anyhow::Result<Vec<(u32, u64)>> {
    let map = find(obj, "enq_at")?;
    let mut held = Vec::new();
    for key in map.keys() {
        let Some(value) = map.lookup(&key, MapFlags::ANY)? else {
            continue; // Run meanwhile.
        };
        let (Ok(tid), Ok(value)) = (
            <[u8; 4]>::try_from(&key[..]),
            <[u8; 8]>::try_from(&value[..]),
        ) else {
            continue;
        };
        let value = u64::from_ne_bytes(value);
        let since = value & !ENQ_FLAGS;
        if value & ENQ_TAKEN == 0 && now.saturating_sub(since) > HELD_LIMIT.as_nanos() as u64 {
            held.push((u32::from_ne_bytes(tid), since));
        }
    }
    Ok(held)
}

/// Takes the threads held too long ([`held_long`]) as waiting, said on stderr and in the
/// trace (`H now tid since`).
fn recover_held(
    obj: &libbpf_rs::Object,
    policy: &mut UserPolicy,
    mut trace: Option<&mut std::io::BufWriter<std::fs::File>>,
) {
    let now = monotonic_ns();
    let held = match held_long(obj, now) {
        Ok(held) => held,
        Err(e) => {
            eprintln!("burst-qemu scx-scheduler: reading enq_at: {e:#}");
            return;
        }
    };
    for (tid, since) in held {
        // Read before the policy changes: where the program has it ordered.
        let at = ordered_where(obj, policy.policy().cpus(), tid, now);
        let Some(was) = policy.found_held(tid, since) else {
            continue;
        };
        if let Some(t) = trace.as_mut() {
            let _ = writeln!(t, "H {now} {tid} {since}");
        }
        eprintln!(
            "burst-qemu scx-scheduler: thread {tid} held {} ms with no order on its way (the \
             policy had it {was}; {at}): its reports were lost; taken as waiting",
            now.saturating_sub(since) / 1_000_000
        );
    }
}

/// Where the program has thread `tid` ordered, said for a thread found held: the CPUs of
/// `cpus` whose `plans` entry has it next (ordered, not taken yet) or current (taken last), and
/// the CPU `placed` has it on (`now`: the caller's reading of the clock). Which of these a thread found held shows tells which report or
/// order went astray.
fn ordered_where(obj: &libbpf_rs::Object, cpus: &[u32], tid: u32, now: u64) -> String {
    let mut said = Vec::new();
    if let Ok(plans) = find(obj, "plans") {
        for &cpu in cpus {
            let Ok(Some(bytes)) = plans.lookup(&cpu.to_ne_bytes(), MapFlags::ANY) else {
                continue;
            };
            let plan = Plan::from_bytes(&bytes);
            if plan.next == u64::from(tid) {
                // And what that CPU has instead: the thread it took last, and how far past
                // (or before) that one's slice's end it is now.
                said.push(format!(
                    "CPU {cpu} has its order, not taken; it took {} last, its end {} ms from now",
                    plan.cur,
                    (plan.cur_until as i64 - now as i64) / 1_000_000
                ));
            }
            if plan.cur == u64::from(tid) {
                said.push(format!("CPU {cpu} took it last"));
            }
        }
    }
    if let Ok(placed) = find(obj, "placed") {
        if let Ok(Some(bytes)) = placed.lookup(&tid.to_ne_bytes(), MapFlags::ANY) {
            if let Ok(cpu) = <[u8; 4]>::try_from(&bytes[..]) {
                said.push(format!("placed on CPU {}", u32::from_ne_bytes(cpu)));
            }
        }
    }
    if said.is_empty() {
        "no CPU has an order of it".into()
    } else {
        said.join(", ")
    }
}

/// The user-space mode's loop: reports in, the policy's orders out, the agent's commands, and
/// the figures each second.
fn serve_user(
    obj: &libbpf_rs::Object,
    names: &mut HashMap<u32, String>,
    rx: &mpsc::Receiver<String>,
    stats: Option<&Path>,
    mut policy: UserPolicy,
) -> anyhow::Result<()> {
    let prog = obj
        .progs_mut()
        .find(|p| p.name() == "bq_order")
        .context("BPF program bq_order missing from the object")?;
    let events = find(obj, "events")?;
    let inbox = std::rc::Rc::new(std::cell::RefCell::new(Vec::<Event>::new()));
    let sink = inbox.clone();
    let mut builder = libbpf_rs::RingBufferBuilder::new();
    builder.add(&events, move |data: &[u8]| {
        sink.borrow_mut().push(Event::from_bytes(data));
        0
    })?;
    let ring = builder.build().context("reading the events ring buffer")?;
    realtime();
    // A trace for a measurement's analysis, one line each: `E at kind tid cpu` (a report, as
    // read), `C now line` (an agent's command), `R now` (a round: the decision and the look
    // ahead at `now`), `O now op cpu tid until replaced` (an order it made) and `H now tid
    // since` (a thread found held since then, its reports lost: `recover_held`). Reports,
    // commands and rounds in the order the policy took them: enough to replay it.
    let mut trace = std::env::var_os("BURST_QEMU_SCX_TRACE")
        .and_then(|p| std::fs::File::create(p).ok())
        .map(std::io::BufWriter::new);
    let mut checked = std::time::Instant::now() - Duration::from_secs(2);
    loop {
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            every_second(obj, names, Some(&policy), stats)?;
            recover_held(obj, &mut policy, trace.as_mut());
            // A pin lifted or changed without a failure to show it.
            for tid in policy.threads() {
                if let Some(cpus) = crate::procfs::affinity(tid) {
                    policy.set_allowed(tid, &cpus);
                }
            }
        }
        let now = monotonic_ns();
        // Woken a lead before the next deadline: a slice's end is decided ahead of it.
        let wait = policy
            .next_wake(now, LEAD.as_nanos() as u64)
            .map_or(MAX_WAIT, |d| Duration::from_nanos(d.saturating_sub(now)))
            .min(MAX_WAIT);
        wait_readable(ring.epoll_fd(), wait);
        // A failed read (EINTR) leaves the reports for the next round.
        let _ = ring.consume();
        for e in inbox.borrow_mut().drain(..) {
            if let Some(t) = trace.as_mut() {
                let _ = writeln!(t, "E {} {} {} {}", e.at, e.kind, e.tid, e.cpu);
            }
            if e.kind == EV_FAILED {
                // Perhaps a CPU it may not use: the policy learns its CPUs before the wake
                // that follows (a thread gone has none to read).
                if let Some(cpus) = crate::procfs::affinity(e.tid) {
                    policy.set_allowed(e.tid, &cpus);
                }
            }
            policy.event(&e);
        }
        let mut orders = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    // The trace's time is the one the policy takes the command at.
                    let now = monotonic_ns();
                    if let Some(t) = trace.as_mut() {
                        let _ = writeln!(t, "C {now} {line}");
                    }
                    orders.extend(handle(obj, names, Some(&mut policy), &line, now))
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    eprintln!("burst-qemu scx-scheduler: input closed; unloading");
                    return Ok(());
                }
            }
        }
        let now = monotonic_ns();
        if let Some(t) = trace.as_mut() {
            let _ = writeln!(t, "R {now}");
        }
        orders.extend(policy.decide(now));
        orders.extend(policy.look_ahead(now, LEAD.as_nanos() as u64));
        for o in &orders {
            match run_order(&prog, o) {
                Ok(done) => {
                    if let Some(t) = trace.as_mut() {
                        let _ = writeln!(
                            t,
                            "O {now} {} {} {} {} {}",
                            o.op, o.cpu, o.tid, o.until, done.replaced
                        );
                    }
                }
                Err(e) => eprintln!("burst-qemu scx-scheduler: {e:#}"),
            }
        }
        if let Some(t) = trace.as_mut() {
            let _ = t.flush();
        }
    }
}
