//! End-to-end `drctl init`, `backup`, `list` and `restore` with the registry in DynamoDB
//! (moto, started by `scripts/moto.sh`) and a local repository.

mod common;

use common::{assert_same_tree, moto_endpoint, restored, unique_name, Sandbox, MOTO_ENV};

fn dynamodb_sandbox(table: &str) -> Sandbox {
    Sandbox::with_config(
        &format!(
            "environment: test\nrepository: file://repo\n\
             registry: dynamodb://{table}?region=us-east-1&endpoint={}\n\
             recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n",
            moto_endpoint()
        ),
        MOTO_ENV,
    )
}

#[test]
fn backup_list_and_restore_through_a_dynamodb_registry() {
    let table = unique_name("drctl-e2e");
    let sb = dynamodb_sandbox(&table);
    let init = sb.run(&["--json", "init"]).ok().json();
    assert_eq!(
        init[0]["registry"],
        format!(
            "dynamodb://{table}?region=us-east-1&endpoint={}",
            moto_endpoint()
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
    let table = unique_name("drctl-e2e");
    let sb = dynamodb_sandbox(&table);
    let other = unique_name("drctl-missing");
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
