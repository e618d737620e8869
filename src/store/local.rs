//! A directory as an object store. Writes go to a temporary file in the object's directory,
//! are fsynced, renamed into place, and the directory is fsynced: after `finish` returns the
//! object survives a power cut, and before it there is no object at all.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{
    ByteStream, Leftover, ObjectMeta, ObjectStore, ObjectWriter, PutOptions, CHUNK_SIZE, FILE_WRITE,
};
use crate::format::ObjectKey;
use crate::{Error, Result};

const MARKER: &str = ".drctl-repository";
const TMP_PREFIX: &str = ".tmp.";

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> Self {
        LocalStore { root }
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::failure(format!("store task failed: {e}")))?
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}

/// Fsyncs the directory holding `path` (after a rename into it).
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

fn meta_of(key: ObjectKey, m: &std::fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key,
        size: m.len(),
        modified: m.modified().ok().map(chrono::DateTime::<chrono::Utc>::from),
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn create(&self) -> Result<()> {
        let root = self.root.clone();
        blocking(move || {
            std::fs::create_dir_all(&root)
                .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
            let marker = root.join(MARKER);
            if !marker.exists() {
                std::fs::write(&marker, b"drctl repository, format 1\n")
                    .map_err(|e| Error::io(format!("write {}", marker.display()), e))?;
                sync_dir(&root)?;
            }
            Ok(())
        })
        .await
    }

    async fn check(&self) -> Result<()> {
        if self.root.join(MARKER).exists() {
            Ok(())
        } else {
            Err(
                Error::not_found(format!("no drctl repository at {}", self.describe()))
                    .hint("run `drctl init`"),
            )
        }
    }

    async fn put(&self, key: &ObjectKey, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>> {
        if *opts != PutOptions::default() {
            return Err(Error::invalid(format!(
                "{}: storage class, SSE-KMS and Object Lock need an S3 repository",
                self.describe()
            )));
        }
        let dest = self.path(key);
        let key = key.clone();
        blocking(move || {
            let dir = dest
                .parent()
                .expect("object keys have a directory")
                .to_path_buf();
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            let name = dest
                .file_name()
                .expect("object keys have a file name")
                .to_string_lossy();
            let tmp = dir.join(format!(
                "{TMP_PREFIX}{name}.{:08x}",
                rand::thread_rng().gen::<u32>()
            ));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
            Ok(Box::new(LocalWriter {
                key,
                dest,
                tmp,
                file: Some(file),
                size: 0,
                flushed: 0,
            }) as Box<dyn ObjectWriter>)
        })
        .await
    }

    async fn get(&self, key: &ObjectKey) -> Result<ByteStream> {
        let path = self.path(key);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "object {key} not found in {}",
                    self.describe()
                )))
            }
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let (tx, stream) = ByteStream::channel(key.clone());
        let pool = crate::pipeline::BufferPool::new(CHUNK_SIZE);
        tokio::task::spawn_blocking(move || loop {
            let chunk = match pool.read_chunk(&mut file) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Error::io(format!("read {}", path.display()), e)));
                    return;
                }
            };
            if tx.blocking_send(Ok(chunk)).is_err() {
                return;
            }
        });
        Ok(stream)
    }

    async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>> {
        match std::fs::metadata(self.path(key)) {
            Ok(m) if m.is_file() => Ok(Some(meta_of(key.clone(), &m))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("stat {key}"), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            // Start at the deepest directory the prefix names, then filter by the full prefix.
            let dir_part = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
            let mut out = Vec::new();
            let mut stack = vec![dir_part.to_owned()];
            while let Some(rel) = stack.pop() {
                let dir = if rel.is_empty() {
                    root.clone()
                } else {
                    root.join(&rel)
                };
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
                };
                for entry in rd {
                    let entry =
                        entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
                    let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    if name.starts_with('.') {
                        continue;
                    }
                    let rel_key = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    let ft = entry.file_type().map_err(|e| Error::io("stat", e))?;
                    if ft.is_dir() {
                        if prefix.starts_with(&format!("{rel_key}/"))
                            || rel_key.starts_with(&prefix)
                            || prefix.starts_with(&rel_key)
                        {
                            stack.push(rel_key);
                        }
                    } else if ft.is_file() && rel_key.starts_with(&prefix) {
                        let m = entry.metadata().map_err(|e| Error::io("stat", e))?;
                        out.push(meta_of(ObjectKey::from_listing(&rel_key)?, &m));
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let path = self.path(key);
        blocking(move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io(format!("delete {}", path.display()), e)),
            }
            let dir = path.parent().expect("object keys have a directory");
            sync_dir(dir)?;
            // Remove the backup's directory once it is empty; ignore "not empty".
            let _ = std::fs::remove_dir(dir);
            Ok(())
        })
        .await
    }

    async fn leftovers(&self, older_than: chrono::DateTime<chrono::Utc>) -> Result<Vec<Leftover>> {
        let root = self.root.clone();
        blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let rd = match std::fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
                };
                for entry in rd.flatten() {
                    let path = entry.path();
                    let Ok(m) = entry.metadata() else { continue };
                    if m.is_dir() {
                        stack.push(path);
                    } else if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                        let modified = m.modified().ok().map(chrono::DateTime::<chrono::Utc>::from);
                        if modified.is_none_or(|t| t < older_than) {
                            let rel = path.strip_prefix(&root).unwrap_or(&path);
                            out.push(Leftover {
                                what: rel.display().to_string(),
                                size: m.len(),
                            });
                        }
                    }
                }
            }
            out.sort_by(|a, b| a.what.cmp(&b.what));
            Ok(out)
        })
        .await
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> Result<()> {
        let rel = Path::new(&leftover.what);
        let ok = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
            && rel
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TMP_PREFIX));
        if !ok {
            return Err(Error::invalid(format!(
                "not a leftover of this store: {}",
                leftover.what
            )));
        }
        let path = self.root.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("delete {}", path.display()), e)),
        }
        // Remove the backup's directory once it is empty; ignore "not empty".
        if let Some(dir) = path.parent().filter(|d| *d != self.root) {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }
}

