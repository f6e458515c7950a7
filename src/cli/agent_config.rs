//! The agent's configuration file: `/etc/burst-qemu/agent.toml` for root (the packaged
//! service's), `$XDG_CONFIG_HOME/burst-qemu/agent.toml` for other users, unless `--config
//! FILE` or `$BURST_QEMU_AGENT_CONFIG` names another.
//!
//! Every long option of `burst-qemu agent`, and the fleet's `--state-dir` and `--data-dir`, is
//! a key spelled with `_` for `-` (`--memory-interval 5` is `memory_interval = 5`). The keys
//! are read from clap's definition of the command and each value is checked by its option's
//! own value parser, so the file accepts exactly what the flag accepts and a new flag is a
//! new key with no code here. Only [`LIVE`], which keys an edit changes while the agent runs,
//! is a list.
//!
//! Precedence, per key: a flag, then the environment (`BURST_QEMU_*`), then the file, then the
//! built-in default. A missing file at the default path means the built-in defaults; a
//! missing file named by `--config` or the environment is an error. The file's values reach
//! the typed options the way flags do: the command line is parsed again with them appended as
//! `--key=value` for the keys that no flag or variable sets.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use burst_qemu::agent::{Reload, Settings};
use burst_qemu::config::ConfigError;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use toml::Spanned;

use super::agent_args::AgentArgs;
use super::{Cli, Command, Failure, Global};

/// The file root's agents read when neither `--config` nor the environment names one.
pub(super) const DEFAULT_PATH: &str = "/etc/burst-qemu/agent.toml";

/// The file read when neither `--config` nor the environment names one: [`DEFAULT_PATH`] for
/// root; for other users `$XDG_CONFIG_HOME/burst-qemu/agent.toml` (else under `~/.config`),
/// as their state and data dirs are their own (a user's agent must not take the system
/// agent's metrics address, say).
pub(super) fn default_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from(DEFAULT_PATH);
    }
    let base = match (
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    ) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d),
        (_, Some(h)) => PathBuf::from(h).join(".config"),
        _ => return PathBuf::from(DEFAULT_PATH),
    };
    base.join("burst-qemu/agent.toml")
}

/// The keys an edit of the file changes while the agent runs; a change of any other key is
/// logged as needing a restart, and the value in force stays. `disk_bandwidth` is live as a
/// value only: setting or removing it turns disk management on or off, which needs a restart
/// (see `agent::reload` for the reasons).
pub(super) const LIVE: &[&str] = &[
    "capacity",
    "contention",
    "disk_bandwidth",
    "balance_interval",
    "memory_interval",
    "idle_tax",
    "host_reserve",
    "memory_pool",
    "memory_trace",
    "idle_exit",
];

/// Live keys whose presence turns a stage on or off (that part needs a restart).
const LIVE_VALUE_ONLY: &[&str] = &["disk_bandwidth"];

/// Live keys whose value `off` turns a stage off: a change to or from it needs a restart.
const LIVE_UNLESS_OFF: &[&str] = &["contention"];

/// Whether a file entry sets its key to `off`.
fn is_off(e: Option<&Entry>) -> bool {
    e.is_some_and(|e| e.shown.trim_matches('"') == "off")
}

/// Options that are not keys: the file's own path, and the directory of VM configs (the
/// agent finds each VM's config from its record).
const NOT_KEYS: &[&str] = &["config", "vms"];

/// Where a setting's value comes from.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Source {
    /// The command line.
    Flag,
    /// This environment variable.
    Env(String),
    /// The config file, at this line.
    File(PathBuf, usize),
    /// The option's built-in default.
    Default,
    /// Not set: the option's documented behaviour when absent.
    Unset,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::File(path, line) => write!(f, "{}:{line}", path.display()),
            Source::Default => f.write_str("default"),
            Source::Unset => f.write_str("unset"),
        }
    }
}

/// One key of the file, as clap defines its option.
struct Key {
    name: String,
    id: String,
    long: String,
    env: Option<String>,
    takes_value: bool,
    /// The help's `[default: …]` text, for options without a clap default.
    default_doc: Option<String>,
}

