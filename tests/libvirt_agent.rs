//! libvirt domains in the agent's fleet, on a real libvirtd (feature `libvirt`): a TCG domain
//! of the project's test firmware held to its baseline beside the same VM launched through the
//! wrapper (both measured in one run, figures printed), a burst, live edits through `virsh
//! metadata` and the config file, the opt-in rules, every lifecycle case with the agent running
//! and stopped, and credits that travel (save/restore, a definition moved to a second libvirtd,
//! live migration between two libvirtds with an agent on each).
//!
//! Each test runs its own agent (`agent --libvirt --libvirt-domains bq-test-PID-*`, so only
//! this process's domains are considered) on a scratch state dir. The libvirtd is the system's
//! (started when absent, see `libvirt_harness`). The CPU-share and opt-in tests run again inside
//! the cgroup-v2 guest, with a libvirtd of its own, in the boot of tests/libvirt.rs's suite
//! (`the_libvirt_and_domain_suites_pass_in_the_cgroup_v2_guest`).

#![cfg(feature = "libvirt")]

mod common;
mod libvirt_harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use burst_qemu::enforce::cgroup::{self, Version};
use burst_qemu::source::libvirt::conn::{Connection, Scope};
use burst_qemu::source::libvirt::metadata::{self, CHECKPOINT_NS, CONFIG_NS};
use burst_qemu::state::{self, Source, VmRecord};
use burst_qemu::testguest::Behaviour;
use common::*;
use libvirt_harness::{
    free_port, own_domains, require_libvirtd, start_libvirtd, stop_libvirtd, virsh, SecondLibvirtd,
    TestDomain, IMAGES, URI,
};
use serde_json::Value;

/// The agent of a test, watching the system libvirtd (or another URI) for this process's
/// domains; SIGTERM on drop.
struct LvAgent {
    child: Child,
}

