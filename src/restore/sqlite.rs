//! Restores a SQLite backup to a database file: the copy is written next to the target under
//! a temporary name, checked with `PRAGMA integrity_check` and against the row counts recorded
//! at backup time, and only then renamed into place. A failed check leaves the target as it was.
//!
//! A database replaced with `--overwrite` must not be open in another process, and its old
//! WAL, rollback journal and shared-memory files are removed before the rename: SQLite applies
//! a WAL or hot journal it finds next to a database file to that file, whichever database the
//! journal came from.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{compare_rows, copy_cancellable, decode_object, RestorePlan, RestoreReport, Target};
use crate::cancel::{Cancel, Temporary};
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

/// The files SQLite keeps beside a database: its WAL, rollback journal and WAL index.
const SIDE_FILES: [&str; 3] = ["-wal", "-journal", "-shm"];

fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes way for a restored copy at `path`: refuses while another process holds a SQLite
/// lock on the database, then removes its side files, which would otherwise be applied to
/// the copy (they belong to the database being replaced, or to a writer that crashed).
fn release_target(path: &Path) -> Result<()> {
    if let Some(pid) = lock_holder(path)? {
        return Err(Error::invalid(format!(
            "restore target {} is in use: process {pid} holds a lock on it",
            path.display()
        ))
        .hint("stop the applications that use the database, then run the restore again"));
    }
    for suffix in SIDE_FILES {
        let side = side_file(path, suffix);
        match std::fs::remove_file(&side) {
            Ok(()) => {
                tracing::info!(file = %side.display(), "removed the replaced database's file")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", side.display()), e)),
        }
    }
    Ok(())
}

/// The process holding one of SQLite's locks on the database at `path`, if any. SQLite locks
/// the 512 bytes from its pending byte (1 GiB) with POSIX record locks: a connection in a
/// transaction, and every connection to a WAL-mode database, holds at least a shared lock.
fn lock_holder(path: &Path) -> Result<Option<libc::pid_t>> {
    const PENDING_BYTE: libc::off_t = 0x4000_0000;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    // SAFETY: flock is plain data; F_GETLK only fills it in for a descriptor we own.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = PENDING_BYTE;
    lock.l_len = 512;
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) } == -1 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(
            format!("test the locks on {}", path.display()),
            e,
        ));
    }
    Ok((lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid))
}

/// Gives the restored file the mode and (as root) the owner of the file it replaces, so the
/// application that uses it can go on; a new file gets 0644, as SQLite creates one.
fn set_like_target(file: &std::fs::File, target: &Path, overwrite: bool) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |e: std::io::Error| Error::io("set the restored database's mode and owner", e);
    let old = overwrite
        .then(|| std::fs::metadata(target).ok())
        .flatten()
        .filter(|m| m.is_file());
    let mode = old.as_ref().map_or(0o644, |m| m.mode() & 0o7777);
    // SAFETY: geteuid has no preconditions.
    if let Some(m) = old.as_ref().filter(|_| unsafe { libc::geteuid() } == 0) {
        std::os::unix::fs::fchown(file, Some(m.uid()), Some(m.gid())).map_err(io)?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)
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
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let cancel = cancel.clone();
    let (file, plain) = decode_object(repo, plan.object(), identities, progress, move |reader| {
        let mut file = tempfile::Builder::new()
            .prefix(".drctl-restore-")
            .suffix(".sqlite")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(format!("create a temporary file in {}", dir.display()), e))?;
        // Removed also if a second interrupt ends drctl at once.
        let guard = Temporary::new(file.path().to_path_buf());
        copy_cancellable(reader, &mut file, &cancel)?;
        file.as_file()
            .sync_all()
            .map_err(|e| Error::io("fsync the restored database", e))?;
        Ok((file, guard))
    })
    .await?;
    let (file, _guard) = file;

    // Read-write, though only read: closing it then removes the -wal and -shm files
    // SQLite makes beside a database in WAL mode.
    let mut conn = open(file.path(), false).await?;
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
    sqlx::Connection::close(conn)
        .await
        .map_err(|e| Error::failure(format!("close the restored database: {e}")))?;
    let rows = compare_rows(
        &plan.backup_id,
        &plan.stats,
        &actual,
        &path.display().to_string(),
        str::to_owned,
        false,
    )?;
    set_like_target(file.as_file(), path, *overwrite)?;
    let persisted = if *overwrite {
        release_target(path)?;
        file.persist(path)
    } else {
        // A file that appeared at the target since the check is not replaced.
        file.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        Error::io(
            format!("rename the restored database to {}", path.display()),
            e.error,
        )
    })?;
    crate::store::local::sync_parent(path)?;
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
