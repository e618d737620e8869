//! PostgreSQL: `logical` streams `pg_dump -Fc` and records per-table row counts taken in the
//! dump's own snapshot; `physical` streams `pg_basebackup` as tar and records the WAL range
//! (timeline, start and stop LSN) the base backup needs. WAL segments arrive separately,
//! one per `drctl wal push` ([`WalSource`]).
//!
//! The password never appears on a command line, in the descriptor or in an error: it is
//! handed to the client tools in `PGPASSWORD`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::command::stream_stdout;
pub use super::command::SqlSession as Session;
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

/// Exact row counts of every ordinary table, in the session's current snapshot.
pub fn row_counts(session: &mut Session) -> Result<BTreeMap<String, u64>> {
    // A standby cannot read unlogged tables, and pg_dump dumps none of their rows there.
    let unread = relations(
        session,
        "WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND pg_is_in_recovery()",
    )?;
    let mut counts = BTreeMap::new();
    for table in tables(session)? {
        let n = if unread.contains(&table) {
            0
        } else {
            count_rows(session, &table)?
        };
        counts.insert(table, n);
    }
    Ok(counts)
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

pub struct PostgresSource {
    mode: PostgresMode,
    conn: Conn,
    point_in_time: Option<PointInTime>,
}

impl PostgresSource {
    pub fn new(mode: PostgresMode, conn: Conn) -> Self {
        PostgresSource {
            mode,
            conn,
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
        // Count rows in the exported snapshot while pg_dump streams it; the transaction
        // stays open until the dump is done so pg_dump can import the snapshot.
        let pid = session.value("SELECT pg_backend_pid()")?;
        let counter = std::thread::spawn(move || {
            let counts = row_counts(&mut session);
            (session, counts)
        });
        let mut cmd = self.conn.command("pg_dump");
        cmd.args(["-Fc", "-Z0", "--snapshot", &snapshot, "-d", &self.conn.url]);
        let streamed = stream_stdout(cmd, out, cancel);
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
        let counts = counts?;
        session.query("COMMIT")?;
        session.close()?;
        let mut stats = Stats::new();
        stats.insert("mode".into(), "logical".into());
        stats.insert("bytes".into(), streamed.bytes.into());
        stats.insert("tables".into(), serde_json::to_value(counts)?);
        Ok(stats)
    }

    fn physical(&mut self, out: &mut dyn Write, cancel: &Cancel) -> Result<Stats> {
        let mut session = self.conn.session()?;
        let archive_mode = session.value("SELECT current_setting('archive_mode')")?;
        let segment_size = session.value(
            "SELECT setting::bigint * (CASE unit WHEN 'MB' THEN 1048576 ELSE 1 END) \
             FROM pg_settings WHERE name = 'wal_segment_size'",
        )?;
        if archive_mode == "off" {
            return Err(Error::invalid(
                "archive_mode is off: a physical backup without archived WAL cannot be restored",
            )
            .hint("set archive_mode = on and archive_command = 'drctl --config /path/drctl.yaml wal push --policy NAME %p', then restart the server"));
        }
        let segment_size: u64 = segment_size
            .parse()
            .map_err(|_| Error::failure(format!("bad wal_segment_size {segment_size:?}")))?;
        // The base backup carries the WAL from its start to its end (`-X fetch`), so it is
        // consistent on its own and the server does not wait for that WAL to be archived. A
        // temporary replication slot keeps the server from recycling it meanwhile; it goes
        // with the session, even if drctl dies. The session idles while pg_basebackup runs,
        // so no idle timeout may end it (nor the slot with it).
        session.query(
            "SELECT set_config(name, '0', false) FROM pg_settings \
             WHERE name = 'idle_session_timeout'",
        )?;
        let slot = format!("drctl_basebackup_{}", std::process::id());
        session
            .query(&format!(
                "SELECT 1 FROM pg_create_physical_replication_slot('{slot}', true, true)"
            ))
            .map_err(|e| {
                e.context("reserve the base backup's WAL with a temporary replication slot")
                    .hint("the backup user needs the REPLICATION attribute and the server max_replication_slots > 0")
            })?;
        let mut cmd = self.conn.command("pg_basebackup");
        cmd.args(["-D", "-", "-Ft", "-X", "fetch", "-c", "fast"])
            .args(["-d", &self.conn.url]);
        // The backup manifest pg_basebackup appends to the archive names the WAL range.
        let mut tap = TarTap::new(out, "backup_manifest");
        let streamed = stream_stdout(cmd, &mut tap, cancel)?;
        // pg_basebackup has read all the WAL it needed; the slot is no longer needed.
        if let Err(e) = session.close() {
            tracing::warn!(error = %e, "the session that held the base backup's replication slot failed");
        }
        let mut range =
            WalRange::from_manifest(&String::from_utf8_lossy(&tap.captured), segment_size)?;
        range.included = true;
        // Consistent from the stop LSN on, which pg_basebackup has just reached.
        self.point_in_time = Some(PointInTime {
            timestamp: Some(chrono::Utc::now()),
            lsn: Some(range.stop_lsn.clone()),
            binlog: None,
        });
        let mut stats = Stats::new();
        stats.insert("mode".into(), "physical".into());
        stats.insert("bytes".into(), streamed.bytes.into());
        stats.insert("wal".into(), serde_json::to_value(range)?);
        Ok(stats)
    }
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
        serde_json::json!({ "mode": mode, "url": self.conn.url })
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
        // The stop LSN may sit exactly on a segment boundary: the last record ends before it.
        let stop_segment = stop.saturating_sub(1).max(start) / segment_size;
        Ok(WalRange {
            timeline,
            start_lsn: format_lsn(start),
            stop_lsn: format_lsn(stop),
            start_wal: segment_name(timeline, start / segment_size, segment_size),
            stop_wal: segment_name(timeline, stop_segment, segment_size),
            segment_size,
            included: false,
        })
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
    if name.len() != 24 || !is_upper_hex(name) {
        return None;
    }
    let tli = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..], 16).ok()?;
    Some((tli, log * (0x1_0000_0000 / segment_size) + seg))
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
        Ok(WalSource { path, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
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
        let bytes = super::copy_file(&self.path, out, cancel)?;
        stats.insert("bytes".into(), bytes.into());
        Ok(stats)
    }
}

/// One line of a timeline history file: `timeline` ended at `switchpoint`, where its child
/// timeline begins.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineSwitch {
    pub timeline: u32,
    pub switchpoint: String,
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
        out.push(TimelineSwitch {
            timeline,
            switchpoint: format_lsn(at),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    switchpoint: "0/5000028".into()
                },
                TimelineSwitch {
                    timeline: 2,
                    switchpoint: "0/70000A0".into()
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
