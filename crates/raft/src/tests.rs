//! Unit tests of the lease and election rules of `reads.rs`, on a small hand-driven group: each
//! drives a group into the corner a rule is about and asserts what the rule demands.

use std::collections::BTreeMap;

use crate::{
    Config, Configuration, Interval, MemStorage, Message, MessageBody, NodeId, RawNode, Role,
};

const EPOCH_NS: u64 = 1_767_225_600_000_000_000;
const TICK_NS: u64 = 10_000_000;
const MS: u64 = 1_000_000;

/// A group of nodes with hand-delivered messages and per-node clock uncertainty (true time is
/// shared; each node reads `true ± ε`).
struct Group {
    nodes: BTreeMap<NodeId, RawNode<MemStorage>>,
    configs: BTreeMap<NodeId, Config>,
    epsilon: BTreeMap<NodeId, u64>,
    queue: Vec<Message>,
    time_ns: u64,
}

impl Group {
    /// Three voters with leases of `lease_ms`, 10-tick elections of 10 ms ticks, a 2 ms clock
    /// bound, pre-vote off and check-quorum as given.
    fn new(lease_ms: u64, check_quorum: bool) -> Group {
        let mut group = Group {
            nodes: BTreeMap::new(),
            configs: BTreeMap::new(),
            epsilon: BTreeMap::new(),
            queue: Vec::new(),
            time_ns: 0,
        };
        for id in (1..=3).map(NodeId) {
            let mut config = Config::new(id);
            config.pre_vote = false;
            config.check_quorum = check_quorum;
            config.lease_duration_ns = lease_ms * MS;
            config.tick_interval_ns = TICK_NS;
            config.max_clock_offset_ns = 2 * MS;
            group.epsilon.insert(id, 2 * MS);
            group.configs.insert(id, config.clone());
            let storage = MemStorage::new(Configuration::with_voters((1..=3).map(NodeId)));
            let node = RawNode::new(config, storage, group.now(id)).expect("valid config");
            group.nodes.insert(id, node);
        }
        group
    }

    fn now(&self, id: NodeId) -> Interval {
        let epsilon = self.epsilon[&id];
        let true_time = EPOCH_NS + self.time_ns;
        Interval { earliest: true_time - epsilon, latest: true_time + epsilon }
    }

    fn node(&mut self, id: u64) -> &mut RawNode<MemStorage> {
        self.nodes.get_mut(&NodeId(id)).expect("running node")
    }

    /// Persists, queues the messages of and applies every node's `Ready`.
    fn process(&mut self) {
        for node in self.nodes.values_mut() {
            while node.has_ready() {
                let ready = node.ready().expect("memory storage");
                if let Some(snapshot) = &ready.snapshot {
                    node.storage_mut().apply_snapshot(snapshot.clone());
                }
                node.storage_mut().append(&ready.entries);
                if let Some(hard_state) = ready.hard_state {
                    node.storage_mut().set_hard_state(hard_state);
                }
                self.queue.extend(ready.messages.iter().cloned());
                node.advance(ready).expect("memory storage");
            }
        }
    }

    /// Delivers queued messages that `pass` lets through (dropping the others) until none is
    /// left.
    fn deliver(&mut self, pass: impl Fn(&Message) -> bool) {
        for _ in 0..100 {
            self.process();
            if self.queue.is_empty() {
                return;
            }
            for message in std::mem::take(&mut self.queue) {
                if pass(&message)
                    && let Some(node) = self.nodes.get_mut(&message.to)
                {
                    node.step(message).expect("valid message");
                }
            }
        }
        panic!("messages kept flowing");
    }

    /// Advances time by one tick and ticks the given nodes.
    fn tick(&mut self, ids: &[u64]) {
        self.time_ns += TICK_NS;
        for id in ids {
            let now = self.now(NodeId(*id));
            self.node(*id).tick(now);
        }
    }

