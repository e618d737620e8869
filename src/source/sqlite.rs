//! SQLite: a consistent copy of a database that may be in use. `VACUUM INTO` writes the copy
//! to a temporary file inside one read transaction, so writers in WAL mode carry on and the
//! copy never holds a torn page; the copy's row counts are recorded, then it is streamed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

use super::{Source, Stats};
use crate::cancel::Cancel;
use crate::{Error, Result};

/// How long the copy waits for a writer holding the database locked (rollback journal mode).
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct SqliteSource {
    path: PathBuf,
}

impl SqliteSource {
    pub fn new(path: PathBuf) -> Self {
        SqliteSource { path }
    }
}

/// Opens a database file, never creating it.
pub async fn open(path: &Path, read_only: bool) -> Result<SqliteConnection> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(read_only)
        .create_if_missing(false)
        .busy_timeout(BUSY_TIMEOUT);
    SqliteConnection::connect_with(&opts)
        .await
        .map_err(|e| Error::failure(format!("open SQLite database {}: {e}", path.display())))
}

/// Exact row counts of the database's tables (not SQLite's own, nor virtual tables, whose
/// rows are a module's, which this build may lack; their shadow tables are counted).
pub async fn row_counts(conn: &mut SqliteConnection) -> Result<BTreeMap<String, u64>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND rootpage > 0 \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| Error::failure(format!("list SQLite tables: {e}")))?;
    let mut counts = BTreeMap::new();
    for t in tables {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\"",
            t.replace('"', "\"\"")
        ))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| Error::failure(format!("count rows of SQLite table {t}: {e}")))?;
        counts.insert(t, n as u64);
    }
    Ok(counts)
}

impl SqliteSource {
    /// Writes a consistent copy to `copy` and returns its row counts. The copy is in the
    /// journal mode of the database (VACUUM INTO writes one in rollback mode): a database in
    /// WAL mode is restored in WAL mode.
    async fn snapshot(&self, copy: &Path) -> Result<BTreeMap<String, u64>> {
        let what = self.path.display();
        let mut conn = open(&self.path, true).await?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| Error::failure(format!("read the journal mode of {what}: {e}")))?;
        sqlx::query("VACUUM INTO ?")
            .bind(copy.to_string_lossy().into_owned())
            .execute(&mut conn)
            .await
            .map_err(|e| Error::failure(format!("copy SQLite database {what}: {e}")))?;
        conn.close()
            .await
            .map_err(|e| Error::failure(format!("close SQLite database {what}: {e}")))?;
        let wal = mode.eq_ignore_ascii_case("wal");
        let mut conn = open(copy, !wal).await?;
        if wal {
            // Written into the file's header; the copy's own -wal and -shm go with the
            // connection.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&mut conn)
                .await
                .map_err(|e| Error::failure(format!("set WAL mode on the copy of {what}: {e}")))?;
        }
        let counts = row_counts(&mut conn).await;
        let _ = conn.close().await;
        counts
    }
}

impl Source for SqliteSource {
    fn kind(&self) -> &'static str {
        "sqlite"
    }
    fn artifact(&self) -> String {
        "sqlite".into()
    }
    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({ "path": self.path.to_string_lossy() })
    }
    fn run(
        &mut self,
        out: &mut dyn Write,
        _index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats> {
        if !self.path.is_file() {
            return Err(Error::not_found(format!(
                "SQLite database {} does not exist",
                self.path.display()
            )));
        }
        let dir = crate::cancel::Temporary::dir()?;
        let copy = dir.path().join("copy.sqlite");
        // Sources run on a blocking thread of the runtime.
        let counts = tokio::runtime::Handle::current().block_on(self.snapshot(&copy))?;
        let bytes = super::copy_file(&copy, out, cancel)?;
        let mut stats = Stats::new();
        stats.insert("bytes".into(), bytes.into());
        stats.insert("tables".into(), serde_json::to_value(counts)?);
        Ok(stats)
    }
}
