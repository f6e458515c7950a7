//! The vCPU pinning balancer on real QEMU, replaying the published scenarios (seeds 001, §1.4):
//! one-vCPU VMs of the project's test guest (spinning, or busy a share of each 20 ms), an
//! agent with `--balance cpu`, and this test measuring on its own, every second, each vCPU
//! thread's run time and run-queue wait from `/proc` and its affinity from the kernel.
//!
//! Pass: the last pin change within 10 s of the start (when every VM runs and has been put
//! where the scenario starts it), then none for the rest of the run (20 s in all), and per-CPU
//! demand balanced over the settled part of the run: σ ≤ 5 % of the mean. The published
//! criterion is looser (its monitor runs 25 one-second iterations and expects balance within
//! about 20); the balancer, every 2 s, made its last change at 5, 3 and 0 s here and at 6 and
//! 3 s in the 4-CPU guest (2026-12-07): 10 s is five of its intervals, and 10 s are left after
//! it in which nothing may move. A CPU's *demand* is what its vCPUs ran plus what they waited
//! for on its run queue (what they would have run); its *use* (run time only) is reported
//! beside it, but other jobs on this shared 2-core machine take CPU from either CPU, so use is
//! not asserted. On this machine: 4 VMs on 2 CPUs; the published 8 VMs on 4 CPUs run inside a
//! 4-CPU Debian 6.12 guest of the harness (`tests/guest/run`), this very binary inside it.

mod common;
#[cfg(feature = "libvirt")]
mod libvirt_harness;

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::balance::pin;
use burst_qemu::testguest::{self, Behaviour};
use common::*;

/// How a VM's vCPU starts.
#[derive(Clone, Copy, Debug)]
enum Start {
    /// Pinned to this CPU.
    On(u32),
    /// Free to run on every managed CPU.
    Float,
}

const RUN: Duration = Duration::from_secs(20);
const BALANCE_WITHIN: f64 = 10.0;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start_balancing_agent(s: &Scratch, cpus: &[u32], libvirt: &[String]) -> Agent {
    std::fs::create_dir_all(s.state()).unwrap();
    let log = std::fs::File::create(s.state().join("agent.log")).unwrap();
    let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
    let child = bin()
        .args(["agent"])
        .args(libvirt)
        .arg("--state-dir")
        .arg(s.state())
        .args([
            "--balance",
            "cpu",
            "--balance-interval",
            "2",
            "--balance-cpus",
        ])
        .arg(list.join(","))
        .env("BURST_QEMU_DATA_DIR", s.data())
        .env("BURST_QEMU_LOG", "info")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    agent_pid(s);
    Agent(child)
}

fn affinity(tid: u32) -> Vec<u32> {
    burst_qemu::procfs::affinity(tid).expect("a live thread's CPUs")
}

fn set_affinity(tid: u32, cpus: &[u32]) {
    burst_qemu::procfs::set_affinity(tid, cpus).unwrap();
}

fn balance_json(s: &Scratch) -> Option<pin::Published> {
    let text = std::fs::read(s.state().join(pin::BALANCE_JSON)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// One VM of a scenario: launched through the wrapper, or a libvirt domain (a mixed fleet).
struct Member {
    record: burst_qemu::state::VmRecord,
    _vm: Option<Launched>,
    #[cfg(feature = "libvirt")]
    domain: bool,
}

fn place_at_start(vm: &Member, start: Start, cpus: &[u32]) {
    #[cfg(feature = "libvirt")]
    if vm.domain {
        // As an operator pins a domain: through libvirt, so that virsh vcpupin agrees.
        let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
        let to = match start {
            Start::On(c) => c.to_string(),
            Start::Float => list.join(","),
        };
        let (ok, text) = libvirt_harness::virsh(&["vcpupin", &vm.record.name, "0", &to, "--live"]);
        assert!(ok, "{text}");
        return;
    }
    for &tid in &vm.record.vcpu_tids {
        match start {
            Start::On(c) => set_affinity(tid, &[c]),
            Start::Float => set_affinity(tid, cpus),
        }
    }
}

/// The CPU `virsh vcpupin` shows for vCPU 0 of a domain.
#[cfg(feature = "libvirt")]
fn virsh_pin(name: &str) -> String {
    let (ok, text) = libvirt_harness::virsh(&["vcpupin", name, "--live"]);
    assert!(ok, "{text}");
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("0")).then(|| f.next().unwrap_or_default().to_owned())
        })
        .unwrap_or_default()
}

