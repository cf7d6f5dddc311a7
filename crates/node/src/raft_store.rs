//! The persistent Raft log of one range replica.
//!
//! Layout, under the engine's Raft key space (`keyspace::RAFT`), per range:
//!
//! | key                                 | value                          |
//! |-------------------------------------|--------------------------------|
//! | `RAFT ‖ range ‖ 0x01`               | hard state (protobuf)          |
//! | `RAFT ‖ range ‖ 0x02`               | truncated state: the metadata of the compaction point (protobuf `SnapshotMetadata`) |
//! | `RAFT ‖ range ‖ 0x03 ‖ index`       | entry (protobuf)               |
//!
//! Numbers are big-endian so that entries scan in index order. Writes are staged into a
//! [`WriteBatch`] ([`RaftLogStore::stage`]); the caller writes the batch (synced, together with
//! other ranges' batches) and then calls [`RaftLogStore::on_persisted`], which updates the
//! cached positions. Invariants:
//!
//! - Stored entries are contiguous from `truncated.index + 1` to `last_index`.
//! - The caches (`hard_state`, `truncated`, `last_index`) equal what is on disk whenever no
//!   staged batch is outstanding.
//!
//! Snapshots to send are produced on demand by a [`SnapshotSource`] (the range's state machine
//! at its applied index), not stored: a snapshot of live data is always fresher than a stored
//! one.

use std::sync::Arc;

use meridian_raft::{
    Entry, Error as RaftError, HardState, LogIndex, Ready, Result as RaftResult, Snapshot,
    SnapshotMetadata, Storage, Term,
};
use meridian_rpc::raft as wire;
use meridian_storage::{Engine, ScanDirection, WriteBatch, keyspace};
use prost::Message as _;

/// Identifies a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeId(pub u64);

/// Produces a snapshot of a range's state machine for a lagging follower.
pub trait SnapshotSource: Send + Sync {
    /// Returns a snapshot of the state machine at its applied index.
    ///
    /// # Errors
    ///
    /// [`RaftError::Storage`] if the state cannot be read.
    fn snapshot(&self) -> RaftResult<Snapshot>;
}

const HARD_STATE: u8 = 0x01;
const TRUNCATED_STATE: u8 = 0x02;
const ENTRY: u8 = 0x03;
/// The range's applied state (written by the state machine, see `state_machine.rs`).
pub(crate) const APPLIED_STATE: u8 = 0x04;
/// Present once a replica of the range on this node was destroyed.
const TOMBSTONE: u8 = 0x05;

fn range_prefix(range: RangeId) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.push(keyspace::RAFT);
    key.extend_from_slice(&range.0.to_be_bytes());
    key
}

pub(crate) fn state_key(range: RangeId, kind: u8) -> Vec<u8> {
    let mut key = range_prefix(range);
    key.push(kind);
    key
}

fn entry_key(range: RangeId, index: LogIndex) -> Vec<u8> {
    let mut key = state_key(range, ENTRY);
    key.extend_from_slice(&index.0.to_be_bytes());
    key
}

fn storage_error(error: impl std::fmt::Display) -> RaftError {
    RaftError::Storage(error.to_string())
}

fn decode_entry(bytes: &[u8]) -> RaftResult<Entry> {
    let entry = wire::Entry::decode(bytes).map_err(storage_error)?;
    Entry::try_from(&entry).map_err(storage_error)
}

/// What [`RaftLogStore::stage`] wrote, to be confirmed with [`RaftLogStore::on_persisted`] once
/// the batch is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedReady {
    hard_state: Option<HardState>,
    truncated: Option<SnapshotMetadata>,
    last_index: Option<LogIndex>,
}

/// The persistent Raft log of one range replica. See the module docs.
pub struct RaftLogStore<E: Engine> {
    engine: Arc<E>,
    range: RangeId,
    source: Arc<dyn SnapshotSource>,
    hard_state: HardState,
    truncated: SnapshotMetadata,
    last_index: LogIndex,
}

impl<E: Engine> std::fmt::Debug for RaftLogStore<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLogStore")
            .field("range", &self.range)
            .field("hard_state", &self.hard_state)
            .field("truncated", &self.truncated)
            .field("last_index", &self.last_index)
            .finish()
    }
}

