//! The simulator's clients: each has at most one operation in flight, a write (proposed, with
//! a timestamp from the leader's lease when it has one) or a read (served from the lease, or
//! through ReadIndex), and gives up on operations older than a second.

use super::cluster::{Cluster, PendingOperation};
use super::kv::put_command;
use super::linearizability::{HistoryEntry, Operation};
use super::monitors::LeaseReadRecord;
use crate::RawNode;

/// Steps after which a client gives up on an operation (its outcome becomes unknown).
const CLIENT_TIMEOUT_STEPS: u64 = 1_000;

impl Cluster {
    /// Lets idle clients start operations and gives up on old ones.
    pub(super) fn run_clients(&mut self) {
        if self.random(self.options.pause_per_mille) {
            self.paused_until = self.step + self.rng.range(100, 401);
        }
        let paused = self.step < self.paused_until;
        for client in 0..self.clients.len() {
            if let Some(pending) = &self.clients[client] {
                if self.step - pending.started_step > CLIENT_TIMEOUT_STEPS {
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
            if paused || !self.clients_enabled || !self.random(self.options.client_per_mille) {
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
        let write = self.random(self.options.write_per_mille);
        let now = self.interval(target);
        let true_time = self.true_time();
        let leases = self.options.lease_duration_ns > 0;
        let node = self.nodes.get_mut(&target).expect("live");
        let raft = node.raft.as_mut().expect("live");
        let term = raft.term();
        let operation = if write {
            Operation::Write(format!("v{operation_id}"))
        } else {
            Operation::Read(None)
        };
        // Reads first try the lease: served at once if the state machine is up to date.
        if !write
            && leases
            && let Some(read) = raft.lease_read(now)
        {
            self.timestamps.push((term, read.timestamp));
            if read.index <= node.kv.applied_index {
                let value = node.kv.data.get(&key).cloned();
                let lease_end = raft.lease_end();
                self.lease_reads.push(LeaseReadRecord { term, true_time, lease_end });
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
        }
        let started = if write {
            // Writes take a timestamp from the lease when the leader holds one (above every
            // timestamp applied here), as the node crate's transactions do.
            let timestamp =
                if leases { raft.lease_timestamp(now, node.kv.max_timestamp) } else { None };
            if let Some(timestamp) = timestamp {
                self.timestamps.push((term, timestamp));
                self.counts.timestamped_writes += 1;
            }
            let command = put_command(operation_id, &key, timestamp);
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

    /// Completes a client's write: acknowledged if `applied`, failed otherwise (the entry at
    /// its index is another one).
    pub(super) fn complete_write(&mut self, client: usize, applied: bool) {
        let Some(pending) = self.clients[client].take() else { return };
        self.event_sequence += 1;
        let (entry, failed) = &mut self.history[pending.history_index];
        if applied {
            entry.completed = Some(self.event_sequence);
            self.acknowledged.push(pending.operation_id);
        } else {
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

    /// Serves the ReadIndex reads of node `id` whose index it has applied.
    pub(super) fn serve_confirmed_reads(&mut self, id: crate::NodeId) {
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
}
