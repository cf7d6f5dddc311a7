//! The simulated cluster: nodes, network, clocks, nemesis, clients and invariant monitors.

use std::collections::{BTreeMap, BTreeSet};

use super::display;
use super::kv::Kv;
use super::linearizability::{self, HistoryEntry, Operation};
use crate::{
    Config, Configuration, Entry, EntryKind, Interval, LogIndex, MemStorage, Message, NodeId,
    RawNode, Role, Snapshot, SplitMix64, Storage, Term, UnsafeSwitches,
};

/// Nanoseconds per simulation step.
const STEP_NS: u64 = 1_000_000;
/// The simulated clock starts here (2026-01-01), so that intervals never underflow.
const EPOCH_NS: u64 = 1_767_225_600_000_000_000;

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
    /// Steps (1 ms of simulated time each) with clients and faults.
    pub steps: u64,
    /// Steps between ticks.
    pub tick_interval_steps: u64,
    /// Raft election timeout in ticks.
    pub election_timeout_ticks: u64,
    /// Raft heartbeat interval in ticks.
    pub heartbeat_interval_ticks: u64,
    /// Lease duration in ns (0: no leases, reads use ReadIndex only).
    pub lease_duration_ns: u64,
    /// Clock uncertainty ε of every node, in ns; offsets stay within it.
    pub epsilon_ns: u64,
    /// The largest message delay, in steps.
    pub max_delay_steps: u64,
    /// Probability (per mille) that a message is dropped.
    pub drop_per_mille: u64,
    /// Probability (per mille) that a message is duplicated.
    pub duplicate_per_mille: u64,
    /// Probability (per mille) per step of a nemesis event.
    pub fault_per_mille: u64,
    /// Number of concurrent clients.
    pub clients: usize,
    /// Number of keys clients use.
    pub keys: usize,
    /// Largest number of operations per key in the history.
    pub max_operations_per_key: usize,
    /// Probability (per mille) per step that an idle client starts an operation.
    pub client_per_mille: u64,
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
            steps: 3_000,
            tick_interval_steps: 10,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            lease_duration_ns: 60 * STEP_NS,
            epsilon_ns: 2 * STEP_NS,
            max_delay_steps: 8,
            drop_per_mille: 20,
            duplicate_per_mille: 20,
            fault_per_mille: 8,
            clients: 4,
            keys: 3,
            max_operations_per_key: 100,
            client_per_mille: 150,
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
    /// Leaders elected.
    pub elections: usize,
    /// Membership change entries committed.
    pub config_changes: usize,
    /// Snapshots installed from a leader.
    pub snapshots_installed: usize,
}

/// One simulated node.
pub(super) struct SimNode {
    /// The running node, or `None` while crashed.
    pub(super) raft: Option<RawNode<MemStorage>>,
    /// The persisted state while crashed.
    saved: MemStorage,
    pub(super) kv: Kv,
    /// The node's clock offset from true time, within ±ε.
    offset_ns: i64,
    /// Writes proposed here: index → client.
    waiting_writes: BTreeMap<LogIndex, usize>,
    /// ReadIndex reads requested here: context → client.
    waiting_reads: BTreeMap<u64, usize>,
    /// Reads confirmed, waiting for their index to be applied.
    confirmed_reads: Vec<(LogIndex, usize)>,
    /// The last term in which this node was seen as leader.
    last_leader_term: Option<Term>,
}

/// An operation a client has in flight.
#[derive(Clone, Debug)]
struct PendingOperation {
    history_index: usize,
    node: NodeId,
    operation_id: u64,
    started_step: u64,
}

/// A simulated Raft group with clients. See the module docs.
pub struct Cluster {
    options: SimOptions,
    rng: SplitMix64,
    step: u64,
    pub(super) nodes: BTreeMap<NodeId, SimNode>,
    /// Messages in flight, keyed by (delivery step, sequence).
    network: BTreeMap<(u64, u64), Message>,
    sequence: u64,
    blocked: BTreeSet<(NodeId, NodeId)>,
    faults_enabled: bool,
    clients_enabled: bool,
    // Monitors.
    leaders: BTreeMap<Term, NodeId>,
    committed: BTreeMap<LogIndex, (Term, EntryKind)>,
    pub(super) violations: Vec<String>,
    // Clients and their history.
    clients: Vec<Option<PendingOperation>>,
    history: Vec<(HistoryEntry, bool)>,
    event_sequence: u64,
    next_operation_id: u64,
    pub(super) acknowledged: Vec<u64>,
    /// Lease reads: (term, true time, the lease's end when it served).
    pub(super) lease_reads: Vec<(Term, u64, u64)>,
    /// Per term: the latest lease end granted, and when the leader gave the lease up.
    pub(super) lease_ends: BTreeMap<Term, (u64, Option<u64>)>,
    operations_per_key: BTreeMap<String, usize>,
    snapshots_installed: usize,
}

