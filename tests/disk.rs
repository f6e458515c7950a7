//! Disk bandwidth under contention on real QEMU: two VMs running a real Linux kernel (Debian's,
//! through the guest harness's `--prepare`) read their virtio disks flat out; the agent shares
//! `--disk-bandwidth` by ResCoin's rule with templates 2:1 and throttles each VM's drives through
//! QMP `block_set_io_throttle`. The bandwidth each VM gets is measured here, from QEMU's own
//! counters, and must match the agent's plan. Runs in the `qemu` test group.
//!
//! `cargo nextest run --test disk --no-capture` prints the figures.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MB: f64 = 1_000_000.0;

/// Bytes the VM's guest drives have read, from QEMU.
fn read_bytes(socket: &Path) -> u64 {
    burst_qemu::balance::disk::drive_bytes(socket).unwrap().0
}

/// A prepared Linux guest that reads its first disk over and over, bypassing its page cache.
fn prepare_reader(dir: &Path) -> Option<Vec<String>> {
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/run");
    let out = Command::new(run)
        .args(["--kernel", "debian-6.1", "--prepare"])
        .arg(dir)
        .args([
            "--",
            "sh",
            "-c",
            "while :; do dd if=/dev/vda of=/dev/null bs=256k iflag=direct 2>/dev/null; done",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).into_owned();
        skip_or_fail(&format!("cannot prepare a Linux guest: {why}"));
        return None;
    }
    let args = std::fs::read_to_string(dir.join("qemu-args")).unwrap();
    Some(args.lines().map(str::to_owned).collect())
}

