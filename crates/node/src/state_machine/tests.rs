//! Unit tests of a range's state machine: applying commands and transaction records, restarts,
//! snapshots and splits.

use super::*;

fn span(start: &str, end: Option<&str>) -> RangeDescriptor {
    RangeDescriptor { id: RangeId(9), start: start.into(), end: end.map(Into::into), generation: 0 }
}

/// Opens the meta range's state machine on a new in-memory store, at index 1 with range ids
/// from 3 on.
fn meta_state_machine()
-> (Arc<Mvcc<meridian_storage::MemoryEngine>>, RangeStateMachine<meridian_storage::MemoryEngine>) {
    let mvcc = Arc::new(Mvcc::new(Arc::new(meridian_storage::MemoryEngine::new())).unwrap());
    let initial = AppliedState {
        index: LogIndex(1),
        term: Term(1),
        next_range_id: 3,
        descriptor: RangeDescriptor { id: META_RANGE, ..RangeDescriptor::default() },
        ..AppliedState::default()
    };
    let mut batch = WriteBatch::new();
    stage_initial_state(META_RANGE, &initial, &mut batch);
    mvcc.engine().write(batch, true).unwrap();
    let machine = RangeStateMachine::open(META_RANGE, mvcc.clone()).unwrap();
    (mvcc, machine)
}

fn allocate(
    machine: &mut RangeStateMachine<meridian_storage::MemoryEngine>,
    index: u64,
) -> Applied {
    let entry = Entry {
        index: LogIndex(index),
        term: Term(1),
        kind: EntryKind::Command(encode_allocate_range_ids(1)),
    };
    let mut batch = WriteBatch::new();
    let applied = machine.apply(&entry, &mut batch).unwrap();
    machine.stage_applied_state(&mut batch);
    machine.mvcc.engine().write(batch, true).unwrap();
    applied
}

/// Raft replays the entries since its last compaction after a restart; an entry applied
/// before must not take effect twice (the whole-cluster simulation found range ids handed
/// out twice this way).
#[test]
fn entries_applied_before_a_restart_are_skipped() {
    let (mvcc, mut machine) = meta_state_machine();
    assert!(matches!(allocate(&mut machine, 2), Applied::RangeIds(3)));
    assert!(matches!(allocate(&mut machine, 3), Applied::RangeIds(4)));
    // The same entries again, on the running machine and after reopening it.
    assert!(matches!(allocate(&mut machine, 3), Applied::Nothing));
    let mut reopened = RangeStateMachine::open(META_RANGE, mvcc).unwrap();
    assert_eq!(reopened.applied().index, LogIndex(3));
    assert!(matches!(allocate(&mut reopened, 2), Applied::Nothing));
    assert!(matches!(allocate(&mut reopened, 3), Applied::Nothing));
    assert!(matches!(allocate(&mut reopened, 4), Applied::RangeIds(5)));
}

/// A replica of range 9 over `[a, m)` on a fresh store holding versions of `keys`, each
/// at timestamp 5, whichever range they belong to.
fn data_state_machine(
    keys: &[&str],
) -> (Arc<Mvcc<meridian_storage::MemoryEngine>>, RangeStateMachine<meridian_storage::MemoryEngine>)
{
    let mvcc = Arc::new(Mvcc::new(Arc::new(meridian_storage::MemoryEngine::new())).unwrap());
    for key in keys {
        mvcc.put(key.as_bytes(), Timestamp::from_nanos(5), b"old").unwrap();
    }
    let initial = AppliedState {
        index: LogIndex(1),
        term: Term(1),
        descriptor: span("a", Some("m")),
        ..AppliedState::default()
    };
    let mut batch = WriteBatch::new();
    stage_initial_state(RangeId(9), &initial, &mut batch);
    mvcc.engine().write(batch, true).unwrap();
    let machine = RangeStateMachine::open(RangeId(9), mvcc.clone()).unwrap();
    (mvcc, machine)
}

