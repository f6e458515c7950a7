//! `vms/NAME.toml`: one VM's settings. Two steps, each with errors that name the file, the line
//! and the field: [`parse`] reads the TOML into a [`Document`] (syntax, unknown keys, types),
//! [`Document::validate`] checks ranges and relations and builds the [`VmConfig`]. [`load`] does
//! both for a file. What applies a config is its user's: the launcher (QEMU's arguments and the
//! VM record) and the agent (`agent::lifecycle`'s one path for adoption and every edit).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::credit::{Baseline, Credits, Mode, Policy, PolicyError};

/// A VM's validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    /// The credit policy (vCPUs, baseline, mode, caps, decline).
    pub policy: Policy,
    /// Launch credits granted when the VM is first created.
    pub initial_credits: Credits,
    /// A balance override (`credits = N`), applied once per change of the value.
    pub credits: Option<Credits>,
    /// The VM's share of the host's disk bandwidth, percent (its ResCoin template for disk;
    /// `None`: its disks are not managed).
    pub disk_share: Option<f64>,
    /// The host CPUs the pinning balancer may put this VM's vCPUs on (`cpus = "0-1"` or
    /// `cpus = [0, 1]`); `None`: any CPU it manages.
    pub cpus: Option<Vec<u32>>,
    /// The memory coordinator's settings (`balance_memory = true` and the `memory_*` keys);
    /// `None`: this VM's memory is not balanced.
    pub memory: Option<MemoryConfig>,
}

/// A VM's settings for the balloon memory coordinator, MiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Never ballooned below this (`memory_min`, default 200).
    pub min: u64,
    /// Never above this (`memory_max`); the boot size (`-m`) when absent or lower. The
    /// launcher boots at `-m memory_max` when QEMU has no `-m`.
    pub max: Option<u64>,
    /// Ballooned to this once the VM is adopted (`memory_start`, like libvirt's
    /// currentMemory); absent: it starts at its boot size.
    pub start: Option<u64>,
    /// Shares for the idle-tax policy (`memory_shares`, default 1000).
    pub shares: u64,
}

impl MemoryConfig {
    /// The default floor, MiB.
    pub const DEFAULT_MIN: u64 = 200;
    /// The default shares.
    pub const DEFAULT_SHARES: u64 = 1000;
}

/// A config file that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A syntax error, an unknown key, a missing key or a value out of range.
    #[error("{path}:{line}: {field}: {message}", path = .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending value (or of the error).
        line: usize,
        /// The field, or `syntax`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    vcpus: Option<Spanned<i64>>,
    baseline: Option<Spanned<f64>>,
    mode: Option<Spanned<String>>,
    initial_credits: Option<Spanned<f64>>,
    max_credits: Option<Spanned<f64>>,
    max_surplus: Option<Spanned<f64>>,
    decline_minutes: Option<Spanned<f64>>,
    credits: Option<Spanned<f64>>,
    disk_share: Option<Spanned<f64>>,
    cpus: Option<Spanned<CpuSpec>>,
    balance_memory: Option<Spanned<bool>>,
    memory_min: Option<Spanned<i64>>,
    memory_max: Option<Spanned<i64>>,
    memory_start: Option<Spanned<i64>>,
    memory_shares: Option<Spanned<i64>>,
}

/// `cpus = "0-1,3"` or `cpus = [0, 1, 3]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum CpuSpec {
    Text(String),
    List(Vec<i64>),
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// A config file read but not yet validated: its keys, with where each value is.
pub struct Document {
    path: PathBuf,
    text: String,
    raw: Raw,
}

/// Reads the TOML of a config file (`path` is for messages): syntax, unknown keys and types.
pub fn parse(path: &Path, text: &str) -> Result<Document, ConfigError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        // One line: toml's messages can span several.
        let message = e.message().trim().replace('\n', "; ");
        // serde names the field in "unknown field `x`, expected …" and "missing field `x`".
        // A wrong type names no field: take the key written on the offending line.
        let key_on_line = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .or(key_on_line)
            .unwrap_or("syntax")
            .to_owned();
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            field,
            message,
        }
    })?;
    Ok(Document {
        path: path.to_owned(),
        text: text.to_owned(),
        raw,
    })
}

