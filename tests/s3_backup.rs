//! End-to-end through the `drctl` binary with the repository in S3 (moto): init creates the
//! bucket, backups upload in parts, deep verification and restores read with ranged GETs.

mod common;

use std::path::Path;

use common::{assert_same_tree, moto, restored, Sandbox};

/// A small tree plus one incompressible file of `big` bytes.
pub fn tree(root: &Path, big: usize) {
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::write(
        root.join("etc/app/config.yaml"),
        b"listen: 127.0.0.1:8080\n",
    )
    .unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    let mut data = vec![0u8; big];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(root.join("big.bin"), &data).unwrap();
}

#[test]
fn s3_repository_init_backup_verify_deep_restore() {
    let bucket = moto::bucket("e2e");
    let sb = Sandbox::with_repository(&moto::url(&bucket, "backups", "us-east-1", ""), "");
    // init again is a no-op on an existing bucket.
    sb.run(&["init"]).ok();
    let src = sb.path().join("src");
    tree(&src, 12 << 20);
    sb.policy(
        "tree",
        &format!(
            "name: tree\nsource:\n  kind: files\n  paths: [{:?}]\nstorage:\n  class: STANDARD_IA\n",
            src.display().to_string()
        ),
    );
    let id = sb.backup("tree");
    assert_eq!(sb.status(&id), "completed");
    let record = &sb.run(&["--json", "show", &id]).ok().json()[0];
    assert_eq!(record["locations"][0]["region"], "us-east-1", "{record}");

    // The objects are in the bucket under the prefix, in the policy's storage class.
    let s3 = moto::client("us-east-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed = rt.block_on(async {
        s3.list_objects_v2()
            .bucket(&bucket)
            .prefix(format!("backups/test/tree/{id}/"))
            .send()
            .await
            .unwrap()
    });
    let mut names: Vec<(String, String)> = listed
        .contents()
        .iter()
        .map(|o| {
            (
                o.key().unwrap().rsplit('/').next().unwrap().to_owned(),
                o.storage_class()
                    .map(|c| c.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("data.tar.zst.age", "STANDARD_IA"),
            ("index.zst.age", "STANDARD_IA"),
            ("manifest.json", "STANDARD_IA"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );

    let v = sb.run(&["--json", "verify", &id, "--deep"]).ok().json();
    assert_eq!(v[0]["ok"], true, "{v:?}");

    let target = sb.path().join("restore");
    sb.run(&[
        "restore",
        "--policy",
        "tree",
        "--backup",
        &id,
        "--target",
        target.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&target, &src));
    assert_eq!(
        rt.block_on(moto::multipart_uploads(&s3, &bucket)),
        Vec::<String>::new()
    );
}

#[test]
fn storage_options_are_refused_for_a_local_repository() {
    let sb = Sandbox::new();
    sb.policy(
        "p",
        "name: p\nsource:\n  kind: command\n  command: [\"true\"]\nstorage:\n  class: GLACIER\n  object-lock:\n    mode: compliance\n    days: 0\n",
    );
    let run = sb.run(&["policy", "validate"]).code(2);
    for expected in [
        "storage: storage options need an s3:// repository",
        "storage.class: \"GLACIER\" is not a storage class restores can read at once",
        "storage.object-lock.days: 0 is out of range",
    ] {
        assert!(
            run.stderr.contains(expected) || run.stdout.contains(expected),
            "{expected}\n{}{}",
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn gc_aborts_a_multipart_upload_left_by_a_crashed_run() {
    let bucket = moto::bucket("gc");
    let sb = Sandbox::with_repository(&moto::url(&bucket, "backups", "us-east-1", ""), "");
    let s3 = moto::client("us-east-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = "backups/test/tree/20260101T000000Z-0badc0de/data.tar.zst.age";
    rt.block_on(async {
        s3.create_multipart_upload()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap()
    });
    let plan = sb.run(&["--json", "gc", "--dry-run"]).ok();
    assert!(
        plan.stdout
            .contains("test/tree/20260101T000000Z-0badc0de/data.tar.zst.age?uploadId="),
        "{}",
        plan.stdout
    );
    assert_eq!(
        rt.block_on(moto::multipart_uploads(&s3, &bucket)),
        vec![key]
    );
    sb.run(&["gc"]).ok();
    assert_eq!(
        rt.block_on(moto::multipart_uploads(&s3, &bucket)),
        Vec::<String>::new()
    );
}

#[test]
fn registry_rebuild_from_an_s3_bucket_restores_a_lost_registry() {
    let bucket = moto::bucket("rebuild");
    let url = moto::url(&bucket, "backups", "us-east-1", "");
    let sb = Sandbox::with_repository(&url, "");
    let src = sb.path().join("src");
    tree(&src, 64 << 10);
    sb.files_policy("tree", &[&src]);
    let id = sb.backup("tree");

    // The registry is lost; a new host rebuilds it from the bucket named on the command line.
    std::fs::remove_file(sb.path().join("registry.db")).unwrap();
    sb.run(&["list"]).code(10);
    let report = &sb
        .run(&["--json", "registry", "rebuild", "--from", &url])
        .ok()
        .json()[0];
    assert_eq!(report["added"], serde_json::json!([id]), "{report}");
    let record = &sb.run(&["--json", "show", &id]).ok().json()[0];
    assert_eq!(record["status"], "completed");
    assert_eq!(record["locations"][0]["region"], "us-east-1", "{record}");
    let target = sb.path().join("restore");
    sb.run(&[
        "restore",
        "-p",
        "tree",
        "-b",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&target, &src));
}
