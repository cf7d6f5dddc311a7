//! A range's replicated state machine: MVCC versions written by [`RangeCommand`]s at the
//! timestamps their leader assigned, plus the *applied state* (index, term, configuration and
//! highest timestamp applied) persisted with the data it describes.
//!
//! Applying is deterministic: a command that does not decode is rejected the same way on every
//! replica (and reported to the proposer), while an engine failure stops the node (it must not
//! diverge from its peers). Re-applying a command is harmless: it rewrites the same version.

use std::sync::Arc;

use meridian_clock::Timestamp;
use meridian_raft::{
    Configuration, Entry, EntryKind, Error as RaftError, LogIndex, Result as RaftResult, Snapshot,
    SnapshotMetadata, Term,
};
use meridian_rpc::kv as wire;
use meridian_storage::mvcc::VersionWrite;
use meridian_storage::{Engine, Mvcc, WriteBatch};
use prost::Message as _;

use crate::raft_store::{APPLIED_STATE, state_key};
use crate::{RangeId, SnapshotSource};

/// What a range's state machine has applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// The last applied index.
    pub index: LogIndex,
    /// Its term.
    pub term: Term,
    /// The configuration in effect after it.
    pub config: Configuration,
    /// The highest timestamp of any applied command.
    pub max_timestamp: u64,
}

impl AppliedState {
    fn encode(&self) -> Vec<u8> {
        wire::AppliedState {
            index: self.index.0,
            term: self.term.0,
            config: Some((&self.config).into()),
            max_timestamp: self.max_timestamp,
        }
        .encode_to_vec()
    }

    fn decode(bytes: &[u8]) -> RaftResult<Self> {
        let state = wire::AppliedState::decode(bytes)
            .map_err(|error| RaftError::Storage(error.to_string()))?;
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
            max_timestamp: state.max_timestamp,
        })
    }
}

/// The outcome of applying one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A write took effect at this timestamp.
    Write(u64),
    /// Not a command (no-op or membership change).
    Nothing,
    /// The command was invalid; every replica rejects it alike.
    Rejected(String),
}

/// Encodes a write command.
pub fn encode_put(key: &[u8], value: &[u8], timestamp: u64) -> Vec<u8> {
    let put = wire::Write { key: key.to_vec(), value: value.to_vec() };
    wire::RangeCommand { timestamp, operation: Some(wire::range_command::Operation::Put(put)) }
        .encode_to_vec()
}

/// Encodes a delete command.
pub fn encode_delete(key: &[u8], timestamp: u64) -> Vec<u8> {
    wire::RangeCommand {
        timestamp,
        operation: Some(wire::range_command::Operation::Delete(key.to_vec())),
    }
    .encode_to_vec()
}

/// The state machine of one range.
pub struct RangeStateMachine<E: Engine> {
    range: RangeId,
    mvcc: Arc<Mvcc<E>>,
    applied: AppliedState,
}

