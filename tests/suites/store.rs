//! The [`ObjectStore`] contract, as tests every backend must pass.
//!
//! Each test takes a fresh store that has not been created yet. A backend joins the suite with
//! one line: `mod my_store { crate::store_suite!(super::fresh_my_store); }`, where
//! `fresh_my_store` is an `async fn() -> StoreFixture`.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use drctl::format::{BackupId, Name, ObjectKey, ObjectName};
use drctl::store::{Leftover, ObjectStore, PutOptions, CHUNK_SIZE};
use drctl::{Error, ErrorKind, Result};

/// A store under test plus whatever must outlive it (a temporary directory, a bucket prefix).
pub struct StoreFixture {
    pub store: Arc<dyn ObjectStore>,
    pub _guard: Box<dyn std::any::Any + Send>,
}

/// Generates one `#[tokio::test]` per suite test, each with its own fresh store.
#[macro_export]
macro_rules! store_suite {
    ($fresh:path) => {
        $crate::store_suite!(@tests $fresh;
            check_fails_with_not_found_until_create_and_create_is_idempotent,
            written_objects_read_back_byte_for_byte,
            get_streams_chunks_of_at_most_chunk_size,
            head_returns_size_and_none_for_missing_key,
            aborted_write_leaves_no_object_and_no_leftover,
            aborted_overwrite_keeps_the_previous_object,
            dropped_writer_leaves_no_object_and_no_leftover,
            get_of_missing_key_fails_with_not_found,
            list_returns_exactly_the_matching_keys_in_key_order,
            list_does_not_show_unfinished_writes,
            delete_removes_the_object_and_deleting_a_missing_key_is_ok,
            overwrite_replaces_the_object_whole,
            put_bytes_and_get_bytes_round_trip,
            get_bytes_refuses_objects_over_the_limit,
            byte_stream_reads_the_same_bytes_through_std_io_read,
            remove_leftover_refuses_a_finished_object,
        );
    };
    (@tests $fresh:path; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let fixture = $fresh().await;
                $crate::suites::store::$test(fixture.store.clone()).await;
                drop(fixture);
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

const MIB: usize = 1 << 20;

/// Writes of this many MiB are multipart uploads with 5 MiB parts (the S3 minimum).
const LARGE_CHUNKS: u64 = 11;

const DEFAULT_OPTS: PutOptions = PutOptions {
    storage_class: None,
    sse_kms_key_id: None,
    retention: None,
};

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

fn id(s: &str) -> BackupId {
    BackupId::parse(s).unwrap()
}

const ID1: &str = "20260101T000000Z-00000001";
const ID2: &str = "20260102T000000Z-00000002";
const ID3: &str = "20260103T000000Z-00000003";

/// `{env}/{policy}/{id}/{object}` where `object` is `manifest`, `index` or a data artifact.
fn key(env: &str, policy: &str, backup: &str, object: &str) -> ObjectKey {
    let object = match object {
        "manifest" => ObjectName::Manifest,
        "index" => ObjectName::Index,
        artifact => ObjectName::Data {
            artifact: artifact.to_owned(),
        },
    };
    ObjectKey::object(&name(env), &name(policy), &id(backup), &object)
}

/// Deterministic bytes that differ between seeds (so a mixed-up object is noticed).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn expect_err<T>(r: Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: expected an error, got Ok"),
        Err(e) => e,
    }
}

async fn created(store: &Arc<dyn ObjectStore>) {
    store.create().await.expect("create");
}

/// Writes `data` in chunks whose sizes cycle through `chunk_sizes`.
async fn write_chunked(
    store: &Arc<dyn ObjectStore>,
    key: &ObjectKey,
    data: &[u8],
    chunk_sizes: &[usize],
) {
    let mut w = store.put(key, &DEFAULT_OPTS).await.expect("put");
    let mut at = 0;
    for size in chunk_sizes.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        w.write(Bytes::copy_from_slice(&data[at..end]))
            .await
            .expect("write");
        at = end;
    }
    let meta = w.finish().await.expect("finish");
    assert_eq!(meta.key, *key);
    assert_eq!(
        meta.size,
        data.len() as u64,
        "size reported by finish of {key}"
    );
}

async fn read_all(store: &Arc<dyn ObjectStore>, key: &ObjectKey) -> Vec<u8> {
    let mut stream = store.get(key).await.expect("get");
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("chunk"));
    }
    out
}

async fn listed(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key.as_str().to_owned())
        .collect()
}

