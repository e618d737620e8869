//! Restores a MariaDB/MySQL backup into a database: the chain's full dump is loaded with
//! `mariadb`, then each incremental's binary logs are replayed with `mariadb-binlog` from the
//! position the previous backup ends at, up to the chain's end or `--until`. Row counts
//! recorded at backup time are compared with the restored tables when the restore reaches a
//! backup's end.
//!
//! `--until` is applied to binary log event timestamps, which have whole-second precision:
//! events logged in the same second as the given time are replayed, later ones are not.
//! Connection details come from the URL, the password from MYSQL_PWD in the environment.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::process::{Command, Stdio};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{
    compare_rows, copy_cancellable, decode, RecoveryTarget, RestorePlan, RestoreReport, Selector,
};
use crate::cancel::{Cancel, Temporary};
use crate::crypto::Identities;
use crate::format::manifest::BackupType;
use crate::format::{BackupId, Manifest, ObjectKey};
use crate::registry::{BackupRecord, ListQuery, Status};
use crate::repo::Repo;
use crate::source::command::{check_status, collect_stderr, spawn};
use crate::source::mysql::{quote_ident, quote_str, valid_binlog_name, BinlogPos, Conn};
use crate::{Error, ErrorKind, Result};

/// What a MariaDB/MySQL restore applies, resolved before anything is written.
#[derive(Debug, Clone, Serialize)]
pub struct MysqlPlan {
    /// The backups to apply, full first.
    pub chain: Vec<BackupId>,
    /// Whether the restore ends where the last backup ends, so its row counts are checked.
    pub check_rows: bool,
    /// Whether a statement the checks before the replay refuse is replayed anyway, with a
    /// warning (`--replay-anyway`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replay_anyway: bool,
    #[serde(skip)]
    manifests: Vec<Manifest>,
    #[serde(skip)]
    conn: Conn,
    #[serde(skip)]
    overwrite: bool,
    #[serde(skip)]
    until: Option<DateTime<Utc>>,
}

impl MysqlPlan {
    /// The full backup's data object (read first), and the stored and plain bytes of every
    /// object the chain reads.
    pub fn summary(&self) -> Result<(String, u64, u64)> {
        let full = &self.manifests[0];
        let key = ObjectKey::object(
            &full.environment,
            &full.policy,
            &full.backup_id,
            &full.data()?.object_name()?,
        );
        let mut sizes = (0, 0);
        for m in &self.manifests {
            let data = m.data()?;
            sizes = (sizes.0 + data.stored_size, sizes.1 + data.plain_size);
        }
        Ok((key.to_string(), sizes.0, sizes.1))
    }
}

/// Resolves the chain to apply and checks the target: the database must be empty or missing
/// unless `overwrite`. With `--backup latest --until T` the chain is the newest one whose full
/// backup was taken before T. Returns the record of the chain's last backup.
pub async fn plan(
    repo: &Repo,
    record: BackupRecord,
    selector: &Selector,
    url: &str,
    overwrite: bool,
    recovery: &RecoveryTarget,
) -> Result<(BackupRecord, MysqlPlan)> {
    let until = match recovery {
        RecoveryTarget::Latest => None,
        RecoveryTarget::Time(t) => Some(*t),
        RecoveryTarget::Lsn(_) => {
            return Err(Error::invalid(
                "--lsn is for PostgreSQL backups; use --until for MariaDB/MySQL",
            ))
        }
    };
    let record = match (selector, until) {
        (Selector::Latest, Some(t)) => covering(repo, &record, t).await?,
        _ => record,
    };
    let mut manifests = chain(repo, &record.backup_id).await?;
    if let Some(t) = until {
        let base = &manifests[0];
        if taken_at(base) > t {
            return Err(Error::invalid(format!(
                "--until {t} is before backup {} (the full backup of this chain, taken {})",
                base.backup_id,
                taken_at(base)
            ))
            .hint("pick an older backup with --backup ID (`drctl list` shows them)"));
        }
        // An incremental's logs start where its parent ends: later ones add nothing.
        let keep = 1 + manifests[1..]
            .iter()
            .zip(&manifests)
            .take_while(|(_, parent)| taken_at(parent) <= t)
            .count();
        manifests.truncate(keep);
    }
    // Counts were taken where a backup ends; they describe the result only when the
    // restore replays to that point.
    let last = manifests.last().expect("a chain has a full backup");
    let check_rows = until.is_none_or(|t| t >= taken_at(last));
    if let Some(t) = until.filter(|&t| t > taken_at(last)) {
        tracing::warn!(
            "--until {t} is after backup {} (the last this restore applies, taken {}): the \
             restore reaches that time only; what was written since is not in the backups it \
             applies",
            last.backup_id,
            taken_at(last)
        );
    }
    // Then the chain is replayed to its end (mariadb-binlog takes no --stop-datetime past
    // 2038 and replays nothing).
    let until = until.filter(|&t| t < taken_at(last));

    let conn = target(url)?;
    let c = conn.clone();
    let tables = blocking(move || table_count(&c)).await?;
    if tables > 0 && !overwrite {
        return Err(Error::invalid(format!(
            "target database {conn} is not empty ({tables} tables)"
        ))
        .hint(
            "restore into a new or empty database, or pass --overwrite to drop and re-create it",
        ));
    }
    Ok((
        record,
        MysqlPlan {
            chain: manifests.iter().map(|m| m.backup_id.clone()).collect(),
            check_rows,
            replay_anyway: false,
            manifests,
            conn,
            overwrite,
            until,
        },
    ))
}

/// The newest backup in the chain of the newest full backup taken at or before `t`.
async fn covering(repo: &Repo, latest: &BackupRecord, t: DateTime<Utc>) -> Result<BackupRecord> {
    let all = repo
        .registry
        .list(&ListQuery {
            environment: Some(latest.environment.clone()),
            policy: Some(latest.policy.clone()),
            status: Some(Status::Completed),
            before: None,
            limit: None,
        })
        .await?;
    let base = all
        .iter()
        .filter_map(|r| r.manifest.as_ref())
        .find(|m| m.backup_type == BackupType::Full && taken_at(m) <= t)
        .ok_or_else(|| {
            Error::not_found(format!(
                "no completed full backup of policy {} was taken before {t}",
                latest.policy
            ))
            .hint("`drctl list` shows the backups")
        })?;
    let last = all
        .iter()
        .find(|r| {
            r.manifest
                .as_ref()
                .is_some_and(|m| m.chain_base_id == base.backup_id)
        })
        .expect("the base is in its own chain");
    Ok(last.clone())
}

