//! Rebuilding the registry from a repository: every backup directory whose manifest is there
//! and whose objects are all present with the sizes the manifest gives becomes a `completed`
//! record. Used when the registry itself is lost, or to stand up a registry in the DR region
//! from the replica bucket alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::lease::holder_id;
use super::{BackupRecord, Location, Registry, Status};
use crate::cancel::Cancel;
use crate::format::{BackupId, Manifest, ObjectKey, ObjectName};
use crate::store::ObjectStore;
use crate::{Error, Result};

/// Largest manifest read; a manifest is a few KiB.
const MANIFEST_LIMIT: usize = 16 << 20;

#[derive(Debug, Default, Serialize)]
pub struct RebuildReport {
    /// Where the manifests were read.
    pub store: String,
    /// Backups recorded (or, in a dry run, that would be).
    pub added: Vec<BackupId>,
    /// Backups the registry already had.
    pub present: Vec<BackupId>,
    /// Backup directories that are not complete backups, with the reason.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub prefix: String,
    pub reason: String,
}

/// Scans `store` and records every complete backup the registry does not have, creating the
/// registry if it does not exist.
pub async fn rebuild(
    store: &Arc<dyn ObjectStore>,
    registry: &Arc<dyn Registry>,
    dry_run: bool,
    cancel: &Cancel,
) -> Result<RebuildReport> {
    // Sizes of every object drctl wrote, by backup directory.
    let mut backups: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for meta in store.list("").await? {
        if let Some((env, policy, id, name)) = ObjectKey::parse(meta.key.as_str()) {
            backups
                .entry(ObjectKey::backup_prefix(&env, &policy, &id))
                .or_default()
                .insert(name.file_name(), meta.size);
        }
    }
    let mut report = RebuildReport {
        store: store.describe(),
        ..Default::default()
    };
    let exists = match registry.check().await {
        Ok(()) => true,
        Err(e) if e.kind() == crate::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if !exists && !dry_run {
        registry.create().await?;
    }
    let holder = holder_id();
    for (prefix, objects) in backups {
        cancel.check()?;
        let manifest = match read_manifest(store, &prefix, &objects).await {
            Ok(m) => m,
            Err(e) => {
                report.skipped.push(Skipped {
                    prefix,
                    reason: e.message().to_owned(),
                });
                continue;
            }
        };
        let id = manifest.backup_id.clone();
        if exists && registry.get(&id).await?.is_some() {
            report.present.push(id);
            continue;
        }
        if !dry_run {
            let record = BackupRecord {
                backup_id: id.clone(),
                environment: manifest.environment.clone(),
                policy: manifest.policy.clone(),
                status: Status::Running,
                backup_type: manifest.backup_type,
                source_kind: manifest.source.kind.clone(),
                started_at: manifest.started_at,
                finished_at: None,
                holder: holder.clone(),
                manifest: None,
                locations: Vec::new(),
                last_verification: None,
                error: None,
            };
            let location = Location {
                region: store.region(),
                store: store.describe(),
                prefix: prefix.clone(),
            };
            registry.insert(&record).await?;
            registry.complete(&id, &manifest, &[location]).await?;
        }
        report.added.push(id);
    }
    Ok(report)
}

/// Reads and checks the manifest of one backup directory: it must name the backup its key
/// names, and every object it lists must be there with its stored size.
async fn read_manifest(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    objects: &BTreeMap<String, u64>,
) -> Result<Manifest> {
    let file = ObjectName::Manifest.file_name();
    if !objects.contains_key(&file) {
        return Err(Error::not_found(
            "no manifest (an interrupted or failed run; `drctl gc` removes it)",
        ));
    }
    let key = ObjectKey::from_listing(&format!("{prefix}{file}"))?;
    let manifest = Manifest::from_json(&store.get_bytes(&key, MANIFEST_LIMIT).await?)?;
    let expected =
        ObjectKey::backup_prefix(&manifest.environment, &manifest.policy, &manifest.backup_id);
    if expected != prefix {
        return Err(Error::integrity(format!(
            "the manifest describes {expected}, not this directory"
        )));
    }
    for object in &manifest.objects {
        match objects.get(&object.name) {
            None => return Err(Error::integrity(format!("{} is missing", object.name))),
            Some(&size) if size != object.stored_size => {
                return Err(Error::integrity(format!(
                    "{} has {size} bytes, the manifest says {}",
                    object.name, object.stored_size
                )))
            }
            Some(_) => {}
        }
    }
    Ok(manifest)
}
