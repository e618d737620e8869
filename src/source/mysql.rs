//! MariaDB/MySQL. A full backup streams `mariadb-dump --single-transaction` of one database
//! and records, from the dump itself, the binary log position it is consistent with and the
//! row count of every table, checked against a snapshot of the same moment in which the
//! tables' checksums are taken (see [`TwinSnapshot`]). An incremental backup is a tar of the
//! raw binary log files from the previous backup's position to a new one, taken in a
//! consistent snapshot in which the row counts are recorded too.
//!
//! The password never appears on a command line, in the descriptor or in an error: the client
//! tools get it in `MYSQL_PWD`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use chrono::{DateTime, Utc};

use super::command::{check_status, stream_stdout, SqlSession};
use super::{Source, Stats};
use crate::cancel::Cancel;
use crate::format::manifest::PointInTime;
use crate::format::Manifest;
use crate::{Error, Result};

/// How to reach one database: host, port, user and database from a URL without a password,
/// and the password on the side.
#[derive(Clone)]
pub struct Conn {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    password: Option<String>,
    /// Whether the tools connect over TCP to the port: always but to `localhost` without a
    /// port, which is the server's socket (as for the clients, and as root's socket
    /// authentication needs). With a port, `localhost` means that port, never the socket of
    /// whichever server has the default one.
    tcp: bool,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mysql://{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

impl Conn {
    /// Parses `mysql://user@host:port/database` (or `mariadb://`); refuses a password in it.
    pub fn parse_url(s: &str) -> Result<Conn> {
        let what = "use mysql://user@host:port/database";
        let u =
            url::Url::parse(s).map_err(|e| Error::invalid(format!("not a URL ({e}); {what}")))?;
        if !matches!(u.scheme(), "mysql" | "mariadb") {
            return Err(Error::invalid(format!(
                "scheme {:?} is not mysql; {what}",
                u.scheme()
            )));
        }
        if crate::source::carries_password(&u) {
            // Never echo the URL: it holds the password.
            return Err(Error::invalid(
                "the URL contains a password; move it to password-file or password-env \
                 (or MYSQL_PWD for --to-database)",
            ));
        }
        let database = super::url_decode(u.path().trim_start_matches('/'));
        if database.is_empty() || database.contains(['/', '`', '\0']) {
            return Err(Error::invalid(format!(
                "the URL must name one database (without / or `); {what}"
            )));
        }
        let host = u.host_str().unwrap_or("localhost").to_owned();
        let user = match u.username() {
            "" => "root".to_owned(),
            name => super::url_decode(name),
        };
        Ok(Conn {
            tcp: host != "localhost" || u.port().is_some(),
            host,
            port: u.port().unwrap_or(3306),
            user,
            database,
            password: None,
        })
    }

    /// Parses the URL and reads the password from `password_file` or the variable
    /// `password_env`, if given; otherwise the tools read MYSQL_PWD or their option files.
    pub fn new(
        url: &str,
        password_file: Option<&Path>,
        password_env: Option<&str>,
    ) -> Result<Conn> {
        let mut conn = Conn::parse_url(url).map_err(|e| e.context("source.url"))?;
        conn.password = super::read_password(password_file, password_env)?;
        Ok(conn)
    }

    /// What the manifest records: no password.
    pub fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "database": self.database,
        })
    }

    /// A client tool (`mariadb`, `mariadb-dump`, `mariadb-binlog`) with the connection
    /// options, and the password in its environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg(format!("--host={}", self.host))
            .arg(format!("--user={}", self.user));
        if self.tcp {
            cmd.arg(format!("--port={}", self.port))
                .arg("--protocol=TCP");
        }
        if let Some(p) = &self.password {
            cmd.env("MYSQL_PWD", p);
        }
        cmd
    }

    /// How far the server's clock is ahead of this host's, at most: the time of a full
    /// backup is the server's, as that of incrementals and binary log events is, so that
    /// `--until` means one clock.
    pub fn clock_ahead(&self) -> Result<chrono::Duration> {
        let asked = Utc::now();
        let server = self
            .value("SELECT DATE_FORMAT(UTC_TIMESTAMP(6), '%Y-%m-%dT%H:%i:%s.%fZ')")?
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .ok_or_else(|| Error::failure("the server's UTC_TIMESTAMP() is not a time"))?;
        // Read after `asked`: at least the clock's lead, so a snapshot's time is not earlier
        // than the server's.
        Ok(server.with_timezone(&Utc) - asked)
    }

    /// What tells a binary log file apart from another of the same name (RESET MASTER and a
    /// failover to another server reuse names): when it was created, to the second, and by
    /// which server, from the header of its first event.
    pub fn binlog_identity(&self, file: &str, cancel: &Cancel) -> Result<String> {
        let mut cmd = self.command("mariadb-binlog");
        // Event times print in the tool's local time zone; only the first event is read.
        cmd.env("TZ", "UTC")
            .args(["--read-from-remote-server", "--stop-position=5", "--"])
            .arg(file);
        let mut out = Vec::new();
        stream_stdout(cmd, &mut out, cancel)?;
        parse_binlog_identity(&String::from_utf8_lossy(&out)).ok_or_else(|| {
            Error::failure(format!(
                "mariadb-binlog printed no format description event for binary log {file}"
            ))
        })
    }

    /// Runs SQL with the `mariadb` client (in `database` if given) and returns the rows,
    /// columns split on tabs.
    pub fn query(&self, database: Option<&str>, sql: &str) -> Result<Vec<Vec<String>>> {
        let mut cmd = self.command("mariadb");
        cmd.args(["--batch", "--skip-column-names", "-e", sql]);
        if let Some(db) = database {
            cmd.arg(format!("--database={db}"));
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| {
                Error::failure(format!("cannot run `mariadb`: {e}"))
                    .hint("install the MariaDB client tools (Debian: mariadb-client)")
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        check_status("mariadb", out.status, stderr.trim())
            .map_err(|e| e.context(format!("query {self}")))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(columns)
            .collect())
    }

    /// Runs a query that returns one value, outside any database: its first row's first
    /// column, if there is a row.
    pub fn value(&self, sql: &str) -> Result<Option<String>> {
        let rows = self.query(None, sql)?;
        Ok(rows.into_iter().next().and_then(|r| r.into_iter().next()))
    }

    /// A `mariadb` session in the database, for statements that share a transaction.
    pub fn session(&self) -> Result<SqlSession> {
        let mut cmd = self.command("mariadb");
        cmd.args(["--batch", "--raw", "--skip-column-names", "--unbuffered"])
            .arg(format!("--database={}", self.database));
        SqlSession::start(cmd, |mark| format!("SELECT '{mark}';"))
    }

    /// Whether the server writes binary logs.
    pub fn binlog_enabled(&self) -> Result<bool> {
        Ok(self.value("SELECT @@log_bin")?.as_deref() == Some("1"))
    }

    /// `CHECKSUM TABLE` of `tables`, with the server version the checksums depend on.
    pub fn checksums(&self, tables: &[String]) -> Result<Checksums> {
        let rows = self.query(Some(&self.database), &checksum_sql(tables).join(";"))?;
        Ok(parse_checksums(&self.database, &rows))
    }

    /// Exact row counts of the database's base tables.
    pub fn row_counts(&self) -> Result<BTreeMap<String, u64>> {
        let tables = self.query(
            Some(&self.database),
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() \
             AND table_type IN ('BASE TABLE', 'SYSTEM VERSIONED') ORDER BY 1",
        )?;
        if tables.is_empty() {
            return Ok(BTreeMap::new());
        }
        let names: Vec<String> = tables.iter().map(|t| t[0].clone()).collect();
        let rows = self.query(Some(&self.database), &count_sql(&names).join(";"))?;
        parse_counts(&names, &rows)
    }
}

