//! Sources produce the bytes of a backup. A source runs on a blocking thread, writes its
//! artifact to the pipeline and, for file trees, an index line per entry; it never touches
//! stores, the registry or keys.

pub mod command;
pub mod files;
pub mod mysql;
pub mod pgpage;
pub mod pgwal;
pub mod postgres;
pub mod sqlite;

use std::io::Write;

use crate::cancel::Cancel;
use crate::config::{Policy, SourceConfig};
use crate::format::manifest::PointInTime;
use crate::format::Manifest;
use crate::Result;

/// Counters reported by a source, recorded in the manifest.
pub type Stats = serde_json::Map<String, serde_json::Value>;

pub trait Source: Send {
    /// `files`, `command`, ...
    fn kind(&self) -> &'static str;
    /// Label of the data object: `data.<artifact>.zst.age`.
    fn artifact(&self) -> String;
    /// What is backed up, without secrets; recorded in the manifest.
    fn descriptor(&self) -> serde_json::Value;
    /// Whether [`Source::run`] writes an index (only file trees do).
    fn has_index(&self) -> bool {
        false
    }
    /// Writes the artifact to `out` (and the index to `index` where the source has one).
    fn run(
        &mut self,
        out: &mut dyn Write,
        index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats>;
    /// The moment the backup represents (log positions), once [`Source::run`] succeeded;
    /// `None` means the backup's start time.
    fn point_in_time(&self) -> Option<PointInTime> {
        None
    }
}

/// Builds the source a policy names.
pub fn open(policy: &Policy) -> Result<Box<dyn Source>> {
    Ok(match &policy.source {
        SourceConfig::Files {
            paths,
            exclude,
            one_file_system,
        } => Box::new(files::FilesSource::new(
            paths.clone(),
            exclude,
            *one_file_system,
        )?),
        SourceConfig::Command {
            command,
            artifact,
            env,
        } => Box::new(command::CommandSource::new(
            command.clone(),
            artifact.clone(),
            env.clone(),
        )),
        SourceConfig::Postgres {
            mode,
            url,
            password_file,
            password_env,
            data_directory,
            verify_checksums,
            ..
        } => Box::new(postgres::PostgresSource::new(
            *mode,
            postgres::Conn::new(url, password_file.as_deref(), password_env.as_deref())?,
            data_directory.clone(),
            *verify_checksums,
        )),
        SourceConfig::Mysql {
            url,
            password_file,
            password_env,
        } => Box::new(mysql::MysqlSource::full(mysql::Conn::new(
            url,
            password_file.as_deref(),
            password_env.as_deref(),
        )?)),
        SourceConfig::Sqlite { path } => Box::new(sqlite::SqliteSource::new(path.clone())),
    })
}

/// Builds the source of an incremental backup whose parent is `parent`, the newest completed
/// backup of the policy (none: refused).
pub fn open_incremental(policy: &Policy, parent: Option<&Manifest>) -> Result<Box<dyn Source>> {
    match (&policy.source, parent) {
        (SourceConfig::Mysql { .. }, None) => Err(crate::Error::invalid(format!(
            "policy {} has no completed backup to build an incremental on",
            policy.name
        ))
        .hint("take a full backup first: drctl backup --policy NAME")),
        (
            SourceConfig::Mysql {
                url,
                password_file,
                password_env,
            },
            Some(parent),
        ) => Ok(Box::new(mysql::MysqlSource::incremental(
            mysql::Conn::new(url, password_file.as_deref(), password_env.as_deref())?,
            parent,
        )?)),
        (other, _) => Err(crate::Error::invalid(format!(
            "policy {} backs up a {} source, which has no incremental backups",
            policy.name,
            other.kind()
        ))
        .hint("run a full backup: drctl backup --policy NAME")),
    }
}

/// Whether a database URL carries a password: after the user name, or as a `password` (or
/// `sslpassword`) parameter, which libpq reads too. Such a URL would put the password on
/// command lines, in logs and in manifests.
pub fn carries_password(url: &url::Url) -> bool {
    url.password().is_some()
        || url
            .query_pairs()
            .any(|(k, _)| k == "password" || k == "sslpassword")
}

/// A URL's user name or path as client tools read it: `%XX` escapes only (a `+` is a plus
/// sign).
pub fn url_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The password of a database source: the first line of `password_file`, or the value of the
/// variable `password_env`; `None` when neither is given (the client tools then read their own
/// environment and option files).
pub fn read_password(
    password_file: Option<&std::path::Path>,
    password_env: Option<&str>,
) -> Result<Option<String>> {
    Ok(match (password_file, password_env) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                crate::Error::io(format!("read the password file {}", file.display()), e)
            })?;
            Some(text.trim_end_matches(['\n', '\r']).to_owned())
        }
        (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
            crate::Error::invalid(format!(
                "environment variable {var} (password-env) is not set"
            ))
        })?),
        (None, None) => None,
    })
}

/// Streams the file at `path` to `out` in chunks, checking `cancel` between them; returns the
/// number of bytes written.
pub fn copy_file(path: &std::path::Path, out: &mut dyn Write, cancel: &Cancel) -> Result<u64> {
    let what = || format!("read {}", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| crate::Error::io(what(), e))?;
    let mut buf = vec![0u8; crate::store::CHUNK_SIZE];
    let mut bytes = 0u64;
    loop {
        cancel.check()?;
        let n = crate::pipeline::read_full(&mut f, &mut buf)
            .map_err(|e| crate::Error::io(what(), e))?;
        if n == 0 {
            return Ok(bytes);
        }
        out.write_all(&buf[..n])
            .map_err(|e| crate::Error::io("write", e))?;
        bytes += n as u64;
    }
}
