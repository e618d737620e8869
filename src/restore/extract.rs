//! Unpacking a tar stream into a target directory without trusting it: entries with absolute
//! paths or `..`, links pointing out, writes through symlinks, and device files (unless asked
//! for) are refused with an error naming the entry. Nothing is written outside the target.

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::cancel::{Cancel, Temporary};
use crate::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// Restore FIFOs and device nodes.
    pub allow_special: bool,
    /// Directories of the archive restored elsewhere: each one's path in the archive and
    /// the directory (outside the target) its contents go to; the path in the target
    /// becomes a symlink to it. Only directories and files may lie below them.
    pub relocated: Vec<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExtractStats {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
}

/// A relative path from an archive, checked to stay inside the target.
fn safe_relative(raw: &[u8], what: &str) -> Result<PathBuf> {
    let refuse = |why: &str| {
        Error::integrity(format!(
            "refusing archive {what} {:?}: {why}",
            String::from_utf8_lossy(raw)
        ))
        .hint("the backup holds an entry that would escape the restore target; nothing was written for it")
    };
    if raw.is_empty() {
        return Err(refuse("empty path"));
    }
    if raw[0] == b'/' {
        return Err(refuse("absolute path"));
    }
    if raw.contains(&0) {
        return Err(refuse("NUL in path"));
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("path contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse("absolute path")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refuse("empty path"));
    }
    Ok(out)
}

/// Directories known to be real directories inside the target (relative paths): created by
/// this restore or checked with `lstat`. A later archive entry cannot turn one into a symlink
/// (replacing a directory is refused), so paths below them need no further checks.
#[derive(Default)]
struct RealDirs(std::collections::HashSet<PathBuf>);

impl RealDirs {
    /// Makes sure every ancestor of `rel` is a real directory, creating missing ones when
    /// `create` is set. Refuses when one is anything else (a symlink planted by an earlier
    /// entry, or present in an `--overwrite` target, would otherwise be written through).
    fn ensure_parent(&mut self, target: &Path, rel: &Path, create: bool) -> Result<()> {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(());
        };
        if self.0.contains(parent) {
            return Ok(());
        }
        let mut current = PathBuf::new();
        for c in parent.components() {
            current.push(c);
            if self.0.contains(&current) {
                continue;
            }
            let full = target.join(&current);
            match std::fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(Error::integrity(format!(
                        "refusing archive entry {}: {} is not a directory (a symlink would be written through)",
                        rel.display(),
                        current.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                    std::fs::create_dir(&full)
                        .map_err(|e| Error::io(format!("create {}", full.display()), e))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io(format!("stat {}", full.display()), e)),
            }
            self.0.insert(current.clone());
        }
        Ok(())
    }

    /// Creates the directory `rel` (its parent exists and is real), or accepts an existing one.
    fn make_dir(&mut self, target: &Path, rel: &Path) -> Result<()> {
        if self.0.contains(rel) {
            return Ok(());
        }
        let dst = target.join(rel);
        match std::fs::create_dir(&dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let m = std::fs::symlink_metadata(&dst)
                    .map_err(|e| Error::io(format!("stat {}", dst.display()), e))?;
                if !m.is_dir() {
                    return Err(Error::integrity(format!(
                        "refusing directory entry {}: a non-directory is already there",
                        rel.display()
                    )));
                }
            }
            Err(e) => return Err(Error::io(format!("create {}", dst.display()), e)),
        }
        self.0.insert(rel.to_path_buf());
        Ok(())
    }
}

