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
//! `burst_qemu_agent_ledger_save_failures_total`. [`FAMILIES`] is the whole list: every field of
//! `credits --json` (the [`CreditsView`]) has its family there, and a family is rendered
//! whenever one VM has a value for it.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::view::{CreditsView, Snapshot, TICK_BUCKETS};

/// The file in the state dir where a serving agent writes its address.
pub const ADDR_FILE: &str = "metrics.addr";

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The samples of one family for one VM: extra labels (`,vcpu="0"` or empty) and the value.
type Samples = fn(&CreditsView) -> Vec<(String, f64)>;

/// One metric family of a VM's view.
pub struct Family {
    /// The metric's name.
    pub name: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    /// Its help text.
    pub help: &'static str,
    /// The `credits --json` field it shows (`disk.read_bps` for a nested one).
    pub field: &'static str,
    /// Its samples for a VM (none when the VM has no value for it).
    pub samples: Samples,
}

fn one(x: Option<f64>) -> Vec<(String, f64)> {
    x.map(|x| (String::new(), x)).into_iter().collect()
}

fn ratio(pct: Option<f64>) -> Vec<(String, f64)> {
    one(pct.map(|p| p / 100.0))
}

fn flag(on: bool) -> Vec<(String, f64)> {
    one(Some(if on { 1.0 } else { 0.0 }))
}

