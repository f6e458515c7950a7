//! What wakes the agent besides its tick: SIGINT/SIGTERM, and file-system events in the state
//! dir (VMs starting and ending) and in the config dirs (edits). One channel, read with a
//! debounce so that an editor's truncate-then-write or write-then-rename is read once, whole.
//!
//! The watches ask the kernel for changes only (entries created, removed or renamed, contents
//! written): inotify's own event mask, which the `notify` crate does not let a caller choose
//! (it always adds opens and closes). Every launcher's watchdog opened `agent.lock` twice a
//! second to see whether the agent lived (now every 10 s, beside the agent's pidfd); with opens
//! watched, 100 VMs woke the agent's watcher 400 times a second to be told of nothing (a quarter
//! of its CPU when idle). `ls` and scripts still probe it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use super::AgentError;
use crate::base::IoContext;

/// How long a burst of file events must fall quiet before a config is read.
const DEBOUNCE: Duration = Duration::from_millis(30);
/// At most this many quiet-waits per burst, so a file rewritten without pause is still read.
const MAX_DEBOUNCES: usize = 4;

/// What the agent is told of: what changes a directory's entries or a file's content. Not
/// opens, reads or closes without a write (the agent's own reads, `ls`, watchdogs' lock probes).
fn changes() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::ATTRIB
        | WatchMask::ONLYDIR
}

enum Wake {
    Changed(PathBuf),
    /// The kernel's event queue overflowed: anything may have changed.
    Overflow,
    Shutdown,
}

/// What changed in a burst of events.
#[derive(Debug, Default)]
pub(super) struct Changed {
    /// The paths named by the events.
    pub paths: HashSet<PathBuf>,
    /// Events were lost (the kernel's queue overflowed): read everything again.
    pub everything: bool,
}

impl Changed {
    pub(super) fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.everything
    }

    /// Whether `path` changed (or, after an overflow, may have).
    pub(super) fn contains(&self, path: &Path) -> bool {
        self.everything || self.paths.contains(path)
    }

    fn add(&mut self, wake: Wake) -> bool {
        match wake {
            Wake::Changed(p) => {
                self.paths.insert(p);
            }
            Wake::Overflow => self.everything = true,
            Wake::Shutdown => return false,
        }
        true
    }
}

/// The watched directories by watch descriptor, shared with the reading thread.
type Dirs = Arc<Mutex<HashMap<WatchDescriptor, PathBuf>>>;

/// The agent's event sources. Dropping them ends their two threads (and closes the inotify
/// descriptor): an agent run inside a longer-lived process (the tests, the bench) leaves
/// nothing behind.
pub(super) struct Events {
    rx: Receiver<Wake>,
    watches: Watches,
    dirs: Dirs,
    watched: HashSet<PathBuf>,
    /// The thread awaiting SIGINT and SIGTERM.
    signals: Option<std::thread::JoinHandle<()>>,
    /// The thread reading the file events.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The write end of a pipe the reader polls beside inotify: closed, it ends the reader.
    stop: Option<OwnedFd>,
}

impl Drop for Events {
    fn drop(&mut self) {
        // The reader polls the pipe's read end: closing the write end wakes it (POLLHUP), and
        // it returns, closing the inotify descriptor. (Removing the watches would not do: a
        // watch the kernel has already dropped, its directory removed, queues no event.)
        self.stop = None;
        if let Some(signals) = self.signals.take() {
            use std::os::unix::thread::JoinHandleExt;
            // SIGTERM is blocked in that thread, which awaits it: it takes this one and ends.
            // SAFETY: the handle is not joined yet, so its pthread_t is valid.
            unsafe { libc::pthread_kill(signals.as_pthread_t(), libc::SIGTERM) };
            let _ = signals.join();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Events {
    /// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread started after),
    /// awaits them in a thread of its own, and watches `state_dir`.
    pub(super) fn start(state_dir: &Path) -> Result<Events, AgentError> {
        let (tx, rx) = mpsc::channel();
        let mut mask = nix::sys::signal::SigSet::empty();
        mask.add(nix::sys::signal::Signal::SIGINT);
        mask.add(nix::sys::signal::Signal::SIGTERM);
        mask.thread_block().doing(|| "blocking signals".into())?;
        let signal_tx = tx.clone();
        let signals = std::thread::spawn(move || {
            if mask.wait().is_ok() {
                let _ = signal_tx.send(Wake::Shutdown);
            }
        });
        let inotify = Inotify::init().map_err(AgentError::Watch)?;
        let (stopped, stop) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| AgentError::Watch(e.into()))?;
        let dirs = Dirs::default();
        let mut events = Events {
            rx,
            watches: inotify.watches(),
            dirs: Arc::clone(&dirs),
            watched: HashSet::new(),
            signals: Some(signals),
            reader: None,
            stop: Some(stop),
        };
        events.add(state_dir).map_err(AgentError::Watch)?;
        let reader = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || read_events(inotify, &stopped, &dirs, &tx))
            .doing(|| "starting the file-event thread".into())?;
        events.reader = Some(reader);
        Ok(events)
    }

    /// Watches `dir` (held under the map's lock, so that its first event finds it there).
    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let wd = self.watches.add(dir, changes())?;
        dirs.insert(wd, dir.to_owned());
        self.watched.insert(dir.to_owned());
        Ok(())
    }

    /// Watches the directory holding `config` (once per directory: editors replace files).
    pub(super) fn watch_config(&mut self, config: &Path) {
        let Some(dir) = config.parent() else { return };
        if !self.watched.contains(dir) {
            if let Err(e) = self.add(dir) {
                tracing::error!("cannot watch {} for edits: {e}", dir.display());
            }
        }
    }

