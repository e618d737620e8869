//! Table data from a streamed pg_dump archive, loaded with `COPY ... FROM stdin` over
//! several connections at once.
//!
//! The archive arrives as one stream, table after table. So that every connection has work
//! whatever the tables' sizes, each table's rows are cut into pieces of whole rows and the
//! pieces are spread over the connections; a connection opens its own `COPY` of a table
//! when its first piece arrives, and ends it after [`SPLIT`] bytes for another. Each
//! connection commits each `COPY` on its own, and the server reports the rows it stored; a
//! table's rows are the sum. If the restore stops
//! early, each open `COPY` is failed, so the server keeps none of its rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::postgres::PgConnection;
use sqlx::Connection;
use tokio::sync::mpsc::{self, error::TrySendError, Receiver, Sender};
use tokio::task::JoinHandle;

use crate::cancel::Cancel;
use crate::restore::pgdump::{self, Archive, BLOCK_DATA};
use crate::source::postgres::Conn;
use crate::{Error, Result};

/// Rows are sent to a connection in pieces of about this size.
const PIECE: usize = 128 << 10;
/// Bytes held back from each piece until the block ends: more than pg_dump's end-of-data
/// marker and the empty lines after it.
const TAIL: usize = 16;
/// Pieces waiting for each connection.
const QUEUE: usize = 8;
/// A connection ends its `COPY` after about this many bytes of rows and opens another for
/// the rest: the server answers a `COPY` only as it ends, so a row it refuses is reported
/// within this much of the table, not after all of it.
const SPLIT: usize = 64 << 20;

enum Msg {
    /// Start a `COPY` of this table (its statement).
    Copy(i64, Arc<str>),
    /// Whole rows for the open `COPY`.
    Rows(Vec<u8>),
    /// End the open `COPY`.
    End,
}

struct Worker {
    tx: Sender<Msg>,
    handle: JoinHandle<Result<Vec<(i64, u64)>>>,
    /// Whether this worker has a `COPY` of the current table open.
    open: bool,
}

/// Connections ready to load table data.
pub struct Loader {
    runtime: tokio::runtime::Handle,
    connections: Vec<PgConnection>,
}

impl Loader {
    /// Opens `jobs` connections to the database `conn` names and runs the `setup`
    /// statements on each. Runs on a blocking thread of the Tokio runtime, whose tasks then
    /// hold the connections.
    pub fn connect(conn: &Conn, jobs: usize, setup: &[String]) -> Result<Loader> {
        let runtime = tokio::runtime::Handle::current();
        let options = conn.connect_options()?;
        let connections = (0..jobs.max(1))
            .map(|_| {
                runtime.block_on(async {
                    let mut c = PgConnection::connect_with(&options)
                        .await
                        .map_err(|e| failure("connect", e))?;
                    for statement in setup {
                        sqlx::Executor::execute(&mut c, statement.as_str())
                            .await
                            .map_err(|e| failure("set up the session", e))?;
                    }
                    Ok(c)
                })
            })
            .collect::<Result<_>>()?;
        Ok(Loader {
            runtime,
            connections,
        })
    }

    /// Loads the data blocks of `archive` (whose TOC has been read and whose schema has
    /// been restored). Returns the rows stored per table data entry (by dump ID).
    pub fn load(self, archive: &mut Archive<'_>, cancel: &Cancel) -> Result<BTreeMap<i64, u64>> {
        let Loader {
            runtime,
            connections,
        } = self;
        let statements: BTreeMap<i64, Arc<str>> = archive
            .toc()
            .map_err(|why| Error::failure(format!("the dump cannot be streamed: {why}")))?
            .iter()
            .filter_map(|e| Some((e.dump_id, Arc::from(e.copy.as_deref()?))))
            .collect();
        let workers: Vec<Worker> = connections
            .into_iter()
            .map(|c| {
                let (tx, rx) = mpsc::channel(QUEUE);
                Worker {
                    tx,
                    handle: runtime.spawn(run(c, rx)),
                    open: false,
                }
            })
            .collect();
        send_all(archive, &statements, workers, cancel, &runtime)
    }
}

