//! Cross-region copies: a backup is copied to a replica bucket in a second region, verified,
//! recorded in both registries, and restored with `--region` while the primary bucket's
//! endpoint is dead and the primary registry is gone.

mod common;

use common::{assert_same_tree, moto, restored, Sandbox};

/// A port nothing listens on.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn replica_backup_then_restore_in_the_dr_region(primary: &str) {
    let replica_bucket = moto::bucket("dr");
    let replica = moto::url(&replica_bucket, "copies", "us-west-2", "");
    let regions = format!(
        "regions:\n  us-west-2:\n    registry: sqlite://dr/registry.db\n    repository: {replica}\n"
    );
    let sb = Sandbox::with_repository(primary, &regions);
    let src = sb.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let big: Vec<u8> = (0..7_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("sub/note.txt"), b"replicated").unwrap();
    sb.policy(
        "tree",
        &format!(
            "name: tree\nsource:\n  kind: files\n  paths: [{:?}]\nreplicas:\n  - region: us-west-2\n    repository: {replica}\n",
            src.display().to_string()
        ),
    );
    let id = sb.backup("tree");
    let record = &sb.run(&["--json", "show", &id]).ok().json()[0];
    let regions = Sandbox::location_regions(record);
    assert_eq!(regions.len(), 2, "{record}");
    assert_eq!(regions[1], "us-west-2", "{record}");
    assert!(
        record["locations"][1]["store"]
            .as_str()
            .unwrap()
            .starts_with(&format!("s3://{replica_bucket}/copies")),
        "{record}"
    );

    // The primary region goes away: its bucket's endpoint is dead, its registry is gone.
    let config = sb.path().join("drctl.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let first_line_end = text.find("\nregions:").unwrap();
    let (head, tail) = text.split_at(first_line_end);
    let head = head
        .replace(&moto::endpoint(), &dead)
        .replace("repository: file://repo", "repository: file://gone")
        .replace("sqlite://registry.db", "sqlite://gone.db");
    std::fs::write(&config, format!("{head}{tail}")).unwrap();
    std::fs::remove_file(sb.path().join("registry.db")).unwrap();
    assert_ne!(sb.run(&["list"]).code, 0, "the primary region is unusable");

    let target = sb.path().join("restore");
    let run = sb
        .run(&[
            "--json",
            "restore",
            "--region",
            "us-west-2",
            "-p",
            "tree",
            "-b",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ])
        .ok();
    assert_eq!(run.json()[0]["backup_id"], id.as_str(), "{}", run.stdout);
    assert_same_tree(&src, &restored(&target, &src));

    let err = sb
        .run(&[
            "restore",
            "--region",
            "eu-north-1",
            "-p",
            "tree",
            "-b",
            "latest",
            "--stdout",
        ])
        .code(2);
    assert!(
        err.stderr.contains("no region \"eu-north-1\""),
        "{}",
        err.stderr
    );
}

#[test]
fn s3_backup_is_copied_in_s3_and_restores_in_the_dr_region_with_the_primary_dead() {
    let primary = moto::url(&moto::bucket("primary"), "backups", "us-east-1", "");
    replica_backup_then_restore_in_the_dr_region(&primary);
}

#[test]
fn local_backup_is_streamed_to_the_replica_and_restores_in_the_dr_region() {
    replica_backup_then_restore_in_the_dr_region("file://repo");
}

#[test]
fn replica_settings_are_validated() {
    let replica = moto::url("drctl-some-dr", "x", "us-west-2", "");
    let regions = format!(
        "regions:\n  us-west-2:\n    registry: sqlite://dr.db\n    repository: {}\n",
        moto::url("drctl-other-dr", "x", "us-west-2", "")
    );
    let sb = Sandbox::with_settings(&regions);
    sb.policy(
        "p",
        &format!(
            "name: p\nsource:\n  kind: command\n  command: [\"true\"]\nreplicas:\n  - region: eu-west-1\n    repository: {replica}\n  - region: us-west-2\n    repository: {replica}\n  - region: us-west-2\n    repository: file:///tmp/x\n"
        ),
    );
    let run = sb.run(&["policy", "validate"]).code(2);
    let out = format!("{}{}", run.stdout, run.stderr);
    for expected in [
        "replicas[0].region: eu-west-1 does not match the URL's region us-west-2",
        "replicas[1].repository: the same bucket and prefix as the repository or another replica",
        "replicas[1].repository: drctl.yaml regions.us-west-2.repository is s3://drctl-other-dr/x",
        "replicas[2].repository: file:///tmp/x: replicas are s3:// buckets",
    ] {
        assert!(out.contains(expected), "{expected}\n{out}");
    }
}

