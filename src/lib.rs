//! drctl: backup and disaster recovery.
//!
//! Module map: `format` fixes what is stored, `pipeline`
//! turns bytes into encrypted, verified objects and back, `store` and `registry` are the two
//! backends, `source` produces the bytes, and `backup`, `restore`, `verify` and `gc` are the
//! jobs built from them. `cli` is a thin layer over the jobs.

pub mod backup;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod format;
pub mod gc;
pub mod pipeline;
pub mod registry;
pub mod replicate;
pub mod repo;
pub mod restore;
pub mod source;
pub mod store;
pub mod verify;

pub use error::{Error, ErrorKind, Result};

/// The version recorded in every manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