/// Stages the Raft state of a replica that starts from a state machine at `metadata` (a range
/// created by cluster initialization or a split): an empty log compacted up to there, with
/// `hard_state` (which commits at least that far). A replica added later cannot replay what
/// came before, so it is sent a snapshot.
pub fn stage_new_replica(
    range: RangeId,
    metadata: &SnapshotMetadata,
    hard_state: HardState,
    batch: &mut WriteBatch,
) {
    batch.put(
        state_key(range, TRUNCATED_STATE),
        wire::SnapshotMetadata::from(metadata).encode_to_vec(),
    );
    let hard_state = HardState { commit: hard_state.commit.max(metadata.index), ..hard_state };
    batch.put(state_key(range, HARD_STATE), wire::HardState::from(&hard_state).encode_to_vec());
}

/// Stages the removal of a replica's Raft state (log, truncation point, applied state), keeping
/// its term and vote as a tombstone: a replica created again later on this node must not vote
/// twice in a term. Returns how many keys it deletes.
///
/// # Errors
///
/// [`RaftError::Storage`] if the engine fails.
pub fn stage_destroy_replica<E: Engine>(
    engine: &E,
    range: RangeId,
    batch: &mut WriteBatch,
) -> RaftResult<usize> {
    let start = range_prefix(range);
    let end = keyspace::prefix_end(&start);
    let mut deleted = 0;
    let mut hard_state = HardState::default();
    for entry in engine.scan(&start, end.as_deref(), ScanDirection::Forward) {
        let (key, value) = entry.map_err(storage_error)?;
        if key == state_key(range, HARD_STATE) {
            hard_state =
                (&wire::HardState::decode(value.as_slice()).map_err(storage_error)?).into();
        }
        batch.delete(key);
        deleted += 1;
    }
    let tombstone = HardState { commit: meridian_raft::LogIndex(0), ..hard_state };
    batch.put(state_key(range, HARD_STATE), wire::HardState::from(&tombstone).encode_to_vec());
    batch.put(state_key(range, TOMBSTONE), Vec::new());
    Ok(deleted)
}

/// Returns the hard state stored for `range` (a replica's, or a destroyed one's tombstone), if
/// any.
///
/// # Errors
///
/// [`RaftError::Storage`] if the engine fails or holds an undecodable hard state.
pub fn stored_hard_state<E: Engine>(engine: &E, range: RangeId) -> RaftResult<Option<HardState>> {
    match engine.get(&state_key(range, HARD_STATE)).map_err(storage_error)? {
        Some(bytes) => {
            Ok(Some((&wire::HardState::decode(bytes.as_slice()).map_err(storage_error)?).into()))
        }
        None => Ok(None),
    }
}

/// Whether a replica of `range` on this node was destroyed at some point: a replica created
/// for the range again has forgotten a log that may have been part of a quorum.
///
/// # Errors
///
/// [`RaftError::Storage`] if the engine fails.
pub fn was_destroyed<E: Engine>(engine: &E, range: RangeId) -> RaftResult<bool> {
    Ok(engine.get(&state_key(range, TOMBSTONE)).map_err(storage_error)?.is_some())
}

/// Whether `engine` holds a replica of `range`.
///
/// # Errors
///
/// [`RaftError::Storage`] if the engine fails.
pub fn has_replica<E: Engine>(engine: &E, range: RangeId) -> RaftResult<bool> {
    Ok(engine.get(&state_key(range, TRUNCATED_STATE)).map_err(storage_error)?.is_some())
}

