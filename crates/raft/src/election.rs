//! Leader election (Raft §5.2, §5.4.1) with pre-vote (thesis §9.6), leader stickiness for
//! check-quorum (thesis §6.2 / §4.2.3) and lease promises.
//!
//! A node refuses to vote, and ignores vote requests of higher terms, while either
//! - it heard from a leader within the minimum election timeout (so a partitioned node that
//!   rejoins cannot depose a healthy leader), or
//! - a lease promise it gave may still be running: `after(promise_until)` is false on its
//!   clock, or its clock is not trusted (then it cannot tell).
//!
//! Both are lifted for an election that a leader started by transferring leadership
//! (`Vote { transfer: true }`): that leader stopped serving before it asked. The same
//! promise binds a node's vote for itself: it does not campaign while its own promise may run
//! (`reads.rs`, rule 2).

use std::collections::BTreeSet;

use crate::node::Role;
use crate::{CommitPoint, EntryKind, Message, MessageBody, NodeId, RawNode, Storage, Term};

impl<S: Storage> RawNode<S> {
    /// Starts an election now, as if the election timeout had elapsed (used to bootstrap a
    /// group quickly and by tests). Does nothing on a node that does not vote.
    pub fn campaign(&mut self) {
        self.wake();
        if self.role != Role::Leader {
            self.election_elapsed = 0;
            self.start_election(false);
        }
    }

    /// Forgets the lease promise [`RawNode::new`] assumes a restarted node may have given.
    /// Only for a group member created just now with a fresh log (a range split off another):
    /// it never ran before, so it promised nothing, and it may vote and campaign at once.
    pub fn forget_restart_promise(&mut self) {
        if self.term.0 <= 1 && self.vote.is_none() && self.leader.is_none() {
            self.promise_until = 0;
        }
    }

    /// Starts an election: a pre-vote round first if enabled (and not a transfer), otherwise a
    /// real one. A node whose own lease promise may still run does not campaign: voting for
    /// itself would break that promise as much as voting for anyone else (a transfer lifts
    /// promises, since the leader they were given to asked for the election).
    pub(crate) fn start_election(&mut self, transfer: bool) {
        if !self.is_promotable() || (!transfer && self.promise_running()) {
            return;
        }
        if self.config.pre_vote && !transfer {
            self.become_pre_candidate();
        } else {
            self.become_candidate(transfer);
        }
    }

