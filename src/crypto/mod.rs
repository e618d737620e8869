//! age recipients and identities, the KMS envelope ([`kms`]), and key files.
//!
//! Backup hosts need only recipients (public keys, and KMS keys they may only encrypt with).
//! Identities are read only by commands that decrypt (restore, deep verify) and are never
//! logged or copied.

pub mod kms;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use age::secrecy::ExposeSecret;

use crate::config::Settings;
use crate::{Error, ErrorKind, Result};

/// Parses one age X25519 recipient (`age1…`).
pub fn parse_recipient(s: &str) -> Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(s.trim())
        .map_err(|e| Error::invalid(format!("not an age X25519 recipient ({e}): {:?}", s.trim())))
}

/// The recipients every new backup is encrypted to: inline ones plus those in recipients-file.
/// Returned as their canonical `age1…` strings, deduplicated, in order.
pub fn recipients(settings: &Settings) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for r in &settings.recipients {
        out.push(parse_recipient(r)?.to_string());
    }
    if let Some(file) = &settings.recipients_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Error::not_found(format!(
                "cannot read recipients file {}: {e}",
                file.display()
            ))
            .hint("run `drctl init` to generate a key, or fix recipients-file in drctl.yaml")
        })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let r = parse_recipient(line)
                .map_err(|e| e.context(format!("{}:{}", file.display(), i + 1)))?;
            out.push(r.to_string());
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|r| seen.insert(r.clone()));
    if out.is_empty() {
        return Err(
            Error::invalid("no age recipients configured: backups would be unreadable")
                .hint("run `drctl init` or add recipients to drctl.yaml"),
        );
    }
    Ok(out)
}

/// Everything a new backup's file key is wrapped for.
#[derive(Clone)]
pub struct Recipients {
    /// age X25519 recipients (`age1…`).
    pub x25519: Vec<String>,
    /// KMS keys, when the settings name any.
    pub kms: Option<Arc<kms::Kms>>,
}

impl Recipients {
    /// The recipients of the settings (inside the async runtime: KMS calls go through it).
    pub fn from_settings(settings: &Settings) -> Result<Recipients> {
        let kms = match &settings.kms {
            Some(k) if !k.keys.is_empty() => Some(kms::Kms::new(k.clone())?),
            _ => None,
        };
        Ok(Recipients {
            x25519: recipients(settings)?,
            kms,
        })
    }

    /// Only X25519 recipients.
    pub fn x25519(recipients: Vec<String>) -> Recipients {
        Recipients {
            x25519: recipients,
            kms: None,
        }
    }

    /// Boxes the recipients for `age::Encryptor`. KMS recipients call KMS when age wraps the
    /// file key, so the encryptor must be set up on a blocking thread.
    pub fn to_age(&self) -> Result<Vec<Box<dyn age::Recipient + Send>>> {
        let mut out = Vec::new();
        for r in &self.x25519 {
            out.push(Box::new(parse_recipient(r)?) as Box<dyn age::Recipient + Send>);
        }
        if let Some(kms) = &self.kms {
            for r in kms.recipients() {
                out.push(Box::new(r) as Box<dyn age::Recipient + Send>);
            }
        }
        Ok(out)
    }

    /// ARNs of the KMS keys that wrapped file keys so far (for the manifest).
    pub fn kms_keys(&self) -> Vec<String> {
        self.kms.as_ref().map(|k| k.used_keys()).unwrap_or_default()
    }
}

/// Identities able to decrypt: those of an age identity file, and KMS.
pub struct Identities {
    pub file: Option<std::path::PathBuf>,
    pub identities: Vec<Box<dyn age::Identity + Send + Sync>>,
    /// The public keys matching the file's identities, for error messages.
    pub public: Vec<String>,
    /// How KMS is asked, when it is.
    kms: Option<String>,
}

impl Identities {
    /// The identities for a restore: the identity file (when given and, unless `required`,
    /// present), then KMS (when `kms` is given). X25519 comes first: it needs no network.
    pub fn open(
        file: Option<&Path>,
        required: bool,
        kms: Option<&kms::KmsSettings>,
    ) -> Result<Identities> {
        let mut out = match file {
            Some(f) if required || f.exists() || kms.is_none() => Identities::load(f)?,
            _ => Identities {
                file: None,
                identities: Vec::new(),
                public: Vec::new(),
                kms: None,
            },
        };
        if let Some(settings) = kms {
            let kms = kms::Kms::new(settings.clone())?;
            out.kms = Some(kms.describe());
            out.identities.push(Box::new(kms.identity()));
        }
        if out.identities.is_empty() {
            return Err(Error::invalid("no identity to decrypt with")
                .hint("pass --identity FILE, set identity-file in drctl.yaml, or configure kms"));
        }
        Ok(out)
    }

    pub fn load(file: &Path) -> Result<Identities> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Error::not_found(format!("cannot read identity file {}: {e}", file.display()))
                .hint("pass --identity or set identity-file in drctl.yaml")
        })?;
        let mut identities: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
        let mut public = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let id = age::x25519::Identity::from_str(line).map_err(|_| {
                Error::invalid(format!(
                    "identity file {} holds a line that is not an age X25519 identity",
                    file.display()
                ))
            })?;
            public.push(id.to_public().to_string());
            identities.push(Box::new(id));
        }
        if identities.is_empty() {
            return Err(Error::invalid(format!(
                "identity file {} holds no identity",
                file.display()
            )));
        }
        Ok(Identities {
            file: Some(file.to_path_buf()),
            identities,
            public,
            kms: None,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.identities
            .iter()
            .map(|i| i.as_ref() as &dyn age::Identity)
    }

    /// The error for a backup none of these identities can open.
    pub fn wrong_key(&self, what: &str, recipients: &[String]) -> Error {
        let mut tried = Vec::new();
        if let Some(file) = &self.file {
            tried.push(format!(
                "the identity file {} holds {}",
                file.display(),
                self.public.join(", ")
            ));
        }
        if let Some(kms) = &self.kms {
            tried.push(format!("{kms} found no aws-kms stanza"));
        }
        Error::new(
            ErrorKind::WrongKey,
            format!(
                "{what}: no available identity can decrypt it; it was encrypted to {}; {}",
                if recipients.is_empty() {
                    "(unknown recipients)".to_string()
                } else {
                    recipients.join(", ")
                },
                tried.join("; ")
            ),
        )
        .hint(
            "use the identity of one of those recipients (--identity), or the break-glass identity",
        )
    }
}

/// Writes a new X25519 identity to `path` (mode 0600, never overwriting) and returns its
/// public key.
pub fn generate_identity(path: &Path) -> Result<String> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
    }
    let identity = age::x25519::Identity::generate();
    let public = identity.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::invalid(format!(
                    "{} already exists; drctl never overwrites a key",
                    path.display()
                ))
            } else {
                Error::io(format!("create {}", path.display()), e)
            }
        })?;
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    write!(
        f,
        "# created: {created}\n# public key: {public}\n{}\n",
        identity.to_string().expose_secret()
    )
    .and_then(|_| f.sync_all())
    .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(public)
}

/// Adds `recipient` to a recipients file (created if missing) unless already listed.
pub fn add_recipient_to_file(path: &Path, recipient: &str) -> Result<bool> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    if existing.lines().any(|l| l.trim() == recipient) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let sep = if existing.is_empty() || existing.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    writeln!(f, "{sep}{recipient}")
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(true)
}
