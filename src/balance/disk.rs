//! Disk bandwidth under contention (ResCoin's disk resources): each VM that sets `disk_share`
//! has its drives' bytes read and written measured through QMP `query-blockstats`, and, while
//! the VMs together read (or write) more than the host's `--disk-bandwidth`, its drives held to
//! the stage's allocation through QMP `block_set_io_throttle`. Reads and writes are two
//! resources, each its own [`Contention`] stage; the rule is [`crate::contention`]'s.
//!
//! * **All of a VM's drives share one limit**: each is put in the throttle group `bq-NAME`, so a
//!   VM with two disks gets its allocation in all, not per disk.
//! * **A limit changes only when the plan moves by more than 2 %**: QEMU restarts its leaky
//!   bucket on every `block_set_io_throttle`, letting a tenth of a second's worth through at
//!   once, so a limit re-applied every period let the VMs read 10 % above it (measured).
//! * **Without contention nothing is throttled** (the limits are cleared, `bps = 0`): the
//!   stage only divides a contended host, it does not cap a quiet one.
//! * **QMP off the loop.** The agent's tick must not wait on a QEMU that is slow to answer, so a
//!   worker thread does the QMP conversations: each period it is sent every managed VM's QMP
//!   handle and wanted limits, and answers with counters; the stage uses the counters of the
//!   period before (one period of lag, 1 s). A VM whose QMP fails is shown with the error and
//!   left out of the plan until it answers again.
//! * **One session per VM.** The handle is the agent's ([`Qmp::for_agent`]), shared with the
//!   memory coordinator: a launcher VM is reached over the session the agent keeps on its agent
//!   monitor, reused every period; other VMs get a short session on their main socket per
//!   period.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::view::DiskView;

use crate::contention::{Bps, Contention, Observed, SpareRule};
use crate::control::{step, Qmp};

/// The host's disk bandwidth shared by the VMs that set `disk_share`, bytes per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskBandwidth {
    /// Reads.
    pub read: Bps,
    /// Writes.
    pub write: Bps,
}

/// Limits to apply: bytes per second, read and write; 0 is "no limit" (QEMU's convention).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Limits {
    read: u64,
    write: u64,
}

struct Job {
    name: String,
    qmp: Arc<Qmp>,
    limits: Limits,
}

struct Sample {
    name: String,
    at: Instant,
    counters: Result<(u64, u64), String>,
}

struct Managed {
    share_pct: f64,
    qmp: Arc<Qmp>,
    last: Option<(Instant, u64, u64)>,
    rates: Option<(u64, u64)>,
    limits: Limits,
    error: Option<String>,
}

/// The disk stages and their QMP worker.
pub struct Disks {
    bandwidth: DiskBandwidth,
    read: Contention<Bps>,
    write: Contention<Bps>,
    vms: HashMap<String, Managed>,
    jobs: Sender<Vec<Job>>,
    samples: Receiver<Sample>,
}

impl Disks {
    /// Stages for `bandwidth`, and the worker thread.
    pub fn new(bandwidth: DiskBandwidth) -> Self {
        let (jobs, job_rx) = mpsc::channel::<Vec<Job>>();
        let (sample_tx, samples) = mpsc::channel();
        std::thread::Builder::new()
            .name("disk-qmp".into())
            .spawn(move || worker(job_rx, sample_tx))
            .expect("spawning the disk QMP thread");
        Disks {
            // No credits for disk: ResCoin's rule, as measured (docs/contention.md).
            read: Contention::new(bandwidth.read, SpareRule::Rescoin),
            write: Contention::new(bandwidth.write, SpareRule::Rescoin),
            bandwidth,
            vms: HashMap::new(),
            jobs,
            samples,
        }
    }

    /// Sets (or, with `None`, drops) a VM's share, with the VM's QMP handle; its disks are then
    /// managed from the next period on. A VM that leaves the stage has its limits cleared.
    pub fn set_share(&mut self, name: &str, share_pct: Option<f64>, qmp: &Arc<Qmp>) {
        match share_pct {
            Some(s) => {
                let m = self.vms.entry(name.to_owned()).or_insert_with(|| Managed {
                    share_pct: s,
                    qmp: Arc::clone(qmp),
                    last: None,
                    rates: None,
                    limits: Limits::default(),
                    error: None,
                });
                m.share_pct = s;
                m.qmp = Arc::clone(qmp);
            }
            None => {
                if let Some(m) = self.vms.remove(name) {
                    if m.limits != Limits::default() {
                        let _ = self.jobs.send(vec![Job {
                            name: name.to_owned(),
                            qmp: m.qmp,
                            limits: Limits::default(),
                        }]);
                    }
                }
            }
        }
    }