/// Whether the directory `dir` holds anything; a missing one holds nothing.
pub fn holds_entries(dir: &Path) -> std::io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the directory `dir` (and its missing ancestors), or accepts an empty one: what a
/// relocated directory's contents are written into holds nothing else.
fn make_empty_dir(dir: &Path) -> Result<()> {
    let io = |e| Error::io(format!("create {}", dir.display()), e);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = std::fs::symlink_metadata(dir).map_err(io)?.is_dir()
                && !holds_entries(dir).map_err(io)?;
            match empty {
                true => Ok(()),
                false => Err(Error::invalid(format!(
                    "{} is no longer an empty directory",
                    dir.display()
                ))),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// A directory entry's mode and mtime, applied once the archive is unpacked.
fn mode_and_mtime(header: &tar::Header) -> Result<(u32, u64)> {
    let read = |e| Error::io("read archive", e);
    Ok((header.mode().map_err(read)?, header.mtime().map_err(read)?))
}

/// Unpacks `reader` (a tar stream) into `target`, which must exist.
pub fn extract(
    reader: impl Read,
    target: &Path,
    opts: &ExtractOptions,
    cancel: &Cancel,
) -> Result<ExtractStats> {
    let target = std::fs::canonicalize(target)
        .map_err(|e| Error::io(format!("restore target {}", target.display()), e))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    archive.set_preserve_ownerships(as_root);
    let mut stats = ExtractStats::default();
    // Directory owners (as root), modes and mtimes are applied last, deepest first, so that
    // read-only directories can still be filled and their mtimes are not changed by their
    // children.
    let mut dirs: Vec<DirAttrs> = Vec::new();
    let mut real_dirs = RealDirs::default();
    let mut relocated_dirs: Vec<RealDirs> =
        opts.relocated.iter().map(|_| RealDirs::default()).collect();
    let mut buf = vec![0u8; crate::store::FILE_WRITE];
    let entries = archive
        .entries()
        .map_err(|e| Error::io("read archive", e))?;
    for entry in entries {
        cancel.check()?;
        let mut entry = entry.map_err(|e| crate::pipeline::damaged("read archive", e))?;
        let rel = safe_relative(&entry.path_bytes(), "entry")?;
        let kind = entry.header().entry_type();
        stats.entries += 1;
        // Below a relocated directory, only directories and files, written under its
        // destination; the directory itself becomes a link to that destination.
        let relocated = opts
            .relocated
            .iter()
            .zip(relocated_dirs.iter_mut())
            .find_map(|((from, to), real)| {
                Some((from, to, rel.strip_prefix(from).ok()?.to_owned(), real))
            });
        let is_dir = kind == tar::EntryType::Directory;
        let is_file = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
        let (root, rel, real) = match relocated {
            Some((from, to, rest, _)) if is_dir && rest.as_os_str().is_empty() => {
                real_dirs.ensure_parent(&target, &rel, true)?;
                make_empty_dir(to)?;
                let link = target.join(from);
                std::os::unix::fs::symlink(to, &link)
                    .map_err(|e| Error::io(format!("link {}", link.display()), e))?;
                dirs.push(DirAttrs::of(to.clone(), entry.header(), as_root)?);
                stats.dirs += 1;
                continue;
            }
            Some((_, to, rest, real)) if is_dir || is_file => (to.as_path(), rest, real),
            Some(_) => {
                return Err(Error::integrity(format!(
                    "refusing archive entry {} of type {kind:?} in a relocated directory",
                    rel.display()
                )))
            }
            None => (target.as_path(), rel, &mut real_dirs),
        };
        real.ensure_parent(root, &rel, true)?;
        match kind {
            tar::EntryType::Directory => {
                real.make_dir(root, &rel)?;
                dirs.push(DirAttrs::of(root.join(&rel), entry.header(), as_root)?);
                stats.dirs += 1;
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                stats.files += 1;
                stats.bytes += entry.size();
                write_file(&mut entry, &root.join(&rel), as_root, &mut buf)?;
                continue;
            }
            tar::EntryType::Symlink => stats.links += 1,
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::integrity(format!("hard link {} has no target", rel.display())))?;
                let link_rel = safe_relative(&link, "hard link target")?;
                real.ensure_parent(root, &link_rel, false)?;
                // Over an earlier restore (--overwrite), the name may be taken: linking
                // does not replace it.
                let dst = root.join(&rel);
                if std::fs::symlink_metadata(&dst).is_ok_and(|m| !m.is_dir()) {
                    std::fs::remove_file(&dst)
                        .map_err(|e| Error::io(format!("replace {}", dst.display()), e))?;
                }
                stats.links += 1;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block if opts.allow_special => {
                // The tar crate would write these as regular files; create the node itself.
                make_special(&root.join(&rel), entry.header(), as_root)?;
                continue;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                return Err(Error::invalid(format!(
                    "refusing special file {} ({:?}): pass --allow-special to restore FIFOs and devices",
                    rel.display(),
                    kind
                )))
            }
            other => {
                return Err(Error::integrity(format!(
                    "refusing archive entry {} of unsupported type {other:?}",
                    rel.display()
                )))
            }
        }
        let unpacked = entry
            .unpack_in(root)
            .map_err(|e| Error::io(format!("restore {}", rel.display()), e))?;
        if !unpacked {
            return Err(Error::integrity(format!(
                "refusing archive entry {}: outside the target",
                rel.display()
            )));
        }
    }
    for DirAttrs {
        path: dst,
        mode,
        mtime,
        owner,
    } in dirs.iter().rev()
    {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(dst, Some(*uid), Some(*gid))
                .map_err(|e| Error::io(format!("chown {}", dst.display()), e))?;
        }
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| Error::io(format!("chmod {}", dst.display()), e))?;
        let t = filetime::FileTime::from_unix_time(*mtime as i64, 0);
        filetime::set_file_mtime(dst, t)
            .map_err(|e| Error::io(format!("set mtime of {}", dst.display()), e))?;
    }
    // On disk before the restore says it is done: the filesystems of the target and of
    // each relocated directory.
    let relocated = opts
        .relocated
        .iter()
        .map(|(_, to)| to)
        .filter(|to| to.is_dir());
    for dir in std::iter::once(&target).chain(relocated) {
        sync_filesystem(dir)?;
    }
    Ok(stats)
}

/// `syncfs` of the filesystem `dir` is on.
fn sync_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let io = |e: std::io::Error| Error::io(format!("sync {}", dir.display()), e);
    let d = std::fs::File::open(dir).map_err(io)?;
    // SAFETY: `d` is an open file descriptor for the call's duration.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes a regular file (its ancestors are known to be real directories): content is copied
