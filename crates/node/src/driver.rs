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
//! A storage failure while persisting or applying stops the node: it must not diverge from its
//! peers. Client-visible failures are [`NodeError`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meridian_clock::{Timestamp, TrueTime};
use meridian_raft::{
    Config as RaftConfig, ConfigChange, Configuration, Entry, EntryKind, HardState, Interval,
    LogIndex, Message, NodeId, RawNode, Ready, Role, SnapshotMetadata, Storage, Term,
};
use meridian_storage::{Engine, Mvcc, ScanDirection, WriteBatch};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::placement::{PlacementInput, plan};
use crate::state_machine::{
    Applied, MvccSnapshotSource, RangeStateMachine, encode_delete, encode_put,
};
use crate::transport::Transport;
use crate::{NodeError, RaftLogStore, RangeId};

/// The one range that exists until splits arrive: it covers every key.
pub const FIRST_RANGE: RangeId = RangeId(1);
/// Compact a range's log when this many applied entries sit above its truncation point.
const COMPACTION_THRESHOLD: u64 = 1_000;
/// Ticks between placement checks of the ranges this node leads.
const PLACEMENT_INTERVAL_TICKS: u64 = 10;
/// The longest commit-wait before a write is failed instead of acknowledged.
const MAX_COMMIT_WAIT: Duration = Duration::from_secs(5);

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

/// A read a client asked for.
pub enum ReadRequest {
    /// The latest value of a key, with its commit timestamp.
    Get { key: Vec<u8>, reply: Reply<Option<(Vec<u8>, u64)>> },
    /// Keys in `[start, end)` with their latest values, at most `limit`.
    Scan {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: usize,
        reply: Reply<Vec<(Vec<u8>, Vec<u8>, u64)>>,
    },
}

/// A replica's state for `meridian status`.
pub struct RangeReport {
    /// The range.
    pub range: RangeId,
    /// Its Raft status.
    pub status: meridian_raft::Status,
    /// On the leader: each member's match index.
    pub progress: Vec<(NodeId, LogIndex)>,
}

/// What the driver reacts to.
pub enum Event {
    /// Raft messages from a peer.
    Raft(Vec<(RangeId, Message)>),
    /// Write (`value: Some`) or delete (`None`) a key.
    Write { key: Vec<u8>, value: Option<Vec<u8>>, reply: Reply<u64> },
    /// A linearizable read.
    Read(ReadRequest),
    /// Create the first range with these voters (cluster initialization).
    Bootstrap { voters: Vec<NodeId>, reply: Reply<()> },
    /// Report the replicas' status.
    Status { reply: oneshot::Sender<Vec<RangeReport>> },
    /// Whether this node's clock agrees with its peers; a node whose clock does not gives up
    /// leadership.
    ClockHealth { healthy: bool },
    /// This node joined an initialized cluster (it learned the cluster id from a peer).
    Joined,
    /// Which nodes were heard from recently, and which not for longer than the dead-node
    /// timeout (for placement).
    Liveness { live: BTreeSet<NodeId>, dead: BTreeSet<NodeId> },
}

struct PendingWrite {
    term: Term,
    timestamp: u64,
    reply: Reply<u64>,
}

struct Replica<E: Engine> {
    range: RangeId,
    raft: RawNode<RaftLogStore<E>>,
    state: RangeStateMachine<E>,
    /// The highest timestamp this replica assigned as leader.
    max_assigned: u64,
    writes: BTreeMap<LogIndex, PendingWrite>,
    /// ReadIndex reads waiting for confirmation, by context.
    reads: BTreeMap<u64, ReadRequest>,
    /// Confirmed reads waiting for their index to be applied.
    confirmed: Vec<(LogIndex, ReadRequest)>,
    next_read_context: u64,
    /// A compaction to stage into the next synced batch.
    compaction: Option<SnapshotMetadata>,
    /// The last term in which this replica was seen leading (to count elections won).
    led_term: Option<Term>,
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
}

