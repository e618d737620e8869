//! Encoding: plain bytes in (through [`std::io::Write`]), encrypted chunks out to a channel.
//!
//! Threads: a compress thread feeds zstd, which compresses on its own worker threads; a crypt
//! thread encrypts the compressed stream with age. Plain and stored bytes are hashed on two
//! more threads, so the hashes overlap the work of the stages they follow. Stages hand data
//! on in chunks of `chunk_size` bytes, about 2 MiB of them in flight between two stages.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;

use super::{encode_depth, Chunker, Digest, HashThread};
use crate::{Error, Result};

pub struct EncodeOptions {
    /// zstd level.
    pub level: i32,
    /// zstd worker threads (0: compress on the caller's thread).
    pub workers: u32,
    /// Who the file key is wrapped for.
    pub recipients: crate::crypto::Recipients,
    /// Incremented with every plain byte, for progress reporting.
    pub progress: Option<Arc<AtomicU64>>,
    /// Size of the chunks handed between stages and to the store: `store::CHUNK_SIZE` for bulk
    /// data, less for small side streams such as the file index.
    pub chunk_size: usize,
}

/// Bytes of input per zstd worker job.
const ZSTD_JOB_SIZE: u32 = 2 << 20;

type Compressed = Chunker<Box<dyn FnMut(Vec<u8>) -> io::Result<()> + Send>>;

/// A writer that compresses and encrypts what it is given.
pub struct Encoder {
    input: Compressed,
    compress: JoinHandle<Result<Digest>>,
    crypt: JoinHandle<Result<Digest>>,
    progress: Option<Arc<AtomicU64>>,
}

/// Sizes and checksums of one encoded stream.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub plain: Digest,
    pub stored: Digest,
}

impl Encoder {
    /// Starts the crypt thread; encrypted chunks go to `out`.
    pub fn start(opts: EncodeOptions, out: tokio::sync::mpsc::Sender<Bytes>) -> Result<Encoder> {
        let recipients = opts.recipients.to_age()?;
        let chunk_size = opts.chunk_size;
        let depth = encode_depth(chunk_size);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(depth);
        let stored = HashThread::start("drctl-hash-stored", depth)?;
        let crypt = std::thread::Builder::new()
            .name("drctl-encrypt".into())
            .spawn(move || -> Result<Digest> {
                let sink = Chunker::new(chunk_size, |chunk: Vec<u8>| {
                    let chunk = Bytes::from(chunk);
                    stored.update(&chunk);
                    out.blocking_send(chunk)
                        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped"))
                });
                let encryptor = age::Encryptor::with_recipients(
                    recipients.iter().map(|r| r.as_ref() as &dyn age::Recipient),
                )
                .map_err(|e| Error::failure(format!("age: {e}")))?;
                let mut writer = encryptor
                    .wrap_output(sink)
                    .map_err(|e| Error::io("encrypt", e))?;
                for chunk in rx {
                    writer
                        .write_all(&chunk)
                        .map_err(|e| Error::io("encrypt", e))?;
                }
                let mut sink = writer.finish().map_err(|e| Error::io("encrypt", e))?;
                sink.flush_chunk().map_err(|e| Error::io("encrypt", e))?;
                drop(sink);
                stored.finish()
            })
            .map_err(|e| Error::failure(format!("cannot start encryption thread: {e}")))?;
        let send: Box<dyn FnMut(Vec<u8>) -> io::Result<()> + Send> = Box::new(move |chunk| {
            tx.send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "encryption stopped"))
        });
        let compressed = Chunker::new(chunk_size, send);
        let mut zstd = zstd::stream::write::Encoder::new(compressed, opts.level)
            .map_err(|e| Error::io("zstd", e))?;
        zstd.include_checksum(true)
            .map_err(|e| Error::io("zstd", e))?;
        if opts.workers > 0 {
            zstd.multithread(opts.workers)
                .map_err(|e| Error::io("zstd workers", e))?;
            // zstd sizes jobs from the window (8 MiB at level 3) and buffers several of them;
            // smaller jobs keep the pipeline within its memory budget at a negligible ratio cost.
            zstd.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))
                .map_err(|e| Error::io("zstd job size", e))?;
            // Each job first loads the end of the previous one as history: 1/16 of the window
            // instead of zstd's 1/8 halves that work for 0.3% more output.
            zstd.set_parameter(zstd::stream::raw::CParameter::OverlapSizeLog(5))
                .map_err(|e| Error::io("zstd overlap", e))?;
        }
        // The compress thread feeds zstd, so the source keeps reading while zstd's workers are
        // busy.
        let (in_tx, in_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(depth - 1);
        let plain = HashThread::start("drctl-hash-plain", depth)?;
        let compress = std::thread::Builder::new()
            .name("drctl-compress".into())
            .spawn(move || -> Result<Digest> {
                for chunk in in_rx {
                    let chunk = Bytes::from(chunk);
                    plain.update(&chunk);
                    zstd.write_all(&chunk)
                        .map_err(|e| Error::io("compress", e))?;
                }
                let mut compressed = zstd.finish().map_err(|e| Error::io("compress", e))?;
                compressed
                    .flush_chunk()
                    .map_err(|e| Error::io("compress", e))?;
                // Dropping the chunker closes the channel, which ends the crypt thread's loop.
                drop(compressed);
                plain.finish()
            })
            .map_err(|e| Error::failure(format!("cannot start compression thread: {e}")))?;
        let send_in: Box<dyn FnMut(Vec<u8>) -> io::Result<()> + Send> = Box::new(move |chunk| {
            in_tx
                .send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "compression stopped"))
        });
        Ok(Encoder {
            input: Chunker::new(chunk_size, send_in),
            compress,
            crypt,
            progress: opts.progress,
        })
    }

    /// Flushes every stage and waits for the compress and crypt threads.
    pub fn finish(self) -> Result<Encoded> {
        let Encoder {
            mut input,
            compress,
            crypt,
            ..
        } = self;
        let sent = input.flush_chunk();
        drop(input);
        let plain = compress
            .join()
            .map_err(|_| Error::failure("compression thread panicked"))?;
        let stored = crypt
            .join()
            .map_err(|_| Error::failure("encryption thread panicked"))?;
        // The last stage's error explains the earlier ones (a failed upload stops everything).
        let stored = stored?;
        let plain = plain?;
        sent.map_err(|e| Error::io("compress", e))?;
        Ok(Encoded { plain, stored })
    }

    /// Stops the pipeline without producing a valid stream (the caller aborts the upload).
    pub fn abandon(self) {
        let Encoder {
            input,
            compress,
            crypt,
            ..
        } = self;
        drop(input);
        let _ = compress.join();
        let _ = crypt.join();
    }
}

impl Write for Encoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.input.write(buf)?;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
