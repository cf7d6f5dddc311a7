//! Tests of the persistent Raft log: a model-based property test against `MemStorage` (the
//! reference implementation the Raft simulator runs on), with reopening to check that what was
//! staged and written is what comes back; and a RocksDB restart test.

use std::sync::Arc;

use meridian_raft::{Configuration, EntryKind, MemStorage, NodeId};
use meridian_storage::{MemoryEngine, RocksEngine, RocksOptions};
use proptest::prelude::*;

use super::*;

/// A snapshot source for tests: an empty snapshot at index 0.
struct EmptySource;

impl SnapshotSource for EmptySource {
    fn snapshot(&self) -> RaftResult<Snapshot> {
        Ok(Snapshot::default())
    }
}

fn initial() -> SnapshotMetadata {
    SnapshotMetadata {
        index: LogIndex(0),
        term: Term(0),
        config: Configuration::with_voters([NodeId(1), NodeId(2), NodeId(3)]),
    }
}

fn open<E: Engine>(engine: &Arc<E>) -> RaftLogStore<E> {
    RaftLogStore::open(engine.clone(), RangeId(7), initial(), Arc::new(EmptySource)).unwrap()
}

/// Writes `ready` the way the node's driver does: stage, write synced, confirm.
fn persist<E: Engine>(store: &mut RaftLogStore<E>, engine: &E, ready: &Ready) {
    let mut batch = WriteBatch::new();
    let staged = store.stage(ready, &mut batch);
    engine.write(batch, true).unwrap();
    store.on_persisted(staged);
}

#[derive(Clone, Debug)]
enum Operation {
    /// Append entries with these terms, starting `back` entries before the end.
    Append {
        back: u64,
        terms: Vec<u64>,
    },
    HardState {
        term: u64,
        commit: u64,
    },
    /// Compact up to `fraction` of the way from the compaction point to the last entry.
    Compact {
        fraction: f64,
    },
    Snapshot {
        ahead: u64,
        term: u64,
    },
    Reopen,
}

fn operations() -> impl Strategy<Value = Vec<Operation>> {
    let operation = prop_oneof![
        4 => (0u64..4, proptest::collection::vec(1u64..5, 0..5)).prop_map(|(back, terms)| Operation::Append { back, terms }),
        1 => (0u64..5, 0u64..20).prop_map(|(term, commit)| Operation::HardState { term, commit }),
        1 => (0.0f64..=1.0).prop_map(|fraction| Operation::Compact { fraction }),
        1 => (1u64..6, 1u64..5).prop_map(|(ahead, term)| Operation::Snapshot { ahead, term }),
        1 => Just(Operation::Reopen),
    ];
    proptest::collection::vec(operation, 1..30)
}

fn assert_same(store: &RaftLogStore<MemoryEngine>, model: &MemStorage) {
    assert_eq!(store.hard_state(), model.hard_state());
    assert_eq!(store.snapshot_metadata(), model.snapshot_metadata());
    assert_eq!(store.first_index(), model.first_index());
    assert_eq!(store.last_index(), model.last_index());
    for index in store.first_index().0.saturating_sub(1)..=store.last_index().0 {
        assert_eq!(store.term(LogIndex(index)), model.term(LogIndex(index)), "term({index})");
    }
    let (low, high) = (store.first_index(), store.last_index().next());
    assert_eq!(store.entries(low, high, usize::MAX), model.entries(low, high, usize::MAX));
    assert_eq!(store.entries(low, high, 1), model.entries(low, high, 1));
    if low.0 > 1 {
        assert!(matches!(
            store.entries(low.prev(), high, usize::MAX),
            Err(RaftError::Compacted(_))
        ));
    }
}