/// A fresh replica of range 9 that installed a snapshot of range 9 in `mvcc`.
fn installed_copy(
    mvcc: &Arc<Mvcc<meridian_storage::MemoryEngine>>,
) -> RangeStateMachine<meridian_storage::MemoryEngine> {
    let source = RangeSnapshotSource {
        range: RangeId(9),
        mvcc: mvcc.clone(),
        registry: Arc::new(SnapshotRegistry::default()),
    };
    let snapshot = source.snapshot().unwrap();
    let (other_mvcc, mut other) = data_state_machine(&[]);
    let mut batch = WriteBatch::new();
    other.stage_install(&snapshot, &[], true, &mut batch).unwrap();
    other_mvcc.engine().write(batch, true).unwrap();
    other
}

/// A snapshot of range 9 at index 20 over `descriptor`, holding `keys` at timestamp 7.
fn snapshot_of(descriptor: RangeDescriptor, keys: &[&str]) -> Snapshot {
    let data = wire::RangeSnapshot {
        versions: keys
            .iter()
            .map(|key| wire::Version {
                key: key.as_bytes().to_vec(),
                timestamp: 7,
                value: Some(b"new".to_vec()),
            })
            .collect(),
        max_timestamp: 7,
        descriptor: Some(descriptor.to_wire([], [], 0)),
        config_index: 1,
        next_range_id: 0,
        descriptors: Vec::new(),
        stream_id: 0,
        prepared: Vec::new(),
        decisions: Vec::new(),
        gc_horizon: 6,
        closed_timestamp: 8,
    };
    Snapshot {
        metadata: SnapshotMetadata {
            index: LogIndex(20),
            term: Term(3),
            config: Configuration::default(),
        },
        data: data.encode_to_vec(),
    }
}

fn contents(mvcc: &Mvcc<meridian_storage::MemoryEngine>) -> Vec<(String, String)> {
    mvcc.scan(b"", None, Timestamp::MAX, ScanDirection::Forward, 100)
        .unwrap()
        .into_iter()
        .map(|(key, version)| {
            (String::from_utf8(key).unwrap(), String::from_utf8(version.value).unwrap())
        })
        .collect()
}

fn apply_command(
    machine: &mut RangeStateMachine<meridian_storage::MemoryEngine>,
    index: u64,
    command: Vec<u8>,
) -> Applied {
    let entry = Entry { index: LogIndex(index), term: Term(1), kind: EntryKind::Command(command) };
    let mut batch = WriteBatch::new();
    let applied = machine.apply(&entry, &mut batch).unwrap();
    machine.stage_applied_state(&mut batch);
    machine.mvcc.engine().write(batch, true).unwrap();
    applied
}

fn prepare_record(
    txn: u128,
    prepare_ts: u64,
    writes: &[(&str, Option<&str>)],
) -> meridian_txn::PrepareRecord {
    meridian_txn::PrepareRecord {
        txn: TxnId(txn),
        priority: meridian_txn::Priority {
            start: Timestamp::from_nanos(1),
            first_txn: TxnId(txn),
            attempt: 0,
        },
        coordinator: meridian_txn::RangeId(9),
        prepare_ts: Timestamp::from_nanos(prepare_ts),
        locks: writes
            .iter()
            .map(|(key, _)| {
                (meridian_txn::LockMode::Exclusive, KeySpan::key(key.as_bytes().to_vec()))
            })
            .chain([(
                meridian_txn::LockMode::Shared,
                KeySpan::range(b"a".to_vec(), Some(b"c".to_vec())).unwrap(),
            )])
            .collect(),
        writes: writes
            .iter()
            .map(|(key, value)| meridian_txn::Write {
                key: key.as_bytes().to_vec(),
                value: value.map(|value| value.as_bytes().to_vec()),
            })
            .collect(),
    }
}

/// A prepare record of a part coordinated by range 3 (the tests' machine is range 9).
fn participant_record(
    txn: u128,
    prepare_ts: u64,
    writes: &[(&str, Option<&str>)],
) -> meridian_txn::PrepareRecord {
    let mut record = prepare_record(txn, prepare_ts, writes);
    record.coordinator = meridian_txn::RangeId(3);
    record
}

