//! Backup policies: one file per policy in the policies directory, named `<name>.yaml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{resolve, Problem, Problems, Settings};
use crate::format::layout::valid_artifact;
use crate::format::Name;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Policy {
    pub name: Name,
    pub description: Option<String>,
    pub source: SourceConfig,
    pub schedule: Schedule,
    pub retention: Retention,
    pub compression: Compression,
    pub storage: Storage,
    /// Copies of every backup in other regions.
    pub replicas: Vec<Replica>,
    /// The file the policy was read from.
    #[serde(skip)]
    pub file: PathBuf,
}

/// What to back up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Files and directories, archived as POSIX tar.
    Files {
        /// Paths to back up; relative ones resolve against the directory of drctl.yaml.
        paths: Vec<PathBuf>,
        /// Globs to leave out. A pattern with a `/` matches the absolute path (`**` crosses
        /// directories, `*` does not); one without matches the file name.
        #[serde(default)]
        exclude: Vec<String>,
        /// Do not descend into other file systems (mount points).
        #[serde(default, rename = "one-file-system")]
        one_file_system: bool,
    },
    /// The standard output of a command, run without a shell.
    Command {
        /// argv: the program and its arguments.
        command: Vec<String>,
        /// Label of the stream, used in the object name `data.<artifact>.zst.age`.
        #[serde(default = "default_artifact")]
        artifact: String,
        /// Extra environment variables for the command.
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
    /// A PostgreSQL database (`logical`: pg_dump) or cluster (`physical`: a base backup
    /// plus WAL archived by `drctl wal push`).
    Postgres {
        mode: PostgresMode,
        /// `postgres://user@host:port/database`, without a password.
        url: String,
        /// File holding the password (relative paths resolve against drctl.yaml's directory).
        #[serde(default, rename = "password-file")]
        password_file: Option<PathBuf>,
        /// Environment variable holding the password.
        #[serde(default, rename = "password-env")]
        password_env: Option<String>,
        /// Physical mode on the database host: the server's data directory (absolute). drctl
        /// then reads the cluster's files itself between `pg_backup_start` and
        /// `pg_backup_stop`, instead of streaming them through `pg_basebackup`.
        #[serde(default, rename = "data-directory")]
        data_directory: Option<PathBuf>,
        /// Physical mode: check page checksums as the base backup reads them (on a cluster
        /// with data checksums), failing the backup on a damaged page; as `pg_basebackup`.
        #[serde(default = "checked", rename = "verify-checksums")]
        verify_checksums: bool,
        /// Physical mode: when more WAL than this waits for archiving (segments marked
        /// ready in `pg_wal/archive_status`), `drctl wal push` drops the segment it was
        /// given instead of archiving it, so that an archive that is down or too slow cannot fill
        /// the server's disk; point-in-time recovery past a dropped segment then needs a new
        /// base backup. As pgBackRest's `archive-push-queue-max`; unset, nothing is dropped.
        #[serde(
            default,
            rename = "archive-push-queue-max",
            skip_serializing_if = "Option::is_none"
        )]
        archive_push_queue_max: Option<super::ByteSize>,
    },
    /// A MariaDB/MySQL database: full backups with mariadb-dump, incremental ones from the
    /// server's binary logs.
    Mysql {
        /// `mysql://user@host:port/database`, without a password.
        url: String,
        /// File holding the password (relative paths resolve against drctl.yaml's directory).
        #[serde(default, rename = "password-file")]
        password_file: Option<PathBuf>,
        /// Environment variable holding the password.
        #[serde(default, rename = "password-env")]
        password_env: Option<String>,
    },
    /// A SQLite database file, copied consistently while it is in use.
    Sqlite {
        /// The database file; a relative path resolves against the directory of drctl.yaml.
        path: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresMode {
    Logical,
    Physical,
}

fn default_artifact() -> String {
    "stream".into()
}

fn checked() -> bool {
    true
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Files { .. } => "files",
            SourceConfig::Command { .. } => "command",
            SourceConfig::Postgres { .. } => "postgres",
            SourceConfig::Mysql { .. } => "mysql",
            SourceConfig::Sqlite { .. } => "sqlite",
        }
    }
}

