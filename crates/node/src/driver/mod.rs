//! The driver: one task that owns every range replica of the node and runs the Raft cycle.
//!
//! Each cycle it takes the events that arrived (messages from peers, client requests), ticks
//! the replicas when a tick is due, and then, for all replicas together:
//!
//! 1. stages every replica's `Ready` (snapshot, entries, hard state) into **one** write batch
//!    and writes it synced — group commit across ranges;
//! 2. sends the messages, batched per destination node;
//! 3. applies committed entries into a second, unsynced batch, with each range's applied state
//!    (losing it in a crash only means re-applying entries, which is idempotent);
//! 4. answers the clients whose writes applied (after commit-wait) and serves confirmed reads.
//!
//! Requests name a range; the driver answers `RangeNotFound`, `NotLeader` or `KeyNotInRange`
//! when it cannot serve them there, and checks the key again when a write applies and when a
//! read is served, since a split may have moved it in between.
//!
//! A split applies on every replica at the same log index: the range's span shrinks and the
//! driver creates the new ranges' replicas on this node, with their state written durably
//! before the parent's applied state. A replica that first hears of a range through a message
//! (a split not applied here yet, or a replica being added) starts uninitialized and waits for
//! a snapshot; a split applied later leaves it alone. Leaders record their descriptors in the
//! meta range through the node's background task, and again whenever a descriptor changed or
//! leadership moved, so a crash between a split and its meta update is repaired.
//!
//! A storage failure while persisting or applying stops the node: it must not diverge from its
//! peers. Client-visible failures are [`NodeError`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meridian_clock::{Timestamp, TrueTime};
use meridian_raft::{
    Config as RaftConfig, Configuration, EntryKind, HardState, Interval, LogIndex, Message,
    MessageBody, NodeId, RawNode, Ready, Role, Snapshot, SnapshotMetadata, Storage, Term,
};
use meridian_rpc::kv as wire;
use meridian_storage::{Engine, Mvcc, ScanDirection, WriteBatch};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::descriptor::{FIRST_DATA_RANGE, META_RANGE, MetaIndex, RangeDescriptor};
use crate::placement::{PlacementInput, plan};
use crate::raft_store::{
    has_replica, stage_destroy_replica, stage_new_replica, stored_hard_state, stored_ranges,
    was_destroyed,
};
use crate::state_machine::{
    Applied, AppliedState, RangeSnapshotSource, RangeStateMachine, check_split_keys,
    encode_allocate_range_ids, encode_delete, encode_put, encode_split, encode_update_descriptors,
    snapshot_descriptor, stage_initial_state, uncovered,
};
use crate::transport::Transport;
use crate::{NodeError, RaftLogStore, RangeId};

mod maintenance;
/// Compact a range's log when this many applied entries sit above its truncation point.
const COMPACTION_THRESHOLD: u64 = 1_000;
/// Placement looks at quiesced ranges once in this many rounds.
const QUIESCED_PLACEMENT_EVERY: u64 = 10;
/// Ticks between placement checks of the ranges this node leads.
const PLACEMENT_INTERVAL_TICKS: u64 = 10;
/// The longest commit-wait before a write is failed instead of acknowledged.
const MAX_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long a write waits for its leader to obtain a lease before it fails.
const LEASE_WAIT: Duration = Duration::from_secs(2);
/// Ticks a leader stays idle (no request, no proposal) before its range quiesces.
const QUIESCE_AFTER_IDLE_TICKS: u64 = 20;
/// Ticks without a known leader before a replica asks the meta range whether this node still
/// belongs to its range.
const LEADERLESS_TICKS_BEFORE_CHECK: u64 = 50;
/// Placement rounds (seconds) a replica may wait for its first snapshot before its node asks
/// whether it belongs to the range: one created by a message from a leader that removed this
/// node meanwhile may believe in that leader for ever, so knowing no leader is no criterion.
const UNINITIALIZED_ROUNDS_BEFORE_CHECK: u64 = 5;
/// How long a range rests after a rebalancing move before it starts another (loads from
/// hellos take a few seconds to reflect a move).
const REBALANCE_REST: Duration = Duration::from_secs(10);
/// Rebalancing moves (replicas being added as learners) one node's ranges make at a time.
const MAX_MOVES_IN_FLIGHT: usize = 2;
/// Leaderships one node hands away per placement round to spread leaders: at least this
/// many, or a sixteenth of its excess over its share (so that a node leading thousands of
/// ranges after a large split spreads them within a few dozen seconds).
const MIN_TRANSFERS_PER_ROUND: u64 = 8;
/// Descriptors per meta update the driver asks for.
const PUBLISH_CHUNK: usize = 1_000;

/// Timing of the Raft groups.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    /// Time between ticks.
    pub tick_interval: Duration,
    /// Election timeout in ticks.
    pub election_timeout_ticks: u64,
    /// Heartbeat interval in ticks.
    pub heartbeat_interval_ticks: u64,
    /// Leader lease duration; shorter than the election timeout.
    pub lease_duration: Duration,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            tick_interval: Duration::from_millis(100),
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            lease_duration: Duration::from_millis(800),
        }
    }
}

