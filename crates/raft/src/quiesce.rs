//! Quiescence: an idle group stops ticking, so that a node can host thousands of groups
//! without thousands of heartbeats and timers.
//!
//! A leader whose log is fully committed, applied and replicated to every member, with no
//! read, transfer or membership change pending, may [`RawNode::quiesce`]: it sends each member
//! a `Quiesce` message carrying its commit index and stops acting on ticks. A follower that is
//! caught up to that index (its log ends there and it has committed it) goes quiet as well;
//! one that is not keeps ticking and, if it times out, wakes the leader with its pre-vote.
//!
//! Any message from a member other than `Quiesce` and `HeartbeatResponse`, a proposal, a
//! read, a leadership transfer or a campaign wakes a node ([`RawNode::wake`]); so does the
//! application when it suspects the leader is gone (a quiesced follower cannot notice by
//! itself). Messages of non-members do not: a removed node that never learned of its removal
//! keeps campaigning, and must not keep the group awake.
//!
//! Safety does not depend on quiescence: a node that does not tick only refrains from acting.
//! A quiesced leader's lease runs out on its own; its next read or write renews it with a
//! heartbeat round.

use crate::node::Role;
use crate::{LogIndex, MessageBody, RawNode, Storage};

impl<S: Storage> RawNode<S> {
    /// Quiesces an idle leader (see the module docs). Returns whether it did; a node that is
    /// not an idle leader is left as it is.
    pub fn quiesce(&mut self) -> bool {
        if self.quiesced {
            return true;
        }
        let last = self.log.last_index();
        let idle = self.role == Role::Leader
            && self.transfer.is_none()
            && self.pending_reads.is_empty()
            && !self.config_change_pending()
            && self.log.committed == last
            && self.log.applied == last
            && self.log.term(last).is_ok_and(|term| term == self.term)
            && self.progress.values().all(|progress| progress.match_index == last);
        if !idle {
            return false;
        }
        let members: Vec<_> = self.progress.keys().copied().filter(|id| *id != self.id).collect();
        for member in members {
            self.send(member, self.term, MessageBody::Quiesce { commit: last });
        }
        self.quiesced = true;
        true
    }

    /// Follower side of `Quiesce`: goes quiet if caught up to the leader's commit index.
    pub(crate) fn on_quiesce(&mut self, commit: LogIndex) {
        if commit <= self.log.last_index() {
            self.log.commit_to(commit);
        }
        if self.log.last_index() == commit && self.log.committed == commit {
            self.quiesced = true;
        }
    }

    /// Wakes a quiesced node: it acts on ticks again, with a fresh election timeout.
    pub fn wake(&mut self) {
        if self.quiesced {
            self.quiesced = false;
            self.election_elapsed = 0;
        }
    }

    /// Whether the node is quiesced.
    pub fn is_quiesced(&self) -> bool {
        self.quiesced
    }

    /// Tells a follower that its leader is probably gone (the application lost its connection
    /// to the leader's node). It wakes if quiesced, forgets the leader and so no longer counts
    /// as having heard from it recently: it grants other followers' pre-votes and votes (its
    /// lease promise still binds it, `reads.rs` rule 2). With `campaign_first`, it also
    /// campaigns as soon as its promise allows, with a margin of twice the clock bound so that
    /// the others' promises have run out on their clocks too; the others keep their election
    /// timeouts, so
    /// that followers which learn of the loss at the same moment do not split their votes.
    /// The application picks one follower to go first (the node picks the lowest surviving
    /// voter). A leader is left as it is.
    pub fn suspect_leader(&mut self, now: crate::Interval, campaign_first: bool) {
        if self.role == Role::Leader {
            return;
        }
        self.observe_time(now);
        self.quiesced = false;
        self.leader = None;
        if campaign_first {
            self.election_elapsed = self.election_elapsed.max(self.randomized_election_timeout);
            // The other followers hold the same promise, read on clocks up to 2B apart: going
            // first only once it has run out on every clock keeps their pre-votes from being
            // refused (extending one's own promise is always safe).
            if self.promise_until > 0 {
                self.promise_until += 2 * self.config.max_clock_offset_ns;
            }
        }
    }
}
