//! The [`Registry`] contract, as tests every backend must pass: records and their status
//! lifecycle, listing and pagination, and leases with fencing tokens.
//!
//! Each test takes a fresh registry that has not been created yet. A backend joins the suite
//! with one line: `mod my_registry { crate::registry_suite!(super::fresh_my_registry); }`, where
//! `fresh_my_registry` is an `async fn() -> RegistryFixture`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use drctl::cancel::Cancel;
use drctl::format::manifest::{
    BackupType, EncryptionInfo, ObjectInfo, ObjectRole, PointInTime, SourceInfo, FORMAT_VERSION,
};
use drctl::format::{BackupId, Manifest, Name, ObjectKey};
use drctl::registry::lease::{holder_id, holder_is_dead, LeaseGuard};
use drctl::registry::{
    BackupRecord, Lease, ListQuery, Location, Lookup, Registry, Status, Verification,
};
use drctl::ErrorKind;

/// A registry under test plus whatever must outlive it (a temporary directory, a table).
pub struct RegistryFixture {
    pub registry: Arc<dyn Registry>,
    pub _guard: Box<dyn std::any::Any + Send>,
}

/// Generates one `#[tokio::test]` per suite test, each with its own fresh registry.
#[macro_export]
macro_rules! registry_suite {
    ($fresh:path) => {
        $crate::registry_suite!(@tests $fresh;
            check_fails_with_not_found_until_create_and_create_is_idempotent,
            inserted_record_reads_back_equal,
            duplicate_insert_fails_and_keeps_the_first_record,
            complete_moves_running_to_completed_with_manifest_and_locations,
            complete_fails_unless_running,
            transition_applies_only_from_the_expected_status,
            remove_deletes_only_deleting_or_failed_records,
            list_filters_by_environment_policy_and_status,
            list_is_newest_first_and_honours_limit,
            list_before_cursor_pages_through_every_record_once,
            list_before_cursor_works_after_the_cursor_record_is_removed,
            latest_is_the_newest_completed_backup_of_the_set,
            find_looks_up_a_wal_file_and_the_newest_full_backup_while_completed,
            set_verification_round_trips,
            add_location_appends_once_and_only_to_completed_records,
            concurrent_add_location_keeps_every_location,
            free_lease_is_granted_and_a_second_holder_gets_the_current_lease,
            renew_extends_the_lease,
            released_lease_is_granted_again_with_a_larger_token,
            expired_lease_is_taken_by_another_holder_and_the_old_one_is_fenced,
            lease_granted_again_to_the_same_holder_fences_the_old_grant,
            take_over_succeeds_only_with_the_current_token,
            racing_acquirers_get_exactly_one_lease,
            lease_guard_without_wait_refuses_a_held_lease_as_locked,
            lease_guard_waits_until_the_holder_releases,
            lease_guard_gives_up_when_the_wait_runs_out,
            lease_guard_takes_over_the_lease_of_a_dead_local_process,
        );
    };
    (@tests $fresh:path; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let fixture = $fresh().await;
                $crate::suites::registry::$test(fixture.registry.clone()).await;
                drop(fixture);
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

fn base_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// A backup ID started `n` minutes after a fixed base time: a larger `n` is a newer backup.
pub fn id_at(n: i64) -> BackupId {
    BackupId::generate(base_time() + chrono::Duration::minutes(n))
}

/// A `running` record as a backup inserts it.
pub fn running_record(environment: &str, policy: &str, id: &BackupId) -> BackupRecord {
    BackupRecord {
        backup_id: id.clone(),
        environment: name(environment),
        policy: name(policy),
        status: Status::Running,
        backup_type: BackupType::Full,
        source_kind: "files".into(),
        started_at: id.timestamp() + chrono::Duration::milliseconds(250),
        finished_at: None,
        holder: "backup-host:4242:99".into(),
        manifest: None,
        locations: Vec::new(),
        last_verification: None,
        error: None,
    }
}

/// The manifest a finished backup of `record` would have.
pub fn manifest_for(record: &BackupRecord) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        backup_id: record.backup_id.clone(),
        environment: record.environment.clone(),
        policy: record.policy.clone(),
        source: SourceInfo {
            kind: record.source_kind.clone(),
            descriptor: serde_json::json!({ "paths": 2 }),
            stats: serde_json::Map::from_iter([("files".to_owned(), serde_json::json!(17))]),
        },
        backup_type: record.backup_type,
        parent_id: None,
        chain_base_id: record.backup_id.clone(),
        started_at: record.started_at,
        finished_at: record.started_at + chrono::Duration::milliseconds(90_500),
        point_in_time: PointInTime {
            timestamp: Some(record.started_at),
            ..Default::default()
        },
        objects: vec![ObjectInfo {
            role: ObjectRole::Data,
            name: "data.tar.zst.age".into(),
            plain_size: 1000,
            plain_sha256: "a".repeat(64),
            stored_size: 600,
            stored_sha256: "b".repeat(64),
        }],
        encryption: EncryptionInfo {
            recipients: vec!["age1example".into()],
            kms_keys: Vec::new(),
        },
        drctl_version: drctl::VERSION.into(),
    }
}

fn location_for(record: &BackupRecord) -> Location {
    Location {
        region: "local".into(),
        store: "file:///srv/backups".into(),
        prefix: prefix_of(record),
    }
}