/// The agent's command with the fleet's options, for checking one value at a time: no
/// defaults, no environment, nothing required.
fn value_command() -> clap::Command {
    let root = Cli::command();
    let globals: Vec<clap::Arg> = root
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    root.find_subcommand("agent")
        .expect("the agent subcommand")
        .clone()
        .args(globals)
        .mut_args(|a| {
            a.global(false)
                .default_value(None)
                .env(None)
                .required(false)
        })
        .disable_help_flag(true)
        .disable_version_flag(true)
}

/// The keys: every long, visible option of the agent and the fleet but [`NOT_KEYS`].
fn keys() -> Vec<Key> {
    let real = Cli::command();
    let agent = real.find_subcommand("agent").expect("the agent subcommand");
    let mut keys: Vec<Key> = value_command()
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !NOT_KEYS.contains(&a.get_id().as_str()))
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            let id = a.get_id().as_str();
            // The environment variable of the real definition (value_command drops it).
            let original = agent
                .get_arguments()
                .chain(real.get_arguments())
                .find(|o| o.get_id() == id)?;
            let help = original.get_long_help().or(original.get_help());
            let default_doc = help.and_then(|h| {
                let h = h.to_string().replace('\n', " ");
                let start = h.find("[default: ")? + "[default: ".len();
                Some(h[start..].split(']').next()?.to_owned())
            });
            Some(Key {
                name: long.replace('-', "_"),
                id: id.to_owned(),
                env: original.get_env().map(|e| e.to_string_lossy().into_owned()),
                takes_value: a.get_action().takes_values(),
                long,
                default_doc,
            })
        })
        .collect();
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    keys
}

/// The names of the file's keys.
#[cfg(test)]
pub(super) fn key_names() -> Vec<String> {
    keys().into_iter().map(|k| k.name).collect()
}

/// One key's value in the file.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    /// What the command line gets (`--key=value`, `--key`), or nothing (`key = false` for an
    /// option without a value).
    arg: Option<OsString>,
    /// The value as written, for messages.
    shown: String,
    line: usize,
}

/// A config file's values, each checked by its option's value parser.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct FileValues {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn invalid(path: &Path, line: usize, field: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        field: field.to_owned(),
        message,
    }
}

/// Reads and checks a config file's text.
pub(super) fn parse(path: &Path, text: &str) -> Result<FileValues, ConfigError> {
    let table: BTreeMap<String, Spanned<toml::Value>> = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        let message = e.message().lines().next().unwrap_or("").to_owned();
        invalid(path, line, "syntax", message)
    })?;
    let keys = keys();
    let check = value_command();
    let mut entries = BTreeMap::new();
    for (name, value) in table {
        let line = line_of(text, value.span().start);
        let Some(key) = keys.iter().find(|k| k.name == name) else {
            let hint = match keys.iter().find(|k| k.long == name || k.name == name.replace('-', "_")) {
                Some(k) => format!("write it `{}`", k.name),
                None => "the keys are `burst-qemu agent`'s long options with `_` for `-` (see burst-qemu-agent(1) or the commented /etc/burst-qemu/agent.toml)".into(),
            };
            return Err(invalid(path, line, &name, format!("unknown key: {hint}")));
        };
        let entry = entry(key, value.get_ref(), line).map_err(|m| invalid(path, line, &name, m))?;
        if let Some(arg) = &entry.arg {
            if let Err(e) = check
                .clone()
                .try_get_matches_from([OsString::from("agent"), arg.clone()])
            {
                return Err(invalid(path, line, &name, clap_message(&e)));
            }
        }
        entries.insert(name, entry);
    }
    Ok(FileValues {
        path: path.to_owned(),
        entries,
    })
}

