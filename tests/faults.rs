//! Fault injection on real QEMU, the real agent and real cgroups: one fault a test, each
//! asserting that nothing is lost — balances within one persistence interval of what the
//! threads measured, no VM unaccounted, no cgroup or runtime dir left behind. These run one at
//! a time (.config/nextest.toml).

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::testguest::Behaviour::{Busy, Halt};
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// One second of one vCPU at the 20 % these tests hold VMs to, plus one tick: what a crash may
/// lose (the persistence interval), in seconds of CPU.
const ONE_INTERVAL_S: f64 = 0.25;

fn ready() -> bool {
    require_qemu() && require_cgroups()
}

/// Under CI a test that needs root fails without it; elsewhere it skips loudly.
fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "root is required in CI (mounts)"
        );
        eprintln!("\n*** SKIPPED: needs root (mounts a small tmpfs) ***\n");
    }
    root
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// `ls --json` as parsed rows.
fn ls(s: &Scratch) -> Vec<Value> {
    let out = s.cli(&["ls", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ls_row(s: &Scratch, name: &str) -> Option<Value> {
    ls(s).into_iter().find(|v| v["name"] == name)
}

/// The vCPU threads' CPU time, seconds.
fn threads_s(pid: u32, tids: &[u32]) -> f64 {
    tids.iter().map(|&t| thread_cpu_ns(pid, t)).sum::<u64>() as f64 / 1e9
}

/// The ledger file as saved.
fn saved(s: &Scratch, name: &str) -> Value {
    let path = s.data().join("ledgers").join(format!("{name}.json"));
    serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
}

fn saved_used_s(s: &Scratch, name: &str) -> f64 {
    saved(s, name)["used_total"].as_u64().unwrap() as f64 / 1e9
}

/// Waits until the agent has saved the VM's ledger with some use in it (saved once a second).
fn saved_once(s: &Scratch, name: &str) {
    wait_until("the ledger saved", Duration::from_secs(10), || {
        fs::read(s.data().join("ledgers").join(format!("{name}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["used_total"].as_u64().is_some_and(|u| u > 0))
    });
}

fn agent_log(s: &Scratch) -> String {
    fs::read_to_string(s.state().join("agent.log")).unwrap_or_default()
}

/// Busy 2-vCPU guest, started paused (`-S`) so that nothing runs before the agent adopts it,
/// held to 20 % of one CPU (10 % × 2, no credits); resumed once enforced.
/// Also returns the vCPU threads' CPU (s) at adoption: what QEMU's start-up ran before the agent
/// took the VM is not the VM's to pay (measurable in a nested guest: about 20 ms).
fn held_vm(s: &Scratch, name: &str) -> (Launched, f64) {
    let mut qemu = s.qemu_args(Busy);
    qemu.push("-S".into());
    let vm = Launched::start(
        s,
        name,
        &["--vcpus", "2", "--baseline", "10", "--credits", "0"],
        &qemu,
    );
    view(s, name);
    let before = threads_s(vm.record.pid, &vm.record.vcpu_tids);
    assert!(s.cli(&["resume", name]).status.success());
    (vm, before)
}

/// The CPU the VM's threads used over `secs`, in % of one CPU, against the grant the agent
/// published over the same time (a small balance lifts the grant a little above the 20 %
/// baseline, and a slow host such as a nested guest earns a bigger one): returns (share,
/// grant), the grant averaged over the window.
fn share_and_grant(s: &Scratch, name: &str, vm: &Launched, secs: u64) -> (f64, f64) {
    let grant = |s: &Scratch| view(s, name)["grant_pct"].as_f64().unwrap() * 2.0;
    let g0 = grant(s);
    let share: f64 = shares(
        vm.record.pid,
        &vm.record.vcpu_tids,
        Duration::from_secs(secs),
    )
    .iter()
    .sum();
    (share, (g0 + grant(s)) / 2.0)
}

fn assert_held(s: &Scratch, name: &str, vm: &Launched, what: &str) -> f64 {
    std::thread::sleep(Duration::from_millis(300));
    let (share, grant) = share_and_grant(s, name, vm, 3);
    eprintln!("{what}: {share:.2} % of one CPU, grant {grant:.2} % (baseline 20)");
    // 1.5 points on this host; a nested guest (tests/cgroup_v2.rs), all of it emulated,
    // measures within 3.
    let tolerance = if nested_guest() { 3.0 } else { 1.5 };
    // Held means held near the 20 % baseline: with no credits the grant is the baseline plus
    // what a starved VM earned back (the decline law grants baseline + √(2·B·k) for a balance
    // B): measured 20.00 % in every case on this host. In a nested guest the quota delivers
    // 0.4-0.9 points less than asked (docs/testing.md: bare cpu.max 19.08-19.58 % for 20 %),
    // the ledger counts the shortfall as savings and hands it back: orphans there measured
    // 20.50 % and 21.14 % (a full CI run), so 22 there.
    let max_grant = if nested_guest() { 22.0 } else { 21.0 };
    assert!(
        grant <= max_grant && (share - grant).abs() <= tolerance,
        "{what}: {share:.2} % of one CPU against a grant of {grant:.2} % (baseline 20)"
    );
    share
}

fn assert_cleaned(s: &Scratch, name: &str) {
    let cgroup = vcpu_cgroup(s, name);
    wait_until("runtime dir removed", Duration::from_secs(5), || {
        !s.state().join(name).exists()
    });
    wait_until("cgroup removed", Duration::from_secs(5), || {
        !cgroup.exists() && !cgroup.parent().unwrap().join(name).exists()
    });
    assert!(
        s.data()
            .join("ledgers")
            .join(format!("{name}.json"))
            .exists(),
        "ledger saved"
    );
}

#[test]
fn qemu_starts_with_clean_signals_and_descriptors_and_sigterm_ends_it() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    // A descriptor the launcher inherits (as from a careless parent): QEMU must not get it.
    let sentinel = s.path().join("sentinel");
    let file = fs::File::create(&sentinel).unwrap();
    // QEMU's signal state as it starts: a wrapper in its place copies its own /proc status (a
    // non-interactive sh leaves its inherited mask and ignored signals as they are), then execs
    // QEMU. QEMU itself blocks and ignores some signals of its own once it runs. The copy is made
    // by the shell's builtins, with no child: dash blocks every signal while it waits for a child
    // (all but 32 and 33, glibc's sigfillset), so a `cat /proc/$$/status` read that mask whenever
    // the shell reached its wait first (one CI run failed so, with 1-31 and 34-64 "blocked").
    let at_exec = s.path().join("status-at-exec");
    let wrapper = s.path().join("qemu-wrapper");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nwhile IFS= read -r line; do printf '%s\\n' \"$line\"; done \
             < /proc/self/status > {}\nexec {QEMU} \"$@\"\n",
            at_exec.display()
        ),
    )
    .unwrap();
    fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut qemu = s.qemu_args(Halt);
    qemu[0] = wrapper.to_str().unwrap().to_owned();
    let mut cmd = s.launcher(
        &["--name", "sig", "--vcpus", "1", "--baseline", "10"],
        &qemu,
    );
    let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
    // The launcher starts with every signal blocked and every one that can be ignored ignored
    // (as from a careless parent), 32 and 33 included: glibc refuses those two, so the kernel's
    // rt_sigaction is called directly (a CI runner's process tree had 32 ignored, which the
    // launcher could not undo through glibc).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    // SAFETY: dup2, rt_sigaction and sigprocmask are async-signal-safe; `raw` is open in the
    // child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 9) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let ign = KernelSigaction {
                handler: libc::SIG_IGN,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            for sig in 1..65 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        &ign as *const KernelSigaction,
                        std::ptr::null_mut::<KernelSigaction>(),
                        8usize,
                    );
                }
            }
            let all: u64 = !0;
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &all as *const u64,
                std::ptr::null_mut::<u64>(),
                8usize,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let record = s.wait_registered("sig", &mut child);
    let mut vm = Launched { child, record };
    view(&s, "sig");

    let mask = |status: &str, key: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    // The 62 signals a process can block or ignore (all but SIGKILL and SIGSTOP).
    let resettable = !((1u64 << (libc::SIGKILL - 1)) | (1u64 << (libc::SIGSTOP - 1)));
    // The launcher did inherit the dirt (so a clean QEMU is its doing): SIGUSR1, which it never
    // touches, is still ignored and blocked in it.
    let launcher = fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    let usr1 = 1u64 << (libc::SIGUSR1 - 1);
    assert!(
        mask(&launcher, "SigIgn:") & usr1 != 0 && mask(&launcher, "SigBlk:") & usr1 != 0,
        "the launcher did not inherit ignored and blocked signals: {launcher}"
    );
    let status = fs::read_to_string(&at_exec).unwrap();
    for key in ["SigBlk:", "SigIgn:"] {
        let dirty = mask(&status, key) & resettable;
        let names: Vec<i32> = (1..65).filter(|s| dirty & (1u64 << (s - 1)) != 0).collect();
        assert_eq!(
            dirty, 0,
            "QEMU starts with signals {names:?} in {key}\n{status}"
        );
    }
    let lock = s.state().join("sig").join("lock");
    for fd in fs::read_dir(format!("/proc/{}/fd", vm.record.pid)).unwrap() {
        let target = fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert!(
            target != sentinel && target != lock,
            "QEMU inherited {}",
            target.display()
        );
    }

    signal(vm.record.pid, Signal::SIGTERM);
    let exit = vm.wait(Duration::from_secs(10));
    // QEMU exits 0 after "terminating on signal 15"; the launcher passes that on.
    assert_eq!(exit.code(), Some(0), "launcher exit {exit:?}");
    assert_cleaned(&s, "sig");
}

