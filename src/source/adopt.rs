//! A QEMU that neither burst-qemu nor libvirt started (Proxmox's `qm`, Incus, a script): its
//! vCPU threads, for `burst-qemu adopt --pid PID [--qmp PATH] --vcpus N …` (issue 21; the
//! command itself and the agent's handling of an adopted VM come in phase 2).
//!
//! Two ways to find the threads, in this order:
//!
//! 1. **QMP**, when a socket is given and free: `query-cpus-fast` lists every vCPU with its
//!    `thread-id`. QEMU serves one client per monitor, so a socket held by a manager (Proxmox
//!    connects per command; Incus and libvirt hold theirs) does not greet a second client: after
//!    [`QMP_TIMEOUT`] without a greeting the socket counts as busy and the names are used.
//!    A socket that answers for *another* QEMU (its thread ids are not threads of PID) is an
//!    error, never a fallback: the operator named the wrong socket.
//! 2. **Thread names** `CPU n/ACCEL` ([`crate::source::threads`]), which need
//!    `-name …,debug-threads=on` (Proxmox and libvirt pass it).
//!
//! Either way the count must be the `--vcpus` the operator gave, every thread id must belong to
//! PID, and no thread may serve two vCPUs (single-threaded TCG runs them all on one): a QEMU
//! whose vCPU threads cannot be identified is refused with the reason, never half-managed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::libvirt::discover::start_time;
use super::threads::{self, ThreadsError};

/// How long a QMP socket may take to greet before it counts as busy.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// How the vCPU threads were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// QMP `query-cpus-fast` on the given socket.
    Qmp,
    /// Thread names; `qmp_skipped` says why the socket was not used, when one was given.
    ThreadNames {
        /// Why QMP was not used.
        qmp_skipped: Option<String>,
    },
}

/// A foreign QEMU's facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22).
    pub qemu_start: u64,
    /// The vCPU thread ids in vCPU order.
    pub vcpu_tids: Vec<u32>,
    /// How they were found.
    pub via: Via,
}

/// Why a QEMU cannot be adopted.
#[derive(Debug, Error)]
pub enum AdoptError {
    /// No such process.
    #[error("no process {pid}")]
    NoProcess {
        /// The pid.
        pid: u32,
    },
    /// The QMP socket answers for another process.
    #[error("{socket}: QMP reports vCPU {vcpu} on thread {tid}, which is not a thread of pid {pid}: the socket belongs to another QEMU", socket = .socket.display())]
    ForeignSocket {
        /// The socket.
        socket: PathBuf,
        /// The vCPU.
        vcpu: usize,
        /// Its thread id as QMP reported it.
        tid: i64,
        /// The pid given.
        pid: u32,
    },
    /// The vCPU threads cannot be told apart.
    #[error("pid {pid}: cannot identify the vCPU threads: {source}{hint}")]
    Unidentified {
        /// The pid.
        pid: u32,
        /// Why.
        #[source]
        source: ThreadsError,
        /// What would help.
        hint: String,
    },
    /// The count differs from `--vcpus`.
    #[error("pid {pid}: --vcpus is {expected} but {found} vCPU threads were found ({via})")]
    Count {
        /// The pid.
        pid: u32,
        /// `--vcpus`.
        expected: u32,
        /// Found.
        found: usize,
        /// How they were found.
        via: &'static str,
    },
}

/// The vCPU thread ids QMP reports, in vCPU order (`-1` when a CPU has none).
fn qmp_thread_ids(socket: &Path) -> Result<Vec<i64>, qmp::Error> {
    let mut client = qmp::Client::connect(socket, QMP_TIMEOUT)?;
    let cpus = client.execute(qmp::qapi::qmp::query_cpus_fast {})?;
    let mut ids: Vec<(i64, i64)> = cpus
        .iter()
        .map(|cpu| {
            // Every target's variant carries the same base; read it through JSON.
            let v = serde_json::to_value(cpu).unwrap_or_default();
            let field = |name: &str| v.get(name).and_then(serde_json::Value::as_i64);
            (
                field("cpu-index").unwrap_or(-1),
                field("thread-id").unwrap_or(-1),
            )
        })
        .collect();
    ids.sort_unstable();
    Ok(ids.into_iter().map(|(_, tid)| tid).collect())
}

fn check_distinct(pid: u32, tids: &[u32], via: &str) -> Result<(), AdoptError> {
    let mut sorted = tids.to_vec();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|p| p[0] == p[1]) {
        let index = tids.iter().position(|&t| t == pair[0]).unwrap_or(0) as u32;
        return Err(AdoptError::Unidentified {
            pid,
            source: ThreadsError::Duplicate {
                index,
                first: pair[0],
                second: pair[1],
            },
            hint: format!(
                " ({via}: one thread runs several vCPUs, as single-threaded TCG does; \
                 start QEMU with -accel tcg,thread=multi or KVM)"
            ),
        });
    }
    Ok(())
}

