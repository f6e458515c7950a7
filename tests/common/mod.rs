//! Shared harness for the tests that run real QEMU.

#![allow(dead_code)]

pub mod guest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use serde_json::Value;
use std::time::{Duration, Instant};

use burst_qemu::state::{self, VmRecord};
use burst_qemu::testguest::{self, Behaviour};

pub const QEMU: &str = "qemu-system-x86_64";

/// Whether QEMU can run here. Under CI (`CI` set) a missing QEMU fails the test; elsewhere the
/// test is skipped with a loud message.
pub fn require_qemu() -> bool {
    let ok = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{QEMU} is required in CI (bash .ci/run installs qemu-system-x86)");
        }
        eprintln!(
            "\n*** SKIPPED: {QEMU} not found; install qemu-system-x86 (bash .ci/run does) ***\n"
        );
    }
    ok
}

/// Whether cgroup CPU bandwidth is usable here (a hierarchy with the cpu controller that this
/// process can write). Under CI a missing capability fails the test; elsewhere it skips loudly.
pub fn require_cgroups() -> bool {
    let ok = burst_qemu::enforce::cgroup::detect_host().is_some_and(|(_, mount)| {
        let probe = mount
            .join("burst-qemu")
            .join(format!(".probe-{}", std::process::id()));
        std::fs::create_dir_all(&probe)
            .and_then(|()| std::fs::remove_dir(&probe))
            .is_ok()
    });
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("a writable cgroup cpu controller is required in CI (run as root; see burst-qemu check)");
        }
        eprintln!("\n*** SKIPPED: no writable cgroup cpu controller (run as root; see burst-qemu check) ***\n");
    }
    ok
}

/// A capability is missing: under CI the test fails; elsewhere it is skipped with a loud
/// message (the caller returns).
pub fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("required in CI: {why}");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

/// Whether the guest harness (tests/guest/run) can run here: QEMU and a static busybox. Under
/// CI a missing piece fails; elsewhere the test skips loudly.
pub fn require_harness() -> bool {
    // Every guest test starts here: in CI's guest lanes, before it does anything (the package
    // test builds its .deb first), it leaves the other phases' CPU time alone.
    guest::enter_lane_cgroup();
    if !require_qemu() {
        return false;
    }
    let busybox = Path::new("/bin/busybox").exists();
    if !busybox {
        skip_or_fail("no /bin/busybox (apt-get install busybox-static; bash .ci/run does)");
    }
    busybox
}

/// The guest harness.
pub fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/run")
}

/// The newest sibling test binary `name-<hash>` in this binary's directory (to run it inside a
/// guest).
pub fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let dir = me.parent().unwrap();
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix(&format!("{name}-"))
                .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no {name} test binary beside {}", me.display()))
        .1
}

/// Whether this runs inside a guest of the harness (tests/guest/run names it `bq-guest`),
/// where everything, the VMs' QEMU included, is emulated: CPU shares scatter more there.
pub fn nested_guest() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/hostname").is_ok_and(|h| h.trim() == "bq-guest")
}

/// The accelerator the test guest runs under: `kvm` when `BURST_QEMU_TEST_ACCEL=kvm` (the KVM
/// variants of tests/kvm.rs), else multi-threaded TCG.
pub fn accel() -> &'static str {
    if kvm_variant() {
        "kvm"
    } else {
        "tcg,thread=multi"
    }
}

/// Whether this run is a KVM variant (`BURST_QEMU_TEST_ACCEL=kvm`).
pub fn kvm_variant() -> bool {
    std::env::var("BURST_QEMU_TEST_ACCEL").as_deref() == Ok("kvm")
}

/// How QEMU names vCPU thread `i` under [`accel`]: `CPU 0/TCG`, `CPU 0/KVM`.
pub fn vcpu_thread_name(i: usize) -> String {
    format!("CPU {i}/{}", if kvm_variant() { "KVM" } else { "TCG" })
}

pub fn bin() -> Command {
    Command::new(bin_path())
}

/// The burst-qemu binary the tests run: this build's, or the one `BURST_QEMU_TEST_BIN` names.
/// `.ci/run` gives the guest lanes (phase 2) a release build of the same tree: in the emulated
/// guests the debug build's agents, launchers and scheduler cost about 300 CPU-seconds more of
/// emulation (the guest phase, measured 2026-12-06: 634 s and 1 200 CPU-s with the debug build,
/// 558 s and 904 CPU-s with the release one), and it is the build a user runs.
pub fn bin_path() -> PathBuf {
    std::env::var_os("BURST_QEMU_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_burst-qemu")))
}

/// [`bin_path`] as an argument of a command line (a guest part, a shell script).
pub fn bin_arg() -> String {
    bin_path().display().to_string()
}

