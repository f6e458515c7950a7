//! Prometheus text exposition of the fleet's credits and the agent's health: pure rendering,
//! plus a tiny HTTP/1.1 server ([`serve`]) on a std `TcpListener` in its own thread.
//!
//! Names follow Prometheus conventions and map to CloudWatch's T-instance metrics:
//!
//! | metric | type | CloudWatch |
//! |---|---|---|
//! | `burst_qemu_cpu_credit_balance` | gauge, credits | `CPUCreditBalance` |
//! | `burst_qemu_cpu_credit_usage_total` | counter, credits | `CPUCreditUsage` (its sum) |
//! | `burst_qemu_cpu_surplus_credit_balance` | gauge, credits | `CPUSurplusCreditBalance` |
//! | `burst_qemu_cpu_surplus_credits_charged_total` | counter, credits | `CPUSurplusCreditsCharged` |
//! | `burst_qemu_cpu_utilization_ratio` | gauge, 0–1 of all vCPUs | `CPUUtilization` / 100 |
//! | `burst_qemu_cpu_grant_ratio` | gauge, 0–1 of all vCPUs | — |
//! | `burst_qemu_cpu_allocation_ratio` | gauge, 0–1 of all vCPUs (the contention stage's allocation) | — |
//! | `burst_qemu_baseline_ratio` | gauge, 0–1 per vCPU | the instance type's baseline |
//! | `burst_qemu_disk_read_bytes_per_second`, `…_write_…` | gauge, bytes/s (VMs with `disk_share`) | `DiskReadBytes` / period |
//! | `burst_qemu_disk_read_limit_bytes_per_second`, `…_write_…` | gauge, bytes/s (the disk stage's allocation; absent when not throttled) | — |
//!
//! each labelled `vm`, and the agent's own `burst_qemu_agent_tick_duration_seconds`
//! (histogram), `burst_qemu_agent_config_errors` (VMs whose config is not in force) and
//! `burst_qemu_agent_ledger_save_failures_total`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::agent::CreditsView;

/// The file in the state dir where a serving agent writes its address.
pub const ADDR_FILE: &str = "metrics.addr";

/// Ledger saves that failed in this process (counted where they fail).
pub static LEDGER_SAVE_FAILURES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Upper bounds of the tick-duration histogram's buckets, seconds.
pub const TICK_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25];

/// The agent's health.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Ticks per bucket of [`TICK_BUCKETS`] (not cumulative), and above the last.
    pub tick_counts: [u64; TICK_BUCKETS.len() + 1],
    /// Sum of tick durations, seconds.
    pub tick_sum_s: f64,
    /// Ledger saves that failed since the agent started.
    pub ledger_save_failures: u64,
}

impl Health {
    /// Counts one tick of `seconds`.
    pub fn observe_tick(&mut self, seconds: f64) {
        let i = TICK_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(TICK_BUCKETS.len());
        self.tick_counts[i] += 1;
        self.tick_sum_s += seconds;
    }
}