/// `CHECKSUM TABLE` of `tables` (in the session's snapshot for InnoDB) and the server version
/// the checksums depend on; parse the result with [`parse_checksums`].
fn checksum_sql(tables: &[String]) -> Vec<String> {
    let mut sql = vec!["SELECT 'version', VERSION()".to_owned()];
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(|t| quote_ident(t)).collect();
        sql.push(format!("CHECKSUM TABLE {}", list.join(", ")));
    }
    sql
}

/// `CHECKSUM TABLE` values by table, with the server version they depend on.
pub type Checksums = (Option<String>, BTreeMap<String, u64>);

fn parse_checksums(database: &str, rows: &[Vec<String>]) -> Checksums {
    let prefix = format!("{database}.");
    let mut version = None;
    let mut sums = BTreeMap::new();
    for row in rows {
        match (row[0].as_str(), row.get(1)) {
            ("version", Some(v)) => version = Some(v.clone()),
            (name, Some(v)) => {
                if let (Some(table), Ok(sum)) = (name.strip_prefix(&prefix), v.parse()) {
                    sums.insert(table.to_owned(), sum);
                }
            }
            _ => {}
        }
    }
    (version, sums)
}

fn parse_count(table: &str, s: &str) -> Result<u64> {
    s.parse()
        .map_err(|_| Error::failure(format!("bad row count {s:?} for table {table}")))
}

/// One line of `mariadb --batch` output, split into its columns.
fn columns(line: &str) -> Vec<String> {
    line.split('\t').map(str::to_owned).collect()
}

/// Columns of an incremental's list of tables: `1` if it is checksummed (an InnoDB base
/// table), and if it is InnoDB's.
const CHECKSUMMED: usize = 1;
const INNODB: usize = 2;

/// The names (column 0) of the `tables` whose flag in `column` is `set`.
fn flagged(tables: &[Vec<String>], column: usize, set: bool) -> Vec<String> {
    tables
        .iter()
        .filter(|t| (t.get(column).map(String::as_str) == Some("1")) == set)
        .map(|t| t[0].clone())
        .collect()
}

/// A statement per table returning a row `count <rows>`, for [`parse_counts`].
fn count_sql(tables: &[String]) -> Vec<String> {
    tables
        .iter()
        .map(|t| format!("SELECT 'count', COUNT(*) FROM {}", quote_ident(t)))
        .collect()
}

/// The row counts of `tables` from the rows [`count_sql`]'s statements returned.
fn parse_counts(tables: &[String], rows: &[Vec<String>]) -> Result<BTreeMap<String, u64>> {
    let counts = rows
        .iter()
        .filter(|r| r[0] == "count")
        .filter_map(|r| r.get(1));
    tables
        .iter()
        .zip(counts)
        .map(|(t, c)| Ok((t.clone(), parse_count(t, c)?)))
        .collect()
}

/// The position `SHOW STATUS LIKE 'binlog_snapshot_%'` reported for the session's snapshot
/// (none without binary logging).
fn parse_binlog_snapshot(rows: &[Vec<String>]) -> Option<BinlogPos> {
    let value = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .and_then(|r| r.get(1))
            .filter(|v| !v.is_empty())
    };
    Some(BinlogPos {
        file: value("Binlog_snapshot_file")?.clone(),
        pos: value("Binlog_snapshot_position")?.parse().ok()?,
    })
}

/// `name` as a backquoted identifier.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A string literal for SQL.
pub fn quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The time and server of a binary log's format description event, from `mariadb-binlog`'s
/// header line `#261201  3:07:36 server id 1  end_log_pos 256 ... Start: binlog v 4, ...`.
fn parse_binlog_identity(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with('#') && l.contains("Start: binlog"))?;
    let head = &line[1..line.find(" end_log_pos")?];
    Some(head.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A position in the server's binary logs: `binlog.000012:4711`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogPos {
    pub file: String,
    pub pos: u64,
}

impl fmt::Display for BinlogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

impl BinlogPos {
    pub fn parse(s: &str) -> Result<BinlogPos> {
        let (file, pos) = s
            .rsplit_once(':')
            .ok_or_else(|| Error::integrity(format!("binlog position {s:?} is not FILE:POS")))?;
        if !valid_binlog_name(file) {
            return Err(Error::integrity(format!(
                "binlog position {s:?}: invalid file name"
            )));
        }
        let pos = pos
            .parse()
            .map_err(|_| Error::integrity(format!("binlog position {s:?}: invalid offset")))?;
        Ok(BinlogPos {
            file: file.to_owned(),
            pos,
        })
    }
}