impl LvAgent {
    fn start(s: &Scratch, uri: &str, extra: &[&str]) -> LvAgent {
        std::fs::create_dir_all(s.state()).unwrap();
        std::fs::create_dir_all(s.vms()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.state().join("agent.log"))
            .unwrap();
        let child = bin()
            .arg("--vms")
            .arg(s.vms())
            .args(["agent", "--libvirt", uri, "--libvirt-domains"])
            .arg(own_domains())
            .args(extra)
            .arg("--state-dir")
            .arg(s.state())
            .env("BURST_QEMU_DATA_DIR", s.data())
            .env("BURST_QEMU_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        agent_pid(s);
        LvAgent { child }
    }

    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for LvAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn agent_log(s: &Scratch) -> String {
    std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default()
}

/// The record of domain `name` once the agent has it in the fleet and has published its view.
fn in_fleet(s: &Scratch, name: &str) -> VmRecord {
    let deadline = Instant::now() + Duration::from_secs(if nested_guest() { 60 } else { 20 });
    loop {
        if let Some((r, _)) = state::find(&s.state(), name) {
            if s.state().join(name).join("credits.json").exists() {
                return r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not join the fleet; agent log:\n{}",
            agent_log(s)
        );
        sleep(Duration::from_millis(50));
    }
}

/// Waits until domain `name` has left the fleet: no runtime dir, no cgroup of ours.
fn left_fleet(s: &Scratch, name: &str) {
    wait_until(
        &format!("{name} leaves the fleet"),
        Duration::from_secs(20),
        || !s.state().join(name).exists(),
    );
    nothing_left(s, name);
}

/// Nothing of burst-qemu's is left for VM `name`: its runtime dir, its cgroup (v1: ours; v2:
/// the threaded child inside libvirt's tree, gone with the tree).
fn nothing_left(s: &Scratch, name: &str) {
    assert!(!s.state().join(name).exists(), "{name}: runtime dir left");
    let (version, mount) = cgroup::detect_host().unwrap();
    let ours = mount
        .join("burst-qemu")
        .join(cgroup::instance_name(&s.state()))
        .join(name);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours.exists() && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    assert!(!ours.exists(), "{}: left behind", ours.display());
    if version == Version::V2 {
        if let Ok(entries) = std::fs::read_dir(mount.join("machine")) {
            for e in entries.flatten() {
                let dir = e.file_name().to_string_lossy().into_owned();
                assert!(
                    !(dir.ends_with(&format!("-{name}.libvirt-qemu"))
                        && e.path().join("burst-qemu").exists()
                        && !e.path().join("vcpu0").exists()),
                    "{dir}/burst-qemu left behind"
                );
            }
        }
    }
}

/// Percent of all its vCPUs each VM used over `interval`, both measured over the same interval.
fn side_by_side(vms: &[&VmRecord], interval: Duration) -> Vec<f64> {
    let read = || -> Vec<Vec<u64>> {
        vms.iter()
            .map(|r| {
                r.vcpu_tids
                    .iter()
                    .map(|&t| thread_cpu_ns(r.pid, t))
                    .collect()
            })
            .collect()
    };
    let before = read();
    let t0 = Instant::now();
    sleep(interval);
    let after = read();
    let elapsed = t0.elapsed().as_nanos() as f64;
    vms.iter()
        .enumerate()
        .map(|(i, r)| {
            let used: u64 = after[i].iter().zip(&before[i]).map(|(a, b)| a - b).sum();
            used as f64 * 100.0 / elapsed / r.vcpus as f64
        })
        .collect()
}

fn ls_json(s: &Scratch) -> Vec<Value> {
    let out = s.cli(&["ls", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed: {rows:?}"))
}

fn balance(s: &Scratch, name: &str) -> f64 {
    view(s, name)["balance"].as_f64().unwrap()
}

/// Sets burst-qemu's `<config>` element of a running domain, live and persistent, as an
/// operator would.
fn set_element(name: &str, config: &str) {
    let (ok, text) = virsh(&[
        "metadata",
        name,
        "--uri",
        CONFIG_NS,
        "--key",
        "burst-qemu",
        "--live",
        "--config",
        "--set",
        config,
    ]);
    assert!(ok, "{text}");
}

/// The domain's checkpoint element (`live` or persistent).
fn checkpoint(conn: &Connection, name: &str, live: bool) -> Option<metadata::Checkpoint> {
    let scope = if live { Scope::Live } else { Scope::Config };
    let xml = conn
        .domain(name)
        .ok()?
        .metadata(CHECKPOINT_NS, scope)
        .ok()??;
    metadata::parse_checkpoint(&xml).ok()
}

/// The measurement window for a share at baseline: 15 s on the host (the enforcement tests'
/// window), 10 s in the emulated guest.
fn window() -> Duration {
    Duration::from_secs(if nested_guest() { 10 } else { 15 })
}

/// A TCG domain of the test firmware, 2 busy vCPUs at a 20 % baseline and 0 credits, beside the
/// same VM launched through the wrapper: both held to the baseline (the pooled quota on the
/// domain's vCPU threads, moved out of libvirt's per-vCPU groups), then the domain bursts on
/// credits set with `credits --set`, and takes a live edit made with `virsh metadata`.
///
/// Bound: 1.5 points of the target, the issue's; measured on the host 19.9-20.0 % for both
/// (v1), in the cgroup-v2 guest 19.6-20.1 % (see the printed figures in the CI log).
#[test]
fn a_domain_is_held_to_its_baseline_beside_a_wrapper_vm_bursts_and_takes_live_edits() {
    let Some(conn) = require_libvirtd() else {
        return;
    };
    if !require_cgroups() {
        return;
    }
    let s = Scratch::new();
    let _agent = LvAgent::start(&s, URI, &[]);
    let d = TestDomain::start_opted_in(
        &conn,
        "sbs",
        2,
        Behaviour::Busy,
        r#"<config baseline="20" initial_credits="0"/>"#,
    );
    let wrap = Launched::start(
        &s,
        "wrap",
        &["--vcpus", "2", "--baseline", "20", "--credits", "0"],
        &s.qemu_args(Behaviour::Busy),
    );
    let dom = in_fleet(&s, &d.name);
    assert!(matches!(dom.source, Source::Libvirt { .. }), "{dom:?}");
    view(&s, "wrap");
    // Both adopted and their quotas written: a period to settle.
    sleep(Duration::from_secs(2));
    let pct = side_by_side(&[&dom, &wrap.record], window());
    eprintln!(
        "at baseline, 0 credits, 20 % target: libvirt domain {:.2} %, wrapper VM {:.2} % of their 2 vCPUs over {:?}",
        pct[0],
        pct[1],
        window()
    );
    for (what, p) in [("libvirt domain", pct[0]), ("wrapper VM", pct[1])] {
        assert!(
            (p - 20.0).abs() <= 1.5,
            "{what}: {p:.2} % for a 20 % target; agent log:\n{}",
            agent_log(&s)
        );
    }
    assert!(balance(&s, &d.name) < 0.05);

    // Listed beside the wrapper VM with the same columns, and where each comes from.
    let rows = ls_json(&s);
    assert_eq!(row(&rows, &d.name)["from"], "libvirt");
    assert_eq!(row(&rows, &d.name)["state"], "running");
    assert_eq!(row(&rows, &d.name)["source"]["kind"], "libvirt");
    assert_eq!(row(&rows, "wrap")["from"], "launcher");
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    let header = text.lines().next().unwrap();
    assert!(
        header.contains(" SOURCE ") && header.contains(" GRANT "),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&d.name) && l.contains(" libvirt ")),
        "{text}"
    );
    // In metrics and history like any VM.
    let metrics = String::from_utf8(s.cli(&["metrics"]).stdout).unwrap();
    assert!(metrics.contains(&format!("vm=\"{}\"", d.name)), "{metrics}");
    let plot = s.cli(&["plot", &d.name, "--json", "--since", "10m"]);
    let samples: Vec<Value> = serde_json::from_slice(&plot.stdout).unwrap_or_default();
    assert!(
        !samples.is_empty(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );

    // A burst: 5 credits set with credits --set.
    let out = s.cli(&["credits", &d.name, "--set", "5"]);
    assert!(out.status.success(), "{out:?}");
    // Measured once the agent has applied it (its view shows the balance) and a period has
    // passed (a 42 % window was once measured from a set still on its way).
    wait_until("the set balance applied", Duration::from_secs(5), || {
        view(&s, &d.name)["balance"].as_f64().unwrap_or(0.0) > 4.0
    });
    // 5 credits on 2 vCPUs are in the smooth decline: a grant of about 64 %, not full speed
    // (measured 64.6 % here, 62.7 % used in the v2 guest).
    sleep(Duration::from_millis(500));
    let burst = side_by_side(&[&dom], Duration::from_secs(4))[0];
    eprintln!("bursting on 5 credits: libvirt domain {burst:.1} % of its 2 vCPUs");
    assert!(
        burst > 45.0,
        "{burst:.1} %: no burst; view {}; quotas {:?}; agent log:\n{}",
        view(&s, &d.name),
        std::process::Command::new("sh")
            .args(["-c", &format!("grep . /sys/fs/cgroup/cpu/burst-qemu/*/{}/cpu.cfs_* /sys/fs/cgroup/cpu/burst-qemu/*/{}/tasks", d.name, d.name)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
        agent_log(&s)
    );

    // A live edit with virsh metadata: baseline 30 %, balance back to 0.
    set_element(
        &d.name,
        r#"<config baseline="30" initial_credits="0" credits="0"/>"#,
    );
    wait_until("the edit is applied", Duration::from_secs(10), || {
        let v = view(&s, &d.name);
        v["baseline"] == 30.0 && v["balance"].as_f64().unwrap() < 0.05
    });
    sleep(Duration::from_secs(1));
    let edited = side_by_side(&[&dom, &wrap.record], window());
    eprintln!(
        "after the live edit to 30 %: libvirt domain {:.2} %, wrapper VM (still 20 %) {:.2} %",
        edited[0], edited[1]
    );
    assert!((edited[0] - 30.0).abs() <= 1.5, "{edited:?}");
    assert!((edited[1] - 20.0).abs() <= 1.5, "{edited:?}");
}

/// The opt-in rules: a `vms/NAME.toml` alone, the `<metadata>` element alone, both when they
/// agree; both differing is refused with both named (in the log and `check`); and removing the
/// last opt-in lets a running domain go, its threads back in libvirt's groups.
#[test]
fn domains_opt_in_by_file_or_metadata_and_two_configs_that_differ_are_refused() {
    let Some(conn) = require_libvirtd() else {
        return;
    };
    if !require_cgroups() {
        return;
    }
    let s = Scratch::new();
    let pid = std::process::id();
    let by_file = format!("bq-test-{pid}-file");
    let both = format!("bq-test-{pid}-both");
    write_config(&s, &by_file, "vcpus = 1\nbaseline = 15\n");
    write_config(&s, &both, "vcpus = 1\nbaseline = 15\n");
    let _agent = LvAgent::start(&s, URI, &[]);
    let f = TestDomain::start(&conn, "file", 1, Behaviour::Halt);
    let b = TestDomain::start_opted_in(
        &conn,
        "both",
        1,
        Behaviour::Halt,
        r#"<config baseline="25"/>"#,
    );
    let none = TestDomain::start(&conn, "none", 1, Behaviour::Halt);
    let r = in_fleet(&s, &f.name);
    assert_eq!(view(&s, &f.name)["baseline"], 15.0);
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        agent_log(&s).contains(&format!("{}: libvirt domain not taken", b.name))
    });
    assert!(!s.state().join(&b.name).exists());
    // The agent decides about each domain as it sees it: `none` started last, and CI run 83's
    // `check` ran before the agent had published its decision (3 running domains, no line for
    // it). So `check` until it has one, a few times a second.
    let mut check = String::new();
    wait_until(
        "check shows the domain not opted in",
        Duration::from_secs(10),
        || {
            sleep(Duration::from_millis(200));
            check = String::from_utf8(s.cli(&["check"]).stdout).unwrap();
            check.contains(&format!("{}: not in the fleet: not opted in", none.name))
        },
    );
    eprintln!("{check}");
    assert!(
        check.contains(&format!("in the fleet: {}", f.name)),
        "{check}"
    );
    let refused = check
        .lines()
        .find(|l| l.contains(&format!("{}: not in the fleet", b.name)))
        .unwrap_or_else(|| panic!("{check}"));
    assert!(
        refused.contains("file: baseline = 15") && refused.contains("metadata: baseline = 25"),
        "{refused}"
    );
    // Made to agree: it joins.
    write_config(&s, &both, "vcpus = 1\nbaseline = 25\n");
    in_fleet(&s, &b.name);
    assert_eq!(view(&s, &b.name)["baseline"], 25.0);

    // The file edited live: applied (the file and no element).
    write_config(&s, &by_file, "vcpus = 1\nbaseline = 35\n");
    wait_until("the file edit", Duration::from_secs(5), || {
        view(&s, &f.name)["baseline"] == 35.0
    });
    // Opted out while running: let go, its thread back in libvirt's vcpu0.
    std::fs::remove_file(s.vms().join(format!("{}.toml", f.name))).unwrap();
    left_fleet(&s, &f.name);
    let (version, mount) = cgroup::detect_host().unwrap();
    let Source::Libvirt {
        cgroup: Some(dir), ..
    } = &r.source
    else {
        panic!("{r:?}")
    };
    let list = match version {
        Version::V1 => "tasks",
        Version::V2 => "cgroup.threads",
    };
    let home = std::fs::read_to_string(mount.join(&dir[1..]).join("vcpu0").join(list)).unwrap();
    assert_eq!(home.trim(), r.vcpu_tids[0].to_string(), "back in vcpu0");
}

/// Every lifecycle case while the agent runs: pause and resume, save and restore (the balance
/// continues, the saved definition carries the final checkpoint), a crash, undefine of a
/// running domain then its end, vCPU hotplug (balance kept), a libvirtd restart (nothing
/// re-adopted) and libvirtd stopped while the domain runs and then dies (charged and enforced
/// meanwhile, nothing left once it is back). Nothing is double charged: the time a saved domain
/// spent on disk is not charged on restore (its local ledger is newer than the image's
/// checkpoint).
#[test]
fn lifecycle_while_the_agent_runs() {
    let Some(conn) = require_libvirtd() else {
        return;
    };
    if !require_cgroups() {
        return;
    }
    let s = Scratch::new();
    let mut agent = LvAgent::start(&s, URI, &[]);
    let mut d = TestDomain::define_with(
        &conn,
        "life",
        Behaviour::Busy,
        "<vcpu placement='static' current='1'>2</vcpu>",
        &libvirt_harness::metadata_element(r#"<config baseline="20" initial_credits="2"/>"#),
    );
    d.domain().start().unwrap();
    let image = PathBuf::from(format!("{IMAGES}/{}.save", d.name));
    d.files.push(image.clone());
    let r = in_fleet(&s, &d.name);

    // Pause: listed as paused, charged nothing (it earns); resume.
    virsh(&["suspend", &d.name]);
    wait_until("paused in ls", Duration::from_secs(5), || {
        row(&ls_json(&s), &d.name)["state"] == "paused"
    });
    virsh(&["resume", &d.name]);

    // Save: it leaves (nothing left); the definition carries the final balance; restore: the
    // balance continues from the local ledger.
    sleep(Duration::from_secs(1));
    let (ok, text) = virsh(&["save", &d.name, image.to_str().unwrap()]);
    assert!(ok, "{text}");
    left_fleet(&s, &d.name);
    let saved = state_balance(&s, &d.name);
    // The departure checkpoint comes with libvirt's stop event; the runtime dir may go a moment
    // before it, when the agent's rescan finds QEMU's process gone (one full run read the
    // definition in between and found no checkpoint yet).
    let mut final_cp = None;
    wait_until("a departure checkpoint", Duration::from_secs(5), || {
        final_cp = checkpoint(&conn, &d.name, false).filter(|cp| cp.departed);
        final_cp.is_some()
    });
    let final_cp = final_cp.unwrap();
    assert!(final_cp.departed && final_cp.belongs_to(&conn.domain(&d.name).unwrap().uuid()));
    assert!(
        (final_cp.balances.balance().as_credits() - saved).abs() < 0.001,
        "{final_cp:?} vs {saved}"
    );
    let (ok, text) = virsh(&["restore", image.to_str().unwrap()]);
    assert!(ok, "{text}");
    let back = in_fleet(&s, &d.name);
    assert_ne!(back.pid, r.pid);
    let restored = balance(&s, &d.name);
    assert!(
        (restored - saved).abs() < 0.05,
        "restored with {restored}, saved with {saved}"
    );

    // Hotplug a vCPU: taken again with both threads, balance kept.
    let before = balance(&s, &d.name);
    let (ok, text) = virsh(&["setvcpus", &d.name, "2", "--live"]);
    assert!(ok, "{text}");
    wait_until("2 vCPU threads", Duration::from_secs(10), || {
        state::find(&s.state(), &d.name).is_some_and(|(r, _)| r.vcpu_tids.len() == 2)
    });
    // The record is written when the domain is placed again, a moment before the agent takes
    // it (and logs it adopted): wait for its view, published after.
    wait_until(
        "the resized domain adopted",
        Duration::from_secs(10),
        || view(&s, &d.name)["vcpus"] == 2,
    );
    let two = in_fleet(&s, &d.name);
    assert_eq!(two.vcpus, 2);
    assert!((balance(&s, &d.name) - before).abs() < 0.1);

    // libvirtd restarts: nothing leaves, nothing is adopted again.
    let adopted = agent_log(&s).matches(": adopted (pid").count();
    restart_libvirtd();
    // (the old connection died with the daemon)
    sleep(Duration::from_secs(3));
    assert_eq!(
        agent_log(&s).matches(": adopted (pid").count(),
        adopted,
        "adopted again after libvirtd's restart; agent log:\n{}",
        agent_log(&s)
    );
    assert_eq!(state::find(&s.state(), &d.name).unwrap().0.pid, two.pid);

    // libvirtd stopped: still charged and enforced from /proc; the domain dies meanwhile.
    let pid = stop_libvirtd();
    let b0 = balance(&s, &d.name);
    sleep(Duration::from_secs(3));
    let b1 = balance(&s, &d.name);
    assert!(
        b1 < b0,
        "not charged while libvirtd is down: {b0} then {b1}"
    );
    assert!(agent_log(&s).contains("its domains in the fleet are still charged"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(two.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    left_fleet(&s, &d.name);
    let _ = pid;
    let conn = start_libvirtd().unwrap();
    wait_until("the departure seen", Duration::from_secs(10), || {
        agent_log(&s).contains(&format!("{}: libvirt domain left", d.name))
    });
    nothing_left(&s, &d.name);

    // Started again, undefined while running (transient), destroyed: gone, nothing left.
    conn.domain(&d.name).unwrap().start().unwrap();
    in_fleet(&s, &d.name);
    let uuid = conn.domain(&d.name).unwrap().uuid();
    conn.domain(&d.name).unwrap().undefine().unwrap();
    sleep(Duration::from_secs(2));
    assert!(s.state().join(&d.name).exists(), "a transient domain stays");
    // A crash (QEMU killed) of the now transient domain.
    let last = state::find(&s.state(), &d.name).unwrap().0;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(last.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    left_fleet(&s, &d.name);
    assert!(conn.domain_by_uuid(&uuid).is_err(), "gone from libvirt");
    let ledger = state::ledger_path(&s.data(), &d.name);
    let file = burst_qemu::agent::LedgerFile::load(&ledger)
        .unwrap()
        .unwrap();
    assert_eq!(file.uuid.as_deref(), Some(uuid.as_str()));

    agent.stop();
    assert!(!agent_log(&s).contains("panicked"), "{}", agent_log(&s));
    drop(d);
}

/// The balance in the ledger file (a stopped VM's).
fn state_balance(s: &Scratch, name: &str) -> f64 {
    let out = s.cli(&["credits", name, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("{}", String::from_utf8_lossy(&out.stderr));
    });
    v["balance"].as_f64().unwrap()
}

fn restart_libvirtd() {
    stop_libvirtd();
    start_libvirtd().unwrap();
}

/// With the agent stopped: a running domain keeps its grant; one that stops is cleaned up
/// when the agent starts again (runtime dir, cgroup), one that starts is taken, and one that
/// ran throughout is charged exactly for the time the agent was away (the same QEMU's
/// threads, from the ledger's checkpoint).
#[test]
fn lifecycle_while_the_agent_is_stopped() {
    let Some(conn) = require_libvirtd() else {
        return;
    };
    if !require_cgroups() {
        return;
    }
    let s = Scratch::new();
    let config = r#"<config baseline="10" initial_credits="1"/>"#;
    let mut agent = LvAgent::start(&s, URI, &[]);
    let stays = TestDomain::start_opted_in(&conn, "stays", 1, Behaviour::Busy, config);
    let stops = TestDomain::start_opted_in(&conn, "stops", 1, Behaviour::Halt, config);
    let stays_r = in_fleet(&s, &stays.name);
    in_fleet(&s, &stops.name);
    sleep(Duration::from_secs(1));
    agent.stop();
    // The agent left a live checkpoint in each running domain on its way out.
    assert!(checkpoint(&conn, &stays.name, true).is_some_and(|c| !c.departed));
    let quota_before = quota(&s, &stays.name);
    let away_from = stays_r
        .vcpu_tids
        .iter()
        .map(|&t| thread_cpu_ns(stays_r.pid, t))
        .sum::<u64>();

    stops.domain().destroy().unwrap();
    let starts = TestDomain::start_opted_in(&conn, "starts", 1, Behaviour::Halt, config);
    sleep(Duration::from_secs(2));
    // Still held while no agent runs.
    assert_eq!(quota(&s, &stays.name), quota_before);

    let _agent = LvAgent::start(&s, URI, &[]);
    in_fleet(&s, &starts.name);
    left_fleet(&s, &stops.name);
    let log = agent_log(&s);
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&format!("{}: re-adopted; charged", stays.name)))
        .unwrap_or_else(|| panic!("{log}"));
    let charged: f64 = line
        .split("charged ")
        .nth(1)
        .and_then(|x| x.split(" s of CPU").next())
        .and_then(|x| x.parse().ok())
        .unwrap();
    let away_to = stays_r
        .vcpu_tids
        .iter()
        .map(|&t| thread_cpu_ns(stays_r.pid, t))
        .sum::<u64>();
    let used_away = (away_to - away_from) as f64 / 1e9;
    eprintln!("agent away: charged {charged:.3} s, the thread used at least {used_away:.3} s");
    // Charged from the last save (at most a second before the stop) to the re-adoption: at
    // least what the thread used from the stop to now, plus at most one save interval.
    assert!(charged >= used_away - 0.05, "{line}");
    // The departed one's ledger is whole.
    assert!(state::ledger_path(&s.data(), &stops.name).exists());
}

/// Credits travel with the domain: a definition moved to a second libvirtd (dumpxml → define)
/// starts there with its final balance; a saved image restored on the second libvirtd arrives
/// with its checkpoint (the gap charged at its grant); a live migration between the two
/// libvirtds, an agent watching each, ends the domain on the source and continues it on the
/// destination from the checkpoint.
#[test]
fn credits_travel_by_redefinition_save_image_and_live_migration() {
    let Some(conn) = require_libvirtd() else {
        return;
    };
    if !require_cgroups() {
        return;
    }
    if nested_guest() {
        let _ = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
    }
    let second = SecondLibvirtd::start();
    let conn2 = Connection::open(&second.uri).unwrap();
    let (s1, s2) = (Scratch::new(), Scratch::new());
    let _a1 = LvAgent::start(&s1, URI, &[]);
    let _a2 = LvAgent::start(
        &s2,
        &second.uri,
        &["--libvirt-run-dir", second.run_dir().to_str().unwrap()],
    );
    let config = r#"<config baseline="10" initial_credits="0"/>"#;
    let d = TestDomain::start_opted_in(&conn, "mig", 2, Behaviour::Halt, config);
    // Both daemons name cgroups machine/qemu-ID-NAME: keep the host's off the second's ids.
    if d.domain().id() == Some(1) {
        d.domain().destroy().unwrap();
        d.domain().start().unwrap();
    }
    in_fleet(&s1, &d.name);
    let uuid = d.domain().uuid();

    // 1. Live migration with an agent on each side.
    assert!(s1.cli(&["credits", &d.name, "--set", "7"]).status.success());
    wait_until("the checkpoint of 7", Duration::from_secs(5), || {
        checkpoint(&conn, &d.name, true)
            .is_some_and(|c| (c.balances.balance().as_credits() - 7.0).abs() < 0.01)
    });
    let t0 = Instant::now();
    let (ok, text) = virsh(&[
        "migrate",
        "--live",
        "--persistent",
        "--undefinesource",
        &d.name,
        &second.uri,
        "--migrateuri",
        &format!("tcp://127.0.0.1:{}", free_port()),
    ]);
    assert!(ok, "{text}");
    let took = t0.elapsed().as_secs_f64();
    left_fleet(&s1, &d.name);
    in_fleet(&s2, &d.name);
    let arrived = balance(&s2, &d.name);
    // The gap since the checkpoint (at most the migration's time and a second) is charged at
    // the grant (the full 2 vCPUs at 7 credits): 7 - 2 vCPUs × (took + 2 s) / 60 at worst.
    let floor = 7.0 - 2.0 * (took + 2.0) / 60.0;
    eprintln!("live migration in {took:.1} s: arrived with {arrived:.3} credits (7 set; floor {floor:.3})");
    assert!(arrived <= 7.0 && arrived >= floor, "{arrived}");
    assert!(agent_log(&s2).contains("continues from its metadata checkpoint"));
    // The source's agent sees the departure at its next poll (once a second).
    // The source's agent lets it go at its next poll (once a second): seen as migrated away
    // when a poll catches the source's `shut off (migrated)`; with `--undefinesource` the
    // domain usually vanishes between two polls and is seen as undefined (3 runs of 3 today,
    // migrated away in an earlier one). Either
    // way it ends there, charged no more.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !["(migratedaway)", "(undefined)"]
        .iter()
        .any(|how| agent_log(&s1).contains(&format!("libvirt domain left {how}")))
    {
        assert!(
            Instant::now() < deadline,
            "the source's agent did not let it go; its log:\n{}",
            agent_log(&s1)
        );
        sleep(Duration::from_millis(100));
    }

    // 2. Its definition moved back (dumpxml on the second, define on the host) after it
    // stopped: it starts with the final balance, no gap.
    let d2 = conn2.domain(&d.name).unwrap();
    d2.destroy().unwrap();
    left_fleet(&s2, &d.name);
    let final_cp = checkpoint(&conn2, &d.name, false).expect("the departure checkpoint");
    assert!(final_cp.departed);
    let xml = d2.xml(true).unwrap();
    d2.undefine().unwrap();
    conn.define(&xml).unwrap().start().unwrap();
    in_fleet(&s1, &d.name);
    let moved = balance(&s1, &d.name);
    let expected = final_cp.balances.balance().as_credits();
    eprintln!("redefined on the host: {moved:.3} credits (final checkpoint {expected:.3})");
    assert!((moved - expected).abs() < 0.02, "{moved} vs {expected}");
    assert_eq!(d.domain().uuid(), uuid);

    // 3. A saved image restored on the second libvirtd: the image's live checkpoint.
    assert!(s1.cli(&["credits", &d.name, "--set", "3"]).status.success());
    wait_until("the checkpoint of 3", Duration::from_secs(5), || {
        checkpoint(&conn, &d.name, true)
            .is_some_and(|c| (c.balances.balance().as_credits() - 3.0).abs() < 0.01)
    });
    let image = format!("{IMAGES}/{}.save", d.name);
    let (ok, text) = virsh(&["save", &d.name, &image]);
    assert!(ok, "{text}");
    left_fleet(&s1, &d.name);
    d.domain().undefine().unwrap();
    conn2.restore(Path::new(&image)).unwrap();
    let _ = std::fs::remove_file(&image);
    in_fleet(&s2, &d.name);
    let restored = balance(&s2, &d.name);
    eprintln!("saved image restored on the second libvirtd: {restored:.3} credits (3 set)");
    assert!(
        restored <= 3.0 && restored > 3.0 - 2.0 * 70.0 / 60.0,
        "{restored}"
    );
}