/// When the daemon runs the policy (6-field cron: sec min hour day month weekday, UTC).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Schedule {
    pub full: Option<String>,
    pub incremental: Option<String>,
}

/// How many backups to keep, restic-style. A backup kept by any rule is kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Compression {
    /// zstd level, 1..=19.
    #[serde(default = "default_level")]
    pub level: i32,
    /// zstd worker threads; 0 means one per core.
    #[serde(default)]
    pub threads: u32,
}

/// How objects are stored (S3 repositories only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Storage {
    /// S3 storage class, e.g. `STANDARD_IA` (default: the bucket's default, `STANDARD`).
    pub class: Option<String>,
    /// Encrypt at rest with this KMS key (SSE-KMS): key ID, ARN or `alias/...`.
    pub sse_kms_key_id: Option<String>,
    /// Object Lock retention for every object of a backup (the bucket must have Object Lock).
    pub object_lock: Option<ObjectLock>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectLock {
    pub mode: LockMode,
    /// Objects are locked until the backup's start time plus this many days.
    pub days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete.
    Governance,
    /// Nobody can delete before retain-until, not even the root user.
    Compliance,
}

/// A bucket in another region that receives a copy of every backup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replica {
    pub region: String,
    pub repository: super::S3Url,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawReplica {
    region: String,
    repository: String,
}

/// Storage classes a restore can read at once (no archive tiers that need a thaw first).
pub const STORAGE_CLASSES: &[&str] = &[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "REDUCED_REDUNDANCY",
];

fn default_level() -> i32 {
    3
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            level: default_level(),
            threads: 0,
        }
    }
}

impl Compression {
    /// The number of zstd workers to use.
    pub fn workers(&self) -> u32 {
        if self.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        } else {
            self.threads
        }
    }
}

const KEYS: &[&str] = &[
    "name",
    "description",
    "source",
    "schedule",
    "retention",
    "compression",
    "storage",
    "replicas",
];
const REQUIRED: &[&str] = &["name", "source"];

