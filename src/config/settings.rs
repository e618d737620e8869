//! `drctl.yaml`: where the repository, registry and keys are, and which environment this is.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{resolve, Problem, Problems};
use crate::format::Name;
use crate::{Error, Result};

/// Where backups are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:///abs/path`, `file://relative/path` or a plain path: a local directory.
    Local(PathBuf),
}

impl StoreUrl {
    pub fn parse(s: &str, base: &Path) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("file://") {
            return non_empty(rest, s).map(|p| StoreUrl::Local(resolve(base, Path::new(p))));
        }
        if s.contains("://") {
            return Err(Error::invalid(format!(
                "unsupported repository URL {s:?}: use file:///path/to/repo or a directory path"
            )));
        }
        non_empty(s, s).map(|p| StoreUrl::Local(resolve(base, Path::new(p))))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Local(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// Where the registry lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryUrl {
    /// `sqlite:///abs/registry.db` or `sqlite://relative/registry.db`.
    Sqlite(PathBuf),
    /// `dynamodb://table?region=us-east-1[&endpoint=http://host:port]`.
    DynamoDb(crate::registry::dynamodb::TableUrl),
}

impl RegistryUrl {
    pub fn parse(s: &str, base: &Path) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("sqlite://") {
            return non_empty(rest, s).map(|p| RegistryUrl::Sqlite(resolve(base, Path::new(p))));
        }
        if s.starts_with("dynamodb://") {
            return crate::registry::dynamodb::TableUrl::parse(s).map(RegistryUrl::DynamoDb);
        }
        Err(Error::invalid(format!(
            "unsupported registry URL {s:?}: use sqlite:///path/to/registry.db or dynamodb://table?region=REGION"
        )))
    }
}

impl std::fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            RegistryUrl::DynamoDb(t) => t.fmt(f),
        }
    }
}

fn non_empty<'a>(rest: &'a str, whole: &str) -> Result<&'a str> {
    if rest.is_empty() {
        Err(Error::invalid(format!("URL {whole:?} has no path")))
    } else {
        Ok(rest)
    }
}

/// The validated, resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file the settings were read from.
    pub file: PathBuf,
    /// Directory relative paths resolve against.
    pub base_dir: PathBuf,
    pub environment: Name,
    pub repository: StoreUrl,
    pub registry: RegistryUrl,
    /// age recipients given inline.
    pub recipients: Vec<String>,
    /// A file of age recipients, one per line (`#` comments allowed).
    pub recipients_file: Option<PathBuf>,
    /// The age identity used by restores and deep verification.
    pub identity_file: Option<PathBuf>,
    pub policies_dir: PathBuf,
    /// Destructive commands need `--confirm` when set.
    pub production: bool,
    /// How long a lease lives without renewal.
    pub lease_ttl_seconds: u64,
    /// KMS keys that also wrap every backup's file key, and how restores reach KMS.
    pub kms: Option<crate::crypto::kms::KmsSettings>,
}

pub const KEYS: &[&str] = &[
    "environment",
    "repository",
    "registry",
    "recipients",
    "recipients-file",
    "identity-file",
    "policies-dir",
    "production",
    "lease-ttl-seconds",
    "kms",
];
const REQUIRED: &[&str] = &["environment", "repository", "registry"];
pub const DEFAULT_LEASE_TTL_SECONDS: u64 = 120;

impl Settings {
    /// Reads and validates `drctl.yaml`; `None` when it is unusable, with every problem found.
    pub fn check(path: &Path) -> (Option<Settings>, Vec<Problem>) {
        let mut p = Problems::new(path);
        let Some(map) = p.read_mapping() else {
            return (None, p.list);
        };
        let entries = p.keys(map, KEYS, REQUIRED);
        // Check field by field so one bad field does not hide the others.
        let mut fields = serde_yaml_ng::Mapping::new();
        for (k, v) in entries {
            let probe = serde_yaml_ng::Value::Mapping(
                [(serde_yaml_ng::Value::String(k.clone()), v.clone())]
                    .into_iter()
                    .collect(),
            );
            if p.section::<PartialRaw>("", probe).is_some() {
                fields.insert(serde_yaml_ng::Value::String(k), v);
            }
        }
        // Fields that type-checked are checked further even when others did not.
        let raw: PartialRaw = p
            .section("", serde_yaml_ng::Value::Mapping(fields))
            .unwrap_or_default();
        let base_dir = path
            .parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let base_dir = std::fs::canonicalize(&base_dir).unwrap_or(base_dir);
        let environment = raw
            .environment
            .map(|e| Name::parse(&e).map_err(|e| p.add("environment", e.message())));
        let repository = raw
            .repository
            .map(|r| StoreUrl::parse(&r, &base_dir).map_err(|e| p.add("repository", e.message())));
        let registry = raw
            .registry
            .map(|r| RegistryUrl::parse(&r, &base_dir).map_err(|e| p.add("registry", e.message())));
        let recipients = raw.recipients.unwrap_or_default();
        for (i, r) in recipients.iter().enumerate() {
            if let Err(e) = crate::crypto::parse_recipient(r) {
                p.add(format!("recipients[{i}]"), e.message());
            }
        }
        // A host that only restores with KMS needs no recipients; backups still refuse to run
        // without one (promise 2: the break-glass identity always restores).
        if recipients.is_empty() && raw.recipients_file.is_none() && raw.kms.is_none() {
            p.add(
                "recipients",
                "no recipients: set recipients or recipients-file (drctl init can create the file)",
            );
        }
        for (field, message) in raw.kms.iter().flat_map(|k| k.problems()) {
            p.add(format!("kms.{field}"), message);
        }
        if raw.lease_ttl_seconds == Some(0) {
            p.add("lease-ttl-seconds", "must be greater than 0");
        }
        let (Some(Ok(environment)), Some(Ok(repository)), Some(Ok(registry))) =
            (environment, repository, registry)
        else {
            return (None, p.list);
        };
        let settings = Settings {
            file: path.to_path_buf(),
            environment,
            repository,
            registry,
            recipients,
            recipients_file: raw.recipients_file.map(|f| resolve(&base_dir, &f)),
            identity_file: raw.identity_file.map(|f| resolve(&base_dir, &f)),
            policies_dir: resolve(
                &base_dir,
                &raw.policies_dir.unwrap_or_else(|| "policies".into()),
            ),
            production: raw.production.unwrap_or(false),
            lease_ttl_seconds: raw.lease_ttl_seconds.unwrap_or(DEFAULT_LEASE_TTL_SECONDS),
            kms: raw.kms,
            base_dir,
        };
        if p.list.is_empty() {
            (Some(settings), p.list)
        } else {
            (None, p.list)
        }
    }

    /// Loads settings, failing with every problem listed.
    pub fn load(path: &Path) -> Result<Settings> {
        if !path.exists() {
            return Err(Error::not_found(format!("config file {} not found", path.display()))
                .hint("pass --config, set DRCTL_CONFIG, or run drctl in the directory holding drctl.yaml"));
        }
        match Settings::check(path) {
            (Some(s), _) => Ok(s),
            (None, problems) => Err(super::problems_error(&problems)),
        }
    }
}

/// The file as written: every field optional, so each can be checked on its own.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PartialRaw {
    environment: Option<String>,
    repository: Option<String>,
    registry: Option<String>,
    recipients: Option<Vec<String>>,
    recipients_file: Option<PathBuf>,
    identity_file: Option<PathBuf>,
    policies_dir: Option<PathBuf>,
    production: Option<bool>,
    lease_ttl_seconds: Option<u64>,
    kms: Option<crate::crypto::kms::KmsSettings>,
}