fn target(url: &str) -> Result<Conn> {
    Conn::parse_url(url).map_err(|e| e.context("--to-database"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::failure(format!("restore thread failed: {e}")))?
}

fn table_count(conn: &Conn) -> Result<u64> {
    let n = conn.value(&format!(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {}",
        quote_str(&conn.database)
    ))?;
    Ok(n.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The backups to apply, full first, each checked to continue where its parent ends.
async fn chain(repo: &Repo, last: &BackupId) -> Result<Vec<Manifest>> {
    let mut chain: Vec<Manifest> = Vec::new();
    let mut id = last.clone();
    loop {
        let record = repo.registry.get(&id).await?.ok_or_else(|| {
            Error::integrity(format!(
                "backup {id}, in the chain of {last}, is missing from the registry"
            ))
        })?;
        if record.status != Status::Completed {
            return Err(Error::integrity(format!(
                "backup {id}, in the chain of {last}, is {}",
                record.status.as_str()
            )));
        }
        let manifest = record.manifest()?.clone();
        if manifest.source.kind != "mysql" {
            return Err(Error::integrity(format!(
                "backup {id}, in the chain of {last}, is a {} backup",
                manifest.source.kind
            )));
        }
        if let Some(child) = chain.last() {
            let start = child
                .source
                .stats
                .get("binlog_start")
                .and_then(|v| v.as_str());
            if start.is_none() || start != manifest.point_in_time.binlog.as_deref() {
                return Err(Error::integrity(format!(
                    "backup {} does not start where its parent {id} ends: the chain is broken",
                    child.backup_id
                )));
            }
        }
        let parent = manifest.parent_id.clone();
        chain.push(manifest);
        match parent {
            Some(p) => id = p,
            None => break,
        }
    }
    chain.reverse();
    Ok(chain)
}

fn taken_at(m: &Manifest) -> DateTime<Utc> {
    m.point_in_time.timestamp.unwrap_or(m.started_at)
}

pub async fn execute(
    repo: &Repo,
    plan: &RestorePlan,
    my: &MysqlPlan,
    identities: Arc<Identities>,
    cancel: &Cancel,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let (conn, until) = (my.conn.clone(), my.until);
    let source_db = my.manifests[0]
        .source
        .descriptor
        .get("database")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::integrity("the full backup's manifest names no database"))?;

    // Every incremental's binary logs are unpacked and checked before the target is touched,
    // against the databases a statement could change by naming them: those of the target
    // server but the target (and the read-only ones), and the source.
    let watched = if my.manifests.len() > 1 {
        let c = conn.clone();
        let listed = blocking(move || c.query(None, "SHOW DATABASES")).await?;
        let mut watched: Vec<String> = listed
            .into_iter()
            .filter_map(|row| row.into_iter().next())
            .chain([source_db.clone()])
            .filter(|db| {
                *db != conn.database
                    && !matches!(
                        db.as_str(),
                        "information_schema" | "performance_schema" | "sys"
                    )
            })
            .collect();
        watched.sort();
        watched.dedup();
        watched
    } else {
        Vec::new()
    };
    let mut incrementals = Vec::new();
    for manifest in &my.manifests[1..] {
        let binlogs = Binlogs::from_stats(&manifest.source.stats).map_err(context(manifest))?;
        let sink_cancel = cancel.clone();
        let sink = move |tar: &mut dyn BufRead| {
            let dir = binlogs.unpack(tar, &sink_cancel)?;
            Ok((binlogs, dir))
        };
        let ((binlogs, dir), _) = decode(repo, manifest, identities.clone(), sink)
            .await
            .map_err(context(manifest))?;
        let command = |filtered| binlogs.command(dir.path(), &conn, &source_db, until, filtered);
        let (replayed, all) = (command(true), command(false));
        let (source_db, target_db, watched, cancel) = (
            source_db.clone(),
            conn.database.clone(),
            watched.clone(),
            cancel.clone(),
        );
        let anyway = my.replay_anyway;
        blocking(move || {
            let kept = check_replay(replayed, &source_db, &target_db, &watched, anyway, &cancel)?;
            check_left_out(kept, all, &source_db, anyway, &cancel)
        })
        .await
        .map_err(context(manifest))?;
        incrementals.push((manifest, binlogs, dir));
    }

    // The full dump: `mariadb` stops at the first failing statement. A database that is to
    // be replaced is dropped only once the whole dump has been read and checked, into an
    // unnamed temporary file; a new or empty one gets the dump as it arrives.
    let full = &my.manifests[0];
    let (c, sink_cancel) = (conn.clone(), cancel.clone());
    let plain = if my.overwrite {
        let sink = move |dump: &mut dyn BufRead| {
            let mut file = tempfile::tempfile()
                .map_err(|e| Error::io("create a temporary file for the dump", e))?;
            copy_cancellable(dump, &mut file, &sink_cancel)?;
            Ok(file)
        };
        let (mut file, plain) = decode(repo, full, identities.clone(), sink)
            .await
            .map_err(context(full))?;
        let (cancel, full_manifest, source_db) = (cancel.clone(), full.clone(), source_db.clone());
        blocking(move || {
            prepare(&c, true, &full_manifest)?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| Error::io("read the temporary dump file", e))?;
            load_dump(&c, &mut BufReader::new(file), &source_db, &cancel)
        })
        .await
        .map_err(context(full))?;
        plain
    } else {
        let target = c.clone();
        let full_manifest = full.clone();
        blocking(move || prepare(&target, false, &full_manifest)).await?;
        let source_db = source_db.clone();
        let sink = move |dump: &mut dyn BufRead| load_dump(&c, dump, &source_db, &sink_cancel);
        decode(repo, full, identities, sink)
            .await
            .map_err(context(full))?
            .1
    };
    let replayed = !incrementals.is_empty();
    for (manifest, binlogs, dir) in incrementals {
        let command = binlogs.command(dir.path(), &conn, &source_db, until, true);
        let (c, cancel) = (conn.clone(), cancel.clone());
        blocking(move || replay(command, replay_client(&c), &cancel))
            .await
            .map_err(context(manifest))?;
    }

    let (c, copy) = (conn.clone(), source_db != conn.database);
    blocking(move || {
        // The logs create events as they were created (enabled), even in a copy.
        if copy && replayed {
            disable_events(&c)?;
        }
        warn_of_missing_definers(&c);
        Ok(())
    })
    .await?;
    let last = my.manifests.last().expect("a chain has a full backup");
    let rows = if my.check_rows {
        let c = conn.clone();
        let actual = blocking(move || c.row_counts()).await?;
        let rows = compare_rows(
            &last.backup_id,
            &last.source.stats,
            &actual,
            &conn.to_string(),
            str::to_owned,
            false,
        )?;
        compare_checksums(&conn, last).await?;
        Some(rows)
    } else {
        None
    };
    Ok(RestoreReport {
        backup_id: plan.backup_id.clone(),
        plain,
        extracted: None,
        written_to: None,
        chain: my.chain.clone(),
        rows,
        postgres: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Names the backup a failure belongs to.
fn context(m: &Manifest) -> impl Fn(Error) -> Error + '_ {
    move |e| e.context(format!("restore of backup {}", m.backup_id))
}

/// Compares the `CHECKSUM TABLE` values an incremental recorded in its snapshot with the
/// restored tables', when the target server runs the same version (checksums depend on it).
async fn compare_checksums(conn: &Conn, last: &Manifest) -> Result<()> {
    let Some(want) = last.source.stats.get("checksums") else {
        return Ok(());
    };
    let want: BTreeMap<String, u64> = serde_json::from_value(want.clone()).map_err(|e| {
        Error::integrity(format!(
            "backup {}: bad checksums in the manifest: {e}",
            last.backup_id
        ))
    })?;
    let version = last
        .source
        .stats
        .get("server_version")
        .and_then(|v| v.as_str());
    let c = conn.clone();
    let tables: Vec<String> = want.keys().cloned().collect();
    let (target_version, got) = blocking(move || c.checksums(&tables)).await?;
    if version.is_none() || version != target_version.as_deref() {
        return Ok(());
    }
    let differences: Vec<String> = want
        .iter()
        .filter(|(t, sum)| got.get(*t) != Some(sum))
        .map(|(t, sum)| {
            format!(
                "table {t}: checksum {sum} at backup, {} restored",
                got.get(t).map_or("none".to_owned(), |s| s.to_string())
            )
        })
        .collect();
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Error::integrity(format!(
            "restored {conn} differs from backup {}: {}",
            last.backup_id,
            differences.join("; ")
        )))
    }
}

/// Warns of the views, triggers, routines and events of the restored database whose
/// definer has no account on this server (a restore onto another server: a dump of one
/// database holds no accounts). They are restored, but fail when used (error 1449) until
/// the account is created. Nothing is said where the accounts cannot be read.
fn warn_of_missing_definers(conn: &Conn) {
    let db = quote_str(&conn.database);
    let objects = [
        ("VIEWS", "TABLE_SCHEMA", "TABLE_NAME", "view"),
        ("TRIGGERS", "TRIGGER_SCHEMA", "TRIGGER_NAME", "trigger"),
        ("ROUTINES", "ROUTINE_SCHEMA", "ROUTINE_NAME", "routine"),
        ("EVENTS", "EVENT_SCHEMA", "EVENT_NAME", "event"),
    ]
    .map(|(table, schema, name, what)| {
        format!(
            "SELECT DEFINER AS definer, CONCAT('{what} ', {name}) AS what \
             FROM information_schema.{table} WHERE {schema} = {db}"
        )
    })
    .join(" UNION ALL ");
    // A definer is `user@host`; roles (no host) are not accounts.
    let sql = format!(
        "SELECT o.definer, GROUP_CONCAT(o.what ORDER BY o.what SEPARATOR ', ') \
         FROM ({objects}) AS o \
         WHERE o.definer LIKE '%@%' AND NOT EXISTS (SELECT 1 FROM mysql.user u \
           WHERE CONCAT(u.User, '@', u.Host) = o.definer) \
         GROUP BY o.definer ORDER BY o.definer"
    );
    let Ok(missing) = conn.query(None, &sql) else {
        return;
    };
    for row in missing {
        if let [definer, what] = row.as_slice() {
            tracing::warn!(
                "database {} has objects whose definer {definer} has no account on this server: \
                 {what}; they fail when used (error 1449) until the account is created",
                conn.database
            );
        }
    }
}

/// Seconds `--overwrite` waits for the locks that dropping the database takes.
const DROP_LOCK_WAIT: u32 = 60;

/// Creates the target database, dropping it first with `overwrite`; refuses a non-empty one
/// otherwise (it may have filled since the plan was made). Gives it the source database's
/// default character set and collation, which the full backup `full` recorded.
fn prepare(conn: &Conn, overwrite: bool, full: &Manifest) -> Result<()> {
    let db = quote_ident(&conn.database);
    if overwrite {
        // A session with one of its tables open (an idle transaction) holds the drop up:
        // for a minute, not the server's default of a day.
        conn.query(
            None,
            &format!(
                "SET SESSION lock_wait_timeout = {DROP_LOCK_WAIT}; \
                 DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db}"
            ),
        )
        .map_err(|e| {
            e.hint(format!(
                "if it waited {DROP_LOCK_WAIT} s for a lock, a session has a table of the \
                 database open (an idle transaction, a running query): end it and restore again"
            ))
        })?;
    } else {
        conn.query(None, &format!("CREATE DATABASE IF NOT EXISTS {db}"))?;
        let tables = table_count(conn)?;
        if tables > 0 {
            return Err(Error::invalid(format!(
                "target database {conn} is not empty ({tables} tables)"
            ))
            .hint("pass --overwrite to drop and re-create it"));
        }
    }
    let field = |name: &str| full.source.stats.get(name).and_then(|v| v.as_str());
    let (Some(charset), Some(collation)) = (field("database_charset"), field("database_collation"))
    else {
        return Ok(());
    };
    let name = |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let defaults = format!("CHARACTER SET {charset} COLLATE {collation}");
    let set = if name(charset) && name(collation) {
        conn.query(None, &format!("ALTER DATABASE {db} {defaults}"))
            .map(drop)
    } else {
        Err(Error::integrity("the manifest's names are not names"))
    };
    if let Err(e) = set {
        tracing::warn!(
            error = %e,
            "database {} keeps this server's default character set and collation instead of \
             the backup's ({defaults}): a table the binary logs create without its own takes them",
            conn.database
        );
    }
    Ok(())
}

fn client(conn: &Conn) -> Command {
    let mut cmd = conn.command("mariadb");
    cmd.args(["--batch", &format!("--database={}", conn.database)]);
    cmd
}

/// The client for a binary log's statements, which may hold any byte, a NUL or a CR LF
/// included: in binary mode, which takes them as they are instead of refusing or rewriting
/// them (mariadb-dump's output needs no such mode).
fn replay_client(conn: &Conn) -> Command {
    let mut cmd = client(conn);
    cmd.arg("--binary-mode");
    cmd
}

/// Loads the full dump of database `source_db` into the target database.
fn load_dump(conn: &Conn, dump: &mut dyn BufRead, source_db: &str, cancel: &Cancel) -> Result<()> {
    if source_db == conn.database {
        feed(client(conn), dump, cancel)
    } else {
        let copy = views_renamed(dump, source_db, &conn.database);
        feed(
            client(conn),
            &mut events_disabled(copy, &conn.database),
            cancel,
        )
    }
}

/// Copies `input` to the standard input of `cmd`. A failed command explains a failed write,
/// a damaged input explains the command's death.
fn feed(mut cmd: Command, input: &mut dyn BufRead, cancel: &Cancel) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = spawn(&mut cmd, Stdio::piped(), Stdio::null())?;
    let stderr = collect_stderr(&mut child);
    let mut stdin = child.stdin.take().expect("piped");
    let copied = copy_cancellable(input, &mut stdin, cancel);
    drop(stdin);
    if copied.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| Error::io(format!("wait for `{program}`"), e))?;
    let stderr = stderr.join().unwrap_or_default();
    match copied {
        Err(e) if matches!(e.kind(), ErrorKind::Integrity | ErrorKind::Cancelled) => Err(e),
        copied => check_status(&program, status, &stderr).and(copied),
    }
}

