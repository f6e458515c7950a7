//! `agent`'s flags: the contention stage's spare rule from the flag and the file.

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