proptest! {
    #[test]
    fn behaves_like_the_reference_storage(operations in operations()) {
        let engine = Arc::new(MemoryEngine::new());
        let mut store = open(&engine);
        let mut model = MemStorage::new(initial().config);
        for operation in operations {
            match operation {
                Operation::Append { back, terms } => {
                    let first = model.last_index().0.saturating_sub(back).max(model.first_index().0);
                    let entries: Vec<Entry> = terms
                        .iter()
                        .enumerate()
                        .map(|(i, term)| Entry {
                            index: LogIndex(first + i as u64),
                            term: Term(*term),
                            kind: EntryKind::Command(vec![i as u8; i]),
                        })
                        .collect();
                    model.append(&entries);
                    persist(&mut store, &engine, &Ready { entries, ..Ready::default() });
                }
                Operation::HardState { term, commit } => {
                    let hard_state = HardState { term: Term(term), vote: Some(NodeId(2)), commit: LogIndex(commit) };
                    model.set_hard_state(hard_state);
                    persist(&mut store, &engine, &Ready { hard_state: Some(hard_state), ..Ready::default() });
                }
                Operation::Compact { fraction } => {
                    let (from, to) = (model.snapshot_metadata().index.0, model.last_index().0);
                    let index = LogIndex(from + ((to - from) as f64 * fraction) as u64);
                    let metadata = SnapshotMetadata { index, term: model.term(index).unwrap(), config: initial().config };
                    model.compact(Snapshot { metadata: metadata.clone(), data: Vec::new() });
                    let mut batch = WriteBatch::new();
                    let staged = store.stage_compaction(metadata, &mut batch);
                    engine.write(batch, true).unwrap();
                    store.on_persisted(staged);
                }
                Operation::Snapshot { ahead, term } => {
                    let index = LogIndex(model.last_index().0 + ahead);
                    let metadata = SnapshotMetadata { index, term: Term(term), config: initial().config };
                    let snapshot = Snapshot { metadata, data: Vec::new() };
                    model.apply_snapshot(snapshot.clone());
                    persist(&mut store, &engine, &Ready { snapshot: Some(snapshot), ..Ready::default() });
                }
                Operation::Reopen => store = open(&engine),
            }
            assert_same(&store, &model);
        }
        // Everything staged was written: a fresh open sees the same log.
        assert_same(&open(&engine), &model);
    }
}

#[test]
fn rocksdb_log_survives_restart_and_ranges_are_separate() {
    let directory = tempfile::tempdir().unwrap();
    let open_engine =
        || Arc::new(RocksEngine::open(directory.path(), RocksOptions::default()).unwrap());
    let entries: Vec<Entry> = (1..=3)
        .map(|index| Entry {
            index: LogIndex(index),
            term: Term(1),
            kind: EntryKind::Command(vec![index as u8]),
        })
        .collect();
    let hard_state = HardState { term: Term(1), vote: Some(NodeId(1)), commit: LogIndex(2) };
    {
        let engine = open_engine();
        let mut store = open(&engine);
        persist(
            &mut store,
            &engine,
            &Ready { entries: entries.clone(), hard_state: Some(hard_state), ..Ready::default() },
        );
        // Another range on the same engine.
        let other =
            RaftLogStore::open(engine.clone(), RangeId(8), initial(), Arc::new(EmptySource))
                .unwrap();
        assert_eq!(other.last_index(), LogIndex(0));
    }
    let engine = open_engine();
    let store = open(&engine);
    assert_eq!(store.hard_state(), hard_state);
    assert_eq!(store.last_index(), LogIndex(3));
    assert_eq!(store.entries(LogIndex(1), LogIndex(4), usize::MAX).unwrap(), entries);
    let other =
        RaftLogStore::open(engine.clone(), RangeId(8), initial(), Arc::new(EmptySource)).unwrap();
    assert_eq!(other.last_index(), LogIndex(0));
}

#[test]
fn corrupt_entries_are_storage_errors() {
    let engine = Arc::new(MemoryEngine::new());
    let mut store = open(&engine);
    let entry = Entry { index: LogIndex(1), term: Term(1), kind: EntryKind::Noop };
    persist(&mut store, &engine, &Ready { entries: vec![entry], ..Ready::default() });
    engine.put(&entry_key(RangeId(7), LogIndex(1)), b"\xff\xff").unwrap();
    assert!(matches!(store.term(LogIndex(1)), Err(RaftError::Storage(_))));
    assert!(matches!(
        store.entries(LogIndex(1), LogIndex(2), usize::MAX),
        Err(RaftError::Storage(_))
    ));
    engine.put(&state_key(RangeId(7), HARD_STATE), b"\xff").unwrap();
    assert!(matches!(
        RaftLogStore::open(engine, RangeId(7), initial(), Arc::new(EmptySource)),
        Err(RaftError::Storage(_))
    ));
}