/// Every family of a VM's view, in the order rendered.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "burst_qemu_cpu_credit_balance",
        kind: "gauge",
        help: "Spendable CPU credits (one credit = one vCPU at 100 % for a minute).",
        field: "balance",
        samples: |v| one(Some(v.balance)),
    },
    Family {
        name: "burst_qemu_cpu_credit_usage_total",
        kind: "counter",
        help: "CPU credits used since the VM's ledger was created.",
        field: "used_total_s",
        samples: |v| one(Some(v.used_total_s / 60.0)),
    },
    Family {
        name: "burst_qemu_cpu_surplus_credit_balance",
        kind: "gauge",
        help: "Surplus credits spent beyond the balance and not yet paid back (unlimited mode).",
        field: "surplus",
        samples: |v| one(Some(v.surplus)),
    },
    Family {
        name: "burst_qemu_cpu_surplus_credits_charged_total",
        kind: "counter",
        help: "Surplus credits charged (beyond what may be carried).",
        field: "charged",
        samples: |v| one(Some(v.charged)),
    },
    Family {
        name: "burst_qemu_cpu_credits_earned_per_hour",
        kind: "gauge",
        help: "Credits the VM earns per hour (its pooled baseline).",
        field: "earn_per_hour",
        samples: |v| one(Some(v.earn_per_hour)),
    },
    Family {
        name: "burst_qemu_cpu_credit_time_to_empty_seconds",
        kind: "gauge",
        help: "Seconds until the balance is spent at the current usage (absent when not draining).",
        field: "time_to_empty_s",
        samples: |v| one(v.time_to_empty_s),
    },
    Family {
        name: "burst_qemu_cpu_utilization_ratio",
        kind: "gauge",
        help: "CPU used over the last tick, fraction of all the VM's vCPUs.",
        field: "usage_pct",
        samples: |v| ratio(v.usage_pct),
    },
    Family {
        name: "burst_qemu_cpu_grant_ratio",
        kind: "gauge",
        help: "CPU granted over the last tick, fraction of all the VM's vCPUs.",
        field: "grant_pct",
        samples: |v| ratio(v.grant_pct),
    },
    Family {
        name: "burst_qemu_cpu_allocation_ratio",
        kind: "gauge",
        help: "CPU the contention stage lets the VM use (its grant unless the host is contended), fraction of all the VM's vCPUs.",
        field: "allocation_pct",
        samples: |v| ratio(v.allocation_pct),
    },
    Family {
        name: "burst_qemu_cpu_demand_ratio",
        kind: "gauge",
        help: "The contention stage's estimate of the VM's demand, fraction of all its vCPUs.",
        field: "demand_pct",
        samples: |v| ratio(v.demand_pct),
    },
    Family {
        name: "burst_qemu_cpu_observed_demand_ratio",
        kind: "gauge",
        help: "The demand the contention stage observed over its last period, fraction of all the VM's vCPUs.",
        field: "observed_demand_pct",
        samples: |v| ratio(v.observed_demand_pct),
    },
    Family {
        name: "burst_qemu_baseline_ratio",
        kind: "gauge",
        help: "Baseline, fraction of one vCPU (pooled over the VM's vCPUs).",
        field: "baseline",
        samples: |v| one(Some(v.baseline / 100.0)),
    },
    Family {
        name: "burst_qemu_vcpus",
        kind: "gauge",
        help: "The VM's vCPUs.",
        field: "vcpus",
        samples: |v| one(Some(f64::from(v.vcpus))),
    },
    Family {
        name: "burst_qemu_vm_running",
        kind: "gauge",
        help: "Whether the VM runs (1) or is stopped (0).",
        field: "state",
        samples: |v| flag(v.state == "running"),
    },
    Family {
        name: "burst_qemu_vm_unlimited",
        kind: "gauge",
        help: "Whether the VM is in unlimited mode (1) or standard mode (0).",
        field: "mode",
        samples: |v| flag(v.mode == crate::credit::Mode::Unlimited),
    },
    Family {
        name: "burst_qemu_config_error",
        kind: "gauge",
        help: "Whether the VM's config file has an error (1: the last good config stays in force).",
        field: "config_error",
        samples: |v| flag(v.config_error.is_some()),
    },
    Family {
        name: "burst_qemu_ledger_error",
        kind: "gauge",
        help: "Whether the agent cannot save the VM's ledger (1: it enforces from memory).",
        field: "ledger_error",
        samples: |v| flag(v.ledger_error.is_some()),
    },
    Family {
        name: "burst_qemu_disk_share_ratio",
        kind: "gauge",
        help: "The VM's share of the host's disk bandwidth (disk_share), fraction.",
        field: "disk.share_pct",
        samples: |v| ratio(v.disk.as_ref().map(|d| d.share_pct)),
    },
    Family {
        name: "burst_qemu_disk_read_bytes_per_second",
        kind: "gauge",
        help: "Bytes the VM's drives read per second over the last period (VMs with disk_share).",
        field: "disk.read_bps",
        samples: |v| one(v.disk.as_ref().and_then(|d| d.read_bps).map(|b| b as f64)),
    },
    Family {
        name: "burst_qemu_disk_write_bytes_per_second",
        kind: "gauge",
        help: "Bytes the VM's drives wrote per second over the last period (VMs with disk_share).",
        field: "disk.write_bps",
        samples: |v| one(v.disk.as_ref().and_then(|d| d.write_bps).map(|b| b as f64)),
    },
    Family {
        name: "burst_qemu_disk_read_limit_bytes_per_second",
        kind: "gauge",
        help: "The read limit the disk stage holds the VM's drives to while the host's disk is contended.",
        field: "disk.read_limit_bps",
        samples: |v| one(v.disk.as_ref().and_then(|d| d.read_limit_bps).map(|b| b as f64)),
    },
    Family {
        name: "burst_qemu_disk_write_limit_bytes_per_second",
        kind: "gauge",
        help: "The write limit the disk stage holds the VM's drives to while the host's disk is contended.",
        field: "disk.write_limit_bps",
        samples: |v| one(v.disk.as_ref().and_then(|d| d.write_limit_bps).map(|b| b as f64)),
    },
    Family {
        name: "burst_qemu_disk_error",
        kind: "gauge",
        help: "Whether the VM's disks cannot be measured or throttled (1).",
        field: "disk.error",
        samples: |v| match &v.disk {
            Some(d) => flag(d.error.is_some()),
            None => Vec::new(),
        },
    },
    Family {
        name: "burst_qemu_vcpu_pin_cpu",
        kind: "gauge",
        help: "The host CPU each vCPU is pinned to by the pinning balancer (absent while not pinned to one).",
        field: "pins",
        samples: |v| {
            v.pins
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, p)| Some((format!(",vcpu=\"{i}\""), f64::from((*p)?))))
                .collect()
        },
    },
    Family {
        name: "burst_qemu_vcpu_pin_changes_total",
        kind: "counter",
        help: "Pin changes the vCPU pinning balancer made to the VM's vCPU threads since the agent started.",
        field: "pin_changes",
        samples: |v| one(v.pin_changes.map(|c| c as f64)),
    },
];

