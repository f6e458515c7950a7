//! A running VM's control handle: the operations burst-qemu performs on a VM beyond its
//! threads and cgroups — its run state, pause and resume, pinning a vCPU, the balloon and the
//! guest's memory figures. One trait, two implementations:
//!
//! | VM | implementation | how |
//! |---|---|---|
//! | launched, adopted with `--qmp` | [`Qmp`] | a short QMP session per call on the VM's socket; pins with `sched_setaffinity` (QEMU has no pin command) |
//! | libvirt domain | `source::libvirt::control` (feature `libvirt`) | the libvirt API: libvirt holds the domain's monitor, and a pin must go through it so that `virsh vcpupin` agrees |
//!
//! The balancers and the CLI hold a `dyn Control` and never ask where a VM comes from. The
//! trait sits below the balancers (they call it) and above the sources (libvirt implements it).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::state::VmRecord;

/// 1 MiB in bytes.
const MIB: u64 = 1 << 20;
/// How long one QMP answer may take.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest's stats polling interval, seconds (QEMU, or libvirt, asks the balloon driver this
/// often).
pub const STATS_POLL_S: u64 = 1;
/// Figures stamped more than this many seconds before they are read are stale: the guest
/// answers every [`STATS_POLL_S`], and QEMU stamps in whole seconds.
pub const STATS_MAX_AGE_S: i64 = 3;

/// A control operation that failed: what was done, on which VM, and why.
#[derive(Debug, Error)]
#[error("{vm}: {what}: {why}")]
pub struct ControlError {
    /// The VM.
    pub vm: String,
    /// The operation (`query-balloon`, `virDomainPinVcpuFlags`, …).
    pub what: String,
    /// The cause as its layer printed it.
    pub why: String,
}

impl ControlError {
    /// An error of `what` on `vm`.
    pub fn new(vm: &str, what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        ControlError {
            vm: vm.to_owned(),
            what: what.into(),
            why: why.to_string(),
        }
    }
}

/// A VM's balloon as found when the memory coordinator takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonProbe {
    /// The boot size (the most the balloon can give), MiB.
    pub boot_mb: u64,
    /// The balloon device (its QOM path over QMP; `memballoon` through libvirt); `None`: the
    /// VM has none.
    pub device: Option<String>,
    /// The balloon's size now, MiB.
    pub actual_mb: Option<u64>,
}

/// The guest's own memory figures, MiB, as its balloon driver reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMemory {
    /// MemFree.
    pub free: u64,
    /// MemAvailable.
    pub available: u64,
    /// MemTotal.
    pub total: u64,
}

/// One reading of a VM's balloon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonReading {
    /// The balloon's size, MiB.
    pub actual_mb: u64,
    /// The guest's figures; `None` while it has not reported (no driver yet, or stale).
    pub guest: Option<GuestMemory>,
    /// When the guest's figures arrived (QEMU's `last-update`), whole Unix seconds.
    pub stamp: Option<i64>,
}

/// What burst-qemu does to a running VM besides enforcing its grant.
pub trait Control: Send + Sync {
    /// `running`, `paused`, or another run state of QEMU's or libvirt's.
    fn run_state(&self) -> Result<String, ControlError>;
    /// Stops the vCPUs.
    fn pause(&self) -> Result<(), ControlError>;
    /// Lets them run again.
    fn resume(&self) -> Result<(), ControlError>;
    /// Pins vCPU `vcpu` (thread `tid`) to host CPU `cpu`.
    fn pin_vcpu(&self, vcpu: u32, tid: u32, cpu: u32) -> Result<(), ControlError>;
    /// The balloon and the boot size.
    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError>;
    /// Asks the guest for its figures every [`STATS_POLL_S`] (re-armed on each call: QEMU's
    /// timer stops when the guest stops answering) and reads the balloon and the latest
    /// figures.
    fn balloon_read(&self, device: &str) -> Result<BalloonReading, ControlError>;
    /// Sets the balloon's target, MiB.
    fn set_balloon(&self, mb: u64) -> Result<(), ControlError>;
}

/// Pins thread `tid` to `cpu` with `sched_setaffinity`.
pub fn pin_thread(tid: u32, cpu: u32) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set)
}

/// A VM controlled through its QMP socket (burst-qemu's own VMs, adopted QEMUs).
#[derive(Clone, Debug)]
pub struct Qmp {
    name: String,
    socket: PathBuf,
}

