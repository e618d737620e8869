//! S3 behaviour beyond the shared store suite, checked with a plain SDK client against moto:
//! per-object options (storage class, SSE-KMS, Object Lock), deletes in
//! versioned buckets, and interrupted multipart uploads as leftovers.

#[path = "common/moto.rs"]
mod moto;

use std::sync::Arc;

use aws_sdk_s3::types::{
    BucketVersioningStatus, ObjectLockMode, ServerSideEncryption, StorageClass,
    VersioningConfiguration,
};
use bytes::Bytes;
use chrono::Utc;
use drctl::config::policy::LockMode;
use drctl::config::StoreUrl;
use drctl::format::{BackupId, Name, ObjectKey, ObjectName};
use drctl::store::{Leftover, ObjectStore, PutOptions, Retention};

const MIB: usize = 1 << 20;

fn key(artifact: &str) -> ObjectKey {
    ObjectKey::object(
        &Name::parse("prod").unwrap(),
        &Name::parse("app-db").unwrap(),
        &BackupId::parse("20260101T000000Z-00000001").unwrap(),
        &ObjectName::Data {
            artifact: artifact.to_owned(),
        },
    )
}

async fn store(bucket: &str) -> Arc<dyn ObjectStore> {
    moto::env();
    let url = moto::url(bucket, "repo", "us-east-1", "");
    let store = drctl::store::open(&StoreUrl::parse(&url, std::path::Path::new("/")).unwrap())
        .await
        .unwrap();
    store.create().await.expect("create");
    store
}