fn raft_interval(truetime: &TrueTime) -> Interval {
    let now = truetime.now();
    Interval { earliest: now.earliest.as_nanos(), latest: now.latest.as_nanos() }
}

fn internal(error: impl std::fmt::Display) -> NodeError {
    NodeError::Internal(error.to_string())
}

impl<E: Engine> Driver<E> {
    /// Returns a driver over the node's engine, opening the replicas the store holds.
    ///
    /// # Errors
    ///
    /// [`NodeError::Internal`] if the store's Raft state cannot be read.
    pub fn open(
        node_id: NodeId,
        engine: Arc<E>,
        truetime: TrueTime,
        timing: RaftTiming,
        transport: Arc<Transport>,
        events: mpsc::Receiver<Event>,
        initialized: bool,
    ) -> Result<Self, NodeError> {
        let mvcc = Arc::new(Mvcc::new(engine.clone()).map_err(internal)?);
        let mut driver = Driver {
            node_id,
            engine,
            mvcc,
            truetime,
            timing,
            transport,
            replicas: BTreeMap::new(),
            events,
            clock_healthy: true,
            joined: initialized,
            liveness: (BTreeSet::new(), BTreeSet::new()),
            ticks_since_placement: 0,
        };
        if initialized {
            driver.open_replica(FIRST_RANGE, None)?;
        }
        Ok(driver)
    }