/// A scratch area: state dir, vms dir, firmware images.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bq")
            .tempdir_in("/tmp")
            .unwrap();
        testguest::write(&dir.path().join("busy.bin"), Behaviour::Busy).unwrap();
        testguest::write(&dir.path().join("halt.bin"), Behaviour::Halt).unwrap();
        Scratch { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn state(&self) -> PathBuf {
        self.path().join("state")
    }
    pub fn vms(&self) -> PathBuf {
        self.path().join("vms")
    }
    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }
    pub fn firmware(&self, b: Behaviour) -> String {
        let name = if b == Behaviour::Busy {
            "busy.bin"
        } else {
            "halt.bin"
        };
        self.path().join(name).to_str().unwrap().to_owned()
    }

    /// QEMU arguments for the test guest, under TCG (or KVM with `BURST_QEMU_TEST_ACCEL=kvm`:
    /// tests/kvm.rs reruns suites so).
    pub fn qemu_args(&self, b: Behaviour) -> Vec<String> {
        testguest::qemu_command(Path::new(&self.firmware(b)), accel(), 16)
    }

    /// The launcher with --state-dir and --vms set, then `flags`, `--`, `qemu`.
    pub fn launcher(&self, flags: &[&str], qemu: &[String]) -> Command {
        let mut c = bin();
        c.arg("--state-dir")
            .arg(self.state())
            .arg("--vms")
            .arg(self.vms());
        c.env("BURST_QEMU_DATA_DIR", self.data());
        c.args(flags).arg("--").args(qemu);
        c
    }

    /// A fleet command (`ls`, `stop`, `credits`, …) on this scratch state dir.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        bin()
            .args(args)
            .arg("--state-dir")
            .arg(self.state())
            .env("BURST_QEMU_DATA_DIR", self.data())
            .output()
            .unwrap()
    }

    /// Waits until VM `name` is registered.
    pub fn wait_registered(&self, name: &str, child: &mut Child) -> VmRecord {
        // A liveness bound, not a measurement: in CI run 19's scx-6.12 guest (single-threaded
        // TCG, 44 VMs already up) the 45th VM took longer than 30 s.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(r) = state::find(&self.state(), name) {
                return r.0;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("launcher exited before {name} registered: {status}");
            }
            assert!(Instant::now() < deadline, "{name} did not register in 90 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A launched VM that is killed (and reaped) if the test ends early.
pub struct Launched {
    pub child: Child,
    pub record: VmRecord,
}

impl Launched {
    pub fn start(s: &Scratch, name: &str, flags: &[&str], qemu: &[String]) -> Self {
        let mut all = vec!["--name", name, "--shutdown-timeout", "1"];
        all.extend_from_slice(flags);
        let mut child = s.launcher(&all, qemu).spawn().unwrap();
        let record = s.wait_registered(name, &mut child);
        Launched { child, record }
    }

    /// The CPU time its vCPU threads have run, ns, summed.
    pub fn vcpu_cpu_ns(&self) -> u64 {
        self.record
            .vcpu_tids
            .iter()
            .map(|&t| thread_cpu_ns(self.record.pid, t))
            .sum()
    }

    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "launcher still running after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // QEMU outlives a killed launcher (an orphan): kill it by identity either way.
        if self.record.qemu_alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.record.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

/// A test that fails half-way leaves the agent its launcher started (or restarted) running
/// with its idle exit of 30 s, and under `--enforcer scx` that agent's scheduler stays loaded:
/// the next test's agent cannot load its own (stop-30 CI: a failed restart test was followed
/// by a VM "with credits" held to 28.6 %). The scratch ends the agent of its state dir.
impl Drop for Scratch {
    fn drop(&mut self) {
        let state = self.state();
        if !state::agent_running(&state) {
            return;
        }
        let Some(pid) = state::recorded_holder(&state::agent_lock_path(&state)) else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while state::agent_running(&state) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if state::agent_running(&state) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Cumulative CPU time of a live thread, in ns (the library's schedstat reader).
pub fn thread_cpu_ns(pid: u32, tid: u32) -> u64 {
    burst_qemu::procfs::Proc::host()
        .thread_cpu_ns(pid, tid)
        .expect("the thread is alive")
}

/// Each thread's CPU share (percent of one CPU) over `interval`, read in this one process at
/// both ends of a monotonic interval.
pub fn shares(pid: u32, tids: &[u32], interval: Duration) -> Vec<f64> {
    let before: Vec<u64> = tids.iter().map(|&t| thread_cpu_ns(pid, t)).collect();
    let t0 = Instant::now();
    std::thread::sleep(interval);
    let after: Vec<u64> = tids.iter().map(|&t| thread_cpu_ns(pid, t)).collect();
    let elapsed = t0.elapsed().as_nanos() as f64;
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 * 100.0 / elapsed)
        .collect()
}

/// The agent's published view of `name` (credits.json), once there is one.
pub fn view(s: &Scratch, name: &str) -> Value {
    let path = s.state().join(name).join("credits.json");
    // A liveness bound: CI run 19's scx-6.12 guest, its agent restarted, took longer than 10 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            return v;
        }
        assert!(Instant::now() < deadline, "no credits.json for {name}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the agent's next publish of `name` (its `credits.json` is rewritten once a second
/// while the VM runs), then reads the VM's vCPU threads' CPU time at once, ns: both describe
/// the same moment, within the few milliseconds between the agent's reading of the threads
/// and its write (and this 2 ms poll).
pub fn at_next_publish(s: &Scratch, name: &str, vm: &Launched) -> (Value, u64) {
    let path = s.state().join(name).join("credits.json");
    let first = std::fs::read(&path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = std::fs::read(&path).unwrap_or_default();
        if now != first {
            if let Ok(v) = serde_json::from_slice::<Value>(&now) {
                return (v, vm.vcpu_cpu_ns());
            }
        }
        assert!(Instant::now() < deadline, "{name}: no publish within 5 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Pauses the VM, waits until its vCPU threads have stopped (in an emulated guest they take a
/// moment after `pause` returns) and for the agent's next publish: the published figures and
/// the threads' CPU time (ns, returned with them) then describe the same state exactly,
/// whatever the delay between the agent's reading of the threads and its write. The caller
/// resumes the VM when it wants it running again.
pub fn at_rest(s: &Scratch, name: &str, vm: &Launched) -> (Value, u64) {
    assert!(s.cli(&["pause", name]).status.success());
    let cpu = || vm.vcpu_cpu_ns();
    let mut last = cpu();
    wait_until("the vCPU threads stopped", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(50));
        let now = cpu();
        std::mem::replace(&mut last, now) == now
    });
    at_next_publish(s, name, vm)
}

pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

/// The VM's vCPU cgroup (cgroup v1 or v2), found from its name under this scratch's instance.
pub fn vcpu_cgroup(s: &Scratch, name: &str) -> PathBuf {
    let (version, mount) = burst_qemu::enforce::cgroup::detect_host().unwrap();
    let instance = burst_qemu::enforce::cgroup::instance_name(&s.state());
    let dir = mount.join("burst-qemu").join(instance).join(name);
    match version {
        burst_qemu::enforce::cgroup::Version::V1 => dir,
        burst_qemu::enforce::cgroup::Version::V2 => dir.join("vcpus"),
    }
}

pub fn quota(s: &Scratch, name: &str) -> String {
    let dir = vcpu_cgroup(s, name);
    std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .or_else(|_| std::fs::read_to_string(dir.join("cpu.max")))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

pub fn write_config(s: &Scratch, name: &str, text: &str) {
    std::fs::create_dir_all(s.vms()).unwrap();
    std::fs::write(s.vms().join(format!("{name}.toml")), text).unwrap();
}

/// The pid the agent wrote into its lock file (a new agent rewrites it: retried briefly).
pub fn agent_pid(s: &Scratch) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = std::fs::read_to_string(s.state().join("agent.lock")).unwrap_or_default();
        if let Ok(pid) = text.trim().parse() {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in agent.lock: {text:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn start_agent(s: &Scratch) -> Child {
    std::fs::create_dir_all(s.state()).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.state().join("agent.log"))
        .unwrap();
    bin()
        .args(["agent", "--state-dir"])
        .arg(s.state())
        .env("BURST_QEMU_DATA_DIR", s.data())
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// With `BURST_QEMU_ENFORCER=scx` (the suites rerun inside the scx-6.12 guest by tests/scx.rs):
/// waits until the sched_ext scheduler publishes `name` as one of its VMs, so a suite run "on
/// the scx enforcer" cannot quietly pass on the cgroup one. Otherwise does nothing.
pub fn expect_enforcer(s: &Scratch, name: &str) {
    if std::env::var("BURST_QEMU_ENFORCER").as_deref() != Ok("scx") {
        return;
    }
    // Loading the BPF program (the verifier) took 6 s in an idle scx-6.12 guest and 21 s
    // with two of its three CPUs busy (measured: `scx-scheduler` started by hand beside two
    // shell loops), where the stop-30 CI's 10 s ran out.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let stats = burst_qemu::enforce::scx::read_stats(&s.state());
        if let Some(st) = &stats {
            if st.state == "enabled" && st.ops == "burst_qemu" && st.vms.contains_key(name) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "BURST_QEMU_ENFORCER=scx but the sched_ext scheduler does not schedule {name}: \
             {stats:?}; agent log:\n{}",
            std::fs::read_to_string(s.state().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The address the agent of `s` serves its metrics at, once it has written it
/// (`<state dir>/metrics.addr`), waiting up to `within`.
pub fn metrics_addr(s: &Scratch, within: Duration) -> std::net::SocketAddr {
    let path = s.state().join("metrics.addr");
    let mut addr = None;
    wait_until("agent serving metrics", within, || {
        addr = std::fs::read_to_string(&path)
            .ok()
            .and_then(|a| a.trim().parse().ok());
        addr.is_some()
    });
    addr.unwrap()
}
