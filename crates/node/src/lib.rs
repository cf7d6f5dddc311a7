//! A Meridian node: the replicas of the ranges it hosts, each a Raft group whose log, hard
//! state and state machine live in the node's single RocksDB store, served over gRPC.
//!
//! - [`raft_store`](RaftLogStore): a range's persistent Raft log, staged into shared batches.
//! - `state_machine`: MVCC writes at leader-assigned timestamps, applied state, snapshots.
//! - `driver`: one task running every replica's Raft cycle with group commit.
//! - `transport`: batched, per-peer gRPC streams for Raft messages.
//! - `server`: the `Kv` and `Node` services, store identity checks and peer discovery.
//! - `clock_monitor`: clock offsets measured on hello round trips, and self-eviction.
//! - `placement`: the leader keeps three live voters, replacing dead ones through learners.
//!
//! This is the first slice of the node: one range covering all keys, replicated on up to three
//! nodes chosen at `init` and replaced when they die. The meta range and splits are not built
//! yet.

mod clock_monitor;
mod descriptor;
mod driver;
mod error;
mod placement;
mod raft_store;
mod server;
mod state_machine;
mod transport;

pub use descriptor::{FIRST_DATA_RANGE, META_RANGE, MetaIndex, RangeDescriptor};
pub use driver::{DriverOptions, RaftTiming};
pub use error::{NodeError, leader_hint};
pub use raft_store::{RaftLogStore, RangeId, SnapshotSource, StagedReady};
pub use server::{NodeOptions, run_node};
pub use state_machine::{AppliedState, encode_delete, encode_put};
