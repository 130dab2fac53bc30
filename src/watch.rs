//! Waking up when a directory changes: an inotify watch (through `notify`), with a polling
//! fallback for file systems that deliver no events.
//!
//! Create the watch *before* scanning the directory, then scan, then wait: a change between
//! the scan and the wait still wakes the waiter.
//!
//! Only changes wake it. `notify` also reports opening and reading (inotify `IN_OPEN`), and the
//! waiter's own scan opens the directory and its files: woken by those, every scan would wake
//! the next one at once, a busy loop.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::error::Result;
use crate::state;

/// A watched directory.
pub struct DirWatch {
    // Dropping the watcher ends the watch.
    _watcher: Option<RecommendedWatcher>,
    events: mpsc::Receiver<()>,
    // Held so that, without a watcher, waiting times out instead of finding the channel closed.
    _sender: mpsc::Sender<()>,
    poll: Duration,
}

impl DirWatch {
    /// Watches `dir` (created 0700 when missing). With `poll_only`, or when the watch cannot be
    /// set up, waits only by polling every `poll`.
    pub fn new(dir: &Path, poll: Duration, poll_only: bool) -> Result<DirWatch> {
        state::create_private_dir_all(dir)?;
        let (sender, events) = mpsc::channel();
        let watcher = if poll_only {
            None
        } else {
            let sender = sender.clone();
            let watched =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if event.is_ok_and(|event| is_change(&event.kind)) {
                        let _ = sender.send(());
                    }
                })
                .and_then(|mut watcher| {
                    watcher.watch(dir, RecursiveMode::NonRecursive)?;
                    Ok(watcher)
                });
            match watched {
                Ok(watcher) => Some(watcher),
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), %err, "no file-system events here; polling instead");
                    None
                }
            }
        };
        Ok(DirWatch {
            _watcher: watcher,
            events,
            _sender: sender,
            poll,
        })
    }

    /// Also watches `dir` (which must exist), with its subdirectories when `recursive`; without
    /// file-system events this does nothing (polling covers every directory alike).
    pub(crate) fn also(&mut self, dir: &Path, recursive: bool) -> Result<()> {
        let mode = if recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        if let Some(watcher) = &mut self._watcher
            && let Err(err) = watcher.watch(dir, mode)
        {
            tracing::warn!(dir = %dir.display(), %err, "cannot watch; polling covers it");
        }
        Ok(())
    }

    /// Whether file-system events wake it (else it only polls).
    pub(crate) fn has_events(&self) -> bool {
        self._watcher.is_some()
    }

    /// Waits until the directory changes, the poll interval passes, or `limit` passes,
    /// whichever comes first; true when a change woke it.
    pub fn wait(&self, limit: Duration) -> bool {
        if self.events.recv_timeout(limit.min(self.poll)).is_ok() {
            // One scan covers every event that arrived meanwhile.
            while self.events.try_recv().is_ok() {}
            return true;
        }
        false
    }
}

/// Whether an event is a change: anything but an access, except a file closed after writing.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_the_directory_does_not_wake_the_watch_and_a_change_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), "{}").unwrap();
        let watch = DirWatch::new(dir.path(), Duration::from_secs(60), false).unwrap();
        for _ in 0..3 {
            let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(names.len(), 1);
            std::fs::read(dir.path().join("a.json")).unwrap();
        }
        // Proving that nothing arrives needs a wait.
        assert!(
            watch
                .events
                .recv_timeout(Duration::from_millis(300))
                .is_err(),
            "reading woke the watch"
        );
        std::fs::write(dir.path().join("b.json"), "{}").unwrap();
        assert!(
            watch.events.recv_timeout(Duration::from_secs(10)).is_ok(),
            "a new file did not wake the watch"
        );
    }
}