/// The binary logs of an incremental backup, unpacked into a temporary directory.
struct Binlogs {
    start: BinlogPos,
    end: BinlogPos,
    files: Vec<String>,
}

impl Binlogs {
    /// The binlog range an incremental's manifest records.
    fn from_stats(stats: &crate::source::Stats) -> Result<Binlogs> {
        let field = |name: &str| {
            stats
                .get(name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| Error::integrity(format!("the manifest has no {name}")))
        };
        let start = BinlogPos::parse(field("binlog_start")?)?;
        let end = BinlogPos::parse(field("binlog_end")?)?;
        let files: Vec<String> = stats
            .get("binlog_files")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .filter(|f: &Vec<String>| !f.is_empty() && f.iter().all(|f| valid_binlog_name(f)))
            .ok_or_else(|| Error::integrity("the manifest lists no usable binlog_files"))?;
        if files.first() != Some(&start.file) || files.last() != Some(&end.file) {
            return Err(Error::integrity(
                "binlog_files do not run from binlog_start to binlog_end",
            ));
        }
        Ok(Binlogs { start, end, files })
    }

    /// Unpacks the incremental's tar of binary logs into a temporary directory; every file of
    /// the range must be there.
    fn unpack(&self, tar: &mut dyn Read, cancel: &Cancel) -> Result<Temporary> {
        let dir = Temporary::dir()?;
        let opts = super::ExtractOptions::default();
        super::extract::extract(tar, dir.path(), &opts, cancel)?;
        for f in &self.files {
            if !dir.path().join(f).is_file() {
                return Err(Error::integrity(format!(
                    "binary log {f} is missing from the backup"
                )));
            }
        }
        Ok(dir)
    }

