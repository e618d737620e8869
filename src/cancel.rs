//! Cancellation shared between the async runtime and the blocking pipeline threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A flag set once when the run must stop (SIGINT/SIGTERM or a failed sibling stage).
/// Blocking loops check it between chunks; async code can wait for it.
#[derive(Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Returns `Err(Cancelled)` once the flag is set.
    pub fn check(&self) -> crate::Result<()> {
        if self.is_cancelled() {
            Err(crate::Error::cancelled())
        } else {
            Ok(())
        }
    }
    /// Completes when the flag is set.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Files that hold plain backup data only while a run lasts. Each is removed when the run is
/// done with it, and by [`remove_temporary_files`] when a second interrupt ends the process at
/// once, without running destructors.
static TEMPORARY: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A file removed when dropped, or when the process is interrupted twice.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(path: PathBuf) -> TempFile {
        TEMPORARY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        TEMPORARY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.0);
    }
}

/// Removes every [`TempFile`] still present; for the exit on a second interrupt.
pub fn remove_temporary_files() {
    for path in TEMPORARY.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = std::fs::remove_file(path);
    }
}
