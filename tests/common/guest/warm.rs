//! What a guest lane reads from the host before its parts run.
//!
//! On a lane's clock (`-icount …,sleep=off`) the guest's time jumps to its next timer whenever
//! every vCPU waits, and a guest waiting on the host's file system (virtio-9p) waits so: each
//! round trip to the host lasts as many guest timers as fire meanwhile. Measured on the 2-core
//! machine (2026-12-07, debian-6.12, `shift=3`, the guest in CI's idle cgroup beside two host
//! threads busy 80-85 % of the time):
//! - reading a 59 MB test binary took 14.4 and 47.5 s of guest time, against 2.4 and 1.9 s
//!   with the host idle;
//! - the debian-6.12 suites took 2 229 s of guest time against about 330 alone, and a fault
//!   test's 3-s bound for the agent putting a rewritten quota back ran out (it takes 0.8 s).
//!
//! 9p keeps file data in the guest's page cache (`cache=loose`), but not symbolic links, and
//! every `open` is a round trip: the guest's kernel traced 758 requests to the host in that
//! one fault test, 480 of them by the nested QEMUs starting (191 `readlink`s of library links,
//! 107 `open`s), 110 by burst-qemu's commands. So what the parts execute while they measure
//! (burst-qemu, QEMU with its libraries, modules and firmware, the few programs the tests
//! run) is copied up once into the guest's overlay, whose upper layer is a tmpfs: every link on
//! the way to each file too (`touch -h` on a link, `touch` on a file: overlayfs copies up what
//! it changes). The test binaries, started once per part, are read once into the page cache.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Programs the tests run in a guest besides burst-qemu and QEMU (by name, on PATH, those
/// present): the shell and what the tests and their QEMU wrappers call (`Command::new` in
/// tests/ and src/), and libvirt's daemons and client for the libvirt suites' guests.
const TOOLS: &[&str] = &[
    "sh", "bash", "sleep", "kill", "true", "mount", "umount", "cp", "flock", "ip", "cat", "grep",
    "tail", "env", "libvirtd", "virtlogd", "virsh",
];

/// Files the dynamic loader reads at every start of a dynamically linked program.
const LOADER: &[&str] = &["/etc/ld.so.cache", "/lib64/ld-linux-x86-64.so.2"];

/// The warm-up: links and files to copy up, and files to read into the page cache.
pub struct Warm {
    links: BTreeSet<PathBuf>,
    copied: BTreeSet<PathBuf>,
    cached: BTreeSet<PathBuf>,
}

impl Warm {
    /// For parts whose programs are the absolute paths `programs` (test binaries and the like:
    /// cached) and that run `burst_qemu` and `qemu` (copied up).
    pub fn new(programs: &[&str], burst_qemu: &str, qemu: &str) -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let on_path = |name: &str| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        };
        let qemu = on_path(qemu);
        let mut copy: Vec<PathBuf> = LOADER.iter().map(PathBuf::from).collect();
        if let Some(usr) = qemu
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            copy.push(usr.join("share/qemu/kvmvapic.bin"));
            copy.extend(qemu_modules(usr));
        }
        let mut run: Vec<PathBuf> = vec![PathBuf::from(burst_qemu)];
        run.extend(qemu);
        run.extend(TOOLS.iter().filter_map(|t| on_path(t)));
        let cached: Vec<PathBuf> = programs.iter().map(PathBuf::from).collect();
        for p in run.iter().chain(&cached) {
            copy.extend(libraries(p));
        }
        copy.extend(run);
        let mut warm = Warm {
            links: BTreeSet::new(),
            copied: BTreeSet::new(),
            cached: BTreeSet::new(),
        };
        for f in copy {
            let (links, target) = resolve(&f);
            warm.links.extend(links);
            if target.is_file() {
                warm.copied.insert(target);
            }
        }
        for f in cached {
            let (links, target) = resolve(&f);
            warm.links.extend(links);
            if target.is_file() && !warm.copied.contains(&target) {
                warm.cached.insert(target);
            }
        }
        warm
    }

    /// What it costs, in words: the links and files copied up, the files cached, and their MB.
    pub fn summary(&self) -> String {
        let mb = |s: &BTreeSet<PathBuf>| {
            s.iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum::<u64>() as f64
                / 1e6
        };
        format!(
            "{} links and {} files ({:.0} MB) copied into the guest's tmpfs, {} files ({:.0} MB) read into its page cache, before the parts",
            self.links.len(),
            self.copied.len(),
            mb(&self.copied),
            self.cached.len(),
            mb(&self.cached)
        )
    }

    /// The guest's shell commands (one line, ending in `; `), `quote` quoting each path.
    pub fn script(&self, quote: impl Fn(&str) -> String) -> String {
        let list = |s: &BTreeSet<PathBuf>| {
            s.iter()
                .map(|p| quote(&p.display().to_string()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut out = String::new();
        if !self.links.is_empty() {
            out += &format!("touch -c -h {}; ", list(&self.links));
        }
        if !self.copied.is_empty() {
            out += &format!("touch -c {}; ", list(&self.copied));
        }
        if !self.cached.is_empty() {
            out += &format!("cat {} > /dev/null; ", list(&self.cached));
        }
        out
    }
}

/// QEMU's loadable modules (`usr/lib/<arch>/qemu/*.so`: the TCG accelerator is one, loaded at
/// every start).
fn qemu_modules(usr: &Path) -> Vec<PathBuf> {
    let arches = std::fs::read_dir(usr.join("lib"))
        .into_iter()
        .flatten()
        .flatten();
    arches
        .flat_map(|a| {
            std::fs::read_dir(a.path().join("qemu"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .map(|m| m.path())
        .filter(|m| m.extension().is_some_and(|e| e == "so"))
        .collect()
}

/// The shared libraries `program` loads, as `ldd` names them (the loader's paths).
fn libraries(program: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(program).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("=> ").nth(1)?.split_whitespace().next())
        .map(PathBuf::from)
        .collect()
}

/// The symbolic links met on the way to `path` (each a path as the guest walks it), and the
/// file it ends at.
fn resolve(path: &Path) -> (Vec<PathBuf>, PathBuf) {
    let mut links = Vec::new();
    let mut at = PathBuf::from("/");
    // The names still to walk, the next last; `..` kept, `/` and `.` dropped.
    let names = |p: &Path| -> Vec<PathBuf> {
        p.components()
            .rev()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(PathBuf::from(n)),
                Component::ParentDir => Some(PathBuf::from("..")),
                _ => None,
            })
            .collect()
    };
    let mut rest = names(path);
    // A bound on links followed, as the kernel's (40).
    let mut hops = 0;
    while let Some(next) = rest.pop() {
        if next == Path::new("..") {
            at.pop();
            continue;
        }
        let candidate = at.join(&next);
        match std::fs::read_link(&candidate) {
            Ok(target) if hops < 40 => {
                hops += 1;
                links.push(candidate);
                if target.is_absolute() {
                    at = PathBuf::from("/");
                }
                rest.extend(names(&target));
            }
            _ => at = candidate,
        }
    }
    (links, at)
}
