//! Files and directories, archived as POSIX (GNU) tar: contents, modes, owners, mtimes,
//! symlinks, hard links, empty directories, FIFOs and devices, long and non-UTF-8 names.
//! Sockets are skipped (tar cannot hold them). Entries are written in a stable order (sorted
//! by name, depth first), and one index line is written per entry.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::{Source, Stats};
use crate::cancel::Cancel;
use crate::format::index::{EntryType, IndexEntry, RawPath};
use crate::pipeline::ENCODE_CHUNK;
use crate::{Error, Result};

pub struct FilesSource {
    paths: Vec<PathBuf>,
    exclude: Vec<String>,
    /// Patterns with a `/`, matched against the absolute path.
    exclude_paths: GlobSet,
    /// Patterns without a `/`, matched against the file name.
    exclude_names: GlobSet,
    one_file_system: bool,
}

impl FilesSource {
    pub fn new(paths: Vec<PathBuf>, exclude: &[String], one_file_system: bool) -> Result<Self> {
        let mut by_path = GlobSetBuilder::new();
        let mut by_name = GlobSetBuilder::new();
        for pattern in exclude {
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::invalid(format!("exclude pattern {pattern:?}: {e}")))?;
            if pattern.contains('/') {
                by_path.add(glob);
            } else {
                by_name.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build()
                .map_err(|e| Error::invalid(format!("exclude patterns: {e}")))
        };
        Ok(FilesSource {
            paths,
            exclude: exclude.to_vec(),
            exclude_paths: build(by_path)?,
            exclude_names: build(by_name)?,
            one_file_system,
        })
    }

    fn excluded(&self, path: &Path) -> bool {
        self.exclude_paths.is_match(path)
            || path
                .file_name()
                .is_some_and(|n| self.exclude_names.is_match(n))
    }
}

impl Source for FilesSource {
    fn kind(&self) -> &'static str {
        "files"
    }
    fn artifact(&self) -> String {
        "tar".into()
    }
    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "paths": self.paths.iter().map(|p| p.to_string_lossy()).collect::<Vec<_>>(),
            "exclude": self.exclude,
            "one_file_system": self.one_file_system,
        })
    }
    fn has_index(&self) -> bool {
        true
    }

    fn run(
        &mut self,
        out: &mut dyn Write,
        index: Option<&mut dyn Write>,
        cancel: &Cancel,
    ) -> Result<Stats> {
        let mut tar = tar_builder(out);
        let index = index.map(|w| BufWriter::with_capacity(64 * 1024, w));
        let excluded = |path: &Path| self.excluded(path);
        let mut walk = Walk::new(
            Rules {
                base: None,
                excluded: &excluded,
                one_file_system: self.one_file_system,
                changes_expected: false,
                inspect: None,
            },
            cancel,
        );
        walk.index = index;
        for root in &self.paths {
            walk.visit_root(&mut tar, root)?;
        }
        finish(tar)?;
        if let Some(w) = walk.index.as_mut() {
            w.flush().map_err(|e| Error::io("write the index", e))?;
        }
        Ok(walk.counts.into_stats())
    }
}

/// A tar archive written to a pipeline. A buffer of a pipeline chunk lets `io::copy` read
/// files straight into it in big blocks.
pub type Tar<'w> = tar::Builder<BufWriter<&'w mut dyn Write>>;

pub fn tar_builder(out: &mut dyn Write) -> Tar<'_> {
    tar::Builder::new(BufWriter::with_capacity(ENCODE_CHUNK, out))
}

/// Writes the archive's end and flushes it to the pipeline.
pub fn finish(tar: Tar<'_>) -> Result<()> {
    tar.into_inner()
        .map_err(|e| Error::io("finish the archive", e))?
        .flush()
        .map_err(|e| Error::io("write the archive", e))
}

#[derive(Default)]
pub struct Counts {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    special: u64,
    bytes: u64,
    skipped_sockets: u64,
    vanished: u64,
    changed: u64,
    excluded: u64,
}

