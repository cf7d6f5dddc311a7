//! What a leader knows about each follower's log (Raft §5.3, and the flow-control states of
//! the thesis §10.2 / etcd's progress tracker).

use std::collections::VecDeque;

use crate::LogIndex;

/// How the leader replicates to one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// The match point is unknown: one append in flight at a time, backing off on rejection.
    Probe,
    /// The follower is in step: appends are pipelined, up to the in-flight limit.
    Replicate,
    /// A snapshot at the given index is on its way; appends wait for its answer.
    Snapshot(LogIndex),
}

/// The leader's view of one member.
///
/// Invariants:
/// - `match_index < next_index`.
/// - `inflight` holds the last index of each unanswered append, ascending, only in `Replicate`.
#[derive(Clone, Debug)]
pub struct Progress {
    /// The highest index known to match the leader's log.
    pub match_index: LogIndex,
    /// The next index to send.
    pub next_index: LogIndex,
    /// The replication state.
    pub state: ReplicationState,
    /// Last indexes of appends in flight (pipelining).
    pub inflight: VecDeque<LogIndex>,
    /// Whether a probe is unanswered (in `Probe`, one at a time).
    pub probe_sent: bool,
    /// Whether the member was heard from during the current election timeout (check-quorum).
    pub recently_active: bool,
    /// The highest heartbeat round the member has answered.
    pub acked_round: u64,
    /// The match index at the previous heartbeat response; if a lagging member's match index
    /// has not moved between two heartbeat responses, appends were lost and the leader probes.
    pub match_at_last_heartbeat: Option<LogIndex>,
}

impl Progress {
    /// Returns the progress of a member whose log is unknown; the leader's last index is
    /// `last_index`.
    pub fn new(last_index: LogIndex) -> Self {
        Progress {
            match_index: LogIndex(0),
            next_index: last_index.next(),
            state: ReplicationState::Probe,
            inflight: VecDeque::new(),
            probe_sent: false,
            recently_active: false,
            acked_round: 0,
            match_at_last_heartbeat: None,
        }
    }

    /// Switches to probing from `match_index + 1`.
    pub fn become_probe(&mut self) {
        if let ReplicationState::Snapshot(index) = self.state {
            self.next_index = self.match_index.max(index).next();
        } else {
            self.next_index = self.match_index.next();
        }
        self.state = ReplicationState::Probe;
        self.inflight.clear();
        self.probe_sent = false;
        self.match_at_last_heartbeat = None;
    }

    /// Records a successful append up to `index`; returns whether the match index moved.
    pub fn on_success(&mut self, index: LogIndex) -> bool {
        let advanced = index > self.match_index;
        if advanced {
            self.match_index = index;
        }
        self.next_index = self.next_index.max(index.next());
        while self.inflight.front().is_some_and(|last| *last <= index) {
            self.inflight.pop_front();
        }
        self.probe_sent = false;
        match self.state {
            ReplicationState::Probe => self.state = ReplicationState::Replicate,
            ReplicationState::Snapshot(snapshot_index) if self.match_index >= snapshot_index => {
                self.state = ReplicationState::Replicate;
                self.inflight.clear();
            }
            _ => {}
        }
        advanced
    }

    /// Returns whether no more appends may be sent now.
    pub fn is_paused(&self, max_inflight: usize) -> bool {
        match self.state {
            ReplicationState::Probe => self.probe_sent,
            ReplicationState::Replicate => self.inflight.len() >= max_inflight,
            ReplicationState::Snapshot(_) => true,
        }
    }

    /// Records that an append ending at `last` was sent.
    pub fn on_sent(&mut self, last: LogIndex, entry_count: usize) {
        match self.state {
            ReplicationState::Replicate => {
                if entry_count > 0 {
                    self.next_index = last.next();
                    self.inflight.push_back(last);
                }
            }
            ReplicationState::Probe => self.probe_sent = true,
            ReplicationState::Snapshot(_) => {}
        }
    }
}
