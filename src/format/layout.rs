//! Object keys. Every key drctl reads or writes is built here; call sites never format paths.

use std::fmt;

use super::{BackupId, Name};
use crate::{Error, Result};

/// A key relative to the repository root, e.g. `prod/app-db/20260101T000000Z-0badc0de/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

/// The objects a backup consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectName {
    /// `data.<artifact>.zst.age`
    Data { artifact: String },
    /// `index.zst.age`
    Index,
    /// `manifest.json`
    Manifest,
}

impl ObjectName {
    pub fn file_name(&self) -> String {
        match self {
            ObjectName::Data { artifact } => format!("data.{artifact}.zst.age"),
            ObjectName::Index => "index.zst.age".into(),
            ObjectName::Manifest => "manifest.json".into(),
        }
    }

    /// Parses a file name found in a listing.
    pub fn parse(file_name: &str) -> Option<Self> {
        match file_name {
            "index.zst.age" => Some(ObjectName::Index),
            "manifest.json" => Some(ObjectName::Manifest),
            other => {
                let artifact = other.strip_prefix("data.")?.strip_suffix(".zst.age")?;
                valid_artifact(artifact).then(|| ObjectName::Data {
                    artifact: artifact.to_owned(),
                })
            }
        }
    }
}

/// An artifact label (the file extension inside `data.<artifact>.zst.age`): `[a-z0-9]{1,16}`.
pub fn valid_artifact(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 16
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl ObjectKey {
    /// The directory of one backup: `{environment}/{policy}/{backup_id}/`.
    pub fn backup_prefix(environment: &Name, policy: &Name, id: &BackupId) -> String {
        format!("{environment}/{policy}/{id}/")
    }

    /// The directory of one backup set: `{environment}/{policy}/`.
    pub fn set_prefix(environment: &Name, policy: &Name) -> String {
        format!("{environment}/{policy}/")
    }

    pub fn object(environment: &Name, policy: &Name, id: &BackupId, name: &ObjectName) -> Self {
        ObjectKey(format!(
            "{}{}",
            Self::backup_prefix(environment, policy, id),
            name.file_name()
        ))
    }

    /// Parses a key found in a listing back into its parts; `None` for keys drctl did not write.
    pub fn parse(key: &str) -> Option<(Name, Name, BackupId, ObjectName)> {
        let mut parts = key.split('/');
        let env = Name::parse(parts.next()?).ok()?;
        let policy = Name::parse(parts.next()?).ok()?;
        let id = BackupId::parse(parts.next()?).ok()?;
        let name = ObjectName::parse(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some((env, policy, id, name))
    }

    /// Wraps a key that came from a store listing. Rejects keys that could escape the
    /// repository root when used as a path.
    pub fn from_listing(key: &str) -> Result<Self> {
        let bad = key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad {
            return Err(Error::integrity(format!(
                "unsafe object key {key:?} in listing"
            )));
        }
        Ok(ObjectKey(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let env = Name::parse("prod").unwrap();
        let pol = Name::parse("app-db").unwrap();
        let id = BackupId::parse("20260101T000000Z-0badc0de").unwrap();
        for name in [
            ObjectName::Data {
                artifact: "tar".into(),
            },
            ObjectName::Index,
            ObjectName::Manifest,
        ] {
            let key = ObjectKey::object(&env, &pol, &id, &name);
            let (e, p, i, n) = ObjectKey::parse(key.as_str()).unwrap();
            assert_eq!((e, p, i, n), (env.clone(), pol.clone(), id.clone(), name));
        }
        assert_eq!(
            ObjectKey::object(&env, &pol, &id, &ObjectName::Manifest).as_str(),
            "prod/app-db/20260101T000000Z-0badc0de/manifest.json"
        );
    }

    #[test]
    fn listing_keys_that_escape_are_refused() {
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "./a"] {
            assert!(ObjectKey::from_listing(bad).is_err(), "{bad}");
        }
        assert!(ObjectKey::parse("prod/app/not-an-id/manifest.json").is_none());
        assert!(ObjectName::parse("data.TAR.zst.age").is_none());
    }
}