fn prefix_of(r: &BackupRecord) -> String {
    ObjectKey::backup_prefix(&r.environment, &r.policy, &r.backup_id)
}

async fn created(registry: &Arc<dyn Registry>) {
    registry.create().await.expect("create");
}

async fn get(registry: &Arc<dyn Registry>, id: &BackupId) -> BackupRecord {
    registry
        .get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("record {id} missing"))
}

/// Inserts a record of the given set and moves it to `status` through the normal lifecycle.
async fn add(
    registry: &Arc<dyn Registry>,
    env: &str,
    policy: &str,
    id: &BackupId,
    status: Status,
) -> BackupRecord {
    let record = running_record(env, policy, id);
    registry.insert(&record).await.expect("insert");
    match status {
        Status::Running => {}
        Status::Completed => registry
            .complete(id, &manifest_for(&record), &[location_for(&record)])
            .await
            .expect("complete"),
        Status::Failed => {
            assert!(registry
                .transition(id, Status::Running, Status::Failed, Some("source failed"))
                .await
                .unwrap())
        }
        Status::Deleting => {
            registry
                .complete(id, &manifest_for(&record), &[location_for(&record)])
                .await
                .expect("complete");
            assert!(registry
                .transition(id, Status::Completed, Status::Deleting, None)
                .await
                .unwrap());
        }
    }
    get(registry, id).await
}

async fn ids(registry: &Arc<dyn Registry>, query: &ListQuery) -> Vec<BackupId> {
    registry
        .list(query)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.backup_id)
        .collect()
}

fn ttl_secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

async fn hold(
    registry: &Arc<dyn Registry>,
    lease: &str,
    holder: &str,
    ttl: chrono::Duration,
) -> Lease {
    registry
        .acquire_lease(lease, holder, ttl, None)
        .await
        .expect("acquire_lease")
        .expect("lease is free")
}

// ---------------------------------------------------------------------------------------------
// Records

pub async fn check_fails_with_not_found_until_create_and_create_is_idempotent(
    registry: Arc<dyn Registry>,
) {
    let err = registry.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    registry.create().await.expect("first create");
    registry.check().await.expect("check after create");

    let id = id_at(1);
    let record = add(&registry, "prod", "app-db", &id, Status::Completed).await;
    registry.create().await.expect("second create");
    registry.check().await.expect("check after second create");
    assert_eq!(
        get(&registry, &id).await,
        record,
        "records survive a second create"
    );
}

pub async fn inserted_record_reads_back_equal(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let id = id_at(1);
    let record = running_record("prod", "app-db", &id);
    registry.insert(&record).await.expect("insert");
    assert_eq!(get(&registry, &id).await, record);
    assert_eq!(registry.get(&id_at(2)).await.expect("get missing"), None);
}

pub async fn duplicate_insert_fails_and_keeps_the_first_record(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let id = id_at(1);
    let first = running_record("prod", "app-db", &id);
    registry.insert(&first).await.expect("insert");
    let mut second = running_record("staging", "other", &id);
    second.holder = "another-host:1:1".into();
    assert!(
        registry.insert(&second).await.is_err(),
        "a second insert of {id} was accepted"
    );
    assert_eq!(get(&registry, &id).await, first);
}

pub async fn complete_moves_running_to_completed_with_manifest_and_locations(
    registry: Arc<dyn Registry>,
) {
    created(&registry).await;
    let id = id_at(1);
    let record = running_record("prod", "app-db", &id);
    registry.insert(&record).await.expect("insert");
    let manifest = manifest_for(&record);
    let locations = vec![
        location_for(&record),
        Location {
            region: "eu-west-1".into(),
            store: "s3://dr/backups".into(),
            prefix: prefix_of(&record),
        },
    ];
    registry
        .complete(&id, &manifest, &locations)
        .await
        .expect("complete");

    let expected = BackupRecord {
        status: Status::Completed,
        finished_at: Some(manifest.finished_at),
        manifest: Some(manifest),
        locations,
        ..record
    };
    assert_eq!(get(&registry, &id).await, expected);
}

