//! MariaDB backups and restores against real servers: each test starts its own scratch
//! `mariadbd` (binary logging on, ROW format) in a temporary directory on a free port, so the
//! tests need the MariaDB server and client packages (scripts/install-deps.sh) but no running
//! server, and never touch one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{file_contents, Sandbox};

/// A scratch MariaDB server, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    assert!(
        found,
        "`{tool}` is not installed: run scripts/install-deps.sh (MariaDB server and client)"
    );
}

fn mariadbd() -> PathBuf {
    need("mariadbd");
    ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mariadbd"))
}

fn user_args() -> Vec<String> {
    // mariadbd refuses to run as root unless told to.
    if unsafe { libc::geteuid() } == 0 {
        vec!["--user=root".into()]
    } else {
        Vec::new()
    }
}

/// A data directory made by mariadb-install-db once per MariaDB version (kept in the temporary
/// directory across runs), copied by each server.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        need("mariadb-install-db");
        let version = Command::new(mariadbd())
            .arg("--version")
            .output()
            .expect("run mariadbd --version");
        let version: String = String::from_utf8_lossy(&version.stdout)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let fixed = std::env::temp_dir().join(format!(
            "drctl-mariadb-template-{}",
            version.trim_matches('-')
        ));
        if fixed.join("data/mysql").is_dir() {
            return fixed.join("data");
        }
        let staging = tempfile::Builder::new()
            .prefix("drctl-mariadb-staging-")
            .tempdir()
            .unwrap();
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal"])
            .args(["--skip-test-db", "--skip-name-resolve"])
            .arg(format!(
                "--datadir={}",
                staging.path().join("data").display()
            ))
            .args(user_args())
            .args(SERVER_OPTIONS)
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Another test process may have won the race; its template is as good.
        let staging = staging.keep();
        if std::fs::rename(&staging, &fixed).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        fixed.join("data")
    })
}