    /// The `mariadb-binlog` command that turns the binary logs unpacked in `dir` into the
    /// statements to replay into the target database, up to `until` if given.
    /// Without `filtered`, every database's statements, as they are (for
    /// [`check_left_out`]).
    fn command(
        &self,
        dir: &std::path::Path,
        conn: &Conn,
        source_db: &str,
        until: Option<DateTime<Utc>>,
        filtered: bool,
    ) -> Command {
        let mut binlog = Command::new("mariadb-binlog");
        // --stop-datetime is read in the local time zone of mariadb-binlog.
        binlog
            .env("TZ", "UTC")
            // A corrupt event fails the read, which the check before the replay makes.
            .arg("--verify-binlog-checksum")
            .arg(format!("--start-position={}", self.start.pos))
            .arg(format!("--stop-position={}", self.end.pos));
        if filtered {
            // Row events are filtered by the name they were logged with, then renamed.
            binlog.arg(format!("--database={source_db}"));
            if source_db != conn.database {
                binlog.arg(format!("--rewrite-db={source_db}->{}", conn.database));
            }
        }
        if let Some(t) = until {
            // Event timestamps are whole seconds: replay everything up to the end of t's second.
            let stop = t.timestamp() + 1;
            let stop = DateTime::from_timestamp(stop, 0).expect("in range");
            binlog.arg(format!(
                "--stop-datetime={}",
                stop.format("%Y-%m-%d %H:%M:%S")
            ));
        }
        binlog.args(self.files.iter().map(|f| dir.join(f)));
        binlog
    }
}

/// Reads what `binlog` would replay into `target_db` and refuses, before the target is
/// touched, a statement that would change more than that database:
/// - one that changes accounts, privileges or databases themselves (`GRANT`, `CREATE USER`,
///   `DROP DATABASE` ...), which the binary logs hold for the source database when it was
///   the session's default database;
/// - one that names a database of `watched` (`DROP TABLE other.t`): the other databases of
///   the target server, and, replayed into another database than `source_db`, that one,
///   since `--rewrite-db` renames the database of row events and the default database of
///   statements, but not a database a statement names itself (`ALTER TABLE shop.orders`).
///
/// With `anyway` (`--replay-anyway`), each such statement is a warning instead, and the
/// logs are read to their end. Returns the statements read that change objects of
/// `source_db` (see [`changes_objects_of`]), for [`check_left_out`].
fn check_replay(
    binlog: Command,
    source_db: &str,
    target_db: &str,
    watched: &[String],
    anyway: bool,
    cancel: &Cancel,
) -> Result<Vec<Dated>> {
    let renamed = source_db != target_db;
    let own = (!renamed).then_some(source_db);
    let (mut found, mut kept) = (None, Vec::new());
    // Whether to read on after `why`.
    let mut refused = |why: String| {
        if anyway {
            tracing::warn!("{why}; replayed anyway (--replay-anyway)");
        } else {
            found = Some(why);
        }
        anyway
    };
    let (status, stderr, at) = read_statements(binlog, cancel, |part| match part {
        Part::Line(line) => {
            // Row events are base64, which has no dots.
            let named = if line.contains('.') {
                watched.iter().find(|db| names_database(line, db))
            } else {
                None
            };
            let Some(db) = named else { return true };
            let why = if db == source_db {
                format!("names database {source_db} itself; replayed into {target_db} it would change {source_db}")
            } else {
                format!("names database {db}, which the replay would change on the target server")
            };
            refused(format!(
                "the binary logs hold a statement that {why}: {}",
                line.chars().take(200).collect::<String>()
            ))
        }
        Part::End(text, at) => {
            if changes_the_server(&text, own) {
                return refused(format!(
                    "the binary logs hold a statement that changes the server, not database \
                     {source_db}, logged {}: {}",
                    logged_at(at),
                    shown(&text)
                ));
            }
            if changes_objects_of(&text, source_db) {
                kept.push((text, at));
            }
            true
        }
    })?;
    if let Some(why) = found {
        return Err(Error::invalid(why).hint(
            format!(
                "restore to a time before the statement with --until, or restore the full backup \
             alone (--backup with its ID){}",
                if renamed {
                    format!("; a database named {source_db} on another server takes the rest")
                } else {
                    String::new()
                }
            ) + "; --replay-anyway replays it as logged",
        ));
    }
    check_status("mariadb-binlog", status, &stderr).map_err(|e| {
        if !stderr.contains("crc check failed") {
            return e;
        }
        let until = at.map_or(String::new(), |t| {
            format!(
                "; the last whole event was logged at {}: --until {} replays what came before its second",
                t.to_rfc3339(),
                (t - chrono::Duration::seconds(1)).to_rfc3339()
            )
        });
        e.hint(format!(
            "an event of the binary logs fails its checksum: it was damaged on the server before \
             it was backed up{until}; or restore the full backup alone (--backup with its ID)"
        ))
    })?;
    Ok(kept)
}

/// A statement's head, and when its event was logged.
type Dated = (String, Option<DateTime<Utc>>);

/// Refuses, before the target is touched, a statement of the binary logs that changes
/// `source_db` but that the replay leaves out (`kept`, from [`check_replay`], are those it
/// keeps), as the whole logs (`all`) show. `mariadb-binlog --database` keeps a statement by
/// the session's default database, not by what it changes: one run from another database
/// or none (`ALTER TABLE shop.orders ADD note TEXT` from `mariadb -e`) is not replayed, and
/// the rows logged after it would be applied as if it had not been (a column's values
/// dropped). Row events are kept by their table's database and are not affected.
fn check_left_out(
    kept: Vec<Dated>,
    all: Command,
    source_db: &str,
    anyway: bool,
    cancel: &Cancel,
) -> Result<()> {
    // The replay prints what it keeps in the order of the whole logs.
    let mut kept = kept.into_iter().peekable();
    let mut found = None;
    let (status, stderr, _) = read_statements(all, cancel, |part| {
        let Part::End(text, at) = part else {
            return true;
        };
        if !changes_objects_of(&text, source_db) || kept.next_if(|(k, _)| *k == text).is_some() {
            return true;
        }
        let refused = Error::invalid(format!(
            "the binary logs hold a statement that changes database {source_db} from \
             a session whose default database was another one (or none), logged {}: \
             the replay would leave it out, and apply the rows logged after it as if \
             it had not been: {}",
            logged_at(at),
            shown(&text)
        ))
        .hint(
            "restore to a time before the statement with --until, then apply it and \
             what followed by hand; or restore the full backup alone (--backup with its \
             ID); --replay-anyway replays the rest without it",
        );
        if anyway {
            tracing::warn!("{refused}; replayed anyway (--replay-anyway)");
        } else {
            found = Some(refused);
        }
        anyway
    })?;
    if let Some(refused) = found {
        return Err(refused);
    }
    check_status("mariadb-binlog", status, &stderr)
}

