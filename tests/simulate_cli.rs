//! `burst-qemu simulate` as an operator runs it: the real binary, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burst-qemu"))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/traces")
        .join(name)
}

fn simulate(args: &[&str]) -> Output {
    bin()
        .arg("simulate")
        .args(args)
        .output()
        .expect("run burst-qemu")
}

fn trace(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("trace.csv");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The value of `column` in every CSV row.
fn column(csv: &str, column: &str) -> Vec<f64> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == column).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn replays_the_aws_t3_nano_walkthrough() {
    let t = example("t3-nano-standard.csv");
    let out = simulate(&[
        "--vcpus",
        "2",
        "--baseline",
        "5",
        "--initial-credits",
        "0",
        t.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("minute,demand_pct,granted_pct,balance,surplus,charged\n"));
    assert_eq!(
        column(&csv, "balance"),
        [144.0, 144.0, 86.4, 122.4, 0.0, 0.0, 144.0]
    );
    assert_eq!(
        column(&csv, "minute"),
        [1440.0, 2160.0, 3600.0, 4320.0, 4440.0, 5280.0, 6720.0]
    );
}

#[test]
fn unlimited_mode_reports_surplus_and_charged() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(&dir, "300,100\n1440,0\n");
    let out = simulate(&[
        "--vcpus",
        "2",
        "--baseline",
        "5",
        "--mode",
        "unlimited",
        "--initial-credits",
        "122.4",
        &t,
    ]);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(column(&csv, "surplus"), [144.0, 0.0]);
    assert_eq!(column(&csv, "charged"), [303.6, 303.6]);
    assert_eq!(column(&csv, "granted_pct"), [100.0, 100.0]);
}

#[test]
fn defaults_are_a_real_vms_thirty_launch_credits_per_vcpu() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(&dir, "0.5,0\n");
    let out = simulate(&["--vcpus", "3", "--baseline", "10", &t]);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(column(&csv, "balance"), [90.15]); // 90 launch + 30 s × 0.3 vCPU = 0.15 earned
}

#[test]
fn every_adds_periodic_rows_without_duplicating_line_ends() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(&dir, "10,50\n5,0\n");
    let out = simulate(&["--vcpus", "1", "--baseline", "20", "--every", "5", &t]);
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(column(&csv, "minute"), [5.0, 10.0, 15.0]);
    assert_eq!(column(&csv, "demand_pct"), [50.0, 50.0, 0.0]);
}

#[test]
fn json_has_the_csv_keys() {
    let t = example("burst-then-idle.csv");
    let out = simulate(&[
        "--vcpus",
        "2",
        "--baseline",
        "10",
        "--json",
        t.to_str().unwrap(),
    ]);
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    let keys: Vec<&str> = rows[0].keys().map(String::as_str).collect();
    for key in [
        "minute",
        "demand_pct",
        "granted_pct",
        "balance",
        "surplus",
        "charged",
    ] {
        assert!(keys.contains(&key), "missing {key}");
    }
    assert_eq!(rows[1]["granted_pct"], serde_json::json!(10.0));
}

#[test]
fn plot_writes_an_svg_credit_curve_with_labelled_axes() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("curve.svg");
    let t = example("burst-then-idle.csv");
    let out = simulate(&[
        "--vcpus",
        "2",
        "--baseline",
        "10",
        "--plot",
        svg.to_str().unwrap(),
        t.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    for label in [
        "time (hours)",
        "credits (vCPU-minutes)",
        "CPU (% of all vCPUs)",
        "balance",
        "granted",
        "demand",
    ] {
        assert!(text.contains(label), "plot lacks {label:?}");
    }
    assert!(
        text.matches("<polyline").count() >= 4,
        "expected four curves"
    );
}

/// Bad input: exit status 2, one line on stderr naming what is wrong, nothing on stdout.
fn assert_rejected(out: Output, mentions: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "printed output that looks complete: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for m in mentions {
        assert!(stderr.contains(m), "{stderr:?} does not mention {m:?}");
    }
}

#[test]
fn bad_trace_lines_name_their_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for (text, mentions) in [
        ("10,5\n20,abc\n", &[":2:", "percent"][..]),
        ("10,5\n\n-4,5\n", &[":3:", "minutes", "-4"]),
        ("# c\n10,150\n", &[":2:", "percent", "150"]),
        ("10\n", &[":1:", "minutes,percent"]),
        ("# only comments\n", &["no `minutes,percent` lines"]),
    ] {
        let t = trace(&dir, text);
        let out = simulate(&["--vcpus", "2", "--baseline", "5", &t]);
        assert_rejected(out, mentions);
        assert_eq!(
            String::from_utf8_lossy(&simulate(&["--vcpus", "2", "--baseline", "5", &t]).stderr)
                .lines()
                .count(),
            1
        );
    }
}

#[test]
fn bad_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(&dir, "10,5\n");
    assert_rejected(
        simulate(&["--vcpus", "2", "--baseline", "0", &t]),
        &["--baseline", "(0, 100]"],
    );
    assert_rejected(
        simulate(&["--vcpus", "2", "--baseline", "100.5", &t]),
        &["--baseline"],
    );
    assert_rejected(
        simulate(&["--vcpus", "0", "--baseline", "5", &t]),
        &["--vcpus"],
    );
    assert_rejected(
        simulate(&[
            "--vcpus",
            "2",
            "--baseline",
            "5",
            "--decline-minutes",
            "0",
            &t,
        ]),
        &["--decline-minutes"],
    );
    assert_rejected(
        simulate(&[
            "--vcpus",
            "2",
            "--baseline",
            "5",
            "--initial-credits",
            "-3",
            &t,
        ]),
        &["--initial-credits"],
    );
    assert_rejected(
        simulate(&["--vcpus", "2", "--baseline", "5", "--every", "-1", &t]),
        &["--every"],
    );
    assert_rejected(
        simulate(&["--vcpus", "2", "--baseline", "5", "--mode", "turbo", &t]),
        &["--mode", "turbo"],
    );
    assert_rejected(
        simulate(&["--vcpus", "2", "--baseline", "5", "/no/such/trace.csv"]),
        &["/no/such/trace.csv"],
    );
}

#[test]
fn unwritable_plot_path_fails_before_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(&dir, "10,5\n");
    let out = simulate(&[
        "--vcpus",
        "2",
        "--baseline",
        "5",
        "--plot",
        "/no/such/dir/p.svg",
        &t,
    ]);
    assert_rejected(out, &["--plot", "/no/such/dir/p.svg"]);
}

/// The ghOSt line of `burst-qemu check` with ghostfs at `root`.
fn ghost_check_line(root: &Path) -> String {
    let out = bin()
        .arg("check")
        .env("BURST_QEMU_GHOST_ROOT", root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("ghOSt"))
        .unwrap()
        .to_owned()
}

#[test]
fn check_reports_the_ghost_abi_versions_a_kernel_offers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("version"), "90\n91\n").unwrap();
    let line = ghost_check_line(dir.path());
    assert!(
        line.starts_with("ok") && line.contains("ABI versions 90, 91"),
        "{line}"
    );
    std::fs::write(dir.path().join("version"), "84\n").unwrap();
    let line = ghost_check_line(dir.path());
    assert!(
        line.starts_with("--") && line.contains("offers ABI versions 84, not 91"),
        "{line}"
    );
    let line = ghost_check_line(&dir.path().join("none"));
    assert!(line.contains("ghOSt is not present"), "{line}");
}