/// Leftovers that would be reported a second from now: everything not finished.
async fn leftovers_now(store: &Arc<dyn ObjectStore>) -> Vec<Leftover> {
    store
        .leftovers(Utc::now() + chrono::Duration::seconds(1))
        .await
        .expect("leftovers")
}

// ---------------------------------------------------------------------------------------------
// The suite

pub async fn check_fails_with_not_found_until_create_and_create_is_idempotent(
    store: Arc<dyn ObjectStore>,
) {
    let err = expect_err(store.check().await, "check before create");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    store.create().await.expect("first create");
    store.check().await.expect("check after create");

    let k = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&k, Bytes::from_static(b"kept"), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    store.create().await.expect("second create");
    store.check().await.expect("check after second create");
    assert_eq!(store.get_bytes(&k, 100).await.expect("get_bytes"), b"kept");
    assert_eq!(listed(&store, "").await, vec![k.as_str().to_owned()]);
}

pub async fn written_objects_read_back_byte_for_byte(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let cases = [
        ("empty", 0, &[7][..]),
        ("one", 1, &[7][..]),
        ("onemib", MIB, &[4093, 1, 65_537][..]),
        (
            "fivemib",
            5 * MIB + 3,
            &[1_000_003, 7, MIB + 1, 333_333][..],
        ),
    ];
    for (i, (artifact, len, chunks)) in cases.iter().enumerate() {
        let data = pattern(*len, i as u64 + 1);
        let k = key("prod", "app-db", ID1, artifact);
        write_chunked(&store, &k, &data, chunks).await;
        let back = read_all(&store, &k).await;
        assert_eq!(back.len(), data.len(), "length of {k}");
        assert!(back == data, "bytes of {k} differ from what was written");
    }
}

pub async fn get_streams_chunks_of_at_most_chunk_size(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let data = pattern(2 * CHUNK_SIZE + 11, 9);
    let k = key("prod", "app-db", ID1, "tar");
    write_chunked(&store, &k, &data, &[3 * CHUNK_SIZE]).await;
    let mut stream = store.get(&k).await.expect("get");
    assert_eq!(stream.key(), &k);
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        assert!(chunk.len() <= CHUNK_SIZE, "chunk of {} bytes", chunk.len());
        assert_eq!(&chunk[..], &data[total..total + chunk.len()]);
        total += chunk.len();
    }
    assert_eq!(total, data.len());
}

pub async fn head_returns_size_and_none_for_missing_key(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "tar");
    assert_eq!(store.head(&k).await.expect("head before put"), None);
    let written = store
        .put_bytes(&k, Bytes::from(pattern(12_345, 1)), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    let meta = store.head(&k).await.expect("head").expect("object exists");
    assert_eq!(meta.key, k);
    assert_eq!(meta.size, 12_345);
    assert_eq!(written.size, 12_345);
    let sibling = key("prod", "app-db", ID1, "manifest");
    assert_eq!(store.head(&sibling).await.expect("head of sibling"), None);
    let other_backup = key("prod", "app-db", ID2, "tar");
    assert_eq!(
        store
            .head(&other_backup)
            .await
            .expect("head in missing directory"),
        None
    );
}

pub async fn aborted_write_leaves_no_object_and_no_leftover(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "tar");
    let mut w = store.put(&k, &DEFAULT_OPTS).await.expect("put");
    // Large enough to be a multipart upload in a remote store.
    for i in 0..LARGE_CHUNKS {
        w.write(Bytes::from(pattern(MIB + 17, i)))
            .await
            .expect("write");
    }
    w.write(Bytes::from(pattern(99, 3))).await.expect("write");
    w.abort().await.expect("abort");

    assert_eq!(store.head(&k).await.expect("head"), None);
    assert_eq!(listed(&store, "").await, Vec::<String>::new());
    let err = expect_err(store.get(&k).await, "get after abort");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(leftovers_now(&store).await, vec![]);
}

pub async fn aborted_overwrite_keeps_the_previous_object(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "manifest");
    let original = pattern(4_321, 4);
    store
        .put_bytes(&k, Bytes::from(original.clone()), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");

    let mut w = store.put(&k, &DEFAULT_OPTS).await.expect("put");
    w.write(Bytes::from(pattern(100, 5))).await.expect("write");
    w.abort().await.expect("abort");

    assert_eq!(
        store.head(&k).await.expect("head").map(|m| m.size),
        Some(4_321)
    );
    assert!(
        read_all(&store, &k).await == original,
        "previous object was changed by an aborted write"
    );
    assert_eq!(listed(&store, "").await, vec![k.as_str().to_owned()]);
    assert_eq!(leftovers_now(&store).await, vec![]);
}