    /// Opens (or creates) the replica of `range`. With `bootstrap_voters`, a new replica's log
    /// starts with the initial configuration as entry 1, committed in term 1 — identical on
    /// every bootstrapped voter — so that nodes added later learn it from the log.
    fn open_replica(
        &mut self,
        range: RangeId,
        bootstrap_voters: Option<Vec<NodeId>>,
    ) -> Result<(), NodeError> {
        let source = Arc::new(MvccSnapshotSource { range, mvcc: self.mvcc.clone() });
        let metadata = SnapshotMetadata {
            index: LogIndex(0),
            term: Term(0),
            config: Configuration::default(),
        };
        let mut store =
            RaftLogStore::open(self.engine.clone(), range, metadata, source).map_err(internal)?;
        if let Some(voters) = bootstrap_voters
            && store.last_index() == LogIndex(0)
        {
            let change = ConfigChange::Enter {
                voters: voters.into_iter().collect(),
                learners: BTreeSet::new(),
            };
            let entry =
                Entry { index: LogIndex(1), term: Term(1), kind: EntryKind::ConfigChange(change) };
            let hard_state = HardState { term: Term(1), vote: None, commit: LogIndex(1) };
            let ready =
                Ready { entries: vec![entry], hard_state: Some(hard_state), ..Ready::default() };
            let mut batch = WriteBatch::new();
            let staged = store.stage(&ready, &mut batch);
            self.engine.write(batch, true).map_err(internal)?;
            store.on_persisted(staged);
        }
        let mut config = RaftConfig::new(self.node_id);
        config.election_timeout_ticks = self.timing.election_timeout_ticks;
        config.heartbeat_interval_ticks = self.timing.heartbeat_interval_ticks;
        config.lease_duration_ns = self.timing.lease_duration.as_nanos() as u64;
        config.seed = rand_seed(self.node_id);
        let raft = RawNode::new(config, store, raft_interval(&self.truetime)).map_err(internal)?;
        let state = RangeStateMachine::open(range, self.mvcc.clone()).map_err(internal)?;
        let max_assigned = state.applied().max_timestamp;
        info!(range = range.0, status = ?raft.status(), "replica opened");
        self.replicas.insert(
            range,
            Replica {
                range,
                raft,
                state,
                max_assigned,
                writes: BTreeMap::new(),
                reads: BTreeMap::new(),
                confirmed: Vec::new(),
                next_read_context: 1,
                compaction: None,
                led_term: None,
            },
        );
        Ok(())
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
                        self.place_replicas();
                    }
                    let now = raft_interval(&self.truetime);
                    for replica in self.replicas.values_mut() {
                        replica.raft.tick(now);
                        // A node whose clock cannot be trusted must not assign timestamps:
                        // hand leadership to another voter.
                        if !self.clock_healthy && replica.raft.role() == Role::Leader {
                            let voters = replica.raft.configuration().voters.clone();
                            if let Some(target) = voters.iter().find(|id| **id != self.node_id) {
                                let _ = replica.raft.transfer_leadership(*target);
                            }
                        }
                    }
                }
            }
            self.cycle()?;
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), NodeError> {
        match event {
            Event::Raft(messages) => {
                // A node that joined an initialized cluster gets its replica when the leader
                // first reaches out (it was added as a learner); the log or a snapshot brings
                // the configuration.
                if self.joined
                    && !self.replicas.contains_key(&FIRST_RANGE)
                    && messages.iter().any(|(range, _)| *range == FIRST_RANGE)
                {
                    self.open_replica(FIRST_RANGE, None)?;
                }
                metrics::counter!("meridian_raft_messages_received_total")
                    .increment(messages.len() as u64);
                for (range, message) in messages {
                    let Some(replica) = self.replicas.get_mut(&range) else { continue };
                    if let Err(error) = replica.raft.step(message) {
                        warn!(range = range.0, %error, "rejected a raft message");
                    }
                }
            }
            Event::Write { key, value, reply } => self.write(key, value, reply),
            Event::Read(request) => self.read(request),
            Event::Bootstrap { voters, reply } => {
                self.joined = true;
                let result = if self.replicas.contains_key(&FIRST_RANGE) {
                    Ok(())
                } else {
                    self.open_replica(FIRST_RANGE, Some(voters))
                };
                let _ = reply.send(result);
            }
            Event::Joined => self.joined = true,
            Event::Liveness { live, dead } => self.liveness = (live, dead),
            Event::ClockHealth { healthy } => self.clock_healthy = healthy,
            Event::Status { reply } => {
                let statuses = self
                    .replicas
                    .iter()
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
                        RangeReport { range: *range, status, progress }
                    })
                    .collect();
                let _ = reply.send(statuses);
            }
        }
        Ok(())
    }

    /// Lets every range this node leads move toward its target placement (see `placement.rs`).
    fn place_replicas(&mut self) {
        let (live, dead) = &self.liveness;
        let mut live = live.clone();
        live.insert(self.node_id);
        for replica in self.replicas.values_mut() {
            if replica.raft.role() != Role::Leader || replica.raft.config_change_pending() {
                continue;
            }
            let status = replica.raft.status();
            let learner_match = status
                .configuration
                .learners
                .iter()
                .map(|learner| (*learner, replica.raft.match_index(*learner).unwrap_or_default()))
                .collect();
            let input = PlacementInput {
                config: status.configuration.clone(),
                live: live.clone(),
                dead: dead.clone(),
                commit: status.commit,
                learner_match,
            };
            if let Some((voters, learners)) = plan(&input) {
                info!(range = replica.range.0, from = %status.configuration, ?voters, ?learners, "changing replicas");
                if let Err(error) = replica.raft.propose_config_change(voters, learners) {
                    warn!(range = replica.range.0, %error, "could not change replicas");
                }
            }
        }
    }

    /// Returns the error for a request that reached a non-leader.
    fn not_leader(&self, leader: Option<NodeId>) -> NodeError {
        match leader {
            Some(leader) if leader != self.node_id => NodeError::NotLeader {
                leader: Some(leader),
                address: self.transport.address(leader),
            },
            _ => NodeError::Unavailable("the range has no leader right now".into()),
        }
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>, reply: Reply<u64>) {
        let now = self.truetime.now();
        let interval =
            Interval { earliest: now.earliest.as_nanos(), latest: now.latest.as_nanos() };
        let Some(replica) = self.replicas.get_mut(&FIRST_RANGE) else {
            let _ = reply.send(Err(NodeError::NotInitialized));
            return;
        };
        if replica.raft.role() != Role::Leader {
            let leader = replica.raft.leader();
            let _ = reply.send(Err(self.not_leader(leader)));
            return;
        }
        // A leader assigns timestamps only inside its lease (Spanner's disjointness).
        if replica.raft.lease_read(interval).is_none() {
            let _ = reply.send(Err(NodeError::Unavailable("the leader has no lease yet".into())));
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
                replica.writes.insert(index, PendingWrite { term, timestamp, reply });
            }
            Err(error) => {
                let _ = reply.send(Err(NodeError::Unavailable(error.to_string())));
            }
        }
    }

    fn read(&mut self, request: ReadRequest) {
        let interval = raft_interval(&self.truetime);
        let Some(replica) = self.replicas.get_mut(&FIRST_RANGE) else {
            fail_read(request, NodeError::NotInitialized);
            return;
        };
        if replica.raft.role() != Role::Leader {
            let leader = replica.raft.leader();
            let error = self.not_leader(leader);
            fail_read(request, error);
            return;
        }
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
            Err(error) => fail_read(request, NodeError::Unavailable(error.to_string())),
        }
    }

    /// Runs one persist–send–apply cycle over every replica.
    fn cycle(&mut self) -> Result<(), NodeError> {
        let mut durable = WriteBatch::new();
        let mut readies: Vec<(RangeId, Ready)> = Vec::new();
        for replica in self.replicas.values_mut() {
            if let Some(metadata) = replica.compaction.take() {
                let staged = replica.raft.storage().stage_compaction(metadata, &mut durable);
                replica.raft.storage_mut().on_persisted(staged);
            }
            if !replica.raft.has_ready() {
                continue;
            }
            let ready = replica.raft.ready().map_err(internal)?;
            if let Some(snapshot) = &ready.snapshot {
                replica.state.stage_install(snapshot, &mut durable).map_err(internal)?;
                // Reads and writes waiting on entries the snapshot replaced cannot be answered.
                for (_, write) in std::mem::take(&mut replica.writes) {
                    let _ = write.reply.send(Err(NodeError::Unavailable(
                        "replica was replaced by a snapshot".into(),
                    )));
                }
            }
            readies.push((replica.range, ready));
        }
        if readies.is_empty() && durable.is_empty() {
            // Lease reads of this cycle may be servable at once.
            self.serve_confirmed_reads();
            return Ok(());
        }
        let mut staged = Vec::new();
        for (range, ready) in &readies {
            let replica = self.replicas.get_mut(range).expect("replica exists");
            staged.push(replica.raft.storage().stage(ready, &mut durable));
        }
        if !durable.is_empty() {
            let (size, started) = (durable.size_bytes(), std::time::Instant::now());
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
        for (range, ready) in readies {
            let replica = self.replicas.get_mut(&range).expect("replica exists");
            metrics::counter!("meridian_raft_entries_applied_total")
                .increment(ready.committed_entries.len() as u64);
            for entry in &ready.committed_entries {
                let outcome = replica.state.apply(entry, &mut applied_batch).map_err(internal)?;
                if let Some(write) = replica.writes.remove(&entry.index) {
                    let result = match outcome {
                        _ if write.term != entry.term => Err(NodeError::Unavailable(
                            "leadership changed; the write was not committed".into(),
                        )),
                        Applied::Write(timestamp) if timestamp == write.timestamp => Ok(timestamp),
                        Applied::Rejected(reason) => Err(NodeError::InvalidArgument(reason)),
                        _ => Err(NodeError::Unavailable("the write was not committed".into())),
                    };
                    acknowledgements.push((write.reply, result));
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
                replica
                    .state
                    .stage_applied_state(replica.raft.configuration().clone(), &mut applied_batch);
            }
            let applied = replica.raft.applied_index();
            if applied.0 > replica.raft.storage().first_index().0 + COMPACTION_THRESHOLD
                && let Ok(metadata) = replica.raft.applied_snapshot_metadata()
            {
                // Staged into the next synced batch, after this cycle's applied state.
                replica.compaction = Some(metadata);
            }
        }
        if !applied_batch.is_empty() {
            self.engine.write(applied_batch, false).map_err(internal)?;
        }
        for (reply, result) in acknowledgements {
            match result {
                // Commit-wait (Spanner §4.1.2): acknowledge only once the timestamp has passed.
                Ok(timestamp) => {
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
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            }
        }
        self.serve_confirmed_reads();
        self.fail_requests_of_former_leaders();
        self.record_gauges();
        Ok(())
    }

    /// Updates the gauges describing the replicas, and counts elections won.
    fn record_gauges(&mut self) {
        let mut led = 0;
        let mut apply_lag = 0;
        for replica in self.replicas.values_mut() {
            // Cheap accessors only: this runs every cycle (`status()` clones the configuration).
            let raft = &replica.raft;
            if raft.role() == Role::Leader {
                led += 1;
                if replica.led_term != Some(raft.term()) {
                    replica.led_term = Some(raft.term());
                    metrics::counter!("meridian_raft_leader_elections_won_total").increment(1);
                }
            }
            apply_lag += raft.commit_index().0 - raft.applied_index().0;
        }
        metrics::gauge!("meridian_ranges").set(self.replicas.len() as f64);
        metrics::gauge!("meridian_ranges_led").set(f64::from(led));
        metrics::gauge!("meridian_raft_apply_lag_entries").set(apply_lag as f64);
    }

    /// Fails the requests a replica can no longer answer because it lost leadership: reads
    /// still waiting for their ReadIndex round, and writes not yet applied (their outcome is
    /// unknown: the entry may still commit under the new leader).
    fn fail_requests_of_former_leaders(&mut self) {
        for replica in self.replicas.values_mut() {
            if replica.raft.role() == Role::Leader {
                continue;
            }
            for (_, request) in std::mem::take(&mut replica.reads) {
                fail_read(
                    request,
                    NodeError::Unavailable(
                        "leadership changed before the read was confirmed".into(),
                    ),
                );
            }
            for (_, write) in std::mem::take(&mut replica.writes) {
                let _ = write.reply.send(Err(NodeError::Unavailable(
                    "leadership changed before the write was applied; it may or may not take effect".into(),
                )));
            }
        }
    }

    fn serve_confirmed_reads(&mut self) {
        for replica in self.replicas.values_mut() {
            let applied = replica.state.applied().index;
            let (ready, waiting): (Vec<_>, Vec<_>) =
                replica.confirmed.drain(..).partition(|(index, _)| *index <= applied);
            replica.confirmed = waiting;
            for (_, request) in ready {
                serve_read(&self.mvcc, request);
            }
        }
    }
}

fn serve_read<E: Engine>(mvcc: &Mvcc<E>, request: ReadRequest) {
    match request {
        ReadRequest::Get { key, reply } => {
            let result = mvcc
                .get(&key, Timestamp::MAX)
                .map(|version| version.map(|version| (version.value, version.commit_ts.as_nanos())))
                .map_err(internal);
            let _ = reply.send(result);
        }
        ReadRequest::Scan { start, end, limit, reply } => {
            let result = mvcc
                .scan(&start, end.as_deref(), Timestamp::MAX, ScanDirection::Forward, limit)
                .map(|rows| {
                    rows.into_iter()
                        .map(|(key, version)| (key, version.value, version.commit_ts.as_nanos()))
                        .collect()
                })
                .map_err(internal);
            let _ = reply.send(result);
        }
    }
}

fn fail_read(request: ReadRequest, error: NodeError) {
    match request {
        ReadRequest::Get { reply, .. } => {
            let _ = reply.send(Err(error));
        }
        ReadRequest::Scan { reply, .. } => {
            let _ = reply.send(Err(error));
        }
    }
}

/// Returns a seed for election jitter that differs between nodes and runs.
fn rand_seed(node_id: NodeId) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |duration| duration.as_nanos() as u64);
    nanos ^ node_id.0.rotate_left(32)
}

/// Logs a fatal driver error.
pub fn log_fatal(error: &NodeError) {
    error!(%error, "the node's driver stopped");
}
