//! The DR region stands alone (DESIGN.md promise 5), all on AWS services (moto): a backup to
//! S3 with the registry in DynamoDB and the file key also wrapped by a multi-region KMS key is
//! copied to a second region; then the primary region's bucket, table and KMS are made
//! unreachable, the age identity is taken away, and `restore --region` still restores it with
//! the DR region's bucket, table and replica key.

mod common;

use common::{assert_same_tree, moto, restored, Sandbox};

/// An endpoint where nothing listens.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// A multi-region KMS key in us-east-1 with a replica in us-west-2; returns its ARN.
fn multi_region_key() -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let kms = aws_sdk_kms::Client::new(&moto::sdk_config("us-east-1").await);
        let key = kms
            .create_key()
            .multi_region(true)
            .send()
            .await
            .expect("create key")
            .key_metadata
            .expect("key metadata");
        kms.replicate_key()
            .key_id(key.key_id())
            .replica_region("us-west-2")
            .send()
            .await
            .expect("replicate key");
        key.arn().expect("arn").to_owned()
    })
}

#[test]
fn restore_in_the_dr_region_needs_nothing_from_the_primary_region() {
    let key = multi_region_key();
    let moto = moto::endpoint();
    let table = moto::bucket("registry");
    let primary = moto::url(&moto::bucket("primary"), "backups", "us-east-1", "");
    let replica = moto::url(&moto::bucket("dr"), "copies", "us-west-2", "");
    let sb = Sandbox::with_config(&format!(
        "environment: test\nrepository: {primary}\n\
         registry: dynamodb://{table}?region=us-east-1&endpoint={moto}\n\
         recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n\
         kms:\n  keys: [{key}]\n  endpoints:\n    us-east-1: {moto}\n    us-west-2: {moto}\n\
         regions:\n  us-west-2:\n    registry: dynamodb://{table}?region=us-west-2&endpoint={moto}\n\
         \x20   repository: {replica}\n"
    ));
    let src = sb.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/app.conf"), b"listen: 127.0.0.1:8080\n").unwrap();
    let big: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    sb.policy(
        "tree",
        &format!(
            "name: tree\nsource:\n  kind: files\n  paths: [{:?}]\n\
             replicas:\n  - region: us-west-2\n    repository: {replica}\n",
            src.display().to_string()
        ),
    );
    let id = sb.backup("tree");
    let record = &sb.run(&["--json", "show", &id]).ok().json()[0];
    assert_eq!(
        record["manifest"]["encryption"]["kms_keys"],
        serde_json::json!([key])
    );
    let regions = Sandbox::location_regions(record);
    assert_eq!(regions, ["us-east-1", "us-west-2"], "{record}");

    // The primary region goes dark: its S3, DynamoDB and KMS endpoints are dead. The age
    // identity is not on the DR host either.
    let config = sb.path().join("drctl.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let dead = dead_endpoint();
    let (head, tail) = text.split_at(text.find("\nregions:").unwrap());
    let head = head
        .replace(&format!("endpoint={moto}"), &format!("endpoint={dead}"))
        .replace(&format!("us-east-1: {moto}"), &format!("us-east-1: {dead}"))
        .replace("identity-file: keys/identity.txt\n", "");
    std::fs::write(&config, format!("{head}{tail}")).unwrap();
    std::fs::rename(sb.identity(), sb.path().join("identity-kept-offline.txt")).unwrap();
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
}
