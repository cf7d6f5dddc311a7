//! Meridian's storage layer: engines, key encoding and multi-version concurrency control.
//!
//! - [`engine`]: the [`Engine`] trait, an ordered key-value store with atomic (optionally
//!   synced) write batches, forward and reverse range scans and consistent snapshots, with two
//!   implementations that pass one shared test suite: [`RocksEngine`] (one RocksDB instance per
//!   node) and [`MemoryEngine`] (tests and simulation).
//! - [`keycode`]: order-preserving (memcomparable) encoding of tuples of SQL values, ascending
//!   or descending per column, so that primary-key order is byte order.
//! - [`mvcc`]: versions of each key keyed by descending commit timestamp, reads at a timestamp,
//!   tombstones and garbage collection below a horizon.
//!
//! The engine's key space is split by a leading byte ([`keyspace`]) so that MVCC data, store
//! metadata and, later, Raft logs share one engine and one write batch (group commit).

pub mod engine;
mod error;
pub mod keycode;
pub mod keyspace;
pub mod mvcc;

pub use engine::{
    Engine, FaultyEngine, MemoryEngine, OwnedSnapshot, ReadView, RocksEngine, RocksOptions,
    ScanDirection, WriteBatch,
};
pub use error::{Error, Result};
pub use mvcc::{GcStats, Mvcc, SpanReader, SpanSize, Version, VersionWrite};