/// Whether `statement` changes objects of database `db` (see [`changed_objects`]).
fn changes_objects_of(statement: &str, db: &str) -> bool {
    changed_objects(statement).is_some_and(|part| names_database(part, db))
}

/// What [`read_statements`] hands on.
enum Part<'a> {
    /// A line of a statement.
    Line(&'a str),
    /// A statement that has ended: its head ([`STATEMENT_HEAD`]), and when it was logged.
    End(String, Option<DateTime<Utc>>),
}

/// Runs `binlog` and hands the statements it prints to `each`, line by line and then whole,
/// until `each` returns false, which stops `binlog`. Event headers (`#261201  9:30:00
/// server id 1 ...`, in UTC) are not handed on: they date the statements. Returns the exit
/// status of `binlog`, its standard error, and when the last event read was logged.
fn read_statements(
    mut binlog: Command,
    cancel: &Cancel,
    mut each: impl FnMut(Part<'_>) -> bool,
) -> Result<(std::process::ExitStatus, String, Option<DateTime<Utc>>)> {
    let mut child = spawn(&mut binlog, Stdio::null(), Stdio::piped())?;
    let stderr = collect_stderr(&mut child);
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let mut at = None;
    // After a line that ends a statement (`/*!*/;`, the delimiter mariadb-binlog sets), the
    // next line that is not an event header starts one; its head (comments included) is
    // kept until its end.
    let (mut starts, mut statement): (bool, Option<String>) = (false, None);
    let read = (|| -> Result<bool> {
        for line in out.split(b'\n') {
            cancel.check()?;
            let line = line.map_err(|e| Error::io("read mariadb-binlog's output", e))?;
            let line = String::from_utf8_lossy(&line);
            if statement.is_none() {
                if let Some(header) = line.strip_prefix('#') {
                    at = event_time(header).or(at);
                    continue;
                }
                if !starts {
                    // Before the first statement: the delimiter is being set.
                    starts = line.ends_with("/*!*/;");
                    continue;
                }
                statement = Some(String::new());
            }
            let text = statement.as_mut().expect("a statement");
            if text.len() < STATEMENT_HEAD {
                text.push_str(&line);
                text.push('\n');
            }
            if !each(Part::Line(&line)) {
                return Ok(false);
            }
            starts = line.ends_with("/*!*/;");
            if starts && !each(Part::End(statement.take().expect("a statement"), at)) {
                return Ok(false);
            }
        }
        Ok(true)
    })();
    if !matches!(read, Ok(true)) {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("wait for `mariadb-binlog`", e))?;
    read?;
    Ok((status, stderr.join().unwrap_or_default(), at))
}

/// The part of `statement` that names the objects it changes, if it changes tables, views,
/// routines or rows (not accounts, privileges or statistics: `GRANT ... ON shop.*`,
/// `ANALYZE TABLE shop.t`): after its comments, up to the first word that starts what it
/// reads (`CREATE VIEW v AS SELECT ... FROM shop.t`, `CREATE TABLE t LIKE shop.t`,
/// `INSERT INTO t SELECT ...`, `REFERENCES shop.p`), which rows (`WHERE`), or a body
/// (`BEGIN`, `DO`, `FOR EACH ROW`, a routine's parameters and what follows them). For
/// `SET STATEMENT ... FOR s`, that of `s`.
fn changed_objects(statement: &str) -> Option<&str> {
    let statement = &statement[comments_end(statement)..];
    let words = leading_words(statement, 6);
    let word = |i: usize| words.get(i).map(String::as_str);
    let lower = statement.to_ascii_lowercase();
    // Where each word starts, and the word (lower-cased).
    let starts = || {
        lower.char_indices().filter_map(|(i, c)| {
            let after_word = i > 0 && {
                let b = lower.as_bytes()[i - 1];
                b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
            };
            (c.is_ascii_alphabetic() && !after_word).then(|| {
                let len = lower[i..]
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                (i, &lower[i..i + len])
            })
        })
    };
    match word(0)? {
        "SET" if word(1) == Some("STATEMENT") => {
            let (at, _) = starts().find(|&(_, w)| w == "for")?;
            return changed_objects(&statement[at + 3..]);
        }
        "INSERT" | "REPLACE" | "UPDATE" | "DELETE" | "TRUNCATE" | "LOAD" | "RENAME" => {}
        "ALTER" | "CREATE" | "DROP"
            if !matches!(
                word(1),
                Some("USER" | "ROLE" | "DATABASE" | "SCHEMA" | "SERVER")
            ) => {}
        _ => return None,
    }
    let cut = |w: &str| {
        matches!(
            w,
            "as" | "select" | "like" | "where" | "values" | "references" | "begin" | "do" | "for"
        )
    };
    let mut end = starts()
        .find(|&(_, w)| cut(w))
        .map_or(statement.len(), |(i, _)| i);
    if words.iter().any(|w| w == "PROCEDURE" || w == "FUNCTION") {
        end = end.min(statement.find('(').unwrap_or(end));
    }
    Some(&statement[..end])
}

/// Where the comments that start `sql` end (`-- `, `#`, `/* */`, but not an executable
/// comment, `/*! */` or `/*M! */`, which the server runs).
fn comments_end(sql: &str) -> usize {
    let mut at = 0;
    loop {
        let rest = &sql[at..];
        let t = rest.trim_start();
        at += rest.len() - t.len();
        if t.starts_with("--") || t.starts_with('#') {
            at += t.find('\n').map_or(t.len(), |i| i + 1);
        } else if t.starts_with("/*") && !t.starts_with("/*!") && !t.starts_with("/*M!") {
            at += t.find("*/").map_or(t.len(), |i| i + 2);
        } else {
            return at;
        }
    }
}

/// The start of a statement's text, for a message.
fn shown(statement: &str) -> String {
    statement
        .trim_end()
        .trim_end_matches("/*!*/;")
        .trim()
        .chars()
        .take(200)
        .collect()
}

/// The time of an event, from its header line (`#261201  9:30:00 server id 1 ...`, in UTC,
/// without its `#`).
fn event_time(header: &str) -> Option<DateTime<Utc>> {
    let time = header
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    chrono::NaiveDateTime::parse_from_str(&time, "%y%m%d %H:%M:%S")
        .ok()
        .map(|t| t.and_utc())
}

/// When an event was logged, and the `--until` that replays what came before it.
fn logged_at(at: Option<DateTime<Utc>>) -> String {
    at.map_or("at an unknown time".to_owned(), |t| {
        format!(
            "at {} (--until {} replays what came before its second)",
            t.to_rfc3339(),
            (t - chrono::Duration::seconds(1)).to_rfc3339()
        )
    })
}

/// How much of a statement's text is kept to tell what it does.
const STATEMENT_HEAD: usize = 4096;

/// Whether `statement` (its text, or its head) changes accounts, privileges or databases
/// rather than what is in one. `ALTER DATABASE` of the session's database (no name) changes
/// the restored one, as does one naming `own`, the source database when the restore keeps
/// its name.
fn changes_the_server(statement: &str, own: Option<&str>) -> bool {
    let words = leading_words(statement, 5);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let (object, rest) = match words.as_slice() {
        ["GRANT" | "REVOKE", ..] => return true,
        ["SET", "PASSWORD" | "DEFAULT", ..] => return true,
        ["CREATE", "OR", "REPLACE", object, rest @ ..] => (*object, rest),
        ["CREATE" | "DROP" | "ALTER" | "RENAME", object, rest @ ..] => (*object, rest),
        _ => return false,
    };
    // The word may run into the name (`DATABASE`x``).
    let (object, glued) = match object.find('`') {
        Some(i) => (&object[..i], Some(&object[i..])),
        None => (object, None),
    };
    match object {
        "USER" | "ROLE" => true,
        "DATABASE" | "SCHEMA" if words[0] == "ALTER" => {
            let name = glued.or(rest.first().copied()).unwrap_or_default();
            let name = name.trim_matches('`');
            let unnamed = matches!(
                name,
                "" | "CHARACTER" | "CHARSET" | "DEFAULT" | "COLLATE" | "COMMENT" | "READ"
            );
            !(unnamed || own.is_some_and(|db| name.eq_ignore_ascii_case(db)))
        }
        "DATABASE" | "SCHEMA" => true,
        _ => false,
    }
}

/// The first `n` words of SQL text, upper-cased, after its comments (`-- `, `#`, `/* */`):
/// the body of an executable comment (`/*!50001 ...*/`, `/*M!100100 ...*/`) counts as text,
/// as the server runs it.
fn leading_words(sql: &str, n: usize) -> Vec<String> {
    let mut text = String::new();
    let mut rest = sql;
    while !rest.is_empty() && text.split_whitespace().count() <= n {
        let t = rest.trim_start();
        if t.starts_with("--") || t.starts_with('#') {
            rest = t.find('\n').map_or("", |i| &t[i + 1..]);
        } else if let Some(comment) = t.strip_prefix("/*") {
            let Some(end) = comment.find("*/") else {
                break;
            };
            let body = &comment[..end];
            if let Some(code) = body.strip_prefix('!').or_else(|| body.strip_prefix("M!")) {
                text.push(' ');
                text.push_str(code.trim_start_matches(|c: char| c.is_ascii_digit()));
                text.push(' ');
            }
            rest = &comment[end + 2..];
        } else {
            // Text, up to the end of its line or a comment within it.
            let line_end = t.find('\n').unwrap_or(t.len());
            let cut = ["/*", "-- ", "#"]
                .iter()
                .filter_map(|m| t[..line_end].find(m))
                .min()
                .unwrap_or(line_end);
            text.push(' ');
            text.push_str(&t[..cut]);
            rest = &t[cut..];
        }
    }
    text.split_whitespace()
        .take(n)
        .map(str::to_ascii_uppercase)
        .collect()
}

/// Whether SQL text `line` qualifies a name with database `db` (`db.t`, `` `db`.t `` or, in
/// `ANSI_QUOTES` mode, `"db".t`; any case), outside what is plainly another identifier.
fn names_database(line: &str, db: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    let (lower, db) = (line.to_lowercase(), db.to_lowercase());
    for quoted in [format!("`{db}`"), format!("\"{db}\""), db.clone()] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(&quoted) {
            let (start, end) = (from + i, from + i + quoted.len());
            from = start + 1;
            let before = lower[..start].chars().next_back();
            if quoted == db && before.is_some_and(|c| is_ident(c) || c == '`') {
                continue;
            }
            if lower[end..].trim_start().starts_with('.') {
                return true;
            }
        }
    }
    false
}

