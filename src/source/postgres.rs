//! PostgreSQL: `logical` streams `pg_dump -Fc` and records per-table row counts taken in the
//! dump's own snapshot; `physical` writes a base backup as tar and records the WAL range
//! (timeline, start and stop LSN) it needs. The base backup is streamed by `pg_basebackup`,
//! or, given the data directory, read from the files between `pg_backup_start` and
//! `pg_backup_stop`. WAL segments arrive separately, one per `drctl wal push` ([`WalSource`]).
//!
//! The password never appears on a command line, in the descriptor or in an error: it is
//! handed to the client tools in `PGPASSWORD`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::command::stream_stdout;
pub use super::command::SqlSession as Session;
use super::files::{self, Tar};
use super::pgpage::{self, u16_at, u32_at, u64_at};
use super::pgwal::{LONG_PAGE_HEADER, XLP_LONG_HEADER};
use super::{Source, Stats};
use crate::cancel::Cancel;
use crate::config::policy::PostgresMode;
use crate::format::manifest::PointInTime;
use crate::{Error, Result};

/// How to reach a server: a URL without a password, and the password on the side.
#[derive(Clone)]
pub struct Conn {
    pub url: String,
    password: Option<String>,
}

impl Conn {
    /// Reads the password from `password_file` or the variable `password_env`, if given.
    pub fn new(
        url: &str,
        password_file: Option<&Path>,
        password_env: Option<&str>,
    ) -> Result<Conn> {
        let password = super::read_password(password_file, password_env)?;
        Ok(Conn {
            url: url.to_owned(),
            password,
        })
    }

    /// The same server and credentials, another database.
    pub fn with_database(&self, database: &str) -> Result<Conn> {
        let mut u = url::Url::parse(&self.url)
            .map_err(|e| Error::invalid(format!("invalid PostgreSQL URL: {e}")))?;
        u.set_path(&format!(
            "/{}",
            percent_encoding::utf8_percent_encode(database, percent_encoding::NON_ALPHANUMERIC)
        ));
        Ok(Conn {
            url: u.to_string(),
            password: self.password.clone(),
        })
    }

    /// The database the URL names.
    pub fn database(&self) -> Option<String> {
        let u = url::Url::parse(&self.url).ok()?;
        let db = u.path().trim_start_matches('/');
        // As libpq reads it.
        (!db.is_empty()).then(|| super::url_decode(db))
    }

    /// Options for an in-process connection (sqlx), as the client tools would connect.
    pub fn connect_options(&self) -> Result<sqlx::postgres::PgConnectOptions> {
        use sqlx::ConnectOptions;
        let mut options: sqlx::postgres::PgConnectOptions = self
            .url
            .parse()
            .map_err(|e| Error::invalid(format!("invalid PostgreSQL URL: {e}")))?;
        if let Some(p) = &self.password {
            options = options.password(p);
        }
        Ok(options
            .application_name("drctl restore")
            .disable_statement_logging())
    }

    /// A client tool command with the password in its environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        // Never a password prompt on the terminal, which would hold the run up unseen.
        cmd.arg("--no-password");
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.env("PGAPPNAME", format!("drctl {program}"));
        cmd
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Conn")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A `psql` session on this connection.
    pub fn session(&self) -> Result<Session> {
        let mut cmd = self.command("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &self.url,
        ]);
        // A role's or database's timeouts must not end a long count or the snapshot a dump
        // holds open, as pg_dump and pg_restore clear them for their own sessions.
        let mut session = Session::start(cmd, |mark| format!("\\echo {mark}"))?;
        session.query(NO_TIMEOUTS)?;
        Ok(session)
    }
}

/// Clears the session's statement, lock, idle and transaction timeouts (those the server
/// has).
pub const NO_TIMEOUTS: &str = "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN \
     ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', \
     'idle_session_timeout', 'transaction_timeout')";

/// SQL for a table's name as the server quotes it (`schema."Table"`), hex-encoded: a name
/// may hold a line break, which would split psql's one-row-per-line output.
pub fn quoted_name_hex(schema: &str, table: &str) -> String {
    format!("encode(convert_to(format('%I.%I', {schema}, {table}), 'UTF8'), 'hex')")
}

/// What tells a table apart, from its name as [`quoted_name_hex`] gives it: its schema's and
/// its own name, unquoted. The servers that count rows at backup and at restore may quote
/// names differently (each version its own keywords; `quote_all_identifiers`). A name that
/// does not parse is its own key.
pub fn table_key(quoted: &str) -> String {
    /// One identifier at the start of `s`, unquoted, and the rest.
    fn ident(s: &str) -> Option<(String, &str)> {
        match s.strip_prefix('"') {
            Some(mut rest) => {
                let mut name = String::new();
                loop {
                    let end = rest.find('"')?;
                    name.push_str(&rest[..end]);
                    rest = &rest[end + 1..];
                    match rest.strip_prefix('"') {
                        Some(more) => {
                            name.push('"');
                            rest = more;
                        }
                        None => return Some((name, rest)),
                    }
                }
            }
            None => {
                let end = s.find('.').unwrap_or(s.len());
                Some((s[..end].to_owned(), &s[end..]))
            }
        }
    }
    let parsed = ident(quoted).and_then(|(schema, rest)| {
        let (table, rest) = ident(rest.strip_prefix('.')?)?;
        rest.is_empty().then(|| format!("{schema}\0{table}"))
    });
    parsed.unwrap_or_else(|| quoted.to_owned())
}

/// Runs `sql`, whose rows are names from [`quoted_name_hex`], and decodes them.
pub fn quoted_names(session: &mut Session, sql: &str) -> Result<Vec<String>> {
    session
        .query(sql)?
        .into_iter()
        .map(|h| {
            hex::decode(&h)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| Error::failure(format!("psql: bad table name {h:?}")))
        })
        .collect()
}

/// The quoted names of the relations (`pg_class c`, `pg_namespace n`) that `clause` (a
/// WHERE clause, and any ordering) selects.
pub fn relations(session: &mut Session, clause: &str) -> Result<Vec<String>> {
    quoted_names(
        session,
        &format!(
            "SELECT {} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace {clause}",
            quoted_name_hex("n.nspname", "c.relname")
        ),
    )
}

/// The ordinary tables of the session's database (no system schemas), quoted, largest first.
pub fn tables(session: &mut Session) -> Result<Vec<String>> {
    relations(
        session,
        "WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' \
         AND n.nspname NOT LIKE 'pg\\_%' ORDER BY c.relpages DESC, 1",
    )
}

/// Exact row counts of every ordinary table, in the session's current snapshot (a
/// transaction that pg_dump shares, while pg_dump holds its locks), and the tables left
/// uncounted; `locked` is called once the tables are locked. Each table is locked for the
/// transaction first, without waiting: one whose lock would wait has an ACCESS EXCLUSIVE request queued behind pg_dump's (a `TRUNCATE`,
/// an `ALTER`), which changes it once pg_dump is done; counted then, in this snapshot, it
/// would show what that statement left (a truncated table, empty). Such a table, and one
/// dropped since the snapshot, is left uncounted.
pub fn row_counts(
    session: &mut Session,
    locked: impl FnOnce(),
) -> Result<(BTreeMap<String, u64>, Vec<String>)> {
    // A standby cannot read unlogged tables, and pg_dump dumps none of their rows there.
    let unread = relations(
        session,
        "WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND pg_is_in_recovery()",
    )?;
    let tables = tables(session)?;
    let uncounted = lock_tables(session, &tables)?;
    locked();
    let mut counts = BTreeMap::new();
    for table in tables.into_iter().filter(|t| !uncounted.contains(t)) {
        let n = if unread.contains(&table) {
            0
        } else {
            count_rows(session, &table)?
        };
        counts.insert(table, n);
    }
    Ok((counts, uncounted))
}

/// Locks `tables` (quoted names) in ACCESS SHARE mode for the session's transaction
/// without waiting, each in a subtransaction of its own; returns those it could not lock.
fn lock_tables(session: &mut Session, tables: &[String]) -> Result<Vec<String>> {
    let list = serde_json::to_string(tables)?;
    session.query(&format!(
        "SELECT set_config('drctl.tables', '{}', true)",
        list.replace('\'', "''")
    ))?;
    session.query(
        "DO $$ DECLARE t text; missed jsonb := '[]'; BEGIN \
           FOR t IN SELECT jsonb_array_elements_text(current_setting('drctl.tables')::jsonb) LOOP \
             BEGIN EXECUTE 'LOCK TABLE ' || t || ' IN ACCESS SHARE MODE NOWAIT'; \
             EXCEPTION WHEN lock_not_available OR undefined_table THEN \
               missed := missed || to_jsonb(t); END; \
           END LOOP; \
           PERFORM set_config('drctl.unlocked', missed::text, true); END $$",
    )?;
    let missed = session.value("SELECT current_setting('drctl.unlocked')")?;
    serde_json::from_str(&missed)
        .map_err(|e| Error::failure(format!("psql: bad list of tables {missed:?}: {e}")))
}

