//! Closed timestamps and snapshot reads at any replica (Spanner §4.1.3, DESIGN §6).
//!
//! **Safe time.** A replica may serve a read at `t` from what it applied alone once
//! `t ≤ t_safe = min(t_safe_raft, t_safe_txn)`:
//!
//! - `t_safe_raft` is [`AppliedState::safe_timestamp`]: the higher of the range's timestamp
//!   floor (the highest timestamp applied, or inherited at a split) and its closed timestamp.
//!   No later entry of the range's log writes at or below it, except the outcome of a
//!   transaction already prepared: every write, one-range commit and prepare carries a
//!   timestamp its leader assigned above the floor, above every timestamp it served or closed
//!   (`RawNode::lease_timestamp`), and above every commit timestamp it logged as coordinator
//!   (`RawNode::record_assigned_timestamp`: a two-phase commit's timestamp may be ahead of its
//!   clock, and the decision raises the floor when it applies); every later leader's
//!   timestamps are above that (lease disjointness, and the floor it applies before assigning
//!   any).
//! - `t_safe_txn` is one below the oldest prepare timestamp of the prepared transactions that
//!   write what the read reads (a transaction commits at or above its prepare timestamp). As
//!   at leaders, only the prepared transactions overlapping the read hold it back.
//!
//! **Closing.** A range that is written keeps `t_safe_raft` close to its leader's clock; one
//! that is only read would not, so its leader *closes* it: it fixes a timestamp through its
//! lease as a read would (`RawNode::lease_read`: at least its `now().latest`, recorded as
//! served, so everything it assigns afterwards is above it) and proposes a close record at
//! it. Entries proposed before the record may carry timestamps at or below it and come
//! before it in the log; entries after it are above it. A leader closes each awake range it
//! leads whose safe time fell [`CLOSE_LAG`] behind its clock's earliest reading, and closes
//! it once more just before it quiesces (`replica.rs`), so a quiesced range's followers serve
//! every read up to the moment it went quiet. Closing further ahead would have to be promised
//! beyond the leader's lease, and every write after waking would wait out the promise.
//!
//! **Follower reads.** A snapshot read that asks for it is served by the replica it reaches,
//! leader or not, under this one rule. A strong read takes the replica's own `now().latest`
//! (only while its clock is trusted), which is at or above every commit timestamp
//! acknowledged before the read began (commit-wait). A bounded-staleness read takes the
//! newest timestamp at or below `t_safe` it may; an exact one its timestamp. The read waits
//! for the replica to apply what makes it safe, at most [`FOLLOWER_WAIT`] and never past the
//! caller's deadline; a replica that cannot serve it by then — or at once if nothing that
//! would make it safe is coming: its range is quiesced, or its safe time is further behind its
//! clock than an awake leader lets it fall (the leader went quiet, or cannot reach it) —
//! answers `NotLeader` with the leader's address, and the client reads at the leader. Replies commit-wait for what they
//! may see, as at leaders. A replica refuses reads over spans it cedes to newer ranges on the
//! node (their data is not its own), and below its GC horizon.

use std::time::Duration;

use super::snapshot_reads::{blocked, newest_unblocked, serve};
use super::*;
use crate::state_machine::encode_close;

/// How far a range's safe time may fall behind its leader's clock (earliest reading) before
/// the leader closes the range again.
pub(super) const CLOSE_LAG: Duration = Duration::from_millis(200);
/// How long a follower holds a read that its safe time does not cover yet (while its range is
/// awake) before sending the reader to the leader.
pub(super) const FOLLOWER_WAIT: Duration = Duration::from_millis(500);

/// A snapshot read waiting at a replica for its safe time.
pub(super) struct WaitingFollowerRead {
    target: SnapshotTarget,
    at: ReadAt,
    /// When the replica gives up and sends the reader to the leader.
    give_up: Instant,
    reply: Reply<SnapshotResult>,
}

/// Whether a newer replica on this node owns part of what `target` reads.
fn reads_ceded<E: Engine>(replica: &Replica<E>, target: &SnapshotTarget) -> bool {
    replica.state.ceded().iter().any(|owner| match target {
        SnapshotTarget::Key(key) => owner.contains(key),
        SnapshotTarget::Scan { start, end, .. } => {
            owner.end.as_ref().is_none_or(|owner_end| start < owner_end)
                && end.as_ref().is_none_or(|end| owner.start < *end)
        }
    })
}

/// Closes `replica`'s range if this node leads it, may serve transactions, and its safe time
/// is more than `lag` behind `now.earliest` (see the module docs). Returns whether it
/// proposed a close record.
pub(super) fn close_if_behind<E: Engine>(
    replica: &mut Replica<E>,
    now: Interval,
    lag: Duration,
) -> bool {
    if replica.range == META_RANGE
        || !super::two_phase::txn_ready(replica)
        || replica.leadership.split_pending()
        || replica.closing.is_some_and(|(term, index)| {
            term == replica.raft.term() && replica.state.applied().index < index
        })
    {
        return false;
    }
    let safe = replica.state.applied().safe_timestamp();
    if safe.saturating_add(lag.as_nanos() as u64) >= now.earliest {
        return false;
    }
    let Some(lease) = replica.raft.lease_read(now) else { return false };
    match replica.raft.propose(encode_close(lease.timestamp)) {
        Ok(index) => {
            metrics::counter!("meridian_raft_proposals_total").increment(1);
            replica.closing = Some((replica.raft.term(), index));
            true
        }
        Err(_) => false,
    }
}

impl WaitingFollowerRead {
    pub(super) fn fail(self, error: NodeError) {
        let _ = self.reply.send(Err(error));
    }
}

