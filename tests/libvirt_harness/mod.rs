//! The harness of `tests/libvirt.rs`: starting libvirtd (and a second one for migration),
//! test domains that clean up after themselves, CPU-time and lifecycle helpers.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use burst_qemu::source::libvirt::conn::{Connection, Domain, Scope};
use burst_qemu::source::libvirt::discover::{self, Expected};
use burst_qemu::source::libvirt::lifecycle::{self, Event};
use burst_qemu::source::libvirt::status;
use burst_qemu::testguest::{self, Behaviour};

use crate::common;

pub const URI: &str = "qemu:///system";
pub const RUN_DIR: &str = status::SYSTEM_RUN_DIR;
pub const IMAGES: &str = "/var/lib/libvirt/images";

pub fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("virsh runs (apt-get install libvirt-clients)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn libvirtd_pid() -> Option<u32> {
    let pid: u32 = fs::read_to_string("/run/libvirtd.pid")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// A daemon's command: no descriptor of ours but /dev/null on 0-2. A daemon keeps what it
/// inherits: with the CPU lock (`flock /work/.cpu.lock cargo …`) it held that lock for the
/// rest of its life, and with nextest's output pipes it would keep the test from ending.
pub fn daemon(program: &str) -> Command {
    let mut c = detached(program);
    c.arg("-d");
    c
}

/// `program` with no descriptor of ours (see [`daemon`]).
pub fn detached(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut c = Command::new(program);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: close_range is async-signal-safe and touches only descriptors above 2.
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    c
}

/// Starts virtlogd and libvirtd (no systemd here) and waits until the connection opens.
pub fn start_libvirtd() -> Result<Connection, String> {
    fs::create_dir_all("/var/log/libvirt").map_err(|e| e.to_string())?;
    // A second virtlogd exits at once on its pid file lock: harmless.
    let _ = daemon("virtlogd").status();
    let started = daemon("libvirtd")
        .status()
        .map_err(|e| format!("libvirtd: {e}"))?;
    if !started.success() {
        return Err(format!("libvirtd -d: {started}"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Connection::open(URI) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => sleep(Duration::from_millis(200)),
        }
    }
}

/// A connection to the system libvirtd, started when none runs. `None`: skipped (not in CI).
pub fn require_libvirtd() -> Option<Connection> {
    if !common::require_qemu() {
        return None;
    }
    if let Ok(c) = Connection::open(URI) {
        remove_leftovers();
        return Some(c);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip_or_fail("libvirtd is not running and only root can start it");
        return None;
    }
    match start_libvirtd() {
        Ok(c) => {
            remove_leftovers();
            Some(c)
        }
        Err(e) => {
            common::skip_or_fail(&format!(
                "no libvirtd at {URI} and it could not be started ({e}); apt-get install \
                 libvirt-daemon-system libvirt-clients (bash .ci/run does)"
            ));
            None
        }
    }
}

/// Destroys and undefines the test domains of test processes that no longer run
/// (`bq-test-PID-*`, PID gone): a test killed mid-run (a timeout, a crash, a daemon restart that
/// took its connection) leaves its domain running, and one such domain burnt 0.9 of a core for
/// the rest of a full run, spoiling every CPU-share figure after it.
pub fn remove_leftovers() {
    let (_, names) = virsh(&["list", "--all", "--name"]);
    for name in names.lines().map(str::trim) {
        let Some(pid) = name
            .strip_prefix("bq-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("libvirt harness: removing {name}, left by test process {pid} that is gone");
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", "--nvram", name]);
        let _ = virsh(&["undefine", name]);
    }
}

/// A test domain and its files, destroyed, undefined and removed on drop.
pub struct TestDomain<'c> {
    pub conn: &'c Connection,
    pub name: String,
    pub files: Vec<PathBuf>,
}

impl<'c> TestDomain<'c> {
    /// Defines and starts a TCG domain of `vcpus` vCPUs running the test firmware.
    pub fn start(conn: &'c Connection, tag: &str, vcpus: u32, behaviour: Behaviour) -> Self {
        let d = Self::define(conn, tag, vcpus, behaviour);
        d.domain().start().expect("the domain starts");
        d
    }

    pub fn define(conn: &'c Connection, tag: &str, vcpus: u32, behaviour: Behaviour) -> Self {
        Self::define_with(
            conn,
            tag,
            behaviour,
            &format!("<vcpu placement='static'>{vcpus}</vcpu>"),
            "",
        )
    }

    /// Defines a domain of the test firmware with `vcpu` (the `<vcpu>` element) and `extra`
    /// elements in `<domain>` (a `<metadata>`, say).
    pub fn define_with(
        conn: &'c Connection,
        tag: &str,
        behaviour: Behaviour,
        vcpu: &str,
        extra: &str,
    ) -> Self {
        let name = format!("bq-test-{}-{tag}", std::process::id());
        let firmware = PathBuf::from(format!("{IMAGES}/{name}.bin"));
        fs::create_dir_all(IMAGES).unwrap();
        testguest::write(&firmware, behaviour).unwrap();
        let d = TestDomain {
            conn,
            name: name.clone(),
            files: vec![firmware.clone()],
        };
        d.remove_domain();
        let xml = format!(
            "<domain type='qemu'>\
               <name>{name}</name>\
               <memory unit='MiB'>32</memory>\
               {vcpu}{extra}\
               <os><type arch='x86_64' machine='pc'>hvm</type>\
                 <loader type='rom'>{}</loader></os>\
               <on_crash>destroy</on_crash>\
               <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
                 <memballoon model='virtio'/></devices>\
             </domain>",
            firmware.display()
        );
        conn.define(&xml).expect("the test domain is defined");
        d
    }

    /// Starts a domain whose config element `<config …/>` (burst-qemu's settings) is in its
    /// `<metadata>`: opted in from its first start.
    pub fn start_opted_in(
        conn: &'c Connection,
        tag: &str,
        vcpus: u32,
        behaviour: Behaviour,
        config: &str,
    ) -> Self {
        let d = Self::define_with(
            conn,
            tag,
            behaviour,
            &format!("<vcpu placement='static'>{vcpus}</vcpu>"),
            &metadata_element(config),
        );
        d.domain().start().expect("the domain starts");
        d
    }

    pub fn domain(&self) -> Domain {
        self.conn
            .domain(&self.name)
            .expect("the test domain exists")
    }

    /// The running domain's facts (the status file is rewritten a moment after the start
    /// returns: up to 5 s of retries on a stale or missing file).
    pub fn found(&self) -> discover::Found {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let d = self.domain();
            let (uuid, vcpus) = (d.uuid(), d.vcpus(Scope::Live).unwrap());
            let expected = Expected {
                uuid: &uuid,
                name: &self.name,
                id: d.id().expect("the domain is running"),
                vcpus,
            };
            match discover::discover(Path::new(RUN_DIR), Path::new("/proc"), &expected) {
                Ok(found) => return found,
                Err(e) if Instant::now() > deadline => panic!("{}: {e}", self.name),
                Err(_) => sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn remove_domain(&self) {
        if let Ok(d) = self.conn.domain(&self.name) {
            let _ = d.destroy();
            let _ = d.undefine();
        } else if let Ok(fresh) = Connection::open(URI) {
            // The test's connection died with a libvirtd it restarted: a domain left running
            // by a failed test burnt a CPU for the rest of a CI run. (Names are unique to the
            // test process, so the host's daemon holds no other domain of this name.)
            if let Ok(d) = fresh.domain(&self.name) {
                let _ = d.destroy();
                let _ = d.undefine();
            }
        }
    }
}

impl Drop for TestDomain<'_> {
    fn drop(&mut self) {
        self.remove_domain();
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// A `<metadata>` element holding burst-qemu's settings element `config` (`<config …/>`).
pub fn metadata_element(config: &str) -> String {
    let inner = config.replacen(
        "<config",
        "<bq:config xmlns:bq='urn:burst-qemu:config:1'",
        1,
    );
    format!("<metadata>{inner}</metadata>")
}

/// The pattern of this test process's domains, for `agent --libvirt-domains`.
pub fn own_domains() -> String {
    format!("bq-test-{}-*", std::process::id())
}

/// CPU time of each thread over `interval`, ns (one reader, both ends: DESIGN.md).
pub fn cpu_over(pid: u32, tids: &[u32], interval: Duration) -> Vec<u64> {
    let read = || -> Vec<u64> {
        tids.iter()
            .map(|&t| {
                burst_qemu::procfs::Proc::host()
                    .thread_cpu_ns(pid, t)
                    .unwrap_or(0)
            })
            .collect()
    };
    let before = read();
    sleep(interval);
    read()
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(b))
        .collect()
}

/// Polls until `done` accepts the events since the first poll, or 20 s pass.
pub fn wait_events(conn: &Connection, before: &[lifecycle::Seen], uuid: &str, want: &[Event]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = conn.poll().unwrap();
        let events: Vec<Event> = lifecycle::diff(Some(before), &now)
            .into_iter()
            .filter(|e| format!("{e:?}").contains(uuid))
            .collect();
        if events == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "events {events:?}, wanted {want:?}"
        );
        sleep(Duration::from_millis(200));
    }
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A second libvirtd on this machine, a migration destination: its own mount namespace with
/// its own `/run`, a copy of `/etc/libvirt` and of `/var/cache/libvirt` (QEMU's capabilities as
/// the first daemon probed them, which libvirt checks against the binaries before it trusts
/// them; with an empty cache it probed QEMU again, and the migration test took 7.9-8.3 s here
/// against 5.0-5.1 s with the copy, three runs each, 2026-12-08), empty `/var/lib/libvirt/qemu`
/// and `/var/log/libvirt`; TCP on 127.0.0.1 without authentication; its own host UUID (libvirt
/// refuses to migrate to a host with its own UUID). Network and cgroup tree are shared. Its
/// domains are destroyed and it and its virtlogd are stopped on drop.
pub struct SecondLibvirtd {
    pub libvirtd: std::process::Child,
    pub uri: String,
    _dir: tempfile::TempDir,
}

impl SecondLibvirtd {
    pub fn start() -> SecondLibvirtd {
        let dir = tempfile::Builder::new()
            .prefix("bq-libvirtd2-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        for (from, to) in [("/etc/libvirt", "etc"), ("/var/cache/libvirt", "cache")] {
            let copied = Command::new("cp")
                .args(["-a", from])
                .arg(d.join(to))
                .status()
                .unwrap();
            assert!(copied.success(), "cp -a {from}: {copied}");
        }
        // Not the host's persistent domains.
        let _ = fs::remove_dir_all(d.join("etc/qemu"));
        fs::create_dir_all(d.join("etc/qemu")).unwrap();
        fs::create_dir_all(d.join("log/qemu")).unwrap();
        let port = free_port();
        let mut conf = fs::read_to_string(d.join("etc/libvirtd.conf")).unwrap();
        conf.push_str(&format!(
            "\nlisten_tls = 0\nlisten_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{port}\"\n\
             auth_tcp = \"none\"\nhost_uuid = \"6b1d3c52-8a4e-4f0e-9d2b-2f0a5e7c1b21\"\n"
        ));
        fs::write(d.join("etc/libvirtd.conf"), conf).unwrap();
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /run; mount --bind {d}/etc /etc/libvirt; \
             mount -t tmpfs tmpfs /var/lib/libvirt/qemu; mount --bind {d}/cache /var/cache/libvirt; \
             mount --bind {d}/log /var/log/libvirt; virtlogd -d; \
             exec libvirtd --listen -f /etc/libvirt/libvirtd.conf",
            d = d.display()
        );
        let libvirtd = detached("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .unwrap();
        let second = SecondLibvirtd {
            libvirtd,
            uri: format!("qemu+tcp://127.0.0.1:{port}/system"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Connection::open(&second.uri).is_err() {
            assert!(
                Instant::now() < deadline,
                "the second libvirtd did not answer"
            );
            sleep(Duration::from_millis(200));
        }
        second
    }

    /// Its QEMU run dir, seen through its mount namespace.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{RUN_DIR}", self.libvirtd.id()))
    }
}

impl Drop for SecondLibvirtd {
    fn drop(&mut self) {
        if let Ok(conn) = Connection::open(&self.uri) {
            for d in conn.domains().unwrap_or_default() {
                let _ = d.destroy();
                let _ = d.undefine();
            }
        }
        // Its virtlogd: the one in its mount namespace.
        let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let ours = ns(&self.libvirtd.id().to_string());
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "virtlogd" && ns(&pid).is_some() && ns(&pid) == ours {
                let _ = Command::new("kill").arg(&pid).status();
            }
        }
        let _ = self.libvirtd.kill();
        let _ = self.libvirtd.wait();
    }
}

/// A Linux guest prepared by `tests/guest/run --prepare DIR` (kernel, initramfs, the host's
/// root over 9p) run as a libvirt domain: QEMU as root without relabelling (as the wrapper's
/// guests run; libvirt's `libvirt-qemu` user could not read the scratch files), the console to
/// a file, a virtio balloon, burst-qemu's `<config>` in its `<metadata>`. Destroyed and
/// undefined on drop.
pub struct GuestDomain {
    pub conn: Connection,
    pub name: String,
}

impl GuestDomain {
    pub fn start(
        tag: &str,
        prepared: &Path,
        console: &Path,
        memory_mib: u64,
        config: &str,
    ) -> Self {
        let conn = Connection::open(URI).expect("libvirtd answers");
        let name = format!("bq-test-{}-{tag}", std::process::id());
        let args = fs::read_to_string(prepared.join("qemu-args")).unwrap();
        let args: Vec<&str> = args.lines().collect();
        let after = |opt: &str| {
            args.iter()
                .position(|a| *a == opt)
                .map(|i| args[i + 1].to_owned())
                .unwrap_or_else(|| panic!("no {opt} in qemu-args"))
        };
        let esc = burst_qemu::source::libvirt::metadata::escape;
        let xml = format!(
            "<domain type='qemu'>\
               <name>{name}</name>\
               <memory unit='MiB'>{memory_mib}</memory>\
               <currentMemory unit='MiB'>{memory_mib}</currentMemory>\
               <vcpu placement='static'>1</vcpu>{meta}\
               <os><type arch='x86_64' machine='pc'>hvm</type>\
                 <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>\
               <features><acpi/></features>\
               <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>\
               <on_crash>destroy</on_crash>\
               <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\
               <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
                 <filesystem type='mount' accessmode='squash' multidevs='remap'>\
                   <source dir='/'/><target dir='host'/><readonly/></filesystem>\
                 <serial type='file'><source path='{console}'/><target port='0'/></serial>\
                 <memballoon model='virtio'/></devices>\
             </domain>",
            meta = metadata_element(config),
            kernel = esc(&after("-kernel")),
            initrd = esc(&after("-initrd")),
            cmdline = esc(&after("-append")),
            console = esc(&console.display().to_string()),
        );
        if let Ok(d) = conn.domain(&name) {
            let _ = d.destroy();
            let _ = d.undefine();
        }
        conn.define(&xml).expect("the guest domain is defined");
        conn.domain(&name)
            .unwrap()
            .start()
            .expect("the guest domain starts");
        GuestDomain { conn, name }
    }

    /// Whether it still runs (its guest powers off when its command is done).
    pub fn running(&self) -> bool {
        self.conn.domain(&self.name).is_ok_and(|d| d.id().is_some())
    }
}

impl Drop for GuestDomain {
    fn drop(&mut self) {
        if let Ok(d) = self.conn.domain(&self.name) {
            let _ = d.destroy();
            let _ = d.undefine();
        }
    }
}

/// Stops the host's libvirtd (SIGTERM) and waits until it has exited; its pid.
pub fn stop_libvirtd() -> u32 {
    let pid = libvirtd_pid().expect("libvirtd's pid file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "libvirtd {pid} did not exit");
        sleep(Duration::from_millis(100));
    }
    pid
}
