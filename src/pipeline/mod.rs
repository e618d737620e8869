//! The data path: plain bytes → zstd → age → stored bytes, and back, with SHA-256 of both
//! sides. CPU-heavy stages run on dedicated threads connected by bounded channels of 1 MiB
//! chunks, so a slow store slows the source (backpressure) and memory stays bounded.
//!
//! This module never decides where bytes come from or go to; `backup`, `restore` and `verify`
//! connect it to sources, stores and sinks.

pub mod decode;
pub mod encode;

use std::io::{self, Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::ObjectWriter;
use crate::{Error, Result};

pub use decode::Decoder;
pub use encode::{EncodeOptions, Encoder};

/// Chunks in flight between two stages.
pub(crate) const CHANNEL_DEPTH: usize = 2;

/// Size of the chunks a backup's data stream is handed on in. Small chunks, several in
/// flight, keep every stage busy on few cores with little memory.
pub const ENCODE_CHUNK: usize = 256 << 10;

/// Bytes in flight between two encode stages: deep enough that a stage briefly descheduled
/// on a busy machine does not stall the others.
const ENCODE_IN_FLIGHT: usize = 2 << 20;

/// Chunks in flight between two encode stages handing on chunks of `chunk` bytes.
pub(crate) fn encode_depth(chunk: usize) -> usize {
    (ENCODE_IN_FLIGHT / chunk.max(1)).clamp(CHANNEL_DEPTH, 8)
}

/// Size and SHA-256 of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub size: u64,
    pub sha256: String,
}

/// Counts and hashes bytes as they pass. SHA-256 comes from aws-lc (already linked for TLS),
/// whose SHA-NI code is faster than the pure-Rust implementation's.
#[derive(Clone)]
pub struct Hasher {
    sha: aws_lc_rs::digest::Context,
    size: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            sha: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            size: 0,
        }
    }
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.size += data.len() as u64;
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn finish(self) -> Digest {
        Digest {
            size: self.size,
            sha256: hex::encode(self.sha.finish()),
        }
    }
}

/// Hashes chunks on a thread of its own, so hashing overlaps the stage that hands them on.
pub(crate) struct HashThread {
    tx: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::JoinHandle<Digest>,
}

impl HashThread {
    pub fn start(name: &str, depth: usize) -> Result<HashThread> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(depth);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut hasher = Hasher::default();
                for chunk in rx {
                    hasher.update(&chunk);
                }
                hasher.finish()
            })
            .map_err(|e| Error::failure(format!("cannot start hashing thread: {e}")))?;
        Ok(HashThread { tx, thread })
    }

    /// Queues a chunk (a reference-counted clone, not a copy).
    pub fn update(&self, chunk: &Bytes) {
        // The thread only ends when `finish` drops the sender.
        let _ = self.tx.send(chunk.clone());
    }

    pub fn finish(self) -> Result<Digest> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| Error::failure("hashing thread panicked"))
    }
}

/// A reader that hashes what it reads.
pub struct HashReader<R> {
    inner: R,
    pub hasher: Hasher,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Hasher::default(),
        }
    }
    /// Reads the rest of the stream, then returns its digest.
    pub fn drain(mut self) -> io::Result<Digest> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.hasher.finish())
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
pub fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Collects written bytes into chunks of `chunk` bytes and hands each full chunk to `send`.
pub(crate) struct Chunker<F: FnMut(Vec<u8>) -> io::Result<()>> {
    buf: Vec<u8>,
    chunk: usize,
    send: F,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Chunker<F> {
    pub fn new(chunk: usize, send: F) -> Self {
        Chunker {
            buf: Vec::with_capacity(chunk),
            chunk,
            send,
        }
    }
    /// Sends what is buffered.
    pub fn flush_chunk(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
            (self.send)(full)?;
        }
        Ok(())
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Write for Chunker<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.chunk - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.flush_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads chunks from a channel fed by another thread; an `Err` item fails the read.
pub(crate) struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    pub fn new(rx: std::sync::mpsc::Receiver<Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => self.current = chunk,
                Ok(Err(e)) => return Err(e.into_io()),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Feeds chunks from `rx` into an object writer until the channel closes, then hands the
/// writer back for the caller to finish (on success) or abort (on failure).
pub async fn pump(
    mut writer: Box<dyn ObjectWriter>,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> Result<Box<dyn ObjectWriter>> {
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = writer.write(chunk).await {
            rx.close();
            let _ = writer.abort().await;
            return Err(e);
        }
    }
    Ok(writer)
}

/// Maps an I/O error from a decode stage: our own errors keep their kind, anything else from
/// age or zstd means the stored bytes are damaged.
pub(crate) fn damaged(what: &str, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        return Error::io(what, e);
    }
    Error::integrity(format!(
        "{what}: {e}; the object is truncated or has been modified"
    ))
    .hint("run `drctl verify` on the backup; restore from another backup or a replica")
}
