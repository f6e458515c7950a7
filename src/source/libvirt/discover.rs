//! A running domain's QEMU pid, vCPU threads and cgroups, without a libvirt call: from
//! libvirt's status XML, checked against `/proc`.
//!
//! The identity (UUID, id, vCPU count) comes from the connection; the status file must agree
//! with it (the same UUID and the same id: a file left from an earlier run of the domain, or
//! one being rewritten while it starts, is refused as stale and read again on the next poll).
//! Each thread id must be a thread of the pid, and when QEMU named its threads (libvirt always
//! passes `debug-threads=on`) thread `CPU n/…` must be vCPU n. A status file without thread ids
//! falls back to the thread names alone.

use std::fs;
use std::path::Path;

use thiserror::Error;

use super::status::{self, Cgroups, ReadError};
use crate::source::threads::{self, ThreadsError};

/// What the connection says about a running domain.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    /// Its UUID.
    pub uuid: &'a str,
    /// Its name (the status file's name).
    pub name: &'a str,
    /// Its id.
    pub id: u32,
    /// Its live vCPU count.
    pub vcpus: u32,
}

/// Where the vCPU thread ids came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TidSource {
    /// libvirt's status XML (`<vcpu id pid>`), cross-checked with the thread names.
    StatusXml,
    /// The thread names `CPU n/…` alone.
    ThreadNames,
}

/// A running domain's process facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// QEMU's pid.
    pub pid: u32,
    /// QEMU's start time (`/proc/PID/stat` field 22), to tell a reused pid apart.
    pub qemu_start: u64,
    /// The vCPU thread ids in vCPU order.
    pub vcpu_tids: Vec<u32>,
    /// Where they came from.
    pub tids_from: TidSource,
    /// The domain's cgroups.
    pub cgroups: Cgroups,
}

