//! `drctl restore`: bring a backup back.

use std::path::PathBuf;

use super::{human_bytes, Ctx};
use crate::format::Name;
use crate::restore::{Selector, Target};
use crate::{Error, Result};

/// Restore a backup into a directory or to standard output.
///
/// File trees are unpacked into --target (which must be empty unless --overwrite); entries
/// that would escape it are refused. Stream artifacts (command sources) are written to a file
/// in --target, or to standard output with --stdout. Checksums of stored and plain bytes are
/// checked against the manifest; a mismatch fails the restore (exit 4).
///
/// Examples:
///   drctl restore --policy app-files --backup latest --target /srv/restore --dry-run
///   drctl restore --policy app-db --backup 20260101T030000Z-0badc0de --stdout | pg_restore -d app
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("sink").required(true).args(["target", "stdout"]))]
pub struct Args {
    /// Policy the backup belongs to.
    #[arg(long, short)]
    pub policy: String,
    /// Backup ID, or `latest` for the newest completed backup of the policy.
    #[arg(long, short, value_name = "ID|latest")]
    pub backup: String,
    /// Directory to restore into (created if missing).
    #[arg(long, short)]
    pub target: Option<PathBuf>,
    /// Write the artifact to standard output.
    #[arg(long)]
    pub stdout: bool,
    /// Print what would be restored and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Allow restoring into a non-empty target, replacing files that the backup holds.
    #[arg(long)]
    pub overwrite: bool,
    /// Restore FIFOs and device nodes (refused by default).
    #[arg(long)]
    pub allow_special: bool,
    /// Confirm a restore in a production environment.
    #[arg(long)]
    pub confirm: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let policy = Name::parse(&args.policy)?;
    let selector = Selector::parse(&args.backup)?;
    let target = match (&args.target, args.stdout) {
        (Some(path), false) => Target::Dir {
            path: path.clone(),
            overwrite: args.overwrite,
            allow_special: args.allow_special,
        },
        (None, true) => Target::Stdout,
        _ => {
            return Err(Error::invalid(
                "give exactly one of --target DIR and --stdout",
            ))
        }
    };
    let repo = ctx.repo().await?;
    let plan = crate::restore::plan(&repo, &policy, &selector, target).await?;
    let describe = |plan: &crate::restore::RestorePlan| {
        let to = match &plan.target {
            Target::Dir { path, .. } if plan.unpack => format!("unpack into {}", path.display()),
            Target::Dir { path, .. } => format!("write into {}", path.display()),
            Target::Stdout => "write to standard output".into(),
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
        )
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