impl Counts {
    pub fn into_stats(self) -> Stats {
        let mut s = Stats::new();
        for (k, v) in [
            ("files", self.files),
            ("dirs", self.dirs),
            ("symlinks", self.symlinks),
            ("hardlinks", self.hardlinks),
            ("special", self.special),
            ("bytes", self.bytes),
            ("skipped_sockets", self.skipped_sockets),
            ("vanished", self.vanished),
            ("changed_while_reading", self.changed),
            ("excluded", self.excluded),
        ] {
            s.insert(k.into(), v.into());
        }
        s
    }
}

/// How a walk names and filters what it archives.
pub struct Rules<'a> {
    /// Entries are named relative to this directory; without it, by their absolute path
    /// without the leading `/`.
    pub base: Option<&'a Path>,
    /// Paths left out, with everything under them.
    pub excluded: &'a dyn Fn(&Path) -> bool,
    /// Stay on the file system of each root.
    pub one_file_system: bool,
    /// Files are expected to change while read (a database's), so that is not worth a
    /// warning.
    pub changes_expected: bool,
    /// What sees each regular file's bytes as they are archived, if anything (a database's
    /// page checks), given the file's path.
    pub inspect: Option<&'a Inspect<'a>>,
}

/// Given a file's path, what sees its bytes as they are archived.
pub type Inspect<'a> = dyn Fn(&Path) -> Option<Seen<'a>> + 'a;

/// What sees one file's bytes, in the order they are read.
pub type Seen<'a> = Box<dyn FnMut(&[u8]) + 'a>;

/// A reader whose bytes are also shown to `see`.
struct Inspected<'s, R> {
    inner: R,
    see: &'s mut dyn FnMut(&[u8]),
}

impl<R: Read> Read for Inspected<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.see)(&buf[..n]);
        Ok(n)
    }
}

pub struct Walk<'a, 'w> {
    rules: Rules<'a>,
    /// A root walked under another name: its path, and the name it has in the archive.
    renamed: Option<(PathBuf, PathBuf)>,
    pub counts: Counts,
    /// (device, inode) → archive path of the first link seen, for files with several links.
    links: HashMap<(u64, u64), PathBuf>,
    cancel: &'a Cancel,
    index: Option<BufWriter<&'w mut dyn Write>>,
}

fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Opens the regular file the walk found at `path` (`meta`, from `lstat`), or `None` if
/// something else is there by now: never through a symlink, nor blocking on a FIFO, that
/// took its place (which could archive another file's bytes under its name, or hang).
fn open_walked(path: &Path, meta: &Metadata) -> io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        // A symlink now.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    let now = file.metadata()?;
    if !now.is_file() || now.dev() != meta.dev() || now.ino() != meta.ino() {
        return Ok(None);
    }
    // Blocking reads again, as for any regular file.
    // SAFETY: fcntl on a descriptor `file` owns, with integer arguments.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(file))
}

impl<'a> Walk<'a, '_> {
    pub fn new(rules: Rules<'a>, cancel: &'a Cancel) -> Self {
        Walk {
            rules,
            renamed: None,
            counts: Counts::default(),
            links: HashMap::new(),
            cancel,
            index: None,
        }
    }

    /// Archives `root` and, for a directory, everything under it.
    pub fn visit_root(&mut self, tar: &mut Tar<'_>, root: &Path) -> Result<()> {
        let meta = std::fs::symlink_metadata(root)
            .map_err(|e| Error::io(format!("source path {}", root.display()), e))?;
        if meta.file_type().is_symlink() {
            tracing::warn!(
                path = %root.display(),
                "source path is a symlink: the link is archived, not what it points to (list \
                 the target's path to back that up)"
            );
        }
        let root_dev = meta.dev();
        self.visit(tar, root, meta, root_dev)
    }

    /// Archives the directory `root` as `name`, with everything under it.
    pub fn visit_root_as(&mut self, tar: &mut Tar<'_>, root: &Path, name: &Path) -> Result<()> {
        self.renamed = Some((root.to_owned(), name.to_owned()));
        let visited = self.visit_root(tar, root);
        self.renamed = None;
        visited
    }

    fn archive_name(&self, path: &Path) -> PathBuf {
        let renamed = self.renamed.as_ref().and_then(|(root, name)| {
            let rest = path.strip_prefix(root).ok()?;
            Some(name.join(rest))
        });
        let path = match &renamed {
            Some(named) => named,
            None => self
                .rules
                .base
                .and_then(|base| path.strip_prefix(base).ok())
                .unwrap_or(path),
        };
        path.components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect()
    }
}

