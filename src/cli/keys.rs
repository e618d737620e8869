//! `drctl keys`: age keys.

use std::path::PathBuf;

use serde::Serialize;

use super::Ctx;
use crate::Result;

/// Manage age keys.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Generate a new X25519 identity into FILE (mode 0600; never overwrites) and print its
    /// public key. Add the public key to recipients to encrypt new backups to it; old backups
    /// keep their recipients, so rotation needs no re-upload.
    Generate {
        /// Where to write the identity.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Show the recipients new backups are encrypted to, the KMS keys that also wrap their
    /// file keys, and the identity's public keys.
    List,
}

#[derive(Serialize)]
struct Keys {
    recipients: Vec<String>,
    kms_keys: Vec<String>,
    identity_file: Option<String>,
    identity_public_keys: Vec<String>,
}

pub async fn run(ctx: &Ctx, cmd: Command) -> Result<()> {
    match cmd {
        Command::Generate { output } => {
            let public = crate::crypto::generate_identity(&output)?;
            ctx.emit(
                "key",
                &serde_json::json!({ "identity_file": output, "public_key": public }),
                || public.clone(),
            );
        }
        Command::List => {
            let settings = ctx.settings()?;
            let recipients = crate::crypto::recipients(&settings)?;
            let file = ctx
                .global
                .identity
                .clone()
                .or(settings.identity_file.clone());
            let identity_public_keys = match &file {
                Some(f) if f.exists() => crate::crypto::Identities::load(f)?.public,
                _ => Vec::new(),
            };
            let keys = Keys {
                recipients,
                kms_keys: settings.kms.map(|k| k.keys).unwrap_or_default(),
                identity_file: file.map(|f| f.display().to_string()),
                identity_public_keys,
            };
            ctx.emit("keys", &keys, || {
                let mut t = String::from("recipients (new backups are encrypted to each):\n");
                for r in &keys.recipients {
                    t.push_str(&format!("  {r}\n"));
                }
                if !keys.kms_keys.is_empty() {
                    t.push_str("KMS keys (each also wraps new backups' file keys):\n");
                    for k in &keys.kms_keys {
                        t.push_str(&format!("  {k}\n"));
                    }
                }
                match &keys.identity_file {
                    Some(f) if !keys.identity_public_keys.is_empty() => {
                        t.push_str(&format!("identity {f}:\n"));
                        for k in &keys.identity_public_keys {
                            let note = if keys.recipients.contains(k) {
                                ""
                            } else {
                                " (not a recipient of new backups)"
                            };
                            t.push_str(&format!("  {k}{note}\n"));
                        }
                    }
                    Some(f) => t.push_str(&format!("identity {f}: not present on this host\n")),
                    None => t.push_str("no identity configured\n"),
                }
                t.trim_end().to_owned()
            });
        }
    }
    Ok(())
}