fn commit_at(participants: &[u64], commit_ts: u64) -> meridian_txn::TxnRecord {
    meridian_txn::TxnRecord {
        decision: Decision::Commit { commit_ts: Timestamp::from_nanos(commit_ts) },
        participants: participants.iter().map(|id| meridian_txn::RangeId(*id)).collect(),
    }
}

/// Prepare records survive a restart and block splits; the first decision applied
/// resolves the range's own part at the commit timestamp and survives a restart too; a
/// later, different decision changes nothing; outcomes for unknown transactions are
/// harmless.
#[test]
fn prepared_transactions_and_decisions_apply_and_persist() {
    let (mvcc, mut machine) = data_state_machine(&["b"]);
    let record = prepare_record(1, 20, &[("b", Some("new")), ("d", None)]);
    let applied = apply_command(&mut machine, 2, encode_prepare(&record));
    assert_eq!(applied, Applied::Prepared { txn: TxnId(1), prepare_ts: 20 });
    assert_eq!(machine.applied().max_timestamp, 20);
    // Applying it again, even with another timestamp (a new leader's copy), changes
    // nothing and reports the recorded timestamp.
    let mut copy = record.clone();
    copy.prepare_ts = Timestamp::from_nanos(15);
    assert_eq!(apply_command(&mut machine, 3, encode_prepare(&copy)), applied);
    assert_eq!(machine.applied().max_timestamp, 20);

    let mut reopened = RangeStateMachine::open(RangeId(9), mvcc.clone()).unwrap();
    assert_eq!(reopened.txn.prepared.records().cloned().collect::<Vec<_>>(), vec![record]);
    let split = encode_split(vec![b"f".to_vec()], vec![10], 0);
    assert!(
        matches!(apply_command(&mut reopened, 4, split), Applied::Rejected(reason) if reason.contains("prepared"))
    );

    // The decision commits the range's own part at 30.
    let applied = apply_command(&mut reopened, 5, encode_decision(TxnId(1), &commit_at(&[9], 30)));
    let committed = Decision::Commit { commit_ts: Timestamp::from_nanos(30) };
    assert_eq!(applied, Applied::Decided { txn: TxnId(1), decision: committed.clone() });
    assert_eq!(mvcc.get(b"b", Timestamp::from_nanos(29)).unwrap().unwrap().value, b"old");
    assert_eq!(mvcc.get(b"b", Timestamp::from_nanos(30)).unwrap().unwrap().value, b"new");
    assert!(mvcc.get(b"d", Timestamp::from_nanos(30)).unwrap().is_none());
    assert_eq!(reopened.applied().max_timestamp, 30);

    // A later abort record for the same transaction is ignored, after a restart too.
    let mut reopened = RangeStateMachine::open(RangeId(9), mvcc.clone()).unwrap();
    assert!(reopened.txn.prepared.records().next().is_none());
    let abort = meridian_txn::TxnRecord {
        decision: Decision::Abort { reason: "late".into() },
        participants: Default::default(),
    };
    let applied = apply_command(&mut reopened, 6, encode_decision(TxnId(1), &abort));
    assert_eq!(applied, Applied::Decided { txn: TxnId(1), decision: committed });
    assert_eq!(
        apply_command(
            &mut reopened,
            7,
            encode_outcome(TxnId(5), &Decision::Abort { reason: String::new() })
        ),
        Applied::Resolved { txn: TxnId(5) }
    );
    // With nothing prepared, the range splits again.
    let split = encode_split(vec![b"f".to_vec()], vec![10], 0);
    assert!(matches!(apply_command(&mut reopened, 8, split), Applied::Split(_)));
}

