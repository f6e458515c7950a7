//! The agent's config file: its keys come from clap, the example documents them all, values
//! go through the options' own parsers, precedence and reload holding.

use super::*;

fn argv(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/agent.toml")).unwrap()
}

/// The example's keys (`#key = value` lines) with the tag on the line above (`# live`,
/// `# restart`).
fn example_keys(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let key = l.strip_prefix('#')?.split(" = ").next()?;
            let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            is_key.then(|| {
                (
                    key.to_owned(),
                    lines[i - 1].trim_start_matches("# ").to_owned(),
                )
            })
        })
        .collect()
}

#[test]
fn the_example_documents_every_key_once_with_its_reload_class() {
    let documented = example_keys(&example());
    let mut names: Vec<String> = documented.iter().map(|(k, _)| k.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        key_names(),
        "contrib/agent.toml must show every key once"
    );
    for (key, tag) in &documented {
        let want = if LIVE.contains(&key.as_str()) {
            "live"
        } else {
            "restart"
        };
        assert_eq!(tag, want, "contrib/agent.toml: {key} is marked {tag:?}");
    }
}

#[test]
fn the_example_parses_with_every_key_uncommented() {
    let text = example();
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if example_keys(&format!("x\n{l}")).len() == 1 => rest.to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(parse(Path::new("agent.toml"), &text)
        .unwrap()
        .entries
        .is_empty());
    let values = parse(Path::new("agent.toml"), &uncommented).unwrap();
    let keys: Vec<&String> = values.entries.keys().collect();
    assert_eq!(keys.len(), key_names().len(), "{keys:?}");
}

#[test]
fn every_live_key_is_a_key_and_is_named_in_the_help() {
    let keys = key_names();
    for key in LIVE {
        assert!(keys.iter().any(|k| k == key), "{key} is not a key");
        assert!(
            super::super::agent_args::CONFIG_HELP.contains(key),
            "the agent's help does not name live key {key}"
        );
    }
    // The fleet's dirs are keys; the file's own path and the VM config dir are not.
    for key in ["state_dir", "data_dir", "enforcer", "memory_interval"] {
        assert!(keys.iter().any(|k| k == key), "{key}");
    }
    for key in ["config", "vms", "if_absent", "help"] {
        assert!(!keys.iter().any(|k| k == key), "{key}");
    }
}

fn error(text: &str) -> String {
    parse(Path::new("/etc/burst-qemu/agent.toml"), text)
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_keys_and_values_name_the_file_line_and_key() {
    let e = error("# c\ncapacity = 2\nidle_tax = 120\n");
    assert!(
        e.starts_with("/etc/burst-qemu/agent.toml:3: idle_tax: invalid value '120'"),
        "{e}"
    );
    assert!(e.contains("0 to 95"), "{e}");
    let e = error("\nenforcer = \"fast\"\n");
    assert!(
        e.starts_with("/etc/burst-qemu/agent.toml:2: enforcer: "),
        "{e}"
    );
    assert!(e.contains("auto, cgroup, scx, ghost"), "{e}");
    let e = error("memory-interval = 3\n");
    assert!(
        e.contains(":1: memory-interval: unknown key: write it `memory_interval`"),
        "{e}"
    );
    assert!(error("vms = \"x\"\n").contains(":1: vms: unknown key"));
    assert!(error("a = 1\nb = ]\nc = 2\n").contains(":2: syntax: "));
    let e = error("balance_cpus = \"0-x\"\n");
    assert!(e.contains(":1: balance_cpus: invalid value '0-x'"), "{e}");
    let e = error("memory_pool = 1.5\n");
    assert!(e.contains(":1: memory_pool: invalid value '1.5'"), "{e}");
    let e = error("[memory]\npool = 1\n");
    assert!(e.contains(":1: memory: unknown key"), "{e}");
    let e = error("\nmemory_pool = { mib = 1 }\n");
    assert!(e.contains(":2: memory_pool: give a string"), "{e}");
    let e = error("balance_interval = 0.1\n");
    assert!(e.contains("≥ 0.2"), "{e}");
}

#[test]
fn lists_and_numbers_are_read_as_the_flag_takes_them() {
    let v = parse(
        Path::new("a.toml"),
        "balance_cpus = [0, 1, 3]\ncapacity = 1.5\nhost_reserve = 300\n",
    )
    .unwrap();
    let arg = |k: &str| v.entries[k].arg.clone().unwrap();
    assert_eq!(arg("balance_cpus"), "--balance-cpus=0,1,3");
    assert_eq!(arg("capacity"), "--capacity=1.5");
    assert_eq!(arg("host_reserve"), "--host-reserve=300");
    assert_eq!(v.entries["host_reserve"].line, 3);
}

/// A config file in a temporary directory, and an agent command line that names it.
fn with_file(text: &str, extra: &[&str]) -> (tempfile::TempDir, Layers) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["burst-qemu", "agent", "--config", path.to_str().unwrap()];
    args.extend(extra);
    let layers = Layers::new(argv(&args)).unwrap();
    (dir, layers)
}

