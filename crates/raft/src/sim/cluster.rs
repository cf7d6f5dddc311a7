//! The simulated cluster: options, nodes, the network, the `Ready` cycle with its crash points,
//! and the run loop. Clients live in `clients.rs`, faults and clocks in `nemesis.rs`, the checks
//! made while running in `monitors.rs` and those made at the end in `invariants.rs`.

use std::collections::{BTreeMap, BTreeSet};

use super::display;
use super::kv::Kv;
use super::linearizability::{self, HistoryEntry};
use super::monitors::{LeaderRounds, LeaseReadRecord};
use crate::{
    Config, Configuration, Entry, EntryKind, LogIndex, MemStorage, Message, MessageBody, NodeId,
    RawNode, Ready, Role, Snapshot, SplitMix64, Storage, Term, UnsafeSwitches,
};

/// Nanoseconds per simulation step.
pub(super) const STEP_NS: u64 = 1_000_000;
/// The simulated clock starts here (2026-01-01), so that intervals never underflow.
pub(super) const EPOCH_NS: u64 = 1_767_225_600_000_000_000;
/// How many cycles of the `Ready` loop one call runs at most before yielding.
const MAX_READY_CYCLES: usize = 8;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The seed of everything random.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: u64,
    /// How many of them (the lowest ids) are voters at the start; the others start outside the
    /// group and may be added by membership changes.
    pub initial_voters: u64,
    /// Whether the nemesis changes membership and transfers leadership too.
    pub reconfigure: bool,
    /// Whether membership changes swap the voters between `{1, 2, 3}` and `{3, 4, 5}` (needs
    /// at least 5 nodes) instead of picking random voter sets: every change then has a joint
    /// phase in which the outgoing-only and incoming-only voters differ.
    pub swap_voters: bool,
    /// Probability (per mille) that, when a leader enters a joint configuration, the network
    /// is partitioned between the outgoing-only voters and the incoming-only ones (each voter
    /// of both halves and each other node joins a random side).
    pub joint_partition_per_mille: u64,
    /// Steps (1 ms of simulated time each) with clients and faults.
    pub steps: u64,
    /// Steps between ticks.
    pub tick_interval_steps: u64,
    /// Raft election timeout in ticks.
    pub election_timeout_ticks: u64,
    /// Raft heartbeat interval in ticks.
    pub heartbeat_interval_ticks: u64,
    /// Whether leaders step down without a quorum and voters ignore candidates while they
    /// hear from a leader (Raft's `check_quorum`).
    pub check_quorum: bool,
    /// Lease duration in ns (0: no leases, reads use ReadIndex only).
    pub lease_duration_ns: u64,
    /// The clock bound ε of the group, in ns: every node's uncertainty stays within it, and
    /// offsets within each node's uncertainty (`Config::max_clock_offset_ns`).
    pub epsilon_ns: u64,
    /// The smallest uncertainty of a node's readings, in ns. Below `epsilon_ns`, each node's
    /// uncertainty follows a sawtooth between the two (rising from this value to the bound,
    /// then dropping back, as TrueTime's does between synchronisations), each node with its
    /// own phase; at or above it, every reading has uncertainty `epsilon_ns`.
    pub epsilon_min_ns: u64,
    /// The largest message delay, in steps.
    pub max_delay_steps: u64,
    /// Probability (per mille) that a message is dropped.
    pub drop_per_mille: u64,
    /// Probability (per mille) that a message is duplicated.
    pub duplicate_per_mille: u64,
    /// Probability (per mille) per step of a nemesis event.
    pub fault_per_mille: u64,
    /// Probability (per mille) that a `Ready` cycle that sends a vote request, grants a vote or
    /// carries a new leader's no-op crashes its node at a crash point (after persisting and
    /// before sending, or after sending and before applying; half of these nodes reboot at
    /// once), and that a vote request finds its recipient just rebooted.
    pub vote_crash_per_mille: u64,
    /// Probability (per million) that any other `Ready` cycle crashes its node at one of those
    /// crash points.
    pub crash_point_per_million: u64,
    /// Probability (per mille) that a newly elected leader is crashed within
    /// `leader_crash_within_steps` of being first seen, and restarted within
    /// `restart_within_steps` after that: short reigns, as Raft's Figure 8 needs.
    pub leader_crash_per_mille: u64,
    /// The latest step after its election at which a leader picked for a crash crashes.
    pub leader_crash_within_steps: u64,
    /// Probability (per mille) that a message a node sent and the network has not delivered
    /// yet is lost when the node crashes (it had not left the machine).
    pub lose_unsent_on_crash_per_mille: u64,
    /// The longest downtime of a crashed node, in steps: every crash (by the nemesis, at a
    /// crash point or of a leader) is followed by a restart within it. Zero leaves restarts to
    /// the nemesis (and crash-point reboots).
    pub restart_within_steps: u64,
    /// Number of concurrent clients.
    pub clients: usize,
    /// Number of keys clients use.
    pub keys: usize,
    /// Largest number of operations per key in the history.
    pub max_operations_per_key: usize,
    /// Probability (per mille) per step that an idle client starts an operation.
    pub client_per_mille: u64,
    /// Share (per mille) of client operations that are writes; the others are reads.
    pub write_per_mille: u64,
    /// Probability (per mille) per step that the clients pause for 100 to 400 steps (a quiet
    /// spell in a bursty workload, in which no entry is appended).
    pub pause_per_mille: u64,
    /// Applied entries after which a node snapshots and compacts its log (0: never).
    pub compact_every: u64,
    /// The most bytes of entries one append carries.
    pub max_append_bytes: usize,
    /// Deliberately broken rules (see [`UnsafeSwitches`]).
    pub unsafe_switches: UnsafeSwitches,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 0,
            nodes: 3,
            initial_voters: 3,
            reconfigure: true,
            swap_voters: false,
            joint_partition_per_mille: 0,
            steps: 3_000,
            tick_interval_steps: 10,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            check_quorum: true,
            lease_duration_ns: 60 * STEP_NS,
            epsilon_ns: 2 * STEP_NS,
            epsilon_min_ns: 2 * STEP_NS,
            max_delay_steps: 8,
            drop_per_mille: 20,
            duplicate_per_mille: 20,
            fault_per_mille: 8,
            vote_crash_per_mille: 0,
            crash_point_per_million: 0,
            leader_crash_per_mille: 0,
            leader_crash_within_steps: 40,
            lose_unsent_on_crash_per_mille: 0,
            restart_within_steps: 0,
            clients: 4,
            keys: 3,
            max_operations_per_key: 100,
            client_per_mille: 150,
            write_per_mille: 500,
            pause_per_mille: 0,
            compact_every: 40,
            max_append_bytes: 64 << 10,
            unsafe_switches: UnsafeSwitches::default(),
        }
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed of the run.
    pub seed: u64,
    /// Every violated invariant, in the order found.
    pub violations: Vec<String>,
    /// Client operations completed successfully.
    pub completed_operations: usize,
    /// Writes acknowledged to clients.
    pub acknowledged_writes: usize,
    /// Reads served from a lease.
    pub lease_reads: usize,
    /// Writes proposed with a timestamp from the leader's lease (`RawNode::lease_timestamp`).
    pub timestamped_writes: usize,
    /// Leaders elected.
    pub elections: usize,
    /// The highest term any node reached.
    pub max_term: u64,
    /// Nemesis events that can cost a group its leader (see `Cluster::check_term_growth`).
    pub disruptions: u64,
    /// Membership change entries committed.
    pub config_changes: usize,
    /// Snapshots installed from a leader.
    pub snapshots_installed: usize,
    /// Crashes at a crash point inside a `Ready` cycle.
    pub crash_points: usize,
    /// Crashes around votes: at a crash point of a cycle that requested or granted a vote or
    /// carried a new leader's no-op, or a reboot just before a vote request arrived.
    pub vote_crashes: usize,
    /// Partitions between outgoing and incoming voters made during a joint phase.
    pub joint_partitions: usize,
}