    /// Takes a new host bandwidth (an edit of the agent's config file), from the next period.
    pub fn set_bandwidth(&mut self, bandwidth: DiskBandwidth) {
        self.read.set_capacity(bandwidth.read);
        self.write.set_capacity(bandwidth.write);
        self.bandwidth = bandwidth;
    }

    /// The host bandwidth in force.
    pub fn bandwidth(&self) -> DiskBandwidth {
        self.bandwidth
    }

    /// Forgets a VM that ended.
    pub fn forget(&mut self, name: &str) {
        self.vms.remove(name);
    }

    /// What to show of a VM's disks (`None`: not managed).
    pub fn view(&self, name: &str) -> Option<DiskView> {
        let m = self.vms.get(name)?;
        let limit = |v: u64| (v > 0).then_some(v);
        Some(DiskView {
            share_pct: m.share_pct,
            read_bps: m.rates.map(|r| r.0),
            write_bps: m.rates.map(|r| r.1),
            read_limit_bps: limit(m.limits.read),
            write_limit_bps: limit(m.limits.write),
            error: m.error.clone(),
        })
    }

    /// Ends a period: takes the counters the worker brought, plans, and sends the new limits.
    pub fn period(&mut self) {
        self.take_samples();
        for (name, limits) in self.plan() {
            self.hold(&name, limits);
        }
        let jobs = self
            .vms
            .iter()
            .map(|(n, m)| Job {
                name: n.clone(),
                qmp: Arc::clone(&m.qmp),
                limits: m.limits,
            })
            .collect();
        let _ = self.jobs.send(jobs);
    }

    /// Turns the worker's counters into each VM's read and write rates.
    fn take_samples(&mut self) {
        while let Ok(s) = self.samples.try_recv() {
            let Some(m) = self.vms.get_mut(&s.name) else {
                continue;
            };
            match s.counters {
                Ok((rd, wr)) => {
                    if let Some((at, rd0, wr0)) = m.last {
                        let ns = s.at.duration_since(at).as_nanos().max(1);
                        let rate = |d: u64| (u128::from(d) * 1_000_000_000 / ns) as u64;
                        // Counters restart with QEMU: a fall is a new start, not a rate.
                        if rd >= rd0 && wr >= wr0 && ns >= 100_000_000 {
                            m.rates = Some((rate(rd - rd0), rate(wr - wr0)));
                        }
                    }
                    if m.last
                        .is_none_or(|(at, _, _)| s.at.duration_since(at) >= MIN_SPAN)
                    {
                        m.last = Some((s.at, rd, wr));
                    }
                    m.error = None;
                }
                Err(e) => {
                    if m.error.as_deref() != Some(e.as_str()) {
                        tracing::warn!("{}: disks: {e}", s.name);
                    }
                    m.error = Some(e);
                    m.rates = None;
                    m.last = None;
                }
            }
        }
    }

    /// The read and write stages' limits for the VMs with rates (0: not throttled).
    fn plan(&mut self) -> Vec<(String, Limits)> {
        let mut names: Vec<&String> = self
            .vms
            .iter()
            .filter(|(_, m)| m.rates.is_some())
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let template = |cap: Bps, share: f64| Bps((cap.0 as f64 * share / 100.0) as u64);
        let observe = |cap: Bps, used: u64, share: f64| Observed {
            grant: cap,
            baseline: template(cap, share),
            used: Bps(used),
            waited: Bps(0),
        };
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        for n in &names {
            let m = &self.vms[*n];
            let (rd, wr) = m.rates.unwrap_or_default();
            reads.push((n.as_str(), observe(self.bandwidth.read, rd, m.share_pct)));
            writes.push((n.as_str(), observe(self.bandwidth.write, wr, m.share_pct)));
        }
        let rd_plan = self.read.period(&reads);
        let wr_plan = self.write.period(&writes);
        let limit = |a: &crate::contention::Allocation<Bps>| {
            if a.contended {
                a.rate.0.max(1)
            } else {
                0
            }
        };
        reads
            .iter()
            .zip(rd_plan.iter().zip(&wr_plan))
            .map(|((n, _), (r, w))| {
                (
                    (*n).to_owned(),
                    Limits {
                        read: limit(r),
                        write: limit(w),
                    },
                )
            })
            .collect()
    }