/// Binary log file names are plain file names; anything else is refused before it is used
/// as a path.
pub fn valid_binlog_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

enum Mode {
    Full,
    /// Binary logs from `from` (the parent's end) on.
    Incremental {
        from: BinlogPos,
        parent: String,
        /// The identity of `from`'s file when the parent was taken, if it recorded one.
        identity: Option<String>,
    },
}

pub struct MysqlSource {
    conn: Conn,
    mode: Mode,
    point_in_time: Option<PointInTime>,
}

impl MysqlSource {
    pub fn full(conn: Conn) -> Self {
        MysqlSource {
            conn,
            mode: Mode::Full,
            point_in_time: None,
        }
    }

    /// The binary logs since `parent`, which must be a backup of this source with a
    /// binlog position.
    pub fn incremental(conn: Conn, parent: &Manifest) -> Result<Self> {
        let from = parent
            .point_in_time
            .binlog
            .as_deref()
            .filter(|_| parent.source.kind == "mysql")
            .ok_or_else(|| {
                Error::invalid(format!(
                    "backup {} records no binary log position (the server's binary logging \
                     was off, or it is not a mysql backup): an incremental cannot follow it",
                    parent.backup_id
                ))
                .hint("enable log_bin on the server, then take a full backup")
            })?;
        // Its binary log position is of that server, and the restore replays the logs for
        // that database: a policy now naming another follows it with a full backup.
        let now = conn.descriptor();
        for field in ["host", "port", "database"] {
            let then = &parent.source.descriptor[field];
            if *then != now[field] {
                return Err(Error::invalid(format!(
                    "the policy's {field} is now {}, but its last backup {} is of {then}: an \
                     incremental cannot follow it",
                    now[field], parent.backup_id
                ))
                .hint(
                    "take a full backup (without --incremental) to start a chain of this source",
                ));
            }
        }
        Ok(MysqlSource {
            conn,
            mode: Mode::Incremental {
                from: BinlogPos::parse(from)?,
                parent: parent.backup_id.to_string(),
                identity: parent
                    .source
                    .stats
                    .get("binlog_end_identity")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
            },
            point_in_time: None,
        })
    }

    fn full_dump(&mut self, out: &mut dyn Write, cancel: &Cancel) -> Result<Stats> {
        let binlog = self.conn.binlog_enabled()?;
        let ahead = self.conn.clock_ahead()?;
        let mut twin = TwinSnapshot::open(&self.conn)?;
        let mut cmd = self.conn.command("mariadb-dump");
        cmd.args([
            "--single-transaction",
            "--quick",
            "--routines",
            "--triggers",
            // A row as large as the server allows (up to 1 GiB), not only up to the
            // client's default of 24 MiB.
            "--max-allowed-packet=1G",
        ]);
        // Scheduled events, where the user may see them (SHOW EVENTS, which --events runs,
        // needs the EVENT privilege, which a backup user may lack).
        // (A failing query leaves them out; the dump says why the database cannot be read.)
        let events = self.conn.value(&format!(
            "SELECT COUNT(*) FROM information_schema.events WHERE event_schema = {}",
            quote_str(&self.conn.database)
        ));
        if events.ok().flatten().is_some_and(|n| n != "0") {
            cmd.arg("--events");
        }
        if binlog {
            cmd.arg("--master-data=2");
        }
        cmd.arg("--").arg(&self.conn.database);
        let mut scan = DumpScanner::new(out);
        let streamed = match &mut twin {
            Some(twin) => stream_stdout(cmd, &mut twin.releasing(&mut scan), cancel)?,
            None => stream_stdout(cmd, &mut scan, cancel)?,
        };
        let mut stats = Stats::new();
        stats.insert("bytes".into(), streamed.bytes.into());
        stats.insert("tables".into(), serde_json::to_value(&scan.tables)?);
        // The database's defaults, which the dump (of its tables) does not hold: a table
        // the binary logs create without a character set takes them.
        let defaults = self.conn.query(
            None,
            &format!(
                "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME \
                 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {}",
                quote_str(&self.conn.database)
            ),
        )?;
        if let Some([charset, collation]) = defaults.first().map(Vec::as_slice) {
            stats.insert("database_charset".into(), charset.as_str().into());
            stats.insert("database_collation".into(), collation.as_str().into());
        }
        if let Some((version, checksums)) = twin
            .map(|t| t.check(&self.conn, &scan))
            .transpose()?
            .flatten()
        {
            stats.insert("checksums".into(), serde_json::to_value(&checksums)?);
            if let Some(v) = version {
                stats.insert("server_version".into(), v.into());
            }
        }
        let position = match (binlog, scan.binlog) {
            (true, Some(pos)) => Some(pos),
            (true, None) => {
                return Err(Error::failure(
                    "mariadb-dump --master-data printed no binary log position",
                ))
            }
            (false, _) => None,
        };
        if position.is_some() {
            self.warn_outside_the_snapshot();
        }
        if let Some(pos) = &position {
            stats.insert("binlog_end".into(), pos.to_string().into());
            // Reading the log needs what only incrementals need otherwise (mariadb-binlog
            // and the REPLICATION SLAVE privilege): a full backup goes on without it.
            match self.conn.binlog_identity(&pos.file, cancel) {
                Ok(identity) => {
                    stats.insert("binlog_end_identity".into(), identity.into());
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot read the binary log this backup ends in; an incremental after it \
                     cannot check that the log was not recreated since"
                ),
            }
        }
        // Taken once the dump's snapshot was (not before it starts): a restore to an earlier
        // time is refused instead of given rows committed after that time.
        self.point_in_time = Some(PointInTime {
            timestamp: Some(scan.snapshot_by.unwrap_or_else(Utc::now) + ahead),
            lsn: None,
            binlog: position.map(|p| p.to_string()),
        });
        Ok(stats)
    }

