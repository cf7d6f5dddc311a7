//! The data Raft exchanges and persists: identifiers, log entries, configurations, snapshots
//! and messages.

use std::collections::BTreeSet;
use std::fmt;

/// Identifies a node (a replica of the group). Never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

/// A Raft term: a logical clock that increases with every election (Raft §5.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

/// The position of an entry in the log; the first entry has index 1, and 0 means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogIndex(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl LogIndex {
    /// Returns the next index.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }

    /// Returns the previous index, saturating at zero.
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

/// A TrueTime interval in nanoseconds since the Unix epoch: true time lies within
/// `[earliest, latest]`. Raft keeps its own copy of the type so that it depends on nothing else
/// of Meridian; the node converts from the clock crate's interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interval {
    /// The earliest true time could be.
    pub earliest: u64,
    /// The latest true time could be.
    pub latest: u64,
}

impl Interval {
    /// Returns whether `t` has certainly passed.
    pub fn after(&self, t: u64) -> bool {
        t < self.earliest
    }

    /// Returns whether `t` has certainly not arrived.
    pub fn before(&self, t: u64) -> bool {
        t > self.latest
    }
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// The empty entry a new leader appends to commit entries of earlier terms (Raft §5.4.2, §8).
    Noop,
    /// An application command, opaque to Raft.
    Command(Vec<u8>),
    /// A membership change (see [`ConfigChange`]).
    ConfigChange(ConfigChange),
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's position.
    pub index: LogIndex,
    /// The term of the leader that created it.
    pub term: Term,
    /// The payload.
    pub kind: EntryKind,
}

impl Entry {
    /// Returns an approximate size in bytes, for flow control.
    pub fn size_bytes(&self) -> usize {
        24 + match &self.kind {
            EntryKind::Noop => 0,
            EntryKind::Command(data) => data.len(),
            EntryKind::ConfigChange(change) => 8 * change.node_count(),
        }
    }
}

/// The membership of a group: voters, the outgoing voters while a joint configuration is in
/// effect, and learners.
///
/// Invariants:
/// - A node is a voter (incoming or outgoing) or a learner, never both.
/// - `outgoing_voters` is empty unless the group is in a joint configuration (Raft §6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    /// The voters of the (incoming) configuration.
    pub voters: BTreeSet<NodeId>,
    /// The voters of the outgoing configuration during joint consensus; empty otherwise.
    pub outgoing_voters: BTreeSet<NodeId>,
    /// Non-voting members that receive the log (catch-up replicas).
    pub learners: BTreeSet<NodeId>,
}

impl Configuration {
    /// Returns a configuration of voters only.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Configuration { voters: voters.into_iter().collect(), ..Default::default() }
    }

    /// Returns the configuration in effect once `change` is applied to this one: entering a
    /// new voter set makes the configuration joint (unless the voters stay the same), leaving
    /// drops the outgoing voters.
    pub fn after(&self, change: &ConfigChange) -> Configuration {
        match change {
            ConfigChange::Enter { voters, learners } => Configuration {
                voters: voters.clone(),
                outgoing_voters: if *voters == self.voters {
                    BTreeSet::new()
                } else {
                    self.voters.clone()
                },
                learners: learners.clone(),
            },
            ConfigChange::Leave => Configuration {
                voters: self.voters.clone(),
                outgoing_voters: BTreeSet::new(),
                learners: self.learners.clone(),
            },
        }
    }

    /// Returns whether the configuration is joint.
    pub fn is_joint(&self) -> bool {
        !self.outgoing_voters.is_empty()
    }

    /// Returns whether `id` votes in either half of the configuration.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.outgoing_voters.contains(&id)
    }

    /// Returns every member: voters of both halves and learners, in ascending order.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.voters.iter().chain(&self.outgoing_voters).chain(&self.learners).copied().collect()
    }

    /// Returns whether `granted` holds a majority of every voter set in effect (both halves of a
    /// joint configuration).
    pub fn has_quorum(&self, granted: &BTreeSet<NodeId>) -> bool {
        let majority = |voters: &BTreeSet<NodeId>| {
            voters.is_empty() || voters.intersection(granted).count() > voters.len() / 2
        };
        majority(&self.voters) && majority(&self.outgoing_voters)
    }

    /// Returns the largest value that a quorum of voters has reached, given each node's value
    /// (for example its match index): the commit rule of Raft §5.3 generalised to joint
    /// configurations (§6), where both halves must agree.
    pub fn quorum_value(&self, value_of: impl Fn(NodeId) -> u64) -> u64 {
        let quorum_of = |voters: &BTreeSet<NodeId>| -> u64 {
            if voters.is_empty() {
                return u64::MAX;
            }
            let mut values: Vec<u64> = voters.iter().map(|id| value_of(*id)).collect();
            values.sort_unstable_by(|a, b| b.cmp(a));
            values[voters.len() / 2]
        };
        quorum_of(&self.voters).min(quorum_of(&self.outgoing_voters))
    }
}