/// Replication to several regions may finish at the same moment: no addition is lost.
pub async fn concurrent_add_location_keeps_every_location(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let done = add(&registry, "prod", "app-db", &id_at(1), Status::Completed).await;
    let regions = [
        "us-west-2",
        "eu-west-1",
        "eu-central-1",
        "ap-south-1",
        "sa-east-1",
        "ca-central-1",
    ];
    let start = Arc::new(tokio::sync::Barrier::new(regions.len()));
    let tasks: Vec<_> = regions
        .iter()
        .map(|region| {
            let (registry, start, id) = (registry.clone(), start.clone(), done.backup_id.clone());
            let location = Location {
                region: (*region).into(),
                store: format!("s3://dr-{region}/backups"),
                prefix: prefix_of(&done),
            };
            tokio::spawn(async move {
                start.wait().await;
                registry.add_location(&id, &location).await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("join").expect("add location");
    }
    let record = get(&registry, &done.backup_id).await;
    assert_eq!(
        record.locations[0], done.locations[0],
        "the first copy stays first"
    );
    let mut added: Vec<&str> = record.locations[1..]
        .iter()
        .map(|l| l.region.as_str())
        .collect();
    added.sort();
    let mut expected = regions.to_vec();
    expected.sort();
    assert_eq!(added, expected);
}

pub async fn add_location_appends_once_and_only_to_completed_records(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let done = add(&registry, "prod", "app-db", &id_at(1), Status::Completed).await;
    let replica = Location {
        region: "us-west-2".into(),
        store: "s3://dr-bucket/backups".into(),
        prefix: prefix_of(&done),
    };
    registry
        .add_location(&done.backup_id, &replica)
        .await
        .expect("add location");
    registry
        .add_location(&done.backup_id, &replica)
        .await
        .expect("adding the same location again");
    let mut locations = done.locations.clone();
    locations.push(replica.clone());
    assert_eq!(
        get(&registry, &done.backup_id).await,
        BackupRecord { locations, ..done }
    );

    for (n, status) in [(2, Status::Running), (3, Status::Failed)] {
        let r = add(&registry, "prod", "app-db", &id_at(n), status).await;
        assert!(
            registry.add_location(&r.backup_id, &replica).await.is_err(),
            "a location was added to a {} record",
            status.as_str()
        );
        assert_eq!(get(&registry, &r.backup_id).await, r);
    }
    let missing = id_at(9);
    let err = registry
        .add_location(&missing, &replica)
        .await
        .expect_err("location added to a missing record");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

pub async fn complete_fails_unless_running(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let done = add(&registry, "prod", "app-db", &id_at(1), Status::Completed).await;
    let mut other = manifest_for(&done);
    other.drctl_version = "9.9.9".into();
    assert!(
        registry
            .complete(&done.backup_id, &other, &[])
            .await
            .is_err(),
        "second complete was accepted"
    );
    assert_eq!(
        get(&registry, &done.backup_id).await,
        done,
        "a refused complete changed the record"
    );

    let failed = add(&registry, "prod", "app-db", &id_at(2), Status::Failed).await;
    assert!(registry
        .complete(&failed.backup_id, &manifest_for(&failed), &[])
        .await
        .is_err());
    assert_eq!(get(&registry, &failed.backup_id).await, failed);

    let missing = running_record("prod", "app-db", &id_at(3));
    assert!(registry
        .complete(&missing.backup_id, &manifest_for(&missing), &[])
        .await
        .is_err());
    assert_eq!(registry.get(&missing.backup_id).await.expect("get"), None);
}

pub async fn transition_applies_only_from_the_expected_status(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let id = id_at(1);
    let record = add(&registry, "prod", "app-db", &id, Status::Running).await;

    assert!(!registry
        .transition(&id, Status::Completed, Status::Deleting, None)
        .await
        .expect("transition"));
    assert_eq!(
        get(&registry, &id).await,
        record,
        "a refused transition changed the record"
    );

    assert!(registry
        .transition(&id, Status::Running, Status::Failed, Some("disk full"))
        .await
        .expect("transition"));
    let failed = get(&registry, &id).await;
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.error.as_deref(), Some("disk full"));
    assert!(
        failed.finished_at.is_some(),
        "a failed record has a finish time"
    );

    assert!(!registry
        .transition(&id, Status::Running, Status::Failed, Some("again"))
        .await
        .expect("transition"));
    assert_eq!(
        get(&registry, &id).await.error.as_deref(),
        Some("disk full")
    );

    assert!(!registry
        .transition(&id_at(2), Status::Running, Status::Failed, None)
        .await
        .expect("missing id"));
    assert_eq!(registry.get(&id_at(2)).await.expect("get"), None);
}

pub async fn remove_deletes_only_deleting_or_failed_records(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let running = add(&registry, "prod", "app-db", &id_at(1), Status::Running).await;
    let completed = add(&registry, "prod", "app-db", &id_at(2), Status::Completed).await;
    let failed = add(&registry, "prod", "app-db", &id_at(3), Status::Failed).await;
    let deleting = add(&registry, "prod", "app-db", &id_at(4), Status::Deleting).await;

    for kept in [&running, &completed] {
        assert!(
            registry.remove(&kept.backup_id).await.is_err(),
            "removed a {:?} record",
            kept.status
        );
        assert_eq!(get(&registry, &kept.backup_id).await, *kept);
    }
    for gone in [&failed, &deleting] {
        registry.remove(&gone.backup_id).await.expect("remove");
        assert_eq!(registry.get(&gone.backup_id).await.expect("get"), None);
    }
    assert_eq!(
        ids(&registry, &ListQuery::default()).await,
        vec![completed.backup_id, running.backup_id]
    );
}

pub async fn list_filters_by_environment_policy_and_status(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let db1 = add(&registry, "prod", "app-db", &id_at(1), Status::Completed)
        .await
        .backup_id;
    let files2 = add(&registry, "prod", "files", &id_at(2), Status::Completed)
        .await
        .backup_id;
    let db3 = add(&registry, "prod", "app-db", &id_at(3), Status::Failed)
        .await
        .backup_id;
    let stg4 = add(&registry, "staging", "app-db", &id_at(4), Status::Completed)
        .await
        .backup_id;
    let db5 = add(&registry, "prod", "app-db", &id_at(5), Status::Running)
        .await
        .backup_id;
    let files6 = add(&registry, "prod", "files", &id_at(6), Status::Deleting)
        .await
        .backup_id;

    let q = |env: Option<&str>, policy: Option<&str>, status: Option<Status>| ListQuery {
        environment: env.map(name),
        policy: policy.map(name),
        status,
        ..Default::default()
    };
    let all = vec![
        files6.clone(),
        db5.clone(),
        stg4.clone(),
        db3.clone(),
        files2.clone(),
        db1.clone(),
    ];
    assert_eq!(ids(&registry, &q(None, None, None)).await, all);
    assert_eq!(
        ids(&registry, &q(Some("prod"), None, None)).await,
        vec![
            files6.clone(),
            db5.clone(),
            db3.clone(),
            files2.clone(),
            db1.clone()
        ]
    );
    assert_eq!(
        ids(&registry, &q(Some("staging"), None, None)).await,
        vec![stg4.clone()]
    );
    assert_eq!(
        ids(&registry, &q(None, Some("app-db"), None)).await,
        vec![db5.clone(), stg4.clone(), db3.clone(), db1.clone()]
    );
    assert_eq!(
        ids(&registry, &q(Some("prod"), Some("app-db"), None)).await,
        vec![db5.clone(), db3.clone(), db1.clone()]
    );
    assert_eq!(
        ids(&registry, &q(None, None, Some(Status::Completed))).await,
        vec![stg4.clone(), files2.clone(), db1.clone()]
    );
    assert_eq!(
        ids(
            &registry,
            &q(Some("prod"), Some("app-db"), Some(Status::Completed))
        )
        .await,
        vec![db1.clone()]
    );
    assert_eq!(
        ids(
            &registry,
            &q(Some("prod"), Some("app-db"), Some(Status::Failed))
        )
        .await,
        vec![db3]
    );
    assert_eq!(
        ids(&registry, &q(None, None, Some(Status::Running))).await,
        vec![db5]
    );
    assert_eq!(
        ids(
            &registry,
            &q(Some("prod"), Some("files"), Some(Status::Deleting))
        )
        .await,
        vec![files6]
    );
    assert_eq!(
        ids(&registry, &q(Some("dr"), None, None)).await,
        Vec::<BackupId>::new()
    );
    assert_eq!(
        ids(&registry, &q(Some("staging"), Some("files"), None)).await,
        Vec::<BackupId>::new()
    );

    let records = registry
        .list(&q(Some("prod"), Some("files"), None))
        .await
        .expect("list");
    let statuses: Vec<Status> = records.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Status::Deleting, Status::Completed]);
    assert_eq!(
        records[1],
        get(&registry, &files2).await,
        "listed records are whole"
    );
}

pub async fn list_is_newest_first_and_honours_limit(registry: Arc<dyn Registry>) {
    created(&registry).await;
    // Inserted out of order.
    let order = [4, 1, 7, 3, 6, 2, 5];
    let mut by_n = std::collections::BTreeMap::new();
    for n in order {
        let id = id_at(n);
        add(&registry, "prod", "app-db", &id, Status::Completed).await;
        by_n.insert(n, id);
    }
    let newest_first: Vec<BackupId> = by_n.values().rev().cloned().collect();
    assert_eq!(ids(&registry, &ListQuery::default()).await, newest_first);
    for limit in [1u32, 3, 7, 100] {
        let query = ListQuery {
            limit: Some(limit),
            ..Default::default()
        };
        let expected: Vec<BackupId> = newest_first.iter().take(limit as usize).cloned().collect();
        assert_eq!(ids(&registry, &query).await, expected, "limit {limit}");
    }
}

pub async fn list_before_cursor_pages_through_every_record_once(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let mut all = Vec::new();
    for n in 0..23 {
        let env = if n % 5 == 0 { "staging" } else { "prod" };
        all.push(
            add(&registry, env, "app-db", &id_at(n), Status::Completed)
                .await
                .backup_id,
        );
    }
    all.reverse();

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut before = None;
    loop {
        let page = ids(
            &registry,
            &ListQuery {
                before: before.clone(),
                limit: Some(5),
                ..Default::default()
            },
        )
        .await;
        if page.is_empty() {
            break;
        }
        sizes.push(page.len());
        before = page.last().cloned();
        seen.extend(page);
        assert!(sizes.len() <= 10, "pagination does not end");
    }
    assert_eq!(sizes, vec![5, 5, 5, 5, 3]);
    assert_eq!(seen, all);

    // The cursor combines with filters.
    let prod: Vec<BackupId> = (0..23)
        .rev()
        .filter(|n| n % 5 != 0)
        .map(|n| all[22 - n].clone())
        .collect();
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let query = ListQuery {
            environment: Some(name("prod")),
            before: before.clone(),
            limit: Some(4),
            ..Default::default()
        };
        let page = ids(&registry, &query).await;
        if page.is_empty() {
            break;
        }
        before = page.last().cloned();
        seen.extend(page);
    }
    assert_eq!(seen, prod);
}

