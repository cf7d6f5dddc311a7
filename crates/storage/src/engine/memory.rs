//! An in-memory [`Engine`] for tests and deterministic simulation.
//!
//! The data lives in a persistent ordered map (`imbl::OrdMap`) behind a lock: a snapshot or a
//! scan clones the map in O(1) and shares structure with it, so readers never block writers and
//! always see one consistent state. Nothing is durable; `sync` is accepted and ignored.

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;
use parking_lot::RwLock;

use super::{
    Engine, KeyValue, OwnedSnapshot, ReadView, ScanDirection, ScanIterator, WriteBatch, WriteOp,
};
use crate::Result;

/// An in-memory engine. Cheap to clone; clones share the data.
#[derive(Clone, Debug, Default)]
pub struct MemoryEngine {
    data: Arc<RwLock<OrdMap<Vec<u8>, Vec<u8>>>>,
}

impl MemoryEngine {
    /// Returns an empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the number of keys stored.
    pub fn len(&self) -> usize {
        self.data.read().len()
    }

    /// Returns whether the engine holds no key.
    pub fn is_empty(&self) -> bool {
        self.data.read().is_empty()
    }
}

/// A snapshot of a [`MemoryEngine`]: an O(1) clone of its map.
#[derive(Clone, Debug)]
pub struct MemorySnapshot {
    data: OrdMap<Vec<u8>, Vec<u8>>,
}

impl ReadView for MemorySnapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.data.get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        Box::new(MemoryScan::new(self.data.clone(), start, end, direction))
    }
}

impl ReadView for MemoryEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.data.read().get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        Box::new(MemoryScan::new(self.data.read().clone(), start, end, direction))
    }
}

impl Engine for MemoryEngine {
    type Snapshot<'a> = MemorySnapshot;

    fn owned_snapshot(&self) -> OwnedSnapshot {
        Box::new(self.snapshot())
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<()> {
        let mut data = self.data.write();
        for op in batch.ops {
            match op {
                WriteOp::Put { key, value } => {
                    data.insert(key, value);
                }
                WriteOp::Delete { key } => {
                    data.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot { data: self.data.read().clone() }
    }
}

/// A scan over an owned clone of the map. Each step looks up the next key past the last one
/// returned (O(log n)), which avoids an iterator that borrows the map it owns.
struct MemoryScan {
    data: OrdMap<Vec<u8>, Vec<u8>>,
    lower: Bound<Vec<u8>>,
    upper: Bound<Vec<u8>>,
    direction: ScanDirection,
    done: bool,
}

impl MemoryScan {
    fn new(
        data: OrdMap<Vec<u8>, Vec<u8>>,
        start: &[u8],
        end: Option<&[u8]>,
        direction: ScanDirection,
    ) -> Self {
        let upper = end.map_or(Bound::Unbounded, |end| Bound::Excluded(end.to_vec()));
        let done = end.is_some_and(|end| start >= end);
        MemoryScan { data, lower: Bound::Included(start.to_vec()), upper, direction, done }
    }

    /// Returns whether the bounds still enclose at least one possible key.
    fn bounds_nonempty(&self) -> bool {
        match (&self.lower, &self.upper) {
            (Bound::Included(lower), Bound::Excluded(upper)) => lower < upper,
            (Bound::Excluded(lower), Bound::Excluded(upper)) => lower < upper,
            _ => true,
        }
    }
}

impl Iterator for MemoryScan {
    type Item = Result<KeyValue>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || !self.bounds_nonempty() {
            self.done = true;
            return None;
        }
        let mut range = self.data.range((self.lower.clone(), self.upper.clone()));
        let entry = match self.direction {
            ScanDirection::Forward => range.next(),
            ScanDirection::Reverse => range.next_back(),
        };
        let Some((key, value)) = entry else {
            self.done = true;
            return None;
        };
        let (key, value) = (key.clone(), value.clone());
        match self.direction {
            ScanDirection::Forward => self.lower = Bound::Excluded(key.clone()),
            ScanDirection::Reverse => self.upper = Bound::Excluded(key.clone()),
        }
        Some(Ok((key, value)))
    }
}