/// An outcome resolves a participant's part: a commit writes at its timestamp, an abort
/// writes nothing; records outside the span or malformed are refused alike everywhere.
#[test]
fn outcomes_resolve_prepared_parts_and_bad_records_are_refused() {
    let (mvcc, mut machine) = data_state_machine(&[]);
    apply_command(
        &mut machine,
        7,
        encode_prepare(&participant_record(1, 20, &[("b", Some("one"))])),
    );
    apply_command(
        &mut machine,
        8,
        encode_prepare(&participant_record(2, 21, &[("c", Some("two"))])),
    );
    let commit = Decision::Commit { commit_ts: Timestamp::from_nanos(40) };
    // A decision logged here (range 9) does not resolve another coordinator's part.
    let abort_here = meridian_txn::TxnRecord {
        decision: Decision::Abort { reason: "forged".into() },
        participants: Default::default(),
    };
    assert!(matches!(
        apply_command(&mut machine, 9, encode_decision(TxnId(1), &abort_here)),
        Applied::Rejected(reason) if reason.contains("only its outcome resolves it")
    ));
    assert!(machine.txn.coordinator.decision(TxnId(1)).is_none());
    assert_eq!(
        apply_command(&mut machine, 10, encode_outcome(TxnId(1), &commit)),
        Applied::Resolved { txn: TxnId(1) }
    );
    let abort = Decision::Abort { reason: "wounded".into() };
    assert_eq!(
        apply_command(&mut machine, 11, encode_outcome(TxnId(2), &abort)),
        Applied::Resolved { txn: TxnId(2) }
    );
    assert_eq!(contents(&mvcc), vec![("b".to_string(), "one".to_string())]);
    assert!(machine.txn.prepared.records().next().is_none());

    // Outside the span [a, m): nothing prepared.
    let outside = prepare_record(3, 22, &[("x", Some("no"))]);
    assert_eq!(apply_command(&mut machine, 12, encode_prepare(&outside)), Applied::KeyNotInRange);
    assert!(machine.txn.prepared.records().next().is_none());
    // Malformed: an id of the wrong length.
    let mut malformed = txn_state::prepare_to_wire(&prepare_record(4, 23, &[("b", None)]));
    malformed.txn = vec![1];
    let command = encode_command(23, wire::range_command::Operation::Prepare(malformed));
    assert!(matches!(apply_command(&mut machine, 13, command), Applied::Rejected(_)));
}

/// A one-range commit applies all its writes at its timestamp, or none.
#[test]
fn one_phase_commits_apply_all_or_nothing() {
    let (mvcc, mut machine) = data_state_machine(&[]);
    let write = |key: &str, value: Option<&str>| meridian_txn::Write {
        key: key.as_bytes().to_vec(),
        value: value.map(|value| value.as_bytes().to_vec()),
    };
    let commit =
        encode_one_phase_commit(TxnId(1), &[write("b", Some("1")), write("c", Some("2"))], 50);
    assert_eq!(apply_command(&mut machine, 2, commit), Applied::Write(50));
    let straddling =
        encode_one_phase_commit(TxnId(2), &[write("d", Some("3")), write("z", Some("4"))], 60);
    assert_eq!(apply_command(&mut machine, 3, straddling), Applied::KeyNotInRange);
    let deleting = encode_one_phase_commit(TxnId(3), &[write("b", None)], 70);
    assert_eq!(apply_command(&mut machine, 4, deleting), Applied::Write(70));
    assert_eq!(contents(&mvcc), vec![("c".to_string(), "2".to_string())]);
    assert_eq!(mvcc.get(b"b", Timestamp::from_nanos(69)).unwrap().unwrap().value, b"1");
    assert_eq!(machine.applied().max_timestamp, 70);
}

