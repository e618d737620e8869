//! End-to-end `drctl init`, `backup`, `list`, `restore` and `registry rebuild` with the
//! registry in DynamoDB (moto, started by `scripts/moto.sh`) and a local repository.

mod common;

use common::proxy::RecordingProxy;
use common::{assert_same_tree, moto, restored, Sandbox};

fn dynamodb_sandbox(table: &str) -> Sandbox {
    Sandbox::with_config(&format!(
        "environment: test\nrepository: file://repo\n\
             registry: dynamodb://{table}?region=us-east-1&endpoint={}\n\
             recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n",
        moto::endpoint()
    ))
}

#[test]
fn backup_list_and_restore_through_a_dynamodb_registry() {
    let table = moto::bucket("e2e");
    let sb = dynamodb_sandbox(&table);
    let init = sb.run(&["--json", "init"]).ok().json();
    assert_eq!(
        init[0]["registry"],
        format!(
            "dynamodb://{table}?region=us-east-1&endpoint={}",
            moto::endpoint()
        ),
        "a second init reports the same table"
    );

    let src = sb.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/app.conf"), b"listen: 127.0.0.1:8080\n").unwrap();
    std::fs::write(src.join("data.bin"), vec![7u8; 300_000]).unwrap();
    sb.files_policy("tree", &[&src]);

    let first = sb.backup("tree");
    std::fs::write(src.join("etc/app.conf"), b"listen: 0.0.0.0:9090\n").unwrap();
    let second = sb.backup("tree");

    let records = sb.records();
    let listed: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["backup_id"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (second.as_str(), "completed"),
            (first.as_str(), "completed")
        ]
    );
    assert!(
        !sb.path().join("registry.db").exists(),
        "a SQLite registry was created"
    );

    // `latest` is the second backup; the first restores its own content.
    let latest = sb.path().join("restore-latest");
    sb.run(&[
        "restore",
        "-p",
        "tree",
        "-b",
        "latest",
        "-t",
        latest.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&latest, &src));

    let old = sb.path().join("restore-first");
    sb.run(&[
        "restore",
        "-p",
        "tree",
        "-b",
        &first,
        "-t",
        old.to_str().unwrap(),
    ])
    .ok();
    assert_eq!(
        std::fs::read(restored(&old, &src).join("etc/app.conf")).unwrap(),
        b"listen: 127.0.0.1:8080\n"
    );
}

#[test]
fn commands_on_a_missing_table_say_to_run_init() {
    let table = moto::bucket("e2e");
    let sb = dynamodb_sandbox(&table);
    let other = moto::bucket("missing");
    std::fs::write(
        sb.path().join("drctl.yaml"),
        std::fs::read_to_string(sb.path().join("drctl.yaml"))
            .unwrap()
            .replace(&table, &other),
    )
    .unwrap();
    let run = sb.run(&["list"]).code(10);
    assert!(
        run.stderr.contains(&other) && run.stderr.contains("drctl init"),
        "{}",
        run.stderr
    );
}

/// Deletes a table, as an accident or a region loss would.
fn delete_table(table: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = moto::sdk_config("us-east-1").await;
        aws_sdk_dynamodb::Client::new(&config)
            .delete_table()
            .table_name(table)
            .send()
            .await
            .expect("delete table");
    });
}

#[test]
fn a_lost_table_is_rebuilt_from_the_repository() {
    let table = moto::bucket("e2e");
    let sb = dynamodb_sandbox(&table);
    let src = sb.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    sb.files_policy("tree", &[&src]);
    let first = sb.backup("tree");
    std::fs::write(src.join("b.txt"), vec![3u8; 200_000]).unwrap();
    let second = sb.backup("tree");

    delete_table(&table);
    sb.run(&["list"]).code(10);

    sb.run(&["registry", "rebuild"]).ok();
    let records = sb.records();
    let listed: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["backup_id"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (second.as_str(), "completed"),
            (first.as_str(), "completed")
        ]
    );
    let target = sb.path().join("restore");
    sb.run(&[
        "restore",
        "-p",
        "tree",
        "-b",
        "latest",
        "-t",
        target.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&target, &src));
}

/// Every access pattern is a keyed read: whatever the command, DynamoDB never sees a Scan.
#[test]
fn commands_read_the_registry_by_key_and_index_never_by_scan() {
    let proxy = RecordingProxy::start();
    let table = moto::bucket("e2e");
    let sb = Sandbox::with_config(&format!(
        "environment: test\nrepository: file://repo\n\
         registry: dynamodb://{table}?region=us-east-1&endpoint={}\n\
         recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n",
        proxy.url
    ));
    let src = sb.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    sb.files_policy("tree", &[&src]);
    let first = sb.backup("tree");
    let second = sb.backup("tree");
    proxy.take();

    for args in [
        &["list"][..],
        &["list", "--policy", "tree"],
        &["list", "--status", "completed"],
        &["list", "--policy", "tree", "--status", "failed"],
        &["list", "--limit", "1", "--before", &second],
        &["show", &first],
        &["verify", "--all"],
        &["restore", "-p", "tree", "-b", "latest", "--stdout"],
    ] {
        sb.run(args).ok();
        let ops = proxy.take();
        assert!(
            !ops.is_empty() && ops.iter().all(|op| !op.contains("scan")),
            "{args:?}: {ops:?}"
        );
    }
    // A listing is one index query (after the check that the registry exists), not reads
    // item by item.
    sb.run(&["list", "--policy", "tree"]).ok();
    assert_eq!(
        proxy.take(),
        ["dynamodb_20120810.getitem", "dynamodb_20120810.query"]
    );
}
