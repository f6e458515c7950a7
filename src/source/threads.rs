//! vCPU threads of a QEMU found by their names.
//!
//! With `-name …,debug-threads=on` (libvirt always passes it; burst-qemu's launcher adds it;
//! Proxmox's `qm` passes it) QEMU names each vCPU thread `CPU n/ACCEL`: `CPU 0/KVM`,
//! `CPU 1/TCG` (multi-threaded TCG, the default on x86 hosts), `CPU 0/HVF`, `CPU 0/WHPX`,
//! `CPU 0/NVMM`. Single-threaded TCG (`-accel tcg,thread=single`) runs every vCPU on one thread
//! named `ALL CPUs/TCG`; without `debug-threads` every thread is named after the binary
//! (`qemu-system-x86`). In those two cases the vCPU threads cannot be told apart by name, and
//! [`from_names`] says so rather than guessing.
//!
//! Thread names are at most 15 bytes (`TASK_COMM_LEN` 16): `CPU 9999/TCG` still fits.
//!
//! The `/proc` scan takes the proc root as a parameter so that fixtures can stand in for it;
//! phase 2 moves it beside the agent's other procfs readers (`src/procfs.rs`, issue 19).

use std::fs;
use std::io;
use std::path::Path;

use thiserror::Error;

/// The vCPU index of a thread named `CPU n/ACCEL`, if the name has that shape.
pub fn vcpu_index(comm: &str) -> Option<u32> {
    let rest = comm.trim_end_matches('\n').strip_prefix("CPU ")?;
    let (index, accel) = rest.split_once('/')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || accel.is_empty() {
        return None;
    }
    index.parse().ok()
}

/// Why a QEMU's vCPU threads could not be identified by name.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ThreadsError {
    /// No thread is named `CPU n/…`.
    #[error(
        "no thread is named \"CPU n/ACCEL\" (QEMU was started without -name …,debug-threads=on)"
    )]
    Unnamed,
    /// Single-threaded TCG: one thread runs every vCPU.
    #[error("QEMU runs every vCPU on one thread (\"ALL CPUs/TCG\", -accel tcg,thread=single)")]
    SingleThreaded,
    /// Two threads claim one vCPU.
    #[error("threads {first} and {second} are both named for vCPU {index}")]
    Duplicate {
        /// The vCPU index.
        index: u32,
        /// One thread.
        first: u32,
        /// The other.
        second: u32,
    },
    /// The indices are not 0..n.
    #[error("no thread is named for vCPU {missing} (found {found} vCPU threads)")]
    Gap {
        /// The first index without a thread.
        missing: u32,
        /// How many vCPU threads were found.
        found: usize,
    },
}

/// The vCPU thread ids in vCPU order, from `(tid, name)` pairs of one process's threads.
pub fn from_names<'a>(
    threads: impl IntoIterator<Item = (u32, &'a str)>,
) -> Result<Vec<u32>, ThreadsError> {
    let mut found: Vec<(u32, u32)> = Vec::new();
    let mut single = false;
    for (tid, comm) in threads {
        if comm.trim_end() == "ALL CPUs/TCG" {
            single = true;
        }
        if let Some(index) = vcpu_index(comm) {
            found.push((index, tid));
        }
    }
    if found.is_empty() {
        return Err(if single {
            ThreadsError::SingleThreaded
        } else {
            ThreadsError::Unnamed
        });
    }
    found.sort_unstable();
    for pair in found.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(ThreadsError::Duplicate {
                index: pair[0].0,
                first: pair[0].1,
                second: pair[1].1,
            });
        }
    }
    if let Some(missing) = (0u32..)
        .zip(&found)
        .find(|(i, f)| f.0 != *i)
        .map(|(i, _)| i)
    {
        return Err(ThreadsError::Gap {
            missing,
            found: found.len(),
        });
    }
    Ok(found.into_iter().map(|(_, tid)| tid).collect())
}

