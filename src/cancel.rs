//! Cancellation shared between the async runtime and the blocking pipeline threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
