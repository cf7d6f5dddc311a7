//! Heartbeat rounds, ReadIndex, leader leases and leadership transfer.
//!
//! **Rounds.** Every heartbeat a leader broadcasts belongs to a numbered round; followers echo
//! the round. When a quorum has answered round `r` (the leader counting itself), everything the
//! leader knew when it sent `r` is confirmed: it was still leader then.
//!
//! **ReadIndex** (thesis §6.4). A read request records the commit index (at least the index of
//! the leader's no-op, so that entries of earlier terms are included) and the next round. Once
//! a quorum confirms that round, the read is released as a [`ReadState`]; the application
//! serves it after applying up to its index.
//!
//! **Leases.** A round sent at TrueTime `[e, l]` asks each follower to promise not to vote for
//! anyone else until `after(l + D)` holds on its own clock (`D` = `lease_duration_ns`); the
//! leader promises the same to itself. When a quorum confirms the round, the leader may serve
//! while `now().latest < e + D`. Any later leader needs a vote from someone in that quorum, and
//! that voter grants it only when true time exceeds `l + D ≥ e + D`; the old leader serves only
//! while true time is below `e + D`. So successive leases never overlap in true time, and since
//! a leader assigns timestamps only within its lease, timestamps of successive leaders of a
//! range increase (Spanner §4.1.1, disjointness). A restarted node re-creates the promise it
//! may have lost (see [`RawNode::new`]). The time of the last tick stands in for "now" when
//! sending rounds and checking promises; that time is never later than the true one, which
//! makes every such check conservative. Lease reads are checked against the caller's `now`.
//!
//! **Transfer** (thesis §3.10). The leader stops accepting proposals, brings the target up to
//! date, gives up its lease for the rest of its term and sends `TimeoutNow` with the highest
//! `now().latest` at which it served (`lease_floor`); the target campaigns at once with
//! `transfer` set, which voters honour even while they hold a promise, and does not serve
//! until `after(lease_floor)`.

use crate::node::Role;
use crate::{Error, Interval, LogIndex, MessageBody, NodeId, RawNode, ReadState, Result, Storage};

