//! The data path: plain bytes → zstd → age → stored bytes, and back, with SHA-256 of both
//! sides. CPU-heavy stages run on dedicated threads connected by bounded channels of 1 MiB
//! chunks, so a slow store slows the source (backpressure) and memory stays bounded.
//!
//! This module never decides where bytes come from or go to; `backup`, `restore` and `verify`
//! connect it to sources, stores and sinks.

pub mod decode;
pub mod encode;

use std::io::{self, BufRead, Read, Write};

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

/// Reusable chunk buffers for a stage that reads into fixed-size buffers and hands them on
/// as [`Bytes`]. A buffer comes back to the pool when the last `Bytes` made from it is
/// dropped, so the stage neither zero-fills nor faults in fresh memory for every chunk (on
/// a restore that was a tenth of the decompression thread's time).
#[derive(Clone)]
pub(crate) struct BufferPool {
    free: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    size: usize,
}

/// Buffers a pool keeps; more in use at once are allocated and freed as usual.
const POOL_KEEP: usize = 8;

impl BufferPool {
    pub fn new(size: usize) -> Self {
        BufferPool {
            free: Default::default(),
            size,
        }
    }

    /// A buffer of the pool's size, holding whatever its last use left in it.
    fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .expect("pool lock")
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size])
    }

    /// The first `len` bytes of `buf` (taken from this pool) as `Bytes`.
    fn freeze(&self, buf: Vec<u8>, len: usize) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self.clone(),
        })
    }

    /// Reads from `reader` until a buffer is full or the input ends; `None` at the end.
    pub fn read_chunk(&self, reader: &mut impl Read) -> io::Result<Option<Bytes>> {
        let mut buf = self.take();
        let filled = read_full(reader, &mut buf);
        match filled {
            Ok(0) => {
                self.give_back(buf);
                Ok(None)
            }
            Ok(n) => Ok(Some(self.freeze(buf, n))),
            Err(e) => Err(e),
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().expect("pool lock");
        if free.len() < POOL_KEEP {
            free.push(buf);
        }
    }
}

struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
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
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Reading through `BufRead` hands out the chunks themselves, without a copy.
impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => self.current = chunk,
                Ok(Err(e)) => return Err(e.into_io()),
                Err(_) => break,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, n: usize) {
        bytes::Buf::advance(&mut self.current, n);
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

/// Maps an I/O error from a decode stage: our own errors pass through as they are, anything
/// else from age or zstd means the stored bytes are damaged.
pub(crate) fn damaged(what: &str, e: io::Error) -> Error {
    // An earlier stage's error names the object and its cause already.
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        return *e
            .into_inner()
            .and_then(|inner| inner.downcast::<Error>().ok())
            .expect("checked above");
    }
    Error::integrity(format!(
        "{what}: {e}; the object is truncated or has been modified"
    ))
    .hint("run `drctl verify` on the backup; restore from another backup or a replica")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_chunks_keep_their_bytes_until_dropped_and_then_come_back() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let pool = BufferPool::new(4096);
        let mut input = &data[..];
        let first = pool.read_chunk(&mut input).unwrap().unwrap();
        let mut rest = Vec::new();
        while let Some(chunk) = pool.read_chunk(&mut input).unwrap() {
            // Every chunk after the first is dropped here, so its buffer is reused.
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(
            &first[..],
            &data[..4096],
            "a live chunk is never overwritten"
        );
        assert_eq!(rest, &data[4096..]);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        let slice = first.slice(10..20);
        drop(first);
        assert_eq!(
            pool.free.lock().unwrap().len(),
            1,
            "a slice keeps the buffer"
        );
        assert_eq!(&slice[..], &data[10..20]);
        drop(slice);
        assert_eq!(pool.free.lock().unwrap().len(), 2);
        assert!(pool.read_chunk(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn channel_reader_hands_out_chunks_and_their_error() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(Ok(Bytes::from_static(b"abc"))).unwrap();
        tx.send(Ok(Bytes::from_static(b"defg"))).unwrap();
        tx.send(Err(Error::integrity("damaged"))).unwrap();
        let mut reader = ChannelReader::new(rx);
        assert_eq!(reader.fill_buf().unwrap(), b"abc");
        reader.consume(2);
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).unwrap(), 1);
        assert_eq!(&buf[..1], b"c");
        assert_eq!(reader.fill_buf().unwrap(), b"defg");
        reader.consume(4);
        let err = reader.fill_buf().unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        drop(tx);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Bytes>>(1);
        drop(tx);
        assert!(ChannelReader::new(rx).fill_buf().unwrap().is_empty());
    }
}
