//! The sched_ext enforcer measured side by side with cgroup quotas, in one run on a sched_ext
//! kernel (needs root, QEMU, cgroup v2 with the cpu controller, and a build with
//! `--features scx`). Meant for the scx-6.12 guest with 3 or 4 CPUs: the VMs' vCPU threads are
//! confined to CPUs 1-2 (the managed CPUs), everything else keeps CPU 0.
//!
//! 1. Overcommit: three 2-vCPU VMs of the busy test guest, baselines 40/20/10 % per vCPU (80,
//!    40 and 20 % of one CPU), all with credits, on the 2 managed CPUs: the CPU each VM got over
//!    10 s (after 8 s to settle) under cgroup quotas (contention stage off, rescoin, headroom) and under
//!    the scx enforcer.
//! 2. Cap accuracy at baseline: one 2-vCPU VM at 10 % per vCPU without credits (held to 20 % of
//!    one CPU) under the scx enforcer, against the same QEMU under a bare `cpu.max` of
//!    20000/100000: mean |share − 20| over ten 1-s windows, each.
//! 3. The agent's CPU (agent + scheduler process) for 10 VMs under scx, over 10 s.
//!
//! ```sh
//! cargo build --release --features scx --examples
//! tests/guest/run --kernel scx-6.12 --cpus 3 --mem 3072 -- target/release/examples/scx
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::state;
use burst_qemu::testguest::{self, Behaviour};

const MANAGED: &str = "1-2";