impl Policy {
    /// Reads and validates one policy file.
    pub fn check(path: &Path, settings: &Settings) -> (Option<Policy>, Vec<Problem>) {
        let mut p = Problems::new(path);
        let Some(map) = p.read_mapping() else {
            return (None, p.list);
        };
        let mut entries = p.keys(map, KEYS, REQUIRED);
        let name: Option<String> = entries.remove("name").and_then(|v| p.section("name", v));
        let name = name.and_then(|n| match Name::parse(&n) {
            Ok(n) => Some(n),
            Err(e) => {
                p.add("name", e.message());
                None
            }
        });
        if let (Some(n), Some(stem)) = (&name, path.file_stem().and_then(|s| s.to_str())) {
            if n.as_str() != stem {
                p.add(
                    "name",
                    format!("name \"{n}\" must match the file name ({stem}.yaml)"),
                );
            }
        }
        let description: Option<String> = entries
            .remove("description")
            .and_then(|v| p.section("description", v));
        let source: Option<SourceConfig> = entries
            .remove("source")
            .and_then(|v| p.section("source", v));
        let schedule: Option<Schedule> = match entries.remove("schedule") {
            Some(v) => p.section("schedule", v),
            None => Some(Schedule::default()),
        };
        let retention: Option<Retention> = match entries.remove("retention") {
            Some(v) => p.section("retention", v),
            None => Some(Retention::default()),
        };
        let compression: Option<Compression> = match entries.remove("compression") {
            Some(v) => p.section("compression", v),
            None => Some(Compression::default()),
        };

        let storage: Option<Storage> = match entries.remove("storage") {
            Some(v) => p.section("storage", v),
            None => Some(Storage::default()),
        };
        if let Some(source) = &source {
            check_source(&mut p, source);
        }
        if let Some(storage) = &storage {
            check_storage(&mut p, storage, settings);
        }
        let replicas: Option<Vec<Replica>> = match entries.remove("replicas") {
            Some(v) => p
                .section::<Vec<RawReplica>>("replicas", v)
                .map(|raw| check_replicas(&mut p, raw, settings)),
            None => Some(Vec::new()),
        };
        if let Some(schedule) = &schedule {
            for (field, expr) in [
                ("full", &schedule.full),
                ("incremental", &schedule.incremental),
            ] {
                if let Some(expr) = expr {
                    if let Err(e) = parse_cron(expr) {
                        p.add(format!("schedule.{field}"), e);
                    }
                }
            }
        }
        if let Some(c) = &compression {
            if !(1..=19).contains(&c.level) {
                p.add(
                    "compression.level",
                    format!("{} is out of range 1..=19", c.level),
                );
            }
            if c.threads > 256 {
                p.add(
                    "compression.threads",
                    format!("{} is more than 256", c.threads),
                );
            }
        }
        if let Some(r) = &retention {
            let rules = [
                r.keep_last,
                r.keep_hourly,
                r.keep_daily,
                r.keep_weekly,
                r.keep_monthly,
                r.keep_yearly,
            ];
            let any_set = rules.iter().any(Option::is_some);
            if any_set && !rules.iter().any(|k| k.unwrap_or(0) > 0) {
                p.add(
                    "retention",
                    "every keep rule is 0: this would delete every backup",
                );
            }
        }
        match (
            name,
            source,
            schedule,
            retention,
            compression,
            storage,
            replicas,
        ) {
            (
                Some(name),
                Some(mut source),
                Some(schedule),
                Some(retention),
                Some(compression),
                Some(storage),
                Some(replicas),
            ) if p.list.is_empty() => {
                if let SourceConfig::Files { paths, .. } = &mut source {
                    for path in paths.iter_mut() {
                        *path = resolve(&settings.base_dir, path);
                    }
                }
                match &mut source {
                    SourceConfig::Postgres {
                        password_file: Some(file),
                        ..
                    }
                    | SourceConfig::Mysql {
                        password_file: Some(file),
                        ..
                    } => *file = resolve(&settings.base_dir, file),
                    SourceConfig::Sqlite { path } => *path = resolve(&settings.base_dir, path),
                    _ => {}
                }
                let policy = Policy {
                    name,
                    description,
                    source,
                    schedule,
                    retention,
                    compression,
                    storage,
                    replicas,
                    file: path.to_path_buf(),
                };
                (Some(policy), p.list)
            }
            _ => (None, p.list),
        }
    }

    /// Loads the policy called `name` from the policies directory.
    pub fn load(settings: &Settings, name: &str) -> Result<Policy> {
        let name = Name::parse(name).map_err(|e| e.context("policy"))?;
        let dir = &settings.policies_dir;
        let file = ["yaml", "yml"]
            .iter()
            .map(|ext| dir.join(format!("{name}.{ext}")))
            .find(|f| f.exists())
            .ok_or_else(|| {
                Error::not_found(format!("no policy {name:?} in {}", dir.display()))
                    .hint("policies are files named <name>.yaml in policies-dir; `drctl policy validate` lists them")
            })?;
        match Policy::check(&file, settings) {
            (Some(p), _) => Ok(p),
            (None, problems) => Err(super::problems_error(&problems)),
        }
    }
}

