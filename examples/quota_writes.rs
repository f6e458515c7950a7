//! Diagnoses what a held VM runs when its CPU quota is rewritten and when its agent is killed
//! (issue 18: "~24 % for a second after the agent is SIGKILLed at a 20 % quota"). Needs root,
//! QEMU and a cgroup cpu controller (v1 here, v2 in the guests of tests/guest/run).
//!
//! A busy 2-vCPU test guest is held to 20 % of one CPU (10 % baseline, no credits) by the
//! agent the launcher starts; this program samples its vCPU threads' CPU time and the quota file
//! every 5 ms through three phases of `SECS` seconds each:
//!
//! * **steady**: nothing happens;
//! * **rewrites**: the same quota is written again every 200 ms (what an agent whose grant
//!   changes at every tick does);
//! * **agent killed**: the agent is SIGKILLed at the start (the launcher starts a new one).
//!
//! For each it prints the share over the phase, the largest share over any 1-second window, the
//! quota writes seen (changes of the file) and the quota in force, and for the last phase the
//! share per 100 ms period around the kill.
//!
//! ```sh
//! cargo build --features scx && cargo run --example quota_writes [-- SECS]
//! # in the scx guest, with the scx enforcer:
//! tests/guest/run --kernel scx-6.12 --cpus 3 --mem 2048 -- env BURST_QEMU_ENFORCER=scx \
//!     BURST_QEMU_SCX_CPUS=1-2 target/debug/examples/quota_writes
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::enforce::cgroup::{self, Version};
use burst_qemu::state;
use burst_qemu::testguest::{self, Behaviour};

fn cpu_ns(pid: u32, tids: &[u32]) -> u64 {
    tids.iter()
        .map(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0u64)
        })
        .sum()
}

/// One sample: seconds since the phase began, the threads' CPU ns, the quota file's text.
type Sample = (f64, u64, String);

fn sample(
    pid: u32,
    tids: &[u32],
    quota: &Path,
    secs: f64,
    mut every: impl FnMut(f64),
) -> Vec<Sample> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    while t0.elapsed().as_secs_f64() < secs {
        let t = t0.elapsed().as_secs_f64();
        every(t);
        let q = std::fs::read_to_string(quota).unwrap_or_default();
        out.push((t, cpu_ns(pid, tids), q.trim().to_owned()));
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

fn report(phase: &str, s: &[Sample]) {
    let (first, last) = (&s[0], &s[s.len() - 1]);
    let share = (last.1 - first.1) as f64 / 1e7 / (last.0 - first.0);
    // The largest share over a 1-second window (sample to sample).
    let mut worst: f64 = 0.0;
    for (i, a) in s.iter().enumerate() {
        if let Some(b) = s[i..].iter().find(|b| b.0 - a.0 >= 1.0) {
            worst = worst.max((b.1 - a.1) as f64 / 1e7 / (b.0 - a.0));
        }
    }
    let changes = s.windows(2).filter(|w| w[0].2 != w[1].2).count();
    let quotas: std::collections::BTreeSet<&str> = s.iter().map(|x| x.2.as_str()).collect();
    println!(
        "{phase:<13} {share:6.2} % of one CPU over {:.1} s; worst 1-s window {worst:6.2} %; quota file changed {changes} times; values {quotas:?}",
        last.0 - first.0
    );
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3.0);
    let exe = std::env::var_os("BURST_QEMU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/burst-qemu"));
    assert!(exe.exists(), "no {} (cargo build first)", exe.display());
    let (version, mount) = cgroup::detect_host().expect("a cgroup cpu controller");
    let dir = tempfile::Builder::new()
        .prefix("bqq")
        .tempdir_in("/tmp")
        .unwrap();
    let state_dir = dir.path().join("state");
    let busy = dir.path().join("busy.bin");
    testguest::write(&busy, Behaviour::Busy).unwrap();
    let mut qemu = testguest::qemu_command(&busy, "tcg,thread=multi", 16);
    qemu.extend(["-smp".into(), "2".into()]);
    let mut launcher = Command::new(&exe)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--vms")
        .arg(dir.path().join("vms"))
        .env("BURST_QEMU_DATA_DIR", dir.path().join("data"))
        .args([
            "--name",
            "held",
            "--vcpus",
            "2",
            "--baseline",
            "10",
            "--credits",
            "0",
        ])
        .args(["--shutdown-timeout", "0", "--"])
        .args(&qemu)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        if let Some((r, _)) = state::find(&state_dir, "held") {
            if state_dir.join("held/credits.json").exists() {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the VM did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let vcpus = mount
        .join("burst-qemu")
        .join(cgroup::instance_name(&state_dir))
        .join("held");
    let (quota, vcpus) = match version {
        Version::V1 => (vcpus.join("cpu.cfs_quota_us"), vcpus),
        Version::V2 => (vcpus.join("vcpus/cpu.max"), vcpus.join("vcpus")),
    };
    println!(
        "cgroup {version}, enforcer {}, quota file {}",
        std::env::var("BURST_QEMU_ENFORCER").unwrap_or_else(|_| "auto".into()),
        quota.display()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (pid, tids) = (record.pid, record.vcpu_tids.clone());

    let steady = sample(pid, &tids, &quota, secs, |_| {});
    report("steady", &steady);

    let text = std::fs::read_to_string(&quota).unwrap();
    let mut next = 0.0;
    let rewrites = sample(pid, &tids, &quota, secs, |t| {
        if t >= next {
            let _ = std::fs::write(&quota, text.trim());
            next += 0.2;
        }
    });
    report("rewrites", &rewrites);

    let agent: i32 = std::fs::read_to_string(state_dir.join("agent.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let before = std::fs::read_to_string(vcpus.join("cpu.stat")).unwrap_or_default();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = sample(pid, &tids, &quota, secs, |_| {});
    report("agent killed", &killed);
    let after = std::fs::read_to_string(vcpus.join("cpu.stat")).unwrap_or_default();
    println!("cpu.stat before the kill:\n{before}after:\n{after}");
    println!("per 100 ms after the kill (% of one CPU, quota):");
    let mut line = String::new();
    let mut from = &killed[0];
    for s in &killed {
        if s.0 - from.0 >= 0.1 {
            line.push_str(&format!(
                " {:.1}:{:.0}[{}]",
                from.0,
                (s.1 - from.1) as f64 / 1e7 / (s.0 - from.0),
                s.2.split_whitespace().next().unwrap_or("")
            ));
            from = s;
        }
    }
    println!("{line}");
    let log = std::fs::read_to_string(state_dir.join("agent.log")).unwrap_or_default();
    println!("agent log (last lines):");
    for l in log.lines().rev().take(12).collect::<Vec<_>>().iter().rev() {
        println!("  {l}");
    }
    let _ = Command::new(&exe)
        .args(["stop", "held", "--state-dir"])
        .arg(&state_dir)
        .output();
    let _ = launcher.wait();
}
