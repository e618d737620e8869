//! Cross-region copies. After a backup completes, each replica bucket of its policy gets a
//! copy of every object (data, index, manifest): inside S3 with CopyObject when source and
//! replica share an endpoint, streamed through drctl otherwise. Each copy is read back and its
//! size and SHA-256 checked against the manifest before the location is recorded in the
//! registry, and in the replica region's own registry when drctl.yaml names one, so that
//! `drctl restore --region R` finds the backup with nothing of the primary region running.
//!
//! Replicas get the policy's storage class and Object Lock retention; SSE-KMS keys are
//! regional, so replicas are encrypted at rest with the replica bucket's default encryption.
//! Never modifies the primary copy or its registry record beyond adding locations.

use std::sync::Arc;

use bytes::Bytes;

use crate::cancel::Cancel;
use crate::config::policy::Replica;
use crate::config::{Policy, StoreUrl};
use crate::format::{Manifest, ObjectKey, ObjectName};
use crate::pipeline::Hasher;
use crate::registry::lease::holder_id;
use crate::registry::{BackupRecord, Location, Registry, Status};
use crate::repo::Repo;
use crate::store::s3::S3Store;
use crate::store::{ObjectStore, PutOptions};
use crate::{Error, ErrorKind, Result};

/// One object to copy: its key and the size and SHA-256 the copy must have.
struct Expected {
    key: ObjectKey,
    size: u64,
    sha256: String,
}

/// Copies a completed backup to every replica of its policy that is not among its
/// `recorded` locations already, and records it in every replica region's registry (again,
/// for a region whose copy is recorded: a run that failed between the two has left it
/// out). Returns the new locations.
pub async fn run(
    repo: &Repo,
    policy: &Policy,
    manifest: &Manifest,
    recorded: &[Location],
    cancel: &Cancel,
) -> Result<Vec<Location>> {
    let id = &manifest.backup_id;
    if policy.replicas.is_empty() {
        return Ok(Vec::new());
    }
    let key =
        |name: &ObjectName| ObjectKey::object(&manifest.environment, &manifest.policy, id, name);
    let mut objects = Vec::new();
    for o in &manifest.objects {
        objects.push(Expected {
            key: key(&o.object_name()?),
            size: o.stored_size,
            sha256: o.stored_sha256.clone(),
        });
    }
    let manifest_bytes = manifest.to_json();
    let mut hasher = Hasher::default();
    hasher.update(&manifest_bytes);
    let digest = hasher.finish();
    objects.push(Expected {
        key: key(&ObjectName::Manifest),
        size: digest.size,
        sha256: digest.sha256,
    });
    let opts = PutOptions {
        sse_kms_key_id: None,
        ..PutOptions::for_backup(&policy.storage, manifest.started_at)
    };
    let mut locations = Vec::new();
    for replica in &policy.replicas {
        let store = replica.repository.to_string();
        if recorded.iter().any(|l| l.store == store) {
            mirror_record(repo, &replica.region, manifest).await?;
            continue;
        }
        let location = copy_to(repo, replica, &objects, &opts, cancel)
            .await
            .map_err(|e| {
                Error::new(
                    if e.kind() == ErrorKind::Cancelled {
                        ErrorKind::Cancelled
                    } else {
                        ErrorKind::Partial
                    },
                    format!(
                        "backup {id} is complete in {}, but its copy to {} failed: {}",
                        repo.store.describe(),
                        replica.region,
                        e.message()
                    ),
                )
                .hint(e.guidance().unwrap_or(
                    "the backup itself is usable; fix the cause, the next backup is copied again",
                ))
            })?;
        repo.registry.add_location(id, &location).await?;
        tracing::info!(backup_id = %id, region = %replica.region, store = %location.store, "replica verified");
        locations.push(location);
        mirror_record(repo, &replica.region, manifest).await?;
    }
    Ok(locations)
}

