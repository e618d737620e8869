//! The file index of a file-tree backup: one JSON object per line, one line per tar entry, in
//! archive order. Stored encrypted (`index.zst.age`); deep verification compares it with the
//! archive, and incremental backups diff against it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Hardlink,
    Fifo,
    Char,
    Block,
}

impl EntryType {
    pub fn from_tar(t: tar::EntryType) -> Option<EntryType> {
        Some(match t {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryType::File,
            tar::EntryType::Directory => EntryType::Dir,
            tar::EntryType::Symlink => EntryType::Symlink,
            tar::EntryType::Link => EntryType::Hardlink,
            tar::EntryType::Fifo => EntryType::Fifo,
            tar::EntryType::Char => EntryType::Char,
            tar::EntryType::Block => EntryType::Block,
            _ => return None,
        })
    }
}

/// A path as stored: UTF-8 text when it is valid UTF-8, otherwise hex of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawPath {
    #[serde(rename = "p")]
    Text(String),
    #[serde(rename = "x")]
    Hex(String),
}

impl RawPath {
    pub fn from_bytes(b: &[u8]) -> RawPath {
        match std::str::from_utf8(b) {
            Ok(s) => RawPath::Text(s.to_owned()),
            Err(_) => RawPath::Hex(hex::encode(b)),
        }
    }
    pub fn from_os(s: &OsStr) -> RawPath {
        Self::from_bytes(s.as_bytes())
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            RawPath::Text(s) => s.as_bytes().to_vec(),
            RawPath::Hex(h) => hex::decode(h).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// Path inside the archive (no leading `/`).
    pub path: RawPath,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    /// Bytes of content stored in the archive (0 for everything but files).
    pub size: u64,
    pub mode: u32,
    pub mtime: u64,
    pub uid: u64,
    pub gid: u64,
    /// Symlink target, or the archive path a hard link points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<RawPath>,
}