#[test]
fn launcher_killed_its_vm_is_an_orphan_still_listed_charged_enforced_and_stoppable() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let (mut vm, before) = held_vm(&s, "orph");
    signal(vm.child.id(), Signal::SIGKILL);
    vm.wait(Duration::from_secs(5));

    let row = ls_row(&s, "orph").expect("the orphan is listed");
    assert_eq!(row["state"], "orphaned", "{row}");
    assert_eq!(row["launcher"], "gone");
    assert!(row["orphan_reason"].as_str().unwrap().contains("launcher"));
    let text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(text.contains("orphaned"), "{text}");
    wait_until("the agent notices", Duration::from_secs(3), || {
        agent_log(&s).contains("is gone; QEMU")
    });

    // Still enforced, still charged.
    assert_held(&s, "orph", &vm, "orphan");
    let credits: Value =
        serde_json::from_slice(&s.cli(&["credits", "orph", "--json"]).stdout).unwrap();
    assert_eq!(credits["state"], "running");

    // The name is taken: a new launch is refused and no second QEMU starts.
    let again = s
        .launcher(
            &["--name", "orph", "--shutdown-timeout", "1"],
            &s.qemu_args(Halt),
        )
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(3), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("without its launcher"));
    assert_eq!(ls(&s).len(), 1);
    assert_eq!(ls_row(&s, "orph").unwrap()["pid"], vm.record.pid);

    // Accounted exactly: the ledger charged what the threads ran (started paused).
    at_rest(&s, "orph", &vm);
    let used = view(&s, "orph")["used_total_s"].as_f64().unwrap();
    let ran = threads_s(vm.record.pid, &vm.record.vcpu_tids) - before;
    eprintln!("orphan: ledger {used:.3} s, threads {ran:.3} s");
    assert!((used - ran).abs() <= 0.01, "ledger {used} vs threads {ran}");
    assert_eq!(ls_row(&s, "orph").unwrap()["run_state"], "paused");
    assert!(s.cli(&["resume", "orph"]).status.success());

    // stop works without a launcher: powerdown (ignored by the firmware), quit.
    let t = Instant::now();
    let out = s.cli(&["stop", "orph", "--shutdown-timeout", "1"]);
    assert!(out.status.success(), "{out:?}");
    eprintln!("orphan stopped in {:?}", t.elapsed());
    assert!(!vm.record.qemu_alive());
    assert_cleaned(&s, "orph");
    assert!(saved_used_s(&s, "orph") >= used);
}