pub async fn dropped_writer_leaves_no_object_and_no_leftover(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "tar");
    let mut w = store.put(&k, &DEFAULT_OPTS).await.expect("put");
    for i in 0..LARGE_CHUNKS {
        w.write(Bytes::from(pattern(MIB, 6 + i)))
            .await
            .expect("write");
    }
    drop(w);

    assert_eq!(store.head(&k).await.expect("head"), None);
    assert_eq!(listed(&store, "").await, Vec::<String>::new());
    let err = expect_err(store.get(&k).await, "get after drop");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // A remote store may clean up a dropped writer in the background: allow it a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = leftovers_now(&store).await;
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped writer left {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn get_of_missing_key_fails_with_not_found(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let present = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&present, Bytes::from_static(b"{}"), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    for missing in [
        key("prod", "app-db", ID1, "tar"),
        key("prod", "app-db", ID2, "manifest"),
        key("dr", "x", ID3, "index"),
    ] {
        let err = expect_err(store.get(&missing).await, missing.as_str());
        assert_eq!(err.kind(), ErrorKind::NotFound, "{missing}: {err}");
        let err = store.get_bytes(&missing, 1024).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::NotFound,
            "get_bytes {missing}: {err}"
        );
    }
}

pub async fn list_returns_exactly_the_matching_keys_in_key_order(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    // Written out of order, with sizes that identify them.
    let keys = [
        key("staging", "app-db", ID1, "manifest"),
        key("prod", "app-db", ID2, "manifest"),
        key("prod", "app-db", ID1, "tar"),
        key("prod", "app-files", ID1, "manifest"),
        key("prod", "app-db", ID1, "manifest"),
        key("prod", "app-db", ID1, "index"),
        key("prod", "app", ID3, "tar"),
    ];
    for (i, k) in keys.iter().enumerate() {
        store
            .put_bytes(k, Bytes::from(pattern(i * 10, i as u64)), &DEFAULT_OPTS)
            .await
            .expect("put_bytes");
    }

    let all = store.list("").await.expect("list all");
    let got: Vec<(&str, u64)> = all.iter().map(|m| (m.key.as_str(), m.size)).collect();
    assert_eq!(
        got,
        vec![
            ("prod/app-db/20260101T000000Z-00000001/data.tar.zst.age", 20),
            ("prod/app-db/20260101T000000Z-00000001/index.zst.age", 50),
            ("prod/app-db/20260101T000000Z-00000001/manifest.json", 40),
            ("prod/app-db/20260102T000000Z-00000002/manifest.json", 10),
            ("prod/app-files/20260101T000000Z-00000001/manifest.json", 30),
            ("prod/app/20260103T000000Z-00000003/data.tar.zst.age", 60),
            ("staging/app-db/20260101T000000Z-00000001/manifest.json", 0),
        ]
    );

    let cases: &[(&str, &[&str])] = &[
        (
            "prod/",
            &[
                "prod/app-db/20260101T000000Z-00000001/data.tar.zst.age",
                "prod/app-db/20260101T000000Z-00000001/index.zst.age",
                "prod/app-db/20260101T000000Z-00000001/manifest.json",
                "prod/app-db/20260102T000000Z-00000002/manifest.json",
                "prod/app-files/20260101T000000Z-00000001/manifest.json",
                "prod/app/20260103T000000Z-00000003/data.tar.zst.age",
            ],
        ),
        (
            "prod/app-db/",
            &[
                "prod/app-db/20260101T000000Z-00000001/data.tar.zst.age",
                "prod/app-db/20260101T000000Z-00000001/index.zst.age",
                "prod/app-db/20260101T000000Z-00000001/manifest.json",
                "prod/app-db/20260102T000000Z-00000002/manifest.json",
            ],
        ),
        // A prefix that ends inside a path component.
        (
            "prod/app-",
            &[
                "prod/app-db/20260101T000000Z-00000001/data.tar.zst.age",
                "prod/app-db/20260101T000000Z-00000001/index.zst.age",
                "prod/app-db/20260101T000000Z-00000001/manifest.json",
                "prod/app-db/20260102T000000Z-00000002/manifest.json",
                "prod/app-files/20260101T000000Z-00000001/manifest.json",
            ],
        ),
        (
            "prod/app/",
            &["prod/app/20260103T000000Z-00000003/data.tar.zst.age"],
        ),
        (
            "prod/app-db/20260101T000000Z-00000001/",
            &[
                "prod/app-db/20260101T000000Z-00000001/data.tar.zst.age",
                "prod/app-db/20260101T000000Z-00000001/index.zst.age",
                "prod/app-db/20260101T000000Z-00000001/manifest.json",
            ],
        ),
        (
            "prod/app-db/20260101T000000Z-00000001/data",
            &["prod/app-db/20260101T000000Z-00000001/data.tar.zst.age"],
        ),
        (
            "st",
            &["staging/app-db/20260101T000000Z-00000001/manifest.json"],
        ),
        ("prod/app-db/20260104", &[]),
        ("dr/", &[]),
    ];
    for (prefix, expected) in cases {
        assert_eq!(
            listed(&store, prefix).await,
            expected.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "prefix {prefix:?}"
        );
    }
    let by_helper = ObjectKey::backup_prefix(&name("prod"), &name("app-db"), &id(ID2));
    assert_eq!(
        listed(&store, &by_helper).await,
        vec!["prod/app-db/20260102T000000Z-00000002/manifest.json"]
    );
}

