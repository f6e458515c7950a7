//! Records the commit this is built from (`burst-qemu --version`), and with the `scx` feature
//! compiles the sched_ext scheduler (bpf/burst.bpf.c) into a BPF object that
//! src/enforce/scx.rs embeds, after checking that bpf/intf.h (the structs and constants the
//! program shares with user space) is laid out as src/enforce/scx/abi.rs mirrors it. The
//! scheduler needs clang 19 (`clang-19`, or `$BPF_CLANG`) and the check a host C compiler
//! (`cc`, or `$CC`); the default build needs nothing (not even git: outside a checkout the
//! commit is "unknown").

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
    println!("cargo:rerun-if-changed=bpf/intf.h");
    println!("cargo:rerun-if-changed=bpf/user_dispatch.h");
    println!("cargo:rerun-if-changed=bpf/order.h");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    intf_layout(&out_dir);
    let out = out_dir.join("burst.bpf.o");
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    let status = Command::new(&clang)
        .args([
            "-target",
            "bpf",
            // v3: the atomic exchange of the user-space mode's orders.
            "-mcpu=v3",
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

/// What of bpf/intf.h the Rust side mirrors (src/enforce/scx/abi.rs): the name of the constant
/// build.rs writes, and the C expression it measures.
const LAYOUT: &[(&str, &str)] = &[
    ("MAX_VMS", "MAX_VMS"),
    ("MAX_CPUS", "MAX_CPUS"),
    ("NO_VM", "NO_VM"),
    ("CONF_SIZE", "sizeof(struct conf)"),
    ("BUDGET_SIZE", "sizeof(struct budget)"),
    ("USAGE_SIZE", "sizeof(struct usage)"),
    ("EVENT_SIZE", "sizeof(struct event)"),
    ("ORDER_SIZE", "sizeof(struct order)"),
    ("LATENCY_SIZE", "sizeof(struct latency)"),
    ("PLAN_SIZE", "sizeof(struct plan)"),
    ("LAT_BUCKETS", "LAT_BUCKETS"),
    ("EV_WAKE", "EV_WAKE"),
    ("EV_RUNNING", "EV_RUNNING"),
    ("EV_STOP", "EV_STOP"),
    ("EV_BLOCK", "EV_BLOCK"),
    ("EV_FAILED", "EV_FAILED"),
    ("EV_PAUSE", "EV_PAUSE"),
    ("ORDER_RUN", "ORDER_RUN"),
    ("ORDER_EXTEND", "ORDER_EXTEND"),
    ("ORDER_PREEMPT", "ORDER_PREEMPT"),
    ("ORDER_HARD", "ORDER_HARD"),
    ("ORDER_DEFER", "ORDER_DEFER"),
    ("ENQ_TAKEN", "ENQ_TAKEN"),
    ("ENQ_FLAGS", "ENQ_FLAGS"),
];

/// The mirrored fields, as (struct, field): build.rs writes `STRUCT_FIELD` (its offset) and
/// `STRUCT_FIELD_SIZE` for each.
const FIELDS: &[(&str, &str)] = &[
    ("conf", "period_ns"),
    ("conf", "slice_ns"),
    ("conf", "nr_cpus"),
    ("conf", "user_dispatch"),
    ("event", "at"),
    ("event", "tid"),
    ("event", "cpu"),
    ("event", "kind"),
    ("order", "until"),
    ("order", "op"),
    ("order", "cpu"),
    ("order", "tid"),
    ("order", "replaced"),
    ("order", "from"),
    ("latency", "waits"),
    ("latency", "sum_ns"),
    ("latency", "max_ns"),
    ("latency", "runs"),
    ("latency", "hist"),
    ("budget", "base_ns"),
    ("budget", "grant_ns"),
    ("budget", "weight"),
    ("usage", "used_ns"),
    ("usage", "total_ns"),
    ("usage", "held"),
    ("plan", "next"),
    ("plan", "cur"),
    ("plan", "cur_until"),
];

/// Measures [`LAYOUT`] and [`FIELDS`] of bpf/intf.h: compiles a program that prints each value with the
/// host's C compiler (`$CC`, else `cc`) and runs it, checks with the BPF clang that the BPF
/// target lays the header out the same (`_Static_assert`s of the measured values), and writes
/// them as Rust constants to `$OUT_DIR/intf_layout.rs`, which abi.rs asserts its `repr(C)`
/// types against.
fn intf_layout(out_dir: &std::path::Path) {
    let run = |what: &str, cmd: &mut Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("checking bpf/intf.h: running {what}: {e}"));
        assert!(
            out.status.success(),
            "checking bpf/intf.h: {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    };
    let include = std::fs::canonicalize("bpf").expect("bpf/ beside build.rs");
    let mut program = String::from("#include <stdio.h>\n#include \"intf.h\"\nint main(void)\n{\n");
    let mut layout: Vec<(String, String)> = LAYOUT
        .iter()
        .map(|(n, e)| (n.to_string(), e.to_string()))
        .collect();
    for (s, f) in FIELDS {
        let name = format!("{}_{}", s.to_uppercase(), f.to_uppercase());
        let offset = format!("__builtin_offsetof(struct {s}, {f})");
        let size = format!("sizeof(((struct {s} *)0)->{f})");
        layout.push((format!("{name}_SIZE"), size));
        layout.push((name, offset));
    }
    for (name, expr) in &layout {
        program += &format!("\tprintf(\"{name} %llu\\n\", (unsigned long long)({expr}));\n");
    }
    program += "\treturn 0;\n}\n";
    let source = out_dir.join("intf_layout.c");
    let binary = out_dir.join("intf_layout");
    std::fs::write(&source, program).expect("writing intf_layout.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    println!("cargo:rerun-if-env-changed=CC");
    run(
        &cc,
        Command::new(&cc)
            .arg("-I")
            .arg(&include)
            .arg(&source)
            .arg("-o")
            .arg(&binary),
    );
    let printed = run("intf_layout", &mut Command::new(&binary));
    let mut rust = String::from("// Measured by build.rs from bpf/intf.h.\n");
    let mut asserts = String::from("#include \"intf.h\"\n");
    for line in printed.lines() {
        let (name, value) = line.split_once(' ').expect("NAME VALUE");
        let expr = &layout
            .iter()
            .find(|(n, _)| n == name)
            .expect("a measured name")
            .1;
        rust += &format!("pub const {name}: u64 = {value};\n");
        asserts += &format!("_Static_assert(({expr}) == {value}ULL, \"{name}\");\n");
    }
    assert_eq!(
        rust.lines().count(),
        layout.len() + 1,
        "intf_layout printed {printed:?}"
    );
    std::fs::write(out_dir.join("intf_layout.rs"), rust).expect("writing intf_layout.rs");
    let check = out_dir.join("intf_check.c");
    std::fs::write(&check, asserts).expect("writing intf_check.c");
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang-19".into());
    run(
        &format!("{clang} -target bpf"),
        Command::new(&clang)
            .args(["-target", "bpf", "-fsyntax-only", "-I"])
            .arg(&include)
            .arg(&check),
    );
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
