//! Settings (`drctl.yaml`) and policies (`policies/*.yaml`): their models, defaults, and a
//! validation that reports every problem at once, each with its file and field.
//!
//! Unknown keys are errors everywhere. Relative paths in `drctl.yaml` (repository, registry,
//! key files, policies directory, and `files` source paths in policies) resolve against the
//! directory that holds `drctl.yaml`.

pub mod policy;
pub mod settings;

use std::fmt;
use std::path::{Path, PathBuf};

pub use policy::{Compression, Policy, Retention, Schedule, SourceConfig};
pub use settings::{RegistryUrl, S3Url, Settings, StoreUrl};

use crate::{Error, Result};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub file: PathBuf,
    /// Dotted path of the field, e.g. `source.paths[0]`; empty for the whole file.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

/// Collects problems while a file is checked.
pub(crate) struct Problems<'a> {
    file: &'a Path,
    pub list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub fn new(file: &'a Path) -> Self {
        Problems {
            file,
            list: Vec::new(),
        }
    }
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.to_path_buf(),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Reads a YAML file as a mapping, reporting unreadable or non-mapping files.
    pub fn read_mapping(&mut self) -> Option<serde_yaml_ng::Mapping> {
        let text = match std::fs::read_to_string(self.file) {
            Ok(t) => t,
            Err(e) => {
                self.add("", format!("cannot read: {e}"));
                return None;
            }
        };
        match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text) {
            Ok(serde_yaml_ng::Value::Mapping(m)) => Some(m),
            Ok(serde_yaml_ng::Value::Null) => {
                self.add("", "file is empty");
                None
            }
            Ok(_) => {
                self.add("", "expected a mapping of keys to values at the top level");
                None
            }
            Err(e) => {
                self.add("", format!("not valid YAML: {e}"));
                None
            }
        }
    }

    /// Checks the top-level keys of a mapping against `known`, reporting unknown and missing
    /// required ones, and returns the entries by key.
    pub fn keys(
        &mut self,
        map: serde_yaml_ng::Mapping,
        known: &[&str],
        required: &[&str],
    ) -> std::collections::BTreeMap<String, serde_yaml_ng::Value> {
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in map {
            match k.as_str() {
                Some(key) if known.contains(&key) => {
                    out.insert(key.to_owned(), v);
                }
                Some(key) => self.add(
                    key,
                    format!("unknown key (known keys: {})", known.join(", ")),
                ),
                None => self.add("", format!("keys must be strings, found {k:?}")),
            }
        }
        for key in required {
            if !out.contains_key(*key) {
                self.add(*key, "required key is missing");
            }
        }
        out
    }

    /// Deserialises one section, reporting the failing field path.
    pub fn section<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        value: serde_yaml_ng::Value,
    ) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let field = match (key.is_empty(), path.is_empty()) {
                    (_, true) => key.to_owned(),
                    (true, false) => path,
                    (false, false) => format!("{key}.{path}"),
                };
                self.add(field, e.into_inner().to_string());
                None
            }
        }
    }
}

/// Turns a list of problems into one error that lists all of them.
pub fn problems_error(problems: &[Problem]) -> Error {
    let mut msg = format!("{} problem(s) in the configuration:", problems.len());
    for p in problems {
        msg.push_str("\n  ");
        msg.push_str(&p.to_string());
    }
    Error::invalid(msg)
        .hint("fix the listed fields; `drctl policy validate` checks every file at once")
}

/// A size in bytes, written as PostgreSQL and pgBackRest write sizes: a whole number with
/// kB, MB, GB or TB (powers of 1024, in any case); in a policy, a bare number is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `s`, where a bare number counts units of `bare` bytes.
    pub fn parse(s: &str, bare: u64) -> std::result::Result<ByteSize, String> {
        let t = s.trim();
        let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, unit) = t.split_at(digits);
        let n: u64 = number
            .parse()
            .ok()
            .filter(|_| !unit.starts_with(['.', ',']))
            .ok_or_else(|| format!("{s:?} is not a whole number with a unit such as MB or GB"))?;
        let scale = match unit.trim().to_ascii_lowercase().as_str() {
            "" => bare,
            "kb" => 1 << 10,
            "mb" => 1 << 20,
            "gb" => 1 << 30,
            "tb" => 1 << 40,
            _ => return Err(format!("{s:?}: the unit must be kB, MB, GB or TB")),
        };
        n.checked_mul(scale)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    /// In the largest unit that divides it exactly, as it parses back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        match ["TB", "GB", "MB", "kB"]
            .iter()
            .zip([40, 30, 20, 10])
            .find(|(_, shift)| n != 0 && n.trailing_zeros() >= *shift)
        {
            Some((unit, shift)) => write!(f, "{}{unit}", n >> shift),
            None => write!(f, "{n}"),
        }
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<ByteSize, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged, expecting = "a size such as 512MB or 4GB")]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Bytes(n) => Ok(ByteSize(n)),
            Written::Text(s) => ByteSize::parse(&s, 1).map_err(serde::de::Error::custom),
        }
    }
}

/// Resolves `p` against `base` unless it is absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Loads the settings and every policy, reporting all problems at once.
pub fn load_all(config_path: &Path) -> Result<(Settings, Vec<Policy>)> {
    let (settings, mut problems) = Settings::check(config_path);
    let Some(settings) = settings else {
        return Err(problems_error(&problems));
    };
    let (policies, policy_problems) = policy::check_dir(&settings);
    problems.extend(policy_problems);
    if problems.is_empty() {
        Ok((settings, policies))
    } else {
        Err(problems_error(&problems))
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn sizes_read_as_postgresql_writes_them_and_print_as_they_read() {
        for (s, bare, bytes, shown) in [
            ("4GB", 1, 4 << 30, "4GB"),
            (" 512 mb ", 1, 512 << 20, "512MB"),
            ("1536MB", 1, 1536 << 20, "1536MB"),
            ("1tb", 1, 1 << 40, "1TB"),
            ("1500kB", 1, 1500 << 10, "1500kB"),
            ("1000", 1, 1000, "1000"),
            ("1024", 1024, 1 << 20, "1MB"),
            ("0", 1, 0, "0"),
        ] {
            let size = ByteSize::parse(s, bare).unwrap();
            assert_eq!(size, ByteSize(bytes), "{s}");
            assert_eq!(size.to_string(), shown, "{s}");
        }
        for bad in ["", "GB", "1.5GB", "-1GB", "1 GiB", "1GB2", "99999999999TB"] {
            assert!(ByteSize::parse(bad, 1).is_err(), "{bad:?}");
        }
    }
}