pub async fn list_does_not_show_unfinished_writes(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let done = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&done, Bytes::from_static(b"{}"), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    let pending = key("prod", "app-db", ID1, "tar");
    let mut w = store.put(&pending, &DEFAULT_OPTS).await.expect("put");
    w.write(Bytes::from(pattern(1000, 7))).await.expect("write");

    assert_eq!(listed(&store, "").await, vec![done.as_str().to_owned()]);
    assert_eq!(
        listed(&store, "prod/app-db/").await,
        vec![done.as_str().to_owned()]
    );
    assert_eq!(store.head(&pending).await.expect("head"), None);

    w.finish().await.expect("finish");
    assert_eq!(
        listed(&store, "").await,
        vec![pending.as_str().to_owned(), done.as_str().to_owned()]
    );
}

pub async fn delete_removes_the_object_and_deleting_a_missing_key_is_ok(
    store: Arc<dyn ObjectStore>,
) {
    created(&store).await;
    let doomed = key("prod", "app-db", ID1, "tar");
    let sibling = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&doomed, Bytes::from(pattern(2048, 8)), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    store
        .put_bytes(&sibling, Bytes::from_static(b"{}"), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");

    store.delete(&doomed).await.expect("delete");
    assert_eq!(store.head(&doomed).await.expect("head"), None);
    assert_eq!(
        expect_err(store.get(&doomed).await, "get after delete").kind(),
        ErrorKind::NotFound
    );
    assert_eq!(listed(&store, "").await, vec![sibling.as_str().to_owned()]);
    assert_eq!(
        store
            .get_bytes(&sibling, 10)
            .await
            .expect("sibling survives"),
        b"{}"
    );

    store.delete(&doomed).await.expect("deleting again is ok");
    store
        .delete(&key("dr", "nothing", ID2, "index"))
        .await
        .expect("deleting a never-written key is ok");

    store
        .delete(&sibling)
        .await
        .expect("delete last object of a backup");
    assert_eq!(listed(&store, "").await, Vec::<String>::new());
    store
        .check()
        .await
        .expect("repository still exists after deleting every object");
}

pub async fn overwrite_replaces_the_object_whole(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "tar");
    let large = pattern(3 * MIB + 1, 10);
    let small = pattern(10, 11);
    write_chunked(&store, &k, &large, &[MIB / 3]).await;
    write_chunked(&store, &k, &small, &[3]).await;
    assert_eq!(read_all(&store, &k).await, small);
    assert_eq!(
        store.head(&k).await.expect("head").map(|m| m.size),
        Some(10)
    );

    let larger = pattern(MIB + 5, 12);
    write_chunked(&store, &k, &larger, &[65_536]).await;
    assert!(
        read_all(&store, &k).await == larger,
        "overwrite with a larger object"
    );
    assert_eq!(listed(&store, "").await, vec![k.as_str().to_owned()]);
}

pub async fn put_bytes_and_get_bytes_round_trip(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "manifest");
    let data = pattern(70_001, 13);
    let meta = store
        .put_bytes(&k, Bytes::from(data.clone()), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    assert_eq!((meta.key.clone(), meta.size), (k.clone(), 70_001));
    assert!(
        store
            .get_bytes(&k, 70_001)
            .await
            .expect("get_bytes at the limit")
            == data
    );

    let empty = key("prod", "app-db", ID2, "manifest");
    store
        .put_bytes(&empty, Bytes::new(), &DEFAULT_OPTS)
        .await
        .expect("put_bytes empty");
    assert_eq!(
        store.get_bytes(&empty, 0).await.expect("get_bytes empty"),
        Vec::<u8>::new()
    );
}

