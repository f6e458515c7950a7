//! With the `scx` feature: compiles the sched_ext scheduler (bpf/burst.bpf.c) into a BPF
//! object that src/enforce/scx.rs embeds. Needs clang 19 (`clang-19`, or `$BPF_CLANG`); the
//! default build needs nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
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