/// A client's answer channel.
type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

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
    /// The latest value of a key, with its commit timestamp.
    Get { range: RangeId, key: Vec<u8>, reply: Reply<Option<(Vec<u8>, u64)>> },
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
    fn range(&self) -> RangeId {
        match self {
            ReadRequest::Get { range, .. } | ReadRequest::Scan { range, .. } => *range,
            ReadRequest::Lookup { .. } | ReadRequest::List { .. } => META_RANGE,
        }
    }

    /// The key the request must find inside the range, if any.
    fn key(&self) -> Option<&[u8]> {
        match self {
            ReadRequest::Get { key, .. } => Some(key),
            ReadRequest::Scan { start, .. } => Some(start),
            ReadRequest::Lookup { .. } | ReadRequest::List { .. } => None,
        }
    }

    fn fail(self, error: NodeError) {
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
    /// Write (`value: Some`) or delete (`None`) a key of a range.
    Write { range: RangeId, key: Vec<u8>, value: Option<Vec<u8>>, reply: Reply<u64> },
    /// A linearizable read.
    Read(ReadRequest),
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
    /// Create the meta range and the first data range with these voters (initialization).
    Bootstrap { voters: Vec<NodeId>, reply: Reply<()> },
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

/// What a proposal's proposer waits for.
enum Pending {
    Write { timestamp: u64, reply: Reply<u64> },
    Split { reply: Reply<Vec<wire::RangeDescriptor>> },
    UpdateDescriptors { reply: Reply<()> },
    AllocateRangeIds { reply: Reply<u64> },
}

impl Pending {
    fn fail(self, error: NodeError) {
        match self {
            Pending::Write { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Pending::Split { reply } => {
                let _ = reply.send(Err(error));
            }
            Pending::UpdateDescriptors { reply } => {
                let _ = reply.send(Err(error));
            }
            Pending::AllocateRangeIds { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

struct Proposal {
    term: Term,
    pending: Pending,
}

/// The state a replica created from a known state starts with.
struct NewReplica {
    applied: AppliedState,
    /// The meta range's index, for the meta range.
    meta: Option<MetaIndex>,
    hard_state: HardState,
}

/// A write waiting for its leader's lease.
struct LeaseWaiter {
    deadline: tokio::time::Instant,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    reply: Reply<u64>,
}

struct Replica<E: Engine> {
    range: RangeId,
    /// Whether a replica of this range on this node was destroyed before: until a snapshot
    /// initializes it, this one must not vote (see `withholds_vote`).
    destroyed_before: bool,
    raft: RawNode<RaftLogStore<E>>,
    state: RangeStateMachine<E>,
    /// The highest timestamp this replica assigned as leader.
    max_assigned: u64,
    /// Proposals whose proposers wait for them to apply, by log index.
    proposals: BTreeMap<LogIndex, Proposal>,
    /// Writes waiting for a lease.
    lease_waiters: Vec<LeaseWaiter>,
    /// ReadIndex reads waiting for confirmation, by context.
    reads: BTreeMap<u64, ReadRequest>,
    /// Confirmed reads waiting for their index to be applied.
    confirmed: Vec<(LogIndex, ReadRequest)>,
    next_read_context: u64,
    /// A compaction to stage into the next synced batch.
    compaction: Option<SnapshotMetadata>,
    /// The last term in which this replica was seen leading (to count elections won).
    led_term: Option<Term>,
    /// The descriptor version known to be recorded in the meta range.
    published: Option<DescriptorVersion>,
    /// Whether a meta update of this range's descriptor is under way.
    publishing: bool,
    /// The bytes of the range's data as far as known (recomputed when unknown).
    size_bytes: Option<u64>,
    /// Whether a size-triggered split is under way.
    splitting: bool,
    /// Ticks since this replica, as leader, last had a request to serve.
    idle_ticks: u64,
    /// Ticks this replica has known no leader.
    leaderless_ticks: u64,
    /// As leader: the voter the rebalancing move under way means to relieve.
    move_source: Option<NodeId>,
    /// As leader: when the last rebalancing move ended (ranges rest between moves).
    rebalanced_at: Option<tokio::time::Instant>,
    /// Whether the meta range is being asked if this node still belongs to the range.
    checking_membership: bool,
    /// Placement rounds this replica has waited for its first snapshot (since the last check).
    uninitialized_rounds: u64,
}

impl<E: Engine> Replica<E> {
    fn descriptor_version(&self) -> DescriptorVersion {
        let applied = self.state.applied();
        (applied.descriptor.generation, applied.config_index.0)
    }
}

/// The driver of one node. Run it with [`Driver::run`].
pub struct Driver<E: Engine> {
    node_id: NodeId,
    engine: Arc<E>,
    mvcc: Arc<Mvcc<E>>,
    truetime: TrueTime,
    timing: RaftTiming,
    transport: Arc<Transport>,
    replicas: BTreeMap<RangeId, Replica<E>>,
    events: mpsc::Receiver<Event>,
    clock_healthy: bool,
    /// Whether the node belongs to an initialized cluster.
    joined: bool,
    /// Live and dead nodes, from the hello rounds.
    liveness: (BTreeSet<NodeId>, BTreeSet<NodeId>),
    /// Ticks since the last placement check.
    ticks_since_placement: u64,
    /// Placement rounds run.
    placement_rounds: u64,
    /// Maintenance rounds, for the periodic membership sweep.
    membership_rounds: u64,
    /// Maintenance rounds between membership sweeps (at least 1).
    sweep_rounds: u64,
    /// The replicas that may have work: not quiesced, or with something pending. Ticks and
    /// cycles visit only these, so that quiesced ranges cost (almost) nothing; anything that
    /// can wake a replica (a message, a request, a membership change, a transfer) puts it
    /// back, and a cycle drops the ones that are quiet and idle again.
    awake: BTreeSet<RangeId>,
    /// Where work for other ranges goes.
    background: mpsc::UnboundedSender<Background>,
    /// A data range larger than this splits.
    range_max_bytes: u64,
    /// Whether this node is being decommissioned.
    draining: bool,
    /// The peers' loads, from their hellos.
    loads: BTreeMap<NodeId, PeerLoad>,
    /// Peers that missed their last hellos: no replicas or leaderships are sent their way.
    unreachable: BTreeSet<NodeId>,
    /// This node's load, for its hellos.
    load: Arc<NodeLoad>,
    /// Fault injection: abort right after leading a split.
    crash_after_split: bool,
    /// Seeds the election jitter of this node's replicas.
    seed: u64,
}

fn raft_interval(truetime: &TrueTime) -> Interval {
    let now = truetime.now();
    Interval { earliest: now.earliest.as_nanos(), latest: now.latest.as_nanos() }
}

fn internal(error: impl std::fmt::Display) -> NodeError {
    NodeError::Internal(error.to_string())
}

/// What a driver is configured with besides its engine and channels.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// This node.
    pub node_id: NodeId,
    /// Whether the node belongs to an initialized cluster.
    pub initialized: bool,
    /// Raft timing.
    pub timing: RaftTiming,
    /// A data range whose data grows past this many bytes splits in two.
    pub range_max_bytes: u64,
    /// Whether the node is being decommissioned.
    pub draining: bool,
    /// Where the driver publishes this node's load.
    pub load: Arc<NodeLoad>,
    /// Fault injection for tests: abort right after leading a split (see `NodeOptions`).
    pub crash_after_split: bool,
    /// Seeds election jitter; `None` takes a seed from the wall clock.
    pub seed: Option<u64>,
    /// How often to ask the meta range about every replica (see `check_membership`).
    pub replica_check_interval: Duration,
}

impl<E: Engine> Driver<E> {
    /// Returns a driver over the node's engine, opening every replica the store holds.
    ///
    /// # Errors
    ///
    /// [`NodeError::Internal`] if the store's Raft state cannot be read.
    pub fn open(
        options: DriverOptions,
        engine: Arc<E>,
        truetime: TrueTime,
        transport: Arc<Transport>,
        events: mpsc::Receiver<Event>,
        background: mpsc::UnboundedSender<Background>,
    ) -> Result<Self, NodeError> {
        let mvcc = Arc::new(Mvcc::new(engine.clone()).map_err(internal)?);
        let round = options.timing.tick_interval * PLACEMENT_INTERVAL_TICKS as u32;
        let sweep_rounds =
            (options.replica_check_interval.as_millis() / round.as_millis().max(1)).max(1) as u64;
        let mut driver = Driver {
            node_id: options.node_id,
            engine,
            mvcc,
            truetime,
            timing: options.timing,
            transport,
            replicas: BTreeMap::new(),
            events,
            clock_healthy: true,
            joined: options.initialized,
            liveness: (BTreeSet::new(), BTreeSet::new()),
            ticks_since_placement: 0,
            placement_rounds: 0,
            membership_rounds: 0,
            sweep_rounds,
            awake: BTreeSet::new(),
            background,
            range_max_bytes: options.range_max_bytes,
            draining: options.draining,
            loads: BTreeMap::new(),
            unreachable: BTreeSet::new(),
            load: options.load,
            crash_after_split: options.crash_after_split,
            seed: node_seed(options.node_id, options.seed),
        };
        for range in stored_ranges(driver.engine.as_ref()).map_err(internal)? {
            driver.open_replica(range)?;
        }
        info!(replicas = driver.replicas.len(), "replicas opened");
        Ok(driver)
    }

    /// Opens the replica of `range`, creating an uninitialized one (empty log, no members,
    /// waiting for a snapshot) if the store holds none.
    fn open_replica(&mut self, range: RangeId) -> Result<(), NodeError> {
        let source = Arc::new(RangeSnapshotSource { range, mvcc: self.mvcc.clone() });
        let destroyed_before = was_destroyed(self.engine.as_ref(), range).map_err(internal)?;
        // A replica this store never held has given no promise it could have forgotten.
        let fresh =
            !destroyed_before && !has_replica(self.engine.as_ref(), range).map_err(internal)?;
        let metadata = SnapshotMetadata {
            index: LogIndex(0),
            term: Term(0),
            config: Configuration::default(),
        };
        let store =
            RaftLogStore::open(self.engine.clone(), range, metadata, source).map_err(internal)?;
        let mut config = RaftConfig::new(self.node_id);
        config.election_timeout_ticks = self.timing.election_timeout_ticks;
        config.heartbeat_interval_ticks = self.timing.heartbeat_interval_ticks;
        config.lease_duration_ns = self.timing.lease_duration.as_nanos() as u64;
        config.seed = self.seed ^ range.0.rotate_left(17);
        let mut raft =
            RawNode::new(config, store, raft_interval(&self.truetime)).map_err(internal)?;
        if fresh {
            raft.forget_restart_promise();
        }
        let state = RangeStateMachine::open(range, self.mvcc.clone()).map_err(internal)?;
        let max_assigned = state.applied().max_timestamp;
        self.awake.insert(range);
        self.replicas.insert(
            range,
            Replica {
                range,
                raft,
                state,
                max_assigned,
                proposals: BTreeMap::new(),
                lease_waiters: Vec::new(),
                reads: BTreeMap::new(),
                confirmed: Vec::new(),
                next_read_context: 1,
                compaction: None,
                led_term: None,
                published: None,
                publishing: false,
                size_bytes: None,
                splitting: false,
                idle_ticks: 0,
                leaderless_ticks: 0,
                move_source: None,
                rebalanced_at: None,
                checking_membership: false,
                uninitialized_rounds: 0,
                destroyed_before,
            },
        );
        Ok(())
    }

    /// Stages the state of replicas that start from a known state (initialization, split):
    /// their Raft state, applied state and (for the meta range) index. Open them with
    /// [`Driver::open_replica`] once the batch is durable.
    fn stage_replicas(replicas: &[NewReplica], batch: &mut WriteBatch) {
        for replica in replicas {
            let applied = &replica.applied;
            let range = applied.descriptor.id;
            let metadata = SnapshotMetadata {
                index: applied.index,
                term: applied.term,
                config: applied.config.clone(),
            };
            stage_new_replica(range, &metadata, replica.hard_state, batch);
            stage_initial_state(range, applied, batch);
            if let Some(meta) = &replica.meta {
                let mut index = MetaIndex::default();
                for descriptor in meta.descriptors() {
                    index.update(descriptor, batch);
                }
            }
        }
    }

    /// Creates the meta range and the first data range, covering every key, with `voters`.
    /// Identical on every voter, so that their replicas start equal.
    fn bootstrap(&mut self, voters: Vec<NodeId>) -> Result<(), NodeError> {
        if self.replicas.contains_key(&META_RANGE) {
            return Ok(());
        }
        let config = Configuration::with_voters(voters);
        let state = |id: RangeId, next_range_id: u64| AppliedState {
            index: LogIndex(1),
            term: Term(1),
            config: config.clone(),
            config_index: LogIndex(1),
            max_timestamp: 0,
            descriptor: RangeDescriptor { id, start: Vec::new(), end: None, generation: 0 },
            next_range_id,
        };
        let data = state(FIRST_DATA_RANGE, 0);
        let mut meta = MetaIndex::default();
        meta.update(&data.wire_descriptor(), &mut WriteBatch::new());
        let meta_state = state(META_RANGE, FIRST_DATA_RANGE.0 + 1);
        let mut batch = WriteBatch::new();
        let hard_state = HardState { term: Term(1), vote: None, commit: LogIndex(1) };
        let replicas = [
            NewReplica { applied: meta_state, meta: Some(meta), hard_state },
            NewReplica { applied: data, meta: None, hard_state },
        ];
        Self::stage_replicas(&replicas, &mut batch);
        self.engine.write(batch, true).map_err(internal)?;
        self.open_replica(META_RANGE)?;
        self.open_replica(FIRST_DATA_RANGE)
    }

    /// Runs the driver until the event channel closes or storage fails.
    ///
    /// # Errors
    ///
    /// [`NodeError::Internal`] on a storage failure: the node must stop.
    pub async fn run(mut self) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.timing.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                event = self.events.recv() => {
                    let Some(event) = event else { return Ok(()) };
                    self.handle(event)?;
                    // Take whatever else arrived, so that one cycle persists it all.
                    for _ in 0..1024 {
                        match self.events.try_recv() {
                            Ok(event) => self.handle(event)?,
                            Err(_) => break,
                        }
                    }
                }
                _ = ticker.tick() => {
                    self.ticks_since_placement += 1;
                    if self.ticks_since_placement >= PLACEMENT_INTERVAL_TICKS {
                        self.ticks_since_placement = 0;
                        self.maintain()?;
                    }
                    let now = raft_interval(&self.truetime);
                    for range in &self.awake {
                        let Some(replica) = self.replicas.get_mut(range) else { continue };
                        if replica.raft.is_quiesced() {
                            continue;
                        }
                        replica.raft.tick(now);
                        maybe_quiesce(replica);
                        replica.leaderless_ticks = match replica.raft.leader() {
                            None => replica.leaderless_ticks + 1,
                            Some(_) => 0,
                        };
                    }
                    self.retry_lease_waiters();
                }
            }
            self.cycle()?;
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), NodeError> {
        match event {
            Event::Raft(messages) => {
                metrics::counter!("meridian_raft_messages_received_total")
                    .increment(messages.len() as u64);
                for (range, message) in messages {
                    // A node of an initialized cluster gets a replica when a leader first
                    // reaches out: it was added to the range, or the range split off one it
                    // holds and this node has not applied the split yet. It starts empty and
                    // receives a snapshot.
                    if !self.replicas.contains_key(&range) {
                        if !self.joined || range.0 == 0 {
                            continue;
                        }
                        self.open_replica(range)?;
                        info!(range = range.0, "created an uninitialized replica");
                    }
                    let replica = self.replicas.get_mut(&range).expect("replica exists");
                    if withholds_vote(replica, &message) {
                        debug!(
                            range = range.0,
                            from = message.from.0,
                            "a replica without its log withholds its vote"
                        );
                        continue;
                    }
                    if let Err(error) = replica.raft.step(message) {
                        warn!(range = range.0, %error, "rejected a raft message");
                    }
                    self.awake.insert(range);
                }
            }
            Event::Write { range, key, value, reply } => self.write(range, key, value, reply),
            Event::Read(request) => self.read(request),
            Event::Split { range, keys, ids, reply } => {
                let command = encode_split(keys.clone(), ids);
                let check = keys.first().map(Vec::as_slice);
                self.propose(range, check, command, Pending::Split { reply });
            }
            Event::CheckSplit { range, reply, .. } if range == META_RANGE => {
                let _ = reply
                    .send(Err(NodeError::InvalidArgument("the meta range does not split".into())));
            }
            Event::CheckSplit { range, keys, reply } => {
                let result = self.leader_replica(range, keys.first().map(Vec::as_slice)).and_then(
                    |replica| {
                        let applied = replica.state.applied();
                        check_split_keys(&applied.descriptor, &applied.config, &keys)
                            .map_err(NodeError::InvalidArgument)
                    },
                );
                let _ = reply.send(result);
            }
            Event::Meta(MetaWrite::UpdateDescriptors { descriptors, reply }) => {
                let command = encode_update_descriptors(descriptors);
                self.propose(META_RANGE, None, command, Pending::UpdateDescriptors { reply });
            }
            Event::Meta(MetaWrite::AllocateRangeIds { count, reply }) => {
                let command = encode_allocate_range_ids(count);
                self.propose(META_RANGE, None, command, Pending::AllocateRangeIds { reply });
            }
            Event::Bootstrap { voters, reply } => {
                self.joined = true;
                let _ = reply.send(self.bootstrap(voters));
            }
            Event::Joined => self.joined = true,
            Event::Drain => self.draining = true,
            Event::Liveness { live, dead, unreachable, loads } => {
                self.loads = loads;
                // A quiesced follower cannot tell that its leader is gone: wake it when the
                // leader's node stops answering, so that it can elect another.
                for replica in self.replicas.values_mut() {
                    if replica.raft.is_quiesced()
                        && replica.raft.role() != Role::Leader
                        && replica.raft.leader().is_none_or(|leader| unreachable.contains(&leader))
                    {
                        replica.raft.wake();
                        self.awake.insert(replica.range);
                    }
                }
                self.liveness = (live, dead);
                self.unreachable = unreachable;
            }
            Event::ClockHealth { healthy } => self.clock_healthy = healthy,
            Event::Published { ranges, recorded } => {
                for (range, version) in ranges {
                    if let Some(replica) = self.replicas.get_mut(&range) {
                        replica.publishing = false;
                        if recorded {
                            replica.published = Some(version);
                        }
                    }
                }
            }
            Event::MembershipChecked { removed, kept } => {
                for (range, version) in removed {
                    self.destroy_replica(range, version)?;
                }
                for range in kept {
                    if let Some(replica) = self.replicas.get_mut(&range) {
                        replica.checking_membership = false;
                        replica.leaderless_ticks = 0;
                        replica.uninitialized_rounds = 0;
                    }
                }
            }
            Event::SplitDone { range } => {
                if let Some(replica) = self.replicas.get_mut(&range) {
                    replica.splitting = false;
                    replica.size_bytes = None;
                }
            }
            Event::Status { ranges, reply } => {
                let statuses = self
                    .replicas
                    .iter()
                    .filter(|(range, _)| ranges.is_empty() || ranges.contains(range))
                    .map(|(range, replica)| {
                        let status = replica.raft.status();
                        let progress = status
                            .configuration
                            .members()
                            .into_iter()
                            .filter_map(|member| {
                                replica.raft.match_index(member).map(|index| (member, index))
                            })
                            .collect();
                        RangeReport {
                            range: *range,
                            descriptor: replica.state.descriptor().clone(),
                            status,
                            progress,
                            config_index: replica.state.applied().config_index,
                        }
                    })
                    .collect();
                let _ = reply.send(statuses);
            }
        }
        Ok(())
    }

    /// Returns the error for a request that reached a non-leader.
    fn not_leader(transport: &Transport, node_id: NodeId, leader: Option<NodeId>) -> NodeError {
        match leader {
            Some(leader) if leader != node_id => {
                NodeError::NotLeader { leader: Some(leader), address: transport.address(leader) }
            }
            _ => NodeError::Unavailable("the range has no leader right now".into()),
        }
    }

    /// Returns the replica of `range` if this node leads it and it holds `key`.
    fn leader_replica(
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
    fn propose(&mut self, range: RangeId, key: Option<&[u8]>, command: Vec<u8>, pending: Pending) {
        let replica = match self.leader_replica(range, key) {
            Ok(replica) => replica,
            Err(error) => return pending.fail(error),
        };
        replica.idle_ticks = 0;
        match replica.raft.propose(command) {
            Ok(index) => {
                metrics::counter!("meridian_raft_proposals_total").increment(1);
                let term = replica.raft.term();
                replica.proposals.insert(index, Proposal { term, pending });
            }
            Err(error) => pending.fail(NodeError::Unavailable(error.to_string())),
        }
    }

    fn write(&mut self, range: RangeId, key: Vec<u8>, value: Option<Vec<u8>>, reply: Reply<u64>) {
        if range == META_RANGE {
            let _ = reply
                .send(Err(NodeError::InvalidArgument("the meta range holds no user keys".into())));
            return;
        }
        let now = self.truetime.now();
        let interval =
            Interval { earliest: now.earliest.as_nanos(), latest: now.latest.as_nanos() };
        let replica = match self.leader_replica(range, Some(&key)) {
            Ok(replica) => replica,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        replica.idle_ticks = 0;
        // A leader assigns timestamps only inside its lease (Spanner's disjointness). Without
        // one (a new leader), the write waits for the next heartbeat round to grant it.
        if replica.raft.lease_read(interval).is_none() {
            if replica.lease_waiters.is_empty() {
                let context = replica.next_read_context;
                replica.next_read_context += 1;
                // A read round renews the lease at once; its result is not needed.
                let _ = replica.raft.read_index(context);
            }
            let deadline = tokio::time::Instant::now() + LEASE_WAIT;
            replica.lease_waiters.push(LeaseWaiter { deadline, key, value, reply });
            return;
        }
        let timestamp = now
            .latest
            .as_nanos()
            .max(replica.max_assigned + 1)
            .max(replica.state.applied().max_timestamp + 1);
        let command = match &value {
            Some(value) => encode_put(&key, value, timestamp),
            None => encode_delete(&key, timestamp),
        };
        match replica.raft.propose(command) {
            Ok(index) => {
                metrics::counter!("meridian_raft_proposals_total").increment(1);
                replica.max_assigned = timestamp;
                let term = replica.raft.term();
                replica
                    .proposals
                    .insert(index, Proposal { term, pending: Pending::Write { timestamp, reply } });
            }
            Err(error) => {
                let _ = reply.send(Err(NodeError::Unavailable(error.to_string())));
            }
        }
    }

    /// Proposes the writes whose leader now has a lease; fails those that waited too long.
    fn retry_lease_waiters(&mut self) {
        let now = tokio::time::Instant::now();
        let mut retry = Vec::new();
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.lease_waiters.is_empty() {
                continue;
            }
            let has_lease = replica.raft.lease_read(raft_interval(&self.truetime)).is_some();
            for waiter in std::mem::take(&mut replica.lease_waiters) {
                if has_lease || replica.raft.role() != Role::Leader {
                    retry.push((replica.range, waiter));
                } else if waiter.deadline <= now {
                    let _ = waiter.reply.send(Err(NodeError::Unavailable(
                        "the leader could not obtain a lease".into(),
                    )));
                } else {
                    replica.lease_waiters.push(waiter);
                }
            }
        }
        for (range, waiter) in retry {
            self.write(range, waiter.key, waiter.value, waiter.reply);
        }
    }

    fn read(&mut self, request: ReadRequest) {
        if request.range() == META_RANGE && request.key().is_some() {
            return request
                .fail(NodeError::InvalidArgument("the meta range holds no user keys".into()));
        }
        let interval = raft_interval(&self.truetime);
        let replica = match self.leader_replica(request.range(), request.key()) {
            Ok(replica) => replica,
            Err(error) => return request.fail(error),
        };
        replica.idle_ticks = 0;
        if let Some(index) = replica.raft.lease_read(interval) {
            replica.confirmed.push((index, request));
            return;
        }
        let context = replica.next_read_context;
        replica.next_read_context += 1;
        match replica.raft.read_index(context) {
            Ok(()) => {
                replica.reads.insert(context, request);
            }
            Err(error) => request.fail(NodeError::Unavailable(error.to_string())),
        }
    }

    /// Runs one persist–send–apply cycle over every replica.
    fn cycle(&mut self) -> Result<(), NodeError> {
        let mut durable = WriteBatch::new();
        let mut readies: Vec<(RangeId, Ready)> = Vec::new();
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if let Some(metadata) = replica.compaction.take() {
                let staged = replica.raft.storage().stage_compaction(metadata, &mut durable);
                replica.raft.storage_mut().on_persisted(staged);
            }
            if !replica.raft.has_ready() {
                continue;
            }
            let ready = replica.raft.ready().map_err(internal)?;
            readies.push((replica.range, ready));
        }
        for (range, ready) in &readies {
            let Some(snapshot) = &ready.snapshot else { continue };
            let protected = self.newer_overlapping_replicas(*range, snapshot);
            let replica = self.replicas.get_mut(range).expect("replica exists");
            replica.state.stage_install(snapshot, &protected, &mut durable).map_err(internal)?;
            replica.size_bytes = None;
            // Requests waiting on entries the snapshot replaced cannot be answered.
            for (_, proposal) in std::mem::take(&mut replica.proposals) {
                proposal
                    .pending
                    .fail(NodeError::Unavailable("replica was replaced by a snapshot".into()));
            }
        }
        if readies.is_empty() && durable.is_empty() {
            // Lease reads of this cycle may be servable at once.
            self.serve_confirmed_reads();
            self.forget_quiet_replicas();
            return Ok(());
        }
        let mut staged = Vec::new();
        for (range, ready) in &readies {
            let replica = self.replicas.get_mut(range).expect("replica exists");
            staged.push(replica.raft.storage().stage(ready, &mut durable));
        }
        if !durable.is_empty() {
            let (size, started) = (durable.size_bytes(), tokio::time::Instant::now());
            self.engine.write(durable, true).map_err(internal)?;
            metrics::histogram!("meridian_storage_sync_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("meridian_storage_sync_batch_bytes").record(size as f64);
        }
        // Messages grouped by destination node, sent only now that their promises are durable.
        let mut outgoing: BTreeMap<NodeId, Vec<(RangeId, Message)>> = BTreeMap::new();
        for ((range, ready), staged) in readies.iter_mut().zip(staged) {
            let replica = self.replicas.get_mut(range).expect("replica exists");
            replica.raft.storage_mut().on_persisted(staged);
            for message in ready.messages.drain(..) {
                outgoing.entry(message.to).or_default().push((*range, message));
            }
        }
        for (to, messages) in outgoing {
            metrics::counter!("meridian_raft_messages_sent_total").increment(messages.len() as u64);
            self.transport.send(to, messages);
        }
        let mut applied_batch = WriteBatch::new();
        let mut acknowledgements = Vec::new();
        // Replicas of ranges split off here, created once the loop is done, and whether this
        // node led the range they split from.
        let mut children: Vec<AppliedState> = Vec::new();
        let mut campaign = Vec::new();
        let mut publish = Vec::new();
        for (range, ready) in readies {
            let replica = self.replicas.get_mut(&range).expect("replica exists");
            metrics::counter!("meridian_raft_entries_applied_total")
                .increment(ready.committed_entries.len() as u64);
            for entry in &ready.committed_entries {
                let outcome = replica.state.apply(entry, &mut applied_batch).map_err(internal)?;
                let mut split_descriptors = Vec::new();
                match &outcome {
                    Applied::Write(_) => {
                        if let (Some(size), EntryKind::Command(data)) =
                            (replica.size_bytes.as_mut(), &entry.kind)
                        {
                            *size += data.len() as u64;
                        }
                    }
                    Applied::RangeIds(first) => {
                        debug!(
                            index = entry.index.0,
                            term = entry.term.0,
                            first,
                            "range ids allocated"
                        );
                    }
                    Applied::Split(new_ranges) => {
                        info!(
                            range = range.0,
                            index = entry.index.0,
                            new_ranges = ?new_ranges.iter().map(|d| d.id.0).collect::<Vec<_>>(),
                            "range split"
                        );
                        replica.size_bytes = None;
                        split_descriptors.push(replica.state.applied().wire_descriptor());
                        for descriptor in new_ranges {
                            let state = replica.state.child_state(descriptor.clone());
                            split_descriptors.push(state.wire_descriptor());
                            children.push(state);
                        }
                        if replica.raft.role() == Role::Leader {
                            publish.extend(split_descriptors.iter().cloned());
                        }
                        // The voters take turns to campaign for the new ranges, so that their
                        // leaders are spread from the start.
                        let voters = &replica.state.applied().config.voters;
                        for (i, descriptor) in new_ranges.iter().enumerate() {
                            if voters.iter().nth(i % voters.len().max(1)) == Some(&self.node_id) {
                                campaign.push(descriptor.id);
                            }
                        }
                    }
                    _ => {}
                }
                let Some(proposal) = replica.proposals.remove(&entry.index) else { continue };
                if proposal.term != entry.term {
                    proposal.pending.fail(NodeError::Unavailable(
                        "leadership changed; the command was not committed".into(),
                    ));
                    continue;
                }
                match (proposal.pending, outcome) {
                    (Pending::Write { timestamp, reply }, Applied::Write(applied))
                        if applied == timestamp =>
                    {
                        acknowledgements.push((reply, timestamp));
                    }
                    (Pending::Split { reply }, Applied::Split(_)) => {
                        let _ = reply.send(Ok(split_descriptors));
                    }
                    (Pending::UpdateDescriptors { reply }, Applied::DescriptorsUpdated) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Pending::AllocateRangeIds { reply }, Applied::RangeIds(first)) => {
                        let _ = reply.send(Ok(first));
                    }
                    (pending, Applied::KeyNotInRange) => {
                        pending.fail(key_not_in_range(replica));
                    }
                    (pending, Applied::Rejected(reason)) => {
                        pending.fail(NodeError::InvalidArgument(reason));
                    }
                    (pending, _) => {
                        pending
                            .fail(NodeError::Unavailable("the command was not committed".into()));
                    }
                }
            }
            for read in &ready.read_states {
                if let Some(request) = replica.reads.remove(&read.context) {
                    replica.confirmed.push((read.index, request));
                }
            }
            let had_committed = !ready.committed_entries.is_empty();
            replica.raft.advance(ready).map_err(internal)?;
            if had_committed {
                replica.state.stage_applied_state(&mut applied_batch);
            }
            let applied = replica.raft.applied_index();
            if applied.0 > replica.raft.storage().first_index().0 + COMPACTION_THRESHOLD
                && let Ok(metadata) = replica.raft.applied_snapshot_metadata()
            {
                // Staged into the next synced batch, after this cycle's applied state.
                replica.compaction = Some(metadata);
            }
        }
        let children = self.new_replicas_of_splits(children)?;
        let sync = !children.is_empty();
        Self::stage_replicas(&children, &mut applied_batch);
        if !applied_batch.is_empty() {
            self.engine.write(applied_batch, sync).map_err(internal)?;
        }
        for child in &children {
            let range = child.applied.descriptor.id;
            self.open_replica(range)?;
            // One voter campaigns at once for each new range, so that it serves within a
            // round trip rather than an election timeout.
            if let Some(replica) = self.replicas.get_mut(&range) {
                replica.raft.forget_restart_promise();
                if campaign.contains(&range) {
                    replica.raft.campaign();
                }
            }
        }
        if self.crash_after_split && !publish.is_empty() {
            error!(
                "fault injection: aborting right after a split, before the meta range records it"
            );
            std::process::abort();
        }
        if !publish.is_empty() {
            let _ = self.background.send(Background::Publish(
                publish
                    .into_iter()
                    .map(|descriptor| {
                        let version = (descriptor.generation, descriptor.config_index);
                        (RangeId(descriptor.range_id), version, descriptor)
                    })
                    .collect(),
            ));
        }
        for (reply, timestamp) in acknowledgements {
            // Commit-wait (Spanner §4.1.2): acknowledge only once the timestamp has passed.
            let truetime = self.truetime.clone();
            tokio::spawn(async move {
                let waited = truetime
                    .wait_until_after(Timestamp::from_nanos(timestamp), MAX_COMMIT_WAIT)
                    .await;
                if let Ok(waited) = &waited {
                    metrics::histogram!("meridian_commit_wait_seconds")
                        .record(waited.as_secs_f64());
                }
                let _ = reply.send(
                    waited
                        .map(|_| timestamp)
                        .map_err(|error| NodeError::Unavailable(error.to_string())),
                );
            });
        }
        self.serve_confirmed_reads();
        self.fail_requests_of_former_leaders();
        self.forget_quiet_replicas();
        Ok(())
    }

    /// Returns the descriptors of the initialized replicas on this node that overlap the span of
    /// `snapshot` (for `range`) and are newer: ranges split off it after the snapshot's state.
    fn newer_overlapping_replicas(
        &self,
        range: RangeId,
        snapshot: &Snapshot,
    ) -> Vec<RangeDescriptor> {
        let Some(incoming) = snapshot_descriptor(snapshot) else { return Vec::new() };
        if range == META_RANGE {
            return Vec::new();
        }
        self.replicas
            .values()
            .filter(|other| {
                other.range != range && other.range != META_RANGE && other.state.is_initialized()
            })
            .map(|other| other.state.descriptor())
            .filter(|other| other.generation > incoming.generation && other.overlaps(&incoming))
            .cloned()
            .collect()
    }

    /// Returns the replicas to create for ranges split off here. A replica that heard of its
    /// range first (through a message) and still waits for a snapshot is initialized from the
    /// split instead, keeping its term and vote; one that already holds data is left alone.
    ///
    /// A replica of the new range that was created here and destroyed before the split applied
    /// (it waited too long for a snapshot) left its term and vote in a tombstone: they are kept
    /// too, or the new replica could vote twice in a term.
    fn new_replicas_of_splits(
        &self,
        children: Vec<AppliedState>,
    ) -> Result<Vec<NewReplica>, NodeError> {
        let keep = |current: HardState| HardState {
            term: current.term.max(Term(1)),
            vote: current.vote,
            commit: LogIndex(1),
        };
        let mut replicas = Vec::new();
        for applied in children {
            let id = applied.descriptor.id;
            let hard_state = match self.replicas.get(&id) {
                None => match stored_hard_state(self.engine.as_ref(), id).map_err(internal)? {
                    Some(tombstone) => keep(tombstone),
                    None => HardState { term: Term(1), vote: None, commit: LogIndex(1) },
                },
                Some(existing)
                    if !existing.state.is_initialized()
                        && existing.raft.storage().last_index() == LogIndex(0) =>
                {
                    keep(existing.raft.storage().hard_state())
                }
                Some(_) => continue,
            };
            replicas.push(NewReplica { applied, meta: None, hard_state });
        }
        Ok(replicas)
    }

    /// Drops from the awake set the replicas that are quiesced and have nothing pending.
    fn forget_quiet_replicas(&mut self) {
        let replicas = &self.replicas;
        self.awake.retain(|range| {
            replicas.get(range).is_some_and(|replica| {
                !replica.raft.is_quiesced()
                    || replica.raft.has_ready()
                    || replica.compaction.is_some()
                    || !replica.proposals.is_empty()
                    || !replica.reads.is_empty()
                    || !replica.confirmed.is_empty()
                    || !replica.lease_waiters.is_empty()
            })
        });
    }

    /// Fails the requests a replica can no longer answer because it lost leadership: reads
    /// still waiting for their ReadIndex round, and proposals not yet applied (their outcome
    /// is unknown: the entry may still commit under the new leader).
    fn fail_requests_of_former_leaders(&mut self) {
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.raft.role() == Role::Leader {
                continue;
            }
            // A new leader must record its descriptor again (the meta range may have missed
            // an update of the old leader's).
            replica.published = None;
            for (_, request) in std::mem::take(&mut replica.reads) {
                request.fail(NodeError::Unavailable(
                    "leadership changed before the read was confirmed".into(),
                ));
            }
            for (_, proposal) in std::mem::take(&mut replica.proposals) {
                proposal.pending.fail(NodeError::Ambiguous(
                    "leadership changed before the command was applied; it may or may not take effect".into(),
                ));
            }
        }
    }

    fn serve_confirmed_reads(&mut self) {
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.confirmed.is_empty() {
                continue;
            }
            let applied = replica.state.applied().index;
            let (ready, waiting): (Vec<_>, Vec<_>) =
                replica.confirmed.drain(..).partition(|(index, _)| *index <= applied);
            replica.confirmed = waiting;
            for (_, request) in ready {
                serve_read(&self.mvcc, replica, request);
            }
        }
    }
}

/// Quiesces a leader that has been idle for a while (see `meridian_raft`'s quiescence).
fn maybe_quiesce<E: Engine>(replica: &mut Replica<E>) {
    if replica.raft.role() != Role::Leader {
        replica.idle_ticks = 0;
        return;
    }
    replica.idle_ticks += 1;
    let idle = replica.idle_ticks >= QUIESCE_AFTER_IDLE_TICKS
        && replica.proposals.is_empty()
        && replica.reads.is_empty()
        && replica.confirmed.is_empty()
        && replica.lease_waiters.is_empty()
        && !replica.publishing
        && !replica.splitting;
    if idle && replica.raft.quiesce() {
        metrics::counter!("meridian_raft_quiesced_total").increment(1);
    }
}

/// Fails unless `replica`'s span holds `key`.
fn check_key<E: Engine>(replica: &Replica<E>, key: &[u8]) -> Result<(), NodeError> {
    if replica.state.descriptor().contains(key) { Ok(()) } else { Err(key_not_in_range(replica)) }
}

fn key_not_in_range<E: Engine>(replica: &Replica<E>) -> NodeError {
    NodeError::KeyNotInRange { descriptor: Box::new(replica.state.applied().wire_descriptor()) }
}

/// Serves a confirmed read from the replica's state; the key is checked again, since a split
/// may have applied since the read arrived.
fn serve_read<E: Engine>(mvcc: &Mvcc<E>, replica: &Replica<E>, request: ReadRequest) {
    if let Some(key) = request.key()
        && let Err(error) = check_key(replica, key)
    {
        return request.fail(error);
    }
    match request {
        ReadRequest::Get { key, reply, .. } => {
            let result = mvcc
                .get(&key, Timestamp::MAX)
                .map(|version| version.map(|version| (version.value, version.commit_ts.as_nanos())))
                .map_err(internal);
            let _ = reply.send(result);
        }
        ReadRequest::Scan { start, end, limit, reply, .. } => {
            // Clamp to the range's end; past it the caller continues in the next range.
            let range_end = replica.state.descriptor().end.clone();
            let (end, resume_key) = match (end, range_end) {
                (Some(end), Some(range_end)) if range_end < end => {
                    (Some(range_end.clone()), Some(range_end))
                }
                (None, Some(range_end)) => (Some(range_end.clone()), Some(range_end)),
                (end, _) => (end, None),
            };
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

/// Whether `replica` must ignore `message`, a (pre-)vote request: it is a replica created again
/// after this node's replica of the range was destroyed, and no snapshot has initialized it.
///
/// Its log is gone, yet it may have been part of the quorum that committed the configuration
/// which removed it. Voting with an empty log could then elect a voter that missed that change
/// and still counts the old configuration's majority (this node and itself): two leaders for
/// one range. Its term and vote survive in the tombstone, which keeps it from voting twice in a
/// term, but not from this. A replica that never existed here cannot have been in any quorum
/// (an uninitialized replica acknowledges nothing), so it may vote, which lets the voters of a
/// range just split off elect its leader at once.
fn withholds_vote<E: Engine>(replica: &Replica<E>, message: &Message) -> bool {
    withholds_vote_when(replica.destroyed_before, replica.state.is_initialized(), message)
}

fn withholds_vote_when(destroyed_before: bool, initialized: bool, message: &Message) -> bool {
    destroyed_before
        && !initialized
        && matches!(message.body, MessageBody::Vote { .. } | MessageBody::PreVote { .. })
}

/// Returns a seed for election jitter that differs between nodes and, unless `seed` is given,
/// between runs.
fn node_seed(node_id: NodeId, seed: Option<u64>) -> u64 {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |duration| duration.as_nanos() as u64)
    });
    seed ^ node_id.0.rotate_left(32)
}

/// Logs a fatal driver error.
pub fn log_fatal(error: &NodeError) {
    error!(%error, "the node's driver stopped");
}

#[cfg(test)]
mod tests {
    use meridian_raft::{CommitPoint, LogIndex, Message, MessageBody, NodeId, Term};

    use super::withholds_vote_when;

    #[test]
    fn only_recreated_uninitialized_replicas_withhold_votes() {
        let message = |body| Message { from: NodeId(2), to: NodeId(1), term: Term(3), body };
        let vote = message(MessageBody::Vote {
            last_index: LogIndex(7),
            last_term: Term(2),
            transfer: false,
        });
        let pre_vote =
            message(MessageBody::PreVote { last_index: LogIndex(7), last_term: Term(2) });
        let answer = message(MessageBody::VoteResponse {
            granted: true,
            commit: CommitPoint { index: LogIndex(0), term: Term(0) },
        });
        assert!(withholds_vote_when(true, false, &vote));
        assert!(withholds_vote_when(true, false, &pre_vote));
        assert!(!withholds_vote_when(true, false, &answer));
        // Initialized by a snapshot, or never destroyed here: it votes.
        assert!(!withholds_vote_when(true, true, &vote));
        assert!(!withholds_vote_when(false, false, &vote));
        assert!(!withholds_vote_when(false, false, &pre_vote));
    }
}