/// `(tid, name)` of every thread of `pid` under `proc_root` (normally `/proc`). Threads that
/// end while they are listed are skipped.
pub fn list(proc_root: &Path, pid: u32) -> io::Result<Vec<(u32, String)>> {
    let mut threads = Vec::new();
    for entry in fs::read_dir(proc_root.join(pid.to_string()).join("task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(entry.path().join("comm")) {
            threads.push((tid, comm.trim_end_matches('\n').to_owned()));
        }
    }
    threads.sort_unstable();
    Ok(threads)
}

/// The vCPU thread ids of `pid` in vCPU order, by their names.
pub fn vcpu_threads(proc_root: &Path, pid: u32) -> io::Result<Result<Vec<u32>, ThreadsError>> {
    let threads = list(proc_root, pid)?;
    Ok(from_names(threads.iter().map(|(t, c)| (*t, c.as_str()))))
}

/// Whether `tid` is a thread of `pid` under `proc_root`.
pub fn is_thread_of(proc_root: &Path, pid: u32, tid: u32) -> bool {
    proc_root
        .join(pid.to_string())
        .join("task")
        .join(tid.to_string())
        .exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vcpu_thread_names_give_their_index() {
        assert_eq!(vcpu_index("CPU 0/TCG"), Some(0));
        assert_eq!(vcpu_index("CPU 17/KVM\n"), Some(17));
        assert_eq!(vcpu_index("CPU 3/HVF"), Some(3));
        for other in [
            "qemu-system-x86",
            "IO mon_iothread",
            "ALL CPUs/TCG",
            "CPU /TCG",
            "CPU 1/",
            "CPU -1/KVM",
            "CPU 1x/KVM",
            "cpu 1/KVM",
            "CPU 99999999999/KVM",
        ] {
            assert_eq!(vcpu_index(other), None, "{other}");
        }
    }

    #[test]
    fn vcpu_threads_come_in_vcpu_order() {
        let threads = [
            (100, "qemu-system-x86"),
            (104, "CPU 1/TCG"),
            (102, "call_rcu"),
            (103, "CPU 0/TCG"),
            (105, "IO mon_iothread"),
        ];
        assert_eq!(from_names(threads), Ok(vec![103, 104]));
    }

    #[test]
    fn unnamed_single_threaded_duplicate_and_gapped_threads_are_refused() {
        assert_eq!(
            from_names([(1, "qemu-system-x86"), (2, "qemu-system-x86")]),
            Err(ThreadsError::Unnamed)
        );
        assert_eq!(
            from_names([(1, "qemu-system-x86"), (2, "ALL CPUs/TCG")]),
            Err(ThreadsError::SingleThreaded)
        );
        assert_eq!(
            from_names([(5, "CPU 0/KVM"), (6, "CPU 0/KVM")]),
            Err(ThreadsError::Duplicate {
                index: 0,
                first: 5,
                second: 6
            })
        );
        assert_eq!(
            from_names([(5, "CPU 0/KVM"), (7, "CPU 2/KVM")]),
            Err(ThreadsError::Gap {
                missing: 1,
                found: 2
            })
        );
        assert!(from_names([(5, "CPU 1/KVM")]).is_err());
    }

    #[test]
    fn a_fixture_proc_tree_is_read() {
        let root = tempfile::tempdir().unwrap();
        for (tid, comm) in [
            (40, "qemu-system-x86"),
            (42, "CPU 1/KVM"),
            (41, "CPU 0/KVM"),
        ] {
            let dir = root.path().join(format!("40/task/{tid}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        }
        assert_eq!(vcpu_threads(root.path(), 40).unwrap(), Ok(vec![41, 42]));
        assert!(is_thread_of(root.path(), 40, 42));
        assert!(!is_thread_of(root.path(), 40, 43));
        assert!(vcpu_threads(root.path(), 41).is_err());
    }

    proptest! {
        #[test]
        fn any_names_give_a_result_never_a_panic(
            names in proptest::collection::vec(("[0-9]{1,4}", ".{0,20}"), 0..12),
        ) {
            let threads: Vec<(u32, String)> = names
                .into_iter()
                .map(|(t, n)| (t.parse().unwrap(), n))
                .collect();
            if let Ok(tids) = from_names(threads.iter().map(|(t, n)| (*t, n.as_str()))) {
                prop_assert!(!tids.is_empty());
            }
        }
    }
}