    /// Warns of the base tables that are not InnoDB: `--single-transaction` dumps them as
    /// they are when read, outside the snapshot the binary log position belongs to, so a
    /// write to one while the dump ran may be in the dump and again in the binary logs an
    /// incremental restore replays after it.
    fn warn_outside_the_snapshot(&self) {
        let tables = self.conn.value(&format!(
            "SELECT GROUP_CONCAT(table_name ORDER BY table_name SEPARATOR ', ') \
             FROM information_schema.tables WHERE table_schema = {} \
             AND table_type = 'BASE TABLE' AND engine <> 'InnoDB'",
            quote_str(&self.conn.database)
        ));
        match tables.ok().flatten() {
            Some(names) if names != "NULL" && !names.is_empty() => tracing::warn!(
                "tables {names} of database {} are not InnoDB: they are dumped outside the \
                 snapshot, so writes to them while the dump ran may be replayed a second time \
                 by the restore of a later incremental",
                self.conn.database
            ),
            _ => {}
        }
    }

    fn binlogs(
        &mut self,
        from: BinlogPos,
        parent: &str,
        parent_identity: Option<&str>,
        out: &mut dyn Write,
        cancel: &Cancel,
    ) -> Result<Stats> {
        if !self.conn.binlog_enabled()? {
            return Err(Error::invalid(format!(
                "binary logging is off on {}: incremental backups need log_bin",
                self.conn
            ))
            .hint("enable log_bin in the server's configuration and restart it, then take a full backup"));
        }
        let format = self.conn.value("SELECT @@GLOBAL.binlog_format")?;
        let format = format.as_deref();
        if format != Some("ROW") {
            return Err(Error::invalid(format!(
                "binlog_format is {} on {}: incremental backups need ROW, so that every change \
                 names its table and can be replayed into the restore's database",
                format.unwrap_or("unknown"),
                self.conn
            ))
            .hint("set binlog_format = ROW in the server's configuration (SET GLOBAL binlog_format = 'ROW' until the next restart)"));
        }
        // Close the current log, then, in one consistent snapshot, note the position it
        // corresponds to and count rows: the range ends exactly where the counts were taken.
        // Checksums of InnoDB base tables only: others are not read in the snapshot, or
        // (system-versioned) hold history a restore does not. The list of tables cannot be
        // read in the snapshot (the data dictionary is not versioned), so it is read before
        // and after, and the counts are taken again if a table came or went meanwhile.
        let list = || {
            self.conn.query(
                Some(&self.conn.database),
                "SELECT table_name, table_type = 'BASE TABLE' AND engine = 'InnoDB', \
                 engine = 'InnoDB' FROM information_schema.tables WHERE table_schema = DATABASE() \
                 AND table_type IN ('BASE TABLE', 'SYSTEM VERSIONED') ORDER BY 1",
            )
        };
        let count = |tables: &Vec<Vec<String>>| {
            let mut sql = vec![
                "FLUSH BINARY LOGS".to_owned(),
                SNAPSHOT_ISOLATION.to_owned(),
                "START TRANSACTION WITH CONSISTENT SNAPSHOT".to_owned(),
                "SHOW STATUS LIKE 'binlog_snapshot_%'".to_owned(),
                "SELECT 'now', DATE_FORMAT(UTC_TIMESTAMP(6), '%Y-%m-%dT%H:%i:%s.%fZ')".to_owned(),
            ];
            // Tables of other engines than InnoDB are read as they are when counted, not in
            // the snapshot: a write just after it would be counted but not in the binary
            // logs' range. They are left uncounted.
            sql.extend(count_sql(&flagged(tables, INNODB, true)));
            sql.extend(checksum_sql(&flagged(tables, CHECKSUMMED, true)));
            sql.push("COMMIT".into());
            self.conn.query(Some(&self.conn.database), &sql.join(";"))
        };
        let (tables, rows) = with_stable_tables(list, count, 3).map_err(|e| {
            e.context(format!(
                "count the rows of {} for the incremental backup",
                self.conn
            ))
        })?;
        let (version, checksums) = parse_checksums(&self.conn.database, &rows);
        let now = rows
            .iter()
            .find(|r| r[0] == "now")
            .and_then(|r| chrono::DateTime::parse_from_rfc3339(r.get(1)?).ok());
        let (Some(end), Some(now)) = (parse_binlog_snapshot(&rows), now) else {
            return Err(Error::failure(format!(
                "{} reported no binlog snapshot position (is this MariaDB?)",
                self.conn
            )));
        };
        let table_counts = parse_counts(&flagged(&tables, INNODB, true), &rows)?;

        let logs: Vec<String> = self
            .conn
            .query(None, "SHOW BINARY LOGS")?
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        let index = |name: &str| logs.iter().position(|l| l == name);
        let first = index(&from.file).ok_or_else(|| {
            Error::failure(format!(
                "binary log {} (where backup {parent} ends) is no longer on {}: the chain is broken",
                from.file, self.conn
            ))
            .hint("take a full backup; keep binary logs (binlog_expire_logs_seconds) longer than the incremental interval")
        })?;
        if let Some(expected) = parent_identity {
            let found = self.conn.binlog_identity(&from.file, cancel)?;
            if found != expected {
                return Err(Error::failure(format!(
                    "binary log {} on {} is not the one backup {parent} ends in (created {found}, \
                     not {expected}): the binary logs were reset (RESET MASTER) or the server \
                     was replaced; the chain is broken",
                    from.file, self.conn
                ))
                .hint("take a full backup"));
            }
        }
        let last = index(&end.file).ok_or_else(|| {
            Error::failure(format!(
                "binary log {} is not listed by SHOW BINARY LOGS",
                end.file
            ))
        })?;
        let files = &logs[first..=last];
        if let Some(bad) = files.iter().find(|f| !valid_binlog_name(f)) {
            return Err(Error::failure(format!(
                "the server lists a binary log with an unusable name: {bad:?}"
            )));
        }

        let dir = crate::cancel::Temporary::dir()?;
        let mut cmd = self.conn.command("mariadb-binlog");
        cmd.args(["--read-from-remote-server", "--raw"])
            .arg(format!("--result-file={}/", dir.path().display()))
            .args(files);
        stream_stdout(cmd, &mut std::io::sink(), cancel)?;

        let mut bytes = 0u64;
        let mut tar = tar::Builder::new(out);
        for name in files {
            cancel.check()?;
            let path = dir.path().join(name);
            let mut f = std::fs::File::open(&path)
                .map_err(|e| Error::io(format!("mariadb-binlog did not write {name}"), e))?;
            let len = f
                .metadata()
                .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
                .len();
            let mut header = tar::Header::new_gnu();
            header.set_size(len);
            header.set_mode(0o640);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(now.timestamp().max(0) as u64);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, &mut f)
                .map_err(|e| Error::io(format!("archive binary log {name}"), e))?;
            bytes += len;
        }
        tar.finish()
            .map_err(|e| Error::io("finish the binary log archive", e))?;