fn check_source(p: &mut Problems, source: &SourceConfig) {
    match source {
        SourceConfig::Files { paths, exclude, .. } => {
            if paths.is_empty() {
                p.add("source.paths", "at least one path is required");
            }
            for (i, path) in paths.iter().enumerate() {
                if path.as_os_str().is_empty() {
                    p.add(format!("source.paths[{i}]"), "empty path");
                }
            }
            for (i, pattern) in exclude.iter().enumerate() {
                if let Err(e) = globset::Glob::new(pattern) {
                    p.add(format!("source.exclude[{i}]"), format!("invalid glob: {e}"));
                }
            }
        }
        SourceConfig::Command {
            command,
            artifact,
            env,
        } => {
            if command.is_empty() || command[0].is_empty() {
                p.add(
                    "source.command",
                    "the command (argv list) must not be empty",
                );
            }
            if !valid_artifact(artifact) {
                p.add(
                    "source.artifact",
                    format!("{artifact:?}: use 1-16 characters of a-z and 0-9"),
                );
            }
            for key in env.keys() {
                if key.is_empty() || key.contains('=') {
                    p.add(
                        format!("source.env.{key}"),
                        "invalid environment variable name",
                    );
                }
            }
        }
        SourceConfig::Postgres {
            mode,
            url,
            password_file,
            password_env,
            data_directory,
            verify_checksums,
            archive_push_queue_max,
        } => {
            check_postgres_url(p, *mode, url);
            check_password(p, password_file, password_env);
            if !verify_checksums && *mode != PostgresMode::Physical {
                p.add(
                    "source.verify-checksums",
                    "only a physical backup reads pages; remove it",
                );
            }
            match archive_push_queue_max {
                Some(_) if *mode != PostgresMode::Physical => p.add(
                    "source.archive-push-queue-max",
                    "only a physical backup archives WAL; remove it",
                ),
                Some(max) if max.0 < 16 << 20 => p.add(
                    "source.archive-push-queue-max",
                    format!("{max} is less than one WAL segment of the default size (16MB): give room for many segments, e.g. 4GB"),
                ),
                _ => {}
            }
            match data_directory {
                Some(_) if *mode != PostgresMode::Physical => p.add(
                    "source.data-directory",
                    "only a physical backup reads the data directory; remove it",
                ),
                Some(dir) if !dir.is_absolute() => p.add(
                    "source.data-directory",
                    "give the data directory as an absolute path",
                ),
                _ => {}
            }
        }
        SourceConfig::Mysql {
            url,
            password_file,
            password_env,
        } => {
            if let Err(e) = crate::source::mysql::Conn::parse_url(url) {
                p.add("source.url", e.message());
            }
            check_password(p, password_file, password_env);
        }
        SourceConfig::Sqlite { path } => {
            if path.as_os_str().is_empty() {
                p.add("source.path", "the database file path must not be empty");
            }
        }
    }
}

/// A database password comes from a file or an environment variable, not both.
fn check_password(
    p: &mut Problems,
    password_file: &Option<PathBuf>,
    password_env: &Option<String>,
) {
    if password_file.is_some() && password_env.is_some() {
        p.add(
            "source.password-file",
            "give password-file or password-env, not both",
        );
    }
    if let Some(var) = password_env {
        if var.is_empty() || var.contains('=') {
            p.add("source.password-env", "invalid environment variable name");
        }
    }
}

fn check_postgres_url(p: &mut Problems, mode: PostgresMode, url: &str) {
    let what = "use postgres://user@host:port/database";
    match url::Url::parse(url) {
        Err(e) => p.add("source.url", format!("not a URL ({e}); {what}")),
        Ok(u) => {
            if !matches!(u.scheme(), "postgres" | "postgresql") {
                p.add(
                    "source.url",
                    format!("scheme {:?} is not postgres; {what}", u.scheme()),
                );
            }
            if crate::source::carries_password(&u) {
                // Never echo the URL: it holds the password.
                p.add(
                    "source.url",
                    "the URL contains a password; move it to password-file or password-env",
                );
            }
            if mode == PostgresMode::Logical && u.path().trim_start_matches('/').is_empty() {
                p.add(
                    "source.url",
                    format!("logical mode needs a database; {what}"),
                );
            }
        }
    }
}

