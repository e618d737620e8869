//! PostgreSQL restores and the WAL archive.
//!
//! Logical: the dump streamed into a database (created if missing; a non-empty one only with
//! `overwrite`), the schema and what follows the data by `pg_restore`, the data by parallel
//! `COPY`s, stopping at the first error; then row counts compared with the manifest.
//! Physical: a base backup unpacked into a new data directory, recovery settings that fetch
//! WAL through `drctl wal fetch`, the server started and recovered to the latest point, a
//! time or an LSN, then checked. Every WAL segment recovery needs is checked
//! to be archived before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::extract::{self, ExtractOptions};
use super::{compare_rows, decode, RecoveryTarget, RowCheck, Selector, ServerOptions, Target};
use super::{pgcopy, pgdump};
use crate::cancel::{Cancel, Temporary};
use crate::config::ByteSize;
use crate::crypto::Identities;
use crate::format::manifest::BackupType;
use crate::format::{BackupId, Name};
use crate::pipeline::Digest;
use crate::registry::{BackupRecord, ListQuery, Lookup, Status};
use crate::repo::Repo;
use crate::source::command::{check_status, collect_stderr, spawn, wait_cancellable};
use crate::source::pgwal::{Carry, CreatedTablespace, TablespaceScan};
use crate::source::postgres::{
    count_rows, format_lsn, is_digits, parse_lsn, parse_segment, quoted_name_hex, quoted_names,
    relations, row_counts_parallel, segment_name, table_key, tables, Conn, Session, TimelineSwitch,
    WalRange, NO_TIMEOUTS,
};
use crate::{Error, Result};

/// The mode a postgres backup was taken in (`logical`, `physical` or `wal`).
pub fn mode(record: &BackupRecord) -> Option<&str> {
    let m = record.manifest.as_ref()?;
    (m.source.kind == "postgres")
        .then(|| m.source.descriptor.get("mode")?.as_str())
        .flatten()
}

// ---------------------------------------------------------------------------------------
// Logical

/// The outcome of a logical restore.
#[derive(Debug, Clone, Serialize)]
pub struct LogicalReport {
    pub backup_id: BackupId,
    pub database: String,
    pub created: bool,
    pub plain: Digest,
    /// Whether the dump was streamed into the database (or went through a file for
    /// `pg_restore -j`).
    pub streamed: bool,
    /// Row counts in the restored database.
    pub tables: BTreeMap<String, u64>,
    pub seconds: f64,
}

/// State of a target database, found before anything is written.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseTarget {
    pub database: String,
    pub exists: bool,
    /// Objects outside the system schemas (see [`USER_OBJECTS`]).
    pub objects: u64,
    /// The server's `maintenance_work_mem` for the restoring role.
    #[serde(skip)]
    pub maintenance_work_mem: IndexMemory,
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Checks the target database before anything is written: it may be missing or empty; a
/// non-empty one needs `overwrite`.
pub fn check_database_target(target: &Conn, overwrite: bool) -> Result<DatabaseTarget> {
    let database = target.database().ok_or_else(|| {
        Error::invalid("the target URL names no database; use postgres://user@host:port/database")
    })?;
    let mut admin = target.with_database("postgres")?.session()?;
    let exists = admin.value(&format!(
        "SELECT count(*) FROM pg_database WHERE datname = {}",
        sql_literal(&database)
    ))? != "0";
    // The setting as the restore's sessions will find it (with the database's own, where
    // it exists, and PGOPTIONS's).
    const SETTING: &str = "SELECT setting FROM pg_settings WHERE name = 'maintenance_work_mem'";
    let (objects, setting) = if exists {
        admin.close()?;
        let mut s = target.session()?;
        let n = s.value(USER_OBJECTS)?;
        let setting = s.value(SETTING)?;
        s.close()?;
        (n.parse().unwrap_or(u64::MAX), setting)
    } else {
        let setting = admin.value(SETTING)?;
        admin.close()?;
        (0, setting)
    };
    let maintenance_work_mem = setting.parse().map(IndexMemory).map_err(|_| {
        Error::failure(format!(
            "the server reports maintenance_work_mem as {setting:?}, not a number of kB"
        ))
    })?;
    if objects > 0 && !overwrite {
        return Err(Error::invalid(format!(
            "target database {database} is not empty ({objects} relations, schemas, functions, \
             types, extensions or other objects)"
        ))
        .hint("restore into a new or empty database, or pass --overwrite to drop and recreate the objects the dump holds"));
    }
    Ok(DatabaseTarget {
        database,
        exists,
        objects,
        maintenance_work_mem,
    })
}

/// What makes a database not empty: what a dump can create in it. Relations, schemas (but
/// `public`), functions, types, collations, operators and their classes and families,
/// text search objects, conversions and extended statistics outside the system's schemas;
/// extensions (but PL/pgSQL, in every new database); and casts, languages, event triggers,
/// publications, foreign data wrappers and servers, and large objects made after initdb. A
/// failed restore may leave any of them, and a restore over them needs `pg_restore --clean`.
const USER_OBJECTS: &str = "WITH user_ns AS (SELECT oid, nspname FROM pg_namespace \
     WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'), \
     ns AS (SELECT oid FROM user_ns) \
     SELECT (SELECT count(*) FROM pg_class WHERE relnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM user_ns WHERE nspname <> 'public') \
     + (SELECT count(*) FROM pg_proc WHERE pronamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_type WHERE typnamespace IN (SELECT oid FROM ns) \
        AND typrelid = 0 AND typcategory <> 'A') \
     + (SELECT count(*) FROM pg_collation WHERE collnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_operator WHERE oprnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_opclass WHERE opcnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_opfamily WHERE opfnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_ts_config WHERE cfgnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_ts_dict WHERE dictnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_ts_parser WHERE prsnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_ts_template WHERE tmplnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_conversion WHERE connamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_statistic_ext WHERE stxnamespace IN (SELECT oid FROM ns)) \
     + (SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql') \
     + (SELECT count(*) FROM pg_cast WHERE oid >= 16384) \
     + (SELECT count(*) FROM pg_language WHERE oid >= 16384) \
     + (SELECT count(*) FROM pg_event_trigger) \
     + (SELECT count(*) FROM pg_publication) \
     + (SELECT count(*) FROM pg_foreign_data_wrapper) \
     + (SELECT count(*) FROM pg_foreign_server) \
     + (SELECT count(*) FROM pg_largeobject_metadata)";

/// Creates the database a checked target found missing as the dump's was (`dump`, if the
/// dump says), as `pg_restore --create` does: with its encoding, locale and tablespace,
/// owned by its owner. Where this server cannot (no such locale, tablespace or role), the
/// restore goes on with the server's defaults and says what differs. Notes in `created`
/// that this run did (a database that appeared meanwhile fails the creation and is not
/// this run's).
fn create_database(
    target: &Conn,
    state: &DatabaseTarget,
    dump: Option<&DatabaseLevel>,
    created: &AtomicBool,
) -> Result<()> {
    if state.exists {
        return Ok(());
    }
    let db = &state.database;
    let server = target.with_database("postgres")?;
    // A failed statement ends its session: the next gets a new one.
    let mut admin = server.session()?;
    let to = format!("DATABASE {}", sql_ident(db));
    // From template0, as pg_restore --create does: objects added to template1 would
    // collide with the dump's.
    let plain = format!("CREATE {to} TEMPLATE template0");
    let like_the_dump = dump.and_then(|d| d.create_statement(&mut admin, &to, db));
    match like_the_dump {
        Some((create, definition)) => {
            // libc is the default provider, which servers before PostgreSQL 15 do not name.
            let mut tried = admin.query(&create).map(drop);
            if tried.is_err() && create.contains(" LOCALE_PROVIDER = libc") {
                admin = server.session()?;
                tried = admin
                    .query(&create.replace(" LOCALE_PROVIDER = libc", ""))
                    .map(drop);
            }
            if let Err(e) = tried {
                tracing::warn!(
                    error = %e,
                    "database {db} cannot be created as the dump's was (`{definition}`): it is \
                     created with this server's encoding and locale; to restore into one like \
                     the dump's, create it by hand as this server allows and restore into it"
                );
                admin = server.session()?;
                admin.query(&plain)?;
            }
        }
        None => {
            admin.query(&plain)?;
        }
    }
    created.store(true, Ordering::SeqCst);
    if let Some(owner) = dump.and_then(|d| d.owner.as_deref()) {
        if let Err(e) = admin.query(&format!("ALTER {to} OWNER TO {}", sql_ident(owner))) {
            tracing::warn!(
                error = %e,
                "database {db} is not owned by role {owner}, as the dump's was, but by the \
                 restoring role"
            );
            return Ok(());
        }
    }
    admin.close()
}

/// After a failed logical restore: drops the database if this restore `created` it, and
/// says what became of the target either way.
fn abandon(target: &Conn, state: &DatabaseTarget, created: bool, e: Error) -> Error {
    let db = &state.database;
    if !state.exists && !created {
        // Its creation failed: nothing was written.
        return e;
    }
    let note = if !created && state.objects > 0 {
        format!(
            "database {db} is as it was if pg_restore failed: over existing objects it restores \
             in one transaction"
        )
    } else if !created {
        format!("database {db} may hold part of the backup now; restore again with --overwrite")
    } else {
        let dropped = target.with_database("postgres").and_then(|admin| {
            let mut admin = admin.session()?;
            admin.query(&format!("DROP DATABASE IF EXISTS {}", sql_ident(db)))?;
            admin.close()
        });
        match dropped {
            Ok(()) => format!("database {db}, which this restore created, has been dropped"),
            Err(drop) => format!(
                "database {db}, which this restore created, holds part of the backup and could \
                 not be dropped ({drop}); drop it before restoring again"
            ),
        }
    };
    let hint = match e.guidance() {
        Some(h) => format!("{h}; {note}"),
        None => note,
    };
    e.hint(hint)
}

/// What the decoding side of a logical restore did with the dump.
enum Loaded {
    /// Schema and table data restored from the stream; the file holds the dump's TOC for
    /// the rest. Rows stored per table data entry.
    Streamed {
        entries: Vec<pgdump::Entry>,
        rows: BTreeMap<i64, u64>,
    },
    /// The whole dump written to the file, for `pg_restore -j`.
    File(pgdump::Written),
}

