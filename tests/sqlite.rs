//! SQLite backups of a live database and restores to a file, checked by drctl with
//! `PRAGMA integrity_check` and the row counts recorded at backup time.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::Sandbox;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Connection, SqliteConnection};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(path: &Path, create: bool, wal: bool) -> SqliteConnection {
    let mut opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .busy_timeout(std::time::Duration::from_secs(30));
    if wal {
        opts = opts.journal_mode(SqliteJournalMode::Wal);
    }
    SqliteConnection::connect_with(&opts).await.unwrap()
}

/// `events` rows and a `totals` row that counts them, updated in the same transaction: a copy
/// that is not a snapshot of one moment breaks the invariant.
async fn create(path: &Path, rows: u64, wal: bool) {
    let mut c = connect(path, true, wal).await;
    sqlx::query(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);
         CREATE TABLE totals (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
         CREATE TABLE \"odd \"\"name\"\"\" (x);
         INSERT INTO totals VALUES ('events', 0);",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let mut tx = c.begin().await.unwrap();
    for _ in 0..rows {
        insert(&mut tx).await;
    }
    tx.commit().await.unwrap();
}

async fn insert(c: &mut SqliteConnection) {
    sqlx::query("INSERT INTO events (payload) VALUES (randomblob(100 + abs(random()) % 200))")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query("UPDATE totals SET n = n + 1 WHERE name = 'events'")
        .execute(&mut *c)
        .await
        .unwrap();
}

async fn counts(path: &Path) -> (i64, i64) {
    let mut c = connect(path, false, false).await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT n FROM totals WHERE name = 'events'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    (events, total)
}

fn policy(sandbox: &Sandbox, name: &str, db: &Path) {
    sandbox.policy(
        name,
        &format!(
            "name: {name}\nsource:\n  kind: sqlite\n  path: {:?}\n",
            db.display().to_string()
        ),
    );
}

#[test]
fn sqlite_backup_while_a_writer_inserts_restores_a_consistent_database() {
    let sandbox = Sandbox::new();
    let db = sandbox.path().join("live.db");
    runtime().block_on(async {
        create(&db, 3_000, true).await;
        // A virtual table: its rows are its module's, its shadow tables are tables.
        let mut c = connect(&db, false, true).await;
        sqlx::query("CREATE VIRTUAL TABLE docs USING fts5(body); INSERT INTO docs VALUES ('hi')")
            .execute(&mut c)
            .await
            .unwrap();
    });
    policy(&sandbox, "live", &db);

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (db, stop, written) = (db.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut c = connect(&db, false, true).await;
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = c.begin().await.unwrap();
                    for _ in 0..10 {
                        insert(&mut tx).await;
                    }
                    tx.commit().await.unwrap();
                    written.fetch_add(10, Ordering::Relaxed);
                }
            })
        })
    };
    while written.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let id = sandbox.backup("live");
    let during = written.load(Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        written.load(Ordering::Relaxed) > during,
        "the writer kept going after the backup"
    );

    let run = sandbox.run(&["--json", "show", &id]).ok();
    let stats = run.json()[0]["manifest"]["source"]["stats"].clone();
    let backed_up = stats["tables"]["events"].as_u64().unwrap();
    assert!(backed_up >= 3_100, "{stats}");
    assert_eq!(stats["tables"]["totals"], 1);
    assert_eq!(stats["tables"]["odd \"name\""], 0);
    assert!(stats["tables"].get("docs").is_none(), "{stats}");
    assert_eq!(stats["tables"]["docs_content"], 1, "{stats}");

    let target = sandbox.path().join("restored/copy.db");
    let run = sandbox
        .run(&[
            "--json",
            "restore",
            "--policy",
            "live",
            "--backup",
            &id,
            "--target",
            target.to_str().unwrap(),
        ])
        .ok();
    let report = &run.json()[0];
    assert_eq!(report["rows"]["tables"], 8, "{report}");
    assert_eq!(report["written_to"], target.to_str().unwrap());
    // In WAL mode as the database was (header bytes 18 and 19), with a new file's mode.
    let restored = std::fs::read(&target).unwrap();
    assert_eq!(restored[18..20], [2, 2]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o644);
    let left: Vec<_> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("copy.db")]);
    let (events, total) = runtime().block_on(counts(&target));
    assert_eq!(events, total, "the copy is one moment of the database");
    assert_eq!(events as u64, backed_up);
}

/// A backup of a new 50-row database by the policy `plain`; its ID.
fn plain_backup(sandbox: &Sandbox) -> String {
    let db = sandbox.path().join("plain.db");
    runtime().block_on(create(&db, 50, false));
    policy(sandbox, "plain", &db);
    sandbox.backup("plain")
}

fn restore_args<'a>(id: &'a str, target: &'a Path) -> Vec<&'a str> {
    let target = target.to_str().unwrap();
    vec![
        "restore", "--policy", "plain", "--backup", id, "--target", target,
    ]
}

