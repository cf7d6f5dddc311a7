//! An in-memory [`Engine`] for tests and deterministic simulation.
//!
//! The data lives in a persistent ordered map (`imbl::OrdMap`) behind a lock: a snapshot or a
//! scan clones the map in O(1) and shares structure with it, so readers never block writers and
//! always see one consistent state.
//!
//! By default nothing is durable and `sync` is accepted and ignored: the data lives as long as
//! the engine, as a disk outlives a process crash. An engine made with
//! [`MemoryEngine::with_durability`] also models *power loss*, for simulations: it remembers
//! the state its last synced write made durable and the unsynced batches written since, and
//! [`MemoryEngine::lose_unsynced_writes`] reverts to that state plus a prefix of those batches,
//! as a write-ahead log whose unsynced tail is lost (a synced write makes every earlier write
//! durable too, as one fsync of RocksDB's log does).
//!
//! Invariants of an engine with durability:
//! - `data` equals `durable` with the batches of `unsynced` applied in order;
//! - a batch is lost whole or not at all, and never one written before a batch that survives.

use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;
use parking_lot::{Mutex, RwLock};

use super::{
    Engine, KeyValue, OwnedSnapshot, ReadView, ScanDirection, ScanIterator, WriteBatch, WriteOp,
};
use crate::Result;

/// An in-memory engine. Cheap to clone; clones share the data.
#[derive(Clone, Debug, Default)]
pub struct MemoryEngine {
    data: Arc<RwLock<OrdMap<Vec<u8>, Vec<u8>>>>,
    /// What survives a power loss, for engines made with [`MemoryEngine::with_durability`].
    durability: Option<Arc<Mutex<Durability>>>,
}

/// What a power loss would leave of a [`MemoryEngine`].
#[derive(Debug, Default)]
struct Durability {
    /// The state the last synced write made durable.
    durable: OrdMap<Vec<u8>, Vec<u8>>,
    /// The batches written unsynced since, in order.
    unsynced: Vec<WriteBatch>,
}

impl MemoryEngine {
    /// Returns an empty engine whose data survives as long as the engine does (`sync` is
    /// ignored).
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns an empty engine that tracks which writes are durable, so that a simulation can
    /// cut its power ([`MemoryEngine::lose_unsynced_writes`]). It keeps every batch written
    /// unsynced until the next synced write.
    pub fn with_durability() -> Self {
        MemoryEngine {
            data: Arc::default(),
            durability: Some(Arc::new(Mutex::new(Durability::default()))),
        }
    }

    /// Returns how many batches were written unsynced since the last synced write (0 for an
    /// engine that does not track durability).
    pub fn unsynced_batches(&self) -> usize {
        self.durability.as_ref().map_or(0, |durability| durability.lock().unsynced.len())
    }

    /// Simulates a power loss: reverts to the state the last synced write made durable plus the
    /// first `keep` batches written unsynced since (all of them if fewer); the rest are lost.
    /// Returns how many batches were lost. The caller must make sure that nothing uses the
    /// engine meanwhile (the simulated node is down).
    ///
    /// # Panics
    ///
    /// If the engine was not made with [`MemoryEngine::with_durability`]: it cannot tell what
    /// was durable.
    pub fn lose_unsynced_writes(&self, keep: usize) -> usize {
        let durability = self
            .durability
            .as_ref()
            .expect("lose_unsynced_writes needs an engine made with MemoryEngine::with_durability");
        let mut data = self.data.write();
        let mut durability = durability.lock();
        let unsynced = std::mem::take(&mut durability.unsynced);
        let lost = unsynced.len().saturating_sub(keep);
        let mut state = durability.durable.clone();
        for batch in unsynced.into_iter().take(keep) {
            apply(&mut state, batch);
        }
        durability.durable = state.clone();
        *data = state;
        lost
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

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut data = self.data.write();
        match &self.durability {
            None => apply(&mut data, batch),
            Some(durability) => {
                let mut durability = durability.lock();
                if sync {
                    apply(&mut data, batch);
                    durability.durable = data.clone();
                    durability.unsynced.clear();
                } else {
                    apply(&mut data, batch.clone());
                    durability.unsynced.push(batch);
                }
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot { data: self.data.read().clone() }
    }
}

/// Applies `batch` to `data`, in order.
fn apply(data: &mut OrdMap<Vec<u8>, Vec<u8>>, batch: WriteBatch) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ops: &[(&str, Option<&str>)]) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for (key, value) in ops {
            match value {
                Some(value) => batch.put(key.as_bytes(), value.as_bytes()),
                None => batch.delete(key.as_bytes()),
            }
        }
        batch
    }

    fn contents(engine: &MemoryEngine) -> Vec<(String, String)> {
        engine
            .scan(b"", None, ScanDirection::Forward)
            .map(|entry| {
                let (key, value) = entry.unwrap();
                (String::from_utf8(key).unwrap(), String::from_utf8(value).unwrap())
            })
            .collect()
    }

    #[test]
    fn power_loss_keeps_synced_writes_and_a_prefix_of_the_rest() {
        // (writes as (batch, synced), batches kept, expected contents, batches lost)
        type Case = (Vec<(WriteBatch, bool)>, usize, Vec<(&'static str, &'static str)>, usize);
        let cases: Vec<Case> = vec![
            (vec![], 0, vec![], 0),
            (vec![(batch(&[("a", Some("1"))]), false)], 0, vec![], 1),
            (vec![(batch(&[("a", Some("1"))]), true)], 0, vec![("a", "1")], 0),
            // A synced write makes the unsynced ones before it durable too.
            (
                vec![(batch(&[("a", Some("1"))]), false), (batch(&[("b", Some("2"))]), true)],
                0,
                vec![("a", "1"), ("b", "2")],
                0,
            ),
            (
                vec![
                    (batch(&[("a", Some("1"))]), true),
                    (batch(&[("a", None), ("b", Some("2"))]), false),
                    (batch(&[("c", Some("3"))]), false),
                ],
                1,
                vec![("b", "2")],
                1,
            ),
            (
                vec![(batch(&[("a", Some("1"))]), true), (batch(&[("a", Some("2"))]), false)],
                5,
                vec![("a", "2")],
                0,
            ),
        ];
        for (index, (writes, keep, expected, lost)) in cases.into_iter().enumerate() {
            let engine = MemoryEngine::with_durability();
            for (batch, sync) in writes {
                engine.write(batch, sync).unwrap();
            }
            assert_eq!(engine.lose_unsynced_writes(keep), lost, "case {index}");
            let expected: Vec<(String, String)> =
                expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            assert_eq!(contents(&engine), expected, "case {index}");
            // What survived is durable now: a second power loss changes nothing.
            assert_eq!(engine.unsynced_batches(), 0);
            assert_eq!(engine.lose_unsynced_writes(0), 0);
            assert_eq!(contents(&engine), expected, "case {index}");
        }
    }

    #[test]
    fn engines_without_durability_ignore_sync() {
        let engine = MemoryEngine::new();
        engine.write(batch(&[("a", Some("1"))]), false).unwrap();
        assert_eq!(engine.unsynced_batches(), 0);
        assert_eq!(contents(&engine), vec![("a".to_string(), "1".to_string())]);
    }

    #[test]
    #[should_panic(expected = "with_durability")]
    fn power_loss_needs_durability_tracking() {
        MemoryEngine::new().lose_unsynced_writes(0);
    }
}
