//! The backup job: lease, source, encode, upload, manifest, registry, in the order
//! `format` fixes. A failure or crash at any point leaves no `completed` record.

use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;

use crate::cancel::Cancel;
use crate::config::Policy;
use crate::crypto::Recipients;
use crate::format::manifest::{
    BackupType, EncryptionInfo, ObjectInfo, ObjectRole, PointInTime, SourceInfo, FORMAT_VERSION,
};
use crate::format::{BackupId, Manifest, ObjectKey, ObjectName};
use crate::pipeline::encode::Encoded;
use crate::pipeline::{encode_depth, EncodeOptions, Encoder, ENCODE_CHUNK};
use crate::registry::lease::{holder_id, LeaseGuard};
use crate::registry::{BackupRecord, Location, Status};
use crate::repo::Repo;
use crate::store::{ObjectWriter, PutOptions};
use crate::{Error, ErrorKind, Result};

pub struct BackupOptions {
    /// How long to wait for the set's lease; `None` refuses at once when it is held.
    pub wait: Option<Duration>,
    /// Counts plain bytes read, for progress output.
    pub progress: Option<Arc<AtomicU64>>,
}

/// What one backup takes: its source and where it sits in a chain.
pub struct Job {
    pub source: Box<dyn crate::source::Source>,
    pub backup_type: BackupType,
    /// The backup this one builds on, and the full backup its chain starts from.
    pub parent: Option<(BackupId, BackupId)>,
}

/// Runs one full backup of `policy`. Returns the manifest of the completed backup.
pub async fn run(
    repo: &Repo,
    policy: &Policy,
    opts: BackupOptions,
    cancel: &Cancel,
) -> Result<Manifest> {
    let job = Job {
        source: crate::source::open(policy)?,
        backup_type: BackupType::Full,
        parent: None,
    };
    run_job(repo, policy, job, opts, cancel).await
}

/// Runs one incremental backup of `policy`: what changed since the newest completed backup of
/// its set, which becomes the parent. Only sources with a change log (binary logs) offer it.
pub async fn run_incremental(
    repo: &Repo,
    policy: &Policy,
    opts: BackupOptions,
    cancel: &Cancel,
) -> Result<Manifest> {
    let latest = repo
        .registry
        .latest(&repo.settings.environment, &policy.name)
        .await?;
    let parent = latest.as_ref().map(|r| r.manifest()).transpose()?;
    let source = crate::source::open_incremental(policy, parent)?;
    let job = Job {
        source,
        backup_type: BackupType::Incremental,
        parent: parent.map(|p| (p.backup_id.clone(), p.chain_base_id.clone())),
    };
    run_job(repo, policy, job, opts, cancel).await
}

/// Runs one backup of `policy` from the job's source, under the lease of the policy's set.
async fn run_job(
    repo: &Repo,
    policy: &Policy,
    job: Job,
    opts: BackupOptions,
    cancel: &Cancel,
) -> Result<Manifest> {
    let lease = LeaseGuard::acquire(
        repo.registry.clone(),
        &repo.set_lease_name(&policy.name),
        repo.lease_ttl(),
        opts.wait,
        cancel,
    )
    .await?;
    let result = run_leased(repo, policy, job, opts.progress, cancel, &lease).await;
    release(lease, result).await
}

/// Runs one backup of `policy` from the job's source while the caller holds `lease`, then
/// copies it to the policy's replicas.
pub async fn run_leased(
    repo: &Repo,
    policy: &Policy,
    job: Job,
    progress: Option<Arc<AtomicU64>>,
    cancel: &Cancel,
    lease: &LeaseGuard,
) -> Result<Manifest> {
    let recipients = crate::crypto::Recipients::from_settings(&repo.settings)?;
    let manifest = run_locked(repo, policy, job, recipients, progress, cancel, lease).await?;
    // Still under the lease: retention cannot remove the backup while it is copied.
    crate::replicate::run(repo, policy, &manifest, &[], cancel).await?;
    Ok(manifest)
}

/// Releases `lease` once the job it guarded has ended with `result`; a lease that cannot be
/// released expires on its own, so only the job's own result counts.
pub async fn release<T>(lease: LeaseGuard, result: Result<T>) -> Result<T> {
    let released = lease.release().await;
    let value = result?;
    if let Err(e) = released {
        tracing::warn!(error = %e, "could not release the lease; it expires on its own");
    }
    Ok(value)
}

