//! Restores a SQLite backup to a database file: the copy is written next to the target under
//! a temporary name, checked with `PRAGMA integrity_check` and against the row counts recorded
//! at backup time, and only then renamed into place. A failed check leaves the target as it was.

use std::path::Path;
use std::sync::Arc;

use super::{compare_rows, copy_cancellable, decode_object, RestorePlan, RestoreReport, Target};
use crate::cancel::Cancel;
use crate::crypto::Identities;
use crate::repo::Repo;
use crate::source::sqlite::{open, row_counts};
use crate::{Error, Result};

/// For a SQLite backup `--target` names the database file: it must not exist unless
/// `overwrite`, and must not be a directory.
pub fn check_target(path: &Path, overwrite: bool) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::invalid(format!(
            "restore target {} is a directory; for a SQLite backup --target names the database file to write",
            path.display()
        ))),
        Ok(_) if !overwrite => Err(Error::invalid(format!(
            "restore target {} exists",
            path.display()
        ))
        .hint("choose a new file name, or pass --overwrite to replace it")),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("restore target {}", path.display()), e)),
    }
}

pub async fn execute(
    repo: &Repo,
    plan: &RestorePlan,
    identities: Arc<Identities>,
    progress: Option<Arc<std::sync::atomic::AtomicU64>>,
    cancel: &Cancel,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let Target::Dir {
        path, overwrite, ..
    } = &plan.target
    else {
        return Err(Error::invalid("a SQLite restore needs --target FILE"));
    };
    check_target(path, *overwrite)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let cancel = cancel.clone();
    let (file, plain) = decode_object(repo, plan.object(), identities, progress, move |reader| {
        let mut file = tempfile::Builder::new()
            .prefix(".drctl-restore-")
            .suffix(".sqlite")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(format!("create a temporary file in {}", dir.display()), e))?;
        copy_cancellable(reader, &mut file, &cancel)?;
        file.as_file()
            .sync_all()
            .map_err(|e| Error::io("fsync the restored database", e))?;
        Ok(file)
    })
    .await?;

    let mut conn = open(file.path(), true).await?;
    let problems: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check(20)")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| Error::integrity(format!("integrity_check of the restored database: {e}")))?;
    if problems != ["ok"] {
        return Err(Error::integrity(format!(
            "backup {}: the restored database fails PRAGMA integrity_check: {}",
            plan.backup_id,
            problems.join("; ")
        )));
    }
    let actual = row_counts(&mut conn).await?;
    let _ = sqlx::Connection::close(conn).await;
    let rows = compare_rows(
        &plan.backup_id,
        &plan.stats,
        &actual,
        &path.display().to_string(),
    )?;
    file.persist(path).map_err(|e| {
        Error::io(
            format!("rename the restored database to {}", path.display()),
            e.error,
        )
    })?;
    Ok(RestoreReport {
        backup_id: plan.backup_id.clone(),
        plain,
        extracted: None,
        written_to: Some(path.clone()),
        chain: Vec::new(),
        rows: Some(rows),
        postgres: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}
