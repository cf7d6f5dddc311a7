//! The clock crate's error type.

/// Errors returned by the clock crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range; the caller must fix its input.
    #[error("invalid clock configuration: {0}")]
    InvalidInput(String),
    /// Commit-wait did not finish within its deadline: the local clock stalled or was stepped
    /// backwards. The caller must not acknowledge the commit it was waiting for.
    #[error("commit-wait for {commit_ts} did not finish within {waited_ms} ms: {reason}")]
    CommitWaitStalled {
        /// The commit timestamp that was being waited out.
        commit_ts: crate::Timestamp,
        /// How long the wait lasted before it gave up, in milliseconds.
        waited_ms: u64,
        /// Why the wait gave up.
        reason: String,
    },
}

/// A result with the clock crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