async fn run_locked(
    repo: &Repo,
    policy: &Policy,
    job: Job,
    recipients: Recipients,
    progress: Option<Arc<AtomicU64>>,
    cancel: &Cancel,
    lease: &LeaseGuard,
) -> Result<Manifest> {
    let env = &repo.settings.environment;
    let Job {
        source,
        backup_type,
        parent,
        ..
    } = job;
    let started_at = Utc::now();
    let id = BackupId::generate(started_at);
    let record = BackupRecord {
        backup_id: id.clone(),
        environment: env.clone(),
        policy: policy.name.clone(),
        status: Status::Running,
        backup_type,
        source_kind: source.kind().to_owned(),
        started_at,
        finished_at: None,
        holder: holder_id(),
        manifest: None,
        locations: Vec::new(),
        last_verification: None,
        error: None,
    };
    repo.registry.insert(&record).await?;
    tracing::info!(backup_id = %id, policy = %policy.name, "backup started");

    let put_opts = PutOptions::for_backup(&policy.storage, started_at);
    let written = write_objects(
        repo,
        policy,
        &id,
        &put_opts,
        source,
        &recipients,
        progress,
        cancel,
    );
    match written.await {
        Ok((objects, source_info, point_in_time)) => {
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                backup_id: id.clone(),
                environment: env.clone(),
                policy: policy.name.clone(),
                source: source_info,
                backup_type,
                parent_id: parent.as_ref().map(|(p, _)| p.clone()),
                chain_base_id: parent.map(|(_, base)| base).unwrap_or_else(|| id.clone()),
                started_at,
                finished_at: Utc::now(),
                point_in_time: point_in_time.unwrap_or(PointInTime {
                    timestamp: Some(started_at),
                    ..Default::default()
                }),
                objects,
                encryption: EncryptionInfo {
                    kms_keys: recipients.kms_keys(),
                    recipients: recipients.x25519,
                },
                drctl_version: crate::VERSION.to_owned(),
            };
            let committed = commit(repo, &manifest, lease, &put_opts).await;
            if let Err(e) = committed {
                fail(repo, &id, &e).await;
                return Err(e);
            }
            tracing::info!(backup_id = %id, "backup completed");
            Ok(manifest)
        }
        Err(e) => {
            fail(repo, &id, &e).await;
            Err(e.context(format!("backup {id} of policy {} failed", policy.name)))
        }
    }
}

async fn fail(repo: &Repo, id: &BackupId, e: &Error) {
    tracing::info!(backup_id = %id, error = %e, "backup failed");
    if let Err(e2) = repo
        .registry
        .transition(id, Status::Running, Status::Failed, Some(e.message()))
        .await
    {
        tracing::error!(backup_id = %id, error = %e2, "could not mark the backup failed; `drctl gc` will find it");
    }
}

/// Manifest object, then the registry record (`running` → `completed`).
async fn commit(
    repo: &Repo,
    manifest: &Manifest,
    lease: &LeaseGuard,
    put_opts: &PutOptions,
) -> Result<()> {
    let key = ObjectKey::object(
        &manifest.environment,
        &manifest.policy,
        &manifest.backup_id,
        &ObjectName::Manifest,
    );
    repo.store
        .put_bytes(&key, Bytes::from(manifest.to_json()), put_opts)
        .await?;
    // Every object must be present with the size we wrote before the record says so.
    let prefix = check_stored(repo, manifest).await?;
    lease.confirm().await?;
    let location = Location {
        region: repo.store.region(),
        store: repo.store.describe(),
        prefix,
    };
    repo.registry
        .complete(&manifest.backup_id, manifest, &[location])
        .await
}

/// Checks that every object of `manifest` is in the store with the size it was written
/// with (an integrity error if not); returns the backup's prefix. One listing, not a HEAD
/// per object: a write-only backup role may list but not read.
pub async fn check_stored(repo: &Repo, manifest: &Manifest) -> Result<String> {
    let prefix =
        ObjectKey::backup_prefix(&manifest.environment, &manifest.policy, &manifest.backup_id);
    let listed = repo.store.list(&prefix).await?;
    for object in &manifest.objects {
        let key = ObjectKey::object(
            &manifest.environment,
            &manifest.policy,
            &manifest.backup_id,
            &object.object_name()?,
        );
        match listed.iter().find(|m| m.key == key) {
            Some(meta) if meta.size == object.stored_size => {}
            other => {
                return Err(Error::integrity(format!(
                    "object {key} is {} after upload, expected {} bytes",
                    other
                        .map(|m| format!("{} bytes", m.size))
                        .unwrap_or_else(|| "missing".into()),
                    object.stored_size
                )))
            }
        }
    }
    Ok(prefix)
}

/// One object being uploaded: the writer task and the channel that feeds it.
struct Upload {
    name: ObjectName,
    key: ObjectKey,
    pump: tokio::task::JoinHandle<Result<Box<dyn ObjectWriter>>>,
}

impl Upload {
    async fn start(
        repo: &Repo,
        key: ObjectKey,
        name: ObjectName,
        opts: &PutOptions,
    ) -> Result<(Upload, tokio::sync::mpsc::Sender<Bytes>)> {
        let (tx, rx) = tokio::sync::mpsc::channel(encode_depth(ENCODE_CHUNK));
        let writer = repo.store.put(&key, opts).await?;
        let pump = tokio::spawn(crate::pipeline::pump(writer, rx));
        Ok((Upload { name, key, pump }, tx))
    }

