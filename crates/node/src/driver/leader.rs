//! What a range's leader does with client requests.
//!
//! A leader serves reads and assigns write timestamps only inside its lease (`meridian_raft`'s
//! `reads.rs`, rules 3 and 6), so every client read and write first waits in the replica's
//! [`Leadership`] queue, in arrival order, until the lease allows it:
//!
//! - a **write** gets its timestamp from [`RawNode::lease_timestamp`] — inside the lease, above
//!   everything the leader served or assigned, above the highest timestamp the range applied or
//!   inherited from its parent (the *floor*, kept in the applied state), and only once the
//!   leader has applied everything committed, so that the floor is current — and is proposed;
//! - a **read** is served at [`RawNode::lease_read`]'s index and timestamp once that index is
//!   applied.
//!
//! Requests wait while the leader has no lease (a new leader, or one waking from quiescence:
//! a heartbeat round is started at once) and while a split it proposed has not applied (the
//! split carries the leader's highest timestamp to the new ranges as their floor, so nothing
//! may be served above it meanwhile). Every waiting request is bounded by its caller's
//! deadline; one that expires, or that reaches a node that lost leadership, is refused, never
//! proposed. A proposal's outcome is reported once it applies: a write after commit-wait. If
//! leadership moves, a snapshot replaces the log, or the replica is destroyed first, the
//! outcome is *ambiguous* and is reported as such. Transactions' lock tables and commits live
//! beside these queues (`txn.rs`); a one-range commit waits in the same queue for its
//! timestamp.

use std::collections::VecDeque;

use super::txn::{CommitPart, propose_part};
use super::*;

/// A client request waiting for the leader to be able to serve it.
pub(super) enum Waiting {
    /// A put (`value: Some`) or delete.
    Write { key: Vec<u8>, value: Option<Vec<u8>>, deadline: Instant, reply: Reply<Committed> },
    /// A read.
    Read { request: ReadRequest, deadline: Instant },
    /// A commit part holding its locks, waiting for a timestamp (see `txn.rs`).
    TxnCommit(CommitPart),
}

impl Waiting {
    fn deadline(&self) -> Instant {
        match self {
            Waiting::Write { deadline, .. }
            | Waiting::Read { deadline, .. }
            | Waiting::TxnCommit(CommitPart { deadline, .. }) => *deadline,
        }
    }

    fn key(&self) -> Option<&[u8]> {
        match self {
            Waiting::Write { key, .. } => Some(key),
            Waiting::Read { request, .. } => request.key(),
            // Its keys were checked when it arrived; a split since shows when it applies.
            Waiting::TxnCommit(_) => None,
        }
    }

    /// Refuses the request; it had no effect. (A commit part's locks are the caller's to
    /// release: this is for leaderships being abandoned.)
    fn fail(self, error: NodeError) {
        match self {
            Waiting::Write { reply, .. } => drop(reply.send(Err(error))),
            Waiting::TxnCommit(CommitPart { reply: Some(reply), .. }) => reply.fail(error),
            Waiting::TxnCommit(_) => {}
            Waiting::Read { request, .. } => request.fail(error),
        }
    }
}

/// What the lease grants a waiting request.
enum Granted {
    /// A write's timestamp.
    Timestamp(u64),
    /// The index a read must see applied.
    ReadAt(LogIndex),
}

/// What a replica keeps for the requests it serves as leader: those waiting for the lease,
/// the proposals their proposers wait for, and reads waiting for their index to apply.
///
/// Invariants:
/// - `waiting` holds requests in arrival order; none of them has been proposed.
/// - Every proposal in `proposals` was made in the term it records.
#[derive(Default)]
pub(super) struct Leadership {
    /// Requests waiting for the lease (or for a split to apply), in arrival order.
    pub(super) waiting: VecDeque<Waiting>,
    /// Proposals whose proposers wait for them to apply, by log index.
    pub(super) proposals: BTreeMap<LogIndex, Proposal>,
    /// Reads allowed by the lease, waiting for their index to be applied.
    pub(super) confirmed: Vec<(LogIndex, ReadRequest)>,
    /// The context of the next heartbeat round started to obtain a lease.
    next_round_context: u64,
    /// When the last such round was started (one per tick interval is enough).
    round_started: Option<Instant>,
    /// Transactions' locks and commits in progress (see `txn.rs`).
    pub(super) txns: TxnLeadership,
    /// Reads at a timestamp waiting to be served (see `snapshot_reads.rs`).
    pub(super) snapshot_reads: Vec<WaitingSnapshotRead>,
}

