//! The registry in one DynamoDB table (`dynamodb://table?region=REGION[&endpoint=URL]`).
//!
//! # Table design
//!
//! One table, partition key `pk` (string), no sort key, on-demand billing, point-in-time
//! recovery on. Four kinds of item:
//!
//! | `pk`                  | item                                                       |
//! |-----------------------|------------------------------------------------------------|
//! | `backup#<backup_id>`  | a backup record                                            |
//! | `lease#<name>`        | a lease: `holder`, `token` (number), `expires_at` (ms)     |
//! | `meta#schema`         | `schema_version` (number); `check` looks for it            |
//! | `lookup#<key>`        | `backup_id`, `order`: the newest record completed with a lookup |
//!
//! A backup item holds the record's fields as attributes (`manifest`, `locations` and
//! `verification` as JSON strings) plus the keys of its index entries:
//!
//! - `gsi_order`: `<started_at, RFC 3339 with microseconds>#<backup_id>`. Fixed width, so the
//!   text sorts by start time, then ID: the sort key of every index, queried descending
//!   (newest first); the `before` cursor is a `gsi_order < bound` key condition.
//! - `gsi_set`: `<environment>/<policy>`; `gsi_set_status`: `<environment>/<policy>/<status>`;
//!   `gsi_all`: the constant `backup`.
//! - `gsi_lookup`, only while the record is completed and only on a WAL file's or a full
//!   backup's record: `<environment>/<policy>/<lookup>`, where the lookup is `wal/<name>` or
//!   `full`. `find` reads the `lookup#` item with a consistent read as well, so that a record
//!   completed a moment ago, which the index may not list yet, is found.
//!
//! Global secondary indexes (all projecting every attribute, so a listing is one Query):
//!
//! | index            | partition key    | serves                                          |
//! |------------------|------------------|-------------------------------------------------|
//! | `by-set-status`  | `gsi_set_status` | a set in one status; `latest` (limit 1)         |
//! | `by-set`         | `gsi_set`        | a set, newest first                             |
//! | `by-environment` | `environment`    | an environment (a status filter rides along)    |
//! | `by-status`      | `status`         | one status (a policy filter rides along)        |
//! | `all`            | `gsi_all`        | everything (a policy filter rides along)        |
//! | `by-lookup`      | `gsi_lookup`     | `find`: a WAL file by name, the newest full     |
//!
//! Schema version 1 lacked `by-lookup`; `create` (`drctl init`) adds the index and fills in
//! `gsi_lookup` on the completed records.
//!
//! Lease, meta and lookup items carry none of these attributes, so they appear in no index.
//! Getting a record by ID is a strongly consistent GetItem; nothing ever Scans. Index reads are
//! eventually consistent: a record written a moment ago may be missing from a listing for
//! that moment, never from `get`.
//!
//! Every write is conditional: inserts on the item's absence, status changes on the current
//! status, added locations on the status and the location list as read, leases on expiry or
//! the fencing token. `gsi_set_status` changes with the status, so
//! a status change first reads the record (for its set), then writes under the condition that
//! the status is still the one expected.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{BuildError, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CreateGlobalSecondaryIndexAction,
    GlobalSecondaryIndex, GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement, KeyType,
    PointInTimeRecoverySpecification, Projection, ProjectionType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableDescription, TableStatus,
};
use aws_sdk_dynamodb::Client;
use chrono::{DateTime, Utc};

use super::{
    corrupt, cursor_fallback, parse_ts, ts, unsupported_schema, upgradable_schema, usable_schema,
    BackupRecord, Lease, ListQuery, Location, Lookup, Registry, Status, Verification,
    SCHEMA_VERSION,
};
use crate::format::manifest::BackupType;
use crate::format::{BackupId, Manifest, Name};
use crate::{Error, Result};

const META_PK: &str = "meta#schema";
/// How often `add_location` reads again after a concurrent change of the locations.
const ADD_LOCATION_ATTEMPTS: usize = 10;
/// How often `complete` reads a lookup's pointer again after a concurrent change of it.
const POINT_ATTEMPTS: usize = 5;
/// Index entries `find` reads per page: the first is the answer unless the index lags.
const FIND_PAGE: i32 = 4;
/// How long `create` waits for a new table and its indexes to become active.
const CREATE_TIMEOUT: Duration = Duration::from_secs(600);

/// A parsed `dynamodb://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUrl {
    pub table: String,
    pub region: String,
    /// A custom endpoint (a DynamoDB-compatible service or a local emulator).
    pub endpoint: Option<String>,
}

