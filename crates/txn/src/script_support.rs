//! Helpers shared by the golden-script runners of this crate's tests.

use std::error::Error as StdError;

use crate::{RangeId, TxnId};

/// The result type of the script runners.
pub(crate) type ScriptResult<T> = std::result::Result<T, Box<dyn StdError>>;

/// Takes the numeric argument `key=N`, if given.
pub(crate) fn take_u64(
    args: &mut goldenscript::ArgumentConsumer<'_>,
    key: &str,
) -> ScriptResult<Option<u64>> {
    Ok(match args.take_key(key) {
        Some(value) => Some(value.parse()?),
        None => None,
    })
}

/// Parses a transaction written `tN`.
pub(crate) fn parse_txn(text: &str) -> ScriptResult<TxnId> {
    let number = text.strip_prefix('t').ok_or_else(|| format!("expected tN, got {text}"))?;
    Ok(TxnId(number.parse()?))
}

/// Parses a range written `rN`.
pub(crate) fn parse_range(text: &str) -> ScriptResult<RangeId> {
    let number = text.strip_prefix('r').ok_or_else(|| format!("expected rN, got {text}"))?;
    Ok(RangeId(number.parse()?))
}

/// Writes a transaction as scripts do: `tN`.
pub(crate) fn show_txn(txn: TxnId) -> String {
    format!("t{}", txn.0)
}
