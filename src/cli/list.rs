//! `drctl list`: backups in the registry, newest first.

use super::{human_bytes, short_time, Ctx};
use crate::format::{BackupId, Name};
use crate::registry::{ListQuery, Status};
use crate::{Error, Result};

/// List backups of this environment, newest first.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this policy.
    #[arg(long, short)]
    pub policy: Option<String>,
    /// Only this status: running, completed, failed, deleting.
    #[arg(long)]
    pub status: Option<String>,
    /// At most N backups.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Only backups older than this ID (the last ID of the previous page).
    #[arg(long, value_name = "ID")]
    pub before: Option<String>,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let query = ListQuery {
        policy: args.policy.as_deref().map(Name::parse).transpose()?,
        status: args
            .status
            .as_deref()
            .map(|s| {
                Status::parse(s).ok_or_else(|| Error::invalid(format!("unknown status {s:?}")))
            })
            .transpose()?,
        before: args.before.as_deref().map(BackupId::parse).transpose()?,
        limit: Some(args.limit),
        environment: None,
    };
    let repo = ctx.repo().await?;
    let records = repo
        .registry
        .list(&ListQuery {
            environment: Some(repo.settings.environment.clone()),
            ..query
        })
        .await?;
    if ctx.global.json {
        for r in &records {
            ctx.emit("backup", r, String::new);
        }
        return Ok(());
    }
    if records.is_empty() {
        super::print_line("no backups");
        return Ok(());
    }
    super::print_line(&format!(
        "{:<26} {:<20} {:<10} {:<20} {:>10} {:>10}  verified",
        "ID", "POLICY", "STATUS", "STARTED", "SIZE", "STORED"
    ));
    for r in &records {
        let (plain, stored) = r
            .manifest
            .as_ref()
            .map(|m| (human_bytes(m.plain_size()), human_bytes(m.stored_size())))
            .unwrap_or_else(|| ("-".into(), "-".into()));
        let verified = match &r.last_verification {
            Some(v) => format!(
                "{} {}{}",
                if v.ok { "ok" } else { "FAILED" },
                short_time(&v.at),
                if v.deep { " (deep)" } else { "" }
            ),
            None => "-".into(),
        };
        super::print_line(&format!(
            "{:<26} {:<20} {:<10} {:<20} {:>10} {:>10}  {}",
            r.backup_id.as_str(),
            r.policy.as_str(),
            r.status.as_str(),
            short_time(&r.started_at),
            plain,
            stored,
            verified
        ));
    }
    Ok(())
}
