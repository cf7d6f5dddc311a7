//! Reads at a timestamp without locks, at a range's leader: the reads of read-only
//! transactions and stale reads (Spanner §4.1.3, DESIGN §6).
//!
//! A read at `t` returns exactly what every transaction committed at or below `t` wrote, and
//! so must wait until nothing can still commit at or below `t` over what it reads:
//!
//! 1. **Later timestamps are above `t`.** The read's timestamp is fixed only once the lease
//!    allows a read ([`RawNode::lease_read`]), which records the leader's clock reading
//!    (`now.latest`, at least `t`) as served: every timestamp the range assigns afterwards —
//!    writes, one-range commits, prepares — is above it. This is the range's timestamp cache;
//!    it passes to the next leader through lease disjointness and to split-off ranges through
//!    the split's floor. A read at a future `t` waits until the clock reaches it.
//! 2. **Earlier proposals are applied.** Anything proposed before the timestamp was fixed may
//!    carry a timestamp at or below `t`: the read waits until the log index that was last
//!    then has applied.
//! 3. **Prepared transactions are resolved.** A transaction prepared here at or below `t` may
//!    commit at or below `t` (its commit timestamp is at or above its prepare timestamp): a
//!    read overlapping its writes waits for its outcome.
//!
//! Then it reads the MVCC snapshot at `t`, and answers only once `after(v)` holds on this
//! node's clock, where `v = min(t, the range's highest applied timestamp)` bounds every commit
//! timestamp the read can see (deletions included): no one sees a transaction's data before
//! its commit-wait is over (Spanner §4.1.2). Without that a read could return a write whose
//! timestamp is still ahead of true time, and a later read-only transaction, starting after it
//! completed, could pick a timestamp below the write's at another, slower-clocked leader and
//! miss it. Only reads of recent writes wait (at most about 2ε); stale reads never do.
//!
//! Reads wait at most until their caller's deadline and are refused (retryably) if the
//! leadership is lost; a read below the GC horizon is refused. While a split this leader
//! proposed is pending, no read fixes its timestamp (as writes wait in `leader.rs`). A read
//! that allows it is served by a follower it reaches instead, below the range's closed
//! timestamp (`follower_reads.rs`).

use std::time::Duration;

use meridian_storage::Error as StorageError;

use super::follower_reads::reply_after_commit_wait;
use super::leader::{check_key, clamp_to_range};
use super::*;

/// How far ahead of the leader's clock an exact read timestamp may be, besides four clock
/// bounds (a timestamp another leader picked from its clock is at most two ahead).
const MAX_FUTURE: Duration = Duration::from_secs(1);

/// Which timestamp a snapshot read is served at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// The leader's current time (a strong read-only transaction's first read).
    Now,
    /// Exactly this timestamp.
    Exact(Timestamp),
    /// The newest timestamp the leader can serve at once that is at most this old.
    MaxStaleness(Duration),
}

/// What a snapshot read reads.
#[derive(Clone, Debug)]
pub enum SnapshotTarget {
    /// One key.
    Key(Vec<u8>),
    /// Keys in `[start, end)` (`end: None` up to the range's end), at most `limit`.
    Scan { start: Vec<u8>, end: Option<Vec<u8>>, limit: usize },
}

impl SnapshotTarget {
    pub(super) fn first_key(&self) -> &[u8] {
        match self {
            SnapshotTarget::Key(key) => key,
            SnapshotTarget::Scan { start, .. } => start,
        }
    }

    fn covers(&self, key: &[u8]) -> bool {
        match self {
            SnapshotTarget::Key(target) => target.as_slice() == key,
            SnapshotTarget::Scan { start, end, .. } => {
                key >= start.as_slice() && end.as_ref().is_none_or(|end| key < end.as_slice())
            }
        }
    }
}

/// What a snapshot read returned.
#[derive(Debug, Default)]
pub struct SnapshotResult {
    /// The timestamp it was served at.
    pub timestamp: u64,
    /// A key's value at that timestamp (`None` if absent).
    pub value: Option<Vec<u8>>,
    /// The commit timestamp of the key's version read (0 if none).
    pub version_timestamp: u64,
    /// A scan's rows: keys, values and commit timestamps.
    pub rows: Vec<(Vec<u8>, Vec<u8>, u64)>,
    /// Where a scan that reached the range's end continues.
    pub resume_key: Option<Vec<u8>>,
}

