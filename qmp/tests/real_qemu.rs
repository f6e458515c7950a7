//! The client against a real QEMU (TCG), including QEMU dying under it.

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmp::qapi::qmp as q;
use qmp::{Client, Error};

const QEMU: &str = "qemu-system-x86_64";
const T: Duration = Duration::from_secs(10);

/// Whether QEMU can run here: a failure under CI, a loud skip elsewhere.
fn require_qemu() -> bool {
    let ok = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{QEMU} is required in CI");
        eprintln!("\n*** SKIPPED: {QEMU} not found ***\n");
    }
    ok
}

struct Qemu {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Unix socket bound at `path` listens (`/proc/net/unix`: its flags have
/// `__SO_ACCEPTCON`, 0x10000).
fn listening(path: &std::path::Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = path.to_string_lossy();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// A QEMU whose firmware is 64 KiB of `hlt`: the CPU halts at the reset vector.
fn qemu(smp: u32) -> Qemu {
    let dir = tempfile::tempdir().unwrap();
    let bios = dir.path().join("hlt.bin");
    std::fs::write(&bios, vec![0xF4u8; 64 * 1024]).unwrap();
    let socket = dir.path().join("qmp.sock");
    let child = Command::new(QEMU)
        .args([
            "-machine",
            "pc",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "16",
            "-accel",
            "tcg,thread=multi",
        ])
        .arg("-smp")
        .arg(smp.to_string())
        .arg("-bios")
        .arg(&bios)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .spawn()
        .unwrap();
    // Until QEMU listens, not only until the socket exists: it binds the path before it
    // listens, and a connection in between is refused (ECONNREFUSED at the greeting: CI run
    // 17 of this project, once in 344 tests).
    let deadline = Instant::now() + T;
    while !listening(&socket) {
        assert!(Instant::now() < deadline, "no QMP socket listening");
        std::thread::sleep(Duration::from_millis(5));
    }
    Qemu {
        child,
        socket,
        _dir: dir,
    }
}

#[test]
fn handshake_and_typed_commands() {
    if !require_qemu() {
        return;
    }
    let vm = qemu(2);
    let mut c = Client::connect(&vm.socket, T).unwrap();
    assert!(c.version().major >= 7);
    let cpus = c.execute(q::query_cpus_fast {}).unwrap();
    assert_eq!(cpus.len(), 2);
    let status = c.execute(q::query_status {}).unwrap();
    assert!(status.running);
}

#[test]
fn stop_and_cont_deliver_events() {
    if !require_qemu() {
        return;
    }
    let vm = qemu(1);
    let mut c = Client::connect(&vm.socket, T).unwrap();
    c.execute(q::stop {}).unwrap();
    let stop = c.wait_event(T).unwrap().expect("STOP event");
    assert_eq!(stop.name, "STOP");
    assert!(!c.execute(q::query_status {}).unwrap().running);
    c.execute(q::cont {}).unwrap();
    assert_eq!(
        c.wait_event(T).unwrap().expect("RESUME event").name,
        "RESUME"
    );
}

#[test]
fn an_error_reply_from_qemu_is_typed() {
    if !require_qemu() {
        return;
    }
    let vm = qemu(1);
    let mut c = Client::connect(&vm.socket, T).unwrap();
    // x-exit-preconfig is refused outside the preconfig state.
    let err = c.execute(q::x_exit_preconfig {}).unwrap_err();
    assert!(
        matches!(&err, Error::Qmp { command: "x-exit-preconfig", class, .. } if class == "GenericError"),
        "{err:?}"
    );
}

#[test]
fn qemu_dying_mid_session_is_an_error_not_a_panic() {
    if !require_qemu() {
        return;
    }
    let mut vm = qemu(1);
    let mut c = Client::connect(&vm.socket, T).unwrap();
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    let err = c.execute(q::query_status {}).unwrap_err();
    assert!(
        matches!(err, Error::Closed(_) | Error::Io { .. }),
        "{err:?}"
    );
}

#[test]
fn qemu_quitting_while_we_wait_for_the_reply_is_closed() {
    if !require_qemu() {
        return;
    }
    let vm = qemu(1);
    let mut c = Client::connect(&vm.socket, T).unwrap();
    // `quit` replies and then closes; the next command meets EOF.
    c.execute(q::quit {}).unwrap();
    let err = c.execute(q::query_status {}).unwrap_err();
    assert!(
        matches!(err, Error::Closed(_) | Error::Io { .. }),
        "{err:?}"
    );
    drop(vm);
}

#[test]
fn a_second_client_waits_rather_than_breaking_the_first() {
    if !require_qemu() {
        return;
    }
    let vm = qemu(1);
    let mut first = Client::connect(&vm.socket, T).unwrap();
    // QEMU serves one monitor client at a time: the second connection is accepted by the
    // kernel but gets no greeting until the first leaves.
    let second = UnixStream::connect(&vm.socket).unwrap();
    let err = Client::handshake(second, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(first.execute(q::query_status {}).unwrap().running);
}
