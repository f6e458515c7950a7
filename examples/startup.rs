//! Start-up goal: from starting `burst-qemu … -- qemu-system-x86_64 …` to the VM registered
//! with its vCPU thread ids, against plain QEMU with the same arguments answering its first
//! QMP command. Trials alternate between the two so machine noise hits both alike; medians
//! and their ratio are printed (goal: ratio ≤ 1.25).
//!
//! ```sh
//! cargo build --release && cargo run --release --example startup [-- TRIALS [--kvm]]
//! ```

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::state;
use burst_qemu::testguest::{self, Behaviour};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let trials: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
    let accel = if args.any(|a| a == "--kvm") {
        "kvm"
    } else {
        "tcg,thread=multi"
    };
    let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/burst-qemu");
    assert!(launcher.exists(), "build it first: cargo build --release");
    let dir = tempfile::tempdir().unwrap();
    let bios = dir.path().join("halt.bin");
    testguest::write(&bios, Behaviour::Halt).unwrap();
    let mut qemu = testguest::qemu_command(&bios, accel, 64);
    qemu.extend(["-smp".into(), "2".into()]);

    let (mut plain, mut wrapped) = (Vec::new(), Vec::new());
    for i in 0..trials {
        // Plain QEMU: the first QMP command answered.
        let sock = dir.path().join(format!("plain{i}.sock"));
        let t = Instant::now();
        let mut q = Command::new(&qemu[0])
            .args(&qemu[1..])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .spawn()
            .unwrap();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let mut c = qmp::Client::handshake(stream, Duration::from_secs(10)).unwrap();
        c.execute(qmp::qapi::qmp::query_status {}).unwrap();
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
        q.kill().unwrap();
        q.wait().unwrap();

        // burst-qemu: the VM registered with its vCPU thread ids.
        let st = dir.path().join("state");
        let t = Instant::now();
        let mut l = Command::new(&launcher)
            .arg("--state-dir")
            .arg(&st)
            .arg("--vms")
            .arg(dir.path().join("vms"))
            .args([
                "--name",
                "timed",
                "--vcpus",
                "2",
                "--baseline",
                "10",
                "--shutdown-timeout",
                "0",
                "--",
            ])
            .args(&qemu)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let rec = loop {
            if let Some((r, _)) = state::find(&st, "timed") {
                break r;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        wrapped.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(rec.vcpu_tids.len(), 2);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(l.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        l.wait().unwrap();
    }
    let (p, w) = (median(plain.clone()), median(wrapped.clone()));
    println!("accel {accel}, {trials} alternating trials");
    println!(
        "plain QEMU, first QMP answer:      median {p:.1} ms  (min {:.1}, max {:.1})",
        plain.iter().cloned().fold(f64::MAX, f64::min),
        plain.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "burst-qemu, registered with TIDs:  median {w:.1} ms  (min {:.1}, max {:.1})",
        wrapped.iter().cloned().fold(f64::MAX, f64::min),
        wrapped.iter().cloned().fold(0.0, f64::max)
    );
    println!("ratio of medians: {:.3} (goal ≤ 1.25)", w / p);
}
