//! `drctl registry`: maintain the registry.

use super::Ctx;
use crate::config::StoreUrl;
use crate::registry::rebuild::RebuildReport;
use crate::repo::Repo;
use crate::{Error, Result};

/// Maintain the registry.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Rebuild the registry from the manifests in a repository.
    ///
    /// For the day the registry is lost, or to stand up the registry of a DR region from its
    /// replica bucket alone. Every backup directory with a manifest whose objects are all
    /// present, with the sizes the manifest gives, is recorded as completed in the configured
    /// registry (created if missing); backups it already has are left as they are, and
    /// incomplete directories are reported and skipped. Contents are not read: run
    /// `drctl verify --all --deep` afterwards to check them.
    #[command(after_help = "Examples:
  drctl registry rebuild --dry-run
  drctl --config dr.yaml registry rebuild --from s3://backups-dr/drctl?region=us-west-2")]
    Rebuild {
        /// Repository to read (default: the configured repository).
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// Print what would be recorded and stop.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<()> {
    match cmd {
        Command::Rebuild { from, dry_run } => {
            let mut settings = ctx.settings()?;
            if let Some(url) = from {
                let cwd = std::env::current_dir().map_err(|e| Error::io("current directory", e))?;
                settings.repository = StoreUrl::parse(&url, &cwd)?;
            }
            let repo = Repo::connect(settings).await?;
            repo.store.check().await?;
            let report = crate::registry::rebuild::rebuild(
                &repo.store,
                &repo.registry,
                dry_run,
                &ctx.cancel,
            )
            .await?;
            let verb = if dry_run { "would record" } else { "recorded" };
            ctx.emit("registry_rebuild", &report, || describe(&report, verb));
            Ok(())
        }
    }
}

fn describe(report: &RebuildReport, verb: &str) -> String {
    let mut t = String::new();
    for id in &report.added {
        t.push_str(&format!("{verb} {id}\n"));
    }
    for s in &report.skipped {
        t.push_str(&format!("skipped {}: {}\n", s.prefix, s.reason));
    }
    t.push_str(&format!(
        "{}: {} {verb}, {} already registered, {} skipped",
        report.store,
        report.added.len(),
        report.present.len(),
        report.skipped.len()
    ));
    t
}
