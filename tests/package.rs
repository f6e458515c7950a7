//! The Debian package, tested as an operator would use it (issue 23).
//!
//! contrib/deb/build packages the very burst-qemu these tests run (`common::bin_path`: the build
//! cargo compiled for them, or the release build of the same tree that `.ci/run` gives the guest
//! lanes), stripped of its debug info. A Debian 12 guest of tests/guest/run (Linux
//! 6.12, cgroup v2; its root is this machine's, read-only under a tmpfs overlay, so `dpkg`
//! writes only to the guest) then runs tests/guest/package-test: `dpkg -i`, `burst-qemu
//! check`, the agent started from the packaged unit's ExecStart line with the packaged config,
//! a VM launched from /usr/bin/burst-qemu and held to its baseline, `man burst-qemu`, bash
//! completion of `burst-qemu cr<TAB>`, a live edit of /etc/burst-qemu/agent.toml, an upgrade
//! (`dpkg -i` of a second build, revision 2) under the running VM, the agent restarted as
//! systemd would from the new binary (taking over from one the VM's launcher started meanwhile)
//! and the credits kept, then `dpkg -r`, `dpkg --purge` and nothing left running.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

/// Whether the packaging tools are here (under CI their absence fails: .ci/run installs them).
fn packaging_tools() -> bool {
    for (tool, package) in [
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("strip", "binutils"),
        ("python3", "python3"),
        ("man", "man-db"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            common::skip_or_fail(&format!("{tool} is missing (apt-get install {package})"));
            return false;
        }
    }
    if !Path::new("/usr/share/bash-completion/bash_completion").exists() {
        common::skip_or_fail("bash-completion is missing (apt-get install bash-completion)");
        return false;
    }
    true
}

#[test]
fn the_debian_package_installs_works_upgrades_and_purges_in_a_guest() {
    if !common::require_harness() || !packaging_tools() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Under target/, which the guest sees (its /tmp is its own).
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("package");
    // Two builds of one binary: revision 1 to install, revision 2 to upgrade to.
    let build = |revision: &str| {
        let built = std::time::Instant::now();
        let build = Command::new(root.join("contrib/deb/build"))
            .arg("--binary")
            .arg(common::bin_path())
            .args(["--revision", revision])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "contrib/deb/build failed:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let deb = String::from_utf8(build.stdout).unwrap().trim().to_owned();
        eprintln!("built {deb} in {:.1} s", built.elapsed().as_secs_f64());
        deb
    };
    let (first, second) = (build("1"), build("2"));
    let script = root.join("tests/guest/package-test");
    let ran = std::time::Instant::now();
    let part = common::guest::Part::new(
        "package-test",
        &["bash", script.to_str().unwrap(), &first, &second],
    );
    let ended = common::guest::run("debian-6.12", 2, 2048, &[], &[part]);
    eprintln!("guest run: {:.1} s", ran.elapsed().as_secs_f64());
    assert!(
        ended[0].status == 0 && ended[0].output.contains("PACKAGE-TEST-OK"),
        "the package test failed in the guest (exit {}):\n{}",
        ended[0].status,
        ended[0].output
    );
}