    /// Puts a VM's planned limits in force, keeping a limit while the plan stays near it.
    fn hold(&mut self, name: &str, mut limits: Limits) {
        let Some(m) = self.vms.get_mut(name) else {
            return;
        };
        // QEMU restarts its throttle's leaky bucket on every change, which lets one bucket (a
        // tenth of a second's worth) through at once: re-applied every period, a limit
        // overshoots by 10 % (measured). So keep a limit in force while the plan stays within
        // 2 % of it.
        let near = |old: u64, new: u64| old > 0 && new > 0 && old.abs_diff(new) * 50 <= old;
        if near(m.limits.read, limits.read) {
            limits.read = m.limits.read;
        }
        if near(m.limits.write, limits.write) {
            limits.write = m.limits.write;
        }
        if m.limits != limits {
            tracing::info!(
                "{name}: disk limits read {} write {} (bytes/s, 0 = none)",
                limits.read,
                limits.write
            );
        }
        m.limits = limits;
    }
}

/// Rates are measured over at least this long (a sample can come early after a slow one).
const MIN_SPAN: Duration = Duration::from_millis(500);

fn worker(jobs: Receiver<Vec<Job>>, samples: Sender<Sample>) {
    // The limits each VM's drives were last given (QEMU keeps them; sent again only on change).
    let mut applied: HashMap<String, Limits> = HashMap::new();
    while let Ok(mut batch) = jobs.recv() {
        // Only the newest batch matters when the worker fell behind (limits only on change).
        while let Ok(newer) = jobs.try_recv() {
            batch.extend(newer);
        }
        let mut seen = std::collections::HashSet::new();
        for job in batch.into_iter().rev() {
            if !seen.insert(job.name.clone()) {
                continue;
            }
            let counters = converse(&job, applied.get(&job.name).copied());
            if counters.is_ok() {
                applied.insert(job.name.clone(), job.limits);
            } else {
                applied.remove(&job.name);
            }
            let sample = Sample {
                name: job.name,
                at: Instant::now(),
                counters,
            };
            if samples.send(sample).is_err() {
                return;
            }
        }
        applied.retain(|n, _| seen.contains(n));
    }
}

/// One VM: applies the limits if they changed, reads the counters (bytes read, written).
fn converse(job: &Job, applied: Option<Limits>) -> Result<(u64, u64), String> {
    job.qmp
        .converse(|qmp| {
            let stats = step(qmp, QueryBlockstats {})?;
            let drives: Vec<&DriveStats> = stats.iter().filter(|s| s.handle().is_some()).collect();
            if applied != Some(job.limits) {
                for d in &drives {
                    let (id, device) = d.handle().expect("filtered");
                    let throttle = SetThrottle {
                        id,
                        device,
                        bps: 0,
                        bps_rd: job.limits.read,
                        bps_wr: job.limits.write,
                        iops: 0,
                        iops_rd: 0,
                        iops_wr: 0,
                        group: format!("bq-{}", job.name),
                    };
                    step(qmp, throttle)?;
                }
            }
            let sum = |f: fn(&Counters) -> i64| {
                drives
                    .iter()
                    .map(|d| u64::try_from(f(&d.stats)).unwrap_or(0))
                    .fold(0u64, u64::saturating_add)
            };
            Ok((sum(|c| c.rd_bytes), sum(|c| c.wr_bytes)))
        })
        .map_err(|e| format!("{}: {}", e.what, e.why))
}

/// The bytes a VM's guest drives have read and written, from QEMU (`query-blockstats`, summed
/// over the drives that belong to a guest device), over a session of its own on `socket`.
pub fn drive_bytes(socket: &std::path::Path) -> Result<(u64, u64), String> {
    let job = Job {
        name: String::new(),
        qmp: Arc::new(Qmp::per_use("", socket)),
        limits: Limits::default(),
    };
    // `applied` equal to the job's limits: nothing is changed, only read.
    converse(&job, Some(job.limits))
}

// The three QMP messages, with only the fields used: QEMU 7.2 and the `qapi` crate's newer
// schema disagree on fields this code does not need, and a missing one must not fail a read.