/// One simulated node.
pub(super) struct SimNode {
    /// The running node, or `None` while crashed.
    pub(super) raft: Option<RawNode<MemStorage>>,
    /// The persisted state while crashed.
    pub(super) saved: MemStorage,
    /// The node's state machine (lost in a crash, restored from the snapshot on restart).
    pub(super) kv: Kv,
    /// The node's clock offset from true time, kept within its uncertainty.
    pub(super) offset_ns: i64,
    /// Where in its uncertainty sawtooth the node starts, in steps.
    pub(super) epsilon_phase_steps: u64,
    /// Writes proposed here: index → client.
    pub(super) waiting_writes: BTreeMap<LogIndex, usize>,
    /// ReadIndex reads requested here: context → client.
    pub(super) waiting_reads: BTreeMap<u64, usize>,
    /// Reads confirmed, waiting for their index to be applied.
    pub(super) confirmed_reads: Vec<(LogIndex, usize)>,
    /// The last term in which this node was seen as leader.
    pub(super) last_leader_term: Option<Term>,
    /// The highest term of any message delivered to the node (in any incarnation).
    pub(super) heard_term: Term,
    /// The latest end of a lease promise the node accepted from a leader's heartbeat, in any
    /// incarnation (the node itself forgets promises when it crashes; the simulator does not).
    pub(super) promised_until: u64,
    /// Candidates whose transfer vote requests (which lift promises) reached the node: (term,
    /// candidate).
    pub(super) transfer_requests: BTreeSet<(Term, NodeId)>,
    /// The node's term, whether it led, and its commit index when last observed.
    pub(super) observed_commit: (Term, bool, LogIndex),
}

