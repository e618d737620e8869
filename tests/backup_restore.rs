//! End-to-end backups and restores through the `drctl` binary on the embedded default
//! (local directory, SQLite registry, generated age key).

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{assert_same_tree, output_ok, restored, Sandbox};

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn set_mtime(p: &Path, secs: i64) {
    filetime::set_symlink_file_times(
        p,
        filetime::FileTime::from_unix_time(secs, 0),
        filetime::FileTime::from_unix_time(secs, 0),
    )
    .unwrap();
}

/// A tree with everything a restore must reproduce.
fn fixture(root: &Path) {
    let d = |p: &str| {
        std::fs::create_dir_all(root.join(p)).unwrap();
    };
    let f = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    d("etc/app");
    f("etc/app/config.yaml", b"listen: 127.0.0.1:8080\n");
    f("etc/app/empty", b"");
    set_mode(&root.join("etc/app/config.yaml"), 0o640);
    f("run.sh", b"#!/bin/sh\necho hi\n");
    set_mode(&root.join("run.sh"), 0o755);
    f("secret", b"s3cr3t");
    set_mode(&root.join("secret"), 0o600);
    // Incompressible content larger than one pipeline chunk.
    let mut big = vec![0u8; 3 * 1024 * 1024 + 17];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    f("data.bin", &big);
    // Empty directories, one with an unusual mode.
    d("empty-dir");
    d("private-empty");
    set_mode(&root.join("private-empty"), 0o750);
    // Links.
    std::os::unix::fs::symlink("etc/app/config.yaml", root.join("config-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    let long_target = format!("{}/target", "t".repeat(150));
    std::os::unix::fs::symlink(&long_target, root.join("long-link")).unwrap();
    std::fs::hard_link(root.join("secret"), root.join("secret-hardlink")).unwrap();
    d("sub");
    std::fs::hard_link(root.join("data.bin"), root.join("sub/data-hardlink")).unwrap();
    // Long names: a 200-byte file name, and a path well past tar's 100-byte name field.
    let deep = format!("{}/{}/{}", "a".repeat(60), "b".repeat(60), "c".repeat(60));
    d(&deep);
    f(&format!("{deep}/{}", "n".repeat(200)), b"long name");
    // A name that is not UTF-8.
    let raw = root.join(std::ffi::OsStr::from_bytes(b"caf\xe9-\xff.txt"));
    std::fs::write(&raw, b"latin-1 name").unwrap();
    // A read-only directory with a file in it.
    d("readonly");
    f("readonly/inside", b"x");
    set_mode(&root.join("readonly"), 0o555);
    // Fixed mtimes, directories last so that creating children does not change them.
    for p in [
        "etc/app/config.yaml",
        "run.sh",
        "secret",
        "data.bin",
        "etc/app/empty",
        "readonly/inside",
    ] {
        set_mtime(&root.join(p), 1_000_000_000);
    }
    for p in [
        "etc/app",
        "etc",
        "empty-dir",
        "private-empty",
        "sub",
        "readonly",
    ] {
        set_mtime(&root.join(p), 1_100_000_000);
    }
}

#[test]
fn files_backup_restores_byte_identical_tree() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir(&src).unwrap();
    fixture(&src);
    sb.files_policy("tree", &[&src]);
    let id = sb.backup("tree");
    assert_eq!(sb.status(&id), "completed");

    let dir = sb.backup_dir("tree", &id);
    assert!(dir.join("data.tar.zst.age").is_file());
    assert!(dir.join("index.zst.age").is_file());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["backup_id"], id.as_str());
    assert_eq!(manifest["source"]["stats"]["hardlinks"], 2);
    // No file names in the plain manifest.
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(
        !text.contains("config.yaml") && !text.contains("secret"),
        "{text}"
    );

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

    // `latest` resolves to the same backup, and deep verification walks every entry.
    let target2 = sb.path().join("restore-latest");
    sb.run(&[
        "restore",
        "-p",
        "tree",
        "-b",
        "latest",
        "-t",
        target2.to_str().unwrap(),
    ])
    .ok();
    assert_same_tree(&src, &restored(&target2, &src));
    let v = sb.run(&["--json", "verify", &id, "--deep"]).ok().json();
    assert_eq!(v[0]["ok"], true);
    assert!(v[0]["entries_checked"].as_u64().unwrap() > 15);
}

