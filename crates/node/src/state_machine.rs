//! A range's replicated state machine and its *applied state* (index, term, configuration,
//! descriptor, highest timestamp applied), persisted with the data it describes.
//!
//! - A **data range** holds the MVCC versions of the keys in its span, written by put and
//!   delete commands at the timestamps their leader assigned, and splits: a split shrinks the
//!   span and hands the rest to new ranges, whose replicas the driver creates on the same nodes
//!   at the same log index (see [`Applied::Split`]). The data itself does not move: all ranges
//!   share one MVCC key space ordered by user key, and a span of user keys is a span there.
//! - A data range also holds its **transaction state** (`txn_state.rs`): prepare records
//!   (applied at every replica, resolved by an outcome or by this range's own decision),
//!   the decisions of transactions it coordinated (the first logged for a transaction wins),
//!   and one-range commits, whose writes all apply at the commit timestamp. A range with
//!   prepared transactions does not split: their locks and writes stay in one range.
//! - The **meta range** holds the [`MetaIndex`] of descriptors and the range id counter.
//!
//! Applying is deterministic: a command that does not decode, that names a key outside the span
//! (it was proposed before a split that applied first), or that the range cannot take is
//! rejected the same way on every replica (and reported to the proposer), while an engine
//! failure stops the node: it must not diverge from its peers. Re-applying a command is
//! harmless: it rewrites the same versions.

use std::sync::Arc;

use meridian_clock::Timestamp;
use meridian_raft::{
    Configuration, Entry, EntryKind, Error as RaftError, LogIndex, Result as RaftResult, Snapshot,
    SnapshotMetadata, Term,
};
use meridian_rpc::kv as wire;
use meridian_storage::mvcc::VersionWrite;
use meridian_storage::{Engine, Mvcc, ReadView, ScanDirection, WriteBatch, keyspace};
use meridian_txn::{Decision, KeySpan, Resolution, TxnId};
use prost::Message as _;

use crate::descriptor::{META_RANGE, MetaIndex, RangeDescriptor};
use crate::raft_store::{APPLIED_STATE, state_key};
use crate::snapshot::{SnapshotRegistry, VersionStream};
use crate::txn_state::{self, TxnState};
use crate::{RangeId, SnapshotSource};

/// What a range's state machine has applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// The last applied index; zero for a replica not initialized yet (waiting for a snapshot).
    pub index: LogIndex,
    /// Its term.
    pub term: Term,
    /// The configuration in effect after it.
    pub config: Configuration,
    /// The index of the last membership change applied.
    pub config_index: LogIndex,
    /// The range's timestamp floor: the highest timestamp of any applied command, or inherited
    /// from the parent at a split (the parent leader's highest timestamp served or assigned).
    /// Leaders assign larger timestamps.
    pub max_timestamp: u64,
    /// The range's span and generation.
    pub descriptor: RangeDescriptor,
    /// Meta range only: the next range id to hand out.
    pub next_range_id: u64,
    /// Data ranges: the GC horizon, agreed through the log. Reads below it are refused;
    /// split-off ranges inherit it.
    pub gc_horizon: u64,
    /// Data ranges: the highest timestamp a leader closed the range at, agreed through the
    /// log: no later entry writes at or below it except the outcome of a transaction
    /// prepared at or below it (see [`AppliedState::safe_timestamp`]).
    pub closed_timestamp: u64,
}

impl AppliedState {
    /// The range's safe time for snapshot reads at any replica, from what it applied
    /// (Spanner's `t_safe_paxos`): no entry after this state writes at or below it, except
    /// the outcome of a transaction prepared at or below it. Every later write carries a
    /// timestamp its leader assigned above the range's floor (`max_timestamp`, which every
    /// later leader applies before assigning) and above every timestamp it closed; a read at
    /// or below this timestamp that no prepared transaction at or below it overlaps sees
    /// everything it ever will.
    pub fn safe_timestamp(&self) -> u64 {
        self.max_timestamp.max(self.closed_timestamp)
    }

    fn encode(&self) -> Vec<u8> {
        wire::AppliedState {
            index: self.index.0,
            term: self.term.0,
            config: Some((&self.config).into()),
            max_timestamp: self.max_timestamp,
            descriptor: Some(self.descriptor.to_wire([], [], 0)),
            config_index: self.config_index.0,
            next_range_id: self.next_range_id,
            gc_horizon: self.gc_horizon,
            closed_timestamp: self.closed_timestamp,
        }
        .encode_to_vec()
    }

    fn decode(bytes: &[u8]) -> RaftResult<Self> {
        let state = wire::AppliedState::decode(bytes).map_err(storage_error)?;
        let config = match &state.config {
            Some(config) => config
                .try_into()
                .map_err(|error: meridian_rpc::Error| RaftError::Storage(error.to_string()))?,
            None => Configuration::default(),
        };
        Ok(AppliedState {
            index: LogIndex(state.index),
            term: Term(state.term),
            config,
            config_index: LogIndex(state.config_index),
            max_timestamp: state.max_timestamp,
            descriptor: state
                .descriptor
                .as_ref()
                .map(RangeDescriptor::from_wire)
                .unwrap_or_default(),
            next_range_id: state.next_range_id,
            gc_horizon: state.gc_horizon,
            closed_timestamp: state.closed_timestamp,
        })
    }