pub fn count_rows(session: &mut Session, table: &str) -> Result<u64> {
    let n = session.value(&format!("SELECT count(*) FROM {table}"))?;
    n.parse()
        .map_err(|_| Error::failure(format!("psql: bad row count {n:?} for {table}")))
}

/// Exact row counts of every ordinary table of a database nothing else writes to (a restored
/// one), counted over `jobs` connections, largest tables first.
pub fn row_counts_parallel(conn: &Conn, jobs: usize) -> Result<BTreeMap<String, u64>> {
    let mut first = conn.session()?;
    let queue = std::collections::VecDeque::from(tables(&mut first)?);
    let jobs = jobs.clamp(1, queue.len().max(1));
    let queue = std::sync::Mutex::new(queue);
    let work = |session: &mut Session| -> Result<Vec<(String, u64)>> {
        let mut done = Vec::new();
        while let Some(table) = queue.lock().expect("queue lock").pop_front() {
            let n = count_rows(session, &table)?;
            done.push((table, n));
        }
        Ok(done)
    };
    let results: Vec<Result<Vec<(String, u64)>>> = std::thread::scope(|scope| {
        let others: Vec<_> = (1..jobs)
            .map(|_| {
                scope.spawn(|| {
                    let mut session = conn.session()?;
                    let done = work(&mut session)?;
                    session.close()?;
                    Ok(done)
                })
            })
            .collect();
        let mut results = vec![work(&mut first).and_then(|done| {
            first.close()?;
            Ok(done)
        })];
        results.extend(others.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::failure("row count thread panicked")))
        }));
        results
    });
    let mut counts = BTreeMap::new();
    for result in results {
        counts.extend(result?);
    }
    Ok(counts)
}

/// pg_dump's output on its way to the pipeline, held at its first bytes until the row count
/// has locked its tables. pg_dump writes nothing before it holds its own lock on every
/// table it dumps (its custom format's table of contents comes first), and a count that
/// locked a table before pg_dump did would hold pg_dump up behind any ACCESS EXCLUSIVE
/// request made meanwhile (a `TRUNCATE`, an `ALTER`), which would wait for the count's
/// transaction, which waits for pg_dump: a wait the server cannot see, with the table's
/// queries queued behind it. Holding the output back makes pg_dump wait, once the pipe is
/// full, until the count holds its locks too (see [`row_counts`]).
struct LocksFirst<'a> {
    inner: &'a mut dyn Write,
    /// Told when pg_dump's first bytes arrive; dropped if none do.
    began: Option<std::sync::mpsc::SyncSender<()>>,
    /// Told (or dropped) once the count holds its locks.
    locked: Option<std::sync::mpsc::Receiver<()>>,
}