impl Leadership {
    /// Whether anything waits here.
    pub(super) fn is_busy(&self) -> bool {
        !self.waiting.is_empty()
            || !self.proposals.is_empty()
            || !self.confirmed.is_empty()
            || !self.snapshot_reads.is_empty()
            || self.txns.is_busy()
    }

    /// Whether a split proposed here has not applied yet.
    pub(super) fn split_pending(&self) -> bool {
        self.proposals.values().any(|proposal| matches!(proposal.pending, Pending::Split { .. }))
    }

    /// Fails everything this leadership holds after losing it: waiting requests and reads are
    /// refused (with `refusal`), proposals are ambiguous (they may still commit).
    pub(super) fn abandon(&mut self, refusal: impl Fn() -> NodeError, why: &str) {
        for waiting in std::mem::take(&mut self.waiting) {
            waiting.fail(refusal());
        }
        self.txns.abandon(&refusal);
        for read in std::mem::take(&mut self.snapshot_reads) {
            read.fail(refusal());
        }
        for (_, request) in std::mem::take(&mut self.confirmed) {
            request.fail(refusal());
        }
        for (_, proposal) in std::mem::take(&mut self.proposals) {
            proposal.pending.fail(NodeError::Ambiguous(format!(
                "{why} before the command applied; it may or may not take effect"
            )));
        }
    }
}

impl<E: Engine> Driver<E> {
    /// Returns the error for a request that reached a non-leader.
    pub(super) fn not_leader(
        transport: &Transport,
        node_id: NodeId,
        leader: Option<NodeId>,
    ) -> NodeError {
        match leader {
            Some(leader) if leader != node_id => {
                NodeError::NotLeader { leader: Some(leader), address: transport.address(leader) }
            }
            _ => NodeError::Unavailable("the range has no leader right now".into()),
        }
    }

    /// Returns the replica of `range` if this node leads it and it holds `key`.
    pub(super) fn leader_replica(
        &mut self,
        range: RangeId,
        key: Option<&[u8]>,
    ) -> Result<&mut Replica<E>, NodeError> {
        // A request may wake the replica.
        self.awake.insert(range);
        let Some(replica) = self.replicas.get_mut(&range) else {
            return Err(if self.joined {
                NodeError::RangeNotFound(range)
            } else {
                NodeError::NotInitialized
            });
        };
        if !replica.state.is_initialized() {
            return Err(NodeError::RangeNotFound(range));
        }
        if replica.raft.role() != Role::Leader {
            let leader = replica.raft.leader();
            return Err(Self::not_leader(&self.transport, self.node_id, leader));
        }
        if let Some(key) = key {
            check_key(replica, key)?;
        }
        Ok(replica)
    }

    /// Proposes a command that carries no timestamp (split, meta changes).
    pub(super) fn propose(
        &mut self,
        range: RangeId,
        key: Option<&[u8]>,
        command: impl FnOnce(&mut Replica<E>) -> Vec<u8>,
        pending: Pending,
    ) {
        let replica = match self.leader_replica(range, key) {
            Ok(replica) => replica,
            Err(error) => return pending.fail(error),
        };
        replica.idle_ticks = 0;
        let command = command(replica);
        propose_tracked(replica, command, pending);
    }

    /// Takes a client's write or read: queues it at the range's leader, to be served as soon
    /// as the lease allows (see the module docs).
    pub(super) fn enqueue(&mut self, range: RangeId, request: Waiting) {
        let refusal = if range == META_RANGE && request.key().is_some() {
            Some(NodeError::InvalidArgument("the meta range holds no user keys".into()))
        } else {
            self.leader_replica(range, request.key()).err()
        };
        if let Some(error) = refusal {
            return request.fail(error);
        }
        let replica = self.replicas.get_mut(&range).expect("checked above");
        replica.idle_ticks = 0;
        replica.leadership.waiting.push_back(request);
        self.admit(range);
    }