    /// The descriptor with this state's replica lists, as the meta range records it.
    pub fn wire_descriptor(&self) -> wire::RangeDescriptor {
        let mut descriptor = self.descriptor.to_wire(
            self.config.voters.iter().map(|id| id.0),
            self.config.learners.iter().map(|id| id.0),
            self.config_index.0,
        );
        descriptor.outgoing_voters = self.config.outgoing_voters.iter().map(|id| id.0).collect();
        descriptor
    }
}

/// The outcome of applying one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A write took effect at this timestamp.
    Write(u64),
    /// The range split; these are the new ranges (the driver creates their replicas here).
    Split(Vec<RangeDescriptor>),
    /// Meta range: descriptors were recorded (stale ones ignored).
    DescriptorsUpdated,
    /// Meta range: range ids were reserved, starting with this one.
    RangeIds(u64),
    /// Not a command (no-op or membership change).
    Nothing,
    /// A transaction prepared here at this timestamp (or was prepared already).
    Prepared { txn: TxnId, prepare_ts: u64 },
    /// A decision record applied: this is the transaction's decision in effect (the first
    /// logged), which also resolved its part here.
    Decided { txn: TxnId, decision: Decision },
    /// An outcome applied (or found nothing prepared to resolve).
    Resolved { txn: TxnId },
    /// The range's GC horizon moved: the caller collects the garbage below it in the span
    /// `[start, end)` once the batch is written ([`RangeStateMachine::stage_collect`]).
    Collect { horizon: u64, start: Vec<u8>, end: Option<Vec<u8>> },
    /// The write's key is outside the range's span (a split applied first).
    KeyNotInRange,
    /// The command was invalid; every replica rejects it alike.
    Rejected(String),
}

fn encode_command(timestamp: u64, operation: wire::range_command::Operation) -> Vec<u8> {
    wire::RangeCommand { timestamp, operation: Some(operation) }.encode_to_vec()
}

/// Encodes a write command.
pub fn encode_put(key: &[u8], value: &[u8], timestamp: u64) -> Vec<u8> {
    let put = wire::Write { key: key.to_vec(), value: value.to_vec() };
    encode_command(timestamp, wire::range_command::Operation::Put(put))
}

/// Encodes a delete command.
pub fn encode_delete(key: &[u8], timestamp: u64) -> Vec<u8> {
    encode_command(timestamp, wire::range_command::Operation::Delete(key.to_vec()))
}

/// Encodes a split at `keys` creating ranges `ids`, which inherit `timestamp_floor` (the
/// proposing leader's highest timestamp served or assigned).
pub fn encode_split(keys: Vec<Vec<u8>>, ids: Vec<u64>, timestamp_floor: u64) -> Vec<u8> {
    let split = wire::Split { keys, range_ids: ids, timestamp_floor };
    encode_command(0, wire::range_command::Operation::Split(split))
}

/// Encodes a participant's prepare record.
pub fn encode_prepare(record: &meridian_txn::PrepareRecord) -> Vec<u8> {
    let record = txn_state::prepare_to_wire(record);
    encode_command(record.prepare_ts, wire::range_command::Operation::Prepare(record))
}

/// Encodes a coordinator's decision record.
pub fn encode_decision(txn: TxnId, record: &meridian_txn::TxnRecord) -> Vec<u8> {
    let record = txn_state::decision_record_to_wire(txn, record);
    encode_command(0, wire::range_command::Operation::Decide(record))
}

/// Encodes a participant's outcome record.
pub fn encode_outcome(txn: TxnId, decision: &Decision) -> Vec<u8> {
    let record = wire::OutcomeRecord {
        txn: txn_state::txn_id_to_wire(txn),
        decision: Some(txn_state::decision_to_wire(decision)),
    };
    encode_command(0, wire::range_command::Operation::Outcome(record))
}

/// Encodes a one-range commit of `writes` at `timestamp`.
pub fn encode_one_phase_commit(
    txn: TxnId,
    writes: &[meridian_txn::Write],
    timestamp: u64,
) -> Vec<u8> {
    let commit = wire::OnePhaseCommit {
        txn: txn_state::txn_id_to_wire(txn),
        writes: txn_state::writes_to_wire(writes),
    };
    encode_command(timestamp, wire::range_command::Operation::Commit(commit))
}

/// Encodes a meta update recording `descriptors`.
pub fn encode_update_descriptors(descriptors: Vec<wire::RangeDescriptor>) -> Vec<u8> {
    let update = wire::DescriptorUpdate { descriptors };
    encode_command(0, wire::range_command::Operation::UpdateDescriptors(update))
}

/// Encodes a GC of the range below `horizon`.
pub fn encode_gc(horizon: u64) -> Vec<u8> {
    encode_command(0, wire::range_command::Operation::Gc(horizon))
}

