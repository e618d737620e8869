//! Object stores: where backup objects live. The [`ObjectStore`] trait is small and async;
//! `local` is the embedded default (a directory). Writers are all-or-nothing: an object becomes
//! visible only when [`ObjectWriter::finish`] succeeds, and a writer dropped or aborted leaves
//! no object behind (at most a temporary that `drctl gc` finds).

pub mod local;
pub mod s3;

use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::policy::{LockMode, Storage};
use crate::config::StoreUrl;
use crate::format::ObjectKey;
use crate::{Error, Result};

/// Size of the chunks handed between pipeline stages and to stores.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The largest single `write` drctl makes to a file. On Linux 6.x a write of 1 MiB or more
/// into the page cache costs several times the system time of smaller ones (measured on
/// 6.18: 1.1–1.5 s per GiB against 0.2–0.25 s for 256–768 KiB writes), so files are
/// written in pieces of at most this size.
pub const FILE_WRITE: usize = 512 << 10;

/// Metadata of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: ObjectKey,
    pub size: u64,
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Something a listing found that is not a finished object (e.g. an interrupted write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// A store-specific description (a temp file path, an upload ID).
    pub what: String,
    /// Bytes it holds, where the store knows without extra requests (else 0).
    pub size: u64,
}

/// How one object is stored. Only S3 stores accept anything but the default; policy
/// validation refuses these options for other repositories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    pub storage_class: Option<String>,
    pub sse_kms_key_id: Option<String>,
    pub retention: Option<Retention>,
}

/// Object Lock retention of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub mode: LockMode,
    pub retain_until: chrono::DateTime<chrono::Utc>,
}

impl PutOptions {
    /// The options for the objects of a backup that started at `started_at`.
    pub fn for_backup(storage: &Storage, started_at: chrono::DateTime<chrono::Utc>) -> Self {
        PutOptions {
            storage_class: storage.class.clone(),
            sse_kms_key_id: storage.sse_kms_key_id.clone(),
            retention: storage.object_lock.as_ref().map(|l| Retention {
                mode: l.mode,
                retain_until: started_at + chrono::Duration::days(i64::from(l.days)),
            }),
        }
    }
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Where the store is, with any credentials removed; safe to print.
    fn describe(&self) -> String;
    /// The region the objects are in, as registry locations record it.
    fn region(&self) -> String {
        "local".into()
    }
    /// Creates the repository if missing (idempotent).
    async fn create(&self) -> Result<()>;
    /// Fails with `NotFound` unless the repository exists.
    async fn check(&self) -> Result<()>;
    /// Starts writing an object.
    async fn put(&self, key: &ObjectKey, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>>;
    /// Streams an object in chunks of at most [`CHUNK_SIZE`].
    async fn get(&self, key: &ObjectKey) -> Result<ByteStream>;
    async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>>;
    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, key: &ObjectKey) -> Result<()>;
    /// Interrupted writes left behind by crashed runs older than `older_than`.
    async fn leftovers(&self, older_than: chrono::DateTime<chrono::Utc>) -> Result<Vec<Leftover>>;
    /// Removes one leftover reported by [`ObjectStore::leftovers`].
    async fn remove_leftover(&self, leftover: &Leftover) -> Result<()>;

    /// Writes a small object in one go.
    async fn put_bytes(
        &self,
        key: &ObjectKey,
        data: Bytes,
        opts: &PutOptions,
    ) -> Result<ObjectMeta> {
        let mut w = self.put(key, opts).await?;
        if let Err(e) = w.write(data).await {
            let _ = w.abort().await;
            return Err(e);
        }
        w.finish().await
    }

    /// Reads a small object whole, refusing more than `limit` bytes.
    async fn get_bytes(&self, key: &ObjectKey, limit: usize) -> Result<Vec<u8>> {
        let mut stream = self.get(key).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > limit {
                return Err(Error::integrity(format!(
                    "object {key} is larger than {limit} bytes"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// An object being written.
#[async_trait]
pub trait ObjectWriter: Send {
    async fn write(&mut self, chunk: Bytes) -> Result<()>;
    /// Makes the object durable and visible.
    async fn finish(self: Box<Self>) -> Result<ObjectMeta>;
    /// Discards everything written.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// A stream of an object's bytes, produced by a store task and consumed either async
/// ([`ByteStream::next`]) or from a blocking thread through [`std::io::Read`].
pub struct ByteStream {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes>>,
    current: Bytes,
    key: ObjectKey,
}

impl ByteStream {
    /// A stream fed by `tx`; the producer sends `Err` to fail the reader.
    pub fn channel(key: ObjectKey) -> (tokio::sync::mpsc::Sender<Result<Bytes>>, ByteStream) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (
            tx,
            ByteStream {
                rx,
                current: Bytes::new(),
                key,
            },
        )
    }

    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        if !self.current.is_empty() {
            return Some(Ok(std::mem::take(&mut self.current)));
        }
        self.rx.recv().await
    }
}

impl Read for ByteStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e.into_io()),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// Opens the store a URL names (without contacting it).
pub async fn open(url: &StoreUrl) -> Result<Arc<dyn ObjectStore>> {
    Ok(match url {
        StoreUrl::Local(path) => Arc::new(local::LocalStore::new(path.clone())),
        StoreUrl::S3(url) => Arc::new(s3::S3Store::open(url).await?),
    })
}
