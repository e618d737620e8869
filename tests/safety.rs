//! What bad input and damaged data get: refusals with clear errors and documented exit codes,
//! and nothing written outside the restore target.

mod common;

use std::path::Path;

use common::Sandbox;

/// One raw ustar entry, so that tests can build archives no well-behaved writer would.
fn tar_entry(name: &[u8], typeflag: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Backs up `tar` as a tar artifact (via a command source) and tries to restore it.
fn restore_archive(sb: &Sandbox, name: &str, tar: Vec<u8>, extra: &[&str]) -> common::Run {
    let file = sb.path().join(format!("{name}.tar"));
    std::fs::write(&file, tar).unwrap();
    sb.command_policy(name, &["cat", file.to_str().unwrap()], "tar");
    sb.backup(name);
    let target = sb.path().join(format!("target-{name}"));
    let mut args = vec![
        "restore",
        "-p",
        name,
        "-b",
        "latest",
        "-t",
        target.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sb.run(&args)
}

fn outside_is_untouched(outside: &Path) {
    let names: Vec<_> = std::fs::read_dir(outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("sentinel")],
        "something was written outside the target"
    );
    assert_eq!(
        std::fs::read(outside.join("sentinel")).unwrap(),
        b"original"
    );
}

fn sandbox_with_outside() -> (Sandbox, std::path::PathBuf) {
    let sb = Sandbox::new();
    let outside = sb.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"original").unwrap();
    (sb, outside)
}

#[test]
fn restore_refuses_entry_with_parent_components() {
    let (sb, outside) = sandbox_with_outside();
    let tar = archive(&[
        tar_entry(b"ok.txt", b'0', b"", b"fine"),
        tar_entry(b"../outside/pwned", b'0', b"", b"evil"),
    ]);
    let run = restore_archive(&sb, "dotdot", tar, &[]).code(4);
    assert!(
        run.stderr.contains("../outside/pwned") && run.stderr.contains(".."),
        "{}",
        run.stderr
    );
    outside_is_untouched(&outside);
}

#[test]
fn restore_refuses_absolute_entry() {
    let (sb, outside) = sandbox_with_outside();
    let abs = format!("{}/pwned", outside.display());
    let tar = archive(&[tar_entry(abs.as_bytes(), b'0', b"", b"evil")]);
    let run = restore_archive(&sb, "absolute", tar, &[]).code(4);
    assert!(run.stderr.contains("absolute path"), "{}", run.stderr);
    outside_is_untouched(&outside);
}

#[test]
fn restore_refuses_write_through_symlink() {
    let (sb, outside) = sandbox_with_outside();
    let tar = archive(&[
        tar_entry(b"link", b'2', outside.to_str().unwrap().as_bytes(), b""),
        tar_entry(b"link/pwned", b'0', b"", b"evil"),
    ]);
    let run = restore_archive(&sb, "through", tar, &[]).code(4);
    assert!(
        run.stderr.contains("link/pwned") && run.stderr.contains("symlink"),
        "{}",
        run.stderr
    );
    outside_is_untouched(&outside);
}

#[test]
fn restore_refuses_write_through_symlink_already_in_target() {
    let (sb, outside) = sandbox_with_outside();
    let target = sb.path().join("target-planted");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("dir")).unwrap();
    let tar = archive(&[tar_entry(b"dir/pwned", b'0', b"", b"evil")]);
    let run = restore_archive(&sb, "planted", tar, &["--overwrite"]).code(4);
    assert!(
        run.stderr.contains("dir") && run.stderr.contains("not a directory"),
        "{}",
        run.stderr
    );
    outside_is_untouched(&outside);
}

#[test]
fn restore_refuses_hard_link_out_of_target() {
    let (sb, outside) = sandbox_with_outside();
    let rel = archive(&[tar_entry(b"h", b'1', b"../outside/sentinel", b"")]);
    let run = restore_archive(&sb, "hardrel", rel, &[]).code(4);
    assert!(run.stderr.contains("hard link target"), "{}", run.stderr);
    let abs = archive(&[tar_entry(
        b"h",
        b'1',
        format!("{}/sentinel", outside.display()).as_bytes(),
        b"",
    )]);
    let run = restore_archive(&sb, "hardabs", abs, &[]).code(4);
    assert!(run.stderr.contains("hard link target"), "{}", run.stderr);
    outside_is_untouched(&outside);
}

