//! Fault injection: an engine wrapper whose writes start failing once a byte budget is spent,
//! the way a full disk fails them. Reads keep working. Nodes use it only behind an explicit
//! fault-injection flag, for tests of how they fail.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Engine, ReadView, ScanDirection, ScanIterator, WriteBatch};
use crate::{Error, Result};

/// Wraps an engine; writes fail with an IO error after `budget_bytes` bytes were written.
#[derive(Debug)]
pub struct FaultyEngine<E: Engine> {
    inner: E,
    remaining_bytes: AtomicU64,
}

impl<E: Engine> FaultyEngine<E> {
    /// Returns `inner` with a write budget of `budget_bytes`.
    pub fn new(inner: E, budget_bytes: u64) -> Self {
        FaultyEngine { inner, remaining_bytes: AtomicU64::new(budget_bytes) }
    }

    /// Returns the wrapped engine.
    pub fn inner(&self) -> &E {
        &self.inner
    }
}

impl<E: Engine> ReadView for FaultyEngine<E> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        self.inner.scan(start, end, direction)
    }
}

impl<E: Engine> Engine for FaultyEngine<E> {
    type Snapshot<'a> = E::Snapshot<'a>;

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let size = batch.size_bytes() as u64;
        let spent =
            self.remaining_bytes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |remaining| {
                remaining.checked_sub(size)
            });
        if spent.is_err() {
            return Err(Error::Io("No space left on device (injected fault)".into()));
        }
        self.inner.write(batch, sync)
    }

    fn snapshot(&self) -> Self::Snapshot<'_> {
        self.inner.snapshot()
    }

    fn owned_snapshot(&self) -> super::OwnedSnapshot {
        self.inner.owned_snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryEngine;

    #[test]
    fn writes_fail_whole_once_the_budget_is_spent() {
        let engine = FaultyEngine::new(MemoryEngine::new(), 10);
        engine.put(b"abc", b"defg").unwrap();
        let mut batch = WriteBatch::new();
        batch.put(b"k1".to_vec(), b"v1".to_vec());
        batch.put(b"k2".to_vec(), b"v2".to_vec());
        let error = engine.write(batch, true).unwrap_err();
        assert!(matches!(error, Error::Io(_)), "{error:?}");
        assert!(!error.is_deterministic());
        // Nothing of the failed batch was applied; reads still work.
        assert_eq!(engine.get(b"k1").unwrap(), None);
        assert_eq!(engine.get(b"abc").unwrap(), Some(b"defg".to_vec()));
        // A write that still fits goes through.
        engine.put(b"x", b"y").unwrap();
    }
}
