//! Runs the shared backend suites against every implementation. Adding a backend is one
//! line per suite plus a function that returns a fresh, not yet created instance.

#[path = "common/moto.rs"]
mod moto;
mod suites;

use std::sync::Arc;

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

#[test]
fn holder_is_dead_only_for_local_processes_that_no_longer_run() {
    suites::registry::holder_is_dead_only_for_local_processes_that_no_longer_run();
}