impl Write for LocksFirst<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(began) = self.began.take() {
            let _ = began.send(());
        }
        if let Some(locked) = self.locked.take() {
            let _ = locked.recv();
        }
        self.inner.write(data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub struct PostgresSource {
    mode: PostgresMode,
    conn: Conn,
    data_directory: Option<PathBuf>,
    verify_checksums: bool,
    point_in_time: Option<PointInTime>,
}

impl PostgresSource {
    pub fn new(
        mode: PostgresMode,
        conn: Conn,
        data_directory: Option<PathBuf>,
        verify_checksums: bool,
    ) -> Self {
        PostgresSource {
            mode,
            conn,
            data_directory,
            verify_checksums,
            point_in_time: None,
        }
    }

    fn logical(&mut self, out: &mut dyn Write, cancel: &Cancel) -> Result<Stats> {
        let mut session = self.conn.session()?;
        session.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        let snapshot = session.value("SELECT pg_export_snapshot()")?;
        // The snapshot's moment: its transaction's start time and the WAL position.
        let at = session.value(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') || ' ' || \
             CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END",
        )?;
        let (time, lsn) = at.split_once(' ').unwrap_or((&at, ""));
        self.point_in_time = Some(PointInTime {
            timestamp: chrono::DateTime::parse_from_rfc3339(time)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc)),
            lsn: parse_lsn(lsn).map(format_lsn),
            binlog: None,
        });
        // Count rows in the exported snapshot while pg_dump streams it, once pg_dump holds
        // its table locks (see `LocksFirst`); the transaction stays open until the dump is
        // done so pg_dump can import the snapshot.
        let pid = session.value("SELECT pg_backend_pid()")?;
        let (began, dump_began) = std::sync::mpsc::sync_channel(1);
        let (locked, count_locked) = std::sync::mpsc::sync_channel(1);
        let counter = std::thread::spawn(move || {
            let counts = match dump_began.recv() {
                Ok(()) => row_counts(&mut session, move || {
                    let _ = locked.send(());
                }),
                Err(_) => Err(Error::failure("pg_dump wrote nothing; rows not counted")),
            };
            (session, counts)
        });
        let mut cmd = self.conn.command("pg_dump");
        cmd.args(["-Fc", "-Z0", "--snapshot", &snapshot, "-d", &self.conn.url]);
        let mut gated = LocksFirst {
            inner: out,
            began: Some(began),
            locked: Some(count_locked),
        };
        let streamed = stream_stdout(cmd, &mut gated, cancel);
        drop(gated);
        if streamed.is_err() {
            // The backup has failed: stop counting rather than scan the rest of the tables.
            if let Ok(mut s) = self.conn.session() {
                let _ = s.query(&format!("SELECT pg_cancel_backend({pid})"));
                let _ = s.close();
            }
        }
        let (mut session, counts) = counter
            .join()
            .map_err(|_| Error::failure("row count thread failed"))?;
        let streamed = streamed?;
        let (counts, uncounted) = counts?;
        session.query("COMMIT")?;
        session.close()?;
        let mut stats = Stats::new();
        stats.insert("mode".into(), "logical".into());
        stats.insert("bytes".into(), streamed.bytes.into());
        stats.insert("tables".into(), serde_json::to_value(counts)?);
        if !uncounted.is_empty() {
            tracing::warn!(
                "tables not counted, as a statement waiting for pg_dump's lock was to change \
                 them (a TRUNCATE, an ALTER): {}; the restore does not check their rows",
                uncounted.join(", ")
            );
            stats.insert("uncounted".into(), serde_json::to_value(uncounted)?);
        }
        Ok(stats)
    }

    fn physical(&mut self, out: &mut dyn Write, cancel: &Cancel) -> Result<Stats> {
        let mut session = self.conn.session()?;
        let archive_mode = session.value("SELECT current_setting('archive_mode')")?;
        let segment_size = session.value(
            "SELECT setting::bigint * (CASE unit WHEN 'MB' THEN 1048576 ELSE 1 END) \
             FROM pg_settings WHERE name = 'wal_segment_size'",
        )?;
        // Recorded so that `wal push` refuses another cluster's WAL.
        let system = session.value("SELECT system_identifier FROM pg_control_system()")?;
        if archive_mode == "off" {
            return Err(Error::invalid(
                "archive_mode is off: a physical backup without archived WAL cannot be restored",
            )
            .hint("set archive_mode = on and archive_command = 'drctl --config /path/drctl.yaml wal push --policy NAME %p', then restart the server"));
        }
        let segment_size: u64 = segment_size
            .parse()
            .map_err(|_| Error::failure(format!("bad wal_segment_size {segment_size:?}")))?;
        // The directory to read is the server's, checked before anything is reserved; one
        // path for everything read, as names in the archive are relative to it.
        let data_dir = match &self.data_directory {
            Some(dir) => {
                let dir = std::fs::canonicalize(dir)
                    .map_err(|e| Error::io(format!("data-directory {}", dir.display()), e))?;
                check_data_directory(&mut session, &system, &dir)?;
                Some(dir)
            }
            None => None,
        };
        if data_dir.is_none() {
            no_tablespaces(&mut session)?;
        }
        // The base backup carries the WAL from its start to its end, so it is consistent on
        // its own and the server does not wait for that WAL to be archived. A temporary
        // replication slot keeps the server from recycling it meanwhile; it goes with the
        // session, even if drctl dies. The session idles while the files are read, so no
        // idle timeout may end it (nor the slot with it).
        session.query(
            "SELECT set_config(name, '0', false) FROM pg_settings \
             WHERE name = 'idle_session_timeout'",
        )?;
        // Named after the session's server process, which no other live session shares (a
        // drctl process ID does: PID 1 in every container).
        let slot = session
            .value(
                "SELECT slot_name FROM pg_create_physical_replication_slot(\
                 'drctl_basebackup_' || pg_backend_pid(), true, true)",
            )
            .map_err(|e| {
                e.context("reserve the base backup's WAL with a temporary replication slot")
                    .hint("the backup user needs the REPLICATION attribute and the server max_replication_slots > 0")
            })?;
        let (mut range, mut stats) = match data_dir {
            Some(dir) => {
                self.read_data_directory(&mut session, &slot, &dir, segment_size, out, cancel)?
            }
            None => {
                let streamed = self.stream_base_backup(segment_size, out, cancel)?;
                // One created as it ran is in the backup's WAL, which a restore would replay.
                no_tablespaces(&mut session)?;
                streamed
            }
        };
        // The base backup holds all the WAL it needs; the slot is no longer needed.
        if let Err(e) = session.close() {
            tracing::warn!(error = %e, "the session that held the base backup's replication slot failed");
        }
        range.included = true;
        // Consistent from the stop LSN on, which the server has just reached.
        self.point_in_time = Some(PointInTime {
            timestamp: Some(chrono::Utc::now()),
            lsn: Some(range.stop_lsn.clone()),
            binlog: None,
        });
        stats.insert("mode".into(), "physical".into());
        stats.insert("system_identifier".into(), system.into());
        stats.insert("wal".into(), serde_json::to_value(range)?);
        Ok(stats)
    }

    /// `pg_basebackup -X fetch` as one tar on its standard output; the backup manifest it
    /// appends names the WAL range.
    fn stream_base_backup(
        &self,
        segment_size: u64,
        out: &mut dyn Write,
        cancel: &Cancel,
    ) -> Result<(WalRange, Stats)> {
        let mut cmd = self.conn.command("pg_basebackup");
        cmd.args(["-D", "-", "-Ft", "-X", "fetch", "-c", "fast"])
            .args(["-d", &self.conn.url]);
        if !self.verify_checksums {
            cmd.arg("--no-verify-checksums");
        }
        let mut tap = TarTap::new(out, "backup_manifest");
        let streamed = stream_stdout(cmd, &mut tap, cancel)?;
        let range = WalRange::from_manifest(&String::from_utf8_lossy(&tap.captured), segment_size)?;
        let mut stats = Stats::new();
        stats.insert("method".into(), "pg_basebackup".into());
        stats.insert("bytes".into(), streamed.bytes.into());
        Ok((range, stats))
    }

    /// A base backup read from the data directory (canonical, checked by
    /// [`check_data_directory`]), as pgBackRest takes one: the files between
    /// `pg_backup_start` and `pg_backup_stop` (leaving out what `pg_basebackup` leaves out, and
    /// `global/pg_control` until the end), then the `backup_label` the server returns and the
    /// WAL from the start to the stop LSN, read from `pg_wal` while `session`'s replication slot
    /// `slot` holds it. Torn pages in files written meanwhile are repaired by replaying that WAL,
    /// which holds full page images for the backup's duration. Pages are checked against
    /// their checksums as they are read, unless the policy turns that off.
    fn read_data_directory(
        &self,
        session: &mut Session,
        slot: &str,
        data_dir: &Path,
        segment_size: u64,
        out: &mut dyn Write,
        cancel: &Cancel,
    ) -> Result<(WalRange, Stats)> {
        let conn = &self.conn;
        let tablespaces = linked_tablespaces(data_dir)?;
        let row = session.value(
            "SELECT current_setting('server_version_num') || ' ' || catalog_version_no \
             FROM pg_control_system()",
        )?;
        let (version, catalog) = row
            .split_once(' ')
            .and_then(|(v, c)| Some((v.parse::<u32>().ok()?, c)))
            .ok_or_else(|| Error::failure(format!("bad server version {row:?}")))?;
        // The directory a tablespace holds this server version's files in.
        let version_dir = format!("PG_{}_{catalog}", version / 10000);
        let (start_call, stop_call) = if version >= 150000 {
            ("pg_backup_start('drctl', true)", "pg_backup_stop(false)")
        } else {
            (
                "pg_start_backup('drctl', true, false)",
                "pg_stop_backup(false, false)",
            )
        };
        let start = session.value(&format!("SELECT {start_call}"))?;
        let start =
            parse_lsn(&start).ok_or_else(|| Error::failure(format!("bad start LSN {start:?}")))?;
        check_checkpoint(conn, data_dir, start)?;
        let pages = match self.verify_checksums {
            true => page_check(session, start)?,
            false => None,
        };

        let mut out = Counted {
            inner: out,
            bytes: 0,
        };
        let mut tar = files::tar_builder(&mut out);
        // A path's name in the archive: under the data directory, or a tablespace's file as
        // if its directory were in pg_tblspc (where a restore puts it).
        let archived = |path: &Path| -> Option<PathBuf> {
            if let Ok(rel) = path.strip_prefix(data_dir) {
                return Some(rel.to_owned());
            }
            tablespaces.iter().find_map(|(name, dir)| {
                let rest = path.strip_prefix(dir).ok()?;
                Some(Path::new("pg_tblspc").join(name).join(rest))
            })
        };
        let left_out = |path: &Path| {
            archived(path).is_some_and(|rel| left_out_of_base_backup(&rel, path, &version_dir))
        };
        let inspect = |path: &Path| -> Option<files::Seen<'_>> {
            let rel = archived(path)?;
            let mut file = pages.as_ref()?.file(path, &rel)?;
            Some(Box::new(move |data: &[u8]| file.feed(data)))
        };
        let mut walk = files::Walk::new(
            files::Rules {
                base: Some(data_dir),
                excluded: &left_out,
                one_file_system: false,
                changes_expected: true,
                inspect: Some(&inspect),
            },
            cancel,
        );
        walk.visit_root(&mut tar, data_dir)?;
        for (name, dir) in &tablespaces {
            walk.visit_root_as(&mut tar, dir, &Path::new("pg_tblspc").join(name))?;
        }
        let counts = walk.counts;
        let pages = pages.map(pgpage::PageCheck::finish).transpose()?;
        // pg_control last, as pg_basebackup sends it, read until two reads agree: the server may
        // rewrite it meanwhile, and a torn copy would not start.
        let control = data_dir.join("global/pg_control");
        let control_meta =
            std::fs::metadata(&control).map_err(|e| Error::io("stat global/pg_control", e))?;
        append_made(
            &mut tar,
            &control_meta,
            "global/pg_control",
            Some(&read_settled(&control)?),
        )?;

        // The label and map come back hex-encoded: psql prints one row per line.
        let stopped = session
        .value(&format!(
            "SELECT lsn || ' ' || encode(convert_to(labelfile, 'UTF8'), 'hex') || ' ' || \
             encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') FROM {stop_call}"
        ))
        .map_err(|e| {
            e.hint("if the server log says the backup's replication slot was invalidated, the backup outlasted max_slot_wal_keep_size: raise it")
        })?;
        let mut fields = stopped.split(' ');
        let (Some(stop), Some(label), Some(map)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(Error::failure(format!(
                "unexpected pg_backup_stop result {stopped:?}"
            )));
        };
        let stop =
            parse_lsn(stop).ok_or_else(|| Error::failure(format!("bad stop LSN {stop:?}")))?;
        let label = hex::decode(label)
            .map_err(|_| Error::failure("bad backup_label from pg_backup_stop"))?;
        // The tablespaces the server listed as the backup started (its tablespace map) must
        // be the ones read, before the start and again now: one created or dropped meanwhile
        // is in the backup's WAL.
        let map = hex::decode(map)
            .map_err(|_| Error::failure("bad tablespace map from pg_backup_stop"))?;
        let listed = parse_tablespace_map(&String::from_utf8_lossy(&map));
        let read: Vec<&String> = tablespaces.iter().map(|(name, _)| name).collect();
        if !listed.keys().eq(read) || linked_tablespaces(data_dir)? != tablespaces {
            return Err(Error::invalid(
                "a tablespace was created or dropped as the backup ran: take the backup again",
            ));
        }
        let timeline = String::from_utf8_lossy(&label)
            .lines()
            .find_map(|l| l.strip_prefix("START TIMELINE: "))
            .and_then(|t| t.trim().parse::<u32>().ok())
            .ok_or_else(|| {
                Error::failure("the backup_label from pg_backup_stop names no START TIMELINE")
            })?;
        let range = WalRange::new(timeline, start, stop, segment_size);

        let dir_meta = std::fs::metadata(data_dir)
            .map_err(|e| Error::io(format!("stat {}", data_dir.display()), e))?;
        append_made(&mut tar, &dir_meta, "backup_label", Some(&label))?;
        for dir in
            EMPTIED_DIRS
                .iter()
                .chain(&["pg_wal", "pg_wal/archive_status", "pg_wal/summaries"])
        {
            if data_dir.join(dir).is_dir() {
                append_made(&mut tar, &dir_meta, dir, None)?;
            }
        }
        let wal_dir = data_dir.join("pg_wal");
        for name in range.segments() {
            append_wal(
                &mut tar,
                &wal_dir,
                &name,
                Some(segment_size),
                &dir_meta,
                cancel,
            )?;
        }
        // Every timeline's history, as pg_basebackup sends them.
        let mut histories: Vec<String> = std::fs::read_dir(&wal_dir)
            .map_err(|e| Error::io(format!("list {}", wal_dir.display()), e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.strip_suffix(".history")
                    .is_some_and(|t| t.len() == 8 && is_upper_hex(t))
            })
            .collect();
        histories.sort();
        for name in &histories {
            append_wal(&mut tar, &wal_dir, name, None, &dir_meta, cancel)?;
        }
        // The slot held the WAL unless max_slot_wal_keep_size let the server remove it.
        let status = session.value(&format!(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))?;
        if status == "lost" {
            return Err(Error::failure(
            "the server removed WAL the base backup needs while it was read (max_slot_wal_keep_size)",
        ));
        }
        files::finish(tar)?;
        let mut stats = counts.into_stats();
        stats.insert("method".into(), "data-directory".into());
        stats.insert("bytes".into(), out.bytes.into());
        if !listed.is_empty() {
            stats.insert("tablespaces".into(), serde_json::to_value(&listed)?);
        }
        if let Some(pages) = pages {
            stats.insert("pages_checked".into(), pages.good.into());
            stats.insert("pages_skipped".into(), pages.skipped.into());
        }
        Ok((range, stats))
    }
}