    /// Elects node `id` (after the restart promises of new nodes ran out) and lets it obtain
    /// its lease.
    fn elect(&mut self, id: u64) {
        for _ in 0..7 {
            self.tick(&[1, 2, 3]);
        }
        self.node(id).campaign();
        self.deliver(|_| true);
        assert_eq!(self.node(id).role(), Role::Leader);
    }

    fn crash_and_restart(&mut self, id: u64) {
        let node = self.nodes.remove(&NodeId(id)).expect("running node");
        let storage = node.storage().clone();
        let now = self.now(NodeId(id));
        let config = self.configs[&NodeId(id)].clone();
        self.nodes.insert(NodeId(id), RawNode::new(config, storage, now).expect("valid config"));
    }
}

/// Rule 7: a leader whose `TimeoutNow` was lost gave its lease up for the term; it must not
/// keep leading without one (every write would wait for a lease that never comes). It steps
/// down once the transfer is abandoned, and the group elects a leader that holds a lease.
#[test]
fn a_leader_whose_timeout_now_was_lost_steps_down() {
    let mut group = Group::new(50, true);
    group.elect(1);
    group.node(1).transfer_leadership(NodeId(2)).expect("node 2 is a voter");
    group.deliver(|message| !matches!(message.body, MessageBody::TimeoutNow { .. }));
    for _ in 0..10 {
        group.tick(&[1, 2, 3]);
        group.deliver(|_| true);
    }
    assert_eq!(group.node(1).role(), Role::Follower, "node 1 kept leading after the transfer");
    // A new leader with a lease within a few election timeouts.
    let mut leased = false;
    for _ in 0..60 {
        group.tick(&[1, 2, 3]);
        group.deliver(|_| true);
        let ids: Vec<u64> = (1..=3).collect();
        for id in ids {
            let now = group.now(NodeId(id));
            leased |= group.node(id).lease_read(now).is_some();
        }
        if leased {
            break;
        }
    }
    assert!(leased, "no leader with a lease after the abandoned transfer");
}

/// Rule 2: a node's own vote is bound by its promise like any other; it does not campaign
/// while the lease it promised may run.
#[test]
fn a_node_does_not_campaign_while_its_promise_runs() {
    let mut group = Group::new(50, false);
    group.elect(1);
    group.tick(&[1]);
    group.deliver(|_| true);
    let term = group.node(2).term();
    // Node 1 is cut off; 20 ms later node 2's promise (about 50 ms) still runs.
    group.tick(&[2, 3]);
    group.tick(&[2, 3]);
    group.node(2).campaign();
    group.deliver(|message| message.from != NodeId(1) && message.to != NodeId(1));
    assert_eq!(group.node(2).role(), Role::Follower);
    assert_eq!(group.node(2).term(), term, "node 2 voted for itself while promised");
    // Once the promise has run out it may.
    for _ in 0..6 {
        group.tick(&[2, 3]);
    }
    group.node(2).campaign();
    group.deliver(|message| message.from != NodeId(1) && message.to != NodeId(1));
    assert_eq!(group.node(2).role(), Role::Leader);
}

/// Rule 4: a restarted node keeps every promise it may have given, even to a leader whose
/// clock uncertainty (up to the group's bound) is wider than its own.
#[test]
fn a_restart_keeps_promises_given_to_a_leader_with_a_wider_uncertainty() {
    let mut group = Group::new(50, false);
    group.elect(1);
    group.tick(&[1]);
    group.deliver(|_| true);
    // Node 1's promise from node 2 runs to node 1's latest + 50 ms = true time + 52 ms. Node 2
    // restarts with an exact clock.
    group.epsilon.insert(NodeId(2), 0);
    group.crash_and_restart(2);
    // 51 ms later node 2 must still keep the promise: it neither campaigns nor votes.
    group.time_ns += 51 * MS;
    let now = group.now(NodeId(2));
    group.node(2).tick(now);
    group.node(2).campaign();
    group.deliver(|message| message.from != NodeId(1) && message.to != NodeId(1));
    assert_eq!(group.node(2).role(), Role::Follower, "node 2 forgot the promise it gave");
}

