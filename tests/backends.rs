//! Runs the shared backend suites against every implementation. Adding a backend is one
//! line per suite plus a function that returns a fresh, not yet created instance.

#[path = "common/moto.rs"]
mod moto;
mod suites;

use std::sync::Arc;

use drctl::registry::dynamodb::{DynamoDbRegistry, TableUrl};
use drctl::registry::sqlite::SqliteRegistry;
use drctl::store::local::LocalStore;
use suites::registry::RegistryFixture;
use suites::store::StoreFixture;

/// A local store on a directory that does not exist yet.
async fn fresh_local_store() -> StoreFixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalStore::new(dir.path().join("repo")));
    StoreFixture {
        store,
        _guard: Box::new(dir),
    }
}

/// An S3 store (moto) on a bucket that does not exist yet, with 5 MiB parts so that the
/// suite's larger objects go up as multipart uploads.
async fn fresh_s3_store() -> StoreFixture {
    moto::env();
    let url = moto::url(&moto::bucket("suite"), "repo", "us-east-1", "");
    let store = drctl::store::open(
        &drctl::config::StoreUrl::parse(&url, std::path::Path::new("/")).expect("url"),
    )
    .await
    .expect("open");
    StoreFixture {
        store,
        _guard: Box::new(()),
    }
}

/// A SQLite registry at a path that does not exist yet.
async fn fresh_sqlite_registry() -> RegistryFixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = SqliteRegistry::open(&dir.path().join("state").join("registry.db"))
        .await
        .expect("open");
    RegistryFixture {
        registry: Arc::new(registry),
        _guard: Box::new(dir),
    }
}

/// Deletes the test's table when the test ends.
struct DropTable(aws_sdk_dynamodb::Client, String);

impl Drop for DropTable {
    fn drop(&mut self) {
        let (client, table) = (self.0.clone(), self.1.clone());
        // The test's runtime is shutting down: delete from a runtime of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            // A table that is already gone is fine.
            let _ = rt.block_on(client.delete_table().table_name(table).send());
        })
        .join();
    }
}

/// A DynamoDB registry on moto, in a table of its own that does not exist yet.
async fn fresh_dynamodb_registry() -> RegistryFixture {
    let table = moto::bucket("registry");
    let url = TableUrl::parse(&format!(
        "dynamodb://{table}?region=us-east-1&endpoint={}",
        moto::endpoint()
    ))
    .expect("url");
    let config = moto::sdk_config("us-east-1").await;
    RegistryFixture {
        registry: Arc::new(DynamoDbRegistry::with_config(&url, &config)),
        _guard: Box::new(DropTable(aws_sdk_dynamodb::Client::new(&config), table)),
    }
}

mod local_store {
    crate::store_suite!(super::fresh_local_store);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn planted_temp_file_is_a_leftover_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        let store = std::sync::Arc::new(drctl::store::local::LocalStore::new(root.clone()));
        crate::suites::store::local_planted_temp_file_is_a_leftover_until_removed(store, &root)
            .await;
    }
}

mod s3_store {
    crate::store_suite!(super::fresh_s3_store);
}

mod sqlite_registry {
    crate::registry_suite!(super::fresh_sqlite_registry);
}

mod sqlite_upgrade {
    use crate::suites::registry::Tamper;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn create_upgrades_a_version_1_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.db");
        let registry = drctl::registry::sqlite::SqliteRegistry::open(&path)
            .await
            .expect("open");
        let url = format!("sqlite://{}", path.display());
        crate::suites::registry::create_upgrades_a_version_1_registry(
            std::sync::Arc::new(registry),
            |tamper| {
                let url = url.clone();
                async move {
                    let sql = match tamper {
                        Tamper::Downgrade(_) => "DROP INDEX backups_by_lookup;
                             ALTER TABLE backups DROP COLUMN lookup;
                             UPDATE registry_meta SET value = '1' WHERE key = 'schema_version';"
                            .to_owned(),
                        Tamper::ForgetLookup(id) => {
                            format!("UPDATE backups SET lookup = NULL WHERE backup_id = '{id}'")
                        }
                        Tamper::Version(v) => format!(
                            "UPDATE registry_meta SET value = '{v}' WHERE key = 'schema_version'"
                        ),
                    };
                    let db = sqlx::SqlitePool::connect(&url).await.expect("open");
                    sqlx::raw_sql(&sql).execute(&db).await.expect("tamper");
                    db.close().await;
                }
            },
        )
        .await;
    }
}

