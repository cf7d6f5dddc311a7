//! Range snapshots for lagging replicas, streamed apart from the Raft messages.
//!
//! When Raft asks a leader for a data range's snapshot (a follower fell behind the compacted
//! log), the range's snapshot source takes an *owned engine snapshot* — O(1) in RocksDB and
//! in the in-memory engine — reads the applied state from it, and registers it here under a
//! stream id. The Raft message it returns carries the applied state and the stream id, not the
//! data, so the driver never reads a range's versions. The transport then sees the
//! `InstallSnapshot` message, takes the registered snapshot and streams the versions to the
//! follower over a `Snapshot` call of their own, a bounded number of bytes per chunk
//! ([`SNAPSHOT_CHUNK_BYTES`]) read from the engine snapshot as the peer consumes them; at most
//! one stream per peer and range is under way. The receiving node assembles the chunks and
//! hands the whole message to its driver, which installs it like any other.
//!
//! Invariants:
//! - The versions streamed are exactly those of the engine state the applied state was read
//!   from: both come from one engine snapshot, taken while the driver (the only writer) waits
//!   for it.
//! - A registered snapshot pins old engine state; one nobody takes within [`SNAPSHOT_TTL`] is
//!   dropped at the next registration.
//!
//! Left out: the receiver still holds a whole range's versions in memory before installing
//! them in one write batch (a range is at most `--range-max-kib`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meridian_rpc::kv as wire;
use meridian_storage::{OwnedSnapshot, SpanReader};
use parking_lot::Mutex;
use tokio::time::Instant;

/// The most bytes of keys and values one streamed chunk carries (about).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// How long a registered snapshot waits for the transport to take it.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(60);

/// Engine snapshots registered for streaming, by stream id. Shared by a node's snapshot
/// sources (which register) and its transport (which takes).
#[derive(Default)]
pub struct SnapshotRegistry {
    streams: Mutex<BTreeMap<u64, Registered>>,
    next_id: AtomicU64,
}

struct Registered {
    stream: VersionStream,
    registered: Instant,
}

/// The versions of one range's span in one engine snapshot, read chunk by chunk.
pub struct VersionStream {
    snapshot: OwnedSnapshot,
    reader: SpanReader,
}

impl VersionStream {
    /// Returns a stream of the versions of the keys in `[start, end)` in `snapshot`.
    pub fn new(snapshot: OwnedSnapshot, start: &[u8], end: Option<&[u8]>) -> Self {
        VersionStream { snapshot, reader: SpanReader::new(start, end) }
    }

    /// Returns the next chunk of versions (about [`SNAPSHOT_CHUNK_BYTES`]), or `None` at the
    /// end of the span.
    ///
    /// # Errors
    ///
    /// The engine's error, if the snapshot cannot be read.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<wire::Version>>, String> {
        let chunk = self
            .reader
            .next_chunk(self.snapshot.as_ref(), SNAPSHOT_CHUNK_BYTES)
            .map_err(|error| error.to_string())?;
        Ok(chunk.map(|versions| {
            versions
                .into_iter()
                .map(|version| wire::Version {
                    key: version.key,
                    timestamp: version.commit_ts.as_nanos(),
                    value: version.value,
                })
                .collect()
        }))
    }
}

impl SnapshotRegistry {
    /// Registers `stream`; returns its stream id (never 0).
    pub fn register(&self, stream: VersionStream) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let mut streams = self.streams.lock();
        streams.retain(|_, registered| now.duration_since(registered.registered) < SNAPSHOT_TTL);
        streams.insert(id, Registered { stream, registered: now });
        id
    }

    /// Takes the stream registered under `id`, if it is still there.
    pub fn take(&self, id: u64) -> Option<VersionStream> {
        self.streams.lock().remove(&id).map(|registered| registered.stream)
    }

    /// Returns how many snapshots wait to be streamed.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meridian_clock::Timestamp;
    use meridian_storage::{Engine, MemoryEngine, Mvcc};

    use super::*;

    /// Registered streams are taken once, and ones nobody takes expire.
    #[tokio::test(start_paused = true)]
    async fn streams_are_taken_once_and_expire() {
        let engine = MemoryEngine::new();
        let registry = SnapshotRegistry::default();
        let first = registry.register(VersionStream::new(engine.owned_snapshot(), b"", None));
        let second = registry.register(VersionStream::new(engine.owned_snapshot(), b"", None));
        assert_ne!(first, second);
        assert!(registry.take(first).is_some());
        assert!(registry.take(first).is_none());
        tokio::time::advance(SNAPSHOT_TTL).await;
        registry.register(VersionStream::new(engine.owned_snapshot(), b"", None));
        assert!(registry.take(second).is_none(), "an untaken stream outlived its time");
        assert_eq!(registry.len(), 1);
    }

    /// A stream reads the state of its snapshot in bounded chunks, whatever is written later.
    #[test]
    fn streams_read_their_snapshot_in_chunks() {
        let mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
        let value = vec![b'v'; 10_000];
        for i in 0..300u64 {
            mvcc.put(format!("k{i:03}").as_bytes(), Timestamp::from_nanos(10 + i), &value).unwrap();
        }
        let mut stream = VersionStream::new(mvcc.engine().owned_snapshot(), b"k100", None);
        mvcc.put(b"k200", Timestamp::from_nanos(1_000), b"later").unwrap();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.next_chunk().unwrap() {
            chunks.push(chunk);
        }
        assert!(chunks.len() >= 2, "{} chunks", chunks.len());
        for chunk in &chunks {
            let bytes: usize = chunk.iter().map(|version| version.key.len() + value.len()).sum();
            assert!(bytes <= SNAPSHOT_CHUNK_BYTES + 2 * value.len(), "a chunk of {bytes} bytes");
        }
        let versions: Vec<wire::Version> = chunks.into_iter().flatten().collect();
        assert_eq!(versions.len(), 200);
        assert!(versions.iter().all(|version| version.value.as_deref() == Some(value.as_slice())));
    }
}