#[test]
fn owners_devices_old_times_and_hard_links_survive_a_restore_and_one_over_it() {
    use std::os::unix::fs::MetadataExt;
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir_all(src.join("home/alice")).unwrap();
    std::fs::write(src.join("home/alice/notes"), b"n").unwrap();
    std::fs::write(src.join("old"), b"from 1969").unwrap();
    set_mtime(&src.join("old"), -86_400);
    std::fs::write(src.join("a"), b"linked").unwrap();
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    // As root: a home directory of another user, and a device node like /dev/null where
    // this machine lets one be made.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        std::os::unix::fs::chown(src.join("home/alice"), Some(1234), Some(1234)).unwrap();
        set_mode(&src.join("home/alice"), 0o700);
    }
    let device = Command::new("mknod")
        .arg(src.join("null"))
        .args(["c", "1", "3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    sb.files_policy("t", &[&src]);
    let id = sb.backup("t");
    let target = sb.path().join("restore");
    let restore = |more: &[&str]| {
        let t = target.to_str().unwrap();
        let args = [
            &["restore", "-p", "t", "-b", &id, "-t", t, "--allow-special"][..],
            more,
        ]
        .concat();
        sb.run(&args).ok();
    };
    let check = || {
        let r = restored(&target, &src);
        let meta = |p: &str| std::fs::symlink_metadata(r.join(p)).unwrap();
        // A time before 1970 is kept as 1970 (a tar header's time has no sign).
        assert_eq!(meta("old").mtime(), 0);
        assert_eq!(meta("a").ino(), meta("b").ino(), "hard links");
        if root {
            let alice = meta("home/alice");
            assert_eq!(
                (alice.uid(), alice.gid(), alice.mode() & 0o7777),
                (1234, 1234, 0o700)
            );
        }
        if device {
            assert_eq!(meta("null").rdev(), libc::makedev(1, 3));
        }
    };
    restore(&[]);
    check();
    // Again over the first restore: every name, hard links included, is replaced (a file
    // through one written beside it and renamed, which leaves nothing behind).
    let before = std::fs::symlink_metadata(restored(&target, &src).join("old")).unwrap();
    restore(&["--overwrite"]);
    check();
    let after = std::fs::symlink_metadata(restored(&target, &src).join("old")).unwrap();
    assert_ne!(before.ino(), after.ino(), "replaced by a new file");
    let names: Vec<String> = std::fs::read_dir(restored(&target, &src))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with(".drctl")), "{names:?}");
}

#[test]
fn a_source_path_that_is_a_symlink_is_archived_as_one_and_says_so() {
    let sb = Sandbox::new();
    let real = sb.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("f"), b"f").unwrap();
    let link = sb.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    sb.files_policy("l", &[&link]);
    let run = sb.run(&["--json", "backup", "--policy", "l"]).ok();
    assert!(
        run.stderr.contains("source path is a symlink"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.json()[0]["source"]["stats"]["symlinks"],
        1,
        "{}",
        run.stdout
    );
}

#[test]
fn stock_age_zstd_tar_restore_the_backup_without_drctl() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir(&src).unwrap();
    fixture(&src);
    sb.files_policy("tree", &[&src]);
    let id = sb.backup("tree");
    let data = sb.backup_dir("tree", &id).join("data.tar.zst.age");
    let out = sb.path().join("stock");
    std::fs::create_dir(&out).unwrap();
    let script = format!(
        "age -d -i {} {} | zstd -d -q | tar -x -p -C {}",
        sb.identity().display(),
        data.display(),
        out.display()
    );
    let status = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .status()
        .expect("bash");
    assert!(
        status.success(),
        "stock pipeline failed (are age and zstd installed? run scripts/install-deps.sh)"
    );
    assert_same_tree(&src, &restored(&out, &src));
}