    /// Waits until `deadline` or the first event, then gathers the burst it starts: what
    /// changed (nothing at the deadline), or `None` when the agent is asked to stop.
    pub(super) fn wait(&self, deadline: Instant) -> Option<Changed> {
        let mut changed = Changed::default();
        match self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Wake::Shutdown) | Err(RecvTimeoutError::Disconnected) => return None,
            Ok(w) => {
                changed.add(w);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let mut shutdown = false;
        let mut quiet_waits = 0;
        while !changed.is_empty() && quiet_waits < MAX_DEBOUNCES {
            match self.rx.recv_timeout(DEBOUNCE) {
                Ok(w) => {
                    shutdown |= !changed.add(w);
                    quiet_waits += 1;
                }
                Err(_) => break,
            }
        }
        while let Ok(w) = self.rx.try_recv() {
            shutdown |= !changed.add(w);
        }
        (!shutdown).then_some(changed)
    }
}

/// The watcher's thread: reads the kernel's events and sends each changed path (the watched
/// directory joined with the entry's name) until the agent stops listening or `stopped` (a
/// pipe's read end) says the [`Events`] are gone.
fn read_events(mut inotify: Inotify, stopped: &OwnedFd, dirs: &Dirs, tx: &Sender<Wake>) {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    use std::os::fd::AsRawFd;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stopped.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfds of a live array, whose descriptors
        // this thread holds open.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == Interrupted {
                continue;
            }
            tracing::error!("waiting for file events: {e}: new VMs now wait for the rescan and config edits go unseen");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let events = match inotify.read_events(&mut buffer) {
            Ok(events) => events,
            Err(e) if matches!(e.kind(), Interrupted | WouldBlock) => continue,
            Err(e) => {
                tracing::error!("reading file events: {e}: new VMs now wait for the rescan and config edits go unseen");
                return;
            }
        };
        for event in events {
            let wake = if event.mask.contains(EventMask::Q_OVERFLOW) {
                Wake::Overflow
            } else if event.mask.contains(EventMask::IGNORED) {
                continue;
            } else {
                let dirs = dirs.lock().unwrap_or_else(|p| p.into_inner());
                let Some(dir) = dirs.get(&event.wd) else {
                    continue;
                };
                Wake::Changed(
                    event
                        .name
                        .map_or_else(|| dir.clone(), |n: &OsStr| dir.join(n)),
                )
            };
            if tx.send(wake).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next burst within `within`, or an empty one.
    fn next(events: &Events, within: Duration) -> Changed {
        events
            .wait(Instant::now() + within)
            .expect("no shutdown was asked")
    }

    #[test]
    fn writes_renames_and_removals_wake_the_agent_and_opens_and_reads_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let vms = dir.path().join("vms");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&vms).unwrap();
        let lock = state.join("agent.lock");
        std::fs::write(&lock, "1\n").unwrap();
        let config = vms.join("a.toml");
        std::fs::write(&config, "baseline = 5\n").unwrap();
        let before = inotify_fds();
        let mut events = Events::start(&state).unwrap();
        events.watch_config(&config);
        assert_eq!(inotify_fds().len(), before.len() + 1);

        // What a launcher's watchdog and `ls` do, and the agent's own reads: nothing.
        for _ in 0..50 {
            assert!(!crate::state::lock_held(&lock));
            std::fs::read_to_string(&config).unwrap();
        }
        let quiet = next(&events, Duration::from_millis(200));
        assert!(quiet.is_empty(), "woken by reads: {quiet:?}");

        // A new VM's runtime dir, an edit in place, an editor's rename: each is seen.
        std::fs::create_dir(state.join("vm1")).unwrap();
        let c = next(&events, Duration::from_secs(5));
        assert!(c.contains(&state.join("vm1")), "{c:?}");
        std::fs::write(&config, "baseline = 10\n").unwrap();
        let c = next(&events, Duration::from_secs(5));
        assert!(c.contains(&config), "{c:?}");
        let tmp = vms.join(".a.toml.swp");
        std::fs::write(&tmp, "baseline = 20\n").unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        let c = next(&events, Duration::from_secs(5));
        assert!(c.contains(&config), "{c:?}");
        std::fs::remove_dir(state.join("vm1")).unwrap();
        let c = next(&events, Duration::from_secs(5));
        assert!(c.contains(&state.join("vm1")), "{c:?}");
        assert!(!c.everything);

        // Dropped, the events end both their threads, and so close the inotify descriptor
        // (the reader owns it). The drop joins them: a thread left waiting would hang it.
        drop_within(events, Duration::from_secs(10));
        assert_eq!(inotify_fds(), before, "the inotify descriptor is closed");

        // The same when the watched dir went first (the kernel has dropped its watch: an
        // agent whose state dir is removed exits this way).
        let gone = dir.path().join("gone");
        std::fs::create_dir(&gone).unwrap();
        let events = Events::start(&gone).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        // The kernel queues IN_IGNORED at the removal; let the reader take it and wait again.
        std::thread::sleep(Duration::from_millis(100));
        drop_within(events, Duration::from_secs(10));
        assert_eq!(inotify_fds(), before, "the inotify descriptor is closed");
    }

    /// Drops `events` in a thread of its own, failing unless the drop returns within `within`.
    fn drop_within(events: Events, within: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            drop(events);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(within)
            .expect("the event threads ended in time after the drop");
    }

    /// This process's inotify descriptors (no other test of this crate makes one).
    fn inotify_fds() -> Vec<std::ffi::OsString> {
        let mut fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let link = std::fs::read_link(e.path()).ok()?;
                link.to_string_lossy()
                    .contains("inotify")
                    .then(|| e.file_name())
            })
            .collect();
        fds.sort();
        fds
    }
}
