//! Multi-version concurrency control over an [`Engine`].
//!
//! Every write of a user key creates a *version* at its commit timestamp; a delete writes a
//! *tombstone* version. A read at timestamp `t` sees, for each key, the newest version with
//! commit timestamp `<= t`, and nothing if that version is a tombstone. This gives lock-free
//! snapshot reads at any timestamp (Spanner §4.1.3, §4.2.3), which the transaction layer builds
//! on: read-write transactions lock at leaders and commit versions at their timestamp; read-only
//! transactions and stale reads just read at a timestamp.
//!
//! Layout: a version lives at engine key `MVCC ‖ escaped(user key) ‖ !commit_ts` (big-endian),
//! where `escaped` is [`keycode::encode_escaped`](crate::keycode::encode_escaped). The escaping
//! is prefix-free and order-preserving, so user keys keep their order and all versions of a key
//! are adjacent; inverting the timestamp puts the newest version first, so a read at `t` is one
//! seek to `(key, t)`. The value is `0x01 ‖ bytes`, or `0x00` for a tombstone.
//!
//! Garbage collection: [`Mvcc::gc`] advances the *GC horizon* `h` and removes every version that
//! no read at `t >= h` can see: all versions older than the newest version `<= h` of their key,
//! and that newest version too if it is a tombstone. Invariants:
//!
//! - The horizon only moves forward and is persisted (synced) before any version is removed.
//! - Reads below the horizon fail with [`Error::BelowGcHorizon`] instead of returning partial
//!   history; a read takes its snapshot before checking the horizon, so a concurrent GC can
//!   never remove what a read that passed the check needs.
//! - Writes at or below the horizon are refused: they would change what a read at the horizon
//!   sees.
//!
//! Left out here, by design: locks, intents and conflict checks belong to the transaction layer,
//! which uses [`Mvcc::latest_commit_ts`] for write-write conflict checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_clock::Timestamp;
use parking_lot::Mutex;

use crate::engine::{Engine, ReadView, ScanDirection, WriteBatch};
use crate::keycode::{decode_escaped, encode_escaped};
use crate::keyspace::{self, prefix_end};
use crate::{Error, Result, corruption, invalid_input};

#[cfg(test)]
mod tests;

/// The metadata key holding the GC horizon.
const GC_HORIZON_KEY: &[u8] = b"\x01mvcc/gc_horizon";
/// The value tag of a tombstone.
const TAG_TOMBSTONE: u8 = 0x00;
/// The value tag of a live value.
const TAG_VALUE: u8 = 0x01;
/// How many deletions garbage collection puts in one write batch.
const GC_BATCH_OPS: usize = 1024;

/// A visible version of a key: its commit timestamp and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// The commit timestamp of the version.
    pub commit_ts: Timestamp,
    /// The value written at `commit_ts`.
    pub value: Vec<u8>,
}

/// One version to write: a value or, with `value: None`, a tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionWrite {
    /// The user key.
    pub key: Vec<u8>,
    /// The commit timestamp of the version.
    pub commit_ts: Timestamp,
    /// The value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// What one garbage collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// User keys examined.
    pub keys_examined: u64,
    /// Versions (values and tombstones) removed.
    pub versions_removed: u64,
}

/// Returns the engine key of `key`'s versions up to the timestamp: `MVCC ‖ escaped(key)`.
fn key_prefix(key: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(key.len() + 11);
    encoded.push(keyspace::MVCC);
    encode_escaped(key, &mut encoded);
    encoded
}

/// Returns the engine key of `key`'s version at `commit_ts`.
fn version_key(key: &[u8], commit_ts: Timestamp) -> Vec<u8> {
    let mut encoded = key_prefix(key);
    encoded.extend_from_slice(&(!commit_ts.as_nanos()).to_be_bytes());
    encoded
}

/// Decodes an engine key of the MVCC key space into the user key and commit timestamp.
fn decode_version_key(encoded: &[u8]) -> Result<(Vec<u8>, Timestamp)> {
    let Some((&keyspace::MVCC, rest)) = encoded.split_first() else {
        return Err(corruption!("key {encoded:x?} is not in the MVCC key space"));
    };
    let (key, read) = decode_escaped(rest)?;
    let timestamp: [u8; 8] = rest[read..]
        .try_into()
        .map_err(|_| corruption!("MVCC key {encoded:x?} has no 8-byte timestamp"))?;
    Ok((key, Timestamp::from_nanos(!u64::from_be_bytes(timestamp))))
}