/// Restores a logical backup into the database the plan names, checked by
/// [`check_database_target`].
///
/// Into a new or empty database the dump is streamed: `pg_restore` creates the schema from
/// the dump's table of contents (TOC) as soon as it has arrived, then the table data goes
/// straight from the stream into `COPY`s over one session per core (see `pgcopy`), and
/// `pg_restore -j <cores>` builds the indexes and constraints (everything after the data)
/// once the whole dump has checked out. Nothing but the TOC touches the local disk, and the
/// rows each `COPY` stored are the restored row counts.
///
/// Over existing objects (`--overwrite`, which needs `pg_restore --clean`), or for a dump
/// with large objects or one this module does not read, the dump is decoded into a private
/// temporary file (mode 0600, in a private directory, removed afterwards) for `pg_restore -j`, then every table's
/// rows are counted.
///
/// The sessions of `pg_restore` run with the plan's `maintenance_work_mem`, if it has one.
async fn restore_logical(
    repo: &Repo,
    plan: &LogicalPlan,
    identities: Arc<Identities>,
    created: &Arc<AtomicBool>,
    cancel: &Cancel,
) -> Result<LogicalReport> {
    let LogicalPlan {
        database: state,
        maintenance_work_mem: memory,
        conn: target,
        record,
    } = plan;
    let memory = *memory;
    let started = std::time::Instant::now();
    let manifest = record.manifest()?;
    // In a private directory of its own: a name in TMPDIR could be taken already.
    let file = Temporary::dir()?;
    let dump = file.path().join(format!("{}.pgdump", record.backup_id));
    let (path, conn, cancel_thread) = (dump.clone(), target.clone(), cancel.clone());
    let overwrite = state.objects > 0;
    let (state_sink, created_sink) = (state.clone(), created.clone());
    let decoded = decode(repo, manifest, identities, move |reader| {
        let mut archive = pgdump::open(reader)?;
        let level = archive.toc().ok().and_then(DatabaseLevel::of);
        // A missing database is created once the dump's TOC says how.
        create_database(&conn, &state_sink, level.as_ref(), &created_sink)?;
        let out = create_private(&path)?;
        // Before anything is written, the connections that load the data: if they cannot
        // be made, pg_restore's own may still be.
        let loader = match streamable(&archive, overwrite) {
            Err(why) => {
                tracing::info!(%why, "restoring through a file for pg_restore -j");
                None
            }
            Ok(setup) => match pgcopy::Loader::connect(&conn, jobs(), &setup) {
                Ok(loader) => Some(loader),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to load the data; restoring through a file for pg_restore -j");
                    None
                }
            },
        };
        let Some(loader) = loader else {
            return Ok((Loaded::File(archive.write_file(&out, &cancel_thread)?), level));
        };
        std::io::Write::write_all(&mut &out, archive.head())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        drop(out);
        // The schema, but not the grants: pg_restore applies those last, after the data,
        // so that the restoring role may load tables the dump makes read-only to it.
        let entries = archive.toc().map(<[_]>::to_vec).unwrap_or_default();
        let schema: Vec<i64> = entries
            .iter()
            .filter(|e| e.section == pgdump::Section::PreData && !e.is_grant())
            .map(|e| e.dump_id)
            .collect();
        pg_restore_list(&conn, &[], &path, &schema, memory, &cancel_thread)?;
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "schema restored");
        let rows = loader.load(&mut archive, &cancel_thread)?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "table data loaded"
        );
        Ok((Loaded::Streamed { entries, rows }, level))
    })
    .await;
    let ((loaded, level), plain) =
        decoded.map_err(|e| e.context(format!("restore into database {}", state.database)))?;
    let (conn, cancel, created) = (target.clone(), cancel.clone(), !state.exists);
    let database = state.database.clone();
    let streamed = matches!(loaded, Loaded::Streamed { .. });
    let tables = tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, u64>> {
        let jobs = jobs().to_string();
        let tables = match loaded {
            Loaded::Streamed { entries, rows } => {
                // The rest: grants, and what follows the table data.
                let rest: Vec<i64> = entries
                    .iter()
                    .filter(|e| match e.section {
                        pgdump::Section::PreData => e.is_grant(),
                        _ => e.desc != "TABLE DATA",
                    })
                    .map(|e| e.dump_id)
                    .collect();
                pg_restore_list(&conn, &["-j", &jobs], &dump, &rest, memory, &cancel)?;
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "indexes and constraints restored"
                );
                copied_rows(&conn, &entries, &rows)?
            }
            Loaded::File(written) => {
                tracing::info!(
                    ?written,
                    seconds = started.elapsed().as_secs_f64(),
                    "decoded the dump"
                );
                // Over existing objects, in one transaction: a failure (a dropped object
                // another depends on, a row refused) leaves the database as it was, not
                // half dropped.
                let parallel = ["-j", &jobs];
                if !overwrite {
                    pg_restore(&conn, &parallel, &dump, memory, &cancel)?;
                } else {
                    let clean = ["--clean", "--if-exists"];
                    let atomic = [&clean[..], &["--single-transaction"]].concat();
                    match pg_restore(&conn, &atomic, &dump, memory, &cancel) {
                        // The server's lock table holds too few locks for one transaction
                        // over all of the dump's objects; it rolled back.
                        Err(e) if e.to_string().contains("max_locks_per_transaction") => {
                            tracing::warn!(
                                "database {} holds too many objects for the server's locks \
                                 (max_locks_per_transaction) in one transaction: it is restored \
                                 over without one, so a failure now may leave it half dropped",
                                database
                            );
                            pg_restore(
                                &conn,
                                &[&clean[..], &parallel[..]].concat(),
                                &dump,
                                memory,
                                &cancel,
                            )?;
                        }
                        done => done?,
                    }
                }
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "pg_restore finished"
                );
                // Freeing the file's page cache takes a while for a large dump: let it
                // overlap the counts.
                let remove = std::thread::spawn(move || drop(file));
                let tables = row_counts_parallel(&conn, jobs.parse().unwrap_or(1));
                let _ = remove.join();
                tables?
            }
        };
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "rows counted");
        if let Some(level) = level {
            level.apply(&conn, created);
        }
        Ok(tables)
    })
    .await
    .map_err(|e| Error::failure(format!("restore thread failed: {e}")))?
    .map_err(|e| e.context(format!("restore into database {}", state.database)))?;
    Ok(LogicalReport {
        backup_id: record.backup_id.clone(),
        database: state.database.clone(),
        created: !state.exists,
        plain,
        streamed,
        tables,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a dump says about the database itself rather than what is in it (see
/// [`pgdump::Entry::is_about_the_database`]), which `pg_restore` leaves out of a restore into
/// a database it does not create.
struct DatabaseLevel {
    /// The database's name in the dump.
    name: String,
    /// Its `CREATE DATABASE` statement.
    definition: Option<String>,
    owner: Option<String>,
    /// What each entry is (`settings`, `comment` ...), and its statements.
    entries: Vec<(&'static str, String)>,
    /// The dump's encoding, where it is not UTF-8, and what is left out for holding text in
    /// it (read here as UTF-8, it would be applied garbled).
    unread: Option<(String, Vec<&'static str>)>,
}

impl DatabaseLevel {
    fn of(entries: &[pgdump::Entry]) -> Option<DatabaseLevel> {
        let database = entries.iter().find(|e| e.desc == "DATABASE")?;
        let encoding = entries
            .iter()
            .find(|e| e.desc == "ENCODING")
            .and_then(|e| e.definition.as_deref()?.split('\'').nth(1))
            .unwrap_or("UTF8")
            .to_owned();
        let readable = |d: &String| encoding == "UTF8" || d.is_ascii();
        let mut unread = Vec::new();
        let mut definition = database.definition.clone();
        if definition.as_ref().is_some_and(|d| !readable(d)) {
            (definition, unread) = (None, vec!["encoding and locale"]);
        }
        let mut kept = Vec::new();
        for e in entries.iter().filter(|e| e.is_about_the_database()) {
            let what = match e.desc.as_str() {
                "DATABASE PROPERTIES" => "settings",
                "COMMENT" => "comment",
                "ACL" => "privileges",
                _ => "security labels",
            };
            match e.definition.clone().filter(|d| !d.trim().is_empty()) {
                Some(d) if readable(&d) => kept.push((what, d)),
                Some(_) => unread.push(what),
                None => {}
            }
        }
        Some(DatabaseLevel {
            name: database.tag.clone(),
            definition,
            owner: database.owner.clone(),
            entries: kept,
            unread: (!unread.is_empty()).then_some((encoding, unread)),
        })
    }

    /// The dump's `CREATE DATABASE` for database `db` (`to`: `DATABASE <quoted db>`), and
    /// the definition it is made from: renamed, and without its `TABLESPACE` where this
    /// server (`admin` is on it) has no such tablespace. None, with a warning, if the dump's
    /// is not a single `CREATE DATABASE` of its database.
    fn create_statement(
        &self,
        admin: &mut Session,
        to: &str,
        db: &str,
    ) -> Option<(String, String)> {
        let definition = self.definition.as_deref()?.trim().strip_suffix(';')?;
        // It is run as it stands: one statement, and only this one.
        if !definition.starts_with("CREATE DATABASE ") || definition.contains(';') {
            tracing::warn!(
                "the dump's database {} is created by more than a CREATE DATABASE; database \
                 {db} is created with this server's defaults",
                self.name,
            );
            return None;
        }
        let Some(mut create) = rename_database(definition, &self.names(admin), to) else {
            tracing::warn!(
                "the dump's CREATE DATABASE does not name database {} as expected; database \
                 {db} is created with this server's defaults",
                self.name,
            );
            return None;
        };
        if let Some((without, tablespace)) = split_tablespace(&create) {
            let exists = admin
                .value(&format!(
                    "SELECT count(*) FROM pg_tablespace WHERE spcname = {}",
                    sql_literal(&tablespace)
                ))
                .is_ok_and(|n| n != "0");
            if !exists {
                tracing::warn!(
                    "this server has no tablespace {tablespace}, the dump's database's: database \
                     {db} is created in the server's default tablespace"
                );
                create = without.to_owned();
            }
        }
        Some((create, definition.to_owned()))
    }

    /// `DATABASE <name>` as pg_dump may have quoted the name: where it must (by the rules of
    /// the server `session` is on, or plain lower case), or always.
    fn names(&self, session: &mut Session) -> Vec<String> {
        let mut names = vec![format!("DATABASE {}", sql_ident(&self.name))];
        if let Ok(quoted) =
            session.value(&format!("SELECT quote_ident({})", sql_literal(&self.name)))
        {
            names.push(format!("DATABASE {quoted}"));
        }
        if self
            .name
            .starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        {
            names.push(format!("DATABASE {}", self.name));
        }
        names
    }

    fn what(&self) -> String {
        let mut what: Vec<&str> = self.entries.iter().map(|(w, _)| *w).collect();
        what.dedup();
        what.join(", ")
    }

    /// Applies the entries to the database `target` names, under its name, if this restore
    /// `created` it, each in a transaction; an existing database keeps its own. Warns of what
    /// was not applied, which does not fail the restore: its data is whole. The statements
    /// are not logged: a setting may hold a secret.
    fn apply(&self, target: &Conn, created: bool) {
        let database = target.database().unwrap_or_default();
        if let Some((encoding, unread)) = &self.unread {
            tracing::warn!(
                "database {database} does not get the dump's {} of database {}: their text, \
                 in encoding {encoding}, would be garbled",
                unread.join(", "),
                self.name,
            );
        }
        if self.entries.is_empty() {
            return;
        }
        if !created {
            tracing::warn!(
                "the dump's {} of database {} are not applied to the existing database {database}; \
                 `drctl restore --stdout` piped to `pg_restore --create --schema-only -f -` \
                 prints them",
                self.what(),
                self.name,
            );
            return;
        }
        let to = format!("DATABASE {}", sql_ident(&database));
        let from = match target.session() {
            Ok(mut s) => {
                let names = self.names(&mut s);
                let _ = s.close();
                names
            }
            Err(_) => vec![format!("DATABASE {}", sql_ident(&self.name))],
        };
        for (what, statements) in &self.entries {
            // A statement that does not name the database as expected is not run: it
            // could change the source database.
            let Some(renamed) = rename_database(statements, &from, &to) else {
                tracing::warn!(
                    "the dump's {what} of database {} do not name it as expected and are not \
                     applied to the restored database {database}",
                    self.name
                );
                continue;
            };
            let applied = target.session().and_then(|mut s| {
                s.query(&format!("BEGIN;\n{}\nCOMMIT", renamed.trim_end()))?;
                s.close()
            });
            match applied {
                Ok(()) => tracing::info!(
                    "applied the dump's {what} of database {} to the restored database {database}",
                    self.name
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the dump's {what} of database {} could not be applied to the restored \
                     database {database}; apply them by hand if wanted",
                    self.name
                ),
            }
        }
    }
}

/// A `CREATE DATABASE` statement as pg_dump writes it without its last clause,
/// ` TABLESPACE = <name>`, and the tablespace's name (unquoted); None if it has none.
fn split_tablespace(create: &str) -> Option<(&str, String)> {
    let (without, name) = create.rsplit_once(" TABLESPACE = ")?;
    let name = match name.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?.replace("\"\"", "\""),
        None => name.to_owned(),
    };
    Some((without, name))
}

/// `sql` with each of `from` (`DATABASE name` as it may be written) outside string literals
/// and not inside a longer name replaced by `to`; `None` if there is none.
fn rename_database(sql: &str, from: &[String], to: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let (mut rest, mut quoted, mut renamed) = (sql, false, false);
    while let Some(c) = rest.chars().next() {
        if !quoted {
            let found = from.iter().find(|f| {
                rest.starts_with(f.as_str())
                    && !rest[f.len()..]
                        .starts_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
            });
            if let Some(f) = found {
                out.push_str(to);
                rest = &rest[f.len()..];
                renamed = true;
                continue;
            }
        }
        if c == '\'' {
            quoted = !quoted;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    renamed.then_some(out)
}

/// Whether a dump can be streamed into the target: if so, the statements that set up a
/// session for its data (as `pg_restore` sets up its own); if not, why.
fn streamable(
    archive: &pgdump::Archive<'_>,
    overwrite: bool,
) -> std::result::Result<Vec<String>, String> {
    if overwrite {
        return Err("the target has objects, which pg_restore --clean drops first".into());
    }
    let entries = archive.toc().map_err(str::to_owned)?;
    if let Some(e) = entries
        .iter()
        .find(|e| e.has_data() && (e.desc != "TABLE DATA" || e.copy.is_none()))
    {
        return Err(format!(
            "the dump holds data that is not COPY rows ({})",
            e.desc
        ));
    }
    let definition = |desc: &str| {
        entries
            .iter()
            .find(|e| e.desc == desc)
            .and_then(|e| e.definition.as_deref())
            .map(str::trim_end)
    };
    // The client library reads the server's messages as UTF-8.
    match definition("ENCODING") {
        Some(set) if set.contains("'UTF8'") => {}
        _ => return Err("the dump's encoding is not UTF8".into()),
    }
    // Dumps from before pg_dump set the search path name every table with its schema.
    if definition("SEARCHPATH").is_none() {
        return Err("the dump does not set its search path".into());
    }
    // As pg_restore sets up its sessions; the timeouts the server may lack are set only
    // where it has them.
    let mut setup: Vec<String> = [
        NO_TIMEOUTS,
        "SET xmloption = content",
        "SET row_security = off",
        // A notice per row (a check function's) would fill the connection's receive
        // buffer, which is read only as each COPY ends.
        "SET client_min_messages = warning",
    ]
    .map(String::from)
    .to_vec();
    for desc in pgdump::SESSION_SETUP {
        setup.extend(definition(desc).map(String::from));
    }
    Ok(setup)
}

/// The restored row counts of a streamed restore: what each table's `COPY`s stored, by the
/// name the server quotes it with; tables the dump held no data for, and tables with
/// inheritance children, are counted.
fn copied_rows(
    conn: &Conn,
    entries: &[pgdump::Entry],
    rows: &BTreeMap<i64, u64>,
) -> Result<BTreeMap<String, u64>> {
    let mut session = conn.session()?;
    let mut counts = BTreeMap::new();
    let copied: Vec<(&pgdump::Entry, u64)> = entries
        .iter()
        .filter_map(|e| Some((e, *rows.get(&e.dump_id)?)))
        .collect();
    if !copied.is_empty() {
        let values: Vec<String> = copied
            .iter()
            .map(|(e, _)| {
                format!(
                    "({}, {})",
                    sql_literal(e.namespace.as_deref().unwrap_or_default()),
                    sql_literal(&e.tag)
                )
            })
            .collect();
        let names = quoted_names(
            &mut session,
            &format!(
                "SELECT {} FROM (VALUES {}) v(n, t)",
                quoted_name_hex("n", "t"),
                values.join(", ")
            ),
        )?;
        if names.len() != copied.len() {
            return Err(Error::failure("psql: table names do not match the dump's"));
        }
        for (name, (_, n)) in names.into_iter().zip(&copied) {
            *counts.entry(name).or_insert(0) += n;
        }
    }
    // Counted instead: a table with inheritance children, which counts their rows too, as
    // at backup time (its own COPY stored only its own); and an extension's configuration
    // table, which CREATE EXTENSION filled before its COPY added the rest (PostGIS's
    // spatial_ref_sys).
    let recount = relations(
        &mut session,
        "WHERE c.oid IN (SELECT inhparent FROM pg_inherits) \
         OR c.oid IN (SELECT unnest(extconfig) FROM pg_extension)",
    )?;
    for table in tables(&mut session)? {
        if recount.contains(&table) || !counts.contains_key(&table) {
            let n = count_rows(&mut session, &table)?;
            counts.insert(table, n);
        }
    }
    session.close()?;
    Ok(counts)
}

/// Runs `pg_restore` on the entries `ids` of `file` only (`-L`, a private temporary list).
fn pg_restore_list(
    conn: &Conn,
    args: &[&str],
    file: &Path,
    ids: &[i64],
    memory: Option<IndexMemory>,
    cancel: &Cancel,
) -> Result<()> {
    let list = Temporary::new(file.with_extension("list"));
    let text: String = ids.iter().map(|id| format!("{id};\n")).collect();
    let mut out = create_private(list.path())?;
    std::io::Write::write_all(&mut out, text.as_bytes())
        .map_err(|e| Error::io(format!("write {}", list.path().display()), e))?;
    let list_path = list.path().to_string_lossy().into_owned();
    let args: Vec<&str> = args.iter().copied().chain(["-L", &list_path]).collect();
    pg_restore(conn, &args, file, memory, cancel)
}

/// Runs `pg_restore` on `file` into the target, stopping at the first error, with
/// `memory` (if any) for its sessions' index builds (options in PGOPTIONS come after, and
/// win).
fn pg_restore(
    target: &Conn,
    args: &[&str],
    file: &Path,
    memory: Option<IndexMemory>,
    cancel: &Cancel,
) -> Result<()> {
    let mut cmd = target.command("pg_restore");
    if let Some(memory) = memory {
        let mut options = std::ffi::OsString::from(memory.option());
        if let Some(theirs) = std::env::var_os("PGOPTIONS") {
            options.push(" ");
            options.push(theirs);
        }
        cmd.env("PGOPTIONS", options);
    }
    cmd.arg("--exit-on-error")
        .args(args)
        .args(["-d", &target.url])
        .arg(file);
    let mut child = spawn(&mut cmd, Stdio::null(), Stdio::null())?;
    let stderr = collect_stderr(&mut child);
    let status = wait_cancellable(&mut child, "pg_restore", cancel)?;
    check_status("pg_restore", status, &stderr.join().unwrap_or_default())
}

/// Parallel jobs for pg_restore and the row counts: one per core.
fn jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `maintenance_work_mem` for the sessions of a logical restore, which is what building an
/// index (and checking a foreign key) may sort in memory before spilling to disk; in kB.
///
/// The server's own default (64MB) spills the sort of a few million rows. A restore sets
/// more by default, as a session-only setting: 1GB per session, at most 2GB over all the
/// sessions that build indexes at once (one per core), unless the server is set to as much
/// already. The server only takes what a sort needs, so small indexes use little.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexMemory(u64);

/// What `restore --maintenance-work-mem` asks for: a size, or `server`, the server's own
/// setting (nothing set, so no startup options for a pooler to refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexMemoryChoice {
    Size(IndexMemory),
    Server,
}

impl IndexMemoryChoice {
    pub fn parse(s: &str) -> Result<IndexMemoryChoice> {
        if s.trim().eq_ignore_ascii_case("server") {
            return Ok(IndexMemoryChoice::Server);
        }
        IndexMemory::parse(s).map(IndexMemoryChoice::Size)
    }
}

impl Serialize for IndexMemoryChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            IndexMemoryChoice::Size(m) => m.serialize(s),
            IndexMemoryChoice::Server => s.serialize_str("server"),
        }
    }
}

impl IndexMemory {
    const DEFAULT_EACH: u64 = 1 << 20;
    const DEFAULT_TOTAL: u64 = 2 << 20;
    /// PostgreSQL's limits for the setting.
    const MIN: u64 = 1024;
    const MAX: u64 = i32::MAX as u64;

    /// The default for `sessions` sessions building indexes at once (in whole MB), on a
    /// server set to `server`: `None` where that is as much.
    pub fn default_for(sessions: usize, server: IndexMemory) -> Option<IndexMemory> {
        let mb = (Self::DEFAULT_TOTAL >> 10) / sessions.max(1) as u64;
        let each = (mb << 10).min(Self::DEFAULT_EACH);
        (each > server.0).then_some(IndexMemory(each))
    }

    /// A size in PostgreSQL's notation: a whole number with kB, MB, GB or TB (units in any
    /// case; a bare number is kB, as in postgresql.conf).
    pub fn parse(s: &str) -> Result<IndexMemory> {
        let bad = |why: String| {
            Error::invalid(format!("maintenance_work_mem: {why}"))
                .hint("give a size such as 512MB or 2GB")
        };
        let kb = ByteSize::parse(s, 1024).map_err(bad)?.0 >> 10;
        if !(Self::MIN..=Self::MAX).contains(&kb) {
            return Err(bad(format!("{s:?}: PostgreSQL takes 1MB to 2147483647kB")));
        }
        Ok(IndexMemory(kb))
    }

    /// The session setting, for PGOPTIONS.
    fn option(self) -> String {
        format!("-c maintenance_work_mem={}kB", self.0)
    }
}

impl std::fmt::Display for IndexMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        ByteSize(self.0 << 10).fmt(f)
    }
}

