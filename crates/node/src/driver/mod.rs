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
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::descriptor::{FIRST_DATA_RANGE, META_RANGE, MetaIndex, RangeDescriptor};
use crate::placement::{PlacementInput, plan};
use crate::raft_store::{
    has_replica, stage_destroy_replica, stage_new_replica, stored_ranges, was_destroyed,
};
use crate::state_machine::{
    Applied, AppliedState, RangeSnapshotSource, RangeStateMachine, check_split_keys,
    encode_allocate_range_ids, encode_delete, encode_gc, encode_one_phase_commit, encode_put,
    encode_split, encode_update_descriptors, snapshot_descriptor, stage_initial_state, uncovered,
};
use crate::transport::Transport;
use crate::{NodeError, RaftLogStore, RangeId};

mod cycle;
mod events;
mod follower_reads;
mod leader;
mod maintenance;
mod replica;
mod snapshot_reads;
mod two_phase;
mod txn;

pub use events::*;
use leader::key_not_in_range;
use leader::{Leadership, Waiting};
use replica::{Pending, Proposal, Replica, maybe_quiesce, withholds_vote};
use snapshot_reads::WaitingSnapshotRead;
pub use snapshot_reads::{ReadAt, SnapshotResult, SnapshotTarget};
use txn::TxnLeadership;

