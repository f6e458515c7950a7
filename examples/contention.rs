//! Contention measured side by side on real cgroups (needs root, QEMU and a cgroup cpu
//! controller): three 2-vCPU VMs, every vCPU busy, baselines 40/20/10 % per vCPU (80, 40 and
//! 20 % of one CPU), all with credits, on this host's CPUs — with the contention stage off
//! (plain caps: each VM capped by its credits alone) and under each spare rule given (default:
//! `off rescoin headroom`), in turn, ROUNDS times.
//!
//! For each: the CPU each VM received over 10 s after 12 s to settle, the stage's plan and
//! Jain's fairness index of delivered/planned (off: against an even split), the planner's
//! prediction for a history-free rule, and each VM's spread between rounds. Then, with the last
//! rule given (unless `--no-phase-change`), a phase change: the
//! 80 % VM is paused for 10 s and resumed: how long until every VM is back within 1 point of
//! its baseline guarantee, and the EWMA's prediction error (|estimate − use| each second).
//!
//! ```sh
//! cargo build --release && cargo run --release --example contention [-- ROUNDS [RULE…] [--no-phase-change]]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::contention::{self, jain, SpareRule};
use burst_qemu::credit::{Rate, PPM_PER_CPU};
use burst_qemu::state;
use burst_qemu::testguest::{self, Behaviour};

const VMS: [(&str, &str); 3] = [("big", "40"), ("mid", "20"), ("small", "10")];