/// A snapshot read waiting at a leader.
pub(super) struct WaitingSnapshotRead {
    target: SnapshotTarget,
    at: ReadAt,
    deadline: Instant,
    reply: Reply<SnapshotResult>,
    /// Once the lease allowed it: its timestamp, and the log index it must see applied.
    fixed: Option<(Timestamp, LogIndex)>,
}

impl WaitingSnapshotRead {
    pub(super) fn fail(self, error: NodeError) {
        let _ = self.reply.send(Err(error));
    }
}

/// The newest timestamp at or below `candidate`, and not below `oldest`, at which no
/// transaction prepared at `replica` overlaps `target` (or `oldest`, if every such timestamp
/// is older: the read then waits).
pub(super) fn newest_unblocked<E: Engine>(
    replica: &Replica<E>,
    target: &SnapshotTarget,
    candidate: Timestamp,
    oldest: Timestamp,
) -> Timestamp {
    let blocking = replica
        .state
        .prepared_records()
        .filter(|record| record.writes.iter().any(|write| target.covers(&write.key)))
        .map(|record| record.prepare_ts)
        .min();
    match blocking {
        Some(prepare_ts) if prepare_ts <= candidate => {
            Timestamp::from_nanos(prepare_ts.as_nanos().saturating_sub(1)).max(oldest)
        }
        _ => candidate,
    }
}

/// The oldest timestamp a snapshot read waiting at `replica` was fixed at (garbage collection
/// stays below it).
pub(super) fn oldest_fixed<E: Engine>(replica: &Replica<E>) -> Option<Timestamp> {
    replica.leadership.snapshot_reads.iter().filter_map(|read| read.fixed.map(|(t, _)| t)).min()
}

/// Whether a transaction prepared at `replica` at or below `t` writes what `target` reads.
pub(super) fn blocked<E: Engine>(
    replica: &Replica<E>,
    target: &SnapshotTarget,
    t: Timestamp,
) -> bool {
    replica.state.prepared_records().any(|record| {
        record.prepare_ts <= t && record.writes.iter().any(|write| target.covers(&write.key))
    })
}

/// Reads `target` at `t` from the MVCC snapshot, within `replica`'s span.
pub(super) fn serve<E: Engine>(
    mvcc: &Mvcc<E>,
    replica: &Replica<E>,
    target: SnapshotTarget,
    t: Timestamp,
) -> Result<SnapshotResult, NodeError> {
    check_key(replica, target.first_key())?;
    let horizon = replica.state.applied().gc_horizon;
    if t.as_nanos() < horizon {
        return Err(NodeError::InvalidArgument(format!(
            "the read timestamp {} is below the range's GC horizon {horizon}: versions older \
             than the GC TTL are collected",
            t.as_nanos()
        )));
    }
    let refused = |error: StorageError| match error {
        StorageError::BelowGcHorizon { .. } => NodeError::InvalidArgument(error.to_string()),
        error => internal(error),
    };
    let mut result = SnapshotResult { timestamp: t.as_nanos(), ..SnapshotResult::default() };
    match target {
        SnapshotTarget::Key(key) => {
            if let Some(version) = mvcc.get(&key, t).map_err(refused)? {
                result.value = Some(version.value);
                result.version_timestamp = version.commit_ts.as_nanos();
            }
        }
        SnapshotTarget::Scan { start, end, limit } => {
            let range_end = replica.state.descriptor().end.clone();
            let (end, resume_key) = clamp_to_range(end, range_end);
            let rows = mvcc
                .scan(&start, end.as_deref(), t, ScanDirection::Forward, limit)
                .map_err(refused)?;
            if rows.len() < limit {
                result.resume_key = resume_key;
            }
            result.rows = rows
                .into_iter()
                .map(|(key, version)| (key, version.value, version.commit_ts.as_nanos()))
                .collect();
        }
    }
    Ok(result)
}