impl fmt::Display for Configuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |set: &BTreeSet<NodeId>| {
            set.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(",")
        };
        write!(f, "voters={}", list(&self.voters))?;
        if self.is_joint() {
            write!(f, " outgoing={}", list(&self.outgoing_voters))?;
        }
        if !self.learners.is_empty() {
            write!(f, " learners={}", list(&self.learners))?;
        }
        Ok(())
    }
}

/// A membership change carried by a log entry. Changes of voters go through a joint
/// configuration (Raft §6): `Enter` switches to `C_old,new`, and once that is applied the
/// leader proposes `Leave`, which switches to `C_new`. A change of learners alone is applied
/// directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// Moves to the target voters and learners (directly if the voters do not change, otherwise
    /// through a joint configuration).
    Enter {
        /// The target voters.
        voters: BTreeSet<NodeId>,
        /// The target learners.
        learners: BTreeSet<NodeId>,
    },
    /// Leaves the joint configuration for its incoming half.
    Leave,
}

impl ConfigChange {
    /// Returns the number of node ids the change carries.
    fn node_count(&self) -> usize {
        match self {
            ConfigChange::Enter { voters, learners } => voters.len() + learners.len(),
            ConfigChange::Leave => 0,
        }
    }
}

/// The state Raft persists before it sends any message that depends on it (Raft §5.1, Figure 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub vote: Option<NodeId>,
    /// The highest index known to be committed.
    pub commit: LogIndex,
}

/// What a snapshot covers: everything up to and including `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMetadata {
    /// The last log index the snapshot contains.
    pub index: LogIndex,
    /// The term of that entry.
    pub term: Term,
    /// The configuration in effect at `index`.
    pub config: Configuration,
}

/// A state-machine snapshot, opaque to Raft (Raft §7).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// What the snapshot covers.
    pub metadata: SnapshotMetadata,
    /// The application's state at `metadata.index`.
    pub data: Vec<u8>,
}

/// A message between nodes of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender.
    pub from: NodeId,
    /// The recipient.
    pub to: NodeId,
    /// The sender's term (for `PreVote`, the term the sender would campaign in).
    pub term: Term,
    /// The content.
    pub body: MessageBody,
}

/// Why a node rejected an append, with what the leader needs to back off quickly (Raft §5.3,
/// "the follower can include the term of the conflicting entry and the first index it stores
/// for that term").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectHint {
    /// The follower's first index of `conflict_term`, or its last index + 1 if its log is too
    /// short.
    pub conflict_index: LogIndex,
    /// The term of the follower's entry at the leader's `prev_index`, if it has one.
    pub conflict_term: Option<Term>,
}