/// Parses and validates the text of a config file; `path` is for messages.
pub fn from_text(path: &Path, text: &str) -> Result<VmConfig, ConfigError> {
    parse(path, text)?.validate()
}

impl Document {
    fn invalid(&self, span: &std::ops::Range<usize>, field: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: line_of(&self.text, span.start),
            field: field.to_owned(),
            message,
        }
    }

    fn missing(&self, field: &str, what: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            line: 1,
            field: field.to_owned(),
            message: format!("missing ({what})"),
        }
    }

    /// Checks every value's range and the relations between them, and builds the config.
    pub fn validate(&self) -> Result<VmConfig, ConfigError> {
        let memory = memory_config(&self.raw, &|s, f, m| self.invalid(s, f, m))?;
        let policy = self.policy()?;
        let initial_credits = match &self.raw.initial_credits {
            Some(c) => self.credits(c, "initial_credits")?,
            None => Policy::default_initial_credits(policy.vcpus()),
        };
        let credits = self
            .raw
            .credits
            .as_ref()
            .map(|c| self.credits(c, "credits"))
            .transpose()?;
        Ok(VmConfig {
            policy,
            initial_credits,
            credits,
            disk_share: self.disk_share()?,
            cpus: self.cpus()?,
            memory,
        })
    }

    /// vCPUs, baseline, mode, caps and decline.
    fn policy(&self) -> Result<Policy, ConfigError> {
        let raw = &self.raw;
        let vcpus = raw
            .vcpus
            .as_ref()
            .ok_or_else(|| self.missing("vcpus", "the number of vCPUs"))?;
        let vcpus_value = u32::try_from(*vcpus.get_ref()).map_err(|_| {
            self.invalid(
                &vcpus.span(),
                "vcpus",
                format!("{} is out of range", vcpus.get_ref()),
            )
        })?;
        let baseline = raw
            .baseline
            .as_ref()
            .ok_or_else(|| self.missing("baseline", "percent per vCPU"))?;
        let policy_err = |s: &Spanned<f64>, field: &str, e: PolicyError| {
            self.invalid(&s.span(), field, e.to_string())
        };
        let base = Baseline::from_percent(*baseline.get_ref())
            .map_err(|e| policy_err(baseline, "baseline", e))?;
        let mut policy = Policy::new(vcpus_value, base)
            .map_err(|e| self.invalid(&vcpus.span(), "vcpus", e.to_string()))?;
        if let Some(mode) = &raw.mode {
            let m: Mode = mode
                .get_ref()
                .parse()
                .map_err(|e: String| self.invalid(&mode.span(), "mode", e))?;
            policy = policy.with_mode(m);
        }
        if let Some(max) = &raw.max_credits {
            policy = policy.with_max_credits(self.credits(max, "max_credits")?);
        }
        if let Some(max) = &raw.max_surplus {
            policy = policy.with_max_surplus(self.credits(max, "max_surplus")?);
        }
        if let Some(d) = &raw.decline_minutes {
            policy = policy
                .with_decline_minutes(*d.get_ref())
                .map_err(|e| policy_err(d, "decline_minutes", e))?;
        }
        Ok(policy)
    }

    fn credits(&self, s: &Spanned<f64>, field: &'static str) -> Result<Credits, ConfigError> {
        Credits::from_credits(*s.get_ref()).ok_or_else(|| {
            self.invalid(
                &s.span(),
                field,
                PolicyError::Credits {
                    field,
                    value: *s.get_ref(),
                }
                .to_string(),
            )
        })
    }

    fn disk_share(&self) -> Result<Option<f64>, ConfigError> {
        match &self.raw.disk_share {
            Some(d)
                if !(d.get_ref().is_finite() && *d.get_ref() > 0.0 && *d.get_ref() <= 100.0) =>
            {
                Err(self.invalid(
                    &d.span(),
                    "disk_share",
                    format!(
                        "{} is not a percentage of the host's disk bandwidth in (0, 100]",
                        d.get_ref()
                    ),
                ))
            }
            d => Ok(d.as_ref().map(|d| *d.get_ref())),
        }
    }

    fn cpus(&self) -> Result<Option<Vec<u32>>, ConfigError> {
        self.raw
            .cpus
            .as_ref()
            .map(|c| {
                let list = match c.get_ref() {
                    CpuSpec::Text(t) => crate::base::parse_cpu_list(t),
                    CpuSpec::List(l) if l.is_empty() => Err("an empty CPU list".into()),
                    CpuSpec::List(l) => crate::base::parse_cpu_list(
                        &l.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
                    ),
                };
                list.map_err(|e| self.invalid(&c.span(), "cpus", e))
            })
            .transpose()
    }
}