/// Rule 4's premise: a promise asked for at `[e, l]` runs to at most `true time + 2B + D`. The
/// leader's `now` merges its readings, so after a reading wider than the bound its `l` stays
/// ahead even once the readings are narrow again: it asks for no promise until the merged
/// interval is within the bound.
#[test]
fn promises_are_asked_only_while_the_merged_reading_is_within_the_bound() {
    let mut group = Group::new(50, false);
    group.elect(1);
    let heartbeat_promises = |group: &mut Group| -> Vec<u64> {
        group.process();
        let promises = group
            .queue
            .iter()
            .filter_map(|message| match message.body {
                MessageBody::Heartbeat { promise_until, .. } => Some(promise_until),
                _ => None,
            })
            .collect();
        group.deliver(|_| true);
        promises
    };
    // One reading 30 ms wide (beyond the 2 ms bound), then narrow ones again.
    group.epsilon.insert(NodeId(1), 30 * MS);
    group.tick(&[1]);
    heartbeat_promises(&mut group);
    group.epsilon.insert(NodeId(1), 2 * MS);
    for _ in 0..2 {
        group.tick(&[1]);
        let limit = EPOCH_NS + group.time_ns + 2 * 2 * MS + 50 * MS;
        for promise in heartbeat_promises(&mut group) {
            assert!(
                promise <= limit,
                "promise until {promise} asked beyond true time + 2B + D ({limit})"
            );
        }
    }
    // Once true time has passed the wide reading's latest, promises are asked again (heartbeats
    // go every other tick).
    let mut later = Vec::new();
    for _ in 0..4 {
        group.tick(&[1]);
        later.extend(heartbeat_promises(&mut group));
    }
    assert!(later.iter().any(|promise| *promise > 0), "no promise asked again: {later:?}");
}

/// Rule 5: a node whose clock is not trusted neither campaigns nor votes nor holds a lease.
#[test]
fn a_node_with_an_untrusted_clock_neither_votes_campaigns_nor_leases() {
    let mut group = Group::new(50, false);
    group.elect(1);
    let now = group.now(NodeId(1));
    assert!(group.node(1).lease_read(now).is_some());
    group.node(1).set_clock_trusted(false);
    assert!(group.node(1).lease_read(now).is_none(), "a leader with a bad clock served");
    assert!(group.node(1).lease_timestamp(now, 0).is_none());
    // Its heartbeats ask for no promise.
    group.tick(&[1]);
    group.tick(&[1]);
    group.process();
    let promises: Vec<u64> = group
        .queue
        .iter()
        .filter_map(|message| match message.body {
            MessageBody::Heartbeat { promise_until, .. } => Some(promise_until),
            _ => None,
        })
        .collect();
    assert!(!promises.is_empty() && promises.iter().all(|promise| *promise == 0));
    group.deliver(|_| true);
    // Long after every promise ran out, a follower with a bad clock still refuses to vote
    // and to campaign, while the other follower campaigns (on its timeout, and once more).
    group.node(3).set_clock_trusted(false);
    for _ in 0..40 {
        group.tick(&[2, 3]);
        group.deliver(|message| message.from != NodeId(1) && message.to != NodeId(1));
        assert_eq!(group.node(3).role(), Role::Follower);
    }
    group.node(2).campaign();
    group.deliver(|message| message.from != NodeId(1) && message.to != NodeId(1));
    assert_ne!(group.node(2).role(), Role::Leader, "node 3 voted with an untrusted clock");
}