#[test]
fn qemu_killed_the_launcher_exits_137_and_nothing_is_left_or_lost() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let (mut vm, before) = held_vm(&s, "k9");
    saved_once(&s, "k9");
    let ran = threads_s(vm.record.pid, &vm.record.vcpu_tids) - before;
    signal(vm.record.pid, Signal::SIGKILL);
    assert_eq!(vm.wait(Duration::from_secs(5)).code(), Some(137));
    assert_cleaned(&s, "k9");
    let used = saved_used_s(&s, "k9");
    eprintln!("QEMU kill -9: ledger {used:.3} s, threads {ran:.3} s before the kill");
    assert!((used - ran).abs() <= ONE_INTERVAL_S, "{used} vs {ran}");
}

#[test]
fn agent_killed_while_its_vm_ends_the_next_agent_removes_the_leftover_cgroup() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let (mut vm, before) = held_vm(&s, "end");
    saved_once(&s, "end");
    let agent = agent_pid(&s) as u32;
    // Frozen first, so neither it nor the launcher's watchdog (the lock is still held) acts.
    signal(agent, Signal::SIGSTOP);
    let ran = threads_s(vm.record.pid, &vm.record.vcpu_tids) - before;
    signal(vm.record.pid, Signal::SIGKILL);
    vm.wait(Duration::from_secs(5));
    signal(agent, Signal::SIGKILL);
    wait_until("agent gone", Duration::from_secs(3), || {
        !burst_qemu::state::agent_running(&s.state())
    });
    let cgroup = vcpu_cgroup(&s, "end");
    assert!(cgroup.exists(), "the dead agent left the VM's cgroup");

    let out = s.cli(&["agent", "--idle-exit", "0.5"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !cgroup.exists(),
        "the next agent removed the leftover cgroup"
    );
    let used = saved_used_s(&s, "end");
    eprintln!("agent died as its VM ended: ledger {used:.3} s, threads {ran:.3} s");
    assert!((used - ran).abs() <= ONE_INTERVAL_S, "{used} vs {ran}");
}

