//! `drctl wal`: PostgreSQL's archive_command and restore_command.

use std::path::PathBuf;

use super::Ctx;
use crate::backup::Job;
use crate::config::policy::PostgresMode;
use crate::config::{ByteSize, Policy, SourceConfig};
use crate::format::manifest::{BackupType, Manifest};
use crate::format::{BackupId, Name};
use crate::pipeline::HashReader;
use crate::registry::lease::LeaseGuard;
use crate::registry::{BackupRecord, Lookup, Status};
use crate::repo::Repo;
use crate::restore::postgres::{fetch_wal, same_cluster, system_identifier, WalIndex};
use crate::source::postgres::WalSource;
use crate::{Error, ErrorKind, Result};

/// Archive and fetch PostgreSQL WAL for a `postgres` policy in physical mode.
///
/// In postgresql.conf of the server being backed up, set archive_mode = on and
/// archive_command = 'drctl --config /etc/drctl/drctl.yaml wal push --policy app-pg %p'.
/// `drctl restore` of a physical backup writes the matching restore_command itself.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    Push(PushArgs),
    Fetch(FetchArgs),
}

/// Compress, encrypt, upload and register one WAL file (archive_command, `%p`).
///
/// Each file becomes an incremental backup of the policy whose parent is the newest base
/// backup. Pushing a file that is already archived with the same contents succeeds without
/// storing it again (after copying it to any replica it is missing from); the same name with
/// different contents fails (exit 4), so PostgreSQL keeps the file and retries instead of
/// losing it.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Policy (postgres, mode physical).
    #[arg(long, short)]
    pub policy: String,
    /// Archive into this region's registry and replica bucket (drctl.yaml `regions:`), for a
    /// server restored there while the primary region is down; `drctl restore --region R
    /// --archive` passes it. Such a push is not copied to the policy's replicas.
    #[arg(long)]
    pub region: Option<String>,
    /// The WAL file (PostgreSQL's %p).
    pub path: PathBuf,
}

/// Write an archived WAL file to a path (restore_command, `%f %p`).
///
/// Exits 10 when the file is not archived, which tells PostgreSQL that recovery has reached
/// the end of the archive. Any other failure (the archive unreachable, a damaged object, no
/// key, a bad config) exits 126, which makes PostgreSQL stop recovery with an error instead
/// of ending it early at the last WAL it got.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// Policy (postgres, mode physical).
    #[arg(long, short)]
    pub policy: String,
    /// Read this region's registry and replica bucket (drctl.yaml `regions:`), as
    /// `drctl restore --region` does; `drctl restore` passes its own.
    #[arg(long)]
    pub region: Option<String>,
    /// Look WAL files up in this index first (`drctl restore` writes one into the restored
    /// data directory and passes it), then in the registry; an index that cannot be read is
    /// skipped with a warning.
    #[arg(long, value_name = "FILE")]
    pub index: Option<PathBuf>,
    /// The WAL file name (PostgreSQL's %f).
    pub name: String,
    /// Where to write it (PostgreSQL's %p).
    pub path: PathBuf,
}

pub async fn run(ctx: &Ctx, command: Command) -> Result<()> {
    match command {
        Command::Push(a) => push(ctx, a).await,
        Command::Fetch(a) => fetch(ctx, a).await,
    }
}

fn check_policy(policy: &Policy) -> Result<()> {
    match &policy.source {
        SourceConfig::Postgres {
            mode: PostgresMode::Physical,
            ..
        } => Ok(()),
        _ => Err(Error::invalid(format!(
            "policy {} is not a postgres policy in physical mode; WAL belongs to those",
            policy.name
        ))),
    }
}

