//! QEMU's run state, kept current in the runtime dir by the launcher, so that `ls` reads a file
//! instead of opening a QMP session per VM (measured: `ls --json` of 200 VMs took 236 ms, almost
//! all of it 200 QMP greetings, negotiations and `query-status` round trips).
//!
//! The launcher gives QEMU a second, private QMP monitor (a listener it binds in the runtime dir,
//! handed over as `fd=`, like the main one, and unlinked once connected, so no one else can
//! reach it), keeps the session open for the VM's life and waits on it in the same `poll` as its
//! signals. QEMU sends every monitor each event (`STOP`, `RESUME`, `SUSPEND`, `WAKEUP`,
//! `SHUTDOWN`, `GUEST_PANICKED`, …); on any event the launcher asks `query-status` on this
//! session and rewrites [`state::RUN_STATE`] when the answer changed. Events are rare, so this
//! costs nothing while the VM runs; the main monitor stays free for `pause`, `resume` and the
//! agent's workers.
//!
//! Readers: `ls` trusts the file while the launcher holds the runtime dir. An orphaned VM (no
//! launcher to keep the file), an adopted QEMU and a libvirt domain are still asked directly.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::state;

/// The chardev id of the launcher's private monitor.
pub(super) const CHARDEV_ID: &str = "burst-qemu-events";
/// Its socket's name in the runtime dir (removed once the launcher is connected): shorter than
/// [`state::QMP_SOCKET`], so a state dir that holds the main socket's path holds this one.
pub(super) const SOCKET: &str = "ev.sock";
/// How long one `query-status` may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The private monitor's listener, from QEMU's start until the launcher connects.
pub(super) struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds the socket at `path`.
    pub(super) fn bind(path: PathBuf) -> std::io::Result<Listener> {
        Ok(Listener {
            listener: UnixListener::bind(&path)?,
            path,
        })
    }

    /// The listening descriptor, for QEMU's `-chardev socket,fd=N`.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Connects, negotiates and publishes the first run state; the socket's name is removed.
    pub(super) fn connect(self, runtime_dir: &Path) -> Result<Watch, qmp::Error> {
        let stream = UnixStream::connect(&self.path).map_err(|source| qmp::Error::Io {
            phase: qmp::Phase::Greeting,
            source,
        });
        let _ = std::fs::remove_file(&self.path);
        let client = qmp::Client::handshake(stream?, QUERY_TIMEOUT)?;
        let mut watch = Watch {
            client,
            path: runtime_dir.join(state::RUN_STATE),
            last: String::new(),
        };
        watch.refresh()?;
        Ok(watch)
    }
}

/// The open private session and the run state last published.
pub(super) struct Watch {
    client: qmp::Client,
    path: PathBuf,
    last: String,
}

impl Watch {
    /// The session's socket, to poll for events.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.client.as_fd()
    }

    /// Reads what arrived; on any event, asks the run state and publishes it when it changed.
    /// An error means the session is over (QEMU exits): the caller drops the watch.
    pub(super) fn on_readable(&mut self) -> Result<(), qmp::Error> {
        loop {
            let mut any = false;
            while let Some(e) = self.client.wait_event(Duration::from_millis(1))? {
                tracing::debug!("QEMU event {}", e.name);
                any = true;
            }
            if !any {
                return Ok(());
            }
            self.refresh()?;
            // Events read with the answer but after it are not answered by it.
            if !self.client.pending() {
                return Ok(());
            }
        }
    }

    /// Removes the published state, which no one keeps current any more: readers ask QEMU.
    pub(super) fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn refresh(&mut self) -> Result<(), qmp::Error> {
        let s = self.client.execute(qmp::qapi::qmp::query_status {})?;
        let now = crate::control::run_state_name(&s);
        // Events that came before the answer are answered by it.
        self.client.take_events();
        if now != self.last {
            if let Err(e) = state::write_published(&self.path, format!("{now}\n").as_bytes()) {
                tracing::warn!("writing {}: {e}", self.path.display());
                return Ok(());
            }
            self.last = now;
        }
        Ok(())
    }
}