#[test]
fn agent_and_launcher_killed_the_next_fleet_command_revives_the_agent_which_charges_the_gap() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let (mut vm, before) = held_vm(&s, "both");
    signal(vm.child.id(), Signal::SIGKILL);
    vm.wait(Duration::from_secs(5));
    signal(agent_pid(&s) as u32, Signal::SIGKILL);
    wait_until("agent gone", Duration::from_secs(3), || {
        !burst_qemu::state::agent_running(&s.state())
    });
    std::thread::sleep(Duration::from_secs(2));

    let out = s.cli(&["ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("started one"));
    wait_until("agent back", Duration::from_secs(3), || {
        burst_qemu::state::agent_running(&s.state())
    });
    wait_until("re-adopted", Duration::from_secs(5), || {
        agent_log(&s).contains("re-adopted")
    });
    assert_held(&s, "both", &vm, "re-adopted orphan");
    at_rest(&s, "both", &vm);
    let used = view(&s, "both")["used_total_s"].as_f64().unwrap();
    let ran = threads_s(vm.record.pid, &vm.record.vcpu_tids) - before;
    eprintln!("both killed, 2 s without agent: ledger {used:.3} s, threads {ran:.3} s");
    assert!((used - ran).abs() <= 0.01, "{used} vs {ran}");
    assert!(s
        .cli(&["stop", "both", "--shutdown-timeout", "0"])
        .status
        .success());
    assert_cleaned(&s, "both");
}

/// A small tmpfs mounted on the scratch's data dir, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.display());
        SmallFs(dir.to_owned())
    }

    fn remount(&self, opt: &str) {
        remount(&self.0, opt);
    }
}

