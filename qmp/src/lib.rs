//! A synchronous QMP (QEMU Machine Protocol) client over a Unix socket that never panics.
//!
//! Commands are the `qapi` crate's typed ones (`qapi::qmp::query_cpus_fast`, `stop`, …); this
//! crate does the framing and the conversation itself, because a dead or misbehaving QEMU must
//! become an [`Error`], not a panic (the `qapi` crate's own sync client panics on EOF while
//! reading the greeting).
//!
//! * Every read has a deadline ([`Client::set_timeout`]); a timeout is [`Error::Timeout`] and
//!   leaves the connection usable (a late reply is recognised by its `id` and dropped).
//! * Connecting and writing wait at most as long: a QEMU that is stopped or stuck accepts no
//!   connection once its listen backlog is full (QEMU listens with a backlog of 1, and a client
//!   that gave up still holds its place), and reads nothing once the socket's buffer is full;
//!   either would otherwise block for as long as QEMU does. Such a failure is [`Error::Io`]
//!   (a command cut short leaves the session unusable).
//! * Events that arrive while a reply is awaited are queued; read them with
//!   [`Client::take_events`] or wait for one with [`Client::wait_event`].
//! * EOF is [`Error::Closed`], a line that is not a QMP message is [`Error::Garbage`], a QMP
//!   error reply is [`Error::Qmp`] with QEMU's class and description.
//!
//! ```no_run
//! use std::time::Duration;
//! let mut qmp = qmp::Client::connect("/run/burst-qemu/vm1/qmp.sock", Duration::from_secs(5))?;
//! for cpu in qmp.execute(&qmp::qapi::qmp::query_cpus_fast {})? {
//!     println!("{:?}", cpu);
//! }
//! qmp.execute(&qmp::qapi::qmp::stop {})?;
//! # Ok::<(), qmp::Error>(())
//! ```
#![warn(missing_docs)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub use qapi;
use qapi::Command;
use serde_json::Value;
use thiserror::Error;

/// The longest line accepted from QEMU (16 MiB); a longer one is garbage.
pub const MAX_LINE: usize = 16 << 20;

/// What was being read when the conversation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The greeting QEMU sends on connect.
    Greeting,
    /// The reply to a command (named).
    Reply(&'static str),
    /// An event.
    Event,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Greeting => f.write_str("the greeting"),
            Phase::Reply(name) => write!(f, "the reply to {name}"),
            Phase::Event => f.write_str("an event"),
        }
    }
}

/// A failed QMP conversation.
#[derive(Debug, Error)]
pub enum Error {
    /// Connecting, reading or writing failed.
    #[error("QMP I/O failed while waiting for {phase}")]
    Io {
        /// What was being read.
        phase: Phase,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU closed the connection (it exited, or another client holds the monitor).
    #[error("QEMU closed the QMP connection while we waited for {0}")]
    Closed(Phase),
    /// Nothing arrived in time.
    #[error("no answer from QEMU within {waited:?} while waiting for {phase}")]
    Timeout {
        /// What was being read.
        phase: Phase,
        /// How long we waited.
        waited: Duration,
    },
    /// A line that is not a QMP message of the kind expected.
    #[error("QEMU sent garbage while we waited for {phase}: {line:?}: {why}")]
    Garbage {
        /// What was being read.
        phase: Phase,
        /// The line (cut to 200 bytes).
        line: String,
        /// Why it is garbage.
        why: String,
    },
    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Qmp {
        /// The command's QMP name.
        command: &'static str,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// An asynchronous event from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The event's name, e.g. `STOP`.
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
    /// The whole message, as QEMU sent it.
    pub raw: Value,
}

impl Event {
    /// The event as the `qapi` crate's typed enum, when this QEMU's event matches its schema.
    pub fn typed(&self) -> Option<qapi::qmp::Event> {
        serde_json::from_value(self.raw.clone()).ok()
    }
}

/// QEMU's version from the greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: i64,
    /// Minor.
    pub minor: i64,
    /// Micro.
    pub micro: i64,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    events: VecDeque<Event>,
    version: Version,
    next_id: u64,
    timeout: Duration,
}

impl Client {
    /// Connects to the QMP socket at `path` and negotiates capabilities, waiting at most
    /// `timeout` for each answer.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, Error> {
        let stream = connect_within(path.as_ref(), timeout).map_err(|source| Error::Io {
            phase: Phase::Greeting,
            source,
        })?;
        Self::handshake(stream, timeout)
    }

    /// Negotiates capabilities on an already connected stream: reads the greeting, sends
    /// `qmp_capabilities` and waits for its reply.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, Error> {
        stream
            .set_write_timeout(Some(at_least_1ms(timeout)))
            .map_err(|source| Error::Io {
                phase: Phase::Greeting,
                source,
            })?;
        let mut client = Client {
            stream,
            buf: Vec::with_capacity(4096),
            events: VecDeque::new(),
            version: Version {
                major: 0,
                minor: 0,
                micro: 0,
            },
            next_id: 1,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = loop {
            let msg = client.read_message(Phase::Greeting, deadline)?;
            if msg.get("event").is_some() {
                client.queue_event(msg, Phase::Greeting)?;
                continue;
            }
            break msg;
        };
        let caps: qapi::qmp::QapiCapabilities =
            serde_json::from_value(greeting.clone()).map_err(|e| Error::Garbage {
                phase: Phase::Greeting,
                line: cut(&greeting.to_string()),
                why: format!("not a QMP greeting: {e}"),
            })?;
        let v = &caps.QMP.version.qemu;
        client.version = Version {
            major: v.major,
            minor: v.minor,
            micro: v.micro,
        };
        client.execute(&qapi::qmp::qmp_capabilities { enable: None })?;
        Ok(client)
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Sets how long a command waits for its reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        // On failure the previous write timeout stays: still bounded.
        let _ = self.stream.set_write_timeout(Some(at_least_1ms(timeout)));
    }

