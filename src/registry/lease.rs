//! Holding a lease for the length of a job: acquisition (waiting or refusing), heartbeats,
//! and taking over a lease whose holder is a dead process on this host, so a crashed run never
//! needs a manual unlock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{Lease, Registry};
use crate::cancel::Cancel;
use crate::{Error, ErrorKind, Result};

/// `host:pid:start-time` of this process; the start time makes a reused PID look different.
pub fn holder_id() -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let pid = std::process::id();
    format!("{host}:{pid}:{}", process_start(pid).unwrap_or(0))
}

/// Start time of a running process in clock ticks since boot (field 22 of /proc/PID/stat);
/// `None` when there is no such process or it has exited (a zombie).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 2..].split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// True when `holder` names a process on this host that no longer runs.
pub fn holder_is_dead(holder: &str) -> bool {
    let mut parts = holder.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    let ours = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    if host != ours || pid == std::process::id() {
        return false;
    }
    process_start(pid) != Some(start)
}

/// A lease held by this process, renewed in the background until released.
pub struct LeaseGuard {
    registry: Arc<dyn Registry>,
    lease: Arc<Mutex<Lease>>,
    lost: Cancel,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    /// Takes lease `name`. When it is held: waits up to `wait` (or refuses at once), taking over
    /// leases of dead local processes.
    pub async fn acquire(
        registry: Arc<dyn Registry>,
        name: &str,
        ttl: Duration,
        wait: Option<Duration>,
        cancel: &Cancel,
    ) -> Result<LeaseGuard> {
        let holder = holder_id();
        let chrono_ttl = chrono::Duration::from_std(ttl)
            .map_err(|e| Error::invalid(format!("lease ttl: {e}")))?;
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            cancel.check()?;
            let current = match registry
                .acquire_lease(name, &holder, chrono_ttl, None)
                .await?
            {
                Ok(lease) => return Ok(Self::start(registry, lease, ttl, cancel)),
                Err(current) => current,
            };
            if holder_is_dead(&current.holder) {
                tracing::warn!(lease = name, holder = %current.holder, "taking over the lease of a process that no longer runs");
                if let Ok(lease) = registry
                    .acquire_lease(name, &holder, chrono_ttl, Some(current.token))
                    .await?
                {
                    return Ok(Self::start(registry, lease, ttl, cancel));
                }
                continue;
            }
            match deadline {
                Some(d) if tokio::time::Instant::now() < d => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = cancel.cancelled() => return Err(Error::cancelled()),
                    }
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Locked,
                        format!(
                            "{name} is held by {} until {} (token {})",
                            current.holder,
                            current
                                .expires_at
                                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            current.token
                        ),
                    )
                    .hint("another run is in progress; wait for it, or pass --wait SECONDS")
                    .retryable())
                }
            }
        }
    }

    fn start(
        registry: Arc<dyn Registry>,
        lease: Lease,
        ttl: Duration,
        cancel: &Cancel,
    ) -> LeaseGuard {
        let shared = Arc::new(Mutex::new(lease));
        let lost = Cancel::new();
        let heartbeat = {
            let (registry, shared, lost, cancel) = (
                registry.clone(),
                shared.clone(),
                lost.clone(),
                cancel.clone(),
            );
            let chrono_ttl =
                chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(120));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let current = shared.lock().await.clone();
                    match registry.renew_lease(&current, chrono_ttl).await {
                        Ok(renewed) => *shared.lock().await = renewed,
                        Err(e) => {
                            tracing::error!(lease = %current.name, error = %e, "lease lost; stopping the run");
                            lost.cancel();
                            cancel.cancel();
                            return;
                        }
                    }
                }
            })
        };
        LeaseGuard {
            registry,
            lease: shared,
            lost,
            heartbeat,
        }
    }

    /// Fails unless the lease is still held (checked against the registry: fencing).
    pub async fn confirm(&self) -> Result<()> {
        if self.lost.is_cancelled() {
            return Err(Error::failure("the lease was lost during the run"));
        }
        let lease = self.lease.lock().await.clone();
        match self.registry.get_lease(&lease.name).await? {
            Some(current) if current.token == lease.token && current.holder == lease.holder => {
                Ok(())
            }
            _ => Err(Error::failure(format!(
                "lease {} was lost during the run",
                lease.name
            ))),
        }
    }

    pub async fn release(self) -> Result<()> {
        self.heartbeat.abort();
        let lease = self.lease.lock().await.clone();
        self.registry.release_lease(&lease).await
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}