        let mut stats = Stats::new();
        stats.insert("bytes".into(), bytes.into());
        stats.insert("tables".into(), serde_json::to_value(&table_counts)?);
        let uncounted = flagged(&tables, INNODB, false);
        if !uncounted.is_empty() {
            stats.insert("uncounted".into(), serde_json::to_value(&uncounted)?);
        }
        stats.insert("checksums".into(), serde_json::to_value(&checksums)?);
        if let Some(v) = version {
            stats.insert("server_version".into(), v.into());
        }
        stats.insert("binlog_start".into(), from.to_string().into());
        stats.insert("binlog_end".into(), end.to_string().into());
        stats.insert(
            "binlog_end_identity".into(),
            self.conn.binlog_identity(&end.file, cancel)?.into(),
        );
        stats.insert("binlog_files".into(), serde_json::to_value(files)?);
        self.point_in_time = Some(PointInTime {
            timestamp: Some(now.with_timezone(&Utc)),
            lsn: None,
            binlog: Some(end.to_string()),
        });
        Ok(stats)
    }
}

impl Source for MysqlSource {
    fn kind(&self) -> &'static str {
        "mysql"
    }
    fn artifact(&self) -> String {
        match self.mode {
            Mode::Full => "sql".into(),
            Mode::Incremental { .. } => "tar".into(),
        }
    }
    fn descriptor(&self) -> serde_json::Value {
        self.conn.descriptor()
    }
    fn run(
        &mut self,
        out: &mut dyn Write,
        _index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats> {
        match &self.mode {
            Mode::Full => self.full_dump(out, cancel),
            Mode::Incremental {
                from,
                parent,
                identity,
            } => {
                let (from, parent, identity) = (from.clone(), parent.clone(), identity.clone());
                self.binlogs(from, &parent, identity.as_deref(), out, cancel)
            }
        }
    }
    fn point_in_time(&self) -> Option<PointInTime> {
        self.point_in_time.clone()
    }
}

/// A session whose snapshot is the dump's: it opens its transaction while
/// `BACKUP STAGE BLOCK_COMMIT` holds commits off, and commits go on once `mariadb-dump` has
/// opened its own (its output has reached the first table). Row counts and `CHECKSUM TABLE`
/// of the InnoDB tables taken in it then describe exactly the dumped data, without blocking
/// readers or waiting for long queries as `FLUSH TABLES WITH READ LOCK` would. Other tables
/// (non-transactional engines, system-versioned tables) are dumped outside any snapshot, or
/// with history the dump leaves out, so they keep the dump's row counts only.
struct TwinSnapshot {
    session: SqlSession,
    database: String,
    /// The binary log position of the snapshot (none without binary logging).
    position: Option<BinlogPos>,
    /// The InnoDB base tables.
    tables: Vec<String>,
    /// Tells the thread holding commits off to let them go.
    release: Option<std::sync::mpsc::Sender<()>>,
    /// That thread: whether it let commits go on its own, after [`HOLD_LIMIT`].
    holder: std::thread::JoinHandle<Result<bool>>,
}

/// Set before each snapshot transaction: InnoDB takes a consistent snapshot only at
/// REPEATABLE READ, and the session inherits the server's level (READ COMMITTED on many).
/// As `mariadb-dump --single-transaction` sets for its own.
const SNAPSHOT_ISOLATION: &str = "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ";

