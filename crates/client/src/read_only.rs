//! Read-only transactions and stale reads: lock-free reads of one MVCC snapshot.
//!
//! A [`ReadOnlyTransaction`] reads every key and span at one timestamp, served by the range
//! leaders without locks (they wait until nothing can still commit at or below it over what
//! is read). [`ReadTimestamp::Strong`] takes the first leader's current time, so the
//! transaction sees every transaction acknowledged before it began (external consistency);
//! [`ReadTimestamp::Exact`] reads at a given timestamp, and [`ReadTimestamp::MaxStaleness`]
//! at the newest one the first leader can serve at once that is at most that old. Later reads
//! use the first read's timestamp exactly, so all of them see one snapshot. Reads are
//! idempotent: they are retried on every retryable failure.
//!
//! [`ReadFrom`] says which replica serves them: the leader (the default), or a follower —
//! any of them in turn, or the one on a given node — which serves below the range's safe
//! time (its closed timestamp, and the transactions prepared there), waiting for it if
//! needed. A follower that cannot serve a read soon sends it back, and it goes to the leader;
//! a strong read at a follower takes that follower's clock.

use std::time::Duration;

use meridian_rpc::kv::{SnapshotReadRequest, SnapshotReadResponse, snapshot_read_request};

use tonic::{Response, Status};
use tracing::debug;

use crate::{Client, ClientError, Kind, Verdict, Version, judge, scan_pages, within_budget};

/// Which timestamp a read-only transaction reads at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadTimestamp {
    /// The current time at the first read's leader: sees everything committed before.
    Strong,
    /// Exactly this timestamp (nanoseconds since the Unix epoch, as commits report them).
    Exact(u64),
    /// The newest timestamp the first read's leader can serve without waiting, at most this
    /// old.
    MaxStaleness(Duration),
}

/// Which replica serves a read-only transaction's reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadFrom {
    /// The range's leader, which serves at once.
    #[default]
    Leader,
    /// A follower of the range (the replicas other than the leader, as far as known, in
    /// turn).
    Follower,
    /// The range's replica on this node (its id), if there is one; otherwise the leader. A
    /// gateway reads its own node's replicas this way.
    Node(u64),
}

/// A read-only transaction (see the module documentation).
pub struct ReadOnlyTransaction<'a> {
    client: &'a Client,
    at: ReadTimestamp,
    from: ReadFrom,
    /// The timestamp of its reads, once the first one fixed it.
    timestamp: Option<u64>,
}

impl Client {
    /// Begins a read-only transaction at `at`.
    pub fn read_only(&self, at: ReadTimestamp) -> ReadOnlyTransaction<'_> {
        let timestamp = match at {
            ReadTimestamp::Exact(timestamp) => Some(timestamp),
            _ => None,
        };
        ReadOnlyTransaction { client: self, at, from: ReadFrom::Leader, timestamp }
    }

    /// Where a follower read of the range holding `key` goes (`from` names no leader): the
    /// address of the chosen replica and the range's id, if there is such a replica.
    async fn follower_for(
        &self,
        key: &[u8],
        from: ReadFrom,
    ) -> Result<Option<(String, u64)>, ClientError> {
        if from == ReadFrom::Leader {
            return Ok(None);
        }
        let descriptor = self.route(key).await?;
        let routes = self.routes.lock();
        let leader = routes.leaders.get(&descriptor.range_id);
        let replicas: Vec<(u64, &String)> = descriptor
            .voters
            .iter()
            .filter_map(|node| routes.addresses.get(node).map(|address| (*node, address)))
            .collect();
        let chosen = match from {
            ReadFrom::Leader => None,
            ReadFrom::Node(id) => replicas.iter().find(|(node, _)| *node == id),
            ReadFrom::Follower => {
                let followers: Vec<&(u64, &String)> =
                    replicas.iter().filter(|(_, address)| Some(*address) != leader).collect();
                let turn = self.follower_turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (!followers.is_empty()).then(|| followers[turn % followers.len()])
            }
        };
        Ok(chosen.map(|(_, address)| ((*address).clone(), descriptor.range_id)))
    }

    /// One attempt of a follower read at `address`.
    async fn follower_read(
        &self,
        address: &str,
        request: SnapshotReadRequest,
    ) -> Result<SnapshotReadResponse, Status> {
        let budget = self.options.attempt_timeout.min(self.options.deadline);
        let mut node = self.node(address, budget).map_err(|error| match error {
            ClientError::Status(status) => status,
            error => Status::unavailable(error.to_string()),
        })?;
        within_budget(budget, node.snapshot_read(request)).await.map(Response::into_inner)
    }
}