#[test]
fn command_output_round_trips_through_stdout_and_stock_tools() {
    let sb = Sandbox::new();
    let payload = sb.path().join("payload.bin");
    let data: Vec<u8> = (0..2_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&payload, &data).unwrap();
    sb.command_policy("dump", &["cat", payload.to_str().unwrap()], "bin");
    let id = sb.backup("dump");
    let object = sb.backup_dir("dump", &id).join("data.bin.zst.age");
    assert!(object.is_file());

    let out = output_ok(
        sb.cmd(&["restore", "--policy", "dump", "--backup", &id, "--stdout"])
            .stdout(Stdio::piped()),
    );
    assert!(out.stdout == data, "restored stream differs");

    let target = sb.path().join("t");
    sb.run(&[
        "restore",
        "--policy",
        "dump",
        "--backup",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ])
    .ok();
    assert!(std::fs::read(target.join("data.bin")).unwrap() == data);

    let stock = Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            &format!(
                "age -d -i {} {} | zstd -d -q",
                sb.identity().display(),
                object.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(stock.status.success());
    assert!(stock.stdout == data);
}

#[test]
fn failing_command_yields_failed_backup_with_its_stderr() {
    let sb = Sandbox::new();
    sb.command_policy(
        "bad",
        &[
            "sh",
            "-c",
            "echo partial; echo 'pg_dump: connection refused' >&2; exit 3",
        ],
        "stream",
    );
    let run = sb.run(&["backup", "--policy", "bad"]).code(1);
    assert!(
        run.stderr.contains("exited with status 3"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("pg_dump: connection refused"),
        "{}",
        run.stderr
    );

    sb.command_policy(
        "killed",
        &["sh", "-c", "echo partial; kill -9 $$"],
        "stream",
    );
    let run = sb.run(&["backup", "--policy", "killed"]).code(1);
    assert!(run.stderr.contains("killed by signal 9"), "{}", run.stderr);

    sb.command_policy("missing", &["/nonexistent/dump-tool"], "stream");
    let run = sb.run(&["backup", "--policy", "missing"]).code(1);
    assert!(
        run.stderr.contains("cannot run `/nonexistent/dump-tool`"),
        "{}",
        run.stderr
    );

    let records = sb.records();
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r["status"], "failed", "{r}");
        assert!(r["manifest"].is_null());
        // No data object is left behind for a failed backup.
        let dir = sb.backup_dir(
            r["policy"].as_str().unwrap(),
            r["backup_id"].as_str().unwrap(),
        );
        assert!(
            !dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(),
            "{}",
            dir.display()
        );
    }
    assert!(sb
        .run(&["restore", "-p", "bad", "-b", "latest", "--stdout"])
        .code(10)
        .stderr
        .contains("no completed backup"));
}

#[test]
fn restore_into_non_empty_target_needs_overwrite() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), b"new").unwrap();
    sb.files_policy("p", &[&src]);
    sb.backup("p");
    let target = sb.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"existing").unwrap();
    let t = target.to_str().unwrap();
    let run = sb
        .run(&["restore", "-p", "p", "-b", "latest", "-t", t])
        .code(2);
    assert!(
        run.stderr.contains("not empty") && run.stderr.contains("--overwrite"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);
    sb.run(&["restore", "-p", "p", "-b", "latest", "-t", t, "--overwrite"])
        .ok();
    assert_eq!(
        std::fs::read(restored(&target, &src).join("a")).unwrap(),
        b"new"
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"existing");
}

#[test]
fn dry_run_restore_prints_plan_and_writes_nothing() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), b"1").unwrap();
    sb.files_policy("p", &[&src]);
    let id = sb.backup("p");
    let target = sb.path().join("target");
    let plan = sb
        .run(&[
            "--json",
            "restore",
            "-p",
            "p",
            "-b",
            "latest",
            "-t",
            target.to_str().unwrap(),
            "--dry-run",
        ])
        .ok()
        .json();
    assert_eq!(plan[0]["message_type"], "restore_plan");
    assert_eq!(plan[0]["backup_id"], id.as_str());
    assert_eq!(plan[0]["unpack"], true);
    assert!(!target.exists());
}