type Invalid<'a> = dyn Fn(&std::ops::Range<usize>, &str, String) -> ConfigError + 'a;

/// The `memory_*` keys: sizes in MiB, 64 ≤ memory_min ≤ memory_start ≤ memory_max.
fn memory_config(raw: &Raw, invalid: &Invalid) -> Result<Option<MemoryConfig>, ConfigError> {
    let mib = |v: &Option<Spanned<i64>>, field: &str, lo: i64, hi: i64| {
        v.as_ref()
            .map(|s| {
                let x = *s.get_ref();
                if (lo..=hi).contains(&x) {
                    Ok((x as u64, s.span()))
                } else {
                    Err(invalid(
                        &s.span(),
                        field,
                        format!("{x} is out of range: give {lo} to {hi}"),
                    ))
                }
            })
            .transpose()
    };
    const MAX_MIB: i64 = 1 << 30; // 1 PiB
    let min = mib(&raw.memory_min, "memory_min", 64, MAX_MIB)?;
    let max = mib(&raw.memory_max, "memory_max", 64, MAX_MIB)?;
    let start = mib(&raw.memory_start, "memory_start", 64, MAX_MIB)?;
    let shares = mib(&raw.memory_shares, "memory_shares", 1, 1_000_000)?;
    let floor = min.as_ref().map_or(MemoryConfig::DEFAULT_MIN, |m| m.0);
    if let Some((m, span)) = &max {
        if *m < floor {
            return Err(invalid(
                span,
                "memory_max",
                format!("{m} is below memory_min ({floor})"),
            ));
        }
    }
    if let Some((st, span)) = &start {
        if *st < floor {
            return Err(invalid(
                span,
                "memory_start",
                format!("{st} is below memory_min ({floor})"),
            ));
        }
        if let Some((m, _)) = &max {
            if st > m {
                return Err(invalid(
                    span,
                    "memory_start",
                    format!("{st} is above memory_max ({m})"),
                ));
            }
        }
    }
    if !raw.balance_memory.as_ref().is_some_and(|b| *b.get_ref()) {
        return Ok(None);
    }
    Ok(Some(MemoryConfig {
        min: floor,
        max: max.map(|m| m.0),
        start: start.map(|s| s.0),
        shares: shares.map_or(MemoryConfig::DEFAULT_SHARES, |s| s.0),
    }))
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    from_text(path, &text)
}