    async fn writer(self) -> Result<Box<dyn ObjectWriter>> {
        self.pump
            .await
            .map_err(|e| Error::failure(format!("upload of {} failed: {e}", self.key)))?
    }
}

/// Chunk size of the file index stream: small, since the index is a fraction of the data.
const INDEX_CHUNK_SIZE: usize = 64 << 10;

type Produced = (
    crate::source::Stats,
    Option<PointInTime>,
    Encoded,
    Option<Encoded>,
);

#[allow(clippy::too_many_arguments)]
async fn write_objects(
    repo: &Repo,
    policy: &Policy,
    id: &BackupId,
    put_opts: &PutOptions,
    mut source: Box<dyn crate::source::Source>,
    recipients: &Recipients,
    progress: Option<Arc<AtomicU64>>,
    cancel: &Cancel,
) -> Result<(Vec<ObjectInfo>, SourceInfo, Option<PointInTime>)> {
    let env = &repo.settings.environment;
    let data_name = ObjectName::Data {
        artifact: source.artifact(),
    };
    let data_key = ObjectKey::object(env, &policy.name, id, &data_name);
    let (data_upload, data_tx) = Upload::start(repo, data_key, data_name, put_opts).await?;
    let mut uploads = vec![data_upload];
    let index_tx = if source.has_index() {
        let key = ObjectKey::object(env, &policy.name, id, &ObjectName::Index);
        let (upload, tx) = Upload::start(repo, key, ObjectName::Index, put_opts).await?;
        uploads.push(upload);
        Some(tx)
    } else {
        None
    };
    let kind = source.kind();
    let descriptor = source.descriptor();

    let data_opts = EncodeOptions {
        level: policy.compression.level,
        workers: policy.compression.workers(),
        recipients: recipients.clone(),
        progress,
        chunk_size: ENCODE_CHUNK,
    };
    let index_recipients = recipients.clone();
    let thread_cancel = cancel.clone();
    let producer = tokio::task::spawn_blocking(move || -> Result<Produced> {
        let mut data = Encoder::start(data_opts, data_tx)?;
        let mut index = match index_tx {
            Some(tx) => Some(Encoder::start(
                EncodeOptions {
                    level: 3,
                    workers: 0,
                    recipients: index_recipients,
                    progress: None,
                    chunk_size: INDEX_CHUNK_SIZE,
                },
                tx,
            )?),
            None => None,
        };
        let ran = source.run(
            &mut data,
            index.as_mut().map(|e| e as &mut dyn Write),
            &thread_cancel,
        );
        match ran {
            Ok(stats) => {
                let data = data.finish()?;
                let index = index.map(Encoder::finish).transpose()?;
                Ok((stats, source.point_in_time(), data, index))
            }
            Err(e) => {
                data.abandon();
                if let Some(index) = index {
                    index.abandon();
                }
                Err(e)
            }
        }
    });
    let produced = producer
        .await
        .map_err(|e| Error::failure(format!("backup thread failed: {e}")))
        .and_then(|r| r);

    // Collect every writer; an upload failure explains a producer failure, so it wins.
    let mut writers = Vec::new();
    let mut upload_error = None;
    for upload in uploads {
        let name = upload.name.clone();
        match upload.writer().await {
            Ok(w) => writers.push((name, w)),
            Err(e) => upload_error = upload_error.or(Some(e)),
        }
    }
    let produced = match upload_error {
        Some(e) => Err(e),
        None => produced,
    };
    let (stats, point_in_time, data, index) = match produced {
        Ok(produced) => produced,
        Err(e) => {
            for (_, w) in writers {
                let _ = w.abort().await;
            }
            return Err(
                if cancel.is_cancelled() && e.kind() != ErrorKind::Cancelled {
                    Error::cancelled()
                } else {
                    e
                },
            );
        }
    };
    let mut objects = Vec::new();
    for (name, writer) in writers {
        let (role, encoded) = match &name {
            ObjectName::Index => (
                ObjectRole::Index,
                index.as_ref().expect("index was encoded"),
            ),
            _ => (ObjectRole::Data, &data),
        };
        let meta = writer.finish().await?;
        if meta.size != encoded.stored.size {
            return Err(Error::integrity(format!(
                "{}: store holds {} bytes, {} were written",
                meta.key, meta.size, encoded.stored.size
            )));
        }
        objects.push(ObjectInfo {
            role,
            name: name.file_name(),
            plain_size: encoded.plain.size,
            plain_sha256: encoded.plain.sha256.clone(),
            stored_size: encoded.stored.size,
            stored_sha256: encoded.stored.sha256.clone(),
        });
    }
    Ok((
        objects,
        SourceInfo {
            kind: kind.to_owned(),
            descriptor,
            stats,
        },
        point_in_time,
    ))
}
