//! A range replica as the driver keeps it, and its life cycle: opened from the store, created
//! from a known state (initialization, split) or uninitialized (waiting for a snapshot),
//! quiesced when idle, and the vote it withholds after its node's replica was destroyed.

use super::follower_reads::WaitingFollowerRead;
use super::*;

/// What a proposal's proposer waits for.
pub(super) enum Pending {
    Write {
        timestamp: u64,
        reply: Reply<Committed>,
    },
    /// A one-range commit: its locks go once commit-wait is over.
    TxnCommit {
        txn: meridian_txn::TxnId,
        timestamp: u64,
        reply: Reply<Committed>,
    },
    /// A commit part's prepare record: its caller (if any) gets the prepare timestamp, and
    /// the coordinator the vote.
    TxnPrepare {
        txn: meridian_txn::TxnId,
        coordinator: meridian_txn::RangeId,
        reply: Option<Reply<u64>>,
    },
    /// A participant's outcome record.
    TxnOutcome {
        reply: Reply<()>,
    },
    Split {
        reply: Reply<Vec<wire::RangeDescriptor>>,
    },
    UpdateDescriptors {
        reply: Reply<()>,
    },
    AllocateRangeIds {
        reply: Reply<u64>,
    },
}

impl Pending {
    pub(super) fn fail(self, error: NodeError) {
        match self {
            Pending::Write { reply, .. } | Pending::TxnCommit { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Pending::TxnPrepare { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
            }
            Pending::TxnOutcome { reply } => {
                let _ = reply.send(Err(error));
            }
            Pending::Split { reply } => {
                let _ = reply.send(Err(error));
            }
            Pending::UpdateDescriptors { reply } => {
                let _ = reply.send(Err(error));
            }
            Pending::AllocateRangeIds { reply } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

pub(super) struct Proposal {
    pub(super) term: Term,
    pub(super) pending: Pending,
}

/// The state a replica created from a known state starts with.
pub(super) struct NewReplica {
    pub(super) applied: AppliedState,
    /// The meta range's index, for the meta range.
    pub(super) meta: Option<MetaIndex>,
    pub(super) hard_state: HardState,
}

pub(super) struct Replica<E: Engine> {
    pub(super) range: RangeId,
    /// Whether a replica of this range on this node was destroyed before: until a snapshot
    /// initializes it, this one must not vote (see `withholds_vote`).
    pub(super) destroyed_before: bool,
    pub(super) raft: RawNode<RaftLogStore<E>>,
    pub(super) state: RangeStateMachine<E>,
    /// The requests it serves as leader (see `leader.rs`).
    pub(super) leadership: Leadership,
    /// A compaction to stage into the next synced batch.
    pub(super) compaction: Option<SnapshotMetadata>,
    /// The last term in which this replica was seen leading (to count elections won).
    pub(super) led_term: Option<Term>,
    /// The descriptor version known to be recorded in the meta range.
    pub(super) published: Option<DescriptorVersion>,
    /// Whether a meta update of this range's descriptor is under way.
    pub(super) publishing: bool,
    /// The bytes of the range's data as far as known (recomputed when unknown).
    pub(super) size_bytes: Option<u64>,
    /// Whether a size-triggered split is under way.
    pub(super) splitting: bool,
    /// Ticks since this replica, as leader, last had a request to serve.
    pub(super) idle_ticks: u64,
    /// Ticks this replica has known no leader.
    pub(super) leaderless_ticks: u64,
    /// As leader: the voter the rebalancing move under way means to relieve.
    pub(super) move_source: Option<NodeId>,
    /// As leader: when the last rebalancing move ended (ranges rest between moves).
    pub(super) rebalanced_at: Option<tokio::time::Instant>,
    /// Whether the meta range is being asked if this node still belongs to the range.
    pub(super) checking_membership: bool,
    /// Placement rounds this replica has waited for its first snapshot (since the last check).
    pub(super) uninitialized_rounds: u64,
    /// Snapshot reads waiting here for the range's safe time (`follower_reads.rs`).
    pub(super) follower_reads: Vec<WaitingFollowerRead>,
    /// As leader: the term and log index of the last close record proposed (none is
    /// proposed again in that term before it applied).
    pub(super) closing: Option<(Term, LogIndex)>,
}

impl<E: Engine> Replica<E> {
    pub(super) fn descriptor_version(&self) -> DescriptorVersion {
        let applied = self.state.applied();
        (applied.descriptor.generation, applied.config_index.0)
    }
}

impl<E: Engine> Driver<E> {
    /// Opens the replica of `range`, creating an uninitialized one (empty log, no members,
    /// waiting for a snapshot) if the store holds none.
    pub(super) fn open_replica(&mut self, range: RangeId) -> Result<(), NodeError> {
        let source = Arc::new(RangeSnapshotSource {
            range,
            mvcc: self.mvcc.clone(),
            registry: self.transport.snapshots().clone(),
        });
        let destroyed_before = was_destroyed(self.engine.as_ref(), range).map_err(internal)?;
        // A replica this store never held has given no promise it could have forgotten.
        let fresh =
            !destroyed_before && !has_replica(self.engine.as_ref(), range).map_err(internal)?;
        let metadata = SnapshotMetadata {
            index: LogIndex(0),
            term: Term(0),
            config: Configuration::default(),
        };
        let store =
            RaftLogStore::open(self.engine.clone(), range, metadata, source).map_err(internal)?;
        let mut config = RaftConfig::new(self.node_id);
        config.election_timeout_ticks = self.timing.election_timeout_ticks;
        config.heartbeat_interval_ticks = self.timing.heartbeat_interval_ticks;
        config.lease_duration_ns = self.timing.lease_duration.as_nanos() as u64;
        config.unsafe_switches = self.switches.raft;
        config.tick_interval_ns = self.timing.tick_interval.as_nanos() as u64;
        config.max_clock_offset_ns = self.max_clock_offset.as_nanos() as u64;
        config.seed = self.seed ^ range.0.rotate_left(17);
        let mut raft =
            RawNode::new(config, store, raft_interval(&self.truetime)).map_err(internal)?;
        if fresh {
            raft.forget_restart_promise();
        }
        raft.set_clock_trusted(self.clock_healthy);
        let state = RangeStateMachine::open(range, self.mvcc.clone()).map_err(internal)?;
        self.awake.insert(range);
        self.replicas.insert(
            range,
            Replica {
                range,
                raft,
                state,
                leadership: Leadership::default(),
                compaction: None,
                led_term: None,
                published: None,
                publishing: false,
                size_bytes: None,
                splitting: false,
                idle_ticks: 0,
                leaderless_ticks: 0,
                move_source: None,
                rebalanced_at: None,
                checking_membership: false,
                uninitialized_rounds: 0,
                follower_reads: Vec::new(),
                closing: None,
                destroyed_before,
            },
        );
        Ok(())
    }

    /// Stages the state of replicas that start from a known state (initialization, split):
    /// their Raft state, applied state and (for the meta range) index. Open them with
    /// [`Driver::open_replica`] once the batch is durable.
    pub(super) fn stage_replicas(replicas: &[NewReplica], batch: &mut WriteBatch) {
        for replica in replicas {
            let applied = &replica.applied;
            let range = applied.descriptor.id;
            let metadata = SnapshotMetadata {
                index: applied.index,
                term: applied.term,
                config: applied.config.clone(),
            };
            stage_new_replica(range, &metadata, replica.hard_state, batch);
            stage_initial_state(range, applied, batch);
            if let Some(meta) = &replica.meta {
                let mut index = MetaIndex::default();
                for descriptor in meta.descriptors() {
                    index.update(descriptor, batch);
                }
            }
        }
    }

    /// Creates the meta range and the first data range, covering every key, with `voters`.
    /// Identical on every voter, so that their replicas start equal.
    pub(super) fn bootstrap(
        &mut self,
        voters: Vec<NodeId>,
        campaign: bool,
    ) -> Result<(), NodeError> {
        if self.replicas.contains_key(&META_RANGE) {
            return Ok(());
        }
        let config = Configuration::with_voters(voters);
        let state = |id: RangeId, next_range_id: u64| AppliedState {
            index: LogIndex(1),
            term: Term(1),
            config: config.clone(),
            config_index: LogIndex(1),
            max_timestamp: 0,
            descriptor: RangeDescriptor { id, start: Vec::new(), end: None, generation: 0 },
            next_range_id,
            gc_horizon: 0,
            closed_timestamp: 0,
        };
        let data = state(FIRST_DATA_RANGE, 0);
        let mut meta = MetaIndex::default();
        meta.update(&data.wire_descriptor(), &mut WriteBatch::new());
        let meta_state = state(META_RANGE, FIRST_DATA_RANGE.0 + 1);
        let mut batch = WriteBatch::new();
        let hard_state = HardState { term: Term(1), vote: None, commit: LogIndex(1) };
        let replicas = [
            NewReplica { applied: meta_state, meta: Some(meta), hard_state },
            NewReplica { applied: data, meta: None, hard_state },
        ];
        Self::stage_replicas(&replicas, &mut batch);
        self.engine.write(batch, true).map_err(internal)?;
        for range in [META_RANGE, FIRST_DATA_RANGE] {
            self.open_replica(range)?;
            // New replicas promised nothing to anyone: they may vote, and the initializing
            // node campaign, at once.
            let replica = self.replicas.get_mut(&range).expect("just opened");
            replica.raft.forget_restart_promise();
            if campaign {
                replica.raft.campaign();
            }
        }
        Ok(())
    }

    /// Returns the replicas to create for ranges split off here (see [`child_start`]).
    pub(super) fn new_replicas_of_splits(
        &self,
        children: Vec<AppliedState>,
    ) -> Result<Vec<NewReplica>, NodeError> {
        let mut replicas = Vec::new();
        for applied in children {
            let id = applied.descriptor.id;
            let local = match self.replicas.get(&id) {
                None if was_destroyed(self.engine.as_ref(), id).map_err(internal)? => {
                    LocalReplica::Destroyed
                }
                None => LocalReplica::None,
                Some(existing)
                    if !existing.state.is_initialized()
                        && existing.raft.storage().last_index() == LogIndex(0) =>
                {
                    LocalReplica::Waiting {
                        hard_state: existing.raft.storage().hard_state(),
                        destroyed_before: existing.destroyed_before,
                    }
                }
                Some(_) => LocalReplica::Holding,
            };
            if let Some(hard_state) = child_start(local) {
                replicas.push(NewReplica { applied, meta: None, hard_state });
            }
        }
        Ok(replicas)
    }

    /// Drops from the awake set the replicas that are quiesced and have nothing pending.
    pub(super) fn forget_quiet_replicas(&mut self) {
        let replicas = &self.replicas;
        self.awake.retain(|range| {
            replicas.get(range).is_some_and(|replica| {
                !replica.raft.is_quiesced()
                    || replica.raft.has_ready()
                    || replica.compaction.is_some()
                    || replica.leadership.is_busy()
                    || (replica.raft.role() == Role::Leader && replica.state.has_txn_work())
            })
        });
    }
}

/// What this node holds of a range that a split applying here creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LocalReplica {
    /// Nothing: no replica of the range was ever here.
    None,
    /// A tombstone: a replica of the range was here and was destroyed.
    Destroyed,
    /// A replica created by a message, still waiting for its first snapshot.
    Waiting {
        /// Its term and vote.
        hard_state: HardState,
        /// Whether it was created over a tombstone.
        destroyed_before: bool,
    },
    /// A replica that holds the range's state already.
    Holding,
}

/// Returns the hard state a replica of a range split off here starts with at index 1, or
/// `None` if the split must leave the range alone.
///
/// A replica created by a message that still waits for a snapshot is initialized from the
/// split instead, keeping its term and vote. A replica that holds data is left alone. A
/// replica destroyed here before (a tombstone, or one created again over it) may have been in
/// a quorum in its earlier life — the quorum that removed it, perhaps — and voting with a log
/// that starts over at index 1 could elect a voter that missed its removal: it is left
/// uninitialized, withholding its vote until a snapshot arrives (see [`withholds_vote`]).
pub(super) fn child_start(local: LocalReplica) -> Option<HardState> {
    match local {
        LocalReplica::None => Some(HardState { term: Term(1), vote: None, commit: LogIndex(1) }),
        LocalReplica::Waiting { hard_state, destroyed_before: false } => Some(HardState {
            term: hard_state.term.max(Term(1)),
            vote: hard_state.vote,
            commit: LogIndex(1),
        }),
        LocalReplica::Destroyed
        | LocalReplica::Waiting { destroyed_before: true, .. }
        | LocalReplica::Holding => None,
    }
}

/// Quiesces a leader that has been idle for a while (see `meridian_raft`'s quiescence), once
/// it closed its range at most a tick ago (so that followers serve reads up to then).
pub(super) fn maybe_quiesce<E: Engine>(replica: &mut Replica<E>, now: Interval, tick: Duration) {
    if replica.raft.role() != Role::Leader {
        replica.idle_ticks = 0;
        return;
    }
    replica.idle_ticks += 1;
    let idle = replica.idle_ticks >= QUIESCE_AFTER_IDLE_TICKS
        && !replica.leadership.is_busy()
        && !replica.state.has_txn_work()
        && !replica.publishing
        && !replica.splitting;
    // Closed once more unless the log already ends with this leader's close record (which
    // then waits to be committed, however slow the replication).
    let closed_last = replica.closing == Some((replica.raft.term(), replica.raft.last_index()));
    if idle && !closed_last && super::follower_reads::close_if_behind(replica, now, tick) {
        return;
    }
    if idle && replica.raft.quiesce() {
        metrics::counter!("meridian_raft_quiesced_total").increment(1);
    }
}

/// Whether `replica` must ignore `message`, a (pre-)vote request: it is a replica created again
/// after this node's replica of the range was destroyed, and no snapshot has initialized it.
///
/// Its log is gone, yet it may have been part of the quorum that committed the configuration
/// which removed it. Voting with an empty log could then elect a voter that missed that change
/// and still counts the old configuration's majority (this node and itself): two leaders for
/// one range. Its term and vote survive in the tombstone, which keeps it from voting twice in a
/// term, but not from this. A replica that never existed here cannot have been in any quorum
/// (an uninitialized replica acknowledges nothing), so it may vote, which lets the voters of a
/// range just split off elect its leader at once.
pub(super) fn withholds_vote<E: Engine>(replica: &Replica<E>, message: &Message) -> bool {
    withholds_vote_when(replica.destroyed_before, replica.state.is_initialized(), message)
}

pub(super) fn withholds_vote_when(
    destroyed_before: bool,
    initialized: bool,
    message: &Message,
) -> bool {
    destroyed_before
        && !initialized
        && matches!(message.body, MessageBody::Vote { .. } | MessageBody::PreVote { .. })
}

#[cfg(test)]
mod tests {
    use meridian_raft::{CommitPoint, HardState, LogIndex, Message, MessageBody, NodeId, Term};

    use super::{LocalReplica, child_start, withholds_vote_when};

    /// A split applying on a node whose replica of the new range was destroyed earlier must not
    /// re-create that replica initialized (and voting) at index 1.
    #[test]
    fn splits_leave_destroyed_replicas_uninitialized() {
        let voted = HardState { term: Term(4), vote: Some(NodeId(2)), commit: LogIndex(0) };
        let fresh = HardState { term: Term(1), vote: None, commit: LogIndex(1) };
        let kept = HardState { term: Term(4), vote: Some(NodeId(2)), commit: LogIndex(1) };
        let cases = [
            (LocalReplica::None, Some(fresh)),
            (LocalReplica::Waiting { hard_state: voted, destroyed_before: false }, Some(kept)),
            (LocalReplica::Destroyed, None),
            (LocalReplica::Waiting { hard_state: voted, destroyed_before: true }, None),
            (LocalReplica::Holding, None),
        ];
        for (local, expected) in cases {
            assert_eq!(child_start(local), expected, "{local:?}");
        }
    }

    #[test]
    fn only_recreated_uninitialized_replicas_withhold_votes() {
        let message = |body| Message { from: NodeId(2), to: NodeId(1), term: Term(3), body };
        let vote = message(MessageBody::Vote {
            last_index: LogIndex(7),
            last_term: Term(2),
            transfer: false,
        });
        let pre_vote =
            message(MessageBody::PreVote { last_index: LogIndex(7), last_term: Term(2) });
        let answer = message(MessageBody::VoteResponse {
            granted: true,
            commit: CommitPoint { index: LogIndex(0), term: Term(0) },
        });
        assert!(withholds_vote_when(true, false, &vote));
        assert!(withholds_vote_when(true, false, &pre_vote));
        assert!(!withholds_vote_when(true, false, &answer));
        // Initialized by a snapshot, or never destroyed here: it votes.
        assert!(!withholds_vote_when(true, true, &vote));
        assert!(!withholds_vote_when(false, false, &vote));
        assert!(!withholds_vote_when(false, false, &pre_vote));
    }
}
