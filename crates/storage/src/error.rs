//! The storage crate's error type.

use meridian_clock::Timestamp;

/// Errors returned by the storage crate, grouped by what the caller must do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is invalid; the caller must fix its input. Deterministic.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A read asked for a timestamp whose versions garbage collection may have removed.
    /// Deterministic: the caller must read at a newer timestamp.
    #[error("cannot read at {read_ts}: versions up to the GC horizon {horizon} may be collected")]
    BelowGcHorizon {
        /// The requested read timestamp.
        read_ts: Timestamp,
        /// The current GC horizon.
        horizon: Timestamp,
    },
    /// Stored bytes do not decode: the data on disk is damaged or was written by something else.
    /// Not deterministic: a node that sees this while applying a command must stop.
    #[error("corruption: {0}")]
    Corruption(String),
    /// The underlying engine failed (disk full, IO error, ...). Not deterministic.
    #[error("storage IO error: {0}")]
    Io(String),
}

impl Error {
    /// Returns whether the error follows from the request alone, so that every replica applying
    /// the same command fails the same way. Non-deterministic errors must crash a replica that
    /// meets them while applying a replicated command.
    pub fn is_deterministic(&self) -> bool {
        matches!(self, Error::InvalidInput(_) | Error::BelowGcHorizon { .. })
    }
}

/// Builds an [`Error::InvalidInput`] from a format string.
#[macro_export]
macro_rules! invalid_input {
    ($($arg:tt)*) => { $crate::Error::InvalidInput(format!($($arg)*)) };
}

/// Builds an [`Error::Corruption`] from a format string.
#[macro_export]
macro_rules! corruption {
    ($($arg:tt)*) => { $crate::Error::Corruption(format!($($arg)*)) };
}

/// A result with the storage crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