fn remount(dir: &Path, opt: &str) {
    let ok = Command::new("mount")
        .args(["-o", &format!("remount,{opt}")])
        .arg(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount,{opt} {}", dir.display());
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system at `dir` to the last byte; returns the filler.
fn fill(dir: &Path) -> PathBuf {
    fill_as(dir, "filler")
}

fn fill_as(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.write_all(&[0]);
    path
}

fn ledger_error(s: &Scratch, name: &str) -> Option<String> {
    view(s, name)["ledger_error"].as_str().map(str::to_owned)
}

/// The agent goes on enforcing from memory while the data dir refuses writes, says so in its
/// log, `ls`, `credits --json` and `check`, never leaves a torn ledger, and saves again once
/// it can.
fn unwritable_data_dir(break_it: impl FnOnce(&SmallFs) -> Box<dyn FnOnce()>) {
    if !(ready() && require_root()) {
        return;
    }
    let s = Scratch::new();
    let small = SmallFs::mount(&s.data());
    let (vm, _) = held_vm(&s, "disk");
    saved_once(&s, "disk");
    let repair = break_it(&small);
    // The agent saves a steady ledger (as this held VM's: a restart would replay it exactly)
    // every 5 s, each other one every second: the failure shows at its next save, which the
    // once-a-second persistence finds due up to a second late, and in the view published
    // within the next second: measured 7.2 s (twice).
    let took = wait_until("the save failure is shown", Duration::from_secs(10), || {
        ledger_error(&s, "disk").is_some()
    });
    eprintln!("the save failure shown after {took:?}");
    let before = saved(&s, "disk");
    let ls_text = String::from_utf8(s.cli(&["ls"]).stdout).unwrap();
    assert!(ls_text.contains("ledger not saved"), "{ls_text}");
    let check = String::from_utf8(s.cli(&["check"]).stdout).unwrap();
    assert!(check.contains("cannot save its ledger"), "{check}");
    assert!(agent_log(&s).contains("enforcing from memory"));
    assert_held(&s, "disk", &vm, "data dir refusing writes");
    let leftovers: Vec<_> = fs::read_dir(s.data().join("ledgers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        // The ledger and its companion (see state::write_swapping), nothing else.
        .filter(|n| n != "disk.json" && n != ".disk.json.swap")
        .collect();
    assert!(leftovers.is_empty(), "no temporary left: {leftovers:?}");

    repair();
    wait_until("saved again", Duration::from_secs(4), || {
        ledger_error(&s, "disk").is_none()
    });
    // The ledger moves on once saving works again (a steady one saved every 5 s).
    wait_until(
        "the ledger saved with more use",
        Duration::from_secs(10),
        || saved(&s, "disk")["used_total"].as_u64() > before["used_total"].as_u64(),
    );
    drop(vm);
}

#[test]
fn data_dir_full_the_agent_enforces_from_memory_and_saves_again_when_space_returns() {
    unwritable_data_dir(|small| {
        let filler = fill(&small.0);
        // A ledger is rewritten in its companion, in space it already holds
        // (state::write_atomic_all): on a full disk its saves go on. Without a companion a save
        // needs new space, which the full disk refuses: remove it, and fill what it freed.
        let _ = fs::remove_file(small.0.join("ledgers/.disk.json.swap"));
        let more = fill_as(&small.0, "filler2");
        Box::new(move || {
            fs::remove_file(filler).unwrap();
            fs::remove_file(more).unwrap();
        })
    });
}

#[test]
fn data_dir_read_only_the_agent_enforces_from_memory_and_saves_again_when_writable() {
    unwritable_data_dir(|small| {
        small.remount("ro");
        let dir = small.0.clone();
        Box::new(move || remount(&dir, "rw"))
    });
}

#[test]
fn corrupt_or_truncated_ledgers_are_set_aside_and_the_vm_starts_fresh() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let ledgers = s.data().join("ledgers");
    fs::create_dir_all(&ledgers).unwrap();
    fs::write(ledgers.join("bad.json"), b"{\"name\": 3, \x00\xff garbage").unwrap();
    let whole = br#"{"name":"cut","vcpus":1,"policy":{"vcpus":1,"baseline":100000,"mode":"standard","max_credits":8640000000000,"max_surplus":86"#;
    fs::write(ledgers.join("cut.json"), whole).unwrap();
    let _a = Launched::start(
        &s,
        "bad",
        &["--vcpus", "1", "--baseline", "10", "--credits", "7"],
        &s.qemu_args(Halt),
    );
    let _b = Launched::start(
        &s,
        "cut",
        &["--vcpus", "1", "--baseline", "10", "--credits", "7"],
        &s.qemu_args(Halt),
    );
    for name in ["bad", "cut"] {
        let balance = view(&s, name)["balance"].as_f64().unwrap();
        assert!((balance - 7.0).abs() < 0.01, "{name}: {balance}");
        assert!(ledgers.join(format!("{name}.json.bad")).exists());
    }
    assert!(agent_log(&s).contains("unreadable ledger"));
    assert!(burst_qemu::state::agent_running(&s.state()));
}

#[test]
fn a_ledger_from_another_boot_keeps_its_balance_and_charges_no_gap() {
    use burst_qemu::agent::{Checkpoint, LedgerFile};
    use burst_qemu::credit::{Baseline, Credits, Ledger, Policy};
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let policy = Policy::new(1, Baseline::from_percent(10.0).unwrap()).unwrap();
    let ledger = Ledger::new(policy.clone(), Credits::from_credits(5.0).unwrap());
    LedgerFile {
        name: "boot".into(),
        vcpus: 1,
        policy: Some(policy),
        balances: ledger.balances(),
        credits_applied: None,
        used_total: Credits::ZERO,
        checkpoint: Some(Checkpoint {
            boot_id: "00000000-another-boot".into(),
            boottime_ns: 1,
            qemu_pid: std::process::id(),
            qemu_start: 1,
            cpu_ns: vec![(1, 0)],
        }),
        uuid: None,
        saved_unix_ns: 0,
    }
    .save(&s.data().join("ledgers/boot.json"))
    .unwrap();
    let _vm = Launched::start(
        &s,
        "boot",
        &["--vcpus", "1", "--baseline", "10"],
        &s.qemu_args(Halt),
    );
    let balance = view(&s, "boot")["balance"].as_f64().unwrap();
    assert!((balance - 5.0).abs() < 0.01, "balance {balance}");
}

#[test]
fn a_config_replaced_by_a_directory_or_a_symlink_loop_keeps_the_last_good_one() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let _vm = Launched::start(
        &s,
        "cfg",
        &["--vcpus", "1", "--baseline", "10"],
        &s.qemu_args(Halt),
    );
    view(&s, "cfg");
    let file = s.vms().join("cfg.toml");
    let stale = |what: &str, in_force: f64| {
        wait_until(what, Duration::from_secs(3), || {
            ls_row(&s, "cfg").unwrap()["config_state"] == "stale"
        });
        assert_eq!(
            view(&s, "cfg")["baseline"],
            in_force,
            "last good config in force"
        );
    };
    let good = |baseline: f64| {
        write_config(&s, "cfg", &format!("vcpus = 1\nbaseline = {baseline}\n"));
        wait_until("good again", Duration::from_secs(3), || {
            view(&s, "cfg")["baseline"] == baseline
                && ls_row(&s, "cfg").unwrap()["config_state"] == "ok"
        });
    };
    fs::remove_file(&file).unwrap();
    fs::create_dir(&file).unwrap();
    stale("a directory in the config's place", 10.0);
    fs::remove_dir(&file).unwrap();
    good(20.0);
    fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("cfg.toml", &file).unwrap();
    stale("a symlink loop in the config's place", 20.0);
    fs::remove_file(&file).unwrap();
    good(30.0);
    assert!(burst_qemu::state::agent_running(&s.state()));
}

#[test]
fn a_removed_cgroup_or_a_rewritten_quota_is_put_back_within_a_second_or_two() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let (vm, _) = held_vm(&s, "cg");
    let dir = vcpu_cgroup(&s, "cg");
    // The quota itself moves a little as the small balance it earns is spent: compare numbers.
    let limit =
        |s: &Scratch| -> Option<f64> { quota(s, "cg").split_whitespace().next()?.parse().ok() };
    let enforced = limit(&s).filter(|&q| q > 0.0).expect("a quota in force");
    let restored =
        |s: &Scratch| limit(s).is_some_and(|q| q > 0.0 && (q - enforced).abs() <= enforced * 0.1);
    let v2 = dir.join("cpu.max").exists();
    let (file, unlimited) = if v2 {
        ("cpu.max", "max 100000")
    } else {
        ("cpu.cfs_quota_us", "-1")
    };
    fs::write(dir.join(file), unlimited).unwrap();
    let took = wait_until("quota put back", Duration::from_secs(3), || restored(&s));
    eprintln!("rewritten quota put back in {took:?}");

    // Remove the cgroup: its threads must leave it first.
    let (mount, list) = if v2 {
        (dir.parent().unwrap().to_owned(), "cgroup.threads")
    } else {
        (
            burst_qemu::enforce::cgroup::detect_host().unwrap().1,
            "tasks",
        )
    };
    for tid in &vm.record.vcpu_tids {
        fs::write(mount.join(list), tid.to_string()).unwrap();
    }
    fs::remove_dir(&dir).unwrap();
    let took = wait_until("cgroup recreated", Duration::from_secs(3), || {
        restored(&s)
            && vm.record.vcpu_tids.iter().all(|t| {
                fs::read_to_string(dir.join(list))
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|x| x == t.to_string())
            })
    });
    eprintln!("removed cgroup recreated with its threads in {took:?}");
    assert_held(&s, "cg", &vm, "recreated cgroup");
}

