//! Decoding: stored bytes in, plain bytes out (through [`std::io::Read`]), with both sides'
//! sizes and checksums compared against the manifest when the stream ends.
//!
//! Threads: a decrypt thread reads the stored bytes, hashes them and decrypts with age; a
//! decompress thread runs zstd; a hashing thread hashes the plain bytes while the caller's
//! thread consumes them.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::{damaged, BufferPool, ChannelReader, Digest, HashThread, Hasher, CHANNEL_DEPTH};
use crate::crypto::Identities;
use crate::format::manifest::ObjectInfo;
use crate::store::CHUNK_SIZE;
use crate::{Error, Result};

/// A reader of an object's plain bytes. Call [`Decoder::finish`] after reading what you need:
/// it reads the rest and checks sizes and checksums.
pub struct Decoder {
    what: String,
    expected: ObjectInfo,
    plain: ChannelReader,
    decompress: JoinHandle<Result<Digest>>,
    decrypt: JoinHandle<Result<Digest>>,
}

/// Hashes the stored bytes while age reads them.
struct SharedHashReader<R> {
    inner: R,
    hasher: Arc<Mutex<Hasher>>,
}

impl<R: Read> Read for SharedHashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.lock().expect("hasher lock").update(&buf[..n]);
        Ok(n)
    }
}

impl Decoder {
    /// Opens `stored` (the object's bytes). `what` names the backup and object in errors;
    /// `recipients` are listed when no identity matches.
    pub fn open(
        stored: impl Read + Send + 'static,
        identities: &Identities,
        expected: ObjectInfo,
        recipients: &[String],
        what: String,
    ) -> Result<Decoder> {
        let hasher = Arc::new(Mutex::new(Hasher::default()));
        let stored = SharedHashReader {
            inner: stored,
            hasher: hasher.clone(),
        };
        // The header is parsed here, so a wrong key is reported before anything is written.
        let decryptor =
            age::Decryptor::new_buffered(io::BufReader::with_capacity(CHUNK_SIZE, stored))
                .map_err(|e| header_error(&what, e))?;
        let mut reader = decryptor.decrypt(identities.iter()).map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => identities.wrong_key(&what, recipients),
            other => header_error(&what, other),
        })?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Bytes>>(CHANNEL_DEPTH);
        let thread_what = what.clone();
        let decrypt = std::thread::Builder::new()
            .name("drctl-decrypt".into())
            .spawn(move || -> Result<Digest> {
                pump_chunks(&mut reader, &tx, None, &thread_what)?;
                drop(reader);
                let digest = std::mem::take(&mut *hasher.lock().expect("hasher lock")).finish();
                Ok(digest)
            })
            .map_err(|e| Error::failure(format!("cannot start decryption thread: {e}")))?;
        let (plain_tx, plain_rx) = std::sync::mpsc::sync_channel::<Result<Bytes>>(CHANNEL_DEPTH);
        let thread_what = what.clone();
        let hasher = HashThread::start("drctl-hash-plain", CHANNEL_DEPTH)?;
        let decompress = std::thread::Builder::new()
            .name("drctl-decompress".into())
            .spawn(move || -> Result<Digest> {
                let input = io::BufReader::with_capacity(CHUNK_SIZE, ChannelReader::new(rx));
                let mut zstd = zstd::stream::read::Decoder::with_buffer(input)
                    .map_err(|e| Error::io("zstd", e))?;
                pump_chunks(&mut zstd, &plain_tx, Some(&hasher), &thread_what)?;
                hasher.finish()
            })
            .map_err(|e| Error::failure(format!("cannot start decompression thread: {e}")))?;
        Ok(Decoder {
            what,
            expected,
            plain: ChannelReader::new(plain_rx),
            decompress,
            decrypt,
        })
    }

    /// After the consumer failed: looks up to `limit` bytes further for damaged stored
    /// bytes that would explain its failure, and if the stream ends within them, checks it
    /// as [`Decoder::finish`] does. Returns that problem, if any.
    pub fn abandon(mut self, limit: u64) -> Option<Error> {
        match io::copy(&mut (&mut self.plain).take(limit), &mut io::sink()) {
            Ok(n) if n == limit => None,
            _ => self.finish().err(),
        }
    }

    /// Reads the rest of the stream and checks sizes and checksums of both sides.
    pub fn finish(self) -> Result<Digest> {
        let Decoder {
            what,
            expected,
            mut plain,
            decompress,
            decrypt,
        } = self;
        let drained = io::copy(&mut plain, &mut io::sink()).map_err(|e| damaged(&what, e));
        drop(plain);
        let stored = decrypt
            .join()
            .map_err(|_| Error::failure("decryption thread panicked"))?;
        let decoded = decompress
            .join()
            .map_err(|_| Error::failure("decompression thread panicked"))?;
        // The earliest stage's error is the root cause.
        let stored = stored?;
        let plain = decoded?;
        drained?;
        if stored.size != expected.stored_size || stored.sha256 != expected.stored_sha256 {
            return Err(Error::integrity(format!(
                "{what}: stored bytes do not match the manifest (size {} vs {}, sha256 {} vs {})",
                stored.size, expected.stored_size, stored.sha256, expected.stored_sha256
            )));
        }
        if plain.size != expected.plain_size || plain.sha256 != expected.plain_sha256 {
            return Err(Error::integrity(format!(
                "{what}: decoded bytes do not match the manifest (size {} vs {}, sha256 {} vs {})",
                plain.size, expected.plain_size, plain.sha256, expected.plain_sha256
            )));
        }
        Ok(plain)
    }
}