/// Compact a range's log when this many applied entries sit above its truncation point.
const COMPACTION_THRESHOLD: u64 = 1_000;
/// Placement looks at quiesced ranges once in this many rounds.
const QUIESCED_PLACEMENT_EVERY: u64 = 10;
/// Ticks between placement checks of the ranges this node leads.
const PLACEMENT_INTERVAL_TICKS: u64 = 10;
/// The longest commit-wait before a write is failed instead of acknowledged.
pub(crate) const MAX_COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Resolves at `deadline`, or never without one.
async fn wake_at(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Acknowledges a write or commit at `timestamp` once `after(timestamp)` holds on this
/// node's clock (commit-wait, Spanner §4.1.2), with how long that took. The write has
/// committed; if the wait cannot finish (a stalled clock), its effect is not known to be
/// externally consistent, and the caller is told the outcome is unknown rather than that it
/// failed. `skip` is the test-only switch that acknowledges at once.
pub(super) fn acknowledge_after_commit_wait(
    truetime: &TrueTime,
    timestamp: u64,
    skip: bool,
    acknowledge: impl FnOnce(Result<Committed, NodeError>) + Send + 'static,
) {
    let uncertainty = |truetime: &TrueTime| truetime.read().uncertainty;
    if skip {
        let commit_wait = Duration::ZERO;
        return acknowledge(Ok(Committed {
            timestamp,
            commit_wait,
            uncertainty: uncertainty(truetime),
        }));
    }
    let truetime = truetime.clone();
    tokio::spawn(async move {
        let waited =
            truetime.wait_until_after(Timestamp::from_nanos(timestamp), MAX_COMMIT_WAIT).await;
        acknowledge(match waited {
            Ok(commit_wait) => {
                metrics::histogram!("meridian_commit_wait_seconds")
                    .record(commit_wait.as_secs_f64());
                Ok(Committed { timestamp, commit_wait, uncertainty: uncertainty(&truetime) })
            }
            Err(error) => {
                Err(NodeError::Ambiguous(format!("committed, but commit-wait failed: {error}")))
            }
        });
    });
}

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

impl RaftTiming {
    /// Returns this timing with the lease shortened, if needed, so that the shortest election
    /// timeout exceeds the lease plus twice the clock bound and a tick (Raft's timing rule:
    /// followers' lease promises must have run out when their election timeouts fire).
    ///
    /// The lease must also outlast twice the bound plus a heartbeat interval: a lease runs from
    /// the earliest reading of the round that confirmed it, and a leader serves only while the
    /// latest reading of its clock (2ε later) is inside it, up to a heartbeat after the round.
    ///
    /// # Errors
    ///
    /// Why the bound leaves no room for a lease of at least two ticks, or for one that a leader
    /// could ever serve from.
    pub fn with_clock_bound(mut self, max_clock_offset: Duration) -> Result<Self, String> {
        let election = self.tick_interval * self.election_timeout_ticks as u32;
        let heartbeat = self.tick_interval * self.heartbeat_interval_ticks as u32;
        let room = election
            .checked_sub(max_clock_offset * 2 + self.tick_interval)
            .filter(|room| *room >= self.tick_interval * 2)
            .filter(|room| (*room).min(self.lease_duration) > max_clock_offset * 2 + heartbeat)
            .ok_or_else(|| {
                format!(
                    "a clock bound of {max_clock_offset:?} leaves no room for leader leases \
                     within the {election:?} election timeout (at most {:?})",
                    ((election.saturating_sub(self.tick_interval + heartbeat)) / 4)
                        .min(self.lease_duration.saturating_sub(heartbeat) / 2)
                        .min(election.saturating_sub(self.tick_interval * 3) / 2)
                )
            })?;
        self.lease_duration = self.lease_duration.min(room);
        Ok(self)
    }
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
    /// The replicas holding snapshot reads that wait for their safe time (which may be
    /// quiesced, so not in `awake`).
    follower_reading: BTreeSet<RangeId>,
    /// When the next committed transaction's commit-wait ends, so that its locks go then
    /// rather than at the next tick (a hot row would otherwise take one commit per tick).
    release_wakeup: Option<Instant>,
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
    /// Fault injection: abort right after a split this node proposed applies.
    crash_after_split: bool,
    /// Seeds the election jitter of this node's replicas.
    seed: u64,
    /// The bound on every node's clock uncertainty the leases rely on.
    max_clock_offset: Duration,
    /// See [`DriverOptions::gc_ttl`].
    gc_ttl: Duration,
    /// Test-only rule breakers.
    switches: NodeSwitches,
}

/// Switches that deliberately break one of the node's rules each, so that tests can show the
/// whole-cluster simulation catches the violation. All off by default; never set them
/// elsewhere.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeSwitches {
    /// Acknowledge writes without commit-wait (Spanner §4.1.2).
    pub skip_commit_wait: bool,
    /// Assign write timestamps from the clock and the lease alone, ignoring the range's floor
    /// (the highest timestamp it applied or inherited).
    pub ignore_timestamp_floors: bool,
    /// Give the ranges a split creates no timestamp floor from their parent.
    pub child_without_floor: bool,
    /// Serve reads and scans for keys outside the range's current span.
    pub serve_outside_span: bool,
    /// Let a snapshot install overwrite the spans of newer ranges split off on this node.
    pub snapshot_overwrites_newer_ranges: bool,
    /// Install snapshots without clearing the old data of their span first.
    pub snapshot_keeps_old_data: bool,
    /// Serve reads at a timestamp without waiting for the transactions prepared at or below
    /// it (breaks "a snapshot read waits until nothing can still commit below it").
    pub snapshot_reads_ignore_prepared: bool,
    /// Release a commit part's locks as soon as its entry (a one-range commit, a prepare
    /// record) is proposed, before it is replicated (breaks strict two-phase locking: a
    /// conflicting transaction can read what the commit is about to overwrite).
    pub release_locks_at_proposal: bool,
    /// Serve snapshot reads at followers at once, without waiting for the range's safe time
    /// (breaks "a replica serves a read only below its closed timestamp").
    pub follower_reads_ignore_safe_time: bool,
    /// Read strong read-only transactions at the serving replica's `now().earliest` instead
    /// of `now().latest` (breaks external consistency: a commit acknowledged before the read
    /// began may have a later timestamp).
    pub read_only_at_earliest: bool,
    /// Raft's own rule breakers, for every replica.
    pub raft: meridian_raft::UnsafeSwitches,
}

