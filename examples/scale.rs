//! The agent's cost at scale, measured on real QEMU and cgroups: starts an agent (state and data
//! dirs on disk, metrics served), launches N halting 1-vCPU test-guest VMs from a loop of
//! `burst-qemu` launchers (as a shell loop would), and reports:
//!
//! - launch to enforced: from each launcher's start until every vCPU thread of the VM sits in
//!   its cgroup (median, max), and the same for one more VM launched into the settled fleet;
//! - the agent's CPU (% of one core, from its threads' `schedstat` over 20 s of idle fleet) and
//!   its RSS; the launchers' CPU over the same 20 s, all of them together (each wakes for its
//!   agent watchdog);
//! - `ls`, `ls --json`, `credits NAME --json` wall time (median of 7), `/metrics` scrape time
//!   (median of 7) and size;
//! - stop-all time (`burst-qemu stop` of every VM at once);
//! - that nothing is left behind: no runtime dir, no process of the run, no cgroup.
//!
//! Needs root (cgroups). Prints one Markdown table row (see docs/scale.md):
//!
//! ```sh
//! cargo build --release --examples
//! sudo target/release/examples/scale 100 [--bin PATH-TO-burst-qemu] [--keep]
//! ```
//!
//! The binary defaults to the `burst-qemu` beside this example's directory; `--bin` measures
//! another build in the same conditions (before/after). With `BQ_SCALE_PERF=FILE` the idle
//! agent is also profiled for 10 s (`perf record -g`, after its CPU is measured), and with
//! `BQ_SCALE_STRACE=FILE` its system calls are traced for 5 s (`strace -f`). Exits non-zero
//! when something is left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::enforce::cgroup;

/// How long the idle fleet is measured.
const IDLE: Duration = Duration::from_secs(20);
/// Runs of each command timed.
const RUNS: usize = 7;

struct Run {
    bin: PathBuf,
    work: PathBuf,
    accel: String,
}

