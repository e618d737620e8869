//! Garbage collection: objects no completed backup owns, records of failed or abandoned runs,
//! and interrupted writes. Planned first (printable with `--dry-run`), then applied set by set
//! under each set's lease, deleting objects before records.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::cancel::Cancel;
use crate::format::{BackupId, Name, ObjectKey};
use crate::registry::lease::{holder_is_dead, LeaseGuard};
use crate::registry::Status;
use crate::repo::Repo;
use crate::store::Leftover;
use crate::{ErrorKind, Result};

/// Why something is garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Objects with no registry record.
    NoRecord,
    /// The record says the backup failed.
    Failed,
    /// The record says `running`, but its process holds neither its set's lease nor its
    /// policy's WAL lease (the run crashed or lost the lease).
    Abandoned,
    /// A deletion that did not finish.
    Deleting,
}

#[derive(Debug, Clone, Serialize)]
pub struct GcItem {
    pub backup_id: BackupId,
    pub policy: Name,
    pub reason: Reason,
    /// Whether a registry record is removed.
    pub record: bool,
    pub objects: Vec<String>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GcPlan {
    pub items: Vec<GcItem>,
    /// Interrupted writes (temporary files, unfinished uploads).
    pub leftovers: Vec<String>,
    pub leftover_bytes: u64,
    /// Sets skipped because a run holds their lease.
    pub busy_sets: Vec<String>,
    #[serde(skip)]
    leftover_items: Vec<(Option<Name>, Leftover)>,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRecord => "no record",
            Reason::Failed => "failed",
            Reason::Abandoned => "abandoned",
            Reason::Deleting => "deleting",
        }
    }
}

impl GcPlan {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.leftovers.is_empty()
    }
}

/// Finds garbage in this environment. Running records are abandoned when their holder is a
/// dead local process or holds neither the set's lease nor the policy's WAL lease.
pub async fn plan(repo: &Repo) -> Result<GcPlan> {
    let env = &repo.settings.environment;
    let objects = repo.store.list(&format!("{env}/")).await?;
    let mut by_backup: BTreeMap<BackupId, (Name, Vec<(ObjectKey, u64)>)> = BTreeMap::new();
    for meta in objects {
        if let Some((_, policy, id, _)) = ObjectKey::parse(meta.key.as_str()) {
            by_backup
                .entry(id)
                .or_insert_with(|| (policy, Vec::new()))
                .1
                .push((meta.key, meta.size));
        }
    }
    // Records without objects can be garbage too.
    let records = repo
        .registry
        .list(&crate::registry::ListQuery {
            environment: Some(env.clone()),
            ..Default::default()
        })
        .await?;
    let mut statuses = BTreeMap::new();
    for r in records {
        by_backup
            .entry(r.backup_id.clone())
            .or_insert_with(|| (r.policy.clone(), Vec::new()));
        statuses.insert(r.backup_id.clone(), r);
    }
    let mut live_leases = BTreeMap::new();
    let mut items = Vec::new();
    for (id, (policy, objects)) in by_backup {
        let (reason, record) = match statuses.get(&id) {
            None => (Reason::NoRecord, false),
            Some(r) => match r.status {
                Status::Completed => continue,
                Status::Failed => (Reason::Failed, true),
                Status::Deleting => (Reason::Deleting, true),
                Status::Running => {
                    // A backup runs under its set's lease, a WAL push under the
                    // policy's WAL lease: it is in flight while its own process holds
                    // either. A record of another process (one that crashed, or lost the
                    // lease) is abandoned, even while a later run holds the lease.
                    if !holder_is_dead(&r.holder) {
                        let mut held = false;
                        for lease_name in
                            [repo.set_lease_name(&policy), repo.wal_lease_name(&policy)]
                        {
                            let holder = match live_leases.get(&lease_name) {
                                Some(h) => h,
                                None => {
                                    let h = repo
                                        .registry
                                        .get_lease(&lease_name)
                                        .await?
                                        .map(|l| l.holder)
                                        .filter(|h| !holder_is_dead(h));
                                    live_leases.entry(lease_name).or_insert(h)
                                }
                            };
                            held |= holder.as_deref() == Some(r.holder.as_str());
                        }
                        if held {
                            continue;
                        }
                    }
                    (Reason::Abandoned, true)
                }
            },
        };
        items.push(GcItem {
            bytes: objects.iter().map(|(_, s)| s).sum(),
            objects: objects.into_iter().map(|(k, _)| k.to_string()).collect(),
            backup_id: id,
            policy,
            reason,
            record,
        });
    }
    // Interrupted writes: garbage unless their backup is still running.
    let mut leftover_items = Vec::new();
    let now = chrono::Utc::now();
    // Leftovers outside any backup directory, older than a day; listed once, when needed.
    let mut old_unowned: Option<Vec<Leftover>> = None;
    for leftover in repo.store.leftovers(now).await? {
        let mut parts = leftover.what.split('/');
        let (e, p, i) = (parts.next(), parts.next(), parts.next());
        let owner = match (
            e,
            p.and_then(|p| Name::parse(p).ok()),
            i.and_then(|i| BackupId::parse(i).ok()),
        ) {
            (Some(e), Some(policy), Some(id)) if e == env.as_str() => Some((policy, id)),
            _ => None,
        };
        match owner {
            Some((policy, id)) => {
                let running = statuses
                    .get(&id)
                    .is_some_and(|r| r.status == Status::Running);
                let abandoned = items.iter().any(|i| i.backup_id == id);
                if running && !abandoned {
                    continue;
                }
                leftover_items.push((Some(policy), leftover));
            }
            // Not below this environment's backups: only if it is old.
            None if e == Some(env.as_str()) => {
                if old_unowned.is_none() {
                    old_unowned = Some(
                        repo.store
                            .leftovers(now - chrono::Duration::hours(24))
                            .await?,
                    );
                }
                if old_unowned
                    .as_ref()
                    .is_some_and(|old| old.contains(&leftover))
                {
                    leftover_items.push((None, leftover));
                }
            }
            None => {}
        }
    }
    Ok(GcPlan {
        items,
        leftovers: leftover_items.iter().map(|(_, l)| l.what.clone()).collect(),
        leftover_bytes: leftover_items.iter().map(|(_, l)| l.size).sum(),
        busy_sets: Vec::new(),
        leftover_items,
    })
}

