//! Raft throughput: proposals committed per second by a 3-node group in one thread, with
//! messages delivered instantly (zero network delay), for batches of 1 and 64 proposals.
//! Everything runs on one core, so time per proposal is CPU per proposal (for all three nodes
//! together). Run with `cargo bench -p meridian-raft`; results are in `bench/README.md`.

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meridian_raft::{
    Config, Configuration, Interval, LogIndex, MemStorage, Message, NodeId, RawNode, Snapshot,
    Storage,
};

/// Compact a node's log when it holds more entries than this.
const MAX_LOG_ENTRIES: u64 = 10_000;

struct Group {
    nodes: Vec<RawNode<MemStorage>>,
    queue: VecDeque<Message>,
}

impl Group {
    fn new() -> Self {
        let voters = Configuration::with_voters([NodeId(1), NodeId(2), NodeId(3)]);
        let now = Interval { earliest: 1, latest: 2 };
        let nodes = (1..=3)
            .map(|id| {
                RawNode::new(Config::new(NodeId(id)), MemStorage::new(voters.clone()), now).unwrap()
            })
            .collect();
        let mut group = Group { nodes, queue: VecDeque::new() };
        group.nodes[0].campaign();
        group.run_until(|group| group.nodes[0].status().commit >= LogIndex(1));
        group
    }

    /// Persists, sends and applies every node's ready state, and delivers messages, until
    /// `done` holds.
    fn run_until(&mut self, done: impl Fn(&Group) -> bool) {
        while !done(self) {
            for node in &mut self.nodes {
                while node.has_ready() {
                    let ready = node.ready().unwrap();
                    if let Some(snapshot) = &ready.snapshot {
                        node.storage_mut().apply_snapshot(snapshot.clone());
                    }
                    node.storage_mut().append(&ready.entries);
                    if let Some(hard_state) = ready.hard_state {
                        node.storage_mut().set_hard_state(hard_state);
                    }
                    self.queue.extend(ready.messages.iter().cloned());
                    black_box(&ready.committed_entries);
                    node.advance(ready).unwrap();
                }
                let status = node.status();
                if status.applied.0 > node.storage().first_index().0 + MAX_LOG_ENTRIES {
                    let metadata = node.applied_snapshot_metadata().unwrap();
                    node.storage_mut().compact(Snapshot { metadata, data: Vec::new() });
                }
            }
            while let Some(message) = self.queue.pop_front() {
                let to = message.to.0 as usize - 1;
                self.nodes[to].step(message).unwrap();
            }
        }
    }

    /// Proposes `batch` commands at the leader and runs until every node applied them.
    fn commit_batch(&mut self, batch: usize) {
        let mut last = LogIndex(0);
        for _ in 0..batch {
            last = self.nodes[0].propose(vec![0u8; 64]).unwrap();
        }
        self.run_until(|group| group.nodes.iter().all(|node| node.status().applied >= last));
    }
}

fn proposals(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_3_nodes_commit");
    for batch in [1usize, 64] {
        let mut raft = Group::new();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("batch_{batch}"), |b| b.iter(|| raft.commit_batch(batch)));
    }
    group.finish();
}

criterion_group!(benches, proposals);
criterion_main!(benches);