impl<E: Engine> RangeStateMachine<E> {
    /// Opens the state machine of `range`, loading its applied state.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn open(range: RangeId, mvcc: Arc<Mvcc<E>>) -> RaftResult<Self> {
        let applied =
            match mvcc.engine().get(&state_key(range, APPLIED_STATE)).map_err(storage_error)? {
                Some(bytes) => AppliedState::decode(&bytes)?,
                None => AppliedState::default(),
            };
        Ok(RangeStateMachine { range, mvcc, applied })
    }

    /// Returns the applied state.
    pub fn applied(&self) -> &AppliedState {
        &self.applied
    }

    /// Applies a committed entry into `batch`.
    ///
    /// # Errors
    ///
    /// Only non-deterministic storage errors; the node must stop on them.
    pub fn apply(&mut self, entry: &Entry, batch: &mut WriteBatch) -> RaftResult<Applied> {
        self.applied.index = entry.index;
        self.applied.term = entry.term;
        let EntryKind::Command(data) = &entry.kind else { return Ok(Applied::Nothing) };
        let command = match wire::RangeCommand::decode(data.as_slice()) {
            Ok(command) => command,
            Err(error) => return Ok(Applied::Rejected(format!("undecodable command: {error}"))),
        };
        let (key, value) = match command.operation {
            Some(wire::range_command::Operation::Put(put)) => (put.key, Some(put.value)),
            Some(wire::range_command::Operation::Delete(key)) => (key, None),
            None => return Ok(Applied::Rejected("command without operation".into())),
        };
        let write =
            VersionWrite { key, commit_ts: Timestamp::from_nanos(command.timestamp), value };
        match self.mvcc.add_to_batch(batch, &write) {
            Ok(()) => {
                self.applied.max_timestamp = self.applied.max_timestamp.max(command.timestamp);
                Ok(Applied::Write(command.timestamp))
            }
            Err(error) if error.is_deterministic() => Ok(Applied::Rejected(error.to_string())),
            Err(error) => Err(storage_error(error)),
        }
    }

    /// Records the applied state (with the configuration now in effect) into `batch`.
    pub fn stage_applied_state(&mut self, config: Configuration, batch: &mut WriteBatch) {
        self.applied.config = config;
        batch.put(state_key(self.range, APPLIED_STATE), self.applied.encode());
    }

    /// Replaces the state with a snapshot's into `batch`.
    ///
    /// # Errors
    ///
    /// [`RaftError::Storage`] if the snapshot does not decode or the engine fails.
    pub fn stage_install(&mut self, snapshot: &Snapshot, batch: &mut WriteBatch) -> RaftResult<()> {
        let data = wire::RangeSnapshot::decode(snapshot.data.as_slice()).map_err(storage_error)?;
        self.mvcc.stage_clear(batch).map_err(storage_error)?;
        for version in data.versions {
            let write = VersionWrite {
                key: version.key,
                commit_ts: Timestamp::from_nanos(version.timestamp),
                value: version.value,
            };
            self.mvcc.add_to_batch(batch, &write).map_err(storage_error)?;
        }
        self.applied = AppliedState {
            index: snapshot.metadata.index,
            term: snapshot.metadata.term,
            config: snapshot.metadata.config.clone(),
            max_timestamp: data.max_timestamp,
        };
        batch.put(state_key(self.range, APPLIED_STATE), self.applied.encode());
        Ok(())
    }
}

fn storage_error(error: impl std::fmt::Display) -> RaftError {
    RaftError::Storage(error.to_string())
}

/// Produces snapshots of a range from its persisted applied state and MVCC data.
pub struct MvccSnapshotSource<E: Engine> {
    /// The range.
    pub range: RangeId,
    /// The node's MVCC store.
    pub mvcc: Arc<Mvcc<E>>,
}

impl<E: Engine> SnapshotSource for MvccSnapshotSource<E> {
    fn snapshot(&self) -> RaftResult<Snapshot> {
        // The driver is the only writer and calls this between its batches, so the applied
        // state and the data read here describe the same moment.
        let applied = match self
            .mvcc
            .engine()
            .get(&state_key(self.range, APPLIED_STATE))
            .map_err(storage_error)?
        {
            Some(bytes) => AppliedState::decode(&bytes)?,
            None => AppliedState::default(),
        };
        let versions = self
            .mvcc
            .dump()
            .map_err(storage_error)?
            .into_iter()
            .map(|write| wire::Version {
                key: write.key,
                timestamp: write.commit_ts.as_nanos(),
                value: write.value,
            })
            .collect();
        let data =
            wire::RangeSnapshot { versions, max_timestamp: applied.max_timestamp }.encode_to_vec();
        Ok(Snapshot {
            metadata: SnapshotMetadata {
                index: applied.index,
                term: applied.term,
                config: applied.config,
            },
            data,
        })
    }
}