impl<S: Storage> RawNode<S> {
    /// Starts a heartbeat round: renews the lease (unless given up) and confirms pending reads.
    pub(crate) fn broadcast_heartbeat(&mut self) {
        self.heartbeat_round += 1;
        let round = self.heartbeat_round;
        self.round_sent_earliest.insert(round, self.now.earliest);
        let promise_until = if self.config.lease_duration_ns > 0 && !self.lease_relinquished {
            let promise = self.now.latest + self.config.lease_duration_ns;
            self.promise_until = self.promise_until.max(promise);
            promise
        } else {
            0
        };
        let members: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, progress)| (*id, progress.match_index))
            .collect();
        for (member, match_index) in members {
            let commit = self.log.committed.min(match_index);
            self.send(member, self.term, MessageBody::Heartbeat { commit, round, promise_until });
        }
        self.confirm_rounds();
    }

    /// Follower side of a heartbeat.
    pub(crate) fn on_heartbeat(
        &mut self,
        from: NodeId,
        commit: LogIndex,
        round: u64,
        promise_until: u64,
    ) {
        if commit <= self.log.last_index() {
            self.log.commit_to(commit);
        }
        self.promise_until = self.promise_until.max(promise_until);
        self.send(from, self.term, MessageBody::HeartbeatResponse { round });
    }

    /// Leader side of a heartbeat response.
    pub(crate) fn on_heartbeat_response(&mut self, from: NodeId, round: u64) {
        let Some(progress) = self.progress.get_mut(&from) else { return };
        progress.recently_active = true;
        progress.acked_round = progress.acked_round.max(round);
        // A follower that is behind and made no progress between two heartbeat responses lost
        // an append, a probe or a snapshot: probe again.
        let behind = progress.match_index < self.log.last_index();
        let stalled = progress.match_at_last_heartbeat == Some(progress.match_index);
        progress.match_at_last_heartbeat = Some(progress.match_index);
        if behind {
            if stalled {
                match progress.state {
                    // Retry the lost probe where it was.
                    crate::ReplicationState::Probe => progress.probe_sent = false,
                    _ => progress.become_probe(),
                }
            }
            self.send_append(from, true);
        }
        self.confirm_rounds();
    }

    /// Advances the confirmed round to what a quorum answered; renews the lease and releases
    /// reads accordingly.
    pub(crate) fn confirm_rounds(&mut self) {
        let current = self.heartbeat_round;
        let id = self.id;
        let quorum_round = self.configuration.quorum_value(|member| {
            if member == id {
                current
            } else {
                self.progress.get(&member).map_or(0, |progress| progress.acked_round)
            }
        });
        if quorum_round <= self.confirmed_round || quorum_round == u64::MAX {
            return;
        }
        self.confirmed_round = quorum_round;
        if self.config.lease_duration_ns > 0
            && !self.lease_relinquished
            && let Some(sent_earliest) = self.round_sent_earliest.get(&quorum_round)
        {
            self.lease_end = self.lease_end.max(sent_earliest + self.config.lease_duration_ns);
        }
        self.round_sent_earliest.retain(|round, _| *round > quorum_round);
        self.resolve_pending_reads();
    }

    /// Releases every pending read whose round is confirmed and whose index is committed in
    /// the leader's term.
    pub(crate) fn resolve_pending_reads(&mut self) {
        let term_committed = self.log.term(self.log.committed).is_ok_and(|term| term == self.term);
        if !term_committed {
            return;
        }
        while let Some(&(context, index, round)) = self.pending_reads.front() {
            if round > self.confirmed_round {
                break;
            }
            self.pending_reads.pop_front();
            self.read_states.push(ReadState { context, index });
        }
    }

    /// Requests a linearizable read (ReadIndex, thesis §6.4). The read is released in a later
    /// [`crate::Ready::read_states`] with the given `context`.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] if this node is not the leader.
    pub fn read_index(&mut self, context: u64) -> Result<()> {
        self.wake();
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.leader });
        }
        // At least the first index of this term: the no-op, which carries earlier terms along.
        let term_start = self.log.last_index_of_term(self.term).map_or(LogIndex(0), |last| {
            let mut index = last;
            while index > self.log.first_index()
                && self.log.term(index.prev()).is_ok_and(|term| term == self.term)
            {
                index = index.prev();
            }
            index
        });
        let index = self.log.committed.max(term_start);
        self.pending_reads.push_back((context, index, self.heartbeat_round + 1));
        self.heartbeat_elapsed = 0;
        self.broadcast_heartbeat();
        Ok(())
    }

    /// Checks whether this leader may serve a read (or assign a timestamp) from its lease at
    /// the TrueTime interval `now`. Returns the index the state machine must have applied
    /// before serving, or `None` if the lease does not allow it (then use
    /// [`RawNode::read_index`]).
    pub fn lease_read(&mut self, now: Interval) -> Option<LogIndex> {
        if self.role != Role::Leader || self.lease_relinquished || self.lease_end == 0 {
            return None;
        }
        let within = now.latest < self.lease_end || self.config.unsafe_switches.serve_expired_lease;
        if !within || !now.after(self.lease_floor) {
            return None;
        }
        if !self.log.term(self.log.committed).is_ok_and(|term| term == self.term) {
            return None;
        }
        self.max_served_latest = self.max_served_latest.max(now.latest);
        Some(self.log.committed)
    }

    /// Returns the end of the current lease (TrueTime nanoseconds), zero if none.
    pub fn lease_end(&self) -> u64 {
        if self.role == Role::Leader && !self.lease_relinquished { self.lease_end } else { 0 }
    }

    /// Returns whether this leader gave up its lease for the rest of its term (it started a
    /// leadership transfer).
    pub fn lease_relinquished(&self) -> bool {
        self.role == Role::Leader && self.lease_relinquished
    }

    /// Hands leadership to `target` (thesis §3.10): no proposals are accepted meanwhile; the
    /// transfer is abandoned after an election timeout.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] on a non-leader; [`Error::InvalidRequest`] if `target` is this node
    /// or not a voter.
    pub fn transfer_leadership(&mut self, target: NodeId) -> Result<()> {
        self.wake();
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.leader });
        }
        if target == self.id || !self.configuration.is_voter(target) {
            return Err(Error::InvalidRequest(format!(
                "node {target} cannot take over leadership"
            )));
        }
        self.transfer = Some((target, 0));
        let caught_up = self
            .progress
            .get(&target)
            .is_some_and(|progress| progress.match_index == self.log.last_index());
        if caught_up {
            self.send_timeout_now(target);
        } else {
            self.send_append(target, true);
        }
        Ok(())
    }

    /// Gives up the lease and tells `target` to campaign.
    pub(crate) fn send_timeout_now(&mut self, target: NodeId) {
        self.lease_relinquished = true;
        let lease_floor = self.max_served_latest;
        self.lease_end = 0;
        self.send(target, self.term, MessageBody::TimeoutNow { lease_floor });
    }

    /// Starts an election at once, at the old leader's request.
    pub(crate) fn on_timeout_now(&mut self, lease_floor: u64) {
        if !self.is_promotable() {
            return;
        }
        self.lease_floor = self.lease_floor.max(lease_floor);
        self.start_election(true);
    }
}