/// A decision or outcome that would commit below the prepare timestamp is refused alike
/// on every replica (never a panic on a committed entry), and changes nothing; a late
/// prepare of a transaction this range already decided prepares nothing.
#[test]
fn commits_below_the_prepare_timestamp_and_late_prepares_are_refused() {
    let (mvcc, mut machine) = data_state_machine(&[]);
    let record = prepare_record(1, 20, &[("b", Some("x"))]);
    apply_command(&mut machine, 2, encode_prepare(&record));
    apply_command(&mut machine, 3, encode_prepare(&participant_record(2, 20, &[("c", None)])));
    let too_early = Decision::Commit { commit_ts: Timestamp::from_nanos(19) };
    assert!(matches!(
        apply_command(&mut machine, 4, encode_outcome(TxnId(2), &too_early)),
        Applied::Rejected(reason) if reason.contains("below its prepare timestamp")
    ));
    // An outcome does not resolve a part this range coordinates: only its decision does.
    let commit = Decision::Commit { commit_ts: Timestamp::from_nanos(25) };
    assert!(matches!(
        apply_command(&mut machine, 5, encode_outcome(TxnId(1), &commit)),
        Applied::Rejected(reason) if reason.contains("only its decision record resolves it")
    ));
    assert!(matches!(
        apply_command(&mut machine, 6, encode_decision(TxnId(1), &commit_at(&[9], 19))),
        Applied::Rejected(_)
    ));
    assert!(machine.txn.coordinator.decision(TxnId(1)).is_none());
    assert_eq!(machine.txn.prepared.records().count(), 2);
    assert!(contents(&mvcc).is_empty());

    // Decided here at 25 (resolving its part), then a late copy of its prepare.
    apply_command(&mut machine, 7, encode_decision(TxnId(1), &commit_at(&[9], 25)));
    assert!(matches!(
        apply_command(&mut machine, 8, encode_prepare(&record)),
        Applied::Rejected(reason) if reason.contains("decided already")
    ));
    assert_eq!(machine.txn.prepared.records().count(), 1);
}

/// A one-range commit at or below the GC horizon is refused as a whole.
#[test]
fn one_phase_commits_at_or_below_the_gc_horizon_are_refused() {
    let (mvcc, mut machine) = data_state_machine(&[]);
    mvcc.gc(Timestamp::from_nanos(100)).unwrap();
    let write = meridian_txn::Write { key: b"b".to_vec(), value: Some(b"1".to_vec()) };
    let commit = encode_one_phase_commit(TxnId(1), &[write], 100);
    assert!(matches!(apply_command(&mut machine, 2, commit), Applied::Rejected(_)));
    assert!(contents(&mvcc).is_empty());
}

/// Applies a GC record at `index` and, as the driver does once the batch is written, collects
/// what it asks for; returns how many versions went (`None` if it asked for nothing).
fn collect(
    machine: &mut RangeStateMachine<meridian_storage::MemoryEngine>,
    index: u64,
    horizon: u64,
) -> Option<u64> {
    let Applied::Collect { horizon, start, end } =
        apply_command(machine, index, encode_gc(horizon))
    else {
        return None;
    };
    let mut batch = WriteBatch::new();
    let removed = machine.stage_collect(&mut batch, &start, end.as_deref(), horizon).unwrap();
    machine.mvcc.engine().write(batch, false).unwrap();
    Some(removed)
}

/// A replica behind a split whose child's replica on this node is newer skips the writes it
/// replays into the child's span, and leaves the child's garbage to the child.
#[test]
fn ceded_spans_take_no_replayed_writes() {
    // "b" and "g" at 5 in [a, m); the child [f, m) has its replica here, newer.
    let (mvcc, mut machine) = data_state_machine(&["b", "g"]);
    let child = RangeDescriptor { generation: 1, ..span("f", Some("m")) };
    machine.cede(&child);
    machine.cede(&RangeDescriptor { generation: 1, ..span("x", Some("z")) });
    assert_eq!(machine.ceded(), &[child][..], "only an overlapping newer range is ceded");
    apply_command(&mut machine, 2, encode_put(b"b", b"b10", 10));
    apply_command(&mut machine, 3, encode_put(b"g", b"g10", 10));
    assert_eq!(mvcc.get(b"g", Timestamp::MAX).unwrap().unwrap().value, b"old", "skipped");
    assert_eq!(mvcc.get(b"b", Timestamp::MAX).unwrap().unwrap().value, b"b10");
    apply_command(&mut machine, 4, encode_put(b"g", b"g11", 11));
    assert_eq!(collect(&mut machine, 5, 20), Some(1), "b@5 goes, g's versions are the child's");
    // Applying the split leaves nothing to cede.
    let split = encode_split(vec![b"f".to_vec()], vec![10], 0);
    assert!(matches!(apply_command(&mut machine, 6, split), Applied::Split(_)));
    assert!(machine.ceded().is_empty());
}