#[test]
fn excludes_leave_matching_files_out() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir_all(src.join("cache/deep")).unwrap();
    std::fs::write(src.join("keep.txt"), b"k").unwrap();
    std::fs::write(src.join("drop.tmp"), b"d").unwrap();
    std::fs::write(src.join("cache/deep/x"), b"x").unwrap();
    std::fs::write(src.join("cache/keep.tmpx"), b"y").unwrap();
    sb.policy(
        "ex",
        &format!(
            "name: ex\nsource:\n  kind: files\n  paths: [{:?}]\n  exclude: [\"*.tmp\", \"{}/cache/deep\"]\n",
            src.display().to_string(),
            src.display()
        ),
    );
    sb.backup("ex");
    let target = sb.path().join("t");
    sb.run(&[
        "restore",
        "-p",
        "ex",
        "-b",
        "latest",
        "-t",
        target.to_str().unwrap(),
    ])
    .ok();
    let r = restored(&target, &src);
    assert!(r.join("keep.txt").exists());
    assert!(r.join("cache/keep.tmpx").exists());
    assert!(!r.join("drop.tmp").exists());
    assert!(!r.join("cache/deep").exists());
}

#[test]
fn list_and_show_print_json_records() {
    let sb = Sandbox::new();
    sb.command_policy("c", &["echo", "hello"], "txt");
    let first = sb.backup("c");
    let second = sb.backup("c");
    let list = sb.records();
    assert_eq!(list.len(), 2);
    assert!(list
        .iter()
        .all(|r| r["message_type"] == "backup" && r["status"] == "completed"));
    // Newest first.
    assert_eq!(list[0]["backup_id"], second.as_str());
    assert_eq!(list[1]["backup_id"], first.as_str());
    let page = sb
        .run(&["--json", "list", "--limit", "1", "--before", &second])
        .ok()
        .json();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["backup_id"], first.as_str());
    let shown = sb.run(&["--json", "show", &first]).ok().json();
    assert_eq!(shown[0]["manifest"]["objects"][0]["plain_size"], 6);
    assert_eq!(
        shown[0]["manifest"]["objects"][0]["name"],
        "data.txt.zst.age"
    );
    let text = sb.run(&["list"]).ok().stdout;
    assert!(
        text.contains(&first) && text.contains("completed"),
        "{text}"
    );
}

#[test]
fn init_never_overwrites_a_key() {
    let sb = Sandbox::new();
    let before = std::fs::read(sb.identity()).unwrap();
    assert_eq!(
        std::fs::metadata(sb.identity())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    sb.run(&["init"]).ok();
    assert_eq!(std::fs::read(sb.identity()).unwrap(), before);
    let recipients = std::fs::read_to_string(sb.path().join("keys/recipients.txt")).unwrap();
    assert_eq!(recipients.lines().count(), 1, "{recipients}");
    let run = sb
        .run(&[
            "keys",
            "generate",
            "--output",
            sb.identity().to_str().unwrap(),
        ])
        .code(2);
    assert!(run.stderr.contains("never overwrites"), "{}", run.stderr);
    assert_eq!(std::fs::read(sb.identity()).unwrap(), before);
    let keys = sb.run(&["--json", "keys", "list"]).ok().json();
    assert_eq!(keys[0]["recipients"][0], recipients.trim());
    assert_eq!(keys[0]["identity_public_keys"][0], recipients.trim());
}

#[test]
fn commands_before_init_say_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("drctl.yaml"),
        "environment: test\nrepository: file://repo\nregistry: sqlite://registry.db\nrecipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n",
    )
    .unwrap();
    let run: common::Run = Command::new(common::bin())
        .args(["list"])
        .env("DRCTL_CONFIG", dir.path().join("drctl.yaml"))
        .output()
        .unwrap()
        .into();
    let run = run.code(10);
    assert!(run.stderr.contains("drctl init"), "{}", run.stderr);
    let run: common::Run = Command::new(common::bin())
        .args(["list"])
        .env("DRCTL_CONFIG", dir.path().join("missing.yaml"))
        .output()
        .unwrap()
        .into();
    assert!(run.code(10).stderr.contains("not found"));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let sb = Sandbox::new();
    for args in [&["list"][..], &["--json", "list"], &["policy", "validate"]] {
        let mut child = sb
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the reading end before drctl writes, as `drctl list | head -0` would.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}