/// Decodes a stored version value: `Some(value)` or `None` for a tombstone.
fn decode_value(stored: &[u8]) -> Result<Option<&[u8]>> {
    match stored.split_first() {
        Some((&TAG_VALUE, value)) => Ok(Some(value)),
        Some((&TAG_TOMBSTONE, [])) => Ok(None),
        _ => Err(corruption!("invalid MVCC value {stored:x?}")),
    }
}

/// Encodes a version value.
fn encode_value(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        Some(value) => {
            let mut stored = Vec::with_capacity(value.len() + 1);
            stored.push(TAG_VALUE);
            stored.extend_from_slice(value);
            stored
        }
        None => vec![TAG_TOMBSTONE],
    }
}

/// Returns the engine key range holding the versions of the user keys in `[start, end)`
/// (no upper bound if `end` is `None`). The escaped encoding preserves order, so a span of
/// user keys is a span of engine keys.
fn engine_span(start: &[u8], end: Option<&[u8]>) -> (Vec<u8>, Option<Vec<u8>>) {
    let engine_end = match end {
        Some(end) => Some(key_prefix(end)),
        None => prefix_end(&[keyspace::MVCC]),
    };
    (key_prefix(start), engine_end)
}

/// Walks `entries` (version keys in engine order with their stored values) and hands
/// `remove` every version no read at or above `horizon` can see: the versions of a key older
/// than its newest one at or below the horizon, and that one too if it is a tombstone.
fn collect_garbage(
    entries: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>>,
    horizon: Timestamp,
    mut remove: impl FnMut(Vec<u8>) -> Result<()>,
) -> Result<GcStats> {
    let mut stats = GcStats::default();
    let mut current_key: Option<Vec<u8>> = None;
    // Whether the current key's newest version at or below the horizon has been seen.
    let mut seen_visible = false;
    for entry in entries {
        let (encoded_key, stored) = entry?;
        let (key, commit_ts) = decode_version_key(&encoded_key)?;
        if current_key.as_deref() != Some(key.as_slice()) {
            stats.keys_examined += 1;
            current_key = Some(key);
            seen_visible = false;
        }
        if commit_ts > horizon {
            continue;
        }
        let garbage = seen_visible || decode_value(&stored)?.is_none();
        seen_visible = true;
        if garbage {
            remove(encoded_key)?;
            stats.versions_removed += 1;
        }
    }
    Ok(stats)
}

/// MVCC over an engine. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Mvcc<E: Engine> {
    engine: Arc<E>,
    /// The GC horizon in nanoseconds; mirrors the persisted value.
    gc_horizon: AtomicU64,
    /// Serializes garbage collections.
    gc_lock: Mutex<()>,
}