/// Sends the table data to the workers, then collects what each stored.
fn send_all(
    archive: &mut Archive<'_>,
    statements: &BTreeMap<i64, Arc<str>>,
    mut workers: Vec<Worker>,
    cancel: &Cancel,
    runtime: &tokio::runtime::Handle,
) -> Result<BTreeMap<i64, u64>> {
    let mut counts = BTreeMap::new();
    let mut next = 0;
    let sent = (|| -> Result<Sent> {
        let mut piece: Vec<u8> = Vec::with_capacity(2 * PIECE);
        while let Some((kind, dump_id)) = archive.next_block()? {
            cancel.check()?;
            let at = archive.position();
            let Some(copy) = statements.get(&dump_id).filter(|_| kind == BLOCK_DATA) else {
                return Err(pgdump::damaged(
                    at,
                    format!("data block of entry {dump_id}, which has no COPY statement"),
                ));
            };
            counts.insert(dump_id, 0);
            while archive.next_chunks(&mut piece, PIECE)? {
                cancel.check()?;
                // Whole rows go; the rest starts the next piece. The last bytes wait for
                // the end of the block, which may be pg_dump's end-of-data marker.
                let keep = piece.len() - TAIL;
                let Some(end) = piece[..keep].iter().rposition(|&b| b == b'\n') else {
                    continue;
                };
                let mut rest = Vec::with_capacity(2 * PIECE);
                rest.extend_from_slice(&piece[end + 1..]);
                piece.truncate(end + 1);
                let rows = std::mem::replace(&mut piece, rest);
                if !send(&mut workers, &mut next, dump_id, copy, rows) {
                    return Ok(Sent::Gone);
                }
            }
            strip_marker(&mut piece);
            if !piece.is_empty() {
                if piece.last() != Some(&b'\n') {
                    return Err(pgdump::damaged(
                        archive.position(),
                        format!("the data of entry {dump_id} ends inside a row"),
                    ));
                }
                let rows = std::mem::replace(&mut piece, Vec::with_capacity(2 * PIECE));
                if !send(&mut workers, &mut next, dump_id, copy, rows) {
                    return Ok(Sent::Gone);
                }
            }
            for w in workers.iter_mut().filter(|w| w.open) {
                w.open = false;
                if w.tx.blocking_send(Msg::End).is_err() {
                    return Ok(Sent::Gone);
                }
            }
        }
        Ok(Sent::All)
    })();
    // A closed queue ends its connection; one closed inside a COPY fails that COPY.
    let mut failed = None;
    for w in workers {
        drop(w.tx);
        match runtime.block_on(w.handle) {
            Ok(Ok(done)) => {
                for (dump_id, rows) in done {
                    *counts.entry(dump_id).or_insert(0) += rows;
                }
            }
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(Error::failure(format!("a COPY task failed: {e}")))),
        }
    }
    match sent? {
        // A connection's own error says why it stopped taking rows.
        Sent::Gone => {
            Err(failed.unwrap_or_else(|| Error::failure("a COPY connection ended early")))
        }
        Sent::All => failed.map_or(Ok(counts), Err),
    }
}

/// Removes the end-of-data marker line (`\.`) and the empty lines after it that pg_dump
/// writes after a table's rows: `COPY` over the protocol ends without one.
fn strip_marker(rows: &mut Vec<u8>) {
    let mut end = rows.len();
    while end > 0 && rows[end - 1] == b'\n' {
        end -= 1;
    }
    if rows[..end].ends_with(b"\\.") && (end == 2 || rows[end - 3] == b'\n') {
        rows.truncate(end - 2);
    }
}

/// How sending the data ended.
enum Sent {
    All,
    /// A connection stopped taking rows.
    Gone,
}

