//! Restores: resolve which backup and objects a request means (the plan), then stream them
//! back through the pipeline into a sink. A plan can be printed without doing anything
//! (`--dry-run`); executing it never writes outside its target.

pub mod extract;
pub mod mysql;
pub mod pgcopy;
pub mod pgdump;
pub mod postgres;
pub mod sqlite;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::cancel::Cancel;
use crate::crypto::Identities;
use crate::format::manifest::ObjectInfo;
use crate::format::{BackupId, Manifest, Name, ObjectKey, ObjectName};
use crate::pipeline::{Decoder, Digest};
use crate::registry::{BackupRecord, Status};
use crate::repo::Repo;
use crate::store::ObjectStore;
use crate::{Error, ErrorKind, Result};

pub use extract::{ExtractOptions, ExtractStats};

/// Which backup to restore.
#[derive(Debug, Clone)]
pub enum Selector {
    Latest,
    Id(BackupId),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector> {
        if s == "latest" {
            Ok(Selector::Latest)
        } else {
            BackupId::parse(s).map(Selector::Id)
        }
    }
}

/// Where restored bytes go.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// Unpack a file tree into a directory (or write a stream artifact to a file in it).
    Dir {
        path: PathBuf,
        overwrite: bool,
        allow_special: bool,
    },
    /// Write the artifact to standard output.
    Stdout,
    /// Load a database backup into a database server (`postgres://…`, `mysql://…`).
    Database {
        url: String,
        overwrite: bool,
        /// MariaDB: replay statements the checks before the replay refuse, with a warning.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replay_anyway: bool,
        /// PostgreSQL: `maintenance_work_mem` of the sessions that build indexes and
        /// constraints, instead of drctl's default ([`postgres::IndexMemory`]), or the server's.
        #[serde(skip_serializing_if = "Option::is_none")]
        maintenance_work_mem: Option<postgres::IndexMemoryChoice>,
    },
}

/// How far a restore replays a backup's log chain (WAL, binary logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum RecoveryTarget {
    /// Everything the backups hold.
    Latest,
    /// Up to and including this moment.
    Time(chrono::DateTime<chrono::Utc>),
    /// Up to this PostgreSQL log sequence number (`16/B374D848`).
    Lsn(String),
}

/// What a user asks to restore.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub policy: Name,
    pub selector: Selector,
    pub target: Target,
    pub recovery: RecoveryTarget,
    pub server: ServerOptions,
}

/// The database server a restore starts (PostgreSQL physical restores).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The port it listens on.
    pub port: Option<u16>,
    /// It archives its WAL into the policy, continuing the archive on its new timeline
    /// (for a server that replaces the source); otherwise it archives nothing.
    pub archive: bool,
    /// The timeline its recovery follows.
    pub timeline: postgres::Timeline,
    /// Where its tablespaces go (DIR/OID), instead of their original locations.
    pub tablespace_dir: Option<PathBuf>,
}

/// What a restore will do; printed by `--dry-run`.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    pub backup_id: BackupId,
    pub environment: Name,
    pub policy: Name,
    pub source_kind: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub object: String,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
    pub recipients: Vec<String>,
    pub target: Target,
    pub recovery: RecoveryTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The artifact is a tar archive that will be unpacked.
    pub unpack: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<postgres::PgPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mysql: Option<mysql::MysqlPlan>,
    #[serde(skip)]
    data: ObjectInfo,
    /// The source's counters from the manifest (row counts to check against).
    #[serde(skip)]
    stats: crate::source::Stats,
    #[serde(skip)]
    key: ObjectKey,
}

/// Finds the record a selector means in a set: completed only.
pub async fn select(repo: &Repo, policy: &Name, selector: &Selector) -> Result<BackupRecord> {
    let env = &repo.settings.environment;
    let record = match selector {
        Selector::Latest => repo.registry.latest(env, policy).await?.ok_or_else(|| {
            Error::not_found(format!(
                "no completed backup of policy {policy} in environment {env}"
            ))
            .hint("`drctl list` shows what exists")
        })?,
        Selector::Id(id) => {
            let r = repo.registry.get(id).await?.ok_or_else(|| {
                Error::not_found(format!("backup {id} not found in the registry"))
            })?;
            if &r.policy != policy || &r.environment != env {
                return Err(Error::invalid(format!(
                    "backup {id} belongs to policy {} in environment {}, not policy {policy} in {env}",
                    r.policy, r.environment
                )));
            }
            r
        }
    };
    if record.status != Status::Completed {
        return Err(Error::invalid(format!(
            "backup {} is {}, not completed; it cannot be restored",
            record.backup_id,
            record.status.as_str()
        )));
    }
    Ok(record)
}

