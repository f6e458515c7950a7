//! `agent`'s flags against the enforcer chosen: what each enforcer honours of `--contention`,
//! and the refusal a user sees for the rest.

use std::ffi::OsString;

use super::*;

/// The agent's options from a config file `text` and flags `extra`, resolved as at startup.
fn resolved(text: &str, extra: &[&str]) -> (tempfile::TempDir, Resolved) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let mut argv = vec!["burst-qemu", "agent", "--config", path.to_str().unwrap()];
    argv.extend(extra);
    let layers = Layers::new(argv.into_iter().map(OsString::from).collect()).unwrap();
    let r = layers.resolve(layers.read().unwrap().as_ref()).unwrap();
    (dir, r)
}

#[test]
fn the_cgroup_enforcer_runs_every_rule_in_the_contention_stage() {
    for rule in ["headroom", "baseline", "rescoin"] {
        // From the flag and from the file alike.
        let text = format!("contention = \"{rule}\"\ncapacity = 1.5\n");
        for (text, flags) in [
            ("", &["--contention", rule, "--capacity", "1.5"][..]),
            (text.as_str(), &[][..]),
        ] {
            let (_dir, r) = resolved(text, flags);
            assert!(refuse_contradictions(EnforcerKind::Cgroup, &r.args).is_ok());
            let s = settings(&r.global, &r.args, EnforcerKind::Cgroup).unwrap();
            assert_eq!(s.contention, Some(Rate(1_500_000)), "{rule}");
            assert_eq!(s.spare_rule.name(), rule);
        }
    }
    let (_dir, r) = resolved("contention = \"off\"\n", &[]);
    let s = settings(&r.global, &r.args, EnforcerKind::Cgroup).unwrap();
    assert_eq!(s.contention, None);
    let (_dir, r) = resolved("", &[]);
    assert_eq!(r.args.contention, ContentionRule::Headroom, "the default");
}

/// The refusal a user sees when `flags` ask `kind` for what only the cgroup enforcer applies.
fn refusal(kind: EnforcerKind, flags: &[&str]) -> Option<String> {
    let (_dir, r) = resolved("", flags);
    refuse_contradictions(kind, &r.args)
        .err()
        .map(|f| format!("{:#}", f.error))
}

#[test]
fn scx_and_ghost_honour_the_history_free_rules_and_refuse_the_others_naming_option_and_enforcer() {
    for (kind, enforcer, what) in [
        (EnforcerKind::Scx, "scx", "the sched_ext scheduler"),
        (EnforcerKind::Ghost, "ghost", "the ghOSt agent"),
    ] {
        if kind == EnforcerKind::Scx && !scx::BUILT {
            continue;
        }
        for name in ["headroom", "baseline"] {
            assert_eq!(refusal(kind, &["--contention", name]), None);
            let (_dir, r) = resolved("", &["--contention", name]);
            let s = settings(&r.global, &r.args, kind).unwrap();
            assert_eq!((s.contention, s.spare_rule.name()), (None, name));
        }
        for name in ["rescoin", "off"] {
            let e = refusal(kind, &["--contention", name]).expect("refused");
            assert!(e.starts_with(&format!("--contention {name}: ")), "{e}");
            assert!(e.contains(&format!("--enforcer {enforcer}")), "{e}");
            assert!(
                e.contains(what) && e.contains("--contention headroom"),
                "{e}"
            );
        }
    }
    // At startup, from the file: the error names the file's line (ghOSt: always built).
    let (_dir, r) = resolved("\ncontention = \"rescoin\"\n", &[]);
    let f = r.blame(refuse_contradictions(EnforcerKind::Ghost, &r.args).unwrap_err());
    let text = format!("{:#}", f.error);
    assert!(
        text.contains("agent.toml:2: contention: --contention rescoin: with --enforcer ghost"),
        "{text}"
    );
    assert_eq!(
        refusal(EnforcerKind::Cgroup, &["--contention", "off"]),
        None
    );
}

/// Issue 20: `--capacity` was taken and silently not applied under scx and ghOSt, whose
/// dispatch shares out the CPUs they run the VMs on.
#[test]
fn a_capacity_is_refused_by_scx_and_ghost_which_share_out_their_own_cpus() {
    for (kind, cpus) in [
        (EnforcerKind::Scx, "--scx-cpus"),
        (EnforcerKind::Ghost, "--ghost-cpus"),
    ] {
        if kind == EnforcerKind::Scx && !scx::BUILT {
            continue;
        }
        let e = refusal(kind, &["--capacity", "1.5"]).expect("refused");
        assert!(e.starts_with("--capacity 1.5: with --enforcer "), "{e}");
        assert!(e.contains(cpus) && e.contains("--enforcer cgroup"), "{e}");
    }
    assert_eq!(refusal(EnforcerKind::Cgroup, &["--capacity", "1.5"]), None);
    // From the file, named by its line.
    let (_dir, r) = resolved("capacity = 1.5\n", &[]);
    let f = r.blame(refuse_contradictions(EnforcerKind::Ghost, &r.args).unwrap_err());
    let text = format!("{:#}", f.error);
    assert!(
        text.contains("agent.toml:1: capacity: --capacity 1.5: "),
        "{text}"
    );
}

/// Issue 20: a config whose `contention = "off"` (or a capacity, or pinning) served cgroup
/// hosts failed to start wherever `auto` picked sched_ext. `auto` now picks the enforcer that
/// applies what was asked, whatever the host offers.
#[test]
fn auto_picks_the_cgroup_enforcer_for_what_only_it_applies() {
    for flags in [
        &["--contention", "off"][..],
        &["--contention", "rescoin"][..],
        &["--capacity", "1"][..],
        &["--balance", "cpu"][..],
    ] {
        let (_dir, r) = resolved("", flags);
        assert_eq!(r.args.enforcer, EnforcerKind::Auto);
        assert_eq!(resolve_enforcer(&r.args), EnforcerKind::Cgroup, "{flags:?}");
    }
    let (_dir, r) = resolved("", &[]);
    assert!(
        cgroup_only(&r.args).is_none(),
        "the defaults suit every enforcer"
    );
}
