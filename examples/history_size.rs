//! History size and save cost: a week of the agent's 200 ms ticks through the real [`Ledger`]
//! and [`History`], for a VM that idles and one whose load changes all the time; prints the
//! encoded bytes per VM per week and the median time to encode and save (atomically, as the
//! agent does at each closed minute) one VM's history.
//!
//! ```sh
//! cargo run --release --example history_size
//! ```

use std::time::Instant;

use burst_qemu::agent::history_file::{self, point};
use burst_qemu::credit::{Baseline, Credits, Ledger, Policy, Rate, NS_PER_SEC};
use burst_qemu::history::History;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A week of ticks; `demand(tick)` gives the VM's demand in percent of all its vCPUs.
fn week(demand: impl Fn(u64) -> f64) -> History {
    let policy = Policy::new(2, Baseline::from_percent(20.0).unwrap()).unwrap();
    let mut ledger = Ledger::new(policy, Credits::from_credits(60.0).unwrap());
    let tick_ns = 200_000_000;
    ledger.set_interval(tick_ns);
    let mut h = History::new();
    let start = 1_800_000_000u64;
    let ticks = 7 * 24 * 3600 * 5;
    for i in 0..ticks {
        let grant = ledger.grant().rate;
        let used = Rate::from_percent_of(demand(i), 2).min(grant);
        ledger.tick(tick_ns, used.over(tick_ns));
        h.record(
            start + i * tick_ns / NS_PER_SEC,
            point(&ledger, used, grant),
        );
    }
    h.flush();
    h
}

fn main() {
    // A deterministic pseudo-random walk (xorshift) for the busy VM's load.
    let noisy = |i: u64| {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 29;
        let hour = (i / 5 / 3600) % 24;
        let base = if (9..18).contains(&hour) { 60.0 } else { 5.0 };
        (base + (x % 4000) as f64 / 100.0).min(100.0)
    };
    let dir = tempfile_dir();
    for (what, h) in [
        ("idle (2 % steady)", week(|_| 2.0)),
        ("busy, noisy load", week(noisy)),
    ] {
        let bytes = h.encode();
        let path = dir.join("vm.bqh");
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let c = cpu_s();
            history_file::save(&path, &h).unwrap();
            cpu.push(cpu_s() - c);
            times.push(t.elapsed().as_secs_f64());
        }
        let mut enc = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            std::hint::black_box(h.encode());
            enc.push(t.elapsed().as_secs_f64());
        }
        println!(
            "{what}: {} samples, {} bytes per VM per week ({:.1} bytes/sample); encode median {:.0} µs; encode+atomic save (write, fsync, rename) median {:.2} ms wall, {:.0} µs CPU, once a minute per VM",
            h.fine().samples().count() + h.coarse().samples().count(),
            bytes.len(),
            bytes.len() as f64 / (h.fine().samples().count() + h.coarse().samples().count()) as f64,
            median(enc) * 1e6,
            median(times) * 1e3,
            median(cpu) * 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// CPU time of this process (user + system), seconds.
fn cpu_s() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("bq-history-size-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