/// A number as TOML writes it, without a needless fraction.
struct Num(f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            write!(f, "{}", self.0 as i64)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// The commented text of a config file for `config` (the same shape as `vms/example.toml`).
pub fn render(config: &VmConfig) -> String {
    let p = &config.policy;
    let default_max = Policy::earnings_per_day(p.vcpus(), p.baseline());
    let optional = |name: &str, value: Credits, default: Credits| {
        if value == default {
            format!("# {name} = {}", Num(default.as_credits()))
        } else {
            format!("{name} = {}", Num(value.as_credits()))
        }
    };
    let max_line = optional("max_credits", p.max_credits(), default_max);
    let surplus_line = optional("max_surplus", p.max_surplus(), p.max_credits());
    let credits_line = match config.credits {
        Some(c) => format!("credits = {}", Num(c.as_credits())),
        None => "# credits = 50".to_owned(),
    };
    let disk_line = match config.disk_share {
        Some(d) => format!("disk_share = {}", Num(d)),
        None => "# disk_share = 50".to_owned(),
    };
    let cpus_line = match &config.cpus {
        Some(c) => format!(
            "cpus = [{}]",
            c.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        ),
        None => "# cpus = \"0-1\"".to_owned(),
    };
    format!(
        "# burst-qemu VM config. The running agent applies edits live; percentages are of ONE vCPU,\n\
         # credits are vCPU-minutes (one vCPU at 100 % for one minute).\n\
         \n\
         # Number of vCPUs. Must match QEMU's -smp; cannot change while the VM runs.\n\
         vcpus = {vcpus}\n\
         \n\
         # Baseline CPU share, percent per vCPU, in (0, 100]; pooled over the VM's vCPUs.\n\
         baseline = {baseline}\n\
         \n\
         # \"standard\": held to the baseline at a zero balance (after a smooth decline).\n\
         # \"unlimited\": keeps bursting on surplus credits; surplus beyond max_surplus is charged.\n\
         mode = \"{mode}\"\n\
         \n\
         # Launch credits granted when the VM is first created, spent first, not capped.\n\
         initial_credits = {initial}\n\
         \n\
         # Cap on earned credits. Default: 24 hours of earnings ({default_max}).\n\
         {max_line}\n\
         \n\
         # Cap on the surplus of an unlimited VM. Default: max_credits.\n\
         {surplus_line}\n\
         \n\
         # Minutes over which the grant falls from the full rate to the baseline as the balance\n\
         # runs out. Default: 20.\n\
         decline_minutes = {decline}\n\
         \n\
         # Balance override: set the balance to this many credits, applied once per change.\n\
         {credits_line}\n\
         \n\
         # Share of the host's disk bandwidth (agent --disk-bandwidth), percent: the VM's\n\
         # guaranteed part when the VMs together read or write more than the host has.\n\
         # Unset: its disks are not throttled.\n\
         {disk_line}\n\
         \n\
         # Host CPUs the pinning balancer (agent --balance cpu) may pin this VM's vCPUs to,\n\
         # as \"0-1,3\" or [0, 1, 3]. Default: any CPU the agent manages.\n\
         {cpus_line}\n\
         \n\
         # Balloon memory coordinator (sizes in MiB; see docs/memory.md): balance this VM's memory,\n\
         # never below memory_min (default 200) nor above memory_max (default: the boot -m);\n\
         # balloon to memory_start once running; memory_shares for the idle-tax policy.\n\
         {memory_lines}\n",
        vcpus = p.vcpus(),
        baseline = Num(p.baseline().percent()),
        mode = p.mode(),
        initial = Num(config.initial_credits.as_credits()),
        default_max = Num(default_max.as_credits()),
        decline = Num(p.decline_ns() as f64 / crate::credit::NS_PER_MIN as f64),
        memory_lines = memory_lines(config.memory.as_ref()),
    )
}

fn memory_lines(m: Option<&MemoryConfig>) -> String {
    let Some(m) = m else {
        return "# balance_memory = true\n# memory_min = 200\n# memory_shares = 1000".into();
    };
    let mut lines = vec![
        "balance_memory = true".to_owned(),
        format!("memory_min = {}", m.min),
    ];
    if let Some(x) = m.max {
        lines.push(format!("memory_max = {x}"));
    }
    if let Some(x) = m.start {
        lines.push(format!("memory_start = {x}"));
    }
    lines.push(format!("memory_shares = {}", m.shares));
    lines.join("\n")
}

/// Writes `config` to `path` atomically (a temporary file renamed over it).
pub fn save(path: &Path, config: &VmConfig) -> Result<(), ConfigError> {
    crate::state::write_atomic(path, render(config).as_bytes(), 0o644).map_err(|source| {
        ConfigError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<VmConfig, ConfigError> {
        from_text(Path::new("vms/a.toml"), text)
    }

    fn err(text: &str) -> String {
        parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../vms/example.toml");
        let c = from_text(Path::new("vms/example.toml"), text).unwrap();
        assert_eq!(c.policy.vcpus(), 2);
        assert_eq!(c.policy.baseline().percent(), 5.0);
        assert_eq!(c.initial_credits, Credits::from_credits(60.0).unwrap());
        assert_eq!(c.credits, None);
    }

    #[test]
    fn render_round_trips() {
        let c = parse_str(
            "vcpus = 4\nbaseline = 12.5\nmode = \"unlimited\"\ninitial_credits = 7\nmax_credits = 99\ndecline_minutes = 3.5\ncredits = 2\n",
        )
        .unwrap();
        assert_eq!(parse_str(&render(&c)).unwrap(), c);
        let d = parse_str("vcpus = 1\nbaseline = 5\n").unwrap();
        assert_eq!(parse_str(&render(&d)).unwrap(), d);
        let e = parse_str("vcpus = 1\nbaseline = 5\ncpus = \"1,0-0\"\n").unwrap();
        assert_eq!(e.cpus, Some(vec![0, 1]));
        assert_eq!(parse_str(&render(&e)).unwrap(), e);
        let m = parse_str(
            "vcpus = 1\nbaseline = 5\nbalance_memory = true\nmemory_max = 2048\nmemory_start = 512\nmemory_shares = 3\n",
        )
        .unwrap();
        assert_eq!(
            m.memory,
            Some(MemoryConfig {
                min: 200,
                max: Some(2048),
                start: Some(512),
                shares: 3
            })
        );
        assert_eq!(parse_str(&render(&m)).unwrap(), m);
    }

    #[test]
    fn memory_keys_are_validated_with_their_line() {
        let base = "vcpus = 1\nbaseline = 5\nbalance_memory = true\n";
        let e = |extra: &str| err(&format!("{base}{extra}"));
        assert_eq!(
            e("memory_min = 10\n"),
            "vms/a.toml:4: memory_min: 10 is out of range: give 64 to 1073741824"
        );
        assert_eq!(
            e("memory_max = 100\n"),
            "vms/a.toml:4: memory_max: 100 is below memory_min (200)"
        );
        assert_eq!(
            e("memory_max = 500\nmemory_start = 600\n"),
            "vms/a.toml:5: memory_start: 600 is above memory_max (500)"
        );
        assert!(e("memory_shares = 0\n").starts_with("vms/a.toml:4: memory_shares:"));
        assert!(e("memory_min = \"big\"\n").starts_with("vms/a.toml:4: memory_min:"));
        assert!(err("vcpus = 1\nbaseline = 5\nbalance_memory = 1\n")
            .starts_with("vms/a.toml:3: balance_memory:"));
        // Off unless asked for; the keys are still checked.
        assert_eq!(
            parse_str("vcpus = 1\nbaseline = 5\nmemory_min = 300\n")
                .unwrap()
                .memory,
            None
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        assert_eq!(
            err("vcpus = 2\nbaseline = 250\n"),
            "vms/a.toml:2: baseline: baseline must be a percentage per vCPU in (0, 100], got 250"
        );
        assert!(err("vcpus = 2\nbaseline = 5\nturbo = true\n")
            .starts_with("vms/a.toml:3: turbo: unknown field `turbo`"));
        assert!(err("vcpus = 2\nbaseline = 5\nmode = \"fast\"\n")
            .starts_with("vms/a.toml:3: mode: unknown mode"));
        assert!(err("vcpus = 2\n\nbaseline = = 5\n").starts_with("vms/a.toml:3: baseline:"));
        assert!(err("vcpus = 2\n[[[\n").starts_with("vms/a.toml:2: syntax:"));
        assert!(err("vcpus = 0\nbaseline = 5\n").starts_with("vms/a.toml:1: vcpus:"));
        assert!(err("vcpus = -1\nbaseline = 5\n").starts_with("vms/a.toml:1: vcpus:"));
        assert!(err("baseline = 5\n").contains("vcpus: missing"));
        assert!(
            err("vcpus = 2\nbaseline = 5\ncredits = -4\n").starts_with("vms/a.toml:3: credits:")
        );
        assert!(err("vcpus = 2\nbaseline = 5\ndecline_minutes = 0\n")
            .starts_with("vms/a.toml:3: decline_minutes:"));
        assert!(err("vcpus = 2\nbaseline = 5\ncpus = \"1-0\"\n")
            .starts_with("vms/a.toml:3: cpus: \"1-0\": the range runs backwards"));
        assert!(err("vcpus = 2\nbaseline = 5\n\ncpus = [-1]\n").starts_with("vms/a.toml:4: cpus:"));
        assert!(err("vcpus = 2\nbaseline = 5\ncpus = []\n").starts_with("vms/a.toml:3: cpus:"));
        assert!(err("vcpus = 2\nbaseline = 5\ncpus = 1.5\n").starts_with("vms/a.toml:3: cpus:"));
        assert_eq!(
            err("vcpus = 2\nbaseline = \"5\"\n"),
            "vms/a.toml:2: baseline: invalid type: string \"5\", expected f64"
        );
    }
}