#[test]
fn a_reused_pid_or_thread_id_is_never_taken_for_qemu_or_its_vcpus() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    let mut impostor = Command::new("sleep").arg("60").spawn().unwrap();
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = impostor.id();
    let record = |name: &str, start: u64, tids: Vec<u32>| {
        let dir = s.state().join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("lock"), "").unwrap();
        write_config(&s, name, "vcpus = 1\nbaseline = 10\n");
        let r = burst_qemu::state::VmRecord {
            name: name.into(),
            pid,
            wrapper_pid: 1,
            vcpus: 1,
            baseline: 10.0,
            mode: burst_qemu::credit::Mode::Standard,
            vcpu_tids: tids,
            config: s.vms().join(format!("{name}.toml")),
            qmp_socket: dir.join("qmp.sock"),
            qemu_start: start,
            boot_id: burst_qemu::procfs::Proc::host().boot_id(),
            source: Default::default(),
            agent_socket: None,
        };
        fs::write(dir.join("vm.json"), serde_json::to_vec(&r).unwrap()).unwrap();
    };
    let start = burst_qemu::procfs::Proc::host()
        .process_start_time(pid)
        .unwrap();
    // A record whose pid now belongs to another process (different start time): gone.
    record("reused", start + 1, vec![pid]);
    // A record without a start time (0: unknown, as from an older launcher) whose pid is alive:
    // the pid alone identifies nothing, so it is gone too, never adopted.
    record("unknown", 0, vec![pid]);
    // A live "QEMU" whose recorded vCPU thread id is another process's thread.
    record("foreign", start, vec![bystander.id()]);

    let mut agent = start_agent(&s);
    wait_until(
        "the stale records are reaped",
        Duration::from_secs(5),
        || !s.state().join("reused").exists() && !s.state().join("unknown").exists(),
    );
    let names: Vec<Value> = ls(&s).iter().map(|v| v["name"].clone()).collect();
    assert_eq!(
        names,
        ["foreign"],
        "a reused pid, or a pid without a start time, is not a VM"
    );
    wait_until("foreign adopted", Duration::from_secs(5), || {
        agent_log(&s).contains("is not a thread of QEMU")
    });
    let cgroups = fs::read_to_string(format!("/proc/{}/cgroup", bystander.id())).unwrap();
    assert!(
        !cgroups.contains("burst-qemu"),
        "a foreign thread was moved: {cgroups}"
    );
    // The "QEMU" exits: its directory is reaped and its ledger saved.
    impostor.kill().unwrap();
    impostor.wait().unwrap();
    wait_until("reaped", Duration::from_secs(5), || {
        !s.state().join("foreign").exists()
    });
    assert!(s.data().join("ledgers/foreign.json").exists());
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    signal(agent.id(), Signal::SIGTERM);
    agent.wait().unwrap();
}