impl TableUrl {
    pub fn parse(s: &str) -> Result<TableUrl> {
        let invalid = |why: &str| {
            Error::invalid(format!(
                "bad registry URL {s:?}: {why} (expected dynamodb://TABLE?region=REGION[&endpoint=URL])"
            ))
        };
        let url = url::Url::parse(s).map_err(|e| invalid(&e.to_string()))?;
        if url.scheme() != "dynamodb" {
            return Err(invalid("the scheme is not dynamodb"));
        }
        let table = url.host_str().unwrap_or_default().to_owned();
        let table_ok = (3..=255).contains(&table.len())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !table_ok {
            return Err(invalid(
                "the table name must be 3-255 characters of a-z, A-Z, 0-9, '_', '-' and '.'",
            ));
        }
        if !matches!(url.path(), "" | "/") || url.username() != "" || url.port().is_some() {
            return Err(invalid("only a table name may follow dynamodb://"));
        }
        let (mut region, mut endpoint) = (None, None);
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "region" if !v.is_empty() => region = Some(v.into_owned()),
                "endpoint" => {
                    let e = url::Url::parse(&v).map_err(|e| invalid(&format!("endpoint: {e}")))?;
                    if !matches!(e.scheme(), "http" | "https") {
                        return Err(invalid("the endpoint must be an http:// or https:// URL"));
                    }
                    endpoint = Some(v.into_owned());
                }
                other => return Err(invalid(&format!("unknown parameter {other:?}"))),
            }
        }
        let region = region.ok_or_else(|| invalid("region is missing"))?;
        Ok(TableUrl {
            table,
            region,
            endpoint,
        })
    }
}

impl std::fmt::Display for TableUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dynamodb://{}?region={}", self.table, self.region)?;
        if let Some(e) = &self.endpoint {
            write!(f, "&endpoint={e}")?;
        }
        Ok(())
    }
}

pub struct DynamoDbRegistry {
    url: TableUrl,
    client: Client,
}

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn backup_pk(id: &BackupId) -> AttributeValue {
    s(format!("backup#{id}"))
}

fn lease_pk(name: &str) -> AttributeValue {
    s(format!("lease#{name}"))
}

fn order_key(started_at: &DateTime<Utc>, id: &BackupId) -> String {
    format!("{}#{id}", ts(started_at))
}

fn set_key(environment: &Name, policy: &Name) -> String {
    format!("{environment}/{policy}")
}

fn set_status_key(environment: &Name, policy: &Name, status: Status) -> String {
    format!("{environment}/{policy}/{}", status.as_str())
}

fn get_s<'a>(item: &'a Item, key: &str) -> Result<&'a str> {
    match item.get(key) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(corrupt(
            "item",
            format!("attribute {key} is missing or not a string"),
        )),
    }
}

fn opt_s<'a>(item: &'a Item, key: &str) -> Result<Option<&'a str>> {
    match item.get(key) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(v)) => Ok(Some(v)),
        Some(_) => Err(corrupt("item", format!("attribute {key} is not a string"))),
    }
}

fn get_n(item: &Item, key: &str) -> Result<i64> {
    match item.get(key) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|e| corrupt(key, e)),
        _ => Err(corrupt(
            "item",
            format!("attribute {key} is missing or not a number"),
        )),
    }
}

fn record_from_item(item: &Item) -> Result<BackupRecord> {
    let status = get_s(item, "status")?;
    Ok(BackupRecord {
        backup_id: BackupId::parse(get_s(item, "backup_id")?)?,
        environment: Name::parse(get_s(item, "environment")?)?,
        policy: Name::parse(get_s(item, "policy")?)?,
        status: Status::parse(status).ok_or_else(|| corrupt("status", status))?,
        backup_type: match get_s(item, "backup_type")? {
            "full" => BackupType::Full,
            "incremental" => BackupType::Incremental,
            other => return Err(corrupt("backup type", other)),
        },
        source_kind: get_s(item, "source_kind")?.to_owned(),
        started_at: parse_ts(get_s(item, "started_at")?)?,
        finished_at: opt_s(item, "finished_at")?.map(parse_ts).transpose()?,
        holder: get_s(item, "holder")?.to_owned(),
        manifest: opt_s(item, "manifest")?
            .map(|m| serde_json::from_str::<Manifest>(m).map_err(|e| corrupt("manifest", e)))
            .transpose()?,
        locations: serde_json::from_str(get_s(item, "locations")?)
            .map_err(|e| corrupt("location list", e))?,
        last_verification: opt_s(item, "verification")?
            .map(|v| {
                serde_json::from_str::<Verification>(v).map_err(|e| corrupt("verification", e))
            })
            .transpose()?,
        error: opt_s(item, "error")?.map(str::to_owned),
    })
}

fn lease_from_item(item: &Item) -> Result<Lease> {
    let ms = get_n(item, "expires_at")?;
    let pk = get_s(item, "pk")?;
    Ok(Lease {
        name: pk
            .strip_prefix("lease#")
            .ok_or_else(|| corrupt("lease key", pk))?
            .to_owned(),
        holder: get_s(item, "holder")?.to_owned(),
        token: get_n(item, "token")?,
        expires_at: DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| corrupt("lease expiry", ms))?,
    })
}

fn built<T>(r: std::result::Result<T, BuildError>) -> Result<T> {
    r.map_err(|e| Error::failure(format!("building a DynamoDB request: {e}")))
}

/// True when a write was refused because its condition did not hold.
fn condition_failed<E, R>(err: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    err.as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

fn missing_table<E, R>(err: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    err.as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|c| c == "ResourceNotFoundException")
}

