//! The Raft node: roles, the input methods (`tick`, `step`, `propose`, ...) and the
//! `ready`/`advance` output cycle. Elections, replication, reads and leases, and membership
//! live in sibling modules as further `impl RawNode` blocks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::log::RaftLog;
use crate::progress::Progress;
use crate::rng::SplitMix64;
use crate::{
    Config, Configuration, Entry, EntryKind, Error, HardState, Interval, LogIndex, Message,
    MessageBody, NodeId, ReadState, Result, Snapshot, SnapshotMetadata, Storage, Term,
};

/// The role of a node (Raft §5.1, plus the pre-candidate of thesis §9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asks whether it could win an election before disrupting anyone.
    PreCandidate,
    /// Campaigns for votes in a new term.
    Candidate,
    /// Leads the group.
    Leader,
}

/// What the application must do next, in order (see [`RawNode::ready`]):
///
/// 1. persist `snapshot` (install it), then `entries` (replacing stored entries from
///    `entries[0].index` on), then `hard_state` — synced, since messages promise them;
/// 2. send `messages`;
/// 3. apply `committed_entries` to the state machine, in order;
/// 4. serve the reads in `read_states` once their index is applied;
/// 5. call [`RawNode::advance`] with this `Ready`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// A changed hard state to persist.
    pub hard_state: Option<HardState>,
    /// A snapshot from the leader to persist and install.
    pub snapshot: Option<Snapshot>,
    /// Entries to persist.
    pub entries: Vec<Entry>,
    /// Messages to send after persisting.
    pub messages: Vec<Message>,
    /// Committed entries to apply.
    pub committed_entries: Vec<Entry>,
    /// Confirmed ReadIndex reads.
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// Returns whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == Ready::default()
    }
}

/// A node's externally visible state, for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The node.
    pub id: NodeId,
    /// Its current term.
    pub term: Term,
    /// Its vote in that term.
    pub vote: Option<NodeId>,
    /// Its role.
    pub role: Role,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The last log index.
    pub last_index: LogIndex,
    /// The commit index.
    pub commit: LogIndex,
    /// The applied index.
    pub applied: LogIndex,
    /// The configuration in effect (applied).
    pub configuration: Configuration,
    /// Whether the node is quiesced.
    pub quiesced: bool,
    /// The end of the leader's lease in TrueTime nanoseconds (0 if none).
    pub lease_end: u64,
}

/// A Raft node as a pure state machine. See the crate docs.
pub struct RawNode<S: Storage> {
    pub(crate) config: Config,
    pub(crate) id: NodeId,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog<S>,
    /// The configuration in effect: the latest applied one (configurations take effect when
    /// applied, as in etcd; only one change may be pending at a time).
    pub(crate) configuration: Configuration,
    /// The index of the latest configuration entry appended by this leader.
    pub(crate) pending_config_index: LogIndex,
    /// Per-member progress, while leader (the leader included).
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    /// Votes received, while (pre-)candidate.
    pub(crate) votes: BTreeMap<NodeId, bool>,
    pub(crate) election_elapsed: u64,
    pub(crate) randomized_election_timeout: u64,
    pub(crate) heartbeat_elapsed: u64,
    pub(crate) rng: SplitMix64,
    /// The TrueTime interval of the latest tick; older than the true "now", which keeps every
    /// use of it conservative (see `reads.rs`).
    pub(crate) now: Interval,
    /// Whether the application trusts this node's clock (it agrees with its peers'); while it
    /// does not, the node neither campaigns nor holds a lease nor votes (except for a transfer's
    /// candidate), since every lease rule rests on its clock (see `reads.rs`, rule 5).
    pub(crate) clock_trusted: bool,
    /// This node must not vote for anyone else until `after(promise_until)`.
    pub(crate) promise_until: u64,
    /// Whether the group is quiet: ticks do nothing (see `quiesce.rs`).
    pub(crate) quiesced: bool,
    /// While leader: the lease lets it serve while `now().latest < lease_end`.
    pub(crate) lease_end: u64,
    /// While leader: it must not serve until `after(lease_floor)`.
    pub(crate) lease_floor: u64,
    /// While leader: the highest timestamp it served a lease read at or assigned to a write.
    pub(crate) max_served_timestamp: u64,
    /// While leader: set once it hands leadership away; no lease again in this term.
    pub(crate) lease_relinquished: bool,
    /// While leader: the latest heartbeat round and each unconfirmed round's send time
    /// (`now().earliest`).
    pub(crate) heartbeat_round: u64,
    pub(crate) round_sent_earliest: BTreeMap<u64, u64>,
    /// While leader: the highest round a quorum answered.
    pub(crate) confirmed_round: u64,
    /// While leader: ReadIndex requests waiting for a round: (context, index, round).
    pub(crate) pending_reads: VecDeque<(u64, LogIndex, u64)>,
    pub(crate) read_states: Vec<ReadState>,
    /// While leader: the transfer target and ticks since the transfer began.
    pub(crate) transfer: Option<(NodeId, u64)>,
    /// Whether proposals or commits require sending appends at the next `ready`.
    pub(crate) broadcast_pending: bool,
    pub(crate) messages: Vec<Message>,
    /// The hard state last handed out for persistence.
    pub(crate) persisted_hard_state: HardState,
}