/// Finds the vCPU threads of the QEMU `pid` (under `proc_root`, normally `/proc`), through
/// the QMP socket `qmp` when given and free, else by thread names; `vcpus` is the count the
/// operator declared.
pub fn find_vcpu_threads(
    proc_root: &Path,
    pid: u32,
    qmp: Option<&Path>,
    vcpus: u32,
) -> Result<Found, AdoptError> {
    let qemu_start = start_time(proc_root, pid).ok_or(AdoptError::NoProcess { pid })?;
    let mut qmp_skipped = None;
    if let Some(socket) = qmp {
        match qmp_thread_ids(socket) {
            Ok(ids) => {
                let mut tids = Vec::with_capacity(ids.len());
                for (vcpu, &tid) in ids.iter().enumerate() {
                    let own = u32::try_from(tid)
                        .ok()
                        .filter(|&t| threads::is_thread_of(proc_root, pid, t));
                    tids.push(own.ok_or_else(|| AdoptError::ForeignSocket {
                        socket: socket.to_owned(),
                        vcpu,
                        tid,
                        pid,
                    })?);
                }
                check_distinct(pid, &tids, "QMP query-cpus-fast")?;
                if tids.len() != vcpus as usize {
                    return Err(AdoptError::Count {
                        pid,
                        expected: vcpus,
                        found: tids.len(),
                        via: "QMP query-cpus-fast",
                    });
                }
                return Ok(Found {
                    pid,
                    qemu_start,
                    vcpu_tids: tids,
                    via: Via::Qmp,
                });
            }
            Err(e) => {
                qmp_skipped = Some(format!("{}: {e}", socket.display()));
            }
        }
    }
    let hint = match &qmp_skipped {
        Some(why) => format!(" (QMP was not usable: {why})"),
        None => {
            " (give a free QMP socket with --qmp, or start QEMU with -name NAME,debug-threads=on)"
                .to_owned()
        }
    };
    let tids = threads::vcpu_threads(proc_root, pid)
        .map_err(|_| AdoptError::NoProcess { pid })?
        .map_err(|source| AdoptError::Unidentified { pid, source, hint })?;
    if tids.len() != vcpus as usize {
        return Err(AdoptError::Count {
            pid,
            expected: vcpus,
            found: tids.len(),
            via: "thread names",
        });
    }
    Ok(Found {
        pid,
        qemu_start,
        vcpu_tids: tids,
        via: Via::ThreadNames { qmp_skipped },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn proc_with(threads: &[(u32, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("50");
        fs::create_dir_all(&p).unwrap();
        fs::write(
            p.join("stat"),
            "50 (kvm) S 1 50 50 0 -1 0 0 0 0 0 0 0 0 0 20 0 3 0 99 0\n",
        )
        .unwrap();
        for (tid, comm) in threads {
            fs::create_dir_all(p.join(format!("task/{tid}"))).unwrap();
            fs::write(p.join(format!("task/{tid}/comm")), format!("{comm}\n")).unwrap();
        }
        root
    }

    #[test]
    fn named_threads_are_found_without_qmp() {
        let root = proc_with(&[(50, "kvm"), (52, "CPU 1/KVM"), (51, "CPU 0/KVM")]);
        let found = find_vcpu_threads(root.path(), 50, None, 2).unwrap();
        assert_eq!(found.vcpu_tids, vec![51, 52]);
        assert_eq!(found.qemu_start, 99);
        assert_eq!(found.via, Via::ThreadNames { qmp_skipped: None });
    }

    #[test]
    fn refusals_say_why_and_what_would_help() {
        let root = proc_with(&[(50, "kvm"), (51, "kvm")]);
        let e = find_vcpu_threads(root.path(), 50, None, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("debug-threads=on") && e.contains("--qmp"), "{e}");

        let root = proc_with(&[(50, "kvm"), (51, "CPU 0/KVM")]);
        let e = find_vcpu_threads(root.path(), 50, None, 2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "pid 50: --vcpus is 2 but 1 vCPU threads were found (thread names)"
        );

        let e = find_vcpu_threads(root.path(), 51, None, 1)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no process 51");

        // A socket path that does not exist: the names are used, and the reason kept.
        let found =
            find_vcpu_threads(root.path(), 50, Some(Path::new("/nonexistent/qmp")), 1).unwrap();
        assert!(
            matches!(found.via, Via::ThreadNames { qmp_skipped: Some(ref w) } if w.contains("/nonexistent/qmp"))
        );
    }
}
