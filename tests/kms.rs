//! The KMS envelope end to end, on moto (started by `scripts/moto.sh`): backups wrap the file
//! key for KMS next to the X25519 recipients; restores work with KMS alone, with the age
//! identity while KMS is down, with stock `age -d`, and in the DR region through the replica of
//! a multi-region key while the primary region's KMS is unreachable.

mod common;

use std::path::Path;
use std::process::Command;

use common::proxy::RecordingProxy;
use common::{assert_same_tree, moto, restored, Sandbox};

/// An endpoint where nothing listens: a region that is down.
const DEAD: &str = "http://127.0.0.1:9";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn kms_client(region: &str) -> aws_sdk_kms::Client {
    aws_sdk_kms::Client::new(&moto::sdk_config(region).await)
}

/// A new symmetric key in us-east-1, replicated to `replicas` (then a multi-region key).
/// Returns its ARN.
fn create_key(replicas: &[&str]) -> String {
    runtime().block_on(async {
        let client = kms_client("us-east-1").await;
        let key = client
            .create_key()
            .description("drctl test key")
            .multi_region(!replicas.is_empty())
            .send()
            .await
            .expect("create key")
            .key_metadata
            .expect("key metadata");
        for region in replicas {
            client
                .replicate_key()
                .key_id(key.key_id())
                .replica_region(*region)
                .send()
                .await
                .expect("replicate key");
        }
        key.arn().expect("arn").to_owned()
    })
}

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("etc/app")).unwrap();
    std::fs::write(
        root.join("etc/app/config.yaml"),
        b"listen: 127.0.0.1:8080\n",
    )
    .unwrap();
    let data: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(root.join("data.bin"), data).unwrap();
}

/// A sandbox whose backups also wrap for `key` (KMS in us-east-1 reached through moto),
/// with one files backup taken. Returns the sandbox, the source and the backup ID.
fn backed_up(key: &str) -> (Sandbox, std::path::PathBuf, String) {
    let sb = Sandbox::with_config(&format!(
        "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\n\
             recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n\
             kms:\n  keys: [{key}]\n  endpoints:\n    us-east-1: {}\n",
        moto::endpoint()
    ));
    let src = sb.path().join("src");
    tree(&src);
    sb.files_policy("tree", &[&src]);
    let id = sb.backup("tree");
    (sb, src, id)
}