impl<S: Storage> std::fmt::Debug for RawNode<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawNode").field("status", &self.status()).finish()
    }
}

impl<S: Storage> RawNode<S> {
    /// Returns a node over `storage` (new, or holding the state of an earlier incarnation),
    /// at the TrueTime interval `now`.
    ///
    /// A restarted node may have promised a lease to a leader before it crashed, and promises
    /// are not persisted, so with leases enabled it refuses to vote until
    /// `after(now.latest + 2 · max(ε, B) + lease_duration)`, where ε is this reading's
    /// uncertainty and `B` the group's clock bound (`max_clock_offset_ns`): a promise it gave
    /// runs to a leader's `latest + lease_duration`, and a leader asks for promises only while
    /// its own uncertainty is within `B`, so its `latest` was at most `2B` past true time then,
    /// which was before now (see `reads.rs`, rule 4).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if the options do not validate.
    pub fn new(config: Config, storage: S, now: Interval) -> Result<Self> {
        config.validate()?;
        let hard_state = storage.hard_state();
        let configuration = storage.snapshot_metadata().config;
        let promise_until =
            if config.lease_duration_ns > 0 && !config.unsafe_switches.forget_promise_on_restart {
                let width = (now.latest - now.earliest).max(2 * config.max_clock_offset_ns);
                now.latest + width + config.lease_duration_ns
            } else {
                0
            };
        let mut node = RawNode {
            id: config.id,
            rng: SplitMix64::new(config.seed),
            config,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log: RaftLog::new(storage),
            configuration,
            pending_config_index: LogIndex(0),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            randomized_election_timeout: 0,
            heartbeat_elapsed: 0,
            now,
            clock_trusted: true,
            promise_until,
            quiesced: false,
            lease_end: 0,
            lease_floor: 0,
            max_served_timestamp: 0,
            lease_relinquished: false,
            heartbeat_round: 0,
            round_sent_earliest: BTreeMap::new(),
            confirmed_round: 0,
            pending_reads: VecDeque::new(),
            read_states: Vec::new(),
            transfer: None,
            broadcast_pending: false,
            messages: Vec::new(),
            persisted_hard_state: hard_state,
        };
        node.reset_election_timeout();
        Ok(node)
    }

    /// Returns this node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Returns the node's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Returns the current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Returns the leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Returns the storage (the application persists `Ready` into it).
    pub fn storage(&self) -> &S {
        &self.log.storage
    }