pub async fn get_bytes_refuses_objects_over_the_limit(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&k, Bytes::from(pattern(3 * MIB, 14)), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    for limit in [3 * MIB - 1, MIB, 1, 0] {
        let err = store.get_bytes(&k, limit).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "limit {limit}: {err}");
    }
    assert_eq!(
        store
            .get_bytes(&k, 3 * MIB)
            .await
            .expect("at the limit")
            .len(),
        3 * MIB
    );
}

pub async fn byte_stream_reads_the_same_bytes_through_std_io_read(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "tar");
    let data = pattern(3 * MIB + 5, 15);
    write_chunked(&store, &k, &data, &[MIB + 7]).await;

    // Whole, through read_to_end.
    let stream = store.get(&k).await.expect("get");
    let whole = tokio::task::spawn_blocking(move || {
        let mut stream = stream;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).map(|_| out)
    })
    .await
    .expect("join")
    .expect("read_to_end");
    assert!(whole == data, "read_to_end returned different bytes");

    // In small, odd reads that straddle chunk boundaries.
    let stream = store.get(&k).await.expect("get");
    let pieces = tokio::task::spawn_blocking(move || {
        let mut stream = stream;
        let mut out = Vec::new();
        let mut buf = [0u8; 9_999];
        loop {
            match stream.read(&mut buf)? {
                0 => return Ok::<_, std::io::Error>(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("join")
    .expect("read");
    assert!(pieces == data, "small reads returned different bytes");
}

pub async fn remove_leftover_refuses_a_finished_object(store: Arc<dyn ObjectStore>) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&k, Bytes::from_static(b"{}"), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    let fake = Leftover {
        what: k.as_str().to_owned(),
        size: 2,
    };
    assert!(
        store.remove_leftover(&fake).await.is_err(),
        "a finished object was accepted as a leftover"
    );
    assert_eq!(
        store.get_bytes(&k, 10).await.expect("object survives"),
        b"{}"
    );
}

// ---------------------------------------------------------------------------------------------
// Local directory store only: a temp file left by a crash, planted by hand.

/// `root` is the directory the store was opened on.
pub async fn local_planted_temp_file_is_a_leftover_until_removed(
    store: Arc<dyn ObjectStore>,
    root: &Path,
) {
    created(&store).await;
    let k = key("prod", "app-db", ID1, "manifest");
    store
        .put_bytes(&k, Bytes::from_static(b"{}"), &DEFAULT_OPTS)
        .await
        .expect("put_bytes");
    let rel = "prod/app-db/20260101T000000Z-00000001/.tmp.data.tar.zst.age.deadbeef";
    std::fs::write(root.join(rel), b"12345").unwrap();

    let expected = vec![Leftover {
        what: rel.to_owned(),
        size: 5,
    }];
    assert_eq!(leftovers_now(&store).await, expected);
    // Only leftovers older than the cut-off count: a write started just now may still be running.
    let hour_ago = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.leftovers(hour_ago).await.expect("leftovers"), vec![]);
    assert_eq!(listed(&store, "").await, vec![k.as_str().to_owned()]);

    // Paths that are not temp files of this store are refused and left alone.
    let outside = root.parent().unwrap().join("x");
    std::fs::write(&outside, b"outside").unwrap();
    let outside_tmp = root.parent().unwrap().join(".tmp.x");
    std::fs::write(&outside_tmp, b"outside").unwrap();
    for what in [
        "../x",
        "../.tmp.x",
        "prod/../../.tmp.x",
        k.as_str(),
        outside_tmp.to_str().unwrap(),
        "",
    ] {
        let err = store
            .remove_leftover(&Leftover {
                what: what.to_owned(),
                size: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{what:?}: {err}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside");
    assert_eq!(std::fs::read(&outside_tmp).unwrap(), b"outside");
    assert_eq!(
        store.get_bytes(&k, 10).await.expect("object survives"),
        b"{}"
    );

    store
        .remove_leftover(&expected[0])
        .await
        .expect("remove_leftover");
    assert!(!root.join(rel).exists(), "leftover still on disk");
    assert_eq!(leftovers_now(&store).await, vec![]);
    assert_eq!(listed(&store, "").await, vec![k.as_str().to_owned()]);
    store
        .remove_leftover(&expected[0])
        .await
        .expect("removing it again is ok");
}