impl ReadOnlyTransaction<'_> {
    /// Serves the transaction's reads from `from` (see the module documentation).
    pub fn read_from(mut self, from: ReadFrom) -> Self {
        self.from = from;
        self
    }

    /// The timestamp its reads are served at, once known (after the first read, or from the
    /// start for an exact one).
    pub fn timestamp(&self) -> Option<u64> {
        self.timestamp
    }

    fn at(&self) -> Option<snapshot_read_request::At> {
        match (self.timestamp, self.at) {
            (Some(timestamp), _) => Some(snapshot_read_request::At::Exact(timestamp)),
            (None, ReadTimestamp::MaxStaleness(staleness)) => {
                Some(snapshot_read_request::At::MaxStalenessNanos(staleness.as_nanos() as u64))
            }
            (None, _) => None,
        }
    }

    async fn read(
        &mut self,
        key: &[u8],
        read: snapshot_read_request::Read,
    ) -> Result<SnapshotReadResponse, ClientError> {
        let at = self.at();
        if let Some((address, range_id)) = self.client.follower_for(key, self.from).await? {
            let read = Some(read.clone());
            let request = SnapshotReadRequest { range_id, read, at, follower: true };
            match self.client.follower_read(&address, request).await {
                Ok(response) => {
                    self.timestamp.get_or_insert(response.timestamp);
                    return Ok(response);
                }
                Err(status) if judge(&status, Kind::Idempotent) == Verdict::Fail => {
                    return Err(ClientError::Status(status));
                }
                Err(status) => {
                    debug!(%address, range_id, %status, "a follower sent the read to the leader");
                }
            }
        }
        let response = self
            .client
            .on_range(key, Kind::Idempotent, |mut node, range_id| {
                let read = Some(read.clone());
                let request = SnapshotReadRequest { range_id, read, at, follower: false };
                async move { node.snapshot_read(request).await }
            })
            .await?;
        self.timestamp.get_or_insert(response.timestamp);
        Ok(response)
    }

    /// Reads `key`'s value at the transaction's timestamp.
    ///
    /// # Errors
    ///
    /// [`ClientError`] when the cluster refuses (a timestamp below the GC horizon, or in the
    /// future) or no attempt succeeds in time.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        Ok(self.get_version(key).await?.value)
    }

    /// Reads `key`'s version at the transaction's timestamp: its value (none if absent) and
    /// the commit timestamp of the version read (0 if there is none, or it was deleted).
    ///
    /// # Errors
    ///
    /// As [`ReadOnlyTransaction::get`].
    pub async fn get_version(&mut self, key: &[u8]) -> Result<Version, ClientError> {
        let response = self.read(key, snapshot_read_request::Read::Key(key.to_vec())).await?;
        let timestamp = if response.value.is_some() { response.version_timestamp } else { 0 };
        Ok(Version { value: response.value, timestamp })
    }

    /// Returns up to `limit` keys in `[start, end)` (no upper bound if `end` is `None`) with
    /// their values at the transaction's timestamp, range by range.
    ///
    /// # Errors
    ///
    /// As [`ReadOnlyTransaction::get`].
    pub async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        let rows = scan_pages(start, end, limit, async |from: Vec<u8>, scan| {
            let response = self.read(&from, snapshot_read_request::Read::Scan(scan)).await?;
            Ok((response.rows, response.resume_key))
        })
        .await?;
        Ok(rows.into_iter().take(limit).collect())
    }
}