/// Small InnoDB files: every server copies the template.
const SERVER_OPTIONS: &[&str] = &[
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    fn start() -> Server {
        let template = template();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success());
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("mariadbd.log")).unwrap();
        let child = Command::new(mariadbd())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            // Its own temporary files, apart from every other process's in /tmp.
            .arg(format!("--tmpdir={}", dir.path().display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--log-bin={}", data.join("binlog").display()))
            .args([
                "--server-id=1",
                "--binlog-format=ROW",
                // As production servers with GTID replication run: a replay that wrote the
                // source's GTIDs again would be refused as out of order.
                "--gtid-strict-mode=ON",
                // Rows larger than the clients' default packet (16 MiB) can be written.
                "--max-allowed-packet=64M",
                "--skip-name-resolve",
            ])
            .args(SERVER_OPTIONS)
            .args(user_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mariadbd");
        let server = Server { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ok = server
                .client(None)
                .args(["-e", "SELECT 1"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start: {}",
                std::fs::read_to_string(server.dir.path().join("mariadbd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client(&self, db: Option<&str>) -> Command {
        let mut c = Command::new("mariadb");
        c.args(["--host=127.0.0.1", "--protocol=TCP", "--user=root"])
            .arg(format!("--port={}", self.port))
            .args(["--batch", "--skip-column-names"])
            .env_remove("MYSQL_PWD");
        if let Some(db) = db {
            c.arg(format!("--database={db}"));
        }
        c
    }

    /// Runs SQL; returns stdout. Panics on failure.
    fn sql(&self, db: Option<&str>, sql: &str) -> String {
        let out = self.client(db).args(["-e", sql]).output().unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn url(&self, user: &str, db: &str) -> String {
        format!("mysql://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// A policy `name` over database `db` as root.
    fn policy(&self, sandbox: &Sandbox, name: &str, db: &str) {
        sandbox.policy(
            name,
            &format!(
                "name: {name}\nsource:\n  kind: mysql\n  url: {}\n",
                self.url("root", db)
            ),
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database with a table of varied rows (quotes, parentheses, semicolons, NULLs, binary),
/// an empty table, a view and a procedure whose body is an INSERT line.
fn seed(server: &Server, db: &str) {
    server.sql(
        None,
        &format!(
            "CREATE DATABASE {db}; USE {db};
             CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(100), body BLOB, price DECIMAL(10,2));
             CREATE TABLE empty_one (id INT PRIMARY KEY);
             CREATE VIEW pricey AS SELECT id FROM items WHERE price > 10;
             INSERT INTO items VALUES (1, 'it''s (tricky); stuff', NULL, 1.50),
                                      (2, 'back\\\\slash', UNHEX('00FF27283B29'), 99.99);
             INSERT INTO items SELECT seq, CONCAT('item-', seq, REPEAT('x', seq % 50)),
                    RANDOM_BYTES(1 + seq % 64), seq / 7 FROM seq_3_to_3000;
             CREATE PROCEDURE add_item()
INSERT INTO `items` VALUES (9999, 'not a row of the dump', NULL, 0);"
        ),
    );
}

/// Every row of every table, for byte-exact comparison.
fn contents(server: &Server, db: &str) -> String {
    server.sql(
        Some(db),
        "SELECT id, name, HEX(body), price FROM items ORDER BY id; SELECT COUNT(*) FROM empty_one; \
         SELECT COUNT(*) FROM pricey",
    )
}

fn ids(server: &Server, db: &str) -> Vec<u32> {
    server
        .sql(Some(db), "SELECT id FROM t ORDER BY id")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn insert(server: &Server, db: &str, range: std::ops::RangeInclusive<u32>) {
    for i in range {
        server.sql(Some(db), &format!("INSERT INTO t VALUES ({i}, 'row {i}')"));
    }
}

/// Database `app` with rows 1..5 in table `t`, a policy for it and its full backup (the ID).
fn app_with_a_full_backup(server: &Server) -> (Sandbox, String) {
    server.sql(
        None,
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY, v VARCHAR(20))",
    );
    insert(server, "app", 1..=5);
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "app", "app");
    let full = sandbox.backup("app");
    (sandbox, full)
}

fn manifest(sandbox: &Sandbox, id: &str) -> serde_json::Value {
    let run = sandbox.run(&["--json", "show", id]).ok();
    run.json()[0]["manifest"].clone()
}

#[test]
fn mysql_full_dump_and_its_checksums_agree_while_writers_commit() {
    let server = Server::start();
    // At READ COMMITTED, as many servers are set: the snapshots are REPEATABLE READ anyway.
    server.sql(None, "SET GLOBAL tx_isolation = 'READ-COMMITTED'");
    seed(&server, "busy");
    server.sql(
        Some("busy"),
        "INSERT INTO items SELECT seq, CONCAT('bulk-', seq), RANDOM_BYTES(200), seq / 3 \
         FROM seq_10000_to_150000",
    );
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "busy", "busy");
    // A MyISAM table (dumped outside any snapshot) and a system-versioned one (whose
    // history the dump leaves out) keep row counts, without checksums.
    server.sql(
        Some("busy"),
        "CREATE TABLE notes (id INT PRIMARY KEY) ENGINE = MyISAM; \
         CREATE TABLE prices (id INT PRIMARY KEY, p INT) WITH SYSTEM VERSIONING; \
         INSERT INTO prices VALUES (1, 10), (2, 20); UPDATE prices SET p = 11 WHERE id = 1; \
         CREATE TABLE stop_fill (x INT); \
         CREATE EVENT tidy ON SCHEDULE EVERY 1 DAY ENABLE DO DELETE FROM notes WHERE id < 0",
    );
    // A writer commits one row at a time into two dumped tables for the whole backup, until
    // a row in `stop_fill` tells it to stop.
    server.sql(
        Some("busy"),
        "DELIMITER //\nCREATE PROCEDURE fill() BEGIN DECLARE i INT DEFAULT 1; \
         WHILE NOT EXISTS (SELECT 1 FROM stop_fill) DO INSERT INTO empty_one VALUES (i); \
         INSERT INTO notes VALUES (i); SET i = i + 1; END WHILE; END//",
    );
    let mut writer = server
        .client(Some("busy"))
        .args(["-e", "CALL fill()"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let written = || {
        server
            .sql(Some("busy"), "SELECT COUNT(*) FROM empty_one")
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    while written() < 100 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = written();
    let run = sandbox.run(&["--json", "backup", "--policy", "busy"]);
    let after = written();
    server.sql(Some("busy"), "INSERT INTO stop_fill VALUES (1)");
    assert!(writer.wait().unwrap().success());
    // The dump and the snapshot its counts and checksums come from hold the same rows: the
    // backup checks that itself and fails otherwise.
    let run = run.ok();
    assert!(
        run.stderr
            .contains("tables notes of database busy are not InnoDB"),
        "{}",
        run.stderr
    );
    let m = &run.json()[0];
    let dumped = m["source"]["stats"]["tables"]["empty_one"]
        .as_u64()
        .unwrap();
    assert!(after > before, "the writer stalled: {before} then {after}");
    assert!(
        (before..=after).contains(&dumped),
        "{before} <= {dumped} <= {after}"
    );
    let stats = &m["source"]["stats"];
    assert!(stats["checksums"]["empty_one"].is_u64(), "{m}");
    assert!(stats["checksums"]["items"].is_u64(), "{m}");
    assert!(stats["checksums"].get("notes").is_none(), "{m}");
    assert!(stats["checksums"].get("prices").is_none(), "{m}");
    assert_eq!(stats["tables"]["prices"], 2, "{m}");
    assert!(stats["tables"]["notes"].is_u64(), "{m}");

    let id = m["backup_id"].as_str().unwrap();
    let run = sandbox
        .run(&[
            "restore",
            "--policy",
            "busy",
            "--backup",
            id,
            "--to-database",
            &server.url("root", "busy_copy"),
        ])
        .ok();
    assert_eq!(
        server
            .sql(Some("busy_copy"), "SELECT COUNT(*) FROM empty_one")
            .trim(),
        dumped.to_string()
    );
    // Scheduled events are part of the database; in a copy of another name, disabled, so
    // that they do not run beside the source's.
    assert_eq!(
        server.sql(
            None,
            "SELECT event_name, status FROM information_schema.events WHERE event_schema = 'busy_copy'"
        ),
        "tidy\tDISABLED\n"
    );
    assert!(
        run.stderr
            .contains("event `tidy` is restored disabled: in database busy_copy, a copy"),
        "{}",
        run.stderr
    );
}

#[test]
fn mysql_full_backup_round_trip_checks_row_counts_and_keeps_the_password_out() {
    let server = Server::start();
    seed(&server, "shop");
    server.sql(
        None,
        "CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'pw-s3cret-123';
         GRANT ALL ON *.* TO 'app'@'127.0.0.1'",
    );
    let sandbox = Sandbox::new();
    sandbox.policy(
        "shop",
        &format!(
            "name: shop\nsource:\n  kind: mysql\n  url: {}\n  password-env: SHOP_DB_PASSWORD\n",
            server.url("app", "shop")
        ),
    );
    let backup = sandbox
        .cmd(&["--json", "backup", "--policy", "shop"])
        .env("SHOP_DB_PASSWORD", "pw-s3cret-123")
        .output()
        .unwrap();
    let backup: common::Run = backup.into();
    let backup = backup.ok();
    assert!(!backup.stdout.contains("pw-s3cret") && !backup.stderr.contains("pw-s3cret"));
    let id = backup.json()[0]["backup_id"].as_str().unwrap().to_owned();

    let m = manifest(&sandbox, &id);
    let stats = &m["source"]["stats"];
    assert_eq!(stats["tables"]["items"], 3000);
    assert_eq!(stats["tables"]["empty_one"], 0);
    assert!(
        stats["tables"].get("pricey").is_none(),
        "views hold no rows"
    );
    assert!(
        m["point_in_time"]["binlog"]
            .as_str()
            .unwrap()
            .starts_with("binlog."),
        "{m}"
    );
    assert_eq!(m["source"]["descriptor"]["user"], "app");
    // Checksums from a snapshot aligned with the dump's.
    assert!(stats["checksums"]["items"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(stats["checksums"].as_object().unwrap().len(), 2, "{m}");
    assert!(stats["server_version"].is_string(), "{m}");
    for (entry, bytes) in file_contents(sandbox.path()) {
        assert!(
            !String::from_utf8_lossy(&bytes).contains("pw-s3cret"),
            "password in {}",
            entry.display()
        );
    }

    let restore = sandbox
        .cmd(&[
            "--json",
            "restore",
            "--policy",
            "shop",
            "--backup",
            &id,
            "--to-database",
            &server.url("app", "shop_copy"),
        ])
        .env("MYSQL_PWD", "pw-s3cret-123")
        .output()
        .unwrap();
    let restore: common::Run = restore.into();
    let restore = restore.ok();
    let report = &restore.json()[0];
    assert_eq!(report["rows"]["tables"], 2, "{report}");
    assert_eq!(report["rows"]["rows"], 3000);
    assert_eq!(contents(&server, "shop"), contents(&server, "shop_copy"));

    // The restored tables' checksums are compared with the dump's.
    tampered_checksum_fails_the_restore(&server, &sandbox, "shop", &id, "items", "shop_tampered");
}

/// Sets checksum `table` of backup `id` to 1 in the registry, then restores it into database
/// `target` (with `--overwrite`) and expects the restore to fail on that checksum (exit 4).
fn tampered_checksum_fails_the_restore(
    server: &Server,
    sandbox: &Sandbox,
    policy: &str,
    id: &str,
    table: &str,
    target: &str,
) {
    let out = Command::new("sqlite3")
        .arg(sandbox.path().join("registry.db"))
        .arg(format!(
            "UPDATE backups SET manifest = \
             json_set(manifest, '$.source.stats.checksums.{table}', 1) WHERE backup_id = '{id}'"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let run = sandbox
        .run(&[
            "restore",
            "--policy",
            policy,
            "--backup",
            id,
            "--to-database",
            &server.url("root", target),
            "--overwrite",
        ])
        .code(4);
    assert!(
        run.stderr
            .contains(&format!("table {table}: checksum 1 at backup")),
        "{}",
        run.stderr
    );
}

#[test]
fn mysql_point_in_time_restore_replays_binlogs_up_to_the_given_time() {
    let server = Server::start();
    let (sandbox, full) = app_with_a_full_backup(&server);

    insert(&server, "app", 6..=10);
    // A statement of the binary log with a NUL and a CR LF in it, which the replay keeps.
    let mut client = server
        .client(Some("app"))
        .arg("--binary-mode")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        client.stdin.as_mut().unwrap(),
        b"CREATE TABLE odd (v VARBINARY(10) DEFAULT 'a\0b') COMMENT 'one\r\ntwo'",
    )
    .unwrap();
    drop(client.stdin.take());
    assert!(client.wait().unwrap().success());
    let odd = |db: &str| {
        server.sql(
            Some(db),
            "INSERT INTO odd () VALUES (); SELECT HEX(v) FROM odd; \
             SELECT HEX(table_comment) FROM information_schema.tables WHERE table_name = 'odd' \
             AND table_schema = DATABASE()",
        )
    };
    let run = sandbox
        .run(&["--json", "backup", "--policy", "app", "--incremental"])
        .ok();
    let first = run.json()[0]["backup_id"].as_str().unwrap().to_owned();
    let m = manifest(&sandbox, &first);
    assert_eq!(m["type"], "incremental");
    assert_eq!(m["parent_id"], full.as_str());
    assert_eq!(m["chain_base_id"], full.as_str());
    assert_eq!(m["source"]["stats"]["tables"]["t"], 10);
    assert!(m["source"]["stats"]["checksums"]["t"].is_u64(), "{m}");
    assert_eq!(
        m["source"]["stats"]["binlog_start"],
        manifest(&sandbox, &full)["point_in_time"]["binlog"]
    );

    insert(&server, "app", 11..=15);
    // Binary log timestamps are whole seconds: keep the noted time clear of both sides.
    std::thread::sleep(Duration::from_millis(1100));
    let noted = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(1100));
    insert(&server, "app", 16..=20);
    let run = sandbox
        .run(&["--json", "backup", "--policy", "app", "--incremental"])
        .ok();
    let second = run.json()[0]["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(manifest(&sandbox, &second)["parent_id"], first.as_str());
    // A newer full backup: `latest --until` still finds the chain that covers the time.
    insert(&server, "app", 21..=25);
    let newer = sandbox.backup("app");

    // `drctl --json restore` of `backup` into the database `db`.
    let restore_into = |backup: &str, db: &str, more: &[&str]| {
        let to = server.url("root", db);
        let args = [
            &["--json", "restore", "--policy", "app", "--backup", backup][..],
            &["--to-database", &to],
            more,
        ]
        .concat();
        sandbox.run(&args)
    };
    let until = noted.to_rfc3339();
    let run = restore_into("latest", "at_noted", &["--until", &until, "--dry-run"]).ok();
    let plan = &run.json()[0];
    assert_eq!(
        plan["mysql"]["chain"],
        serde_json::json!([full, first, second])
    );
    assert_eq!(plan["mysql"]["check_rows"], false, "{plan}");
    assert_eq!(
        server.sql(None, "SHOW DATABASES LIKE 'at_noted'"),
        "",
        "a dry run writes nothing"
    );
    // A PostgreSQL setting is refused, not ignored.
    let run = restore_into("latest", "at_noted", &["--maintenance-work-mem", "1GB"]).code(2);
    assert!(run.stdout.contains("is for PostgreSQL"), "{}", run.stdout);
    let run = restore_into("latest", "at_noted", &["--until", &until]).ok();
    assert_eq!(ids(&server, "at_noted"), (1..=15).collect::<Vec<_>>());
    let report = &run.json()[0];
    assert_eq!(
        report["chain"],
        serde_json::json!([full, first, second]),
        "{report}"
    );

    // The same time in another zone means the same moment.
    let local = noted
        .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600 + 1800).unwrap())
        .to_rfc3339();
    restore_into("latest", "at_noted_ist", &["--until", &local]).ok();
    assert_eq!(ids(&server, "at_noted_ist"), (1..=15).collect::<Vec<_>>());

    let run = restore_into("latest", "latest", &[]).ok();
    assert_eq!(ids(&server, "latest"), (1..=25).collect::<Vec<_>>());
    assert_eq!(run.json()[0]["rows"]["rows"], 25);
    assert_eq!(run.json()[0]["chain"], serde_json::json!([newer]));

    restore_into(&second, "second", &[]).ok();
    assert_eq!(ids(&server, "second"), (1..=20).collect::<Vec<_>>());
    // A time after the chain's end reaches its end only, and says so.
    let run = restore_into(&second, "past_second", &["--until", "2100-01-01T00:00:00Z"]).ok();
    assert_eq!(ids(&server, "past_second"), (1..=20).collect::<Vec<_>>());
    assert!(
        run.stderr.contains(&format!("is after backup {second}"))
            && run
                .stderr
                .contains("what was written since is not in the backups it applies"),
        "{}",
        run.stderr
    );

    // The first incremental alone: its chain ends at row 10. Through `localhost` with a
    // port, which is that port over TCP, not the default server's socket.
    let via_localhost = format!("mysql://root@localhost:{}/first", server.port);
    sandbox
        .run(&[
            "restore",
            "--policy",
            "app",
            "--backup",
            &first,
            "--to-database",
            &via_localhost,
        ])
        .ok();
    assert_eq!(ids(&server, "first"), (1..=10).collect::<Vec<_>>());
    let replayed = odd("first");
    assert_eq!(replayed, odd("app"));
    assert_eq!(replayed, "610062\n6F6E650D0A74776F\n");

    // A checksum that does not match the restored table fails the restore (exit 4).
    tampered_checksum_fails_the_restore(&server, &sandbox, "app", &first, "t", "first");

    // A time before a chain's full backup cannot be reached from it.
    let early = [
        "restore",
        "--policy",
        "app",
        "--to-database",
        &server.url("root", "too_early"),
        "--until",
        "2020-01-01T00:00:00Z",
        "--backup",
    ];
    let run = sandbox
        .run(&[&early[..], &[second.as_str()]].concat())
        .code(2);
    assert!(run.stderr.contains(&full), "{}", run.stderr);
    let run = sandbox.run(&[&early[..], &["latest"]].concat()).code(10);
    assert!(
        run.stderr.contains("no completed full backup"),
        "{}",
        run.stderr
    );
}

#[test]
fn mysql_incremental_refuses_binary_logs_that_were_reset_since_its_parent() {
    let server = Server::start();
    let (sandbox, full) = app_with_a_full_backup(&server);
    let m = manifest(&sandbox, &full);
    let identity = m["source"]["stats"]["binlog_end_identity"]
        .as_str()
        .unwrap();
    assert!(identity.contains("server id"), "{m}");
    // The log the full backup ends in is recreated under the same name.
    let file = m["point_in_time"]["binlog"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    server.sql(None, "RESET MASTER");
    insert(&server, "app", 6..=10);
    assert!(
        server.sql(None, "SHOW BINARY LOGS").contains(file),
        "the name is back"
    );
    let run = sandbox
        .run(&["backup", "--policy", "app", "--incremental"])
        .code(1);
    assert!(
        run.stderr.contains(&format!("binary log {file}"))
            && run.stderr.contains("RESET MASTER")
            && run.stderr.contains("take a full backup"),
        "{}",
        run.stderr
    );
    // A new full backup starts a chain that incrementals follow again.
    sandbox.backup("app");
    insert(&server, "app", 11..=12);
    sandbox
        .run(&["backup", "--policy", "app", "--incremental"])
        .ok();
}

/// `drctl restore` of the latest backup of `policy` into the database `url` names.
fn restore_latest(sandbox: &Sandbox, policy: &str, url: &str) -> common::Run {
    restore_latest_with(sandbox, policy, url, &[])
}

fn restore_latest_with(sandbox: &Sandbox, policy: &str, url: &str, more: &[&str]) -> common::Run {
    let args = [
        &["restore", "--policy", policy, "--backup", "latest"][..],
        &["--to-database", url],
        more,
    ]
    .concat();
    sandbox.run(&args)
}

/// A restore into `app_copy` that was refused (exit 2, saying each of `said`) before the
/// database was created.
fn refused_before_app_copy_is_touched(server: &Server, run: common::Run, said: &[&str]) {
    let run = run.code(2);
    for s in said {
        assert!(run.stderr.contains(s), "{s}: {}", run.stderr);
    }
    assert_eq!(server.sql(None, "SHOW DATABASES LIKE 'app_copy'"), "");
}

/// [`app_with_a_full_backup`], then rows 6 and 7 written before the time it returns.
fn app_with_rows_up_to_a_noted_time(server: &Server) -> (Sandbox, chrono::DateTime<chrono::Utc>) {
    let (sandbox, _) = app_with_a_full_backup(server);
    insert(server, "app", 6..=7);
    // Binary log timestamps are whole seconds: keep the noted time clear of both sides.
    std::thread::sleep(Duration::from_millis(1100));
    let before = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(1100));
    (sandbox, before)
}

/// After an incremental backup of `app`, a restore of it into `app_copy` is refused,
/// saying each of `said`; one up to `before` restores rows 1 to 7.
fn incremental_refused_but_restored_until(
    server: &Server,
    sandbox: &Sandbox,
    said: &[&str],
    before: chrono::DateTime<chrono::Utc>,
) {
    sandbox
        .run(&["backup", "--policy", "app", "--incremental"])
        .ok();
    let to = server.url("root", "app_copy");
    let restore = |more: &[&str]| restore_latest_with(sandbox, "app", &to, more);
    refused_before_app_copy_is_touched(server, restore(&[]), said);
    restore(&["--until", &before.to_rfc3339()]).ok();
    assert_eq!(ids(server, "app_copy"), (1..=7).collect::<Vec<_>>());
}

#[test]
fn mysql_restore_refuses_a_binary_log_event_that_fails_its_checksum_before_writing() {
    let server = Server::start();
    let (sandbox, _) = app_with_a_full_backup(&server);
    server.sql(Some("app"), "INSERT INTO t VALUES (6, 'checksummed')");
    // One byte of the row changes on the server's disk; the server sends the log as it is.
    let data = server.dir.path().join("data");
    let corrupted = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("binlog.0")
        })
        .find_map(|p| {
            let mut bytes = std::fs::read(&p).unwrap();
            // The row's image, after the statement's text (an annotation).
            let at = bytes.windows(11).rposition(|w| w == b"checksummed")?;
            bytes[at] = b'C';
            std::fs::write(&p, bytes).unwrap();
            Some(p)
        });
    assert!(corrupted.is_some(), "no binary log holds the row");
    sandbox
        .run(&["backup", "--policy", "app", "--incremental"])
        .ok();
    let run = restore_latest(&sandbox, "app", &server.url("root", "app_copy")).code(1);
    assert!(run.stderr.contains("mariadb-binlog"), "{}", run.stderr);
    for said in [
        "Event crc check failed",
        "damaged on the server",
        "--until 20",
    ] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }
    assert_eq!(server.sql(None, "SHOW DATABASES LIKE 'app_copy'"), "");
}

#[test]
fn mysql_replay_into_another_database_refuses_statements_that_name_the_source() {
    let server = Server::start();
    let (sandbox, _) = app_with_a_full_backup(&server);
    // With `app` as the default database, a statement that names it anyway.
    server.sql(Some("app"), "CREATE TABLE app.extra (x INT)");
    insert(&server, "app", 6..=10);
    sandbox
        .run(&["backup", "--policy", "app", "--incremental"])
        .ok();

    let restore = |db: &str| restore_latest(&sandbox, "app", &server.url("root", db));
    refused_before_app_copy_is_touched(
        &server,
        restore("app_copy"),
        &["names database app itself", "CREATE TABLE app.extra"],
    );
    // Into a database of the same name (on another server; here, the source dropped) the
    // statement replays as it was logged.
    server.sql(None, "DROP DATABASE app");
    restore("app").ok();
    assert_eq!(ids(&server, "app"), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        server.sql(None, "SHOW TABLES FROM app LIKE 'extra'"),
        "extra\n"
    );
}

#[test]
fn mysql_replay_refuses_a_statement_on_the_source_that_it_would_leave_out() {
    let server = Server::start();
    let (sandbox, before) = app_with_rows_up_to_a_noted_time(&server);
    // Another database's view that reads the source changes only that database; privileges
    // and statistics are not the database's objects.
    server.sql(
        None,
        "CREATE DATABASE reports; CREATE VIEW reports.v AS SELECT id FROM app.t; \
         CREATE USER reader; GRANT SELECT ON app.* TO reader; ANALYZE TABLE app.t",
    );
    insert(&server, "app", 8..=8);
    sandbox
        .run(&["backup", "--policy", "app", "--incremental"])
        .ok();
    restore_latest(&sandbox, "app", &server.url("root", "app_copy")).ok();
    assert_eq!(ids(&server, "app_copy"), (1..=8).collect::<Vec<_>>());
    server.sql(None, "DROP DATABASE app_copy");
    // A migration run without a default database (`mariadb -e`), then rows that use it:
    // mariadb-binlog --database leaves the statement out, and the rows' new column would be
    // dropped.
    server.sql(None, "ALTER TABLE app.t ADD note VARCHAR(20)");
    server.sql(None, "ALTER TABLE app.t ADD rank INT");
    server.sql(Some("app"), "INSERT INTO t VALUES (9, 'row 9', 'noted', 1)");
    incremental_refused_but_restored_until(
        &server,
        &sandbox,
        &[
            "default database was another one",
            "ALTER TABLE app.t ADD note",
            "--until 20",
        ],
        before,
    );
    // Asked to, the restore replays the rest anyway, with the refusal as a warning; the
    // checks after it find the table differs (the new column's values are not there).
    server.sql(None, "DROP DATABASE app_copy");
    let target = server.url("root", "app_copy");
    let run = restore_latest_with(&sandbox, "app", &target, &["--replay-anyway"]).code(4);
    for said in [
        "ADD note VARCHAR(20); replayed anyway (--replay-anyway)",
        "ADD rank INT; replayed anyway (--replay-anyway)",
        "table t: checksum",
    ] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }
    assert_eq!(ids(&server, "app_copy"), (1..=9).collect::<Vec<_>>());
}

#[test]
fn mysql_replay_refuses_statements_that_change_the_server_or_other_databases() {
    let server = Server::start();
    let (sandbox, before) = app_with_rows_up_to_a_noted_time(&server);
    // Logged for `app`, the sessions' default database, though they change the server;
    // with the comments that come before, as the client sends them.
    let run = server
        .client(Some("app"))
        .arg("--comments")
        .args([
            "-e",
            "-- grants\n/* for reports */ CREATE\n  USER reader; GRANT SELECT ON app.* TO reader",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    insert(&server, "app", 8..=9);
    // Up to a time before them, the chain replays.
    incremental_refused_but_restored_until(
        &server,
        &sandbox,
        &[
            "changes the server, not database app",
            "/* for reports */ CREATE\n  USER reader\n",
            "replays what came before its second",
        ],
        before,
    );

    // A statement logged for `shop` that names another database of the target server
    // would change that one: refused too, whatever the restore's database is called.
    server.sql(
        None,
        "CREATE DATABASE shop; CREATE DATABASE other; CREATE TABLE shop.t (id INT PRIMARY KEY)",
    );
    server.policy(&sandbox, "shop", "shop");
    sandbox.backup("shop");
    server.sql(Some("shop"), "CREATE TABLE other.audit (x INT)");
    sandbox
        .run(&["backup", "--policy", "shop", "--incremental"])
        .ok();
    server.sql(None, "DROP DATABASE shop; DROP TABLE other.audit");
    let run = restore_latest(&sandbox, "shop", &server.url("root", "shop")).code(2);
    assert!(
        run.stderr
            .contains("names database other, which the replay would change")
            && run.stderr.contains("CREATE TABLE other.audit"),
        "{}",
        run.stderr
    );
    assert_eq!(server.sql(None, "SHOW DATABASES LIKE 'shop'"), "");
}

#[test]
fn mysql_restored_database_has_the_sources_character_set_for_tables_the_binlogs_create() {
    let server = Server::start();
    let defaults = |db: &str| {
        server.sql(
            None,
            &format!(
                "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME \
                 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{db}'"
            ),
        )
    };
    // Not the server's default (latin1).
    server.sql(
        None,
        "CREATE DATABASE intl CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci; \
         CREATE TABLE intl.t (id INT PRIMARY KEY)",
    );
    assert_ne!(defaults("intl"), defaults("mysql"));
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "intl", "intl");
    sandbox.backup("intl");
    server.sql(
        Some("intl"),
        "SET NAMES utf8mb4; CREATE TABLE reviews (body TEXT); \
         INSERT INTO reviews VALUES ('Grüße 🙂'); \
         CREATE EVENT tidy_reviews ON SCHEDULE EVERY 1 DAY DO DELETE FROM reviews WHERE body = ''",
    );
    sandbox
        .run(&["backup", "--policy", "intl", "--incremental"])
        .ok();
    restore_latest(&sandbox, "intl", &server.url("root", "intl_copy")).ok();
    assert_eq!(defaults("intl_copy"), defaults("intl"));
    // An event the logs create is disabled in a copy, as one the dump holds is.
    let events = "SELECT EVENT_NAME, STATUS FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ";
    assert_eq!(
        server.sql(None, &format!("{events}'intl'")),
        "tidy_reviews\tENABLED\n"
    );
    assert_eq!(
        server.sql(None, &format!("{events}'intl_copy'")),
        "tidy_reviews\tDISABLED\n"
    );
    let reviews =
        "SET NAMES utf8mb4; SELECT body, TABLE_COLLATION FROM reviews, information_schema.TABLES \
                   WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'reviews'";
    assert_eq!(
        server.sql(Some("intl_copy"), reviews),
        server.sql(Some("intl"), reviews)
    );
}

#[test]
fn mysql_incremental_leaves_tables_outside_its_snapshot_uncounted() {
    let server = Server::start();
    let (sandbox, _) = app_with_a_full_backup(&server);
    // MyISAM is read as it is when counted, not in the snapshot the binary log range ends at.
    server.sql(
        Some("app"),
        "CREATE TABLE log (x INT) ENGINE=MyISAM; INSERT INTO log VALUES (1), (2)",
    );
    insert(&server, "app", 6..=6);
    let run = sandbox
        .run(&["--json", "backup", "--policy", "app", "--incremental"])
        .ok();
    let stats = &run.json()[0]["source"]["stats"];
    assert_eq!(stats["uncounted"], serde_json::json!(["log"]), "{stats}");
    assert_eq!(stats["tables"]["t"], 6, "{stats}");
    let run = restore_latest(&sandbox, "app", &server.url("root", "app_copy")).ok();
    assert!(
        run.stderr.contains("log could not be counted"),
        "{}",
        run.stderr
    );
    assert_eq!(ids(&server, "app_copy"), (1..=6).collect::<Vec<_>>());
}

/// Database `app` made by `sql` (run in it) beside an account `owner` without rights, a
/// policy for it and its full backup.
fn app_with_objects_of_owner(server: &Server, sql: &str) -> Sandbox {
    server.sql(None, "CREATE DATABASE app; CREATE USER 'owner'@'%'");
    server.sql(Some("app"), sql);
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "app", "app");
    sandbox.backup("app");
    sandbox
}

#[test]
fn mysql_restore_warns_of_definers_without_an_account_on_the_target_server() {
    let server = Server::start();
    let sandbox = app_with_objects_of_owner(
        &server,
        "CREATE TABLE t (id INT PRIMARY KEY); \
         CREATE DEFINER = 'owner'@'%' PROCEDURE tidy() DELETE FROM t; \
         CREATE DEFINER = 'owner'@'%' TRIGGER stamp BEFORE INSERT ON t \
           FOR EACH ROW SET NEW.id = NEW.id",
    );
    // As on another server, which the account was never made on.
    server.sql(None, "DROP USER 'owner'@'%'");
    let run = restore_latest(&sandbox, "app", &server.url("root", "app_copy")).ok();
    assert!(
        run.stderr
            .contains("definer owner@% has no account on this server: routine tidy, trigger stamp"),
        "{}",
        run.stderr
    );
}

#[test]
fn mysql_a_view_the_server_dumps_by_database_restores_into_a_database_of_another_name() {
    let server = Server::start();
    // Of an account without rights on its table: the server writes its columns named by
    // database (`app`.`t`.`id`) in the dump, which another database's `t` does not have.
    let sandbox = app_with_objects_of_owner(
        &server,
        "CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t VALUES (1), (2); \
         CREATE DEFINER = 'owner'@'%' VIEW v AS SELECT id FROM t",
    );
    restore_latest(&sandbox, "app", &server.url("root", "app_copy")).ok();
    assert_eq!(server.sql(Some("app_copy"), "SELECT id FROM t"), "1\n2\n");
    // Once the account has rights, the copy's view reads the copy's table.
    server.sql(None, "GRANT SELECT ON *.* TO 'owner'@'%'");
    server.sql(Some("app"), "INSERT INTO t VALUES (3)");
    assert_eq!(
        server.sql(Some("app_copy"), "SELECT COUNT(*) FROM v"),
        "2\n"
    );
    let definition = server.sql(
        None,
        "SELECT VIEW_DEFINITION FROM information_schema.VIEWS WHERE TABLE_SCHEMA = 'app_copy'",
    );
    assert!(!definition.contains("`app`"), "{definition}");
}

#[test]
fn mysql_rows_larger_than_the_clients_default_packet_are_backed_up_and_restored() {
    let server = Server::start();
    // 32 MiB values, made by the server: the statements that write them are small.
    let big = |id: u32| {
        format!("INSERT INTO big.b VALUES ({id}, REPEAT(CONCAT('row {id} ', RANDOM_BYTES(8)), 2097152))")
    };
    server.sql(
        None,
        "CREATE DATABASE big; CREATE TABLE big.b (id INT PRIMARY KEY, v LONGBLOB)",
    );
    server.sql(None, &big(1));
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "big", "big");
    sandbox.backup("big");
    server.sql(None, &big(2));
    sandbox
        .run(&["backup", "--policy", "big", "--incremental"])
        .ok();
    restore_latest(&sandbox, "big", &server.url("root", "big_copy")).ok();
    let rows = "SELECT id, LENGTH(v), MD5(v) FROM b ORDER BY id";
    let restored = server.sql(Some("big_copy"), rows);
    assert_eq!(restored, server.sql(Some("big"), rows));
    assert_eq!(restored.lines().count(), 2, "{restored}");
}

#[test]
fn mysql_restore_refuses_a_non_empty_target_without_overwrite() {
    let server = Server::start();
    seed(&server, "shop");
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "shop", "shop");
    let id = sandbox.backup("shop");
    server.sql(
        None,
        "CREATE DATABASE busy; CREATE TABLE busy.keep (x INT); INSERT INTO busy.keep VALUES (7)",
    );
    let target = server.url("root", "busy");
    let run = restore_latest(&sandbox, "shop", &target).code(2);
    assert!(run.stderr.contains("not empty"), "{}", run.stderr);
    assert!(run.stderr.contains("--overwrite"), "{}", run.stderr);
    assert_eq!(server.sql(Some("busy"), "SELECT x FROM keep"), "7\n");

    let overwrite = || {
        sandbox.run(&[
            "restore",
            "--policy",
            "shop",
            "--backup",
            "latest",
            "--to-database",
            &target,
            "--overwrite",
        ])
    };
    // A backup damaged near its end: refused before the database is dropped.
    let data = std::fs::read_dir(sandbox.backup_dir("shop", &id))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("data.")
        })
        .unwrap();
    let good = std::fs::read(&data).unwrap();
    let mut bad = good.clone();
    let near_end = bad.len() - 40;
    bad[near_end] ^= 1;
    std::fs::write(&data, &bad).unwrap();
    let run = overwrite().code(4);
    assert!(run.stderr.contains("has been modified"), "{}", run.stderr);
    assert_eq!(server.sql(Some("busy"), "SELECT x FROM keep"), "7\n");
    std::fs::write(&data, &good).unwrap();

    overwrite().ok();
    assert_eq!(contents(&server, "shop"), contents(&server, "busy"));
    assert_eq!(
        server.sql(
            None,
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'busy' AND table_name = 'keep'"
        ),
        "0\n"
    );
}

#[test]
fn mysql_failing_dump_records_a_failed_backup_with_its_stderr() {
    let server = Server::start();
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "gone", "no_such_db");
    let run = sandbox.run(&["backup", "--policy", "gone"]).code(1);
    assert!(run.stderr.contains("mariadb-dump"), "{}", run.stderr);
    assert!(run.stderr.contains("Unknown database"), "{}", run.stderr);
    let records = sandbox.records();
    assert_eq!(records[0]["status"], "failed");
    assert!(records[0]["error"]
        .as_str()
        .unwrap()
        .contains("Unknown database"));

    // A missing dump tool: the client is there, mariadb-dump is not.
    seed(&server, "shop");
    server.policy(&sandbox, "shop", "shop");
    let bin = tempfile::tempdir().unwrap();
    let client = Command::new("sh")
        .args(["-c", "command -v mariadb"])
        .output()
        .unwrap();
    let client = String::from_utf8(client.stdout).unwrap();
    std::os::unix::fs::symlink(client.trim(), bin.path().join("mariadb")).unwrap();
    let run: common::Run = sandbox
        .cmd(&["backup", "--policy", "shop"])
        .env("PATH", bin.path())
        .output()
        .unwrap()
        .into();
    let run = run.code(1);
    assert!(
        run.stderr.contains("cannot run `mariadb-dump`"),
        "{}",
        run.stderr
    );
    let records = sandbox.records();
    assert_eq!(records[0]["status"], "failed");
    assert!(records.iter().all(|r| r["status"] != "completed"));
}

#[test]
fn mysql_server_going_away_mid_backup_fails_the_backup() {
    let mut server = Server::start();
    server.sql(
        None,
        "CREATE DATABASE big; USE big; CREATE TABLE blobs (id INT PRIMARY KEY, b MEDIUMBLOB);
         INSERT INTO blobs SELECT seq, RANDOM_BYTES(1024) FROM seq_1_to_60000",
    );
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "big", "big");
    let backup = sandbox
        .cmd(&["backup", "--policy", "big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until mariadb-dump is reading the table, then kill the server.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = server.sql(None, "SHOW FULL PROCESSLIST");
        if list.contains("SQL_NO_CACHE") {
            break;
        }
        assert!(Instant::now() < deadline, "the dump never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let run: common::Run = backup.wait_with_output().unwrap().into();
    let run = run.code(1);
    assert!(run.stderr.contains("mariadb-dump"), "{}", run.stderr);
    let records = sandbox.records();
    assert_eq!(records[0]["status"], "failed");
    assert!(records[0]["error"].as_str().unwrap().contains("stderr"));
}

#[test]
fn mysql_incremental_needs_a_parent_with_a_binlog_position() {
    let server = Server::start();
    seed(&server, "shop");
    let sandbox = Sandbox::new();
    server.policy(&sandbox, "shop", "shop");
    let run = sandbox
        .run(&["backup", "--policy", "shop", "--incremental"])
        .code(2);
    assert!(run.stderr.contains("full backup first"), "{}", run.stderr);

    // Binary logs purged since the full backup break the chain: refused, nothing recorded.
    let full = sandbox.backup("shop");
    server.sql(
        Some("shop"),
        "INSERT INTO empty_one VALUES (1); FLUSH BINARY LOGS; INSERT INTO empty_one VALUES (2)",
    );
    let current = server.sql(None, "SHOW MASTER STATUS");
    let current = current.split('\t').next().unwrap();
    server.sql(None, &format!("PURGE BINARY LOGS TO '{current}'"));
    let run = sandbox
        .run(&["backup", "--policy", "shop", "--incremental"])
        .code(1);
    assert!(run.stderr.contains("chain is broken"), "{}", run.stderr);
    let records = sandbox.records();
    assert_eq!(records[0]["status"], "failed");
    assert_eq!(records[1]["backup_id"], full.as_str());

    // The policy edited to name another database: its binary logs would be replayed for
    // the old one, so the chain starts again with a full backup.
    let full = sandbox.backup("shop");
    seed(&server, "shop2");
    server.policy(&sandbox, "shop", "shop2");
    let run = sandbox
        .run(&["backup", "--policy", "shop", "--incremental"])
        .code(2);
    assert!(
        run.stderr.contains("database is now \"shop2\"")
            && run
                .stderr
                .contains(&format!("last backup {full} is of \"shop\"")),
        "{}",
        run.stderr
    );
    sandbox.backup("shop");
    sandbox
        .run(&["backup", "--policy", "shop", "--incremental"])
        .ok();

    sandbox.files_policy("files", &[sandbox.path()]);
    let run = sandbox
        .run(&["backup", "--policy", "files", "--incremental"])
        .code(2);
    assert!(
        run.stderr.contains("no incremental backups"),
        "{}",
        run.stderr
    );
}

#[test]
fn mysql_policy_validation_names_file_and_field_without_echoing_the_password() {
    let sandbox = Sandbox::new();
    sandbox.policy(
        "bad",
        "name: bad\nsource:\n  kind: mysql\n  url: mysql://app:hunter2@db:3306/shop\n  \
         password-env: A\n  password-file: /x\n",
    );
    sandbox.policy(
        "nodb",
        "name: nodb\nsource:\n  kind: mysql\n  url: mysql://app@db:3306/\n",
    );
    let run = sandbox.run(&["policy", "validate"]).code(2);
    assert!(!run.stderr.contains("hunter2") && !run.stdout.contains("hunter2"));
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("bad.yaml: source.url"), "{all}");
    assert!(all.contains("bad.yaml: source.password-file"), "{all}");
    assert!(all.contains("nodb.yaml: source.url"), "{all}");
}