fn setting<'a>(r: &'a Resolved, key: &str) -> &'a Setting {
    r.settings.iter().find(|s| s.key == key).unwrap()
}

#[test]
fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
    // BURST_QEMU_HOST_RESERVE is set by this test alone (no other test reads host_reserve).
    std::env::set_var("BURST_QEMU_HOST_RESERVE", "333");
    let (_dir, layers) = with_file(
        "capacity = 1.5\nhost_reserve = 111\nmemory_interval = 7\nstate_dir = \"/tmp/bq-from-file\"\n",
        &["--capacity", "3"],
    );
    let file = layers.read().unwrap();
    let r = layers.resolve(file.as_ref()).unwrap();
    std::env::remove_var("BURST_QEMU_HOST_RESERVE");
    // The typed options (their fields are agent_cmd's): as the agent will use them.
    let typed = format!("{:?}", r.args);
    assert!(typed.contains("capacity: Some(\"3\")"), "{typed}");
    assert_eq!(setting(&r, "capacity").source, Source::Flag);
    assert!(typed.contains("host_reserve: 333,"), "{typed}");
    assert_eq!(
        setting(&r, "host_reserve").source,
        Source::Env("BURST_QEMU_HOST_RESERVE".into())
    );
    assert!(typed.contains("memory_interval: 7.0,"), "{typed}");
    assert!(matches!(
        setting(&r, "memory_interval").source,
        Source::File(_, 3)
    ));
    assert_eq!(r.global.state_dir(), Path::new("/tmp/bq-from-file"));
    assert!(matches!(
        setting(&r, "state_dir").source,
        Source::File(_, 4)
    ));
    assert!(typed.contains("balance_interval: 2.0,"), "{typed}");
    assert_eq!(setting(&r, "balance_interval").source, Source::Default);
    assert_eq!(setting(&r, "memory_pool").source, Source::Unset);
}

#[test]
fn a_missing_default_file_means_defaults_and_a_named_one_is_an_error() {
    let layers = Layers::new(argv(&[
        "burst-qemu",
        "agent",
        "--config",
        "/nonexistent/agent.toml",
    ]))
    .unwrap();
    let e = layers.read().unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/agent.toml: "), "{e}");
    let default = Layers {
        path: "/nonexistent/agent.toml".into(),
        explicit: false,
        ..layers
    };
    assert!(default.read().unwrap().is_none());
}

#[test]
fn a_builder_error_of_a_file_value_names_its_line() {
    let (_dir, layers) = with_file("\ncapacity = 2\n", &[]);
    let r = layers.resolve(layers.read().unwrap().as_ref()).unwrap();
    let blamed = r.blame(Failure::usage(anyhow::anyhow!(
        "--capacity \"2\": not online"
    )));
    let text = format!("{:#}", blamed.error);
    assert!(
        text.contains("agent.toml:2: capacity: --capacity"),
        "{text}"
    );
    let other = r.blame(Failure::usage(anyhow::anyhow!("--enforcer scx: not built")));
    assert_eq!(format!("{:#}", other.error), "--enforcer scx: not built");
}