/// Returns the ranges that have a replica in `engine` (every replica stores its truncated
/// state from the moment it is created), in id order. Seeks once per range.
///
/// # Errors
///
/// [`RaftError::Storage`] if the engine fails.
pub fn stored_ranges<E: Engine>(engine: &E) -> RaftResult<Vec<RangeId>> {
    let mut ranges = Vec::new();
    let end = [keyspace::RAFT + 1];
    let mut from = vec![keyspace::RAFT];
    while let Some(entry) = engine.scan(&from, Some(&end), ScanDirection::Forward).next() {
        let (key, _) = entry.map_err(storage_error)?;
        let Some(id) = key.get(1..9).and_then(|bytes| bytes.try_into().ok()) else {
            return Err(RaftError::Storage(format!("invalid raft key {key:x?}")));
        };
        let id = u64::from_be_bytes(id);
        if engine.get(&state_key(RangeId(id), TRUNCATED_STATE)).map_err(storage_error)?.is_some() {
            ranges.push(RangeId(id));
        }
        match id.checked_add(1) {
            Some(next) => from = range_prefix(RangeId(next)),
            None => break,
        }
    }
    Ok(ranges)
}

impl<E: Engine> RaftLogStore<E> {
    /// Opens the log of `range`, or creates it with `initial` as the configuration at index 0
    /// if the engine holds none.
    ///
    /// # Errors
    ///
    /// [`RaftError::Storage`] if the engine fails or holds undecodable state.
    pub fn open(
        engine: Arc<E>,
        range: RangeId,
        initial: SnapshotMetadata,
        source: Arc<dyn SnapshotSource>,
    ) -> RaftResult<Self> {
        let hard_state = stored_hard_state(&*engine, range)?.unwrap_or_default();
        let truncated =
            match engine.get(&state_key(range, TRUNCATED_STATE)).map_err(storage_error)? {
                Some(bytes) => {
                    let metadata =
                        wire::SnapshotMetadata::decode(bytes.as_slice()).map_err(storage_error)?;
                    SnapshotMetadata::try_from(&metadata).map_err(storage_error)?
                }
                None => {
                    let mut batch = WriteBatch::new();
                    batch.put(
                        state_key(range, TRUNCATED_STATE),
                        wire::SnapshotMetadata::from(&initial).encode_to_vec(),
                    );
                    engine.write(batch, true).map_err(storage_error)?;
                    initial
                }
            };
        let entries_start = state_key(range, ENTRY);
        let entries_end = state_key(range, ENTRY + 1);
        let last_index =
            match engine.scan(&entries_start, Some(&entries_end), ScanDirection::Reverse).next() {
                Some(entry) => decode_entry(&entry.map_err(storage_error)?.1)?.index,
                None => truncated.index,
            };
        Ok(RaftLogStore { engine, range, source, hard_state, truncated, last_index })
    }

    /// Returns the range this log belongs to.
    pub fn range(&self) -> RangeId {
        self.range
    }

    /// Stages what `ready` asks to persist (a received snapshot's truncation point, entries
    /// replacing any stored suffix, the hard state) into `batch`. The state machine data of a
    /// snapshot is the caller's to stage.
    pub fn stage(&self, ready: &Ready, batch: &mut WriteBatch) -> StagedReady {
        let mut staged = StagedReady { hard_state: None, truncated: None, last_index: None };
        let mut last_index = self.last_index;
        let mut first_kept = self.truncated.index.next();
        if let Some(snapshot) = &ready.snapshot {
            // The snapshot replaces the whole log.
            for index in first_kept.0..=last_index.0 {
                batch.delete(entry_key(self.range, LogIndex(index)));
            }
            batch.put(
                state_key(self.range, TRUNCATED_STATE),
                wire::SnapshotMetadata::from(&snapshot.metadata).encode_to_vec(),
            );
            staged.truncated = Some(snapshot.metadata.clone());
            last_index = snapshot.metadata.index;
            first_kept = snapshot.metadata.index.next();
        }
        if let Some(first) = ready.entries.first() {
            assert!(
                first.index >= first_kept,
                "entries at {} overwrite the compacted log",
                first.index
            );
            assert!(
                first.index <= last_index.next(),
                "entries at {} leave a gap after {last_index}",
                first.index
            );
            for entry in &ready.entries {
                batch.put(
                    entry_key(self.range, entry.index),
                    wire::Entry::from(entry).encode_to_vec(),
                );
            }
            let new_last = ready.entries.last().map_or(last_index, |entry| entry.index);
            // Remove a stored suffix the new entries replace.
            for index in new_last.0 + 1..=last_index.0 {
                batch.delete(entry_key(self.range, LogIndex(index)));
            }
            last_index = new_last;
        }
        if last_index != self.last_index {
            staged.last_index = Some(last_index);
        }
        let hard_state = match (&ready.hard_state, &ready.snapshot) {
            (Some(hard_state), _) => Some(*hard_state),
            // Installing a snapshot commits up to it even if the hard state did not change.
            (None, Some(snapshot)) if snapshot.metadata.index > self.hard_state.commit => {
                Some(HardState { commit: snapshot.metadata.index, ..self.hard_state })
            }
            _ => None,
        };
        if let Some(hard_state) = hard_state {
            batch.put(
                state_key(self.range, HARD_STATE),
                wire::HardState::from(&hard_state).encode_to_vec(),
            );
            staged.hard_state = Some(hard_state);
        }
        staged
    }

