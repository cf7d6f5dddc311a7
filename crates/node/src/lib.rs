//! A Meridian node: the replicas of the ranges it hosts, each a Raft group whose log, hard
//! state and state machine live in the node's single RocksDB store, served over gRPC.
//!
//! - [`raft_store`](RaftLogStore): a range's persistent Raft log, staged into shared batches.
//! - `descriptor`: range descriptors and the meta range's index of them.
//! - `state_machine`: MVCC writes at leader-assigned timestamps, splits, the meta range's
//!   updates, applied state, span-bounded snapshots.
//! - `driver`: one task running every replica's Raft cycle. `driver::events` holds what it
//!   reacts to, `driver::replica` a replica's life cycle, `driver::leader` what a leader does
//!   with requests, `driver::cycle` the persist–send–apply cycle with group commit and
//!   commit-wait, and `driver::maintenance` the once-a-second round (placement, meta updates,
//!   size-triggered splits, replica removal).
//! - `transport`: batched, per-peer gRPC streams for Raft messages, and range snapshots
//!   streamed apart (`snapshot`: engine snapshots registered for streaming, read in chunks).
//! - `server`: wiring (`serve`, `run_node`) and store identity; `server::kv_service` and
//!   `server::node_service` are the gRPC services, `server::shared` their shared state,
//!   `server::hello` peer discovery, liveness and clock health, `server::background` the task
//!   that talks to the meta range.
//! - `clock_monitor`: clock offsets measured on hello round trips, and self-eviction.
//! - `placement`: each leader keeps three voters on live nodes, balanced across them.
//!
//! See `docs/ARCHITECTURE.md` for the protocols and the invariants they keep.

mod clock_monitor;
mod descriptor;
mod driver;
mod error;
mod placement;
mod raft_store;
mod server;
mod snapshot;
mod state_machine;
mod transport;
mod txn_state;

pub use descriptor::{FIRST_DATA_RANGE, META_RANGE, MetaIndex, RangeDescriptor};
pub use driver::{DriverOptions, NodeSwitches, RaftTiming};
pub use error::{NodeError, leader_hint};
pub use raft_store::{RaftLogStore, RangeId, SnapshotSource, StagedReady};
pub use server::{NodeEnvironment, NodeOptions, run_node, serve};
pub use state_machine::{
    AppliedState, encode_decision, encode_delete, encode_one_phase_commit, encode_outcome,
    encode_prepare, encode_put,
};
