//! What drctl stores, and where. This module is the on-disk specification; nothing else builds
//! object keys or parses identifiers.
//!
//! # Object layout
//!
//! Every backup lives under `{environment}/{policy}/{backup_id}/` below the repository root
//! (a directory, or a bucket plus prefix):
//!
//! | object | content |
//! |---|---|
//! | `data.<artifact>.zst.age` | age v1 over zstd over the artifact (`tar`, or the raw stream of a `command` source) |
//! | `index.zst.age` | age v1 over zstd over JSON lines, one per tar entry (file trees only) |
//! | `manifest.json` | plain JSON [`Manifest`](manifest::Manifest): no secrets, no file names |
//!
//! # Write ordering (must)
//!
//! 1. Data objects, then the manifest, then the registry record as `completed`. Each object is
//!    only visible once complete (local: temp file, fsync, rename, fsync directory).
//! 2. Deletion in reverse: mark the record `deleting`, delete objects, remove the record.
//!
//! A reader must treat a backup as present only when its registry record is `completed`;
//! anything else below the repository root is garbage that `drctl gc` may remove.

pub mod id;
pub mod index;
pub mod layout;
pub mod manifest;

pub use id::{BackupId, Name};
pub use layout::{ObjectKey, ObjectName};
pub use manifest::Manifest;
