//! Reading QEMU's command line: the options burst-qemu looks at (`-smp`, `-name`, `-qmp`, `-m`,
//! `-device`, descriptors passed with `fd=`) and the ones it adds for a memory-balanced VM.
//! Pure functions of the arguments.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config;

/// The arguments a memory-balanced VM needs beyond the user's: a balloon device when QEMU has
/// none (`-device virtio-balloon-pci,id=balloon0`), and `-m memory_max` when QEMU has no `-m`
/// (the VM boots at its ceiling and is ballooned down to `memory_start`, as libvirt does for
/// currentMemory).
pub fn memory_args(args: &[OsString], m: &config::MemoryConfig) -> Vec<String> {
    let mut extra = Vec::new();
    let has_balloon = option(args, "device").iter().any(|(_, v)| {
        v.split(',')
            .next()
            .is_some_and(|d| d.starts_with("virtio-balloon"))
    });
    if !has_balloon {
        extra.extend(["-device".to_owned(), BALLOON_DEVICE.to_owned()]);
    }
    if let (Some(max), true) = (m.max, option(args, "m").is_empty()) {
        extra.extend(["-m".to_owned(), format!("{max}M")]);
    }
    extra
}

/// The balloon device the launcher adds (its QOM path is `/machine/peripheral/balloon0`).
pub const BALLOON_DEVICE: &str = "virtio-balloon-pci,id=balloon0";

pub(super) fn option<'a>(args: &'a [OsString], opt: &str) -> Vec<(usize, &'a str)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        let bare = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        if bare == Some(opt) {
            if let Some(v) = args.get(i + 1).and_then(|v| v.to_str()) {
                found.push((i, v));
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    found
}

/// The number of vCPUs a `-smp` value starts with: `cpus` (or the leading bare number), else
/// the product of the topology given, as QEMU computes it.
pub fn smp_cpus(value: &str) -> Result<u32, String> {
    let mut product: Option<u64> = None;
    for (i, part) in value.split(',').enumerate() {
        let (key, val) = match part.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 => ("cpus", part),
            None => return Err(format!("-smp {value}: cannot read {part:?}")),
        };
        let n = || {
            val.parse::<u64>()
                .map_err(|_| format!("-smp {value}: {key}={val:?} is not a number"))
        };
        match key {
            "cpus" => {
                return u32::try_from(n()?).map_err(|_| format!("-smp {value}: too many CPUs"))
            }
            "sockets" | "dies" | "clusters" | "cores" | "threads" | "books" | "drawers" => {
                product = Some(product.unwrap_or(1) * n()?);
            }
            _ => {}
        }
    }
    u32::try_from(product.unwrap_or(1)).map_err(|_| format!("-smp {value}: too many CPUs"))
}

/// The guest name in a QEMU `-name` value (`foo`, `guest=foo,…` or `foo,debug-threads=on`).
pub fn qemu_name(value: &str) -> Option<&str> {
    value
        .split(',')
        .enumerate()
        .find_map(|(i, part)| match part.split_once('=') {
            Some(("guest", v)) => Some(v),
            None if i == 0 && !part.is_empty() => Some(part),
            _ => None,
        })
}

/// The path of a QMP Unix socket the operator passed with `-qmp unix:PATH,server…`.
pub fn user_qmp_socket(args: &[OsString]) -> Option<PathBuf> {
    option(args, "qmp").into_iter().find_map(|(_, v)| {
        let rest = v.strip_prefix("unix:")?;
        let mut parts = rest.split(',');
        let path = parts.next()?;
        parts
            .any(|p| p == "server" || p.starts_with("server=on"))
            .then(|| PathBuf::from(path))
    })
}

/// The descriptors QEMU's arguments name as inherited: `fd=N`, `fds=N:M…`, `vhostfd=N`,
/// `vhostfds=N:M…` in any option (`-netdev tap,fd=3`, `-add-fd fd=4,set=1`). They stay open in
/// QEMU; every other descriptor above 2 is closed on exec.
pub(super) fn passed_fds(args: &[OsString]) -> Vec<i32> {
    let mut fds = Vec::new();
    for arg in args {
        for part in arg.to_string_lossy().split(',') {
            if let Some((key, value)) = part.split_once('=') {
                if matches!(key, "fd" | "fds" | "vhostfd" | "vhostfds") {
                    fds.extend(value.split(':').filter_map(|v| v.parse::<i32>().ok()));
                }
            }
        }
    }
    fds.retain(|&fd| fd > 2);
    fds
}

/// Whether QEMU puts a console on the terminal the launcher was started from.
pub(super) fn console_on_terminal(args: &[OsString]) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(0) } == 1;
    tty && args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == "-nographic" || a == "--nographic" || a.contains("stdio")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }
    #[test]
    fn smp_counts_cpus_as_qemu_does() {
        assert_eq!(smp_cpus("2"), Ok(2));
        assert_eq!(smp_cpus("4,maxcpus=8"), Ok(4));
        assert_eq!(smp_cpus("cpus=3,sockets=1"), Ok(3));
        assert_eq!(smp_cpus("sockets=2,cores=2,threads=2"), Ok(8));
        assert_eq!(smp_cpus("maxcpus=4"), Ok(1));
        assert!(smp_cpus("two").is_err());
    }

    #[test]
    fn qemu_names_are_read_from_every_form() {
        assert_eq!(qemu_name("web"), Some("web"));
        assert_eq!(qemu_name("web,debug-threads=on"), Some("web"));
        assert_eq!(qemu_name("process=p,guest=db"), Some("db"));
        assert_eq!(qemu_name("process=p"), None);
    }

    #[test]
    fn user_qmp_unix_server_sockets_are_found() {
        let args = os(&[
            "-m",
            "64",
            "-qmp",
            "tcp:localhost:4444,server",
            "--qmp",
            "unix:/tmp/q.sock,server=on,wait=off",
        ]);
        assert_eq!(user_qmp_socket(&args), Some(PathBuf::from("/tmp/q.sock")));
        assert_eq!(user_qmp_socket(&os(&["-qmp", "unix:/tmp/q.sock"])), None);
        assert_eq!(
            user_qmp_socket(&os(&["-qmp", "unix:/tmp/q.sock,server,nowait"])),
            Some(PathBuf::from("/tmp/q.sock"))
        );
    }

    #[test]
    fn memory_balanced_vms_get_a_balloon_and_boot_at_their_max() {
        let m = config::MemoryConfig {
            min: 200,
            max: Some(2048),
            start: Some(512),
            shares: 1000,
        };
        assert_eq!(
            memory_args(&os(&["-kernel", "k"]), &m),
            ["-device", BALLOON_DEVICE, "-m", "2048M"]
        );
        assert!(
            memory_args(&os(&["-m", "1G", "-device", "virtio-balloon-pci,id=b"]), &m).is_empty()
        );
    }
}