/// A WAL push whose copy to the DR region failed is retried by PostgreSQL: the retry finds
/// the file archived, and copies and records it where it is missing.
#[test]
fn a_retried_wal_push_copies_the_file_where_the_failed_push_did_not() {
    let replica_bucket = moto::bucket("walcopy");
    let replica = moto::url(&replica_bucket, "copies", "us-west-2", "");
    let sb = Sandbox::with_settings(&format!(
        "regions:\n  us-west-2:\n    registry: sqlite://dr/registry.db\n    repository: {replica}\n"
    ));
    sb.policy(
        "pgwal",
        &format!(
            "name: pgwal\nsource:\n  kind: postgres\n  mode: physical\n  url: postgres://postgres@127.0.0.1:5432/postgres\n\
             replicas:\n  - region: us-west-2\n    repository: {replica}\n"
        ),
    );
    // The replica bucket goes away.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = moto::client("us-west-2");
    rt.block_on(async {
        let listed = s3
            .list_objects_v2()
            .bucket(&replica_bucket)
            .send()
            .await
            .unwrap();
        for o in listed.contents() {
            s3.delete_object()
                .bucket(&replica_bucket)
                .key(o.key().unwrap())
                .send()
                .await
                .unwrap();
        }
        s3.delete_bucket()
            .bucket(&replica_bucket)
            .send()
            .await
            .unwrap();
    });
    let dir = sb.path().join("pg_wal");
    std::fs::create_dir(&dir).unwrap();
    let wal = dir.join("000000010000000000000001");
    let mut bytes = common::wal_segment("000000010000000000000001", 16 << 20, 0);
    for (i, b) in bytes.iter_mut().enumerate().skip(40) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&wal, &bytes).unwrap();
    let push = || {
        sb.run(&[
            "--json",
            "wal",
            "push",
            "--policy",
            "pgwal",
            wal.to_str().unwrap(),
        ])
    };
    let failed = push();
    assert_ne!(failed.code, 0, "{}", failed.stdout);
    assert!(
        failed.stderr.contains("copy to us-west-2 failed"),
        "{}",
        failed.stderr
    );
    let records = sb.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]["locations"].as_array().unwrap().len(),
        1,
        "{records:?}"
    );

    // Back again: PostgreSQL's retry copies the archived file and records the copy in both
    // registries, completing the record an earlier copy left running there.
    sb.run(&["init"]).ok();
    let id = records[0]["backup_id"].as_str().unwrap();
    let dr_registry = sb.path().join("dr/registry.db");
    assert!(dr_registry.is_file());
    let inserted = std::process::Command::new("sqlite3")
        .arg(&dr_registry)
        .arg(format!(
            "INSERT INTO backups (backup_id, environment, policy, status, backup_type, \
             source_kind, started_at, holder) VALUES ('{id}', {}, 'pgwal', 'running', \
             'incremental', 'postgres', {}, 'gone:1:1')",
            records[0]["environment"]
                .as_str()
                .map(|e| format!("'{e}'"))
                .unwrap(),
            records[0]["started_at"]
                .as_str()
                .map(|t| format!("'{t}'"))
                .unwrap(),
        ))
        .status()
        .unwrap();
    assert!(inserted.success());
    let retried = push().ok();
    assert_eq!(
        retried.json()[0]["already_archived"],
        true,
        "{}",
        retried.stdout
    );
    assert_eq!(retried.json()[0]["backup_id"], id);
    let record = &sb.run(&["--json", "show", id]).ok().json()[0];
    let regions = Sandbox::location_regions(record);
    assert_eq!(regions, ["local", "us-west-2"], "{record}");
    let copy = sb.path().join("copy");
    sb.run(&[
        "wal",
        "fetch",
        "--region",
        "us-west-2",
        "--policy",
        "pgwal",
        "000000010000000000000001",
        copy.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
    // Nothing more to copy: a third push changes nothing.
    push().ok();
    assert_eq!(sb.records().len(), 1);
}
