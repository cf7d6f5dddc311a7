//! The checks the simulator makes while it runs, on what it sees from outside the nodes: the
//! messages they send, their roles and terms after every `Ready` cycle, and true time.
//!
//! - *Message durability*: whatever a message promises is persisted when it leaves its sender
//!   (after the persist step of the cycle): its sender's term (for messages of the sender's
//!   term), a granted vote (the persisted vote is the candidate), a vote request (the persisted
//!   vote is the candidate itself), an append acknowledgement (the persisted log reaches the
//!   acknowledged index), unless the persisted term has moved past the message's.
//! - *Election safety* and *leader completeness* each time a node is seen as leader, and the
//!   true time at which each term's first leader was seen.
//! - *Term inflation*: a node's term never exceeds by more than one the highest term of any
//!   message delivered to it. With pre-vote, a node becomes a candidate only after a quorum
//!   granted its pre-vote in that term (so it heard of it), or in a transfer, one term above
//!   the leader's `TimeoutNow`: a partitioned node cannot inflate its term.
//! - *Promises kept*: a node grants no vote or pre-vote, and asks for none for itself, at a
//!   true time at or before the end of a lease promise it accepted from a leader's heartbeat —
//!   in this incarnation or an earlier one (rules 2 and 4 of `reads.rs`) — unless the vote is
//!   part of a leadership transfer. On its own clock a node may vote once `after(promise)`,
//!   which implies true time is past the promise, and a restarted node keeps the promises it
//!   may have forgotten; so correct nodes never break this.
//! - *Lease bound*: a leader's lease never ends later than `D` after the true time at which
//!   the latest promise-asking heartbeat round confirmed by a quorum (as counted from the
//!   responses delivered to it) left the leader. The round's `earliest` is at most the true
//!   time of sending, so the leader's own bound `earliest + D` is within this one.

use std::collections::BTreeMap;

use super::cluster::Cluster;
use super::display;
use crate::{Message, MessageBody, NodeId, Role, Storage, Term};

/// The most violations a run records; the first ones tell the story.
const MAX_VIOLATIONS: usize = 50;

/// What the simulator saw of one leader's heartbeat rounds in one term.
#[derive(Clone, Debug, Default)]
pub(super) struct LeaderRounds {
    /// Round → (true time its heartbeats left the leader, whether it asked for promises).
    pub(super) sent: BTreeMap<u64, (u64, bool)>,
    /// The highest round each member's delivered responses acknowledged.
    pub(super) acked: BTreeMap<NodeId, u64>,
    /// The latest end the lease may have: `D` after the send time of the latest
    /// promise-asking round a quorum confirmed so far.
    pub(super) lease_bound: u64,
}

/// A lease read served to a client.
#[derive(Clone, Copy, Debug)]
pub(super) struct LeaseReadRecord {
    /// The leader's term.
    pub(super) term: Term,
    /// True time when it was served.
    pub(super) true_time: u64,
    /// The end of the lease as the leader reported it.
    pub(super) lease_end: u64,
}