/// The indexes and their partition keys (every index sorts by `gsi_order`).
const INDEXES: &[(&str, &str)] = &[
    ("by-set-status", "gsi_set_status"),
    ("by-set", "gsi_set"),
    ("by-environment", "environment"),
    ("by-status", "status"),
    ("all", "gsi_all"),
    ("by-lookup", "gsi_lookup"),
];

/// A string attribute of the table's key or an index's.
fn attribute(name: &str) -> Result<AttributeDefinition> {
    built(
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build(),
    )
}

fn key(name: &str, key_type: KeyType) -> Result<KeySchemaElement> {
    built(
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build(),
    )
}

/// Every index projects every attribute.
fn all_attributes() -> Projection {
    Projection::builder()
        .projection_type(ProjectionType::All)
        .build()
}

fn lookup_key(environment: &Name, policy: &Name, lookup: Lookup<'_>) -> String {
    format!("{environment}/{policy}/{}", lookup.key())
}

fn index_partition_key(index: &str) -> &'static str {
    INDEXES
        .iter()
        .find(|(name, _)| *name == index)
        .map(|(_, attr)| *attr)
        .expect("every index is listed")
}

impl DynamoDbRegistry {
    /// Prepares a client with the default credential chain; nothing is sent until the first
    /// operation.
    pub async fn open(url: &TableUrl) -> DynamoDbRegistry {
        let config = crate::aws::sdk_config(&url.region, url.endpoint.as_deref()).await;
        Self::with_config(url, &config)
    }

    /// Like [`DynamoDbRegistry::open`], with a given SDK configuration (its region and
    /// endpoint are used, not the URL's).
    pub fn with_config(url: &TableUrl, config: &aws_config::SdkConfig) -> DynamoDbRegistry {
        DynamoDbRegistry {
            url: url.clone(),
            client: Client::new(config),
        }
    }