fn cpu_ns(pid: u32, tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Percent of one CPU each thread group used over `secs`.
fn shares(groups: &[(u32, Vec<u32>)], secs: f64) -> Vec<f64> {
    let total =
        |(pid, tids): &(u32, Vec<u32>)| -> u64 { tids.iter().map(|&t| cpu_ns(*pid, t)).sum() };
    let a: Vec<u64> = groups.iter().map(total).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let b: Vec<u64> = groups.iter().map(total).collect();
    let ns = t.elapsed().as_nanos() as f64;
    a.iter()
        .zip(&b)
        .map(|(a, b)| (b - a) as f64 * 100.0 / ns)
        .collect()
}

fn pin(tid: u32, cpus: &[usize]) {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET stays within it (cpu < 1024).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: as above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: reads `set` of the given size.
    unsafe { libc::sched_setaffinity(tid as i32, size_of::<libc::cpu_set_t>(), &set) };
}

struct Fleet {
    dir: tempfile::TempDir,
    launcher: PathBuf,
    children: Vec<Child>,
    records: Vec<state::VmRecord>,
    names: Vec<String>,
}

impl Fleet {
    /// Launches `vms` (name, vcpus, baseline, credits) with `enforcer`, paused until all run.
    fn start(
        launcher: &Path,
        image: &Path,
        enforcer: &str,
        contention: &str,
        vms: &[(String, u32, f64, f64)],
    ) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("bqx")
            .tempdir_in("/tmp")
            .unwrap();
        let mut fleet = Fleet {
            launcher: launcher.to_owned(),
            children: Vec::new(),
            records: Vec::new(),
            dir,
            names: Vec::new(),
        };
        for (name, vcpus, baseline, credits) in vms {
            let mut qemu = testguest::qemu_command(image, "tcg,thread=multi", 16);
            qemu.push("-S".into());
            let child = Command::new(launcher)
                .arg("--state-dir")
                .arg(fleet.state())
                .arg("--vms")
                .arg(fleet.dir.path().join("vms"))
                .env("BURST_QEMU_DATA_DIR", fleet.dir.path().join("data"))
                .env("BURST_QEMU_CONTENTION", contention)
                .env("BURST_QEMU_ENFORCER", enforcer)
                .env("BURST_QEMU_SCX_CPUS", MANAGED)
                .env("BURST_QEMU_CAPACITY", MANAGED)
                .args([
                    "--name",
                    name,
                    "--vcpus",
                    &vcpus.to_string(),
                    "--baseline",
                    &baseline.to_string(),
                ])
                .args([
                    "--credits",
                    &credits.to_string(),
                    "--shutdown-timeout",
                    "0",
                    "--",
                ])
                .args(&qemu)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            fleet.children.push(child);
            let deadline = Instant::now() + Duration::from_secs(60);
            let record = loop {
                if let Some((r, _)) = state::find(&fleet.state(), name) {
                    if fleet.state().join(name).join("credits.json").exists() {
                        break r;
                    }
                }
                assert!(Instant::now() < deadline, "{name} did not start");
                std::thread::sleep(Duration::from_millis(20));
            };
            // Both enforcers on the same two CPUs (the scx enforcer also sets this itself).
            for &t in &record.vcpu_tids {
                pin(t, &[1, 2]);
            }
            fleet.records.push(record);
            fleet.names.push(name.clone());
        }
        for name in fleet.names.clone() {
            fleet.cli(&["resume", &name]);
        }
        fleet
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.launcher)
            .args(args)
            .arg("--state-dir")
            .arg(self.state())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn groups(&self) -> Vec<(u32, Vec<u32>)> {
        self.records
            .iter()
            .map(|r| (r.pid, r.vcpu_tids.clone()))
            .collect()
    }

    /// CPU time of the agent and of its scheduler process (0 without one), in ns.
    fn agent_cpu_ns(&self) -> (u64, u64) {
        let agent = std::fs::read_to_string(self.state().join("agent.lock"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .map_or(0, process_cpu_ns);
        let sched = burst_qemu::enforce::scx::read_stats(&self.state())
            .map_or(0, |st| process_cpu_ns(st.pid));
        (agent, sched)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for name in self.names.clone() {
            self.cli(&["stop", &name]);
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// utime + stime of a whole process, in ns.
fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let after = &stat[stat.rfind(')').unwrap_or(0) + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    ticks * 1_000_000_000 / hz
}

fn overcommit(launcher: &Path, busy: &Path) {
    let vms: Vec<(String, u32, f64, f64)> = [("big", 40.0), ("mid", 20.0), ("small", 10.0)]
        .iter()
        .map(|(n, b)| (n.to_string(), 2, *b, 500.0))
        .collect();
    let baselines = [80.0, 40.0, 20.0];
    println!("1. overcommit: three 2-vCPU VMs, every vCPU busy, baselines 80/40/20 % of one CPU, all with credits, on CPUs {MANAGED}");
    println!("   delivered % of one CPU over 10 s (after 8 s to settle), and the shortfall below the baseline");
    for (enforcer, contention, label) in [
        ("cgroup", "off", "cgroup quotas, contention off"),
        ("cgroup", "rescoin", "cgroup quotas, contention rescoin"),
        ("cgroup", "headroom", "cgroup quotas, contention headroom"),
        // The scx enforcer splits by headroom itself and refuses any other rule.
        ("scx", "headroom", "scx enforcer"),
    ] {
        let fleet = Fleet::start(launcher, busy, enforcer, contention, &vms);
        std::thread::sleep(Duration::from_secs(8));
        let got = shares(&fleet.groups(), 10.0);
        let row: Vec<String> = got
            .iter()
            .zip(baselines)
            .map(|(g, b)| {
                format!(
                    "{g:6.2} (baseline {b:.0}, shortfall {:.2})",
                    (b - g).max(0.0)
                )
            })
            .collect();
        println!(
            "   {label:<30} {}  total {:.1}",
            row.join("  "),
            got.iter().sum::<f64>()
        );
    }
}

fn cap_accuracy(launcher: &Path, busy: &Path) {
    println!("2. cap accuracy at baseline: one 2-vCPU VM held to 20 % of one CPU, |share - 20| over ten 1-s windows after 3 s");
    let windows = |groups: &[(u32, Vec<u32>)]| -> (f64, Vec<f64>) {
        let s: Vec<f64> = (0..10).map(|_| shares(groups, 1.0)[0]).collect();
        let err = s.iter().map(|x| (x - 20.0).abs()).sum::<f64>() / s.len() as f64;
        (err, s)
    };
    let vms = vec![("capped".to_string(), 2, 10.0, 0.0)];
    let fleet = Fleet::start(launcher, busy, "scx", "headroom", &vms);
    std::thread::sleep(Duration::from_secs(3));
    let (scx_err, scx_s) = windows(&fleet.groups());
    drop(fleet);

    // The same QEMU under a bare cpu.max, no burst-qemu at all.
    let cg = Path::new("/sys/fs/cgroup/bq-bare");
    let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu");
    std::fs::create_dir_all(cg).unwrap();
    std::fs::write(cg.join("cpu.max"), "20000 100000").unwrap();
    let mut qemu = testguest::qemu_command(busy, "tcg,thread=multi", 16);
    qemu.extend([
        "-smp".into(),
        "2".into(),
        "-name".into(),
        "bare,debug-threads=on".into(),
    ]);
    let mut child = Command::new(&qemu[0])
        .args(&qemu[1..])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::fs::write(cg.join("cgroup.procs"), pid.to_string()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let tids = loop {
        let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let tid: u32 = e.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                comm.starts_with("CPU ").then_some(tid)
            })
            .collect();
        if tids.len() == 2 || Instant::now() > deadline {
            break tids;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(tids.len(), 2, "vCPU threads of the bare QEMU");
    for &t in &tids {
        pin(t, &[1, 2]);
    }
    std::thread::sleep(Duration::from_secs(3));
    let (bare_err, bare_s) = windows(&[(pid, tids)]);
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(200));
    let _ = std::fs::remove_dir(cg);
    let fmt = |s: &[f64]| {
        s.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "   scx enforcer:  mean error {scx_err:.2} points  (windows {})",
        fmt(&scx_s)
    );
    println!(
        "   bare cpu.max:  mean error {bare_err:.2} points  (windows {})",
        fmt(&bare_s)
    );
    println!(
        "   ratio scx/bare {:.2} (goal: within 2x)",
        scx_err / bare_err.max(1e-9)
    );
}

fn agent_cost(launcher: &Path, halt: &Path) {
    let vms: Vec<(String, u32, f64, f64)> =
        (0..10).map(|i| (format!("vm{i}"), 1, 10.0, 5.0)).collect();
    println!("3. agent cost, 10 1-vCPU VMs (idle guests), over 10 s after 3 s");
    for (enforcer, label) in [("cgroup", "cgroup enforcer"), ("scx", "scx enforcer")] {
        let contention = if enforcer == "scx" { "headroom" } else { "off" };
        let fleet = Fleet::start(launcher, halt, enforcer, contention, &vms);
        std::thread::sleep(Duration::from_secs(3));
        let a = fleet.agent_cpu_ns();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(10));
        let b = fleet.agent_cpu_ns();
        let ns = t.elapsed().as_nanos() as f64;
        let (agent, sched) = (
            (b.0 - a.0) as f64 * 100.0 / ns,
            (b.1 - a.1) as f64 * 100.0 / ns,
        );
        let pct = agent + sched;
        let label = format!("{label}: agent {agent:.2} + scheduler {sched:.2} =");
        println!("   {label:<55} {pct:.2} % of one CPU");
    }
}

fn main() {
    assert!(
        burst_qemu::enforce::scx::kernel_supports(),
        "needs a sched_ext kernel (tests/guest/run --kernel scx-6.12)"
    );
    let launcher = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("burst-qemu");
    assert!(
        launcher.exists(),
        "build it first: cargo build --release --features scx ({})",
        launcher.display()
    );
    let images = tempfile::tempdir().unwrap();
    let (busy, halt) = (
        images.path().join("busy.bin"),
        images.path().join("halt.bin"),
    );
    testguest::write(&busy, Behaviour::Busy).unwrap();
    testguest::write(&halt, Behaviour::Halt).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "burst-qemu scx measurements, {cpus} CPUs, kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if which == "all" || which == "overcommit" {
        overcommit(&launcher, &busy);
    }
    if which == "all" || which == "cap" {
        cap_accuracy(&launcher, &busy);
    }
    if which == "all" || which == "cost" {
        agent_cost(&launcher, &halt);
    }
}