fn cpu_ns(pid: u32, tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Percent of one CPU each VM's threads used over `secs`, read in this process at both ends.
fn shares(vms: &[state::VmRecord], secs: f64) -> Vec<f64> {
    let total =
        |r: &state::VmRecord| -> u64 { r.vcpu_tids.iter().map(|&t| cpu_ns(r.pid, t)).sum() };
    let a: Vec<u64> = vms.iter().map(total).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let b: Vec<u64> = vms.iter().map(total).collect();
    let ns = t.elapsed().as_nanos() as f64;
    a.iter()
        .zip(&b)
        .map(|(a, b)| (b - a) as f64 * 100.0 / ns)
        .collect()
}

struct Fleet {
    dir: tempfile::TempDir,
    launcher: PathBuf,
    children: Vec<Child>,
    records: Vec<state::VmRecord>,
}

impl Fleet {
    fn start(launcher: &Path, busy: &Path, contention: &str) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("bqc")
            .tempdir_in("/tmp")
            .unwrap();
        let mut fleet = Fleet {
            launcher: launcher.to_owned(),
            children: Vec::new(),
            records: Vec::new(),
            dir,
        };
        for (name, baseline) in VMS {
            let mut qemu = testguest::qemu_command(busy, "tcg,thread=multi", 16);
            qemu.push("-S".into());
            let child = Command::new(launcher)
                .arg("--state-dir")
                .arg(fleet.state())
                .arg("--vms")
                .arg(fleet.dir.path().join("vms"))
                .env("BURST_QEMU_DATA_DIR", fleet.dir.path().join("data"))
                .env("BURST_QEMU_CONTENTION", contention)
                .args(["--name", name, "--vcpus", "2", "--baseline", baseline])
                .args(["--credits", "500", "--shutdown-timeout", "0", "--"])
                .args(&qemu)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            fleet.children.push(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            let record = loop {
                if let Some((r, _)) = state::find(&fleet.state(), name) {
                    if fleet.state().join(name).join("credits.json").exists() {
                        break r;
                    }
                }
                assert!(Instant::now() < deadline, "{name} did not start");
                std::thread::sleep(Duration::from_millis(20));
            };
            fleet.records.push(record);
        }
        for (name, _) in VMS {
            fleet.cli(&["resume", name]);
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

    /// The agent's published view of a VM.
    fn view(&self, name: &str) -> serde_json::Value {
        let bytes = std::fs::read(self.state().join(name).join("credits.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// What the stage planned for each VM, percent of one CPU.
    fn planned(&self) -> Vec<f64> {
        VMS.iter()
            .map(|(n, _)| self.view(n)["allocation_pct"].as_f64().unwrap_or(0.0) * 2.0)
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (name, _) in VMS {
            self.cli(&["stop", name]);
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The command line: ROUNDS, then the `--contention` values to compare (default `off
/// rescoin headroom`), `--no-phase-change` to skip the phase change.
fn args() -> (usize, Vec<String>, bool) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = args.first().and_then(|a| a.parse().ok()).unwrap_or(2);
    let phase = !args.iter().any(|a| a == "--no-phase-change");
    let mut modes: Vec<String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    if modes.is_empty() {
        modes = ["off", "rescoin", "headroom"].map(String::from).to_vec();
    }
    (rounds, modes, phase)
}

/// The planner's split of the three busy VMs under `mode` on `cpus` CPUs, when it has one.
fn predicted(mode: &str, cpus: usize) -> Option<Vec<f64>> {
    let rule: SpareRule = mode.parse().ok().filter(|r: &SpareRule| r.history_free())?;
    let fleet: Vec<(Rate, Rate)> = VMS
        .iter()
        .map(|(_, b)| {
            (
                Rate(2 * PPM_PER_CPU),
                Rate(b.parse::<u64>().unwrap() * 20_000),
            )
        })
        .collect();
    let capacity = contention::cpus(u32::try_from(cpus).unwrap());
    let split = contention::busy_split(capacity, rule, &fleet);
    Some(split.iter().map(|r| r.0 as f64 / 10_000.0).collect())
}

fn main() {
    let (rounds, modes, phase) = args();
    let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/burst-qemu");
    assert!(launcher.exists(), "build it first: cargo build --release");
    let images = tempfile::tempdir().unwrap();
    let busy = images.path().join("busy.bin");
    testguest::write(&busy, Behaviour::Busy).unwrap();
    let baselines = [80.0, 40.0, 20.0];
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "three 2-vCPU VMs, all vCPUs busy, baselines 80/40/20 % of one CPU, all with credits, {cpus} CPUs"
    );
    for mode in &modes {
        if let Some(p) = predicted(mode, cpus) {
            println!("  the planner predicts for {mode}: {p:.2?}");
        }
    }
    let mut by_mode: Vec<(String, Vec<Vec<f64>>, Vec<f64>)> = modes
        .iter()
        .map(|m| (m.clone(), Vec::new(), Vec::new()))
        .collect();
    for round in 0..rounds {
        println!(
            "round {}: delivered % of one CPU over 10 s after 12 s",
            round + 1
        );
        for (mode, runs, jains) in &mut by_mode {
            let fleet = Fleet::start(&launcher, &busy, mode);
            std::thread::sleep(Duration::from_secs(12));
            let got = shares(&fleet.records, 10.0);
            // Against the stage's own plan (off: an even split of the CPUs).
            let plan = if mode == "off" {
                vec![cpus as f64 * 100.0 / 3.0; 3]
            } else {
                fleet.planned()
            };
            let short: Vec<String> = got
                .iter()
                .zip(baselines)
                .map(|(g, b)| format!("{g:6.2} (baseline {b:.0}, {:+.2})", g - b))
                .collect();
            let ratio: Vec<f64> = got.iter().zip(&plan).map(|(g, p)| g / p).collect();
            let j = jain(&ratio);
            let plan: Vec<String> = plan.iter().map(|p| format!("{p:.1}")).collect();
            println!(
                "  {mode:<8}: {}  planned {}  Jain(delivered/planned) {j:.4}",
                short.join("  "),
                plan.join(" / ")
            );
            runs.push(got);
            jains.push(j);
        }
    }
    for (mode, runs, jains) in by_mode {
        let spread: Vec<String> = (0..VMS.len())
            .map(|i| {
                let v: Vec<f64> = runs.iter().map(|r| r[i]).collect();
                let max = v.iter().cloned().fold(f64::MIN, f64::max);
                let min = v.iter().cloned().fold(f64::MAX, f64::min);
                format!("{:.2}", max - min)
            })
            .collect();
        println!(
            "{mode}: median Jain {:.4}; spread between rounds (points) {}",
            median(jains),
            spread.join(" / ")
        );
    }
    if let Some(last) = modes.iter().rev().find(|m| *m != "off").filter(|_| phase) {
        phase_change(&launcher, &busy, last);
    }
}

/// With the stage on under `last`: the 80 % VM paused for 10 s, then resumed: how long until
/// every VM is back at its baseline, and the EWMA's prediction error.
fn phase_change(launcher: &Path, busy: &Path, last: &str) {
    let baselines = [80.0, 40.0, 20.0];
    println!("phase change (contention {last}): pause big for 10 s, then resume");
    let fleet = Fleet::start(launcher, busy, last);
    std::thread::sleep(Duration::from_secs(12));
    // The EWMA's prediction error: each second, the estimate made a period earlier against
    // the demand the stage then observed.
    let mut errors = Vec::new();
    let mut previous: Vec<Option<f64>> = vec![None; VMS.len()];
    let mut sample = |fleet: &Fleet| {
        std::thread::sleep(Duration::from_secs(1));
        for (i, (n, _)) in VMS.iter().enumerate() {
            let v = fleet.view(n);
            if let (Some(prev), Some(seen)) = (previous[i], v["observed_demand_pct"].as_f64()) {
                errors.push((prev - seen).abs() * 2.0);
            }
            previous[i] = v["demand_pct"].as_f64();
        }
    };
    fleet.cli(&["pause", "big"]);
    for _ in 0..10 {
        sample(&fleet);
    }
    let plan_idle = fleet.planned();
    let t = Instant::now();
    fleet.cli(&["resume", "big"]);
    let converged = loop {
        let used = shares(&fleet.records, 0.5);
        if used.iter().zip(baselines).all(|(u, b)| *u >= b - 1.0) {
            break Some(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(30) {
            break None;
        }
    };
    for _ in 0..5 {
        sample(&fleet);
    }
    println!(
        "  while big was paused the others were planned {:.1} / {:.1} % of one CPU",
        plan_idle[1], plan_idle[2]
    );
    match converged {
        Some(d) => println!(
            "  after resume every VM was at its baseline (−1 point) within {:.2} s",
            d.as_secs_f64()
        ),
        None => println!("  NOT re-converged within 30 s"),
    }
    println!(
        "  EWMA prediction error (estimate vs the next observed demand) over {} samples: median {:.2}, max {:.2} points of one CPU",
        errors.len(),
        median(errors.clone()),
        errors.iter().cloned().fold(0.0, f64::max)
    );
}