/// The page checks of a base backup that started at `start`, if the cluster has data
/// checksums.
fn page_check(session: &mut Session, start: u64) -> Result<Option<pgpage::PageCheck>> {
    let row = session.value(
        "SELECT current_setting('data_checksums') || ' ' || current_setting('block_size') \
         || ' ' || setting FROM pg_settings WHERE name = 'segment_size'",
    )?;
    let bad = || Error::failure(format!("unexpected page settings {row:?}"));
    let fields: Vec<&str> = row.split(' ').collect();
    let [checksums, block_size, segment] = fields[..] else {
        return Err(bad());
    };
    if checksums != "on" {
        tracing::info!("the cluster has no data checksums: its pages are not checked");
        return Ok(None);
    }
    let block_size = block_size.parse().map_err(|_| bad())?;
    let blocks_per_segment = segment.parse().map_err(|_| bad())?;
    pgpage::PageCheck::new(start, block_size, blocks_per_segment).map(Some)
}

/// Refuses a data directory that is not the primary's `session` is connected to: the path
/// the server reports and the system identifier in `global/pg_control` (the server's:
/// `system`) must match.
fn check_data_directory(session: &mut Session, system: &str, data_dir: &Path) -> Result<()> {
    let row = session
        .value("SELECT pg_is_in_recovery() || ' ' || current_setting('data_directory')")
        .map_err(|e| {
            e.context("read the server's data directory")
                .hint("the backup user needs to be a superuser or a member of pg_read_all_settings")
        })?;
    let (recovery, server_dir) = row.split_once(' ').unwrap_or((&row, ""));
    if recovery == "true" {
        return Err(Error::invalid(
            "the server is a standby: drctl reads the data directory of a primary only",
        )
        .hint("remove data-directory to back the standby up through pg_basebackup"));
    }
    if std::fs::canonicalize(server_dir).ok().as_deref() != Some(data_dir) {
        return Err(Error::invalid(format!(
            "data-directory {} is not the server's data directory {server_dir:?}",
            data_dir.display()
        ))
        .hint(NOT_THE_SERVERS));
    }
    let control = data_dir.join("global/pg_control");
    let mut id = [0u8; 8];
    std::fs::File::open(&control)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
        .map_err(|e| Error::io(format!("read {}", control.display()), e))?;
    // The server shows it as a bigint.
    if i64::from_ne_bytes(id).to_string() != system {
        return Err(Error::invalid(format!(
            "{} belongs to another cluster than the server's (system identifier {system})",
            control.display()
        ))
        .hint(NOT_THE_SERVERS));
    }
    Ok(())
}

const NOT_THE_SERVERS: &str = "data-directory must be the data directory of the server the policy's URL reaches, on this host; without it drctl streams the backup through pg_basebackup";

/// Refuses a directory whose `global/pg_control` does not hold the checkpoint the server has
/// just taken for the backup, which starts at its redo LSN `start`: a standby's copy of the
/// cluster on the same path (as in a pair of hosts behind one address) has the same path and
/// system identifier, but not the same files.
fn check_checkpoint(conn: &Conn, data_dir: &Path, start: u64) -> Result<()> {
    let control = data_dir.join("global/pg_control");
    // ControlFileData (PostgreSQL 10 and later): system_identifier, versions, state, time,
    // then the latest checkpoint's LSN at offset 32 and its redo LSN at 40.
    let lsn_at = |bytes: &[u8], at: usize| bytes.get(..at + 8).map(|b| u64_at(b, at));
    let mut failed = None;
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let bytes = read_settled(&control)?;
        if lsn_at(&bytes, 40) == Some(start) {
            return Ok(());
        }
        // A later checkpoint: the server's own pg_control must name the same one. The
        // server's read fails if a checkpoint rewrites the file meanwhile, and another
        // checkpoint may come between the two reads: ask again.
        let server = conn
            .session()
            .and_then(|mut s| s.value("SELECT checkpoint_lsn FROM pg_control_checkpoint()"));
        match server {
            Ok(lsn) if parse_lsn(&lsn).is_some() && parse_lsn(&lsn) == lsn_at(&bytes, 32) => {
                return Ok(())
            }
            Ok(_) => {}
            Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = failed {
        return Err(e.context("read the server's latest checkpoint"));
    }
    Err(Error::invalid(format!(
        "{} does not hold the server's latest checkpoint: it is another copy of the cluster",
        control.display()
    ))
    .hint(NOT_THE_SERVERS))
}

/// Counts the bytes written through it.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Refuses a cluster with tablespaces (but `pg_default` and `pg_global`), which
/// `pg_basebackup` cannot stream as one archive.
fn no_tablespaces(session: &mut Session) -> Result<()> {
    let count =
        session.value("SELECT count(*) FROM pg_tablespace WHERE oid NOT IN (1663, 1664)")?;
    if count != "0" {
        return Err(Error::invalid(format!(
            "the cluster has {count} tablespace(s), which pg_basebackup cannot stream to drctl as one archive"
        ))
        .hint("back the cluster up from its data directory: set data-directory in the policy"));
    }
    Ok(())
}

/// A tablespace map (`tablespace_map`, as `pg_backup_stop` returns it): a line per
/// tablespace, its OID, a space and its location, in which the server escapes a backslash,
/// a line feed or a carriage return with a backslash.
fn parse_tablespace_map(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars();
    loop {
        let oid: String = chars.by_ref().take_while(|&c| c != ' ').collect();
        if oid.is_empty() {
            return out;
        }
        let mut location = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => location.extend(chars.next()),
                '\n' => break,
                c => location.push(c),
            }
        }
        out.insert(oid, location);
    }
}

