//! libvirt's status XML of a running QEMU domain, and the domain's cgroups.
//!
//! libvirtd keeps `RUN_DIR/NAME.xml` (`/run/libvirt/qemu` for `qemu:///system`, mode 0600
//! root) while a domain runs, and rewrites it on every state change. The parts read here, as
//! libvirt 9.0 writes them (`testdata/status-host-v1.xml` is a real one):
//!
//! ```xml
//! <domstatus state='running' reason='booted' pid='17555'>
//!   <vcpus>
//!     <vcpu id='0' pid='17561'/>          ← vCPU 0's thread id (only vCPUs that are online)
//!     <vcpu id='1' pid='17562'/>
//!   </vcpus>
//!   …
//!   <domain type='qemu' id='1'>           ← the live definition; `id` = virDomainGetID
//!     <name>…</name> <uuid>…</uuid>
//!     <vcpus> <vcpu id='0' enabled='yes' …/> … </vcpus>   ← not thread ids: ignored
//! ```
//!
//! Reading it costs no libvirt call and does not taint the domain (`qemu-monitor-command`
//! would). The parser takes any text and never panics; what it cannot use is an error naming
//! the element and attribute.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};
use thiserror::Error;

/// The run dir of the system instance's QEMU driver.
pub const SYSTEM_RUN_DIR: &str = "/run/libvirt/qemu";

/// What the status XML says about a running domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// QEMU's pid.
    pub pid: u32,
    /// libvirt's state name (`running`, `paused`, …).
    pub state: String,
    /// libvirt's reason for it (`booted`, `unpaused`, `migrated`, `user`, …).
    pub reason: String,
    /// The domain's name.
    pub name: String,
    /// The domain's UUID, as libvirt prints it.
    pub uuid: String,
    /// The domain's id (as `virDomainGetID`), when the file has one.
    pub id: Option<u32>,
    /// `(vCPU id, thread id)` of each online vCPU, by vCPU id.
    pub vcpus: Vec<(u32, u32)>,
}

impl Status {
    /// The vCPU thread ids in vCPU order.
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.vcpus.iter().map(|&(_, tid)| tid).collect()
    }
}

/// A status XML that cannot be used.
#[derive(Debug, Error)]
pub enum StatusError {
    /// Not well-formed XML.
    #[error("not XML")]
    Xml(#[source] roxmltree::Error),
    /// The root element is not `<domstatus>`.
    #[error("the root element is <{0}>, not <domstatus>")]
    NotStatus(String),
    /// A required element or attribute is missing or malformed.
    #[error("{what}: {problem}")]
    Field {
        /// The element and attribute, as `<vcpu pid>`.
        what: String,
        /// What is wrong.
        problem: String,
    },
}

/// A status file that could not be read or used.
#[derive(Debug, Error)]
#[error("{path}", path = .path.display())]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: ReadCause,
}

/// Why a status file could not be used.
#[derive(Debug, Error)]
pub enum ReadCause {
    /// Reading failed (absent: the domain is not running, or another run dir).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Its content.
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// The status file of domain `name` under `run_dir`.
pub fn path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.xml"))
}

/// Reads and parses the status file of domain `name` under `run_dir`.
pub fn read(run_dir: &Path, name: &str) -> Result<Status, ReadError> {
    let path = path(run_dir, name);
    let parsed = fs::read_to_string(&path)
        .map_err(ReadCause::from)
        .and_then(|text| parse(&text).map_err(ReadCause::from));
    parsed.map_err(|source| ReadError { path, source })
}

fn field(what: &str, problem: impl Into<String>) -> StatusError {
    StatusError::Field {
        what: what.to_owned(),
        problem: problem.into(),
    }
}

fn number(node: Node, attr: &str, what: &str) -> Result<u32, StatusError> {
    let value = node.attribute(attr).ok_or_else(|| field(what, "missing"))?;
    value
        .parse()
        .map_err(|_| field(what, format!("{value:?} is not a number")))
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.has_tag_name(name))
}

