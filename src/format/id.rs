//! Identifiers that reach paths, queries and object keys. Each is validated on construction,
//! so an invalid one never gets further than the parser.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `YYYYMMDDTHHMMSSZ-xxxxxxxx`: UTC start time and 8 lowercase hex random digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

const TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

impl BackupId {
    /// A new ID for a backup starting at `at`.
    pub fn generate(at: DateTime<Utc>) -> Self {
        let random: u32 = rand::thread_rng().gen();
        BackupId(format!("{}-{random:08x}", at.format(TIME_FORMAT)))
    }

    pub fn parse(s: &str) -> Result<Self> {
        let invalid = || {
            Error::invalid(format!(
                "malformed backup ID {:?}: expected YYYYMMDDTHHMMSSZ-xxxxxxxx (UTC time, 8 lowercase hex digits)",
                truncate(s)
            ))
        };
        let bytes = s.as_bytes();
        if bytes.len() != 25 || bytes[16] != b'-' {
            return Err(invalid());
        }
        let (time, random) = (&s[..16], &s[17..]);
        if !random
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(invalid());
        }
        if !time.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        }) {
            return Err(invalid());
        }
        NaiveDateTime::parse_from_str(time, TIME_FORMAT).map_err(|_| invalid())?;
        Ok(BackupId(s.to_owned()))
    }

    /// The start time encoded in the ID.
    pub fn timestamp(&self) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(&self.0[..16], TIME_FORMAT)
            .expect("validated on construction")
            .and_utc()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BackupId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for BackupId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

/// A name of an environment or a policy: `[a-z0-9][a-z0-9-]{0,62}`. Used as an object key
/// component, so nothing else is allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(Error::invalid(format!(
                "invalid name {:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
                truncate(s)
            )))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Name {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_id_round_trips_and_keeps_its_time() {
        let at = DateTime::parse_from_rfc3339("2026-03-04T05:06:07Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = BackupId::generate(at);
        assert!(id.as_str().starts_with("20260304T050607Z-"));
        assert_eq!(BackupId::parse(id.as_str()).unwrap(), id);
        assert_eq!(id.timestamp(), at);
    }

    #[test]
    fn backup_id_rejects_anything_else() {
        for bad in [
            "",
            "latest",
            "20260304T050607Z-0123456",
            "20260304T050607Z-0123456g",
            "20260304T050607Z-0123456A",
            "20260304T050607Z_01234567",
            "20261304T050607Z-01234567",
            "20260304T050607-012345678",
            "../../../etc/passwd-00000",
            "20260304T050607Z-01234567'; DROP TABLE backups; --",
            "２0260304T050607Z-01234567",
        ] {
            let err = BackupId::parse(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn names_are_key_safe() {
        assert!(Name::parse("app-db-1").is_ok());
        for bad in ["", "-x", "App", "a/b", "a..b", "a b", &"x".repeat(64)] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
    }
}
