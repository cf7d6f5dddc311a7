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
//! **Leases** (Spanner §4.1.1). `D` is `lease_duration_ns`, `B` the group's clock bound
//! `max_clock_offset_ns`; `now()` is a node's TrueTime interval `[earliest, latest]`, which
//! contains true time while its clock works within its bound. The rules, each enforced where
//! named:
//!
//! 1. *Promise* (`broadcast_heartbeat`, `on_heartbeat`). A leader's heartbeat round sent at
//!    `[e, l]` (its readings so far, merged: the highest earliest and the highest latest) asks
//!    every follower to promise not to vote for anyone else until `after(l + D)` holds on the
//!    follower's clock; the leader promises the same to itself. It asks only while its clock
//!    is trusted (rule 5) and `l − e ≤ 2B` (rule 4): the merged interval, not only the latest
//!    reading, since `l` may come from an earlier, wider one.
//! 2. *No vote, no candidacy while promised* (`election.rs`: `on_vote_request`,
//!    `start_election`, `refuses_disruption`). A node grants no vote or pre-vote, and does not
//!    campaign, while a promise it gave may run. Its own vote is a vote like any other:
//!    counting it while its promise runs would let it win with a quorum that includes a
//!    promise-holder. Only an election asked for by a transfer (rule 7) lifts this.
//! 3. *Lease* (`confirm_rounds`, `lease_read`, `lease_timestamp`). Once a quorum confirms a
//!    round sent at `[e, l]`, the leader may serve while `now().latest < e + D`. A later
//!    leader needs a vote from someone in that quorum, who grants it only once true time
//!    passed `l + D ≥ e + D`; the old leader serves only while true time is below `e + D`.
//!    So successive leases never overlap in true time.
//! 4. *Restart* (`RawNode::new`). Promises are not persisted. A promise given to a leader
//!    whose uncertainty was at most `B` runs to at most `true time at sending + 2B + D`, and
//!    sending came before the restart; so a restarted node refuses votes until
//!    `after(latest + 2·max(ε, B) + D)` on its new reading. (Without the bound, a node with a
//!    small ε would under-estimate a promise given to a leader with a large one.)
//! 5. *Clock trust* (`set_clock_trusted`). Every rule reads a node's own clock. While the
//!    application does not trust it (its offset from its peers exceeds the bound), the node
//!    holds no lease, asks for no promise, and treats every promise it gave as running: it
//!    neither campaigns nor answers `TimeoutNow`, and votes only for a transfer's candidate
//!    (whose leader gave its lease up, rule 7). Promises it acknowledges
//!    meanwhile bind it once it trusts its clock again. (An offset nobody has detected yet is
//!    outside what TrueTime can promise.)
//! 6. *Timestamps* (`lease_read`, `lease_timestamp`). A leader serves reads and assigns
//!    timestamps only inside its lease: a read at `max(now().latest, highest timestamp served
//!    or assigned)`, a write at a timestamp at least `now().latest` and above every timestamp
//!    served or assigned, above the application's floor (the highest timestamp it applied or
//!    inherited), and below the lease's end, once it has
//!    applied everything committed. With rule 3, each leader's timestamps are below the end
//!    of its lease in true time, and every later leader's are at least its `now().latest`,
//!    past that end: timestamps of successive leaders increase.
//! 7. *Transfer* (thesis §3.10; `transfer_leadership`, `on_timeout_now`). The leader stops
//!    accepting proposals, brings the target up to date, gives up its lease for the rest of
//!    its term and sends `TimeoutNow` with the highest timestamp it served or assigned
//!    (`lease_floor`); the target campaigns at once with `transfer` set, which voters honour
//!    even while they hold a promise, and serves only once `after(lease_floor)`. A transfer
//!    not completed within an election timeout is abandoned; if `TimeoutNow` went out, the
//!    target may still win with those promise-free votes, so the old leader cannot renew its
//!    lease in this term and steps down.
//! 8. *Timing* (`Config::validate`). The shortest election timeout exceeds `D + 2B`, so that
//!    followers' promises have run out by the time they would elect: promises decide safety,
//!    timeouts liveness.
//!
//! The time of the last tick stands in for "now" when sending rounds and checking promises;
//! it is never later than the true one, which makes every such check conservative. Lease
//! reads and timestamps are checked against the caller's `now`.

use crate::node::Role;
use crate::{Error, Interval, LogIndex, MessageBody, NodeId, RawNode, ReadState, Result, Storage};

/// A read a leader may serve from its lease (see [`RawNode::lease_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRead {
    /// The index the state machine must have applied before serving.
    pub index: LogIndex,
    /// The timestamp the read is served at.
    pub timestamp: u64,
}

