//! The cost of serving metrics for 100 VMs: the agent's own server and renderer on a loopback
//! port, scraped over HTTP; prints the median time per scrape (request to last byte), the
//! median render alone, and the size of the text.
//!
//! ```sh
//! cargo run --release --example metrics_cost [-- SCRAPES]
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use burst_qemu::credit::Mode;
use burst_qemu::metrics::{render, scrape, serve};
use burst_qemu::view::CreditsView;
use burst_qemu::view::{Health, Snapshot};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let scrapes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let mut health = Health::default();
    for i in 0..10_000 {
        health.observe_tick(0.0002 + (i % 50) as f64 * 1e-5);
    }
    let vms = (0..100)
        .map(|i| CreditsView {
            name: format!("vm-{i:03}"),
            balance: 123.456 + i as f64,
            surplus: 0.0,
            charged: 0.0,
            earn_per_hour: 12.0,
            usage_pct: Some(37.25),
            grant_pct: Some(100.0),
            time_to_empty_s: Some(3600.0),
            state: "running".into(),
            mode: Mode::Standard,
            baseline: 20.0,
            vcpus: 2,
            used_total_s: 86400.5,
            config_error: None,
            ledger_error: None,
            allocation_pct: Some(100.0),
            demand_pct: Some(40.0),
            observed_demand_pct: Some(40.0),
            disk: None,
            pins: None,
            pin_changes: None,
        })
        .collect();
    let snap = Arc::new(Mutex::new(Snapshot {
        vms,
        health: Some(health),
    }));
    let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&snap)).unwrap();
    let mut http = Vec::new();
    let mut size = 0;
    for _ in 0..scrapes {
        let t = Instant::now();
        size = scrape(addr).unwrap().len();
        http.push(t.elapsed().as_secs_f64());
    }
    let mut rendering = Vec::new();
    for _ in 0..scrapes {
        let s = snap.lock().unwrap().clone();
        let t = Instant::now();
        std::hint::black_box(render(&s));
        rendering.push(t.elapsed().as_secs_f64());
    }
    println!(
        "100 VMs: {size} bytes of text; median per scrape over HTTP {:.0} µs, render alone {:.0} µs ({scrapes} scrapes)",
        median(http) * 1e6,
        median(rendering) * 1e6
    );
}
