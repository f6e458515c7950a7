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
    let window = Duration::from_secs(10);
    let t0 = Instant::now();
    let before: Vec<u64> = vms
        .iter()
        .map(|v| read_bytes(&v.record.qmp_socket))
        .collect();
    std::thread::sleep(window);
    let after: Vec<u64> = vms
        .iter()
        .map(|v| read_bytes(&v.record.qmp_socket))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let got: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / secs)
        .collect();
    let plan: Vec<f64> = spec
        .iter()
        .map(|(name, _)| view(&s, name)["disk"]["read_limit_bps"].as_u64().unwrap() as f64)
        .collect();
    for (i, (name, share)) in spec.iter().enumerate() {
        println!(
            "{name}: share {share} %, template {:.2} MB/s, plan {:.2} MB/s, measured {:.2} MB/s",
            capacity * f64::from(*share) / 100.0 / MB,
            plan[i] / MB,
            got[i] / MB
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
    // What QEMU's throttle delivers against a limit: +1.7 % and +3.6 % over 10 s (docs/contention.md
    // table), +4.8 % and +6.7 % in CI run 18 (2026-12-06; not explained), so each VM within 8 %
    // of its limit, at least 97 % of its template, and the two together 97-105 % of the
    // bandwidth (104.4 % in that run).
    for i in 0..spec.len() {
        assert!(
            (got[i] / plan[i] - 1.0).abs() <= 0.08,
            "{} read {:.2} MB/s against its limit {:.2}",
            spec[i].0,
            got[i] / MB,
            plan[i] / MB
        );
        assert!(
            got[i] >= templates[i] * 0.97,
            "{} got {:.2} MB/s, below its template {:.2}",
            spec[i].0,
            got[i] / MB,
            templates[i] / MB
        );
    }
    assert!(
        (ratio_got / ratio_plan - 1.0).abs() <= 0.10,
        "measured ratio {ratio_got:.3} vs plan {ratio_plan:.3}"
    );
    let total: f64 = got.iter().sum();
    assert!(
        (0.97..=1.05).contains(&(total / capacity)),
        "the VMs read {:.2} MB/s together of the {:.2} MB/s bandwidth",
        total / MB,
        capacity / MB
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
