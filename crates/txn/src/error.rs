//! The transaction crate's error type, grouped by what the caller must do: retry the
//! transaction (with its old priority), or fix its input.

use crate::{Epoch, KeySpan, TxnId};

/// Errors of the transaction protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An older transaction needed a lock this one held: this one must abort and retry.
    #[error(
        "transaction {txn} was wounded by older transaction {by}, which requested a conflicting \
         {requested} lock on {span}"
    )]
    Wounded {
        /// The wounded transaction.
        txn: TxnId,
        /// The older transaction that wounded it.
        by: TxnId,
        /// The span the older transaction requested.
        span: KeySpan,
        /// The mode it requested, as text ("shared" or "exclusive").
        requested: &'static str,
    },
    /// The transaction's locks at this range are gone: the leader changed, or the leader
    /// released them because the transaction sent nothing for too long. It must abort and
    /// retry; it never commits on reads it no longer holds locks for.
    #[error("transaction {txn} lost its locks at this range: {reason}")]
    LocksLost {
        /// The transaction.
        txn: TxnId,
        /// Why, for the message.
        reason: String,
    },
    /// The request is invalid; the caller must fix it.
    #[error("invalid transaction request: {0}")]
    InvalidInput(String),
}

impl Error {
    /// Returns whether the transaction may be retried (SQLSTATE 40001 at the SQL edge).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Wounded { .. } | Error::LocksLost { .. })
    }

    /// The error for a transaction whose locks were taken under `held` while the table is at
    /// `current`.
    pub(crate) fn epoch_changed(txn: TxnId, held: Epoch, current: Epoch) -> Error {
        Error::LocksLost {
            txn,
            reason: format!(
                "they were taken under leadership epoch {held}, the range is now at epoch \
                 {current}"
            ),
        }
    }
}

/// A result with the transaction crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Returns an [`Error::InvalidInput`] with a formatted message.
macro_rules! invalid_input {
    ($($arg:tt)*) => {
        $crate::Error::InvalidInput(format!($($arg)*))
    };
}
pub(crate) use invalid_input;
