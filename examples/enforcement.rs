//! Measures the enforcement goals side by side in one run (needs root, QEMU and a cgroup cpu
//! controller):
//!
//! 1. Error at baseline: a busy 2-vCPU guest held to 20 % of one CPU for 10 s, once by a bare
//!    cgroup quota written by hand and once by burst-qemu (10 % baseline, 0 credits),
//!    alternating, several rounds; |measured − 20| in points of one CPU, medians and ratio.
//! 2. Agent CPU with 10 running VMs, over 20 s, in % of one core: with the state dir on tmpfs
//!    (as `/run` is on systemd hosts) and on disk (as `/run` is on these machines), alternating
//!    ROUNDS times; medians.
//! 3. Config edit → new quota written, 10 edits, median.
//!
//! ```sh
//! cargo build --release && cargo run --release --example enforcement [-- ROUNDS [PARTS]]
//! ```
//!
//! PARTS picks parts, e.g. `2` or `13` (default: all).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::enforce::cgroup::{self, Version};
use burst_qemu::state;
use burst_qemu::testguest::{self, Behaviour};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cpu_ns(pid: u32, tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Percent of one CPU used by the threads over `secs`, read in this process at both ends.
fn share(pid: u32, tids: &[u32], secs: f64) -> f64 {
    let a: u64 = tids.iter().map(|&t| cpu_ns(pid, t)).sum();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let b: u64 = tids.iter().map(|&t| cpu_ns(pid, t)).sum();
    (b - a) as f64 * 100.0 / t.elapsed().as_nanos() as f64
}

fn qemu_args(bios: &Path) -> Vec<String> {
    let mut args = testguest::qemu_command(bios, "tcg,thread=multi", 16);
    args.extend(["-smp".into(), "2".into()]);
    args
}

struct Dirs {
    root: tempfile::TempDir,
    /// The state dir: on tmpfs, as the default /run/burst-qemu is on a systemd host, or on
    /// disk; ledgers (the data dir) stay on disk.
    state: tempfile::TempDir,
    launcher: PathBuf,
}

fn dirs(launcher: &Path, on_tmpfs: bool) -> Dirs {
    let tmpfs = Path::new("/dev/shm");
    Dirs {
        root: tempfile::Builder::new()
            .prefix("bqm")
            .tempdir_in("/var/tmp")
            .unwrap(),
        state: tempfile::Builder::new()
            .prefix("bqm-state")
            .tempdir_in(if on_tmpfs && tmpfs.is_dir() {
                tmpfs
            } else {
                Path::new("/var/tmp")
            })
            .unwrap(),
        launcher: launcher.to_owned(),
    }
}

fn fs_type(dir: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The agent's CPU with 10 halting VMs over 20 s, in % of one core.
fn agent_cpu(dirs: &Dirs, halt: &Path) -> f64 {
    let vms: Vec<(String, Child)> = (0..10)
        .map(|i| {
            let name = format!("fleet{i}");
            let (c, _) = dirs.launch(&name, halt);
            (name, c)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let agent: u32 = std::fs::read_to_string(dirs.state().join("agent.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (a, t) = (ticks(agent), Instant::now());
    std::thread::sleep(Duration::from_secs(20));
    let used = (ticks(agent) - a) as f64 / hz;
    let pct = used * 100.0 / t.elapsed().as_secs_f64();
    println!(
        "  state dir on {:<6} agent used {used:.3} s of CPU in {:.1} s: {pct:.3} % of one core",
        fs_type(&dirs.state()),
        t.elapsed().as_secs_f64(),
    );
    for (name, c) in vms {
        dirs.stop(&name, c);
    }
    pct
}

impl Dirs {
    fn state(&self) -> PathBuf {
        self.state.path().to_owned()
    }
    // The launcher is returned to the caller, which waits for it in `stop`.
    #[allow(clippy::zombie_processes)]
    fn launch(&self, name: &str, bios: &Path) -> (Child, state::VmRecord) {
        let mut child = Command::new(&self.launcher)
            .arg("--state-dir")
            .arg(self.state())
            .arg("--vms")
            .arg(self.root.path().join("vms"))
            .env("BURST_QEMU_DATA_DIR", self.root.path().join("data"))
            .args([
                "--name",
                name,
                "--vcpus",
                "2",
                "--baseline",
                "10",
                "--credits",
                "0",
                "--shutdown-timeout",
                "0",
                "--",
            ])
            .args(qemu_args(bios))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = state::find(&self.state(), name) {
                if self.state().join(name).join("credits.json").exists() {
                    return (child, r.0);
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn stop(&self, name: &str, mut child: Child) {
        let _ = Command::new(&self.launcher)
            .args(["stop", name, "--state-dir"])
            .arg(self.state())
            .output();
        let _ = child.wait();
    }
}

/// A busy guest under a quota written by hand: returns |share − 20|.
fn bare(bios: &Path, version: Version, mount: &Path) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut q = Command::new("qemu-system-x86_64")
        .args(&qemu_args(bios)[1..])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .spawn()
        .unwrap();
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = qmp::Client::connect(&sock, Duration::from_secs(10)).unwrap();
    let cpus = c.execute(qmp::qapi::qmp::query_cpus_fast {}).unwrap();
    let tids: Vec<u32> = cpus
        .iter()
        .map(|cpu| {
            serde_json::to_value(cpu).unwrap()["thread-id"]
                .as_u64()
                .unwrap() as u32
        })
        .collect();
    drop(c);
    let cg = mount.join(format!("bare-quota-{}", q.id()));
    std::fs::create_dir(&cg).unwrap();
    match version {
        Version::V1 => {
            std::fs::write(cg.join("cpu.cfs_period_us"), "100000").unwrap();
            std::fs::write(cg.join("cpu.cfs_quota_us"), "20000").unwrap();
            for t in &tids {
                std::fs::write(cg.join("tasks"), t.to_string()).unwrap();
            }
        }
        Version::V2 => {
            // The cpu controller for the root's children (the agent does the same for its own).
            std::fs::write(mount.join("cgroup.subtree_control"), "+cpu").unwrap();
            std::fs::write(cg.join("cgroup.procs"), q.id().to_string()).unwrap();
            std::fs::write(cg.join("cpu.max"), "20000 100000").unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(1300));
    let s = share(q.id(), &tids, 10.0);
    q.kill().unwrap();
    q.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_dir(&cg).unwrap();
    println!("  bare quota:  {s:6.2} % of one CPU");
    (s - 20.0).abs()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let parts = std::env::args().nth(2).unwrap_or_else(|| "123".into());
    let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/burst-qemu");
    assert!(launcher.exists(), "build it first: cargo build --release");
    let (version, mount) = cgroup::detect_host().expect("a cgroup cpu controller");
    let dirs = dirs(&launcher, true);
    println!(
        "state dir {} ({}), data dir on disk",
        dirs.state().display(),
        fs_type(&dirs.state())
    );
    let busy = dirs.root.path().join("busy.bin");
    let halt = dirs.root.path().join("halt.bin");
    testguest::write(&busy, Behaviour::Busy).unwrap();
    testguest::write(&halt, Behaviour::Halt).unwrap();

    if parts.contains('1') {
        println!(
            "1. error at baseline, 2 busy vCPUs held to 20 % of one CPU, 10 s each, cgroup {version}"
        );
        let (mut bare_err, mut ours_err) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            bare_err.push(bare(&busy, version, &mount));
            let name = format!("acc{round}");
            let (child, r) = dirs.launch(&name, &busy);
            std::thread::sleep(Duration::from_millis(1000));
            let s = share(r.pid, &r.vcpu_tids, 10.0);
            println!("  burst-qemu:  {s:6.2} % of one CPU");
            ours_err.push((s - 20.0).abs());
            dirs.stop(&name, child);
        }
        let (b, o) = (median(bare_err), median(ours_err));
        println!("  median |error|: bare {b:.3} points, burst-qemu {o:.3} points (goal: within 2x of bare, i.e. ≤ {:.3})", 2.0 * b.max(0.05));
    }

    if parts.contains('2') {
        println!("2. agent CPU with 10 running VMs (halting guests), over 20 s, tmpfs and disk alternating");
        let (mut tmp, mut disk) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            tmp.push(agent_cpu(&dirs, &halt));
            disk.push(agent_cpu(&self::dirs(&launcher, false), &halt));
        }
        println!(
            "  median: {:.3} % on tmpfs, {:.3} % on disk (goal: under 1 % for both)",
            median(tmp),
            median(disk)
        );
    }

    if parts.contains('3') {
        edit_latency(&dirs, &halt, version, &mount);
    }
}

fn edit_latency(dirs: &Dirs, halt: &Path, version: Version, mount: &Path) {
    println!("3. config edit → new quota written (10 edits)");
    let (child, _) = dirs.launch("fleet0", halt);
    let cfg = dirs.root.path().join("vms/fleet0.toml");
    let quota_file = {
        let d = mount
            .join("burst-qemu")
            .join(cgroup::instance_name(&dirs.state()))
            .join("fleet0");
        match version {
            Version::V1 => d.join("cpu.cfs_quota_us"),
            Version::V2 => d.join("vcpus/cpu.max"),
        }
    };
    let mut lat = Vec::new();
    for i in 0..10 {
        let before = std::fs::read_to_string(&quota_file).unwrap();
        let text = std::fs::read_to_string(&cfg).unwrap();
        let (from, to) = if i % 2 == 0 {
            ("baseline = 10", "baseline = 30")
        } else {
            ("baseline = 30", "baseline = 10")
        };
        let t = Instant::now();
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        while std::fs::read_to_string(&quota_file).unwrap() == before {
            assert!(t.elapsed() < Duration::from_secs(5), "edit not applied");
            std::thread::sleep(Duration::from_micros(500));
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "  median {:.1} ms (min {:.1}, max {:.1}; goal: under 250 ms)",
        median(lat.clone()),
        lat.iter().cloned().fold(f64::MAX, f64::min),
        lat.iter().cloned().fold(0.0, f64::max)
    );
    dirs.stop("fleet0", child);
}