    /// Runs a command and returns its typed result. Events that arrive meanwhile are queued.
    pub fn execute<C: Command>(&mut self, command: C) -> Result<C::Ok, Error> {
        let phase = Phase::Reply(C::NAME);
        let id = self.next_id;
        self.next_id += 1;
        let mut line =
            serde_json::to_vec(&qapi::Execute::with_id(&command, id)).map_err(|e| Error::Io {
                phase,
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
        line.push(b'\n');
        tracing::trace!(target: "qmp", "-> {}", String::from_utf8_lossy(&line).trim_end());
        self.stream
            .write_all(&line)
            .map_err(|source| match source.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Error::Closed(phase),
                _ => Error::Io { phase, source },
            })?;

        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = self.read_message(phase, deadline)?;
            if msg.get("event").is_some() {
                self.queue_event(msg, phase)?;
                continue;
            }
            match msg.get("id") {
                Some(v) if v.as_u64() == Some(id) => {}
                // A late reply to a command that timed out earlier: drop it.
                Some(v) if v.as_u64().is_some_and(|old| old < id) => continue,
                _ => {
                    return Err(Error::Garbage {
                        phase,
                        line: cut(&msg.to_string()),
                        why: format!("expected the reply with id {id}"),
                    })
                }
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(Error::Qmp {
                    command: C::NAME,
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            let Some(ret) = msg.get("return") else {
                return Err(Error::Garbage {
                    phase,
                    line: cut(&msg.to_string()),
                    why: "neither `return` nor `error`".into(),
                });
            };
            return serde_json::from_value(ret.clone()).map_err(|e| Error::Garbage {
                phase,
                line: cut(&msg.to_string()),
                why: format!("unexpected reply shape: {e}"),
            });
        }
    }

    /// Whether a message has already been read from the socket but not yet taken (a queued
    /// event, or a whole line in the buffer): `poll` on [`AsFd`] would not say so.
    pub fn pending(&self) -> bool {
        !self.events.is_empty() || self.buf.contains(&b'\n')
    }

    /// Takes every event queued so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Returns the next event: a queued one, or the next to arrive within `timeout`
    /// (`Ok(None)` when none arrives).
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Option<Event>, Error> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = match self.read_message(Phase::Event, deadline) {
                Err(Error::Timeout { .. }) => return Ok(None),
                other => other?,
            };
            if msg.get("event").is_some() {
                self.queue_event(msg, Phase::Event)?;
                return Ok(self.events.pop_front());
            }
            // A stray late reply: not an event, ignore it.
        }
    }

    fn queue_event(&mut self, msg: Value, phase: Phase) -> Result<(), Error> {
        let Some(name) = msg.get("event").and_then(Value::as_str) else {
            return Err(Error::Garbage {
                phase,
                line: cut(&msg.to_string()),
                why: "`event` is not a string".into(),
            });
        };
        self.events.push_back(Event {
            name: name.to_owned(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            raw: msg,
        });
        Ok(())
    }

    /// Reads one JSON object line before `deadline`.
    fn read_message(&mut self, phase: Phase, deadline: Instant) -> Result<Value, Error> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                tracing::trace!(target: "qmp", "<- {text}");
                let garbage = |why: String| Error::Garbage {
                    phase,
                    line: cut(text),
                    why,
                };
                let value: Value =
                    serde_json::from_str(text).map_err(|e| garbage(format!("not JSON: {e}")))?;
                if !value.is_object() {
                    return Err(garbage("not a JSON object".into()));
                }
                return Ok(value);
            }
            if self.buf.len() > MAX_LINE {
                let line = String::from_utf8_lossy(&self.buf[..200]).into_owned();
                self.buf.clear();
                return Err(Error::Garbage {
                    phase,
                    line,
                    why: format!("a line longer than {MAX_LINE} bytes"),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    phase,
                    waited: self.timeout,
                });
            }
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(|source| Error::Io { phase, source })?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Error::Closed(phase)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::Timeout {
                        phase,
                        waited: self.timeout,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Error::Closed(phase))
                }
                Err(source) => return Err(Error::Io { phase, source }),
            }
        }
    }
}

impl AsFd for Client {
    /// The session's socket, to wait for events with `poll` (see [`Client::pending`]).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// `d`, or 1 ms when shorter (a zero socket timeout would mean none).
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// Connects to the Unix socket at `path`, waiting at most `timeout` for a place in the
/// listener's backlog (Linux bounds a blocking connect by the socket's send timeout).
fn connect_within(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let t = at_least_1ms(timeout);
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    let addr = UnixAddr::new(path)?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(UnixStream::from(fd)),
        Err(nix::errno::Errno::EAGAIN) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no place in the listen backlog within {timeout:?} (QEMU stopped, stuck, or \
                 busy with other clients)"
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