mod dynamodb_registry {
    crate::registry_suite!(super::fresh_dynamodb_registry);

    use aws_sdk_dynamodb::types::{BillingMode, PointInTimeRecoveryStatus, TableStatus};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn create_upgrades_a_version_1_registry() {
        use crate::suites::registry::Tamper;
        use aws_sdk_dynamodb::types::{
            AttributeValue, DeleteGlobalSecondaryIndexAction, GlobalSecondaryIndexUpdate,
        };
        let fixture = super::fresh_dynamodb_registry().await;
        let url = drctl::registry::dynamodb::TableUrl::parse(&fixture.registry.describe())
            .expect("describe is a dynamodb URL");
        let client = aws_sdk_dynamodb::Client::new(&crate::moto::sdk_config("us-east-1").await);
        // As an older drctl completes it: no index key and no pointer item.
        let (client, url) = (&client, &url);
        let forget = |id: drctl::format::BackupId| async move {
            client
                .update_item()
                .table_name(&url.table)
                .key("pk", AttributeValue::S(format!("backup#{id}")))
                .update_expression("REMOVE gsi_lookup")
                .send()
                .await?;
            let pointers = client
                .scan()
                .table_name(&url.table)
                .filter_expression("begins_with(pk, :lookup) AND backup_id = :id")
                .expression_attribute_values(":lookup", AttributeValue::S("lookup#".into()))
                .expression_attribute_values(":id", AttributeValue::S(id.to_string()))
                .send()
                .await
                .expect("scan");
            for item in pointers.items() {
                client
                    .delete_item()
                    .table_name(&url.table)
                    .key("pk", item["pk"].clone())
                    .send()
                    .await
                    .expect("delete the pointer");
            }
            Ok::<_, aws_sdk_dynamodb::Error>(())
        };
        let version = |v: &str| {
            client
                .update_item()
                .table_name(&url.table)
                .key("pk", AttributeValue::S("meta#schema".into()))
                .update_expression("SET schema_version = :v")
                .expression_attribute_values(":v", AttributeValue::N(v.into()))
                .send()
        };
        crate::suites::registry::create_upgrades_a_version_1_registry(
            fixture.registry.clone(),
            |tamper| async {
                match tamper {
                    Tamper::Downgrade(ids) => {
                        client
                            .update_table()
                            .table_name(&url.table)
                            .global_secondary_index_updates(
                                GlobalSecondaryIndexUpdate::builder()
                                    .delete(
                                        DeleteGlobalSecondaryIndexAction::builder()
                                            .index_name("by-lookup")
                                            .build()
                                            .unwrap(),
                                    )
                                    .build(),
                            )
                            .send()
                            .await
                            .expect("delete the index");
                        for id in ids {
                            forget(id).await.expect("remove the lookup");
                        }
                        version("1").await.expect("write version 1");
                    }
                    Tamper::ForgetLookup(id) => {
                        forget(id).await.expect("remove the lookup");
                    }
                    Tamper::Version(v) => {
                        version(v).await.expect("write the version");
                    }
                }
            },
        )
        .await;
    }