/// A GC record collects the range's garbage below its horizon and nothing outside the span;
/// the horizon persists, only moves forward, stays below prepared transactions, raises the
/// timestamp floor, and passes to split-off ranges and through snapshots.
#[test]
fn gc_records_collect_the_span_below_the_horizon() {
    // "b" (inside [a, m)) and "x" (outside) at 5; newer versions of "b" at 10 and 20.
    let (mvcc, mut machine) = data_state_machine(&["b", "x"]);
    apply_command(&mut machine, 2, encode_put(b"b", b"ten", 10));
    apply_command(&mut machine, 3, encode_put(b"b", b"twenty", 20));
    let versions = |key: &[u8]| mvcc.dump().unwrap().into_iter().filter(|v| v.key == key).count();
    assert_eq!(collect(&mut machine, 4, 15), Some(1));
    assert_eq!((versions(b"b"), versions(b"x")), (2, 1), "only b@5 goes");
    assert_eq!(mvcc.get(b"b", Timestamp::from_nanos(15)).unwrap().unwrap().value, b"ten");
    assert_eq!(machine.applied().gc_horizon, 15);
    assert_eq!(machine.applied().max_timestamp, 20);
    // An older or equal horizon changes nothing.
    assert_eq!(collect(&mut machine, 5, 12), None);
    assert_eq!(RangeStateMachine::open(RangeId(9), mvcc.clone()).unwrap().applied().gc_horizon, 15);
    // A prepared transaction holds the horizon below its timestamp.
    let record = participant_record(1, 30, &[("c", Some("x"))]);
    apply_command(&mut machine, 6, encode_prepare(&record));
    assert!(matches!(apply_command(&mut machine, 7, encode_gc(30)), Applied::Rejected(_)));
    assert_eq!(machine.applied().gc_horizon, 15);
    apply_command(
        &mut machine,
        8,
        encode_outcome(TxnId(1), &Decision::Abort { reason: "test".into() }),
    );
    // A horizon above every version raises the floor: later writes land above it.
    assert_eq!(collect(&mut machine, 9, 40), Some(1));
    let late = apply_command(&mut machine, 10, encode_put(b"b", b"late", 40));
    assert!(matches!(late, Applied::Rejected(_)), "{late:?}");
    let late = participant_record(2, 40, &[("c", Some("x"))]);
    let late = apply_command(&mut machine, 11, encode_prepare(&late));
    assert!(matches!(late, Applied::Rejected(_)), "{late:?}");
    assert_eq!(machine.applied().max_timestamp, 40);
    assert_eq!(machine.child_state(span("f", Some("m"))).gc_horizon, 40);
    let other = installed_copy(&mvcc);
    assert_eq!(other.applied().gc_horizon, 40);
}

/// Snapshots carry prepared transactions and decisions, and installing one replaces the
/// replica's.
#[test]
fn snapshots_carry_the_transaction_state() {
    let (mvcc, mut machine) = data_state_machine(&[]);
    apply_command(&mut machine, 2, encode_prepare(&prepare_record(1, 20, &[("b", Some("x"))])));
    apply_command(&mut machine, 3, encode_decision(TxnId(7), &commit_at(&[4], 25)));
    let source = RangeSnapshotSource {
        range: RangeId(9),
        mvcc: mvcc.clone(),
        registry: Arc::new(SnapshotRegistry::default()),
    };
    let snapshot = source.snapshot().unwrap();
    let data = wire::RangeSnapshot::decode(snapshot.data.as_slice()).unwrap();
    assert_eq!((data.prepared.len(), data.decisions.len()), (1, 1));

    // Another replica holds the same transaction prepared with other writes, and a stale
    // decision of its own; installing the snapshot replaces both, on disk too.
    let (other_mvcc, mut other) = data_state_machine(&[]);
    apply_command(&mut other, 2, encode_prepare(&prepare_record(1, 10, &[("c", Some("y"))])));
    apply_command(&mut other, 3, encode_decision(TxnId(8), &commit_at(&[4], 12)));
    let mut batch = WriteBatch::new();
    other.stage_install(&snapshot, &[], true, &mut batch).unwrap();
    other_mvcc.engine().write(batch, true).unwrap();
    let reopened = RangeStateMachine::open(RangeId(9), other_mvcc).unwrap();
    for machine in [&other, &reopened] {
        let records: Vec<_> = machine.txn.prepared.records().cloned().collect();
        assert_eq!(records, vec![prepare_record(1, 20, &[("b", Some("x"))])]);
        assert!(machine.txn.coordinator.decision(TxnId(7)).is_some());
        assert!(machine.txn.coordinator.decision(TxnId(8)).is_none());
    }
}