    /// Returns the storage mutably, for persisting `Ready` and compaction.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.log.storage
    }

    /// Returns the node's status.
    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            term: self.term,
            vote: self.vote,
            role: self.role,
            leader: self.leader,
            last_index: self.log.last_index(),
            commit: self.log.committed,
            applied: self.log.applied,
            configuration: self.configuration.clone(),
            quiesced: self.quiesced,
            lease_end: if self.role == Role::Leader { self.lease_end } else { 0 },
        }
    }

    /// Returns the configuration in effect (the latest applied one).
    pub fn configuration(&self) -> &Configuration {
        &self.configuration
    }

    /// Returns the highest index handed to the application and acknowledged.
    pub fn applied_index(&self) -> LogIndex {
        self.log.applied
    }

    /// Returns the index of the last entry in this node's log (appended, perhaps not committed).
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }

    /// Returns the highest index known to be committed.
    pub fn commit_index(&self) -> LogIndex {
        self.log.committed
    }

    /// Returns the term of the entry at `index` in this node's log, if it has that entry.
    pub fn log_term(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index).ok()
    }

    /// Returns the index of the first entry in this node's log (after its snapshot).
    pub fn first_log_index(&self) -> LogIndex {
        self.log.first_index()
    }

    /// Returns the metadata for a snapshot of the application's state at the applied index:
    /// the application snapshots its state machine, then calls its storage's compaction with
    /// this metadata.
    ///
    /// # Errors
    ///
    /// Storage errors reading the applied entry's term.
    pub fn applied_snapshot_metadata(&self) -> Result<SnapshotMetadata> {
        let index = self.log.applied;
        Ok(SnapshotMetadata {
            index,
            term: self.log.term(index)?,
            config: self.configuration.clone(),
        })
    }

    /// Returns whether `now` has an uncertainty within the group's clock bound (always, without
    /// a bound).
    pub(crate) fn within_clock_bound(&self, now: Interval) -> bool {
        self.config.max_clock_offset_ns == 0
            || now.latest.saturating_sub(now.earliest) <= 2 * self.config.max_clock_offset_ns
    }

    /// Tells the node whether its clock can be trusted: the application's clock checks (its
    /// offset from its peers) pass. While it cannot, the node keeps replicating but neither
    /// votes, campaigns nor holds a lease (see `reads.rs`, rule 5).
    pub fn set_clock_trusted(&mut self, trusted: bool) {
        self.clock_trusted = trusted;
    }

    /// Returns whether this node may campaign: it votes in the configuration in effect.
    pub(crate) fn is_promotable(&self) -> bool {
        self.configuration.is_voter(self.id)
    }

    pub(crate) fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.committed }
    }

    pub(crate) fn reset_election_timeout(&mut self) {
        let timeout = self.config.election_timeout_ticks;
        self.randomized_election_timeout = self.rng.range(timeout, 2 * timeout);
    }

    /// Queues a message to `to`.
    pub(crate) fn send(&mut self, to: NodeId, term: Term, body: MessageBody) {
        self.messages.push(Message { from: self.id, to, term, body });
    }

    /// Tells the node the TrueTime interval `now` without advancing logical time. A quiesced
    /// node is not ticked, so its idea of "now" (with which it checks its lease promises) goes
    /// stale; the application refreshes it before handing such a node a message, or it would
    /// refuse votes for promises that ran out long ago.
    pub fn observe_time(&mut self, now: Interval) {
        if now.earliest > self.now.earliest || now.latest > self.now.latest {
            self.now = Interval {
                earliest: now.earliest.max(self.now.earliest),
                latest: now.latest.max(self.now.latest),
            };
        }
    }

    /// Advances logical time by one tick at the TrueTime interval `now`: followers and
    /// candidates may start an election, leaders send heartbeats and check their quorum.
    pub fn tick(&mut self, now: Interval) {
        self.observe_time(now);
        if self.quiesced {
            return;
        }
        match self.role {
            Role::Leader => self.tick_leader(),
            Role::Follower | Role::PreCandidate | Role::Candidate => {
                self.election_elapsed += 1;
                // A node whose own promise may still run waits for it to expire (it checks
                // again every tick) rather than campaigning.
                if self.election_elapsed >= self.randomized_election_timeout
                    && self.is_promotable()
                    && !self.promise_running()
                {
                    self.election_elapsed = 0;
                    self.start_election(false);
                }
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.heartbeat_elapsed >= self.config.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
        // A transfer that has not completed within an election timeout is abandoned. A leader
        // that sent `TimeoutNow` gave its lease up for the rest of its term (the target may
        // still campaign with voters ignoring their promises), so it cannot serve again in
        // this term: it steps down, and the group elects a leader that can.
        if let Some((_, elapsed)) = self.transfer.as_mut() {
            *elapsed += 1;
            if *elapsed >= self.config.election_timeout_ticks {
                self.transfer = None;
                if self.lease_relinquished {
                    let term = self.term;
                    self.become_follower(term, None);
                    return;
                }
            }
        }
        if self.election_elapsed >= self.config.election_timeout_ticks {
            self.election_elapsed = 0;
            if self.config.check_quorum {
                let active: BTreeSet<NodeId> = self
                    .progress
                    .iter()
                    .filter(|(id, progress)| **id == self.id || progress.recently_active)
                    .map(|(id, _)| *id)
                    .collect();
                if !self.quorum_configuration().has_quorum(&active) {
                    let term = self.term;
                    self.become_follower(term, None);
                    return;
                }
                for progress in self.progress.values_mut() {
                    progress.recently_active = false;
                }
            }
        }
    }

    /// Proposes an application command. Returns the index it will have if committed.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] on a non-leader; [`Error::TransferInProgress`] during a leadership
    /// transfer.
    pub fn propose(&mut self, command: Vec<u8>) -> Result<LogIndex> {
        self.propose_entry(EntryKind::Command(command))
    }

    pub(crate) fn propose_entry(&mut self, kind: EntryKind) -> Result<LogIndex> {
        self.wake();
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.leader });
        }
        if let Some((target, _)) = self.transfer {
            return Err(Error::TransferInProgress(target));
        }
        Ok(self.append_entry(kind))
    }

    /// Appends an entry of the current term to the leader's log.
    pub(crate) fn append_entry(&mut self, kind: EntryKind) -> LogIndex {
        let index = self.log.last_index().next();
        self.log.append(vec![Entry { index, term: self.term, kind }]);
        self.broadcast_pending = true;
        index
    }

    /// Processes a message from another node.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] if the message is addressed to another node; storage errors.
    pub fn step(&mut self, message: Message) -> Result<()> {
        if message.to != self.id {
            return Err(Error::InvalidRequest(format!(
                "message for {} delivered to {}",
                message.to, self.id
            )));
        }
        // Any message from a member but the quiet ones wakes a quiesced node, even one it then
        // ignores (a pre-vote it refuses comes from a member that is not quiet). A node removed
        // from the group that has not learned so cannot wake it.
        let member = self.configuration.is_voter(message.from)
            || self.configuration.learners.contains(&message.from);
        if member
            && !matches!(
                message.body,
                MessageBody::Quiesce { .. } | MessageBody::HeartbeatResponse { .. }
            )
        {
            self.wake();
        }
        if message.term > self.term {
            if self.role == Role::Leader
                && self.config.unsafe_switches.ignore_higher_term_responses
                && matches!(
                    message.body,
                    MessageBody::AppendResponse { .. }
                        | MessageBody::HeartbeatResponse { .. }
                        | MessageBody::VoteResponse { .. }
                        | MessageBody::PreVoteResponse { .. }
                )
            {
                return Ok(());
            }
            if !self.accept_higher_term(&message) {
                return Ok(());
            }
        } else if message.term < self.term {
            self.on_stale_message(&message);
            return Ok(());
        }
        match message.body {
            MessageBody::PreVote { .. } | MessageBody::Vote { .. } => {
                self.on_vote_request(&message)
            }
            MessageBody::PreVoteResponse { granted, commit }
            | MessageBody::VoteResponse { granted, commit } => {
                self.learn_commit(commit);
                self.on_vote_response(message.from, &message.body, granted)
            }
            MessageBody::Append { prev_index, prev_term, entries, commit } => {
                self.on_leader_contact(message.from);
                self.on_append(message.from, prev_index, prev_term, entries, commit);
            }
            MessageBody::Heartbeat { commit, round, promise_until } => {
                self.on_leader_contact(message.from);
                self.on_heartbeat(message.from, commit, round, promise_until);
            }
            MessageBody::InstallSnapshot { snapshot } => {
                self.on_leader_contact(message.from);
                self.on_install_snapshot(message.from, snapshot);
            }
            MessageBody::AppendResponse { index, reject } => {
                if self.role == Role::Leader {
                    self.on_append_response(message.from, index, reject);
                }
            }
            MessageBody::HeartbeatResponse { round } => {
                if self.role == Role::Leader {
                    self.on_heartbeat_response(message.from, round);
                }
            }
            MessageBody::TimeoutNow { lease_floor } => self.on_timeout_now(lease_floor),
            MessageBody::Quiesce { commit } => {
                self.on_leader_contact(message.from);
                self.on_quiesce(commit);
            }
        }
        Ok(())
    }

    /// Handles a message from a leader of the current term.
    fn on_leader_contact(&mut self, leader: NodeId) {
        if self.role != Role::Follower {
            let term = self.term;
            self.become_follower(term, Some(leader));
        }
        self.leader = Some(leader);
        self.election_elapsed = 0;
    }

    /// Answers a message of an older term, so that a deposed leader or candidate learns the new
    /// term (Raft §5.1); other stale messages are dropped.
    fn on_stale_message(&mut self, message: &Message) {
        match message.body {
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                let body = MessageBody::AppendResponse { index: LogIndex(0), reject: None };
                self.send(message.from, self.term, body);
            }
            MessageBody::PreVote { .. } => {
                let commit = self.commit_point();
                self.send(
                    message.from,
                    self.term,
                    MessageBody::PreVoteResponse { granted: false, commit },
                );
            }
            _ => {}
        }
    }

    /// Moves to the follower role in `term`.
    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.quiesced = false;
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.reset_leader_state();
        self.election_elapsed = 0;
        self.reset_election_timeout();
    }

    /// Clears everything that only a leader keeps.
    pub(crate) fn reset_leader_state(&mut self) {
        self.progress.clear();
        self.votes.clear();
        self.transfer = None;
        self.lease_end = 0;
        self.lease_relinquished = false;
        self.round_sent_earliest.clear();
        self.pending_reads.clear();
        self.broadcast_pending = false;
    }

    /// Returns whether there is anything for the application to do.
    pub fn has_ready(&self) -> bool {
        !self.messages.is_empty()
            || !self.log.unstable_entries().is_empty()
            || self.log.pending_snapshot().is_some()
            || self.hard_state() != self.persisted_hard_state
            || self.log.committed > self.log.applied
            || !self.read_states.is_empty()
            || self.broadcast_pending
    }

    /// Collects what the application must do next; see [`Ready`]. Call
    /// [`RawNode::advance`] with it before the next `step`, `tick` or `ready`.
    ///
    /// # Errors
    ///
    /// Storage errors reading committed entries.
    pub fn ready(&mut self) -> Result<Ready> {
        if self.broadcast_pending && self.role == Role::Leader {
            self.broadcast_append();
        }
        self.broadcast_pending = false;
        let messages = std::mem::take(&mut self.messages);
        let mut hard_state = self.hard_state();
        if self.sends_before_persisting(&messages) {
            // Test-only: the term and vote these messages depend on are left for the next
            // cycle to persist.
            hard_state.term = self.persisted_hard_state.term;
            hard_state.vote = self.persisted_hard_state.vote;
        }
        Ok(Ready {
            hard_state: (hard_state != self.persisted_hard_state).then_some(hard_state),
            snapshot: self.log.pending_snapshot().cloned(),
            entries: self.log.unstable_entries().to_vec(),
            messages,
            committed_entries: self.log.entries_to_apply(usize::MAX)?,
            read_states: std::mem::take(&mut self.read_states),
        })
    }

    /// Returns whether a test-only switch makes this cycle send `messages` before the term and
    /// vote they promise are persisted (see `UnsafeSwitches::unpersisted_vote_grant` and
    /// `UnsafeSwitches::unpersisted_candidacy`).
    fn sends_before_persisting(&self, messages: &[Message]) -> bool {
        let switches = self.config.unsafe_switches;
        if !switches.unpersisted_vote_grant && !switches.unpersisted_candidacy {
            return false;
        }
        messages.iter().any(|message| match message.body {
            MessageBody::VoteResponse { granted: true, .. } => switches.unpersisted_vote_grant,
            MessageBody::Vote { .. } => switches.unpersisted_candidacy,
            _ => false,
        })
    }

    /// Returns the configuration whose majorities decide elections, commitment, heartbeat
    /// rounds and check-quorum: the one in effect. (The test-only switch
    /// `UnsafeSwitches::incoming_quorum_only` drops the outgoing half of a joint one.)
    pub(crate) fn quorum_configuration(&self) -> std::borrow::Cow<'_, Configuration> {
        if self.config.unsafe_switches.incoming_quorum_only && self.configuration.is_joint() {
            let mut incoming = self.configuration.clone();
            incoming.outgoing_voters.clear();
            std::borrow::Cow::Owned(incoming)
        } else {
            std::borrow::Cow::Borrowed(&self.configuration)
        }
    }

    /// Acknowledges that `ready` was persisted, sent and applied.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn advance(&mut self, ready: Ready) -> Result<()> {
        if let Some(hard_state) = ready.hard_state {
            self.persisted_hard_state = hard_state;
        }
        if let Some(snapshot) = &ready.snapshot {
            self.log.stable_snapshot();
            self.configuration = snapshot.metadata.config.clone();
        }
        if let Some(last) = ready.entries.last() {
            self.log.stable_to(last.index, last.term);
        }
        for entry in &ready.committed_entries {
            self.log.applied_to(entry.index);
            if let EntryKind::ConfigChange(change) = &entry.kind {
                self.apply_config_change(entry.index, change);
            }
        }
        if self.role == Role::Leader {
            let persisted = self.log.persisted_index();
            if let Some(progress) = self.progress.get_mut(&self.id) {
                progress.on_success(persisted);
            }
            self.maybe_commit();
            // With a single voter, rounds are confirmed by the leader alone.
            self.confirm_rounds();
        }
        Ok(())
    }
}