/// `binlog | client`, the replay: both must succeed; the client's failure is reported
/// first (it explains the broken pipe of `mariadb-binlog`). The statements that would give
/// each transaction the source's GTID are left out (see [`without_gtids`]).
fn replay(mut binlog: Command, client: Command, cancel: &Cancel) -> Result<()> {
    cancel.check()?;
    let mut child = spawn(&mut binlog, Stdio::null(), Stdio::piped())?;
    let stderr = collect_stderr(&mut child);
    let out = child.stdout.take().expect("piped");
    let fed = feed(
        client,
        &mut without_gtids(BufReader::with_capacity(1 << 20, out)),
        cancel,
    );
    if fed.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("wait for `mariadb-binlog`", e))?;
    let stderr = stderr.join().unwrap_or_default();
    fed?;
    check_status("mariadb-binlog", status, &stderr)
}

/// `mariadb-binlog`'s output without the statements it writes before each transaction to
/// give it the source's GTID (`SET @@session.gtid_domain_id`, `server_id`, `gtid_seq_no`).
/// Replayed, they would log the source's GTIDs again on the target server: refused as out of
/// order where `gtid_strict_mode` is on (error 1950), and elsewhere a second transaction under
/// an ID the source's replicas already hold. Without them the target gives the replayed
/// transactions GTIDs of its own, as it does any client's.
fn without_gtids(binlog: impl BufRead) -> impl BufRead {
    // The next line starts a statement: the last one ended one, or was a comment.
    let mut starts = true;
    EditLines::new(binlog, b"", move |line| {
        let start = std::mem::replace(
            &mut starts,
            line.starts_with(b"#") || line.trim_ascii_end().ends_with(b"/*!*/;"),
        );
        if start && sets_gtid(line) {
            line.clear();
        }
    })
}

/// Whether `line` (with its newline) is one of the statements [`without_gtids`] leaves out.
fn sets_gtid(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"/*M!100001 SET @@session.") else {
        return false;
    };
    let Some(rest) = [&b"gtid_domain_id="[..], b"server_id=", b"gtid_seq_no="]
        .iter()
        .find_map(|name| rest.strip_prefix(*name))
    else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && matches!(&rest[digits..], b"*//*!*/;\n" | b"*//*!*/;\r\n")
}

/// `mariadb-dump`'s output with the views' definitions renamed from database `from` to
/// `to`. The server writes a view whose definer lacks rights on what it reads (or has no
/// account) as stored, its columns named by database (`` select `shop`.`t`.`id` AS `id`
/// from `t` ``): restored into another database, it failed the restore (unknown column).
fn views_renamed(dump: impl BufRead, from: &str, to: &str) -> impl BufRead {
    let quoted = |db: &str| format!("`{}`.", db.replace('`', "``")).into_bytes();
    let (from, to) = (quoted(from), quoted(to));
    EditLines::new(dump, b"/*!50001 VIEW ", move |line| {
        replace(line, &from, &to);
    })
}