/// A fault planned for a later step.
#[derive(Clone, Copy, Debug)]
pub(super) enum ScheduledFault {
    /// Crash the node if it still leads in the term.
    CrashLeader(NodeId, Term),
    /// Restart the node if it is down.
    Restart(NodeId),
}

/// An operation a client has in flight.
#[derive(Clone, Debug)]
pub(super) struct PendingOperation {
    /// Where the operation is in the history.
    pub(super) history_index: usize,
    /// The node the client sent it to.
    pub(super) node: NodeId,
    /// The operation's id (in the write's command, or the read's context).
    pub(super) operation_id: u64,
    /// The step at which the client sent it.
    pub(super) started_step: u64,
}

/// A simulated Raft group with clients. See the module docs.
pub struct Cluster {
    /// What to simulate.
    pub(super) options: SimOptions,
    /// The generator of every random choice, seeded from `options.seed`.
    pub(super) rng: SplitMix64,
    /// The current step (true time is `EPOCH_NS + step * STEP_NS`).
    pub(super) step: u64,
    /// The nodes, running or crashed.
    pub(super) nodes: BTreeMap<NodeId, SimNode>,
    /// Messages in flight, keyed by (delivery step, sequence).
    network: BTreeMap<(u64, u64), Message>,
    /// The last sequence number given to a message or a planned fault (orders equal steps).
    pub(super) sequence: u64,
    /// Directed links that drop messages: (from, to).
    pub(super) blocked: BTreeSet<(NodeId, NodeId)>,
    /// Whether the nemesis and crash points act (not while the healed cluster converges).
    pub(super) faults_enabled: bool,
    /// Whether clients start operations.
    pub(super) clients_enabled: bool,
    /// Nodes crashed at a crash point that restart at the end of the step.
    pub(super) reboots: Vec<NodeId>,
    /// Crashes and restarts planned for later steps, keyed by (step, sequence).
    pub(super) scheduled: BTreeMap<(u64, u64), ScheduledFault>,
    /// The leader seen in each term.
    pub(super) leaders: BTreeMap<Term, NodeId>,
    /// The true time at which a leader of each term was first seen.
    pub(super) elected_at: BTreeMap<Term, u64>,
    /// Every entry applied anywhere, by index (what state-machine safety compares against).
    pub(super) committed: BTreeMap<LogIndex, (Term, EntryKind)>,
    /// Every commit point a node was seen at: index → terms of the entry there (several
    /// only if state-machine safety is broken).
    pub(super) commit_points: BTreeMap<LogIndex, BTreeSet<Term>>,
    /// Violated invariants, in the order found.
    pub(super) violations: Vec<String>,
    /// Heartbeat rounds of each leader and term, as seen on the wire.
    pub(super) rounds: BTreeMap<(NodeId, Term), LeaderRounds>,
    /// The last joint configuration a leader was seen in: (leader, term, configuration).
    pub(super) last_joint: Option<(NodeId, Term, Configuration)>,
    /// Each client's operation in flight.
    pub(super) clients: Vec<Option<PendingOperation>>,
    /// Every operation started, with whether it failed (then it is left out of the check).
    pub(super) history: Vec<(HistoryEntry, bool)>,
    /// The global order of invocations and completions.
    pub(super) event_sequence: u64,
    /// The id of the next operation.
    pub(super) next_operation_id: u64,
    /// The operation ids of acknowledged writes.
    pub(super) acknowledged: Vec<u64>,
    /// Lease reads served.
    pub(super) lease_reads: Vec<LeaseReadRecord>,
    /// Every timestamp a leader handed out (lease reads and write timestamps): (term, ts).
    pub(super) timestamps: Vec<(Term, u64)>,
    /// Per term: the latest lease end granted, and when the leader gave the lease up.
    pub(super) lease_ends: BTreeMap<Term, (u64, Option<u64>)>,
    /// Operations per key so far (the linearizability check handles at most 128 per key).
    pub(super) operations_per_key: BTreeMap<String, usize>,
    /// Clients start nothing before this step (a pause).
    pub(super) paused_until: u64,
    /// Counters for the report.
    pub(super) counts: Report,
}

