//! What the driver reacts to and answers with: client requests, peer messages, work for the
//! background task, and the reports it hands out.

use super::*;

/// A client's answer channel.
pub type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// A write's or commit's acknowledgement, sent once commit-wait is over (Spanner §4.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The commit timestamp.
    pub timestamp: u64,
    /// How long the leader waited, after the record applied, until `after(timestamp)` held.
    pub commit_wait: Duration,
    /// The clock's uncertainty ε (half the width of `now()`) when the wait ended.
    pub uncertainty: Duration,
}

/// Rows a scan returned, and where to continue if it stopped at its range's end.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Keys with their latest values and commit timestamps.
    pub rows: Vec<(Vec<u8>, Vec<u8>, u64)>,
    /// The range's end, if the scan reached it before the requested end and the limit.
    pub resume_key: Option<Vec<u8>>,
}

/// A read a client asked for.
pub enum ReadRequest {
    /// The latest value of a key (`None` if absent), with the commit timestamp of its latest
    /// version (its tombstone's if deleted; 0 if it never existed, or if its tombstone was
    /// collected below the range's GC horizon).
    Get { range: RangeId, key: Vec<u8>, reply: Reply<(Option<Vec<u8>>, u64)> },
    /// Keys in `[start, end)` of one range with their latest values, at most `limit`.
    Scan {
        range: RangeId,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: usize,
        reply: Reply<ScanResult>,
    },
    /// The meta range: the descriptor of the range holding `key`.
    Lookup { key: Vec<u8>, reply: Reply<wire::RangeDescriptor> },
    /// The meta range: every descriptor.
    List { reply: Reply<Vec<wire::RangeDescriptor>> },
}

impl ReadRequest {
    pub(super) fn range(&self) -> RangeId {
        match self {
            ReadRequest::Get { range, .. } | ReadRequest::Scan { range, .. } => *range,
            ReadRequest::Lookup { .. } | ReadRequest::List { .. } => META_RANGE,
        }
    }

    /// The key the request must find inside the range, if any.
    pub(super) fn key(&self) -> Option<&[u8]> {
        match self {
            ReadRequest::Get { key, .. } => Some(key),
            ReadRequest::Scan { start, .. } => Some(start),
            ReadRequest::Lookup { .. } | ReadRequest::List { .. } => None,
        }
    }

