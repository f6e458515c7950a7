//! A libvirt domain's [`Control`] handle (feature `libvirt`), and the shared, self-healing
//! connection the agent's watcher, the memory coordinator and the pinning balancer use.
//!
//! libvirt holds a domain's QMP monitor, so every operation goes through the libvirt API:
//! `virDomainGetState`, `virDomainSuspend`/`Resume`, `virDomainPinVcpuFlags` (libvirt writes
//! the vCPU's cpuset cgroup and calls `sched_setaffinity`, so `virsh vcpupin` agrees),
//! `virDomainGetInfo` (boot size), `virDomainSetMemoryStatsPeriod` + `virDomainMemoryStats`
//! (balloon and guest figures: libvirt's `unused`, `usable` and `available` are the guest's
//! MemFree, MemAvailable and MemTotal) and `virDomainSetMemoryFlags` (the balloon target).
//! The domain is looked up by UUID on each call: one more round trip, and never a handle to a
//! domain that was undefined and defined again under the same name.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conn::{Connection, Domain, LibvirtError, Scope};
use super::lifecycle::State;
use crate::control::{self, BalloonProbe, BalloonReading, Control, ControlError, GuestMemory};

/// How long a failed connection is not retried.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// One connection to `uri` shared by every user, opened again when libvirtd went away.
#[derive(Debug)]
pub struct Pool {
    uri: String,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    conn: Option<Arc<Connection>>,
    failed: Option<(Instant, LibvirtError)>,
}

impl Pool {
    /// A pool for `uri` (nothing is opened until first used).
    pub fn new(uri: &str) -> Arc<Pool> {
        Arc::new(Pool {
            uri: uri.to_owned(),
            state: Mutex::default(),
        })
    }

    /// Its URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The live connection, opened (again) when there is none or libvirtd stopped answering;
    /// a failed open is not retried for [`RETRY_AFTER`] (its error is returned meanwhile).
    pub fn get(&self) -> Result<Arc<Connection>, LibvirtError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = s.conn.as_ref().filter(|c| c.is_alive()) {
            return Ok(Arc::clone(c));
        }
        s.conn = None;
        if let Some((at, e)) = &s.failed {
            if at.elapsed() < RETRY_AFTER {
                return Err(e.clone());
            }
        }
        match Connection::open(&self.uri) {
            Ok(c) => {
                let c = Arc::new(c);
                s.conn = Some(Arc::clone(&c));
                s.failed = None;
                Ok(c)
            }
            Err(e) => {
                s.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Drops the connection (after a call failed as if libvirtd were gone).
    pub fn reset(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.conn = None;
    }
}

/// A libvirt domain's control handle.
#[derive(Clone, Debug)]
pub struct LibvirtControl {
    name: String,
    uuid: String,
    pool: Arc<Pool>,
}

impl LibvirtControl {
    /// The handle of domain `uuid` (shown as `name`) on `pool`'s connection.
    pub fn new(name: &str, uuid: &str, pool: Arc<Pool>) -> LibvirtControl {
        LibvirtControl {
            name: name.to_owned(),
            uuid: uuid.to_owned(),
            pool,
        }
    }

    fn err(&self, e: LibvirtError) -> ControlError {
        ControlError::new(&self.name, e.call, e.message)
    }

    fn domain(&self) -> Result<Domain, ControlError> {
        let conn = self.pool.get().map_err(|e| self.err(e))?;
        conn.domain_by_uuid(&self.uuid).map_err(|e| {
            if !conn.is_alive() {
                self.pool.reset();
            }
            self.err(e)
        })
    }
}

/// libvirt's name for a state, as `virsh domstate` prints it.
pub fn state_name(state: State) -> String {
    match state {
        State::NoState => "nostate".into(),
        State::Running => "running".into(),
        State::Blocked => "blocked".into(),
        State::Paused => "paused".into(),
        State::Shutdown => "shutdown".into(),
        State::Shutoff => "shut off".into(),
        State::Crashed => "crashed".into(),
        State::PmSuspended => "pmsuspended".into(),
        State::Other(n) => format!("state {n}"),
    }
}

impl Control for LibvirtControl {
    fn run_state(&self) -> Result<String, ControlError> {
        let (state, _) = self.domain()?.state().map_err(|e| self.err(e))?;
        Ok(state_name(state))
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.domain()?.suspend().map_err(|e| self.err(e))
    }

    fn resume(&self) -> Result<(), ControlError> {
        self.domain()?.resume().map_err(|e| self.err(e))
    }

    fn pin_vcpu(&self, vcpu: u32, _tid: u32, cpu: u32) -> Result<(), ControlError> {
        self.domain()?
            .pin_vcpu(vcpu, &[cpu], Scope::Live)
            .map_err(|e| self.err(e))
    }

    fn balloon_probe(&self) -> Result<BalloonProbe, ControlError> {
        let d = self.domain()?;
        let info = d.info().map_err(|e| self.err(e))?;
        let xml = d.xml(false).map_err(|e| self.err(e))?;
        let stats = d.memory_stats().map_err(|e| self.err(e))?;
        Ok(BalloonProbe {
            boot_mb: info.max_memory_kib / 1024,
            device: has_virtio_balloon(&xml).then(|| "memballoon".to_owned()),
            actual_mb: stats.actual.map(|k| k / 1024),
        })
    }

    fn balloon_read(&self, _device: &str) -> Result<BalloonReading, ControlError> {
        let d = self.domain()?;
        let period = control::STATS_POLL_S as u32;
        d.set_memory_stats_period(period, Scope::Live)
            .map_err(|e| self.err(e))?;
        let s = d.memory_stats().map_err(|e| self.err(e))?;
        let actual = s.actual.ok_or_else(|| {
            ControlError::new(&self.name, "virDomainMemoryStats", "no balloon size")
        })?;
        let now = crate::base::unix_now_f64();
        let fresh = s.last_update.is_some_and(|t| control::fresh(t as i64, now));
        let guest = match (fresh, s.unused, s.usable, s.available) {
            (true, Some(free), Some(available), Some(total)) => Some(GuestMemory {
                free: free / 1024,
                available: available / 1024,
                total: total / 1024,
            }),
            _ => None,
        };
        Ok(BalloonReading {
            actual_mb: actual / 1024,
            guest,
            stamp: s.last_update.map(|t| t as i64),
        })
    }

    fn set_balloon(&self, mb: u64) -> Result<(), ControlError> {
        self.domain()?
            .set_balloon_kib(mb * 1024)
            .map_err(|e| self.err(e))
    }
}

/// Whether a live domain XML has a virtio balloon (`<memballoon model='virtio'>`; libvirt adds
/// one to every x86 domain unless told `model='none'`).
pub fn has_virtio_balloon(domain_xml: &str) -> bool {
    roxmltree::Document::parse(domain_xml).is_ok_and(|doc| {
        doc.descendants().any(|n| {
            n.has_tag_name("memballoon")
                && n.attribute("model")
                    .is_some_and(|m| m.starts_with("virtio"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balloon_model_is_read_from_the_live_xml() {
        let with = "<domain><devices><memballoon model='virtio'><alias name='balloon0'/></memballoon></devices></domain>";
        assert!(has_virtio_balloon(with));
        assert!(!has_virtio_balloon(
            "<domain><devices><memballoon model='none'/></devices></domain>"
        ));
        assert!(!has_virtio_balloon("<domain>"));
    }
}
