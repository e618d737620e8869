//! The public error type: a kind (which maps to a documented exit code), a message that names
//! what failed, and guidance that tells the user what to do next.

use std::fmt;

/// What went wrong, at the granularity scripts care about. Each kind has a fixed exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything not covered below (I/O, a failed source, an internal error).
    Failure,
    /// Invalid command line, config, policy or identifier.
    InvalidInput,
    /// Some but not all of the requested work succeeded.
    Partial,
    /// Stored data is missing, truncated, tampered with or does not match its checksum.
    Integrity,
    /// Repository, registry or backup not found (or not initialised).
    NotFound,
    /// A lease (lock) is held by someone else.
    Locked,
    /// None of the available identities can decrypt the backup.
    WrongKey,
    /// The run was interrupted (SIGINT/SIGTERM).
    Cancelled,
}

impl ErrorKind {
    /// The process exit code documented in the README.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failure => 1,
            ErrorKind::InvalidInput => 2,
            ErrorKind::Partial => 3,
            ErrorKind::Integrity => 4,
            ErrorKind::NotFound => 10,
            ErrorKind::Locked => 11,
            ErrorKind::WrongKey => 12,
            ErrorKind::Cancelled => 130,
        }
    }

    /// A stable, machine-readable name used in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Failure => "failure",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Partial => "partial",
            ErrorKind::Integrity => "integrity",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Locked => "locked",
            ErrorKind::WrongKey => "wrong_key",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

/// An error with a kind, a message, optional guidance and whether retrying may help.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
    retryable: bool,
    /// An exit code other than the kind's, for a caller with its own convention.
    exit_code: Option<i32>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
            exit_code: None,
            retryable: false,
        }
    }
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failure, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    pub fn integrity(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Integrity, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "cancelled")
    }

    /// Adds guidance: what the user can do next.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// Marks the error as transient: running the same command again may succeed.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }
    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn guidance(&self) -> Option<&str> {
        self.hint.as_deref()
    }
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
    /// Exits with `code` instead of the kind's.
    pub fn with_exit_code(mut self, code: i32) -> Self {
        self.exit_code = Some(code);
        self
    }
    /// The process exit code: the kind's unless set.
    pub fn exit_code(&self) -> i32 {
        self.exit_code.unwrap_or_else(|| self.kind.exit_code())
    }

    /// Wraps an I/O error with what was being done. `Interrupted` by our own cancellation maps
    /// to `Cancelled`.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        if let Some(inner) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            return Error {
                kind: inner.kind,
                message: format!("{what}: {}", inner.message),
                hint: inner.hint.clone(),
                retryable: inner.retryable,
                exit_code: inner.exit_code,
            };
        }
        Error::failure(format!("{what}: {err}"))
    }

    /// Carries this error through an `std::io::Error` (for `Read`/`Write` adapters) so that
    /// [`Error::io`] can recover its kind on the other side.
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        let retryable = matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_));
        let err = Error::failure(format!("registry: {e}"));
        if retryable {
            err.retryable()
        } else {
            err
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::failure(format!("json: {e}"))
    }
}