/// Encodes the closing of the range at `timestamp` (see [`AppliedState::closed_timestamp`]).
pub fn encode_close(timestamp: u64) -> Vec<u8> {
    encode_command(0, wire::range_command::Operation::Close(timestamp))
}

/// Encodes a meta command reserving `count` range ids.
pub fn encode_allocate_range_ids(count: u64) -> Vec<u8> {
    encode_command(0, wire::range_command::Operation::AllocateRangeIds(count))
}

/// Checks that `range` can split at `keys`: sorted, distinct, strictly inside its span, while
/// its replicas are not changing.
///
/// # Errors
///
/// Why the split is invalid.
pub fn check_split_keys(
    range: &RangeDescriptor,
    config: &Configuration,
    keys: &[Vec<u8>],
) -> Result<(), String> {
    if keys.is_empty() {
        return Err("a split needs at least one key".into());
    }
    if config.is_joint() {
        return Err("the range is changing its replicas; split later".into());
    }
    if let Some(key) = keys.iter().find(|key| !range.strictly_contains(key)) {
        return Err(format!(
            "split key {:?} is not strictly inside the range",
            key.escape_ascii().to_string()
        ));
    }
    if keys.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err("split keys must be sorted and distinct".into());
    }
    Ok(())
}

/// Returns the new ranges a split at `keys` creates, or why the split is invalid.
fn split_descriptors(
    parent: &RangeDescriptor,
    config: &Configuration,
    split: &wire::Split,
) -> Result<Vec<RangeDescriptor>, String> {
    check_split_keys(parent, config, &split.keys)?;
    if split.keys.len() != split.range_ids.len() {
        return Err("a split needs as many new range ids as split keys".into());
    }
    let mut ids: Vec<u64> = split.range_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != split.range_ids.len() || ids.iter().any(|id| *id <= META_RANGE.0) {
        return Err("new range ids must be distinct and above the meta range's".into());
    }
    if ids.contains(&parent.id.0) {
        return Err(format!("range {} cannot split into a range with its own id", parent.id.0));
    }
    let generation = parent.generation + 1;
    Ok((0..split.keys.len())
        .map(|i| RangeDescriptor {
            id: RangeId(split.range_ids[i]),
            start: split.keys[i].clone(),
            end: split.keys.get(i + 1).cloned().or_else(|| parent.end.clone()),
            generation,
        })
        .collect())
}

/// The state machine of one range.
pub struct RangeStateMachine<E: Engine> {
    range: RangeId,
    mvcc: Arc<Mvcc<E>>,
    applied: AppliedState,
    /// The meta range's index (on the meta range only).
    meta: Option<MetaIndex>,
    /// Prepared transactions and decisions (data ranges; empty on the meta range).
    txn: TxnState,
    /// Spans of this range's descriptor that newer replicas on this node own: ranges split
    /// off it whose replicas here started from a snapshot before this replica applied the
    /// split (node memory; the driver recomputes it when it opens the store). Writes this
    /// replica replays into them are skipped: the newer replica holds that data already, and
    /// may have collected versions a replay would bring back.
    ceded: Vec<RangeDescriptor>,
}