/// The Prometheus text format (version 0.0.4) of `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::with_capacity(256 + snap.vms.len() * 1200);
    for f in FAMILIES {
        render_family(&mut out, f, &snap.vms);
    }
    let errors = snap.vms.iter().filter(|v| v.config_error.is_some()).count();
    let _ = writeln!(
        out,
        "# HELP burst_qemu_agent_config_errors VMs whose config file has an error (the last good config stays in force).\n\
         # TYPE burst_qemu_agent_config_errors gauge\nburst_qemu_agent_config_errors {errors}"
    );
    if let Some(h) = &snap.health {
        render_health(&mut out, h);
    }
    out
}

fn render_family(out: &mut String, f: &Family, vms: &[CreditsView]) {
    let mut header = false;
    for v in vms {
        for (labels, x) in (f.samples)(v) {
            if !header {
                let _ = writeln!(
                    out,
                    "# HELP {} {}\n# TYPE {} {}",
                    f.name, f.help, f.name, f.kind
                );
                header = true;
            }
            let _ = writeln!(out, "{}{{vm=\"{}\"{labels}}} {x}", f.name, escape(&v.name));
        }
    }
}

fn render_health(out: &mut String, h: &crate::view::Health) {
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
    use crate::view::{DiskView, Health};

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
        snap.vms[0].pins = Some(vec![Some(1), None]);
        let text = render(&snap);
        assert!(text.contains("# TYPE burst_qemu_vcpu_pin_changes_total counter"));
        assert!(text.contains("burst_qemu_vcpu_pin_changes_total{vm=\"a\"} 3\n"));
        assert!(!text.contains("burst_qemu_vcpu_pin_changes_total{vm=\"b\"}"));
        assert!(text.contains("burst_qemu_vcpu_pin_cpu{vm=\"a\",vcpu=\"0\"} 1\n"));
        assert!(!text.contains("vcpu=\"1\""));
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

    /// Every field `credits --json` shows has its family, and every family names a real field.
    #[test]
    fn every_field_of_the_view_has_its_metric() {
        let mut v = vm("a");
        v.disk = Some(DiskView::default());
        v.pins = Some(vec![Some(0)]);
        v.pin_changes = Some(0);
        let json = serde_json::to_value(&v).unwrap();
        let mut fields = Vec::new();
        for (k, x) in json.as_object().unwrap() {
            match x.as_object() {
                Some(inner) => fields.extend(inner.keys().map(|i| format!("{k}.{i}"))),
                None => fields.push(k.clone()),
            }
        }
        for field in &fields {
            if field == "name" {
                continue; // the `vm` label
            }
            assert!(
                FAMILIES.iter().any(|f| f.field == field),
                "credits --json shows {field} but no metric family does"
            );
        }
        for f in FAMILIES {
            assert!(
                fields.contains(&f.field.to_owned()),
                "{} shows no field {}",
                f.name,
                f.field
            );
        }
        // Every family with a value is rendered: here all but time_to_empty (not draining).
        v.disk = Some(DiskView {
            share_pct: 50.0,
            read_bps: Some(1),
            write_bps: Some(2),
            read_limit_bps: Some(3),
            write_limit_bps: Some(4),
            error: None,
        });
        v.demand_pct = Some(10.0);
        v.observed_demand_pct = Some(11.0);
        let text = render(&Snapshot {
            vms: vec![v],
            health: None,
        });
        for f in FAMILIES {
            let served = text
                .lines()
                .any(|l| l.starts_with(&format!("{}{{", f.name)));
            assert_eq!(served, f.field != "time_to_empty_s", "{}", f.name);
        }
    }
}