struct LocalWriter {
    key: ObjectKey,
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    size: u64,
    /// Bytes up to which write-back has been started.
    flushed: u64,
}

/// Write-back of a large object is started every this many bytes, so that the `fsync` in
/// `finish` has little left to wait for and dirty pages do not pile up.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Asks the kernel to start writing `len` bytes at `offset` to disk, without waiting.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor and range; SYNC_FILE_RANGE_WRITE only queues I/O. Failure is
    // harmless (the fsync in `finish` still makes the data durable), so the result is ignored.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::failure("write after failure"))?;
        let tmp = self.tmp.clone();
        let len = chunk.len() as u64;
        let (flushed, size) = (self.flushed, self.size + len);
        // Bytes written since write-back was last started, if enough to start it again.
        let writeback = (size - flushed >= WRITEBACK_EVERY).then_some(size - flushed);
        let file = blocking(move || {
            for piece in chunk.chunks(FILE_WRITE) {
                file.write_all(piece)
                    .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
            }
            if let Some(len) = writeback {
                start_writeback(&file, flushed, len);
            }
            Ok(file)
        })
        .await?;
        self.file = Some(file);
        if writeback.is_some() {
            self.flushed = size;
        }
        self.size = size;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<ObjectMeta> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::failure("finish after failure"))?;
        let (tmp, dest) = (self.tmp.clone(), self.dest.clone());
        let key = self.key.clone();
        let size = self.size;
        blocking(move || {
            file.sync_all()
                .map_err(|e| Error::io(format!("fsync {}", tmp.display()), e))?;
            drop(file);
            std::fs::rename(&tmp, &dest)
                .map_err(|e| Error::io(format!("rename to {}", dest.display()), e))?;
            sync_dir(dest.parent().expect("object keys have a directory"))?;
            let m = std::fs::metadata(&dest)
                .map_err(|e| Error::io(format!("stat {}", dest.display()), e))?;
            if m.len() != size {
                return Err(Error::integrity(format!(
                    "{key}: wrote {size} bytes but the file has {}",
                    m.len()
                )));
            }
            Ok(meta_of(key, &m))
        })
        .await
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.file = None;
        let _ = std::fs::remove_file(&self.tmp);
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // An unfinished writer leaves nothing behind. After `finish` the temp path no longer exists.
        let _ = std::fs::remove_file(&self.tmp);
    }
}
