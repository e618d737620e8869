//! The registry: which backups exist, their status and where their copies are, plus leases.
//!
//! Every write is conditional (on the current status, or on a lease's fencing token), so two
//! writers never silently overwrite each other. A record is `completed` only after its objects
//! and manifest are durable; readers treat nothing else as a usable backup.

pub mod dynamodb;
pub mod lease;
pub mod rebuild;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::RegistryUrl;
use crate::format::manifest::BackupType;
use crate::format::{BackupId, Manifest, Name};
use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Completed,
    Failed,
    Deleting,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Deleting => "deleting",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "running" => Status::Running,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "deleting" => Status::Deleting,
            _ => return None,
        })
    }
}

/// One copy of a backup's objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Region of the copy (`local` for a directory).
    pub region: String,
    /// The store, as [`crate::store::ObjectStore::describe`] prints it.
    pub store: String,
    /// Key prefix of the backup's objects in that store.
    pub prefix: String,
}

/// The outcome of the last verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub at: DateTime<Utc>,
    pub deep: bool,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub backup_id: BackupId,
    pub environment: Name,
    pub policy: Name,
    pub status: Status,
    #[serde(rename = "type")]
    pub backup_type: BackupType,
    pub source_kind: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Who is running (or ran) the backup: `host:pid`.
    pub holder: String,
    pub manifest: Option<Manifest>,
    pub locations: Vec<Location>,
    pub last_verification: Option<Verification>,
    pub error: Option<String>,
}

impl BackupRecord {
    pub fn manifest(&self) -> Result<&Manifest> {
        self.manifest.as_ref().ok_or_else(|| {
            crate::Error::integrity(format!(
                "backup {} has no manifest (status {})",
                self.backup_id,
                self.status.as_str()
            ))
        })
    }
}

/// A listing query: newest first (by start time, then ID).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub environment: Option<Name>,
    pub policy: Option<Name>,
    pub status: Option<Status>,
    /// Only records older than this backup (pagination cursor: the last ID of a page).
    pub before: Option<BackupId>,
    pub limit: Option<u32>,
}

/// The registry schema this drctl reads and writes. Version 1 lacked the lookups of
/// [`Registry::find`], which [`Registry::create`] adds.
const SCHEMA_VERSION: &str = "2";

/// Whether a registry whose schema version is `found` can be used as it is; if not, what to
/// do about it.
fn usable_schema(registry: &str, found: &str) -> Result<()> {
    match found {
        SCHEMA_VERSION => Ok(()),
        "1" => Err(crate::Error::failure(format!(
            "registry {registry} has schema version 1, older than this drctl's ({SCHEMA_VERSION})"
        ))
        .hint("run `drctl init` to upgrade it")),
        _ => Err(unsupported_schema(registry, found)),
    }
}

/// Whether [`Registry::create`] can bring a registry of schema version `found` to this
/// drctl's.
fn upgradable_schema(registry: &str, found: &str) -> Result<()> {
    match found {
        "1" | SCHEMA_VERSION => Ok(()),
        _ => Err(unsupported_schema(registry, found)),
    }
}

fn unsupported_schema(registry: &str, found: &str) -> crate::Error {
    crate::Error::failure(format!(
        "registry {registry}: schema version {found} is not supported"
    ))
    .hint("upgrade drctl")
}

/// What [`Registry::find`] looks a completed record up by, besides its ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The archived WAL file of this name (a `wal push`).
    Wal(&'a str),
    /// A full backup.
    Full,
}

impl Lookup<'_> {
    /// What a record with this manifest is found by, if anything.
    pub fn of(manifest: &Manifest) -> Option<Lookup<'_>> {
        match manifest
            .source
            .descriptor
            .get("wal")
            .and_then(|w| w.as_str())
        {
            Some(name) if manifest.source.descriptor["mode"] == "wal" => Some(Lookup::Wal(name)),
            _ if manifest.backup_type == BackupType::Full => Some(Lookup::Full),
            _ => None,
        }
    }

    /// The lookup as one string: `wal/<name>` or `full`.
    pub fn key(&self) -> String {
        match self {
            Lookup::Wal(name) => format!("wal/{name}"),
            Lookup::Full => "full".into(),
        }
    }
}