/// The tablespaces outside the data directory: each link in `pg_tblspc` named by a
/// tablespace's OID (the server ignores other names) and the directory it leads to. A tablespace directory inside
/// `pg_tblspc` (in place) is part of the data directory's walk; one inside the data
/// directory elsewhere is refused, as its files would be read twice.
fn linked_tablespaces(data_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = data_dir.join("pg_tblspc");
    let listed =
        std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in listed {
        let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let link = entry.path();
        let is_link = std::fs::symlink_metadata(&link)
            .map_err(|e| Error::io(format!("stat {}", link.display()), e))?
            .file_type()
            .is_symlink();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_link || !is_digits(&name) {
            continue;
        }
        let target = std::fs::canonicalize(&link)
            .map_err(|e| Error::io(format!("tablespace {}", link.display()), e))?;
        if target.starts_with(data_dir) {
            return Err(Error::invalid(format!(
                "tablespace {} lies inside the data directory, at {}",
                link.display(),
                target.display()
            )));
        }
        out.push((name, target));
    }
    out.sort();
    Ok(out)
}

/// Appends `pg_wal/NAME`, which must be there whole (`size`, for a segment), and its
/// `.done` status file, so that a server restored from the backup does not archive it again.
fn append_wal(
    tar: &mut Tar<'_>,
    wal_dir: &Path,
    name: &str,
    size: Option<u64>,
    owner: &std::fs::Metadata,
    cancel: &Cancel,
) -> Result<()> {
    let path = wal_dir.join(name);
    let file = std::fs::File::open(&path)
        .map_err(|e| Error::io(format!("read WAL {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if size.is_some_and(|size| size != meta.len()) {
        return Err(Error::failure(format!(
            "WAL segment {} holds {} bytes, not a segment's {}",
            path.display(),
            meta.len(),
            size.unwrap_or_default()
        )));
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    let mut reader = files::ExactReader::new(file, meta.len(), cancel);
    tar.append_data(&mut header, format!("pg_wal/{name}"), &mut reader)
        .map_err(|e| Error::io(format!("archive {}", path.display()), e))?;
    if reader.changed() {
        return Err(Error::failure(format!(
            "WAL file {} changed size while read",
            path.display()
        )));
    }
    append_made(
        tar,
        owner,
        &format!("pg_wal/archive_status/{name}.done"),
        Some(b""),
    )
}

/// Directories whose contents a base backup leaves out: the server recreates or resets them.
/// They are archived empty, as directories even where they are links.
const EMPTIED_DIRS: &[&str] = &[
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files of the top directory a base backup leaves out.
const LEFT_OUT_FILES: &[&str] = &[
    "backup_label",
    "backup_manifest",
    "current_logfiles.tmp",
    "postgresql.auto.conf.tmp",
    "postmaster.opts",
    "postmaster.pid",
    "tablespace_map",
];

/// What the walk of a data directory leaves out, as `pg_basebackup` does, given a path's
/// name in the archive (`rel`): the server's runtime files, temporary files, temporary and
/// unlogged relations (all but the init fork, from which the server resets them), a
/// tablespace's files of other server versions than `version_dir`'s, the links in
/// `pg_tblspc` (their directories are walked on their own), other symlinks, FIFOs and
/// sockets. `pg_wal`, the [`EMPTIED_DIRS`] and `global/pg_control` are added separately.
fn left_out_of_base_backup(rel: &Path, path: &Path, version_dir: &str) -> bool {
    let parts: Vec<_> = rel.iter().map(|p| p.to_str().unwrap_or("")).collect();
    let Some(&name) = parts.last() else {
        return false;
    };
    if name.starts_with("pgsql_tmp") || name.starts_with("pg_internal.init") {
        return true;
    }
    let by_name = match parts.as_slice() {
        [name] => *name == "pg_wal" || LEFT_OUT_FILES.contains(name) || EMPTIED_DIRS.contains(name),
        ["global", "pg_control"] => true,
        ["base", _, name] | ["pg_tblspc", _, _, _, name] => relation_left_out(path, name),
        ["pg_tblspc", _, version] => *version != version_dir,
        ["pg_tblspc", _] => path.is_symlink(),
        _ => false,
    };
    if by_name {
        return true;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => {
            tracing::warn!(path = %path.display(), "left out of the base backup: not a file or a directory");
            true
        }
        // Gone, or not: the walk finds out.
        _ => false,
    }
}

/// A temporary relation's file (`t3_16384`), or an unlogged relation's file other than its
/// init fork (`16384`, `16384_fsm`, `16384.1` next to `16384_init`).
fn relation_left_out(path: &Path, name: &str) -> bool {
    if let Some(rest) = name.strip_prefix('t') {
        if rest
            .split_once('_')
            .is_some_and(|(backend, _)| is_digits(backend))
        {
            return true;
        }
    }
    let stem = name.split('.').next().unwrap_or(name);
    let (node, fork) = stem.split_once('_').unwrap_or((stem, ""));
    if !is_digits(node) || fork == "init" {
        return false;
    }
    path.with_file_name(format!("{node}_init")).exists()
}

/// A small file's contents, read until two reads in a row agree.
fn read_settled(path: &Path) -> Result<Vec<u8>> {
    let read = || std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e));
    let mut last = read()?;
    for _ in 0..100 {
        let again = read()?;
        if again == last {
            return Ok(again);
        }
        last = again;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(Error::failure(format!(
        "{} kept changing while read",
        path.display()
    )))
}

/// Appends an entry drctl makes: a file holding `data`, or a directory (`None`), owned like
/// `owner`.
fn append_made(
    tar: &mut Tar<'_>,
    owner: &std::fs::Metadata,
    name: &str,
    data: Option<&[u8]>,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(owner, tar::HeaderMode::Complete);
    header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
    match data {
        Some(data) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o600);
            header.set_size(data.len() as u64);
        }
        None => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o700);
            header.set_size(0);
        }
    }
    tar.append_data(&mut header, name, data.unwrap_or_default())
        .map_err(|e| Error::io(format!("archive {name}"), e))
}

impl Source for PostgresSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }
    fn artifact(&self) -> String {
        match self.mode {
            PostgresMode::Logical => "pgdump".into(),
            PostgresMode::Physical => "tar".into(),
        }
    }
    fn descriptor(&self) -> serde_json::Value {
        let mode = match self.mode {
            PostgresMode::Logical => "logical",
            PostgresMode::Physical => "physical",
        };
        let mut d = serde_json::json!({ "mode": mode, "url": self.conn.url });
        if !self.verify_checksums {
            d["verify_checksums"] = false.into();
        }
        if let Some(dir) = &self.data_directory {
            d["data_directory"] = dir.to_string_lossy().into();
        }
        d
    }
    fn run(
        &mut self,
        out: &mut dyn Write,
        _index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats> {
        match self.mode {
            PostgresMode::Logical => self.logical(out, cancel),
            PostgresMode::Physical => self.physical(out, cancel),
        }
    }
    fn point_in_time(&self) -> Option<PointInTime> {
        self.point_in_time.clone()
    }
}

/// The WAL a base backup needs to become consistent: segments `start_wal` to `stop_wal`
/// of `timeline`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WalRange {
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub segment_size: u64,
    /// The base backup holds segments `start_wal` to `stop_wal` itself (in `pg_wal/`).
    #[serde(default)]
    pub included: bool,
}

impl WalRange {
    /// Reads the WAL range from (the end of) a backup manifest.
    fn from_manifest(manifest: &str, segment_size: u64) -> Result<WalRange> {
        let field = |name: &str| {
            let rest = manifest.split("\"WAL-Ranges\"").nth(1)?;
            let value = rest.split(&format!("\"{name}\":")).nth(1)?;
            let value = value.trim_start().trim_start_matches('"');
            let end = value.find(['"', ',', ' ', '}'])?;
            Some(value[..end].to_owned())
        };
        let timeline = field("Timeline").and_then(|t| t.parse::<u32>().ok());
        let start = field("Start-LSN").as_deref().and_then(parse_lsn);
        let stop = field("End-LSN").as_deref().and_then(parse_lsn);
        let (Some(timeline), Some(start), Some(stop)) = (timeline, start, stop) else {
            return Err(Error::failure(
                "the base backup holds no backup_manifest with a WAL range; PostgreSQL 13 or later is needed",
            ));
        };
        Ok(WalRange::new(timeline, start, stop, segment_size))
    }

