//! A Meridian node: the replicas of the ranges it hosts, each a Raft group whose log, hard
//! state and state machine live in the node's single storage engine.
//!
//! Built so far: [`RaftLogStore`], the persistent Raft log of one range replica. It implements
//! [`meridian_raft::Storage`] over a [`meridian_storage::Engine`] and stages each `Ready` into a
//! caller-supplied write batch, so that the multi-raft driver (next) can persist every range's
//! ready state in one synced batch per cycle (group commit).

mod raft_store;

pub use raft_store::{RaftLogStore, RangeId, SnapshotSource, StagedReady};