/// A TOML value as its option's command-line argument.
fn entry(key: &Key, value: &toml::Value, line: usize) -> Result<Entry, String> {
    use toml::Value as V;
    let scalar = |v: &V| match v {
        V::String(s) => Some(s.clone()),
        V::Integer(i) => Some(i.to_string()),
        V::Float(f) => Some(f.to_string()),
        V::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    let shown = value.to_string();
    if !key.takes_value {
        let V::Boolean(on) = value else {
            return Err("give true or false".into());
        };
        let arg = on.then(|| OsString::from(format!("--{}", key.long)));
        return Ok(Entry { arg, shown, line });
    }
    let text = match value {
        // A list is written as on the command line: `[0, 1, 3]` is `0,1,3`.
        V::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<String>>>()
            .map(|v| v.join(",")),
        v => scalar(v),
    }
    .ok_or("give a string, a number, a boolean or a list of them, as the flag takes")?;
    Ok(Entry {
        arg: Some(format!("--{}={text}", key.long).into()),
        shown,
        line,
    })
}

/// clap's message for a bad value, on one line and without its usage hint.
fn clap_message(e: &clap::Error) -> String {
    e.render()
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One setting in force: its value and where it comes from.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Setting {
    pub(super) key: String,
    /// `--long`, to name it in errors the way flags are named.
    long: String,
    /// The value (as given; `None`: unset).
    pub(super) value: Option<String>,
    pub(super) source: Source,
    /// What an unset option does, from its help.
    pub(super) default_doc: Option<String>,
}

/// The agent's command line and environment, before the file: its arguments, the file's path,
/// and each key's value and source.
pub(super) struct Layers {
    argv: Vec<OsString>,
    path: PathBuf,
    explicit: bool,
    cli: Vec<Setting>,
}

/// The agent's options with the file applied.
pub(super) struct Resolved {
    pub(super) global: Global,
    pub(super) args: AgentArgs,
    pub(super) settings: Vec<Setting>,
}

impl Layers {
    /// From an agent's command line (`burst-qemu … agent …`), with the environment.
    pub(super) fn new(argv: Vec<OsString>) -> Result<Layers, Failure> {
        let matches = Cli::command()
            .try_get_matches_from(&argv)
            .map_err(|e| Failure::usage(anyhow::anyhow!(clap_message(&e))))?;
        let agent = matches
            .subcommand_matches("agent")
            .ok_or_else(|| Failure::usage(anyhow::anyhow!("not an agent command line")))?;
        let (path, explicit) = match agent.get_one::<PathBuf>("config") {
            Some(p) => (burst_qemu::state::absolute(p), true),
            None => (default_path(), false),
        };
        let cli = keys()
            .into_iter()
            .map(|k| setting_from(agent, &k))
            .collect();
        Ok(Layers {
            argv,
            path,
            explicit,
            cli,
        })
    }

    /// The config file's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file: `None` when it is absent at the default path.
    pub(super) fn read(&self) -> Result<Option<FileValues>, ConfigError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => parse(&self.path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !self.explicit => Ok(None),
            Err(source) => Err(ConfigError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The options with `file`'s values for the keys no flag or variable sets.
    pub(super) fn resolve(&self, file: Option<&FileValues>) -> Result<Resolved, Failure> {
        let mut argv = self.argv.clone();
        let mut settings = Vec::new();
        for s in &self.cli {
            let from_file = file
                .and_then(|f| Some((&f.path, f.entries.get(&s.key)?)))
                .filter(|_| matches!(s.source, Source::Default | Source::Unset));
            let Some((path, entry)) = from_file else {
                settings.push(s.clone());
                continue;
            };
            argv.extend(entry.arg.clone());
            settings.push(Setting {
                value: entry.arg.as_ref().map(|_| unquote(&entry.shown)),
                source: Source::File(path.clone(), entry.line),
                ..s.clone()
            });
        }
        let matches = Cli::command()
            .try_get_matches_from(&argv)
            .map_err(|e| Failure::usage(anyhow::anyhow!(clap_message(&e))))?;
        let cli = Cli::from_arg_matches(&matches)
            .map_err(|e| Failure::usage(anyhow::anyhow!(clap_message(&e))))?;
        let Some(Command::Agent(args)) = cli.command else {
            return Err(Failure::usage(anyhow::anyhow!("not an agent command line")));
        };
        Ok(Resolved {
            global: cli.global,
            args: *args,
            settings,
        })
    }
}

/// `"1.5"` → `1.5`: a file's string shown as the flag's value.
fn unquote(shown: &str) -> String {
    shown
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(shown)
        .to_owned()
}

/// A key's value and source on the command line and in the environment.
fn setting_from(m: &ArgMatches, key: &Key) -> Setting {
    let source = match m.value_source(&key.id) {
        Some(ValueSource::CommandLine) => Source::Flag,
        Some(ValueSource::EnvVariable) => Source::Env(key.env.clone().unwrap_or_default()),
        Some(ValueSource::DefaultValue) => Source::Default,
        _ => Source::Unset,
    };
    let value = m.get_raw(&key.id).map(|vals| {
        vals.map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(",")
    });
    Setting {
        key: key.name.clone(),
        long: format!("--{}", key.long),
        value: if key.takes_value {
            value
        } else {
            (source == Source::Flag).then(|| "true".into())
        },
        source,
        default_doc: key.default_doc.clone(),
    }
}

impl Resolved {
    /// A failure of the settings built from these options, with the file's line when the
    /// option it names (`--capacity …: …`) came from the file.
    pub(super) fn blame(&self, f: Failure) -> Failure {
        let message = f.error.to_string();
        let from_file = self.settings.iter().find_map(|s| match &s.source {
            Source::File(path, line) if message.starts_with(&s.long) => Some((path, line, &s.key)),
            _ => None,
        });
        match from_file {
            Some((path, line, key)) => Failure {
                code: f.code,
                error: f.error.context(format!("{}:{line}: {key}", path.display())),
            },
            None => f,
        }
    }
}

/// The [`Reload`] of a running agent: on each edit, the file is read again, the live keys
/// take their new values, and every other changed key keeps the value in force with a
/// warning naming its line; `build` makes the settings, as at the start.
pub(super) fn reloader(
    layers: Layers,
    file: Option<FileValues>,
    resolved: &Resolved,
    mut build: impl FnMut(&Resolved) -> Result<Settings, Failure> + 'static,
) -> Reload {
    let path = layers.path().to_owned();
    let mut in_force_file = file;
    let mut in_force = resolved.settings.clone();
    let load = move || -> Result<Settings, String> {
        let read = layers.read().map_err(|e| e.to_string())?;
        let (held, restart) = hold_restart_keys(in_force_file.as_ref(), read.as_ref(), &in_force);
        let resolved = layers
            .resolve(held.as_ref())
            .map_err(|f| format!("{:#}", f.error))?;
        let settings = build(&resolved).map_err(|f| format!("{:#}", resolved.blame(f).error))?;
        for (new, old) in resolved.settings.iter().zip(&in_force) {
            if new.value == old.value {
                continue;
            }
            let now = match &new.source {
                Source::File(..) => format!("{}: {} = {}", new.source, new.key, shown(&new.value)),
                _ => format!(
                    "{}: {} no longer set: {}",
                    layers.path().display(),
                    new.key,
                    new.value
                        .clone()
                        .or(new.default_doc.clone())
                        .unwrap_or_else(|| "off".into())
                ),
            };
            tracing::info!("{now} (was {}): applied", shown(&old.value));
        }
        for (key, source, value) in restart {
            let now = in_force
                .iter()
                .find(|s| s.key == key)
                .map(|s| shown(&s.value));
            tracing::warn!(
                "{source}: {key} = {value}: needs a restart of the agent (systemctl restart \
                 burst-qemu-agent); in force: {}",
                now.unwrap_or_default()
            );
        }
        in_force = resolved.settings;
        in_force_file = held;
        Ok(settings)
    };
    Reload {
        path,
        load: Box::new(load),
    }
}

fn shown(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "(unset)".into())
}

/// The file as it may be applied: `new` with the keys that need a restart as they were in
/// `old`; and those keys, with where and what the file now says. Keys a flag or variable sets
/// are not the file's to change.
fn hold_restart_keys(
    old: Option<&FileValues>,
    new: Option<&FileValues>,
    in_force: &[Setting],
) -> (Option<FileValues>, Vec<(String, String, String)>) {
    let empty = BTreeMap::new();
    let old_entries = old.map_or(&empty, |f| &f.entries);
    let new_entries = new.map_or(&empty, |f| &f.entries);
    let path = new.or(old).map(|f| f.path.clone());
    let mut held = new_entries.clone();
    let mut restart = Vec::new();
    for s in in_force {
        if matches!(s.source, Source::Flag | Source::Env(_)) {
            continue;
        }
        let (was, now) = (old_entries.get(&s.key), new_entries.get(&s.key));
        let same = was.map(|e| &e.arg) == now.map(|e| &e.arg);
        let live = LIVE.contains(&s.key.as_str())
            && !(LIVE_VALUE_ONLY.contains(&s.key.as_str()) && was.is_some() != now.is_some())
            && !(LIVE_UNLESS_OFF.contains(&s.key.as_str()) && is_off(was) != is_off(now));
        if same || live {
            continue;
        }
        match was {
            Some(e) => held.insert(s.key.clone(), e.clone()),
            None => held.remove(&s.key),
        };
        let at = match (&path, now) {
            (Some(p), Some(e)) => format!("{}:{}", p.display(), e.line),
            (Some(p), None) => p.display().to_string(),
            (None, _) => String::new(),
        };
        let value = now.map_or("(removed)".to_owned(), |e| e.shown.clone());
        restart.push((s.key.clone(), at, value));
    }
    let held = path.map(|path| FileValues {
        path,
        entries: held,
    });
    (held, restart)
}

/// For `burst-qemu check` (its command line `argv`): the config file's state, and a line per
/// agent setting with its value and source, as `burst-qemu agent` with the same options and
/// environment would run.
pub(super) fn report(argv: Vec<OsString>) -> Result<(String, Vec<String>), String> {
    // `burst-qemu [global…] check [--config F] [global…]` read as the agent's command line.
    let mut agent_argv = argv.clone();
    if let Some(at) = argv.iter().skip(1).position(|a| a == "check") {
        agent_argv[at + 1] = "agent".into();
    }
    let layers = Layers::new(agent_argv)
        .or_else(|_| Layers::new(vec!["burst-qemu".into(), "agent".into()]))
        .map_err(|f| format!("{:#}", f.error))?;
    let file = layers.read().map_err(|e| e.to_string())?;
    let resolved = layers
        .resolve(file.as_ref())
        .map_err(|f| format!("{:#}", f.error))?;
    let state = match &file {
        Some(f) => format!(
            "{} ({} key(s) set)",
            layers.path().display(),
            f.entries.len()
        ),
        None => format!("{} absent: built-in defaults", layers.path().display()),
    };
    let width = resolved
        .settings
        .iter()
        .map(|s| s.key.len())
        .max()
        .unwrap_or(0);
    let lines = resolved
        .settings
        .iter()
        .map(|s| {
            // The fleet's dirs as this user's agent would use them.
            let dir = match s.key.as_str() {
                "state_dir" => Some(resolved.global.state_dir()),
                "data_dir" => Some(resolved.global.data_dir()),
                _ => None,
            };
            let value = match (&s.value, &s.default_doc) {
                (Some(v), _) => v.clone(),
                (None, _) if dir.is_some() => format!("({})", dir.unwrap_or_default().display()),
                (None, Some(doc)) => format!("({doc})"),
                (None, None) => "(off)".into(),
            };
            let live = if LIVE.contains(&s.key.as_str()) {
                "  live"
            } else {
                ""
            };
            format!(
                "   agent {:<width$} = {value:<24} {}{live}",
                s.key, s.source
            )
        })
        .collect();
    Ok((state, lines))
}

#[cfg(test)]
#[path = "agent_config_tests.rs"]
mod tests;