    /// The names of segments `start_wal` to `stop_wal`.
    fn segments(&self) -> impl Iterator<Item = String> + '_ {
        let segno = |name: &str| parse_segment(name, self.segment_size).map_or(0, |(_, n)| n);
        (segno(&self.start_wal)..=segno(&self.stop_wal))
            .map(|n| segment_name(self.timeline, n, self.segment_size))
    }

    fn new(timeline: u32, start: u64, stop: u64, segment_size: u64) -> WalRange {
        // The stop LSN may sit exactly on a segment boundary: the last record ends before it.
        let stop_segment = stop.saturating_sub(1).max(start) / segment_size;
        WalRange {
            timeline,
            start_lsn: format_lsn(start),
            stop_lsn: format_lsn(stop),
            start_wal: segment_name(timeline, start / segment_size, segment_size),
            stop_wal: segment_name(timeline, stop_segment, segment_size),
            segment_size,
            included: false,
        }
    }
}

/// Passes a tar stream through and keeps the last [`TAP_TAIL`] bytes of one entry.
struct TarTap<'a> {
    inner: &'a mut dyn Write,
    entry: &'static str,
    header: Vec<u8>,
    /// Bytes left in the current entry's data (with padding), and whether to keep them.
    remaining: u64,
    data_left: u64,
    capture: bool,
    captured: Vec<u8>,
}

const TAP_TAIL: usize = 64 << 10;

impl<'a> TarTap<'a> {
    fn new(inner: &'a mut dyn Write, entry: &'static str) -> Self {
        TarTap {
            inner,
            entry,
            header: Vec::with_capacity(512),
            remaining: 0,
            data_left: 0,
            capture: false,
            captured: Vec::new(),
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(data.len());
                let keep = (self.data_left as usize).min(n);
                if self.capture {
                    self.captured.extend_from_slice(&data[..keep]);
                    if self.captured.len() > 2 * TAP_TAIL {
                        self.captured.drain(..self.captured.len() - TAP_TAIL);
                    }
                }
                self.data_left -= keep as u64;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (512 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 512 {
                let h = std::mem::take(&mut self.header);
                let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
                let size = std::str::from_utf8(&h[124..136])
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim_matches(['\0', ' ']), 8).ok())
                    .unwrap_or(0);
                let name = &h[..name_end];
                self.capture = name == self.entry.as_bytes()
                    || name.strip_prefix(b"./") == Some(self.entry.as_bytes());
                if self.capture {
                    self.captured.clear();
                }
                self.data_left = size;
                self.remaining = size.div_ceil(512) * 512;
            }
        }
    }
}

impl Write for TarTap<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.observe(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Parses `16/B374D848`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The file name of WAL segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per_id = 0x1_0000_0000 / segment_size;
    format!("{timeline:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// Timeline and segment number of a segment file name.
pub fn parse_segment(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    if !is_segment_name(name) {
        return None;
    }
    let tli = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..], 16).ok()?;
    Some((tli, log * (0x1_0000_0000 / segment_size) + seg))
}

/// Whether `s` is a number in decimal digits (an OID, a relation file's node or segment).
pub fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `name` names a whole segment (not a partial one, nor a history file).
fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && is_upper_hex(name)
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Whether `name` is a file PostgreSQL archives: a segment, a partial segment, a timeline
/// history file or a backup history file. Nothing else is accepted as a WAL name.
pub fn is_wal_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && is_upper_hex(s);
    match name.split('.').collect::<Vec<_>>()[..] {
        [seg] => hex(seg, 24),
        [seg, "partial"] => hex(seg, 24),
        [tli, "history"] => hex(tli, 8),
        [seg, off, "backup"] => hex(seg, 24) && hex(off, 8),
        _ => false,
    }
}

/// One archived WAL file, read from the server's `pg_wal`.
pub struct WalSource {
    path: PathBuf,
    name: String,
    /// The cluster's system identifier, from the header of a segment checked up front.
    system: Option<i64>,
    /// The size of that segment's file.
    size: Option<u64>,
}

impl WalSource {
    /// `path` as the archive command's `%p`; its file name must be a WAL name.
    pub fn new(path: PathBuf) -> Result<WalSource> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_wal_name(n))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{} is not a WAL file name (segment, .partial, .history or .backup)",
                    path.display()
                ))
            })?
            .to_owned();
        // A segment in pg_wal is checked before anything is recorded; a file that is not
        // regular (a pipe) only as it streams.
        let (mut system, mut size) = (None, None);
        if holds_segment(&name) {
            let meta = std::fs::metadata(&path)
                .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
            if meta.is_file() {
                let file = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                let mut head = Vec::with_capacity(LONG_PAGE_HEADER);
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(file, LONG_PAGE_HEADER as u64),
                    &mut head,
                )
                .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                SegmentCheck::new(&name).check_size(&head, meta.len())?;
                // xlp_sysid, which the server shows as a bigint.
                system = Some(u64_at(&head, 24) as i64);
                size = Some(meta.len());
            }
        } else {
            system = control_system_identifier(&path);
        }
        Ok(WalSource {
            path,
            name,
            system,
            size,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The system identifier of the cluster that wrote the file: a segment's header's
    /// `xlp_sysid`, where it was read before the push; for a history or backup history
    /// file, which holds none, that of the cluster whose `pg_wal` it is in.
    pub fn system_identifier(&self) -> Option<i64> {
        self.system
    }

    /// For a whole segment, the WAL waiting for the archive command, this segment included:
    /// PostgreSQL marks each segment it has not archived yet with a `NAME.ready` note in
    /// `archive_status` beside it (`%p` is `pg_wal/NAME`), and every segment of a cluster
    /// has this one's size. Returns the bytes waiting and the segment size; `None` for
    /// other WAL files (history, backup labels, partial segments), which are small and
    /// never dropped, and for a file outside a `pg_wal` (one pushed by hand, a pipe) or
    /// beside an `archive_status` that cannot be read, whose queue is unknown.
    pub fn archive_queue(&self) -> Option<(u64, u64)> {
        let size = self
            .size
            .filter(|&s| s > 0 && is_segment_name(&self.name))?;
        let status = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("archive_status"),
            _ => PathBuf::from("archive_status"),
        };
        let unknown = |e: std::io::Error| {
            tracing::warn!(dir = %status.display(), error = %e, "cannot read the archive status beside the segment: its queue is unknown");
            None
        };
        let entries = match std::fs::read_dir(&status) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(dir = %status.display(), "no archive status beside the segment: its queue is unknown");
                return None;
            }
            Err(e) => return unknown(e),
        };
        let mut ready = 0;
        for entry in entries {
            let name = match entry {
                Ok(entry) => entry.file_name(),
                Err(e) => return unknown(e),
            };
            if name
                .to_str()
                .and_then(|n| n.strip_suffix(".ready"))
                .is_some_and(is_segment_name)
            {
                ready += 1;
            }
        }
        Some((ready * size, size))
    }
}

impl Source for WalSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }
    fn artifact(&self) -> String {
        "wal".into()
    }
    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({ "mode": "wal", "wal": self.name })
    }
    fn run(
        &mut self,
        out: &mut dyn Write,
        _index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats> {
        let mut stats = Stats::new();
        // Recorded so that a cluster created again under the policy, whose WAL names start
        // over, archives beside the old one's files and restores read only their own.
        if let Some(system) = self.system {
            stats.insert("system_identifier".into(), system.to_string().into());
        }
        if self.name.ends_with(".history") {
            // Small: read whole, so the switch points can go into the manifest, where a
            // restore plan finds them without decrypting anything.
            let text = std::fs::read(&self.path)
                .map_err(|e| Error::io(format!("read {}", self.path.display()), e))?;
            let history = parse_history(&String::from_utf8_lossy(&text))
                .map_err(|e| e.context(format!("timeline history file {}", self.path.display())))?;
            out.write_all(&text).map_err(|e| Error::io("write", e))?;
            stats.insert("bytes".into(), text.len().into());
            stats.insert("history".into(), serde_json::to_value(history)?);
            return Ok(stats);
        }
        if !holds_segment(&self.name) {
            let bytes = super::copy_file(&self.path, out, cancel)?;
            stats.insert("bytes".into(), bytes.into());
            return Ok(stats);
        }
        // A segment (or a partial one): its first page header must name it.
        let check = SegmentCheck::new(&self.name);
        let mut checked = Checked {
            inner: out,
            check: &check,
            head: Vec::with_capacity(LONG_PAGE_HEADER),
        };
        let bytes = super::copy_file(&self.path, &mut checked, cancel)?;
        check.check_size(&checked.head, bytes)?;
        stats.insert("bytes".into(), bytes.into());
        Ok(stats)
    }
}