/// The longest commits are held off, and the longest `BACKUP STAGE` waits for running DDL.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl TwinSnapshot {
    /// `None` where the server offers no backup stages (MySQL, MariaDB before 10.4), the
    /// user lacks the RELOAD privilege or DDL holds the stage up: the dump then goes ahead
    /// with row counts only.
    fn open(conn: &Conn) -> Result<Option<TwinSnapshot>> {
        let mut lock = conn.session()?;
        if let Err(e) = lock.query(&format!(
            "SET SESSION lock_wait_timeout = {}; BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT",
            HOLD_LIMIT.as_secs()
        )) {
            tracing::warn!(
                error = %e,
                "no table checksums for this dump: no BACKUP STAGE to align a snapshot with the dump's (it needs MariaDB 10.4 or later, the RELOAD privilege and no long-running DDL)"
            );
            return Ok(None);
        }
        // `BACKUP STAGE END` commits its session's transaction: the snapshot gets its own.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || -> Result<bool> {
            let late = released.recv_timeout(HOLD_LIMIT).is_err();
            lock.query("BACKUP STAGE END")?;
            lock.close()?;
            Ok(late)
        });
        let mut session = conn.session()?;
        session.query(SNAPSHOT_ISOLATION)?;
        session.query("START TRANSACTION WITH CONSISTENT SNAPSHOT")?;
        let status: Vec<Vec<String>> = session
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")?
            .iter()
            .map(|l| columns(l))
            .collect();
        let tables = session.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() \
             AND table_type = 'BASE TABLE' AND engine = 'InnoDB' ORDER BY 1",
        )?;
        Ok(Some(TwinSnapshot {
            session,
            database: conn.database.clone(),
            position: parse_binlog_snapshot(&status),
            tables,
            release: Some(release),
            holder,
        }))
    }

    /// Lets commits go on; the snapshot stays.
    fn release(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }

    /// A writer that passes the dump to `scan` and lets commits go once the dump has
    /// reached its binary log position or its first table, by which time its transaction is
    /// open (a database without tables holds commits up no longer than that).
    fn releasing<'s, 'o>(&'s mut self, scan: &'s mut DumpScanner<'o>) -> Releasing<'s, 'o> {
        Releasing { twin: self, scan }
    }

    /// Counts and checksums the InnoDB tables in the snapshot, checks that the dump holds
    /// the same rows and binary log position, and returns the server version and
    /// checksums; `None` if commits had to be let go before the dump's snapshot was sure
    /// to be open.
    fn check(mut self, conn: &Conn, scan: &DumpScanner) -> Result<Option<Checksums>> {
        self.release();
        let late = self
            .holder
            .join()
            .map_err(|_| Error::failure("the BACKUP STAGE thread panicked"))??;
        if late {
            tracing::warn!(
                "no table checksums for this dump: mariadb-dump did not reach its binary log position or first table within {} s, so commits were let go before its snapshot was sure to be open",
                HOLD_LIMIT.as_secs()
            );
            return Ok(None);
        }
        let mut sql = count_sql(&self.tables);
        sql.extend(checksum_sql(&self.tables));
        sql.push("COMMIT".into());
        let rows: Vec<Vec<String>> = self
            .session
            .query(&sql.join("; "))?
            .iter()
            .map(|l| columns(l))
            .collect();
        let same_position =
            self.position == scan.binlog || no_change_between(conn, &self.position, &scan.binlog);
        self.session.close()?;
        let mut differences = Vec::new();
        for (t, snapshot) in parse_counts(&self.tables, &rows)? {
            if scan.tables.get(&t) != Some(&snapshot) {
                differences.push(format!(
                    "table {t}: {snapshot} rows in the snapshot, {} in the dump",
                    scan.tables.get(&t).map_or("none".into(), u64::to_string)
                ));
            }
        }
        if !differences.is_empty() {
            return Err(Error::integrity(format!(
                "the dump does not hold its snapshot's rows: {}",
                differences.join("; ")
            )));
        }
        if !same_position {
            let show =
                |p: &Option<BinlogPos>| p.as_ref().map_or("none".into(), ToString::to_string);
            return Err(Error::integrity(format!(
                "the dump's binary log position ({}) differs from its snapshot's ({})",
                show(&scan.binlog),
                show(&self.position)
            )));
        }
        Ok(Some(parse_checksums(&self.database, &rows)))
    }
}

/// Runs `count` on the tables `list` gives until the list is the same after the count as
/// before it (at most `attempts` times): a table created or dropped meanwhile would be
/// missing from the counts, or fail them. So is a count that a table rebuilt meanwhile
/// (TRUNCATE, a copying ALTER) failed, as InnoDB asks. Any other failure with the tables
/// unchanged fails.
fn with_stable_tables<T: PartialEq, R>(
    mut list: impl FnMut() -> Result<T>,
    mut count: impl FnMut(&T) -> Result<R>,
    attempts: usize,
) -> Result<(T, R)> {
    for attempt in 1.. {
        let before = list()?;
        let counted = count(&before);
        let rebuilt =
            matches!(&counted, Err(e) if e.to_string().contains("Table definition has changed"));
        if !rebuilt && list()? == before {
            return counted.map(|r| (before, r));
        }
        if attempt >= attempts {
            break;
        }
        tracing::info!(
            attempt,
            "tables were created, dropped or rebuilt while rows were counted; counting again"
        );
    }
    Err(Error::failure(format!(
        "tables were created, dropped or rebuilt while rows were counted, {attempts} times"
    ))
    .hint("run the backup again once the schema changes are done"))
}

/// Whether the binary log holds nothing between the snapshot's position `ours` and the
/// dump's later one in the same file but the checkpoints the server writes in the background
/// after switching logs, which change no data.
fn no_change_between(conn: &Conn, ours: &Option<BinlogPos>, theirs: &Option<BinlogPos>) -> bool {
    let (Some(ours), Some(theirs)) = (ours, theirs) else {
        return false;
    };
    if ours.file != theirs.file || ours.pos > theirs.pos {
        return false;
    }
    let events = conn.query(
        None,
        &format!(
            "SHOW BINLOG EVENTS IN {} FROM {} LIMIT 100",
            quote_str(&ours.file),
            ours.pos
        ),
    );
    match events {
        Ok(rows) => only_checkpoints(&rows, ours.pos, theirs.pos),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the binary log's events between the dump's position and its snapshot's (SHOW BINLOG EVENTS needs the BINLOG MONITOR or REPLICATION SLAVE privilege)");
            false
        }
    }
}

/// Whether the events of `SHOW BINLOG EVENTS` (log name, position, type, server id, end
/// position, info) from `from` reach `to` with binary log checkpoints only.
fn only_checkpoints(rows: &[Vec<String>], from: u64, to: u64) -> bool {
    let mut at = from;
    for row in rows {
        if at == to {
            break;
        }
        let end = row.get(4).and_then(|e| e.parse::<u64>().ok());
        match (row.get(2).map(String::as_str), end) {
            (Some("Binlog_checkpoint"), Some(end)) if end > at => at = end,
            _ => return false,
        }
    }
    at == to
}

/// See [`TwinSnapshot::releasing`].
struct Releasing<'s, 'o> {
    twin: &'s mut TwinSnapshot,
    scan: &'s mut DumpScanner<'o>,
}

impl Write for Releasing<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.scan.write(buf)?;
        if self.scan.snapshot_by.is_some() {
            self.twin.release();
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.scan.flush()
    }
}

/// Passes a `mariadb-dump` stream through while reading it: the row count of each table
/// (tuples of its `INSERT ... VALUES` statements, every table from its `CREATE TABLE`) and the
/// binary log position of `--master-data=2`.
struct DumpScanner<'a> {
    out: &'a mut dyn Write,
    tables: BTreeMap<String, u64>,
    binlog: Option<BinlogPos>,
    /// The current line while outside an INSERT's values (capped).
    line: Vec<u8>,
    values: Option<Values>,
    /// Inside a `DELIMITER ;;` block (routine and trigger bodies), whose INSERTs are not data.
    in_routine: bool,
    /// When the binary log position or the first table came through: the dump's snapshot
    /// had been taken by then.
    snapshot_by: Option<DateTime<Utc>>,
}