impl<E: Engine> Driver<E> {
    /// Takes a snapshot read at `range`'s leader (see the module docs), or at the replica
    /// here if `follower` allows it and this node does not lead the range.
    pub(super) fn snapshot_read(
        &mut self,
        range: RangeId,
        target: SnapshotTarget,
        at: ReadAt,
        follower: bool,
        deadline: Instant,
        reply: Reply<SnapshotResult>,
    ) {
        if range == META_RANGE {
            let error = NodeError::InvalidArgument("the meta range holds no user keys".into());
            return drop(reply.send(Err(error)));
        }
        let now = self.truetime.now();
        let future = MAX_FUTURE + self.max_clock_offset * 4;
        if let ReadAt::Exact(t) = at {
            if t.as_nanos() > now.latest.as_nanos().saturating_add(future.as_nanos() as u64) {
                let error = format!("the read timestamp {} is in the future", t.as_nanos());
                return drop(reply.send(Err(NodeError::InvalidArgument(error))));
            }
            if t < self.mvcc.gc_horizon() {
                let error = format!(
                    "the read timestamp {} is below the GC horizon {}",
                    t.as_nanos(),
                    self.mvcc.gc_horizon().as_nanos()
                );
                return drop(reply.send(Err(NodeError::InvalidArgument(error))));
            }
        }
        let leads = self.replicas.get(&range).is_some_and(|r| r.raft.role() == Role::Leader);
        if follower && !leads {
            return self.follower_read(range, target, at, deadline, reply);
        }
        let replica = match self.leader_replica(range, Some(target.first_key())) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        replica.idle_ticks = 0;
        let read = WaitingSnapshotRead { target, at, deadline, reply, fixed: None };
        replica.leadership.snapshot_reads.push(read);
        self.advance_snapshot_reads(range);
    }

    /// Serves the snapshot reads waiting at `range`'s leader that can be served, fixes the
    /// timestamps the lease allows, and refuses those whose deadline passed.
    pub(super) fn advance_snapshot_reads(&mut self, range: RangeId) {
        let interval = raft_interval(&self.truetime);
        let now = Instant::now();
        let tick = self.timing.tick_interval;
        let (mvcc, truetime) = (&self.mvcc, &self.truetime);
        let ignore_prepared = self.switches.snapshot_reads_ignore_prepared;
        let at_earliest = self.switches.read_only_at_earliest;
        let Some(replica) = self.replicas.get_mut(&range) else { return };
        if replica.raft.role() != Role::Leader {
            return;
        }
        // A split's floor for the new ranges was fixed when it was proposed: no read fixes a
        // timestamp above it until it applies.
        let split_pending = replica.leadership.split_pending();
        let reads = std::mem::take(&mut replica.leadership.snapshot_reads);
        let mut lease_missing = false;
        for mut read in reads {
            if read.deadline <= now {
                read.fail(NodeError::Unavailable(
                    "the read could not be served before its deadline".into(),
                ));
                continue;
            }
            if read.fixed.is_none() && !split_pending {
                let latest = Timestamp::from_nanos(interval.latest);
                let lease = match read.at {
                    ReadAt::Exact(t) if t > latest => None,
                    _ => replica.raft.lease_read(interval),
                };
                match lease {
                    Some(lease) => {
                        let served = Timestamp::from_nanos(lease.timestamp);
                        let t = match read.at {
                            ReadAt::Now if at_earliest => Timestamp::from_nanos(interval.earliest),
                            ReadAt::Now => served,
                            ReadAt::Exact(t) => t,
                            ReadAt::MaxStaleness(staleness) => {
                                let oldest = Timestamp::from_nanos(
                                    interval
                                        .latest
                                        .saturating_sub(staleness.as_nanos() as u64)
                                        .max(replica.state.applied().gc_horizon),
                                );
                                newest_unblocked(replica, &read.target, served, oldest)
                            }
                        };
                        read.fixed = Some((t, replica.raft.last_index()));
                    }
                    None => lease_missing |= !matches!(read.at, ReadAt::Exact(t) if t > latest),
                }
            }
            let Some((t, barrier)) = read.fixed else {
                replica.leadership.snapshot_reads.push(read);
                continue;
            };
            let blocked = !ignore_prepared && blocked(replica, &read.target, t);
            if replica.state.applied().index < barrier || blocked {
                replica.leadership.snapshot_reads.push(read);
                continue;
            }
            reply_after_commit_wait(mvcc, truetime, replica, read.target, t, read.reply);
        }
        if lease_missing {
            super::leader::request_lease_round(replica, now, tick);
        }
    }

    /// Advances the snapshot reads waiting at every awake leader (after a cycle applied
    /// entries or renewed leases, and on ticks).
    pub(super) fn advance_all_snapshot_reads(&mut self) {
        let ranges: Vec<RangeId> = self
            .awake
            .iter()
            .filter(|range| {
                self.replicas
                    .get(range)
                    .is_some_and(|replica| !replica.leadership.snapshot_reads.is_empty())
            })
            .copied()
            .collect();
        for range in ranges {
            self.advance_snapshot_reads(range);
        }
    }
}