impl Qmp {
    /// The handle of `record`'s VM.
    pub fn new(record: &VmRecord) -> Qmp {
        Qmp {
            name: record.name.clone(),
            socket: record.qmp_socket.clone(),
        }
    }

    fn client(&self, what: &str) -> Result<qmp::Client, ControlError> {
        if self.socket.as_os_str().is_empty() {
            return Err(ControlError::new(
                &self.name,
                what,
                "no QMP socket is known for this VM (adopt --qmp names one)",
            ));
        }
        qmp::Client::connect(&self.socket, QMP_TIMEOUT)
            .map_err(|e| ControlError::new(&self.name, what, e))
    }

    fn execute<C: qmp::qapi::Command>(&self, command: C) -> Result<C::Ok, ControlError> {
        self.client(C::NAME)?
            .execute(command)
            .map_err(|e| ControlError::new(&self.name, C::NAME, e))
    }
}

impl Control for Qmp {
    fn run_state(&self) -> Result<String, ControlError> {
        Ok(run_state_name(
            &self.execute(qmp::qapi::qmp::query_status {})?,
        ))
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.execute(qmp::qapi::qmp::stop {}).map(drop)
    }

    fn resume(&self) -> Result<(), ControlError> {
        self.execute(qmp::qapi::qmp::cont {}).map(drop)
    }

    fn pin_vcpu(&self, vcpu: u32, tid: u32, cpu: u32) -> Result<(), ControlError> {
        pin_thread(tid, cpu).map_err(|e| {
            ControlError::new(
                &self.name,
                format!("sched_setaffinity of vCPU {vcpu} (thread {tid})"),
                e,
            )
        })
    }

    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError> {
        let mut c = self.client("query-memory-size-summary")?;
        let err = |what: &str, e: qmp::Error| ControlError::new(&self.name, what, e);
        let boot = c
            .execute(qmp::qapi::qmp::query_memory_size_summary {})
            .map_err(|e| err("query-memory-size-summary", e))?;
        let device = find_balloon(&mut c);
        let actual_mb = c
            .execute(qmp::qapi::qmp::query_balloon {})
            .map(|b| b.actual.max(0) as u64 / MIB)
            .ok();
        Ok(BalloonProbe {
            boot_mb: boot.base_memory / MIB,
            device,
            actual_mb,
        })
    }

    fn balloon_read(&self, device: &str) -> Result<BalloonReading, ControlError> {
        let mut c = self.client("qom-get guest-stats")?;
        let err = |what: &str, e: qmp::Error| ControlError::new(&self.name, what, e);
        c.execute(qmp::qapi::qmp::qom_set {
            path: device.to_owned(),
            property: "guest-stats-polling-interval".into(),
            value: Value::from(STATS_POLL_S),
        })
        .map_err(|e| err("qom-set guest-stats-polling-interval", e))?;
        let stats = c
            .execute(qmp::qapi::qmp::qom_get {
                path: device.to_owned(),
                property: "guest-stats".into(),
            })
            .map_err(|e| err("qom-get guest-stats", e))?;
        let actual = c
            .execute(qmp::qapi::qmp::query_balloon {})
            .map_err(|e| err("query-balloon", e))?;
        Ok(BalloonReading {
            actual_mb: actual.actual.max(0) as u64 / MIB,
            guest: parse_guest_stats(&stats, crate::base::unix_now_f64()),
            stamp: stats.get("last-update").and_then(Value::as_i64),
        })
    }

    fn set_balloon(&self, mb: u64) -> Result<(), ControlError> {
        self.execute(qmp::qapi::qmp::balloon {
            value: (mb * MIB) as i64,
        })
        .map(drop)
    }
}

/// `running`, or QEMU's name of the state it is in (`paused`, `shutdown`, `suspended`, …), from
/// a `query-status` answer.
pub fn run_state_name(s: &qmp::qapi::qmp::StatusInfo) -> String {
    if s.running {
        return "running".into();
    }
    serde_json::to_value(s.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "paused".into())
}

/// The QOM path of the VM's virtio-balloon device, if it has one.
fn find_balloon(c: &mut qmp::Client) -> Option<String> {
    for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let Ok(children) = c.execute(qmp::qapi::qmp::qom_list {
            path: parent.into(),
        }) else {
            continue;
        };
        for child in children {
            if child.type_.starts_with("child<virtio-balloon") {
                return Some(format!("{parent}/{}", child.name));
            }
        }
    }
    None
}