    /// A created registry, its table and a client that changes it behind drctl's back.
    async fn created_with_client() -> (
        crate::suites::registry::RegistryFixture,
        drctl::registry::dynamodb::TableUrl,
        aws_sdk_dynamodb::Client,
    ) {
        let fixture = super::fresh_dynamodb_registry().await;
        fixture.registry.create().await.expect("create");
        let url = drctl::registry::dynamodb::TableUrl::parse(&fixture.registry.describe())
            .expect("describe is a dynamodb URL");
        let client = aws_sdk_dynamodb::Client::new(&crate::moto::sdk_config("us-east-1").await);
        (fixture, url, client)
    }

    /// A record completed a moment ago may not be in the index yet (here its index key is
    /// removed behind drctl's back): `find` reads it through its pointer item. Removing the
    /// record removes the pointer, and the index answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn find_reads_a_record_the_index_does_not_list_yet() {
        use aws_sdk_dynamodb::types::AttributeValue;
        use drctl::registry::{Lookup, Status};
        const SEGMENT: &str = "000000010000000000000003";
        let (fixture, url, client) = created_with_client().await;
        let registry = fixture.registry.clone();
        // The newer record completes first: the older one's completion leaves the pointer.
        let newer = crate::suites::registry::add_pushed(&registry, "pg", 2, Some(SEGMENT)).await;
        let older = crate::suites::registry::add_pushed(&registry, "pg", 1, Some(SEGMENT)).await;
        client
            .update_item()
            .table_name(&url.table)
            .key(
                "pk",
                AttributeValue::S(format!("backup#{}", newer.backup_id)),
            )
            .update_expression("REMOVE gsi_lookup")
            .send()
            .await
            .expect("take the record out of the index");
        let (prod, pg) = (
            drctl::format::Name::parse("prod").unwrap(),
            drctl::format::Name::parse("pg").unwrap(),
        );
        let find = || async {
            registry
                .find(&prod, &pg, Lookup::Wal(SEGMENT))
                .await
                .expect("find")
                .map(|r| r.backup_id)
        };
        assert_eq!(find().await, Some(newer.backup_id.clone()));

