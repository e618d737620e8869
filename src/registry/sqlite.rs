//! The registry in a SQLite file (the embedded default), through sqlx. WAL journal with
//! `synchronous=FULL`: a returned write is durable.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::{
    corrupt, cursor_fallback, parse_ts, ts, upgradable_schema, usable_schema, BackupRecord, Lease,
    ListQuery, Location, Lookup, Registry, Status, Verification, SCHEMA_VERSION,
};
use crate::format::manifest::BackupType;
use crate::format::{BackupId, Manifest, Name};
use crate::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS backups (
    backup_id    TEXT PRIMARY KEY NOT NULL,
    environment  TEXT NOT NULL,
    policy       TEXT NOT NULL,
    status       TEXT NOT NULL,
    backup_type  TEXT NOT NULL,
    source_kind  TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    holder       TEXT NOT NULL,
    manifest     TEXT,
    locations    TEXT NOT NULL DEFAULT '[]',
    verification TEXT,
    error        TEXT,
    lookup       TEXT
);
CREATE INDEX IF NOT EXISTS backups_by_set ON backups (environment, policy, started_at, backup_id);
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY NOT NULL,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
"#;

/// `lookup` ([`Lookup::key`]) is set while a record is completed.
const LOOKUP_INDEX: &str = "CREATE INDEX IF NOT EXISTS backups_by_lookup \
    ON backups (environment, policy, lookup, started_at, backup_id) WHERE lookup IS NOT NULL";

pub struct SqliteRegistry {
    path: PathBuf,
    pool: SqlitePool,
}

impl SqliteRegistry {
    /// Prepares a connection pool; the file is created only by [`Registry::create`].
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(Error::from)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_lazy_with(options);
        Ok(SqliteRegistry {
            path: path.to_path_buf(),
            pool,
        })
    }
}

fn record_from_row(row: &SqliteRow) -> Result<BackupRecord> {
    let status: String = row.get("status");
    let backup_type: String = row.get("backup_type");
    let manifest: Option<String> = row.get("manifest");
    let locations: String = row.get("locations");
    let verification: Option<String> = row.get("verification");
    let finished_at: Option<String> = row.get("finished_at");
    Ok(BackupRecord {
        backup_id: BackupId::parse(row.get("backup_id"))?,
        environment: Name::parse(row.get("environment"))?,
        policy: Name::parse(row.get("policy"))?,
        status: Status::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        backup_type: match backup_type.as_str() {
            "full" => BackupType::Full,
            "incremental" => BackupType::Incremental,
            other => return Err(corrupt("backup type", other)),
        },
        source_kind: row.get("source_kind"),
        started_at: parse_ts(row.get("started_at"))?,
        finished_at: finished_at.as_deref().map(parse_ts).transpose()?,
        holder: row.get("holder"),
        manifest: manifest
            .map(|m| serde_json::from_str::<Manifest>(&m).map_err(|e| corrupt("manifest", e)))
            .transpose()?,
        locations: serde_json::from_str(&locations).map_err(|e| corrupt("location list", e))?,
        last_verification: verification
            .map(|v| {
                serde_json::from_str::<Verification>(&v).map_err(|e| corrupt("verification", e))
            })
            .transpose()?,
        error: row.get("error"),
    })
}

fn lease_from_row(row: &SqliteRow) -> Result<Lease> {
    let ms: i64 = row.get("expires_at");
    Ok(Lease {
        name: row.get("name"),
        holder: row.get("holder"),
        token: row.get("token"),
        expires_at: DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| corrupt("lease expiry", ms))?,
    })
}