/// Whether figures the guest stamped at `updated` (Unix seconds) are fresh at `now`: the guest
/// has answered at all (`updated` > 0), at most [`STATS_MAX_AGE_S`] before `now`.
pub fn fresh(updated: i64, now: f64) -> bool {
    updated > 0 && now - updated as f64 <= STATS_MAX_AGE_S as f64
}

/// The guest's figures from `qom-get guest-stats`, MiB; `None` while the guest has not
/// answered (`last-update` 0), when it stopped answering (see [`fresh`]), or when a figure is
/// −1 (unsupported: QEMU sends −1, or 2⁶⁴−1 read unsigned).
pub fn parse_guest_stats(v: &Value, now: f64) -> Option<GuestMemory> {
    let updated = v.get("last-update")?.as_i64()?;
    if !fresh(updated, now) {
        return None;
    }
    let stat = |k: &str| {
        let x = v.get("stats")?.get(k)?;
        x.as_i64()
            .filter(|&n| n >= 0)
            .map(|n| n as u64)
            .or_else(|| x.as_u64().filter(|&n| n < 1 << 62))
            .map(|b| b / MIB)
    };
    Some(GuestMemory {
        free: stat("stat-free-memory")?,
        available: stat("stat-available-memory")?,
        total: stat("stat-total-memory")?,
    })
}

/// A handle whose every operation fails with `why` (a libvirt VM in a build without libvirt,
/// a connection that cannot be opened).
#[derive(Clone, Debug)]
pub struct Unavailable {
    /// The VM.
    pub name: String,
    /// Why it cannot be controlled.
    pub why: String,
}

impl Unavailable {
    fn fail<T>(&self, what: &str) -> Result<T, ControlError> {
        Err(ControlError::new(&self.name, what, &self.why))
    }
}

impl Control for Unavailable {
    fn run_state(&self) -> Result<String, ControlError> {
        self.fail("run state")
    }
    fn pause(&self) -> Result<(), ControlError> {
        self.fail("pause")
    }
    fn resume(&self) -> Result<(), ControlError> {
        self.fail("resume")
    }
    fn pin_vcpu(&self, _: u32, _: u32, _: u32) -> Result<(), ControlError> {
        self.fail("pin")
    }
    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError> {
        self.fail("balloon")
    }
    fn balloon_read(&self, _: &str) -> Result<BalloonReading, ControlError> {
        self.fail("balloon")
    }
    fn set_balloon(&self, _: u64) -> Result<(), ControlError> {
        self.fail("balloon")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stats_are_read_in_mib_and_minus_one_is_no_stats() {
        let v = serde_json::json!({
            "stats": {
                "stat-free-memory": 300u64 << 20,
                "stat-available-memory": 400u64 << 20,
                "stat-total-memory": 1000u64 << 20,
                "stat-swap-in": -1,
            },
            "last-update": 1000,
        });
        let s = parse_guest_stats(&v, 1001.0).unwrap();
        assert_eq!((s.free, s.available, s.total), (300, 400, 1000));
        // Stale: stamped more than 3 s before the round (the guest stopped answering its
        // 1-second polls), or never answered.
        assert!(parse_guest_stats(&v, 1003.0).is_some());
        assert_eq!(parse_guest_stats(&v, 1003.5), None);
        let mut never = v.clone();
        never["last-update"] = 0.into();
        assert_eq!(parse_guest_stats(&never, 1.0), None);
        let mut minus = v.clone();
        minus["stats"]["stat-available-memory"] = (-1).into();
        assert_eq!(parse_guest_stats(&minus, 1001.0), None);
        minus["stats"]["stat-available-memory"] = u64::MAX.into();
        assert_eq!(parse_guest_stats(&minus, 1001.0), None);
        assert_eq!(parse_guest_stats(&serde_json::json!("garbage"), 1.0), None);
        assert!(!fresh(996, 1000.0) && fresh(997, 1000.0));
    }

    #[test]
    fn a_vm_without_a_socket_says_so_instead_of_connecting() {
        let h = Qmp {
            name: "a".into(),
            socket: PathBuf::new(),
        };
        let e = h.pause().unwrap_err();
        assert!(e.to_string().contains("no QMP socket"), "{e}");
    }
}
