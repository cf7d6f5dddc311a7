//! A data range's replicated transaction state: the prepare records of transactions prepared
//! here and the decisions of transactions this range coordinated (`meridian_txn`'s
//! [`PreparedSet`] and [`Coordinator`]), applied from the range's log by its state machine,
//! persisted with its data and carried in its snapshots.
//!
//! Layout, under the range's Raft key space (so that destroying a replica clears it too):
//!
//! | key                            | value                                    |
//! |--------------------------------|------------------------------------------|
//! | `RAFT ‖ range ‖ 0x06 ‖ txn`    | prepare record (protobuf `PrepareRecord`) |
//! | `RAFT ‖ range ‖ 0x07 ‖ txn`    | decision (protobuf `DecisionRecord`)     |
//!
//! `txn` is the transaction id, 16 bytes big-endian. Invariant: the in-memory state equals
//! what is persisted once the batch of the entry that changed it is written — it changes only
//! while an entry applies or a snapshot installs, and every change stages its write into that
//! same batch. Conversions from the wire are strict: a record that does not decode is
//! rejected alike on every replica.

use meridian_raft::{Error as RaftError, Result as RaftResult};
use meridian_rpc::kv as wire;
use meridian_storage::{ReadView, ScanDirection, WriteBatch, keyspace};
use meridian_txn::{
    Coordinator, CoordinatorOptions, Decision, KeySpan, LockMode, PrepareRecord, PreparedSet,
    Priority, RangeId as TxnRangeId, Timestamp, TxnId, TxnRecord, Write,
};
use prost::Message as _;

use crate::RangeId;
use crate::raft_store::state_key;

/// The kind byte of persisted prepare records.
pub(crate) const TXN_PREPARED: u8 = 0x06;
/// The kind byte of persisted decisions.
pub(crate) const TXN_DECISION: u8 = 0x07;

/// Returns the key of a transaction's persisted record of `kind`.
fn txn_key(range: RangeId, kind: u8, txn: TxnId) -> Vec<u8> {
    let mut key = state_key(range, kind);
    key.extend_from_slice(&txn.0.to_be_bytes());
    key
}

/// Returns the id a record carries.
///
/// # Errors
///
/// Why it is not an id: ids are 16 bytes.
pub fn txn_id_from_wire(bytes: &[u8]) -> Result<TxnId, String> {
    let bytes: [u8; 16] = bytes
        .try_into()
        .map_err(|_| format!("a transaction id has 16 bytes, not {}", bytes.len()))?;
    Ok(TxnId(u128::from_be_bytes(bytes)))
}

/// Returns an id as records carry it.
pub fn txn_id_to_wire(txn: TxnId) -> Vec<u8> {
    txn.0.to_be_bytes().to_vec()
}

fn priority_from_wire(priority: Option<&wire::TxnPriority>) -> Result<Priority, String> {
    let priority = priority.ok_or("a prepare record without a priority")?;
    Ok(Priority {
        start: Timestamp::from_nanos(priority.start),
        first_txn: txn_id_from_wire(&priority.first_txn)?,
        attempt: priority.attempt,
    })
}

fn priority_to_wire(priority: &Priority) -> wire::TxnPriority {
    wire::TxnPriority {
        start: priority.start.as_nanos(),
        first_txn: txn_id_to_wire(priority.first_txn),
        attempt: priority.attempt,
    }
}

fn lock_from_wire(lock: &wire::TxnLock) -> Result<(LockMode, KeySpan), String> {
    let mode = if lock.exclusive { LockMode::Exclusive } else { LockMode::Shared };
    let end = match (lock.unbounded, lock.end.is_empty()) {
        (true, true) => None,
        (false, false) => Some(lock.end.clone()),
        (true, false) => return Err("an unbounded lock span with an end".into()),
        (false, true) => return Err("a bounded lock span without an end".into()),
    };
    let span = KeySpan::range(lock.start.clone(), end).map_err(|error| error.to_string())?;
    Ok((mode, span))
}

fn lock_to_wire((mode, span): &(LockMode, KeySpan)) -> wire::TxnLock {
    wire::TxnLock {
        exclusive: *mode == LockMode::Exclusive,
        start: span.start().to_vec(),
        end: span.end().map(<[u8]>::to_vec).unwrap_or_default(),
        unbounded: span.end().is_none(),
    }
}

fn write_from_wire(write: &wire::TxnWrite) -> Write {
    Write { key: write.key.clone(), value: write.value.clone() }
}

fn write_to_wire(write: &Write) -> wire::TxnWrite {
    wire::TxnWrite { key: write.key.clone(), value: write.value.clone() }
}

/// Returns the writes of a record.
pub fn writes_from_wire(writes: &[wire::TxnWrite]) -> Vec<Write> {
    writes.iter().map(write_from_wire).collect()
}

/// Returns writes as records carry them.
pub fn writes_to_wire(writes: &[Write]) -> Vec<wire::TxnWrite> {
    writes.iter().map(write_to_wire).collect()
}