impl SqliteRegistry {
    /// Brings the registry to this drctl's schema: a version 1 registry gets `lookup` and
    /// its index, and every completed record without a lookup gets one (all of them in a
    /// version 1 registry; any an older drctl that was still running completed since). One
    /// transaction, so a crash leaves the registry as it was; running it again changes
    /// nothing.
    async fn upgrade(&self) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (version,): (String,) =
            sqlx::query_as("SELECT value FROM registry_meta WHERE key = 'schema_version'")
                .fetch_one(&mut *tx)
                .await?;
        upgradable_schema(&self.describe(), &version)?;
        let columns: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM pragma_table_info('backups')")
                .fetch_all(&mut *tx)
                .await?;
        if !columns.iter().any(|(c,)| c == "lookup") {
            sqlx::query("ALTER TABLE backups ADD COLUMN lookup TEXT")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(LOOKUP_INDEX).execute(&mut *tx).await?;
        // Those Lookup::of may find something for: the rest never have a lookup.
        let missing = sqlx::query(
            "SELECT * FROM backups WHERE status = 'completed' AND lookup IS NULL \
             AND (backup_type = 'full' OR json_extract(manifest, '$.source.descriptor.mode') = 'wal')",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut filled = 0;
        for row in &missing {
            let record = record_from_row(row)?;
            if let Some(lookup) = Lookup::of(record.manifest()?) {
                sqlx::query("UPDATE backups SET lookup = ? WHERE backup_id = ?")
                    .bind(lookup.key())
                    .bind(record.backup_id.as_str())
                    .execute(&mut *tx)
                    .await?;
                filled += 1;
            }
        }
        sqlx::query("UPDATE registry_meta SET value = ? WHERE key = 'schema_version'")
            .bind(SCHEMA_VERSION)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if filled > 0 || version != SCHEMA_VERSION {
            tracing::info!(
                registry = %self.describe(),
                records = filled,
                "upgraded the registry to schema version {SCHEMA_VERSION}"
            );
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for SqliteRegistry {
    fn describe(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    async fn create(&self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        sqlx::raw_sql(SCHEMA).execute(&self.pool).await?;
        // A new registry is created at this version; an existing one keeps its own.
        sqlx::query(
            "INSERT OR IGNORE INTO registry_meta (key, value) VALUES ('schema_version', ?)",
        )
        .bind(SCHEMA_VERSION)
        .execute(&self.pool)
        .await?;
        self.upgrade().await?;
        Ok(())
    }

    async fn check(&self) -> Result<()> {
        let missing = || {
            Error::not_found(format!("no drctl registry at {}", self.describe()))
                .hint("run `drctl init`")
        };
        if !self.path.exists() {
            return Err(missing());
        }
        let found: Option<(String,)> =
            sqlx::query_as("SELECT value FROM registry_meta WHERE key = 'schema_version'")
                .fetch_optional(&self.pool)
                .await
                .map_err(|_| missing())?;
        match found {
            Some((v,)) => usable_schema(&self.describe(), &v),
            None => Err(missing()),
        }
    }

    async fn insert(&self, r: &BackupRecord) -> Result<()> {
        let res = sqlx::query(
            "INSERT INTO backups (backup_id, environment, policy, status, backup_type, source_kind, started_at, holder, locations)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (backup_id) DO NOTHING",
        )
        .bind(r.backup_id.as_str())
        .bind(r.environment.as_str())
        .bind(r.policy.as_str())
        .bind(r.status.as_str())
        .bind(r.backup_type.as_str())
        .bind(&r.source_kind)
        .bind(ts(&r.started_at))
        .bind(&r.holder)
        .bind(serde_json::to_string(&r.locations)?)
        .execute(&self.pool)
        .await?;
        if res.rows_affected() != 1 {
            return Err(Error::failure(format!(
                "backup {} is already registered",
                r.backup_id
            )));
        }
        Ok(())
    }

    async fn complete(
        &self,
        id: &BackupId,
        manifest: &Manifest,
        locations: &[Location],
    ) -> Result<()> {
        let res = sqlx::query(
            "UPDATE backups SET status = 'completed', finished_at = ?, manifest = ?, locations = ?, error = NULL, lookup = ?
             WHERE backup_id = ? AND status = 'running'",
        )
        .bind(ts(&manifest.finished_at))
        .bind(serde_json::to_string(manifest)?)
        .bind(serde_json::to_string(locations)?)
        .bind(Lookup::of(manifest).map(|l| l.key()))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() != 1 {
            return Err(Error::failure(format!(
                "backup {id} is no longer running in the registry; not marking it completed"
            )));
        }
        Ok(())
    }

    async fn transition(
        &self,
        id: &BackupId,
        from: Status,
        to: Status,
        error: Option<&str>,
    ) -> Result<bool> {
        let finished = matches!(to, Status::Failed).then(|| ts(&Utc::now()));
        let res = sqlx::query(
            "UPDATE backups SET status = ?, error = COALESCE(?, error), finished_at = COALESCE(?, finished_at), lookup = NULL
             WHERE backup_id = ? AND status = ?",
        )
        .bind(to.as_str())
        .bind(error)
        .bind(finished)
        .bind(id.as_str())
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    async fn remove(&self, id: &BackupId) -> Result<()> {
        let res = sqlx::query(
            "DELETE FROM backups WHERE backup_id = ? AND status IN ('deleting', 'failed')",
        )
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() != 1 {
            return Err(Error::failure(format!(
                "backup {id} is not marked deleting or failed; not removing it"
            )));
        }
        Ok(())
    }

    async fn set_verification(&self, id: &BackupId, v: &Verification) -> Result<()> {
        sqlx::query("UPDATE backups SET verification = ? WHERE backup_id = ?")
            .bind(serde_json::to_string(v)?)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn add_location(&self, id: &BackupId, location: &Location) -> Result<()> {
        let location = serde_json::to_string(location)?;
        let res = sqlx::query(
            "UPDATE backups SET locations = json_insert(locations, '$[#]', json(?1))
             WHERE backup_id = ?2 AND status = 'completed'
               AND NOT EXISTS (SELECT 1 FROM json_each(backups.locations) WHERE json(value) = json(?1))",
        )
        .bind(&location)
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 1 {
            return Ok(());
        }
        match self.get(id).await? {
            None => Err(Error::not_found(format!(
                "backup {id} not found in the registry"
            ))),
            Some(r) if r.status != Status::Completed => Err(Error::failure(format!(
                "backup {id} is {}, not completed; not adding a location",
                r.status.as_str()
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn get(&self, id: &BackupId) -> Result<Option<BackupRecord>> {
        let row = sqlx::query("SELECT * FROM backups WHERE backup_id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<BackupRecord>> {
        let mut builder =
            sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT * FROM backups WHERE 1 = 1");
        if let Some(env) = &q.environment {
            builder.push(" AND environment = ").push_bind(env.as_str());
        }
        if let Some(policy) = &q.policy {
            builder.push(" AND policy = ").push_bind(policy.as_str());
        }
        if let Some(status) = q.status {
            builder.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(before) = &q.before {
            let fallback = ts(&cursor_fallback(before));
            builder
                .push(" AND (started_at, backup_id) < (COALESCE((SELECT started_at FROM backups WHERE backup_id = ")
                .push_bind(before.as_str())
                .push("), ")
                .push_bind(fallback)
                .push("), ")
                .push_bind(before.as_str())
                .push(")");
        }
        // Start times have microseconds; the ID breaks ties within the same second.
        builder.push(" ORDER BY started_at DESC, backup_id DESC");
        if let Some(limit) = q.limit {
            builder.push(" LIMIT ").push_bind(i64::from(limit));
        }
        let rows = builder.build().fetch_all(&self.pool).await?;
        rows.iter().map(record_from_row).collect()
    }

    async fn find(
        &self,
        environment: &Name,
        policy: &Name,
        lookup: Lookup<'_>,
    ) -> Result<Option<BackupRecord>> {
        let row = sqlx::query(
            "SELECT * FROM backups WHERE environment = ? AND policy = ? AND lookup = ?
             AND status = 'completed' ORDER BY started_at DESC, backup_id DESC LIMIT 1",
        )
        .bind(environment.as_str())
        .bind(policy.as_str())
        .bind(lookup.key())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: chrono::Duration,
        take_over: Option<i64>,
    ) -> Result<std::result::Result<Lease, Lease>> {
        let now = Utc::now();
        // One conditional statement: insert, or take over an expired (or explicitly named) lease.
        // Released leases keep their row so the fencing token only ever grows.
        let row = sqlx::query(
            "INSERT INTO leases (name, holder, token, expires_at) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = leases.token + 1,
                 expires_at = excluded.expires_at
             WHERE leases.expires_at <= ?4 OR leases.token = ?5
             RETURNING name, holder, token, expires_at",
        )
        .bind(name)
        .bind(holder)
        .bind((now + ttl).timestamp_millis())
        .bind(now.timestamp_millis())
        .bind(take_over.unwrap_or(-1))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(Ok(lease_from_row(&row)?));
        }
        match self.get_lease(name).await? {
            Some(current) => Ok(Err(current)),
            None => Err(
                Error::failure(format!("lease {name} vanished while being acquired")).retryable(),
            ),
        }
    }

    async fn renew_lease(&self, lease: &Lease, ttl: chrono::Duration) -> Result<Lease> {
        let now = Utc::now();
        let row = sqlx::query(
            "UPDATE leases SET expires_at = ? WHERE name = ? AND token = ? AND holder = ? AND expires_at > ?
             RETURNING name, holder, token, expires_at",
        )
        .bind((now + ttl).timestamp_millis())
        .bind(&lease.name)
        .bind(lease.token)
        .bind(&lease.holder)
        .bind(now.timestamp_millis())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => lease_from_row(&row),
            None => Err(Error::failure(format!(
                "lease {} was lost (expired or taken over)",
                lease.name
            ))),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = ? AND token = ?")
            .bind(&lease.name)
            .bind(lease.token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_lease(&self, name: &str) -> Result<Option<Lease>> {
        let row = sqlx::query(
            "SELECT name, holder, token, expires_at FROM leases WHERE name = ? AND expires_at > ?",
        )
        .bind(name)
        .bind(Utc::now().timestamp_millis())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(lease_from_row).transpose()
    }
}