        assert!(registry
            .transition(&newer.backup_id, Status::Completed, Status::Deleting, None)
            .await
            .unwrap());
        registry.remove(&newer.backup_id).await.expect("remove");
        let pointer = client
            .get_item()
            .table_name(&url.table)
            .key(
                "pk",
                AttributeValue::S(format!("lookup#prod/pg/wal/{SEGMENT}")),
            )
            .consistent_read(true)
            .send()
            .await
            .expect("get the pointer")
            .item;
        assert_eq!(pointer, None);
        assert_eq!(find().await, Some(older.backup_id));
    }

    /// A pointer left naming a record that is gone (its removal failed) is taken over by the
    /// next record completed with that lookup, older or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_pointer_left_naming_a_removed_record_is_taken_over() {
        use aws_sdk_dynamodb::types::AttributeValue;
        const SEGMENT: &str = "000000010000000000000004";
        let (fixture, url, client) = created_with_client().await;
        let registry = fixture.registry.clone();
        let pointer_key = AttributeValue::S(format!("lookup#prod/pg/wal/{SEGMENT}"));
        client
            .put_item()
            .table_name(&url.table)
            .item("pk", pointer_key.clone())
            .item(
                "backup_id",
                AttributeValue::S("29991231T235959Z-0000beef".into()),
            )
            .item("order", AttributeValue::S("9999".into()))
            .send()
            .await
            .expect("leave a pointer to a removed record");
        let record = crate::suites::registry::add_pushed(&registry, "pg", 1, Some(SEGMENT)).await;
        let pointer = client
            .get_item()
            .table_name(&url.table)
            .key("pk", pointer_key)
            .consistent_read(true)
            .send()
            .await
            .expect("get the pointer")
            .item
            .expect("a pointer");
        assert_eq!(
            pointer["backup_id"],
            AttributeValue::S(record.backup_id.to_string())
        );
    }

    /// The index is read eventually consistent: entries whose record is no longer completed
    /// (here changed behind drctl's back, as a lagging index would still list them) are
    /// passed over, across more than one page, for the newest completed record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn find_passes_over_index_entries_of_records_no_longer_completed() {
        use aws_sdk_dynamodb::types::AttributeValue;
        let (fixture, url, client) = created_with_client().await;
        let registry = fixture.registry.clone();
        let mut ids = Vec::new();
        for n in 1..=7 {
            let record = crate::suites::registry::add_pushed(&registry, "pg", n, None).await;
            ids.push(record.backup_id);
        }
        for id in &ids[1..] {
            client
                .update_item()
                .table_name(&url.table)
                .key("pk", AttributeValue::S(format!("backup#{id}")))
                .update_expression("SET #s = :s")
                .expression_attribute_names("#s", "status")
                .expression_attribute_values(":s", AttributeValue::S("deleting".into()))
                .send()
                .await
                .expect("change the status");
        }
        let found = registry
            .find(
                &drctl::format::Name::parse("prod").unwrap(),
                &drctl::format::Name::parse("pg").unwrap(),
                drctl::registry::Lookup::Full,
            )
            .await
            .expect("find");
        assert_eq!(found.map(|r| r.backup_id), Some(ids[0].clone()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn create_makes_an_active_on_demand_table_with_point_in_time_recovery_and_every_index() {
        let fixture = super::fresh_dynamodb_registry().await;
        fixture.registry.create().await.expect("create");
        fixture.registry.create().await.expect("create again");
        let url = drctl::registry::dynamodb::TableUrl::parse(&fixture.registry.describe())
            .expect("describe is a dynamodb URL");
        let client = aws_sdk_dynamodb::Client::new(&crate::moto::sdk_config("us-east-1").await);
        let table = client
            .describe_table()
            .table_name(&url.table)
            .send()
            .await
            .expect("describe table")
            .table
            .expect("table");
        assert_eq!(table.table_status(), Some(&TableStatus::Active));
        assert_eq!(
            table.billing_mode_summary().and_then(|b| b.billing_mode()),
            Some(&BillingMode::PayPerRequest)
        );
        let mut indexes: Vec<&str> = table
            .global_secondary_indexes()
            .iter()
            .filter_map(|i| i.index_name())
            .collect();
        indexes.sort();
        assert_eq!(
            indexes,
            [
                "all",
                "by-environment",
                "by-lookup",
                "by-set",
                "by-set-status",
                "by-status"
            ]
        );
        let pitr = client
            .describe_continuous_backups()
            .table_name(&url.table)
            .send()
            .await
            .expect("describe continuous backups")
            .continuous_backups_description
            .and_then(|d| d.point_in_time_recovery_description)
            .and_then(|p| p.point_in_time_recovery_status);
        assert_eq!(pitr, Some(PointInTimeRecoveryStatus::Enabled));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn create_refuses_a_table_that_is_not_a_registry() {
        let fixture = super::fresh_dynamodb_registry().await;
        let url = drctl::registry::dynamodb::TableUrl::parse(&fixture.registry.describe())
            .expect("describe is a dynamodb URL");
        let client = aws_sdk_dynamodb::Client::new(&crate::moto::sdk_config("us-east-1").await);
        client
            .create_table()
            .table_name(&url.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(
                aws_sdk_dynamodb::types::KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .attribute_definitions(
                aws_sdk_dynamodb::types::AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .expect("create a foreign table");
        let err = fixture.registry.create().await.unwrap_err();
        assert!(
            err.message().contains(&url.table) && err.message().contains("by-set-status"),
            "{err}"
        );
        let err = fixture.registry.check().await.unwrap_err();
        assert_eq!(err.kind(), drctl::ErrorKind::NotFound, "{err}");
    }
}

#[test]
fn holder_is_dead_only_for_local_processes_that_no_longer_run() {
    suites::registry::holder_is_dead_only_for_local_processes_that_no_longer_run();
}