impl<E: Engine> RangeStateMachine<E> {
    /// Opens the state machine of `range`, loading its applied state (and, on the meta range,
    /// its index).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn open(range: RangeId, mvcc: Arc<Mvcc<E>>) -> RaftResult<Self> {
        let applied = load_applied_state(mvcc.engine().as_ref(), range)?;
        let meta =
            if range == META_RANGE { Some(load_meta_index(mvcc.engine().as_ref())?) } else { None };
        let txn = if range == META_RANGE {
            TxnState::default()
        } else {
            TxnState::load(mvcc.engine().as_ref(), range)?
        };
        Ok(RangeStateMachine { range, mvcc, applied, meta, txn, ceded: Vec::new() })
    }

    /// Records that `owner`, a newer range overlapping this one, has its replica on this node
    /// (see `ceded`).
    pub fn cede(&mut self, owner: &RangeDescriptor) {
        if owner.generation > self.applied.descriptor.generation
            && owner.overlaps(&self.applied.descriptor)
            && !self.ceded.contains(owner)
        {
            self.ceded.push(owner.clone());
        }
    }

    /// The spans newer replicas on this node own (see `ceded`).
    pub fn ceded(&self) -> &[RangeDescriptor] {
        &self.ceded
    }

    /// Stages a version unless a newer replica on this node owns its key (see `ceded`).
    fn stage_version(
        &self,
        batch: &mut WriteBatch,
        version: &VersionWrite,
    ) -> meridian_storage::Result<()> {
        if self.ceded.iter().any(|owner| owner.contains(&version.key)) {
            return Ok(());
        }
        self.mvcc.add_to_batch(batch, version)
    }

    /// Returns the applied state.
    pub fn applied(&self) -> &AppliedState {
        &self.applied
    }

    /// Returns the range's descriptor.
    pub fn descriptor(&self) -> &RangeDescriptor {
        &self.applied.descriptor
    }

    /// Whether the replica holds the range's state (it was created with it or received a
    /// snapshot); an uninitialized replica waits for a snapshot and serves nothing.
    pub fn is_initialized(&self) -> bool {
        self.applied.index > LogIndex(0)
    }

    /// The meta range's index, on the meta range.
    pub fn meta(&self) -> Option<&MetaIndex> {
        self.meta.as_ref()
    }

    /// The transactions prepared at this range, for a new leader's lock table.
    pub fn prepared_records(&self) -> impl Iterator<Item = &meridian_txn::PrepareRecord> {
        self.txn.prepared.records()
    }

    /// Whether transactions are prepared at this range (it does not split meanwhile).
    pub fn has_prepared(&self) -> bool {
        !self.txn.prepared.is_empty()
    }

    /// Whether two-phase commits need this range's leader to keep ticking: transactions
    /// prepared here wait for outcomes, or commit requests coordinated here wait for votes.
    pub fn has_txn_work(&self) -> bool {
        self.has_prepared() || self.txn.coordinator.has_pending()
    }

    /// The prepare record of a transaction prepared here, if any.
    pub fn prepared_record(&self, txn: TxnId) -> Option<&meridian_txn::PrepareRecord> {
        self.txn.prepared.get(txn)
    }

    /// The prepared transactions' records and (leader memory) status-query timers.
    pub fn prepared_mut(&mut self) -> &mut meridian_txn::PreparedSet {
        &mut self.txn.prepared
    }

    /// The range's two-phase-commit coordinator: its logged decisions change only as entries
    /// apply; the driver gives it requests, votes and the leadership role, and carries out
    /// its outputs.
    pub fn coordinator_mut(&mut self) -> &mut meridian_txn::Coordinator {
        &mut self.txn.coordinator
    }

    /// Stages the deletion of the meta range's index (on the meta range; nothing elsewhere).
    pub fn stage_clear_meta_index(&mut self, batch: &mut WriteBatch) {
        if let Some(meta) = self.meta.as_mut() {
            meta.stage_clear(batch);
        }
    }

    /// Applies a committed entry into `batch`.
    ///
    /// # Errors
    ///
    /// Only non-deterministic storage errors; the node must stop on them.
    pub fn apply(&mut self, entry: &Entry, batch: &mut WriteBatch) -> RaftResult<Applied> {
        // After a restart Raft hands out again every entry committed since its last compaction
        // (it rebuilds its own configuration from them, so the skipping belongs here, not in
        // Raft). The ones at or below the applied index already took effect (the applied state is
        // written in the same batch as their effects), and not every command is idempotent:
        // allocating range ids again would hand out ids already in use.
        if entry.index <= self.applied.index {
            return Ok(Applied::Nothing);
        }
        self.applied.index = entry.index;
        self.applied.term = entry.term;
        let data = match &entry.kind {
            EntryKind::Command(data) => data,
            EntryKind::ConfigChange(change) => {
                self.applied.config = self.applied.config.after(change);
                self.applied.config_index = entry.index;
                return Ok(Applied::Nothing);
            }
            EntryKind::Noop => return Ok(Applied::Nothing),
        };
        let command = match wire::RangeCommand::decode(data.as_slice()) {
            Ok(command) => command,
            Err(error) => return Ok(Applied::Rejected(format!("undecodable command: {error}"))),
        };
        use wire::range_command::Operation;
        let is_meta = self.meta.is_some();
        match command.operation {
            Some(Operation::Put(put)) if !is_meta => {
                self.apply_write(batch, put.key, Some(put.value), command.timestamp)
            }
            Some(Operation::Delete(key)) if !is_meta => {
                self.apply_write(batch, key, None, command.timestamp)
            }
            Some(Operation::Split(_)) if self.has_prepared() => Ok(Applied::Rejected(
                "the range has prepared transactions; split once they are resolved".into(),
            )),
            Some(Operation::Prepare(record)) if !is_meta => self.apply_prepare(batch, &record),
            Some(Operation::Decide(record)) if !is_meta => self.apply_decision(batch, &record),
            Some(Operation::Outcome(record)) if !is_meta => {
                let parsed = txn_state::txn_id_from_wire(&record.txn).and_then(|txn| {
                    Ok((txn, txn_state::decision_from_wire(record.decision.as_ref())?))
                });
                match parsed.and_then(|(txn, decision)| {
                    self.check_coordinator(txn, false)?;
                    self.check_resolvable(txn, &decision).map(|()| (txn, decision))
                }) {
                    Ok((txn, decision)) => {
                        self.resolve(batch, txn, &decision)?;
                        Ok(Applied::Resolved { txn })
                    }
                    Err(reason) => Ok(Applied::Rejected(reason)),
                }
            }
            Some(Operation::Commit(commit)) if !is_meta => {
                self.apply_one_phase_commit(batch, &commit, command.timestamp)
            }
            Some(Operation::Gc(horizon)) if !is_meta => self.apply_gc(horizon),
            Some(Operation::Close(timestamp)) if !is_meta => {
                self.applied.closed_timestamp = self.applied.closed_timestamp.max(timestamp);
                Ok(Applied::Nothing)
            }
            Some(Operation::Split(split)) if !is_meta => {
                match split_descriptors(&self.applied.descriptor, &self.applied.config, &split) {
                    Ok(children) => {
                        self.applied.descriptor.end = Some(split.keys[0].clone());
                        self.applied.descriptor.generation += 1;
                        let descriptor = &self.applied.descriptor;
                        self.ceded.retain(|owner| owner.overlaps(descriptor));
                        // The new ranges start from this floor (`child_state`).
                        self.applied.max_timestamp =
                            self.applied.max_timestamp.max(split.timestamp_floor);
                        Ok(Applied::Split(children))
                    }
                    Err(reason) => Ok(Applied::Rejected(reason)),
                }
            }
            Some(Operation::UpdateDescriptors(update)) => {
                let Some(meta) = self.meta.as_mut() else {
                    return Ok(Applied::Rejected("only the meta range records descriptors".into()));
                };
                for descriptor in &update.descriptors {
                    meta.update(descriptor, batch);
                }
                Ok(Applied::DescriptorsUpdated)
            }
            Some(Operation::AllocateRangeIds(count)) if is_meta => {
                let first = self.applied.next_range_id;
                match first.checked_add(count) {
                    Some(next) if count > 0 => {
                        self.applied.next_range_id = next;
                        Ok(Applied::RangeIds(first))
                    }
                    _ => Ok(Applied::Rejected(format!("cannot allocate {count} range ids"))),
                }
            }
            Some(_) => {
                Ok(Applied::Rejected(format!("range {} does not take this command", self.range.0)))
            }
            None => Ok(Applied::Rejected("command without operation".into())),
        }
    }

    fn apply_write(
        &mut self,
        batch: &mut WriteBatch,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        timestamp: u64,
    ) -> RaftResult<Applied> {
        if !self.applied.descriptor.contains(&key) {
            return Ok(Applied::KeyNotInRange);
        }
        if timestamp <= self.applied.gc_horizon {
            return Ok(Applied::Rejected(format!(
                "write timestamp {timestamp} is at or below the range's GC horizon"
            )));
        }
        let write = VersionWrite { key, commit_ts: Timestamp::from_nanos(timestamp), value };
        match self.stage_version(batch, &write) {
            Ok(()) => {
                self.applied.max_timestamp = self.applied.max_timestamp.max(timestamp);
                Ok(Applied::Write(timestamp))
            }
            Err(error) if error.is_deterministic() => Ok(Applied::Rejected(error.to_string())),
            Err(error) => Err(storage_error(error)),
        }
    }

    /// Moves the range's GC horizon to `horizon` and asks the caller to collect the span's
    /// garbage below it ([`Applied::Collect`]) once this entry's batch — and the batch of every
    /// entry before it — is in the store: collecting from the store alone while earlier
    /// entries of the same batch are not would miss their versions, and replicas applying in
    /// different batches would then differ. What is collected depends only on versions at or
    /// below the horizon, which only earlier entries write (later ones are timestamped above
    /// the range's floor, which this raises to the horizon). The horizon only moves forward,
    /// never to or above a prepared transaction's timestamp (it may still commit there).
    fn apply_gc(&mut self, horizon: u64) -> RaftResult<Applied> {
        if horizon <= self.applied.gc_horizon {
            return Ok(Applied::Nothing);
        }
        if let Some(prepared) = self.txn.prepared.records().map(|r| r.prepare_ts).min()
            && horizon >= prepared.as_nanos()
        {
            return Ok(Applied::Rejected(format!(
                "GC horizon {horizon} is not below a prepared transaction's timestamp {}",
                prepared.as_nanos()
            )));
        }
        self.applied.gc_horizon = horizon;
        self.applied.max_timestamp = self.applied.max_timestamp.max(horizon);
        let descriptor = &self.applied.descriptor;
        Ok(Applied::Collect {
            horizon,
            start: descriptor.start.clone(),
            end: descriptor.end.clone(),
        })
    }

    /// Stages into `batch` the removal of the garbage below `horizon` in `[start, end)`, except
    /// in spans newer replicas on this node own (they collect their own), for an
    /// [`Applied::Collect`]. Returns how many versions it removes.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn stage_collect(
        &self,
        batch: &mut WriteBatch,
        start: &[u8],
        end: Option<&[u8]>,
        horizon: u64,
    ) -> RaftResult<u64> {
        let span = RangeDescriptor {
            id: self.range,
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            generation: 0,
        };
        let mut removed = 0;
        for (start, end) in uncovered(&span, &self.ceded) {
            let horizon = Timestamp::from_nanos(horizon);
            let stats = self
                .mvcc
                .stage_gc(batch, &start, end.as_deref(), horizon)
                .map_err(storage_error)?;
            removed += stats.versions_removed;
        }
        Ok(removed)
    }

    /// Applies a prepare record: every write and lock must lie in the span (a split may
    /// have applied since it was proposed, and then nothing is prepared).
    fn apply_prepare(
        &mut self,
        batch: &mut WriteBatch,
        record: &wire::PrepareRecord,
    ) -> RaftResult<Applied> {
        let record = match txn_state::prepare_from_wire(record) {
            Ok(record) => record,
            Err(reason) => return Ok(Applied::Rejected(reason)),
        };
        if record.prepare_ts == Timestamp::ZERO {
            return Ok(Applied::Rejected("a prepare record without a timestamp".into()));
        }
        if record.prepare_ts.as_nanos() <= self.applied.gc_horizon {
            return Ok(Applied::Rejected(format!(
                "prepare timestamp {} is at or below the range's GC horizon",
                record.prepare_ts.as_nanos()
            )));
        }
        let descriptor = &self.applied.descriptor;
        let inside = record.writes.iter().all(|write| descriptor.contains(&write.key))
            && record.locks.iter().all(|(_, span)| span_inside(descriptor, span));
        if !inside {
            return Ok(Applied::KeyNotInRange);
        }
        let txn = record.txn;
        if self.txn.coordinator.decision(txn).is_some() {
            // This range coordinated the transaction and decided it already: a late prepare
            // of its own part must not prepare it again.
            return Ok(Applied::Rejected(format!("transaction {txn} is decided already")));
        }
        if let Some(prepared) = self.txn.prepared.get(txn) {
            // Prepared already: the recorded timestamp stands, whatever this copy says.
            let prepare_ts = prepared.prepare_ts.as_nanos();
            return Ok(Applied::Prepared { txn, prepare_ts });
        }
        let prepare_ts = record.prepare_ts.as_nanos();
        TxnState::stage_prepared(self.range, &record, batch);
        self.txn.prepared.apply_prepare(record);
        self.applied.max_timestamp = self.applied.max_timestamp.max(prepare_ts);
        Ok(Applied::Prepared { txn, prepare_ts })
    }

    /// Applies a coordinator's decision record: the first for a transaction decides it, and
    /// resolves the transaction's part here.
    fn apply_decision(
        &mut self,
        batch: &mut WriteBatch,
        record: &wire::DecisionRecord,
    ) -> RaftResult<Applied> {
        let (txn, record) = match txn_state::decision_record_from_wire(record) {
            Ok(parsed) => parsed,
            Err(reason) => return Ok(Applied::Rejected(reason)),
        };
        if let Err(reason) = self.check_coordinator(txn, true) {
            return Ok(Applied::Rejected(reason));
        }
        let first = self.txn.coordinator.decision(txn).is_none();
        if first && let Err(reason) = self.check_resolvable(txn, &record.decision) {
            return Ok(Applied::Rejected(reason));
        }
        let decision = self.txn.coordinator.apply(txn, record.clone());
        if first {
            TxnState::stage_decision(self.range, txn, &record, batch);
            if let Decision::Commit { commit_ts } = &decision {
                self.applied.max_timestamp = self.applied.max_timestamp.max(commit_ts.as_nanos());
            }
        }
        self.resolve(batch, txn, &decision)?;
        Ok(Applied::Decided { txn, decision })
    }

    /// Fails, the same way on every replica, when a record would resolve a part prepared here
    /// through the wrong path: a part this range coordinates ends only by its own decision
    /// record (`by_decision`), any other part only by an outcome from its coordinator. (A
    /// decision logged here for another coordinator's transaction would otherwise abort a
    /// part that voted to commit there.)
    fn check_coordinator(&self, txn: TxnId, by_decision: bool) -> Result<(), String> {
        let Some(record) = self.txn.prepared.get(txn) else { return Ok(()) };
        let here = record.coordinator.0 == self.range.0;
        match (here, by_decision) {
            (true, false) => Err(format!(
                "transaction {txn} is coordinated here: only its decision record resolves it"
            )),
            (false, true) => Err(format!(
                "transaction {txn} is prepared here for coordinator {}: only its outcome \
                 resolves it",
                record.coordinator
            )),
            _ => Ok(()),
        }
    }

    /// Fails, the same way on every replica, when a decision cannot resolve the
    /// transaction's prepared part here: a commit below its prepare timestamp (a coordinator
    /// bug; the part stays prepared rather than commit at a timestamp it never voted for).
    fn check_resolvable(&self, txn: TxnId, decision: &Decision) -> Result<(), String> {
        match (decision, self.txn.prepared.get(txn)) {
            (Decision::Commit { commit_ts }, Some(record)) if *commit_ts < record.prepare_ts => {
                Err(format!(
                    "commit timestamp {} of {txn} is below its prepare timestamp {}",
                    commit_ts.as_nanos(),
                    record.prepare_ts.as_nanos()
                ))
            }
            _ => Ok(()),
        }
    }

    /// Applies a decision to the transaction's prepared part here, if it has one: its writes
    /// at the commit timestamp, or nothing for an abort; the record goes either way.
    ///
    /// # Errors
    ///
    /// A commit at or below the GC horizon, which must never happen (the horizon stays below
    /// every prepared transaction), and storage errors: the node stops rather than diverge.
    fn resolve(
        &mut self,
        batch: &mut WriteBatch,
        txn: TxnId,
        decision: &Decision,
    ) -> RaftResult<()> {
        match self.txn.prepared.apply_outcome(txn, decision) {
            Resolution::Commit { commit_ts, writes } => {
                for write in writes {
                    let version = VersionWrite { key: write.key, commit_ts, value: write.value };
                    self.stage_version(batch, &version).map_err(storage_error)?;
                }
                self.applied.max_timestamp = self.applied.max_timestamp.max(commit_ts.as_nanos());
                TxnState::stage_resolved(self.range, txn, batch);
            }
            Resolution::Abort => TxnState::stage_resolved(self.range, txn, batch),
            Resolution::Unknown => {}
        }
        Ok(())
    }

    /// Applies a one-range commit: all of its writes at `timestamp`, or none (a key outside
    /// the span, after a split applied first, or a timestamp at or below the GC horizon).
    fn apply_one_phase_commit(
        &mut self,
        batch: &mut WriteBatch,
        commit: &wire::OnePhaseCommit,
        timestamp: u64,
    ) -> RaftResult<Applied> {
        if let Err(reason) = txn_state::txn_id_from_wire(&commit.txn) {
            return Ok(Applied::Rejected(reason));
        }
        if !commit.writes.iter().all(|write| self.applied.descriptor.contains(&write.key)) {
            return Ok(Applied::KeyNotInRange);
        }
        let commit_ts = Timestamp::from_nanos(timestamp);
        if commit_ts <= self.mvcc.gc_horizon() || timestamp <= self.applied.gc_horizon {
            return Ok(Applied::Rejected(format!(
                "commit timestamp {timestamp} is at or below the GC horizon"
            )));
        }
        for write in &commit.writes {
            let version =
                VersionWrite { key: write.key.clone(), commit_ts, value: write.value.clone() };
            self.stage_version(batch, &version).map_err(storage_error)?;
        }
        self.applied.max_timestamp = self.applied.max_timestamp.max(timestamp);
        Ok(Applied::Write(timestamp))
    }

    /// Records the applied state into `batch`.
    pub fn stage_applied_state(&self, batch: &mut WriteBatch) {
        batch.put(state_key(self.range, APPLIED_STATE), self.applied.encode());
    }

    /// Returns the applied state of a range split off this one at the current index: it starts
    /// at index 1 of its own log, with this range's replicas and timestamp floor.
    pub fn child_state(&self, descriptor: RangeDescriptor) -> AppliedState {
        AppliedState {
            index: LogIndex(1),
            term: Term(1),
            config: self.applied.config.clone(),
            config_index: LogIndex(1),
            max_timestamp: self.applied.max_timestamp,
            descriptor,
            next_range_id: 0,
            gc_horizon: self.applied.gc_horizon,
            closed_timestamp: self.applied.closed_timestamp,
        }
    }

    /// Replaces the state with a snapshot's into `batch`: clears the snapshot's span (or the
    /// meta index; `clear` is false only to break this rule in tests) and writes the snapshot's
    /// data — except inside `protected` spans, which
    /// newer replicas on this node own (ranges split off this one whose split this replica has
    /// not applied yet: their data is theirs, and this replica reaches the split in its log).
    ///
    /// # Errors
    ///
    /// [`RaftError::Storage`] if the snapshot does not decode or the engine fails.
    pub fn stage_install(
        &mut self,
        snapshot: &Snapshot,
        protected: &[RangeDescriptor],
        clear: bool,
        batch: &mut WriteBatch,
    ) -> RaftResult<()> {
        let data = wire::RangeSnapshot::decode(snapshot.data.as_slice()).map_err(storage_error)?;
        let descriptor =
            data.descriptor.as_ref().map(RangeDescriptor::from_wire).unwrap_or_default();
        if descriptor.id != self.range {
            return Err(RaftError::Storage(format!(
                "a snapshot of range {} sent to range {}",
                descriptor.id.0, self.range.0
            )));
        }
        if let Some(meta) = self.meta.as_mut() {
            meta.stage_clear(batch);
            for entry in &data.descriptors {
                meta.update(entry, batch);
            }
        } else {
            if clear {
                for (start, end) in uncovered(&descriptor, protected) {
                    self.mvcc.stage_clear(batch, &start, end.as_deref()).map_err(storage_error)?;
                }
            }
            self.txn.stage_install(
                self.mvcc.engine().as_ref(),
                self.range,
                data.prepared,
                data.decisions,
                batch,
            )?;
            for version in data.versions {
                if protected.iter().any(|owner| owner.contains(&version.key)) {
                    continue;
                }
                let write = VersionWrite {
                    key: version.key,
                    commit_ts: Timestamp::from_nanos(version.timestamp),
                    value: version.value,
                };
                self.mvcc.add_to_batch(batch, &write).map_err(storage_error)?;
            }
        }
        self.applied = AppliedState {
            index: snapshot.metadata.index,
            term: snapshot.metadata.term,
            config: snapshot.metadata.config.clone(),
            config_index: LogIndex(data.config_index),
            max_timestamp: data.max_timestamp,
            descriptor,
            next_range_id: data.next_range_id,
            gc_horizon: data.gc_horizon,
            closed_timestamp: data.closed_timestamp,
        };
        let descriptor = &self.applied.descriptor;
        self.ceded
            .retain(|owner| owner.generation > descriptor.generation && owner.overlaps(descriptor));
        self.stage_applied_state(batch);
        Ok(())
    }
}