/// `mariadb-dump`'s output with its scheduled events created disabled, for a copy restored
/// into database `to` (another name than the source's): run there, an event would do its
/// work a second time beside the source's, and one that names the source's tables
/// (`DELETE FROM shop.sessions`) would change them. A warning names each one.
fn events_disabled(dump: impl BufRead, to: &str) -> impl BufRead {
    const EVENT: &[u8] = b"/*!50106 EVENT ";
    const ENABLED: &[u8] = b" PRESERVE ENABLE DO ";
    let to = to.to_owned();
    EditLines::new(dump, b"/*!50106 CREATE*/", move |line| {
        let Some(at) = find(line, EVENT) else {
            return;
        };
        // The status comes before the body (`DO ...`), which may hold the same words.
        let Some(status) = find(&line[at..], ENABLED).map(|i| at + i) else {
            return;
        };
        let name = line[at + EVENT.len()..]
            .split(|&b| b == b' ')
            .next()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        line.splice(
            status..status + ENABLED.len(),
            b" PRESERVE DISABLE DO ".iter().copied(),
        );
        warn_disabled(&name, &to);
    })
}

/// Disables the enabled events of the target database, a copy (see [`events_disabled`]).
fn disable_events(conn: &Conn) -> Result<()> {
    let db = quote_ident(&conn.database);
    let enabled = conn.query(
        None,
        &format!(
            "SELECT EVENT_NAME FROM information_schema.EVENTS \
             WHERE EVENT_SCHEMA = {} AND STATUS = 'ENABLED'",
            quote_str(&conn.database)
        ),
    )?;
    for name in enabled.iter().filter_map(|row| row.first()) {
        let name = quote_ident(name);
        conn.query(None, &format!("ALTER EVENT {db}.{name} DISABLE"))?;
        warn_disabled(&name, &conn.database);
    }
    Ok(())
}

fn warn_disabled(name: &str, database: &str) {
    tracing::warn!(
        "event {name} is restored disabled: in database {database}, a copy, it would run beside \
         the source's; ALTER EVENT {name} ENABLE starts it"
    );
}

/// Where `pattern` first starts in `bytes`.
fn find(bytes: &[u8], pattern: &[u8]) -> Option<usize> {
    bytes.windows(pattern.len()).position(|w| w == pattern)
}

