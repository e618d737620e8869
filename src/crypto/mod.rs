//! age recipients and identities, and key files.
//!
//! Backup hosts need only recipients (public keys). Identities are read only by commands that
//! decrypt (restore, deep verify) and are never logged or copied.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

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

/// Boxes recipients for `age::Encryptor`.
pub fn to_age_recipients(recipients: &[String]) -> Result<Vec<Box<dyn age::Recipient + Send>>> {
    recipients
        .iter()
        .map(|r| parse_recipient(r).map(|r| Box::new(r) as Box<dyn age::Recipient + Send>))
        .collect()
}

/// Identities able to decrypt, loaded from an age identity file.
pub struct Identities {
    pub file: std::path::PathBuf,
    pub identities: Vec<Box<dyn age::Identity + Send + Sync>>,
    /// The public keys matching the identities, for error messages.
    pub public: Vec<String>,
}

impl Identities {
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
            file: file.to_path_buf(),
            identities,
            public,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.identities
            .iter()
            .map(|i| i.as_ref() as &dyn age::Identity)
    }

    /// The error for a backup none of these identities can open.
    pub fn wrong_key(&self, what: &str, recipients: &[String]) -> Error {
        Error::new(
            ErrorKind::WrongKey,
            format!(
                "{what}: no identity in {} can decrypt it; it was encrypted to {}; the identity file holds {}",
                self.file.display(),
                if recipients.is_empty() { "(unknown recipients)".to_string() } else { recipients.join(", ") },
                self.public.join(", ")
            ),
        )
        .hint("use the identity of one of those recipients (--identity), or the break-glass identity")
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