/// A replica created from a state machine (initialization, split) starts with an empty,
/// compacted log whose every earlier entry is committed; the store lists every replica, with
/// or without entries.
#[test]
fn new_replicas_start_compacted_and_are_listed() {
    let engine = Arc::new(MemoryEngine::new());
    assert_eq!(stored_ranges(&*engine).unwrap(), []);
    let metadata = SnapshotMetadata { index: LogIndex(1), term: Term(1), ..initial() };
    let mut batch = WriteBatch::new();
    let fresh = HardState { term: Term(1), vote: None, commit: LogIndex(0) };
    stage_new_replica(RangeId(5), &metadata, fresh, &mut batch);
    let voted = HardState { term: Term(3), vote: Some(NodeId(2)), commit: LogIndex(0) };
    stage_new_replica(RangeId(u64::MAX), &metadata, voted, &mut batch);
    engine.write(batch, true).unwrap();
    let mut store = open(&engine);
    let entry = Entry { index: LogIndex(1), term: Term(1), kind: EntryKind::Noop };
    persist(&mut store, &engine, &Ready { entries: vec![entry], ..Ready::default() });
    let created =
        RaftLogStore::open(engine.clone(), RangeId(5), initial(), Arc::new(EmptySource)).unwrap();
    assert_eq!(created.snapshot_metadata(), metadata);
    assert_eq!(created.last_index(), LogIndex(1));
    assert_eq!(created.hard_state(), HardState { term: Term(1), vote: None, commit: LogIndex(1) });
    assert!(matches!(created.entries(LogIndex(1), LogIndex(2), 1), Err(RaftError::Compacted(_))));
    assert_eq!(stored_ranges(&*engine).unwrap(), [RangeId(5), RangeId(7), RangeId(u64::MAX)]);
    // A vote given before the replica was created from its range's split is kept.
    let voter =
        RaftLogStore::open(engine.clone(), RangeId(u64::MAX), initial(), Arc::new(EmptySource))
            .unwrap();
    assert_eq!(voter.hard_state(), HardState { commit: LogIndex(1), ..voted });
}

/// Destroying a replica keeps its term and vote and marks the range, and the mark outlives a
/// replica created for the range again (whose log starts empty).
#[test]
fn destroyed_replicas_leave_a_tombstone() {
    let engine = Arc::new(MemoryEngine::new());
    let metadata = SnapshotMetadata { index: LogIndex(1), term: Term(1), ..initial() };
    let voted = HardState { term: Term(4), vote: Some(NodeId(3)), commit: LogIndex(0) };
    let mut batch = WriteBatch::new();
    stage_new_replica(RangeId(5), &metadata, voted, &mut batch);
    engine.write(batch, true).unwrap();
    assert!(!was_destroyed(&*engine, RangeId(5)).unwrap());
    let mut batch = WriteBatch::new();
    stage_destroy_replica(&*engine, RangeId(5), &mut batch).unwrap();
    engine.write(batch, true).unwrap();
    assert!(was_destroyed(&*engine, RangeId(5)).unwrap());
    assert!(!has_replica(&*engine, RangeId(5)).unwrap());
    let tombstone = stored_hard_state(&*engine, RangeId(5)).unwrap();
    assert_eq!(tombstone, Some(HardState { commit: LogIndex(0), ..voted }));
    assert_eq!(stored_hard_state(&*engine, RangeId(6)).unwrap(), None);
    assert_eq!(stored_ranges(&*engine).unwrap(), []);
    let again =
        RaftLogStore::open(engine.clone(), RangeId(5), initial(), Arc::new(EmptySource)).unwrap();
    assert_eq!(again.hard_state(), HardState { commit: LogIndex(0), ..voted });
    assert_eq!(again.last_index(), LogIndex(0));
    assert!(was_destroyed(&*engine, RangeId(5)).unwrap());
    assert!(!was_destroyed(&*engine, RangeId(6)).unwrap());
}
