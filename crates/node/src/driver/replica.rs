//! A range replica as the driver keeps it, and its life cycle: opened from the store, created
//! from a known state (initialization, split) or uninitialized (waiting for a snapshot),
//! quiesced when idle, and the vote it withholds after its node's replica was destroyed.

use super::*;

/// What a proposal's proposer waits for.
pub(super) enum Pending {
    Write { timestamp: u64, reply: Reply<u64> },
    Split { reply: Reply<Vec<wire::RangeDescriptor>> },
    UpdateDescriptors { reply: Reply<()> },
    AllocateRangeIds { reply: Reply<u64> },
}

impl Pending {
    pub(super) fn fail(self, error: NodeError) {
        match self {
            Pending::Write { reply, .. } => {
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

/// A write waiting for its leader's lease.
pub(super) struct LeaseWaiter {
    pub(super) deadline: tokio::time::Instant,
    pub(super) key: Vec<u8>,
    pub(super) value: Option<Vec<u8>>,
    pub(super) reply: Reply<u64>,
}

pub(super) struct Replica<E: Engine> {
    pub(super) range: RangeId,
    /// Whether a replica of this range on this node was destroyed before: until a snapshot
    /// initializes it, this one must not vote (see `withholds_vote`).
    pub(super) destroyed_before: bool,
    pub(super) raft: RawNode<RaftLogStore<E>>,
    pub(super) state: RangeStateMachine<E>,
    /// The highest timestamp this replica assigned as leader.
    pub(super) max_assigned: u64,
    /// Proposals whose proposers wait for them to apply, by log index.
    pub(super) proposals: BTreeMap<LogIndex, Proposal>,
    /// Writes waiting for a lease.
    pub(super) lease_waiters: Vec<LeaseWaiter>,
    /// ReadIndex reads waiting for confirmation, by context.
    pub(super) reads: BTreeMap<u64, ReadRequest>,
    /// Confirmed reads waiting for their index to be applied.
    pub(super) confirmed: Vec<(LogIndex, ReadRequest)>,
    pub(super) next_read_context: u64,
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
        let source = Arc::new(RangeSnapshotSource { range, mvcc: self.mvcc.clone() });
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
        config.tick_interval_ns = self.timing.tick_interval.as_nanos() as u64;
        config.max_clock_offset_ns = self.max_clock_offset.as_nanos() as u64;
        config.seed = self.seed ^ range.0.rotate_left(17);
        let mut raft =
            RawNode::new(config, store, raft_interval(&self.truetime)).map_err(internal)?;
        if fresh {
            raft.forget_restart_promise();
        }
        let state = RangeStateMachine::open(range, self.mvcc.clone()).map_err(internal)?;
        let max_assigned = state.applied().max_timestamp;
        self.awake.insert(range);
        self.replicas.insert(
            range,
            Replica {
                range,
                raft,
                state,
                max_assigned,
                proposals: BTreeMap::new(),
                lease_waiters: Vec::new(),
                reads: BTreeMap::new(),
                confirmed: Vec::new(),
                next_read_context: 1,
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
    pub(super) fn bootstrap(&mut self, voters: Vec<NodeId>) -> Result<(), NodeError> {
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
        self.open_replica(META_RANGE)?;
        self.open_replica(FIRST_DATA_RANGE)
    }

    /// Returns the replicas to create for ranges split off here. A replica that heard of its
    /// range first (through a message) and still waits for a snapshot is initialized from the
    /// split instead, keeping its term and vote; one that already holds data is left alone.
    ///
    /// A replica of the new range that was created here and destroyed before the split applied
    /// (it waited too long for a snapshot) left its term and vote in a tombstone: they are kept
    /// too, or the new replica could vote twice in a term.
    pub(super) fn new_replicas_of_splits(
        &self,
        children: Vec<AppliedState>,
    ) -> Result<Vec<NewReplica>, NodeError> {
        let keep = |current: HardState| HardState {
            term: current.term.max(Term(1)),
            vote: current.vote,
            commit: LogIndex(1),
        };
        let mut replicas = Vec::new();
        for applied in children {
            let id = applied.descriptor.id;
            let hard_state = match self.replicas.get(&id) {
                None => match stored_hard_state(self.engine.as_ref(), id).map_err(internal)? {
                    Some(tombstone) => keep(tombstone),
                    None => HardState { term: Term(1), vote: None, commit: LogIndex(1) },
                },
                Some(existing)
                    if !existing.state.is_initialized()
                        && existing.raft.storage().last_index() == LogIndex(0) =>
                {
                    keep(existing.raft.storage().hard_state())
                }
                Some(_) => continue,
            };
            replicas.push(NewReplica { applied, meta: None, hard_state });
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
                    || !replica.proposals.is_empty()
                    || !replica.reads.is_empty()
                    || !replica.confirmed.is_empty()
                    || !replica.lease_waiters.is_empty()
            })
        });
    }
}

/// Quiesces a leader that has been idle for a while (see `meridian_raft`'s quiescence).
pub(super) fn maybe_quiesce<E: Engine>(replica: &mut Replica<E>) {
    if replica.raft.role() != Role::Leader {
        replica.idle_ticks = 0;
        return;
    }
    replica.idle_ticks += 1;
    let idle = replica.idle_ticks >= QUIESCE_AFTER_IDLE_TICKS
        && replica.proposals.is_empty()
        && replica.reads.is_empty()
        && replica.confirmed.is_empty()
        && replica.lease_waiters.is_empty()
        && !replica.publishing
        && !replica.splitting;
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
    use meridian_raft::{CommitPoint, LogIndex, Message, MessageBody, NodeId, Term};

    use super::withholds_vote_when;

    #[test]
    pub(super) fn only_recreated_uninitialized_replicas_withhold_votes() {
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