/// Returns whether every key of `span` lies in the range.
fn span_inside(descriptor: &RangeDescriptor, span: &KeySpan) -> bool {
    let start_inside = span.start() >= descriptor.start.as_slice();
    let end_inside = match (&descriptor.end, span.end()) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(range_end), Some(end)) => end <= range_end.as_slice(),
    };
    start_inside && end_inside
}

/// Returns the parts of `span` outside every descriptor in `holes`, in key order.
pub fn uncovered(
    span: &RangeDescriptor,
    holes: &[RangeDescriptor],
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut holes: Vec<&RangeDescriptor> = holes.iter().collect();
    holes.sort_by(|a, b| a.start.cmp(&b.start));
    let mut parts = Vec::new();
    let mut cursor = Some(span.start.clone());
    for hole in holes {
        let Some(from) = cursor.take() else { break };
        if hole.start > from {
            parts.push((from.clone(), Some(hole.start.clone())));
        }
        cursor = match &hole.end {
            Some(end) if *end > from => Some(end.clone()),
            Some(_) => Some(from),
            None => None,
        };
    }
    if let Some(from) = cursor
        && span.end.as_ref().is_none_or(|end| from < *end)
    {
        parts.push((from, span.end.clone()));
    }
    parts
}

/// Returns the descriptor a snapshot carries, if it decodes.
pub fn snapshot_descriptor(snapshot: &Snapshot) -> Option<RangeDescriptor> {
    let data = wire::RangeSnapshot::decode(snapshot.data.as_slice()).ok()?;
    data.descriptor.as_ref().map(RangeDescriptor::from_wire)
}

