//! Records the commit this is built from (`burst-qemu --version`), and with the `scx` feature
//! compiles the sched_ext scheduler (bpf/burst.bpf.c) into a BPF object that
//! src/enforce/scx.rs embeds. The scheduler needs clang 19 (`clang-19`, or `$BPF_CLANG`); the
//! default build needs nothing (not even git: outside a checkout the commit is "unknown").

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    commit();
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    if std::env::var_os("CARGO_FEATURE_SCX").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=bpf/burst.bpf.c");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("burst.bpf.o");
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    let status = Command::new(&clang)
        .args([
            "-target",
            "bpf",
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-c",
            "bpf/burst.bpf.c",
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile bpf/burst.bpf.c ({s})"),
        Err(e) => panic!(
            "the `scx` feature needs clang 19 to compile bpf/burst.bpf.c: running {clang}: {e} \
             (apt-get install clang-19, or set BPF_CLANG)"
        ),
    }
}

/// Sets `BURST_QEMU_COMMIT` for the crate: `$BURST_QEMU_BUILD_COMMIT` when given (a build from
/// a source tarball that knows its commit), else the checkout's `HEAD` as `<short hash>
/// <commit date>`, else `unknown` (not a git checkout of this project, or no git). Rebuilt when HEAD moves (its reflog is written on every
/// commit and checkout), not on every edit: a dirty tree is not marked.
fn commit() {
    println!("cargo:rerun-if-env-changed=BURST_QEMU_BUILD_COMMIT");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("manifest"));
    let commit = std::env::var("BURST_QEMU_BUILD_COMMIT").ok().or_else(|| {
        // Only this project's own checkout: not a repository the sources were unpacked into.
        let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
        if top.canonicalize().ok()? != manifest_dir.canonicalize().ok()? {
            return None;
        }
        for file in ["HEAD", "logs/HEAD"] {
            if let Some(path) = git(&["rev-parse", "--git-path", file]) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        git(&["log", "-1", "--format=%h %cs"])
    });
    println!(
        "cargo:rustc-env=BURST_QEMU_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
