//! The RocksDB [`Engine`]: one RocksDB instance per node.
//!
//! Writes use RocksDB write batches (atomic through the write-ahead log); `sync` sets
//! `WriteOptions::sync`, which fsyncs the log before the write returns. Scans set RocksDB's
//! iterate bounds so that iteration stops inside the range, and every scan iterator reads the
//! implicit snapshot RocksDB pins when the iterator is created. All of RocksDB stays in this
//! module, and so does the one `unsafe` block of the storage crate ([`OwnedRocksSnapshot`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    DB, DBIteratorWithThreadMode, IteratorMode, Options, ReadOptions, Snapshot, WriteOptions,
};

use super::{
    Engine, KeyValue, OwnedSnapshot, ReadView, ScanDirection, ScanIterator, WriteBatch, WriteOp,
};
use crate::{Error, Result};

/// Options for opening a [`RocksEngine`].
#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// Creates the store if the directory holds none.
    pub create_if_missing: bool,
    /// The size of one memtable, in bytes.
    pub write_buffer_size_bytes: usize,
    /// The size of the block cache, in bytes.
    pub block_cache_size_bytes: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            create_if_missing: true,
            write_buffer_size_bytes: 64 << 20,
            block_cache_size_bytes: 128 << 20,
        }
    }
}

/// A RocksDB-backed engine.
pub struct RocksEngine {
    /// Shared with the owned snapshots, which keep it alive.
    db: Arc<DB>,
    path: PathBuf,
}

impl std::fmt::Debug for RocksEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksEngine").field("path", &self.path).finish()
    }
}

/// Converts a RocksDB error, keeping corruption apart from other failures.
fn convert_error(error: rocksdb::Error) -> Error {
    let message = error.into_string();
    if message.starts_with("Corruption") { Error::Corruption(message) } else { Error::Io(message) }
}

impl RocksEngine {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory cannot be used (missing and `create_if_missing` unset,
    /// locked by another process, unreadable); [`Error::Corruption`] if the store is damaged.
    pub fn open(path: impl AsRef<Path>, options: RocksOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut db_options = Options::default();
        db_options.create_if_missing(options.create_if_missing);
        db_options.set_write_buffer_size(options.write_buffer_size_bytes);
        db_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_options.increase_parallelism(2);
        let mut table_options = rocksdb::BlockBasedOptions::default();
        let cache =
            rocksdb::Cache::new_lru_cache(options.block_cache_size_bytes).map_err(convert_error)?;
        table_options.set_block_cache(&cache);
        table_options.set_bloom_filter(10.0, false);
        db_options.set_block_based_table_factory(&table_options);
        let db = DB::open(&db_options, &path).map_err(convert_error)?;
        Ok(RocksEngine { db: Arc::new(db), path })
    }

    /// Returns the directory of the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes memtables to SST files (used by benchmarks and tests of on-disk reads).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the flush fails.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(convert_error)
    }
}

/// Builds read options bounded to `[start, end)`.
fn bounded_read_options(start: &[u8], end: Option<&[u8]>) -> ReadOptions {
    let mut read_options = ReadOptions::default();
    read_options.set_iterate_lower_bound(start.to_vec());
    if let Some(end) = end {
        read_options.set_iterate_upper_bound(end.to_vec());
    }
    read_options
}

/// Returns the iterator mode that starts a bounded scan in `direction`.
fn iterator_mode(direction: ScanDirection) -> IteratorMode<'static> {
    match direction {
        ScanDirection::Forward => IteratorMode::Start,
        ScanDirection::Reverse => IteratorMode::End,
    }
}

/// Adapts a RocksDB iterator to a [`ScanIterator`].
fn scan_iterator<'a>(
    start: &[u8],
    end: Option<&[u8]>,
    iterator: DBIteratorWithThreadMode<'a, DB>,
) -> ScanIterator<'a> {
    if end.is_some_and(|end| start >= end) {
        return Box::new(std::iter::empty());
    }
    Box::new(iterator.map(|entry| {
        entry
            .map(|(key, value)| -> KeyValue { (key.into_vec(), value.into_vec()) })
            .map_err(convert_error)
    }))
}

impl ReadView for RocksEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(convert_error)
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        let iterator =
            self.db.iterator_opt(iterator_mode(direction), bounded_read_options(start, end));
        scan_iterator(start, end, iterator)
    }
}

impl Engine for RocksEngine {
    type Snapshot<'a> = RocksSnapshot<'a>;

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut rocks_batch = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                WriteOp::Put { key, value } => rocks_batch.put(key, value),
                WriteOp::Delete { key } => rocks_batch.delete(key),
            }
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        self.db.write_opt(rocks_batch, &write_options).map_err(convert_error)
    }

    fn snapshot(&self) -> RocksSnapshot<'_> {
        RocksSnapshot { snapshot: self.db.snapshot() }
    }

    fn owned_snapshot(&self) -> OwnedSnapshot {
        let db = self.db.clone();
        let snapshot = db.snapshot();
        // SAFETY: `snapshot` borrows the `DB` inside the `Arc`, which never moves and which
        // `OwnedRocksSnapshot` keeps alive in its `db` field, declared after `snapshot` so that
        // the snapshot is released first. The lifetime only stands for "as long as `db`".
        #[allow(unsafe_code)]
        let snapshot = unsafe { std::mem::transmute::<Snapshot<'_>, Snapshot<'static>>(snapshot) };
        Box::new(OwnedRocksSnapshot { snapshot: RocksSnapshot { snapshot }, _db: db })
    }
}

/// A RocksDB snapshot that owns a reference to its database (see [`OwnedSnapshot`]).
///
/// Invariant: `snapshot` borrows the `DB` that `_db` keeps alive; fields drop in declaration
/// order, so the snapshot is released before the last reference to the database can go.
struct OwnedRocksSnapshot {
    snapshot: RocksSnapshot<'static>,
    _db: Arc<DB>,
}

impl ReadView for OwnedRocksSnapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snapshot.get(key)
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        self.snapshot.scan(start, end, direction)
    }
}

/// A RocksDB snapshot: reads see the store as it was when the snapshot was taken.
pub struct RocksSnapshot<'a> {
    snapshot: Snapshot<'a>,
}

impl ReadView for RocksSnapshot<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snapshot.get(key).map_err(convert_error)
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        let iterator =
            self.snapshot.iterator_opt(iterator_mode(direction), bounded_read_options(start, end));
        scan_iterator(start, end, iterator)
    }
}