/// The system identifier in `global/pg_control` of the data directory whose `pg_wal` holds
/// `path` (PostgreSQL runs the archive command there, with `%p` as `pg_wal/NAME`); None
/// for a file elsewhere or an unreadable control file.
fn control_system_identifier(path: &Path) -> Option<i64> {
    let dir = path.parent()?;
    if dir.file_name()? != "pg_wal" {
        return None;
    }
    let control = dir.parent()?.join("global/pg_control");
    let mut first = [0u8; 8];
    let mut file = std::fs::File::open(control).ok()?;
    std::io::Read::read_exact(&mut file, &mut first).ok()?;
    // ControlFileData begins with system_identifier.
    Some(u64_at(&first, 0) as i64)
}

/// Whether a WAL file name (see [`is_wal_name`]) is a segment's or a partial segment's, not
/// a timeline history or backup history file.
fn holds_segment(name: &str) -> bool {
    !name.ends_with(".history") && !name.ends_with(".backup")
}

/// What a WAL segment must be to be archived under its name: its first page header a long
/// header whose page address is the start of the segment the name gives, in segments of the
/// size it states, and (but for a `.partial` one) that size long. Another file under a
/// segment's name, a truncated or a zeroed one is refused.
struct SegmentCheck<'a> {
    /// The file name, and the segment's name in it.
    name: &'a str,
    segment: &'a str,
}

impl<'a> SegmentCheck<'a> {
    fn new(name: &'a str) -> Self {
        SegmentCheck {
            name,
            segment: name.get(..24).unwrap_or(name),
        }
    }

    fn check_head(&self, head: &[u8]) -> Result<()> {
        let Some(h) = head.get(..LONG_PAGE_HEADER) else {
            return Err(self.refused("it is too short"));
        };
        let info = u16_at(h, 2);
        let page = u64_at(h, 8);
        let size = segment_size_in(h);
        if info & XLP_LONG_HEADER == 0
            || !size.is_power_of_two()
            || !(1 << 20..=1 << 30).contains(&size)
        {
            return Err(self.refused("its first page has no segment header"));
        }
        match parse_segment(self.segment, size).and_then(|(_, segno)| segno.checked_mul(size)) {
            Some(start) if start == page => Ok(()),
            _ => Err(self.refused(&format!("its first page is at LSN {}", format_lsn(page)))),
        }
    }

    /// After [`SegmentCheck::check_head`]: a whole segment is as long as its header says.
    fn check_size(&self, head: &[u8], len: u64) -> Result<()> {
        self.check_head(head)?;
        let size = segment_size_in(head);
        if self.name.len() == 24 && len != size {
            return Err(self.refused(&format!("it holds {len} bytes, not a segment's {size}")));
        }
        Ok(())
    }

    fn refused(&self, why: &str) -> Error {
        Error::invalid(format!("{} is not that WAL segment: {why}", self.name))
    }
}

/// `xlp_seg_size` of a long page header.
fn segment_size_in(head: &[u8]) -> u64 {
    head.get(..36).map_or(0, |h| u64::from(u32_at(h, 32)))
}

/// Passes a WAL segment through, checking its header before the first bytes past it go on.
struct Checked<'a> {
    inner: &'a mut dyn Write,
    check: &'a SegmentCheck<'a>,
    head: Vec<u8>,
}

impl Write for Checked<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.head.len() < LONG_PAGE_HEADER {
            let n = (LONG_PAGE_HEADER - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            if self.head.len() == LONG_PAGE_HEADER {
                self.check.check_head(&self.head).map_err(Error::into_io)?;
            }
        }
        self.inner.write_all(data)?;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One line of a timeline history file: `timeline` ended at `switchpoint`, where its child
/// timeline begins.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineSwitch {
    pub timeline: u32,
    pub switchpoint: String,
    /// Why recovery ended there, as PostgreSQL wrote it: `no recovery target specified` at
    /// the end of the WAL it had, or the recovery target (`before 2026-...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Parses a timeline history file (`<parent timeline>\t<switch LSN>\t<reason>` per line;
/// blank lines and `#` comments skipped), oldest ancestor first.
pub fn parse_history(text: &str) -> Result<Vec<TimelineSwitch>> {
    let mut out: Vec<TimelineSwitch> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (fields.next(), fields.next()) else {
            return Err(Error::invalid(format!("bad line {line:?}")));
        };
        let timeline = tli
            .parse::<u32>()
            .map_err(|_| Error::invalid(format!("bad timeline {tli:?} in line {line:?}")))?;
        let at = parse_lsn(lsn)
            .ok_or_else(|| Error::invalid(format!("bad LSN {lsn:?} in line {line:?}")))?;
        if let Some(prev) = out.last() {
            if timeline <= prev.timeline || Some(at) < parse_lsn(&prev.switchpoint) {
                return Err(Error::invalid(format!(
                    "line {line:?} does not follow timeline {}",
                    prev.timeline
                )));
            }
        }
        let reason = fields.collect::<Vec<_>>().join(" ");
        out.push(TimelineSwitch {
            timeline,
            switchpoint: format_lsn(at),
            reason: (!reason.is_empty()).then_some(reason),
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_wal_segment_is_archived_only_under_the_name_its_header_gives() {
        let name = "00000002000000A1000000FE";
        let segment = |segno: u64, size: u32, info: u16| {
            let mut b = vec![0u8; 64];
            b[2..4].copy_from_slice(&info.to_ne_bytes());
            b[8..16].copy_from_slice(&(segno * u64::from(size)).to_ne_bytes());
            b[32..36].copy_from_slice(&size.to_ne_bytes());
            b
        };
        let push_as = |name: &str, bytes: &[u8]| {
            let mut out = Vec::new();
            let check = SegmentCheck::new(name);
            let mut checked = Checked {
                inner: &mut out,
                check: &check,
                head: Vec::new(),
            };
            // In pieces smaller than the header.
            for piece in bytes.chunks(7) {
                checked.write_all(piece).map_err(|e| Error::io("push", e))?;
            }
            Ok::<_, Error>(out)
        };
        let push = |bytes: &[u8]| push_as(name, bytes);
        let segno = 0xA1 * 256 + 0xFE;
        let good = segment(segno, 16 << 20, XLP_LONG_HEADER);
        assert_eq!(push(&good).unwrap(), good);
        // 64 MiB segments: 64 of them per 4 GiB.
        let mut big = segment(0xA1 * 64 + 0x3E, 64 << 20, XLP_LONG_HEADER | 1);
        big.truncate(40);
        assert_eq!(push_as("00000002000000A10000003E", &big).unwrap(), big);
        // A whole segment is a segment long; a partial one need not be.
        let check = SegmentCheck::new(name);
        assert!(check.check_size(&good, 16 << 20).is_ok());
        assert!(check.check_size(&good, 8 << 20).is_err());
        let partial = format!("{name}.partial");
        assert!(SegmentCheck::new(&partial)
            .check_size(&good, 8 << 20)
            .is_ok());
        // A name far past any real segment cannot overflow.
        let last = SegmentCheck::new("FFFFFFFFFFFFFFFFFFFFFFFF");
        assert!(last
            .check_head(&segment(1, 1 << 30, XLP_LONG_HEADER))
            .is_err());
        for bad in [
            segment(segno + 1, 16 << 20, XLP_LONG_HEADER),
            segment(segno, 16 << 20, 0),
            segment(segno, 3 << 20, XLP_LONG_HEADER),
            vec![0u8; 64],
        ] {
            let e = push(&bad).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().contains("is not that WAL segment"), "{e}");
        }
    }

    /// A sparse WAL segment file of `size` bytes named `name` (timeline 1) in `dir`.
    pub(crate) fn segment_file(dir: &Path, name: &str, size: u32) -> PathBuf {
        let (_, segno) = parse_segment(name, size.into()).unwrap();
        let mut head = vec![0u8; LONG_PAGE_HEADER];
        head[2..4].copy_from_slice(&XLP_LONG_HEADER.to_ne_bytes());
        head[8..16].copy_from_slice(&(segno * u64::from(size)).to_ne_bytes());
        head[32..36].copy_from_slice(&size.to_ne_bytes());
        let path = dir.join(name);
        std::fs::write(&path, &head).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size.into())
            .unwrap();
        path
    }

    #[test]
    fn the_archive_queue_is_the_segments_marked_ready_beside_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        let status = wal.join("archive_status");
        std::fs::create_dir_all(&status).unwrap();
        let name = "000000010000000000000003";
        let source = WalSource::new(segment_file(&wal, name, 1 << 20)).unwrap();
        // No status notes yet: nothing waits, as after a crash that lost them.
        assert_eq!(source.archive_queue(), Some((0, 1 << 20)));
        for note in [
            "000000010000000000000003.ready",
            "000000010000000000000004.ready",
            "000000020000000000000004.ready",
            // Archived already, or not segments: not counted.
            "000000010000000000000002.done",
            "00000002.history.ready",
            "000000010000000000000001.00000028.backup.ready",
            "000000010000000000000005.partial.ready",
            "stray.ready",
        ] {
            std::fs::write(status.join(note), b"").unwrap();
        }
        assert_eq!(source.archive_queue(), Some((3 << 20, 1 << 20)));
        // History files and partial segments are never dropped: they have no queue.
        std::fs::copy(wal.join(name), wal.join(format!("{name}.partial"))).unwrap();
        std::fs::write(
            wal.join("00000002.history"),
            b"1\t0/3000000\tno recovery target\n",
        )
        .unwrap();
        for other in ["00000002.history", "000000010000000000000003.partial"] {
            let source = WalSource::new(wal.join(other)).unwrap();
            assert_eq!(source.archive_queue(), None, "{other}");
        }
        // A status that cannot be read: the queue is unknown.
        std::fs::remove_dir_all(&status).unwrap();
        assert_eq!(source.archive_queue(), None);
        std::fs::write(&status, b"not a directory").unwrap();
        assert_eq!(source.archive_queue(), None);
    }