/// The record of domain `name` once the agent has it in the fleet.
#[cfg(feature = "libvirt")]
fn wait_in_fleet(s: &Scratch, name: &str) -> burst_qemu::state::VmRecord {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((r, _)) = burst_qemu::state::find(&s.state(), name) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} did not join the fleet: {}",
            std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Per-CPU loads from (run, wait) deltas of each vCPU attributed to its CPU (its single-CPU
/// affinity, else the CPU it last ran on).
fn per_cpu(cpus: &[u32], at: &[u32], run: &[f64], wait: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut demand = vec![0.0; cpus.len()];
    let mut used = vec![0.0; cpus.len()];
    for i in 0..at.len() {
        if let Some(k) = cpus.iter().position(|&c| c == at[i]) {
            demand[k] += run[i] + wait[i];
            used[k] += run[i];
        }
    }
    (demand, used)
}

fn spread(loads: &[f64]) -> (f64, f64) {
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    let sigma = (loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean, sigma)
}

/// The result of one scenario.
struct Outcome {
    /// Seconds from the start to the last pin change (0 when none).
    last_change_s: f64,
    pin_changes: u64,
    /// σ/mean of per-CPU demand over the settled part of the run.
    demand_cv: f64,
    /// σ/mean of per-CPU use (run time) over the same part.
    use_cv: f64,
    /// Each VM's final CPU.
    cpu_of: BTreeMap<String, u32>,
}

/// Runs one scenario: `vms` as (name, behaviour, start) on the managed `cpus`; the VMs at
/// the indices in `domains` are libvirt domains where this build and host have libvirt
/// (`bq-test-PID-NAME`: the outcome names them by their short names all the same).
fn scenario(
    title: &str,
    cpus: &[u32],
    vms: &[(String, Behaviour, Start)],
    domains: &[usize],
) -> Option<Outcome> {
    if !require_qemu() || !require_cgroups() {
        return None;
    }
    let s = Scratch::new();
    #[cfg(feature = "libvirt")]
    let conn = (!domains.is_empty())
        .then(libvirt_harness::require_libvirtd)
        .flatten();
    #[cfg(feature = "libvirt")]
    let libvirt_flags: Vec<String> = match conn {
        Some(_) => vec![
            "--libvirt".into(),
            "qemu:///system".into(),
            "--libvirt-domains".into(),
            libvirt_harness::own_domains(),
        ],
        None => Vec::new(),
    };
    #[cfg(not(feature = "libvirt"))]
    let libvirt_flags: Vec<String> = Vec::new();
    let _agent = start_balancing_agent(&s, cpus, &libvirt_flags);
    #[cfg(feature = "libvirt")]
    let mut guards = Vec::new();
    let mut launched = Vec::new();
    let mut full_names = Vec::new();
    for (i, (name, behaviour, start)) in vms.iter().enumerate() {
        let _ = i;
        #[cfg(feature = "libvirt")]
        if let (Some(conn), true) = (&conn, domains.contains(&i)) {
            let d = libvirt_harness::TestDomain::start_opted_in(
                conn,
                name,
                1,
                *behaviour,
                r#"<config baseline="100"/>"#,
            );
            let record = wait_in_fleet(&s, &d.name);
            let vm = Member {
                record,
                _vm: None,
                domain: true,
            };
            place_at_start(&vm, *start, cpus);
            full_names.push(d.name.clone());
            guards.push(d);
            launched.push(vm);
            continue;
        }
        let image = s.path().join(format!("{name}.bin"));
        testguest::write(&image, *behaviour).unwrap();
        let qemu = testguest::qemu_command(&image, "tcg,thread=multi", 16);
        let l = Launched::start(&s, name, &["--vcpus", "1", "--baseline", "100"], &qemu);
        let vm = Member {
            record: l.record.clone(),
            _vm: Some(l),
            #[cfg(feature = "libvirt")]
            domain: false,
        };
        place_at_start(&vm, *start, cpus);
        full_names.push(name.clone());
        launched.push(vm);
    }
    let _ = domains;
    // The scenario's names from here on: a domain's full name.
    let vms: Vec<(String, Behaviour, Start)> = vms
        .iter()
        .zip(&full_names)
        .map(|((_, b, st), n)| (n.clone(), *b, *st))
        .collect();
    // VMs register one by one (seconds apart in a nested guest) and the agent balances the
    // part of the fleet it sees; the scenario starts when all are in: every vCPU is put back
    // where the scenario starts it, and pin changes are counted from here.
    for (vm, (_, _, start)) in launched.iter().zip(&vms) {
        place_at_start(vm, *start, cpus);
    }
    let changes_before = balance_json(&s).map_or(0, |b| b.pin_changes);
    let threads: Vec<(u32, u32)> = launched
        .iter()
        .flat_map(|l| l.record.vcpu_tids.iter().map(|&t| (l.record.pid, t)))
        .collect();
    let read = || -> Vec<(u64, u64)> {
        threads
            .iter()
            .map(|&(pid, tid)| {
                burst_qemu::procfs::Proc::host()
                    .thread_sched(pid, tid)
                    .map(|s| (s.run_ns, s.wait_ns))
                    .expect("alive")
            })
            .collect()
    };
    let place = || -> Vec<u32> {
        threads
            .iter()
            .map(|&(pid, tid)| match affinity(tid)[..] {
                [one] => one,
                _ => burst_qemu::procfs::Proc::host()
                    .thread_last_cpu(pid, tid)
                    .unwrap(),
            })
            .collect()
    };
    let t0 = Instant::now();
    // (seconds, pin changes, each vCPU's CPU, each vCPU's cumulative (run, wait))
    type Sample = (f64, u64, Vec<u32>, Vec<(u64, u64)>);
    let mut samples: Vec<Sample> = Vec::new();
    eprintln!("{title}: t(s)  changes  per-CPU demand (run+wait, CPUs) | per-CPU use");
    let mut prev = (read(), Instant::now());
    while t0.elapsed() < RUN {
        std::thread::sleep(Duration::from_secs(1));
        let now = read();
        let at = place();
        let dt = prev.1.elapsed().as_secs_f64();
        let run: Vec<f64> = now
            .iter()
            .zip(&prev.0)
            .map(|(n, p)| (n.0 - p.0) as f64 / 1e9 / dt)
            .collect();
        let wait: Vec<f64> = now
            .iter()
            .zip(&prev.0)
            .map(|(n, p)| (n.1 - p.1) as f64 / 1e9 / dt)
            .collect();
        let (demand, used) = per_cpu(cpus, &at, &run, &wait);
        let changes = balance_json(&s).map_or(0, |b| b.pin_changes) - changes_before;
        let t = t0.elapsed().as_secs_f64();
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        eprintln!(
            "{title}: {t:5.1} {changes:>4}  {} | {}",
            fmt(&demand),
            fmt(&used)
        );
        samples.push((t, changes, at, now.clone()));
        prev = (now, Instant::now());
    }
    let final_changes = samples.last().unwrap().1;
    // The first sample that shows the final count: the last change happened before it.
    let settled = samples.iter().position(|s| s.1 == final_changes).unwrap();
    let last_change_s = if final_changes == 0 {
        0.0
    } else {
        samples[settled].0
    };
    // Settled part: from one balancer interval (2 s) after the last change to the end.
    let from = samples
        .iter()
        .position(|s| s.0 >= last_change_s + 2.0)
        .unwrap_or(samples.len() - 1)
        .min(samples.len() - 2);
    let (a, b) = (&samples[from], samples.last().unwrap());
    let dt = b.0 - a.0;
    let run: Vec<f64> =
        b.3.iter()
            .zip(&a.3)
            .map(|(n, p)| (n.0 - p.0) as f64 / 1e9 / dt)
            .collect();
    let wait: Vec<f64> =
        b.3.iter()
            .zip(&a.3)
            .map(|(n, p)| (n.1 - p.1) as f64 / 1e9 / dt)
            .collect();
    assert_eq!(a.2, b.2, "{title}: placements changed in the settled part");
    let (demand, used) = per_cpu(cpus, &b.2, &run, &wait);
    let (dm, ds) = spread(&demand);
    let (um, us) = spread(&used);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "{title}: last pin change at {last_change_s:.0} s, {final_changes} pin changes; settled over {dt:.0} s: demand {demand:.3?} σ/mean {:.1} %, use {used:.3?} σ/mean {:.1} %; host loadavg {}",
        ds / dm * 100.0,
        us / um.max(1e-9) * 100.0,
        load.trim()
    );
    // Every vCPU ends pinned to one managed CPU, as balance.json and credits.json say.
    let published = balance_json(&s).expect("balance.json");
    let mut cpu_of = BTreeMap::new();
    for (vm, (name, _, _)) in launched.iter().zip(&vms) {
        let tid = vm.record.vcpu_tids[0];
        let cpu = match affinity(tid)[..] {
            [one] => one,
            ref other => panic!("{title}: {name}'s vCPU is not pinned: {other:?}"),
        };
        assert!(cpus.contains(&cpu));
        assert_eq!(published.pins[name], vec![Some(cpu)], "{title}: {name}");
        #[cfg(feature = "libvirt")]
        if vm.domain {
            // Pinned through libvirt: virsh vcpupin shows the pin the kernel has.
            assert_eq!(virsh_pin(name), cpu.to_string(), "{title}: {name}");
            eprintln!("{title}: {name} (a libvirt domain) on CPU {cpu}; virsh vcpupin agrees");
        }
        let view = view(&s, name);
        assert_eq!(view["pins"], serde_json::json!([cpu]), "{title}: {name}");
        cpu_of.insert(name.clone(), cpu);
    }
    // `ls --json` and `ls` show them too.
    let ls: serde_json::Value = serde_json::from_slice(&s.cli(&["ls", "--json"]).stdout).unwrap();
    for row in ls.as_array().unwrap() {
        let name = row["name"].as_str().unwrap();
        assert_eq!(
            row["pins"],
            serde_json::json!([cpu_of[name]]),
            "{title}: {name}"
        );
        assert!(row["pin_changes"].is_u64(), "{title}: {row}");
    }
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(text.lines().next().unwrap().contains(" PINS "), "{text}");
    let log = std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default();
    for line in log.lines().filter(|l| {
        l.contains("balance: plan") || l.contains(") pinned to CPU ") || l.contains("contended")
    }) {
        eprintln!("{title}: agent: {line}");
    }
    let logged = log
        .lines()
        .filter(|l| l.contains(": vCPU ") && l.contains(") pinned to CPU "))
        .count() as u64;
    assert_eq!(
        logged, published.pin_changes,
        "every pin change is logged:\n{log}"
    );
    // Keyed by the scenario's own short names.
    let short = |n: &String| {
        n.rsplit_once(&format!("-{}-", std::process::id()))
            .map_or(n.clone(), |(_, s)| s.to_owned())
    };
    let cpu_of = cpu_of.iter().map(|(n, c)| (short(n), *c)).collect();
    Some(Outcome {
        last_change_s,
        pin_changes: final_changes,
        demand_cv: ds / dm,
        use_cv: us / um.max(1e-9),
        cpu_of,
    })
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("vm{i}")).collect()
}