#[test]
fn two_linux_guests_reading_flat_out_share_the_disk_bandwidth_by_their_templates() {
    if !(require_qemu() && require_cgroups()) {
        return;
    }
    let s = Scratch::new();
    let Some(guest) = prepare_reader(&s.path().join("guest")) else {
        return;
    };
    // 30 MB/s shared; templates 50 % and 25 % (15 and 7.5 MB/s, 2:1); the 7.5 MB/s nobody is
    // guaranteed is the spare, split by the rule. Both read as fast as they may.
    let capacity = 30.0 * MB;
    std::env::set_var("BURST_QEMU_DISK_BANDWIDTH", "30M");
    let spec = [("big", 50), ("small", 25)];
    let vms: Vec<Launched> = spec
        .iter()
        .map(|(name, share)| {
            write_config(
                &s,
                name,
                &format!("vcpus = 1\nbaseline = 100\ndisk_share = {share}\n"),
            );
            let disk = s.path().join(format!("{name}.img"));
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(256 << 20)
                .unwrap();
            let mut qemu = vec![
                QEMU.to_owned(),
                "-accel".into(),
                "tcg,thread=multi".into(),
                "-m".into(),
                "256".into(),
                "-drive".into(),
                format!("file={},if=virtio,format=raw", disk.display()),
                "-serial".into(),
                format!("file:{}", s.path().join(format!("{name}.log")).display()),
            ];
            qemu.extend(guest.iter().cloned());
            Launched::start(&s, name, &[], &qemu)
        })
        .collect();
    // Boot (about 3 s each under TCG), then both held for a while.
    wait_until("both VMs throttled", Duration::from_secs(60), || {
        spec.iter().all(|(name, _)| {
            view(&s, name)["disk"]["read_limit_bps"]
                .as_u64()
                .is_some_and(|l| l > 0)
        })
    });
    // Then until the limits hold still for 3 s (a limit is rewritten only when the plan moves
    // by 2 %; was a fixed 8 s).
    let limits = || -> Vec<u64> {
        spec.iter()
            .map(|(name, _)| {
                view(&s, name)["disk"]["read_limit_bps"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect()
    };
    let mut since = (limits(), Instant::now());
    let held = wait_until("the limits held still", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = limits();
        if now != since.0 {
            since = (now, Instant::now());
        }
        since.1.elapsed() >= Duration::from_secs(3)
    });
    eprintln!("limits held still {held:?} after both were throttled");
    // The window. The limits are followed through it (every 100 ms, from the agent's view):
    // ResCoin's split depends on the VMs' history, so a limit can still move in it, and each
    // rewrite restarts QEMU's leaky bucket, which lets a tenth of a second's worth through at
    // once (src/balance/disk.rs). What a VM may read in the window is the limits in force over
    // it plus that tenth of a second at each rewrite.
    let window = Duration::from_secs(10);
    let before: Vec<u64> = vms
        .iter()
        .map(|v| read_bytes(&v.record.qmp_socket))
        .collect();
    let t0 = Instant::now();
    let mut in_force = limits();
    let mut last = t0;
    let mut under_limits = vec![0.0_f64; spec.len()];
    let mut bursts = vec![0.0_f64; spec.len()];
    let mut rewrites = vec![0_u32; spec.len()];
    while t0.elapsed() < window {
        std::thread::sleep(Duration::from_millis(100));
        let now = limits();
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        for i in 0..spec.len() {
            under_limits[i] += in_force[i] as f64 * dt;
            if now[i] != in_force[i] {
                rewrites[i] += 1;
                bursts[i] += now[i] as f64 * 0.1;
            }
        }
        in_force = now;
    }
    let after: Vec<u64> = vms
        .iter()
        .map(|v| read_bytes(&v.record.qmp_socket))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    for i in 0..spec.len() {
        under_limits[i] += in_force[i] as f64 * last.elapsed().as_secs_f64();
    }
    let got: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / secs)
        .collect();
    // The limits in force over the window (their mean), and what each VM may read: those and
    // the tenth of a second each rewrite lets through.
    let plan: Vec<f64> = under_limits.iter().map(|h| h / secs).collect();
    let may: Vec<f64> = under_limits
        .iter()
        .zip(&bursts)
        .map(|(h, b)| (h + b) / secs)
        .collect();
    for (i, (name, share)) in spec.iter().enumerate() {
        println!(
            "{name}: share {share} %, template {:.2} MB/s, limits in force {:.2} MB/s \
             ({} rewrites in the window, {:.2} MB/s at its end; with their bursts {:.2} MB/s), \
             measured {:.2} MB/s ({:+.1} % of the limits, {:+.1} % with the bursts)",
            capacity * f64::from(*share) / 100.0 / MB,
            plan[i] / MB,
            rewrites[i],
            in_force[i] as f64 / MB,
            may[i] / MB,
            got[i] / MB,
            (got[i] / plan[i] - 1.0) * 100.0,
            (got[i] / may[i] - 1.0) * 100.0
        );
    }
    let (ratio_plan, ratio_got) = (plan[0] / plan[1], got[0] / got[1]);
    println!(
        "ratio big/small: plan {ratio_plan:.3}, measured {ratio_got:.3} ({:+.1} %); total {:.2} of {:.2} MB/s",
        (ratio_got / ratio_plan - 1.0) * 100.0,
        got.iter().sum::<f64>() / MB,
        capacity / MB
    );
    // Against the figures given, not only the agent's plan (a plan that ignored the templates
    // would be matched by the measurement all the same): ResCoin's rule gives each VM at least
    // its template (both want more) and hands the whole spare out, so the limits sum to the
    // bandwidth (within the 2 % a limit is kept while the plan stays near it).
    let templates: Vec<f64> = spec
        .iter()
        .map(|(_, share)| capacity * f64::from(*share) / 100.0)
        .collect();
    for i in 0..spec.len() {
        assert!(
            plan[i] >= templates[i] * 0.98,
            "{}: limit {:.2} MB/s below its template {:.2}",
            spec[i].0,
            plan[i] / MB,
            templates[i] / MB
        );
    }
    let planned: f64 = plan.iter().sum();
    assert!(
        (planned / capacity - 1.0).abs() <= 0.02,
        "the limits sum to {:.2} MB/s, not the {:.2} MB/s bandwidth",
        planned / MB,
        capacity / MB
    );
    // What QEMU's throttle delivers: the limits in force, plus a tenth of a second's worth at
    // each rewrite. Measured (2026-12-07, six runs, this host): -0.2 to +0.3 % of that with
    // 0 to 3 rewrites in the window (+2.1 to +3.1 % of the limits alone with 2 or 3). So each VM within
    // 1.5 % of it, at least 97 % of its template, and the two together at least 97 % of the
    // bandwidth and no more than the limits and their bursts allow. (The bound of 8 % of the
    // final limit alone before failed in a CI run of 23ad4ea at 31.65 MB/s of 30: the
    // rewrites in that window, not counted then.)
    for i in 0..spec.len() {
        assert!(
            got[i] >= plan[i] * 0.985 && got[i] <= may[i] * 1.015,
            "{} read {:.2} MB/s against its limits {:.2} ({:.2} with the rewrites' bursts)",
            spec[i].0,
            got[i] / MB,
            plan[i] / MB,
            may[i] / MB
        );
        assert!(
            got[i] >= templates[i] * 0.97,
            "{} got {:.2} MB/s, below its template {:.2}",
            spec[i].0,
            got[i] / MB,
            templates[i] / MB
        );
    }
    let ratio_may = may[0] / may[1];
    assert!(
        (ratio_got / ratio_may - 1.0).abs() <= 0.03,
        "measured ratio {ratio_got:.3} vs the limits' {ratio_may:.3}"
    );
    let total: f64 = got.iter().sum();
    let allowed: f64 = may.iter().sum();
    assert!(
        total >= capacity * 0.97 && total <= allowed * 1.015,
        "the VMs read {:.2} MB/s together of the {:.2} MB/s bandwidth ({:.2} with the \
         rewrites' bursts)",
        total / MB,
        capacity / MB,
        allowed / MB
    );
    // Neither guest hit an I/O error or a panic.
    for (name, _) in spec {
        let log = std::fs::read_to_string(s.path().join(format!("{name}.log"))).unwrap();
        assert!(
            !log.contains("I/O error") && !log.contains("Kernel panic"),
            "{name}'s console: {log}"
        );
    }
    drop(vms);
}