impl Cluster {
    /// Records a violated invariant (up to `MAX_VIOLATIONS`).
    pub(super) fn violation(&mut self, text: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(text);
        }
    }

    /// Checks node `id` after an input or a `Ready` cycle: its term against what it heard,
    /// and, if it leads, election safety, leader completeness, its lease and joint phases.
    pub(super) fn observe(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get(&id) else { return };
        let Some(raft) = node.raft.as_ref() else { return };
        let (term, heard, role) = (raft.term(), node.heard_term, raft.role());
        if term.0 > heard.0 + 1 {
            self.violation(format!(
                "term inflation: node {id} reached term {term} having heard of term {heard} at \
                 most (pre-vote lets a node campaign only in a term a quorum granted)"
            ));
        }
        self.observe_commit(id);
        if role == Role::Leader {
            self.observe_leader(id);
        }
    }

    /// Checks the commit rule of Raft §5.4.2 on node `id`: while it leads a term, its commit
    /// index moves onto an entry of an earlier term only if some node was already seen
    /// committed at or past it with the same entry (a vote response can tell a leader so);
    /// otherwise the leader counted replicas of an old entry. Records the node's commit point.
    fn observe_commit(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let raft = node.raft.as_ref().expect("running");
        let (term, leads, commit) = (raft.term(), raft.role() == Role::Leader, raft.commit_index());
        let (previous_term, previous_leads, previous_commit) = node.observed_commit;
        node.observed_commit = (term, leads, commit);
        if commit <= previous_commit && (term, leads) == (previous_term, previous_leads) {
            return;
        }
        let Some(commit_term) = raft.log_term(commit) else { return };
        let advanced_as_leader =
            leads && previous_leads && previous_term == term && commit > previous_commit;
        if advanced_as_leader && commit_term != term {
            let known = self.commit_points.range(commit..).any(|(index, terms)| {
                terms.iter().any(|known_term| raft.log_term(*index) == Some(*known_term))
            });
            if !known {
                let text = format!(
                    "commit rule: leader {id} of term {term} committed {commit}@{commit_term}, \
                     an entry of an earlier term no node knew committed (Raft §5.4.2)"
                );
                self.violation(text);
            }
        }
        self.commit_points.entry(commit).or_default().insert(commit_term);
    }

    /// Checks leader `id`: one leader per term, a new leader holds every committed entry, its
    /// lease ends within the bound of its confirmed rounds; records when the term's leader was
    /// elected and when a joint phase began.
    fn observe_leader(&mut self, id: NodeId) {
        let true_time = self.true_time();
        let node = self.nodes.get_mut(&id).expect("known node");
        let raft = node.raft.as_ref().expect("running");
        let term = raft.term();
        match self.leaders.get(&term) {
            Some(leader) if *leader != id => {
                let text = format!(
                    "election safety: nodes {leader} and {id} are both leaders in term {term}"
                );
                self.violation(text);
            }
            Some(_) => {}
            None => {
                self.leaders.insert(term, id);
                self.elected_at.insert(term, true_time);
                self.maybe_schedule_leader_crash(id, term);
            }
        }
        let node = self.nodes.get_mut(&id).expect("known node");
        let raft = node.raft.as_ref().expect("running");
        if node.last_leader_term != Some(term) {
            node.last_leader_term = Some(term);
            let first = raft.first_log_index();
            let missing = self
                .committed
                .range(first..)
                .find(|(index, (committed_term, _))| {
                    raft.log_term(**index) != Some(*committed_term)
                })
                .map(|(index, (committed_term, _))| (*index, *committed_term));
            if let Some((index, committed_term)) = missing {
                self.violation(format!(
                    "leader completeness: leader {id} of term {term} lacks committed entry \
                     {index}@{committed_term}"
                ));
            }
        }
        self.observe_lease(id);
        let raft = self.nodes[&id].raft.as_ref().expect("running");
        let configuration = raft.configuration();
        if configuration.is_joint()
            && self.last_joint.as_ref().is_none_or(|(leader, joint_term, joint)| {
                (*leader, *joint_term, joint) != (id, term, configuration)
            })
        {
            let configuration = configuration.clone();
            self.last_joint = Some((id, term, configuration.clone()));
            self.maybe_partition_joint_phase(&configuration);
        }
    }

    /// Records the lease leader `id` holds and when it gives it up, and checks the lease's
    /// end against the true send time of the latest promise-asking round a quorum confirmed.
    fn observe_lease(&mut self, id: NodeId) {
        let duration = self.options.lease_duration_ns;
        if duration == 0 {
            return;
        }
        let true_time = self.true_time();
        let raft = self.nodes[&id].raft.as_ref().expect("running");
        let term = raft.term();
        let lease_end = raft.lease_end();
        let lease = self.lease_ends.entry(term).or_default();
        lease.0 = lease.0.max(lease_end);
        if raft.lease_relinquished() && lease.1.is_none() {
            lease.1 = Some(true_time);
        }
        let rounds = self.rounds.entry((id, term)).or_default();
        let confirmed = raft.configuration().quorum_value(|member| {
            if member == id { u64::MAX } else { rounds.acked.get(&member).copied().unwrap_or(0) }
        });
        if let Some((_, (sent_at, _))) =
            rounds.sent.range(..=confirmed).rev().find(|(_, (_, promised))| *promised)
        {
            rounds.lease_bound = rounds.lease_bound.max(sent_at + duration);
        }
        let bound = rounds.lease_bound;
        if lease_end > bound {
            self.violation(format!(
                "lease bound: leader {id} of term {term} holds a lease to {lease_end}, past {bound}: \
                 the latest confirmed round's true send time plus the lease duration"
            ));
        }
    }

    /// Checks that a vote, pre-vote or candidacy `message` of node `id` breaks no lease promise
    /// the node accepted (see the module docs).
    fn check_promise_kept(&mut self, id: NodeId, message: &Message) {
        let node = &self.nodes[&id];
        let voting = match message.body {
            MessageBody::PreVote { .. } | MessageBody::Vote { transfer: false, .. } => true,
            MessageBody::PreVoteResponse { granted: true, .. } => true,
            MessageBody::VoteResponse { granted: true, .. } => {
                !node.transfer_requests.contains(&(message.term, message.to))
            }
            _ => false,
        };
        let true_time = self.true_time();
        if voting && true_time <= node.promised_until {
            let promised_until = node.promised_until;
            self.violation(format!(
                "promise kept: node {id} sent {} at true time {true_time}, within the lease it \
                 promised until {promised_until}",
                display::message(message)
            ));
        }
    }

    /// Checks a message as it leaves node `id` (after the persist step of its cycle) and
    /// records heartbeat rounds.
    pub(super) fn on_message_sent(&mut self, id: NodeId, message: &Message) {
        let true_time = self.true_time();
        let raft = self.nodes[&id].raft.as_ref().expect("running");
        let persisted = raft.storage().hard_state();
        let moved_on = persisted.term > message.term;
        let covered = match message.body {
            // These carry the term a pre-candidate would campaign in; nothing is promised.
            MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { granted: true, .. } => {
                true
            }
            MessageBody::Vote { .. } => {
                moved_on || (persisted.term == message.term && persisted.vote == Some(message.from))
            }
            MessageBody::VoteResponse { granted: true, .. } => {
                moved_on || (persisted.term == message.term && persisted.vote == Some(message.to))
            }
            MessageBody::AppendResponse { index, reject: None } => {
                moved_on || (persisted.term == message.term && raft.storage().last_index() >= index)
            }
            _ => persisted.term >= message.term,
        };
        if !covered {
            let vote = persisted.vote.map_or("none".to_string(), |vote| vote.to_string());
            let last_index = raft.storage().last_index();
            self.violation(format!(
                "message durability: node {id} sent {} while its persisted state was term {}, \
                 vote {vote}, last index {last_index}",
                display::message(message),
                persisted.term
            ));
        }
        self.check_promise_kept(id, message);
        if let MessageBody::Heartbeat { round, promise_until, .. } = message.body {
            let rounds = self.rounds.entry((id, message.term)).or_default();
            rounds.sent.entry(round).or_insert((true_time, promise_until > 0));
        }
    }
}