impl Serialize for IndexMemory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Creates a new file only the current user can read.
fn create_private(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

// ---------------------------------------------------------------------------------------
// WAL archive

/// The WAL files archived for one policy: completed `wal` records by file name.
pub struct WalArchive {
    /// By name: the newest record of each file, of the cluster the archive is read for.
    files: BTreeMap<String, BackupRecord>,
    /// Every completed WAL record of the policy, newest first, with its file's name.
    records: Vec<(String, BackupRecord)>,
    /// The system identifier of the cluster `files` are of, if it is known.
    system: Option<String>,
    /// The completed base backups of the policy, newest first.
    bases: Vec<BackupRecord>,
    /// Archived timeline history files by timeline: their switch points, from the
    /// manifest (`None` if it records none).
    histories: BTreeMap<u32, Option<Vec<TimelineSwitch>>>,
}

/// Which timeline recovery follows (PostgreSQL's `recovery_target_timeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Timeline {
    /// The newest in the archive that continues the base backup's.
    #[default]
    Latest,
    /// The base backup's own, ignoring later timelines.
    Current,
    /// This one, which must continue the base backup's.
    #[serde(untagged)]
    Id(u32),
}

impl Timeline {
    pub fn parse(s: &str) -> Result<Timeline> {
        match s {
            "latest" => Ok(Timeline::Latest),
            "current" => Ok(Timeline::Current),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .map(Timeline::Id)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "--timeline {s:?} is not `latest`, `current` or a timeline number"
                    ))
                }),
        }
    }
}

/// A timeline recovery follows, from the segment where it begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leg {
    timeline: u32,
    first_segment: u64,
    /// Whether the timeline began where a recovery stopped at its target, rather than at
    /// the end of the WAL it had (or where the history does not say).
    at_target: bool,
}