impl NodeSwitches {
    /// The names of the rule breakers, as [`NodeSwitches::set`] takes them.
    pub const NAMES: [&'static str; 11] = [
        "skip_commit_wait",
        "serve_expired_lease",
        "ignore_timestamp_floors",
        "child_without_floor",
        "serve_outside_span",
        "snapshot_overwrites_newer_ranges",
        "snapshot_keeps_old_data",
        "snapshot_reads_ignore_prepared",
        "release_locks_at_proposal",
        "follower_reads_ignore_safe_time",
        "read_only_at_earliest",
    ];

    /// Turns on the rule breaker called `name` (one of [`NodeSwitches::NAMES`]).
    ///
    /// # Errors
    ///
    /// An unknown name, with the known ones.
    pub fn set(&mut self, name: &str) -> Result<(), String> {
        match name {
            "skip_commit_wait" => self.skip_commit_wait = true,
            "serve_expired_lease" => self.raft.serve_expired_lease = true,
            "ignore_timestamp_floors" => self.ignore_timestamp_floors = true,
            "child_without_floor" => self.child_without_floor = true,
            "serve_outside_span" => self.serve_outside_span = true,
            "snapshot_overwrites_newer_ranges" => self.snapshot_overwrites_newer_ranges = true,
            "snapshot_keeps_old_data" => self.snapshot_keeps_old_data = true,
            "snapshot_reads_ignore_prepared" => self.snapshot_reads_ignore_prepared = true,
            "release_locks_at_proposal" => self.release_locks_at_proposal = true,
            "follower_reads_ignore_safe_time" => self.follower_reads_ignore_safe_time = true,
            "read_only_at_earliest" => self.read_only_at_earliest = true,
            _ => {
                return Err(format!("unknown switch `{name}` (known: {})", Self::NAMES.join(", ")));
            }
        }
        Ok(())
    }