/// Installing a snapshot replaces its span's data — what the replica had there and the
/// snapshot lacks is gone — and leaves keys outside the span alone.
#[test]
fn snapshot_install_replaces_exactly_its_span() {
    let (mvcc, mut machine) = data_state_machine(&["b", "c", "q"]);
    let snapshot = snapshot_of(span("a", Some("p")), &["c", "d"]);
    let mut batch = WriteBatch::new();
    machine.stage_install(&snapshot, &[], true, &mut batch).unwrap();
    mvcc.engine().write(batch, true).unwrap();
    let expected = [("c", "new"), ("d", "new"), ("q", "old")];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
    assert_eq!(contents(&mvcc), expected);
    assert_eq!(machine.applied().index, LogIndex(20));
    assert_eq!(machine.descriptor(), &span("a", Some("p")));
    assert_eq!(machine.applied().max_timestamp, 7);
    // The applied state is in the batch too: a reopened replica sees the snapshot's state.
    let reopened = RangeStateMachine::open(RangeId(9), mvcc).unwrap();
    assert_eq!(reopened.applied(), machine.applied());
}

/// A snapshot taken before a split reaches a replica after the new range's replica exists
/// here: the new range's span (protected) keeps its own, newer data.
#[test]
fn snapshot_install_spares_the_spans_of_newer_ranges() {
    let (mvcc, mut machine) = data_state_machine(&["b", "h", "k"]);
    // Range 10 [g, j) was split off range 9 later than this snapshot's state.
    let newer = RangeDescriptor { id: RangeId(10), generation: 1, ..span("g", Some("j")) };
    let snapshot = snapshot_of(span("a", Some("m")), &["b", "h", "i"]);
    let mut batch = WriteBatch::new();
    machine.stage_install(&snapshot, std::slice::from_ref(&newer), true, &mut batch).unwrap();
    mvcc.engine().write(batch, true).unwrap();
    let expected = [("b", "new"), ("h", "old")];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
    assert_eq!(contents(&mvcc), expected, "k (dropped) and i (protected) must not be there");
}

/// A data range's snapshot, as Raft asks the leader for it, carries the applied state but
/// none of the versions: those wait in the registry, read later from the same engine
/// snapshot, so the driver never reads a range's data and later writes are not in it.
#[test]
fn data_range_snapshots_leave_their_versions_to_the_stream() {
    let (mvcc, _machine) = data_state_machine(&["b", "c", "q"]);
    let registry = Arc::new(SnapshotRegistry::default());
    let source =
        RangeSnapshotSource { range: RangeId(9), mvcc: mvcc.clone(), registry: registry.clone() };
    let snapshot = source.snapshot().unwrap();
    mvcc.put(b"d", Timestamp::from_nanos(9), b"later").unwrap();
    let header = wire::RangeSnapshot::decode(snapshot.data.as_slice()).unwrap();
    assert!(header.versions.is_empty(), "the driver read the data");
    assert_eq!(snapshot.metadata.index, LogIndex(1));
    let mut stream = registry.take(header.stream_id).expect("registered");
    let mut keys = Vec::new();
    while let Some(chunk) = stream.next_chunk().unwrap() {
        keys.extend(chunk.into_iter().map(|version| version.key));
    }
    assert_eq!(keys, vec![b"b".to_vec(), b"c".to_vec()], "[a, m) as of the snapshot");
}

/// A snapshot of another range is refused without touching anything.
#[test]
fn snapshots_of_other_ranges_are_refused() {
    let (mvcc, mut machine) = data_state_machine(&["b"]);
    let other = RangeDescriptor { id: RangeId(11), ..span("a", Some("m")) };
    let mut batch = WriteBatch::new();
    let result = machine.stage_install(&snapshot_of(other, &["x"]), &[], true, &mut batch);
    assert!(result.is_err());
    assert!(batch.is_empty());
    assert_eq!(contents(&mvcc), vec![("b".to_string(), "old".to_string())]);
}