pub async fn plan(repo: &Repo, request: RestoreRequest) -> Result<RestorePlan> {
    let RestoreRequest {
        policy,
        selector,
        target,
        recovery,
        server,
    } = request;
    let mut record = select(repo, &policy, &selector).await?;
    let postgres = if record.source_kind == "postgres" {
        let (base, pg) =
            postgres::plan(repo, record, &selector, &target, &recovery, &server).await?;
        record = base;
        pg
    } else {
        None
    };
    let mysql = match (&target, record.source_kind.as_str()) {
        (
            Target::Database {
                url,
                overwrite,
                maintenance_work_mem,
                replay_anyway,
            },
            "mysql",
        ) => {
            if maintenance_work_mem.is_some() {
                return Err(Error::invalid(format!(
                    "backup {} is a MariaDB/MySQL backup: --maintenance-work-mem is for PostgreSQL restores",
                    record.backup_id
                )));
            }
            let (last, mut my) =
                mysql::plan(repo, record, &selector, url, *overwrite, &recovery).await?;
            my.replay_anyway = *replay_anyway;
            record = last;
            Some(my)
        }
        _ => None,
    };
    let manifest = record.manifest()?;
    match (&target, manifest.source.kind.as_str()) {
        _ if mysql.is_some() => {}
        (
            Target::Dir {
                path, overwrite, ..
            },
            "sqlite",
        ) if recovery == RecoveryTarget::Latest => sqlite::check_target(path, *overwrite)?,
        _ if postgres.is_none()
            && (matches!(target, Target::Database { .. })
                || recovery != RecoveryTarget::Latest) =>
        {
            return Err(not_a_database(&record.backup_id, &record.source_kind));
        }
        (
            Target::Dir {
                path, overwrite, ..
            },
            _,
        ) => check_target(path, *overwrite)?,
        _ => {}
    }
    let data = manifest.data()?.clone();
    let name = data.object_name()?;
    let unpack = matches!(&name, ObjectName::Data { artifact } if artifact == "tar")
        && matches!(target, Target::Dir { .. });
    let key = ObjectKey::object(
        &manifest.environment,
        &manifest.policy,
        &manifest.backup_id,
        &name,
    );
    let (object, stored_bytes, plain_bytes) = match &mysql {
        Some(my) => my.summary()?,
        None => (key.to_string(), data.stored_size, data.plain_size),
    };
    Ok(RestorePlan {
        backup_id: manifest.backup_id.clone(),
        environment: manifest.environment.clone(),
        policy: manifest.policy.clone(),
        source_kind: manifest.source.kind.clone(),
        started_at: manifest.started_at,
        object,
        stored_bytes,
        plain_bytes,
        recipients: manifest.encryption.recipients.clone(),
        target,
        recovery,
        port: server.port,
        unpack,
        postgres,
        mysql,
        data,
        stats: manifest.source.stats.clone(),
        key,
    })
}

fn not_a_database(id: &BackupId, kind: &str) -> Error {
    Error::invalid(format!(
        "backup {id} is a {kind} backup: it restores into a directory or to standard output, \
         to the state it was taken in (--to-database, --until and --lsn are for database backups)"
    ))
}

