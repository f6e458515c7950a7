//! `burst-qemu check`: what this host supports, and the fix for each missing piece.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use burst_qemu::enforce::cgroup::{self, Version};
use burst_qemu::state;

use super::fleet::{orphan_reason, read_view};
use super::*;

/// The report being built: one line per piece, and whether every required piece is there.
struct Report {
    lines: Vec<String>,
    required_ok: bool,
}

impl Report {
    /// A line for an optional piece (its absence does not stop enforcement).
    fn line(&mut self, ok: bool, what: &str, detail: String) {
        self.lines.push(format!(
            "{} {what:<22} {detail}",
            if ok { "ok " } else { "-- " }
        ));
    }

    /// A line for a required piece.
    fn required(&mut self, ok: bool, what: &str, detail: String) {
        self.required_ok &= ok;
        self.line(ok, what, detail);
    }
}

/// `burst-qemu check`'s options.
#[derive(Debug, Args)]
pub(super) struct CheckArgs {
    /// The agent's settings shown are those this config file gives.
    #[command(flatten)]
    config: super::agent_args::ConfigArg,
}

pub(super) fn check(g: &Global, _args: &CheckArgs) -> Result<(), Failure> {
    let mut r = Report {
        lines: Vec::new(),
        required_ok: true,
    };
    qemu(&mut r);
    kvm(&mut r);
    cgroups(&mut r);
    ghost(&mut r);
    let (ok, detail) = sched_ext_line(&g.state_dir());
    r.line(ok, "sched_ext", detail);
    libvirt(&mut r, &g.state_dir());
    fleet(&mut r, &g.state_dir());
    // The agent's settings, as `burst-qemu agent` with this command's options would run.
    let agent = super::agent_config::report(std::env::args_os().collect());
    match &agent {
        Ok((file, _)) => r.required(true, "agent config", file.clone()),
        Err(e) => r.required(
            false,
            "agent config",
            format!("{e}. Fix: correct the file (the agent refuses to start with it)"),
        ),
    }
    if let Ok((_, settings)) = agent {
        r.lines.extend(settings);
    }
    let mut text = r.lines.join("\n") + "\n";
    text.push_str(if r.required_ok {
        "burst-qemu can run and enforce credits on this host\n"
    } else {
        "burst-qemu cannot enforce credits here until the pieces above marked -- are fixed\n"
    });
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
        .map_err(Failure::host)?;
    if r.required_ok {
        Ok(())
    } else {
        Err(Failure::host(anyhow::anyhow!(
            "required pieces are missing"
        )))
    }
}

fn qemu(r: &mut Report) {
    match std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
    {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            r.required(
                true,
                "QEMU",
                v.lines().next().unwrap_or("").trim().to_owned(),
            );
        }
        _ => r.required(
            false,
            "QEMU",
            "qemu-system-x86_64 not found. Fix: apt-get install qemu-system-x86".into(),
        ),
    }
}

fn kvm(r: &mut Report) {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => r.line(true, "KVM", "/dev/kvm is usable".into()),
        Err(e) => r.line(
            false,
            "KVM",
            format!("/dev/kvm: {e}. Optional: TCG (-accel tcg,thread=multi) works without it. Fix: load kvm_intel or kvm_amd, and add the user to group kvm"),
        ),
    }
}

fn cgroups(r: &mut Report) {
    let what = "cgroup CPU bandwidth";
    let Some((version, mount)) = cgroup::detect_host() else {
        r.required(
            false,
            what,
            "no hierarchy with the cpu controller. Fix (v2): echo +cpu > /sys/fs/cgroup/cgroup.subtree_control; (v1): mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu".into(),
        );
        return;
    };
    let probe = mount
        .join("burst-qemu")
        .join(format!(".check-{}", std::process::id()));
    match std::fs::create_dir_all(&probe).and_then(|()| std::fs::remove_dir(&probe)) {
        Ok(()) => r.required(
            true,
            what,
            format!(
                "cgroup {version} cpu controller at {} is writable{}",
                mount.display(),
                if version == Version::V1 {
                    " (cgroup v2, which this host cannot show, is verified on real 6.1 and 6.12 kernels by the test suite's guests: tests/guest/run, tests/cgroup_v2.rs)"
                } else {
                    ""
                }
            ),
        ),
        Err(e) => r.required(false, what, format!("cgroup {version} at {}: {e}. Fix: run burst-qemu as root, or delegate that cgroup to this user", mount.display())),
    }
}

fn ghost(r: &mut Report) {
    let ghost_root = PathBuf::from(
        std::env::var_os("BURST_QEMU_GHOST_ROOT")
            .unwrap_or_else(|| burst_qemu::ghost::DEFAULT_ROOT.into()),
    );
    let ghost_root = ghost_root.as_path();
    match burst_qemu::ghost::describe(ghost_root) {
        Ok(versions) => {
            let wanted = ghost_sys::GHOST_VERSION;
            let list = versions.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            if versions.contains(&wanted) {
                r.line(true, "ghOSt", format!("ghOSt kernel present: ghostfs at {}, ABI versions {list} (this build speaks {wanted}); agent --enforcer ghost can run", ghost_root.display()));
            } else {
                r.line(false, "ghOSt", format!("ghostfs at {} offers ABI versions {list}, not {wanted}. Fix: a ghOSt kernel with ABI {wanted} (ghost-kernel branch ghost-v5.11)", ghost_root.display()));
            }
        }
        Err(e) => r.line(
            false,
            "ghOSt",
            format!("{e}. Optional: needs a ghOSt kernel (CONFIG_SCHED_CLASS_GHOST) with ghostfs mounted at /sys/fs/ghost (mount -t ghost ghost /sys/fs/ghost); cgroup enforcement is used without it"),
        ),
    }
}