impl WalArchive {
    pub async fn load(repo: &Repo, policy: &Name) -> Result<WalArchive> {
        let records = repo
            .registry
            .list(&ListQuery {
                environment: Some(repo.settings.environment.clone()),
                policy: Some(policy.clone()),
                status: Some(Status::Completed),
                before: None,
                limit: None,
            })
            .await?;
        let mut wal = Vec::new();
        let mut bases = Vec::new();
        for r in records {
            match mode(&r) {
                Some("wal") => {
                    let name = r.manifest()?.source.descriptor["wal"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    wal.push((name, r));
                }
                Some("physical") => bases.push(r),
                _ => {}
            }
        }
        Ok(WalArchive::of(wal, bases, None))
    }

    /// The archive as recovery from base backup `base` reads it: without the WAL files of
    /// another cluster (one created again under the policy), whose names may be the same.
    pub fn of_cluster(self, base: &BackupRecord) -> WalArchive {
        WalArchive::of(self.records, self.bases, system_identifier(base))
    }

    /// From WAL records (newest first), the newest of each name whose cluster is `system`
    /// or not recorded.
    fn of(
        records: Vec<(String, BackupRecord)>,
        bases: Vec<BackupRecord>,
        system: Option<String>,
    ) -> WalArchive {
        let mut files = BTreeMap::new();
        for (name, r) in &records {
            if same_cluster(r, system.as_deref()) {
                files.entry(name.clone()).or_insert_with(|| r.clone());
            }
        }
        let histories = files
            .iter()
            .filter_map(|(name, r)| {
                let tli = u32::from_str_radix(name.strip_suffix(".history")?, 16).ok()?;
                let switches = r
                    .manifest
                    .as_ref()
                    .and_then(|m| m.source.stats.get("history"))
                    .and_then(|h| serde_json::from_value(h.clone()).ok());
                Some((tli, switches))
            })
            .collect();
        WalArchive {
            files,
            records,
            system,
            bases,
            histories,
        }
    }

    /// Every archived file's name and backup, for `wal fetch --index`.
    pub fn index(&self) -> WalIndex {
        WalIndex {
            files: self
                .files
                .iter()
                .map(|(name, r)| (name.clone(), r.backup_id.clone()))
                .collect(),
            system: self.system.clone(),
        }
    }

    /// The switch points of timeline `tli`'s archived history file, if there is one.
    fn history(&self, tli: u32) -> Result<Option<&[TimelineSwitch]>> {
        match self.histories.get(&tli) {
            None => Ok(None),
            Some(Some(h)) => Ok(Some(h)),
            Some(None) => Err(Error::integrity(format!(
                "the manifest of archived timeline history {tli:08X}.history records no switch points"
            ))
            .hint("it was archived by a drctl that did not record them; restore from a base backup taken on the newest timeline")),
        }
    }

    /// The timelines recovery from `range` follows to `timeline`, as PostgreSQL's
    /// `recovery_target_timeline` picks them (`latest`: the newest timeline whose history
    /// files are archived one after another from the base backup's). The base backup's
    /// timeline must be an ancestor of it that lasted past the base backup's end.
    fn legs(&self, range: &WalRange, timeline: Timeline) -> Result<Vec<Leg>> {
        let size = range.segment_size;
        let base = Leg {
            timeline: range.timeline,
            first_segment: 0,
            at_target: false,
        };
        let target = match timeline {
            Timeline::Latest => {
                let mut probe = range.timeline;
                while self.history(probe + 1)?.is_some() {
                    probe += 1;
                }
                probe
            }
            Timeline::Current => range.timeline,
            Timeline::Id(n) => n,
        };
        if target == range.timeline {
            return Ok(vec![base]);
        }
        let history = self.history(target)?.ok_or_else(|| {
            Error::not_found(format!(
                "timeline {target} has no history file ({target:08X}.history) in the archive"
            ))
            .hint("`--timeline latest` follows the newest archived timeline; `--timeline current` stays on the base backup's")
        })?;
        let not_child = |why: String| {
            Error::integrity(format!(
                "timeline {target} does not continue the base backup's timeline {}: {why}",
                range.timeline
            ))
            .hint("restore from a base backup taken on that timeline (`drctl list` shows each one's WAL range), or pass --timeline current to stay on the base backup's")
        };
        let from = history
            .iter()
            .position(|s| s.timeline == range.timeline)
            .ok_or_else(|| {
                not_child(format!(
                    "its history does not include timeline {}",
                    range.timeline
                ))
            })?;
        // Recovery must reach the base backup's end on its own timeline.
        let stop = parse_lsn(&range.stop_lsn).unwrap_or(u64::MAX);
        let switch = parse_lsn(&history[from].switchpoint).unwrap_or(0);
        if switch < stop {
            return Err(not_child(format!(
                "timeline {} ended at {}, before the base backup ended at {}",
                range.timeline, history[from].switchpoint, range.stop_lsn
            )));
        }
        let mut legs = vec![base];
        for (i, s) in history.iter().enumerate().skip(from) {
            let child = history.get(i + 1).map_or(target, |next| next.timeline);
            legs.push(Leg {
                timeline: child,
                first_segment: parse_lsn(&s.switchpoint).unwrap_or(0) / size,
                at_target: s
                    .reason
                    .as_deref()
                    .is_some_and(|r| !r.starts_with("no recovery target")),
            });
        }
        if timeline == Timeline::Latest {
            self.warn_of_branches(&legs, size);
        }
        Ok(legs)
    }

    /// Warns where a timeline `legs` leave went on past the point the next one branched
    /// from it, as the archive shows: its server kept running (a restore with `--archive`
    /// to an earlier point while production went on, or a failover that lost archived
    /// WAL), and following the newest timeline leaves that WAL out.
    fn warn_of_branches(&self, legs: &[Leg], size: u64) {
        for pair in legs.windows(2) {
            let (parent, child) = (pair[0].timeline, &pair[1]);
            let beyond = self
                .files
                .keys()
                .filter_map(|name| parse_segment(name, size))
                // A later segment; or, where recovery stopped at its target, the segment
                // it stopped in, whole: the parent wrote past the branch point. (Where it
                // stopped at the end of the WAL it had, that segment's last record ran on
                // into one never archived.)
                .filter(|(tli, segno)| {
                    *tli == parent
                        && (*segno > child.first_segment
                            || (*segno == child.first_segment && child.at_target))
                })
                .map(|(_, segno)| segno)
                .max();
            if let Some(last) = beyond {
                tracing::warn!(
                    "timeline {parent} goes on in the archive to segment {} after timeline {} \
                     branched from it in segment {}: the restore follows timeline {}, as \
                     PostgreSQL does, without that WAL; --timeline {parent} restores it instead",
                    segment_name(parent, last, size),
                    child.timeline,
                    segment_name(parent, child.first_segment, size),
                    legs.last().map_or(child.timeline, |l| l.timeline),
                );
            }
        }
    }

    /// Segment numbers recovery reads along `legs`, each from the newest timeline that has
    /// begun by then, with the time each was archived.
    fn segments(&self, legs: &[Leg], segment_size: u64) -> BTreeMap<u64, DateTime<Utc>> {
        self.files
            .iter()
            .filter_map(|(name, r)| {
                let (tli, segno) = parse_segment(name, segment_size)?;
                (leg_of(legs, segno).timeline == tli).then_some((segno, r.started_at))
            })
            .collect()
    }

    /// Checks that every segment recovery from `range` to `target` reads is archived, and
    /// returns the last one with the timelines recovery follows. Finds missing segments and
    /// gaps before anything is written.
    pub fn check(
        &self,
        base: &BackupId,
        range: &WalRange,
        target: &RecoveryTarget,
        timeline: Timeline,
    ) -> Result<(String, Vec<u32>)> {
        let size = range.segment_size;
        let legs = self.legs(range, timeline)?;
        let segments = self.segments(&legs, size);
        let name = |s: u64| segment_name(leg_of(&legs, s).timeline, s, size);
        let seg = |name: &str| parse_segment(name, size).map(|(_, s)| s).unwrap_or(0);
        let (start, stop) = (seg(&range.start_wal), seg(&range.stop_wal));
        let missing = |s: u64, why: &str| {
            Error::integrity(format!(
                "WAL segment {} is not archived; base backup {base} {why}",
                name(s)
            ))
            .hint("`drctl verify` lists the WAL the backups need; choose an earlier --until/--lsn or another base backup")
        };
        // A base backup without its own WAL needs the archive's to become consistent.
        if !range.included {
            for s in start..=stop {
                if !segments.contains_key(&s) {
                    return Err(missing(s, "needs it to become consistent"));
                }
            }
        }
        // Archived segments form one run from `start`; the first hole ends it.
        let mut end = stop;
        while segments.contains_key(&(end + 1)) {
            end += 1;
        }
        let last = match target {
            RecoveryTarget::Latest => {
                if let Some((&after, _)) = segments.range(end + 1..).next() {
                    return Err(missing(
                        end + 1,
                        &format!(
                            "cannot reach the latest point: segment {} and later are archived after this gap",
                            name(after)
                        ),
                    ));
                }
                end
            }
            RecoveryTarget::Lsn(lsn) => {
                let lsn = &parse_lsn(lsn)
                    .ok_or_else(|| Error::invalid(format!("{lsn:?} is not an LSN")))?;
                let need = lsn / size;
                if *lsn < parse_lsn(&range.stop_lsn).unwrap_or(0) {
                    return Err(Error::invalid(format!(
                        "LSN {} is before the end of base backup {base} ({})",
                        format_lsn(*lsn),
                        range.stop_lsn
                    )));
                }
                if need > end {
                    return Err(missing(
                        end + 1,
                        &format!("needs it to reach LSN {}", format_lsn(*lsn)),
                    ));
                }
                need
            }
            RecoveryTarget::Time(t) => {
                // Recovery stops at the first commit after `t`: a segment archived after `t`
                // must be in the unbroken run.
                match segments.range(start..).find(|(_, at)| *at > t) {
                    Some((&s, _)) if s <= end => s,
                    Some(_) => {
                        return Err(missing(end + 1, &format!("needs it to reach {t}")))
                    }
                    None => {
                        return Err(Error::invalid(format!(
                            "no WAL archived after {t} yet: recovery could not tell that it reached the target"
                        ))
                        .hint("run `SELECT pg_switch_wal()` on the server so the current segment is archived, then retry"))
                    }
                }
            }
        };
        // Past its end, recovery reads the stop segment from the archive: the base backup's
        // copy ends at the backup's end (on a standby, mid-segment).
        if range.included && last > stop && !segments.contains_key(&stop) {
            return Err(missing(stop, "needs it to go past its own end"));
        }
        // The timelines up to the last segment read.
        let timelines = legs
            .iter()
            .filter(|l| l.first_segment <= last)
            .map(|l| l.timeline)
            .collect();
        Ok((name(last), timelines))
    }
}

/// The leg recovery reads segment `segno` from: the newest that has begun.
fn leg_of(legs: &[Leg], segno: u64) -> Leg {
    legs.iter()
        .rev()
        .find(|l| l.first_segment <= segno)
        .copied()
        .unwrap_or(legs[0])
}

/// The backup of every WAL file archived when a physical restore was planned, written
/// into the restored data directory for its restore_command: a `wal fetch` looks the file
/// up there and reads one registry record, instead of the policy's whole WAL history for
/// every file recovery asks for. Files archived since are looked up in the registry.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct WalIndex {
    files: BTreeMap<String, BackupId>,
    /// The system identifier of the cluster the restore is of: a file looked up in the
    /// registry that another cluster archived under the same name is not this one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    system: Option<String>,
}

impl WalIndex {
    /// The file name in a restored data directory.
    pub const FILE: &'static str = "drctl-wal-index.json";
    /// Beside it: the WAL files recovery asked for that the archive did not hold, one per
    /// line, which tells how far recovery read.
    pub const MISSING: &'static str = "drctl-wal-missing";
    /// In the data directory `wal fetch` runs in: the start of a record the last segment
    /// fetched ended in, which the next one's tablespace check completes.
    pub const CARRY: &'static str = "drctl-wal-carry.json";

    pub fn read(path: &Path) -> Result<WalIndex> {
        let text = std::fs::read(path)
            .map_err(|e| Error::io(format!("read WAL index {}", path.display()), e))?;
        serde_json::from_slice(&text).map_err(|e| {
            Error::invalid(format!("WAL index {} is not readable: {e}", path.display()))
        })
    }

    /// The completed record of WAL file `name`: from the index when it lists the file,
    /// else looked up in the registry.
    pub async fn record(
        &self,
        repo: &Repo,
        policy: &Name,
        name: &str,
    ) -> Result<Option<BackupRecord>> {
        if let Some(id) = self.files.get(name) {
            if let Some(r) = repo.registry.get(id).await? {
                if r.status == Status::Completed {
                    return Ok(Some(r));
                }
            }
        }
        let found = repo
            .registry
            .find(&repo.settings.environment, policy, Lookup::Wal(name))
            .await?;
        Ok(found.filter(|r| same_cluster(r, self.system.as_deref())))
    }
}

