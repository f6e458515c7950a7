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

#[test]
fn scx_and_ghost_honour_headroom_and_refuse_every_other_rule_naming_option_and_enforcer() {
    for (kind, enforcer, what) in [
        (EnforcerKind::Scx, "scx", "the sched_ext scheduler"),
        (EnforcerKind::Ghost, "ghost", "the ghOSt agent"),
    ] {
        assert!(contention_refusal(kind, ContentionRule::Headroom).is_none());
        for (rule, name) in [
            (ContentionRule::Rescoin, "rescoin"),
            (ContentionRule::Baseline, "baseline"),
            (ContentionRule::Off, "off"),
        ] {
            let e = contention_refusal(kind, rule).expect("refused");
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
    assert!(contention_refusal(EnforcerKind::Cgroup, ContentionRule::Off).is_none());
}