impl Cluster {
    /// Returns a cluster of `options.nodes` nodes (the first `initial_voters` voting), nothing
    /// elected yet.
    pub fn new(options: SimOptions) -> Self {
        let mut rng = SplitMix64::new(options.seed);
        let voters: Vec<NodeId> =
            (1..=options.initial_voters.min(options.nodes)).map(NodeId).collect();
        let all: Vec<NodeId> = (1..=options.nodes).map(NodeId).collect();
        let mut cluster = Cluster {
            rng: SplitMix64::new(rng.next_u64()),
            step: 0,
            nodes: BTreeMap::new(),
            network: BTreeMap::new(),
            sequence: 0,
            blocked: BTreeSet::new(),
            faults_enabled: true,
            clients_enabled: true,
            reboots: Vec::new(),
            scheduled: BTreeMap::new(),
            leaders: BTreeMap::new(),
            elected_at: BTreeMap::new(),
            committed: BTreeMap::new(),
            commit_points: BTreeMap::new(),
            violations: Vec::new(),
            rounds: BTreeMap::new(),
            last_joint: None,
            clients: vec![None; options.clients],
            history: Vec::new(),
            event_sequence: 0,
            next_operation_id: 1,
            acknowledged: Vec::new(),
            lease_reads: Vec::new(),
            timestamps: Vec::new(),
            lease_ends: BTreeMap::new(),
            operations_per_key: BTreeMap::new(),
            paused_until: 0,
            counts: Report { seed: options.seed, ..Report::default() },
            options,
        };
        for id in &all {
            let storage = MemStorage::new(Configuration::with_voters(voters.iter().copied()));
            // Clocks start anywhere within the bound.
            let bound = cluster.options.epsilon_ns;
            let offset_ns = cluster.rng.range(0, 2 * bound + 1) as i64 - bound as i64;
            let node = SimNode {
                raft: None,
                saved: storage,
                kv: Kv::default(),
                offset_ns,
                epsilon_phase_steps: cluster.rng.next_u64(),
                waiting_writes: BTreeMap::new(),
                waiting_reads: BTreeMap::new(),
                confirmed_reads: Vec::new(),
                last_leader_term: None,
                heard_term: Term(0),
                promised_until: 0,
                transfer_requests: BTreeSet::new(),
                observed_commit: (Term(0), false, LogIndex(0)),
            };
            cluster.nodes.insert(*id, node);
            cluster.restart(*id);
        }
        cluster
    }

    /// Returns the Raft options of node `id`.
    fn raft_config(&self, id: NodeId) -> Config {
        let mut config = Config::new(id);
        config.election_timeout_ticks = self.options.election_timeout_ticks;
        config.heartbeat_interval_ticks = self.options.heartbeat_interval_ticks;
        config.check_quorum = self.options.check_quorum;
        config.lease_duration_ns = self.options.lease_duration_ns;
        config.tick_interval_ns = self.options.tick_interval_steps * STEP_NS;
        config.max_clock_offset_ns = self.options.epsilon_ns;
        config.unsafe_switches = self.options.unsafe_switches;
        config.max_append_bytes = self.options.max_append_bytes;
        config.seed = self.options.seed.wrapping_mul(31).wrapping_add(id.0);
        config
    }