fn assert_balanced(title: &str, o: &Outcome) {
    assert!(
        o.last_change_s <= BALANCE_WITHIN,
        "{title}: last pin change at {} s",
        o.last_change_s
    );
    assert!(
        o.demand_cv <= 0.05,
        "{title}: per-CPU demand σ/mean {:.1} % (use {:.1} %)",
        o.demand_cv * 100.0,
        o.use_cv * 100.0
    );
}

fn count_per_cpu(cpus: &[u32], o: &Outcome) -> Vec<usize> {
    cpus.iter()
        .map(|c| o.cpu_of.values().filter(|x| *x == c).count())
        .collect()
}

/// The managed CPUs for `n` of them: the first `n` this process may use.
fn first_cpus(n: usize) -> Vec<u32> {
    let mine = burst_qemu::procfs::own_cpus();
    assert!(
        mine.len() >= n,
        "{n} CPUs needed, this process may use {mine:?}"
    );
    mine[..n].to_vec()
}

fn all_on_one(cpus: &[u32], n: usize, domains: &[usize]) {
    let title = format!("{n} spinning VMs all on CPU {}", cpus[0]);
    let vms: Vec<_> = names(n)
        .into_iter()
        .map(|name| (name, Behaviour::Busy, Start::On(cpus[0])))
        .collect();
    let Some(o) = scenario(&title, cpus, &vms, domains) else {
        return;
    };
    assert_balanced(&title, &o);
    assert_eq!(count_per_cpu(cpus, &o), vec![n / cpus.len(); cpus.len()]);
    assert_eq!(
        o.pin_changes as usize,
        n - n / cpus.len(),
        "only the moves needed"
    );
}