/// A restore target must be missing or empty unless `overwrite` is set.
pub(crate) fn check_target(path: &std::path::Path, overwrite: bool) -> Result<()> {
    match std::fs::read_dir(path) {
        Ok(mut rd) => {
            if rd.next().is_some() && !overwrite {
                return Err(Error::invalid(format!(
                    "restore target {} is not empty",
                    path.display()
                ))
                .hint(
                    "restore into an empty directory, or pass --overwrite to replace files in it",
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(Error::invalid(format!(
            "restore target {} is not a directory",
            path.display()
        ))),
        Err(e) => Err(Error::io(format!("restore target {}", path.display()), e)),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: BackupId,
    pub plain: Digest,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extracted: Option<ExtractStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_to: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<postgres::PgReport>,
    /// The backups applied, full first, when a restore replays a chain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<BackupId>,
    /// Row counts recorded at backup time that matched the restored database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<RowCheck>,
    pub seconds: f64,
}

/// Row counts recorded at backup time, found again in the restored database.
#[derive(Debug, Clone, Serialize)]
pub struct RowCheck {
    pub tables: usize,
    pub rows: u64,
}

/// Compares the `tables` row counts of a manifest's stats with a restored database's; any
/// difference (a table missing, extra, or with another count) is an integrity error naming
/// each one. Names match by their `key` (what tells tables apart, whatever their quoting).
/// A restore over existing objects (`over`) leaves the tables the backup does not hold as
/// they were: those are named in a warning instead.
pub fn compare_rows(
    backup_id: &BackupId,
    stats: &crate::source::Stats,
    actual: &std::collections::BTreeMap<String, u64>,
    target: &str,
    key: fn(&str) -> String,
    over: bool,
) -> Result<RowCheck> {
    let expected: std::collections::BTreeMap<String, u64> = stats
        .get("tables")
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(|e| {
            Error::integrity(format!(
                "backup {backup_id}: bad row counts in the manifest: {e}"
            ))
        })?
        .ok_or_else(|| {
            Error::integrity(format!(
                "backup {backup_id}: the manifest records no row counts"
            ))
        })?;
    // Tables the backup could not count (see `source::postgres::row_counts`).
    let uncounted: std::collections::BTreeSet<String> = stats
        .get("uncounted")
        .and_then(|u| serde_json::from_value::<Vec<String>>(u.clone()).ok())
        .unwrap_or_default()
        .iter()
        .map(|t| key(t))
        .collect();
    let restored: std::collections::BTreeMap<String, (&String, u64)> = actual
        .iter()
        .filter(|(t, _)| {
            let counted = !uncounted.contains(&key(t));
            if !counted {
                tracing::warn!("table {t} could not be counted in the backup's snapshot: its rows are not checked");
            }
            counted
        })
        .map(|(t, n)| (key(t), (t, *n)))
        .collect();
    let backed_up: std::collections::BTreeSet<String> = expected.keys().map(|t| key(t)).collect();
    let mut differences = Vec::new();
    for (table, want) in &expected {
        match restored.get(&key(table)) {
            Some((_, got)) if got == want => {}
            Some((_, got)) => differences.push(format!(
                "table {table}: {want} rows at backup, {got} restored"
            )),
            None => differences.push(format!("table {table} ({want} rows at backup) is missing")),
        }
    }
    let extra: Vec<&str> = restored
        .iter()
        .filter(|(k, _)| !backed_up.contains(*k))
        .map(|(_, (table, _))| table.as_str())
        .collect();
    if over && !extra.is_empty() {
        tracing::warn!(
            "{target} keeps tables the backup does not hold, as they were: {}",
            extra.join(", ")
        );
    } else {
        differences.extend(
            extra
                .iter()
                .map(|t| format!("table {t} was not in the backup")),
        );
    }
    if !differences.is_empty() {
        return Err(Error::integrity(format!(
            "restored {target} differs from backup {backup_id}: {}",
            differences.join("; ")
        )));
    }
    Ok(RowCheck {
        tables: expected.len(),
        rows: expected.values().sum(),
    })
}

/// Opens an object of a backup for decoding, on a blocking thread's behalf.
pub async fn open_object(
    store: &Arc<dyn ObjectStore>,
    key: &ObjectKey,
    backup_id: &BackupId,
) -> Result<crate::store::ByteStream> {
    store.get(key).await.map_err(|e| {
        if e.kind() == crate::ErrorKind::NotFound {
            Error::integrity(format!(
                "backup {backup_id}: object {key} is missing from {}",
                store.describe()
            ))
            .hint("restore from another backup or a replica; `drctl verify --all` checks the rest")
        } else {
            e
        }
    })
}

/// Decodes a backup's data object on a blocking thread, handing the plain bytes to `sink`.
pub async fn decode<T: Send + 'static>(
    repo: &Repo,
    manifest: &Manifest,
    identities: Arc<Identities>,
    sink: impl FnOnce(&mut dyn BufRead) -> Result<T> + Send + 'static,
) -> Result<(T, Digest)> {
    let data = manifest.data()?.clone();
    let key = ObjectKey::object(
        &manifest.environment,
        &manifest.policy,
        &manifest.backup_id,
        &data.object_name()?,
    );
    let object = Object {
        key,
        backup_id: manifest.backup_id.clone(),
        info: data,
        recipients: manifest.encryption.recipients.clone(),
    };
    decode_object(repo, object, identities, None, sink).await
}

/// One stored object to decode, and what its manifest says of it.
pub(crate) struct Object {
    key: ObjectKey,
    backup_id: BackupId,
    info: ObjectInfo,
    recipients: Vec<String>,
}

/// How far past a consumer's failure the stream is read for damage that explains it: a
/// failure on good data (a database error, a full disk) is reported without reading the
/// whole backup.
const LOOK_AHEAD: u64 = 64 << 20;

/// Decodes an object on a blocking thread, handing the plain bytes (counted into `progress`)
/// to `sink`; then reads what the sink left and checks sizes and checksums.
pub(crate) async fn decode_object<T: Send + 'static>(
    repo: &Repo,
    object: Object,
    identities: Arc<Identities>,
    progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    sink: impl FnOnce(&mut dyn BufRead) -> Result<T> + Send + 'static,
) -> Result<(T, Digest)> {
    let stream = open_object(&repo.store, &object.key, &object.backup_id).await?;
    let what = format!("backup {} object {}", object.backup_id, object.key);
    tokio::task::spawn_blocking(move || {
        let decoder = Decoder::open(stream, &identities, object.info, &object.recipients, what)?;
        let mut reader = ProgressReader {
            inner: decoder,
            progress,
        };
        match sink(&mut reader) {
            Ok(t) => Ok((t, reader.inner.finish()?)),
            // Refused input is reported as such, and a cancel at once; otherwise damaged
            // stored bytes just past the failure would explain it, so report that cause.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Integrity | ErrorKind::InvalidInput | ErrorKind::Cancelled
                ) =>
            {
                Err(e)
            }
            Err(e) => Err(reader.inner.abandon(LOOK_AHEAD).unwrap_or(e)),
        }
    })
    .await
    .map_err(|e| Error::failure(format!("restore thread failed: {e}")))?
}

impl RestorePlan {
    pub(crate) fn object(&self) -> Object {
        Object {
            key: self.key.clone(),
            backup_id: self.backup_id.clone(),
            info: self.data.clone(),
            recipients: self.recipients.clone(),
        }
    }
}

pub async fn execute(
    repo: &Repo,
    plan: &RestorePlan,
    identities: Arc<Identities>,
    progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    cancel: &Cancel,
) -> Result<RestoreReport> {
    if let (Target::Dir { .. }, "sqlite") = (&plan.target, plan.source_kind.as_str()) {
        return sqlite::execute(repo, plan, identities, progress, cancel).await;
    }
    if let Some(my) = &plan.mysql {
        return mysql::execute(repo, plan, my, identities, cancel).await;
    }
    let started = std::time::Instant::now();
    if let Some(pg) = &plan.postgres {
        let (report, rows) = postgres::execute(repo, pg, identities, cancel).await?;
        return Ok(RestoreReport {
            backup_id: plan.backup_id.clone(),
            plain: report.plain().clone(),
            extracted: None,
            written_to: None,
            postgres: Some(report),
            chain: Vec::new(),
            rows,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let (target, unpack) = (plan.target.clone(), plan.unpack);
    let file_name = plan
        .key
        .as_str()
        .rsplit('/')
        .next()
        .unwrap_or("data")
        .trim_end_matches(".zst.age")
        .to_owned();
    let cancel = cancel.clone();
    let (plan_id, kind) = (plan.backup_id.clone(), plan.source_kind.clone());
    let ((extracted, written_to), plain) = decode_object(
        repo,
        plan.object(),
        identities,
        progress,
        move |reader| -> Result<(Option<ExtractStats>, Option<PathBuf>)> {
            match target {
                Target::Database { .. } => Err(not_a_database(&plan_id, &kind)),
                Target::Stdout => {
                    let stdout = std::io::stdout();
                    let mut out =
                        std::io::BufWriter::with_capacity(crate::store::FILE_WRITE, stdout.lock());
                    copy_cancellable(reader, &mut out, &cancel)?;
                    out.flush().map_err(|e| Error::io("write to stdout", e))?;
                    Ok((None, None))
                }
                Target::Dir {
                    path,
                    allow_special,
                    ..
                } => {
                    std::fs::create_dir_all(&path)
                        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
                    if unpack {
                        let opts = ExtractOptions {
                            allow_special,
                            ..ExtractOptions::default()
                        };
                        let stats = extract::extract(reader, &path, &opts, &cancel)?;
                        Ok((Some(stats), None))
                    } else {
                        let file = path.join(&file_name);
                        let mut f = std::fs::File::create(&file)
                            .map_err(|e| Error::io(format!("create {}", file.display()), e))?;
                        copy_cancellable(reader, &mut f, &cancel)?;
                        f.sync_all()
                            .map_err(|e| Error::io(format!("fsync {}", file.display()), e))?;
                        Ok((None, Some(file)))
                    }
                }
            }
        },
    )
    .await?;
    Ok(RestoreReport {
        backup_id: plan.backup_id.clone(),
        plain,
        extracted,
        written_to,
        postgres: None,
        chain: Vec::new(),
        rows: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copies the decoded chunks (large already) to `out`, unbuffered, in writes of at most
/// [`crate::store::FILE_WRITE`].
fn copy_cancellable(reader: &mut dyn BufRead, out: &mut impl Write, cancel: &Cancel) -> Result<()> {
    loop {
        cancel.check()?;
        let chunk = reader
            .fill_buf()
            .map_err(|e| crate::pipeline::damaged("restore", e))?;
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.len().min(crate::store::FILE_WRITE);
        out.write_all(&chunk[..n])
            .map_err(|e| Error::io("write restored data", e))?;
        reader.consume(n);
    }
}

/// Counts bytes read, for progress output.
struct ProgressReader<R> {
    inner: R,
    progress: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl<R: std::io::Read> std::io::Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for ProgressReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.inner.consume(n);
        self.count(n);
    }
}

impl<R> ProgressReader<R> {
    fn count(&self, n: usize) {
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