    pub(super) fn fail(self, error: NodeError) {
        match self {
            ReadRequest::Get { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            ReadRequest::Scan { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            ReadRequest::Lookup { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            ReadRequest::List { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A transaction's lock request, as a service hands it to the driver.
#[derive(Clone, Debug)]
pub struct TxnLock {
    /// The transaction.
    pub txn: meridian_txn::TxnId,
    /// Its priority.
    pub priority: meridian_txn::Priority,
    /// The epoch of its earlier locks at the range, if any.
    pub held_since: Option<u64>,
    /// The mode asked for.
    pub mode: meridian_txn::LockMode,
    /// A key, or a span `[start, end)` (`end: None` up to the range's end), which the leader
    /// clamps to its range.
    pub start: Vec<u8>,
    /// The span's end, or `None` for a key when `is_key`.
    pub end: Option<Vec<u8>>,
    /// Whether the lock is on the key `start` alone.
    pub is_key: bool,
}

/// A commit, as a service hands it to the driver: a one-range commit, or the coordinator's
/// request of a two-phase commit (see `two_phase.rs`).
#[derive(Clone, Debug)]
pub struct TxnCommit {
    /// The transaction.
    pub txn: meridian_txn::TxnId,
    /// Its priority.
    pub priority: meridian_txn::Priority,
    /// The epoch of its earlier locks at the range, if any.
    pub held_since: Option<u64>,
    /// Its writes at this range.
    pub writes: Vec<meridian_txn::Write>,
    /// Empty for a one-range commit (every lock and write is here); otherwise every
    /// participant of the two-phase commit this range coordinates, this range among them.
    pub participants: BTreeSet<meridian_txn::RangeId>,
}

/// A participant's part of a two-phase commit, as a service hands it to the driver.
#[derive(Clone, Debug)]
pub struct TxnPrepare {
    /// The transaction.
    pub txn: meridian_txn::TxnId,
    /// Its priority.
    pub priority: meridian_txn::Priority,
    /// The epoch of its earlier locks at the range, if any.
    pub held_since: Option<u64>,
    /// The range coordinating the commit.
    pub coordinator: meridian_txn::RangeId,
    /// Its writes at this range (none where it only read).
    pub writes: Vec<meridian_txn::Write>,
}

/// A change to the meta range a node asked for.
pub enum MetaWrite {
    /// Record these descriptors.
    UpdateDescriptors { descriptors: Vec<wire::RangeDescriptor>, reply: Reply<()> },
    /// Reserve `count` range ids; answers the first.
    AllocateRangeIds { count: u64, reply: Reply<u64> },
}

/// Work the driver hands to the node's background task, which talks to other ranges' leaders.
#[derive(Debug)]
pub enum Background {
    /// Record these descriptors in the meta range; answer with [`Event::Published`].
    Publish(Vec<(RangeId, DescriptorVersion, wire::RangeDescriptor)>),
    /// Split `range` at `key` (it grew past the size threshold); answer with
    /// [`Event::SplitDone`].
    Split { range: RangeId, key: Vec<u8> },
    /// Ask the meta range whether this node still belongs to these ranges (see
    /// `check_membership`); answer with one [`Event::MembershipChecked`].
    CheckMembership(Vec<MembershipCheck>),
    /// Send a participant's vote (or status query, `query`) to its coordinator's leader.
    /// Nothing is answered: a lost vote is asked again by the participant's status queries.
    TxnVote {
        coordinator: RangeId,
        txn: meridian_txn::TxnId,
        participant: RangeId,
        prepare_ts: Timestamp,
        query: bool,
    },
    /// Send a coordinator's decision to a participant's leader; a commit only once
    /// `after(commit_ts)` holds on this node's clock (commit-wait). Nothing is answered: a
    /// participant that misses it asks again.
    TxnOutcome { participant: RangeId, txn: meridian_txn::TxnId, decision: meridian_txn::Decision },
}

/// A replica whose node may have been removed from its range.
#[derive(Debug)]
pub struct MembershipCheck {
    /// The range.
    pub range: RangeId,
    /// The replica's descriptor version when asked (a destroy applies only to it).
    pub version: DescriptorVersion,
    /// The replica's descriptor; meaningless if it is not initialized.
    pub descriptor: wire::RangeDescriptor,
    /// Whether the replica holds the range's state (else it waits for a snapshot and knows
    /// neither the span nor the configuration).
    pub initialized: bool,
}

/// A node's load as it reports it in hellos.
#[derive(Debug, Default)]
pub struct NodeLoad {
    /// Replicas the node holds.
    pub replicas: std::sync::atomic::AtomicU64,
    /// Ranges it leads.
    pub leaders: std::sync::atomic::AtomicU64,
}

/// A peer's load as last reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerLoad {
    /// Replicas it holds.
    pub replicas: u64,
    /// Ranges it leads.
    pub leaders: u64,
    /// Whether it is being decommissioned.
    pub draining: bool,
}

/// Orders the versions of one range's descriptor: `(generation, config_index)`.
pub type DescriptorVersion = (u64, u64);

/// A replica's state for `meridian status`.
pub struct RangeReport {
    /// The range.
    pub range: RangeId,
    /// Its span.
    pub descriptor: RangeDescriptor,
    /// Its Raft status.
    pub status: meridian_raft::Status,
    /// On the leader: each member's match index.
    pub progress: Vec<(NodeId, LogIndex)>,
    /// The log index of the configuration in `status`.
    pub config_index: LogIndex,
}

/// What the driver reacts to.
pub enum Event {
    /// Raft messages from a peer.
    Raft(Vec<(RangeId, Message)>),
    /// Write (`value: Some`) or delete (`None`) a key of a range; the caller waits until
    /// `deadline`, and the write is not proposed after it.
    Write {
        range: RangeId,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        deadline: Instant,
        reply: Reply<Committed>,
    },
    /// A linearizable read; the caller waits until `deadline`.
    Read { request: ReadRequest, deadline: Instant },
    /// A read at a timestamp without locks (see `snapshot_reads.rs`); the caller waits until
    /// `deadline`.
    SnapshotRead {
        range: RangeId,
        target: SnapshotTarget,
        at: ReadAt,
        /// Whether a follower here may serve it (`follower_reads.rs`), or only the leader.
        follower: bool,
        deadline: Instant,
        reply: Reply<SnapshotResult>,
    },
    /// Take a transaction's lock at a range's leader; answers the leadership epoch it was
    /// taken under once granted (see `txn.rs`).
    TxnLock { range: RangeId, lock: TxnLock, deadline: Instant, reply: Reply<u64> },
    /// Commit a transaction whose locks and writes are all at `range` (see `txn.rs`);
    /// answers the commit timestamp after commit-wait.
    TxnCommit { range: RangeId, commit: TxnCommit, deadline: Instant, reply: Reply<Committed> },
    /// Take exclusive locks on a transaction's writes at `range` before its two-phase
    /// commit (see `txn.rs`); answers the epoch. The writes' values are not used.
    TxnLockWrites { range: RangeId, lock: TxnPrepare, deadline: Instant, reply: Reply<u64> },
    /// Prepare a transaction's part at `range`, a participant of a two-phase commit; answers
    /// the prepare timestamp once the prepare record applied (see `txn.rs`).
    TxnPrepare { range: RangeId, prepare: TxnPrepare, deadline: Instant, reply: Reply<u64> },
    /// At a coordinator: abort the transaction unless a decision was logged first; answers
    /// the decision in effect (see `two_phase.rs`).
    TxnAbort {
        range: RangeId,
        txn: meridian_txn::TxnId,
        participants: BTreeSet<meridian_txn::RangeId>,
        reason: String,
        reply: Reply<meridian_txn::Decision>,
    },
    /// At a coordinator: a participant's vote, or a prepared participant's status query.
    TxnVote {
        range: RangeId,
        txn: meridian_txn::TxnId,
        participant: meridian_txn::RangeId,
        prepare_ts: Timestamp,
        query: bool,
        reply: Reply<()>,
    },
    /// At a participant: the coordinator's decision, to log as the outcome.
    TxnOutcome {
        range: RangeId,
        txn: meridian_txn::TxnId,
        decision: meridian_txn::Decision,
        reply: Reply<()>,
    },
    /// Release what a transaction holds at `range`, unless it is prepared there.
    TxnRollback { range: RangeId, txn: meridian_txn::TxnId, reply: Reply<()> },
    /// Keep a transaction's locks at `range`.
    TxnHeartbeat { range: RangeId, txn: meridian_txn::TxnId, epoch: u64, reply: Reply<()> },
    /// Split a range at `keys`, creating the ranges `ids`. Answers the range's descriptor after
    /// the split, then the new ranges'.
    Split {
        range: RangeId,
        keys: Vec<Vec<u8>>,
        ids: Vec<u64>,
        reply: Reply<Vec<wire::RangeDescriptor>>,
    },
    /// Check that this node leads `range` and that it can split at `keys` (before range ids
    /// are reserved for the split).
    CheckSplit { range: RangeId, keys: Vec<Vec<u8>>, reply: Reply<()> },
    /// A change to the meta range.
    Meta(MetaWrite),
    /// Create the meta range and the first data range with these voters (initialization),
    /// campaigning for them at once with `campaign` (the node that runs `init`).
    Bootstrap { voters: Vec<NodeId>, campaign: bool, reply: Reply<()> },
    /// Report the replicas' status.
    Status { ranges: BTreeSet<RangeId>, reply: oneshot::Sender<Vec<RangeReport>> },
    /// Whether this node's clock agrees with its peers; a node whose clock does not gives up
    /// leadership.
    ClockHealth { healthy: bool },
    /// This node joined an initialized cluster (it learned the cluster id from a peer).
    Joined,
    /// Which nodes were heard from recently, which not for longer than the dead-node timeout
    /// (for placement), and which did not answer the last hello rounds (to wake quiesced
    /// followers of their ranges).
    Liveness {
        live: BTreeSet<NodeId>,
        dead: BTreeSet<NodeId>,
        unreachable: BTreeSet<NodeId>,
        loads: BTreeMap<NodeId, PeerLoad>,
    },
    /// This node is being decommissioned: hand leaderships away, let replicas move.
    Drain,
    /// The connection to this peer broke, or it could not be reached after it had been:
    /// followers of ranges it leads suspect their leader.
    PeerLost(NodeId),
    /// These descriptor versions are recorded in the meta range (`recorded`), or the attempt
    /// failed and may be repeated.
    Published { ranges: Vec<(RangeId, DescriptorVersion)>, recorded: bool },
    /// A size-triggered split of `range` finished (or failed).
    SplitDone { range: RangeId },
    /// The answer to a membership check: the meta range records these ranges at versions at
    /// least as new as the replicas' without this node (destroy each replica still at that
    /// version); the others were found to be members, or could not be told.
    MembershipChecked { removed: Vec<(RangeId, DescriptorVersion)>, kept: Vec<RangeId> },
}