/// Parses a status XML.
pub fn parse(text: &str) -> Result<Status, StatusError> {
    let doc = Document::parse(text).map_err(StatusError::Xml)?;
    let root = doc.root_element();
    if !root.has_tag_name("domstatus") {
        return Err(StatusError::NotStatus(root.tag_name().name().to_owned()));
    }
    let pid = number(root, "pid", "<domstatus pid>")?;
    let state = root.attribute("state").unwrap_or_default().to_owned();
    let reason = root.attribute("reason").unwrap_or_default().to_owned();
    let mut vcpus = Vec::new();
    if let Some(list) = child(root, "vcpus") {
        for vcpu in list
            .children()
            .filter(|c| c.is_element() && c.has_tag_name("vcpu"))
        {
            let id = number(vcpu, "id", "<vcpu id>")?;
            // An offline vCPU has no thread; libvirt leaves its pid out.
            if vcpu.attribute("pid").is_some() {
                vcpus.push((id, number(vcpu, "pid", "<vcpu pid>")?));
            }
        }
    }
    vcpus.sort_unstable();
    if let Some(pair) = vcpus.windows(2).find(|p| p[0].0 == p[1].0) {
        return Err(field(
            "<vcpu id>",
            format!("vCPU {} listed twice", pair[0].0),
        ));
    }
    let domain = child(root, "domain").ok_or_else(|| field("<domain>", "missing"))?;
    let text_of = |name: &str| {
        child(domain, name)
            .and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| field(&format!("<domain><{name}>"), "missing"))
    };
    let id = match domain.attribute("id") {
        None => None,
        Some(_) => Some(number(domain, "id", "<domain id>")?),
    };
    Ok(Status {
        pid,
        state,
        reason,
        name: text_of("name")?,
        uuid: text_of("uuid")?,
        id,
        vcpus,
    })
}

/// A domain's cgroups, from its QEMU's `/proc/PID/cgroup` (libvirt names them
/// `machine/qemu-ID-NAME.libvirt-qemu` without systemd, and escapes and may shorten the name
/// in systemd's scope: the running process is the one reliable source).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cgroups {
    /// The domain's directory in the v1 hierarchy that has the `cpu` controller (relative to
    /// its mount), when there is one.
    pub v1_cpu: Option<String>,
    /// The domain's directory in the unified (v2) hierarchy, when the process is in one.
    pub unified: Option<String>,
}

/// Parses `/proc/PID/cgroup` of a domain's QEMU (its main thread sits in the domain's
/// `emulator` child; the domain's directory is that child's parent).
pub fn cgroups(proc_cgroup: &str) -> Cgroups {
    let domain_dir =
        |path: &str| -> String { path.strip_suffix("/emulator").unwrap_or(path).to_owned() };
    let mut found = Cgroups::default();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            if path != "/" {
                found.unified = Some(domain_dir(path));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            found.v1_cpu = Some(domain_dir(path));
        }
    }
    found
}

