//! The [`Engine`] trait: an ordered, durable key-value store, and its implementations.
//!
//! An engine stores byte keys in byte order. Reads see either the latest state ([`ReadView`] on
//! the engine) or a consistent snapshot ([`Engine::snapshot`]); a scan always reads one
//! consistent state, even while writers go on. Writes go through atomic [`WriteBatch`]es: all of
//! a batch or none of it survives a crash, and a batch written with `sync` is durable (fsynced)
//! when `write` returns.
//!
//! Implementations: [`RocksEngine`] for nodes and [`MemoryEngine`] for tests and simulation.
//! Both pass the same test suite (`engine::suite`). Scans take a half-open range
//! `[start, end)` (`end = None` means unbounded) and a [`ScanDirection`].

mod faulty;
mod memory;
mod rocks;
#[cfg(test)]
mod suite;

pub use faulty::FaultyEngine;
pub use memory::{MemoryEngine, MemorySnapshot};
pub use rocks::{RocksEngine, RocksOptions, RocksSnapshot};

use crate::Result;

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// An iterator over the entries of a scan, in scan order.
pub type ScanIterator<'a> = Box<dyn Iterator<Item = Result<KeyValue>> + 'a>;

/// A snapshot that keeps its engine alive and may move to another task or thread: for
/// reading one consistent state, bit by bit, while the engine goes on (a range's snapshot
/// streamed to a peer).
pub type OwnedSnapshot = Box<dyn ReadView + Send + Sync>;

/// The order in which a scan returns keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScanDirection {
    /// Ascending key order.
    Forward,
    /// Descending key order.
    Reverse,
}

/// Read access to one consistent state of an engine.
pub trait ReadView {
    /// Returns the value of `key`, if any.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Io`] or [`crate::Error::Corruption`] from the underlying store.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Returns the entries with `start <= key < end` (no upper bound if `end` is `None`) in the
    /// given direction. The scan reads one consistent state of the engine.
    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_>;
}

/// One operation of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Sets a key to a value.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Removes a key (a no-op if absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// Writes applied atomically, in order: a later operation on a key wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
    size_bytes: usize,
}

impl WriteBatch {
    /// Returns an empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put of `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let (key, value) = (key.into(), value.into());
        self.size_bytes += key.len() + value.len();
        self.ops.push(WriteOp::Put { key, value });
    }

    /// Adds a delete of `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        let key = key.into();
        self.size_bytes += key.len();
        self.ops.push(WriteOp::Delete { key });
    }

    /// Appends all operations of `other` after this batch's.
    pub fn extend(&mut self, other: WriteBatch) {
        self.size_bytes += other.size_bytes;
        self.ops.extend(other.ops);
    }

    /// Returns the operations in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// Returns the number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Returns whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Returns the total size of the keys and values, in bytes.
    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }
}

/// An ordered key-value store with atomic batches and snapshots. See the module docs.
pub trait Engine: ReadView + Send + Sync + 'static {
    /// A consistent, read-only view of the engine at the moment it was taken.
    type Snapshot<'a>: ReadView + 'a
    where
        Self: 'a;

    /// Applies `batch` atomically. With `sync`, the batch is durable when this returns;
    /// without, a crash may lose it (whole), but never part of it.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Io`] if the store cannot write (e.g. the disk is full); nothing of the
    /// batch is applied then.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;

    /// Returns a snapshot of the current state.
    fn snapshot(&self) -> Self::Snapshot<'_>;

    /// Returns a snapshot of the current state that owns what it reads (see
    /// [`OwnedSnapshot`]).
    fn owned_snapshot(&self) -> OwnedSnapshot;

    /// Sets `key` to `value` (unsynced).
    ///
    /// # Errors
    ///
    /// As [`Engine::write`].
    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.put(key, value);
        self.write(batch, false)
    }

    /// Removes `key` (unsynced).
    ///
    /// # Errors
    ///
    /// As [`Engine::write`].
    fn delete(&self, key: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.delete(key);
        self.write(batch, false)
    }
}
