//! Stable log storage: the [`Storage`] trait Raft reads its persisted log through, and
//! [`MemStorage`], an in-memory implementation for tests and simulation.
//!
//! Raft never writes storage itself. The application persists each [`crate::Ready`] — snapshot,
//! then entries (replacing any stored entries at and after the first new index), then hard
//! state — and only then calls [`crate::RawNode::advance`]. The node crate implements the trait
//! over RocksDB.

use crate::{Entry, Error, HardState, LogIndex, Result, Snapshot, SnapshotMetadata, Term};

/// Read access to a node's persisted Raft state.
///
/// Invariants an implementation keeps:
/// - Entries are contiguous from `first_index()` to `last_index()`.
/// - `first_index() == snapshot_metadata().index + 1`: entries up to the snapshot are compacted.
/// - `term(snapshot_metadata().index)` answers the snapshot's term.
pub trait Storage {
    /// Returns the persisted hard state.
    fn hard_state(&self) -> HardState;

    /// Returns the metadata of the latest snapshot (index 0 and the initial configuration in a
    /// new group).
    fn snapshot_metadata(&self) -> SnapshotMetadata;

    /// Returns the latest snapshot, to send to a lagging follower.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] if it cannot be read.
    fn snapshot(&self) -> Result<Snapshot>;

    /// Returns the index of the first stored entry.
    fn first_index(&self) -> LogIndex {
        self.snapshot_metadata().index.next()
    }

    /// Returns the index of the last stored entry, or the snapshot's index if there is none.
    fn last_index(&self) -> LogIndex;

    /// Returns the term of the entry at `index`.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] below the snapshot index; [`Error::Storage`] past the last index or
    /// on read failure.
    fn term(&self, index: LogIndex) -> Result<Term>;

    /// Returns entries in `[low, high)`, at least one if the range is non-empty, and otherwise
    /// stopping before `max_bytes` is exceeded.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] if `low` was compacted; [`Error::Storage`] on read failure.
    fn entries(&self, low: LogIndex, high: LogIndex, max_bytes: usize) -> Result<Vec<Entry>>;
}

/// An in-memory [`Storage`]. "Persisting" means calling its mutators; a simulated crash keeps a
/// `MemStorage` and drops the [`crate::RawNode`] around it.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
}

impl MemStorage {
    /// Returns storage for a new group member whose initial configuration is `config` (empty
    /// for a node that will join an existing group).
    pub fn new(config: crate::Configuration) -> Self {
        let mut storage = MemStorage::default();
        storage.snapshot.metadata.config = config;
        storage
    }

    /// Persists entries: removes stored entries at and after `entries[0].index`, then appends.
    ///
    /// # Panics
    ///
    /// If the entries would leave a gap or overwrite the snapshot: the caller must persist
    /// exactly what `Ready` handed it.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let snapshot_index = self.snapshot.metadata.index;
        assert!(first.index > snapshot_index, "append at {} overwrites the snapshot", first.index);
        assert!(first.index <= self.last_index().next(), "append at {} leaves a gap", first.index);
        let keep = (first.index.0 - snapshot_index.0 - 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Persists the hard state.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// Installs a snapshot received from the leader, replacing the whole log.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        self.hard_state.commit = self.hard_state.commit.max(snapshot.metadata.index);
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// Records a snapshot of the application's state and discards the entries it covers.
    ///
    /// # Panics
    ///
    /// If the snapshot is older than the current one or beyond the last entry.
    pub fn compact(&mut self, snapshot: Snapshot) {
        let index = snapshot.metadata.index;
        assert!(index >= self.snapshot.metadata.index, "compaction must move forward");
        assert!(index <= self.last_index(), "compaction beyond the last entry");
        let drop = (index.0 - self.snapshot.metadata.index.0) as usize;
        self.entries.drain(..drop);
        self.snapshot = snapshot;
    }

    /// Returns every stored entry (for checks in tests).
    pub fn stored_entries(&self) -> &[Entry] {
        &self.entries
    }
}

impl Storage for MemStorage {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }

    fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.snapshot.metadata.clone()
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.snapshot.clone())
    }

    fn last_index(&self) -> LogIndex {
        self.entries.last().map_or(self.snapshot.metadata.index, |entry| entry.index)
    }

    fn term(&self, index: LogIndex) -> Result<Term> {
        let snapshot_index = self.snapshot.metadata.index;
        if index == snapshot_index {
            return Ok(self.snapshot.metadata.term);
        }
        if index < snapshot_index {
            return Err(Error::Compacted(snapshot_index));
        }
        let offset = (index.0 - snapshot_index.0 - 1) as usize;
        self.entries
            .get(offset)
            .map(|entry| entry.term)
            .ok_or_else(|| Error::Storage(format!("no entry at index {index}")))
    }

    fn entries(&self, low: LogIndex, high: LogIndex, max_bytes: usize) -> Result<Vec<Entry>> {
        let snapshot_index = self.snapshot.metadata.index;
        if low <= snapshot_index {
            return Err(Error::Compacted(snapshot_index));
        }
        if high > self.last_index().next() {
            return Err(Error::Storage(format!(
                "entries up to {high} requested, last is {}",
                self.last_index()
            )));
        }
        let (start, end) =
            ((low.0 - snapshot_index.0 - 1) as usize, (high.0 - snapshot_index.0 - 1) as usize);
        Ok(limit_size(&self.entries[start..end.max(start)], max_bytes))
    }
}

/// Returns the longest prefix of `entries` within `max_bytes`, but at least one entry.
fn limit_size(entries: &[Entry], max_bytes: usize) -> Vec<Entry> {
    let mut size = 0;
    let mut taken = Vec::new();
    for entry in entries {
        size += entry.size_bytes();
        if !taken.is_empty() && size > max_bytes {
            break;
        }
        taken.push(entry.clone());
    }
    taken
}
