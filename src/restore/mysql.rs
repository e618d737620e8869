//! Restores a MariaDB/MySQL backup into a database: the chain's full dump is loaded with
//! `mariadb`, then each incremental's binary logs are replayed with `mariadb-binlog` from the
//! position the previous backup ends at, up to the chain's end or `--until`. Row counts
//! recorded at backup time are compared with the restored tables when the restore reaches a
//! backup's end.
//!
//! `--until` is applied to binary log event timestamps, which have whole-second precision:
//! events logged in the same second as the given time are replayed, later ones are not.
//! Connection details come from the URL, the password from MYSQL_PWD in the environment.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{
    compare_rows, copy_cancellable, open_object, RecoveryTarget, RestorePlan, RestoreReport, Target,
};
use crate::cancel::Cancel;
use crate::crypto::Identities;
use crate::format::{BackupId, Manifest, ObjectKey};
use crate::pipeline::{Decoder, Digest};
use crate::registry::Status;
use crate::repo::Repo;
use crate::source::command::{check_status, collect_stderr, spawn};
use crate::source::mysql::{quote_ident, valid_binlog_name, BinlogPos, Conn};
use crate::{Error, ErrorKind, Result};

/// Checks a restore request before anything is written: the target database must be empty
/// or missing unless `overwrite`, and the recovery target must be a time.
pub async fn check_request(url: &str, overwrite: bool, recovery: &RecoveryTarget) -> Result<()> {
    if let RecoveryTarget::Lsn(_) = recovery {
        return Err(Error::invalid(
            "--lsn is for PostgreSQL backups; use --until for MariaDB/MySQL",
        ));
    }
    let conn = target(url)?;
    let tables = blocking(move || table_count(&conn)).await?;
    if tables > 0 && !overwrite {
        return Err(Error::invalid(format!(
            "target database {} is not empty ({tables} tables)",
            target(url)?
        ))
        .hint(
            "restore into a new or empty database, or pass --overwrite to drop and re-create it",
        ));
    }
    Ok(())
}