/// Writes the WAL file that `record` archived to `dest` (atomically: a temporary file, then
/// rename), unless its records create a tablespace where this host has data (see
/// [`check_created_tablespaces`]). A record a segment ends in the middle of is kept in
/// [`WalIndex::CARRY`] in `data_dir` (the restored data directory recovery runs in) for the
/// next segment's check to complete.
pub async fn fetch_wal(
    repo: &Repo,
    record: &BackupRecord,
    dest: &Path,
    data_dir: &Path,
    identities: Arc<Identities>,
) -> Result<()> {
    let carry = data_dir.join(WalIndex::CARRY);
    let carries: Vec<Carry> = std::fs::read(&carry)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let resume = carries.clone();
    let tmp = dest.with_extension("drctl-tmp");
    let tmp2 = tmp.clone();
    // The file is renamed into place only once the whole object has checked out (sizes and
    // checksums, which `decode` compares after the copy).
    let written = decode(repo, record.manifest()?, identities, move |reader| {
        let what = || format!("write {}", tmp2.display());
        let mut file = std::fs::File::create(&tmp2).map_err(|e| Error::io(what(), e))?;
        let mut scan = TablespaceScan::continuing(resume);
        let mut tee = Tee {
            file: &mut file,
            scan: &mut scan,
        };
        std::io::copy(reader, &mut tee).map_err(|e| crate::pipeline::damaged("restore", e))?;
        file.sync_all().map_err(|e| Error::io(what(), e))?;
        Ok(scan.finish())
    })
    .await
    .and_then(|(end, _)| {
        let name = match Lookup::of(record.manifest()?) {
            Some(Lookup::Wal(name)) => name.to_owned(),
            _ => record.backup_id.to_string(),
        };
        check_created_tablespaces(&name, &end.created, &data_dir.join("pg_tblspc"))?;
        if let Some(new) = end.carry {
            keep_carry(&carry, carries, new)?;
        }
        std::fs::rename(&tmp, dest)
            .map_err(|e| Error::io(format!("rename to {}", dest.display()), e))?;
        crate::store::local::sync_parent(dest)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes to a file and shows the WAL scan what it wrote.
struct Tee<'a> {
    file: &'a mut std::fs::File,
    scan: &'a mut TablespaceScan,
}

impl std::io::Write for Tee<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = std::io::Write::write(self.file, data)?;
        self.scan.feed(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(self.file)
    }
}

/// Adds `new` to the records segments ended in (`carries`, the last few, whichever order
/// recovery fetches segments in), kept at `path` before the segment is handed over: without
/// it, a tablespace the record creates would go unchecked.
fn keep_carry(path: &Path, mut carries: Vec<Carry>, new: Carry) -> Result<()> {
    const KEPT: usize = 8;
    carries.retain(|c| (c.timeline, c.next_page_at) != (new.timeline, new.next_page_at));
    carries.push(new);
    if carries.len() > KEPT {
        carries.drain(..carries.len() - KEPT);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&carries)?)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Refuses WAL file `name` if it creates a tablespace at a location that holds data on this
/// host (or cannot be read): recovery would write the restored cluster's tablespace there,
/// and on the cluster's own host that is the cluster's tablespace. A location recovery has
/// linked already in `pg_tblspc` (relative to the data directory recovery runs in:
/// replayed before a restart), an empty or missing one (PostgreSQL's to refuse) and a
/// tablespace inside the data directory are accepted.
fn check_created_tablespaces(
    name: &str,
    created: &[CreatedTablespace],
    pg_tblspc: &Path,
) -> Result<()> {
    let linked: Vec<PathBuf> = std::fs::read_dir(pg_tblspc)
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    for ts in created {
        let location = Path::new(&ts.location);
        if ts.location.is_empty() || linked.iter().any(|l| l == location) {
            continue;
        }
        // One that cannot be read counts as holding data.
        if extract::holds_entries(location).unwrap_or(true) {
            let (record, before) = match ts.continued {
                true => (
                    " (in a record begun in the WAL file before it)",
                    "the WAL file before",
                ),
                false => ("", "WAL file"),
            };
            return Err(Error::invalid(format!(
                "WAL file {name} creates tablespace {} at {}{record}, which is not empty on this host: recovery would write the restored cluster's tablespace into it (on the cluster's own host, over the cluster's own)",
                ts.oid,
                ts.location
            ))
            .hint(format!("restore on another host, with an empty directory at {} for recovery to fill, or to a point before {before} {name} (--until)", ts.location)));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Physical

/// The base backup and WAL a physical restore uses, resolved before anything is written.
#[derive(Debug, Clone, Serialize)]
pub struct PhysicalPlan {
    pub base_backup: BackupId,
    pub wal: WalRange,
    pub target: RecoveryTarget,
    /// The last WAL segment recovery reads.
    pub last_wal: String,
    /// The timelines recovery follows to reach it, the base backup's first.
    pub timelines: Vec<u32>,
    /// The `--timeline` asked for.
    pub timeline: Timeline,
    /// Whether the restored server archives its WAL into the policy.
    pub archive: bool,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Each tablespace of the base backup (its OID) and the directory it is restored to.
    pub tablespaces: BTreeMap<String, PathBuf>,
    #[serde(skip)]
    record: BackupRecord,
    #[serde(skip)]
    index: WalIndex,
}

fn wal_range(record: &BackupRecord) -> Result<WalRange> {
    let stats = &record.manifest()?.source.stats;
    stats
        .get("wal")
        .and_then(|w| serde_json::from_value(w.clone()).ok())
        .ok_or_else(|| {
            Error::integrity(format!(
                "backup {}: the manifest records no WAL range",
                record.backup_id
            ))
        })
}

/// Picks the base backup (`base`, else the newest that ends before the target) and checks
/// that the WAL to reach the target is archived.
pub async fn plan_physical(
    repo: &Repo,
    policy: &Name,
    base: Option<BackupRecord>,
    target: RecoveryTarget,
    data_dir: &Path,
    server: &ServerOptions,
) -> Result<PhysicalPlan> {
    let port = server.port.ok_or_else(|| {
        Error::invalid("a physical PostgreSQL restore starts a server: give it a free --port")
    })?;
    // Before anything is written: the restored server listens on 127.0.0.1:port.
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            return Err(Error::invalid(format!(
                "port {port} on 127.0.0.1 is in use: the restored server could not listen there"
            ))
            .hint("pick a free --port (a server an earlier restore started is left running)"));
        }
    }
    let archive = WalArchive::load(repo, policy).await?;
    let record = match base {
        Some(r) => r,
        None => {
            archive
                .bases
                .iter()
                .filter(|r| r.backup_type == BackupType::Full && mode(r) == Some("physical"))
                .find(|r| match &target {
                    RecoveryTarget::Latest => true,
                    RecoveryTarget::Time(t) => r.finished_at.is_some_and(|f| f <= *t),
                    RecoveryTarget::Lsn(l) => wal_range(r)
                        .ok()
                        .and_then(|w| parse_lsn(&w.stop_lsn))
                        .zip(parse_lsn(l))
                        .is_some_and(|(stop, l)| stop <= l),
                })
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "no completed physical base backup of policy {policy} ends before the recovery target"
                    ))
                    .hint("`drctl list` shows the base backups; take one with `drctl backup`")
                })?
                .clone()
        }
    };
    if mode(&record) != Some("physical") {
        return Err(Error::invalid(format!(
            "backup {} is not a physical PostgreSQL base backup",
            record.backup_id
        )));
    }
    if let (RecoveryTarget::Time(t), Some(end)) = (&target, record.finished_at) {
        if end > *t {
            return Err(Error::invalid(format!(
                "base backup {} ended at {end}, after the recovery target {t}",
                record.backup_id
            ))
            .hint("pass --backup latest to pick a base backup that ends before the target"));
        }
    }
    let wal = wal_range(&record)?;
    let archive = archive.of_cluster(&record);
    let (last_wal, timelines) = archive.check(&record.backup_id, &wal, &target, server.timeline)?;
    super::check_target(data_dir, false)?;
    let tablespaces = tablespace_destinations(&record, server.tablespace_dir.as_deref(), data_dir)?;
    if server.archive && target != RecoveryTarget::Latest {
        tracing::warn!(
            "the restored server archives a new timeline into policy {policy}, branching at the \
             recovery target: later restores of the latest state follow it, without the WAL \
             the source server archives after that point; leave --archive out for a copy \
             beside a running source (a rehearsal, a forensic copy)"
        );
    }
    Ok(PhysicalPlan {
        base_backup: record.backup_id.clone(),
        wal,
        target,
        last_wal,
        timelines,
        timeline: server.timeline,
        archive: server.archive,
        data_dir: data_dir.to_path_buf(),
        port,
        tablespaces,
        record,
        index: archive.index(),
    })
}

/// Where each tablespace of base backup `record` (`stats.tablespaces`: OID → original
/// location) is restored: `dir`/OID, or its original location. Each must be missing or an
/// empty directory: a restore never writes into another cluster's tablespace.
fn tablespace_destinations(
    record: &BackupRecord,
    dir: Option<&Path>,
    data_dir: &Path,
) -> Result<BTreeMap<String, PathBuf>> {
    let listed: BTreeMap<String, PathBuf> = record
        .manifest()?
        .source
        .stats
        .get("tablespaces")
        .map(|t| serde_json::from_value(t.clone()))
        .transpose()?
        .unwrap_or_default();
    let data_dir = std::path::absolute(data_dir)
        .map_err(|e| Error::io(format!("resolve {}", data_dir.display()), e))?;
    let mut out = BTreeMap::new();
    for (oid, location) in listed {
        if !is_digits(&oid) {
            return Err(Error::integrity(format!(
                "backup {} names a tablespace {oid:?}",
                record.backup_id
            )));
        }
        let to = match dir {
            Some(dir) => std::path::absolute(dir.join(&oid))
                .map_err(|e| Error::io(format!("resolve {}", dir.display()), e))?,
            None => location,
        };
        if to.starts_with(&data_dir) {
            return Err(Error::invalid(format!(
                "tablespace {oid} would be restored to {}, inside the restored data directory",
                to.display()
            ))
            .hint("give --tablespace-dir a directory outside --target"));
        }
        let used = extract::holds_entries(&to)
            .map_err(|e| Error::io(format!("tablespace {oid}: read {}", to.display()), e))?;
        if used {
            return Err(Error::invalid(format!(
                "tablespace {oid} would be restored to {}, which is not empty",
                to.display()
            ))
            .hint("give the restore's tablespaces a place of their own: --tablespace-dir DIR puts each in DIR/OID"));
        }
        out.insert(oid, to);
    }
    Ok(out)
}

/// The outcome of a physical restore: a running, recovered server.
#[derive(Debug, Clone, Serialize)]
pub struct PhysicalReport {
    pub base_backup: BackupId,
    pub data_dir: PathBuf,
    pub port: u16,
    pub plain: Digest,
    /// Row counts per database and table after recovery.
    pub databases: BTreeMap<String, BTreeMap<String, u64>>,
    pub seconds: f64,
}

/// One argument of restore_command or archive_command: quoted for the shell that runs it,
/// with `%` doubled so that PostgreSQL does not take it for a placeholder (`%f`, `%p`).
fn command_arg(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''").replace('%', "%%"))
}