/// Writes `len` bytes in 1 MiB chunks.
async fn write(store: &Arc<dyn ObjectStore>, key: &ObjectKey, len: usize, opts: &PutOptions) {
    let mut w = store.put(key, opts).await.expect("put");
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB);
        w.write(Bytes::from(vec![(left % 251) as u8; n]))
            .await
            .expect("write");
        left -= n;
    }
    assert_eq!(w.finish().await.expect("finish").size, len as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_get_storage_class_sse_kms_and_object_lock_and_locked_versions_are_reported() {
    let bucket = moto::bucket("lock");
    let s3 = moto::client("us-east-1");
    s3.create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("create object-lock bucket");
    let store = store(&bucket).await;
    let until = (Utc::now() + chrono::Duration::days(2))
        .with_timezone(&Utc)
        .timestamp();
    let opts = PutOptions {
        storage_class: Some("STANDARD_IA".into()),
        sse_kms_key_id: Some("alias/drctl-test".into()),
        retention: Some(Retention {
            mode: LockMode::Governance,
            retain_until: chrono::DateTime::from_timestamp(until, 0).unwrap(),
        }),
    };
    // One single PutObject, one multipart upload.
    for (artifact, len) in [("small", 1000), ("large", 11 * MIB)] {
        let k = key(artifact);
        write(&store, &k, len, &opts).await;
        let head = s3
            .head_object()
            .bucket(&bucket)
            .key(format!("repo/{k}"))
            .send()
            .await
            .expect("head");
        assert_eq!(head.storage_class(), Some(&StorageClass::StandardIa), "{k}");
        assert_eq!(
            head.server_side_encryption(),
            Some(&ServerSideEncryption::AwsKms),
            "{k}"
        );
        assert!(
            head.ssekms_key_id()
                .is_some_and(|id| id.contains("alias/drctl-test")),
            "{k}: {:?}",
            head.ssekms_key_id()
        );
        assert_eq!(head.content_length(), Some(len as i64));
        if artifact == "large" {
            // moto 5.2.5 drops Object Lock settings of multipart uploads; tests/s3_faults.rs
            // checks that CreateMultipartUpload carries them.
            continue;
        }
        assert_eq!(head.object_lock_mode(), Some(&ObjectLockMode::Governance));
        assert_eq!(
            head.object_lock_retain_until_date().map(|d| d.secs()),
            Some(until),
            "{k}"
        );

        // The lock holds: delete fails and names the protected version.
        let version = head.version_id().expect("version id").to_owned();
        let err = store
            .delete(&k)
            .await
            .expect_err("delete of a locked object");
        assert!(
            err.message().contains(&version) && err.message().contains("Object Lock"),
            "{err}"
        );
        assert_eq!(
            store
                .get_bytes(&k, 11 * MIB)
                .await
                .expect("still there")
                .len(),
            len
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_in_a_versioned_bucket_removes_every_version() {
    let bucket = moto::bucket("ver");
    let store = store(&bucket).await;
    let s3 = moto::client("us-east-1");
    s3.put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("enable versioning");
    let (k, other) = (key("tar"), key("other"));
    for len in [10, 20, 6 * MIB] {
        write(&store, &k, len, &PutOptions::default()).await;
    }
    write(&store, &other, 5, &PutOptions::default()).await;
    let versions = |bucket: String| {
        let s3 = s3.clone();
        async move {
            let out = s3
                .list_object_versions()
                .bucket(bucket)
                .send()
                .await
                .expect("list versions");
            let mut keys: Vec<String> = out
                .versions()
                .iter()
                .filter_map(|v| v.key().map(str::to_owned))
                .chain(
                    out.delete_markers()
                        .iter()
                        .map(|m| format!("marker {}", m.key().unwrap_or_default())),
                )
                .filter(|k| k.contains("prod/"))
                .collect();
            keys.sort();
            keys
        }
    };
    assert_eq!(versions(bucket.clone()).await.len(), 4);
    store.delete(&k).await.expect("delete");
    assert_eq!(
        versions(bucket.clone()).await,
        vec![format!("repo/{other}")],
        "every version of {k} is gone, with no delete marker, and the other object stays"
    );
    assert_eq!(store.head(&k).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupted_multipart_upload_is_a_leftover_until_removed() {
    let bucket = moto::bucket("left");
    let store = store(&bucket).await;
    let s3 = moto::client("us-east-1");
    // A crashed run: an upload with one part, never completed. And one outside the prefix.
    let k = key("tar");
    let full = format!("repo/{k}");
    let started = s3
        .create_multipart_upload()
        .bucket(&bucket)
        .key(&full)
        .send()
        .await
        .expect("create upload");
    let upload_id = started.upload_id().unwrap().to_owned();
    s3.upload_part()
        .bucket(&bucket)
        .key(&full)
        .upload_id(&upload_id)
        .part_number(1)
        .body(vec![7u8; 1234].into())
        .send()
        .await
        .expect("upload part");
    s3.create_multipart_upload()
        .bucket(&bucket)
        .key("elsewhere/x")
        .send()
        .await
        .expect("create upload elsewhere");

    let expected = vec![Leftover {
        what: format!("{k}?uploadId={upload_id}"),
        size: 0,
    }];
    let now = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.leftovers(now).await.unwrap(), expected);
    // (The cut-off by age is not checked here: moto 5.2.5 reports every upload as initiated
    // in 2010.)

    for bad in [
        "elsewhere/x?uploadId=1",
        &k.to_string(),
        "?uploadId=abc",
        "",
    ] {
        let err = store
            .remove_leftover(&Leftover {
                what: bad.to_owned(),
                size: 0,
            })
            .await
            .expect_err(bad);
        assert_eq!(err.kind(), drctl::ErrorKind::InvalidInput, "{bad}: {err}");
    }
    store.remove_leftover(&expected[0]).await.expect("remove");
    assert_eq!(store.leftovers(now).await.unwrap(), vec![]);
    assert_eq!(
        moto::multipart_uploads(&s3, &bucket).await,
        vec!["elsewhere/x".to_owned()]
    );
    store
        .remove_leftover(&expected[0])
        .await
        .expect("removing it again is ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_bucket_is_not_found_with_a_hint_to_init() {
    moto::env();
    let url = moto::url(&moto::bucket("none"), "", "eu-west-1", "");
    let store = drctl::store::open(&StoreUrl::parse(&url, std::path::Path::new("/")).unwrap())
        .await
        .unwrap();
    let err = store.check().await.expect_err("check");
    assert_eq!(err.kind(), drctl::ErrorKind::NotFound, "{err}");
    assert!(err.guidance().unwrap_or("").contains("drctl init"), "{err}");
    let err = store.list("").await.expect_err("list");
    assert_eq!(err.kind(), drctl::ErrorKind::NotFound, "{err}");
    // A bucket outside us-east-1 is created in its region.
    store.create().await.expect("create");
    store.create().await.expect("create again");
    store.check().await.expect("check");
}