/// Returns the prepare record a wire record carries.
///
/// # Errors
///
/// Why it is malformed.
pub fn prepare_from_wire(record: &wire::PrepareRecord) -> Result<PrepareRecord, String> {
    Ok(PrepareRecord {
        txn: txn_id_from_wire(&record.txn)?,
        priority: priority_from_wire(record.priority.as_ref())?,
        coordinator: TxnRangeId(record.coordinator),
        prepare_ts: Timestamp::from_nanos(record.prepare_ts),
        locks: record.locks.iter().map(lock_from_wire).collect::<Result<_, _>>()?,
        writes: writes_from_wire(&record.writes),
    })
}

/// Returns a prepare record as the log and snapshots carry it.
pub fn prepare_to_wire(record: &PrepareRecord) -> wire::PrepareRecord {
    wire::PrepareRecord {
        txn: txn_id_to_wire(record.txn),
        priority: Some(priority_to_wire(&record.priority)),
        coordinator: record.coordinator.0,
        prepare_ts: record.prepare_ts.as_nanos(),
        locks: record.locks.iter().map(lock_to_wire).collect(),
        writes: writes_to_wire(&record.writes),
    }
}

/// Returns the decision a wire decision carries.
///
/// # Errors
///
/// Why it is malformed.
pub fn decision_from_wire(decision: Option<&wire::TxnDecision>) -> Result<Decision, String> {
    let decision = decision.ok_or("a record without a decision")?;
    match (decision.commit, decision.commit_ts) {
        (true, 0) => Err("a commit without a timestamp".into()),
        (true, commit_ts) => Ok(Decision::Commit { commit_ts: Timestamp::from_nanos(commit_ts) }),
        (false, 0) => Ok(Decision::Abort { reason: decision.abort_reason.clone() }),
        (false, _) => Err("an abort with a commit timestamp".into()),
    }
}

/// Returns a decision as records carry it.
pub fn decision_to_wire(decision: &Decision) -> wire::TxnDecision {
    match decision {
        Decision::Commit { commit_ts } => wire::TxnDecision {
            commit: true,
            commit_ts: commit_ts.as_nanos(),
            abort_reason: String::new(),
        },
        Decision::Abort { reason } => {
            wire::TxnDecision { commit: false, commit_ts: 0, abort_reason: reason.clone() }
        }
    }
}

/// Returns the transaction and record a wire decision record carries.
///
/// # Errors
///
/// Why it is malformed.
pub fn decision_record_from_wire(
    record: &wire::DecisionRecord,
) -> Result<(TxnId, TxnRecord), String> {
    Ok((
        txn_id_from_wire(&record.txn)?,
        TxnRecord {
            decision: decision_from_wire(record.decision.as_ref())?,
            participants: record.participants.iter().map(|id| TxnRangeId(*id)).collect(),
        },
    ))
}

/// Returns a decision record as the log and snapshots carry it.
pub fn decision_record_to_wire(txn: TxnId, record: &TxnRecord) -> wire::DecisionRecord {
    wire::DecisionRecord {
        txn: txn_id_to_wire(txn),
        decision: Some(decision_to_wire(&record.decision)),
        participants: record.participants.iter().map(|range| range.0).collect(),
    }
}

fn storage_error(error: impl std::fmt::Display) -> RaftError {
    RaftError::Storage(error.to_string())
}

/// Returns the persisted records of `kind` of a range, in id order.
fn scan_kind(
    engine: &(impl ReadView + ?Sized),
    range: RangeId,
    kind: u8,
) -> RaftResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let start = state_key(range, kind);
    let end = keyspace::prefix_end(&start);
    engine
        .scan(&start, end.as_deref(), ScanDirection::Forward)
        .collect::<Result<_, _>>()
        .map_err(storage_error)
}

/// The persisted prepare records and decisions of a range, as a snapshot carries them.
pub type TxnSnapshotParts = (Vec<wire::PrepareRecord>, Vec<wire::DecisionRecord>);

/// Reads a range's persisted transaction state from `engine`, as a snapshot carries it.
///
/// # Errors
///
/// Storage errors, and records that do not decode (corruption).
pub fn snapshot_parts(
    engine: &(impl ReadView + ?Sized),
    range: RangeId,
) -> RaftResult<TxnSnapshotParts> {
    let prepared = scan_kind(engine, range, TXN_PREPARED)?
        .into_iter()
        .map(|(_, value)| wire::PrepareRecord::decode(value.as_slice()).map_err(storage_error))
        .collect::<RaftResult<_>>()?;
    let decisions = scan_kind(engine, range, TXN_DECISION)?
        .into_iter()
        .map(|(_, value)| wire::DecisionRecord::decode(value.as_slice()).map_err(storage_error))
        .collect::<RaftResult<_>>()?;
    Ok((prepared, decisions))
}

/// A data range's transaction state (see the module documentation).
#[derive(Debug, Default)]
pub struct TxnState {
    /// The transactions prepared here.
    pub prepared: PreparedSet,
    /// The decisions of transactions this range coordinated, and (at the leader) the commits
    /// it is deciding.
    pub coordinator: Coordinator,
}

