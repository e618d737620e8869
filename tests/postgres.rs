//! PostgreSQL backups against real servers: logical dumps of the server on 127.0.0.1:5432
//! (trust auth, user postgres), and physical base backups plus WAL archiving of a scratch
//! cluster each test creates with initdb on a free port.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{file_contents, moto, output_ok, Run, Sandbox};
use drctl::source::postgres::{parse_segment, segment_name};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// Runs SQL on a server as postgres; panics with psql's stderr on failure.
fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .unwrap_or_else(|e| panic!("psql is not installed ({e}); run scripts/install-deps.sh"));
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The shared server must be up; say how to get it when it is not.
fn require_server() {
    let ok = Command::new("pg_isready")
        .args(["-h", "127.0.0.1", "-p", "5432"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "PostgreSQL is not accepting connections on 127.0.0.1:5432: run `scripts/install-deps.sh` \
         (installs and starts PostgreSQL) and make sure user postgres can connect with trust auth"
    );
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (t.subsec_nanos() ^ std::process::id().rotate_left(16) ^ n.rotate_left(24)) & 0x7fff_ffff
}

/// A database on the shared server, dropped at the end of the test.
struct Db {
    name: String,
}

impl Db {
    fn new(prefix: &str) -> Db {
        require_server();
        let name = unique(prefix);
        psql(
            &format!("{SERVER}/postgres"),
            &format!("CREATE DATABASE {name}"),
        );
        Db { name }
    }
    /// A name for a database that does not exist yet (dropped at the end too).
    fn later(prefix: &str) -> Db {
        require_server();
        Db {
            name: unique(prefix),
        }
    }
    fn url(&self) -> String {
        format!("{SERVER}/{}", self.name)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d", &format!("{SERVER}/postgres"), "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

fn logical_policy(sb: &Sandbox, name: &str, url: &str) {
    sb.policy(
        name,
        &format!("name: {name}\nsource:\n  kind: postgres\n  mode: logical\n  url: {url}\n"),
    );
}

/// `drctl restore --overwrite` of a backup of policy `pg` into the database `url`.
fn overwrite(sb: &Sandbox, backup: &str, url: &str) -> Run {
    restore_into(sb, &[], backup, url, &["--overwrite"])
}

/// `drctl <global> restore` of a backup of policy `pg` into the database `url`, with `extra`.
fn restore_into(sb: &Sandbox, global: &[&str], backup: &str, url: &str, extra: &[&str]) -> Run {
    let restore = [
        "restore",
        "--policy",
        "pg",
        "--backup",
        backup,
        "--to-database",
        url,
    ];
    sb.run(&[global, &restore[..], extra].concat())
}

/// A sandbox with policy `pg` over `source` (logical) and a backup of it (its ID).
fn backed_up(source: &Db) -> (Sandbox, String) {
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    let id = sb.backup("pg");
    (sb, id)
}

/// `drctl --json restore` of a backup of policy `pg` into the database `url`.
fn restore_to(sb: &Sandbox, backup: &str, url: &str) -> Run {
    restore_into(sb, &["--json"], backup, url, &[])
}

/// Tables with text, numbers, NULLs, a quoted name in its own schema, and an index.
fn fill(url: &str) {
    psql(
        url,
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric, note text);\
         INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.5, CASE WHEN g % 7 = 0 THEN NULL ELSE md5(g::text) END \
           FROM generate_series(1, 5000) g;\
         CREATE INDEX accounts_owner ON accounts (owner);\
         CREATE SCHEMA audit;\
         CREATE TABLE audit.\"Event Log\" (at timestamptz DEFAULT now(), what text);\
         INSERT INTO audit.\"Event Log\" (what) SELECT 'event ' || g FROM generate_series(1, 123) g;\
         CREATE TABLE empty_table (x int);",
    );
}

/// A digest of every row, to compare two databases.
fn content(url: &str) -> String {
    psql(
        url,
        "SELECT md5(string_agg(a::text, ',' ORDER BY a.id)) FROM accounts a UNION ALL \
         SELECT md5(string_agg(e.what, ',' ORDER BY e.what)) FROM audit.\"Event Log\" e",
    )
}

#[test]
fn logical_round_trip_restores_every_row_and_checks_row_counts() {
    let source = Db::new("drctl_src");
    fill(&source.url());
    let (sb, id) = backed_up(&source);

    let show = sb.run(&["--json", "show", &id]).ok().json();
    let stats = &show[0]["manifest"]["source"]["stats"];
    assert_eq!(stats["tables"]["public.accounts"], 5000, "{stats}");
    assert_eq!(stats["tables"]["audit.\"Event Log\""], 123);
    assert_eq!(stats["tables"]["public.empty_table"], 0);
    assert_eq!(
        show[0]["manifest"]["objects"][0]["name"],
        "data.pgdump.zst.age"
    );

    // The raw dump is available too, for pg_restore by hand.
    let raw = output_ok(&mut sb.cmd(&["restore", "--policy", "pg", "--backup", &id, "--stdout"]));
    assert_eq!(&raw.stdout[..5], b"PGDMP");

    // Rows written after the backup are not in it.
    psql(
        &source.url(),
        "INSERT INTO accounts VALUES (5001, 'late', 0, NULL)",
    );

    let target = Db::later("drctl_dst");
    let url = target.url();
    let restore_with = |to: &str, memory: &str, more: &[&str]| {
        let args = [
            &["--json", "restore", "--policy", "pg", "--backup", &id][..],
            &["--to-database", to, "--maintenance-work-mem", memory],
            more,
        ]
        .concat();
        sb.run(&args)
    };
    // Index builds get 1GB per session, at most 2GB in all, where the server has less
    // (this one has its default, 64MB); the plan says so.
    let dry_run = [
        "--json",
        "restore",
        "--policy",
        "pg",
        "--backup",
        &id,
        "--to-database",
        &url,
        "--dry-run",
    ];
    let plan = sb.run(&dry_run).ok().json();
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let each_mb = (2048 / cores).min(1024);
    let server_kb: u64 = psql(
        &format!("{SERVER}/postgres"),
        "SELECT setting FROM pg_settings WHERE name = 'maintenance_work_mem'",
    )
    .parse()
    .unwrap();
    let set = plan[0]["postgres"].get("maintenance_work_mem");
    match each_mb {
        mb if mb << 10 <= server_kb => assert!(set.is_none(), "{plan:?}"),
        1024 => assert_eq!(set, Some(&serde_json::json!("1GB")), "{plan:?}"),
        mb => assert_eq!(set, Some(&serde_json::json!(format!("{mb}MB"))), "{plan:?}"),
    }
    // A PGOPTIONS that sets it comes after the default and would win: no default then, even
    // where it is less.
    let mut cmd = sb.cmd(&dry_run);
    cmd.env("PGOPTIONS", "-c maintenance_work_mem=32MB");
    let plan = Run::from(cmd.output().unwrap()).ok().json();
    assert!(
        plan[0]["postgres"].get("maintenance_work_mem").is_none(),
        "{plan:?}"
    );
    // Asked for, a size is set; one PostgreSQL does not take is refused before anything is
    // done, and so is one the URL's own options would override.
    let plan = restore_with(&url, "256mb", &["--dry-run"]).ok().json();
    assert_eq!(
        plan[0]["postgres"]["maintenance_work_mem"], "256MB",
        "{plan:?}"
    );
    for bad in ["512KB", "0", "1.5GB", "2TB", "lots"] {
        let run = restore_with(&url, bad, &[]).code(2);
        assert!(
            run.stdout.contains("maintenance_work_mem"),
            "{bad}: {}",
            run.stdout
        );
    }
    // `server` sets nothing, as for a pooler that refuses startup options; so does a URL
    // with its own options.
    let plan = restore_with(&url, "server", &["--dry-run"]).ok().json();
    assert!(
        plan[0]["postgres"].get("maintenance_work_mem").is_none(),
        "{plan:?}"
    );
    let with_options = format!("{url}?options=-c%20work_mem%3D8MB");
    let plan = restore_with(&with_options, "Server", &["--dry-run"])
        .ok()
        .json();
    assert!(
        plan[0]["postgres"].get("maintenance_work_mem").is_none(),
        "{plan:?}"
    );
    let run = restore_with(&with_options, "256MB", &["--dry-run"]).code(2);
    assert!(run.stdout.contains("options parameter"), "{}", run.stdout);
    // The server takes the setting a restore passes (one it refused would fail
    // pg_restore's connections).
    let small = Db::later("drctl_dst_small");
    restore_with(&small.url(), "1MB", &[]).ok();
    let run = restore_to(&sb, &id, &url).ok();
    let report = &run.json()[0]["postgres"];
    assert_eq!(report["created"], true);
    assert_eq!(report["tables"]["public.accounts"], 5000);
    assert_eq!(run.json()[0]["rows"]["tables"], 3);
    assert_eq!(run.json()[0]["rows"]["rows"], 5123);
    psql(&source.url(), "DELETE FROM accounts WHERE id = 5001");
    assert_eq!(content(&target.url()), content(&source.url()));
    assert_eq!(content(&small.url()), content(&source.url()));
    assert_eq!(
        psql(
            &target.url(),
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'accounts_owner'"
        ),
        "1"
    );
}

#[test]
fn an_idle_timeout_and_a_line_break_in_a_table_name_back_up_and_a_failed_restore_drops_what_it_created(
) {
    let source = Db::new("drctl_timeouts");
    fill(&source.url());
    // psql prints such a name on two lines.
    psql(
        &source.url(),
        "CREATE TABLE \"line\nbreak\" (x int); INSERT INTO \"line\nbreak\" VALUES (1), (2), (3)",
    );
    // Megabytes, so that the damage below is read well after the dump's TOC.
    psql(
        &source.url(),
        "CREATE TABLE bulk AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g",
    );
    let want = content(&source.url());
    // Sessions of this database that idle in a transaction end at once: the one holding the
    // snapshot pg_dump imports, open while the dump runs, must not.
    psql(
        &format!("{SERVER}/postgres"),
        &format!(
            "ALTER DATABASE {} SET idle_in_transaction_session_timeout = '20ms'",
            source.name
        ),
    );
    let (sb, id) = backed_up(&source);

    // A database name as libpq reads it from the URL: `+` is a plus sign.
    let target = Db::later("drctl_plus+name");
    let run = restore_to(&sb, &id, &target.url()).ok();
    assert_eq!(content(&target.url()), want);
    assert_eq!(
        run.json()[0]["postgres"]["tables"]["public.\"line\nbreak\""],
        3,
        "{}",
        run.stdout
    );

    // A backup damaged near its end fails the restore after the rows went in: the database
    // the restore created is dropped, and the error says so.
    let object = sb.backup_dir("pg", &id).join("data.pgdump.zst.age");
    let mut stored = std::fs::read(&object).unwrap();
    let near_end = stored.len() - 40;
    stored[near_end] ^= 1;
    std::fs::write(&object, &stored).unwrap();
    let doomed = Db::later("drctl_doomed");
    let run = restore_to(&sb, &id, &doomed.url()).code(4);
    assert!(run.stdout.contains("has been dropped"), "{}", run.stdout);
    assert_eq!(
        psql(
            &format!("{SERVER}/postgres"),
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                doomed.name
            )
        ),
        "0"
    );
}

#[test]
fn a_streamed_dump_is_rewritten_for_pg_restore_without_changing_what_it_restores() {
    use drctl::restore::pgdump::{open, Written};
    let db = Db::new("drctl_rewrite");
    fill(&db.url());
    psql(&db.url(), "SELECT lo_from_bytea(0, 'a large object')");
    // Through a pipe, as drctl runs it: pg_dump cannot go back to write the offsets.
    let dump = output_ok(Command::new("pg_dump").args(["-Fc", "-Z0", "-d", &db.url()]));
    let dir = tempfile::tempdir().unwrap();
    let (piped, rewritten) = (dir.path().join("piped"), dir.path().join("rewritten"));
    std::fs::write(&piped, &dump.stdout).unwrap();
    let file = std::fs::File::create_new(&rewritten).unwrap();
    let mut input = &dump.stdout[..];
    let written = open(&mut input)
        .and_then(|a| a.write_file(&file, &drctl::cancel::Cancel::new()))
        .unwrap();
    let Written::Rewritten {
        blocks,
        chunks_in,
        chunks_out,
    } = written
    else {
        panic!("not rewritten: {written:?}");
    };
    assert_eq!(blocks, 4, "three tables and the large objects");
    assert!(
        chunks_out * 100 < chunks_in,
        "{chunks_in} chunks joined into {chunks_out}"
    );
    // pg_restore reads both into the same script, data included (but for the random key of
    // psql's \restrict lines).
    let script = |path: &Path| {
        let out = output_ok(Command::new("pg_restore").args(["-f", "-"]).arg(path));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let want = script(&piped);
    assert!(want.contains("owner 4999"));
    assert!(
        script(&rewritten) == want,
        "the rewritten dump restores something else"
    );
}

/// The rows of every table listed, as one digest per table.
fn digests(url: &str, tables: &[&str]) -> Vec<String> {
    tables
        .iter()
        .map(|t| {
            psql(
                url,
                &format!("SELECT count(*) || ' ' || md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) FROM {t} x"),
            )
        })
        .collect()
}

#[test]
fn a_streamed_restore_splits_rows_over_connections_and_restores_what_comes_after_the_data() {
    let source = Db::new("drctl_src");
    // Rows with every escape COPY knows, a row larger than a piece sent to one connection,
    // enough rows to be spread over several, a sequence, a foreign key, a trigger that
    // must not fire on restored rows, a materialized view and a view.
    psql(
        &source.url(),
        "CREATE TABLE items (id bigserial PRIMARY KEY, body text, tags jsonb, note text);\
         INSERT INTO items (body, tags, note) SELECT 'item ' || g || E'\\ttab\\nnewline \\\\ backslash \\\\. dot',\
             jsonb_build_object('n', g, 'text', repeat('x', g % 50)), CASE WHEN g % 5 = 0 THEN NULL ELSE 'ünïcødé ' || g END \
           FROM generate_series(1, 40000) g;\
         INSERT INTO items (body) VALUES (repeat('large row ', 40000)), (E'\\\\.'), ('');\
         CREATE TABLE orders (id int PRIMARY KEY, item bigint NOT NULL REFERENCES items (id), qty int CHECK (qty > 0));\
         INSERT INTO orders SELECT g, g, g % 9 + 1 FROM generate_series(1, 3000) g;\
         CREATE INDEX orders_item ON orders (item);\
         CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.note := 'rewritten'; RETURN NEW; END $$;\
         CREATE TRIGGER items_stamp BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION stamp();\
         CREATE MATERIALIZED VIEW item_totals AS SELECT item, sum(qty) AS qty FROM orders GROUP BY item;\
         CREATE VIEW big_orders AS SELECT * FROM orders WHERE qty > 5;\
         CREATE TABLE events (at int); CREATE TABLE late_events (why text) INHERITS (events);\
         INSERT INTO events SELECT g FROM generate_series(1, 10) g;\
         INSERT INTO late_events SELECT g, 'late' FROM generate_series(1, 5) g;\
         COMMENT ON TABLE items IS 'the catalogue';\
         GRANT SELECT ON items TO PUBLIC;",
    );
    // More rows than a connection (one per core) sends in one COPY (64 MiB): about 95 MB
    // each, which go in over several.
    let rows = 900_000 * std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    psql(
        &source.url(),
        &format!(
            "CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 3) AS h \
             FROM generate_series(1, {rows}) g"
        ),
    );
    let (sb, id) = backed_up(&source);
    let target = Db::later("drctl_dst");
    let run = restore_to(&sb, &id, &target.url()).ok();
    let report = &run.json()[0]["postgres"];
    assert_eq!(report["streamed"], true, "{report}");
    assert_eq!(report["tables"]["public.items"], 40003, "{report}");
    assert_eq!(report["tables"]["public.orders"], 3000);
    // A parent counts its children's rows, as at backup time.
    assert_eq!(report["tables"]["public.events"], 15);
    assert_eq!(report["tables"]["public.late_events"], 5);
    assert_eq!(report["tables"]["public.bulk"], rows);

    let tables = [
        "items",
        "orders",
        "item_totals",
        "big_orders",
        "events",
        "bulk",
    ];

    assert_eq!(
        digests(&target.url(), &tables),
        digests(&source.url(), &tables)
    );
    let catalog = "SELECT (SELECT count(*) FROM pg_constraint WHERE contype = 'f') || ' ' || \
                   (SELECT count(*) FROM pg_trigger WHERE tgname = 'items_stamp') || ' ' || \
                   (SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_item') || ' ' || \
                   obj_description('items'::regclass, 'pg_class')";
    assert_eq!(psql(&target.url(), catalog), "1 1 1 the catalogue");
    let grants = "SELECT relacl::text FROM pg_class WHERE relname = 'items'";
    assert_eq!(psql(&target.url(), grants), psql(&source.url(), grants));
    assert!(
        psql(&target.url(), grants).contains("=r/"),
        "granted to PUBLIC"
    );
    // The sequence goes on where the source's does.
    assert_eq!(
        psql(&target.url(), "SELECT nextval('items_id_seq')"),
        psql(&source.url(), "SELECT nextval('items_id_seq')")
    );
}

#[test]
fn a_dump_with_large_objects_is_restored_through_pg_restore() {
    let source = Db::new("drctl_src");
    fill(&source.url());
    let oid = psql(&source.url(), "SELECT lo_from_bytea(0, 'a large object')");
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    sb.backup("pg");
    let target = Db::later("drctl_dst");
    let run = restore_to(&sb, "latest", &target.url()).ok();
    assert_eq!(run.json()[0]["postgres"]["streamed"], false);
    assert_eq!(
        psql(
            &target.url(),
            &format!("SELECT convert_from(lo_get({oid}), 'UTF8')")
        ),
        "a large object"
    );
    assert_eq!(content(&target.url()), content(&source.url()));
}

#[test]
fn logical_restore_refuses_a_non_empty_database_without_overwrite() {
    let source = Db::new("drctl_src");
    fill(&source.url());
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    sb.backup("pg");
    psql(&source.url(), "DELETE FROM accounts WHERE id > 10");

    let url = source.url();
    let run = restore_into(&sb, &[], "latest", &url, &[]).code(2);
    assert!(run.stderr.contains("is not empty"), "{}", run.stderr);
    // Nothing was touched.
    assert_eq!(psql(&url, "SELECT count(*) FROM accounts"), "10");

    overwrite(&sb, "latest", &url).ok();
    assert_eq!(psql(&url, "SELECT count(*) FROM accounts"), "5000");

    // A database with no tables but a schema (as a failed restore may leave) is not empty
    // either; with --overwrite the dump's own objects are dropped and restored.
    let leftover = Db::new("drctl_dst");
    psql(
        &leftover.url(),
        "CREATE SCHEMA audit; CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    );
    let url = leftover.url();
    let run = restore_into(&sb, &[], "latest", &url, &[]).code(2);
    assert!(
        run.stderr.contains("is not empty (2 relations, schemas"),
        "{}",
        run.stderr
    );
    overwrite(&sb, "latest", &url).ok();
    assert_eq!(content(&url), content(&source.url()));

    // Over objects that cannot all be dropped (a table made since the backup references
    // one of the dump's): the restore fails and leaves the database as it was.
    let url = source.url();
    psql(
        &url,
        "DELETE FROM accounts WHERE id > 10; CREATE TABLE newer (a int REFERENCES accounts)",
    );
    let (before, rows) = (indexes_and_constraints(&url), content(&url));
    let run = overwrite(&sb, "latest", &url).code(1);
    for said in ["depend", "is as it was if pg_restore failed"] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }
    assert_eq!(indexes_and_constraints(&url), before);
    assert_eq!(content(&url), rows);
    // On its own, that table stays as it was beside the restored ones.
    psql(
        &url,
        "ALTER TABLE newer DROP CONSTRAINT newer_a_fkey; INSERT INTO newer VALUES (7)",
    );
    let run = overwrite(&sb, "latest", &url).ok();
    assert!(
        run.stderr
            .contains("keeps tables the backup does not hold, as they were: public.newer"),
        "{}",
        run.stderr
    );
    assert_eq!(psql(&url, "SELECT count(*) FROM accounts"), "5000");
    assert_eq!(psql(&url, "SELECT a FROM newer"), "7");
}

/// Over more objects than the server's lock table holds for one transaction, `--overwrite`
/// restores without one, and says so. On a server of its own with a small lock table:
/// filling the shared one would fail other tests' sessions.
#[test]
fn an_overwrite_of_more_objects_than_one_transaction_can_lock_restores_without_one() {
    let c = Cluster::start();
    append(
        &c.data.join("postgresql.conf"),
        "max_locks_per_transaction = 10\nmax_connections = 20\n",
    );
    c.pg_ctl("restart");
    psql(&c.url(), "CREATE DATABASE app");
    let url = format!("postgres://postgres@127.0.0.1:{}/app", c.port);
    // The server's lock table, as PostgreSQL sizes it.
    let locks: u64 = psql(
        &url,
        "SELECT current_setting('max_locks_per_transaction')::int * \
         (current_setting('max_connections')::int + current_setting('autovacuum_max_workers')::int \
          + 1 + current_setting('max_worker_processes')::int \
          + current_setting('max_wal_senders')::int \
          + current_setting('max_prepared_transactions')::int)",
    )
    .parse()
    .unwrap();
    // The backup holds two locks a table (pg_dump's and the row count's), which fit; the
    // restore in one transaction four (the old table and its key's index, the new ones).
    let tables = locks * 3 / 8;
    for first in (1..=tables).step_by(50) {
        psql(
            &url,
            &format!(
                "DO $$ BEGIN FOR i IN {first}..{} LOOP \
                 EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY)', i); END LOOP; END $$",
                (first + 49).min(tables)
            ),
        );
    }
    psql(&url, "INSERT INTO t1 VALUES (1)");
    logical_policy(&c.sb, "pg", &url);
    let id = c.sb.backup("pg");
    psql(&url, "INSERT INTO t1 VALUES (2)");
    let run = overwrite(&c.sb, &id, &url).ok();
    assert!(
        run.stderr
            .contains("too many objects for the server's locks"),
        "{}",
        run.stderr
    );
    assert_eq!(psql(&url, "SELECT count(*) FROM t1"), "1");
}

/// An interrupted restore stops pg_restore and removes the decoded dump it wrote to TMPDIR,
/// also when a second interrupt ends drctl at once.
#[test]
fn an_interrupted_restore_stops_pg_restore_and_leaves_no_plain_dump_behind() {
    let source = Db::new("drctl_interrupt");
    psql(
        &source.url(),
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 1500000) g;\
         CREATE INDEX big_h ON big (h)",
    );
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    sb.backup("pg");
    let tmp = sb.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // Decoded dumps in TMPDIR, where each is in a private directory of its own.
    let dumps = || {
        let entries = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|d| d.map(|e| e.unwrap().path()).collect())
                .unwrap_or_default()
        };
        entries(&tmp)
            .iter()
            .flat_map(|e| entries(e))
            .filter(|f| f.to_string_lossy().ends_with(".pgdump"))
            .count()
    };
    let restoring = || {
        psql(
            &format!("{SERVER}/postgres"),
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
                 AND application_name = 'drctl pg_restore'",
                source.name
            ),
        ) != "0"
    };
    // Fewer rows than the backup's, which a finished restore would bring back.
    psql(&source.url(), "DELETE FROM big WHERE id > 1000000");
    for interrupts in [1, 2] {
        // Over the existing tables, the dump goes through a file for pg_restore.
        let mut child = sb
            .cmd(&[
                "restore",
                "--policy",
                "pg",
                "--backup",
                "latest",
                "--to-database",
                &source.url(),
                "--overwrite",
            ])
            .env("TMPDIR", &tmp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !(dumps() == 1 && restoring()) {
            assert!(
                std::time::Instant::now() < deadline,
                "pg_restore did not start"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the restore ended early"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for _ in 0..interrupts {
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(dumps(), 0, "the decoded dump is left in TMPDIR");
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "its directory is left in TMPDIR"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while restoring() {
            assert!(
                std::time::Instant::now() < deadline,
                "pg_restore still runs"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // pg_restore stopped instead of finishing, and its transaction left the database
        // as it was.
        assert_eq!(
            psql(&source.url(), "SELECT count(*) FROM big"),
            "1000000",
            "after {interrupts} interrupt(s)"
        );
        assert_eq!(
            psql(
                &source.url(),
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'big_h'",
            ),
            "1"
        );
    }
}

/// Every index, constraint and index comment of schema `public`, with whether it is valid.
fn indexes_and_constraints(url: &str) -> String {
    psql(
        url,
        "SELECT string_agg(d, E'\\n' ORDER BY d) FROM ( \
           SELECT pg_get_indexdef(indexrelid) || ' ' || indisvalid || ' ' \
                  || coalesce(obj_description(indexrelid, 'pg_class'), '') AS d \
           FROM pg_index WHERE indrelid::regclass::text NOT LIKE 'pg\\_%' \
           UNION ALL SELECT conname || ' ' || pg_get_constraintdef(oid) || ' ' || convalidated \
           FROM pg_constraint WHERE connamespace = 'public'::regnamespace) s",
    )
}

#[test]
fn logical_restore_rebuilds_every_index_and_constraint_as_the_source_has_it() {
    let source = Db::new("drctl_src");
    psql(
        &source.url(),
        "CREATE FUNCTION norm(text) RETURNS text IMMUTABLE LANGUAGE sql AS 'SELECT lower($1)';
         CREATE TABLE customers (id int PRIMARY KEY, name text UNIQUE);
         CREATE INDEX customers_norm ON customers (norm(name));
         COMMENT ON INDEX customers_norm IS 'by normalised name';
         CREATE TABLE orders (id int PRIMARY KEY, customer int NOT NULL REFERENCES customers, note text);
         CREATE INDEX orders_customer ON orders (customer);
         CREATE TABLE events (at date NOT NULL, id int NOT NULL, PRIMARY KEY (at, id)) PARTITION BY RANGE (at);
         CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         CREATE INDEX events_id ON events (id);
         INSERT INTO customers SELECT g, 'Name ' || g FROM generate_series(1, 2000) g;
         INSERT INTO orders SELECT g, 1 + g % 2000, md5(g::text) FROM generate_series(1, 20000) g;
         INSERT INTO events SELECT date '2025-06-01' + g % 400, g FROM generate_series(1, 5000) g;",
    );
    let (sb, id) = backed_up(&source);
    let target = Db::later("drctl_dst");
    restore_to(&sb, &id, &target.url()).ok();
    // All there, once each, valid, as in the source.
    let restored = indexes_and_constraints(&target.url());
    assert_eq!(restored, indexes_and_constraints(&source.url()));
    for name in [
        "orders_customer_fkey",
        "events_pkey",
        "events_2025_id_idx",
        "by normalised name",
    ] {
        assert!(restored.contains(name), "{name}: {restored}");
    }
    assert!(!restored.contains(" false"), "{restored}");
}

#[test]
fn a_created_database_gets_the_dumps_settings_comment_and_privileges_an_existing_one_keeps_its_own()
{
    let source = Db::new("drctl_src");
    psql(
        &source.url(),
        &format!(
            "ALTER DATABASE {0} SET search_path = app, public; \
             ALTER ROLE postgres IN DATABASE {0} SET work_mem = '8MB'; \
             COMMENT ON DATABASE {0} IS 'the {0} database'; \
             REVOKE CONNECT ON DATABASE {0} FROM PUBLIC",
            source.name
        ),
    );
    fill(&source.url());
    let (sb, id) = backed_up(&source);
    let about = |db: &str| {
        psql(
            &format!("{SERVER}/postgres"),
            &format!(
                "SELECT (SELECT string_agg(coalesce(r.rolname, '*') || ':' || array_to_string(s.setconfig, ','), ' ' ORDER BY 1) \
                   FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = d.oid) \
                 || ' | ' || coalesce(shobj_description(d.oid, 'pg_database'), '') \
                 || ' | ' || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(datacl) a), 'default') \
                 FROM pg_database d WHERE datname = '{db}'"
            ),
        )
    };
    let created = Db::later("drctl_dst");
    let run = restore_to(&sb, &id, &created.url()).ok();
    assert!(!run.stderr.contains("not applied"), "{}", run.stderr);
    assert_eq!(about(&created.name), about(&source.name));
    assert!(about(&created.name).contains("*:search_path=app, public"));
    assert!(
        !about(&created.name).contains("=Tc/"),
        "{}",
        about(&created.name)
    );
    // An existing database keeps what it has; the restore says what it left.
    let existing = Db::new("drctl_dst");
    let before = about(&existing.name);
    let run = restore_to(&sb, &id, &existing.url()).ok();
    assert!(
        run.stderr.contains(&format!(
            "the dump's comment, privileges, settings of database {} are not applied to the \
             existing database {}",
            source.name, existing.name
        )),
        "{}",
        run.stderr
    );
    assert_eq!(about(&existing.name), before);
}

/// A role for a test, dropped at the end (declare it before the databases it owns, which
/// are dropped first).
struct Role(String);

impl Role {
    fn new() -> Role {
        let name = unique("drctl_owner");
        psql(
            &format!("{SERVER}/postgres"),
            &format!("CREATE ROLE {name}"),
        );
        Role(name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-X", "-q", "-d", &format!("{SERVER}/postgres"), "-c"])
            .arg(format!("DROP ROLE IF EXISTS {}", self.0))
            .output();
    }
}

#[test]
fn a_created_database_gets_the_dumps_encoding_locale_and_owner() {
    let owner = Role::new();
    let source = Db::later("drctl_src");
    // Not this server's default (UTF8, C.UTF-8).
    psql(
        &format!("{SERVER}/postgres"),
        &format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C' OWNER {}",
            source.name, owner.0
        ),
    );
    let utf8 = |db: &Db| format!("{}?client_encoding=UTF8", db.url());
    psql(
        &utf8(&source),
        &format!(
            "CREATE TABLE words (w text); INSERT INTO words VALUES ('café'), ('Ärger'), ('zoo'); \
             COMMENT ON DATABASE {} IS 'Café'",
            source.name
        ),
    );
    let (sb, id) = backed_up(&source);
    let about = |db: &str| {
        psql(
            &format!("{SERVER}/postgres"),
            &format!(
                "SELECT pg_encoding_to_char(encoding) || ' ' || datcollate || ' ' || datctype \
                   || ' ' || datdba::regrole FROM pg_database WHERE datname = '{db}'"
            ),
        )
    };
    assert_eq!(about(&source.name), format!("LATIN1 C C {}", owner.0));
    let target = Db::later("drctl_dst");
    let run = restore_to(&sb, &id, &target.url()).ok();
    assert_eq!(about(&target.name), about(&source.name));
    // The comment's text is in LATIN1 in the dump: left out rather than garbled.
    let said = format!(
        "database {} does not get the dump's comment of database {}: their text, in encoding \
         LATIN1, would be garbled",
        target.name, source.name
    );
    assert!(run.stderr.contains(&said), "{said}: {}", run.stderr);
    let comment = format!("SELECT shobj_description(oid, 'pg_database') IS NULL FROM pg_database WHERE datname = '{}'", target.name);
    assert_eq!(psql(&format!("{SERVER}/postgres"), &comment), "t");
    let words = "SELECT string_agg(w || ':' || octet_length(w::bytea), ' ' ORDER BY w) FROM words";
    // LATIN1 bytes, in LATIN1 order.
    assert_eq!(psql(&utf8(&target), words), "café:4 zoo:3 Ärger:5");

    // An owner this server lacks: the restoring role owns the database, and says so.
    drop(target);
    psql(
        &format!("{SERVER}/postgres"),
        &format!(
            "ALTER DATABASE {} OWNER TO postgres; DROP ROLE {}",
            source.name, owner.0
        ),
    );
    let target = Db::later("drctl_dst");
    let run = restore_to(&sb, &id, &target.url()).ok();
    let said = format!(
        "database {} is not owned by role {}, as the dump's was, but by the restoring role",
        target.name, owner.0
    );
    assert!(run.stderr.contains(&said), "{said}: {}", run.stderr);
    assert_eq!(about(&target.name), "LATIN1 C C postgres");
    assert_eq!(psql(&utf8(&target), words), "café:4 zoo:3 Ärger:5");
}

#[test]
fn row_counts_match_whatever_quoting_each_server_gives_the_names() {
    // The source database quotes every name, as a server of another version quotes its
    // own keywords: the counts still match the restored tables'.
    let source = Db::new("drctl_src");
    psql(
        &source.url(),
        &format!(
            "ALTER DATABASE {} SET quote_all_identifiers = on",
            source.name
        ),
    );
    fill(&source.url());
    let (sb, id) = backed_up(&source);
    let show = sb.run(&["--json", "show", &id]).ok().json();
    let tables = &show[0]["manifest"]["source"]["stats"]["tables"];
    assert_eq!(tables["\"public\".\"accounts\""], 5000, "{tables}");
    let target = Db::later("drctl_dst");
    let run = restore_to(&sb, &id, &target.url()).ok();
    assert_eq!(run.json()[0]["rows"]["rows"], 5123, "{}", run.stdout);
}

/// What the target refuses fails the restore: a row (which the error names, with the
/// server's context) or an index; the error is the server's, and the database the restore
/// created is dropped. The function `picky` fails in any database but the source.
#[test]
fn logical_restore_fails_on_a_row_or_an_index_the_target_refuses() {
    for (schema, said) in [
        (
            "CREATE TABLE a_first (id int); CREATE INDEX a_first_picky ON a_first (picky(id)); \
             CREATE TABLE b_then (id int PRIMARY KEY); \
             INSERT INTO a_first SELECT generate_series(1, 1000); \
             INSERT INTO b_then SELECT generate_series(1, 1000);",
            &["picky refuses database"][..],
        ),
        (
            "CREATE TABLE checked (id int CHECK (picky(id) > 0)); \
             INSERT INTO checked SELECT generate_series(1, 1000);",
            &["picky refuses database", "CONTEXT:", "COPY checked, line 1"][..],
        ),
    ] {
        let source = Db::new("drctl_src");
        psql(
            &source.url(),
            &format!(
                "CREATE FUNCTION picky(int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$ BEGIN \
                   IF current_database() <> '{}' THEN \
                     RAISE EXCEPTION 'picky refuses database %', current_database(); \
                   END IF; RETURN $1; END $$; {schema}",
                source.name
            ),
        );
        let sb = Sandbox::new();
        logical_policy(&sb, "pg", &source.url());
        let id = sb.backup("pg");
        let target = Db::later("drctl_dst");
        let run = restore_to(&sb, &id, &target.url()).code(1);
        for s in said {
            assert!(run.stderr.contains(s), "{s}: {}", run.stderr);
        }
        assert_eq!(
            psql(
                &format!("{SERVER}/postgres"),
                &format!(
                    "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                    target.name
                )
            ),
            "0"
        );
    }
}

#[test]
fn logical_restore_stops_at_the_first_error() {
    let source = Db::new("drctl_src");
    fill(&source.url());
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    sb.backup("pg");
    // The target has a conflicting object the dump does not hold: a type where the dump has
    // the table accounts, which fails the first statement about it (dropping its key).
    let target = Db::new("drctl_dst");
    psql(&target.url(), "CREATE TYPE accounts AS (x int)");
    let run = overwrite(&sb, "latest", &target.url()).code(1);
    assert!(run.stderr.contains("pg_restore"), "{}", run.stderr);
    assert!(
        run.stderr.contains("\"accounts\" is a composite type"),
        "{}",
        run.stderr
    );
    // It stopped there: no table was created.
    assert_eq!(
        psql(
            &target.url(),
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('accounts', 'empty_table')"
        ),
        "0"
    );
}

#[test]
fn failing_dump_is_recorded_as_failed_with_the_tool_stderr() {
    require_server();
    let sb = Sandbox::new();
    logical_policy(&sb, "gone", &format!("{SERVER}/drctl_no_such_database"));
    let run = sb.run(&["backup", "--policy", "gone"]).code(1);
    assert!(
        run.stderr
            .contains("database \"drctl_no_such_database\" does not exist"),
        "{}",
        run.stderr
    );
    let records = sb.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], "failed");
    assert!(records[0]["error"]
        .as_str()
        .unwrap()
        .contains("does not exist"));
}

/// A logical backup of a database with tables `first`, `blocker` and `big` (500,000 rows,
/// more than a pipe holds),
/// created in the order `tables` gives, during which a `TRUNCATE big` is made while pg_dump
/// waits for its lock on `blocker`, which another transaction holds; returns the source, the
/// sandbox and drctl's output. pg_dump locks the tables in the order they were created.
fn backup_with_a_truncate_while_pg_dump_waits(
    tables: &[&str],
) -> (Db, Sandbox, std::process::Output) {
    let source = Db::new("drctl_src");
    for table in tables {
        let fill = if *table == "big" {
            " AS SELECT generate_series(1, 500000) AS x"
        } else {
            " (x int)"
        };
        psql(&source.url(), &format!("CREATE TABLE {table}{fill}"));
    }
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    let mut holder = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &source.url()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut hold = holder.stdin.take().unwrap();
    hold.write_all(b"BEGIN; LOCK TABLE blocker IN ACCESS EXCLUSIVE MODE;\n")
        .unwrap();
    hold.flush().unwrap();
    let activity = |filter: &str| {
        psql(
            &format!("{SERVER}/postgres"),
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND {filter}",
                source.name
            ),
        ) != "0"
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !activity("query LIKE 'LOCK TABLE%' AND state = 'idle in transaction'") {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was not taken"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut backup = sb
        .cmd(&["--json", "backup", "--policy", "pg"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !activity("application_name LIKE 'drctl pg_dump%' AND wait_event_type = 'Lock'") {
        assert!(std::time::Instant::now() < deadline, "pg_dump did not wait");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let truncate = Command::new("psql")
        .args(["-X", "-q", "-d", &source.url(), "-c", "TRUNCATE big"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    hold.write_all(b"COMMIT;\n").unwrap();
    drop(hold);
    holder.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while backup.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = backup.kill();
            panic!("the backup is held up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = backup.wait_with_output().unwrap();
    truncate.wait_with_output().unwrap();
    (source, sb, out)
}

/// The row count of a logical backup takes its table locks only once pg_dump holds its own:
/// a TRUNCATE made while pg_dump waits for a lock, on a table pg_dump has not locked yet,
/// goes through before pg_dump reaches that table, instead of queueing behind the count's
/// lock, with pg_dump's lock queued behind it and the count waiting for pg_dump.
#[test]
fn a_truncate_while_pg_dump_waits_for_a_lock_does_not_hold_the_backup_up() {
    let (_source, sb, out) =
        backup_with_a_truncate_while_pg_dump_waits(&["first", "blocker", "big"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The count and the dump agree: the restore checks them.
    let target = Db::later("drctl_dst");
    restore_to(&sb, "latest", &target.url()).ok();
    assert_eq!(psql(&target.url(), "SELECT count(*) FROM big"), "0");
}

/// A TRUNCATE queued behind pg_dump's lock on a table empties it once pg_dump is done: the
/// count, which reads the dump's snapshot, would find it empty then, and the restore of
/// the dump's rows would fail its check. The table is left uncounted instead.
#[test]
fn a_truncate_queued_behind_pg_dump_leaves_its_table_uncounted() {
    let (_source, sb, out) =
        backup_with_a_truncate_while_pg_dump_waits(&["first", "big", "blocker"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tables not counted"), "{stderr}");
    let target = Db::later("drctl_dst");
    let run = restore_to(&sb, "latest", &target.url()).ok();
    assert!(
        run.stderr
            .contains("could not be counted in the backup's snapshot: its rows are not checked"),
        "{}",
        run.stderr
    );
    // pg_dump had its lock first: the dump holds the rows.
    assert_eq!(psql(&target.url(), "SELECT count(*) FROM big"), "500000");
}

#[test]
fn missing_client_tools_fail_the_backup() {
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &format!("{SERVER}/postgres"));
    let empty = tempfile::tempdir().unwrap();
    let run: Run = sb
        .cmd(&["backup", "--policy", "pg"])
        .env("PATH", empty.path())
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("cannot run `psql`"), "{}", run.stderr);
    assert_eq!(sb.records()[0]["status"], "failed");
}

#[test]
fn server_going_away_mid_dump_fails_the_backup() {
    let source = Db::new("drctl_src");
    // Enough rows that the dump is still running when its connection is cut.
    psql(
        &source.url(),
        "CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 20) AS t \
         FROM generate_series(1, 300000) g",
    );
    let sb = Sandbox::new();
    logical_policy(&sb, "pg", &source.url());
    let mut child = sb
        .cmd(&["backup", "--policy", "pg"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let db = source.name.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut killed = false;
    while std::time::Instant::now() < deadline && !killed {
        let n = psql(
            &format!("{SERVER}/postgres"),
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{db}' AND application_name LIKE 'drctl pg_dump%'"
            ),
        );
        killed = n != "0";
        if child.try_wait().unwrap().is_some() {
            break;
        }
    }
    let run: Run = child.wait_with_output().unwrap().into();
    assert!(killed, "the dump finished before it could be interrupted");
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("pg_dump"), "{}", run.stderr);
    assert_eq!(sb.records()[0]["status"], "failed");
}

#[test]
fn postgres_policies_are_validated_with_file_and_field() {
    let sb = Sandbox::new();
    sb.policy(
        "leaky",
        "name: leaky\nsource:\n  kind: postgres\n  mode: logical\n  url: postgres://app:hunter2@db:5432/app\n",
    );
    sb.policy(
        "leaky2",
        "name: leaky2\nsource:\n  kind: postgres\n  mode: logical\n  url: postgres://app@db:5432/app?sslmode=require&password=hunter2\n",
    );
    sb.policy(
        "both",
        "name: both\nsource:\n  kind: postgres\n  mode: physical\n  url: postgres://app@db:5432/app\n  \
         password-file: pw\n  password-env: PGPASS\n",
    );
    sb.policy(
        "nodb",
        "name: nodb\nsource:\n  kind: postgres\n  mode: logical\n  url: mysql://app@db:3306\n",
    );
    sb.policy(
        "badmode",
        "name: badmode\nsource:\n  kind: postgres\n  mode: incremental\n  url: postgres://app@db/app\n",
    );
    sb.policy(
        "datadir",
        "name: datadir\nsource:\n  kind: postgres\n  mode: logical\n  url: postgres://app@db/app\n  \
         data-directory: /var/lib/postgresql/15/main\n  verify-checksums: false\n  \
         archive-push-queue-max: 4GB\n",
    );
    for (name, max) in [("tiny", "8MB"), ("unit", "4 GiB"), ("fraction", "1.5GB")] {
        sb.policy(
            name,
            &format!(
                "name: {name}\nsource:\n  kind: postgres\n  mode: physical\n  url: postgres://app@db/app\n  \
                 archive-push-queue-max: {max}\n"
            ),
        );
    }
    sb.policy(
        "relative",
        "name: relative\nsource:\n  kind: postgres\n  mode: physical\n  url: postgres://app@db/app\n  \
         data-directory: data\n",
    );
    let run = sb.run(&["policy", "validate"]).code(2);
    let out = run.stderr;
    assert!(
        out.contains("leaky.yaml: source.url: the URL contains a password"),
        "{out}"
    );
    assert!(
        out.contains("leaky2.yaml: source.url: the URL contains a password"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "the password leaked: {out}");
    assert!(
        out.contains("both.yaml: source.password-file: give password-file or password-env"),
        "{out}"
    );
    assert!(
        out.contains("nodb.yaml: source.url: scheme \"mysql\" is not postgres"),
        "{out}"
    );
    assert!(
        out.contains("nodb.yaml: source.url: logical mode needs a database"),
        "{out}"
    );
    assert!(out.contains("badmode.yaml: source"), "{out}");
    assert!(
        out.contains("datadir.yaml: source.data-directory: only a physical backup reads"),
        "{out}"
    );
    assert!(
        out.contains("datadir.yaml: source.verify-checksums: only a physical backup reads pages"),
        "{out}"
    );
    assert!(
        out.contains(
            "relative.yaml: source.data-directory: give the data directory as an absolute path"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "datadir.yaml: source.archive-push-queue-max: only a physical backup archives WAL"
        ),
        "{out}"
    );
    assert!(
        out.contains("tiny.yaml: source.archive-push-queue-max: 8MB is less than one WAL segment"),
        "{out}"
    );
    assert!(
        out.contains("unit.yaml: source: \"4 GiB\": the unit must be kB, MB, GB or TB"),
        "{out}"
    );
    assert!(
        out.contains("fraction.yaml: source: \"1.5GB\" is not a whole number"),
        "{out}"
    );
}

#[test]
fn the_password_reaches_the_tools_in_the_environment_and_never_errors_or_records() {
    require_server();
    let sb = Sandbox::new();
    std::fs::write(sb.path().join("pg-password"), "s3cret-Pa55\n").unwrap();
    sb.policy(
        "pw",
        &format!(
            "name: pw\nsource:\n  kind: postgres\n  mode: logical\n  \
             url: {SERVER}/drctl_no_such_database\n  password-file: pg-password\n"
        ),
    );
    let run = sb
        .run(&["--json", "-vv", "backup", "--policy", "pw"])
        .code(1);
    assert!(!run.stdout.contains("s3cret") && !run.stderr.contains("s3cret"));
    let records = sb.records();
    assert!(!records[0].to_string().contains("s3cret"));

    // The tools get it in PGPASSWORD, not on their command line.
    let bin = sb.path().join("fake-bin");
    std::fs::create_dir(&bin).unwrap();
    let seen = sb.path().join("seen");
    std::fs::write(
        bin.join("psql"),
        format!(
            "#!/bin/sh\nprintf '%s|%s' \"$PGPASSWORD\" \"$*\" > {}\nexit 1\n",
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("psql"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run: Run = sb
        .cmd(&["backup", "--policy", "pw"])
        .env("PATH", path)
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1, "{}", run.stderr);
    let seen = std::fs::read_to_string(&seen).unwrap();
    let (password, args) = seen.split_once('|').unwrap();
    assert_eq!(password, "s3cret-Pa55");
    assert!(!args.contains("s3cret"), "{args}");

    // A password file that cannot be read fails before anything runs, naming the file only.
    std::fs::remove_file(sb.path().join("pg-password")).unwrap();
    let run = sb.run(&["backup", "--policy", "pw"]).code(1);
    assert!(run.stderr.contains("pg-password"), "{}", run.stderr);
}

// ---------------------------------------------------------------------------------------
// Physical: a scratch cluster with archive_command = drctl wal push.

/// A PostgreSQL server program: Debian's newest versioned directory, then pg_config, then PATH.
fn server_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        dirs.insert(
            0,
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        );
    }
    dirs.reverse();
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(name))
                    .find(|p| p.exists())
            })
        })
        .unwrap_or_else(|| {
            panic!("PostgreSQL server program {name} not found; run scripts/install-deps.sh (package postgresql)")
        })
}

/// The OS user the scratch servers run as: PostgreSQL refuses root, so root uses `postgres`.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "running as root needs an OS user `postgres`"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    Some((id("-u"), id("-g")))
}

fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Servers started by a test, stopped when it ends (also on panic).
#[derive(Default)]
struct Servers(Vec<PathBuf>);

impl Drop for Servers {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = as_server_user(&mut Command::new(server_bin("pg_ctl")))
                .arg("-D")
                .arg(dir)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}

/// A sandbox the server user owns, with a private copy of drctl (the build directory may
/// change under a long-running server).
struct Cluster {
    sb: Sandbox,
    drctl: PathBuf,
    data: PathBuf,
    port: u16,
    servers: Servers,
}

impl Cluster {
    fn start() -> Cluster {
        Self::start_with("", "")
    }

    /// With `settings` added to drctl.yaml and `policy` to the policy file.
    fn start_with(settings: &str, policy: &str) -> Cluster {
        let sb = Sandbox::with_settings(settings);
        let drctl = sb.path().join("drctl-bin");
        std::fs::copy(common::bin(), &drctl).unwrap();
        sb.policy(
            "pgphys",
            &format!("name: pgphys\nsource:\n  kind: postgres\n  mode: physical\n  url: PLACEHOLDER\n{policy}"),
        );
        let port = free_port();
        let policy = sb.path().join("policies/pgphys.yaml");
        let data = sb.path().join("data");
        let text = std::fs::read_to_string(&policy)
            .unwrap()
            .replace(
                "PLACEHOLDER",
                &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            )
            .replace("DATA_DIRECTORY", data.to_str().unwrap());
        std::fs::write(&policy, text).unwrap();
        if server_user().is_some() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(sb.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let mut c = Cluster {
            sb,
            drctl,
            data: data.clone(),
            port,
            servers: Servers::default(),
        };
        c.initdb();
        c.pg_ctl_start(&data);
        c
    }

    /// A new cluster in the data directory, archiving into policy `pgphys`.
    fn initdb(&self) {
        output_ok(
            as_server_user(&mut Command::new(server_bin("initdb")))
                .arg("-D")
                .arg(&self.data)
                .args(["-U", "postgres", "-A", "trust", "--no-sync", "-k"]),
        );
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '/tmp'\n\
             fsync = off\narchive_mode = on\n\
             archive_command = '{} -q --config {} wal push --policy pgphys %p'\n",
            self.port,
            self.drctl.display(),
            self.sb.path().join("drctl.yaml").display()
        );
        append(&self.data.join("postgresql.conf"), &conf);
        append(
            &self.data.join("pg_hba.conf"),
            "host replication postgres 127.0.0.1/32 trust\n",
        );
    }

    fn pg_ctl_start(&mut self, data: &Path) {
        output_ok(
            as_server_user(&mut Command::new(server_bin("pg_ctl")))
                .arg("-D")
                .arg(data)
                .arg("-l")
                .arg(data.join("server.log"))
                .args(["-w", "start"]),
        );
        self.servers.0.push(data.to_path_buf());
    }

    /// Creates tablespace `ts` in the sandbox's directory `ts`, which it returns.
    fn create_tablespace(&self) -> PathBuf {
        let location = self.sb.path().join("ts");
        std::fs::create_dir(&location).unwrap();
        if server_user().is_some() {
            output_ok(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&location),
            );
        }
        psql(
            &self.url(),
            &format!("CREATE TABLESPACE ts LOCATION '{}'", location.display()),
        );
        location
    }

    /// Stops or starts the cluster's server again.
    fn pg_ctl(&self, action: &str) {
        output_ok(
            as_server_user(&mut Command::new(server_bin("pg_ctl")))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.data.join("server.log"))
                .args(["-w", "-m", "fast", action]),
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs the private drctl as the server user.
    fn drctl(&self, args: &[&str]) -> Run {
        as_server_user(&mut Command::new(&self.drctl))
            .args(args)
            .current_dir(self.sb.path())
            .env("DRCTL_CONFIG", self.sb.path().join("drctl.yaml"))
            .env_remove("DRCTL_IDENTITY")
            .output()
            .unwrap()
            .into()
    }

    /// Table `t` gets rows 1..100, a base backup, rows 101..200, then (after the time
    /// returned, a second later) rows 201..300, which a restore to that time leaves out;
    /// their WAL is archived.
    fn incident(&self) -> String {
        psql(&self.url(), "CREATE TABLE t (id int PRIMARY KEY)");
        psql(&self.url(), "INSERT INTO t SELECT generate_series(1, 100)");
        self.drctl(&["backup", "--policy", "pgphys"]).ok();
        psql(
            &self.url(),
            "INSERT INTO t SELECT generate_series(101, 200)",
        );
        let noted = a_moment_apart();
        psql(
            &self.url(),
            "INSERT INTO t SELECT generate_series(201, 300)",
        );
        self.switch_wal();
        noted
    }

    /// Switches to a new WAL segment and waits until the old one is archived.
    fn switch_wal(&self) {
        switch_wal(&self.url(), &self.data.join("server.log"));
    }

    /// Restores into a new data directory; returns the run and the restored server's URL.
    fn restore(&mut self, dir: &str, extra: &[&str]) -> (Run, String) {
        let port = free_port();
        let target = self.sb.path().join(dir);
        let port_s = port.to_string();
        let mut args = vec![
            "--json",
            "restore",
            "--policy",
            "pgphys",
            "--backup",
            "latest",
            "--target",
            target.to_str().unwrap(),
            "--port",
            &port_s,
        ];
        args.extend_from_slice(extra);
        let run = self.drctl(&args);
        if target.join("postmaster.pid").exists() {
            self.servers.0.push(target);
        }
        (
            run,
            format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        )
    }
}

/// Switches the server at `url` to a new WAL segment and waits until the old one is
/// archived; `log` is its server log, shown on failure.
fn switch_wal(url: &str, log: &Path) {
    let wal = psql(url, "SELECT pg_walfile_name(pg_switch_wal())");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let archived = psql(
            url,
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        );
        if archived.as_str() >= wal.as_str() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "WAL {wal} was not archived; server log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A time (RFC 3339) more than a second after what was written before and before what is
/// written after, so that commit timestamps fall clearly on either side of it.
fn a_moment_apart() -> String {
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let noted = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    noted
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn ids(url: &str) -> String {
    psql(
        url,
        "SELECT count(*) || ' rows, ' || min(id) || '..' || max(id) FROM t",
    )
}

#[test]
fn physical_backup_and_wal_restore_to_a_point_in_time_and_to_the_latest() {
    let mut c = Cluster::start();
    psql(
        &c.url(),
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
    );
    psql(
        &c.url(),
        "INSERT INTO t (id) SELECT generate_series(1, 100)",
    );
    // What a base backup of a standby holds, which a restored server must not follow: it
    // would stream from that primary and never promote, or replay an hour late.
    let standby = c.data.join("standby.signal");
    std::fs::write(&standby, "").unwrap();
    psql(
        &c.url(),
        "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=9'",
    );
    psql(&c.url(), "ALTER SYSTEM SET recovery_min_apply_delay = '1h'");
    // Not loaded here (commits would wait for that standby), but in the backup: a restored
    // server would wait at every commit.
    psql(
        &c.url(),
        "ALTER SYSTEM SET synchronous_standby_names = 'gone'",
    );
    let run = c.drctl(&["--json", "backup", "--policy", "pgphys"]).ok();
    std::fs::remove_file(&standby).unwrap();
    psql(&c.url(), "ALTER SYSTEM RESET synchronous_standby_names");
    let manifest = &run.json()[0];
    let wal = &manifest["source"]["stats"]["wal"];
    assert_eq!(wal["timeline"], 1, "{manifest}");
    assert_eq!(manifest["point_in_time"]["lsn"], wal["stop_lsn"]);
    assert!(wal["start_wal"].as_str().unwrap().starts_with("00000001"));

    psql(
        &c.url(),
        "INSERT INTO t (id) SELECT generate_series(101, 200)",
    );
    let noted = a_moment_apart();
    psql(
        &c.url(),
        "INSERT INTO t (id) SELECT generate_series(201, 300)",
    );
    c.switch_wal();

    // WAL files are registered as incrementals of the base backup.
    let list = c.drctl(&["--json", "list", "--limit", "1000"]).ok().json();
    let base_id = manifest["backup_id"].as_str().unwrap();
    let after_base = list
        .iter()
        .filter(|r| r["type"] == "incremental" && r["manifest"]["parent_id"] == base_id)
        .count();
    assert!(after_base >= 1, "{list:?}");
    c.drctl(&["verify", "--all"]).ok();

    let (run, url) = c.restore("pitr", &["--until", &noted]);
    let run = run.ok();
    assert_eq!(ids(&url), "200 rows, 1..200", "{}", run.stdout);
    assert_eq!(
        run.json()[0]["postgres"]["databases"]["postgres"]["public.t"],
        200
    );

    let (run, url) = c.restore("latest", &[]);
    let run = run.ok();
    assert_eq!(ids(&url), "300 rows, 1..300");
    assert!(
        run.stderr.contains("was taken from a standby"),
        "{}",
        run.stderr
    );
    assert!(!c.sb.path().join("latest/standby.signal").exists());
    assert_eq!(psql(&url, "SHOW primary_conninfo"), "");
    assert_eq!(psql(&url, "SHOW synchronous_standby_names"), "");
    psql(&url, "CREATE TABLE written_after (id int)");
    // Recovery looked its WAL up in the index the restore wrote.
    let restore_command = psql(&url, "SHOW restore_command");
    assert!(restore_command.contains("--index"), "{restore_command}");
    assert!(c.sb.path().join("latest/drctl-wal-index.json").is_file());
    // The restored server does not archive into the source's policy.
    assert_eq!(psql(&url, "SHOW archive_mode"), "off");

    // Refused before anything is written: a base backup that ends after the target, which
    // cannot reach it, and a port in use (the cluster's own).
    let refused = |dir: &str, port: &str, extra: &[&str], said: &str| {
        let target = c.sb.path().join(dir);
        let restore = [
            "restore",
            "--policy",
            "pgphys",
            "--backup",
            base_id,
            "--target",
            target.to_str().unwrap(),
            "--port",
            port,
        ];
        let run = c.drctl(&[&restore[..], extra].concat()).code(2);
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
        assert!(!target.exists());
    };
    refused(
        "early",
        "5999",
        &["--until", "2000-01-01T00:00:00Z"],
        "after the recovery target",
    );
    refused("busy", &c.port.to_string(), &[], "is in use");
}

#[test]
fn a_base_backup_read_from_the_data_directory_while_rows_change_restores_them_all() {
    let mut c = Cluster::start_with("", "  data-directory: DATA_DIRECTORY\n");
    let url = c.url();
    // Few buffers and a checkpoint each round: changed pages reach the files while they are
    // read. WAL on another disk, as it often is: pg_wal is a link.
    psql(&url, "ALTER SYSTEM SET shared_buffers = '1MB'");
    c.pg_ctl("stop");
    let wal = c.sb.path().join("wal-disk");
    std::fs::rename(c.data.join("pg_wal"), &wal).unwrap();
    std::os::unix::fs::symlink(&wal, c.data.join("pg_wal")).unwrap();
    c.pg_ctl("start");
    psql(
        &url,
        "CREATE TABLE t (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0, pad text); \
         INSERT INTO t (id, pad) SELECT i, md5(i::text) FROM generate_series(1, 200000) i; \
         CREATE UNLOGGED TABLE scratch AS SELECT generate_series(1, 50000) AS i; \
         CHECKPOINT",
    );
    // Replaying the backup's WAL repairs the pages read half-written.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, rounds, url) = (stop.clone(), rounds.clone(), url.clone());
        std::thread::spawn(move || {
            // A slice of the table each round, so that each checkpoint's full-page images
            // stay a few hundred pages.
            let mut slice = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let from = slice % 40 * 5000;
                psql(
                    &url,
                    &format!(
                        "UPDATE t SET n = n + 1 WHERE id > {from} AND id <= {from} + 5000 \
                         AND id % 3 = 0; CHECKPOINT"
                    ),
                );
                slice += 1;
                rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    while rounds.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = rounds.load(std::sync::atomic::Ordering::SeqCst);
    let run = c.drctl(&["--json", "backup", "--policy", "pgphys"]).ok();
    let during = rounds.load(std::sync::atomic::Ordering::SeqCst) - before;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let manifest = &run.json()[0];
    let stats = &manifest["source"]["stats"];
    assert_eq!(stats["method"], "data-directory", "{manifest}");
    // The pages of the table's 200,000 rows and its index, and the catalogs', check out but
    // for those written since the backup started.
    assert!(
        stats["pages_checked"].as_u64().unwrap() > 1500,
        "{manifest}"
    );
    assert!(stats["pages_skipped"].as_u64().is_some(), "{manifest}");
    assert_eq!(stats["wal"]["included"], true);
    assert_eq!(manifest["point_in_time"]["lsn"], stats["wal"]["stop_lsn"]);
    let wanted = psql(&url, "SELECT sum(n) || ' ' || count(*) FROM t");
    c.switch_wal();

    // The archive holds the label and all the backup's WAL, marked archived, and leaves out
    // the server's runtime files and the unlogged table's data.
    let id = manifest["backup_id"].as_str().unwrap();
    let out = as_server_user(&mut Command::new(&c.drctl))
        .args(["restore", "--policy", "pgphys", "--backup", id, "--stdout"])
        .current_dir(c.sb.path())
        .env("DRCTL_CONFIG", c.sb.path().join("drctl.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names = Vec::new();
    let mut wal_dir = None;
    for entry in tar::Archive::new(&out.stdout[..]).entries().unwrap() {
        let entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if name == "pg_wal" {
            wal_dir = Some(entry.header().entry_type());
        }
        names.push(name);
    }
    // The link is archived as the directory it leads to.
    assert_eq!(wal_dir, Some(tar::EntryType::Directory));
    let has = |n: &str| names.iter().any(|x| x == n);
    let segno = |name: &str| parse_segment(name, common::WAL_SEGMENT).unwrap().1;
    let (first, last) = (
        stats["wal"]["start_wal"].as_str().unwrap(),
        stats["wal"]["stop_wal"].as_str().unwrap(),
    );
    for n in segno(first)..=segno(last) {
        let wal = segment_name(1, n, common::WAL_SEGMENT);
        assert!(has(&format!("pg_wal/{wal}")), "{wal} missing: {names:?}");
        assert!(has(&format!("pg_wal/archive_status/{wal}.done")), "{wal}");
    }
    assert!(has("backup_label") && has("global/pg_control"), "{names:?}");
    assert!(has("pg_stat_tmp") && has("pg_replslot"), "{names:?}");
    assert!(
        !has("postmaster.pid") && !has("postmaster.opts"),
        "{names:?}"
    );
    let scratch = psql(&url, "SELECT pg_relation_filepath('scratch')");
    assert!(has(&format!("{scratch}_init")), "{scratch} {names:?}");
    assert!(!has(&scratch), "the unlogged table's data was archived");
    assert!(during > 0, "no rows changed while the backup ran");

    let (run, restored) = c.restore("latest", &[]);
    run.ok();
    // Every update committed before the switch is there, and no page is torn: each page read
    // is checked against its checksum, and the index scan reads every index page.
    let sum = "SELECT sum(n) || ' ' || count(*) FROM t";
    assert_eq!(psql(&restored, sum), wanted);
    let by_index =
        format!("SET enable_seqscan = off; SET enable_bitmapscan = off; {sum} WHERE id > 0");
    assert_eq!(psql(&restored, &by_index), wanted);
    assert_eq!(psql(&restored, "SELECT count(*) FROM scratch"), "0");

    // A data directory that is not the server's is refused before the backup starts.
    let policy = c.sb.path().join("policies/pgphys.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let other = c.sb.path().join("latest");
    std::fs::write(
        &policy,
        text.replace(c.data.to_str().unwrap(), other.to_str().unwrap()),
    )
    .unwrap();
    let run = c.drctl(&["backup", "--policy", "pgphys"]).code(2);
    assert!(
        run.stderr.contains("is not the server's data directory"),
        "{}",
        run.stderr
    );
}

/// A copy of the cluster at the server's own path (a standby's, on a pair of hosts behind one
/// address) has the server's path and system identifier but not its latest checkpoint: it is
/// refused.
#[test]
fn a_copy_of_the_cluster_at_the_servers_path_is_refused() {
    assert!(
        server_user().is_some(),
        "this test runs as root, to show drctl a copy of the cluster in a mount namespace"
    );
    let c = Cluster::start_with("", "  data-directory: DATA_DIRECTORY\n");
    c.pg_ctl("stop");
    let copy = c.sb.path().join("data-copy");
    output_ok(Command::new("cp").arg("-a").arg(&c.data).arg(&copy));
    c.pg_ctl("start");
    // drctl, in a mount namespace of its own, finds the copy at the server's path.
    let run: Run = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount --bind \"$0\" \"$1\" && exec setpriv --reuid=postgres --regid=postgres \
             --init-groups \"$2\" backup --policy pgphys",
        )
        .arg(&copy)
        .arg(&c.data)
        .arg(&c.drctl)
        .current_dir(c.sb.path())
        .env("DRCTL_CONFIG", c.sb.path().join("drctl.yaml"))
        .env_remove("DRCTL_IDENTITY")
        .output()
        .unwrap()
        .into();
    let run = run.code(2);
    assert!(
        run.stderr
            .contains("does not hold the server's latest checkpoint: it is another copy"),
        "{}",
        run.stderr
    );
    c.drctl(&["backup", "--policy", "pgphys"]).ok();
}

/// A page damaged on disk fails a base backup, by either method, unless the policy turns the
/// checks off.
#[test]
fn a_page_that_fails_its_checksum_fails_the_base_backup() {
    let c = Cluster::start_with("", "  data-directory: DATA_DIRECTORY\n");
    let url = c.url();
    // Frozen and flushed, and left alone: the server has no reason to write its pages again.
    psql(
        &url,
        "CREATE TABLE t (id int, pad text) WITH (autovacuum_enabled = off); \
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 10000) i",
    );
    psql(&url, "VACUUM FREEZE t");
    psql(&url, "CHECKPOINT");
    let file = psql(&url, "SELECT pg_relation_filepath('t')");
    // A bit of one row in block 3 flips on disk; the clean copy in memory is never written back.
    damage_block(&c.data.join(&file), 3);

    let policy = c.sb.path().join("policies/pgphys.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let data_directory = format!("  data-directory: {}\n", c.data.display());
    assert!(text.contains(&data_directory), "{text}");
    let backup = |method: &str, checks: &str| {
        std::fs::write(&policy, text.replace(&data_directory, method) + checks).unwrap();
        c.drctl(&["--json", "backup", "--policy", "pgphys"])
    };
    let run = backup(&data_directory, "").code(4);
    assert!(
        run.stderr.contains(&format!(
            "a page of the data directory failed its checksum, read twice: {file} block 3 (checksum 0x"
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("verify-checksums: false"),
        "{}",
        run.stderr
    );
    // pg_basebackup refuses it too.
    let run = backup("", "").code(1);
    assert!(run.stderr.contains("checksum"), "{}", run.stderr);
    // Without the checks, both take the page as it is.
    for method in [&data_directory[..], ""] {
        let run = backup(method, "  verify-checksums: false\n").ok();
        let manifest = &run.json()[0];
        assert_eq!(manifest["source"]["descriptor"]["verify_checksums"], false);
        assert!(
            manifest["source"]["stats"].get("pages_checked").is_none(),
            "{manifest}"
        );
    }
    let records: Vec<serde_json::Value> = c.drctl(&["--json", "list"]).ok().json();
    let mut statuses: Vec<&str> = records
        .iter()
        .filter(|r| r["type"] == "full")
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        ["completed", "completed", "failed", "failed"],
        "{records:?}"
    );
}

/// Flips a bit in the rows of block `block` of the relation file `path`.
fn damage_block(path: &Path, block: u64) {
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = block * 8192 + 6000;
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&disk, &mut byte, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&disk, &[byte[0] ^ 0x10], at).unwrap();
}

/// A restore does not replay a `CREATE TABLESPACE` into a directory that holds data on its
/// host (on the cluster's own host, the cluster's tablespace); into an empty one it does.
#[test]
fn a_restore_does_not_replay_a_tablespace_into_a_directory_with_data() {
    let mut c = Cluster::start();
    let url = c.url();
    c.drctl(&["backup", "--policy", "pgphys"]).ok();
    let location = c.create_tablespace();
    psql(
        &url,
        "CREATE TABLE far (i int) TABLESPACE ts; \
         INSERT INTO far SELECT generate_series(1, 1000)",
    );
    let noted = a_moment_apart();
    c.switch_wal();
    let live = file_contents(&location);
    assert!(!live.is_empty());

    let (run, _) = c.restore("here", &[]);
    assert_ne!(run.code, 0, "{}", run.stdout);
    // wal fetch's refusal stops recovery; the server log holds it.
    let log =
        std::fs::read_to_string(c.sb.path().join("here/drctl-restore.log")).unwrap_or_default();
    let said = format!("{}{log}", run.stderr);
    assert!(
        said.contains(&format!(
            "at {}, which is not empty on this host",
            location.display()
        )),
        "{said}"
    );
    assert_eq!(
        file_contents(&location),
        live,
        "the cluster's tablespace changed"
    );
    assert_eq!(psql(&url, "SELECT count(*) FROM far"), "1000");

    // Once the cluster has dropped it, the location is empty and recovery fills it.
    psql(&url, "DROP TABLE far");
    psql(&url, "DROP TABLESPACE ts");
    c.switch_wal();
    assert!(file_contents(&location).is_empty());
    let (run, restored) = c.restore("there", &["--until", &noted]);
    run.ok();
    assert_eq!(psql(&restored, "SELECT count(*) FROM far"), "1000");
}

/// A cluster with a tablespace backs up from the data directory, and restores on its own
/// host with the tablespace in a directory of its own: the restored server never touches
/// the cluster's tablespace.
#[test]
fn a_tablespace_is_backed_up_and_restored_to_a_directory_of_its_own() {
    let mut c = Cluster::start_with("", "  data-directory: DATA_DIRECTORY\n");
    let url = c.url();
    let location = c.create_tablespace();
    psql(
        &url,
        "CREATE TABLE far (i int, pad text) WITH (autovacuum_enabled = off) TABLESPACE ts; \
         INSERT INTO far SELECT i, md5(i::text) FROM generate_series(1, 20000) i; \
         CREATE UNLOGGED TABLE scratch WITH (autovacuum_enabled = off) TABLESPACE ts AS SELECT generate_series(1, 1000) AS i",
    );
    let oid = psql(&url, "SELECT oid FROM pg_tablespace WHERE spcname = 'ts'");
    let run = c.drctl(&["--json", "backup", "--policy", "pgphys"]).ok();
    let stats = &run.json()[0]["source"]["stats"];
    let far = psql(&url, "SELECT pg_relation_filepath('far')");
    let scratch = psql(&url, "SELECT pg_relation_filepath('scratch')");
    // Rows written after the backup come from the WAL, into the restored tablespace.
    psql(
        &url,
        "INSERT INTO far SELECT i, md5(i::text) FROM generate_series(20001, 30000) i",
    );
    c.switch_wal();
    psql(&url, "CHECKPOINT");
    let live = file_contents(&location);

    // The archive holds the tablespace's files under pg_tblspc/OID, not the link.
    let id = run.json()[0]["backup_id"].as_str().unwrap().to_owned();
    let out = as_server_user(&mut Command::new(&c.drctl))
        .args(["restore", "--policy", "pgphys", "--backup", &id, "--stdout"])
        .current_dir(c.sb.path())
        .env("DRCTL_CONFIG", c.sb.path().join("drctl.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut kinds = BTreeMap::new();
    for entry in tar::Archive::new(&out.stdout[..]).entries().unwrap() {
        let entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        kinds.insert(name, entry.header().entry_type());
    }
    assert_eq!(
        kinds.get(&format!("pg_tblspc/{oid}")),
        Some(&tar::EntryType::Directory)
    );
    assert!(kinds.contains_key(&far), "{far} not archived: {kinds:?}");
    assert!(kinds.contains_key(&format!("{scratch}_init")));
    assert!(
        !kinds.contains_key(&scratch),
        "the unlogged table's data was archived"
    );
    assert!(
        stats["tablespaces"][&oid] == location.to_str().unwrap(),
        "{stats}"
    );

    // On the cluster's own host, the original location is the cluster's: refused before
    // anything is written.
    let (run, _) = c.restore("restored", &[]);
    let run = run.code(2);
    assert!(
        run.stderr.contains(&format!(
            "tablespace {oid} would be restored to {}, which is not empty",
            location.display()
        )) && run.stderr.contains("--tablespace-dir"),
        "{}",
        run.stderr
    );
    assert!(!c.sb.path().join("restored").exists());
    let elsewhere = c.sb.path().join("restored-tablespaces");
    let (run, restored) = c.restore(
        "restored",
        &["--tablespace-dir", elsewhere.to_str().unwrap()],
    );
    run.ok();
    assert_eq!(psql(&restored, "SELECT count(*) FROM far"), "30000");
    assert_eq!(psql(&restored, "SELECT count(*) FROM scratch"), "0");
    let moved = elsewhere.join(&oid);
    assert_eq!(
        psql(&restored, &format!("SELECT pg_tablespace_location({oid})")),
        moved.to_str().unwrap()
    );
    assert!(moved
        .join(far.trim_start_matches(&format!("pg_tblspc/{oid}/")))
        .is_file());
    psql(
        &restored,
        "INSERT INTO far VALUES (0, 'restored'); CHECKPOINT",
    );
    assert_eq!(
        file_contents(&location),
        live,
        "the cluster's tablespace changed"
    );
    assert_eq!(psql(&url, "SELECT count(*) FROM far"), "30000");

    // The tablespace's pages are checked too: a bit flipped in one of the table's blocks on
    // disk fails the next backup, naming it.
    psql(&url, "VACUUM FREEZE far");
    psql(&url, "CHECKPOINT");
    let far = psql(&url, "SELECT pg_relation_filepath('far')");
    damage_block(
        &location.join(far.trim_start_matches(&format!("pg_tblspc/{oid}/"))),
        2,
    );
    let run = c.drctl(&["backup", "--policy", "pgphys"]).code(4);
    assert!(
        run.stderr.contains(&format!("{far} block 2 (checksum 0x")),
        "{}",
        run.stderr
    );

    // pg_basebackup cannot stream such a cluster: without data-directory it is refused.
    let policy = c.sb.path().join("policies/pgphys.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let data_directory = format!("  data-directory: {}\n", c.data.display());
    std::fs::write(&policy, text.replace(&data_directory, "")).unwrap();
    let run = c.drctl(&["backup", "--policy", "pgphys"]).code(2);
    assert!(
        run.stderr.contains("the cluster has 1 tablespace(s)")
            && run.stderr.contains("set data-directory"),
        "{}",
        run.stderr
    );

    // On another host, where the original location is free, the tablespace goes back there.
    c.pg_ctl("stop");
    std::fs::rename(&location, c.sb.path().join("ts-of-the-stopped-cluster")).unwrap();
    let (run, original) = c.restore("original", &[]);
    run.ok();
    assert_eq!(psql(&original, "SELECT count(*) FROM far"), "30000");
    assert_eq!(
        psql(&original, &format!("SELECT pg_tablespace_location({oid})")),
        location.to_str().unwrap()
    );
}

/// A standby: a logical backup counts its unlogged tables as empty (the standby cannot read
/// them, and pg_dump dumps none of their rows there) and restores with matching counts; a
/// data-directory base backup is refused, as it reads a primary's files.
#[test]
fn a_standby_backs_up_logically_and_refuses_a_data_directory_backup() {
    let mut c = Cluster::start();
    let url = c.url();
    psql(
        &url,
        "CREATE TABLE kept AS SELECT generate_series(1, 500) AS i; \
         CREATE UNLOGGED TABLE scratch AS SELECT generate_series(1, 300) AS i",
    );
    let standby = c.sb.path().join("standby");
    output_ok(
        as_server_user(&mut Command::new(server_bin("pg_basebackup")))
            .arg("-D")
            .arg(&standby)
            .args(["-R", "-X", "stream", "-d", &url]),
    );
    let port = free_port();
    append(
        &standby.join("postgresql.conf"),
        &format!("port = {port}\n"),
    );
    c.pg_ctl_start(&standby);
    let standby_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    assert_eq!(psql(&standby_url, "SELECT pg_is_in_recovery()"), "t");

    logical_policy(&c.sb, "replica", &standby_url);
    let run = c.drctl(&["--json", "backup", "--policy", "replica"]).ok();
    let tables = &run.json()[0]["source"]["stats"]["tables"];
    assert_eq!(tables["public.kept"], 500, "{tables}");
    assert_eq!(tables["public.scratch"], 0, "{tables}");
    let copy = format!("postgres://postgres@127.0.0.1:{}/copy", c.port);
    c.drctl(&[
        "--json",
        "restore",
        "--policy",
        "replica",
        "--backup",
        "latest",
        "--to-database",
        &copy,
    ])
    .ok();
    assert_eq!(psql(&copy, "SELECT count(*) FROM kept"), "500");
    assert_eq!(psql(&copy, "SELECT count(*) FROM scratch"), "0");

    c.sb.policy(
        "standbyphys",
        &format!(
            "name: standbyphys\nsource:\n  kind: postgres\n  mode: physical\n  url: {standby_url}\n  \
             data-directory: {}\n",
            standby.display()
        ),
    );
    let run = c.drctl(&["backup", "--policy", "standbyphys"]).code(2);
    assert!(
        run.stderr
            .contains("the server is a standby: drctl reads the data directory of a primary only"),
        "{}",
        run.stderr
    );
}

/// The primary region is gone: a restore in the DR region fetches the WAL it replays from
/// there, and the restored server archives its new timeline there, where the next restore
/// follows it.
#[test]
fn a_physical_restore_in_the_dr_region_fetches_and_archives_its_wal_there() {
    moto::env();
    let replica = moto::url(&moto::bucket("pgdr"), "copies", "us-west-2", "");
    let mut c = Cluster::start_with(
        &format!(
            "regions:\n  us-west-2:\n    registry: sqlite://dr/registry.db\n    repository: {replica}\n"
        ),
        &format!("replicas:\n  - region: us-west-2\n    repository: {replica}\n"),
    );
    let noted = c.incident();

    // The primary region's repository and registry are gone.
    let config = c.sb.path().join("drctl.yaml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("repository: file://repo", "repository: file://gone")
        .replace("sqlite://registry.db", "sqlite://gone.db");
    std::fs::write(&config, text).unwrap();
    std::fs::remove_file(c.sb.path().join("registry.db")).unwrap();
    std::fs::remove_dir_all(c.sb.path().join("repo")).unwrap();
    assert_ne!(c.drctl(&["list"]).code, 0, "the primary region is unusable");

    let dr = ["--region", "us-west-2"];
    let (run, primary) = c.restore(
        "in-dr",
        &[&dr[..], &["--until", &noted, "--archive"]].concat(),
    );
    run.ok();
    assert_eq!(ids(&primary), "200 rows, 1..200");
    let archive_command = psql(&primary, "SHOW archive_command");
    assert!(
        archive_command.contains("wal push --region 'us-west-2'"),
        "{archive_command}"
    );
    psql(&primary, "INSERT INTO t SELECT generate_series(1001, 1100)");
    switch_wal(&primary, &c.sb.path().join("in-dr/drctl-restore.log"));

    let (run, url) = c.restore("in-dr-after", &dr);
    let report = run.ok().json();
    assert_eq!(ids(&url), "300 rows, 1..1100", "{report:?}");
    assert_eq!(
        psql(&url, "SELECT timeline_id FROM pg_control_checkpoint()"),
        "3"
    );
}

#[test]
fn a_restored_primary_archives_its_new_timeline_and_later_restores_follow_it() {
    let mut c = Cluster::start();
    let noted = c.incident();

    // Fail over: the restored server becomes the primary on timeline 2 and archives it.
    let (run, primary) = c.restore("primary2", &["--until", &noted, "--archive"]);
    let run = run.ok();
    assert!(
        run.stderr
            .contains("archives a new timeline into policy pgphys"),
        "{}",
        run.stderr
    );
    assert_eq!(ids(&primary), "200 rows, 1..200");
    assert_eq!(psql(&primary, "SHOW archive_mode"), "on");
    assert_eq!(
        psql(&primary, "SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    psql(&primary, "INSERT INTO t SELECT generate_series(1001, 1100)");
    switch_wal(&primary, &c.sb.path().join("primary2/drctl-restore.log"));

    // The archive now holds timeline 2's history; a restore from the same base backup
    // follows it: timeline 1 up to the branch, then timeline 2.
    let (run, _) = c.restore("after", &["--dry-run"]);
    let run = run.ok();
    // Timeline 1 went on past the branch (rows 201..300): a restore says what it leaves.
    assert!(
        run.stderr
            .contains("timeline 1 goes on in the archive to segment 00000001")
            && run.stderr.contains("--timeline 1 restores it instead"),
        "{}",
        run.stderr
    );
    let plan = run.json();
    assert_eq!(
        plan[0]["postgres"]["timelines"],
        serde_json::json!([1, 2]),
        "{plan:?}"
    );
    assert!(
        plan[0]["postgres"]["last_wal"]
            .as_str()
            .unwrap()
            .starts_with("00000002"),
        "{plan:?}"
    );
    c.drctl(&["verify", "--all"]).ok();
    let (run, url) = c.restore("after", &[]);
    run.ok();
    assert_eq!(ids(&url), "300 rows, 1..1100");
    assert_eq!(
        psql(&url, "SELECT count(*) FROM t WHERE id BETWEEN 201 AND 300"),
        "0"
    );

    // `--timeline current` stays on timeline 1: the old primary's rows, lost in the
    // failover, come back.
    let (run, _) = c.restore("old-primary", &["--timeline", "current", "--dry-run"]);
    let plan = run.ok().json();
    assert_eq!(
        plan[0]["postgres"]["timelines"],
        serde_json::json!([1]),
        "{plan:?}"
    );
    let (run, url) = c.restore("old-primary", &["--timeline", "current"]);
    run.ok();
    assert_eq!(ids(&url), "300 rows, 1..300");
}

/// A cluster created again under its policy (initdb, then a new base backup), whose WAL
/// names start over: its WAL is archived beside the old cluster's, and each base backup
/// restores with its own cluster's WAL.
#[test]
fn a_cluster_created_again_archives_beside_the_old_one_and_each_restores_its_own() {
    let mut c = Cluster::start();
    c.incident();
    let old_base = c
        .drctl(&["--json", "list", "--limit", "1000"])
        .ok()
        .json()
        .iter()
        .find(|r| r["type"] == "full")
        .map(|r| r["backup_id"].as_str().unwrap().to_owned())
        .unwrap();
    c.pg_ctl("stop");
    std::fs::remove_dir_all(&c.data).unwrap();
    c.initdb();
    c.pg_ctl("start");
    psql(&c.url(), "CREATE TABLE t (id int PRIMARY KEY)");
    psql(&c.url(), "INSERT INTO t SELECT generate_series(1, 40)");
    c.drctl(&["backup", "--policy", "pgphys"]).ok();
    psql(&c.url(), "INSERT INTO t SELECT generate_series(41, 50)");
    // Waits until the segment, named as one of the old cluster's, is archived.
    c.switch_wal();

    let (run, url) = c.restore("new", &[]);
    run.ok();
    assert_eq!(ids(&url), "50 rows, 1..50");
    let old = c.sb.path().join("old");
    let port = free_port().to_string();
    c.drctl(&[
        "restore",
        "--policy",
        "pgphys",
        "--backup",
        &old_base,
        "--target",
        old.to_str().unwrap(),
        "--port",
        &port,
    ])
    .ok();
    c.servers.0.push(old);
    assert_eq!(
        ids(&format!("postgres://postgres@127.0.0.1:{port}/postgres")),
        "300 rows, 1..300"
    );
}

#[test]
fn wal_push_is_idempotent_for_the_same_file_and_refuses_a_different_one() {
    // With a queue limit of one segment: the server's own pushes (one segment waiting) are
    // under it, and a copy outside pg_wal has no queue to measure, so nothing is dropped.
    let c = Cluster::start_with("", "  archive-push-queue-max: 16MB\n");
    c.switch_wal();
    let list = c.drctl(&["--json", "list"]).ok().json();
    let first = list
        .iter()
        .find(|r| r["type"] == "incremental")
        .expect("an archived WAL file");
    let id = first["backup_id"].as_str().unwrap();
    // Fetch it back, push the same bytes again under the same name: accepted, not stored twice.
    let dir = c.sb.path().join("walcopy");
    std::fs::create_dir(&dir).unwrap();
    if server_user().is_some() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
    }
    let show = c.drctl(&["--json", "show", id]).ok().json();
    let name = show[0]["manifest"]["source"]["descriptor"]["wal"]
        .as_str()
        .unwrap()
        .to_owned();
    let copy = dir.join(&name);
    let fetch_copy = || {
        c.drctl(&[
            "wal",
            "fetch",
            "--policy",
            "pgphys",
            &name,
            copy.to_str().unwrap(),
        ])
        .ok()
    };
    fetch_copy();
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 16 << 20);
    let run = c
        .drctl(&["wal", "push", "--policy", "pgphys", copy.to_str().unwrap()])
        .ok();
    assert!(run.stdout.contains("already archived"), "{}", run.stdout);
    let before = c
        .drctl(&["--json", "list", "--limit", "1000"])
        .ok()
        .json()
        .len();

    let original = std::fs::read(&copy).unwrap();
    let mut bytes = original.clone();
    bytes[100] ^= 0xff;
    std::fs::write(&copy, &bytes).unwrap();
    let run = c
        .drctl(&["wal", "push", "--policy", "pgphys", copy.to_str().unwrap()])
        .code(4);
    assert!(run.stderr.contains("different contents"), "{}", run.stderr);
    let after = c
        .drctl(&["--json", "list", "--limit", "1000"])
        .ok()
        .json()
        .len();
    assert_eq!(before, after);

    // Not a WAL name: refused before anything is read.
    let run = c
        .drctl(&["wal", "push", "--policy", "pgphys", "/etc/passwd"])
        .code(2);
    assert!(run.stderr.contains("not a WAL file name"), "{}", run.stderr);
    // A file that is not archived: exit 10, so recovery knows the archive ends here.
    c.drctl(&[
        "wal",
        "fetch",
        "--policy",
        "pgphys",
        "00000009.history",
        copy.to_str().unwrap(),
    ])
    .code(10);
    // Any other failure stops recovery (exit 126) instead of ending it there: a region
    // drctl.yaml does not name, a damaged object. Nothing is left at %p.
    let fresh = dir.join("fresh");
    let fetch = |extra: &[&str]| {
        let mut args = vec!["wal", "fetch", "--policy", "pgphys"];
        args.extend(extra);
        args.extend([name.as_str(), fresh.to_str().unwrap()]);
        c.drctl(&args).code(126)
    };
    let run = fetch(&["--region", "nowhere"]);
    assert!(run.stderr.contains("no region"), "{}", run.stderr);
    // An argument this drctl does not take (restore_command written by another version).
    let run = fetch(&["--from-another-version"]);
    assert!(run.stderr.contains("unexpected argument"), "{}", run.stderr);
    // An index that is missing, does not list the file, or names a backup that is gone:
    // the registry is asked.
    let index = dir.join("index.json");
    for listed in [
        None,
        Some("{}"),
        Some("{\"000000010000000000000001\": \"20200101T000000Z-00000000\"}"),
    ] {
        if let Some(listed) = listed {
            std::fs::write(&index, format!("{{\"files\": {listed}}}")).unwrap();
        }
        let out = dir.join("via-index");
        c.drctl(&[
            "wal",
            "fetch",
            "--policy",
            "pgphys",
            "--index",
            index.to_str().unwrap(),
            &name,
            out.to_str().unwrap(),
        ])
        .ok();
        assert!(std::fs::read(&out).unwrap() == original, "{listed:?}");
        std::fs::remove_file(&out).unwrap();
    }
    let object = c.sb.backup_dir("pgphys", id).join("data.wal.zst.age");
    let mut stored = std::fs::read(&object).unwrap();
    let near_end = stored.len() - 100;
    stored[near_end] ^= 1;
    std::fs::write(&object, &stored).unwrap();
    fetch(&[]);
    assert!(!fresh.exists());

    // Recorded, but its stored data gone (deleted by hand, a lifecycle rule): pushed again,
    // it is archived again rather than taken as archived.
    std::fs::write(&copy, &original).unwrap();
    for entry in std::fs::read_dir(c.sb.backup_dir("pgphys", id)).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("data.")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    let run = c
        .drctl(&["wal", "push", "--policy", "pgphys", copy.to_str().unwrap()])
        .ok();
    assert!(run.stderr.contains("archived again"), "{}", run.stderr);
    assert!(!run.stdout.contains("already archived"), "{}", run.stdout);
    assert_eq!(c.sb.status(id), "failed");
    std::fs::remove_file(&copy).unwrap();
    fetch_copy();
    assert!(std::fs::read(&copy).unwrap() == original);
}

#[test]
fn wal_beyond_archive_push_queue_max_is_dropped_and_verify_reports_the_gap() {
    let c = Cluster::start_with("", "  archive-push-queue-max: 48MB\n");
    psql(&c.url(), "CREATE TABLE t (id int)");
    let run = c.drctl(&["--json", "backup", "--policy", "pgphys"]).ok();
    let base = run.json()[0]["backup_id"].as_str().unwrap().to_owned();
    c.switch_wal();
    // Archiving stops (no archive command): four segments of 16MB queue up.
    let set = |command: &str| {
        psql(&c.url(), command);
        psql(&c.url(), "SELECT pg_reload_conf()");
    };
    // Restarted with it, so that the archiver has no other command.
    psql(&c.url(), "ALTER SYSTEM SET archive_command = ''");
    c.pg_ctl("restart");
    let before = psql(&c.url(), "SELECT last_archived_wal FROM pg_stat_archiver");
    let queued: Vec<String> = (0..4)
        .map(|_| {
            psql(&c.url(), "INSERT INTO t SELECT generate_series(1, 1000)");
            psql(&c.url(), "SELECT pg_walfile_name(pg_switch_wal())")
        })
        .collect();
    let ready = || {
        psql(
            &c.url(),
            "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'",
        )
    };
    assert_eq!(
        psql(&c.url(), "SELECT last_archived_wal FROM pg_stat_archiver"),
        before,
        "the archiver took a segment with its old command"
    );
    assert_eq!(ready(), "4");
    // Back to drctl: the oldest is pushed with 64MB waiting, more than 48MB, and is
    // dropped; each of the others with 48MB or less, and is archived.
    set("ALTER SYSTEM RESET archive_command");
    let last = &queued[3];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while psql(
        &c.url(),
        "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
    ) < *last
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{last} was not archived"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let list = c.drctl(&["--json", "list", "--limit", "1000"]).ok().json();
    let archived: Vec<&str> = list
        .iter()
        .filter_map(|r| r["manifest"]["source"]["descriptor"]["wal"].as_str())
        .collect();
    assert!(!archived.contains(&queued[0].as_str()), "{archived:?}");
    for name in &queued[1..] {
        assert!(archived.contains(&name.as_str()), "{name}: {archived:?}");
    }
    let log = std::fs::read_to_string(c.data.join("server.log")).unwrap();
    assert!(
        log.contains(&format!(
            "WAL segment {} dropped, not archived by this push: 64MB",
            queued[0]
        )),
        "{log}"
    );
    // The server counts the dropped segment as archived and recycles it; the archive has a
    // gap there, which verify reports.
    let run = c.drctl(&["verify", &base]);
    assert_ne!(run.code, 0);
    assert!(
        run.stdout.contains(queued[0].as_str()) || run.stderr.contains(queued[0].as_str()),
        "{}{}",
        run.stdout,
        run.stderr
    );
}

#[test]
fn a_missing_wal_segment_is_found_by_verify_and_by_the_restore_plan() {
    let mut c = Cluster::start();
    psql(&c.url(), "CREATE TABLE t (id int)");
    let run = c.drctl(&["--json", "backup", "--policy", "pgphys"]).ok();
    let base = run.json()[0]["backup_id"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        psql(&c.url(), "INSERT INTO t SELECT generate_series(1, 1000)");
        c.switch_wal();
    }
    c.drctl(&["verify", &base]).ok();
    let wal = c.drctl(&["--json", "show", &base]).ok().json()[0]["manifest"]["source"]["stats"]
        ["wal"]
        .clone();
    let (start, stop) = (
        wal["start_wal"].as_str().unwrap().to_owned(),
        wal["stop_wal"].as_str().unwrap().to_owned(),
    );
    let db = c.sb.path().join("registry.db");
    let forget = |id: &str| {
        output_ok(
            Command::new("sqlite3")
                .arg(&db)
                .arg(format!("DELETE FROM backups WHERE backup_id = '{id}'")),
        );
    };
    let list = c.drctl(&["--json", "list", "--limit", "1000"]).ok().json();
    let archived = |r: &serde_json::Value| {
        r["manifest"]["source"]["descriptor"]["wal"]
            .as_str()
            .filter(|n| n.len() == 24)
            .map(|n| (n.to_owned(), r["backup_id"].as_str().unwrap().to_owned()))
    };

    // Forget one segment after the base backup's own range.
    let mut names: Vec<(String, String)> = list
        .iter()
        .filter_map(archived)
        .filter(|(name, _)| *name > stop)
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    let (gap, gap_id) = &names[0];
    forget(gap_id);

    let run = c.drctl(&["verify", &base]);
    assert_ne!(run.code, 0);
    assert!(
        run.stdout.contains(gap.as_str()) || run.stderr.contains(gap.as_str()),
        "{}{}",
        run.stdout,
        run.stderr
    );

    let (run, _) = c.restore("gap", &[]);
    let run = run.code(4);
    assert!(
        run.stdout.contains(gap.as_str()) || run.stderr.contains(gap.as_str()),
        "{}",
        run.stderr
    );
    assert!(
        !c.sb.path().join("gap").exists(),
        "the plan wrote before it checked"
    );
    // The base backup carries the WAL of its own range: without the archive's copies it
    // still restores to its end.
    assert_eq!(wal["included"], true, "{wal}");
    for (name, id) in list.iter().filter_map(archived) {
        if name >= start && name <= stop {
            forget(&id);
        }
    }
    let stop_lsn = wal["stop_lsn"].as_str().unwrap();
    let (run, url) = c.restore("own-wal", &["--lsn", stop_lsn]);
    run.ok();
    assert_eq!(psql(&url, "SELECT count(*) FROM t"), "0");
}

/// `wal push` refuses what is no segment of the policy's cluster. An archived segment
/// recovery cannot read (here a segment header without records, pushed under the next
/// name) ends recovery early: the restore fails instead of reporting a server that lacks what the
/// archive holds.
#[test]
fn a_recovery_that_ends_before_the_last_archived_segment_fails_the_restore() {
    let mut c = Cluster::start();
    c.incident();
    let last = psql(&c.url(), "SELECT last_archived_wal FROM pg_stat_archiver");
    let (timeline, segno) = parse_segment(&last, common::WAL_SEGMENT).unwrap();
    let next = segment_name(timeline, segno + 1, common::WAL_SEGMENT);
    let unreadable = c.sb.path().join(&next);
    let push = || {
        c.drctl(&[
            "wal",
            "push",
            "--policy",
            "pgphys",
            unreadable.to_str().unwrap(),
        ])
    };
    let refused = |bytes: &[u8], says: &str| {
        std::fs::write(&unreadable, bytes).unwrap();
        let run = push().code(2);
        assert!(run.stderr.contains(says), "{}", run.stderr);
    };
    // Zeros are no segment at all.
    refused(
        &vec![0u8; 16 << 20],
        &format!("{next} is not that WAL segment"),
    );
    // A segment header, then no records: refused while it names another cluster than the
    // base backup's, then archived.
    let mut segment = common::wal_segment(&next, 16 << 20, 0);
    refused(&segment, &format!("{next} was written by cluster 0"));
    let system: i64 = psql(
        &c.url(),
        "SELECT system_identifier FROM pg_control_system()",
    )
    .parse()
    .unwrap();
    segment[24..32].copy_from_slice(&system.to_ne_bytes());
    std::fs::write(&unreadable, &segment).unwrap();
    push().ok();

    let (run, _) = c.restore("short", &[]);
    let run = run.code(4);
    assert!(
        run.stderr.contains("recovery ended at LSN") && run.stderr.contains(&next),
        "{}",
        run.stderr
    );
}