/// Stages the applied state of a replica created with it (initialization, split).
pub fn stage_initial_state(range: RangeId, applied: &AppliedState, batch: &mut WriteBatch) {
    batch.put(state_key(range, APPLIED_STATE), applied.encode());
}

fn load_applied_state(
    engine: &(impl ReadView + ?Sized),
    range: RangeId,
) -> RaftResult<AppliedState> {
    match engine.get(&state_key(range, APPLIED_STATE)).map_err(storage_error)? {
        Some(bytes) => AppliedState::decode(&bytes),
        None => Ok(AppliedState::default()),
    }
}

fn load_meta_index(engine: &(impl ReadView + ?Sized)) -> RaftResult<MetaIndex> {
    let end = [keyspace::RANGES + 1];
    let stored: Vec<(Vec<u8>, Vec<u8>)> = engine
        .scan(&[keyspace::RANGES], Some(&end), ScanDirection::Forward)
        .collect::<Result<_, _>>()
        .map_err(storage_error)?;
    MetaIndex::load(stored).map_err(RaftError::Storage)
}

fn storage_error(error: impl std::fmt::Display) -> RaftError {
    RaftError::Storage(error.to_string())
}

/// Produces snapshots of a range from its persisted applied state and data. A data range's
/// versions are not read here: they are registered for streaming (see `snapshot.rs`).
pub struct RangeSnapshotSource<E: Engine> {
    /// The range.
    pub range: RangeId,
    /// The node's MVCC store.
    pub mvcc: Arc<Mvcc<E>>,
    /// Where the engine snapshots of data ranges wait for the transport.
    pub registry: Arc<SnapshotRegistry>,
}