#[test]
fn restore_refuses_device_files_unless_asked() {
    let sb = Sandbox::new();
    let tar = archive(&[tar_entry(b"fifo", b'6', b"", b"")]);
    let run = restore_archive(&sb, "special", tar, &[]).code(2);
    assert!(run.stderr.contains("--allow-special"), "{}", run.stderr);
    let target = sb.path().join("target-special2");
    sb.run(&[
        "restore",
        "-p",
        "special",
        "-b",
        "latest",
        "-t",
        target.to_str().unwrap(),
        "--allow-special",
    ])
    .ok();
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(target.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

/// A completed files backup to damage.
fn backed_up() -> (Sandbox, String, std::path::PathBuf) {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(src.join("blob"), data).unwrap();
    std::fs::write(src.join("small"), b"small").unwrap();
    sb.files_policy("p", &[&src]);
    let id = sb.backup("p");
    let dir = sb.backup_dir("p", &id);
    (sb, id, dir)
}

fn assert_names(run: &common::Run, id: &str, object: &str) {
    assert!(
        run.stderr.contains(id),
        "error does not name the backup: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(object),
        "error does not name the object: {}",
        run.stderr
    );
}

#[test]
fn tampered_object_fails_verify_and_restore() {
    let (sb, id, dir) = backed_up();
    let object = dir.join("data.tar.zst.age");
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();
    assert_names(&sb.run(&["verify", &id]).code(4), &id, "data.tar.zst.age");
    assert_names(
        &sb.run(&["verify", &id, "--deep"]).code(4),
        &id,
        "data.tar.zst.age",
    );
    let target = sb.path().join("t");
    assert_names(
        &sb.run(&[
            "restore",
            "-p",
            "p",
            "-b",
            &id,
            "-t",
            target.to_str().unwrap(),
        ])
        .code(4),
        &id,
        "data.tar.zst.age",
    );
    // The failed verification is recorded.
    let shown = sb.run(&["--json", "show", &id]).ok().json();
    assert_eq!(shown[0]["last_verification"]["ok"], false);
}

#[test]
fn truncated_object_fails_verify_and_restore() {
    let (sb, id, dir) = backed_up();
    let object = dir.join("data.tar.zst.age");
    let bytes = std::fs::read(&object).unwrap();
    std::fs::write(&object, &bytes[..bytes.len() - 100]).unwrap();
    assert_names(&sb.run(&["verify", &id]).code(4), &id, "data.tar.zst.age");
    let target = sb.path().join("t");
    let run = sb
        .run(&[
            "restore",
            "-p",
            "p",
            "-b",
            &id,
            "-t",
            target.to_str().unwrap(),
        ])
        .code(4);
    assert_names(&run, &id, "data.tar.zst.age");
}

#[test]
fn missing_objects_fail_verify_and_restore() {
    let (sb, id, dir) = backed_up();
    std::fs::remove_file(dir.join("index.zst.age")).unwrap();
    let run = sb.run(&["verify", &id]).code(4);
    assert_names(&run, &id, "index.zst.age");
    assert!(run.stderr.contains("missing"), "{}", run.stderr);
    std::fs::remove_file(dir.join("data.tar.zst.age")).unwrap();
    let target = sb.path().join("t");
    let run = sb
        .run(&[
            "restore",
            "-p",
            "p",
            "-b",
            &id,
            "-t",
            target.to_str().unwrap(),
        ])
        .code(4);
    assert_names(&run, &id, "data.tar.zst.age");
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none());
}

#[test]
fn tampered_manifest_fails_verify() {
    let (sb, id, dir) = backed_up();
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"full\"", "\"incremental\"");
    std::fs::write(&path, text).unwrap();
    assert_names(&sb.run(&["verify", &id]).code(4), &id, "manifest.json");
}

#[test]
fn verify_all_reports_partial_failure() {
    let (sb, id, dir) = backed_up();
    let good = sb.backup("p");
    let object = dir.join("data.tar.zst.age");
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[200] ^= 0xff;
    std::fs::write(&object, &bytes).unwrap();
    let run = sb.run(&["--json", "verify", "--all"]).code(3);
    let lines = run.json();
    let ok: Vec<_> = lines
        .iter()
        .filter(|l| l["message_type"] == "verify" && l["ok"] == true)
        .collect();
    let bad: Vec<_> = lines
        .iter()
        .filter(|l| l["message_type"] == "verify" && l["ok"] == false)
        .collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0]["backup_id"], good.as_str());
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["backup_id"], id.as_str());
    assert_eq!(bad[0]["error_kind"], "integrity");
    let error = lines
        .iter()
        .find(|l| l["message_type"] == "error")
        .expect("error line");
    assert_eq!(error["exit_code"], 3);
}

#[test]
fn wrong_identity_gets_its_own_exit_code_and_names_recipients() {
    let (sb, id, _) = backed_up();
    let other = sb.path().join("other.txt");
    sb.run(&["keys", "generate", "-o", other.to_str().unwrap()])
        .ok();
    let recipient = std::fs::read_to_string(sb.path().join("keys/recipients.txt")).unwrap();
    let target = sb.path().join("t");
    let run = sb
        .run(&[
            "restore",
            "-p",
            "p",
            "-b",
            &id,
            "-t",
            target.to_str().unwrap(),
            "--identity",
            other.to_str().unwrap(),
        ])
        .code(12);
    assert!(run.stderr.contains(recipient.trim()), "{}", run.stderr);
    assert!(!target.exists());
    sb.run(&[
        "verify",
        &id,
        "--deep",
        "--identity",
        other.to_str().unwrap(),
    ])
    .code(12);
}

