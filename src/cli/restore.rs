//! `drctl restore`: bring a backup back.

use std::path::PathBuf;

use super::{human_bytes, Ctx};
use crate::format::Name;
use crate::restore::postgres::{IndexMemoryChoice, Timeline};
use crate::restore::{RecoveryTarget, RestoreRequest, Selector, ServerOptions, Target};
use crate::{Error, Result};

/// Restore a backup into a directory, a database, or to standard output.
///
/// File trees are unpacked into --target (which must be empty unless --overwrite); entries
/// that would escape it are refused. Stream artifacts (command sources) are written to a file
/// in --target, or to standard output with --stdout. Database backups load into the database
/// --to-database names, to their latest state or to a point in time (--until, --lsn); a
/// SQLite backup is written to the database file --target names. Row counts recorded at
/// backup time are compared with the restored database. Checksums of stored and plain bytes
/// are checked against the manifest; a mismatch fails the restore (exit 4).
///
/// A PostgreSQL physical backup is unpacked into a new data directory (--target) and the
/// server started on --port replays archived WAL to the end, --until or --lsn, following
/// the newest timeline in the archive as PostgreSQL does. Every WAL file it needs is
/// checked to be archived first; --dry-run shows the segments and timelines.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
#[command(group = clap::ArgGroup::new("sink").required(true).args(["target", "stdout", "to_database"]))]
pub struct Args {
    /// Policy the backup belongs to.
    #[arg(long, short)]
    pub policy: String,
    /// Backup ID, or `latest` for the newest completed backup of the policy.
    #[arg(long, short, value_name = "ID|latest")]
    pub backup: String,
    /// Directory to restore into (created if missing); for a SQLite backup, the database
    /// file to write.
    #[arg(long, short)]
    pub target: Option<PathBuf>,
    /// Write the artifact to standard output.
    #[arg(long)]
    pub stdout: bool,
    /// Load a database backup into this database (`postgres://user@host:5432/db`,
    /// `mysql://user@host:3306/db`); created if missing. Passwords come from the environment
    /// (PGPASSWORD, MYSQL_PWD) or a password file, never from the command line.
    #[arg(long, value_name = "URL")]
    pub to_database: Option<String>,
    /// PostgreSQL logical restores: maintenance_work_mem of each session that builds
    /// indexes and constraints (e.g. 256MB, 2GB; one session per core). Default: 1GB, at
    /// most 2GB over all sessions, where the server's own setting is lower; lower it for a
    /// server short of memory. `server` sets none (the server's own setting), for a
    /// connection through a pooler that refuses startup options, such as PgBouncer.
    #[arg(long, value_name = "SIZE")]
    pub maintenance_work_mem: Option<String>,
    /// Replay the backup's log chain up to this time (RFC 3339, e.g. 2026-11-22T09:30:00Z)
    /// instead of to the end. PostgreSQL replays the transactions committed by then.
    /// MariaDB/MySQL binary logs keep whole seconds: every event of that second is replayed,
    /// so to leave out a statement, give a time in the second before it.
    #[arg(long, value_name = "TIME", conflicts_with = "lsn")]
    pub until: Option<String>,
    /// Replay PostgreSQL WAL up to this log sequence number (e.g. 16/B374D848).
    #[arg(long, value_name = "LSN")]
    pub lsn: Option<String>,
    /// Port on which to start a restored database server (PostgreSQL physical restores).
    #[arg(long)]
    pub port: Option<u16>,
    /// Let the restored PostgreSQL server archive its WAL into the policy (`drctl wal push`),
    /// for a server that replaces the source as primary: it archives its new timeline's
    /// history and WAL, and later restores follow that timeline. Without it, the restored
    /// server archives nothing (right for a rehearsal or a copy).
    #[arg(long, requires = "port")]
    pub archive: bool,
    /// The timeline a PostgreSQL physical restore follows: `latest` (the newest archived
    /// timeline that continues the base backup's, as PostgreSQL does), `current` (the base
    /// backup's own, e.g. the old primary's after a failover) or a timeline number.
    #[arg(
        long,
        value_name = "latest|current|N",
        default_value = "latest",
        requires = "port"
    )]
    pub timeline: String,
    /// Where a PostgreSQL physical restore puts the cluster's tablespaces: DIR/OID for each.
    /// Without it, each goes to its original location, which must be missing or empty (on
    /// the cluster's own host it is not: give a directory here).
    #[arg(long, value_name = "DIR", requires = "port")]
    pub tablespace_dir: Option<std::path::PathBuf>,
    /// Print what would be restored and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow restoring into a non-empty target, replacing what the backup holds: files, a
    /// SQLite file, a MariaDB database (dropped and re-created), or a PostgreSQL database's
    /// objects (`pg_restore --clean` in one transaction, so that a failure leaves the
    /// database as it was; one session, slower than into an empty database).
    #[arg(long)]
    pub overwrite: bool,
    /// MariaDB: replay the binary logs even where the checks made before the replay refuse a
    /// statement (one that changes the server or another database, or one on the source
    /// database that the replay would leave out). The statement then runs as logged, or is
    /// left out; each refusal becomes a warning. For when the refusal is understood and the
    /// rest of the logs matter more.
    #[arg(long)]
    pub replay_anyway: bool,
    /// Restore FIFOs and device nodes (refused by default).
    #[arg(long)]
    pub allow_special: bool,
    /// Confirm a restore in a production environment.
    #[arg(long)]
    pub confirm: bool,
    /// Read only this region's registry and replica bucket (drctl.yaml `regions:`), for a
    /// restore while the primary region is unavailable.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
}