    /// Serves or proposes the requests waiting at `range`'s leader, in order, as far as the
    /// lease allows; refuses those whose deadline passed or whose key left the range; starts a
    /// heartbeat round when the lease is missing.
    pub(super) fn admit(&mut self, range: RangeId) {
        let interval = raft_interval(&self.truetime);
        let now = Instant::now();
        let (transport, node_id, mvcc) = (&self.transport, self.node_id, &self.mvcc);
        let switches = self.switches;
        let Some(replica) = self.replicas.get_mut(&range) else { return };
        while let Some(request) = replica.leadership.waiting.front() {
            if replica.raft.role() != Role::Leader {
                let leader = replica.raft.leader();
                replica
                    .leadership
                    .abandon(|| Self::not_leader(transport, node_id, leader), "leadership changed");
                return;
            }
            if request.deadline() <= now {
                let request = replica.leadership.waiting.pop_front().expect("a front");
                let error = NodeError::Unavailable(
                    "the request's deadline passed before the leader could serve it".into(),
                );
                match request {
                    // Never proposed: its locks go.
                    Waiting::TxnCommit(part) => replica.leadership.txns.refuse_part(part, error),
                    request => request.fail(error),
                }
                continue;
            }
            if replica.leadership.split_pending() {
                return;
            }
            if let Some(key) = request.key()
                && let Err(error) = check_key(replica, key)
            {
                let request = replica.leadership.waiting.pop_front().expect("a front");
                request.fail(error);
                continue;
            }
            let floor = if switches.ignore_timestamp_floors {
                0
            } else {
                replica.state.applied().safe_timestamp()
            };
            // What the lease allows now: a timestamp for a write, an index for a read.
            let granted = match request {
                Waiting::Write { .. } | Waiting::TxnCommit(_) => {
                    replica.raft.lease_timestamp(interval, floor).map(Granted::Timestamp)
                }
                Waiting::Read { .. } => {
                    replica.raft.lease_read(interval).map(|lease| Granted::ReadAt(lease.index))
                }
            };
            let Some(granted) = granted else {
                request_lease_round(replica, now, self.timing.tick_interval);
                return;
            };
            match (replica.leadership.waiting.pop_front().expect("a front"), granted) {
                (Waiting::Write { key, value, reply, .. }, Granted::Timestamp(timestamp)) => {
                    let command = match &value {
                        Some(value) => encode_put(&key, value, timestamp),
                        None => encode_delete(&key, timestamp),
                    };
                    propose_tracked(replica, command, Pending::Write { timestamp, reply });
                }
                (Waiting::TxnCommit(part), Granted::Timestamp(timestamp)) => {
                    let txn = part.txn;
                    propose_part(replica, part, timestamp);
                    if switches.release_locks_at_proposal {
                        replica.leadership.txns.release(txn);
                    }
                }
                (Waiting::Read { request, .. }, Granted::ReadAt(index)) => {
                    if index <= replica.state.applied().index {
                        serve_read(mvcc, replica, request, switches);
                    } else {
                        replica.leadership.confirmed.push((index, request));
                    }
                }
                _ => unreachable!("a write or commit is granted a timestamp, a read an index"),
            }
        }
    }

    /// Admits what waits at every awake replica (after a cycle applied entries or renewed
    /// leases, and on ticks, when deadlines pass).
    pub(super) fn admit_all(&mut self) {
        let ranges: Vec<RangeId> = self
            .awake
            .iter()
            .filter(|range| {
                self.replicas
                    .get(range)
                    .is_some_and(|replica| !replica.leadership.waiting.is_empty())
            })
            .copied()
            .collect();
        for range in ranges {
            self.admit(range);
        }
    }

    /// Fails the requests a replica can no longer answer because it lost leadership: waiting
    /// requests are refused, proposals not yet applied are ambiguous (the entry may still
    /// commit under the new leader).
    pub(super) fn fail_requests_of_former_leaders(&mut self) {
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.raft.role() == Role::Leader {
                continue;
            }
            // A new leader must record its descriptor again (the meta range may have missed
            // an update of the old leader's).
            replica.published = None;
            super::two_phase::sync_coordinator_role(replica);
            if replica.leadership.is_busy() {
                let leader = replica.raft.leader();
                let (transport, node_id) = (&self.transport, self.node_id);
                replica
                    .leadership
                    .abandon(|| Self::not_leader(transport, node_id, leader), "leadership changed");
            }
        }
    }

    /// Serves the reads whose index has been applied.
    pub(super) fn serve_confirmed_reads(&mut self) {
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.leadership.confirmed.is_empty() {
                continue;
            }
            let applied = replica.state.applied().index;
            let (ready, waiting): (Vec<_>, Vec<_>) =
                replica.leadership.confirmed.drain(..).partition(|(index, _)| *index <= applied);
            replica.leadership.confirmed = waiting;
            for (_, request) in ready {
                serve_read(&self.mvcc, replica, request, self.switches);
            }
        }
    }
}