impl Walk<'_, '_> {
    fn visit(
        &mut self,
        tar: &mut Tar<'_>,
        path: &Path,
        meta: Metadata,
        root_dev: u64,
    ) -> Result<()> {
        self.cancel.check()?;
        let name = self.archive_name(path);
        let ft = meta.file_type();
        if ft.is_socket() {
            self.counts.skipped_sockets += 1;
            return Ok(());
        }
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        // A time before 1970 would wrap around in the header's unsigned field.
        header.set_mtime(meta.mtime().max(0) as u64);
        let mut entry = IndexEntry {
            path: RawPath::from_os(name.as_os_str()),
            entry_type: EntryType::File,
            size: 0,
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime().max(0) as u64,
            uid: meta.uid() as u64,
            gid: meta.gid() as u64,
            link: None,
        };
        let write_err = |e: io::Error| Error::io(format!("archive {}", path.display()), e);

        if ft.is_dir() {
            if !name.as_os_str().is_empty() {
                entry.entry_type = EntryType::Dir;
                header.set_size(0);
                tar.append_data(&mut header, &name, io::empty())
                    .map_err(write_err)?;
                self.counts.dirs += 1;
                self.write_index(&entry)?;
            }
            let mut children: Vec<_> = match std::fs::read_dir(path) {
                Ok(rd) => rd
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(|e| Error::io(format!("list {}", path.display()), e))?,
                Err(e) if vanished(&e) => {
                    self.counts.vanished += 1;
                    return Ok(());
                }
                Err(e) => return Err(Error::io(format!("list {}", path.display()), e)),
            };
            children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for child in children {
                let child_path = path.join(&child);
                if (self.rules.excluded)(&child_path) {
                    self.counts.excluded += 1;
                    continue;
                }
                let child_meta = match std::fs::symlink_metadata(&child_path) {
                    Ok(m) => m,
                    Err(e) if vanished(&e) => {
                        self.counts.vanished += 1;
                        continue;
                    }
                    Err(e) => return Err(Error::io(format!("stat {}", child_path.display()), e)),
                };
                if self.rules.one_file_system && child_meta.is_dir() && child_meta.dev() != root_dev
                {
                    self.counts.excluded += 1;
                    continue;
                }
                self.visit(tar, &child_path, child_meta, root_dev)?;
            }
            return Ok(());
        }

        if ft.is_symlink() {
            let target = match std::fs::read_link(path) {
                Ok(t) => t,
                Err(e) if vanished(&e) => {
                    self.counts.vanished += 1;
                    return Ok(());
                }
                Err(e) => return Err(Error::io(format!("read link {}", path.display()), e)),
            };
            entry.entry_type = EntryType::Symlink;
            entry.link = Some(RawPath::from_os(target.as_os_str()));
            header.set_size(0);
            tar.append_link(&mut header, &name, &target)
                .map_err(write_err)?;
            self.counts.symlinks += 1;
            return self.write_index(&entry);
        }

        if ft.is_file() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                entry.entry_type = EntryType::Hardlink;
                entry.link = Some(RawPath::from_os(first.as_os_str()));
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                tar.append_link(&mut header, &name, first)
                    .map_err(write_err)?;
                self.counts.hardlinks += 1;
                return self.write_index(&entry);
            }
        }

        if ft.is_file() {
            let file = match open_walked(path, &meta) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    tracing::debug!(path = %path.display(), "replaced by another file while the walk went on; skipped");
                    self.counts.vanished += 1;
                    return Ok(());
                }
                Err(e) if vanished(&e) => {
                    self.counts.vanished += 1;
                    return Ok(());
                }
                Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
            };
            let size = meta.len();
            let mut reader = ExactReader::new(file, size, self.cancel);
            let mut inspect = self.rules.inspect.and_then(|inspect| inspect(path));
            match inspect.as_mut() {
                Some(see) => {
                    let inspected = Inspected {
                        inner: &mut reader,
                        see: &mut **see,
                    };
                    tar.append_data(&mut header, &name, inspected)
                }
                None => tar.append_data(&mut header, &name, &mut reader),
            }
            .map_err(write_err)?;
            if reader.changed() {
                if self.rules.changes_expected {
                    tracing::debug!(path = %path.display(), "file changed size while being read; archived {size} bytes");
                } else {
                    tracing::warn!(path = %path.display(), "file changed size while being read; archived {size} bytes");
                }
                self.counts.changed += 1;
            }
            entry.size = size;
            self.counts.files += 1;
            self.counts.bytes += size;
            if meta.nlink() > 1 {
                // Its other names link to this one, now that it is in the archive.
                self.links.insert((meta.dev(), meta.ino()), name.clone());
            }
            return self.write_index(&entry);
        }

        // FIFOs and devices: header only.
        entry.entry_type = if ft.is_fifo() {
            EntryType::Fifo
        } else if ft.is_char_device() {
            EntryType::Char
        } else {
            EntryType::Block
        };
        if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            header
                .set_device_major(libc::major(rdev))
                .map_err(write_err)?;
            header
                .set_device_minor(libc::minor(rdev))
                .map_err(write_err)?;
        }
        header.set_size(0);
        tar.append_data(&mut header, &name, io::empty())
            .map_err(write_err)?;
        self.counts.special += 1;
        self.write_index(&entry)
    }
}

