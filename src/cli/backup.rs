//! `drctl backup`: one backup of a policy.

use std::time::Duration;

use super::{human_bytes, Ctx};
use crate::backup::BackupOptions;
use crate::config::Policy;
use crate::Result;

/// Take a backup of a policy now (full unless --incremental).
///
/// Streams the policy's source through zstd and age into the repository, writes the manifest,
/// and only then records the backup as completed. --incremental backs up what changed since
/// the newest completed backup of the policy (MariaDB/MySQL: the binary logs since then). Exits 11 if another backup of the same
/// policy is running (unless --wait), 1 if the source fails (the backup is recorded as failed).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy name (policies-dir/NAME.yaml).
    #[arg(long, short)]
    pub policy: String,
    /// Wait up to SECONDS for a running backup of the same policy to finish, instead of
    /// refusing at once.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u64>,
    /// Back up only what changed since the newest completed backup of the policy, which
    /// becomes this backup's parent (sources with a change log: mysql).
    #[arg(long)]
    pub incremental: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let repo = ctx.repo().await?;
    let policy = Policy::load(&repo.settings, &args.policy)?;
    let progress = ctx.progress(&format!("backup {}", policy.name), None);
    let opts = BackupOptions {
        wait: args.wait.map(Duration::from_secs),
        progress: progress.counter(),
    };
    let result = if args.incremental {
        crate::backup::run_incremental(&repo, &policy, opts, &ctx.cancel).await
    } else {
        crate::backup::run(&repo, &policy, opts, &ctx.cancel).await
    };
    progress.finish();
    let manifest = result?;
    ctx.emit("backup", &manifest, || {
        let secs = (manifest.finished_at - manifest.started_at)
            .num_milliseconds()
            .max(1) as f64
            / 1000.0;
        format!(
            "backup {} of {} completed: {} read, {} stored ({:.1}%), {:.1}s, {}/s",
            manifest.backup_id,
            manifest.policy,
            human_bytes(manifest.plain_size()),
            human_bytes(manifest.stored_size()),
            100.0 * manifest.stored_size() as f64 / manifest.plain_size().max(1) as f64,
            secs,
            human_bytes((manifest.plain_size() as f64 / secs) as u64),
        )
    });
    Ok(())
}