    #[test]
    fn a_table_is_known_by_its_names_however_quoted() {
        let same = [
            ("public.accounts", "\"public\".\"accounts\""),
            ("public.\"json_object\"", "public.json_object"),
            ("audit.\"Event Log\"", "\"audit\".\"Event Log\""),
            ("s.\"a.b\"", "\"s\".\"a.b\""),
            ("s.\"say \"\"hi\"\"\"", "\"s\".\"say \"\"hi\"\"\""),
        ];
        for (a, b) in same {
            assert_eq!(table_key(a), table_key(b), "{a} {b}");
        }
        assert_eq!(table_key("s.\"say \"\"hi\"\"\""), "s\0say \"hi\"");
        for (a, b) in [
            ("public.\"Accounts\"", "public.accounts"),
            ("s.\"a.b\"", "s.a.b"),
            ("a.b", "\"a.b\""),
        ] {
            assert_ne!(table_key(a), table_key(b), "{a} {b}");
        }
        // What does not parse stays itself.
        for odd in ["", "nodot", "\"open", "a.b.c", "s.\"x\"y"] {
            assert_eq!(table_key(odd), odd);
        }
    }

    #[test]
    fn a_data_directory_walk_leaves_out_what_pg_basebackup_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in [
            "base/5/pgsql_tmp",
            "global",
            "pg_wal",
            "pg_stat_tmp",
            "pg_xact",
            "pg_tblspc/16390/PG_15_1/5",
            "pg_tblspc/16390/PG_14_1",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink("/srv/ts", d.join("pg_tblspc/16391")).unwrap();
        for file in [
            "pg_tblspc/16390/PG_15_1/5/16400",
            "pg_tblspc/16390/PG_15_1/5/16400_init",
            "pg_tblspc/16390/PG_15_1/5/16401",
        ] {
            std::fs::write(d.join(file), b"x").unwrap();
        }
        for file in [
            "base/5/16384",
            "base/5/16384_init",
            "base/5/16384_fsm",
            "base/5/16384.1",
            "base/5/16385",
            "base/5/16385_vm",
            "base/5/t3_16386",
            "base/5/pg_internal.init",
            "global/pg_control",
            "global/1262",
            "pg_xact/0000",
            "postmaster.pid",
            "postmaster.opts",
            "postgresql.auto.conf",
            "PG_VERSION",
        ] {
            std::fs::write(d.join(file), b"x").unwrap();
        }
        std::os::unix::fs::symlink("/etc/hosts", d.join("server.crt")).unwrap();
        let left_out = |p: &str| left_out_of_base_backup(Path::new(p), &d.join(p), "PG_15_1");
        for p in [
            "base/5/16384",
            "base/5/16384_fsm",
            "base/5/16384.1",
            "base/5/t3_16386",
            "base/5/pgsql_tmp",
            "base/5/pg_internal.init",
            "global/pg_control",
            "pg_wal",
            "pg_stat_tmp",
            "postmaster.pid",
            "postmaster.opts",
            "server.crt",
            "pg_tblspc/16390/PG_14_1",
            "pg_tblspc/16390/PG_15_1/5/16400",
            "pg_tblspc/16391",
        ] {
            assert!(left_out(p), "{p} is archived");
        }
        for p in [
            "",
            "base",
            "base/5",
            "base/5/16384_init",
            "base/5/16385",
            "base/5/16385_vm",
            "global/1262",
            "pg_xact",
            "pg_xact/0000",
            "postgresql.auto.conf",
            "PG_VERSION",
            "pg_tblspc/16390",
            "pg_tblspc/16390/PG_15_1",
            "pg_tblspc/16390/PG_15_1/5/16400_init",
            "pg_tblspc/16390/PG_15_1/5/16401",
        ] {
            assert!(!left_out(p), "{p} is left out");
        }
    }

    #[test]
    fn tablespace_maps_are_read_with_their_escapes() {
        let map = parse_tablespace_map("16390 /srv/ts one\n16391 /srv/a\\\\b\\\nc\n");
        assert_eq!(map["16390"], "/srv/ts one");
        assert_eq!(map["16391"], "/srv/a\\b\nc");
        assert_eq!(map.len(), 2);
        assert!(parse_tablespace_map("").is_empty());
    }

    #[test]
    fn lsn_and_segment_names() {
        let seg = 16 << 20;
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(
            segment_name(1, 0x16_B374_D848 / seg, seg),
            "0000000100000016000000B3"
        );
        assert_eq!(
            parse_segment("0000000100000016000000B3", seg),
            Some((1, 0x16_B374_D848 / seg))
        );
        assert_eq!(parse_segment("0000000100000016000000b3", seg), None);
    }

    #[test]
    fn tar_tap_finds_the_wal_range_in_the_backup_manifest() {
        let manifest = b"{ \"Files\": [],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/3000000\" }\n],\n}";
        let mut archive = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("PG_VERSION", &b"15\n"[..]),
            ("backup_manifest", &manifest[..]),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_cksum();
            archive.append_data(&mut h, name, data).unwrap();
        }
        let bytes = archive.into_inner().unwrap();
        let mut out = Vec::new();
        let mut tap = TarTap::new(&mut out, "backup_manifest");
        for piece in bytes.chunks(100) {
            tap.write_all(piece).unwrap();
        }
        let captured = String::from_utf8(tap.captured).unwrap();
        assert_eq!(out, bytes);
        let r = WalRange::from_manifest(&captured, 16 << 20).unwrap();
        assert_eq!(r.start_wal, "000000010000000000000002");
        assert_eq!(r.stop_wal, "000000010000000000000002");
        assert_eq!((r.timeline, r.stop_lsn.as_str()), (1, "0/3000000"));
        assert!(WalRange::from_manifest("{}", 16 << 20).is_err());
    }

    #[test]
    fn timeline_history_files_parse_oldest_first() {
        let text = "1\t0/5000028\tbefore 2026-11-30 10:00:00+00\n\n# note\n2\t0/70000A0\tno recovery target specified\n";
        let h = parse_history(text).unwrap();
        assert_eq!(
            h,
            vec![
                TimelineSwitch {
                    timeline: 1,
                    switchpoint: "0/5000028".into(),
                    reason: Some("before 2026-11-30 10:00:00+00".into()),
                },
                TimelineSwitch {
                    timeline: 2,
                    switchpoint: "0/70000A0".into(),
                    reason: Some("no recovery target specified".into()),
                },
            ]
        );
        assert!(parse_history("").unwrap().is_empty());
        for bad in ["1 nonsense", "x\t0/1", "2\t0/5\n1\t0/6", "1\t0/6\n2\t0/5"] {
            assert!(parse_history(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_wal_names_are_accepted() {
        for ok in [
            "000000010000000000000002",
            "000000010000000000000002.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            assert!(is_wal_name(ok), "{ok}");
        }
        for bad in [
            "../etc/passwd",
            "00000001000000000000000",
            "000000010000000000000002.gz",
            "",
        ] {
            assert!(!is_wal_name(bad), "{bad}");
        }
    }
}