impl<E: Engine> SnapshotSource for RangeSnapshotSource<E> {
    fn snapshot(&self) -> RaftResult<Snapshot> {
        // One engine snapshot for the applied state and the data: the driver, the only writer,
        // is the caller, so nothing changes between them anyway, and the data can be streamed
        // later from the very same state.
        let view = self.mvcc.engine().owned_snapshot();
        let applied = load_applied_state(view.as_ref(), self.range)?;
        let descriptor = &applied.descriptor;
        let mut data = wire::RangeSnapshot {
            versions: Vec::new(),
            max_timestamp: applied.max_timestamp,
            descriptor: Some(descriptor.to_wire([], [], 0)),
            config_index: applied.config_index.0,
            next_range_id: applied.next_range_id,
            descriptors: Vec::new(),
            stream_id: 0,
            prepared: Vec::new(),
            decisions: Vec::new(),
            gc_horizon: applied.gc_horizon,
            closed_timestamp: applied.closed_timestamp,
        };
        if self.range == META_RANGE {
            data.descriptors = load_meta_index(view.as_ref())?.descriptors().cloned().collect();
        } else {
            (data.prepared, data.decisions) = txn_state::snapshot_parts(view.as_ref(), self.range)?;
            let stream = VersionStream::new(view, &descriptor.start, descriptor.end.as_deref());
            data.stream_id = self.registry.register(stream);
        }
        Ok(Snapshot {
            metadata: SnapshotMetadata {
                index: applied.index,
                term: applied.term,
                config: applied.config,
            },
            data: data.encode_to_vec(),
        })
    }
}

#[cfg(test)]
mod tests;
