//! Small things every layer uses: VM names, CPU lists, clocks, and I/O errors with what was
//! being done. No policy, no state; nothing here imports another module of the crate.

use std::io;

use thiserror::Error;

/// Longest VM name, in bytes.
pub const MAX_NAME: usize = 64;

/// The agent's own files in a state dir, where each VM has a dir named as the VM: a VM of one
/// of these names would collide with the file.
pub const STATE_DIR_FILES: [&str; 6] = [
    "agent.lock",
    "agent.log",
    "agent.requests",
    "metrics.addr",
    "scx.json",
    "libvirt.json",
];

/// Checks a VM name: letters, digits, `-`, `_`, `.`; not `.` or `..` nor one of the agent's
/// files ([`STATE_DIR_FILES`]); 1–64 bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "VM name {name:?} must be 1 to {MAX_NAME} bytes long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("VM name {name:?} is not allowed"));
    }
    if STATE_DIR_FILES.contains(&name) {
        return Err(format!(
            "VM name {name:?} is the name of one of the agent's files in the state dir: \
             choose another"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "VM name {name:?} contains {c:?}: use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The highest CPU number a CPU list may name: affinity masks here are glibc's `cpu_set_t`
/// (nix's `CpuSet`), 1024 CPUs.
pub const MAX_CPU: u32 = 1023;

/// Parses a CPU list as the kernel writes them (`cpuset.cpus`, `/sys/devices/system/cpu/online`):
/// `0-3,6`, `2`, ranges and single CPUs separated by commas, spaces allowed around each part.
/// Sorted, without duplicates; an empty list is an error.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|&c| c <= MAX_CPU)
                .ok_or_else(|| format!("{part:?} is not a CPU number or range (0–{MAX_CPU})"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if b < a {
            return Err(format!("{part:?}: the range runs backwards"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err("an empty CPU list".into());
    }
    Ok(out)
}

/// A CPU list as the kernel writes it: `0-3,6`.
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// `CLOCK_BOOTTIME` in ns: monotonic, and counts suspended time, during which credits accrue.
pub fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Unix time now, in seconds (with the fraction).
pub fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Unix time now, in ns (the clock two hosts share: a libvirt domain's credit checkpoint).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Unix time now, in whole seconds.
pub fn unix_now() -> u64 {
    unix_now_f64() as u64
}

/// An error and its causes, one after another: `what: why: why`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

/// An I/O failure with what was being done when it happened.
#[derive(Debug, Error)]
#[error("{context}")]
pub struct IoFailure {
    /// What was being done (`creating /run/burst-qemu`).
    pub context: String,
    /// Why it failed.
    #[source]
    pub source: io::Error,
}

impl IoFailure {
    /// A failure of `source` while doing `context`.
    pub fn of(context: impl Into<String>, source: impl Into<io::Error>) -> IoFailure {
        IoFailure {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Adds what was being done to an [`io::Error`].
pub trait IoContext<T> {
    /// The error, as an [`IoFailure`] saying `context`.
    fn doing(self, context: impl FnOnce() -> String) -> Result<T, IoFailure>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn doing(self, context: impl FnOnce() -> String) -> Result<T, IoFailure> {
        self.map_err(|source| IoFailure {
            context: context(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn doing(self, context: impl FnOnce() -> String) -> Result<T, IoFailure> {
        self.map_err(|errno| IoFailure {
            context: context(),
            source: errno.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert!(validate_name("web-1_a.b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(64)).is_ok());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn cpu_lists_parse_ranges_everywhere_and_refuse_garbage() {
        assert_eq!(parse_cpu_list("0-3,6"), Ok(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_cpu_list(" 2 "), Ok(vec![2]));
        assert_eq!(parse_cpu_list("3,1-2,2"), Ok(vec![1, 2, 3]));
        assert_eq!(
            parse_cpu_list("1-0"),
            Err("\"1-0\": the range runs backwards".into())
        );
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("1,,2").is_err());
        assert!(parse_cpu_list("-1").is_err());
        assert!(parse_cpu_list("1024").is_err());
        assert_eq!(parse_cpu_list("1023"), Ok(vec![1023]));
    }

    #[test]
    fn cpu_lists_format_as_the_kernel_writes_them() {
        assert_eq!(format_cpu_list(&[6, 0, 1, 2, 3]), "0-3,6");
        assert_eq!(format_cpu_list(&[5]), "5");
        assert_eq!(format_cpu_list(&[1, 3, 5]), "1,3,5");
        for text in ["0-3,6", "1", "0,2-4,9-10"] {
            assert_eq!(format_cpu_list(&parse_cpu_list(text).unwrap()), text);
        }
    }

    #[test]
    fn io_failures_say_what_was_being_done_and_keep_their_cause() {
        let e = std::fs::read("/nonexistent/x")
            .doing(|| "reading /nonexistent/x".into())
            .unwrap_err();
        assert_eq!(e.to_string(), "reading /nonexistent/x");
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
    }
}