const EXAMPLES: &str = "Examples:
  drctl restore --policy app-files --backup latest --target /srv/restore --dry-run
  drctl restore --policy app-db --backup 20260101T030000Z-0badc0de --stdout | pg_restore -d app
  drctl restore --policy mariadb --backup latest --until 2026-11-22T09:30:00Z \\
      --to-database mysql://root@127.0.0.1:3306/shop_restored
  drctl restore --policy sqlite --backup latest --target /srv/restore/app.db
  drctl restore --policy pg-cluster --backup latest --target /srv/pg/restored --port 5433 --archive";

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    // (clap's `requires` does not hold against an argument of the required group.)
    if args.to_database.is_none() && (args.replay_anyway || args.maintenance_work_mem.is_some()) {
        return Err(Error::invalid(
            "--replay-anyway and --maintenance-work-mem are for restores with --to-database",
        ));
    }
    let policy = Name::parse(&args.policy)?;
    let selector = Selector::parse(&args.backup)?;
    let target = match (&args.target, args.stdout, &args.to_database) {
        (Some(path), false, None) => Target::Dir {
            path: path.clone(),
            overwrite: args.overwrite,
            allow_special: args.allow_special,
        },
        (None, true, None) => Target::Stdout,
        (None, false, Some(url)) => Target::Database {
            url: database_url(url)?,
            overwrite: args.overwrite,
            replay_anyway: args.replay_anyway,
            maintenance_work_mem: args
                .maintenance_work_mem
                .as_deref()
                .map(IndexMemoryChoice::parse)
                .transpose()?,
        },
        _ => {
            return Err(Error::invalid(
                "give exactly one of --target DIR, --stdout and --to-database URL",
            ))
        }
    };
    let recovery = match (&args.until, &args.lsn) {
        (Some(time), _) => RecoveryTarget::Time(
            chrono::DateTime::parse_from_rfc3339(time)
                .map_err(|e| {
                    Error::invalid(format!("--until {time:?} is not an RFC 3339 time: {e}"))
                        .hint("for example 2026-11-22T09:30:00Z or 2026-11-22T10:30:00+01:00")
                })?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(lsn)) => RecoveryTarget::Lsn(parse_lsn(lsn)?),
        (None, None) => RecoveryTarget::Latest,
    };
    let repo = ctx.repo_in(args.region.as_deref()).await?;
    let plan = crate::restore::plan(
        &repo,
        RestoreRequest {
            policy,
            selector,
            target,
            recovery,
            server: ServerOptions {
                port: args.port,
                archive: args.archive,
                timeline: Timeline::parse(&args.timeline)?,
                tablespace_dir: args.tablespace_dir.clone(),
            },
        },
    )
    .await?;
    let describe = |plan: &crate::restore::RestorePlan| {
        let to = match &plan.target {
            Target::Dir { path, .. } if plan.unpack => format!("unpack into {}", path.display()),
            Target::Dir { path, .. } => format!("write into {}", path.display()),
            Target::Stdout => "write to standard output".into(),
            Target::Database { url, .. } => {
                match &plan.mysql {
                    Some(my) if my.chain.len() > 1 => format!(
                    "load into {url}, then replay the binary logs of {} incremental backup(s) ({})",
                    my.chain.len() - 1,
                    my.chain[1..].iter().map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
                ),
                    _ => format!("load into {url}"),
                }
            }
        };
        format!(
            "restore backup {} ({} of {}, taken {}): read {} ({} stored), {to}",
            plan.backup_id,
            plan.source_kind,
            plan.policy,
            super::short_time(&plan.started_at),
            plan.object,
            human_bytes(plan.stored_bytes),
        ) + &format!(", {} after decoding", human_bytes(plan.plain_bytes))
            + &plan
                .postgres
                .as_ref()
                .map(|pg| format!("; {}", pg.describe()))
                .unwrap_or_default()
    };
    if args.dry_run {
        ctx.emit("restore_plan", &plan, || {
            format!("would {}", describe(&plan))
        });
        return Ok(());
    }
    ctx.require_confirm(&repo.settings, args.confirm, "restore")?;
    let identities = ctx.identities(&repo.settings)?;
    let progress = if args.stdout {
        ctx.progress("", Some(0))
    } else {
        ctx.progress("restore", Some(plan.plain_bytes))
    };
    let result =
        crate::restore::execute(&repo, &plan, identities, progress.counter(), &ctx.cancel).await;
    progress.finish();
    let report = result?;
    let text = || {
        format!(
            "restored backup {}: {} in {:.1}s ({}/s){}",
            report.backup_id,
            human_bytes(report.plain.size),
            report.seconds,
            human_bytes((report.plain.size as f64 / report.seconds.max(0.001)) as u64),
            report
                .extracted
                .as_ref()
                .map(|s| format!(
                    ", {} files, {} directories, {} links",
                    s.files, s.dirs, s.links
                ))
                .unwrap_or_default()
        ) + &report
            .rows
            .as_ref()
            .map(|r| {
                format!(
                    "; row counts match the backup ({} tables, {} rows)",
                    r.tables, r.rows
                )
            })
            .unwrap_or_default()
    };
    if args.stdout {
        // Standard output carries the data; the report goes to stderr.
        if ctx.global.json {
            eprintln!("{}", super::json_line("restore", &report));
        } else if !ctx.global.quiet {
            eprintln!("{}", text());
        }
    } else {
        ctx.emit("restore", &report, text);
    }
    Ok(())
}

/// A database URL for --to-database: parsed, and refused if it carries a password (command
/// lines are visible to every user of the host).
fn database_url(s: &str) -> Result<String> {
    let url = url::Url::parse(s)
        .map_err(|e| Error::invalid(format!("--to-database {s:?} is not a URL: {e}")))?;
    if crate::source::carries_password(&url) {
        return Err(Error::invalid(
            "--to-database must not carry a password (command lines are visible to other users)",
        )
        .hint("set PGPASSWORD or MYSQL_PWD in the environment, or use a password file"));
    }
    Ok(url.to_string())
}

/// A PostgreSQL LSN: two hexadecimal numbers separated by `/`.
fn parse_lsn(s: &str) -> Result<String> {
    let ok = s.split_once('/').is_some_and(|(hi, lo)| {
        [hi, lo]
            .iter()
            .all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_hexdigit()))
    });
    if ok {
        Ok(s.to_ascii_uppercase())
    } else {
        Err(Error::invalid(format!(
            "--lsn {s:?} is not a log sequence number (like 16/B374D848)"
        )))
    }
}