impl TxnState {
    /// Loads a range's transaction state from `engine`.
    ///
    /// # Errors
    ///
    /// Storage errors, and records that do not decode (corruption).
    pub fn load(engine: &(impl ReadView + ?Sized), range: RangeId) -> RaftResult<TxnState> {
        let (prepared, decisions) = snapshot_parts(engine, range)?;
        let mut state = TxnState {
            prepared: PreparedSet::new(),
            coordinator: Coordinator::new(CoordinatorOptions::default()),
        };
        state.restore(prepared, decisions).map_err(RaftError::Storage)?;
        Ok(state)
    }

    /// Replaces the in-memory state with these records (loaded, or from a snapshot).
    fn restore(
        &mut self,
        prepared: Vec<wire::PrepareRecord>,
        decisions: Vec<wire::DecisionRecord>,
    ) -> Result<(), String> {
        self.prepared = PreparedSet::new();
        self.coordinator.clear();
        for record in &prepared {
            self.prepared.apply_prepare(prepare_from_wire(record)?);
        }
        for record in &decisions {
            let (txn, record) = decision_record_from_wire(record)?;
            self.coordinator.restore(txn, record);
        }
        Ok(())
    }

    /// Stages a prepare record applied at `range`.
    pub fn stage_prepared(range: RangeId, record: &PrepareRecord, batch: &mut WriteBatch) {
        batch
            .put(txn_key(range, TXN_PREPARED, record.txn), prepare_to_wire(record).encode_to_vec());
    }

    /// Stages the removal of a transaction's prepare record (its outcome applied).
    pub fn stage_resolved(range: RangeId, txn: TxnId, batch: &mut WriteBatch) {
        batch.delete(txn_key(range, TXN_PREPARED, txn));
    }

    /// Stages a decision this range logged first for `txn`.
    pub fn stage_decision(range: RangeId, txn: TxnId, record: &TxnRecord, batch: &mut WriteBatch) {
        batch.put(
            txn_key(range, TXN_DECISION, txn),
            decision_record_to_wire(txn, record).encode_to_vec(),
        );
    }

    /// Replaces the state with a snapshot's into `batch`: clears what `engine` holds for the
    /// range and writes the snapshot's records.
    ///
    /// # Errors
    ///
    /// Storage errors, and snapshot records that do not decode.
    pub fn stage_install(
        &mut self,
        engine: &(impl ReadView + ?Sized),
        range: RangeId,
        prepared: Vec<wire::PrepareRecord>,
        decisions: Vec<wire::DecisionRecord>,
        batch: &mut WriteBatch,
    ) -> RaftResult<()> {
        for kind in [TXN_PREPARED, TXN_DECISION] {
            for (key, _) in scan_kind(engine, range, kind)? {
                batch.delete(key);
            }
        }
        self.restore(prepared, decisions).map_err(RaftError::Storage)?;
        // What is staged is what is in memory (a duplicate in the snapshot counts once).
        for record in self.prepared.records() {
            TxnState::stage_prepared(range, record, batch);
        }
        for (txn, record) in self.coordinator.decisions() {
            TxnState::stage_decision(range, *txn, record, batch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_malformed_ones_are_refused() {
        let record = PrepareRecord {
            txn: TxnId(0x0102),
            priority: Priority { start: Timestamp::from_nanos(5), first_txn: TxnId(7), attempt: 2 },
            coordinator: TxnRangeId(3),
            prepare_ts: Timestamp::from_nanos(99),
            locks: vec![
                (LockMode::Shared, KeySpan::range(b"a".to_vec(), None).unwrap()),
                (LockMode::Exclusive, KeySpan::key(b"k".to_vec())),
            ],
            writes: vec![
                Write { key: b"k".to_vec(), value: Some(b"v".to_vec()) },
                Write { key: b"d".to_vec(), value: None },
            ],
        };
        assert_eq!(prepare_from_wire(&prepare_to_wire(&record)), Ok(record.clone()));
        let decision = TxnRecord {
            decision: Decision::Commit { commit_ts: Timestamp::from_nanos(100) },
            participants: [TxnRangeId(2), TxnRangeId(3)].into(),
        };
        let wire = decision_record_to_wire(TxnId(9), &decision);
        assert_eq!(decision_record_from_wire(&wire), Ok((TxnId(9), decision)));

        let mut bad = prepare_to_wire(&record);
        bad.txn = vec![1, 2, 3];
        assert!(prepare_from_wire(&bad).unwrap_err().contains("16 bytes"));
        let mut bad = prepare_to_wire(&record);
        bad.locks[0].end = b"0".to_vec();
        assert!(prepare_from_wire(&bad).is_err());
        let mut bad = prepare_to_wire(&record);
        bad.locks[1].end = Vec::new();
        assert!(prepare_from_wire(&bad).unwrap_err().contains("without an end"));
        let mut bad = prepare_to_wire(&record);
        bad.locks[1].end = b"a".to_vec();
        assert!(prepare_from_wire(&bad).unwrap_err().contains("empty key span"));
        let commit_without_ts =
            wire::TxnDecision { commit: true, commit_ts: 0, abort_reason: String::new() };
        assert!(decision_from_wire(Some(&commit_without_ts)).is_err());
        assert!(decision_from_wire(None).is_err());
    }
}
