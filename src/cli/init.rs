//! `drctl init`: creates the repository, the registry and (if missing) the age key.

use serde::Serialize;

use super::Ctx;
use crate::repo::Repo;
use crate::{Error, Result};

/// Create the repository, the registry and an age key (idempotent).
///
/// Reads the settings file, creates the repository directory and the registry, and when
/// identity-file does not exist yet, generates an age X25519 identity there (mode 0600) and
/// adds its public key to recipients-file. An existing key is never overwritten. Running init
/// again changes nothing.
#[derive(Debug, clap::Args)]
pub struct Args {}

#[derive(Serialize)]
struct Report {
    repository: String,
    registry: String,
    identity_file: Option<String>,
    generated_key: Option<String>,
    recipients_file_updated: bool,
}

pub async fn run(ctx: &Ctx, _args: Args) -> Result<()> {
    let settings = ctx.settings()?;
    let mut generated_key = None;
    let mut recipients_file_updated = false;
    if let Some(identity) = &settings.identity_file {
        if !identity.exists() {
            let public = crate::crypto::generate_identity(identity)?;
            if let Some(file) = &settings.recipients_file {
                recipients_file_updated = crate::crypto::add_recipient_to_file(file, &public)?;
            }
            generated_key = Some(public);
        }
    }
    // Refuse to finish with no way to encrypt.
    crate::crypto::recipients(&settings).map_err(|e| {
        if settings.identity_file.is_none() {
            Error::invalid(e.message().to_owned())
                .hint("set identity-file so init can generate a key, or list recipients")
        } else {
            e
        }
    })?;
    let repo = Repo::connect(settings).await?;
    repo.store.create().await?;
    repo.registry.create().await?;
    for region in repo.settings.regions.values() {
        crate::store::open(&region.repository)
            .await?
            .create()
            .await?;
        crate::registry::open(&region.registry)
            .await?
            .create()
            .await?;
    }
    let report = Report {
        repository: repo.store.describe(),
        registry: repo.registry.describe(),
        identity_file: repo
            .settings
            .identity_file
            .as_ref()
            .map(|p| p.display().to_string()),
        generated_key,
        recipients_file_updated,
    };
    ctx.emit("init", &report, || {
        let mut t = format!("repository: {}\nregistry:   {}", report.repository, report.registry);
        match (&report.generated_key, &report.identity_file) {
            (Some(k), Some(f)) => t.push_str(&format!(
                "\ngenerated age identity {f}\n  public key: {k}\n  keep a copy of the identity offline: without it backups cannot be restored"
            )),
            (None, Some(f)) => t.push_str(&format!("\nidentity:   {f} (existing, unchanged)")),
            _ => {}
        }
        t
    });
    Ok(())
}