/// Proposes `command` and keeps `pending` to answer once its entry applies (or fails it at
/// once: a refused proposal was never in the log). Returns whether it was proposed.
pub(super) fn propose_tracked<E: Engine>(
    replica: &mut Replica<E>,
    command: Vec<u8>,
    pending: Pending,
) -> bool {
    match replica.raft.propose(command) {
        Ok(index) => {
            metrics::counter!("meridian_raft_proposals_total").increment(1);
            let term = replica.raft.term();
            replica.leadership.proposals.insert(index, Proposal { term, pending });
            true
        }
        Err(error) => {
            pending.fail(NodeError::Unavailable(error.to_string()));
            false
        }
    }
}

/// Starts a heartbeat round, which grants a lease once a quorum answers (at most one per tick
/// interval).
pub(super) fn request_lease_round<E: Engine>(
    replica: &mut Replica<E>,
    now: Instant,
    interval: Duration,
) {
    let leadership = &mut replica.leadership;
    if leadership.round_started.is_some_and(|started| now.duration_since(started) < interval) {
        return;
    }
    leadership.round_started = Some(now);
    leadership.next_round_context += 1;
    // The round's ReadIndex result is not needed, only the lease its confirmation grants.
    let _ = replica.raft.read_index(leadership.next_round_context);
}

/// Fails unless `replica`'s span holds `key`.
pub(super) fn check_key<E: Engine>(replica: &Replica<E>, key: &[u8]) -> Result<(), NodeError> {
    if replica.state.descriptor().contains(key) { Ok(()) } else { Err(key_not_in_range(replica)) }
}

pub(super) fn key_not_in_range<E: Engine>(replica: &Replica<E>) -> NodeError {
    NodeError::KeyNotInRange { descriptor: Box::new(replica.state.applied().wire_descriptor()) }
}

/// Clamps a scan's `end` to its range's `range_end`: the end to scan to, and the range's end as
/// the key to resume at in the next range if the scan would have gone past it.
pub(super) fn clamp_to_range(
    end: Option<Vec<u8>>,
    range_end: Option<Vec<u8>>,
) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    match (end, range_end) {
        (Some(end), Some(range_end)) if range_end < end => {
            (Some(range_end.clone()), Some(range_end))
        }
        (None, Some(range_end)) => (Some(range_end.clone()), Some(range_end)),
        (end, _) => (end, None),
    }
}

/// Serves a read the lease allowed, from the replica's state; the key is checked again, since a
/// split may have applied since the read arrived.
pub(super) fn serve_read<E: Engine>(
    mvcc: &Mvcc<E>,
    replica: &Replica<E>,
    request: ReadRequest,
    switches: NodeSwitches,
) {
    if let Some(key) = request.key()
        && !switches.serve_outside_span
        && let Err(error) = check_key(replica, key)
    {
        return request.fail(error);
    }
    match request {
        ReadRequest::Get { key, reply, .. } => {
            // An absent key reports its tombstone's timestamp, if it has one.
            let result = mvcc
                .get(&key, Timestamp::MAX)
                .and_then(|version| match version {
                    Some(version) => Ok((Some(version.value), version.commit_ts.as_nanos())),
                    None => Ok((None, mvcc.latest_commit_ts(&key)?.map_or(0, Timestamp::as_nanos))),
                })
                .map_err(internal);
            let _ = reply.send(result);
        }
        ReadRequest::Scan { start, end, limit, reply, .. } => {
            // Clamp to the range's end; past it the caller continues in the next range.
            let range_end = if switches.serve_outside_span {
                None
            } else {
                replica.state.descriptor().end.clone()
            };
            let (end, resume_key) = clamp_to_range(end, range_end);
            let result = mvcc
                .scan(&start, end.as_deref(), Timestamp::MAX, ScanDirection::Forward, limit)
                .map(|rows| {
                    let rows: Vec<_> = rows
                        .into_iter()
                        .map(|(key, version)| (key, version.value, version.commit_ts.as_nanos()))
                        .collect();
                    let resume_key = if rows.len() < limit { resume_key } else { None };
                    ScanResult { rows, resume_key }
                })
                .map_err(internal);
            let _ = reply.send(result);
        }
        ReadRequest::Lookup { key, reply } => {
            let meta = replica.state.meta().expect("lookups go to the meta range");
            let result = meta.lookup(&key).cloned().ok_or_else(|| {
                NodeError::Unavailable(
                    "no range is recorded for this key yet (a split is being recorded); retry"
                        .into(),
                )
            });
            let _ = reply.send(result);
        }
        ReadRequest::List { reply } => {
            let meta = replica.state.meta().expect("listings go to the meta range");
            let _ = reply.send(Ok(meta.descriptors().cloned().collect()));
        }
    }
}