/// What the metrics show: the published view of each VM, and the agent's health when known.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// One view per VM.
    pub vms: Vec<CreditsView>,
    /// The agent's health (`None` when rendered without an agent).
    pub health: Option<Health>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text format (version 0.0.4) of `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::with_capacity(256 + snap.vms.len() * 700);
    type Get = fn(&CreditsView) -> Option<f64>;
    let families: [(&str, &str, &str, Get); 12] = [
        (
            "burst_qemu_cpu_credit_balance",
            "gauge",
            "Spendable CPU credits (one credit = one vCPU at 100 % for a minute).",
            |v| Some(v.balance),
        ),
        (
            "burst_qemu_cpu_credit_usage_total",
            "counter",
            "CPU credits used since the VM's ledger was created.",
            |v| Some(v.used_total_s / 60.0),
        ),
        (
            "burst_qemu_cpu_surplus_credit_balance",
            "gauge",
            "Surplus credits spent beyond the balance and not yet paid back (unlimited mode).",
            |v| Some(v.surplus),
        ),
        (
            "burst_qemu_cpu_surplus_credits_charged_total",
            "counter",
            "Surplus credits charged (beyond what may be carried).",
            |v| Some(v.charged),
        ),
        (
            "burst_qemu_cpu_utilization_ratio",
            "gauge",
            "CPU used over the last tick, fraction of all the VM's vCPUs.",
            |v| v.usage_pct.map(|p| p / 100.0),
        ),
        (
            "burst_qemu_cpu_grant_ratio",
            "gauge",
            "CPU granted over the last tick, fraction of all the VM's vCPUs.",
            |v| v.grant_pct.map(|p| p / 100.0),
        ),
        (
            "burst_qemu_cpu_allocation_ratio",
            "gauge",
            "CPU the contention stage lets the VM use (its grant unless the host is contended), fraction of all the VM's vCPUs.",
            |v| v.allocation_pct.map(|p| p / 100.0),
        ),
        (
            "burst_qemu_baseline_ratio",
            "gauge",
            "Baseline, fraction of one vCPU (pooled over the VM's vCPUs).",
            |v| Some(v.baseline / 100.0),
        ),
        (
            "burst_qemu_disk_read_bytes_per_second",
            "gauge",
            "Bytes the VM's drives read per second over the last period (VMs with disk_share).",
            |v| v.disk.as_ref()?.read_bps.map(|b| b as f64),
        ),
        (
            "burst_qemu_disk_write_bytes_per_second",
            "gauge",
            "Bytes the VM's drives wrote per second over the last period (VMs with disk_share).",
            |v| v.disk.as_ref()?.write_bps.map(|b| b as f64),
        ),
        (
            "burst_qemu_disk_read_limit_bytes_per_second",
            "gauge",
            "The read limit the disk stage holds the VM's drives to while the host's disk is contended.",
            |v| v.disk.as_ref()?.read_limit_bps.map(|b| b as f64),
        ),
        (
            "burst_qemu_disk_write_limit_bytes_per_second",
            "gauge",
            "The write limit the disk stage holds the VM's drives to while the host's disk is contended.",
            |v| v.disk.as_ref()?.write_limit_bps.map(|b| b as f64),
        ),
    ];
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for v in &snap.vms {
            if let Some(x) = get(v) {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {x}", escape(&v.name));
            }
        }
    }
    // Only when the agent runs the pinning balancer (`--balance cpu`).
    if snap.vms.iter().any(|v| v.pin_changes.is_some()) {
        let name = "burst_qemu_vcpu_pin_changes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Pin changes the vCPU pinning balancer made to the VM's vCPU threads since the agent started.\n# TYPE {name} counter"
        );
        for v in &snap.vms {
            if let Some(c) = v.pin_changes {
                let _ = writeln!(out, "{name}{{vm=\"{}\"}} {c}", escape(&v.name));
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP burst_qemu_vm_running Whether the VM runs (1) or is stopped (0).\n\
         # TYPE burst_qemu_vm_running gauge"
    );
    for v in &snap.vms {
        let up = u8::from(v.state == "running");
        let _ = writeln!(
            out,
            "burst_qemu_vm_running{{vm=\"{}\"}} {up}",
            escape(&v.name)
        );
    }
    let errors = snap.vms.iter().filter(|v| v.config_error.is_some()).count();
    let _ = writeln!(
        out,
        "# HELP burst_qemu_agent_config_errors VMs whose config file has an error (the last good config stays in force).\n\
         # TYPE burst_qemu_agent_config_errors gauge\nburst_qemu_agent_config_errors {errors}"
    );
    if let Some(h) = &snap.health {
        let name = "burst_qemu_agent_tick_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time the agent took per tick (measure, account, enforce, publish).\n# TYPE {name} histogram"
        );
        let mut cum = 0;
        for (i, b) in TICK_BUCKETS.iter().enumerate() {
            cum += h.tick_counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += h.tick_counts[TICK_BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {cum}", h.tick_sum_s);
        let _ = writeln!(
            out,
            "# HELP burst_qemu_agent_ledger_save_failures_total Ledger saves that failed.\n\
             # TYPE burst_qemu_agent_ledger_save_failures_total counter\n\
             burst_qemu_agent_ledger_save_failures_total {}",
            h.ledger_save_failures
        );
    }
    out
}

/// Serves `render(snapshot)` to `GET /metrics` (and `/`) at `addr` from a thread of its own;
/// returns the address bound (useful with port 0).
pub fn serve(addr: SocketAddr, snapshot: Arc<Mutex<Snapshot>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let mut got = 0;
                // Read the request head (the request line is all that matters).
                while got < buf.len() {
                    match conn.read(&mut buf[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..got]);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if !head.starts_with("GET ") {
                    ("405 Method Not Allowed", String::from("GET only\n"))
                } else if path == "/metrics" || path == "/" {
                    let snap = snapshot.lock().map(|s| s.clone()).unwrap_or_default();
                    ("200 OK", render(&snap))
                } else {
                    ("404 Not Found", String::from("see /metrics\n"))
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(bound)
}

/// `GET /metrics` from `addr`: the body, for `burst-qemu metrics` and the measurement.
pub fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "{addr}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::Mode;

    fn vm(name: &str) -> CreditsView {
        CreditsView {
            name: name.into(),
            balance: 12.5,
            surplus: 0.0,
            charged: 0.0,
            earn_per_hour: 12.0,
            usage_pct: Some(50.0),
            grant_pct: Some(100.0),
            time_to_empty_s: None,
            state: "running".into(),
            mode: Mode::Standard,
            baseline: 10.0,
            vcpus: 2,
            used_total_s: 120.0,
            config_error: None,
            ledger_error: None,
            allocation_pct: Some(80.0),
            demand_pct: None,
            observed_demand_pct: None,
            disk: None,
            pins: None,
            pin_changes: None,
        }
    }

    #[test]
    fn pin_changes_are_a_family_only_when_the_balancer_runs() {
        let mut snap = Snapshot {
            vms: vec![vm("a"), vm("b")],
            health: None,
        };
        assert!(!render(&snap).contains("pin_changes"));
        snap.vms[0].pin_changes = Some(3);
        let text = render(&snap);
        assert!(text.contains("# TYPE burst_qemu_vcpu_pin_changes_total counter"));
        assert!(text.contains("burst_qemu_vcpu_pin_changes_total{vm=\"a\"} 3\n"));
        assert!(!text.contains("burst_qemu_vcpu_pin_changes_total{vm=\"b\"}"));
    }

    #[test]
    fn renders_families_labels_and_a_cumulative_histogram() {
        let mut h = Health::default();
        h.observe_tick(0.0007);
        h.observe_tick(0.3);
        let text = render(&Snapshot {
            vms: vec![vm("a"), vm("b\"x")],
            health: Some(h),
        });
        assert!(text.contains("burst_qemu_cpu_credit_balance{vm=\"a\"} 12.5\n"));
        assert!(text.contains("burst_qemu_cpu_credit_usage_total{vm=\"a\"} 2\n"));
        assert!(text.contains("burst_qemu_cpu_utilization_ratio{vm=\"b\\\"x\"} 0.5\n"));
        assert!(text.contains("burst_qemu_agent_tick_duration_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("burst_qemu_agent_tick_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("burst_qemu_agent_tick_duration_seconds_count 2\n"));
    }

    #[test]
    fn serves_over_http() {
        let snap = Arc::new(Mutex::new(Snapshot {
            vms: vec![vm("a")],
            health: None,
        }));
        let addr = serve("127.0.0.1:0".parse().unwrap(), snap.clone()).unwrap();
        assert_eq!(scrape(addr).unwrap(), render(&snap.lock().unwrap()));
    }

    /// The shipped Grafana dashboard asks only for metrics that are served.
    #[test]
    fn the_grafana_dashboard_uses_served_names() {
        let dashboard = include_str!("../contrib/grafana/burst-qemu.json");
        let text = render(&Snapshot {
            vms: vec![vm("a")],
            health: Some(Health::default()),
        });
        let mut names = 0;
        for (i, _) in dashboard.match_indices("burst_qemu_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name == "burst_qemu_" {
                continue;
            }
            names += 1;
            assert!(
                text.lines().any(|l| l.starts_with(&name)),
                "{name} is on the dashboard but not served"
            );
        }
        assert!(names >= 9, "{names}");
    }
}