/// Writes another settings file for the same repository and registry (a restore host):
/// `extra` adds identity and KMS settings.
fn restore_host(sb: &Sandbox, name: &str, extra: &str) -> String {
    let path = sb.path().join(name);
    std::fs::write(
        &path,
        format!(
            "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\n{extra}"
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn restore(sb: &Sandbox, config: &str, id: &str, target: &Path) -> common::Run {
    sb.run(&[
        "--config",
        config,
        "restore",
        "-p",
        "tree",
        "-b",
        id,
        "-t",
        target.to_str().unwrap(),
    ])
}

/// The recipient stanza lines (`-> TYPE ARGS`) of an age file's header.
fn stanza_lines(age_file: &Path) -> Vec<String> {
    let bytes = std::fs::read(age_file).unwrap();
    let end = bytes
        .windows(4)
        .position(|w| w == b"\n---")
        .expect("age header end");
    String::from_utf8(bytes[..end].to_vec())
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("-> "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn kms_wrapped_backup_restores_with_kms_alone_with_the_identity_and_with_stock_age() {
    let key = create_key(&[]);
    let (sb, src, id) = backed_up(&key);

    // The manifest names the key; every object's header holds its stanza next to X25519.
    let dir = sb.backup_dir("tree", &id);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["encryption"]["kms_keys"], serde_json::json!([key]));
    assert_eq!(
        manifest["encryption"]["recipients"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    for object in ["data.tar.zst.age", "index.zst.age"] {
        let stanzas = stanza_lines(&dir.join(object));
        assert!(
            stanzas.iter().any(|l| l.starts_with("-> X25519 ")),
            "{object}: {stanzas:?}"
        );
        assert!(
            stanzas.contains(&format!("-> aws-kms {key}")),
            "{object}: {stanzas:?}"
        );
    }

    let keys = sb.run(&["--json", "keys", "list"]).ok().json();
    assert_eq!(keys[0]["kms_keys"], serde_json::json!([key]));

    // KMS alone: no identity file on the restore host.
    let kms_only = restore_host(
        &sb,
        "kms-only.yaml",
        &format!("kms:\n  endpoints:\n    us-east-1: {}\n", moto::endpoint()),
    );
    let target = sb.path().join("restore-kms");
    restore(&sb, &kms_only, &id, &target).ok();
    assert_same_tree(&src, &restored(&target, &src));
    let v = sb
        .run(&["--config", &kms_only, "--json", "verify", &id, "--deep"])
        .ok()
        .json();
    assert_eq!(v[0]["ok"], true);

    // The age identity restores while KMS is unreachable.
    let identity_only = restore_host(
        &sb,
        "identity.yaml",
        &format!(
            "identity-file: {}\nkms:\n  endpoints:\n    us-east-1: {DEAD}\n",
            sb.identity().display()
        ),
    );
    let target = sb.path().join("restore-identity");
    restore(&sb, &identity_only, &id, &target).ok();
    assert_same_tree(&src, &restored(&target, &src));

    // Stock age skips the aws-kms stanza and decrypts with the X25519 identity.
    let out = sb.path().join("stock");
    std::fs::create_dir(&out).unwrap();
    let script = format!(
        "age -d -i {} {} | zstd -d -q | tar -x -p -C {}",
        sb.identity().display(),
        dir.join("data.tar.zst.age").display(),
        out.display()
    );
    let status = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .status()
        .expect("bash");
    assert!(status.success(), "stock age | zstd | tar failed");
    assert_same_tree(&src, &restored(&out, &src));
}

#[test]
fn multi_region_key_restores_through_the_dr_replica_while_the_primary_region_is_down() {
    let key = create_key(&["us-west-2"]);
    assert!(
        key.contains(":us-east-1:") && key.contains(":key/mrk-"),
        "{key}"
    );
    let (sb, src, id) = backed_up(&key);

    let dr = restore_host(
        &sb,
        "dr.yaml",
        &format!(
            "kms:\n  region: us-west-2\n  endpoints:\n    us-east-1: {DEAD}\n    us-west-2: {}\n",
            moto::endpoint()
        ),
    );
    let target = sb.path().join("restore-dr");
    restore(&sb, &dr, &id, &target).ok();
    assert_same_tree(&src, &restored(&target, &src));

    // A region without a replica cannot help, and says what it tried.
    let nowhere = restore_host(
        &sb,
        "no-replica.yaml",
        &format!(
            "kms:\n  region: eu-west-1\n  endpoints:\n    us-east-1: {DEAD}\n    eu-west-1: {}\n",
            moto::endpoint()
        ),
    );
    let target = sb.path().join("restore-nowhere");
    let run = restore(&sb, &nowhere, &id, &target);
    assert_ne!(run.code, 0, "restored without a usable key");
    let replica = key.replace(":us-east-1:", ":eu-west-1:");
    assert!(
        run.stderr.contains(&replica) && run.stderr.contains(&key),
        "{}",
        run.stderr
    );
    assert!(
        !target.exists() || std::fs::read_dir(&target).unwrap().next().is_none(),
        "a failed restore wrote into the target"
    );
}

#[test]
fn backups_only_encrypt_with_kms_and_restores_only_decrypt() {
    let key = create_key(&[]);
    let proxy = RecordingProxy::start();
    let sb = Sandbox::with_config(&format!(
        "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\n\
             recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n\
             kms:\n  keys: [{key}]\n  endpoints:\n    us-east-1: {}\n",
        proxy.url
    ));
    let src = sb.path().join("src");
    tree(&src);
    sb.files_policy("tree", &[&src]);
    let id = sb.backup("tree");
    let ops = proxy.take();
    // One file key per object: the data and the file index.
    assert_eq!(ops, ["trentservice.encrypt", "trentservice.encrypt"]);

    let kms_only = restore_host(
        &sb,
        "kms-only.yaml",
        &format!("kms:\n  endpoints:\n    us-east-1: {}\n", proxy.url),
    );
    let target = sb.path().join("restore");
    restore(&sb, &kms_only, &id, &target).ok();
    assert_same_tree(&src, &restored(&target, &src));
    assert_eq!(proxy.take(), ["trentservice.decrypt"]);
}

#[test]
fn backup_fails_cleanly_when_kms_refuses_to_encrypt() {
    let missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let sb = Sandbox::with_config(&format!(
        "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\n\
             recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n\
             kms:\n  keys: [{missing}]\n  endpoints:\n    us-east-1: {}\n",
        moto::endpoint()
    ));
    let src = sb.path().join("src");
    tree(&src);
    sb.files_policy("tree", &[&src]);
    let run = sb.run(&["backup", "--policy", "tree"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("KMS Encrypt") && run.stderr.contains(missing),
        "{}",
        run.stderr
    );
    let records = sb.records();
    assert!(
        records.iter().all(|r| r["status"] != "completed"),
        "{records:?}"
    );
}

#[test]
fn kms_settings_problems_are_reported_with_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let config = dir.path().join("drctl.yaml");
    let write = |kms: &str| {
        std::fs::write(
            &config,
            format!(
                "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\n\
                 recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n{kms}"
            ),
        )
        .unwrap()
    };
    let validate = || -> common::Run {
        Command::new(common::bin())
            .args(["--config", config.to_str().unwrap(), "policy", "validate"])
            .output()
            .unwrap()
            .into()
    };

    write(
        "kms:\n  keys: [alias/backups, 'arn:aws:kms:us-east-1:nope']\n  \
         endpoints:\n    us-east-1: ftp://kms.example\n",
    );
    let run = validate().code(2);
    for field in ["kms.keys[0]", "kms.keys[1]", "kms.endpoints.us-east-1"] {
        assert!(run.stderr.contains(field), "{field}: {}", run.stderr);
    }
    assert!(run.stderr.contains("kms.region"), "{}", run.stderr);

    write("kms:\n  keys: [alias/backups]\n  region: us-west-2\n  colour: blue\n");
    let run = validate().code(2);
    assert!(run.stderr.contains("colour"), "{}", run.stderr);

    write("kms:\n  keys: [alias/backups]\n  region: us-west-2\n");
    validate().ok();
}

#[test]
fn a_key_named_by_alias_is_recorded_by_its_arn() {
    let key = create_key(&[]);
    let alias = format!("alias/{}", moto::bucket("backups"));
    runtime().block_on(async {
        kms_client("us-east-1")
            .await
            .create_alias()
            .alias_name(&alias)
            .target_key_id(key.rsplit('/').next().unwrap())
            .send()
            .await
            .expect("create alias")
    });
    let sb = Sandbox::with_config(&format!(
        "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\n\
         recipients-file: keys/recipients.txt\nidentity-file: keys/identity.txt\n\
         kms:\n  keys: [{alias}]\n  region: us-east-1\n  endpoints:\n    us-east-1: {}\n",
        moto::endpoint()
    ));
    let src = sb.path().join("src");
    tree(&src);
    sb.files_policy("tree", &[&src]);
    let id = sb.backup("tree");
    let dir = sb.backup_dir("tree", &id);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["encryption"]["kms_keys"], serde_json::json!([key]));
    assert!(stanza_lines(&dir.join("data.tar.zst.age")).contains(&format!("-> aws-kms {key}")));
}
