//! What wakes the agent besides its tick: SIGINT/SIGTERM, and file-system events in the state
//! dir (VMs starting and ending) and in the config dirs (edits). One channel, read with a
//! debounce so that an editor's truncate-then-write or write-then-rename is read once, whole.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::Watcher;

use super::AgentError;
use crate::base::IoContext;

/// How long a burst of file events must fall quiet before a config is read.
const DEBOUNCE: Duration = Duration::from_millis(30);
/// At most this many quiet-waits per burst, so a file rewritten without pause is still read.
const MAX_DEBOUNCES: usize = 4;

enum Wake {
    Changed(PathBuf),
    Shutdown,
}

/// The agent's event sources.
pub(super) struct Events {
    rx: Receiver<Wake>,
    watcher: notify::RecommendedWatcher,
    watched: HashSet<PathBuf>,
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
        std::thread::spawn(move || {
            if mask.wait().is_ok() {
                let _ = signal_tx.send(Wake::Shutdown);
            }
        });
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                use notify::event::{AccessKind, AccessMode, EventKind};
                let Ok(event) = event else { return };
                // Only what changes content: reading a config file (as the agent itself does)
                // raises access events, which would otherwise wake the agent to read it again.
                let changes = matches!(
                    event.kind,
                    EventKind::Create(_)
                        | EventKind::Modify(_)
                        | EventKind::Remove(_)
                        | EventKind::Access(AccessKind::Close(AccessMode::Write))
                );
                if changes {
                    for path in event.paths {
                        let _ = tx.send(Wake::Changed(path));
                    }
                }
            })
            .map_err(AgentError::Watch)?;
        watcher
            .watch(state_dir, notify::RecursiveMode::NonRecursive)
            .map_err(AgentError::Watch)?;
        Ok(Events {
            rx,
            watcher,
            watched: HashSet::new(),
        })
    }

    /// Watches the directory holding `config` (once per directory: editors replace files).
    pub(super) fn watch_config(&mut self, config: &Path) {
        let Some(dir) = config.parent() else { return };
        if self.watched.insert(dir.to_owned()) {
            if let Err(e) = self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::error!("cannot watch {} for edits: {e}", dir.display());
                self.watched.remove(dir);
            }
        }
    }

    /// Waits until `deadline` or the first event, then gathers the burst it starts: the paths
    /// that changed (empty at the deadline), or `None` when the agent is asked to stop.
    pub(super) fn wait(&self, deadline: Instant) -> Option<HashSet<PathBuf>> {
        let mut changed = HashSet::new();
        match self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Wake::Shutdown) | Err(RecvTimeoutError::Disconnected) => return None,
            Ok(Wake::Changed(p)) => {
                changed.insert(p);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let mut shutdown = false;
        let mut quiet_waits = 0;
        while !changed.is_empty() && quiet_waits < MAX_DEBOUNCES {
            match self.rx.recv_timeout(DEBOUNCE) {
                Ok(Wake::Shutdown) => shutdown = true,
                Ok(Wake::Changed(p)) => {
                    changed.insert(p);
                    quiet_waits += 1;
                }
                Err(_) => break,
            }
        }
        while let Ok(w) = self.rx.try_recv() {
            match w {
                Wake::Shutdown => shutdown = true,
                Wake::Changed(p) => {
                    changed.insert(p);
                }
            }
        }
        (!shutdown).then_some(changed)
    }
}
