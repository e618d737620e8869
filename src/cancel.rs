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

/// Paths that hold plain backup data only while a run lasts, and child processes drctl
/// waits for. Each path is removed when the run is done with it; [`before_forced_exit`]
/// removes what is left and stops the children when a second interrupt ends the process at
/// once, without running destructors.
static TEMPORARY: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn remove(path: &Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

/// A temporary file or directory, removed when dropped or when the process is interrupted
/// twice.
pub struct Temporary(PathBuf);

impl Temporary {
    /// Takes `path` (a file about to be created) into care.
    pub fn new(path: PathBuf) -> Temporary {
        TEMPORARY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.clone());
        Temporary(path)
    }

    /// A new private directory under TMPDIR.
    pub fn dir() -> crate::Result<Temporary> {
        let dir = tempfile::Builder::new()
            .prefix("drctl-")
            .tempdir()
            .map_err(|e| crate::Error::io("create a temporary directory", e))?;
        Ok(Temporary::new(dir.keep()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        remove(&self.0);
        TEMPORARY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &self.0);
    }
}

/// Notes a child process drctl is waiting for, until the returned guard is dropped.
pub fn track_child(pid: u32) -> impl Drop {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    struct Tracked(u32);
    impl Drop for Tracked {
        fn drop(&mut self) {
            CHILDREN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|p| *p != self.0);
        }
    }
    Tracked(pid)
}

/// For the exit on a second interrupt: asks the children drctl waits for to stop (SIGTERM)
/// and removes every [`Temporary`] still present.
pub fn before_forced_exit() {
    for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        // SAFETY: kill has no memory preconditions; the child is still waited for, so its
        // PID has not been reused.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    for path in TEMPORARY.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        remove(path);
    }
}