    /// Returns true time in ns.
    pub(super) fn true_time(&self) -> u64 {
        EPOCH_NS + self.step * STEP_NS
    }

    pub(super) fn random(&mut self, per_mille: u64) -> bool {
        self.rng.range(0, 1000) < per_mille
    }

    pub(super) fn live_nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, node)| node.raft.is_some()).map(|(id, _)| *id).collect()
    }

    /// Returns node `id`'s running Raft node, if it runs.
    pub(super) fn raft_mut(&mut self, id: NodeId) -> Option<&mut RawNode<MemStorage>> {
        self.nodes.get_mut(&id).and_then(|node| node.raft.as_mut())
    }

    /// Crashes node `id`: everything not persisted is lost. With `restart_within_steps`, its
    /// restart is planned.
    pub fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(raft) = node.raft.take() else { return };
        node.saved = raft.storage().clone();
        node.kv = Kv::default();
        node.waiting_reads.clear();
        node.confirmed_reads.clear();
        // Writes in flight on the node have unknown outcome; the clients give up on them.
        for client in std::mem::take(&mut node.waiting_writes).into_values() {
            self.clients[client] = None;
        }
        for client in 0..self.clients.len() {
            if self.clients[client].as_ref().is_some_and(|pending| pending.node == id) {
                self.clients[client] = None;
            }
        }
        self.lose_unsent_messages(id);
        if self.faults_enabled {
            self.maybe_schedule_restart(id);
        }
    }

    /// Drops each message from node `id` still in flight with `lose_unsent_on_crash_per_mille`
    /// (in delivery order, for determinism).
    fn lose_unsent_messages(&mut self, id: NodeId) {
        if self.options.lose_unsent_on_crash_per_mille == 0 {
            return;
        }
        let keys: Vec<(u64, u64)> = self
            .network
            .iter()
            .filter(|(_, message)| message.from == id)
            .map(|(key, _)| *key)
            .collect();
        for key in keys {
            if self.random(self.options.lose_unsent_on_crash_per_mille) {
                self.network.remove(&key);
            }
        }
    }

    /// Restarts node `id` from its persisted state.
    pub fn restart(&mut self, id: NodeId) {
        let config = self.raft_config(id);
        let now = self.interval(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        if node.raft.is_some() {
            return;
        }
        let storage = node.saved.clone();
        let snapshot = storage.snapshot().expect("memory snapshot");
        node.kv = Kv::restore(&snapshot.data, snapshot.metadata.index);
        node.raft = Some(RawNode::new(config, storage, now).expect("valid config"));
    }

    /// Sends a message through the network, applying delay, loss and duplication.
    fn send(&mut self, message: Message) {
        if self.blocked.contains(&(message.from, message.to))
            || self.random(self.options.drop_per_mille)
        {
            return;
        }
        let copies = if self.random(self.options.duplicate_per_mille) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = self.rng.range(0, self.options.max_delay_steps + 1);
            self.sequence += 1;
            self.network.insert((self.step + delay, self.sequence), message.clone());
        }
    }

    /// Delivers every message due by now, checking that each recipient adopts a higher term
    /// it has no reason to ignore.
    fn deliver_due(&mut self) {
        while let Some((&(due, sequence), _)) = self.network.first_key_value() {
            if due > self.step {
                break;
            }
            let Some(message) = self.network.remove(&(due, sequence)) else { break };
            if self.blocked.contains(&(message.from, message.to)) {
                continue;
            }
            let to = message.to;
            if self.nodes.get(&to).is_none_or(|node| node.raft.is_none()) {
                continue;
            }
            if self.faults_enabled
                && matches!(message.body, MessageBody::PreVote { .. } | MessageBody::Vote { .. })
                && self.random(self.options.vote_crash_per_mille)
            {
                // The voter crashed and rebooted while the request was in flight: it answers
                // with nothing but what it persisted (rule 4 of `reads.rs`).
                self.counts.vote_crashes += 1;
                self.counts.disruptions += 1;
                self.crash(to);
                self.restart(to);
                self.process_ready(to);
            }
            let Some(node) = self.nodes.get_mut(&to) else { continue };
            let Some(raft) = node.raft.as_mut() else { continue };
            node.heard_term = node.heard_term.max(message.term);
            let term_before = raft.term();
            if let MessageBody::HeartbeatResponse { round } = message.body
                && raft.role() == Role::Leader
                && raft.term() == message.term
            {
                let rounds = self.rounds.entry((to, message.term)).or_default();
                let acked = rounds.acked.entry(message.from).or_default();
                *acked = (*acked).max(round);
            }
            let must_adopt = message.term > term_before && !may_ignore_higher_term(&message.body);
            // Described only where it may be reported: formatting every message is costly.
            let described = must_adopt.then(|| display::message(&message));
            let (promise, transfer) = match message.body {
                MessageBody::Heartbeat { promise_until, .. } => (promise_until, false),
                MessageBody::Vote { transfer, .. } => (0, transfer),
                _ => (0, false),
            };
            let (from, term) = (message.from, message.term);
            let _ = raft.step(message);
            let (term_after, role_after) = (raft.term(), raft.role());
            // A follower of the heartbeat's term took the promise on (`reads.rs`, rule 1).
            if promise > 0 && term_after == term && role_after == Role::Follower {
                node.promised_until = node.promised_until.max(promise);
            }
            if transfer {
                node.transfer_requests.insert((term, from));
            }
            if let Some(text) = described
                && term_after < term
            {
                self.violation(format!(
                    "term adoption: node {to} stayed at term {term_after} ({role_after:?}) after \
                     {text} from node {from} of term {term}"
                ));
            }
            self.process_ready(to);
        }
    }

    /// Runs the `Ready` cycle of node `id`: persist; crash point; send; crash point; apply,
    /// serve reads, advance, compact.
    pub(super) fn process_ready(&mut self, id: NodeId) {
        self.observe(id);
        for _ in 0..MAX_READY_CYCLES {
            let Some(raft) = self.raft_mut(id) else { return };
            if !raft.has_ready() {
                break;
            }
            let ready = raft.ready().expect("memory storage does not fail");
            if let Some(snapshot) = &ready.snapshot {
                raft.storage_mut().apply_snapshot(snapshot.clone());
                self.install_snapshot(id, snapshot);
            }
            let raft = self.raft_mut(id).expect("running");
            raft.storage_mut().append(&ready.entries);
            if let Some(hard_state) = ready.hard_state {
                raft.storage_mut().set_hard_state(hard_state);
            }
            if self.maybe_crash_at_crash_point(id, &ready) {
                return;
            }
            for message in &ready.messages {
                self.on_message_sent(id, message);
                self.send(message.clone());
            }
            if self.maybe_crash_at_crash_point(id, &ready) {
                return;
            }
            for entry in &ready.committed_entries {
                self.apply(id, entry);
            }
            let node = self.nodes.get_mut(&id).expect("known node");
            for read in &ready.read_states {
                if let Some(client) = node.waiting_reads.remove(&read.context) {
                    node.confirmed_reads.push((read.index, client));
                }
            }
            node.raft
                .as_mut()
                .expect("running")
                .advance(ready)
                .expect("memory storage does not fail");
            self.serve_confirmed_reads(id);
            self.maybe_compact(id);
            self.observe(id);
        }
    }

    /// At a crash point of node `id`'s cycle handing out `ready`: crashes the node with the
    /// configured probability (higher when the cycle carries a vote); half of these crashes
    /// reboot the node at the end of the step. Returns whether it crashed.
    fn maybe_crash_at_crash_point(&mut self, id: NodeId, ready: &Ready) -> bool {
        if !self.faults_enabled {
            return false;
        }
        let carries_vote = ready.messages.iter().any(|message| {
            matches!(
                message.body,
                MessageBody::Vote { .. } | MessageBody::VoteResponse { granted: true, .. }
            )
        }) || ready.entries.iter().any(|entry| entry.kind == EntryKind::Noop);
        let crash = if carries_vote {
            self.random(self.options.vote_crash_per_mille)
        } else {
            self.rng.range(0, 1_000_000) < self.options.crash_point_per_million
        };
        if !crash {
            return false;
        }
        self.counts.crash_points += 1;
        self.counts.disruptions += 1;
        if carries_vote {
            self.counts.vote_crashes += 1;
        }
        self.crash(id);
        if self.rng.range(0, 2) == 0 {
            self.reboots.push(id);
        }
        true
    }

    /// Replaces node `id`'s state machine with a snapshot's.
    fn install_snapshot(&mut self, id: NodeId, snapshot: &Snapshot) {
        self.counts.snapshots_installed += 1;
        let node = self.nodes.get_mut(&id).expect("known node");
        node.kv = Kv::restore(&snapshot.data, snapshot.metadata.index);
        // Writes waiting at indexes the snapshot covers either made it or not.
        let covered: Vec<(LogIndex, usize)> = node
            .waiting_writes
            .range(..=snapshot.metadata.index)
            .map(|(index, client)| (*index, *client))
            .collect();
        for (index, client) in covered {
            self.nodes.get_mut(&id).expect("known node").waiting_writes.remove(&index);
            let applied = self.clients[client].as_ref().is_some_and(|pending| {
                self.nodes[&id].kv.applied_operations.contains(&pending.operation_id)
            });
            self.complete_write(client, applied);
        }
    }

    /// Applies a committed entry on node `id`, checking state-machine safety and that write
    /// timestamps increase along the log.
    fn apply(&mut self, id: NodeId, entry: &Entry) {
        match self.committed.get(&entry.index) {
            Some((term, kind)) if *term != entry.term || *kind != entry.kind => {
                self.violation(format!(
                    "state machine safety: node {id} applied {} where {}@{term} was applied",
                    display::entry(entry),
                    entry.index
                ));
            }
            Some(_) => {}
            None => {
                self.committed.insert(entry.index, (entry.term, entry.kind.clone()));
            }
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        if entry.index <= node.kv.applied_index {
            return;
        }
        let floor = node.kv.max_timestamp;
        if let Some(timestamp) = node.kv.apply(entry)
            && timestamp <= floor
        {
            self.violation(format!(
                "timestamp order: node {id} applied {} at timestamp {timestamp}, not above \
                 timestamp {floor} of an earlier entry",
                display::entry(entry)
            ));
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(client) = node.waiting_writes.remove(&entry.index) {
            let ours = self.clients[client].as_ref().is_some_and(|pending| {
                matches!(&entry.kind, EntryKind::Command(data)
                    if data.starts_with(format!("put {} ", pending.operation_id).as_bytes()))
            });
            self.complete_write(client, ours);
        }
    }

    fn maybe_compact(&mut self, id: NodeId) {
        let every = self.options.compact_every;
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(raft) = node.raft.as_mut() else { return };
        let first = raft.storage().first_index();
        if every == 0 || raft.status().applied.0 < first.0 + every {
            return;
        }
        let Ok(metadata) = raft.applied_snapshot_metadata() else { return };
        // Keep a few entries so that slightly lagging followers need no snapshot.
        if metadata.index != node.kv.applied_index {
            return;
        }
        let data = node.kv.snapshot();
        raft.storage_mut().compact(Snapshot { metadata, data });
    }

    /// Returns a running leader, if any (the one of the highest term).
    pub(super) fn current_leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, node)| node.raft.as_ref().map(|raft| (raft, *id)))
            .filter(|(raft, _)| raft.role() == Role::Leader)
            .max_by_key(|(raft, _)| raft.term())
            .map(|(_, id)| id)
    }

    /// Runs one step: deliver, tick, clients, nemesis, reboots, monitors.
    pub fn step_once(&mut self) {
        self.step += 1;
        self.deliver_due();
        if self.step.is_multiple_of(self.options.tick_interval_steps) {
            for id in self.live_nodes() {
                let now = self.interval(id);
                if let Some(raft) = self.raft_mut(id) {
                    raft.tick(now);
                }
                self.process_ready(id);
            }
        }
        self.run_clients();
        if self.faults_enabled && self.random(self.options.fault_per_mille) {
            self.nemesis();
        }
        self.run_scheduled_faults();
        for id in std::mem::take(&mut self.reboots) {
            self.restart(id);
            self.process_ready(id);
        }
        for id in self.live_nodes() {
            self.observe(id);
        }
    }

    /// Returns whether every node runs and has applied the same, fully committed log.
    fn converged(&self) -> bool {
        let Some(leader) = self.current_leader() else { return false };
        let members =
            self.nodes[&leader].raft.as_ref().expect("live").status().configuration.members();
        let mut applied = BTreeSet::new();
        for (id, node) in &self.nodes {
            if !members.contains(id) {
                continue;
            }
            let Some(raft) = node.raft.as_ref() else { return false };
            let status = raft.status();
            if status.commit != status.last_index || node.kv.applied_index != status.commit {
                return false;
            }
            applied.insert(status.commit);
        }
        applied.len() == 1
    }

    /// Runs the simulation, heals everything, lets the cluster converge and checks it. A panic
    /// inside a node (a broken assertion) is reported as a violation after those found before.
    pub fn run(mut self) -> Report {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for _ in 0..self.options.steps {
                self.step_once();
            }
            self.finish();
        }));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            self.violations.push(format!("panic: {message}"));
        }
        self.report()
    }

    /// Heals the network, restarts every node, waits for convergence and runs the final
    /// checks.
    fn finish(&mut self) {
        self.faults_enabled = false;
        self.clients_enabled = false;
        self.blocked.clear();
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.restart(id);
            self.nodes.get_mut(&id).expect("known").offset_ns = 0;
        }
        let mut converged = false;
        for _ in 0..10_000 {
            self.step_once();
            if self.step.is_multiple_of(10) && self.converged() {
                converged = true;
                break;
            }
        }
        if !converged {
            let statuses: Vec<String> = self
                .nodes
                .iter()
                .map(|(id, node)| match node.raft.as_ref() {
                    Some(raft) => {
                        let status = raft.status();
                        format!(
                            "n{id} {:?} t{} leader={:?} last={} commit={} applied={} kv={} first={} {}",
                            status.role,
                            status.term,
                            status.leader,
                            status.last_index,
                            status.commit,
                            status.applied,
                            node.kv.applied_index,
                            raft.first_log_index(),
                            status.configuration
                        )
                    }
                    None => format!("n{id} crashed"),
                })
                .collect();
            self.violations.push(format!(
                "liveness: the healed cluster did not converge within 10 s: {}",
                statuses.join("; ")
            ));
        }
        self.check_log_matching();
        self.check_durability();
        self.check_leases();
        self.check_timestamps();
        self.check_term_growth();
        let history = self.completed_history();
        if let Err(error) = linearizability::check(&history) {
            self.violations.push(format!("linearizability: {error}"));
        }
    }

    /// Returns the operations of the history that did not fail.
    fn completed_history(&self) -> Vec<HistoryEntry> {
        self.history.iter().filter(|(_, failed)| !failed).map(|(entry, _)| entry.clone()).collect()
    }

    /// Returns the report of the run so far.
    fn report(&self) -> Report {
        let history = self.completed_history();
        Report {
            seed: self.options.seed,
            violations: self.violations.clone(),
            completed_operations: history.iter().filter(|entry| entry.completed.is_some()).count(),
            acknowledged_writes: self.acknowledged.len(),
            lease_reads: self.lease_reads.len(),
            elections: self.leaders.len(),
            max_term: self.max_term().0,
            config_changes: self
                .committed
                .values()
                .filter(|(_, kind)| matches!(kind, EntryKind::ConfigChange(_)))
                .count(),
            ..self.counts.clone()
        }
    }

    /// Returns the highest term any node reached (running or persisted).
    pub(super) fn max_term(&self) -> Term {
        self.nodes
            .values()
            .map(|node| match &node.raft {
                Some(raft) => raft.term(),
                None => node.saved.hard_state().term,
            })
            .chain(self.leaders.keys().copied())
            .max()
            .unwrap_or_default()
    }
}

/// Returns whether a node may legitimately keep its term on receiving a message of a higher
/// term: vote requests are refused while it hears from a leader or a lease promise runs
/// (`election.rs`), and pre-votes and granted pre-vote responses carry the term a
/// pre-candidate would campaign in, not one anybody is in. Every other message makes the
/// recipient adopt the term (Raft §5.1).
fn may_ignore_higher_term(body: &MessageBody) -> bool {
    matches!(
        body,
        MessageBody::Vote { .. }
            | MessageBody::PreVote { .. }
            | MessageBody::PreVoteResponse { granted: true, .. }
    )
}