impl Cluster {
    /// Returns a cluster of `options.nodes` voters, nothing elected yet.
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
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            violations: Vec::new(),
            clients: vec![None; options.clients],
            history: Vec::new(),
            event_sequence: 0,
            next_operation_id: 1,
            acknowledged: Vec::new(),
            lease_reads: Vec::new(),
            lease_ends: BTreeMap::new(),
            operations_per_key: BTreeMap::new(),
            snapshots_installed: 0,
            options,
        };
        for id in &all {
            let storage = MemStorage::new(Configuration::with_voters(voters.iter().copied()));
            let node = SimNode {
                raft: None,
                saved: storage,
                kv: Kv::default(),
                offset_ns: 0,
                waiting_writes: BTreeMap::new(),
                waiting_reads: BTreeMap::new(),
                confirmed_reads: Vec::new(),
                last_leader_term: None,
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
        config.lease_duration_ns = self.options.lease_duration_ns;
        config.tick_interval_ns = self.options.tick_interval_steps * STEP_NS;
        config.max_clock_offset_ns = self.options.epsilon_ns;
        config.unsafe_switches = self.options.unsafe_switches;
        config.max_append_bytes = self.options.max_append_bytes;
        config.seed = self.options.seed.wrapping_mul(31).wrapping_add(id.0);
        config
    }

    /// Returns true time in ns.
    fn true_time(&self) -> u64 {
        EPOCH_NS + self.step * STEP_NS
    }

    /// Returns node `id`'s TrueTime interval.
    fn interval(&self, id: NodeId) -> Interval {
        let local = self.true_time().saturating_add_signed(self.nodes[&id].offset_ns);
        Interval {
            earliest: local - self.options.epsilon_ns,
            latest: local + self.options.epsilon_ns,
        }
    }

    fn random(&mut self, per_mille: u64) -> bool {
        self.rng.range(0, 1000) < per_mille
    }

    fn live_nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, node)| node.raft.is_some()).map(|(id, _)| *id).collect()
    }

    /// Crashes node `id`: everything not persisted is lost.
    pub fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(raft) = node.raft.take() {
            node.saved = raft.storage().clone();
        }
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

    /// Delivers every message due by now.
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
            if let Some(raft) = self.nodes.get_mut(&to).and_then(|node| node.raft.as_mut()) {
                let _ = raft.step(message);
                self.process_ready(to);
            }
        }
    }

    /// Records the lease node `id` holds as leader, and when it gives it up.
    fn observe_lease(&mut self, id: NodeId) {
        let Some(raft) = self.nodes.get(&id).and_then(|node| node.raft.as_ref()) else { return };
        if raft.role() != Role::Leader {
            return;
        }
        let true_time = self.true_time();
        let lease = self.lease_ends.entry(raft.term()).or_default();
        lease.0 = lease.0.max(raft.lease_end());
        if raft.lease_relinquished() && lease.1.is_none() {
            lease.1 = Some(true_time);
        }
    }

    /// Runs the `Ready` cycle of node `id`: persist, send, apply, serve reads, compact.
    fn process_ready(&mut self, id: NodeId) {
        self.observe_lease(id);
        for _ in 0..8 {
            let Some(raft) = self.nodes.get_mut(&id).and_then(|node| node.raft.as_mut()) else {
                return;
            };
            if !raft.has_ready() {
                break;
            }
            let ready = raft.ready().expect("memory storage does not fail");
            if let Some(snapshot) = &ready.snapshot {
                raft.storage_mut().apply_snapshot(snapshot.clone());
                self.install_snapshot(id, snapshot);
            }
            let node = self.nodes.get_mut(&id).expect("known node");
            let raft = node.raft.as_mut().expect("running");
            raft.storage_mut().append(&ready.entries);
            if let Some(hard_state) = ready.hard_state {
                raft.storage_mut().set_hard_state(hard_state);
            }
            for message in &ready.messages {
                self.send(message.clone());
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
        }
    }

    /// Replaces node `id`'s state machine with a snapshot's.
    fn install_snapshot(&mut self, id: NodeId, snapshot: &Snapshot) {
        self.snapshots_installed += 1;
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

    /// Applies a committed entry on node `id`, checking state-machine safety.
    fn apply(&mut self, id: NodeId, entry: &Entry) {
        match self.committed.get(&entry.index) {
            Some((term, kind)) if *term != entry.term || *kind != entry.kind => {
                self.violations.push(format!(
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
        node.kv.apply(entry);
        if let Some(client) = node.waiting_writes.remove(&entry.index) {
            let ours = self.clients[client].as_ref().is_some_and(|pending| {
                matches!(&entry.kind, EntryKind::Command(data)
                    if data.starts_with(format!("put {} ", pending.operation_id).as_bytes()))
            });
            self.complete_write(client, ours);
        }
    }

    fn complete_write(&mut self, client: usize, applied: bool) {
        let Some(pending) = self.clients[client].take() else { return };
        self.event_sequence += 1;
        let (entry, failed) = &mut self.history[pending.history_index];
        if applied {
            entry.completed = Some(self.event_sequence);
            self.acknowledged.push(pending.operation_id);
        } else {
            // The entry at its index is another: the write was never committed.
            *failed = true;
        }
    }

    fn complete_read(&mut self, client: usize, value: Option<String>) {
        let Some(pending) = self.clients[client].take() else { return };
        self.event_sequence += 1;
        let (entry, _) = &mut self.history[pending.history_index];
        entry.operation = Operation::Read(value);
        entry.completed = Some(self.event_sequence);
    }

    fn serve_confirmed_reads(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let applied = node.kv.applied_index;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            node.confirmed_reads.drain(..).partition(|(index, _)| *index <= applied);
        node.confirmed_reads = waiting;
        for (_, client) in ready {
            let key = self.history_key(client);
            let value = self.nodes[&id].kv.data.get(&key).cloned();
            self.complete_read(client, value);
        }
    }

    fn history_key(&self, client: usize) -> String {
        self.clients[client]
            .as_ref()
            .map_or_else(String::new, |pending| self.history[pending.history_index].0.key.clone())
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

    /// Lets idle clients start operations and gives up on old ones.
    fn run_clients(&mut self) {
        for client in 0..self.clients.len() {
            if let Some(pending) = &self.clients[client] {
                if self.step - pending.started_step > 1_000 {
                    // Unknown outcome: a write may still take effect; a read tells nothing.
                    let pending = self.clients[client].take().expect("checked");
                    if let Some(node) = self.nodes.get_mut(&pending.node) {
                        node.waiting_writes.retain(|_, waiting| *waiting != client);
                        node.waiting_reads.retain(|_, waiting| *waiting != client);
                        node.confirmed_reads.retain(|(_, waiting)| *waiting != client);
                    }
                    if matches!(self.history[pending.history_index].0.operation, Operation::Read(_))
                    {
                        self.history[pending.history_index].1 = true;
                    }
                }
                continue;
            }
            if !self.clients_enabled || !self.random(self.options.client_per_mille) {
                continue;
            }
            self.start_operation(client);
        }
    }

    fn start_operation(&mut self, client: usize) {
        let key = format!("k{}", self.rng.range(0, self.options.keys as u64));
        if self.operations_per_key.get(&key).copied().unwrap_or(0)
            >= self.options.max_operations_per_key
        {
            return;
        }
        let live = self.live_nodes();
        if live.is_empty() {
            return;
        }
        // Clients go to a random node, and follow its leader hint if it has one.
        let mut target = live[self.rng.range(0, live.len() as u64) as usize];
        if let Some(leader) = self.nodes[&target].raft.as_ref().and_then(RawNode::leader)
            && live.contains(&leader)
        {
            target = leader;
        }
        let operation_id = self.next_operation_id;
        self.next_operation_id += 1;
        let write = self.rng.range(0, 2) == 0;
        let now = self.interval(target);
        let true_time = self.true_time();
        let node = self.nodes.get_mut(&target).expect("live");
        let raft = node.raft.as_mut().expect("live");
        let operation = if write {
            Operation::Write(format!("v{operation_id}"))
        } else {
            Operation::Read(None)
        };
        // Reads first try the lease: served at once if the state machine is up to date.
        if !write
            && self.options.lease_duration_ns > 0
            && let Some(read) = raft.lease_read(now)
            && read.index <= node.kv.applied_index
        {
            let value = node.kv.data.get(&key).cloned();
            let term = raft.term();
            let lease_end = raft.lease_end();
            self.lease_reads.push((term, true_time, lease_end));
            self.event_sequence += 1;
            let invoked = self.event_sequence;
            self.event_sequence += 1;
            let entry = HistoryEntry {
                key: key.clone(),
                operation: Operation::Read(value),
                invoked,
                completed: Some(self.event_sequence),
            };
            self.history.push((entry, false));
            *self.operations_per_key.entry(key).or_default() += 1;
            return;
        }
        let started = if write {
            let command = format!("put {operation_id} {key} v{operation_id}").into_bytes();
            raft.propose(command).map(|index| {
                node.waiting_writes.insert(index, client);
            })
        } else {
            raft.read_index(operation_id).map(|()| {
                node.waiting_reads.insert(operation_id, client);
            })
        };
        if started.is_err() {
            return;
        }
        self.event_sequence += 1;
        let entry = HistoryEntry {
            key: key.clone(),
            operation,
            invoked: self.event_sequence,
            completed: None,
        };
        self.history.push((entry, false));
        *self.operations_per_key.entry(key).or_default() += 1;
        self.clients[client] = Some(PendingOperation {
            history_index: self.history.len() - 1,
            node: target,
            operation_id,
            started_step: self.step,
        });
        self.process_ready(target);
    }

    /// Injects a random fault.
    fn nemesis(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let events = if self.options.reconfigure { 8 } else { 6 };
        match self.rng.range(0, events) {
            0 | 1 => {
                // Partition: a random non-empty proper subset, both ways or one way.
                let side: Vec<NodeId> =
                    ids.iter().copied().filter(|_| self.rng.range(0, 2) == 0).collect();
                if side.is_empty() || side.len() == ids.len() {
                    return;
                }
                let one_way = self.rng.range(0, 3) == 0;
                for a in &side {
                    for b in ids.iter().filter(|id| !side.contains(id)) {
                        self.blocked.insert((*a, *b));
                        if !one_way {
                            self.blocked.insert((*b, *a));
                        }
                    }
                }
            }
            2 => self.blocked.clear(),
            3 => {
                let live = self.live_nodes();
                // Keep a majority running most of the time, but not always.
                if !live.is_empty() && (live.len() * 2 > ids.len() + 1 || self.rng.range(0, 4) == 0)
                {
                    // Leaders are the interesting victims: half the crashes hit one.
                    let leader = live.iter().copied().find(|id| {
                        self.nodes[id].raft.as_ref().is_some_and(|raft| raft.role() == Role::Leader)
                    });
                    let victim = match leader {
                        Some(leader) if self.rng.range(0, 2) == 0 => leader,
                        _ => live[self.rng.range(0, live.len() as u64) as usize],
                    };
                    self.crash(victim);
                }
            }
            4 => {
                let crashed: Vec<NodeId> =
                    ids.iter().copied().filter(|id| self.nodes[id].raft.is_none()).collect();
                if !crashed.is_empty() {
                    let id = crashed[self.rng.range(0, crashed.len() as u64) as usize];
                    self.restart(id);
                }
            }
            6 => self.change_membership(),
            7 => {
                if let Some(leader) = self.current_leader() {
                    let target = ids[self.rng.range(0, ids.len() as u64) as usize];
                    let raft = self
                        .nodes
                        .get_mut(&leader)
                        .and_then(|node| node.raft.as_mut())
                        .expect("live leader");
                    let _ = raft.transfer_leadership(target);
                    self.process_ready(leader);
                }
            }
            _ => {
                let id = ids[self.rng.range(0, ids.len() as u64) as usize];
                let epsilon = self.options.epsilon_ns as i64;
                let offset = self.rng.range(0, 2 * epsilon as u64 + 1) as i64 - epsilon;
                self.nodes.get_mut(&id).expect("known").offset_ns = offset;
            }
        }
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

    /// Asks the leader to move to a random configuration of at least three voters, with some
    /// of the other nodes as learners.
    fn change_membership(&mut self) {
        let Some(leader) = self.current_leader() else { return };
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut voters = BTreeSet::new();
        while voters.len() < 3.min(ids.len())
            || (voters.len() < ids.len() && self.rng.range(0, 3) == 0)
        {
            voters.insert(ids[self.rng.range(0, ids.len() as u64) as usize]);
        }
        let raft =
            self.nodes.get_mut(&leader).and_then(|node| node.raft.as_mut()).expect("live leader");
        let current = raft.status().configuration;
        // Voters cannot become learners in one step; the rest may join as learners.
        let learners: BTreeSet<NodeId> = ids
            .iter()
            .copied()
            .filter(|id| !voters.contains(id) && !current.voters.contains(id))
            .filter(|_| self.rng.range(0, 2) == 0)
            .collect();
        let _ = raft.propose_config_change(voters, learners);
        self.process_ready(leader);
    }

    /// Checks invariants that hold at every step.
    fn monitor(&mut self) {
        for (id, node) in &mut self.nodes {
            let Some(raft) = node.raft.as_ref() else { continue };
            if raft.role() != Role::Leader {
                continue;
            }
            let term = raft.term();
            match self.leaders.get(&term) {
                Some(leader) if leader != id => self.violations.push(format!(
                    "election safety: nodes {leader} and {id} are both leaders in term {term}"
                )),
                Some(_) => {}
                None => {
                    self.leaders.insert(term, *id);
                }
            }
            if node.last_leader_term != Some(term) {
                node.last_leader_term = Some(term);
                let first = raft.first_log_index();
                for (index, (committed_term, _)) in self.committed.range(first..) {
                    if raft.log_term(*index) != Some(*committed_term) {
                        self.violations.push(format!(
                            "leader completeness: leader {id} of term {term} lacks committed entry {index}@{committed_term}"
                        ));
                        break;
                    }
                }
            }
        }
    }

    /// Runs one step: deliver, tick, clients, nemesis, monitors.
    pub fn step_once(&mut self) {
        self.step += 1;
        self.deliver_due();
        if self.step.is_multiple_of(self.options.tick_interval_steps) {
            for id in self.live_nodes() {
                let now = self.interval(id);
                if let Some(raft) = self.nodes.get_mut(&id).and_then(|node| node.raft.as_mut()) {
                    raft.tick(now);
                }
                self.process_ready(id);
            }
        }
        self.run_clients();
        if self.faults_enabled && self.random(self.options.fault_per_mille) {
            self.nemesis();
        }
        self.monitor();
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
            && self
                .nodes
                .values()
                .any(|node| node.raft.as_ref().is_some_and(|raft| raft.role() == Role::Leader))
    }

    /// Runs the simulation, heals everything, lets the cluster converge and checks it.
    pub fn run(mut self) -> Report {
        let seed = self.options.seed;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            for _ in 0..self.options.steps {
                self.step_once();
            }
            self.finish()
        }));
        match outcome {
            Ok(report) => report,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                    .unwrap_or_default();
                Report { seed, violations: vec![format!("panic: {message}")], ..Report::default() }
            }
        }
    }

    fn finish(mut self) -> Report {
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
        let history: Vec<HistoryEntry> = self
            .history
            .iter()
            .filter(|(_, failed)| !failed)
            .map(|(entry, _)| entry.clone())
            .collect();
        if let Err(error) = linearizability::check(&history) {
            self.violations.push(format!("linearizability: {error}"));
        }
        Report {
            seed: self.options.seed,
            violations: self.violations,
            completed_operations: history.iter().filter(|entry| entry.completed.is_some()).count(),
            acknowledged_writes: self.acknowledged.len(),
            lease_reads: self.lease_reads.len(),
            elections: self.leaders.len(),
            config_changes: self
                .committed
                .values()
                .filter(|(_, kind)| matches!(kind, EntryKind::ConfigChange(_)))
                .count(),
            snapshots_installed: self.snapshots_installed,
        }
    }
}