#[test]
fn malformed_backup_ids_are_rejected_before_lookup() {
    let sb = Sandbox::new();
    for bad in [
        "../../etc/passwd",
        "20260101T000000Z-ABCDEF12",
        "x' OR '1'='1",
        "20260101T000000Z-0123456",
    ] {
        let run = sb.run(&["show", bad]).code(2);
        assert!(run.stderr.contains("malformed backup ID"), "{}", run.stderr);
        sb.run(&["verify", bad]).code(2);
        sb.run(&["restore", "-p", "p", "-b", bad, "--stdout"])
            .code(2);
    }
    sb.run(&["show", "20260101T000000Z-0123abcd"]).code(10);
}

#[test]
fn policy_validate_reports_every_problem_with_file_and_field() {
    let sb = Sandbox::new();
    sb.policy("one", "name: one\nsource:\n  kind: files\n  paths: [/tmp]\n  exclude: [\"[\"]\nretention:\n  keep-daily: 7\n  keep-forever: true\n");
    sb.policy("two", "name: other\nsource:\n  kind: command\n  command: []\nschedule:\n  full: \"every day\"\ncompression:\n  level: 40\n");
    sb.policy("three", "name: three\nsorce:\n  kind: files\n");
    sb.policy("four", "name: four\nsource:\n  kind: tape\n");
    let run = sb.run(&["policy", "validate"]).code(2);
    let e = &run.stderr;
    for expected in [
        "one.yaml: source.exclude[0]: invalid glob",
        "one.yaml: retention.keep-forever: unknown field",
        "two.yaml: name: name \"other\" must match the file name",
        "two.yaml: source.command: the command",
        "two.yaml: schedule.full: invalid cron expression",
        "two.yaml: compression.level: 40 is out of range",
        "three.yaml: sorce: unknown key",
        "three.yaml: source: required key is missing",
        "four.yaml: source",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    let json = sb.run(&["--json", "policy", "validate"]).code(2).json();
    assert_eq!(json[0]["ok"], false);
    assert!(json[0]["problems"].as_array().unwrap().len() >= 9);

    std::fs::write(sb.path().join("drctl.yaml"), "environment: Bad Env\nrepository: ftp://x\nregistry: sqlite://r.db\nrecipients: [nope]\ncolour: blue\n").unwrap();
    let e = sb.run(&["policy", "validate"]).code(2).stderr;
    for expected in [
        "colour: unknown key",
        "environment: invalid name",
        "repository: unsupported repository URL",
        "recipients[0]: not an age X25519 recipient",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
}

#[test]
fn production_environment_needs_confirm_for_destructive_commands() {
    let sb = Sandbox::with_settings("production: true\n");
    sb.command_policy("c", &["echo", "x"], "txt");
    sb.backup("c");
    let target = sb.path().join("t");
    let t = target.to_str().unwrap();
    let run = sb
        .run(&["restore", "-p", "c", "-b", "latest", "-t", t])
        .code(2);
    assert!(run.stderr.contains("--confirm"), "{}", run.stderr);
    assert!(!target.exists());
    sb.run(&["restore", "-p", "c", "-b", "latest", "-t", t, "--dry-run"])
        .ok();
    sb.run(&["restore", "-p", "c", "-b", "latest", "-t", t, "--confirm"])
        .ok();
    sb.run(&["gc"]).code(2);
    sb.run(&["gc", "--dry-run"]).ok();
    sb.run(&["gc", "--confirm"]).ok();
}

#[test]
fn database_restore_options_are_checked_before_anything_is_read() {
    let (sb, id, _) = backed_up();
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore", "-p", "p", "-b", id.as_str()];
        args.extend_from_slice(extra);
        sb.run(&args).code(2)
    };
    for url in [
        "postgres://app:hunter2@127.0.0.1/app",
        "postgres://app@127.0.0.1/app?password=hunter2",
    ] {
        let run = restore(&["--to-database", url]);
        assert!(
            run.stderr.contains("must not carry a password"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    }
    for option in [&["--replay-anyway"][..], &["--maintenance-work-mem", "1GB"]] {
        let run = restore(&[&["--target", "t"][..], option].concat());
        assert!(
            run.stderr.contains("are for restores with --to-database"),
            "{}",
            run.stderr
        );
    }
    let run = restore(&["--target", "t", "--until", "yesterday"]);
    assert!(
        run.stderr.contains("not an RFC 3339 time"),
        "{}",
        run.stderr
    );
    let run = restore(&["--target", "t", "--lsn", "16/xyz"]);
    assert!(
        run.stderr.contains("not a log sequence number"),
        "{}",
        run.stderr
    );
    let run = restore(&["--to-database", "postgres://127.0.0.1/app"]);
    assert!(run.stderr.contains("is a files backup"), "{}", run.stderr);
    let run = restore(&["--target", "t", "--until", "2026-01-01T00:00:00Z"]);
    assert!(run.stderr.contains("is a files backup"), "{}", run.stderr);
    assert!(!sb.path().join("t").exists());
}