/// Rule 6: timestamps come from inside the lease, above the application's floor and above
/// everything served or assigned; a read is served at no less than the last write.
#[test]
fn timestamps_stay_inside_the_lease_and_above_every_floor() {
    let mut group = Group::new(50, false);
    group.elect(1);
    let now = group.now(NodeId(1));
    let first = group.node(1).lease_timestamp(now, 0).expect("a lease");
    assert!(first >= now.latest);
    let second = group.node(1).lease_timestamp(now, 0).expect("a lease");
    assert!(second > first, "the same timestamp twice");
    let floor = now.latest + 10 * MS;
    let above_floor = group.node(1).lease_timestamp(now, floor).expect("a lease");
    assert!(above_floor > floor);
    let read = group.node(1).lease_read(now).expect("a lease");
    assert!(read.timestamp >= above_floor, "a read below a write already assigned");
    // A floor past the lease's end gets no timestamp: the write must wait for a renewal.
    let past_the_lease = now.latest + 60 * MS;
    assert!(group.node(1).lease_timestamp(now, past_the_lease).is_none());
    // Nor does a leader with committed entries it has not applied yet.
    group.node(1).propose(b"x".to_vec()).expect("leader");
    group.process();
    for message in std::mem::take(&mut group.queue) {
        let to = message.to;
        group.node(to.0).step(message).expect("valid message");
    }
    group.process();
    for message in std::mem::take(&mut group.queue) {
        if message.to == NodeId(1) {
            group.node(1).step(message).expect("valid message");
        }
    }
    assert!(group.node(1).commit_index() > group.node(1).applied_index());
    assert!(group.node(1).lease_timestamp(now, 0).is_none(), "a timestamp before applying");
    group.process();
    assert!(group.node(1).lease_timestamp(now, 0).is_some());
}

/// A quiesced group whose leader vanished elects another at once when the followers suspect it
/// and one of them goes first (without the suspicion they would not tick at all, and once woken
/// would refuse each other's pre-votes for a whole timeout, believing the leader alive).
#[test]
fn followers_that_suspect_their_leader_replace_it_at_once() {
    let mut group = Group::new(50, true);
    group.elect(1);
    for _ in 0..3 {
        group.tick(&[1, 2, 3]);
        group.deliver(|_| true);
    }
    assert!(group.node(1).quiesce(), "an idle leader quiesces");
    group.deliver(|_| true);
    assert!(group.node(2).is_quiesced() && group.node(3).is_quiesced());
    // Long after the lease ended, node 1 dies. Like the node's driver, nothing ticks the
    // quiesced followers meanwhile.
    for _ in 0..20 {
        group.tick(&[1]);
    }
    group.nodes.remove(&NodeId(1));
    let (now2, now3) = (group.now(NodeId(2)), group.now(NodeId(3)));
    group.node(2).suspect_leader(now2, true);
    group.node(3).suspect_leader(now3, false);
    // Node 2 goes first, before node 3 has ticked since it woke: node 3 must not judge node
    // 2's pre-vote by the time it last saw before quiescing.
    group.tick(&[2]);
    group.deliver(|_| true);
    let mut ticks = 0;
    while ![2, 3].iter().any(|id| group.node(*id).role() == Role::Leader) {
        ticks += 1;
        assert!(ticks <= 2, "no new leader at the first ticks");
        group.tick(&[2, 3]);
        group.deliver(|_| true);
    }
    assert_eq!(group.node(2).role(), Role::Leader);
}

/// While the leader's lease promise runs, a follower that suspects the leader still waits for
/// it to run out, then campaigns at once, without waiting for a whole election timeout.
#[test]
fn a_suspecting_follower_campaigns_as_soon_as_its_promise_ends() {
    let mut group = Group::new(50, false);
    group.elect(1);
    group.tick(&[1]);
    group.deliver(|_| true);
    group.nodes.remove(&NodeId(1));
    let (now2, now3) = (group.now(NodeId(2)), group.now(NodeId(3)));
    group.node(2).suspect_leader(now2, true);
    group.node(3).suspect_leader(now3, false);
    // The promise (about 52 ms) holds node 2 back for five ticks of 10 ms, not the ten of an
    // election timeout.
    for tick in 1..=8 {
        group.tick(&[2, 3]);
        group.deliver(|_| true);
        let leads = group.node(2).role() == Role::Leader;
        assert!(!leads || tick >= 5, "node 2 led within its promise, at tick {tick}");
        if leads {
            return;
        }
    }
    panic!("node 2 did not campaign once its promise ran out");
}
