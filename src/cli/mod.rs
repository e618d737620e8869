//! The command line: clap definitions, one file per subcommand, shared output helpers.
//! Read commands accept `--json`; every failure maps to a documented exit code.

mod backup;
mod gc;
mod init;
mod keys;
mod list;
mod policy;
mod progress;
mod registry;
mod restore;
mod show;
mod verify;
mod wal;

pub use wal::ABORT_RECOVERY;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::cancel::Cancel;
use crate::config::Settings;
use crate::crypto::Identities;
use crate::repo::Repo;
use crate::{Error, Result};

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    failure (I/O, a failed source command, an internal error)
  2    invalid input: bad arguments, config or policy, malformed backup ID, refused restore target
  3    partial: some of the requested backups failed verification
  4    integrity: stored data missing, truncated, tampered with or refused as unsafe
  10   not found: config, repository, registry or backup missing (run `drctl init`)
  11   locked: another run holds the backup set's lease
  12   wrong key: no available identity can decrypt the backup
  130  cancelled (SIGINT/SIGTERM)";

/// drctl: encrypted, verified backups and tested restores.
///
/// Backups stream through zstd and age into a repository (a local directory or an S3 bucket)
/// and are recorded in a registry (SQLite or DynamoDB). Every artifact is a standard age file
/// over zstd over tar (or a raw stream): with the identity, `age -d | zstd -d | tar -x`
/// restores it without drctl; with a `kms` section, KMS can unwrap it too.
///
/// Start with `drctl init`, then `drctl backup --policy NAME`.
#[derive(Debug, Parser)]
#[command(name = "drctl", version, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct Global {
    /// Settings file.
    #[arg(
        long,
        global = true,
        env = "DRCTL_CONFIG",
        default_value = "drctl.yaml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// age identity file for commands that decrypt (overrides identity-file in the settings).
    #[arg(long, global = true, env = "DRCTL_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Print machine-readable JSON (one object per line, each with a `message_type`).
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (-v: info, -vv: debug). DRCTL_LOG takes a tracing filter.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Init(init::Args),
    Backup(backup::Args),
    List(list::Args),
    Show(show::Args),
    Verify(verify::Args),
    Restore(restore::Args),
    Gc(gc::Args),
    #[command(subcommand)]
    Keys(keys::Command),
    #[command(subcommand)]
    Policy(policy::Command),
    #[command(subcommand)]
    Registry(registry::Command),
    #[command(subcommand)]
    Wal(wal::Command),
}

/// What a subcommand gets: global options and the run's cancellation.
pub struct Ctx {
    pub global: Global,
    pub cancel: Cancel,
}

impl Ctx {
    pub fn settings(&self) -> Result<Settings> {
        Settings::load(&self.global.config)
    }

    pub async fn repo(&self) -> Result<Repo> {
        Repo::open(self.settings()?).await
    }

    /// The repository of `region` (drctl.yaml `regions:`), or the primary one.
    pub async fn repo_in(&self, region: Option<&str>) -> Result<Repo> {
        match region {
            Some(region) => Repo::open_region(self.settings()?, region).await,
            None => self.repo().await,
        }
    }

    /// The identities for decryption: --identity, else identity-file (skipped when missing
    /// and KMS is configured), then KMS.
    pub fn identities(&self, settings: &Settings) -> Result<Arc<Identities>> {
        let (file, required) = match &self.global.identity {
            Some(f) => (Some(f.as_path()), true),
            None => (settings.identity_file.as_deref(), false),
        };
        Ok(Arc::new(Identities::open(
            file,
            required,
            settings.kms.as_ref(),
        )?))
    }

    /// Destructive commands in a production environment need --confirm.
    pub fn require_confirm(&self, settings: &Settings, confirm: bool, what: &str) -> Result<()> {
        if settings.production && !confirm {
            return Err(Error::invalid(format!(
                "environment {} is marked production: {what} needs --confirm",
                settings.environment
            ))
            .hint("check the plan with --dry-run first, then re-run with --confirm"));
        }
        Ok(())
    }

    /// Prints `value` as a JSON line (with `message_type`) or as the text `text` renders.
    pub fn emit<T: Serialize>(&self, message_type: &str, value: &T, text: impl FnOnce() -> String) {
        if self.global.json {
            print_line(&json_line(message_type, value));
        } else {
            let t = text();
            if !t.is_empty() {
                print_line(&t);
            }
        }
    }

    pub fn progress(&self, label: &str, total: Option<u64>) -> progress::Progress {
        progress::Progress::start(!self.global.json && !self.global.quiet, label, total)
    }
}

/// Prints a line of command output. When standard output is closed early (`drctl list | head`),
/// the reader has what it wanted: exit quietly instead of failing.
pub fn print_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("drctl: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

pub fn json_line<T: Serialize>(message_type: &str, value: &T) -> String {
    let mut v = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
    match &mut v {
        serde_json::Value::Object(map) => {
            map.insert("message_type".into(), message_type.into());
        }
        other => {
            *other = serde_json::json!({ "message_type": message_type, "items": other.clone() });
        }
    }
    v.to_string()
}

/// Runs the parsed command.
pub async fn run(cli: Cli, cancel: Cancel) -> Result<()> {
    let ctx = Ctx {
        global: cli.global,
        cancel,
    };
    match cli.command {
        Command::Init(a) => init::run(&ctx, a).await,
        Command::Backup(a) => backup::run(&ctx, a).await,
        Command::List(a) => list::run(&ctx, a).await,
        Command::Show(a) => show::run(&ctx, a).await,
        Command::Verify(a) => verify::run(&ctx, a).await,
        Command::Restore(a) => restore::run(&ctx, a).await,
        Command::Gc(a) => gc::run(&ctx, a).await,
        Command::Keys(c) => keys::run(&ctx, c).await,
        Command::Policy(c) => policy::run(&ctx, c).await,
        Command::Registry(c) => registry::run(&ctx, c).await,
        Command::Wal(c) => wal::run(&ctx, c).await,
    }
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn short_time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}