/// The content of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// Asks whether the recipient would vote, without disrupting anyone (thesis §9.6).
    PreVote {
        /// The candidate's last log index.
        last_index: LogIndex,
        /// The candidate's last log term.
        last_term: Term,
    },
    /// Answers a `PreVote`.
    PreVoteResponse {
        /// Whether the recipient would vote.
        granted: bool,
        /// The responder's commit index and the term of its entry there (see `VoteResponse`).
        commit: CommitPoint,
    },
    /// Requests a vote (Raft §5.2).
    Vote {
        /// The candidate's last log index.
        last_index: LogIndex,
        /// The candidate's last log term.
        last_term: Term,
        /// Set when the election follows a leadership transfer (`TimeoutNow`): voters then
        /// disregard a leader they heard from recently and the lease they promised it, since
        /// that leader asked for the election and stopped serving.
        transfer: bool,
    },
    /// Answers a `Vote`.
    VoteResponse {
        /// Whether the vote was granted.
        granted: bool,
        /// The responder's commit index and the term of its entry there. A candidate holding
        /// that entry learns that everything up to it is committed (log matching), which
        /// matters when the only nodes that know it are no longer voters: after a leader leaves
        /// a joint configuration and steps down, the new voters may still be waiting to apply
        /// the change, and would otherwise never get a majority of the outgoing half.
        commit: CommitPoint,
    },
    /// Replicates entries (Raft §5.3).
    Append {
        /// The index of the entry before `entries`.
        prev_index: LogIndex,
        /// The term of that entry.
        prev_term: Term,
        /// The entries to append.
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: LogIndex,
    },
    /// Answers an `Append` or `InstallSnapshot`.
    AppendResponse {
        /// On success, the index up to which the follower's log now matches the leader's; on
        /// rejection, the leader's `prev_index` that did not match.
        index: LogIndex,
        /// `None` on success; the back-off hint on rejection.
        reject: Option<RejectHint>,
    },
    /// Asserts leadership, advances the commit index, and renews the lease and confirms reads.
    Heartbeat {
        /// The leader's commit index, capped at what the recipient is known to hold.
        commit: LogIndex,
        /// The heartbeat round, echoed back; rounds confirm ReadIndex reads and leases.
        round: u64,
        /// The lease promise asked of the recipient: it must not vote for another candidate
        /// until `after(promise_until)` holds on its clock. Zero asks for no promise.
        promise_until: u64,
    },
    /// Tells a caught-up follower that the leader goes quiet: neither stops to tick (no
    /// heartbeats, no elections) until any other message, a proposal or a read arrives.
    Quiesce {
        /// The leader's commit index, which is also its last index.
        commit: LogIndex,
    },
    /// Answers a `Heartbeat`.
    HeartbeatResponse {
        /// The round being answered.
        round: u64,
    },
    /// Sends a snapshot to a follower whose next entry was compacted away (Raft §7).
    InstallSnapshot {
        /// The snapshot.
        snapshot: Snapshot,
    },
    /// Tells the recipient to start an election at once (leadership transfer, thesis §3.10).
    TimeoutNow {
        /// The old leader's `now().latest` when it stopped serving: the new leader must not
        /// serve lease reads or assign timestamps until `after(lease_floor)`.
        lease_floor: u64,
    },
}

/// An index known to be committed and the term of the entry there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitPoint {
    /// The committed index.
    pub index: LogIndex,
    /// The term of the entry at `index`.
    pub term: Term,
}

/// A read confirmed by ReadIndex: once the node has applied `index`, reading its state machine
/// is linearizable for the request identified by `context` (thesis §6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's identifier of the read request.
    pub context: u64,
    /// The commit index the read must wait for.
    pub index: LogIndex,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|id| NodeId(*id)).collect()
    }

    #[test]
    fn quorums_of_simple_and_joint_configurations() {
        let simple = Configuration::with_voters(ids(&[1, 2, 3]));
        let joint = Configuration {
            voters: ids(&[3, 4, 5]),
            outgoing_voters: ids(&[1, 2, 3]),
            learners: ids(&[6]),
        };
        // (configuration, granted, has quorum)
        let cases = [
            (&simple, vec![1, 2], true),
            (&simple, vec![3], false),
            (&simple, vec![4, 5, 6], false),
            (&joint, vec![1, 2], false),
            (&joint, vec![1, 2, 4, 5], true),
            (&joint, vec![3, 4], false),
            (&joint, vec![2, 3, 4], true),
            (&joint, vec![3, 6], false),
        ];
        for (configuration, granted, expected) in cases {
            assert_eq!(
                configuration.has_quorum(&ids(&granted)),
                expected,
                "{configuration} {granted:?}"
            );
        }
    }

    #[test]
    fn quorum_value_is_the_highest_value_a_majority_reached_in_every_half() {
        let simple = Configuration::with_voters(ids(&[1, 2, 3]));
        let values = |id: NodeId| [0, 10, 7, 3, 9, 1][id.0 as usize];
        assert_eq!(simple.quorum_value(values), 7);
        let joint = Configuration {
            voters: ids(&[3, 4, 5]),
            outgoing_voters: ids(&[1, 2, 3]),
            learners: BTreeSet::new(),
        };
        // Incoming {3, 9, 1} → 3; outgoing {10, 7, 3} → 7; both must agree → 3.
        assert_eq!(joint.quorum_value(values), 3);
        let even = Configuration::with_voters(ids(&[1, 2, 3, 4]));
        // {10, 7, 3, 9}: three of four have at least 7.
        assert_eq!(even.quorum_value(values), 7);
    }
}