#[derive(Serialize)]
struct QueryBlockstats {}

impl qmp::qapi::Command for QueryBlockstats {
    type Ok = Vec<DriveStats>;
    const NAME: &'static str = "query-blockstats";
    const ALLOW_OOB: bool = false;
}

#[derive(Deserialize)]
struct DriveStats {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    qdev: Option<String>,
    stats: Counters,
}

impl DriveStats {
    /// How to name the drive to `block_set_io_throttle`: its device's id, else the drive's
    /// name (`-drive` without a device); `None` for a node that is neither (not a guest disk).
    fn handle(&self) -> Option<(Option<String>, Option<String>)> {
        match (&self.qdev, &self.device) {
            (Some(q), _) if !q.is_empty() => Some((Some(q.clone()), None)),
            (_, Some(d)) if !d.is_empty() => Some((None, Some(d.clone()))),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct Counters {
    rd_bytes: i64,
    wr_bytes: i64,
}

#[derive(Serialize)]
struct SetThrottle {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    bps: u64,
    bps_rd: u64,
    bps_wr: u64,
    iops: u64,
    iops_rd: u64,
    iops_wr: u64,
    group: String,
}

impl qmp::qapi::Command for SetThrottle {
    type Ok = qmp::qapi::Empty;
    const NAME: &'static str = "block_set_io_throttle";
    const ALLOW_OOB: bool = false;
}

/// Parses `--disk-bandwidth`: `READ[,WRITE]`, bytes per second with an optional k/M/G suffix
/// (powers of 1000; `Ki`/`Mi`/`Gi` for powers of 1024); WRITE defaults to READ.
pub fn parse_bandwidth(s: &str) -> Result<DiskBandwidth, String> {
    let one = |v: &str| -> Result<Bps, String> {
        let v = v.trim();
        let (num, mult) = [
            ("Gi", 1u64 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
            ("G", 1_000_000_000),
            ("M", 1_000_000),
            ("k", 1_000),
            ("K", 1_000),
        ]
        .iter()
        .find_map(|(suf, m)| v.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((v, 1));
        let n: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{v:?} is not a bandwidth (bytes/s, e.g. 100M)"))?;
        let bps = n * mult as f64;
        if !(1.0..1e15).contains(&bps) {
            return Err(format!("{v:?} is out of range (1 byte/s to 1 PB/s)"));
        }
        Ok(Bps(bps as u64))
    };
    match s.split_once(',') {
        Some((r, w)) => Ok(DiskBandwidth {
            read: one(r)?,
            write: one(w)?,
        }),
        None => {
            let b = one(s)?;
            Ok(DiskBandwidth { read: b, write: b })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_parse_with_suffixes_and_bad_ones_are_named() {
        assert_eq!(
            parse_bandwidth("100M").unwrap(),
            DiskBandwidth {
                read: Bps(100_000_000),
                write: Bps(100_000_000)
            }
        );
        assert_eq!(
            parse_bandwidth("1Gi,512k").unwrap(),
            DiskBandwidth {
                read: Bps(1 << 30),
                write: Bps(512_000)
            }
        );
        assert!(parse_bandwidth("fast").unwrap_err().contains("fast"));
        assert!(parse_bandwidth("0").is_err());
        assert!(parse_bandwidth("-5M").is_err());
    }

    #[test]
    fn blockstats_of_qemu_7_2_parse_and_only_guest_drives_count() {
        // Shape of QEMU 7.2's reply (fields trimmed), with a node that is no guest disk.
        let reply = r##"[{"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
            "stats": {"rd_bytes": 4096, "wr_bytes": 0, "rd_operations": 1, "failed_rd_operations": 0},
            "node-name": "#block123"},
            {"device": "virtio0", "stats": {"rd_bytes": 10, "wr_bytes": 20}},
            {"stats": {"rd_bytes": 99, "wr_bytes": 99}}]"##;
        let stats: Vec<DriveStats> = serde_json::from_str(reply).unwrap();
        let handles: Vec<_> = stats.iter().filter_map(DriveStats::handle).collect();
        assert_eq!(
            handles,
            vec![
                (
                    Some("/machine/peripheral-anon/device[0]/virtio-backend".to_owned()),
                    None
                ),
                (None, Some("virtio0".to_owned()))
            ]
        );
    }
}