fn already_balanced(cpus: &[u32], n: usize) {
    let title = format!("{n} spinning VMs already round-robin");
    let vms: Vec<_> = names(n)
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name, Behaviour::Busy, Start::On(cpus[i % cpus.len()])))
        .collect();
    let Some(o) = scenario(&title, cpus, &vms, &[]) else {
        return;
    };
    assert_balanced(&title, &o);
    assert_eq!(o.pin_changes, 0, "{title}: a balanced fleet is left alone");
}

fn unpinned_heavy_and_light(cpus: &[u32], n: usize, light: u8, domains: &[usize]) {
    let title = format!("{n} unpinned VMs, heavy and {light} % light alternating");
    let vms: Vec<_> = names(n)
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let b = if i % 2 == 0 {
                Behaviour::Busy
            } else {
                Behaviour::Duty(light)
            };
            (name, b, Start::Float)
        })
        .collect();
    let Some(o) = scenario(&title, cpus, &vms, domains) else {
        return;
    };
    assert_balanced(&title, &o);
    // One heavy and one light per CPU.
    for &c in cpus {
        let on: Vec<usize> = (0..n)
            .filter(|i| o.cpu_of[&format!("vm{i}")] == c)
            .collect();
        assert_eq!(on.len(), n / cpus.len(), "{title}: CPU {c} has {on:?}");
        let heavy = on.iter().filter(|i| *i % 2 == 0).count();
        assert_eq!(heavy, on.len() / 2, "{title}: CPU {c} has {on:?}");
    }
}

