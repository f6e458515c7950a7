//! Watching credits on real VMs: real QEMU (TCG, the project's busy firmware), the real agent
//! on real cgroups; its history read back by `plot`, its Prometheus endpoint checked by
//! promtool and parsed by the Python Prometheus client, and `top` driven in tmux like a person.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burst_qemu::testguest::Behaviour::Busy;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn ready() -> bool {
    require_qemu() && require_cgroups()
}

/// A tool the test needs: under CI its absence fails the test; elsewhere the test skips loudly.
fn require_tool(tool: &str, probe: &[&str], install: &str) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is required in CI ({install}; bash .ci/run does)");
        }
        eprintln!("\n*** SKIPPED: {tool} not usable; {install} (bash .ci/run does) ***\n");
    }
    ok
}

fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(s: &Scratch, name: &str, text: &str) {
    std::fs::create_dir_all(s.vms()).unwrap();
    std::fs::write(s.vms().join(format!("{name}.toml")), text).unwrap();
}

/// An agent serving metrics on an ephemeral port; killed (SIGTERM) when dropped.
struct Agent(Child);

impl Agent {
    fn start(s: &Scratch) -> (Self, std::net::SocketAddr) {
        let _ = std::fs::remove_file(s.state().join("metrics.addr"));
        let child = bin()
            .args(["agent", "--metrics-listen", "127.0.0.1:0", "--state-dir"])
            .arg(s.state())
            .env("BURST_QEMU_DATA_DIR", s.data())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (Agent(child), metrics_addr(s, Duration::from_secs(10)))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Waits until the agent has saved `name`'s history after `after` (it does when the VM ends).
fn wait_history_saved(s: &Scratch, name: &str, after: std::time::SystemTime) {
    let path = s.data().join("history").join(format!("{name}.bqh"));
    wait_until("history saved", Duration::from_secs(10), || {
        std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= after)
    });
}

fn plot_json(s: &Scratch, name: &str) -> Vec<Value> {
    let out = bin()
        .args(["plot", name, "--since", "1h", "--json"])
        .env("BURST_QEMU_DATA_DIR", s.data())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn history_survives_the_vm_and_plot_metrics_show_the_real_curve() {
    if !ready()
        || !require_tool("promtool", &["--version"], "apt-get install prometheus")
        || !require_tool(
            "python3",
            &["-c", "import prometheus_client"],
            "pip install prometheus-client",
        )
    {
        return;
    }
    let s = Scratch::new();
    let (agent, addr) = Agent::start(&s);
    // 0.25 credits = 15 vCPU-s: about 16 s at full speed, spending 0.9 vCPU-s/s (longer than
    // the first 10-second sample, however the VM's start falls against the sample
    // boundaries), then a 3-second decline. One vCPU: this runs alone among the CPU-share
    // tests, and a second busy vCPU cost the guest phase beside it about 20 CPU-seconds (the
    // test took 40 with two vCPUs and 0.5 credits, until 2026-12-07, 20 now) and checked
    // nothing more.
    write_config(
        &s,
        "obs",
        "vcpus = 1\nbaseline = 10\ninitial_credits = 0.25\ndecline_minutes = 0.05\n",
    );
    let mut vm = Launched::start(&s, "obs", &[], &s.qemu_args(Busy));
    let credits = s.state().join("obs").join("credits.json");
    let balance_now = || {
        std::fs::read(&credits)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["balance"].as_f64())
    };
    wait_until("the guest spending", Duration::from_secs(30), || {
        balance_now().is_some_and(|b| b < 0.099)
    });

    // Metrics, while it runs: valid for promtool, parsed by the reference client.
    let text = burst_qemu::metrics::scrape(addr).unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let parsed = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, json\n\
             from prometheus_client.parser import text_string_to_metric_families\n\
             out = {}\n\
             for f in text_string_to_metric_families(sys.stdin.read()):\n\
             \x20   for s in f.samples:\n\
             \x20       out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value\n\
             print(json.dumps(out))",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    parsed
        .stdin
        .as_ref()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let parsed = parsed.wait_with_output().unwrap();
    assert!(parsed.status.success());
    let m: Value = serde_json::from_slice(&parsed.stdout).unwrap();
    let vm_label = "{\"vm\": \"obs\"}";
    let balance = m[format!("burst_qemu_cpu_credit_balance{vm_label}")]
        .as_f64()
        .unwrap();
    let util = m[format!("burst_qemu_cpu_utilization_ratio{vm_label}")]
        .as_f64()
        .unwrap();
    let used = m[format!("burst_qemu_cpu_credit_usage_total{vm_label}")]
        .as_f64()
        .unwrap();
    let grant = m[format!("burst_qemu_cpu_grant_ratio{vm_label}")]
        .as_f64()
        .unwrap();
    eprintln!(
        "while spending: balance {balance}, utilization {util}, grant {grant}, used {used} credits"
    );
    assert!(balance > 0.0 && balance < 0.25, "balance {balance}");
    assert!((0.0..=1.0).contains(&util), "utilization {util}");
    assert_eq!(grant, 1.0, "granted all vCPUs while credits last");
    // The utilisation gauge is the VM's usage over the agent's last usage window (at least one
    // 200 ms tick), which one scrape cannot check (a loaded machine may starve the guest for a
    // tick): the mean of 40 scrapes over 2 s against the vCPU thread's own share of its vCPU.
    // The gauge lags the threads: it is published at the end of a window of 200–400 ms, so its
    // mean over the scrapes is the threads' share over the same 2 s shifted back by 0.1–0.5 s.
    // So the threads are sampled from 0.6 s before the scrapes on, and the gauge's mean must
    // lie within the range of the threads' shares over the 2 s shifted back by 0 to 0.6 s,
    // widened by 0.03 for the 50 ms grid of the samples against the agent's ticks (in six runs
    // here, quiet and beside a busy loop, the mean lay inside the range five times and 0.001
    // below it once). This test runs with the CPU-share tests, alone (.config/nextest.toml):
    // beside CI's memory guests the guest's share swung by half a CPU within a second, and the
    // unshifted check failed twice (0.959 against 0.807, 0.643 against 0.756), the shifted one
    // once (0.864 against 0.804–0.831; most likely the agent itself was starved for more than
    // 0.6 s, which was not shown).
    let gauge = || -> f64 {
        burst_qemu::metrics::scrape(addr)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("burst_qemu_cpu_utilization_ratio{vm=\"obs\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let threads = || vm.vcpu_cpu_ns();
    let origin = Instant::now();
    let step = Duration::from_millis(50);
    // (time since origin, the threads' CPU time) every 50 ms, from 0.6 s before the scrapes.
    let mut cpu: Vec<(Duration, u64)> = Vec::new();
    let mut seen = Vec::new();
    let scrapes_from = Duration::from_millis(600);
    let scrapes_to = scrapes_from + Duration::from_secs(2);
    while origin.elapsed() < scrapes_to {
        cpu.push((origin.elapsed(), threads()));
        if origin.elapsed() >= scrapes_from {
            seen.push(gauge());
        }
        std::thread::sleep(step);
    }
    cpu.push((origin.elapsed(), threads()));
    let mean = seen.iter().sum::<f64>() / seen.len() as f64;
    // The thread's share of its vCPU between the samples nearest `from` and `to`.
    let share = |from: Duration, to: Duration| -> f64 {
        let near = |t: Duration| {
            *cpu.iter()
                .min_by_key(|(at, _)| at.abs_diff(t))
                .expect("samples")
        };
        let ((a, ca), (b, cb)) = (near(from), near(to));
        (cb - ca) as f64 / (b - a).as_nanos() as f64
    };
    let shifted: Vec<f64> = (0..=6)
        .map(|k| {
            let back = Duration::from_millis(100 * k);
            share(scrapes_from - back, scrapes_to - back)
        })
        .collect();
    let low = shifted.iter().copied().fold(f64::INFINITY, f64::min);
    let high = shifted.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    eprintln!(
        "utilisation gauge: mean {mean:.3} of {} scrapes over 2 s; the threads measured {:.3} \
         over the same 2 s, {low:.3}–{high:.3} over it shifted back by up to 0.6 s",
        seen.len(),
        shifted[0]
    );
    assert!(
        seen.len() >= 20,
        "only {} scrapes in 2 s: the metrics endpoint is too slow to check",
        seen.len()
    );
    assert!(
        mean >= low - 0.03 && mean <= high + 0.03,
        "utilisation gauge {mean:.3} (mean over 2 s) outside the threads' {low:.3}–{high:.3}"
    );
    assert!(used > 0.0, "used {used}");
    assert_eq!(m[format!("burst_qemu_baseline_ratio{vm_label}")], 0.1);
    assert!(
        m["burst_qemu_agent_tick_duration_seconds_count{}"]
            .as_f64()
            .unwrap()
            >= 5.0
    );
    // `burst-qemu metrics` prints the serving agent's text.
    let once = s.cli(&["metrics"]);
    assert!(once.status.success());
    assert!(
        String::from_utf8_lossy(&once.stdout).contains("burst_qemu_cpu_credit_balance{vm=\"obs\"}")
    );

    // Let it spend its credits and decline, then stop it: the history is saved on the way out.
    wait_until("credits spent", Duration::from_secs(90), || {
        // Held at its baseline, a VM starved by a loaded host earns a little: "spent" is < 0.01.
        balance_now().is_some_and(|b| b < 0.01)
    });
    // At least three closed 10-second buckets in all.
    std::thread::sleep(Duration::from_secs(12));
    let stopped = std::time::SystemTime::now();
    assert!(s.cli(&["stop", "obs"]).status.success());
    vm.wait(Duration::from_secs(30));
    wait_history_saved(&s, "obs", stopped);
    let rows = plot_json(&s, "obs");
    eprintln!("history after 25 s: {rows:?}");
    assert!(rows.len() >= 3, "10-second samples of 25 s: {}", rows.len());
    let first = &rows[0];
    let last = rows.last().unwrap();
    assert!(rows.iter().all(|r| r["period_s"] == 10));
    assert!(first["balance"].as_f64().unwrap() > 0.0);
    assert!(last["balance"].as_f64().unwrap() < 0.01, "{last}");
    assert_eq!(first["grant_pct"].as_f64(), Some(100.0), "{first}");
    // The first sample may hold only the VM's first instants (its start can fall just before a
    // 10-second boundary, before the guest ran): the burst shows in a sample with credits.
    let burst = rows
        .iter()
        .filter(|r| r["balance"].as_f64().unwrap() > 0.0)
        .map(|r| r["usage_pct"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        burst > 10.0,
        "no sample with credits shows the burst: {rows:?}"
    );
    assert!(
        // Within a few thousandths of a credit of 0; a starved VM earns a little, and the
        // decline law grants baseline + √(2·B·k) for what it earned.
        last["grant_pct"].as_f64().unwrap() < 25.0,
        "held to the baseline at the end: {last}"
    );
    assert_eq!(last["baseline_pct"].as_f64(), Some(10.0));

    // A stopped VM's history stays readable and plots; a restart under the same name (and a
    // new agent) continues it.
    let svg = s.path().join("obs.svg");
    let out = bin()
        .args(["plot", "obs", "--since", "1h", "-o"])
        .arg(&svg)
        .env("BURST_QEMU_DATA_DIR", s.data())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg_text.contains("<svg") && svg_text.contains("balance") && svg_text.contains("usage")
    );
    drop(agent);
    // Without an agent, `metrics` renders the stopped VM from its ledger.
    let offline = s.cli(&["metrics"]);
    assert!(offline.status.success());
    let offline = String::from_utf8_lossy(&offline.stdout);
    assert!(
        offline.contains("burst_qemu_vm_running{vm=\"obs\"} 0\n"),
        "{offline}"
    );
    let offline_balance: f64 = offline
        .lines()
        .find_map(|l| l.strip_prefix("burst_qemu_cpu_credit_balance{vm=\"obs\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(offline_balance < 0.01, "{offline}");
    let (_agent, _) = Agent::start(&s);
    let mut again = Launched::start(&s, "obs", &[], &s.qemu_args(Busy));
    // At least three closed 10-second buckets in all.
    std::thread::sleep(Duration::from_secs(12));
    let stopped = std::time::SystemTime::now();
    assert!(s.cli(&["stop", "obs"]).status.success());
    again.wait(Duration::from_secs(30));
    wait_history_saved(&s, "obs", stopped);
    let more = plot_json(&s, "obs");
    assert!(
        more.len() > rows.len(),
        "{} then {}",
        rows.len(),
        more.len()
    );
    assert_eq!(more[0]["t"], rows[0]["t"], "the old samples are kept");
}

fn tmux(args: &[&str]) -> std::process::Output {
    Command::new("tmux").args(args).output().unwrap()
}

fn screen(session: &str) -> String {
    String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", session]).stdout).into_owned()
}

fn wait_screen(session: &str, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let s = screen(session);
        if cond(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what}: not on screen within 15 s:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the tmux session when dropped.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = tmux(&["kill-session", "-t", &self.0]);
    }
}

#[test]
fn top_in_tmux_shows_the_fleet_sorts_selects_and_quits_cleanly() {
    if !ready() || !require_tool("tmux", &["-V"], "apt-get install tmux") {
        return;
    }
    let s = Scratch::new();
    let (_agent, _) = Agent::start(&s);
    write_config(
        &s,
        "rich",
        "vcpus = 1\nbaseline = 20\ninitial_credits = 30\n",
    );
    write_config(
        &s,
        "poor",
        "vcpus = 1\nbaseline = 10\ninitial_credits = 0\n",
    );
    let _rich = Launched::start(&s, "rich", &[], &s.qemu_args(Busy));
    let _poor = Launched::start(&s, "poor", &[], &s.qemu_args(Busy));
    std::thread::sleep(Duration::from_secs(2));

    let session = Session(format!("bqtop{}", std::process::id()));
    // The pane's shell records top's exit status in a file: tmux 3.3 sometimes marks a pane
    // dead without its status (seen 2 times in 11 here), so `#{pane_dead_status}` cannot be
    // relied on. Signals go to top itself, the shell's child.
    let status = s.path().join("top.status");
    // After top, the shell also records the terminal's modes: restored, they are cooked again
    // (`icanon`, `echo`), not raw (`-icanon -echo`).
    let modes = s.path().join("top.stty");
    let cmd = format!(
        "env BURST_QEMU_DATA_DIR={} {} top --state-dir {}; echo $? > {}; stty -a > {}",
        s.data().display(),
        bin_path().display(),
        s.state().display(),
        status.display(),
        modes.display()
    );
    let restored = |how: &str| {
        let t = Instant::now();
        let stty = loop {
            let text = std::fs::read_to_string(&modes).unwrap_or_default();
            if text.contains("icanon") {
                break text;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{how}: no stty output"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let words: Vec<&str> = stty.split_whitespace().collect();
        assert!(
            words.contains(&"icanon") && words.contains(&"echo"),
            "{how}: the terminal is left raw: {stty}"
        );
        let alternate = String::from_utf8_lossy(
            &tmux(&["display-message", "-p", "-t", &session.0, "#{alternate_on}"]).stdout,
        )
        .trim()
        .to_owned();
        assert_eq!(alternate, "0", "{how}: the alternate screen is still on");
        let _ = std::fs::remove_file(&modes);
    };
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "150",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(started.status.success(), "{started:?}");
    tmux(&["set-option", "-t", &session.0, "remain-on-exit", "on"]);
    let shown = wait_screen(&session.0, "both VMs", |s| {
        s.contains("burst-qemu top: 2 VMs") && s.contains("rich") && s.contains("poor")
    });
    eprintln!("{shown}");
    // Sorted by name: poor first, selected, in the detail pane; it runs at its baseline.
    let poor_row = shown
        .lines()
        .find(|l| l.contains("poor") && l.contains("running"))
        .unwrap();
    assert!(
        poor_row.contains("standard") && poor_row.contains(" 0.00"),
        "{poor_row}"
    );
    assert!(shown.contains("poor: balance, last hour"));
    let rich_row = shown
        .lines()
        .find(|l| l.contains("rich") && l.contains("running"))
        .unwrap();
    assert!(
        rich_row.contains("100.0%"),
        "rich is granted full speed: {rich_row}"
    );
    assert!(rich_row.contains('█'), "usage bar: {rich_row}");

    // Sort by balance: rich first, the selection stays on poor; up selects rich.
    tmux(&["send-keys", "-t", &session.0, "b"]);
    let by_balance = wait_screen(&session.0, "sort by balance", |s| {
        s.contains("sort: balance")
    });
    let order: Vec<&str> = by_balance
        .lines()
        .filter(|l| l.contains("running"))
        .map(|l| if l.contains("rich") { "rich" } else { "poor" })
        .collect();
    assert_eq!(order[..2], ["rich", "poor"], "{by_balance}");
    assert!(
        by_balance.contains("poor: balance, last hour"),
        "{by_balance}"
    );
    tmux(&["send-keys", "-t", &session.0, "Up"]);
    let rich = wait_screen(&session.0, "rich selected", |s| {
        s.contains("rich: balance, last hour")
    });
    assert!(rich.contains("rich (running, standard)"), "{rich}");

    // q quits and the terminal is restored (the alternate screen is gone).
    tmux(&["send-keys", "-t", &session.0, "q"]);
    wait_screen(&session.0, "top exited", |s| !s.contains("burst-qemu top:"));
    assert_eq!(exit_status(&status), "0");
    restored("q");

    // Esc and Ctrl-C quit the same way (raw mode: Ctrl-C is a key, not a SIGINT).
    for (key, how) in [("Escape", "Esc"), ("C-c", "Ctrl-C")] {
        let _ = std::fs::remove_file(&status);
        tmux(&["respawn-pane", "-k", "-t", &session.0, &cmd]);
        wait_screen(&session.0, how, |s| s.contains("burst-qemu top: 2 VMs"));
        // The first frame is drawn once raw mode is on: keys go to top from here.
        tmux(&["send-keys", "-t", &session.0, key]);
        wait_screen(&session.0, &format!("top exited on {how}"), |s| {
            !s.contains("burst-qemu top:")
        });
        assert_eq!(exit_status(&status), "0", "{how}");
        restored(how);
    }

    // A panic: the hook restores the terminal before the message, which stays readable, and
    // the exit status is Rust's for a panic.
    let _ = std::fs::remove_file(&status);
    let panicking = format!("env BURST_QEMU_TOP_TEST_PANIC=1 {cmd}");
    tmux(&["respawn-pane", "-k", "-t", &session.0, &panicking]);
    let after = wait_screen(&session.0, "top's panic message", |s| {
        s.contains("BURST_QEMU_TOP_TEST_PANIC: a panic in top")
    });
    assert_eq!(exit_status(&status), "101", "{after}");
    assert!(after.contains("panicked at"), "{after}");
    restored("a panic");

    // SIGTERM: also a clean exit with the terminal restored.
    let _ = std::fs::remove_file(&status);
    tmux(&["respawn-pane", "-k", "-t", &session.0, &cmd]);
    wait_screen(&session.0, "top again", |s| {
        s.contains("burst-qemu top: 2 VMs")
    });
    let pid = pane_pid(&session.0);
    // The screen may still show the previous run's text: wait until this `top` has its
    // SIGTERM handler (SigCgt in /proc), or the signal would find the default action.
    let catches_term = || {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
        })
    };
    let t = std::time::Instant::now();
    while !catches_term() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "top never caught SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_screen(&session.0, "top exited on SIGTERM", |s| {
        !s.contains("burst-qemu top:")
    });
    assert_eq!(exit_status(&status), "0");

    // The terminal hangs up (the tmux session is killed): top ends rather than spin on it.
    let _ = std::fs::remove_file(&status);
    tmux(&["respawn-pane", "-k", "-t", &session.0, &cmd]);
    wait_screen(&session.0, "top once more", |s| {
        s.contains("burst-qemu top: 2 VMs")
    });
    let pid = pane_pid(&session.0);
    tmux(&["kill-session", "-t", &session.0]);
    wait_until("top gone after hang-up", Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// The exit status the pane's shell recorded for top (waits up to 5 s for it).
fn exit_status(path: &std::path::Path) -> String {
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_owned();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no exit status in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of `top`: the child of the pane's shell (waits up to 5 s for it).
fn pane_pid(session: &str) -> i32 {
    let shell: i32 = String::from_utf8_lossy(
        &tmux(&["display-message", "-p", "-t", session, "#{pane_pid}"]).stdout,
    )
    .trim()
    .parse()
    .unwrap();
    let t = Instant::now();
    loop {
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no top under the pane's shell {shell}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