    /// Updates the cached positions once the batch holding `staged` is durable.
    pub fn on_persisted(&mut self, staged: StagedReady) {
        if let Some(hard_state) = staged.hard_state {
            self.hard_state = hard_state;
        }
        if let Some(truncated) = staged.truncated {
            self.truncated = truncated;
        }
        if let Some(last_index) = staged.last_index {
            self.last_index = last_index;
        }
    }

    /// Stages the removal of entries up to `metadata.index` (log compaction after the state
    /// machine has applied them); confirm with [`RaftLogStore::on_persisted`].
    ///
    /// # Panics
    ///
    /// If the compaction point is behind the current one or past the last entry.
    pub fn stage_compaction(
        &self,
        metadata: SnapshotMetadata,
        batch: &mut WriteBatch,
    ) -> StagedReady {
        assert!(metadata.index >= self.truncated.index, "compaction must move forward");
        assert!(metadata.index <= self.last_index, "compaction past the last entry");
        for index in self.truncated.index.next().0..=metadata.index.0 {
            batch.delete(entry_key(self.range, LogIndex(index)));
        }
        batch.put(
            state_key(self.range, TRUNCATED_STATE),
            wire::SnapshotMetadata::from(&metadata).encode_to_vec(),
        );
        StagedReady { hard_state: None, truncated: Some(metadata), last_index: None }
    }
}

impl<E: Engine> Storage for RaftLogStore<E> {
    fn hard_state(&self) -> HardState {
        self.hard_state
    }

    fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.truncated.clone()
    }

    fn snapshot(&self) -> RaftResult<Snapshot> {
        self.source.snapshot()
    }

    fn last_index(&self) -> LogIndex {
        self.last_index
    }

    fn term(&self, index: LogIndex) -> RaftResult<Term> {
        if index == self.truncated.index {
            return Ok(self.truncated.term);
        }
        if index < self.truncated.index {
            return Err(RaftError::Compacted(self.truncated.index));
        }
        if index > self.last_index {
            return Err(RaftError::Storage(format!("no entry at index {index}")));
        }
        match self.engine.get(&entry_key(self.range, index)).map_err(storage_error)? {
            Some(bytes) => Ok(decode_entry(&bytes)?.term),
            None => Err(RaftError::Storage(format!(
                "entry {index} of range {} is missing",
                self.range.0
            ))),
        }
    }

    fn entries(&self, low: LogIndex, high: LogIndex, max_bytes: usize) -> RaftResult<Vec<Entry>> {
        if low <= self.truncated.index {
            return Err(RaftError::Compacted(self.truncated.index));
        }
        if high > self.last_index.next() {
            return Err(RaftError::Storage(format!(
                "entries up to {high} requested, last is {}",
                self.last_index
            )));
        }
        let mut entries = Vec::new();
        let mut size = 0;
        let (start, end) = (entry_key(self.range, low), entry_key(self.range, high));
        for item in self.engine.scan(&start, Some(&end), ScanDirection::Forward) {
            let entry = decode_entry(&item.map_err(storage_error)?.1)?;
            size += entry.size_bytes();
            if !entries.is_empty() && size > max_bytes {
                break;
            }
            entries.push(entry);
        }
        let expected = (high.0 - low.0) as usize;
        if entries.len() < expected && size <= max_bytes {
            return Err(RaftError::Storage(format!(
                "entries {low}..{high} of range {} are incomplete",
                self.range.0
            )));
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests;