#[test]
fn splits_need_new_distinct_range_ids() {
    let parent = RangeDescriptor { id: RangeId(5), ..span("a", Some("z")) };
    let voters = [1, 2, 3].map(meridian_raft::NodeId);
    let config = Configuration::with_voters(voters.to_vec());
    let split = |keys: &[&str], ids: &[u64]| wire::Split {
        keys: keys.iter().map(|key| key.as_bytes().to_vec()).collect(),
        range_ids: ids.to_vec(),
        timestamp_floor: 0,
    };
    let children = split_descriptors(&parent, &config, &split(&["m"], &[6])).unwrap();
    assert_eq!(
        children,
        vec![RangeDescriptor { id: RangeId(6), generation: 1, ..span("m", Some("z")) }]
    );
    for (keys, ids) in [
        (&["m"][..], &[5][..]),
        (&["m"][..], &[1][..]),
        (&["m", "p"][..], &[6, 6][..]),
        (&["m", "p"][..], &[6][..]),
    ] {
        assert!(
            split_descriptors(&parent, &config, &split(keys, ids)).is_err(),
            "{keys:?} {ids:?}"
        );
    }
}

#[test]
fn uncovered_parts_skip_the_holes() {
    type Parts = Vec<(Vec<u8>, Option<Vec<u8>>)>;
    let part = |start: &str, end: Option<&str>| {
        (start.as_bytes().to_vec(), end.map(|end| end.as_bytes().to_vec()))
    };
    let cases: Vec<(RangeDescriptor, Vec<RangeDescriptor>, Parts)> = vec![
        (span("a", Some("z")), vec![], vec![part("a", Some("z"))]),
        (
            span("a", Some("z")),
            vec![span("m", Some("p"))],
            vec![part("a", Some("m")), part("p", Some("z"))],
        ),
        (span("a", None), vec![span("m", None)], vec![part("a", Some("m"))]),
        (
            span("a", None),
            vec![span("p", Some("q")), span("c", Some("d"))],
            vec![part("a", Some("c")), part("d", Some("p")), part("q", None)],
        ),
        (span("a", Some("z")), vec![span("a", Some("z"))], vec![]),
    ];
    for (range, holes, expected) in cases {
        assert_eq!(uncovered(&range, &holes), expected, "{range:?} minus {holes:?}");
    }
}

/// A close record raises the range's closed timestamp (never lowers it); the safe time is the
/// higher of it and the highest applied timestamp, and it persists, passes to split-off
/// ranges and travels in snapshots. The meta range takes no close records.
#[test]
fn close_records_raise_the_safe_time() {
    let (mvcc, mut machine) = data_state_machine(&["b"]);
    apply_command(&mut machine, 2, encode_put(b"b", b"ten", 10));
    assert_eq!(machine.applied().safe_timestamp(), 10, "the highest applied write");
    apply_command(&mut machine, 3, encode_close(30));
    assert_eq!(machine.applied().closed_timestamp, 30);
    assert_eq!(machine.applied().safe_timestamp(), 30);
    assert_eq!(machine.applied().max_timestamp, 10, "closing writes nothing");
    apply_command(&mut machine, 4, encode_close(20));
    assert_eq!(machine.applied().closed_timestamp, 30, "never lowered");
    apply_command(&mut machine, 5, encode_put(b"b", b"forty", 40));
    assert_eq!(machine.applied().safe_timestamp(), 40);
    let reopened = RangeStateMachine::open(RangeId(9), mvcc.clone()).unwrap();
    assert_eq!(reopened.applied().closed_timestamp, 30);
    assert_eq!(machine.child_state(span("f", Some("m"))).closed_timestamp, 30);
    let other = installed_copy(&mvcc);
    assert_eq!(other.applied().closed_timestamp, 30);

    let (_, mut meta) = meta_state_machine();
    assert!(matches!(apply_command(&mut meta, 2, encode_close(30)), Applied::Rejected(_)));
}