/// Retention may remove the record a page ended with before the next page is asked for.
pub async fn list_before_cursor_works_after_the_cursor_record_is_removed(
    registry: Arc<dyn Registry>,
) {
    created(&registry).await;
    let mut all = Vec::new();
    for n in 0..6 {
        all.push(
            add(&registry, "prod", "app-db", &id_at(n), Status::Completed)
                .await
                .backup_id,
        );
    }
    all.reverse();
    let first = ids(
        &registry,
        &ListQuery {
            limit: Some(2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(first, all[..2]);

    let cursor = first[1].clone();
    assert!(registry
        .transition(&cursor, Status::Completed, Status::Deleting, None)
        .await
        .expect("transition"));
    registry.remove(&cursor).await.expect("remove");

    let rest = ids(
        &registry,
        &ListQuery {
            before: Some(cursor),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(rest, all[2..]);
}

pub async fn latest_is_the_newest_completed_backup_of_the_set(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let (prod, db, files) = (name("prod"), name("app-db"), name("files"));
    assert_eq!(
        registry
            .latest(&prod, &db)
            .await
            .expect("latest of an empty set"),
        None
    );

    add(&registry, "prod", "app-db", &id_at(1), Status::Completed).await;
    let second = add(&registry, "prod", "app-db", &id_at(2), Status::Completed).await;
    add(&registry, "prod", "app-db", &id_at(3), Status::Failed).await;
    add(&registry, "prod", "app-db", &id_at(4), Status::Running).await;
    add(&registry, "prod", "app-db", &id_at(5), Status::Deleting).await;
    add(&registry, "prod", "files", &id_at(6), Status::Running).await;
    add(&registry, "staging", "app-db", &id_at(7), Status::Completed).await;

    assert_eq!(
        registry.latest(&prod, &db).await.expect("latest"),
        Some(second)
    );
    assert_eq!(
        registry.latest(&prod, &files).await.expect("latest"),
        None,
        "a running backup is not the latest"
    );
}

/// Registers a completed backup: a `wal push` of `wal`, or with None a full backup.
pub async fn add_pushed(
    registry: &Arc<dyn Registry>,
    policy: &str,
    n: i64,
    wal: Option<&str>,
) -> BackupRecord {
    let id = id_at(n);
    let mut record = running_record("prod", policy, &id);
    record.source_kind = "postgres".into();
    let mut manifest = manifest_for(&record);
    if let Some(wal) = wal {
        record.backup_type = BackupType::Incremental;
        manifest.backup_type = BackupType::Incremental;
        manifest.source.descriptor = serde_json::json!({ "mode": "wal", "wal": wal });
    } else {
        manifest.source.descriptor = serde_json::json!({ "mode": "physical" });
    }
    registry.insert(&record).await.expect("insert");
    registry
        .complete(&id, &manifest, &[location_for(&record)])
        .await
        .expect("complete");
    get(registry, &id).await
}

pub async fn find_looks_up_a_wal_file_and_the_newest_full_backup_while_completed(
    registry: Arc<dyn Registry>,
) {
    created(&registry).await;
    let (prod, pg) = (name("prod"), name("pg"));
    let find = |lookup: Lookup<'static>| {
        let (registry, prod, pg) = (registry.clone(), prod.clone(), pg.clone());
        async move {
            registry
                .find(&prod, &pg, lookup)
                .await
                .expect("find")
                .map(|r| r.backup_id)
        }
    };
    const SEGMENT: &str = "000000010000000000000003";
    assert_eq!(find(Lookup::Full).await, None, "an empty set");
    assert_eq!(find(Lookup::Wal(SEGMENT)).await, None, "an empty set");

    let base = add_pushed(&registry, "pg", 1, None).await;
    let first = add_pushed(&registry, "pg", 2, Some(SEGMENT)).await;
    add_pushed(&registry, "pg", 3, Some("000000010000000000000004")).await;
    // Another policy's file of the same name, and a newer running full backup.
    add_pushed(&registry, "pg-other", 4, Some(SEGMENT)).await;
    add_pushed(&registry, "pg-other", 5, None).await;
    registry
        .insert(&running_record("prod", "pg", &id_at(6)))
        .await
        .expect("insert");
    assert_eq!(find(Lookup::Full).await, Some(base.backup_id.clone()));
    assert_eq!(
        find(Lookup::Wal(SEGMENT)).await,
        Some(first.backup_id.clone())
    );
    assert_eq!(find(Lookup::Wal("000000010000000000000005")).await, None);

    // The newest of two records of one name; a record being deleted is not found.
    let again = add_pushed(&registry, "pg", 7, Some(SEGMENT)).await;
    assert_eq!(
        find(Lookup::Wal(SEGMENT)).await,
        Some(again.backup_id.clone())
    );
    assert!(registry
        .transition(&again.backup_id, Status::Completed, Status::Deleting, None)
        .await
        .unwrap());
    assert_eq!(find(Lookup::Wal(SEGMENT)).await, Some(first.backup_id));
    let newer_base = add_pushed(&registry, "pg", 8, None).await;
    assert_eq!(find(Lookup::Full).await, Some(newer_base.backup_id));
    // An incremental backup that is not a WAL file is found by nothing.
    let mut record = running_record("prod", "files", &id_at(9));
    record.backup_type = BackupType::Incremental;
    let mut manifest = manifest_for(&record);
    manifest.backup_type = BackupType::Incremental;
    registry.insert(&record).await.expect("insert");
    registry
        .complete(&record.backup_id, &manifest, &[])
        .await
        .expect("complete");
    assert_eq!(
        registry
            .find(&prod, &name("files"), Lookup::Full)
            .await
            .expect("find"),
        None
    );
}

/// What a test does to a registry behind drctl's back, as an older or newer drctl would
/// leave it.
pub enum Tamper {
    /// Schema version 1, without lookups, holding these records.
    Downgrade(Vec<BackupId>),
    /// The record without its lookup, as an older drctl completes it.
    ForgetLookup(BackupId),
    /// This schema version.
    Version(&'static str),
}

/// `create` upgrades a registry that an older drctl (schema version 1, without lookups)
/// left, fills in the lookups an older drctl still running leaves out, and refuses a newer
/// schema; `tamper` changes the registry as [`Tamper`] says.
pub async fn create_upgrades_a_version_1_registry<F>(
    registry: Arc<dyn Registry>,
    tamper: impl Fn(Tamper) -> F,
) where
    F: std::future::Future<Output = ()>,
{
    created(&registry).await;
    const SEGMENT: &str = "000000010000000000000003";
    let base = add_pushed(&registry, "pg", 1, None).await;
    let wal = add_pushed(&registry, "pg", 2, Some(SEGMENT)).await;
    let deleting = add_pushed(&registry, "pg", 3, Some("000000010000000000000004")).await;
    assert!(registry
        .transition(
            &deleting.backup_id,
            Status::Completed,
            Status::Deleting,
            None
        )
        .await
        .unwrap());
    tamper(Tamper::Downgrade(vec![
        base.backup_id.clone(),
        wal.backup_id.clone(),
        deleting.backup_id.clone(),
    ]))
    .await;
    let err = registry.check().await.unwrap_err();
    assert!(
        err.message().contains("schema version 1")
            && err.guidance().is_some_and(|h| h.contains("drctl init")),
        "{err}"
    );
    created(&registry).await;
    registry.check().await.expect("upgraded");
    let (prod, pg) = (name("prod"), name("pg"));
    let found = |lookup| {
        let (registry, prod, pg) = (registry.clone(), prod.clone(), pg.clone());
        async move {
            registry
                .find(&prod, &pg, lookup)
                .await
                .unwrap()
                .map(|r| r.backup_id)
        }
    };
    assert_eq!(
        found(Lookup::Wal(SEGMENT)).await,
        Some(wal.backup_id.clone())
    );
    assert_eq!(found(Lookup::Full).await, Some(base.backup_id.clone()));
    assert_eq!(found(Lookup::Wal("000000010000000000000004")).await, None);

    // A newer base backup that an older drctl, still running, completed without a lookup:
    // found once init runs again.
    let newer = add_pushed(&registry, "pg", 4, None).await;
    tamper(Tamper::ForgetLookup(newer.backup_id.clone())).await;
    assert_eq!(found(Lookup::Full).await, Some(base.backup_id));
    created(&registry).await;
    assert_eq!(found(Lookup::Full).await, Some(newer.backup_id));

    // A registry a newer drctl wrote is refused, and not downgraded.
    tamper(Tamper::Version("3")).await;
    let err = registry.create().await.unwrap_err();
    assert!(err.message().contains("schema version"), "{err}");
    assert!(registry.check().await.is_err());
}

pub async fn set_verification_round_trips(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let record = add(&registry, "prod", "app-db", &id_at(1), Status::Completed).await;
    let first = Verification {
        at: base_time() + chrono::Duration::days(1),
        deep: false,
        ok: true,
        detail: "sizes match".into(),
    };
    registry
        .set_verification(&record.backup_id, &first)
        .await
        .expect("set_verification");
    assert_eq!(
        get(&registry, &record.backup_id).await,
        BackupRecord {
            last_verification: Some(first),
            ..record.clone()
        }
    );

    let second = Verification {
        at: base_time() + chrono::Duration::days(2) + chrono::Duration::milliseconds(5),
        deep: true,
        ok: false,
        detail: "sha256 of data.tar.zst.age does not match".into(),
    };
    registry
        .set_verification(&record.backup_id, &second)
        .await
        .expect("set_verification");
    assert_eq!(
        get(&registry, &record.backup_id).await,
        BackupRecord {
            last_verification: Some(second),
            ..record
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Leases

const LEASE: &str = "set/prod/app-db";

fn assert_expiry_near(
    lease: &Lease,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    ttl: chrono::Duration,
) {
    let slack = chrono::Duration::seconds(1);
    assert!(
        lease.expires_at >= from + ttl - slack && lease.expires_at <= to + ttl + slack,
        "lease expires at {}, expected between {} and {}",
        lease.expires_at,
        from + ttl,
        to + ttl
    );
}

pub async fn free_lease_is_granted_and_a_second_holder_gets_the_current_lease(
    registry: Arc<dyn Registry>,
) {
    created(&registry).await;
    assert_eq!(registry.get_lease(LEASE).await.expect("get_lease"), None);

    let before = Utc::now();
    let a = hold(&registry, LEASE, "host-a:1:1", ttl_secs(60)).await;
    let after = Utc::now();
    assert_eq!((a.name.as_str(), a.holder.as_str()), (LEASE, "host-a:1:1"));
    assert!(a.token >= 1, "token {}", a.token);
    assert_expiry_near(&a, before, after, ttl_secs(60));
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(a.clone())
    );

    let refused = registry
        .acquire_lease(LEASE, "host-b:2:2", ttl_secs(60), None)
        .await
        .expect("acquire_lease");
    assert_eq!(
        refused,
        Err(a.clone()),
        "the second holder must be shown the current lease"
    );
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(a.clone())
    );

    // Another name is independent.
    let other = hold(&registry, "set/prod/files", "host-b:2:2", ttl_secs(60)).await;
    assert_eq!(other.holder, "host-b:2:2");
    assert_eq!(registry.get_lease(LEASE).await.expect("get_lease"), Some(a));
}

pub async fn renew_extends_the_lease(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let a = hold(
        &registry,
        LEASE,
        "host-a:1:1",
        chrono::Duration::milliseconds(500),
    )
    .await;
    let before = Utc::now();
    let renewed = registry.renew_lease(&a, ttl_secs(60)).await.expect("renew");
    let after = Utc::now();
    assert_eq!(
        (
            renewed.name.as_str(),
            renewed.holder.as_str(),
            renewed.token
        ),
        (LEASE, "host-a:1:1", a.token)
    );
    assert_expiry_near(&renewed, before, after, ttl_secs(60));

    // Past the original expiry the lease is still held.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(renewed.clone())
    );
    let refused = registry
        .acquire_lease(LEASE, "host-b:2:2", ttl_secs(60), None)
        .await
        .expect("acquire_lease");
    assert_eq!(refused, Err(renewed.clone()));
    // Renewing with the lease as first granted still works: same holder, same token.
    registry
        .renew_lease(&a, ttl_secs(60))
        .await
        .expect("renew again");
}

pub async fn released_lease_is_granted_again_with_a_larger_token(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let a = hold(&registry, LEASE, "host-a:1:1", ttl_secs(60)).await;
    registry.release_lease(&a).await.expect("release");
    assert_eq!(registry.get_lease(LEASE).await.expect("get_lease"), None);
    assert!(
        registry.renew_lease(&a, ttl_secs(60)).await.is_err(),
        "a released lease was renewed"
    );

    let b = hold(&registry, LEASE, "host-b:2:2", ttl_secs(60)).await;
    assert_eq!(b.holder, "host-b:2:2");
    assert!(b.token > a.token, "token {} after {}", b.token, a.token);

    // Releasing with a stale lease does not free the new holder's lease.
    registry.release_lease(&a).await.expect("stale release");
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(b.clone())
    );

    registry.release_lease(&b).await.expect("release");
    let a2 = hold(&registry, LEASE, "host-a:1:1", ttl_secs(60)).await;
    assert!(a2.token > b.token, "token {} after {}", a2.token, b.token);
}

pub async fn expired_lease_is_taken_by_another_holder_and_the_old_one_is_fenced(
    registry: Arc<dyn Registry>,
) {
    created(&registry).await;
    let a = hold(
        &registry,
        LEASE,
        "host-a:1:1",
        chrono::Duration::milliseconds(1),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        None,
        "an expired lease is not held"
    );

    let b = hold(&registry, LEASE, "host-b:2:2", ttl_secs(60)).await;
    assert_eq!(b.holder, "host-b:2:2");
    assert!(b.token > a.token, "token {} after {}", b.token, a.token);

    assert!(
        registry.renew_lease(&a, ttl_secs(60)).await.is_err(),
        "the old holder renewed a lease taken over"
    );
    registry.release_lease(&a).await.expect("stale release");
    assert_eq!(registry.get_lease(LEASE).await.expect("get_lease"), Some(b));
}

/// One process (one holder ID) may hold a lease twice in a row: only the token tells the grants apart.
pub async fn lease_granted_again_to_the_same_holder_fences_the_old_grant(
    registry: Arc<dyn Registry>,
) {
    created(&registry).await;
    let old = hold(
        &registry,
        LEASE,
        "host-a:1:1",
        chrono::Duration::milliseconds(1),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new = hold(&registry, LEASE, "host-a:1:1", ttl_secs(60)).await;
    assert!(
        new.token > old.token,
        "token {} after {}",
        new.token,
        old.token
    );

    assert!(
        registry.renew_lease(&old, ttl_secs(60)).await.is_err(),
        "the old grant was renewed"
    );
    registry.release_lease(&old).await.expect("stale release");
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(new.clone())
    );
    let renewed = registry
        .renew_lease(&new, ttl_secs(60))
        .await
        .expect("renew the new grant");
    assert_eq!(renewed.token, new.token);
}

pub async fn take_over_succeeds_only_with_the_current_token(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let a = hold(&registry, LEASE, "host-a:1:1", ttl_secs(60)).await;

    let wrong = registry
        .acquire_lease(LEASE, "host-b:2:2", ttl_secs(60), Some(a.token + 1))
        .await
        .expect("acquire");
    assert_eq!(wrong, Err(a.clone()), "take-over with a wrong token");

    let b = registry
        .acquire_lease(LEASE, "host-b:2:2", ttl_secs(60), Some(a.token))
        .await
        .expect("acquire")
        .expect("take-over with the current token");
    assert_eq!(b.holder, "host-b:2:2");
    assert!(b.token > a.token, "token {} after {}", b.token, a.token);
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(b.clone())
    );

    // The token just taken over is stale now.
    let stale = registry
        .acquire_lease(LEASE, "host-c:3:3", ttl_secs(60), Some(a.token))
        .await
        .expect("acquire");
    assert_eq!(stale, Err(b.clone()));
    assert!(
        registry.renew_lease(&a, ttl_secs(60)).await.is_err(),
        "the old holder renewed after a take-over"
    );
}

pub async fn racing_acquirers_get_exactly_one_lease(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (registry, start) = (registry.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                registry
                    .acquire_lease(LEASE, &format!("host-{i}:{i}:1"), ttl_secs(60), None)
                    .await
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for task in tasks {
        match task.await.expect("join").expect("acquire_lease") {
            Ok(lease) => won.push(lease),
            Err(current) => lost.push(current),
        }
    }
    assert_eq!(won.len(), 1, "winners: {won:?}");
    assert_eq!(lost.len(), 7);
    for current in &lost {
        assert_eq!(
            current, &won[0],
            "a loser saw a lease other than the winner's"
        );
    }
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(won[0].clone())
    );
}

pub async fn lease_guard_without_wait_refuses_a_held_lease_as_locked(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let other = hold(&registry, LEASE, "elsewhere:1:1", ttl_secs(60)).await;
    let started = Instant::now();
    let err = match LeaseGuard::acquire(
        registry.clone(),
        LEASE,
        Duration::from_secs(30),
        None,
        &Cancel::new(),
    )
    .await
    {
        Ok(_) => panic!("acquired a lease held by someone else"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusing took {:?}",
        started.elapsed()
    );
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(other)
    );
}

pub async fn lease_guard_waits_until_the_holder_releases(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let other = hold(&registry, LEASE, "elsewhere:1:1", ttl_secs(60)).await;
    let releaser = {
        let (registry, other) = (registry.clone(), other.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            registry.release_lease(&other).await
        })
    };
    let started = Instant::now();
    let guard = LeaseGuard::acquire(
        registry.clone(),
        LEASE,
        Duration::from_secs(30),
        Some(Duration::from_secs(2)),
        &Cancel::new(),
    )
    .await
    .expect("acquired after the holder released");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "acquired before the release"
    );
    releaser.await.expect("join").expect("release");

    let held = registry
        .get_lease(LEASE)
        .await
        .expect("get_lease")
        .expect("lease held");
    assert_eq!(held.holder, holder_id());
    assert!(
        held.token > other.token,
        "token {} after {}",
        held.token,
        other.token
    );
    guard.confirm().await.expect("confirm");

    guard.release().await.expect("release");
    assert_eq!(registry.get_lease(LEASE).await.expect("get_lease"), None);
}

pub async fn lease_guard_gives_up_when_the_wait_runs_out(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let other = hold(&registry, LEASE, "elsewhere:1:1", ttl_secs(60)).await;
    let started = Instant::now();
    let result = LeaseGuard::acquire(
        registry.clone(),
        LEASE,
        Duration::from_secs(30),
        Some(Duration::from_millis(200)),
        &Cancel::new(),
    )
    .await;
    let err = match result {
        Ok(_) => panic!("acquired a lease that was never released"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "gave up after {:?}",
        started.elapsed()
    );
    assert_eq!(
        registry.get_lease(LEASE).await.expect("get_lease"),
        Some(other)
    );
}

pub async fn lease_guard_takes_over_the_lease_of_a_dead_local_process(registry: Arc<dyn Registry>) {
    created(&registry).await;
    let dead = dead_local_holder();
    let stale = hold(&registry, LEASE, &dead, ttl_secs(3600)).await;
    let guard = LeaseGuard::acquire(
        registry.clone(),
        LEASE,
        Duration::from_secs(30),
        None,
        &Cancel::new(),
    )
    .await
    .expect("take over the lease of a process that no longer runs");
    let held = registry
        .get_lease(LEASE)
        .await
        .expect("get_lease")
        .expect("lease held");
    assert_eq!(held.holder, holder_id());
    assert!(
        held.token > stale.token,
        "token {} after {}",
        held.token,
        stale.token
    );
    guard.confirm().await.expect("confirm");
    guard.release().await.expect("release");
}

// ---------------------------------------------------------------------------------------------
// Holder liveness (not backend-specific: run once)

fn this_host() -> String {
    let me = holder_id();
    me.rsplitn(3, ':')
        .nth(2)
        .expect("holder id is host:pid:start")
        .to_owned()
}

/// The holder ID of a local process that has exited (and been reaped).
fn dead_local_holder() -> String {
    let mut child = std::process::Command::new("sleep")
        .arg("0")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    child.wait().expect("wait");
    format!("{}:{pid}:123", this_host())
}

/// Start time of a running process as the kernel reports it (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

pub fn holder_is_dead_only_for_local_processes_that_no_longer_run() {
    let host = this_host();
    assert!(
        holder_is_dead(&dead_local_holder()),
        "an exited process counts as alive"
    );
    assert!(!holder_is_dead(&holder_id()), "this process counts as dead");

    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    let start = start_time(pid);
    let running = format!("{host}:{pid}:{start}");
    let reused = format!("{host}:{pid}:{}", start + 1);
    let alive = holder_is_dead(&running);
    let pid_reused = holder_is_dead(&reused);
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(!alive, "a running process counts as dead");
    assert!(
        pid_reused,
        "a different process with a reused PID counts as the holder"
    );
    assert!(holder_is_dead(&running), "the process exited");

    // Processes elsewhere, and IDs that are not ours to judge, are never declared dead.
    let dead = dead_local_holder();
    let (_, pid_start) = dead.split_at(host.len());
    assert!(!holder_is_dead(&format!("some-other-host{pid_start}")));
    for malformed in [
        "",
        "backup-host:4242",
        "nonsense",
        &format!("{host}:notapid:1"),
        &format!("{host}:1:x"),
    ] {
        assert!(!holder_is_dead(malformed), "{malformed:?}");
    }
}