async fn push(ctx: &Ctx, args: PushArgs) -> Result<()> {
    // The queue is checked before the repository is opened: a backlog is what an archive
    // that cannot be reached leaves.
    let mut policy = Policy::load(&ctx.settings()?, &args.policy)?;
    check_policy(&policy)?;
    let source = WalSource::new(args.path.clone())?;
    let name = source.name().to_owned();
    let queue_max = match &policy.source {
        SourceConfig::Postgres {
            archive_push_queue_max,
            ..
        } => *archive_push_queue_max,
        _ => None,
    };
    if let Some((queue, max)) = over_queue_max(queue_max, &policy.name, &source) {
        tracing::warn!(
            "WAL segment {name} dropped, not archived by this push: {} of WAL waits for \
             archiving, more than archive-push-queue-max ({max}) of policy {}; point-in-time \
             recovery past the previous segment needs a new base backup of the cluster",
            ByteSize(queue),
            policy.name,
        );
        ctx.emit(
            "wal_push",
            &serde_json::json!({ "wal": name, "dropped": true, "queue_bytes": queue }),
            || format!("WAL file {name} dropped: the archive queue exceeds archive-push-queue-max"),
        );
        return Ok(());
    }
    let repo = ctx.repo_in(args.region.as_deref()).await?;
    if args.region.is_some() {
        // As the copies in that region are: no replicas of their own, and encrypted at rest
        // with the bucket's default key (SSE-KMS keys are regional).
        policy.replicas.clear();
        policy.storage.sse_kms_key_id = None;
    }
    // Under the lease, so that two pushes of one name cannot both find it missing.
    let lease = LeaseGuard::acquire(
        repo.registry.clone(),
        &repo.wal_lease_name(&policy.name),
        repo.lease_ttl(),
        Some(repo.lease_ttl()),
        &ctx.cancel,
    )
    .await?;
    let pushed = push_leased(ctx, &repo, &policy, source, &lease).await;
    let (backup_id, already_archived) = crate::backup::release(lease, pushed).await?;
    ctx.emit(
        "wal_push",
        &serde_json::json!({ "wal": name, "backup_id": backup_id, "already_archived": already_archived, "dropped": false }),
        || {
            if already_archived {
                format!("WAL file {name} is already archived as backup {backup_id}")
            } else {
                format!("WAL file {name} archived as backup {backup_id}")
            }
        },
    );
    Ok(())
}

/// The WAL waiting for archiving and the archive-push-queue-max `max` of `policy`, when the
/// one exceeds the other and `source` is a segment, which is then dropped.
fn over_queue_max(
    max: Option<ByteSize>,
    policy: &Name,
    source: &WalSource,
) -> Option<(u64, ByteSize)> {
    let max = max?;
    match source.archive_queue()? {
        (_, segment) if segment > max.0 => {
            tracing::warn!(
                "archive-push-queue-max ({max}) of policy {policy} is less than one WAL segment of this cluster ({}): it is ignored",
                ByteSize(segment)
            );
            None
        }
        (queue, _) if queue > max.0 => Some((queue, max)),
        _ => None,
    }
}

/// Archives the file `source` reads unless it is archived already; either way, copies it
/// to the replicas it is missing from (an earlier push may have stored it and then failed
/// to copy it). Returns its backup ID and whether it was archived already.
async fn push_leased(
    ctx: &Ctx,
    repo: &Repo,
    policy: &Policy,
    source: WalSource,
    lease: &LeaseGuard,
) -> Result<(BackupId, bool)> {
    let name = source.name().to_owned();
    let environment = &repo.settings.environment;
    // A file of the same name from another cluster (one created again under the policy,
    // whose WAL names start over) is not this one archived.
    let ours = source.system_identifier().map(|s| s.to_string());
    let found = repo
        .registry
        .find(environment, &policy.name, Lookup::Wal(&name))
        .await?
        .filter(|r| same_cluster(r, ours.as_deref()));
    let found = match found {
        Some(existing) => still_stored(repo, &source, existing).await?,
        None => None,
    };
    let Some((existing, manifest)) = found else {
        let base = repo
            .registry
            .find(environment, &policy.name, Lookup::Full)
            .await?;
        check_cluster(&source, base.as_ref())?;
        let job = Job {
            source: Box::new(source),
            backup_type: BackupType::Incremental,
            parent: base.map(|r| (r.backup_id.clone(), r.backup_id)),
        };
        let manifest =
            crate::backup::run_leased(repo, policy, job, None, &ctx.cancel, lease).await?;
        return Ok((manifest.backup_id, false));
    };
    crate::replicate::run(repo, policy, &manifest, &existing.locations, &ctx.cancel).await?;
    Ok((existing.backup_id.clone(), true))
}