impl<E: Engine> Driver<E> {
    /// Takes a snapshot read at `range`'s replica here, leader or not (see the module docs).
    pub(super) fn follower_read(
        &mut self,
        range: RangeId,
        target: SnapshotTarget,
        at: ReadAt,
        deadline: Instant,
        reply: Reply<SnapshotResult>,
    ) {
        let Some(replica) = self.replicas.get_mut(&range) else {
            let error = if self.joined {
                NodeError::RangeNotFound(range)
            } else {
                NodeError::NotInitialized
            };
            return drop(reply.send(Err(error)));
        };
        if !replica.state.is_initialized() {
            return drop(reply.send(Err(NodeError::RangeNotFound(range))));
        }
        if let Err(error) = super::leader::check_key(replica, target.first_key()) {
            return drop(reply.send(Err(error)));
        }
        let at = match at {
            ReadAt::Now if !self.clock_healthy => {
                let error = Self::not_leader(&self.transport, self.node_id, replica.raft.leader());
                metrics::counter!("meridian_follower_reads_total", "outcome" => "redirected")
                    .increment(1);
                return drop(reply.send(Err(error)));
            }
            ReadAt::Now if self.switches.read_only_at_earliest => {
                ReadAt::Exact(self.truetime.now().earliest)
            }
            ReadAt::Now => ReadAt::Exact(self.truetime.now().latest),
            at => at,
        };
        let give_up = deadline.min(Instant::now() + FOLLOWER_WAIT);
        replica.follower_reads.push(WaitingFollowerRead { target, at, give_up, reply });
        self.follower_reading.insert(range);
        self.advance_follower_reads(range);
    }

    /// Serves the reads waiting at `range`'s replica that its safe time now covers, and sends
    /// those that waited long enough to the leader.
    pub(super) fn advance_follower_reads(&mut self, range: RangeId) {
        let now = Instant::now();
        let clock = self.truetime.now();
        let (earliest, latest) = (clock.earliest.as_nanos(), clock.latest.as_nanos());
        let ignore_safe_time = self.switches.follower_reads_ignore_safe_time;
        let (mvcc, truetime, transport) = (&self.mvcc, &self.truetime, &self.transport);
        let Some(replica) = self.replicas.get_mut(&range) else {
            self.follower_reading.remove(&range);
            return;
        };
        let applied = replica.state.applied();
        let safe = Timestamp::from_nanos(applied.safe_timestamp());
        let horizon = applied.gc_horizon;
        // A leader closes awake ranges every `CLOSE_LAG` (checked on ticks): a safe time
        // further behind says no close is coming soon.
        let expected = (CLOSE_LAG + self.timing.tick_interval * 3).as_nanos() as u64;
        let stalled = safe.as_nanos().saturating_add(expected) < earliest;
        let quiet = replica.raft.is_quiesced() || stalled;
        // Commit-wait and staleness bounds rest on this node's clock.
        let clock_trusted = self.clock_healthy;
        for read in std::mem::take(&mut replica.follower_reads) {
            let t = match read.at {
                ReadAt::Exact(t) => Some(t),
                ReadAt::Now => unreachable!("fixed on arrival"),
                ReadAt::MaxStaleness(staleness) => {
                    let oldest = Timestamp::from_nanos(
                        latest.saturating_sub(staleness.as_nanos() as u64).max(horizon),
                    );
                    (safe >= oldest || ignore_safe_time)
                        .then(|| newest_unblocked(replica, &read.target, safe, oldest))
                }
            };
            let ready = ignore_safe_time
                || (clock_trusted
                    && t.is_some_and(|t| t <= safe && !blocked(replica, &read.target, t)));
            let ceded = reads_ceded(replica, &read.target);
            if let Some(t) = t.filter(|_| ready && !ceded) {
                metrics::counter!("meridian_follower_reads_total", "outcome" => "served")
                    .increment(1);
                reply_after_commit_wait(mvcc, truetime, replica, read.target, t, read.reply);
            } else if ceded || quiet || !clock_trusted || read.give_up <= now {
                let error = Self::not_leader(transport, self.node_id, replica.raft.leader());
                metrics::counter!("meridian_follower_reads_total", "outcome" => "redirected")
                    .increment(1);
                let _ = read.reply.send(Err(error));
            } else {
                replica.follower_reads.push(read);
            }
        }
        if replica.follower_reads.is_empty() {
            self.follower_reading.remove(&range);
        }
    }

    /// Advances the reads waiting at every replica that has some (after a cycle applied
    /// entries, and on ticks).
    pub(super) fn advance_all_follower_reads(&mut self) {
        let ranges: Vec<RangeId> = self.follower_reading.iter().copied().collect();
        for range in ranges {
            self.advance_follower_reads(range);
        }
    }
}

/// Serves `target` at `t` from `replica`, answering once `after(v)` holds for every commit
/// timestamp `v` the read can see (commit-wait, as `snapshot_reads.rs` explains).
pub(super) fn reply_after_commit_wait<E: Engine>(
    mvcc: &Mvcc<E>,
    truetime: &TrueTime,
    replica: &Replica<E>,
    target: SnapshotTarget,
    t: Timestamp,
    reply: Reply<SnapshotResult>,
) {
    let result = serve(mvcc, replica, target, t);
    let visible = t.min(Timestamp::from_nanos(replica.state.applied().max_timestamp));
    if result.is_err() || truetime.now().after(visible) {
        let _ = reply.send(result);
        return;
    }
    let truetime = truetime.clone();
    tokio::spawn(async move {
        let waited = truetime.wait_until_after(visible, MAX_COMMIT_WAIT).await;
        let _ = reply.send(
            waited
                .map_err(|error| {
                    NodeError::Unavailable(format!("the read's commit-wait failed: {error}"))
                })
                .and(result),
        );
    });
}
