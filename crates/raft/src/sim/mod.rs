//! A deterministic simulator for Raft groups, for tests and benchmarks.
//!
//! [`Cluster`] runs N [`crate::RawNode`]s in one thread over a simulated network and clock, all
//! driven by one seed: messages are delayed, reordered, dropped and duplicated; a nemesis
//! partitions the network (symmetrically or one way), crashes nodes (losing everything not
//! persisted) and restarts them, and moves clock offsets within the TrueTime bound. On top runs
//! a small key-value state machine, and clients write and read (through ReadIndex or leases)
//! while the simulation records their history.
//!
//! During and after a run the simulator checks Raft's safety properties (§5.2, Figure 3):
//! - election safety: at most one leader per term;
//! - leader completeness: a new leader holds every entry committed before its term;
//! - state-machine safety: no two nodes apply different entries at one index;
//! - log matching: entries with equal index and term have equal prefixes;
//! - durability: every acknowledged write is in every node's final state;
//! - linearizability of the client history ([`linearizability`]);
//! - lease disjointness: no lease read of a term happens before a lease of an earlier term
//!   ended, or before any lease read of an earlier term.
//!
//! Violations are collected in a [`Report`], with the seed, so that a run can be replayed.

mod cluster;
pub mod display;
mod invariants;
mod kv;
pub mod linearizability;

pub use cluster::{Cluster, Report, SimOptions};