    fn err<E, R>(&self, what: impl std::fmt::Display, e: SdkError<E, R>) -> Error
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata
            + std::error::Error
            + Send
            + Sync
            + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let missing = missing_table(&e);
        let err = crate::aws::sdk_error(format!("registry {}: {what}", self.url), e);
        if missing {
            Error::not_found(err.message().to_owned()).hint("run `drctl init` to create the table")
        } else {
            err
        }
    }

    async fn describe_table(&self) -> Result<TableDescription> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.url.table)
            .send()
            .await
            .map_err(|e| self.err("describe table", e))?;
        out.table.ok_or_else(|| {
            Error::failure(format!(
                "registry {}: DescribeTable returned no table",
                self.url
            ))
        })
    }

    async fn create_table(&self) -> Result<()> {
        let mut req = self
            .client
            .create_table()
            .table_name(&self.url.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key("pk", KeyType::Hash)?)
            .attribute_definitions(attribute("pk")?)
            .attribute_definitions(attribute("gsi_order")?);
        for (index, partition) in INDEXES {
            req = req
                .attribute_definitions(attribute(partition)?)
                .global_secondary_indexes(built(
                    GlobalSecondaryIndex::builder()
                        .index_name(*index)
                        .key_schema(key(partition, KeyType::Hash)?)
                        .key_schema(key("gsi_order", KeyType::Range)?)
                        .projection(all_attributes())
                        .build(),
                )?);
        }
        match req.send().await {
            Ok(_) => {
                tracing::info!(table = %self.url.table, "created the registry table");
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("create table", e)),
        }
    }

    /// Waits until the table and its indexes are active, and checks that it has every index.
    async fn wait_active(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + CREATE_TIMEOUT;
        loop {
            let table = self.describe_table().await?;
            let indexes = table.global_secondary_indexes();
            let missing: Vec<&str> = INDEXES
                .iter()
                .map(|(name, _)| *name)
                .filter(|name| !indexes.iter().any(|i| i.index_name() == Some(name)))
                .collect();
            if !missing.is_empty() {
                return Err(Error::failure(format!(
                    "registry {}: table {} exists but lacks the index(es) {}",
                    self.url,
                    self.url.table,
                    missing.join(", ")
                ))
                .hint("the table is not a drctl registry; name another table in drctl.yaml"));
            }
            let active = table.table_status() == Some(&TableStatus::Active)
                && indexes
                    .iter()
                    .all(|i| i.index_status() == Some(&IndexStatus::Active));
            if active {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::failure(format!(
                    "registry {}: table not active after {} s",
                    self.url,
                    CREATE_TIMEOUT.as_secs()
                ))
                .hint("DynamoDB may still be building an index of a large table; run `drctl init` again later")
                .retryable());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    async fn get_item(&self, pk: AttributeValue) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.url.table)
            .key("pk", pk)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("get item", e))?;
        Ok(out.item)
    }

    /// `from` → `to` on the record, with extra SET clauses; false when the status was not `from`.
    async fn change_status(
        &self,
        record: &BackupRecord,
        from: Status,
        to: Status,
        extra: Vec<(&str, AttributeValue)>,
        remove: &[&str],
    ) -> Result<bool> {
        let mut update = String::from("SET #status = :to, #gsi_set_status = :set_status");
        let mut req = self
            .client
            .update_item()
            .table_name(&self.url.table)
            .key("pk", backup_pk(&record.backup_id))
            .condition_expression("#status = :from")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#gsi_set_status", "gsi_set_status")
            .expression_attribute_values(":from", s(from.as_str()))
            .expression_attribute_values(":to", s(to.as_str()))
            .expression_attribute_values(
                ":set_status",
                s(set_status_key(&record.environment, &record.policy, to)),
            );
        for (attr, value) in extra {
            update.push_str(&format!(", #{attr} = :{attr}"));
            req = req
                .expression_attribute_names(format!("#{attr}"), attr)
                .expression_attribute_values(format!(":{attr}"), value);
        }
        if !remove.is_empty() {
            update.push_str(" REMOVE ");
            update.push_str(
                &remove
                    .iter()
                    .map(|a| format!("#{a}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            for attr in remove {
                req = req.expression_attribute_names(format!("#{attr}"), *attr);
            }
        }
        match req.update_expression(update).send().await {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.err(format!("update backup {}", record.backup_id), e)),
        }
    }

    /// Points the lookup's pointer item at `record`, unless it names a newer record that is
    /// still completed (a pointer is left naming a removed record when its removal failed).
    /// Each write is conditional on the pointer as just read, so that concurrent completes
    /// and removals cannot put an older record in place of a newer one.
    async fn point(&self, record: &BackupRecord, lookup: Lookup<'_>) -> Result<()> {
        let key = lookup_key(&record.environment, &record.policy, lookup);
        let pk = format!("lookup#{key}");
        let order = order_key(&record.started_at, &record.backup_id);
        for _ in 0..POINT_ATTEMPTS {
            let put = self
                .client
                .put_item()
                .table_name(&self.url.table)
                .item("pk", s(&pk))
                .item("backup_id", s(record.backup_id.as_str()))
                .item("order", s(&order));
            let put = match self.get_item(s(&pk)).await? {
                None => put.condition_expression("attribute_not_exists(pk)"),
                Some(item) => {
                    let (named, named_order) = (get_s(&item, "backup_id")?, get_s(&item, "order")?);
                    if named_order >= order.as_str()
                        && self
                            .get_completed(&BackupId::parse(named)?)
                            .await?
                            .is_some()
                    {
                        return Ok(());
                    }
                    put.condition_expression("backup_id = :id AND #o = :o")
                        .expression_attribute_names("#o", "order")
                        .expression_attribute_values(":id", s(named))
                        .expression_attribute_values(":o", s(named_order))
                }
            };
            match put.send().await {
                Ok(_) => return Ok(()),
                Err(e) if condition_failed(&e) => continue,
                Err(e) => {
                    return Err(self.err(
                        format!("point lookup {key} at backup {}", record.backup_id),
                        e,
                    ))
                }
            }
        }
        // Another writer changed the pointer every time: the index still finds the record.
        Ok(())
    }

    /// The completed record the lookup's pointer item names, read consistently, if any.
    async fn pointed(&self, key: &str) -> Result<Option<BackupRecord>> {
        let Some(item) = self.get_item(s(format!("lookup#{key}"))).await? else {
            return Ok(None);
        };
        self.get_completed(&BackupId::parse(get_s(&item, "backup_id")?)?)
            .await
    }

    /// The record `id`, read consistently, if it is completed.
    async fn get_completed(&self, id: &BackupId) -> Result<Option<BackupRecord>> {
        Ok(self
            .get(id)
            .await?
            .filter(|r| r.status == Status::Completed))
    }

    /// The newest completed record the `by-lookup` index lists under `key`. The index is read
    /// eventually consistent: each record found is read again, and one that has just left
    /// `completed` is passed over for the next older one.
    async fn find_listed(&self, key: &str) -> Result<Option<BackupRecord>> {
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.url.table)
                .index_name("by-lookup")
                .scan_index_forward(false)
                .key_condition_expression("#p = :p")
                .expression_attribute_names("#p", "gsi_lookup")
                .expression_attribute_values(":p", s(key))
                .limit(FIND_PAGE)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("query index by-lookup", e))?;
            for item in page.items() {
                let id = record_from_item(item)?.backup_id;
                if let Some(r) = self.get_completed(&id).await? {
                    return Ok(Some(r));
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(None),
            }
        }
    }

    /// Adds the `by-lookup` index to a table of schema version 1.
    async fn add_lookup_index(&self) -> Result<()> {
        let table = self.describe_table().await?;
        let has = |name: &str| {
            table
                .global_secondary_indexes()
                .iter()
                .any(|i| i.index_name() == Some(name))
        };
        // Another table (without drctl's indexes) is reported by wait_active.
        if has("by-lookup") || !has("by-set") {
            return Ok(());
        }
        let create = built(
            CreateGlobalSecondaryIndexAction::builder()
                .index_name("by-lookup")
                .key_schema(key("gsi_lookup", KeyType::Hash)?)
                .key_schema(key("gsi_order", KeyType::Range)?)
                .projection(all_attributes())
                .build(),
        )?;
        self.client
            .update_table()
            .table_name(&self.url.table)
            .attribute_definitions(attribute("gsi_lookup")?)
            .attribute_definitions(attribute("gsi_order")?)
            .global_secondary_index_updates(
                GlobalSecondaryIndexUpdate::builder().create(create).build(),
            )
            .send()
            .await
            .map_err(|e| self.err("add index by-lookup", e))?;
        tracing::info!(table = %self.url.table, "adding index by-lookup to the registry table");
        Ok(())
    }

    /// Brings the registry (whose table has `by-lookup`) to this drctl's schema: every
    /// completed record without `gsi_lookup` gets it (all of them in a version 1 registry;
    /// any an older drctl that was still running completed since), then the version is
    /// written. Running it again fills in what an earlier run missed.
    async fn upgrade(&self) -> Result<()> {
        let version = match self
            .get_item(s(META_PK))
            .await?
            .and_then(|item| item.get("schema_version").cloned())
        {
            Some(AttributeValue::N(v)) => v,
            other => {
                return Err(unsupported_schema(
                    &self.url.to_string(),
                    &format!("{other:?}"),
                ))
            }
        };
        upgradable_schema(&self.url.to_string(), &version)?;
        let mut start: Option<Item> = None;
        let mut updated = 0;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.url.table)
                .index_name("by-status")
                .key_condition_expression("#p = :p")
                .expression_attribute_names("#p", "status")
                .expression_attribute_values(":p", s(Status::Completed.as_str()))
                .filter_expression("attribute_not_exists(gsi_lookup)")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("query index by-status", e))?;
            for item in page.items() {
                let record = record_from_item(item)?;
                let Some(lookup) = Lookup::of(record.manifest()?) else {
                    continue;
                };
                let res = self
                    .client
                    .update_item()
                    .table_name(&self.url.table)
                    .key("pk", backup_pk(&record.backup_id))
                    .update_expression("SET #l = :l")
                    .condition_expression("#status = :completed")
                    .expression_attribute_names("#l", "gsi_lookup")
                    .expression_attribute_names("#status", "status")
                    .expression_attribute_values(":completed", s(Status::Completed.as_str()))
                    .expression_attribute_values(
                        ":l",
                        s(lookup_key(&record.environment, &record.policy, lookup)),
                    )
                    .send()
                    .await;
                match res {
                    Ok(_) => updated += 1,
                    // No longer completed: nothing to find it by.
                    Err(e) if condition_failed(&e) => {}
                    Err(e) => {
                        return Err(self.err(format!("update backup {}", record.backup_id), e))
                    }
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        if version != SCHEMA_VERSION {
            let res = self
                .client
                .update_item()
                .table_name(&self.url.table)
                .key("pk", s(META_PK))
                .update_expression("SET schema_version = :v")
                .condition_expression("schema_version = :old")
                .expression_attribute_values(":v", AttributeValue::N(SCHEMA_VERSION.into()))
                .expression_attribute_values(":old", AttributeValue::N(version.clone()))
                .send()
                .await;
            match res {
                // Another `init` wrote it meanwhile.
                Ok(_) => {}
                Err(e) if condition_failed(&e) => {}
                Err(e) => return Err(self.err("write the schema version", e)),
            }
        }
        if updated > 0 || version != SCHEMA_VERSION {
            tracing::info!(
                table = %self.url.table,
                records = updated,
                "upgraded the registry to schema version {SCHEMA_VERSION}"
            );
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for DynamoDbRegistry {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    async fn create(&self) -> Result<()> {
        self.create_table().await?;
        self.add_lookup_index().await?;
        self.wait_active().await?;
        self.client
            .update_continuous_backups()
            .table_name(&self.url.table)
            .point_in_time_recovery_specification(built(
                PointInTimeRecoverySpecification::builder()
                    .point_in_time_recovery_enabled(true)
                    .build(),
            )?)
            .send()
            .await
            .map_err(|e| self.err("enable point-in-time recovery", e))?;
        let put = self
            .client
            .put_item()
            .table_name(&self.url.table)
            .item("pk", s(META_PK))
            .item("schema_version", AttributeValue::N(SCHEMA_VERSION.into()))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Ok(()),
            Err(e) => Err(self.err("write the schema version", e)),
        }?;
        self.upgrade().await
    }

    async fn check(&self) -> Result<()> {
        let missing = || {
            Error::not_found(format!("no drctl registry at {}", self.url)).hint("run `drctl init`")
        };
        let item = match self.get_item(s(META_PK)).await {
            Ok(item) => item,
            Err(e) if e.kind() == crate::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(e),
        };
        let Some(item) = item else {
            return Err(missing());
        };
        match item.get("schema_version") {
            Some(AttributeValue::N(v)) => usable_schema(&self.url.to_string(), v),
            other => Err(unsupported_schema(
                &self.url.to_string(),
                &format!("{other:?}"),
            )),
        }
    }

    async fn insert(&self, r: &BackupRecord) -> Result<()> {
        let res = self
            .client
            .put_item()
            .table_name(&self.url.table)
            .item("pk", backup_pk(&r.backup_id))
            .item("backup_id", s(r.backup_id.as_str()))
            .item("environment", s(r.environment.as_str()))
            .item("policy", s(r.policy.as_str()))
            .item("status", s(r.status.as_str()))
            .item("backup_type", s(r.backup_type.as_str()))
            .item("source_kind", s(&r.source_kind))
            .item("started_at", s(ts(&r.started_at)))
            .item("holder", s(&r.holder))
            .item("locations", s(serde_json::to_string(&r.locations)?))
            .item("gsi_order", s(order_key(&r.started_at, &r.backup_id)))
            .item("gsi_set", s(set_key(&r.environment, &r.policy)))
            .item(
                "gsi_set_status",
                s(set_status_key(&r.environment, &r.policy, r.status)),
            )
            .item("gsi_all", s("backup"))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Err(Error::failure(format!(
                "backup {} is already registered",
                r.backup_id
            ))),
            Err(e) => Err(self.err(format!("insert backup {}", r.backup_id), e)),
        }
    }

    async fn complete(
        &self,
        id: &BackupId,
        manifest: &Manifest,
        locations: &[Location],
    ) -> Result<()> {
        let not_running = || {
            Error::failure(format!(
                "backup {id} is no longer running in the registry; not marking it completed"
            ))
        };
        let Some(record) = self.get(id).await? else {
            return Err(not_running());
        };
        let mut extra = vec![
            ("finished_at", s(ts(&manifest.finished_at))),
            ("manifest", s(serde_json::to_string(manifest)?)),
            ("locations", s(serde_json::to_string(locations)?)),
        ];
        let lookup = Lookup::of(manifest);
        if let Some(lookup) = lookup {
            extra.push((
                "gsi_lookup",
                s(lookup_key(&record.environment, &record.policy, lookup)),
            ));
        }
        let changed = self
            .change_status(
                &record,
                Status::Running,
                Status::Completed,
                extra,
                &["error"],
            )
            .await?;
        if !changed {
            return Err(not_running());
        }
        if let Some(lookup) = lookup {
            // The record is completed: without its pointer it is still found once the index
            // lists it.
            if let Err(e) = self.point(&record, lookup).await {
                tracing::warn!(error = %e, backup = %id, "the lookup pointer was not written");
            }
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
        let Some(record) = self.get(id).await? else {
            return Ok(false);
        };
        let mut extra = Vec::new();
        if let Some(e) = error {
            extra.push(("error", s(e)));
        }
        if to == Status::Failed {
            extra.push(("finished_at", s(ts(&Utc::now()))));
        }
        // Only completed records can be looked up.
        let remove: &[&str] = if from == Status::Completed {
            &["gsi_lookup"]
        } else {
            &[]
        };
        self.change_status(&record, from, to, extra, remove).await
    }

    async fn remove(&self, id: &BackupId) -> Result<()> {
        let record = self.get(id).await?;
        let res = self
            .client
            .delete_item()
            .table_name(&self.url.table)
            .key("pk", backup_pk(id))
            .condition_expression("#status IN (:deleting, :failed)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":deleting", s(Status::Deleting.as_str()))
            .expression_attribute_values(":failed", s(Status::Failed.as_str()))
            .send()
            .await;
        match res {
            Ok(_) => {}
            Err(e) if condition_failed(&e) => {
                return Err(Error::failure(format!(
                    "backup {id} is not marked deleting or failed; not removing it"
                )))
            }
            Err(e) => return Err(self.err(format!("remove backup {id}"), e)),
        }
        // Its pointer item, if it still names this record.
        let Some(r) = record else { return Ok(()) };
        let Some(lookup) = r.manifest.as_ref().and_then(Lookup::of) else {
            return Ok(());
        };
        let key = lookup_key(&r.environment, &r.policy, lookup);
        let res = self
            .client
            .delete_item()
            .table_name(&self.url.table)
            .key("pk", s(format!("lookup#{key}")))
            .condition_expression("backup_id = :id")
            .expression_attribute_values(":id", s(id.as_str()))
            .send()
            .await;
        match res {
            Err(e) if !condition_failed(&e) => {
                // The record is gone; a pointer naming it is passed over by find.
                let e = self.err(format!("remove the pointer item {key}"), e);
                tracing::warn!(error = %e, backup = %id, "the lookup pointer was left");
            }
            _ => {}
        }
        Ok(())
    }

    async fn set_verification(&self, id: &BackupId, v: &Verification) -> Result<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.url.table)
            .key("pk", backup_pk(id))
            .update_expression("SET #v = :v")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#v", "verification")
            .expression_attribute_values(":v", s(serde_json::to_string(v)?))
            .send()
            .await;
        match res {
            // As for the other backends, verifying a record that is gone records nothing.
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Ok(()),
            Err(e) => Err(self.err(format!("record the verification of backup {id}"), e)),
        }
    }

    async fn add_location(&self, id: &BackupId, location: &Location) -> Result<()> {
        // Read, append, and write back under the condition that the list is still the one
        // read: a concurrent addition makes the write fail, and the loop reads again.
        for _ in 0..ADD_LOCATION_ATTEMPTS {
            let Some(item) = self.get_item(backup_pk(id)).await? else {
                return Err(Error::not_found(format!(
                    "backup {id} not found in the registry"
                )));
            };
            let record = record_from_item(&item)?;
            if record.status != Status::Completed {
                return Err(Error::failure(format!(
                    "backup {id} is {}, not completed; not adding a location",
                    record.status.as_str()
                )));
            }
            if record.locations.contains(location) {
                return Ok(());
            }
            let mut locations = record.locations;
            locations.push(location.clone());
            let res = self
                .client
                .update_item()
                .table_name(&self.url.table)
                .key("pk", backup_pk(id))
                .update_expression("SET #locations = :new")
                .condition_expression("#status = :completed AND #locations = :old")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#locations", "locations")
                .expression_attribute_values(":completed", s(Status::Completed.as_str()))
                .expression_attribute_values(":old", s(get_s(&item, "locations")?))
                .expression_attribute_values(":new", s(serde_json::to_string(&locations)?))
                .send()
                .await;
            match res {
                Ok(_) => return Ok(()),
                Err(e) if condition_failed(&e) => continue,
                Err(e) => return Err(self.err(format!("add a location to backup {id}"), e)),
            }
        }
        Err(Error::failure(format!(
            "backup {id}: its locations kept changing while a location was added"
        ))
        .retryable())
    }

    async fn get(&self, id: &BackupId) -> Result<Option<BackupRecord>> {
        self.get_item(backup_pk(id))
            .await?
            .as_ref()
            .map(record_from_item)
            .transpose()
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<BackupRecord>> {
        let limit = q.limit.map(|l| l as usize);
        if limit == Some(0) {
            return Ok(Vec::new());
        }
        // The index whose partition key fixes the most filters; the rest become a filter.
        let status = q.status.map(|st| s(st.as_str()));
        let policy = q.policy.as_ref().map(|p| s(p.as_str()));
        let (index, partition, filter) = match (&q.environment, &q.policy, q.status) {
            (Some(e), Some(p), Some(st)) => ("by-set-status", set_status_key(e, p, st), None),
            (Some(e), Some(p), None) => ("by-set", set_key(e, p), None),
            (Some(e), None, _) => (
                "by-environment",
                e.to_string(),
                status.map(|v| ("status", v)),
            ),
            (None, _, Some(st)) => (
                "by-status",
                st.as_str().to_owned(),
                policy.map(|v| ("policy", v)),
            ),
            (None, _, None) => ("all", "backup".to_owned(), policy.map(|v| ("policy", v))),
        };
        let partition_attr = index_partition_key(index);
        let bound = match &q.before {
            None => None,
            Some(before) => Some(match self.get(before).await? {
                Some(r) => order_key(&r.started_at, before),
                None => order_key(&cursor_fallback(before), before),
            }),
        };

        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.url.table)
                .index_name(index)
                .scan_index_forward(false)
                .expression_attribute_names("#p", partition_attr)
                .expression_attribute_values(":p", s(&partition))
                .set_exclusive_start_key(start.take());
            req = match &bound {
                Some(b) => req
                    .key_condition_expression("#p = :p AND #o < :o")
                    .expression_attribute_names("#o", "gsi_order")
                    .expression_attribute_values(":o", s(b)),
                None => req.key_condition_expression("#p = :p"),
            };
            match &filter {
                Some((attr, value)) => {
                    req = req
                        .filter_expression("#f = :f")
                        .expression_attribute_names("#f", *attr)
                        .expression_attribute_values(":f", value.clone());
                }
                None => {
                    if let Some(l) = limit {
                        req = req.limit((l - out.len()).min(i32::MAX as usize) as i32);
                    }
                }
            }
            let page = req
                .send()
                .await
                .map_err(|e| self.err(format!("query index {index}"), e))?;
            for item in page.items() {
                out.push(record_from_item(item)?);
                if Some(out.len()) == limit {
                    return Ok(out);
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(out),
            }
        }
    }

    async fn find(
        &self,
        environment: &Name,
        policy: &Name,
        lookup: Lookup<'_>,
    ) -> Result<Option<BackupRecord>> {
        let key = lookup_key(environment, policy, lookup);
        // The pointer item, read consistently, names the newest record completed with this
        // lookup, which the index may not list yet; the index answers when that record has
        // left `completed` (or has no pointer: one completed before the upgrade).
        let pointed = self.pointed(&key).await?;
        let listed = self.find_listed(&key).await?;
        Ok(match (pointed, listed) {
            (Some(p), Some(l)) => Some(
                if (p.started_at, &p.backup_id) >= (l.started_at, &l.backup_id) {
                    p
                } else {
                    l
                },
            ),
            (p, l) => p.or(l),
        })
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: chrono::Duration,
        take_over: Option<i64>,
    ) -> Result<std::result::Result<Lease, Lease>> {
        let now = Utc::now();
        // One conditional write: create, or take over an expired (or explicitly named) lease.
        // Released leases keep their item so the fencing token only ever grows.
        let res = self
            .client
            .update_item()
            .table_name(&self.url.table)
            .key("pk", lease_pk(name))
            .update_expression("SET #holder = :holder, #exp = :exp ADD #token :one")
            .condition_expression("attribute_not_exists(pk) OR #exp <= :now OR #token = :take")
            .expression_attribute_names("#holder", "holder")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":holder", s(holder))
            .expression_attribute_values(":exp", n((now + ttl).timestamp_millis()))
            .expression_attribute_values(":now", n(now.timestamp_millis()))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":take", n(take_over.unwrap_or(-1)))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match res {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Ok(Ok(lease_from_item(&item)?))
            }
            Err(e) if condition_failed(&e) => {
                // The item that made the condition fail is the lease someone else holds. An
                // item caught half-created by a racing acquirer (an emulator that does not
                // apply updates atomically) is read again; a really bad item fails that read.
                let current = e
                    .as_service_error()
                    .and_then(|e| match e {
                        UpdateItemError::ConditionalCheckFailedException(c) => c.item(),
                        _ => None,
                    })
                    .and_then(|item| lease_from_item(item).ok());
                match current {
                    Some(lease) => Ok(Err(lease)),
                    None => match self.get_lease(name).await? {
                        Some(lease) => Ok(Err(lease)),
                        None => Err(Error::failure(format!(
                            "lease {name} vanished while being acquired"
                        ))
                        .retryable()),
                    },
                }
            }
            Err(e) => Err(self.err(format!("acquire lease {name}"), e)),
        }
    }

    async fn renew_lease(&self, lease: &Lease, ttl: chrono::Duration) -> Result<Lease> {
        let now = Utc::now();
        let res = self
            .client
            .update_item()
            .table_name(&self.url.table)
            .key("pk", lease_pk(&lease.name))
            .update_expression("SET #exp = :exp")
            .condition_expression("#token = :token AND #holder = :holder AND #exp > :now")
            .expression_attribute_names("#holder", "holder")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":token", n(lease.token))
            .expression_attribute_values(":exp", n((now + ttl).timestamp_millis()))
            .expression_attribute_values(":now", n(now.timestamp_millis()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match res {
            Ok(out) => lease_from_item(&out.attributes.unwrap_or_default()),
            Err(e) if condition_failed(&e) => Err(Error::failure(format!(
                "lease {} was lost (expired or taken over)",
                lease.name
            ))),
            Err(e) => Err(self.err(format!("renew lease {}", lease.name), e)),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.url.table)
            .key("pk", lease_pk(&lease.name))
            .update_expression("SET #exp = :zero")
            .condition_expression("#token = :token")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":token", n(lease.token))
            .expression_attribute_values(":zero", n(0))
            .send()
            .await;
        match res {
            // A stale release (the lease was taken over since) changes nothing.
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Ok(()),
            Err(e) => Err(self.err(format!("release lease {}", lease.name), e)),
        }
    }

    async fn get_lease(&self, name: &str) -> Result<Option<Lease>> {
        let Some(item) = self.get_item(lease_pk(name)).await? else {
            return Ok(None);
        };
        let lease = lease_from_item(&item)?;
        Ok((lease.expires_at > Utc::now()).then_some(lease))
    }
}