impl Walk<'_, '_> {
    fn write_index(&mut self, entry: &IndexEntry) -> Result<()> {
        if let Some(w) = self.index.as_mut() {
            serde_json::to_writer(&mut *w, entry)?;
            w.write_all(b"\n")
                .map_err(|e| Error::io("write the index", e))?;
        }
        Ok(())
    }
}

/// Yields exactly `remaining` bytes: a file that grew is cut at the size in its header, one
/// that shrank is padded with zeros, so the archive stays well-formed.
pub struct ExactReader<'a> {
    inner: std::fs::File,
    remaining: u64,
    changed: bool,
    cancel: &'a Cancel,
}

impl<'a> ExactReader<'a> {
    pub fn new(inner: std::fs::File, size: u64, cancel: &'a Cancel) -> Self {
        ExactReader {
            inner,
            remaining: size,
            changed: false,
            cancel,
        }
    }

    /// Whether the file turned out shorter or longer than its size.
    pub fn changed(&self) -> bool {
        self.changed
    }
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            if !self.changed {
                let mut probe = [0u8; 1];
                if self.inner.read(&mut probe)? > 0 {
                    self.changed = true;
                }
            }
            return Ok(0);
        }
        if self.cancel.is_cancelled() {
            return Err(crate::Error::cancelled().into_io());
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        let n = if n == 0 {
            self.changed = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walked_file_replaced_since_is_not_opened_through_what_took_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"mine").unwrap();
        let meta = std::fs::symlink_metadata(&f).unwrap();
        let mut read = String::new();
        io::Read::read_to_string(&mut open_walked(&f, &meta).unwrap().unwrap(), &mut read).unwrap();
        assert_eq!(read, "mine");
        // The original stays linked elsewhere, so that nothing can reuse its inode.
        std::fs::hard_link(&f, dir.path().join("kept")).unwrap();
        let replace = |make: &dyn Fn(&Path)| {
            let new = dir.path().join("new");
            make(&new);
            std::fs::rename(&new, &f).unwrap();
            open_walked(&f, &meta).unwrap()
        };
        // Another file of that name, a symlink to another file, and a FIFO, which a plain
        // open would wait on for a writer.
        let other = dir.path().join("other");
        std::fs::write(&other, b"secret").unwrap();
        assert!(replace(&|p| std::fs::write(p, b"new").unwrap()).is_none());
        assert!(replace(&|p| std::os::unix::fs::symlink(&other, p).unwrap()).is_none());
        let fifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: `c` is a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        assert!(replace(&fifo).is_none());
    }
}
