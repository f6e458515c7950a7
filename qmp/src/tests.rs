//! The client against scripted conversations on a socket pair: a fake QEMU in a thread that
//! sends exactly the bytes each test gives it and checks what the client sends.

use super::*;
use std::io::{BufRead, BufReader};
use std::thread;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;

/// One step of the fake QEMU: send bytes, or read one command and check it names `execute`.
enum Step {
    Send(&'static str),
    Expect(&'static str),
    /// Reads nothing for this many milliseconds (a stopped QEMU).
    Hold(u64),
    Close,
}
use Step::*;

/// Runs `script` on one end; returns the other. The fake answers commands with the id the
/// client used: `{ID}` in a sent line is replaced with the id of the last command read.
fn fake_qemu(script: Vec<Step>) -> (UnixStream, thread::JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handle = thread::spawn(move || {
        let mut reader = BufReader::new(theirs.try_clone().unwrap());
        let mut writer = theirs;
        let mut last_id = Value::Null;
        for step in script {
            match step {
                Send(text) => {
                    let text = text.replace("{ID}", &last_id.to_string());
                    if writer.write_all(text.as_bytes()).is_err() {
                        return;
                    }
                }
                Expect(name) => {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd: Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(cmd["execute"], name, "client sent {line}");
                    last_id = cmd["id"].clone();
                }
                Hold(ms) => thread::sleep(Duration::from_millis(ms)),
                Close => return,
            }
        }
        // Keep the connection open until the client is done.
        let _ = reader.read_line(&mut String::new());
    });
    (ours, handle)
}

fn connected(rest: Vec<Step>) -> (Client, thread::JoinHandle<()>) {
    let mut script = vec![
        Send(GREETING),
        Send("\r\n"),
        Expect("qmp_capabilities"),
        Send("{\"return\": {}, \"id\": {ID}}\r\n"),
    ];
    script.extend(rest);
    let (stream, handle) = fake_qemu(script);
    let client = Client::handshake(stream, Duration::from_secs(5)).expect("handshake");
    (client, handle)
}

const T: Duration = Duration::from_secs(5);

#[test]
fn handshake_reads_the_version() {
    let (client, _h) = connected(vec![]);
    assert_eq!(
        client.version(),
        Version {
            major: 7,
            minor: 2,
            micro: 0
        }
    );
}

#[test]
fn eof_in_the_greeting_is_closed_not_a_panic() {
    let (stream, _h) = fake_qemu(vec![Send(r#"{"QMP": {"vers"#), Close]);
    let err = Client::handshake(stream, T).unwrap_err();
    assert!(matches!(err, Error::Closed(Phase::Greeting)), "{err:?}");
}

#[test]
fn eof_before_any_byte_is_closed() {
    let (stream, _h) = fake_qemu(vec![Close]);
    assert!(matches!(
        Client::handshake(stream, T),
        Err(Error::Closed(Phase::Greeting))
    ));
}

#[test]
fn a_greeting_that_is_not_qmp_is_garbage() {
    let (stream, _h) = fake_qemu(vec![Send("{\"hello\": 1}\n")]);
    let err = Client::handshake(stream, T).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Garbage {
                phase: Phase::Greeting,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn eof_in_a_reply_is_closed() {
    let (mut c, _h) = connected(vec![
        Expect("query-status"),
        Send("{\"return\": {\"runn"),
        Close,
    ]);
    let err = c.execute(&qapi::qmp::query_status {}).unwrap_err();
    assert!(
        matches!(err, Error::Closed(Phase::Reply("query-status"))),
        "{err:?}"
    );
}

#[test]
fn an_error_reply_is_typed() {
    let (mut c, _h) = connected(vec![
        Expect("cont"),
        Send("{\"id\": {ID}, \"error\": {\"class\": \"GenericError\", \"desc\": \"Resetting the Virtual Machine is required\"}}\n"),
    ]);
    match c.execute(&qapi::qmp::cont {}) {
        Err(Error::Qmp {
            command,
            class,
            desc,
        }) => {
            assert_eq!((command, class.as_str()), ("cont", "GenericError"));
            assert!(desc.contains("Resetting"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn events_interleaved_with_a_reply_are_queued_in_order() {
    let (mut c, _h) = connected(vec![
        Expect("stop"),
        Send("{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\n"),
        Send("{\"timestamp\": {\"seconds\": 1, \"microseconds\": 3}, \"event\": \"X-FUTURE\", \"data\": {\"a\": 1}}\n"),
        Send("{\"return\": {}, \"id\": {ID}}\n"),
        Send("{\"timestamp\": {\"seconds\": 2, \"microseconds\": 0}, \"event\": \"RESUME\"}\n"),
    ]);
    c.execute(&qapi::qmp::stop {}).unwrap();
    let events = c.take_events();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["STOP", "X-FUTURE"]);
    assert!(matches!(
        events[0].typed(),
        Some(qapi::qmp::Event::STOP { .. })
    ));
    assert_eq!(
        events[1].typed().map(|_| ()),
        None,
        "unknown events stay raw"
    );
    assert_eq!(events[1].data["a"], 1);
    assert_eq!(c.wait_event(T).unwrap().unwrap().name, "RESUME");
}

#[test]
fn an_event_read_with_a_reply_but_after_it_is_pending_though_the_socket_is_drained() {
    let (mut c, _h) = connected(vec![
        Expect("stop"),
        Send("{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\n{\"return\": {}, \"id\": {ID}}\n{\"timestamp\": {\"seconds\": 2, \"microseconds\": 0}, \"event\": \"RESUME\"}\n"),
    ]);
    c.execute(&qapi::qmp::stop {}).unwrap();
    assert_eq!(c.take_events().len(), 1);
    // One write: the RESUME line came in the same read as the reply.
    assert!(c.pending(), "RESUME is buffered, and poll would not say so");
    assert_eq!(c.wait_event(T).unwrap().unwrap().name, "RESUME");
    assert!(!c.pending());
}

#[test]
fn a_garbage_line_is_an_error_not_a_panic() {
    let (mut c, _h) = connected(vec![
        Expect("query-status"),
        Send("\u{1}\u{2} not json at all\n"),
    ]);
    let err = c.execute(&qapi::qmp::query_status {}).unwrap_err();
    assert!(matches!(err, Error::Garbage { .. }), "{err:?}");
}

#[test]
fn a_reply_of_the_wrong_shape_is_garbage() {
    let (mut c, _h) = connected(vec![
        Expect("query-status"),
        Send("{\"return\": [1, 2], \"id\": {ID}}\n"),
    ]);
    let err = c.execute(&qapi::qmp::query_status {}).unwrap_err();
    assert!(matches!(err, Error::Garbage { .. }), "{err:?}");
}

#[test]
fn silence_is_a_timeout_and_a_late_reply_is_skipped() {
    let (mut c, _h) = connected(vec![
        Expect("stop"),
        // No reply to stop until after the client gave up and sent cont.
        Expect("cont"),
        Send("{\"return\": {}, \"id\": 2}\n"),
        Send("{\"return\": {}, \"id\": {ID}}\n"),
    ]);
    c.set_timeout(Duration::from_millis(100));
    assert!(matches!(
        c.execute(&qapi::qmp::stop {}),
        Err(Error::Timeout { .. })
    ));
    c.set_timeout(T);
    c.execute(&qapi::qmp::cont {})
        .expect("the late stop reply is skipped");
}

#[test]
fn wait_event_returns_none_on_silence() {
    let (mut c, _h) = connected(vec![]);
    assert_eq!(c.wait_event(Duration::from_millis(50)).unwrap(), None);
}

#[test]
fn a_peer_that_hung_up_fails_the_next_command_cleanly() {
    let (mut c, h) = connected(vec![Close]);
    h.join().unwrap();
    let err = c.execute(&qapi::qmp::query_status {}).unwrap_err();
    assert!(matches!(err, Error::Closed(_)), "{err:?}");
}

#[test]
fn a_qemu_that_reads_nothing_fails_a_write_within_the_timeout() {
    // A command larger than the socket's buffer, to a QEMU that reads nothing for 10 s.
    let (mut c, _h) = connected(vec![Hold(10_000)]);
    c.set_timeout(Duration::from_millis(200));
    let t = Instant::now();
    let err = c
        .execute(&qapi::qmp::human_monitor_command {
            command_line: "x".repeat(8 << 20),
            cpu_index: None,
        })
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_full_listen_backlog_fails_the_connect_within_the_timeout() {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    // A listener that never accepts, with QEMU's backlog of 1.
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    socket::listen(&listener, Backlog::new(1).unwrap()).unwrap();
    let timeout = Duration::from_millis(200);
    let mut held = Vec::new();
    let err = loop {
        assert!(held.len() < 100, "the backlog never filled");
        match connect_within(&path, timeout) {
            Ok(s) => held.push(s),
            Err(e) => break e,
        }
    };
    let t = Instant::now();
    let again = Client::connect(&path, timeout).unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(matches!(again, Error::Io { .. }), "{again:?}");
    assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");
}
