//! Raft consensus as a pure, deterministic state machine: one instance per range replica.
//!
//! The node takes inputs — [`RawNode::tick`] with the current TrueTime interval,
//! [`RawNode::step`] with a message, [`RawNode::propose`], [`RawNode::read_index`],
//! [`RawNode::propose_config_change`], [`RawNode::transfer_leadership`] — and returns its
//! outputs through [`RawNode::ready`]: hard state and entries to persist, a snapshot to install,
//! messages to send, committed entries to apply and confirmed reads. The application persists,
//! sends and applies, then calls [`RawNode::advance`] (the shape of raft-rs's `RawNode`). There
//! is no IO, no thread, no async and no wall clock: time arrives with `tick`, randomness comes
//! from a seed, so a run is reproducible from its inputs.
//!
//! What is implemented, by section of the Raft paper (Ongaro and Ousterhout, 2014) and of
//! Ongaro's thesis (2014):
//!
//! - **Elections** (§5.2): randomized timeouts from a seeded generator; votes and terms are part
//!   of the hard state, persisted before any message that depends on them goes out (the
//!   `Ready` contract). **Pre-vote** (thesis §9.6) keeps a partitioned node from inflating
//!   terms; **check-quorum** (thesis §6.2) makes a leader that lost its quorum step down, and
//!   voters ignore candidates while they hear from a leader (`election.rs`).
//! - **Replication** (§5.3): appends pipelined up to `max_inflight_appends` per follower, in
//!   probe and replicate states; rejections carry the conflicting term and its first index so
//!   the leader skips a whole term per round trip (`replication.rs`).
//! - **Safety** (§5.4): votes only for up-to-date logs (§5.4.1); a leader commits only entries
//!   of its own term by counting replicas, earlier ones indirectly (§5.4.2), after the no-op it
//!   appends on election (§8).
//! - **Log compaction** (§7): the application snapshots at the applied index and compacts its
//!   storage; followers behind the compacted log receive and install the snapshot.
//! - **Membership** (§6): joint consensus, learners, promotion, removal of the leader itself
//!   (`membership.rs`).
//! - **Leadership transfer** (thesis §3.10) with `TimeoutNow`, **ReadIndex** (thesis §6.4) and
//!   **leader leases** on TrueTime that never overlap (`reads.rs`, which states and proves the
//!   rule).
//!
//! Left out on purpose: follower-originated ReadIndex (clients go to leaders), asynchronous
//! log writes, and snapshot streaming in chunks.
//!
//! Tests: golden scripts in `testscripts/node/` (one behaviour per file) and a deterministic
//! simulator ([`sim`], driven by `tests/simulation.rs`) that checks, over many seeds, that
//! messages leave only after what they promise is persisted, that nodes adopt higher terms and
//! do not inflate their own, election safety, the commit rule, log matching, leader
//! completeness, state-machine safety, durability of acknowledged writes, linearizability of
//! client histories, leases against true time and timestamp order across terms, and a bound
//! on term growth, and that lease promises are kept across restarts. Each deliberately broken
//! rule ([`UnsafeSwitches`]) has a test showing the default seeds catch it.

mod config;
mod election;
mod error;
mod log;
mod membership;
mod node;
mod progress;
mod quiesce;
mod reads;
mod replication;
mod rng;
mod storage;
#[cfg(test)]
mod tests;
mod types;

pub use config::{Config, UnsafeSwitches};
pub use error::{Error, Result};
pub use node::{RawNode, Ready, Role, Status};
pub use progress::ReplicationState;
pub use reads::LeaseRead;
pub use rng::SplitMix64;
pub use storage::{MemStorage, Storage};
pub use types::{
    CommitPoint, ConfigChange, Configuration, Entry, EntryKind, HardState, Interval, LogIndex,
    Message, MessageBody, NodeId, ReadState, RejectHint, Snapshot, SnapshotMetadata, Term,
};
pub mod sim;