#[test]
fn an_edit_keeps_the_keys_that_need_a_restart_and_takes_the_live_ones() {
    let (_dir, layers) = with_file("capacity = 1\nenforcer = \"cgroup\"\n", &[]);
    let old = layers.read().unwrap();
    let in_force = layers.resolve(old.as_ref()).unwrap().settings;
    let new = parse(
        &layers.path,
        "capacity = 2\nenforcer = \"scx\"\ndisk_bandwidth = \"10M\"\nidle_exit = 5\n",
    )
    .unwrap();
    let (held, restart) = hold_restart_keys(old.as_ref(), Some(&new), &in_force);
    let held = held.unwrap();
    assert_eq!(held.entries["capacity"].shown, "2");
    assert_eq!(held.entries["enforcer"].shown, "\"cgroup\"");
    assert!(
        !held.entries.contains_key("disk_bandwidth"),
        "turning disks on needs a restart"
    );
    assert_eq!(held.entries["idle_exit"].shown, "5");
    let keys: Vec<&str> = restart.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(keys, ["disk_bandwidth", "enforcer"]);
    assert!(restart[1].1.ends_with("agent.toml:2"), "{restart:?}");
    // A key a flag sets is not the file's: its edit neither applies nor warns.
    let (_dir, layers) = with_file("enforcer = \"cgroup\"\n", &["--enforcer", "cgroup"]);
    let old = layers.read().unwrap();
    let in_force = layers.resolve(old.as_ref()).unwrap().settings;
    let new = parse(&layers.path, "enforcer = \"scx\"\n").unwrap();
    let (_, restart) = hold_restart_keys(old.as_ref(), Some(&new), &in_force);
    assert!(restart.is_empty(), "{restart:?}");
}

/// Issue 20: the spare rule changes live (under every enforcer that honours the new one), but
/// turning the contention stage on or off (`off`) waits for a restart.
#[test]
fn the_spare_rule_changes_live_but_turning_contention_off_or_on_needs_a_restart() {
    for (was, now, live) in [
        ("headroom", "baseline", true),
        ("baseline", "rescoin", true),
        ("rescoin", "off", false),
        ("off", "headroom", false),
    ] {
        let (_dir, layers) = with_file(&format!("contention = \"{was}\"\n"), &[]);
        let old = layers.read().unwrap();
        let in_force = layers.resolve(old.as_ref()).unwrap().settings;
        let new = parse(&layers.path, &format!("contention = \"{now}\"\n")).unwrap();
        let (held, restart) = hold_restart_keys(old.as_ref(), Some(&new), &in_force);
        let applied = held.unwrap().entries["contention"].shown.clone();
        let want = if live { now } else { was };
        assert_eq!(applied, format!("\"{want}\""), "{was} -> {now}");
        assert_eq!(restart.is_empty(), live, "{was} -> {now}: {restart:?}");
    }
    // From the default (no key) to a rule, and back: live.
    let (_dir, layers) = with_file("", &[]);
    let old = layers.read().unwrap();
    let in_force = layers.resolve(old.as_ref()).unwrap().settings;
    let new = parse(&layers.path, "contention = \"baseline\"\n").unwrap();
    let (_, restart) = hold_restart_keys(old.as_ref(), Some(&new), &in_force);
    assert!(restart.is_empty(), "{restart:?}");
}

#[test]
fn the_reference_page_lists_every_key_with_its_reload_class() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/agent-config.md"))
            .unwrap();
    for key in key_names() {
        let row = page
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("docs/agent-config.md has no row for {key}"));
        let class = row.split('|').nth(3).unwrap().trim();
        let live = LIVE.contains(&key.as_str());
        assert_eq!(
            class.starts_with("live"),
            live,
            "docs/agent-config.md: {row}"
        );
    }
}