/// `(utime + stime)` of a process, in clock ticks, and its resident memory in KiB.
fn cpu_and_rss(pid: u32) -> (u64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let cpu = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

#[test]
fn fifty_vms_started_and_stopped_from_shell_loops_are_all_registered_enforced_and_cleaned() {
    if !ready() {
        return;
    }
    let s = Scratch::new();
    const N: usize = 50;
    let qemu = s.qemu_args(Halt).join(" ");
    let bin = bin_arg();
    let state = s.state();
    let vms = s.vms();
    let launch_loop = format!(
        "for i in $(seq 1 {N}); do {bin} --state-dir {st} --vms {vm} --name vm$i --vcpus 1 --baseline 5 --shutdown-timeout 1 -- {qemu} >/dev/null 2>&1 & done; wait",
        st = state.display(),
        vm = vms.display()
    );
    let t = Instant::now();
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(&launch_loop)
        .env("BURST_QEMU_DATA_DIR", s.data())
        .spawn()
        .unwrap();
    wait_until("all registered", Duration::from_secs(120), || {
        burst_qemu::state::running(&state).len() == N
    });
    let registered = t.elapsed();
    wait_until("all enforced", Duration::from_secs(30), || {
        (1..=N).all(|i| {
            state.join(format!("vm{i}/credits.json")).exists()
                && vcpu_cgroup(&s, &format!("vm{i}")).exists()
        })
    });
    eprintln!(
        "{N} VMs registered in {registered:?}, all enforced after {:?}",
        t.elapsed()
    );
    let agent = agent_pid(&s) as u32;
    let (c0, _) = cpu_and_rss(agent);
    let w = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (c1, rss) = cpu_and_rss(agent);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let pct = (c1 - c0) as f64 / hz / w.elapsed().as_secs_f64() * 100.0;
    eprintln!("agent with {N} VMs: {pct:.2} % of one core, {rss} KiB resident");

    let stop_loop = format!(
        "for i in $(seq 1 {N}); do {bin} --state-dir {st} stop vm$i & done; wait",
        st = state.display()
    );
    let t = Instant::now();
    let stopped = Command::new("sh")
        .arg("-c")
        .arg(&stop_loop)
        .env("BURST_QEMU_DATA_DIR", s.data())
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(shell.wait().unwrap().success());
    eprintln!("{N} VMs stopped in {:?}", t.elapsed());
    assert!(burst_qemu::state::running(&state).is_empty());
    for i in 1..=N {
        assert_cleaned(&s, &format!("vm{i}"));
    }
}
