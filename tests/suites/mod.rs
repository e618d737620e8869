//! Backend test suites: one generic set of tests per trait, run against every implementation
//! (as restic's `internal/backend/test` does). `tests/backends.rs` instantiates them.

pub mod registry;
pub mod store;