/// Inside the values of `INSERT INTO table VALUES (...),(...);`.
struct Values {
    table: String,
    rows: u64,
    depth: u32,
    in_string: bool,
    escaped: bool,
}

/// Longest line prefix kept outside INSERT values: enough for `INSERT INTO t (columns...) VALUES`
/// of very wide tables.
const LINE_CAP: usize = 64 << 10;

impl<'a> DumpScanner<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        DumpScanner {
            out,
            tables: BTreeMap::new(),
            binlog: None,
            line: Vec::new(),
            values: None,
            in_routine: false,
            snapshot_by: None,
        }
    }

    fn scan(&mut self, data: &[u8]) {
        for &b in data {
            if let Some(v) = &mut self.values {
                if v.in_string {
                    if v.escaped {
                        v.escaped = false;
                    } else if b == b'\\' {
                        v.escaped = true;
                    } else if b == b'\'' {
                        v.in_string = false;
                    }
                    continue;
                }
                match b {
                    b'\'' => v.in_string = true,
                    b'(' => {
                        if v.depth == 0 {
                            v.rows += 1;
                        }
                        v.depth += 1;
                    }
                    b')' => v.depth = v.depth.saturating_sub(1),
                    b';' if v.depth == 0 => {
                        let v = self.values.take().expect("in values");
                        *self.tables.entry(v.table).or_default() += v.rows;
                    }
                    _ => {}
                }
                continue;
            }
            if b == b'\n' {
                self.end_line();
                continue;
            }
            if (b == b' ' || b == b'(') && !self.in_routine && self.line.ends_with(b" VALUES") {
                if let Some(table) = backquoted_after(&self.line, b"INSERT INTO ") {
                    self.values = Some(Values {
                        table,
                        rows: 0,
                        depth: 0,
                        in_string: false,
                        escaped: false,
                    });
                    self.line.clear();
                    if b == b'(' {
                        self.scan(b"(");
                    }
                    continue;
                }
            }
            if self.line.len() < LINE_CAP {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        match line.as_slice() {
            b"DELIMITER ;;" => self.in_routine = true,
            b"DELIMITER ;" => self.in_routine = false,
            _ => {}
        }
        if line.ends_with(b" VALUES") && !self.in_routine {
            if let Some(table) = backquoted_after(&line, b"INSERT INTO ") {
                self.values = Some(Values {
                    table,
                    rows: 0,
                    depth: 0,
                    in_string: false,
                    escaped: false,
                });
                return;
            }
        }
        if let Some(table) = backquoted_after(&line, b"CREATE TABLE ").filter(|_| !self.in_routine)
        {
            self.tables.entry(table).or_default();
            self.snapshot_by.get_or_insert_with(Utc::now);
        } else if let Some(rest) = line
            .strip_prefix(b"-- CHANGE MASTER TO ")
            .filter(|_| self.binlog.is_none() && self.tables.is_empty() && !self.in_routine)
        {
            // The dump's own, which comes before any table; not a line of a routine's body
            // or of a table's data.
            self.binlog = parse_change_master(&String::from_utf8_lossy(rest));
            self.snapshot_by.get_or_insert_with(Utc::now);
        }
        self.line = line;
        self.line.clear();
    }
}

/// The backquoted name right after `prefix` at the start of `line`.
fn backquoted_after(line: &[u8], prefix: &[u8]) -> Option<String> {
    let rest = line.strip_prefix(prefix)?.strip_prefix(b"`")?;
    let mut name = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'`' {
            if rest.get(i + 1) == Some(&b'`') {
                name.push(b'`');
                i += 2;
                continue;
            }
            return String::from_utf8(name).ok();
        }
        name.push(rest[i]);
        i += 1;
    }
    None
}

/// `MASTER_LOG_FILE='binlog.000003', MASTER_LOG_POS=379;`
fn parse_change_master(s: &str) -> Option<BinlogPos> {
    let file = s.split("MASTER_LOG_FILE='").nth(1)?.split('\'').next()?;
    let pos = s
        .split("MASTER_LOG_POS=")
        .nth(1)?
        .trim_end_matches(';')
        .trim();
    let pos = pos.split([',', ';', ' ']).next()?.parse().ok()?;
    valid_binlog_name(file).then(|| BinlogPos {
        file: file.to_owned(),
        pos,
    })
}