/// A mixed fleet where libvirt is built (CI): vm1 and vm3 are libvirt domains, pinned through
/// libvirt.
#[test]
fn four_vms_on_two_cpus_all_starting_on_one() {
    all_on_one(&first_cpus(2), 4, &[1, 3]);
}

#[test]
fn four_vms_on_two_cpus_already_balanced() {
    already_balanced(&first_cpus(2), 4);
}

/// A mixed fleet where libvirt is built (CI): vm0 (heavy) and vm1 (light) are libvirt
/// domains.
#[test]
fn four_vms_on_two_cpus_unpinned_heavy_and_light() {
    unpinned_heavy_and_light(&first_cpus(2), 4, 50, &[0, 1]);
}

// The published 8-VM scenarios on 4 CPUs: run inside the 4-CPU guest by the test below.

#[test]
#[ignore = "needs 4 CPUs: run inside the harness's 4-CPU guest by eight_vms_on_four_cpus_in_a_guest"]
fn in_guest_gt_tc2_eight_all_on_cpu0() {
    all_on_one(&first_cpus(4), 8, &[]);
}

#[test]
#[ignore = "needs 4 CPUs: run inside the harness's 4-CPU guest by eight_vms_on_four_cpus_in_a_guest"]
fn in_guest_gt_tc3_eight_unpinned_heavy_and_light() {
    unpinned_heavy_and_light(&first_cpus(4), 8, 50, &[]);
}