/// Why a running domain's facts could not be found.
#[derive(Debug, Error)]
pub enum DiscoverError {
    /// The status file could not be read or parsed (not root, another run dir, …).
    #[error("libvirt status file")]
    Status(#[source] ReadError),
    /// The status file describes another run or another domain.
    #[error("libvirt status file is stale: it has uuid {uuid} id {id:?}, the domain is {expected_uuid} id {expected_id}")]
    Stale {
        /// The file's UUID.
        uuid: String,
        /// The file's id.
        id: Option<u32>,
        /// The domain's UUID.
        expected_uuid: String,
        /// The domain's id.
        expected_id: u32,
    },
    /// QEMU's process is gone.
    #[error("QEMU (pid {0}) is not running")]
    Gone(u32),
    /// A listed thread is not QEMU's, or is named for another vCPU.
    #[error("thread {tid} listed for vCPU {vcpu} {problem}")]
    Thread {
        /// The vCPU.
        vcpu: u32,
        /// The thread.
        tid: u32,
        /// What is wrong.
        problem: String,
    },
    /// The vCPU threads could not be identified by name.
    #[error("QEMU (pid {pid}): {source}")]
    Names {
        /// QEMU's pid.
        pid: u32,
        /// Why.
        #[source]
        source: ThreadsError,
    },
    /// libvirt and the threads disagree on the vCPU count.
    #[error("the domain has {expected} vCPUs but {found} vCPU threads were found")]
    Count {
        /// The connection's count.
        expected: u32,
        /// The threads found.
        found: usize,
    },
}

/// QEMU's start time from `PROC/PID/stat` (field 22, after the parenthesised name).
pub fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; field 22 is the 20th from there.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn thread_name(proc_root: &Path, pid: u32, tid: u32) -> Option<String> {
    let path = proc_root.join(format!("{pid}/task/{tid}/comm"));
    fs::read_to_string(path)
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// The running domain's facts, from the status XML under `run_dir` and `/proc` at `proc_root`.
pub fn discover(
    run_dir: &Path,
    proc_root: &Path,
    expected: &Expected,
) -> Result<Found, DiscoverError> {
    let status = status::read(run_dir, expected.name).map_err(DiscoverError::Status)?;
    if !status.uuid.eq_ignore_ascii_case(expected.uuid) || status.id != Some(expected.id) {
        return Err(DiscoverError::Stale {
            uuid: status.uuid,
            id: status.id,
            expected_uuid: expected.uuid.to_owned(),
            expected_id: expected.id,
        });
    }
    let pid = status.pid;
    let qemu_start = start_time(proc_root, pid).ok_or(DiscoverError::Gone(pid))?;
    let (vcpu_tids, tids_from) = if status.vcpus.is_empty() {
        let by_name = threads::vcpu_threads(proc_root, pid)
            .map_err(|_| DiscoverError::Gone(pid))?
            .map_err(|source| DiscoverError::Names { pid, source })?;
        (by_name, TidSource::ThreadNames)
    } else {
        for &(vcpu, tid) in &status.vcpus {
            let thread = |problem: &str| DiscoverError::Thread {
                vcpu,
                tid,
                problem: problem.to_owned(),
            };
            let name = thread_name(proc_root, pid, tid)
                .ok_or_else(|| thread(&format!("is not a thread of QEMU (pid {pid})")))?;
            if let Some(n) = threads::vcpu_index(&name) {
                if n != vcpu {
                    return Err(thread(&format!("is named {name:?}")));
                }
            }
        }
        (status.vcpu_tids(), TidSource::StatusXml)
    };
    if vcpu_tids.len() != expected.vcpus as usize {
        return Err(DiscoverError::Count {
            expected: expected.vcpus,
            found: vcpu_tids.len(),
        });
    }
    let cgroups = fs::read_to_string(proc_root.join(format!("{pid}/cgroup")))
        .map(|text| status::cgroups(&text))
        .unwrap_or_default();
    Ok(Found {
        pid,
        qemu_start,
        vcpu_tids,
        tids_from,
        cgroups,
    })
}

/// A domain's status file and its QEMU in a `/proc` of plain files, for the tests here and
/// the agent's libvirt watcher's.
#[cfg(test)]
pub(crate) mod fixture {
    use std::fs;
    use std::path::PathBuf;

    pub(crate) struct Fixture {
        /// The temporary dir holding both (read by the agent's libvirt tests).
        #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
        pub(crate) dir: tempfile::TempDir,
        pub(crate) run: PathBuf,
        pub(crate) proc: PathBuf,
    }

    /// A run dir with `status` as dom.xml, and a /proc with pid 100 and the given threads.
    pub(crate) fn fixture(status: &str, threads: &[(u32, &str)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (run, proc) = (dir.path().join("run"), dir.path().join("proc"));
        fs::create_dir_all(&run).unwrap();
        fs::write(run.join("dom.xml"), status).unwrap();
        let p = proc.join("100");
        fs::create_dir_all(&p).unwrap();
        fs::write(
            p.join("stat"),
            "100 (qemu-system-x86) S 1 100 100 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 5 0 4242 0 0\n",
        )
        .unwrap();
        fs::write(
            p.join("cgroup"),
            "1:cpu:/machine/qemu-7-dom.libvirt-qemu/emulator\n",
        )
        .unwrap();
        for (tid, comm) in threads {
            let t = p.join(format!("task/{tid}"));
            fs::create_dir_all(&t).unwrap();
            fs::write(t.join("comm"), format!("{comm}\n")).unwrap();
        }
        Fixture { dir, run, proc }
    }

    pub(crate) const UUID: &str = "4613142e-8033-458a-8bae-df609cea8603";

    pub(crate) fn status(vcpus: &str) -> String {
        format!(
            "<domstatus state='running' reason='booted' pid='100'><vcpus>{vcpus}</vcpus>\
             <domain type='qemu' id='7'><name>dom</name><uuid>{UUID}</uuid></domain></domstatus>"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{fixture, status, UUID};
    use super::*;

    fn expected(vcpus: u32) -> Expected<'static> {
        Expected {
            uuid: UUID,
            name: "dom",
            id: 7,
            vcpus,
        }
    }

    const THREADS: &[(u32, &str)] = &[
        (100, "qemu-system-x86"),
        (101, "CPU 0/TCG"),
        (102, "CPU 1/TCG"),
    ];

    #[test]
    fn the_status_file_gives_threads_checked_against_proc() {
        let f = fixture(
            &status("<vcpu id='0' pid='101'/><vcpu id='1' pid='102'/>"),
            THREADS,
        );
        let found = discover(&f.run, &f.proc, &expected(2)).unwrap();
        assert_eq!(found.pid, 100);
        assert_eq!(found.qemu_start, 4242);
        assert_eq!(found.vcpu_tids, vec![101, 102]);
        assert_eq!(found.tids_from, TidSource::StatusXml);
        assert_eq!(
            found.cgroups.v1_cpu.as_deref(),
            Some("/machine/qemu-7-dom.libvirt-qemu")
        );
    }

    #[test]
    fn without_thread_ids_in_the_file_the_names_are_used() {
        let f = fixture(&status(""), THREADS);
        let found = discover(&f.run, &f.proc, &expected(2)).unwrap();
        assert_eq!(found.vcpu_tids, vec![101, 102]);
        assert_eq!(found.tids_from, TidSource::ThreadNames);
    }

    #[test]
    fn stale_foreign_and_mismatched_facts_are_refused() {
        let good = "<vcpu id='0' pid='101'/><vcpu id='1' pid='102'/>";
        let f = fixture(&status(good), THREADS);
        let other_run = Expected {
            id: 8,
            ..expected(2)
        };
        assert!(matches!(
            discover(&f.run, &f.proc, &other_run),
            Err(DiscoverError::Stale { .. })
        ));
        let e = discover(&f.run, &f.proc, &expected(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the domain has 3 vCPUs but 2 vCPU threads were found"
        );

        let f = fixture(
            &status("<vcpu id='0' pid='101'/><vcpu id='1' pid='999'/>"),
            THREADS,
        );
        let e = discover(&f.run, &f.proc, &expected(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "thread 999 listed for vCPU 1 is not a thread of QEMU (pid 100)"
        );

        let f = fixture(
            &status("<vcpu id='0' pid='102'/><vcpu id='1' pid='101'/>"),
            THREADS,
        );
        let e = discover(&f.run, &f.proc, &expected(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "thread 102 listed for vCPU 0 is named \"CPU 1/TCG\""
        );

        let f = fixture(
            &status(""),
            &[(100, "qemu-system-x86"), (101, "qemu-system-x86")],
        );
        let e = discover(&f.run, &f.proc, &expected(1)).unwrap_err();
        assert!(e.to_string().contains("debug-threads=on"), "{e}");

        let missing = Expected {
            name: "nope",
            ..expected(2)
        };
        assert!(matches!(
            discover(&f.run, &f.proc, &missing),
            Err(DiscoverError::Status(_))
        ));
    }

    #[test]
    fn the_start_time_survives_a_name_with_spaces_and_parentheses() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("5")).unwrap();
        fs::write(
            dir.path().join("5/stat"),
            "5 (a) b (c) S 1 5 5 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0\n",
        )
        .unwrap();
        assert_eq!(start_time(dir.path(), 5), Some(777));
        assert_eq!(start_time(dir.path(), 6), None);
    }
}