impl Run {
    fn state(&self) -> PathBuf {
        self.work.join("state")
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("BURST_QEMU_STATE_DIR", self.state())
            .env("BURST_QEMU_DATA_DIR", self.work.join("data"))
            .env("BURST_QEMU_VMS", self.work.join("vms"))
            .env("BURST_QEMU_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    /// Starts a launcher for a halting 1-vCPU VM named `name`.
    fn launch(&self, name: &str) -> Child {
        let fw = self.work.join("halt.bin");
        self.cmd()
            .args(["--name", name, "--vcpus", "1", "--baseline", "10"])
            .args(["--shutdown-timeout", "0", "--"])
            .args(["qemu-system-x86_64", "-machine", "pc", "-nodefaults"])
            .args([
                "-display",
                "none",
                "-m",
                "16",
                "-accel",
                &self.accel,
                "-bios",
            ])
            .arg(fw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a launcher")
    }

    /// Wall time of `burst-qemu ARGS` (median of [`RUNS`]), ms; fails unless it succeeds.
    fn time(&self, args: &[&str]) -> f64 {
        median(
            (0..RUNS)
                .map(|_| {
                    let t = Instant::now();
                    let out = self.cmd().args(args).output().expect("running burst-qemu");
                    assert!(out.status.success(), "{args:?}: {out:?}");
                    ms(t.elapsed())
                })
                .collect(),
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether every vCPU thread of `name` sits in its cgroup (`…/burst-qemu/INSTANCE/name`).
fn enforced(state: &Path, instance: &str, name: &str) -> bool {
    let Ok(bytes) = std::fs::read(state.join(name).join("vm.json")) else {
        return false;
    };
    let Ok(r) = serde_json::from_slice::<burst_qemu::state::VmRecord>(&bytes) else {
        return false;
    };
    let want = format!("/burst-qemu/{instance}/{name}");
    !r.vcpu_tids.is_empty()
        && r.vcpu_tids.iter().all(|t| {
            std::fs::read_to_string(format!("/proc/{}/task/{t}/cgroup", r.pid))
                .is_ok_and(|c| c.lines().any(|l| l.contains(&want)))
        })
}

/// Waits until every VM of `started` (name → launch time) is enforced; each one's latency, ms.
fn wait_enforced(run: &Run, started: &HashMap<String, Instant>) -> Vec<f64> {
    let instance = cgroup::instance_name(&run.state());
    let mut left: Vec<&String> = started.keys().collect();
    let mut took = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !left.is_empty() {
        assert!(
            Instant::now() < deadline,
            "not enforced after 300 s: {left:?}"
        );
        left.retain(|name| {
            if enforced(&run.state(), &instance, name) {
                took.push(ms(started[*name].elapsed()));
                return false;
            }
            true
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    took
}

/// CPU time of every thread of `pid`, ns.
fn cpu_ns(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process runs");
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Processes (other than `except`) whose command line names the run's directory.
fn processes_of(work: &Path, except: u32) -> Vec<u32> {
    let needle = work.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != except && pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Starts the agent (serving metrics on a free loopback port).
fn spawn_agent(run: &Run) -> Child {
    let log = std::fs::File::create(run.work.join("agent.log")).expect("agent log");
    run.cmd()
        .args(["agent", "--metrics-listen", "127.0.0.1:0"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting the agent")
}

/// Where the agent serves metrics, once it says (`None` after 10 s).
fn metrics_addr(run: &Run) -> Option<std::net::SocketAddr> {
    let addr_file = run.state().join(burst_qemu::metrics::ADDR_FILE);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(a) = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Stops every VM at once; the wall time until all launchers are gone, ms.
fn stop_all(run: &Run, launchers: Vec<Child>, names: &[String]) -> f64 {
    let t = Instant::now();
    let stops: Vec<Child> = names
        .iter()
        .map(|n| {
            run.cmd()
                .args(["stop", n, "--wait", "60"])
                .stdout(Stdio::null())
                .spawn()
                .expect("burst-qemu stop")
        })
        .collect();
    for mut c in stops.into_iter().chain(launchers) {
        let _ = c.wait();
    }
    ms(t.elapsed())
}

/// What is left of the run: runtime dirs, processes, cgroups.
fn leftovers(run: &Run, agent: u32, instance_dir: Option<&Path>) -> Vec<String> {
    let mut left = Vec::new();
    for e in std::fs::read_dir(run.state())
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().is_dir() {
            left.push(format!("runtime dir {}", e.path().display()));
        }
    }
    for pid in processes_of(&run.work, agent) {
        left.push(format!("process {pid}"));
    }
    if let Some(d) = instance_dir {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                left.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    left
}

fn scrape(addr: std::net::SocketAddr) -> (f64, usize) {
    let mut size = 0;
    let t = median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                size = burst_qemu::metrics::scrape(addr).expect("scrape").len();
                ms(t.elapsed())
            })
            .collect(),
    );
    (t, size)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let exe = std::env::current_exe().expect("own path");
    let default_bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("burst-qemu"));
    let bin = args
        .iter()
        .position(|a| a == "--bin")
        .and_then(|i| args.get(i + 1).map(PathBuf::from))
        .or(default_bin)
        .expect("a burst-qemu binary");
    let keep = args.iter().any(|a| a == "--keep");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "scale needs root (cgroups)");
    let work = PathBuf::from(format!("/var/tmp/bq-scale.{}", std::process::id()));
    std::fs::create_dir_all(work.join("vms")).expect("work dir");
    let accel = match std::env::var("BURST_QEMU_TEST_ACCEL").as_deref() {
        Ok("kvm") => "kvm".to_owned(),
        _ => "tcg,thread=multi".to_owned(),
    };
    let run = Run { bin, work, accel };
    let fw = run.work.join("halt.bin");
    let ok = run.cmd().arg("test-guest").arg("--halt").arg(&fw).status();
    assert!(ok.is_ok_and(|s| s.success()), "writing the test guest");
    let left = measure(&run, n);
    if !keep {
        let _ = std::fs::remove_dir_all(&run.work);
    }
    if !left.is_empty() {
        eprintln!("left behind: {left:#?}");
        std::process::exit(1);
    }
}

/// The whole measurement for `n` VMs; what was left behind.
fn measure(run: &Run, n: usize) -> Vec<String> {
    let mut agent = spawn_agent(run);
    let Some(addr) = metrics_addr(run) else {
        let _ = agent.kill();
        let _ = agent.wait();
        panic!("the agent serves no metrics (see {})", run.work.display());
    };
    let names: Vec<String> = (0..n).map(|i| format!("s{i:03}")).collect();
    let mut started = HashMap::new();
    let t = Instant::now();
    let mut launchers: Vec<Child> = names
        .iter()
        .map(|name| {
            started.insert(name.clone(), Instant::now());
            run.launch(name)
        })
        .collect();
    let latencies = wait_enforced(run, &started);
    let all = ms(t.elapsed());
    std::thread::sleep(Duration::from_secs(5));
    let launchers_ns = || -> u64 { launchers.iter().map(|c| cpu_ns(c.id())).sum() };
    let (cpu0, launchers0, t0) = (cpu_ns(agent.id()), launchers_ns(), Instant::now());
    std::thread::sleep(IDLE);
    let (cpu1, launchers1, idle) = (cpu_ns(agent.id()), launchers_ns(), t0.elapsed());
    let cpu_pct = (cpu1 - cpu0) as f64 / idle.as_nanos() as f64 * 100.0;
    let launchers_pct = (launchers1 - launchers0) as f64 / idle.as_nanos() as f64 * 100.0;
    let rss = rss_kib(agent.id());
    if let Ok(out) = std::env::var("BQ_SCALE_PERF") {
        // A profile of the idle fleet's agent, after (not during) its CPU is measured.
        let pid = agent.id().to_string();
        let perf = Command::new("perf")
            .args(["record", "-g", "-o", &out, "-p", &pid, "--", "sleep", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        eprintln!("perf record of the agent into {out}: {perf:?}");
    }
    if let Ok(out) = std::env::var("BQ_SCALE_STRACE") {
        // Which system calls the idle agent makes, on which files, for 5 s (after its CPU is
        // measured: strace slows it down many times).
        let pid = agent.id().to_string();
        let strace = Command::new("timeout")
            .args(["5", "strace", "-f", "-qq", "-o", &out, "-p", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        eprintln!("strace of the agent into {out}: {strace:?}");
    }
    let ls = run.time(&["ls"]);
    let ls_json = run.time(&["ls", "--json"]);
    let credits = run.time(&["credits", &names[0], "--json"]);
    let (scrape_ms, scrape_bytes) = scrape(addr);
    // One more VM into the settled fleet.
    let extra = "s-extra".to_owned();
    let one = HashMap::from([(extra.clone(), Instant::now())]);
    launchers.push(run.launch(&extra));
    let into_fleet = wait_enforced(run, &one)[0];
    let mut all_names = names.clone();
    all_names.push(extra);
    std::thread::sleep(Duration::from_secs(1));
    let stop_ms = stop_all(run, launchers, &all_names);
    let (_, mount) = cgroup::detect_host().expect("a cgroup hierarchy with cpu");
    let instance_dir = mount
        .join("burst-qemu")
        .join(cgroup::instance_name(&run.state()));
    // The agent lets each ended VM go within a rescan (1 s).
    std::thread::sleep(Duration::from_secs(2));
    let mut left = leftovers(run, agent.id(), Some(&instance_dir));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    if instance_dir.exists() {
        left.push(format!("cgroup {}", instance_dir.display()));
    }
    left.extend(leftovers(run, 0, None));
    let lat = median(latencies.clone());
    let max = latencies.iter().copied().fold(0.0, f64::max);
    println!("| VMs | agent CPU | launchers CPU | agent RSS | ls | ls --json | credits --json | /metrics | launch→enforced median / max | all {n} enforced | +1 into fleet | stop all |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} | {cpu_pct:.2} % | {launchers_pct:.2} % | {:.1} MiB | {ls:.1} ms | {ls_json:.1} ms | {credits:.1} ms | {scrape_ms:.1} ms, {:.0} KiB | {lat:.0} / {max:.0} ms | {:.1} s | {into_fleet:.0} ms | {:.1} s |",
        rss as f64 / 1024.0,
        scrape_bytes as f64 / 1024.0,
        all / 1000.0,
        stop_ms / 1000.0
    );
    left
}