/// A string value in postgresql.conf syntax, where a backslash escapes too.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Unpacks the base backup, writes the recovery settings, starts the server on the plan's
/// port and waits until recovery has finished; then counts rows in every database.
pub async fn restore_physical(
    repo: &Repo,
    plan: &PhysicalPlan,
    identities: Arc<Identities>,
    cancel: &Cancel,
) -> Result<PhysicalReport> {
    let started = std::time::Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Err(Error::invalid(
            "PostgreSQL does not run as root, so a physical restore cannot start the server",
        )
        .hint(
            "run the restore as the PostgreSQL OS user, e.g. `sudo -u postgres drctl restore ...`",
        ));
    }
    let dir = plan.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    set_mode(&dir, 0o700)?;
    let (dir2, cancel2) = (dir.clone(), cancel.clone());
    let relocated = plan
        .tablespaces
        .iter()
        .map(|(oid, to)| (Path::new("pg_tblspc").join(oid), to.clone()))
        .collect();
    let (_, plain) = decode(
        repo,
        plan.record.manifest()?,
        identities.clone(),
        move |reader| {
            extract::extract(
                reader,
                &dir2,
                &ExtractOptions {
                    allow_special: false,
                    relocated,
                },
                &cancel2,
            )
        },
    )
    .await?;
    set_mode(&dir, 0o700)?;

    // Debian-style clusters keep their configuration outside the data directory.
    let conf = dir.join("postgresql.conf");
    if !conf.exists() {
        write(&conf, "")?;
    }
    let hba = dir.join("pg_hba.conf");
    if !hba.exists() {
        write(
            &hba,
            "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )?;
    }
    // A base backup of a standby holds its standby.signal: the restored server would follow
    // the standby's primary and never promote.
    let standby = dir.join("standby.signal");
    if standby.exists() {
        std::fs::remove_file(&standby)
            .map_err(|e| Error::io(format!("remove {}", standby.display()), e))?;
        tracing::warn!(
            "base backup {} was taken from a standby: it is restored as a server of its own",
            plan.base_backup
        );
    }
    let version = std::fs::read_to_string(dir.join("PG_VERSION"))
        .map_err(|e| Error::io("read PG_VERSION of the restored data directory", e))?;
    let version = version.trim();
    let exe = std::env::current_exe().map_err(|e| Error::io("find the drctl binary", e))?;
    let absolute = |p: &Path| {
        std::path::absolute(p)
            .map_err(|e| Error::io(format!("resolve {}", p.display()), e))
            .map(|p| command_arg(&p.to_string_lossy()))
    };
    // Without an identity file, `wal fetch` decrypts with the settings' KMS keys.
    let identity = match &identities.file {
        Some(f) => format!(" --identity {}", absolute(f)?),
        None => String::new(),
    };
    let drctl = format!(
        "{} -q --config {}",
        command_arg(&exe.to_string_lossy()),
        absolute(&repo.settings.file)?
    );
    // A restore from a DR region fetches its WAL from that region too.
    let region = match &repo.region {
        Some(r) => format!(" --region {}", command_arg(r)),
        None => String::new(),
    };
    let index = dir.join(WalIndex::FILE);
    write(&index, &serde_json::to_string(&plan.index)?)?;
    let restore_command = format!(
        "{drctl}{identity} wal fetch{region} --index {} --policy {} %f %p",
        absolute(&index)?,
        plan.record.policy
    );
    // Archiving into the policy pushes the new timeline's history file when recovery
    // ends, then its WAL; later restores follow that timeline. A server restored in a DR
    // region archives into that region.
    let archive = if plan.archive {
        format!(
            "archive_mode = on\narchive_command = {}\n",
            conf_quote(&format!(
                "{drctl} wal push{region} --policy {} %p",
                plan.record.policy
            ))
        )
    } else {
        "archive_mode = off\n".to_owned()
    };
    let mut settings = format!(
        "\n# drctl restore of base backup {}\nrestore_command = {}\n{archive}\
         port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '/tmp'\n\
         {RESET_SETTINGS}",
        plan.base_backup,
        conf_quote(&restore_command),
        plan.port
    );
    // PostgreSQL 15 archives through a library where one is set.
    if version.parse::<u32>().is_ok_and(|v| v >= 15) {
        settings += "archive_library = ''\n";
    }
    match plan.timeline {
        Timeline::Latest => settings += "recovery_target_timeline = 'latest'\n",
        Timeline::Current => settings += "recovery_target_timeline = 'current'\n",
        Timeline::Id(n) => settings += &format!("recovery_target_timeline = '{n}'\n"),
    }
    match &plan.target {
        RecoveryTarget::Latest => {}
        RecoveryTarget::Time(t) => {
            settings += &format!(
                "recovery_target_time = '{}'\nrecovery_target_action = 'promote'\n",
                t.format("%Y-%m-%d %H:%M:%S%.6f+00")
            );
        }
        RecoveryTarget::Lsn(l) => {
            settings +=
                &format!("recovery_target_lsn = '{l}'\nrecovery_target_action = 'promote'\n");
        }
    }
    let auto = dir.join("postgresql.auto.conf");
    let mut existing = std::fs::read_to_string(&auto).unwrap_or_default();
    existing += &settings;
    write(&auto, &existing)?;
    write(&dir.join("recovery.signal"), "")?;

    let pg_ctl = server_binary(version, "pg_ctl");
    let log = dir.join("drctl-restore.log");
    let mut cmd = Command::new(&pg_ctl);
    // Not waiting: reaching a consistent state may take longer than pg_ctl waits. The
    // loop below waits, cancellably.
    cmd.arg("-D")
        .arg(&dir)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"]);
    run_quiet(cmd, &pg_ctl, &log)?;
    let launched = std::time::Instant::now();

    let user = url::Url::parse(
        plan.record.manifest()?.source.descriptor["url"]
            .as_str()
            .unwrap_or_default(),
    )
    .ok()
    .map(|u| u.username().to_owned())
    .filter(|u| !u.is_empty());
    let local = |db: &str| {
        let mut u = format!("postgresql:///{db}?host=/tmp&port={}", plan.port);
        if let Some(user) = &user {
            u += &format!("&user={user}");
        }
        Conn::new(&u, None, None)
    };
    // Recovery is over when the server has promoted. Until it is consistent, it refuses
    // connections as starting up; any other refusal is for good.
    let mut refusals = 0;
    let ours = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    loop {
        cancel.check()?;
        let state = local("postgres")?.session().and_then(|mut s| {
            let v = s.value(
                "SELECT pg_is_in_recovery() || ' ' || \
                 CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END \
                 || ' ' || current_setting('data_directory')",
            );
            s.close()?;
            v
        });
        match state {
            Ok(v) => {
                let mut fields = v.splitn(3, ' ');
                let (recovering, paused) = (fields.next(), fields.next());
                let data_directory = Path::new(fields.next().unwrap_or_default());
                if std::fs::canonicalize(data_directory).ok().as_deref() != Some(&ours) {
                    return Err(Error::failure(format!(
                        "another server answers on port {} (data directory {}): the restored \
                         server cannot listen there",
                        plan.port,
                        data_directory.display()
                    ))
                    .hint("stop that server or restore with another --port; the restored data directory is left as it is"));
                }
                if recovering == Some("false") {
                    break;
                }
                if paused == Some("true") {
                    return Err(Error::failure(format!(
                        "recovery of the restored server is paused; its log says why: {}",
                        tail(&log)
                    ))
                    .hint("a setting lower than the source server's (max_connections, max_worker_processes ...) pauses recovery: raise it in postgresql.auto.conf of the data directory and restart the server, which is left running"));
                }
                refusals = 0;
            }
            Err(e) if still_starting(&e.to_string()) => refusals = 0,
            Err(e) => {
                refusals += 1;
                if refusals >= 10 {
                    return Err(e
                        .context(format!(
                            "connect to the restored server (port {}) over /tmp",
                            plan.port
                        ))
                        .hint(format!(
                            "the restored pg_hba.conf must let this OS user connect over the \
                             local socket as the policy's user (peer authentication needs the \
                             same name); the server is left running, its log: {}",
                            log.display()
                        )));
                }
            }
        }
        // The postmaster writes its PID file as it starts, and removes it as it stops.
        let grace = launched.elapsed() > std::time::Duration::from_secs(10);
        if grace && !dir.join("postmaster.pid").exists() {
            return Err(Error::failure(format!(
                "the restored server stopped during recovery; log {}: {}",
                log.display(),
                tail(&log)
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    let mut s = local("postgres")?.session()?;
    if plan.target == RecoveryTarget::Latest {
        check_replayed(&mut s, plan).map_err(|e| {
            e.hint(format!(
                "the server runs on port {}; its log: {}",
                plan.port,
                log.display()
            ))
        })?;
    }
    let mut databases = BTreeMap::new();
    let names = s.query(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
    )?;
    s.close()?;
    for db in names {
        let counts = row_counts_parallel(&local(&db)?, jobs())?;
        databases.insert(db, counts);
    }
    Ok(PhysicalReport {
        base_backup: plan.base_backup.clone(),
        data_dir: dir,
        port: plan.port,
        plain,
        databases,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Settings of the backed-up server that a restore must not take over: those of a standby
/// (its primary, its slot, a replay delay) or of a primary with synchronous standbys (whose
/// commits would wait for them), commands that act on an archive, and recovery
/// targets the restore does not set. Hot standby lets the restore watch recovery.
const RESET_SETTINGS: &str = "primary_conninfo = ''\nprimary_slot_name = ''\n\
    synchronous_standby_names = ''\n\
    recovery_min_apply_delay = 0\narchive_cleanup_command = ''\nrecovery_end_command = ''\n\
    recovery_target = ''\nrecovery_target_name = ''\nrecovery_target_xid = ''\n\
    recovery_target_time = ''\nrecovery_target_lsn = ''\nrecovery_target_inclusive = on\n\
    hot_standby = on\n";

/// Whether a connection refused with `error` is to a server still starting up: before it
/// listens, or before it is consistent.
fn still_starting(error: &str) -> bool {
    [
        "starting up",
        "not yet accepting connections",
        "No such file or directory",
        "Connection refused",
    ]
    .iter()
    .any(|m| error.contains(m))
}

/// Recovery to the latest point must have replayed into the last WAL segment the plan
/// found archived; ending before it would leave archived transactions out.
fn check_replayed(s: &mut Session, plan: &PhysicalPlan) -> Result<()> {
    let (_, segno) = parse_segment(&plan.last_wal, plan.wal.segment_size)
        .ok_or_else(|| Error::failure(format!("{} is not a WAL segment name", plan.last_wal)))?;
    let last_segment = segno * plan.wal.segment_size;
    let replayed = s.value("SELECT pg_last_wal_replay_lsn()")?;
    let missing =
        std::fs::read_to_string(plan.data_dir.join(WalIndex::MISSING)).unwrap_or_default();
    match parse_lsn(&replayed) {
        Some(lsn) if replayed_through(lsn, &plan.last_wal, plan.wal.segment_size, &missing) => {
            Ok(())
        }
        _ => Err(Error::integrity(format!(
            "recovery ended at LSN {replayed:?} without replaying WAL segment {} (from LSN {}), \
             the last one archived: the restored server lacks transactions the archive holds",
            plan.last_wal,
            format_lsn(last_segment)
        ))),
    }
}

/// Whether recovery that ended at `lsn` read segment `last` (of `size`): it replayed a
/// record ending in it, past its start (an archived segment is complete, so it holds
/// records), or, where its first record runs on into the next segment, asked for a later
/// segment of its timeline (`missing`: the names recovery asked for and did not get). A
/// segment recovery could not read stops it before either.
fn replayed_through(lsn: u64, last: &str, size: u64, missing: &str) -> bool {
    let Some((timeline, segno)) = parse_segment(last, size) else {
        return false;
    };
    lsn > segno * size
        || (lsn == segno * size
            && missing.lines().any(|name| {
                parse_segment(name.trim(), size).is_some_and(|(t, n)| t == timeline && n > segno)
            }))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// The last lines of a log file, for errors.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn run_quiet(mut cmd: Command, program: &Path, log: &Path) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::failure(format!("cannot run {}: {e}", program.display())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::failure(format!(
        "{} failed: {}{}; server log {}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim(),
        log.display(),
        tail(log)
    )))
}

/// A PostgreSQL server program of `version`: Debian's versioned directory, `pg_config
/// --bindir`, or PATH.
pub fn server_binary(version: &str, name: &str) -> PathBuf {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin/{name}"));
    if debian.exists() {
        return debian;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name);
        if out.status.success() && p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// The PostgreSQL part of a restore plan (one per restore, so its size does not matter).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
#[allow(clippy::large_enum_variant)]
pub enum PgPlan {
    Logical(LogicalPlan),
    Physical(PhysicalPlan),
}

/// A logical restore: the dump of `record` into the database `conn` names.
#[derive(Debug, Clone, Serialize)]
pub struct LogicalPlan {
    #[serde(flatten)]
    database: DatabaseTarget,
    /// For the sessions that build indexes and constraints, instead of the server's.
    #[serde(skip_serializing_if = "Option::is_none")]
    maintenance_work_mem: Option<IndexMemory>,
    #[serde(skip)]
    conn: Conn,
    #[serde(skip)]
    record: BackupRecord,
}

/// What a PostgreSQL restore did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum PgReport {
    Logical(LogicalReport),
    Physical(PhysicalReport),
}

impl PgPlan {
    /// One line for `--dry-run`.
    pub fn describe(&self) -> String {
        match self {
            PgPlan::Logical(LogicalPlan {
                database,
                maintenance_work_mem,
                ..
            }) => format!(
                "database {} {}; pg_restore stops at the first error and builds indexes in {} with maintenance_work_mem {} each, then row counts are compared with the manifest",
                database.database,
                match (database.exists, database.objects > 0) {
                    (false, _) => "will be created",
                    (true, false) => "exists and is empty",
                    (true, true) => "exists: its objects are restored over in one transaction",
                },
                if database.objects > 0 {
                    "one session".to_owned()
                } else {
                    format!("{} sessions", jobs())
                },
                match maintenance_work_mem {
                    Some(m) => m.to_string(),
                    None => format!("{} (the server's)", database.maintenance_work_mem),
                },
            ),
            PgPlan::Physical(p) => {
                let to = match &p.target {
                    RecoveryTarget::Latest => "the end of the archive".to_owned(),
                    RecoveryTarget::Time(t) => t.to_rfc3339(),
                    RecoveryTarget::Lsn(l) => format!("LSN {l}"),
                };
                let timelines = p
                    .timelines
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>();
                format!(
                    "replay WAL {} to {} (timeline {}) up to {to}, then start the server on port {}{}",
                    p.wal.start_wal,
                    p.last_wal,
                    timelines.join(" → "),
                    p.port,
                    if p.archive {
                        " archiving its WAL into the policy"
                    } else {
                        ""
                    }
                )
            }
        }
    }
}

impl PgReport {
    pub fn plain(&self) -> &Digest {
        match self {
            PgReport::Logical(r) => &r.plain,
            PgReport::Physical(r) => &r.plain,
        }
    }
}

/// Plans the restore of a postgres backup: a logical one into a database, a physical one
/// (a base backup and its WAL) into a new data directory. Returns the backup whose data
/// object is read, which for `latest` of a physical policy is a base backup, and no
/// PostgreSQL plan when the artifact is only written out (`--stdout`, or a dump file into
/// `--target`).
pub async fn plan(
    repo: &Repo,
    record: BackupRecord,
    selector: &Selector,
    target: &Target,
    recovery: &RecoveryTarget,
    server: &ServerOptions,
) -> Result<(BackupRecord, Option<PgPlan>)> {
    let id = record.backup_id.clone();
    let policy = record.policy.clone();
    match (mode(&record), target) {
        (
            Some("logical"),
            Target::Database {
                url,
                overwrite,
                maintenance_work_mem,
                replay_anyway,
            },
        ) => {
            if *replay_anyway {
                return Err(Error::invalid(format!(
                    "backup {id} is a PostgreSQL backup: --replay-anyway is for MariaDB restores"
                )));
            }
            if recovery != &RecoveryTarget::Latest {
                return Err(Error::invalid(format!(
                    "backup {id} is a logical dump: it restores to the moment it was taken, without --until or --lsn"
                )));
            }
            let conn = Conn::new(url, None, None)?;
            let database = check_database_target(&conn, *overwrite)?;
            // Options in the URL replace PGOPTIONS, where the setting would go.
            let in_url = url::Url::parse(url)
                .is_ok_and(|u| u.query_pairs().any(|(k, _)| k == "options"));
            let maintenance_work_mem = match maintenance_work_mem {
                Some(IndexMemoryChoice::Size(_)) if in_url => {
                    return Err(Error::invalid(
                        "--to-database has an options parameter, which replaces the one --maintenance-work-mem would set",
                    )
                    .hint("add -c maintenance_work_mem=SIZE to the URL's options instead"))
                }
                Some(IndexMemoryChoice::Size(m)) => Some(*m),
                Some(IndexMemoryChoice::Server) => None,
                None if in_url => None,
                // The environment's setting would win over the default: it is the one the
                // server reported.
                None if std::env::var_os("PGOPTIONS")
                    .is_some_and(|o| o.to_string_lossy().contains("maintenance_work_mem")) =>
                {
                    None
                }
                // Over existing objects, pg_restore runs one session.
                None => IndexMemory::default_for(
                    if database.objects > 0 { 1 } else { jobs() },
                    database.maintenance_work_mem,
                ),
            };
            Ok((
                record.clone(),
                Some(PgPlan::Logical(LogicalPlan {
                    database,
                    maintenance_work_mem,
                    conn,
                    record,
                })),
            ))
        }
        // The dump itself, for pg_restore by hand.
        (Some("logical"), Target::Dir { .. } | Target::Stdout)
            if recovery == &RecoveryTarget::Latest =>
        {
            Ok((record, None))
        }
        // The base backup's tar, without WAL.
        (Some("physical"), Target::Stdout)
            if recovery == &RecoveryTarget::Latest && server.port.is_none() =>
        {
            Ok((record, None))
        }
        (Some("physical" | "wal"), Target::Dir { path, .. }) => {
            let base = match selector {
                Selector::Latest => None,
                Selector::Id(_) => Some(record),
            };
            let plan = plan_physical(repo, &policy, base, recovery.clone(), path, server).await?;
            Ok((plan.record.clone(), Some(PgPlan::Physical(plan))))
        }
        (Some("physical" | "wal"), _) => Err(Error::invalid(format!(
            "backup {id} is a physical PostgreSQL backup: restore it with --target DATA_DIR --port N"
        ))),
        (Some("logical"), _) => Err(Error::invalid(format!(
            "backup {id} is a logical dump: it restores to the moment it was taken, without --until or --lsn"
        ))),
        _ => Err(Error::invalid(format!(
            "backup {id} cannot be restored this way"
        ))),
    }
}

/// Runs a planned PostgreSQL restore. A logical restore's row counts must match the
/// manifest's exactly.
pub async fn execute(
    repo: &Repo,
    plan: &PgPlan,
    identities: Arc<Identities>,
    cancel: &Cancel,
) -> Result<(PgReport, Option<RowCheck>)> {
    match plan {
        PgPlan::Logical(plan) => {
            let created = Arc::new(AtomicBool::new(false));
            let restored = restore_logical(repo, plan, identities, &created, cancel).await;
            let report = match restored {
                Ok(report) => report,
                Err(e) => {
                    let (conn, database) = (plan.conn.clone(), plan.database.clone());
                    let created = created.load(Ordering::SeqCst);
                    return Err(tokio::task::spawn_blocking(move || {
                        abandon(&conn, &database, created, e)
                    })
                    .await
                    .map_err(|e| Error::failure(format!("restore thread failed: {e}")))?);
                }
            };
            let rows = compare_rows(
                &plan.record.backup_id,
                &plan.record.manifest()?.source.stats,
                &report.tables,
                &format!("database {}", report.database),
                table_key,
                plan.database.objects > 0,
            )
            .map_err(|e| {
                let hint = format!(
                    "database {} holds the restore as it came out; drop it or restore again with --overwrite",
                    report.database
                );
                e.hint(hint)
            })?;
            Ok((PgReport::Logical(report), Some(rows)))
        }
        PgPlan::Physical(p) => Ok((
            PgReport::Physical(restore_physical(repo, p, identities, cancel).await?),
            None,
        )),
    }
}

/// The system identifier of the cluster a base backup or WAL file was taken of, where its
/// manifest records one.
pub fn system_identifier(record: &BackupRecord) -> Option<String> {
    record
        .manifest
        .as_ref()?
        .source
        .stats
        .get("system_identifier")?
        .as_str()
        .map(str::to_owned)
}

/// Whether `record` may be of the cluster `system` identifies: the same, or either one
/// unknown (records from before the identifier was kept).
pub fn same_cluster(record: &BackupRecord, system: Option<&str>) -> bool {
    match (system, system_identifier(record)) {
        (Some(ours), Some(theirs)) => ours == theirs,
        _ => true,
    }
}

/// For `verify`: the WAL a physical base backup needs is archived without a gap.
pub async fn verify_wal(repo: &Repo, record: &BackupRecord) -> Result<()> {
    if mode(record) != Some("physical") {
        return Ok(());
    }
    let wal = wal_range(record)?;
    let archive = WalArchive::load(repo, &record.policy)
        .await?
        .of_cluster(record);
    archive
        .check(
            &record.backup_id,
            &wal,
            &RecoveryTarget::Latest,
            Timeline::Latest,
        )
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_memory_reads_postgresql_sizes_and_defaults_to_two_gigabytes_in_all_over_the_servers_own(
    ) {
        for (s, kb, shown) in [
            ("1GB", 1 << 20, "1GB"),
            ("256mb", 256 << 10, "256MB"),
            (" 1536 MB ", 1536 << 10, "1536MB"),
            ("1024", 1024, "1MB"),
            ("1500kB", 1500, "1500kB"),
            ("1tb", 1 << 30, "1TB"),
            ("2147483647kB", 2147483647, "2147483647kB"),
        ] {
            let m = IndexMemory::parse(s).unwrap();
            assert_eq!(m, IndexMemory(kb), "{s}");
            assert_eq!(m.to_string(), shown, "{s}");
        }
        assert_eq!(
            IndexMemory::parse("512MB").unwrap().option(),
            "-c maintenance_work_mem=524288kB"
        );
        for bad in [
            "", "0", "1023kB", "2TB", "1.5GB", "-1GB", "1 GiB", "GB", "1GB2",
        ] {
            assert!(IndexMemory::parse(bad).is_err(), "{bad:?}");
        }
        let mb = |n: u64| IndexMemory(n << 10);
        let server = mb(64);
        assert_eq!(IndexMemory::default_for(0, server), Some(mb(1024)));
        assert_eq!(IndexMemory::default_for(1, server), Some(mb(1024)));
        assert_eq!(IndexMemory::default_for(2, server), Some(mb(1024)));
        assert_eq!(IndexMemory::default_for(3, server), Some(mb(682)));
        assert_eq!(IndexMemory::default_for(8, server), Some(mb(256)));
        // Never more than 2GB in all, and never less than the server's own.
        assert_eq!(IndexMemory::default_for(32, server), None);
        assert_eq!(IndexMemory::default_for(64, server), None);
        assert_eq!(IndexMemory::default_for(2, mb(1024)), None);
        assert_eq!(IndexMemory::default_for(2, mb(2048)), None);
        assert_eq!(IndexMemory::default_for(2, mb(512)), Some(mb(1024)));
    }

    #[test]
    fn the_tablespace_of_a_create_database_is_split_off() {
        let create = "CREATE DATABASE \"x\" WITH TEMPLATE = template0 ENCODING = 'UTF8'";
        assert_eq!(split_tablespace(create), None);
        assert_eq!(
            split_tablespace(&format!("{create} TABLESPACE = fast")),
            Some((create, "fast".to_owned()))
        );
        assert_eq!(
            split_tablespace(&format!("{create} TABLESPACE = \"Fast \"\"SSD\"\"\"")),
            Some((create, "Fast \"SSD\"".to_owned()))
        );
    }

    #[test]
    fn a_database_statement_is_renamed_where_it_names_the_database() {
        let from = ["DATABASE \"app\"".to_owned(), "DATABASE app".to_owned()];
        let to = "DATABASE \"app copy\"";
        for (statement, want) in [
            (
                "ALTER DATABASE app SET search_path TO 'app', 'public';",
                "ALTER DATABASE \"app copy\" SET search_path TO 'app', 'public';",
            ),
            (
                "REVOKE CONNECT,TEMPORARY ON DATABASE app FROM PUBLIC;\nGRANT TEMPORARY ON DATABASE app TO PUBLIC;",
                "REVOKE CONNECT,TEMPORARY ON DATABASE \"app copy\" FROM PUBLIC;\nGRANT TEMPORARY ON DATABASE \"app copy\" TO PUBLIC;",
            ),
            (
                "COMMENT ON DATABASE \"app\" IS 'not DATABASE app, it''s DATABASE app';",
                "COMMENT ON DATABASE \"app copy\" IS 'not DATABASE app, it''s DATABASE app';",
            ),
            (
                "ALTER ROLE r IN DATABASE app SET work_mem TO '8MB';",
                "ALTER ROLE r IN DATABASE \"app copy\" SET work_mem TO '8MB';",
            ),
        ] {
            assert_eq!(rename_database(statement, &from, to).as_deref(), Some(want));
        }
        // Named otherwise (or only in a longer name): not renamed, so not to be run.
        for statement in [
            "ALTER DATABASE \"App\" SET x TO 'y';",
            "ALTER DATABASE application SET x TO 'y';",
            "COMMENT ON DATABASE other IS 'DATABASE app';",
        ] {
            assert_eq!(rename_database(statement, &from, to), None, "{statement}");
        }
    }

    #[test]
    fn the_last_records_segments_ended_in_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WalIndex::CARRY);
        let carry = |at: u64, byte: u8| Carry {
            timeline: 1,
            next_page_at: at << 24,
            record: vec![byte; 16],
        };
        let read =
            || -> Vec<Carry> { serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap() };
        keep_carry(&path, Vec::new(), carry(3, 0)).unwrap();
        for at in 4..14 {
            keep_carry(&path, read(), carry(at, 0)).unwrap();
        }
        // The same segment again replaces its record.
        keep_carry(&path, read(), carry(13, 1)).unwrap();
        let kept = read();
        let at: Vec<u64> = kept.iter().map(|c| c.next_page_at >> 24).collect();
        assert_eq!(at, [6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(kept[7].record, [1; 16]);
    }

    #[test]
    fn tablespaces_are_created_only_where_this_host_holds_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let pg_tblspc = at("pg_tblspc");
        std::fs::create_dir_all(at("live/PG_15_202209061")).unwrap();
        std::fs::create_dir_all(at("linked/PG_15_202209061")).unwrap();
        std::fs::create_dir_all(at("empty")).unwrap();
        std::fs::create_dir_all(&pg_tblspc).unwrap();
        std::fs::write(at("file"), "").unwrap();
        std::os::unix::fs::symlink(at("linked"), pg_tblspc.join("16391")).unwrap();
        let check = |location: &Path| {
            let created = [CreatedTablespace {
                oid: 16390,
                location: location.to_string_lossy().into_owned(),
                continued: false,
            }];
            check_created_tablespaces("000000010000000000000003", &created, &pg_tblspc)
        };
        let e = check(&at("live")).unwrap_err().to_string();
        assert!(
            e.contains("WAL file 000000010000000000000003 creates tablespace 16390 at")
                && e.contains("live, which is not empty on this host"),
            "{e}"
        );
        // Not a directory: not readable as one, so refused too.
        assert!(check(&at("file")).is_err());
        // Recovery linked it already; empty; missing; inside the data directory.
        for fine in [at("linked"), at("empty"), at("missing"), PathBuf::new()] {
            check(&fine).unwrap();
        }
    }

    #[test]
    fn recovery_read_the_last_segment_if_it_replayed_past_its_start_or_asked_for_the_next() {
        let size = 16 << 20;
        let last = "000000020000000000000005";
        let start = 5 * size;
        assert!(replayed_through(start + 40 + 24, last, size, ""));
        assert!(!replayed_through(start - 1, last, size, ""));
        // Stopped right at its start: read through only if recovery asked for a later one
        // of its timeline (its first record runs on into the next segment).
        assert!(!replayed_through(start, last, size, ""));
        assert!(replayed_through(
            start,
            last,
            size,
            "000000020000000000000006\n"
        ));
        for not_later in [
            "000000020000000000000005",
            "000000020000000000000004",
            "000000010000000000000006",
            "00000003.history",
        ] {
            assert!(
                !replayed_through(start, last, size, not_later),
                "{not_later}"
            );
        }
    }

    #[test]
    fn paths_survive_the_shell_and_postgresql_conf() {
        assert_eq!(
            command_arg("/srv/it's 100%/drctl"),
            "'/srv/it'\\''s 100%%/drctl'"
        );
        assert_eq!(conf_quote("a'b\\c"), "'a''b\\\\c'");
    }

    fn archive(names: &[&str]) -> WalArchive {
        let files = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let at = DateTime::from_timestamp(1_000 + i as i64 * 10, 0).unwrap();
                let record = BackupRecord {
                    backup_id: BackupId::generate(at),
                    environment: Name::parse("t").unwrap(),
                    policy: Name::parse("p").unwrap(),
                    status: Status::Completed,
                    backup_type: BackupType::Incremental,
                    source_kind: "postgres".into(),
                    started_at: at,
                    finished_at: Some(at),
                    holder: String::new(),
                    manifest: None,
                    locations: Vec::new(),
                    last_verification: None,
                    error: None,
                };
                (n.to_string(), record)
            })
            .collect();
        WalArchive {
            files,
            records: Vec::new(),
            system: None,
            bases: Vec::new(),
            histories: BTreeMap::new(),
        }
    }

    /// The plan was refused for WAL segment `segment`, missing from the archive.
    fn assert_not_archived(checked: Result<(String, Vec<u32>)>, segment: &str) {
        let e = checked.unwrap_err();
        assert!(
            e.message().contains(&format!("{segment} is not archived")),
            "{}",
            e.message()
        );
    }

    fn switch(timeline: u32, at: &str) -> TimelineSwitch {
        TimelineSwitch {
            timeline,
            switchpoint: at.into(),
            reason: None,
        }
    }

    fn range() -> WalRange {
        WalRange {
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000002".into(),
            segment_size: 16 << 20,
            included: false,
        }
    }

    #[test]
    fn wal_check_finds_missing_segments_and_gaps() {
        let id = BackupId::parse("20260101T000000Z-0badc0de").unwrap();
        let latest = RecoveryTarget::Latest;
        let a = archive(&["000000010000000000000002", "000000010000000000000003"]);
        assert_eq!(
            a.check(&id, &range(), &latest, Timeline::Latest).unwrap(),
            ("000000010000000000000003".into(), vec![1])
        );

        // A base backup that carries its own WAL needs the archive's from its stop segment
        // on, and only to go past its end.
        let included = WalRange {
            included: true,
            start_lsn: "0/1000028".into(),
            start_wal: "000000010000000000000001".into(),
            ..range()
        };
        let own = archive(&["000000010000000000000002", "000000010000000000000003"]);
        assert_eq!(
            own.check(&id, &included, &latest, Timeline::Latest)
                .unwrap()
                .0,
            "000000010000000000000003"
        );
        assert!(own
            .check(
                &id,
                &WalRange {
                    included: false,
                    ..included.clone()
                },
                &latest,
                Timeline::Latest
            )
            .is_err());
        assert_eq!(
            archive(&[])
                .check(&id, &included, &latest, Timeline::Latest)
                .unwrap()
                .0,
            "000000010000000000000002"
        );
        // Past its end (or, without its own WAL, to become consistent) recovery needs the
        // archived stop segment.
        for r in [&included, &range()] {
            assert_not_archived(
                archive(&["000000010000000000000003"]).check(&id, r, &latest, Timeline::Latest),
                "000000010000000000000002",
            );
        }

        let gap = archive(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000005",
        ]);
        assert_not_archived(
            gap.check(&id, &range(), &latest, Timeline::Latest),
            "000000010000000000000004",
        );
        // A target before the gap is still reachable.
        assert_eq!(
            gap.check(
                &id,
                &range(),
                &RecoveryTarget::Lsn("0/3000100".into()),
                Timeline::Latest
            )
            .unwrap()
            .0,
            "000000010000000000000003"
        );
        assert!(gap
            .check(
                &id,
                &range(),
                &RecoveryTarget::Lsn("0/5000100".into()),
                Timeline::Latest
            )
            .is_err());
        let t = DateTime::from_timestamp(1_005, 0).unwrap();
        assert_eq!(
            gap.check(&id, &range(), &RecoveryTarget::Time(t), Timeline::Latest)
                .unwrap()
                .0,
            "000000010000000000000003"
        );
        let after_all = DateTime::from_timestamp(5_000, 0).unwrap();
        assert!(gap
            .check(
                &id,
                &range(),
                &RecoveryTarget::Time(after_all),
                Timeline::Latest
            )
            .is_err());
    }

    #[test]
    fn wal_check_follows_the_newest_archived_timeline() {
        let id = BackupId::parse("20260101T000000Z-0badc0de").unwrap();
        let latest = RecoveryTarget::Latest;
        // Timeline 2 branched from 1 in segment 4; timeline 1 went on to segment 5 (after
        // the branch, so not read).
        let mut a = archive(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004.partial",
            "000000010000000000000005",
            "00000002.history",
            "000000020000000000000004",
            "000000020000000000000005",
        ]);
        a.histories.insert(2, Some(vec![switch(1, "0/4000100")]));
        assert_eq!(
            a.check(&id, &range(), &latest, Timeline::Latest).unwrap(),
            ("000000020000000000000005".into(), vec![1, 2])
        );
        // Before the branch, recovery reads timeline 1 only.
        assert_eq!(
            a.check(
                &id,
                &range(),
                &RecoveryTarget::Lsn("0/3000100".into()),
                Timeline::Latest
            )
            .unwrap(),
            ("000000010000000000000003".into(), vec![1])
        );

        // The new timeline's first segment is missing: timeline 1's copy does not stand in.
        a.files.remove("000000020000000000000004");
        assert_not_archived(
            a.check(&id, &range(), &latest, Timeline::Latest),
            "000000020000000000000004",
        );

        // `--timeline current` stays on the base backup's timeline (the old primary's, which
        // went on after the branch); a number picks that timeline.
        let mut old = archive(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000020000000000000004",
        ]);
        old.histories.insert(2, Some(vec![switch(1, "0/4000100")]));
        assert_eq!(
            old.check(&id, &range(), &latest, Timeline::Current)
                .unwrap(),
            ("000000010000000000000005".into(), vec![1])
        );
        assert_eq!(
            old.check(&id, &range(), &latest, Timeline::Id(2)).unwrap(),
            ("000000020000000000000004".into(), vec![1, 2])
        );
        let e = old
            .check(&id, &range(), &latest, Timeline::Id(3))
            .unwrap_err();
        assert!(e.message().contains("00000003.history"), "{}", e.message());
        assert_eq!(Timeline::parse("latest").unwrap(), Timeline::Latest);
        assert_eq!(Timeline::parse("current").unwrap(), Timeline::Current);
        assert_eq!(Timeline::parse("2").unwrap(), Timeline::Id(2));
        for bad in ["0", "-1", "two", ""] {
            assert!(Timeline::parse(bad).is_err(), "{bad}");
        }

        // Timeline 3 branched from 2; history files are followed one after another.
        let mut b = archive(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000020000000000000004",
            "000000020000000000000005",
            "000000030000000000000005",
            "000000030000000000000006",
        ]);
        b.histories.insert(2, Some(vec![switch(1, "0/4000100")]));
        b.histories.insert(
            3,
            Some(vec![switch(1, "0/4000100"), switch(2, "0/5000200")]),
        );
        assert_eq!(
            b.check(&id, &range(), &latest, Timeline::Latest).unwrap(),
            ("000000030000000000000006".into(), vec![1, 2, 3])
        );

        // A timeline that left timeline 1 before the base backup ended cannot be reached:
        // recovery must reach the backup's end on its own timeline.
        let mut c = archive(&["000000010000000000000002", "000000020000000000000002"]);
        for before_end in ["0/1000000", "0/2000050"] {
            c.histories.insert(2, Some(vec![switch(1, before_end)]));
            let e = c
                .check(&id, &range(), &latest, Timeline::Latest)
                .unwrap_err();
            assert!(e.message().contains("does not continue"), "{}", e.message());
        }
        c.histories.insert(2, Some(vec![switch(1, "0/2000100")]));
        assert_eq!(
            c.check(&id, &range(), &latest, Timeline::Latest).unwrap().1,
            vec![1, 2]
        );
        // Nor a history without its switch points.
        c.histories.insert(2, None);
        assert!(c.check(&id, &range(), &latest, Timeline::Latest).is_err());
    }
}