fn target(url: &str) -> Result<Conn> {
    Conn::parse_url(url).map_err(|e| e.context("--to-database"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::failure(format!("restore thread failed: {e}")))?
}

/// A string literal for SQL.
fn quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn table_count(conn: &Conn) -> Result<u64> {
    let rows = conn.query(
        None,
        &format!(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {}",
            quote_str(&conn.database)
        ),
    )?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
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
    identities: Arc<Identities>,
    cancel: &Cancel,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let Target::Database { url, overwrite } = &plan.target else {
        return Err(Error::invalid("a mysql restore needs --to-database"));
    };
    let conn = target(url)?;
    let mut chain = chain(repo, &plan.backup_id).await?;
    let until = match &plan.recovery {
        RecoveryTarget::Time(t) => Some(*t),
        RecoveryTarget::Latest => None,
        RecoveryTarget::Lsn(_) => {
            return Err(Error::invalid(
                "--lsn is for PostgreSQL backups; use --until for MariaDB/MySQL",
            ))
        }
    };
    if let Some(t) = until {
        let base = &chain[0];
        if taken_at(base) > t {
            return Err(Error::invalid(format!(
                "--until {t} is before backup {} (the full backup of this chain, taken {})",
                base.backup_id,
                taken_at(base)
            ))
            .hint("pick an older backup with --backup ID (`drctl list` shows them)"));
        }
        // An incremental's logs start where its parent ends: later ones add nothing.
        let keep = 1 + chain[1..]
            .iter()
            .zip(&chain)
            .take_while(|(_, parent)| taken_at(parent) <= t)
            .count();
        chain.truncate(keep);
    }
    let last = chain.last().expect("a chain has a full backup");
    // Counts were taken where a backup ends; they describe the result only when the
    // restore replays to that point.
    let expected = match until {
        Some(t) if t < taken_at(last) => None,
        _ => Some(last.source.stats.clone()),
    };

    let c = conn.clone();
    let overwrite = *overwrite;
    blocking(move || prepare(&c, overwrite)).await?;

    let source_db = chain[0]
        .source
        .descriptor
        .get("database")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| Error::integrity("the full backup's manifest names no database"))?;
    let mut plain = None;
    let mut applied = Vec::new();
    for manifest in &chain {
        let data = manifest.data()?.clone();
        let key = ObjectKey::object(
            &manifest.environment,
            &manifest.policy,
            &manifest.backup_id,
            &data.object_name()?,
        );
        let stream = open_object(&repo.store, &key, &manifest.backup_id).await?;
        let what = format!("backup {} object {key}", manifest.backup_id);
        let (ids, recipients) = (identities.clone(), manifest.encryption.recipients.clone());
        let (c, cancel, source_db) = (conn.clone(), cancel.clone(), source_db.clone());
        let full = manifest.parent_id.is_none();
        let stats = manifest.source.stats.clone();
        let digest = blocking(move || {
            let decoder = Decoder::open(stream, &ids, data, &recipients, what)?;
            if full {
                load_dump(&c, decoder, &cancel)
            } else {
                replay(&c, &source_db, decoder, &stats, until, &cancel)
            }
        })
        .await
        .map_err(|e| e.context(format!("restore of backup {}", manifest.backup_id)))?;
        plain.get_or_insert(digest);
        applied.push(manifest.backup_id.clone());
    }

    let rows = match expected {
        Some(stats) => {
            let c = conn.clone();
            let actual = blocking(move || c.row_counts()).await?;
            Some(compare_rows(
                &last.backup_id,
                &stats,
                &actual,
                &conn.to_string(),
            )?)
        }
        None => None,
    };
    Ok(RestoreReport {
        backup_id: plan.backup_id.clone(),
        plain: plain.expect("the chain has a full backup"),
        extracted: None,
        written_to: None,
        chain: applied,
        rows,
        postgres: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Creates the target database, dropping it first with `overwrite`; refuses a non-empty one
/// otherwise (it may have filled since the plan was made).
fn prepare(conn: &Conn, overwrite: bool) -> Result<()> {
    let db = quote_ident(&conn.database);
    if overwrite {
        conn.query(
            None,
            &format!("DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db}"),
        )?;
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
    Ok(())
}

fn client(conn: &Conn) -> Command {
    let mut cmd = conn.command("mariadb");
    cmd.args(["--batch", &format!("--database={}", conn.database)]);
    cmd
}

/// Loads a dump: `mariadb` stops at the first failing statement.
fn load_dump(conn: &Conn, mut decoder: Decoder, cancel: &Cancel) -> Result<Digest> {
    feed(client(conn), &mut decoder, cancel)?;
    decoder.finish()
}

/// Copies `input` to the standard input of `cmd`. A failed command explains a failed write,
/// a damaged input explains the command's death.
fn feed(mut cmd: Command, input: &mut dyn Read, cancel: &Cancel) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = spawn(&mut cmd, Stdio::piped(), Stdio::null())?;
    let stderr = collect_stderr(&mut child);
    let mut stdin = child.stdin.take().expect("piped");
    let copied = copy_cancellable(&mut ReadRef(input), &mut stdin, cancel);
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

struct ReadRef<'a>(&'a mut dyn Read);

impl Read for ReadRef<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

/// Unpacks an incremental's binary logs and replays them into the target database.
fn replay(
    conn: &Conn,
    source_db: &str,
    mut decoder: Decoder,
    stats: &crate::source::Stats,
    until: Option<DateTime<Utc>>,
    cancel: &Cancel,
) -> Result<Digest> {
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

    let dir = tempfile::tempdir().map_err(|e| Error::io("create a temporary directory", e))?;
    let opts = super::ExtractOptions {
        allow_special: false,
    };
    super::extract::extract(&mut decoder, dir.path(), &opts, cancel)?;
    let digest = decoder.finish()?;
    for f in &files {
        if !dir.path().join(f).is_file() {
            return Err(Error::integrity(format!(
                "binary log {f} is missing from the backup"
            )));
        }
    }

    let mut binlog = Command::new("mariadb-binlog");
    // --stop-datetime is read in the local time zone of mariadb-binlog.
    binlog
        .env("TZ", "UTC")
        .arg(format!("--start-position={}", start.pos))
        .arg(format!("--stop-position={}", end.pos))
        // Row events are filtered by the name they were logged with, then renamed.
        .arg(format!("--database={source_db}"));
    if source_db != conn.database {
        binlog.arg(format!("--rewrite-db={source_db}->{}", conn.database));
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
    binlog.args(files.iter().map(|f| dir.path().join(f)));
    pipe(binlog, client(conn), cancel)?;
    Ok(digest)
}

/// `a | b`: both must succeed; `b`'s failure is reported first (it explains `a`'s broken pipe).
fn pipe(mut a: Command, mut b: Command, cancel: &Cancel) -> Result<()> {
    cancel.check()?;
    let name = |c: &Command| c.get_program().to_string_lossy().into_owned();
    let (a_name, b_name) = (name(&a), name(&b));
    let mut first = spawn(&mut a, Stdio::null(), Stdio::piped())?;
    let first_err = collect_stderr(&mut first);
    let out = first.stdout.take().expect("piped");
    let mut second = match spawn(&mut b, Stdio::from(out), Stdio::null()) {
        Ok(c) => c,
        Err(e) => {
            let _ = first.kill();
            let _ = first.wait();
            return Err(e);
        }
    };
    let second_err = collect_stderr(&mut second);
    let second_status = second
        .wait()
        .map_err(|e| Error::io(format!("wait for `{b_name}`"), e))?;
    if !second_status.success() {
        let _ = first.kill();
    }
    let first_status = first
        .wait()
        .map_err(|e| Error::io(format!("wait for `{a_name}`"), e))?;
    let (first_err, second_err) = (
        first_err.join().unwrap_or_default(),
        second_err.join().unwrap_or_default(),
    );
    check_status(&b_name, second_status, &second_err)?;
    check_status(&a_name, first_status, &first_err)?;
    cancel.check()
}
