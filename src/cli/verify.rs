//! `drctl verify`: check stored backups.

use super::Ctx;
use crate::format::{BackupId, Name};
use crate::registry::{ListQuery, Status};
use crate::{Error, ErrorKind, Result};

/// Check that backups are intact.
///
/// Quick (default): every object is present with its recorded size and SHA-256 of its stored
/// bytes, and the stored manifest matches the registry; needs no key. --deep also decrypts and
/// decompresses everything, checks the SHA-256 of the plain bytes and, for file trees, every
/// tar entry against the index; needs the identity. The outcome is recorded in the registry.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["id", "latest", "all"]))]
pub struct Args {
    /// Backup ID to verify.
    pub id: Option<String>,
    /// The newest completed backup (of --policy, or of each policy).
    #[arg(long)]
    pub latest: bool,
    /// Every completed backup (of --policy, or of the environment).
    #[arg(long)]
    pub all: bool,
    /// Only backups of this policy (with --latest or --all).
    #[arg(long, short)]
    pub policy: Option<String>,
    /// Decrypt and decode the data too.
    #[arg(long)]
    pub deep: bool,
}

pub async fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let id = args.id.as_deref().map(BackupId::parse).transpose()?;
    let policy = args.policy.as_deref().map(Name::parse).transpose()?;
    let repo = ctx.repo().await?;
    let identities = if args.deep {
        Some(ctx.identities(&repo.settings)?)
    } else {
        None
    };
    let env = repo.settings.environment.clone();
    let records = match id {
        Some(id) => {
            let r = repo.registry.get(&id).await?.ok_or_else(|| {
                Error::not_found(format!("backup {id} not found in the registry"))
            })?;
            if r.status != Status::Completed {
                return Err(Error::invalid(format!(
                    "backup {id} is {}, not completed",
                    r.status.as_str()
                )));
            }
            vec![r]
        }
        None => {
            let all = repo
                .registry
                .list(&ListQuery {
                    environment: Some(env.clone()),
                    policy,
                    status: Some(Status::Completed),
                    ..Default::default()
                })
                .await?;
            if args.latest {
                // Newest first: keep the first of each policy.
                let mut seen = std::collections::HashSet::new();
                all.into_iter()
                    .filter(|r| seen.insert(r.policy.clone()))
                    .collect()
            } else {
                all
            }
        }
    };
    if records.is_empty() {
        return Err(Error::not_found(format!(
            "no completed backups to verify in environment {env}"
        )));
    }
    let total = records.len();
    let mut failures: Vec<crate::Error> = Vec::new();
    for record in &records {
        let result = crate::verify::verify(&repo, record, identities.clone(), &ctx.cancel).await;
        let report = match result {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Cancelled => return Err(e),
            Err(e) => {
                let report = crate::verify::VerifyReport {
                    backup_id: record.backup_id.to_string(),
                    deep: args.deep,
                    ok: false,
                    objects: 0,
                    bytes_read: 0,
                    entries_checked: None,
                    error: Some(e.message().to_owned()),
                    error_kind: Some(e.kind().as_str()),
                };
                failures.push(e);
                report
            }
        };
        ctx.emit("verify", &report, || match &report.error {
            None => format!(
                "{} ok ({}{} objects, {}{})",
                report.backup_id,
                if report.deep { "deep, " } else { "" },
                report.objects,
                super::human_bytes(report.bytes_read),
                report
                    .entries_checked
                    .map(|n| format!(", {n} tar entries"))
                    .unwrap_or_default()
            ),
            Some(e) => format!("{} FAILED: {e}", report.backup_id),
        });
    }
    match failures.len() {
        0 => Ok(()),
        n if n == total && n == 1 => Err(failures.pop().expect("one failure")),
        n if n == total => {
            let kind = failures[0].kind();
            Err(Error::new(
                kind,
                format!("all {n} backups failed verification"),
            ))
        }
        n => Err(Error::new(
            ErrorKind::Partial,
            format!("{n} of {total} backups failed verification"),
        )),
    }
}