    /// The switches with only `name` on, if it names one.
    pub fn named(name: &str) -> Option<NodeSwitches> {
        let mut switches = NodeSwitches::default();
        switches.set(name).ok().map(|()| switches)
    }
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
    /// Fault injection for tests: abort right after a split this node proposed applies (see
    /// `NodeOptions`).
    pub crash_after_split: bool,
    /// Seeds election jitter; `None` takes a seed from the wall clock.
    pub seed: Option<u64>,
    /// How often to ask the meta range about every replica (see `check_membership`).
    pub replica_check_interval: Duration,
    /// The bound on every node's clock uncertainty (`--max-clock-offset-ms`), which leases
    /// rely on.
    pub max_clock_offset: Duration,
    /// How long a version stays readable after a newer one replaced it: ranges collect
    /// garbage below `now - gc_ttl` (see `maintenance.rs`).
    pub gc_ttl: Duration,
    /// Test-only rule breakers (see [`NodeSwitches`]).
    pub switches: NodeSwitches,
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
            release_wakeup: None,
            placement_rounds: 0,
            membership_rounds: 0,
            sweep_rounds,
            awake: BTreeSet::new(),
            follower_reading: BTreeSet::new(),
            background,
            range_max_bytes: options.range_max_bytes,
            draining: options.draining,
            loads: BTreeMap::new(),
            unreachable: BTreeSet::new(),
            load: options.load,
            crash_after_split: options.crash_after_split,
            seed: node_seed(options.node_id, options.seed),
            max_clock_offset: options.max_clock_offset,
            gc_ttl: options.gc_ttl,
            switches: options.switches,
        };
        for range in stored_ranges(driver.engine.as_ref()).map_err(internal)? {
            driver.open_replica(range)?;
        }
        driver.cede_overlapping_spans();
        info!(replicas = driver.replicas.len(), "replicas opened");
        Ok(driver)
    }

    /// Tells every replica which parts of its span newer replicas on this node own (see
    /// `RangeStateMachine::cede`): after a restart, a replica still behind a split whose
    /// child's replica here started from a snapshot. Spans of one lineage rarely overlap, so
    /// a sweep over the descriptors sorted by start key finds the pairs.
    fn cede_overlapping_spans(&mut self) {
        let mut descriptors: Vec<RangeDescriptor> = self
            .replicas
            .values()
            .filter(|replica| replica.range != META_RANGE && replica.state.is_initialized())
            .map(|replica| replica.state.descriptor().clone())
            .collect();
        descriptors.sort_by(|a, b| a.start.cmp(&b.start));
        for (i, first) in descriptors.iter().enumerate() {
            for second in &descriptors[i + 1..] {
                if first.end.as_ref().is_some_and(|end| second.start >= *end) {
                    break;
                }
                let (older, newer) = if first.generation < second.generation {
                    (first, second)
                } else {
                    (second, first)
                };
                if let Some(replica) = self.replicas.get_mut(&older.id) {
                    replica.state.cede(newer);
                }
            }
        }
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
                () = wake_at(self.release_wakeup) => {
                    self.release_wakeup = None;
                    self.tick_txns();
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
                        if !follower_reads::close_if_behind(replica, now, follower_reads::CLOSE_LAG)
                        {
                            maybe_quiesce(replica, now, self.timing.tick_interval);
                        }
                        replica.leaderless_ticks = match replica.raft.leader() {
                            None => replica.leaderless_ticks + 1,
                            Some(_) => 0,
                        };
                    }
                    self.admit_all();
                    self.tick_txns();
                    self.tick_two_phase();
                    self.advance_all_snapshot_reads();
                    self.advance_all_follower_reads();
                }
            }
            self.cycle()?;
        }
    }

    pub(super) fn handle(&mut self, event: Event) -> Result<(), NodeError> {
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
                    // A quiesced replica's time is stale (it is not ticked).
                    if replica.raft.is_quiesced() {
                        replica.raft.observe_time(raft_interval(&self.truetime));
                    }
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
            Event::Write { range, key, value, deadline, reply } => {
                self.enqueue(range, Waiting::Write { key, value, deadline, reply });
            }
            Event::TxnLock { range, lock, deadline, reply } => {
                self.txn_lock(range, lock, deadline, reply);
            }
            Event::TxnCommit { range, commit, deadline, reply } => {
                self.txn_commit(range, commit, deadline, reply);
            }
            Event::TxnLockWrites { range, lock, deadline, reply } => {
                self.txn_lock_writes(range, lock, deadline, reply);
            }
            Event::TxnPrepare { range, prepare, deadline, reply } => {
                self.txn_prepare(range, prepare, deadline, reply);
            }
            Event::TxnAbort { range, txn, participants, reason, reply } => {
                self.txn_abort(range, txn, participants, reason, reply);
            }
            Event::TxnVote { range, txn, participant, prepare_ts, query, reply } => {
                self.txn_vote(range, txn, participant, prepare_ts, query, reply);
            }
            Event::TxnOutcome { range, txn, decision, reply } => {
                self.txn_outcome(range, txn, decision, reply);
            }
            Event::TxnRollback { range, txn, reply } => self.txn_rollback(range, txn, reply),
            Event::TxnHeartbeat { range, txn, epoch, reply } => {
                self.txn_heartbeat(range, txn, epoch, reply);
            }
            Event::SnapshotRead { range, target, at, follower, deadline, reply } => {
                self.snapshot_read(range, target, at, follower, deadline, reply);
            }
            Event::Read { request, deadline } => {
                self.enqueue(request.range(), Waiting::Read { request, deadline });
            }
            Event::Split { range, keys, ids, reply } => {
                let check = keys.first().cloned();
                // The new ranges inherit the highest timestamp this leader served or assigned
                // as their floor; requests wait until the split applies (see `leader.rs`).
                let switches = self.switches;
                let command = move |replica: &mut Replica<E>| {
                    let floor = if switches.child_without_floor {
                        0
                    } else {
                        replica.raft.max_served_timestamp()
                    };
                    encode_split(keys, ids, floor)
                };
                self.propose(range, check.as_deref(), command, Pending::Split { reply });
            }
            Event::CheckSplit { range, reply, .. } if range == META_RANGE => {
                let _ = reply
                    .send(Err(NodeError::InvalidArgument("the meta range does not split".into())));
            }
            Event::CheckSplit { range, keys, reply } => {
                let result = self.leader_replica(range, keys.first().map(Vec::as_slice)).and_then(
                    |replica| {
                        if replica.state.has_prepared() {
                            // Retryable: prepared transactions resolve within seconds.
                            return Err(NodeError::Unavailable(
                                "the range has prepared transactions; split once they are \
                                 resolved"
                                    .into(),
                            ));
                        }
                        let applied = replica.state.applied();
                        check_split_keys(&applied.descriptor, &applied.config, &keys)
                            .map_err(NodeError::InvalidArgument)
                    },
                );
                let _ = reply.send(result);
            }
            Event::Meta(MetaWrite::UpdateDescriptors { descriptors, reply }) => {
                let command = |_: &mut Replica<E>| encode_update_descriptors(descriptors);
                self.propose(META_RANGE, None, command, Pending::UpdateDescriptors { reply });
            }
            Event::Meta(MetaWrite::AllocateRangeIds { count, reply }) => {
                let command = |_: &mut Replica<E>| encode_allocate_range_ids(count);
                self.propose(META_RANGE, None, command, Pending::AllocateRangeIds { reply });
            }
            Event::Bootstrap { voters, campaign, reply } => {
                self.joined = true;
                let _ = reply.send(self.bootstrap(voters, campaign));
            }
            Event::Joined => self.joined = true,
            Event::Drain => self.draining = true,
            Event::Liveness { live, dead, unreachable, loads } => {
                self.loads = loads;
                // A quiesced follower cannot tell that its leader is gone: the node tells it
                // when the leader's node stops answering hellos (or at once, when the
                // connection breaks: `PeerLost`), so that it can elect another.
                self.suspect_leaders(&unreachable, |raft| {
                    raft.is_quiesced()
                        && raft.leader().is_none_or(|leader| unreachable.contains(&leader))
                });
                self.liveness = (live, dead);
                self.unreachable = unreachable;
            }
            Event::PeerLost(peer) => {
                let suspected = self
                    .suspect_leaders(&BTreeSet::from([peer]), |raft| raft.leader() == Some(peer));
                if suspected > 0 {
                    info!(
                        peer = peer.0,
                        ranges = suspected,
                        "lost the connection to the leader of some ranges"
                    );
                }
            }
            Event::ClockHealth { healthy } => {
                self.clock_healthy = healthy;
                // Every lease rule rests on this node's clock (`reads.rs`, rule 5).
                for replica in self.replicas.values_mut() {
                    replica.raft.set_clock_trusted(healthy);
                }
            }
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

    /// Has every follower (or candidate) replica that `picked` selects suspect its leader,
    /// the voters not in `lost` taking turns to campaign (see [`goes_first`]); returns how
    /// many did.
    fn suspect_leaders(
        &mut self,
        lost: &BTreeSet<NodeId>,
        picked: impl Fn(&RawNode<RaftLogStore<E>>) -> bool,
    ) -> usize {
        let mut suspected = 0;
        for replica in self.replicas.values_mut() {
            if replica.raft.role() != Role::Leader && picked(&replica.raft) {
                let first = goes_first(replica, self.node_id, lost);
                replica.raft.suspect_leader(raft_interval(&self.truetime), first);
                self.awake.insert(replica.range);
                suspected += 1;
            }
        }
        suspected
    }
}

/// Whether this node is the one of `replica`'s voters to campaign first when their leader is
/// lost: the lowest voter not among `lost`, so that followers who learn of the loss at the
/// same moment do not split their votes.
fn goes_first<E: Engine>(replica: &Replica<E>, node: NodeId, lost: &BTreeSet<NodeId>) -> bool {
    replica.raft.configuration().voters.iter().find(|voter| !lost.contains(voter)) == Some(&node)
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