impl<E: Engine> Mvcc<E> {
    /// Opens MVCC over `engine`, loading the persisted GC horizon.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] on read failure, [`Error::Corruption`] if the stored horizon is malformed.
    pub fn new(engine: Arc<E>) -> Result<Self> {
        debug_assert_eq!(GC_HORIZON_KEY[0], keyspace::META);
        let horizon = match engine.get(GC_HORIZON_KEY)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| corruption!("invalid GC horizon {bytes:x?}"))?,
            ),
        };
        Ok(Mvcc { engine, gc_horizon: AtomicU64::new(horizon), gc_lock: Mutex::new(()) })
    }

    /// Returns the underlying engine.
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    /// Returns the GC horizon: reads below it fail.
    pub fn gc_horizon(&self) -> Timestamp {
        Timestamp::from_nanos(self.gc_horizon.load(Ordering::SeqCst))
    }

    /// Fails if a read at `read_ts` could miss versions removed by garbage collection.
    fn check_read_ts(&self, read_ts: Timestamp) -> Result<()> {
        let horizon = self.gc_horizon();
        if read_ts < horizon {
            return Err(Error::BelowGcHorizon { read_ts, horizon });
        }
        Ok(())
    }

    /// Adds a version write to `batch` (so that callers can combine it with other writes, such
    /// as a Raft applied index, in one atomic batch).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `commit_ts` is at or below the GC horizon.
    pub fn add_to_batch(&self, batch: &mut WriteBatch, write: &VersionWrite) -> Result<()> {
        let horizon = self.gc_horizon();
        if write.commit_ts <= horizon {
            return Err(invalid_input!(
                "cannot write at {} at or below the GC horizon {horizon}",
                write.commit_ts
            ));
        }
        batch.put(version_key(&write.key, write.commit_ts), encode_value(write.value.as_deref()));
        Ok(())
    }

    /// Writes versions atomically; with `sync`, durably.
    ///
    /// Writing the same key at the same timestamp again replaces that version (so that
    /// re-applying a replicated command is harmless).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if a timestamp is at or below the GC horizon (nothing is
    /// written then); engine errors.
    pub fn write(&self, writes: &[VersionWrite], sync: bool) -> Result<()> {
        let mut batch = WriteBatch::new();
        for write in writes {
            self.add_to_batch(&mut batch, write)?;
        }
        self.engine.write(batch, sync)
    }

    /// Writes `value` for `key` at `commit_ts` (unsynced).
    ///
    /// # Errors
    ///
    /// As [`Mvcc::write`].
    pub fn put(&self, key: &[u8], commit_ts: Timestamp, value: &[u8]) -> Result<()> {
        let write = VersionWrite { key: key.to_vec(), commit_ts, value: Some(value.to_vec()) };
        self.write(&[write], false)
    }

    /// Writes a tombstone for `key` at `commit_ts` (unsynced).
    ///
    /// # Errors
    ///
    /// As [`Mvcc::write`].
    pub fn delete(&self, key: &[u8], commit_ts: Timestamp) -> Result<()> {
        self.write(&[VersionWrite { key: key.to_vec(), commit_ts, value: None }], false)
    }

    /// Returns the version of `key` visible at `read_ts`: the newest with commit timestamp
    /// `<= read_ts`, or `None` if there is none or it is a tombstone.
    ///
    /// # Errors
    ///
    /// [`Error::BelowGcHorizon`] if `read_ts` is below the GC horizon; engine errors.
    pub fn get(&self, key: &[u8], read_ts: Timestamp) -> Result<Option<Version>> {
        let snapshot = self.engine.snapshot();
        self.check_read_ts(read_ts)?;
        let end = prefix_end(&key_prefix(key));
        let mut scan =
            snapshot.scan(&version_key(key, read_ts), end.as_deref(), ScanDirection::Forward);
        let Some(entry) = scan.next() else {
            return Ok(None);
        };
        let (encoded_key, stored) = entry?;
        let (_, commit_ts) = decode_version_key(&encoded_key)?;
        Ok(decode_value(&stored)?.map(|value| Version { commit_ts, value: value.to_vec() }))
    }

    /// Returns the commit timestamp of the newest version of `key`, tombstones included, at any
    /// timestamp; used to detect write-write conflicts.
    ///
    /// # Errors
    ///
    /// Engine errors.
    pub fn latest_commit_ts(&self, key: &[u8]) -> Result<Option<Timestamp>> {
        let prefix = key_prefix(key);
        let end = prefix_end(&prefix);
        let mut scan = self.engine.scan(&prefix, end.as_deref(), ScanDirection::Forward);
        match scan.next() {
            None => Ok(None),
            Some(entry) => Ok(Some(decode_version_key(&entry?.0)?.1)),
        }
    }

    /// Returns up to `limit` keys with `start <= key < end` (no upper bound if `end` is `None`)
    /// and their versions visible at `read_ts`, in key order or reverse key order.
    ///
    /// # Errors
    ///
    /// [`Error::BelowGcHorizon`] if `read_ts` is below the GC horizon; engine errors.
    pub fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        read_ts: Timestamp,
        direction: ScanDirection,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Version)>> {
        let snapshot = self.engine.snapshot();
        self.check_read_ts(read_ts)?;
        let engine_start = key_prefix(start);
        let engine_end = match end {
            Some(end) => Some(key_prefix(end)),
            None => prefix_end(&[keyspace::MVCC]),
        };
        let mut results = Vec::new();
        // The key being examined and the version of it visible at `read_ts`, if found yet.
        let mut current: Option<(Vec<u8>, Option<Version>)> = None;
        // Whether the current key's visible version is settled (forward: first version <= ts).
        let mut settled = false;
        for entry in snapshot.scan(&engine_start, engine_end.as_deref(), direction) {
            if results.len() >= limit {
                break;
            }
            let (encoded_key, stored) = entry?;
            let (key, commit_ts) = decode_version_key(&encoded_key)?;
            if current.as_ref().is_none_or(|(current_key, _)| *current_key != key) {
                if let Some((done_key, Some(version))) = current.take() {
                    results.push((done_key, version));
                }
                current = Some((key, None));
                settled = false;
            }
            if settled || commit_ts > read_ts {
                continue;
            }
            let visible =
                decode_value(&stored)?.map(|value| Version { commit_ts, value: value.to_vec() });
            if let Some((_, slot)) = current.as_mut() {
                *slot = visible;
            }
            // Forward scans meet the newest version first; reverse scans the oldest, so there a
            // later (newer) version <= read_ts replaces the candidate.
            settled = direction == ScanDirection::Forward;
        }
        if results.len() < limit
            && let Some((key, Some(version))) = current
        {
            results.push((key, version));
        }
        Ok(results)
    }

    /// Advances the GC horizon to `horizon` and removes every version no read at or above it can
    /// see (see the module docs).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `horizon` is below the current horizon; engine errors (the
    /// horizon may then have advanced with only part of the garbage removed, which a later
    /// collection finishes).
    pub fn gc(&self, horizon: Timestamp) -> Result<GcStats> {
        let _guard = self.gc_lock.lock();
        let current = self.gc_horizon();
        if horizon < current {
            return Err(invalid_input!(
                "GC horizon {horizon} is below the current horizon {current}"
            ));
        }
        let mut batch = WriteBatch::new();
        batch.put(GC_HORIZON_KEY.to_vec(), horizon.as_nanos().to_be_bytes().to_vec());
        self.engine.write(batch, true)?;
        self.gc_horizon.store(horizon.as_nanos(), Ordering::SeqCst);

        let snapshot = self.engine.snapshot();
        let end = prefix_end(&[keyspace::MVCC]);
        let entries = snapshot.scan(&[keyspace::MVCC], end.as_deref(), ScanDirection::Forward);
        let mut batch = WriteBatch::new();
        let stats = collect_garbage(entries, horizon, |encoded_key| {
            batch.delete(encoded_key);
            if batch.len() >= GC_BATCH_OPS {
                self.engine.write(std::mem::take(&mut batch), false)?;
            }
            Ok(())
        })?;
        if !batch.is_empty() {
            self.engine.write(batch, false)?;
        }
        Ok(stats)
    }

    /// Stages into `batch` the removal of every version of the keys in `[start, end)` that no
    /// read at or above `horizon` can see (the rule of [`Mvcc::gc`]), for a range whose
    /// replicas collect their span's garbage at a horizon agreed through their log. It does
    /// not move the store-wide horizon: the caller refuses reads of that span below
    /// `horizon` itself.
    ///
    /// # Errors
    ///
    /// Engine errors.
    pub fn stage_gc(
        &self,
        batch: &mut WriteBatch,
        start: &[u8],
        end: Option<&[u8]>,
        horizon: Timestamp,
    ) -> Result<GcStats> {
        let (engine_start, engine_end) = engine_span(start, end);
        let entries =
            self.engine.scan(&engine_start, engine_end.as_deref(), ScanDirection::Forward);
        collect_garbage(entries, horizon, |encoded_key| {
            batch.delete(encoded_key);
            Ok(())
        })
    }

    /// Adds the deletion of every version of the keys in `[start, end)` to `batch` (before
    /// installing a snapshot that replaces a range's data). Returns how many versions it
    /// deletes.
    ///
    /// # Errors
    ///
    /// Engine errors.
    pub fn stage_clear(
        &self,
        batch: &mut WriteBatch,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<usize> {
        let (engine_start, engine_end) = engine_span(start, end);
        let mut count = 0;
        for entry in self.engine.scan(&engine_start, engine_end.as_deref(), ScanDirection::Forward)
        {
            batch.delete(entry?.0);
            count += 1;
        }
        Ok(count)
    }

    /// Returns every version of the keys in `[start, end)`, smallest key first and newest
    /// version first.
    ///
    /// # Errors
    ///
    /// Engine errors and corruption.
    pub fn dump_span(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<VersionWrite>> {
        let mut reader = SpanReader::new(start, end);
        let mut versions = Vec::new();
        while let Some(chunk) = reader.next_chunk(self.engine.as_ref(), usize::MAX)? {
            versions.extend(chunk);
        }
        Ok(versions)
    }

    /// Returns every version stored (for tests and debugging).
    ///
    /// # Errors
    ///
    /// Engine errors and corruption.
    pub fn dump(&self) -> Result<Vec<VersionWrite>> {
        self.dump_span(&[], None)
    }

    /// Returns the bytes the versions of the keys in `[start, end)` occupy (engine keys plus
    /// values), and the key at which about half of them lie before: where to split a range
    /// that grew too large. The middle key is `None` when the span holds fewer than two
    /// distinct keys, since a split must leave data on both sides.
    ///
    /// # Errors
    ///
    /// Engine errors and corruption.
    pub fn span_size(&self, start: &[u8], end: Option<&[u8]>) -> Result<SpanSize> {
        let (engine_start, engine_end) = engine_span(start, end);
        let snapshot = self.engine.snapshot();
        let mut total = 0u64;
        for entry in snapshot.scan(&engine_start, engine_end.as_deref(), ScanDirection::Forward) {
            let (key, value) = entry?;
            total += (key.len() + value.len()) as u64;
        }
        // Second pass over the same snapshot: the first key boundary past half the bytes.
        let mut seen = 0u64;
        let mut first_key: Option<Vec<u8>> = None;
        let mut middle = None;
        for entry in snapshot.scan(&engine_start, engine_end.as_deref(), ScanDirection::Forward) {
            let (encoded_key, value) = entry?;
            let (key, _) = decode_version_key(&encoded_key)?;
            match &first_key {
                None => first_key = Some(key.clone()),
                Some(first) if seen * 2 >= total && *first != key => {
                    middle = Some(key);
                    break;
                }
                Some(_) => {}
            }
            seen += (encoded_key.len() + value.len()) as u64;
        }
        Ok(SpanSize { bytes: total, middle_key: middle })
    }
}

/// Reads the versions of the keys in a span in chunks, from any view of an engine (a range's
/// snapshot streamed to a peer reads an engine snapshot this way, a bounded number of bytes
/// at a time). Versions come smallest key first, newest version first.
#[derive(Clone, Debug)]
pub struct SpanReader {
    /// The engine key to read from next, or `None` once the span is exhausted.
    next: Option<Vec<u8>>,
    /// The engine key the span ends before.
    end: Option<Vec<u8>>,
}

impl SpanReader {
    /// Returns a reader of the versions of the user keys in `[start, end)` (no upper bound if
    /// `end` is `None`).
    pub fn new(start: &[u8], end: Option<&[u8]>) -> Self {
        let (start, end) = engine_span(start, end);
        SpanReader { next: Some(start), end }
    }

    /// Returns the next versions, at least one and about `max_bytes` of keys and values, or
    /// `None` once the span is exhausted.
    ///
    /// # Errors
    ///
    /// Engine errors and corruption.
    pub fn next_chunk(
        &mut self,
        view: &(impl ReadView + ?Sized),
        max_bytes: usize,
    ) -> Result<Option<Vec<VersionWrite>>> {
        let Some(from) = self.next.take() else { return Ok(None) };
        let mut versions = Vec::new();
        let mut bytes = 0usize;
        for entry in view.scan(&from, self.end.as_deref(), ScanDirection::Forward) {
            let (encoded_key, stored) = entry?;
            if bytes >= max_bytes {
                // Resume at this key next time.
                self.next = Some(encoded_key);
                break;
            }
            bytes = bytes.saturating_add(encoded_key.len() + stored.len());
            let (key, commit_ts) = decode_version_key(&encoded_key)?;
            let value = decode_value(&stored)?.map(<[u8]>::to_vec);
            versions.push(VersionWrite { key, commit_ts, value });
        }
        Ok(if versions.is_empty() { None } else { Some(versions) })
    }
}

/// The size of a span of keys; see [`Mvcc::span_size`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanSize {
    /// Bytes of engine keys and values.
    pub bytes: u64,
    /// A key that splits the bytes about in half, if the span holds two keys or more.
    pub middle_key: Option<Vec<u8>>,
}