#[test]
fn sqlite_restore_refuses_an_existing_file_unless_overwrite() {
    let sandbox = Sandbox::new();
    let id = plain_backup(&sandbox);
    let target = sandbox.path().join("existing.db");
    std::fs::write(&target, b"precious").unwrap();
    let args = restore_args(&id, &target);
    let run = sandbox.run(&args).code(2);
    assert!(run.stderr.contains("exists"), "{}", run.stderr);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");

    let run = sandbox
        .run(&[
            "restore",
            "--policy",
            "plain",
            "--backup",
            &id,
            "--target",
            sandbox.path().to_str().unwrap(),
        ])
        .code(2);
    assert!(run.stderr.contains("is a directory"), "{}", run.stderr);

    // The file it replaces gives it its mode; in rollback mode, as the database was.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut args = args;
    args.push("--overwrite");
    sandbox.run(&args).ok();
    assert_eq!(runtime().block_on(counts(&target)), (50, 50));
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(std::fs::read(&target).unwrap()[18..20], [1, 1]);
}

/// Adds `rows` to the WAL-mode database at `path` and leaves them in its WAL, as a writer that
/// crashed does (a clean close would checkpoint the WAL and remove it).
async fn leave_wal(path: &Path, rows: usize) {
    let wal = Path::new(&format!("{}-wal", path.display())).to_path_buf();
    let mut c = connect(path, false, true).await;
    sqlx::query("PRAGMA wal_autocheckpoint = 0")
        .execute(&mut c)
        .await
        .unwrap();
    for _ in 0..rows {
        insert(&mut c).await;
    }
    let kept = std::fs::read(&wal).unwrap();
    c.close().await.unwrap();
    std::fs::write(&wal, kept).unwrap();
}

/// `--overwrite` refuses a database that another process has open, and leaves it as it is. A
/// database whose WAL a crashed writer left behind is replaced with its WAL, which SQLite would
/// otherwise apply to the restored copy.
#[test]
fn sqlite_overwrite_refuses_a_database_in_use_and_drops_the_replaced_wal() {
    let sandbox = Sandbox::new();
    let rt = runtime();
    let id = plain_backup(&sandbox);
    let target = sandbox.path().join("live.db");
    rt.block_on(create(&target, 10, true));
    let mut args = restore_args(&id, &target);
    args.push("--overwrite");
    // This process, in a read transaction, holds a lock on the database.
    rt.block_on(async {
        let mut c = connect(&target, false, false).await;
        let mut tx = c.begin().await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let run = sandbox.run(&args).code(2);
        assert!(run.stderr.contains("is in use"), "{}", run.stderr);
        let pid = format!("process {}", std::process::id());
        assert!(run.stderr.contains(&pid), "{}", run.stderr);
        tx.rollback().await.unwrap();
    });
    assert_eq!(rt.block_on(counts(&target)), (10, 10));

    rt.block_on(leave_wal(&target, 30));
    let wal = sandbox.path().join("live.db-wal");
    // A copy of the database with its WAL shows the WAL's rows.
    let probe = sandbox.path().join("probe.db");
    std::fs::copy(&target, &probe).unwrap();
    std::fs::copy(&wal, sandbox.path().join("probe.db-wal")).unwrap();
    assert_eq!(rt.block_on(counts(&probe)), (40, 40));

    sandbox.run(&args).ok();
    assert_eq!(rt.block_on(counts(&target)), (50, 50));
    assert!(!wal.exists(), "the replaced database's WAL is removed");
}

#[test]
fn sqlite_missing_database_fails_the_backup() {
    let sandbox = Sandbox::new();
    policy(&sandbox, "absent", &sandbox.path().join("nope.db"));
    let run = sandbox.run(&["backup", "--policy", "absent"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("nope.db"), "{}", run.stderr);
    assert!(!sandbox.path().join("nope.db").exists());
    assert_eq!(sandbox.records()[0]["status"], "failed");
}

#[test]
fn sqlite_restore_reports_row_count_differences_and_leaves_no_file() {
    let sandbox = Sandbox::new();
    let db = sandbox.path().join("counted.db");
    runtime().block_on(create(&db, 40, false));
    policy(&sandbox, "counted", &db);
    let id = sandbox.backup("counted");
    // The registry's copy of the manifest now claims another count.
    let registry = sandbox.path().join("registry.db");
    runtime().block_on(async {
        let mut c = connect(&registry, false, false).await;
        sqlx::query(
            "UPDATE backups SET manifest = json_set(manifest, '$.source.stats.tables.events', 41) \
             WHERE backup_id = ?",
        )
        .bind(&id)
        .execute(&mut c)
        .await
        .unwrap();
    });
    let target = sandbox.path().join("out/counted.db");
    let run = sandbox
        .run(&[
            "restore",
            "--policy",
            "counted",
            "--backup",
            &id,
            "--target",
            target.to_str().unwrap(),
        ])
        .code(4);
    assert!(
        run.stderr
            .contains("table events: 41 rows at backup, 40 restored"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_dir(target.parent().unwrap()).unwrap().count(),
        0
    );
}
