//! Sources produce the bytes of a backup. A source runs on a blocking thread, writes its
//! artifact to the pipeline and, for file trees, an index line per entry; it never touches
//! stores, the registry or keys.

pub mod command;
pub mod files;
pub mod postgres;

use std::io::Write;

use crate::cancel::Cancel;
use crate::config::{Policy, SourceConfig};
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
    /// Whether [`Source::run`] writes an index.
    fn has_index(&self) -> bool;
    /// Writes the artifact to `out` (and the index to `index` where the source has one).
    fn run(
        &mut self,
        out: &mut dyn Write,
        index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats>;
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
        } => Box::new(postgres::PostgresSource::new(
            *mode,
            postgres::Conn::new(url, password_file.as_deref(), password_env.as_deref())?,
        )),
    })
}