impl Write for DumpScanner<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_taken_again_until_no_table_came_or_went() {
        use std::cell::RefCell;
        // Lists as the server gives them, one per call; the first `fails` counts fail with
        // the server's error `why`.
        let run_failing = |lists: Vec<Vec<&'static str>>, fails: usize, why: &str| {
            let lists = RefCell::new(lists.into_iter());
            let counts = RefCell::new(0);
            let result = with_stable_tables(
                || Ok(lists.borrow_mut().next().expect("listed too often")),
                |tables: &Vec<&str>| {
                    *counts.borrow_mut() += 1;
                    if *counts.borrow() <= fails {
                        Err(Error::failure(why))
                    } else {
                        Ok(tables.len())
                    }
                },
                3,
            );
            (result, counts.into_inner())
        };
        let run = |lists, fails| run_failing(lists, fails, "Table 'app.gone' doesn't exist");
        let (a, ab) = (vec!["a"], vec!["a", "b"]);
        // Unchanged: one count.
        let (r, n) = run(vec![a.clone(), a.clone()], 0);
        assert_eq!((r.unwrap(), n), ((a.clone(), 1), 1));
        // A table created during the first count: counted again, with it.
        let (r, n) = run(vec![a.clone(), ab.clone(), ab.clone(), ab.clone()], 0);
        assert_eq!((r.unwrap(), n), ((ab.clone(), 2), 2));
        // A table dropped during a count, which it failed: counted again, without it.
        let (r, n) = run(vec![ab.clone(), a.clone(), a.clone(), a.clone()], 1);
        assert_eq!((r.unwrap(), n), ((a.clone(), 1), 2));
        // A failure with the tables unchanged fails.
        let (r, n) = run(vec![a.clone(), a.clone()], 1);
        assert!(r.unwrap_err().to_string().contains("doesn't exist") && n == 1);
        // A table rebuilt during the first count, with the same name.
        let (r, n) = run_failing(
            vec![a.clone(), a.clone(), a.clone()],
            1,
            "ERROR 1412 (HY000): Table definition has changed, please retry transaction",
        );
        assert_eq!((r.unwrap(), n), ((a.clone(), 1), 2));
        // Changing every time: three counts, then a failure that says so.
        let (r, n) = run(
            vec![a.clone(), ab.clone(), a.clone(), ab.clone(), a.clone(), ab],
            0,
        );
        assert!(r.unwrap_err().to_string().contains("3 times") && n == 3);
    }

    #[test]
    fn positions_apart_by_binlog_checkpoints_only_are_the_same() {
        let event = |pos: u64, kind: &str, end: u64| {
            columns(&format!(
                "binlog.000002\t{pos}\t{kind}\t1\t{end}\tbinlog.000002"
            ))
        };
        let checkpoint = [event(339, "Binlog_checkpoint", 379)];
        assert!(only_checkpoints(&checkpoint, 339, 379));
        assert!(only_checkpoints(&[], 339, 339));
        assert!(!only_checkpoints(&checkpoint, 339, 420));
        let then_a_commit = [
            event(339, "Binlog_checkpoint", 379),
            event(379, "Gtid", 421),
            event(421, "Query", 520),
        ];
        assert!(only_checkpoints(&then_a_commit, 339, 379));
        assert!(!only_checkpoints(&then_a_commit, 339, 520));
        assert!(!only_checkpoints(&[event(339, "Gtid", 381)], 339, 381));
    }

    fn scan(dump: &str, split: usize) -> (BTreeMap<String, u64>, Option<BinlogPos>) {
        let mut sink = Vec::new();
        let mut s = DumpScanner::new(&mut sink);
        let (a, b) = dump.as_bytes().split_at(split.min(dump.len()));
        s.write_all(a).unwrap();
        s.write_all(b).unwrap();
        let (tables, binlog) = (s.tables, s.binlog);
        assert_eq!(sink, dump.as_bytes());
        (tables, binlog)
    }

    #[test]
    fn dump_scanner_notes_when_the_snapshot_had_been_taken() {
        let mut sink = Vec::new();
        let mut s = DumpScanner::new(&mut sink);
        s.write_all(b"-- MariaDB dump 10.19\n/*!40101 SET NAMES utf8mb4 */;\n")
            .unwrap();
        assert!(s.snapshot_by.is_none());
        let before = Utc::now();
        s.write_all(b"-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000003', MASTER_LOG_POS=379;\n")
            .unwrap();
        let noted = s.snapshot_by.expect("noted at the binary log position");
        assert!(noted >= before);
        s.write_all(b"CREATE TABLE `t` (`x` int);\n").unwrap();
        assert_eq!(
            s.snapshot_by,
            Some(noted),
            "the first line that shows it counts"
        );
    }

    #[test]
    fn dump_scanner_counts_rows_and_reads_the_binlog_position() {
        let dump = "-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000003', MASTER_LOG_POS=379;\n\
            CREATE TABLE `t` (\n  `id` int\n);\n\
            CREATE TABLE `empty` (`x` int);\n\
            CREATE TABLE `we``ird` (`x` int);\n\
            INSERT INTO `t` VALUES\n(1,'a(b'),\n(2,'it\\'s ); (x)'),\n(3,NULL);\n\
            INSERT INTO `t` VALUES (4,'x'),(5,'y');\n\
            INSERT INTO `we``ird` VALUES (1);\n\
            INSERT INTO `we``ird` (`x`, `gen(1)`) VALUES (2,DEFAULT),(3,DEFAULT);\n\
            -- not INSERT INTO `t` VALUES (9);\n\
            DELIMITER ;;\nCREATE PROCEDURE p() BEGIN\nINSERT INTO `t` VALUES (10);\n\
            CREATE TABLE `scratch` (`x` int);\nEND ;;\nDELIMITER ;\n";
        for split in [0, 1, 50, 100, 130, 150, 170, 200, dump.len()] {
            let (tables, binlog) = scan(dump, split);
            assert_eq!(tables["t"], 5, "split at {split}");
            assert_eq!(tables["empty"], 0);
            assert_eq!(tables["we`ird"], 3);
            assert_eq!(tables.len(), 3);
            assert_eq!(binlog.unwrap().to_string(), "binlog.000003:379");
        }
    }

    #[test]
    fn url_refuses_passwords_and_missing_databases() {
        let c = Conn::parse_url("mysql://app@db.internal:3307/shop").unwrap();
        assert_eq!(c.to_string(), "mysql://app@db.internal:3307/shop");
        let e = Conn::parse_url("mysql://app:hunter2@db/shop").unwrap_err();
        assert!(!e.message().contains("hunter2"));
        assert!(Conn::parse_url("mysql://app@db/").is_err());
        assert!(Conn::parse_url("postgres://app@db/shop").is_err());
    }

    #[test]
    fn a_binlog_is_identified_by_its_first_event() {
        let text = "DELIMITER /*!*/;\n# at 4\n#261201  3:07:36 server id 1  end_log_pos 256 CRC32 \
                    0x6668156c \tStart: binlog v 4, server v 10.11.19-MariaDB-log created 261201  \
                    3:07:36\nROLLBACK/*!*/;\n";
        assert_eq!(
            parse_binlog_identity(text).as_deref(),
            Some("261201 3:07:36 server id 1")
        );
        assert_eq!(parse_binlog_identity("# End of log file\n"), None);
    }

    #[test]
    fn binlog_positions_refuse_path_names() {
        assert!(BinlogPos::parse("binlog.000001:4").is_ok());
        assert!(BinlogPos::parse("../etc/passwd:4").is_err());
        assert!(BinlogPos::parse("binlog.000001").is_err());
    }
}