#[cfg(test)]
mod tests {
    use super::TableUrl;

    #[test]
    fn url_parses_table_region_and_endpoint() {
        let url = TableUrl::parse(
            "dynamodb://drctl-registry?region=eu-west-1&endpoint=http://127.0.0.1:5000",
        )
        .unwrap();
        assert_eq!(
            url,
            TableUrl {
                table: "drctl-registry".into(),
                region: "eu-west-1".into(),
                endpoint: Some("http://127.0.0.1:5000".into()),
            }
        );
        assert_eq!(
            url.to_string(),
            "dynamodb://drctl-registry?region=eu-west-1&endpoint=http://127.0.0.1:5000"
        );
        let plain = TableUrl::parse("dynamodb://registry?region=us-east-1").unwrap();
        assert_eq!(plain.endpoint, None);
        assert_eq!(plain.to_string(), "dynamodb://registry?region=us-east-1");
    }

    #[test]
    fn url_refuses_what_it_cannot_use() {
        for bad in [
            "dynamodb://registry",
            "dynamodb://registry?region=",
            "dynamodb://ab?region=us-east-1",
            "dynamodb://bad$name?region=us-east-1",
            "dynamodb://registry/extra?region=us-east-1",
            "dynamodb://registry?region=us-east-1&colour=blue",
            "dynamodb://registry?region=us-east-1&endpoint=ftp://host",
            "dynamodb://registry?region=us-east-1&endpoint=not a url",
        ] {
            let err = TableUrl::parse(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{bad}: {err}");
            assert!(
                err.message().contains("dynamodb://TABLE?region=REGION"),
                "{bad}: {err}"
            );
        }
    }
}