impl<S: Storage> RawNode<S> {
    /// Starts a heartbeat round: renews the lease (unless given up) and confirms pending reads.
    pub(crate) fn broadcast_heartbeat(&mut self) {
        self.heartbeat_round += 1;
        let round = self.heartbeat_round;
        let asks_promise = self.config.lease_duration_ns > 0
            && !self.lease_relinquished
            && self.clock_trusted
            && self.within_clock_bound(self.now);
        let promise_until = if asks_promise {
            self.round_sent_earliest.insert(round, self.now.earliest);
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
        let quorum_round = self.quorum_configuration().quorum_value(|member| {
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
        // The latest round that asked for promises among those confirmed now.
        if !self.lease_relinquished
            && let Some((_, sent_earliest)) =
                self.round_sent_earliest.range(..=quorum_round).next_back()
        {
            let extension = self.config.unsafe_switches.lease_extension_ns;
            self.lease_end =
                self.lease_end.max(sent_earliest + self.config.lease_duration_ns + extension);
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

    /// Returns whether this leader holds a lease it may serve from at the TrueTime interval
    /// `now` (rules 3, 5 and 7): its clock is trusted and within the bound, the lease has not
    /// ended, a transferred lease's floor has passed, and an entry of its term is committed.
    fn holds_lease(&self, now: Interval) -> bool {
        if self.role != Role::Leader
            || self.lease_relinquished
            || self.lease_end == 0
            || !self.clock_trusted
            || !self.within_clock_bound(now)
        {
            return false;
        }
        let within = now.latest < self.lease_end || self.config.unsafe_switches.serve_expired_lease;
        let floor_passed =
            now.after(self.lease_floor) || self.config.unsafe_switches.ignore_lease_floor;
        within
            && floor_passed
            && self.log.term(self.log.committed).is_ok_and(|term| term == self.term)
    }

    /// Checks whether this leader may serve a read from its lease at the TrueTime interval
    /// `now` (rule 6). Returns the index the state machine must have applied before serving
    /// and the read's timestamp, or `None` if the lease does not allow it (then use
    /// [`RawNode::read_index`], or wait for the lease).
    pub fn lease_read(&mut self, now: Interval) -> Option<LeaseRead> {
        if !self.holds_lease(now) {
            return None;
        }
        let timestamp = now.latest.max(self.max_served_timestamp);
        self.max_served_timestamp = timestamp;
        Some(LeaseRead { index: self.log.committed, timestamp })
    }

    /// Returns a timestamp for a write this leader assigns at the TrueTime interval `now`
    /// (rule 6): at least `now.latest`, above `floor` (the application's highest timestamp
    /// applied or inherited) and above every timestamp this leader served or assigned, and
    /// below the end of its lease. `None` if it holds no lease, has not applied everything
    /// committed yet (the application's floor would be stale), or the timestamp would not fit
    /// in the lease (wait for it to be renewed).
    pub fn lease_timestamp(&mut self, now: Interval, floor: u64) -> Option<u64> {
        if !self.holds_lease(now) || self.log.applied < self.log.committed {
            return None;
        }
        let timestamp = now
            .latest
            .max(floor.saturating_add(1))
            .max(self.max_served_timestamp.saturating_add(1));
        if timestamp >= self.lease_end && !self.config.unsafe_switches.serve_expired_lease {
            return None;
        }
        self.max_served_timestamp = timestamp;
        Some(timestamp)
    }

    /// Records `timestamp` as assigned by this leader although it did not come from
    /// [`RawNode::lease_timestamp`] (a two-phase commit's timestamp, the highest of its
    /// participants' prepare timestamps, may be ahead of this leader's clock): every timestamp
    /// it assigns afterwards is above it, and a transfer's target waits until it passed.
    pub fn record_assigned_timestamp(&mut self, timestamp: u64) {
        self.max_served_timestamp = self.max_served_timestamp.max(timestamp);
    }

    /// Returns the highest timestamp this node served a read at or assigned as leader.
    pub fn max_served_timestamp(&self) -> u64 {
        self.max_served_timestamp
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
        let lease_floor = self.max_served_timestamp;
        self.lease_end = 0;
        self.send(target, self.term, MessageBody::TimeoutNow { lease_floor });
    }

    /// Starts an election at once, at the old leader's request.
    pub(crate) fn on_timeout_now(&mut self, lease_floor: u64) {
        if !self.is_promotable() || !self.clock_trusted {
            return;
        }
        self.lease_floor = self.lease_floor.max(lease_floor);
        self.start_election(true);
    }
}