/// The fleet of this state dir: VMs whose ledgers cannot be saved, or without a launcher.
fn fleet(r: &mut Report, state_dir: &std::path::Path) {
    for (vm, liveness) in state::running(state_dir) {
        if let Some(e) = read_view(state_dir, &vm.name).and_then(|v| v.ledger_error) {
            r.required(false, "ledger persistence", format!("{}: the agent cannot save its ledger ({e}); it enforces from memory, and a crash now would lose the credits since the last save. Fix: free space in, or make writable, the data dir", vm.name));
        }
        if liveness == state::Liveness::Orphaned {
            let what = match vm.source {
                state::Source::Adopted => "adopted VM",
                _ => "orphaned VM",
            };
            r.line(true, what, format!("{}: {}", vm.name, orphan_reason(&vm)));
        }
    }
}

/// The `libvirt` line: whether libvirtd answers, and which of its running domains the agent
/// has in the fleet (and why the others are not). Optional.
#[cfg(feature = "libvirt")]
fn libvirt(r: &mut Report, state_dir: &std::path::Path) {
    use burst_qemu::agent::libvirt::read_published;
    use burst_qemu::source::libvirt::conn::{Connection, DEFAULT_URI};
    let published = read_published(state_dir)
        .filter(|p| std::path::Path::new(&format!("/proc/{}", p.pid)).exists());
    let uri = published
        .as_ref()
        .map_or(DEFAULT_URI.to_owned(), |p| p.uri.clone());
    let conn = match Connection::open(&uri) {
        Ok(c) => c,
        Err(e) => {
            r.line(false, "libvirt", format!("{uri}: {e}. Optional: libvirt domains join the fleet only while libvirtd runs (systemctl start libvirtd; without systemd: virtlogd -d && libvirtd -d)"));
            return;
        }
    };
    let version = conn
        .lib_version()
        .map_or(String::new(), |(a, b, c)| format!(" {a}.{b}.{c}"));
    let running = conn
        .poll()
        .map(|s| s.iter().filter(|d| d.id.is_some()).count())
        .unwrap_or(0);
    let Some(p) = published else {
        r.line(true, "libvirt", format!("libvirt{version} at {uri} is reachable ({running} running domain(s)); no agent of this state dir watches it (agent --libvirt {uri})"));
        return;
    };
    let (ins, outs): (Vec<_>, Vec<_>) = p.domains.iter().partition(|d| d.in_fleet);
    let names = |v: &[&burst_qemu::agent::libvirt::PublishedDomain]| {
        v.iter()
            .map(|d| d.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut detail = format!(
        "libvirt{version} at {uri} is reachable and watched by the agent (pid {}): {running} running domain(s); in the fleet: {}",
        p.pid,
        if ins.is_empty() { "none".into() } else { names(&ins) }
    );
    if let Some(e) = &p.error {
        detail.push_str(&format!("; the agent's last poll failed: {e}"));
    }
    r.line(true, "libvirt", detail);
    for d in outs {
        r.line(
            true,
            "libvirt domain",
            format!(
                "{}: not in the fleet: {}",
                d.name,
                d.why_not.as_deref().unwrap_or("not seen yet")
            ),
        );
    }
}

#[cfg(not(feature = "libvirt"))]
fn libvirt(r: &mut Report, _state_dir: &std::path::Path) {
    r.line(
        false,
        "libvirt",
        "this build lacks libvirt support. Optional: libvirt domains join the fleet with a build with the `libvirt` feature (cargo build --features libvirt; needs libvirt-dev)".into(),
    );
}

/// The `sched_ext` line: kernel support and its state, whether this build has the scheduler,
/// and what this state dir's scheduler publishes. Optional: cgroup enforcement works without.
fn sched_ext_line(state_dir: &std::path::Path) -> (bool, String) {
    use burst_qemu::enforce::scx;
    let built = if scx::BUILT {
        "this build has the sched_ext scheduler (feature scx)"
    } else {
        "this build lacks the sched_ext scheduler (Fix: cargo build --features scx, needs clang-19, libelf-dev, zlib1g-dev, pkg-config)"
    };
    let Some((state, ops)) = scx::kernel_state() else {
        return (
            false,
            format!("this kernel has no sched_ext (/sys/kernel/sched_ext missing; needs Linux 6.12+ with CONFIG_SCHED_CLASS_EXT). Optional: cgroup enforcement is used without it; {built}"),
        );
    };
    let loaded = if ops.is_empty() {
        format!("state {state}, no BPF scheduler loaded")
    } else {
        format!("state {state}, BPF scheduler {ops:?} loaded")
    };
    let ours = match scx::read_stats(state_dir) {
        Some(st) if std::path::Path::new(&format!("/proc/{}", st.pid)).exists() => format!(
            "; this state dir's agent schedules {} VM(s) with it (scheduler pid {})",
            st.vms.len(),
            st.pid
        ),
        _ => String::new(),
    };
    let usable = scx::BUILT && (ops.is_empty() || ops == scx::OPS_NAME);
    let verdict = if usable {
        "agent --enforcer scx can run (the default here)"
    } else if !scx::BUILT {
        "agent --enforcer scx cannot run"
    } else {
        "another BPF scheduler is loaded: agent --enforcer scx cannot run until it exits"
    };
    (
        usable,
        format!("kernel supports sched_ext ({loaded}){ours}; {built}; {verdict}"),
    )
}
