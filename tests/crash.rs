//! Concurrency and crashes: two backups of one policy never interleave, and a backup killed
//! with SIGKILL at any point leaves no completed record; the next run succeeds and `gc` finds
//! what the crash left.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Sandbox;

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn running(sb: &Sandbox) -> Vec<serde_json::Value> {
    sb.run(&["--json", "list", "--status", "running"])
        .ok()
        .json()
}

#[test]
fn second_backup_of_a_policy_refuses_or_waits_for_the_lease() {
    let sb = Sandbox::new();
    let gate = sb.path().join("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo first",
        gate.display()
    );
    sb.command_policy("slow", &["sh", "-c", &script], "txt");
    let first = sb
        .cmd(&["--json", "backup", "-p", "slow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first backup to start", || running(&sb).len() == 1);

    let refused = sb.run(&["backup", "-p", "slow"]).code(11);
    assert!(
        refused.stderr.contains("set/test/slow") && refused.stderr.contains("--wait"),
        "{}",
        refused.stderr
    );

    let waiting = sb
        .cmd(&["--json", "backup", "-p", "slow", "--wait", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Still only the first run is registered: the waiting one has not started.
    assert_eq!(running(&sb).len(), 1);
    std::fs::write(&gate, b"").unwrap();
    let first: common::Run = first.wait_with_output().unwrap().into();
    let second: common::Run = waiting.wait_with_output().unwrap().into();
    let (first, second) = (first.ok(), second.ok());
    let (a, b) = (&first.json()[0], &second.json()[0]);
    assert!(
        a["finished_at"].as_str().unwrap() <= b["started_at"].as_str().unwrap(),
        "runs interleaved: {a} {b}"
    );

    let records = sb.records();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["status"] == "completed"));
    // A run from another policy is not blocked.
    sb.command_policy("other", &["echo", "x"], "txt");
    sb.backup("other");
}

#[test]
fn killed_backup_leaves_no_completed_record_and_next_run_succeeds() {
    let sb = Sandbox::new();
    let release = sb.path().join("release");
    // Streams several MiB, then stalls until released: the kill lands mid-upload.
    let script = format!(
        "head -c 40000000 /dev/urandom; while [ ! -e {} ]; do sleep 0.05; done; echo tail",
        release.display()
    );
    sb.command_policy("crashy", &["sh", "-c", &script], "bin");
    let mut child = sb
        .cmd(&["backup", "-p", "crashy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_for("data to be written", || {
        running(&sb).first().is_some_and(|r| {
            let dir = sb.backup_dir("crashy", r["backup_id"].as_str().unwrap());
            std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.metadata().unwrap().len() > 1_000_000)
                })
                .unwrap_or(false)
        })
    });
    let crashed = running(&sb)[0]["backup_id"].as_str().unwrap().to_owned();
    // SIGKILL the whole process group (drctl and its command).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    child.wait().unwrap();

    // No completed record, nothing restorable.
    assert_eq!(sb.status(&crashed), "running");
    sb.run(&["restore", "-p", "crashy", "-b", "latest", "--stdout"])
        .code(10);

    // gc sees the abandoned run and its interrupted write.
    let plan = sb.run(&["--json", "gc", "--dry-run"]).ok().json();
    let items = plan[0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{plan:?}");
    assert_eq!(items[0]["backup_id"], crashed.as_str());
    assert_eq!(items[0]["reason"], "abandoned");
    assert!(
        !plan[0]["leftovers"].as_array().unwrap().is_empty(),
        "{plan:?}"
    );
    // A dry run changes nothing.
    assert_eq!(sb.status(&crashed), "running");

    // The next run takes over the dead holder's lease and completes.
    std::fs::write(&release, b"").unwrap();
    let next = sb.backup("crashy");
    assert_eq!(sb.status(&next), "completed");

    sb.run(&["gc"]).ok();
    sb.run(&["show", &crashed]).code(10);
    assert!(!sb.backup_dir("crashy", &crashed).exists());
    assert_eq!(
        sb.run(&["--json", "gc", "--dry-run"]).ok().json()[0]["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    sb.run(&["verify", "--all", "--deep"]).ok();
}

#[test]
fn kill_at_any_point_never_leaves_a_completed_record_for_a_partial_backup() {
    let sb = Sandbox::new();
    let src = sb.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..200 {
        std::fs::write(src.join(format!("f{i}")), vec![i as u8; 20_000 + i * 311]).unwrap();
    }
    sb.files_policy("tree", &[&src]);
    // Kill after increasing delays; whatever was completed must verify deeply.
    for delay_ms in [0u64, 5, 20, 60, 150, 400] {
        let mut child = sb
            .cmd(&["backup", "-p", "tree"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        child.wait().unwrap();
    }
    for r in sb.records() {
        if r["status"] == "completed" {
            sb.run(&["verify", r["backup_id"].as_str().unwrap(), "--deep"])
                .ok();
        } else {
            assert_eq!(r["status"], "running", "{r}");
        }
    }
    sb.run(&["gc"]).ok();
    assert!(sb.records().iter().all(|r| r["status"] == "completed"));
    let id = sb.backup("tree");
    sb.run(&["verify", &id, "--deep"]).ok();
}

#[test]
fn gc_leaves_a_wal_push_in_flight_alone() {
    let sb = Sandbox::new();
    sb.policy(
        "pgwal",
        "name: pgwal\nsource:\n  kind: postgres\n  mode: physical\n  url: postgres://postgres@127.0.0.1:5432/postgres\n",
    );
    // A WAL file that the push reads only once this test writes it.
    let dir = sb.path().join("pg_wal");
    std::fs::create_dir(&dir).unwrap();
    let wal = dir.join("000000010000000000000001");
    let fifo = std::ffi::CString::new(wal.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let push = sb
        .cmd(&[
            "--json",
            "wal",
            "push",
            "--policy",
            "pgwal",
            wal.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the push to start", || running(&sb).len() == 1);

    // The record of a push on another host that stopped without finishing it: the lease is
    // now this push's, so that record is abandoned.
    let stale = "20200101T000000Z-0000dead";
    let live = &running(&sb)[0];
    let inserted = std::process::Command::new("sqlite3")
        .arg(sb.path().join("registry.db"))
        .arg(format!(
            "INSERT INTO backups (backup_id, environment, policy, status, backup_type, \
             source_kind, started_at, holder) VALUES ('{stale}', '{}', 'pgwal', 'running', \
             'incremental', 'postgres', '2020-01-01T00:00:00.000000Z', 'another-host:4242:1')",
            live["environment"].as_str().unwrap()
        ))
        .status()
        .unwrap();
    assert!(inserted.success());

    // The push holds the policy's WAL lease, not its set's: gc must not take it for abandoned.
    let plan = sb.run(&["--json", "gc", "--dry-run"]).ok().json();
    let items = plan[0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{plan:?}");
    assert_eq!(items[0]["backup_id"], stale, "{plan:?}");
    assert_eq!(items[0]["reason"], "abandoned", "{plan:?}");
    sb.run(&["gc"]).ok();
    assert_eq!(running(&sb).len(), 1);
    assert_eq!(running(&sb)[0]["backup_id"], live["backup_id"]);

    std::fs::write(
        &wal,
        common::wal_segment("000000010000000000000001", 16 << 20, 7),
    )
    .unwrap();
    let pushed: common::Run = push.wait_with_output().unwrap().into();
    let pushed = pushed.ok();
    assert_eq!(pushed.json()[0]["already_archived"], false);
    let records = sb.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], "completed");
}