/// Reads `reader` to the end in chunks and sends them; a read error is sent on (so the
/// consumer fails too) and returned.
fn pump_chunks(
    reader: &mut impl Read,
    tx: &std::sync::mpsc::SyncSender<Result<Bytes>>,
    hasher: Option<&HashThread>,
    what: &str,
) -> Result<()> {
    let pool = BufferPool::new(CHUNK_SIZE);
    loop {
        let chunk = match pool.read_chunk(reader) {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok(()),
            Err(e) => {
                let err = damaged(what, e);
                let _ = tx.send(Err(Error::new(err.kind(), err.message().to_owned())));
                return Err(err);
            }
        };
        if let Some(hasher) = hasher {
            hasher.update(&chunk);
        }
        if tx.send(Ok(chunk)).is_err() {
            return Err(Error::failure(format!("{what}: reader stopped")));
        }
    }
}

fn header_error(what: &str, e: age::DecryptError) -> Error {
    match e {
        age::DecryptError::Io(io) => damaged(what, io),
        other => Error::integrity(format!("{what}: not a readable age file: {other}"))
            .hint("the object is damaged or is not a drctl object; run `drctl verify`"),
    }
}

impl Read for Decoder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.plain.read(buf)
    }
}

impl io::BufRead for Decoder {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.plain.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.plain.consume(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::crypto::{generate_identity, Recipients};
    use crate::format::manifest::ObjectRole;
    use crate::pipeline::encode::{EncodeOptions, Encoder};
    use crate::ErrorKind;

    const MIB: usize = 1 << 20;

    /// `size` bytes that do not compress, encoded; the stored bytes and what the manifest
    /// would say of them.
    fn encoded(size: usize, identity: &std::path::Path) -> (Vec<u8>, ObjectInfo) {
        let public = generate_identity(identity).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let collect = std::thread::spawn(move || {
            let mut stored = Vec::new();
            while let Some(chunk) = rx.blocking_recv() {
                stored.extend_from_slice(&chunk);
            }
            stored
        });
        let opts = EncodeOptions {
            level: 1,
            workers: 0,
            recipients: Recipients::x25519(vec![public]),
            progress: None,
            chunk_size: MIB,
        };
        let mut encoder = Encoder::start(opts, tx).unwrap();
        let mut plain = vec![0u8; size];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut plain);
        encoder.write_all(&plain).unwrap();
        let digests = encoder.finish().unwrap();
        let stored = collect.join().unwrap();
        let info = ObjectInfo {
            role: ObjectRole::Data,
            name: "data.zst.age".into(),
            plain_size: digests.plain.size,
            plain_sha256: digests.plain.sha256,
            stored_size: digests.stored.size,
            stored_sha256: digests.stored.sha256,
        };
        (stored, info)
    }

    /// Opens `stored`, reads its first MiB as a failing consumer would, then abandons it.
    fn abandon_after_one_mib(
        stored: &[u8],
        info: &ObjectInfo,
        identity: &std::path::Path,
        limit: usize,
    ) -> Option<Error> {
        let identities = Identities::load(identity).unwrap();
        let mut decoder = Decoder::open(
            io::Cursor::new(stored.to_vec()),
            &identities,
            info.clone(),
            &[],
            "test object".into(),
        )
        .unwrap();
        let mut first = vec![0u8; MIB];
        decoder.plain.read_exact(&mut first).unwrap();
        decoder.abandon(limit as u64)
    }

    #[test]
    fn an_abandoned_stream_is_checked_only_as_far_as_the_look_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity.txt");
        let (stored, info) = encoded(6 * MIB, &identity);

        // An intact stream that ends within the look-ahead is checked in full: fine as it
        // is, and refused when the manifest disagrees.
        assert!(abandon_after_one_mib(&stored, &info, &identity, 16 * MIB).is_none());
        let mut wrong = info.clone();
        wrong.plain_sha256 = "0".repeat(64);
        let err = abandon_after_one_mib(&stored, &wrong, &identity, 16 * MIB)
            .expect("a checksum mismatch within the look-ahead is reported");
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");

        // Damage about 4.5 MiB past the failure: reported with a look-ahead that reaches it,
        // not looked for with one that stops short.
        let mut damaged = stored.clone();
        let at = damaged.len() - MIB / 2;
        damaged[at] ^= 0x55;
        let err = abandon_after_one_mib(&damaged, &info, &identity, 16 * MIB)
            .expect("damage within the look-ahead is reported");
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(abandon_after_one_mib(&damaged, &info, &identity, 2 * MIB).is_none());
    }
}