/// in large blocks, then mode, owner (as root) and mtime are set on the open file. An
/// existing file is replaced, never followed: the new one is written beside it and renamed
/// over it once whole, so that a failure or a crash leaves one or the other.
fn write_file(
    entry: &mut tar::Entry<'_, impl Read>,
    dst: &Path,
    as_root: bool,
    buf: &mut [u8],
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| Error::io(format!("restore {}", dst.display()), e);
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(dst)
    };
    let (mut file, replacing) = match create() {
        Ok(file) => (file, None),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if std::fs::symlink_metadata(dst).map_err(io)?.is_dir() {
                return Err(Error::integrity(format!(
                    "refusing file entry {}: a directory is already there",
                    dst.display()
                )));
            }
            let dir = dst.parent().unwrap_or(Path::new("."));
            let new = tempfile::Builder::new()
                .prefix(".drctl-restore-")
                .tempfile_in(dir)
                .map_err(io)?;
            // Removed also if a second interrupt ends drctl at once.
            let guard = Temporary::new(new.path().to_owned());
            let (file, path) = new.into_parts();
            (file, Some((path, guard)))
        }
        Err(e) => return Err(io(e)),
    };
    let header = entry.header();
    let mode = header.mode().map_err(io)? & 0o7777;
    let mtime = header.mtime().map_err(io)?;
    let owner = as_root.then(|| owner_of(header)).transpose()?;
    loop {
        let n = entry
            .read(buf)
            .map_err(|e| crate::pipeline::damaged("read archive", e))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(io)?;
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io)?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    // Read as the signed number another tar may have written for a time before 1970.
    let t = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs((mtime as i64).max(0) as u64))
        .unwrap_or(std::time::UNIX_EPOCH);
    file.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
        .map_err(io)?;
    if let Some((path, _guard)) = replacing {
        path.persist(dst).map_err(|e| io(e.error))?;
    }
    Ok(())
}

/// What a directory gets once everything in it is written.
struct DirAttrs {
    path: PathBuf,
    mode: u32,
    mtime: u64,
    /// As root.
    owner: Option<(u32, u32)>,
}

impl DirAttrs {
    fn of(path: PathBuf, header: &tar::Header, as_root: bool) -> Result<DirAttrs> {
        let (mode, mtime) = mode_and_mtime(header)?;
        let owner = as_root.then(|| owner_of(header)).transpose()?;
        Ok(DirAttrs {
            path,
            mode,
            mtime,
            owner,
        })
    }
}

/// The owner an entry's header records.
fn owner_of(header: &tar::Header) -> Result<(u32, u32)> {
    let io = |e: std::io::Error| Error::integrity(format!("bad owner in archive header: {e}"));
    let id = |n: u64| {
        u32::try_from(n).map_err(|_| Error::integrity(format!("owner ID {n} out of range")))
    };
    Ok((
        id(header.uid().map_err(io)?)?,
        id(header.gid().map_err(io)?)?,
    ))
}

/// Creates a FIFO or device node as the header describes (replacing what is there).
fn make_special(dst: &Path, header: &tar::Header, as_root: bool) -> Result<()> {
    use std::ffi::CString;
    let io = |e: std::io::Error| Error::io(format!("create {}", dst.display()), e);
    let mode = header.mode().map_err(io)? & 0o7777;
    let kind = header.entry_type();
    let _ = std::fs::remove_file(dst);
    let c = CString::new(dst.as_os_str().as_bytes()).map_err(|_| Error::invalid("NUL in path"))?;
    let (fmt, dev) = match kind {
        tar::EntryType::Fifo => (libc::S_IFIFO, 0),
        tar::EntryType::Char | tar::EntryType::Block => {
            let major = header.device_major().map_err(io)?.unwrap_or(0);
            let minor = header.device_minor().map_err(io)?.unwrap_or(0);
            let fmt = if kind == tar::EntryType::Char {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            (fmt, libc::makedev(major, minor))
        }
        _ => unreachable!("only special files"),
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::mknod(c.as_ptr(), fmt | mode as libc::mode_t, dev) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    if as_root {
        let (uid, gid) = owner_of(header)?;
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io)?;
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    let mtime = header.mtime().map_err(io)?;
    // Never open a FIFO or device to set its time: utimensat on the path instead.
    let t = filetime::FileTime::from_unix_time(mtime as i64, 0);
    filetime::set_symlink_file_times(dst, t, t).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relocated_directory_goes_only_where_nothing_is() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("a/b/16390");
        make_empty_dir(&at).unwrap();
        make_empty_dir(&at).unwrap();
        std::fs::write(at.join("f"), "").unwrap();
        let e = make_empty_dir(&at).unwrap_err().to_string();
        assert!(e.contains("is no longer an empty directory"), "{e}");
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(make_empty_dir(&dir.path().join("file")).is_err());
    }

    #[test]
    fn relative_paths_are_checked() {
        assert_eq!(
            safe_relative(b"a/./b", "entry").unwrap(),
            PathBuf::from("a/b")
        );
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"a/../../x",
            b"",
            b".",
            b"a\0b",
        ] {
            assert!(
                safe_relative(bad, "entry").is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