/// The record and manifest of `existing`, the archived file of `source`'s name, if its
/// contents are `source`'s and its objects are still stored. Different contents are an
/// error. Objects that are gone (deleted by hand or by a bucket's lifecycle rule) fail the
/// record, so that the file, whose last copy PostgreSQL is about to recycle, is archived
/// again.
async fn still_stored(
    repo: &Repo,
    source: &WalSource,
    existing: BackupRecord,
) -> Result<Option<(BackupRecord, Manifest)>> {
    let (name, path) = (source.name(), source.path());
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("read WAL file {}", path.display()), e))?;
    let digest = HashReader::new(file)
        .drain()
        .map_err(|e| Error::io(format!("read WAL file {}", path.display()), e))?;
    let manifest = existing.manifest()?.clone();
    let stored = manifest.data()?;
    if digest.sha256 != stored.plain_sha256 || digest.size != stored.plain_size {
        return Err(Error::integrity(format!(
            "WAL file {name} is already archived (backup {}) with different contents",
            existing.backup_id
        ))
        .hint(
            "two servers may be archiving into the same policy; give each cluster its own policy",
        ));
    }
    match crate::backup::check_stored(repo, &manifest).await {
        Ok(_) => Ok(Some((existing, manifest))),
        Err(e) if e.kind() == ErrorKind::Integrity => {
            tracing::warn!(
                "WAL file {name} was archived as backup {}, whose stored objects are no longer all there ({e}): it is archived again",
                existing.backup_id
            );
            let why = format!("its stored objects are gone: {e}");
            repo.registry
                .transition(
                    &existing.backup_id,
                    Status::Completed,
                    Status::Failed,
                    Some(&why),
                )
                .await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Refuses a segment written by another cluster than the one the policy's newest base
/// backup was taken of (as the system identifiers in the segment's header and in the base
/// backup's manifest tell): two clusters archiving into one policy, or one re-created
/// without a new base backup.
fn check_cluster(source: &WalSource, base: Option<&crate::registry::BackupRecord>) -> Result<()> {
    let Some(ours) = source.system_identifier() else {
        return Ok(());
    };
    let Some(base) = base else { return Ok(()) };
    base.manifest()?;
    match system_identifier(base) {
        Some(theirs) if theirs != ours.to_string() => Err(Error::invalid(format!(
            "WAL file {} was written by cluster {ours}, but the newest base backup of policy {} ({}) is of cluster {theirs}",
            source.name(),
            base.policy,
            base.backup_id
        ))
        .hint("give each cluster its own policy; after re-creating a cluster, take a base backup: drctl backup --policy NAME")),
        _ => Ok(()),
    }
}

/// `wal fetch`'s exit code for every failure but a file that is not archived: PostgreSQL
/// takes an exit status above 125 from restore_command as fatal and stops recovery.
pub const ABORT_RECOVERY: i32 = 126;

async fn fetch(ctx: &Ctx, args: FetchArgs) -> Result<()> {
    let fetched: Result<bool> = async {
        let repo = ctx.repo_in(args.region.as_deref()).await?;
        let policy = Name::parse(&args.policy)?;
        let identities = ctx.identities(&repo.settings)?;
        // The index only saves registry reads: without it, the registry answers.
        let index = match &args.index {
            Some(path) => WalIndex::read(path).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "looking WAL files up in the registry instead");
                WalIndex::default()
            }),
            None => WalIndex::default(),
        };
        match index.record(&repo, &policy, &args.name).await? {
            Some(record) => {
                // The data directory recovery runs in: where restore put the index, or here.
                let data_dir = args
                    .index
                    .as_deref()
                    .and_then(std::path::Path::parent)
                    .unwrap_or(std::path::Path::new(""));
                fetch_wal(&repo, &record, &args.path, data_dir, identities)
                    .await
                    .map(|()| true)
            }
            None => Ok(false),
        }
    }
    .await;
    match fetched {
        Ok(true) => {
            ctx.emit(
                "wal_fetch",
                &serde_json::json!({ "wal": args.name }),
                String::new,
            );
            Ok(())
        }
        Ok(false) => {
            // Noted for the restore, which checks how far recovery read.
            if let Some(index) = &args.index {
                note_missing(&index.with_file_name(WalIndex::MISSING), &args.name);
            }
            Err(Error::not_found(format!(
                "WAL file {} is not in the archive of policy {}",
                args.name, args.policy
            )))
        }
        Err(e) => Err(e.with_exit_code(ABORT_RECOVERY)),
    }
}

/// Appends `name` to the file at `path`; a failure is only logged.
fn note_missing(path: &std::path::Path, name: &str) {
    use std::io::Write as _;
    let noted = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{name}\n").as_bytes()));
    if let Err(e) = noted {
        tracing::warn!(error = %e, path = %path.display(), "could not note a missing WAL file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::tests::segment_file;

    #[test]
    fn a_segment_is_dropped_only_with_more_than_the_limit_waiting_and_a_limit_of_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        let policy = Name::parse("pg").unwrap();
        // 32MB segments, three waiting: 96MB.
        let name = "000000010000000000000001";
        let source = WalSource::new(segment_file(&wal, name, 32 << 20)).unwrap();
        for segno in 1..=3 {
            let note = format!("0000000100000000000000{segno:02X}.ready");
            std::fs::write(wal.join("archive_status").join(note), b"").unwrap();
        }
        let limit = |s: &str| Some(ByteSize::parse(s, 1).unwrap());
        assert_eq!(over_queue_max(None, &policy, &source), None);
        assert_eq!(
            over_queue_max(limit("64MB"), &policy, &source),
            Some((96 << 20, ByteSize(64 << 20)))
        );
        assert_eq!(over_queue_max(limit("96MB"), &policy, &source), None);
        assert_eq!(over_queue_max(limit("1GB"), &policy, &source), None);
        // Less than one segment: ignored, or every segment would be dropped.
        assert_eq!(over_queue_max(limit("16MB"), &policy, &source), None);
    }
}
