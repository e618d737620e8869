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
    /// `s3://bucket/prefix?region=R[&endpoint=URL][&part-size-mib=N][&upload-concurrency=N]`.
    S3(S3Url),
}

/// An S3 bucket and key prefix. A custom endpoint (an S3-compatible store) implies
/// path-style addressing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; may be empty.
    pub prefix: String,
    pub region: String,
    pub endpoint: Option<String>,
    /// Multipart part size in MiB (5..=5120); objects up to one part go up in one PutObject.
    pub part_size_mib: u32,
    /// Parts uploaded (and ranges downloaded) at once (1..=16).
    pub concurrency: u32,
}

pub const DEFAULT_PART_SIZE_MIB: u32 = 8;
pub const DEFAULT_S3_CONCURRENCY: u32 = 2;

impl S3Url {
    fn parse(s: &str) -> Result<S3Url> {
        let bad = |why: String| {
            Error::invalid(format!(
                "invalid S3 URL {s:?}: {why} (format: s3://bucket/prefix?region=us-east-1)"
            ))
        };
        let url = url::Url::parse(s).map_err(|e| bad(e.to_string()))?;
        let bucket = url.host_str().unwrap_or_default().to_owned();
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            return Err(bad(format!(
                "{bucket:?} is not a bucket name (3-63 of a-z, 0-9, '-', '.')"
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials do not belong in the URL; use the AWS credential chain".into(),
            ));
        }
        let prefix = url.path().trim_matches('/').to_owned();
        if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
            return Err(bad(format!(
                "prefix {prefix:?} has empty, '.' or '..' components"
            )));
        }
        let (mut region, mut endpoint) = (None, None);
        let (mut part_size_mib, mut concurrency) = (DEFAULT_PART_SIZE_MIB, DEFAULT_S3_CONCURRENCY);
        for (k, v) in url.query_pairs() {
            let number = |range: std::ops::RangeInclusive<u32>| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| range.contains(n))
                    .ok_or_else(|| bad(format!("{k}={v}: expected a number in {range:?}")))
            };
            match &*k {
                "region" if !v.is_empty() => region = Some(v.into_owned()),
                "endpoint" => {
                    let e = url::Url::parse(&v).map_err(|e| bad(format!("endpoint: {e}")))?;
                    if !matches!(e.scheme(), "http" | "https") || !e.username().is_empty() {
                        return Err(bad("endpoint must be an http(s) URL without credentials".into()));
                    }
                    endpoint = Some(v.trim_end_matches('/').to_owned());
                }
                "part-size-mib" => part_size_mib = number(5..=5120)?,
                "upload-concurrency" => concurrency = number(1..=16)?,
                _ => return Err(bad(format!("unknown parameter {k:?} (known: region, endpoint, part-size-mib, upload-concurrency)"))),
            }
        }
        let region =
            region.ok_or_else(|| bad("region is required, e.g. ?region=us-east-1".into()))?;
        Ok(S3Url {
            bucket,
            prefix,
            region,
            endpoint,
            part_size_mib,
            concurrency,
        })
    }
}

impl serde::Serialize for S3Url {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "s3://{}/{}?region={}",
            self.bucket, self.prefix, self.region
        )?;
        if let Some(e) = &self.endpoint {
            write!(f, "&endpoint={e}")?;
        }
        Ok(())
    }
}

impl StoreUrl {
    pub fn parse(s: &str, base: &Path) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("file://") {
            return non_empty(rest, s).map(|p| StoreUrl::Local(resolve(base, Path::new(p))));
        }
        if s.starts_with("s3://") {
            return S3Url::parse(s).map(StoreUrl::S3);
        }
        if s.contains("://") {
            return Err(Error::invalid(format!(
                "unsupported repository URL {s:?}: use file:///path/to/repo, s3://bucket/prefix?region=R or a directory path"
            )));
        }
        non_empty(s, s).map(|p| StoreUrl::Local(resolve(base, Path::new(p))))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Local(p) => write!(f, "file://{}", p.display()),
            StoreUrl::S3(u) => u.fmt(f),
        }
    }
}

/// Where the registry lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryUrl {
    /// `sqlite:///abs/registry.db` or `sqlite://relative/registry.db`.
    Sqlite(PathBuf),
}

impl RegistryUrl {
    pub fn parse(s: &str, base: &Path) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("sqlite://") {
            return non_empty(rest, s).map(|p| RegistryUrl::Sqlite(resolve(base, Path::new(p))));
        }
        Err(Error::invalid(format!(
            "unsupported registry URL {s:?}: use sqlite:///path/to/registry.db"
        )))
    }
}

impl std::fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
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
    /// The resources of each disaster-recovery region, for `drctl restore --region`.
    pub regions: std::collections::BTreeMap<String, RegionSettings>,
}

/// Where one region's copy of the registry and of the backups are.
#[derive(Debug, Clone)]
pub struct RegionSettings {
    pub registry: RegistryUrl,
    pub repository: StoreUrl,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRegion {
    registry: String,
    repository: String,
}

/// AWS-style region names: `us-west-2`, `eu-central-1`.
pub fn valid_region(r: &str) -> bool {
    (2..=32).contains(&r.len())
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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
    "regions",
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
        if recipients.is_empty() && raw.recipients_file.is_none() {
            p.add(
                "recipients",
                "no recipients: set recipients or recipients-file (drctl init can create the file)",
            );
        }
        let mut regions = std::collections::BTreeMap::new();
        for (name, r) in raw.regions.unwrap_or_default() {
            let field = format!("regions.{name}");
            if !valid_region(&name) {
                p.add(&field, "not a region name (like us-west-2)");
            }
            let registry = RegistryUrl::parse(&r.registry, &base_dir)
                .map_err(|e| p.add(format!("{field}.registry"), e.message()));
            let repository = StoreUrl::parse(&r.repository, &base_dir)
                .map_err(|e| p.add(format!("{field}.repository"), e.message()));
            if let (Ok(registry), Ok(repository)) = (registry, repository) {
                if let StoreUrl::S3(u) = &repository {
                    if u.region != name {
                        p.add(
                            format!("{field}.repository"),
                            format!("the URL's region is {}, not {name}", u.region),
                        );
                    }
                }
                regions.insert(
                    name,
                    RegionSettings {
                        registry,
                        repository,
                    },
                );
            }
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
            regions,
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
    regions: Option<std::collections::BTreeMap<String, RawRegion>>,
}