/// A VM's `cpus` list in its config is respected, applied live, and a bad edit keeps the last
/// good one (and says why).
#[test]
fn a_vms_cpu_list_is_respected_and_applied_live() {
    if !require_qemu() || !require_cgroups() {
        return;
    }
    let cpus = first_cpus(2);
    let s = Scratch::new();
    let _agent = start_balancing_agent(&s, &cpus, &[]);
    write_config(
        &s,
        "fixed",
        &format!("vcpus = 1\nbaseline = 100\ncpus = \"{}\"\n", cpus[1]),
    );
    let flags = ["--vcpus", "1", "--baseline", "100"];
    let fixed = Launched::start(&s, "fixed", &flags, &s.qemu_args(Behaviour::Busy));
    let free = Launched::start(&s, "free", &flags, &s.qemu_args(Behaviour::Busy));
    let (f, g) = (fixed.record.vcpu_tids[0], free.record.vcpu_tids[0]);
    set_affinity(f, &[cpus[0]]);
    set_affinity(g, &[cpus[0]]);
    let t = wait_until("fixed on its CPU", Duration::from_secs(15), || {
        affinity(f) == [cpus[1]] && affinity(g) == [cpus[0]]
    });
    eprintln!("cpus = {}: moved there in {t:?}", cpus[1]);
    // Live: the list now names the other CPU; both swap.
    write_config(
        &s,
        "fixed",
        &format!("vcpus = 1\nbaseline = 100\ncpus = [{}]\n", cpus[0]),
    );
    let t = wait_until(
        "fixed follows its edited list",
        Duration::from_secs(15),
        || affinity(f) == [cpus[0]] && affinity(g) == [cpus[1]],
    );
    eprintln!("cpus = [{}]: moved there in {t:?}", cpus[0]);
    // A bad edit: named, and the last good list stays in force.
    write_config(&s, "fixed", "vcpus = 1\nbaseline = 100\ncpus = \"1-0\"\n");
    wait_until("the error is published", Duration::from_secs(5), || {
        std::fs::read_to_string(s.state().join("fixed/config_error"))
            .is_ok_and(|e| e.contains(":3: cpus:"))
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(affinity(f), [cpus[0]]);
}

#[test]
fn bad_balance_flags_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, says) in [
        (&["--balance-cpus", "9999"][..], "--balance-cpus"),
        (&["--balance-cpus", "1-0"][..], "--balance-cpus"),
        (&["--balance-cpus", "x"][..], "--balance-cpus"),
        (&["--balance-interval", "0"][..], "--balance-interval"),
        (&["--enforcer", "ghost"][..], "--balance cpu"),
    ] {
        let out = bin()
            .args(["agent", "--state-dir"])
            .arg(dir.path())
            .args(["--balance", "cpu"])
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}

#[test]
fn eight_vms_on_four_cpus_in_a_guest() {
    if !require_harness() {
        return;
    }
    let me = std::env::current_exe().unwrap();
    let ended = guest::run(
        "debian-6.12",
        4,
        2048,
        &[],
        &[guest::Part::new(
            "in_guest_",
            &[
                me.to_str().unwrap(),
                "--ignored",
                "--test-threads",
                "1",
                "--nocapture",
                "in_guest_",
            ],
        )],
    );
    let text = &ended[0].output;
    assert!(
        ended[0].status == 0 && text.contains("test result: ok. 2 passed"),
        "in the guest: {text}"
    );
    assert!(text.contains("test result: ok. 2 passed"), "{text}");
}