async fn copy_to(
    repo: &Repo,
    replica: &Replica,
    objects: &[Expected],
    opts: &PutOptions,
    cancel: &Cancel,
) -> Result<Location> {
    let dest = S3Store::open(&replica.repository).await?;
    for o in objects {
        cancel.check()?;
        let in_s3 = match &repo.settings.repository {
            StoreUrl::S3(source) => dest.copy_within_s3(source, &o.key, o.size, opts).await?,
            StoreUrl::Local(_) => false,
        };
        if !in_s3 {
            stream_copy(&repo.store, &dest, &o.key, opts, cancel).await?;
        }
        check_copy(&dest, o, cancel).await?;
    }
    let first = &objects[0].key;
    let (env, policy, id, _) = ObjectKey::parse(first.as_str()).expect("keys built by layout");
    Ok(Location {
        region: replica.region.clone(),
        store: dest.describe(),
        prefix: ObjectKey::backup_prefix(&env, &policy, &id),
    })
}

async fn stream_copy(
    source: &Arc<dyn ObjectStore>,
    dest: &S3Store,
    key: &ObjectKey,
    opts: &PutOptions,
    cancel: &Cancel,
) -> Result<()> {
    let mut input = source.get(key).await?;
    let mut writer = dest.put(key, opts).await?;
    let copied: Result<()> = async {
        while let Some(chunk) = input.next().await {
            cancel.check()?;
            writer.write(chunk?).await?;
        }
        Ok(())
    }
    .await;
    match copied {
        Ok(()) => writer.finish().await.map(|_| ()),
        Err(e) => {
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

/// Reads the copy back and compares its size and SHA-256 with what the manifest says.
async fn check_copy(dest: &S3Store, expected: &Expected, cancel: &Cancel) -> Result<()> {
    let mut stream = dest.get(&expected.key).await?;
    let mut hasher = Hasher::default();
    while let Some(chunk) = stream.next().await {
        cancel.check()?;
        let chunk: Bytes = chunk?;
        hasher.update(&chunk);
    }
    let got = hasher.finish();
    if got.size != expected.size || got.sha256 != expected.sha256 {
        return Err(Error::integrity(format!(
            "the copy of {} in {} has {} bytes with SHA-256 {}, expected {} bytes with {}",
            expected.key,
            dest.describe(),
            got.size,
            got.sha256,
            expected.size,
            expected.sha256
        )));
    }
    Ok(())
}

/// Writes the backup's record, with every location, into the registry that drctl.yaml names
/// for `region`, unless that is the primary registry itself.
async fn mirror_record(repo: &Repo, region: &str, manifest: &Manifest) -> Result<()> {
    let Some(settings) = repo.settings.regions.get(region) else {
        return Ok(());
    };
    if settings.registry == repo.settings.registry {
        return Ok(());
    }
    let id = &manifest.backup_id;
    let primary = repo.registry.get(id).await?.ok_or_else(|| {
        Error::not_found(format!(
            "backup {id} vanished from the registry while copied"
        ))
    })?;
    let registry: Arc<dyn Registry> = crate::registry::open(&settings.registry).await?;
    let what = |e: Error| e.context(format!("record backup {id} in the {region} registry"));
    // A registry of an older schema would take the record but not its lookup.
    registry.check().await.map_err(what)?;
    match registry.get(id).await.map_err(what)? {
        // An earlier copy recorded it but failed before completing it.
        Some(r) if r.status == Status::Running => {
            registry
                .complete(id, manifest, &primary.locations)
                .await
                .map_err(what)?;
        }
        Some(_) => {
            for l in &primary.locations {
                registry.add_location(id, l).await.map_err(what)?;
            }
        }
        None => {
            let record = BackupRecord {
                status: Status::Running,
                finished_at: None,
                holder: holder_id(),
                manifest: None,
                locations: Vec::new(),
                last_verification: None,
                error: None,
                ..primary.clone()
            };
            registry.insert(&record).await.map_err(what)?;
            registry
                .complete(id, manifest, &primary.locations)
                .await
                .map_err(what)?;
        }
    }
    Ok(())
}