/// Sends whole rows of table `dump_id` to the first worker with room, opening its `COPY`
/// first if needed; waits for the next worker in turn if none has room. False if a worker
/// has gone.
fn send(
    workers: &mut [Worker],
    next: &mut usize,
    dump_id: i64,
    copy: &Arc<str>,
    rows: Vec<u8>,
) -> bool {
    let n = workers.len();
    let mut rows = rows;
    for i in 0..n {
        let w = &mut workers[(*next + i) % n];
        if !w.open {
            match w.tx.try_send(Msg::Copy(dump_id, copy.clone())) {
                Ok(()) => w.open = true,
                Err(TrySendError::Full(_)) => continue,
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match w.tx.try_send(Msg::Rows(rows)) {
            Ok(()) => {
                *next = (*next + i + 1) % n;
                return true;
            }
            Err(TrySendError::Full(Msg::Rows(back))) => rows = back,
            Err(_) => return false,
        }
    }
    let w = &mut workers[*next];
    *next = (*next + 1) % n;
    if !w.open {
        if w.tx
            .blocking_send(Msg::Copy(dump_id, copy.clone()))
            .is_err()
        {
            return false;
        }
        w.open = true;
    }
    w.tx.blocking_send(Msg::Rows(rows)).is_ok()
}

/// One connection: runs the `COPY`s its queue asks for, and returns each one's stored rows.
async fn run(mut conn: PgConnection, mut rx: Receiver<Msg>) -> Result<Vec<(i64, u64)>> {
    let mut done = Vec::new();
    while let Some(msg) = rx.recv().await {
        let Msg::Copy(dump_id, statement) = msg else {
            return Err(Error::failure("COPY data without a COPY statement"));
        };
        let what = statement.trim_end().trim_end_matches(';').to_owned();
        let mut copy = conn
            .copy_in_raw(&what)
            .await
            .map_err(|e| failure(&what, e))?;
        let mut sent = 0;
        loop {
            match rx.recv().await {
                Some(Msg::Rows(rows)) => {
                    if sent >= SPLIT {
                        done.push((dump_id, copy.finish().await.map_err(|e| failure(&what, e))?));
                        copy = conn
                            .copy_in_raw(&what)
                            .await
                            .map_err(|e| failure(&what, e))?;
                        sent = 0;
                    }
                    sent += rows.len();
                    copy.send(rows).await.map_err(|e| failure(&what, e))?;
                }
                Some(Msg::End) => {
                    done.push((dump_id, copy.finish().await.map_err(|e| failure(&what, e))?));
                    break;
                }
                // The restore stopped: the server keeps none of this COPY's rows.
                None => {
                    let _ = copy.abort("drctl restore stopped").await;
                    return Ok(done);
                }
                Some(Msg::Copy(..)) => return Err(Error::failure("COPY started twice")),
            }
        }
    }
    conn.close()
        .await
        .map_err(|e| failure("close the COPY connection", e))?;
    Ok(done)
}

/// The error of `what`, with the server's detail, hint and context (which name the row):
/// the line a context gives counts the rows of that `COPY` (see [`SPLIT`]), not the
/// dump's.
fn failure(what: &str, e: sqlx::Error) -> Error {
    let mut message = format!("{what}: {e}");
    if let Some(db) = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
    {
        for (label, text) in [
            ("DETAIL", db.detail()),
            ("HINT", db.hint()),
            ("CONTEXT", db.r#where()),
        ] {
            if let Some(text) = text {
                message.push_str(&format!("; {label}: {text}"));
            }
        }
    }
    Error::failure(message)
}

#[cfg(test)]
mod tests {
    use super::strip_marker;

    #[test]
    fn the_end_of_data_marker_is_removed_and_rows_are_not() {
        let cases: [(&[u8], &[u8]); 7] = [
            (b"1\ta\n2\tb\n\\.\n\n\n", b"1\ta\n2\tb\n"),
            (b"1\ta\n\\.\n", b"1\ta\n"),
            (b"\\.\n\n", b""),
            (b"1\ta\n", b"1\ta\n"),
            // An escaped backslash and dot is a row.
            (b"\\\\.\n", b"\\\\.\n"),
            (b"x\\.\n", b"x\\.\n"),
            (b"", b""),
        ];
        for (rows, want) in cases {
            let mut got = rows.to_vec();
            strip_marker(&mut got);
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(rows));
        }
    }
}