/// Applies a plan: per set, under the set's lease, delete objects, then records.
pub async fn apply(repo: &Repo, mut plan: GcPlan, cancel: &Cancel) -> Result<GcPlan> {
    let sets: BTreeSet<Name> = plan
        .items
        .iter()
        .map(|i| i.policy.clone())
        .chain(plan.leftover_items.iter().filter_map(|(p, _)| p.clone()))
        .collect();
    let mut done = Vec::new();
    let mut done_leftovers = Vec::new();
    for policy in &sets {
        cancel.check()?;
        let lease_name = repo.set_lease_name(policy);
        let lease = match LeaseGuard::acquire(
            repo.registry.clone(),
            &lease_name,
            repo.lease_ttl(),
            Some(Duration::ZERO),
            cancel,
        )
        .await
        {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::Locked => {
                plan.busy_sets.push(lease_name);
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = async {
            for item in plan.items.iter().filter(|i| &i.policy == policy) {
                cancel.check()?;
                if item.record {
                    let from = match item.reason {
                        Reason::Abandoned => Status::Running,
                        Reason::Failed => Status::Failed,
                        _ => Status::Deleting,
                    };
                    if from != Status::Deleting
                        && !repo
                            .registry
                            .transition(&item.backup_id, from, Status::Deleting, None)
                            .await?
                    {
                        continue; // changed since planning; leave it
                    }
                } else if repo.registry.get(&item.backup_id).await?.is_some() {
                    // Recorded since planning, or missed by a listing that lags behind
                    // writes (DynamoDB's index): a backup or WAL push in flight.
                    continue;
                }
                for key in &item.objects {
                    repo.store.delete(&ObjectKey::from_listing(key)?).await?;
                }
                if item.record {
                    repo.registry.remove(&item.backup_id).await?;
                }
                done.push(item.clone());
            }
            for (_, leftover) in plan
                .leftover_items
                .iter()
                .filter(|(p, _)| p.as_ref() == Some(policy))
            {
                repo.store.remove_leftover(leftover).await?;
                done_leftovers.push(leftover.clone());
            }
            Ok::<_, crate::Error>(())
        }
        .await;
        let _ = lease.release().await;
        result?;
    }
    for (_, leftover) in plan.leftover_items.iter().filter(|(p, _)| p.is_none()) {
        repo.store.remove_leftover(leftover).await?;
        done_leftovers.push(leftover.clone());
    }
    Ok(GcPlan {
        items: done,
        leftovers: done_leftovers.iter().map(|l| l.what.clone()).collect(),
        leftover_bytes: done_leftovers.iter().map(|l| l.size).sum(),
        busy_sets: plan.busy_sets,
        leftover_items: Vec::new(),
    })
}
