//! One error type for the harness: a message that says what failed, with its causes.
//!
//! Test support code fails in many ways (a missing QEMU, a QMP timeout, a ferry binary
//! that does not build); what matters in a red CI log is a sentence naming the step and
//! carrying QEMU's or ferry's own stderr. So the error is a string built up with
//! [`Context::context`], not an enum nobody matches on.

use std::fmt;

/// What went wrong, outermost step first (`step: cause: cause`).
#[derive(Debug)]
pub struct Error {
    message: String,
}

/// Result alias used throughout the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message and no further cause.
    pub fn msg(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::msg(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::msg(e.to_string())
    }
}

/// Prefix an error with the step that was being attempted.
pub trait Context<T> {
    /// Wrap the error as `what: cause`.
    fn context(self, what: impl fmt::Display) -> Result<T>;
    /// Like [`Context::context`], building the message only on error.
    fn with_context<F, D>(self, what: F) -> Result<T>
    where
        F: FnOnce() -> D,
        D: fmt::Display;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::msg(format!("{what}: {e}")))
    }

    fn with_context<F, D>(self, what: F) -> Result<T>
    where
        F: FnOnce() -> D,
        D: fmt::Display,
    {
        self.map_err(|e| Error::msg(format!("{}: {e}", what())))
    }
}

/// Return early with an [`Error`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::msg(format!($($arg)*)))
    };
}