/// The v1/v2 directory of vCPU `n` below a domain's cgroup directory.
pub fn vcpu_cgroup(domain_dir: &str, n: u32) -> String {
    format!("{domain_dir}/vcpu{n}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOST_V1: &str = include_str!("testdata/status-host-v1.xml");

    #[test]
    fn a_real_status_file_gives_pid_ids_and_vcpu_threads() {
        let status = parse(HOST_V1).unwrap();
        assert_eq!(status.pid, 19282);
        assert_eq!(status.state, "running");
        assert_eq!(status.reason, "unpaused");
        assert_eq!(status.name, "bq-exp");
        assert_eq!(status.uuid, "4613142e-8033-458a-8bae-df609cea8603");
        assert_eq!(status.id, Some(3));
        // Only <domstatus><vcpus>, not the definition's <domain><vcpus>.
        assert_eq!(status.vcpus, vec![(0, 19288), (1, 19289), (2, 19599)]);
        assert_eq!(status.vcpu_tids(), vec![19288, 19289, 19599]);
    }

    #[test]
    fn offline_vcpus_are_left_out_and_order_is_by_id() {
        let text = "<domstatus state='paused' reason='user' pid='9'><vcpus>\
            <vcpu id='2' pid='13'/><vcpu id='1'/><vcpu id='0' pid='11'/></vcpus>\
            <domain type='qemu' id='4'><name>a</name><uuid>u</uuid></domain></domstatus>";
        let status = parse(text).unwrap();
        assert_eq!(status.vcpus, vec![(0, 11), (2, 13)]);
        assert_eq!(status.state, "paused");
    }

    #[test]
    fn bad_files_are_errors_that_name_the_field() {
        let cases = [
            ("", "not XML"),
            ("<domain/>", "<domain>, not <domstatus>"),
            ("<domstatus/>", "<domstatus pid>: missing"),
            ("<domstatus pid='x'/>", "<domstatus pid>: \"x\" is not a number"),
            (
                "<domstatus pid='1'><vcpus><vcpu id='0' pid='-3'/></vcpus></domstatus>",
                "<vcpu pid>",
            ),
            (
                "<domstatus pid='1'><vcpus><vcpu pid='3'/></vcpus></domstatus>",
                "<vcpu id>: missing",
            ),
            (
                "<domstatus pid='1'><vcpus><vcpu id='0' pid='3'/><vcpu id='0' pid='4'/></vcpus></domstatus>",
                "vCPU 0 listed twice",
            ),
            ("<domstatus pid='1'/>", "<domain>: missing"),
            (
                "<domstatus pid='1'><domain><name>a</name></domain></domstatus>",
                "<domain><uuid>: missing",
            ),
            (
                "<domstatus pid='1'><domain id='z'><name>a</name><uuid>u</uuid></domain></domstatus>",
                "<domain id>",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path(), "nope").unwrap_err();
        assert_eq!(e.path, dir.path().join("nope.xml"));
        assert!(matches!(e.source, ReadCause::Io(_)));
    }

    #[test]
    fn cgroups_of_a_domain_on_v1_and_on_v2() {
        // The host (cgroup v1 + an empty unified hierarchy, no systemd), as seen by libvirt 9.0.
        let host = "9:name=systemd:/\n8:pids:/\n4:memory:/machine/qemu-1-bq-exp.libvirt-qemu\n\
            3:cpuset:/machine/qemu-1-bq-exp.libvirt-qemu/emulator\n2:cpuacct:/\n\
            1:cpu:/machine/qemu-1-bq-exp.libvirt-qemu/emulator\n\
            0::/machine/qemu-1-bq-exp.libvirt-qemu/emulator\n";
        let c = cgroups(host);
        assert_eq!(
            c.v1_cpu.as_deref(),
            Some("/machine/qemu-1-bq-exp.libvirt-qemu")
        );
        assert_eq!(
            c.unified.as_deref(),
            Some("/machine/qemu-1-bq-exp.libvirt-qemu")
        );
        // The debian-6.12 guest (cgroup v2 only).
        let guest = cgroups("0::/machine/qemu-1-bq-exp.libvirt-qemu/emulator\n");
        assert_eq!(guest.v1_cpu, None);
        assert_eq!(
            vcpu_cgroup(guest.unified.as_deref().unwrap(), 1),
            "/machine/qemu-1-bq-exp.libvirt-qemu/vcpu1"
        );
        // co-mounted cpu,cpuacct; a process in the root is in no domain cgroup.
        let c = cgroups("2:cpu,cpuacct:/machine/x.libvirt-qemu/emulator\n0::/\n");
        assert_eq!(c.v1_cpu.as_deref(), Some("/machine/x.libvirt-qemu"));
        assert_eq!(c.unified, None);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(text in ".{0,400}") {
            let _ = parse(&text);
            let _ = cgroups(&text);
        }

        #[test]
        fn mangled_real_files_never_panic(cut in 0usize..10_000, byte in 0u8..128, at in 0usize..10_000) {
            let mut bytes = HOST_V1.as_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            bytes.truncate(cut.min(bytes.len()));
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }
}