    fn become_pre_candidate(&mut self) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timeout();
        self.request_votes(true, false);
    }

    fn become_candidate(&mut self, transfer: bool) {
        self.term = Term(self.term.0 + 1);
        self.vote = Some(self.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timeout();
        self.request_votes(false, transfer);
    }

    /// Votes for itself and asks every other voter; wins at once if it is the only voter.
    fn request_votes(&mut self, pre_vote: bool, transfer: bool) {
        self.votes.insert(self.id, true);
        if self.tally_votes() {
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let term = if pre_vote { Term(self.term.0 + 1) } else { self.term };
        let id = self.id;
        let voters: BTreeSet<NodeId> =
            self.configuration.voters.union(&self.configuration.outgoing_voters).copied().collect();
        for voter in voters.into_iter().filter(|voter| *voter != id) {
            let body = if pre_vote {
                MessageBody::PreVote { last_index, last_term }
            } else {
                MessageBody::Vote { last_index, last_term, transfer }
            };
            self.send(voter, term, body);
        }
    }

    /// Decides a message of a higher term (Raft §5.1): returns whether to process it after
    /// moving to that term, or to drop it.
    pub(crate) fn accept_higher_term(&mut self, message: &Message) -> bool {
        match message.body {
            MessageBody::PreVote { .. } | MessageBody::Vote { .. } => {
                let transfer = matches!(message.body, MessageBody::Vote { transfer: true, .. });
                if !transfer && self.refuses_disruption() {
                    return false;
                }
                // A pre-vote never changes terms; it is answered below.
                if matches!(message.body, MessageBody::PreVote { .. }) {
                    return true;
                }
                self.become_follower(message.term, None);
                true
            }
            // Granted pre-votes carry the term the pre-candidate would campaign in.
            MessageBody::PreVoteResponse { granted: true, .. } => true,
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                self.become_follower(message.term, Some(message.from));
                true
            }
            _ => {
                self.become_follower(message.term, None);
                true
            }
        }
    }

    /// Returns whether this node must not help depose its leader now: it heard from one
    /// recently, or its lease promise is still running.
    fn refuses_disruption(&self) -> bool {
        let recent_leader = self.leader.is_some()
            && self.config.check_quorum
            && self.election_elapsed < self.config.election_timeout_ticks;
        recent_leader || self.promise_running()
    }

    /// Returns whether a lease promise this node gave may still be running: it has not
    /// certainly expired on this node's clock, or that clock is not trusted.
    pub(crate) fn promise_running(&self) -> bool {
        !self.clock_trusted || (self.promise_until > 0 && !self.now.after(self.promise_until))
    }

    /// Answers a `PreVote` or `Vote` of the current term (or, for a pre-vote, a higher one).
    pub(crate) fn on_vote_request(&mut self, message: &Message) {
        let (last_index, last_term, pre_vote, transfer) = match message.body {
            MessageBody::PreVote { last_index, last_term } => (last_index, last_term, true, false),
            MessageBody::Vote { last_index, last_term, transfer } => {
                (last_index, last_term, false, transfer)
            }
            _ => return,
        };
        let free_to_vote = self.vote == Some(message.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && message.term > self.term);
        let up_to_date = self.config.unsafe_switches.vote_without_log_check
            || self.log.is_up_to_date(last_index, last_term);
        let lease_allows = transfer || !self.promise_running();
        let granted = free_to_vote && up_to_date && lease_allows;
        if pre_vote {
            let term = if granted { message.term } else { self.term };
            let commit = self.commit_point();
            self.send(message.from, term, MessageBody::PreVoteResponse { granted, commit });
        } else {
            if granted {
                self.vote = Some(message.from);
                self.election_elapsed = 0;
            }
            let commit = self.commit_point();
            self.send(message.from, self.term, MessageBody::VoteResponse { granted, commit });
        }
    }

    /// Returns this node's commit index with the term of its entry there.
    pub(crate) fn commit_point(&self) -> CommitPoint {
        let index = self.log.committed;
        CommitPoint { index, term: self.log.term(index).unwrap_or_default() }
    }

    /// Learns that `commit` is committed if this log holds the same entry there.
    pub(crate) fn learn_commit(&mut self, commit: CommitPoint) {
        if commit.index > self.log.committed && self.log.matches(commit.index, commit.term) {
            self.log.commit_to(commit.index);
        }
    }

    /// Counts a vote response.
    pub(crate) fn on_vote_response(&mut self, from: NodeId, body: &MessageBody, granted: bool) {
        let expected = match body {
            MessageBody::PreVoteResponse { .. } => Role::PreCandidate,
            _ => Role::Candidate,
        };
        if self.role != expected {
            return;
        }
        self.votes.insert(from, granted);
        self.tally_votes();
    }

    /// Acts on the votes so far: wins, loses or waits. Returns whether the election ended.
    fn tally_votes(&mut self) -> bool {
        let granted: BTreeSet<NodeId> =
            self.votes.iter().filter(|(_, granted)| **granted).map(|(id, _)| *id).collect();
        let rejected: BTreeSet<NodeId> =
            self.votes.iter().filter(|(_, granted)| !**granted).map(|(id, _)| *id).collect();
        let quorum_configuration = self.quorum_configuration();
        let won = quorum_configuration.has_quorum(&granted);
        let lost = quorum_configuration.has_quorum(&rejected);
        drop(quorum_configuration);
        if won {
            match self.role {
                Role::PreCandidate => self.become_candidate(false),
                Role::Candidate => self.become_leader(),
                _ => {}
            }
            return true;
        }
        if lost {
            let term = self.term;
            self.become_follower(term, None);
            return true;
        }
        false
    }

    /// Takes leadership: resets progress, appends the no-op that commits earlier terms' entries
    /// (Raft §5.4.2, §8) and starts a heartbeat round to establish the lease.
    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.reset_leader_state();
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        let last_index = self.log.last_index();
        for member in self.configuration.members() {
            let mut progress = crate::progress::Progress::new(last_index);
            if member == self.id {
                progress.match_index = self.log.persisted_index();
                progress.recently_active = true;
            }
            self.progress.insert(member, progress);
        }
        let noop_index = self.append_entry(EntryKind::Noop);
        // No configuration change until the no-op (and everything before it) is applied.
        self.pending_config_index = noop_index;
        self.broadcast_heartbeat();
    }
}