/// Replaces every occurrence of `from` in `line` with `to`.
fn replace(line: &mut Vec<u8>, from: &[u8], to: &[u8]) {
    let mut edited = Vec::with_capacity(line.len());
    let mut rest = &line[..];
    while let Some(i) = find(rest, from) {
        edited.extend_from_slice(&rest[..i]);
        edited.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    edited.extend_from_slice(rest);
    *line = edited;
}

/// A reader of `inner`'s lines, those that start with `prefix` as `edit` leaves them (empty:
/// left out). Only those are held whole in memory; the others pass as they arrive (a line
/// of a dump may be as large as a row).
struct EditLines<R, F> {
    inner: R,
    prefix: &'static [u8],
    edit: F,
    /// An edited line, and how much of it has been read.
    line: Vec<u8>,
    at: usize,
    /// Bytes of a line that passes that `fill_buf` last offered, and whether they end it.
    offered: usize,
    ends_line: bool,
    /// Within a line that passes.
    passing: bool,
}

impl<R: BufRead, F: FnMut(&mut Vec<u8>)> EditLines<R, F> {
    fn new(inner: R, prefix: &'static [u8], edit: F) -> Self {
        EditLines {
            inner,
            prefix,
            edit,
            line: Vec::new(),
            at: 0,
            offered: 0,
            ends_line: false,
            passing: false,
        }
    }
}

impl<R: BufRead, F: FnMut(&mut Vec<u8>)> Read for EditLines<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let mut available = self.fill_buf()?;
            available.read(buf)?
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead, F: FnMut(&mut Vec<u8>)> BufRead for EditLines<R, F> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.at == self.line.len() && !self.passing {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Ok(&[]);
            }
            // A line that may start with the prefix (its start is all that is here) is held.
            let head = &available[..available.len().min(self.prefix.len())];
            if !self.prefix.starts_with(head) {
                self.passing = true;
                break;
            }
            self.line.clear();
            self.at = 0;
            self.inner.read_until(b'\n', &mut self.line)?;
            if self.line.starts_with(self.prefix) {
                (self.edit)(&mut self.line);
            }
        }
        if self.at < self.line.len() {
            return Ok(&self.line[self.at..]);
        }
        let available = self.inner.fill_buf()?;
        let (offered, ends_line) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        self.offered = offered;
        self.ends_line = ends_line;
        Ok(&available[..offered])
    }

    fn consume(&mut self, amount: usize) {
        if self.at < self.line.len() {
            self.at = (self.at + amount).min(self.line.len());
        } else if self.passing {
            let amount = amount.min(self.offered);
            self.inner.consume(amount);
            self.offered -= amount;
            if self.offered == 0 && self.ends_line {
                self.passing = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        changed_objects, changes_the_server, events_disabled, names_database, views_renamed,
        without_gtids,
    };

    #[test]
    fn what_a_statement_changes_is_named_before_what_it_reads() {
        for statement in [
            "GRANT ALL ON shop.* TO app",
            "REVOKE INSERT ON shop.t FROM app",
            "ANALYZE TABLE shop.t",
            "OPTIMIZE TABLE shop.t",
            "FLUSH TABLES shop.t",
            "CREATE USER x",
            "SET @a = 1",
            "SET STATEMENT a=1 FOR ANALYZE TABLE shop.t",
        ] {
            assert_eq!(changed_objects(statement), None, "{statement}");
        }
        for (statement, changed) in [
            (
                "ALTER TABLE reports.x ADD FOREIGN KEY (p) REFERENCES shop.p (id)",
                "ALTER TABLE reports.x ADD FOREIGN KEY (p) ",
            ),
            (
                "CREATE DEFINER=`o`@`%` TRIGGER tr AFTER INSERT ON x FOR EACH ROW INSERT INTO shop.t VALUES (1)",
                "CREATE DEFINER=`o`@`%` TRIGGER tr AFTER INSERT ON x ",
            ),
            (
                "CREATE PROCEDURE reports.p() DELETE FROM shop.t",
                "CREATE PROCEDURE reports.p",
            ),
            (
                "CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO DELETE FROM shop.t",
                "CREATE EVENT e ON SCHEDULE EVERY 1 DAY ",
            ),
            (
                "ALTER TABLE shop.t ADD note TEXT",
                "ALTER TABLE shop.t ADD note TEXT",
            ),
            ("CREATE VIEW v AS SELECT * FROM shop.t", "CREATE VIEW v "),
            ("create table r.x like shop.t", "create table r.x "),
            (
                "INSERT INTO shop.t SELECT * FROM r.x",
                "INSERT INTO shop.t ",
            ),
            (
                "DELETE FROM r.x WHERE id IN (SELECT id FROM shop.t)",
                "DELETE FROM r.x ",
            ),
            (
                "UPDATE shop.t_as SET alias = 1",
                "UPDATE shop.t_as SET alias = 1",
            ),
            (
                "/* for ticket 42 */ -- as asked\n ALTER TABLE shop.t ADD c INT",
                "ALTER TABLE shop.t ADD c INT",
            ),
            (
                "SET STATEMENT max_statement_time=60 FOR ALTER TABLE shop.t ADD c INT",
                "ALTER TABLE shop.t ADD c INT",
            ),
        ] {
            assert_eq!(changed_objects(statement), Some(changed), "{statement}");
        }
        assert!(names_database(
            "ALTER TABLE \"shop\".\"t\" ADD c INT",
            "shop"
        ));
    }

    #[test]
    fn views_are_renamed_and_nothing_else() {
        let dump = "INSERT INTO `t` VALUES ('`shop`.x');\n\
            /*!50013 DEFINER=`o`@`%` SQL SECURITY DEFINER */\n\
            /*!50001 VIEW `v` AS select `shop`.`t`.`id` AS `id`, `shop2`.`u`.`x` AS `x` from (`t` join `shop2`.`u`) */;\n";
        let want = dump.replace("select `shop`.`t`", "select `copy`.`t`");
        // Read in pieces smaller than the prefix and than the lines, as from a pipe.
        for capacity in [1, 3, 5, 16, 1 << 16] {
            let mut out = String::new();
            let dump = std::io::BufReader::with_capacity(capacity, dump.as_bytes());
            std::io::Read::read_to_string(&mut views_renamed(dump, "shop", "copy"), &mut out)
                .unwrap();
            assert_eq!(out, want, "{capacity}");
        }
    }

    #[test]
    fn a_copys_events_are_created_disabled() {
        let dump = "/*!50106 CREATE*/ /*!50117 DEFINER=`r`@`%`*/ /*!50106 EVENT `e` ON SCHEDULE EVERY 1 DAY STARTS '2026-12-02 00:44:09' ON COMPLETION NOT PRESERVE ENABLE DO UPDATE t SET x = ' PRESERVE ENABLE DO '\n\
            */ ;;\n\
            /*!50106 CREATE*/ /*!50117 DEFINER=`r`@`%`*/ /*!50106 EVENT `f` ON SCHEDULE AT '2026-12-03 00:44:09' ON COMPLETION PRESERVE DISABLE DO DELETE FROM t\n";
        let mut out = String::new();
        std::io::Read::read_to_string(&mut events_disabled(dump.as_bytes(), "copy"), &mut out)
            .unwrap();
        assert_eq!(
            out,
            dump.replacen("NOT PRESERVE ENABLE DO", "NOT PRESERVE DISABLE DO", 1)
        );
    }

    #[test]
    fn the_sources_gtids_are_left_out_of_the_replay_and_nothing_else() {
        let binlog = "# at 4\n\
            #261201  9:30:00 server id 1  end_log_pos 256 CRC32 0x0  GTID 0-1-8 trans\n\
            /*M!100101 SET @@session.skip_parallel_replication=0*//*!*/;\n\
            /*M!100001 SET @@session.gtid_domain_id=0*//*!*/;\n\
            /*M!100001 SET @@session.server_id=1*//*!*/;\n\
            /*M!100001 SET @@session.gtid_seq_no=8*//*!*/;\n\
            START TRANSACTION\n\
            /*!*/;\n\
            INSERT INTO t VALUES ('a\n\
            /*M!100001 SET @@session.gtid_seq_no=9*//*!*/;\n\
            ')\n\
            /*!*/;\n\
            /*M!100001 SET @@session.gtid_seq_no=x*//*!*/;\n";
        let mut out = String::new();
        std::io::Read::read_to_string(&mut without_gtids(binlog.as_bytes()), &mut out).unwrap();
        let want = binlog
            .lines()
            .enumerate()
            .filter(|(i, _)| ![3, 4, 5].contains(i))
            .map(|(_, l)| format!("{l}\n"))
            .collect::<String>();
        assert_eq!(out, want);
    }

    #[test]
    fn statements_that_change_accounts_or_databases_are_found() {
        for line in [
            "GRANT SELECT ON app.* TO reader",
            "revoke all on *.* from x",
            "CREATE USER 'a'@'%' IDENTIFIED BY 'x'",
            "CREATE OR REPLACE USER a",
            "create role r",
            "DROP USER IF EXISTS a",
            "ALTER USER a ACCOUNT LOCK",
            "RENAME USER a TO b",
            "SET PASSWORD FOR a = PASSWORD('x')",
            "SET DEFAULT ROLE r FOR a",
            "DROP DATABASE app",
            "drop database `app`",
            "CREATE DATABASE IF NOT EXISTS other",
            "CREATE SCHEMA`x`",
            "/* migration 12 */ GRANT SELECT ON app.t TO r",
            "  /* a */ /* b */ DROP DATABASE x",
            "-- v12\nGRANT SELECT ON app.* TO r\n/*!*/;",
            "# note\n/* more */\nCREATE\n  USER reader",
            "/*!40000 DROP DATABASE IF EXISTS `x`*/",
            "/*M!100100 CREATE USER x */",
            "ALTER DATABASE other CHARACTER SET utf8mb4",
            "ALTER DATABASE `app` COMMENT 'x'",
        ] {
            assert!(changes_the_server(line, None), "{line}");
        }
        // The restored database itself, when it keeps its name.
        for line in [
            "ALTER DATABASE app CHARACTER SET utf8mb4",
            "ALTER DATABASE `app` COMMENT 'x'",
            "ALTER SCHEMA APP DEFAULT COLLATE utf8mb4_bin",
            "ALTER DATABASE CHARACTER SET utf8mb4",
            "ALTER DATABASE DEFAULT CHARSET latin1",
        ] {
            assert!(!changes_the_server(line, Some("app")), "{line}");
        }
        assert!(changes_the_server(
            "ALTER DATABASE other CHARSET x",
            Some("app")
        ));
        assert!(changes_the_server("DROP DATABASE app", Some("app")));
        for line in [
            "CREATE TABLE users (id INT)",
            "ALTER TABLE users ADD role INT",
            "DROP TABLE database_log",
            "CREATE OR REPLACE VIEW roles AS SELECT 1",
            "SET TIMESTAMP=1764610200/*!*/;",
            "SET @@session.pseudo_thread_id=5/*!*/;",
            "INSERT INTO grants VALUES (1)",
            "BINLOG '",
            "/*!50001 CREATE ALGORITHM=UNDEFINED VIEW v AS SELECT 1 */",
            "/* unterminated",
            "",
            "-- GRANT in a comment\nINSERT INTO t VALUES (1)",
            "INSERT INTO t VALUES ('/* GRANT */')",
        ] {
            assert!(!changes_the_server(line, None), "{line}");
        }
    }

    #[test]
    fn statements_that_name_a_database_are_found() {
        for line in [
            "ALTER TABLE shop.orders ADD COLUMN x INT",
            "create table `shop`.`t` (id int)",
            "DROP TABLE Shop . t",
            "INSERT INTO t SELECT * FROM shop.orders",
        ] {
            assert!(names_database(line, "shop"), "{line}");
        }
        for line in [
            "ALTER TABLE orders ADD COLUMN x INT",
            "use `shop_copy`/*!*/;",
            "ALTER TABLE myshop.t ADD x INT",
            "ALTER TABLE `my shop`.t ADD x INT",
            "SET @@session.sql_mode=1411383296/*!*/;",
            "ALTER TABLE shop_orders.t ADD x INT",
        ] {
            assert!(!names_database(line, "shop"), "{line}");
        }
    }
}