fn check_replicas(p: &mut Problems, raw: Vec<RawReplica>, settings: &Settings) -> Vec<Replica> {
    let mut out: Vec<Replica> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let field = format!("replicas[{i}]");
        let url = match super::StoreUrl::parse(&r.repository, &settings.base_dir) {
            Ok(super::StoreUrl::S3(u)) => u,
            Ok(other) => {
                p.add(
                    format!("{field}.repository"),
                    format!("{other}: replicas are s3:// buckets"),
                );
                continue;
            }
            Err(e) => {
                p.add(format!("{field}.repository"), e.message());
                continue;
            }
        };
        if url.region != r.region {
            p.add(
                format!("{field}.region"),
                format!(
                    "{} does not match the URL's region {}",
                    r.region, url.region
                ),
            );
        }
        let same =
            |a: &super::S3Url, b: &super::S3Url| a.bucket == b.bucket && a.prefix == b.prefix;
        if matches!(&settings.repository, super::StoreUrl::S3(primary) if same(primary, &url))
            || out.iter().any(|o| same(&o.repository, &url))
        {
            p.add(
                format!("{field}.repository"),
                "the same bucket and prefix as the repository or another replica",
            );
        }
        if let Some(super::settings::RegionSettings {
            repository: super::StoreUrl::S3(dr),
            ..
        }) = settings.regions.get(&r.region)
        {
            if !same(dr, &url) {
                p.add(
                    format!("{field}.repository"),
                    format!("drctl.yaml regions.{}.repository is {dr}: `drctl restore --region {}` reads there, so replicate there", r.region, r.region),
                );
            }
        }
        out.push(Replica {
            region: r.region,
            repository: url,
        });
    }
    out
}

fn check_storage(p: &mut Problems, storage: &Storage, settings: &Settings) {
    if *storage != Storage::default() && !matches!(settings.repository, super::StoreUrl::S3(_)) {
        p.add(
            "storage",
            format!(
                "storage options need an s3:// repository, not {}",
                settings.repository
            ),
        );
    }
    if let Some(class) = &storage.class {
        if !STORAGE_CLASSES.contains(&class.as_str()) {
            p.add(
                "storage.class",
                format!(
                    "{class:?} is not a storage class restores can read at once (use one of {})",
                    STORAGE_CLASSES.join(", ")
                ),
            );
        }
    }
    if storage
        .sse_kms_key_id
        .as_ref()
        .is_some_and(|k| k.trim().is_empty())
    {
        p.add("storage.sse-kms-key-id", "empty key id");
    }
    if let Some(lock) = &storage.object_lock {
        if !(1..=36_500).contains(&lock.days) {
            p.add(
                "storage.object-lock.days",
                format!("{} is out of range 1..=36500", lock.days),
            );
        }
    }
}

/// Parses a 6-field cron expression (with seconds), as the daemon's scheduler does.
pub fn parse_cron(expr: &str) -> std::result::Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(expr)
        .map_err(|e| {
            format!("invalid cron expression {expr:?} (sec min hour day month weekday): {e}")
        })
}

/// Validates every `*.yaml`/`*.yml` file in the policies directory.
pub fn check_dir(settings: &Settings) -> (Vec<Policy>, Vec<Problem>) {
    let dir = &settings.policies_dir;
    let mut problems = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect(),
        Err(e) => {
            problems.push(Problem {
                file: dir.clone(),
                field: String::new(),
                message: format!("cannot read policies directory: {e}"),
            });
            return (Vec::new(), problems);
        }
    };
    files.sort();
    let mut policies = Vec::new();
    for file in files {
        let (policy, found) = Policy::check(&file, settings);
        problems.extend(found);
        policies.extend(policy);
    }
    (policies, problems)
}