/// A held lease. `token` is the fencing token: it grows with every acquisition, and writes
/// made under the lease carry it, so a holder whose lease was taken over cannot write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub token: i64,
    pub expires_at: DateTime<Utc>,
}

#[async_trait]
pub trait Registry: Send + Sync {
    fn describe(&self) -> String;
    /// Creates tables if missing (idempotent).
    async fn create(&self) -> Result<()>;
    /// Fails with `NotFound` unless the registry exists.
    async fn check(&self) -> Result<()>;

    /// Inserts a new `running` record; fails if the ID exists.
    async fn insert(&self, record: &BackupRecord) -> Result<()>;
    /// `running` → `completed` with the manifest and locations; fails on any other status.
    async fn complete(
        &self,
        id: &BackupId,
        manifest: &Manifest,
        locations: &[Location],
    ) -> Result<()>;
    /// `from` → `to` (with an error message for `failed`); returns false if the status was not `from`.
    async fn transition(
        &self,
        id: &BackupId,
        from: Status,
        to: Status,
        error: Option<&str>,
    ) -> Result<bool>;
    /// Removes a record that is `deleting` or `failed`.
    async fn remove(&self, id: &BackupId) -> Result<()>;
    async fn set_verification(&self, id: &BackupId, v: &Verification) -> Result<()>;
    /// Records one more copy of a completed backup (a replica in another region). Adding a
    /// location the record already has changes nothing; fails unless the record is completed.
    async fn add_location(&self, id: &BackupId, location: &Location) -> Result<()>;

    async fn get(&self, id: &BackupId) -> Result<Option<BackupRecord>>;
    async fn list(&self, query: &ListQuery) -> Result<Vec<BackupRecord>>;
    /// The newest completed record of a set that `lookup` finds, read through an index:
    /// the time it takes does not grow with the set's history.
    async fn find(
        &self,
        environment: &Name,
        policy: &Name,
        lookup: Lookup<'_>,
    ) -> Result<Option<BackupRecord>>;

    /// Takes the lease if free, expired, or held with token `take_over`.
    /// Returns the current lease (someone else's) when it is held.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: chrono::Duration,
        take_over: Option<i64>,
    ) -> Result<std::result::Result<Lease, Lease>>;
    /// Extends a lease; fails if it was lost.
    async fn renew_lease(&self, lease: &Lease, ttl: chrono::Duration) -> Result<Lease>;
    async fn release_lease(&self, lease: &Lease) -> Result<()>;
    async fn get_lease(&self, name: &str) -> Result<Option<Lease>>;
}

impl dyn Registry {
    /// The newest completed backup of a set.
    pub async fn latest(&self, environment: &Name, policy: &Name) -> Result<Option<BackupRecord>> {
        let mut v = self
            .list(&ListQuery {
                environment: Some(environment.clone()),
                policy: Some(policy.clone()),
                status: Some(Status::Completed),
                before: None,
                limit: Some(1),
            })
            .await?;
        Ok(v.pop())
    }
}

/// Opens the registry a URL names.
pub async fn open(url: &RegistryUrl) -> Result<Arc<dyn Registry>> {
    match url {
        RegistryUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteRegistry::open(path).await?)),
        RegistryUrl::DynamoDb(table) => Ok(Arc::new(dynamodb::DynamoDbRegistry::open(table).await)),
    }
}

/// A timestamp as registries store it: RFC 3339 with microseconds, fixed width, so the text
/// sorts in time order.
fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| crate::Error::failure(format!("registry holds a bad timestamp {s:?}: {e}")))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> crate::Error {
    crate::Error::failure(format!("registry holds a bad {what}: {e}"))
}

/// Where a page that ended with `before` continues: records that sort (by start time, then
/// ID) below the returned bound. The cursor's record may be gone by the next page (retention):
/// then the bound is the last instant of the second its ID names, so no older record is skipped.
fn cursor_fallback(before: &BackupId) -> DateTime<Utc> {
    before.timestamp() + chrono::Duration::microseconds(999_999)
}
