//! What a range's leader does with client requests: routing checks, proposals, writes at
//! timestamps inside its lease, lease and ReadIndex reads, and failing what a former leader can
//! no longer answer.

use super::*;

impl<E: Engine> Driver<E> {
    /// Returns the error for a request that reached a non-leader.
    pub(super) fn not_leader(
        transport: &Transport,
        node_id: NodeId,
        leader: Option<NodeId>,
    ) -> NodeError {
        match leader {
            Some(leader) if leader != node_id => {
                NodeError::NotLeader { leader: Some(leader), address: transport.address(leader) }
            }
            _ => NodeError::Unavailable("the range has no leader right now".into()),
        }
    }

    /// Returns the replica of `range` if this node leads it and it holds `key`.
    pub(super) fn leader_replica(
        &mut self,
        range: RangeId,
        key: Option<&[u8]>,
    ) -> Result<&mut Replica<E>, NodeError> {
        // A request may wake the replica.
        self.awake.insert(range);
        let Some(replica) = self.replicas.get_mut(&range) else {
            return Err(if self.joined {
                NodeError::RangeNotFound(range)
            } else {
                NodeError::NotInitialized
            });
        };
        if !replica.state.is_initialized() {
            return Err(NodeError::RangeNotFound(range));
        }
        if replica.raft.role() != Role::Leader {
            let leader = replica.raft.leader();
            return Err(Self::not_leader(&self.transport, self.node_id, leader));
        }
        if let Some(key) = key {
            check_key(replica, key)?;
        }
        Ok(replica)
    }

    /// Proposes a command that carries no timestamp (split, meta changes).
    pub(super) fn propose(
        &mut self,
        range: RangeId,
        key: Option<&[u8]>,
        command: Vec<u8>,
        pending: Pending,
    ) {
        let replica = match self.leader_replica(range, key) {
            Ok(replica) => replica,
            Err(error) => return pending.fail(error),
        };
        replica.idle_ticks = 0;
        match replica.raft.propose(command) {
            Ok(index) => {
                metrics::counter!("meridian_raft_proposals_total").increment(1);
                let term = replica.raft.term();
                replica.proposals.insert(index, Proposal { term, pending });
            }
            Err(error) => pending.fail(NodeError::Unavailable(error.to_string())),
        }
    }

    pub(super) fn write(
        &mut self,
        range: RangeId,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        reply: Reply<u64>,
    ) {
        if range == META_RANGE {
            let _ = reply
                .send(Err(NodeError::InvalidArgument("the meta range holds no user keys".into())));
            return;
        }
        let now = self.truetime.now();
        let interval =
            Interval { earliest: now.earliest.as_nanos(), latest: now.latest.as_nanos() };
        let replica = match self.leader_replica(range, Some(&key)) {
            Ok(replica) => replica,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        replica.idle_ticks = 0;
        // A leader assigns timestamps only inside its lease (Spanner's disjointness). Without
        // one (a new leader), the write waits for the next heartbeat round to grant it.
        if replica.raft.lease_read(interval).is_none() {
            if replica.lease_waiters.is_empty() {
                let context = replica.next_read_context;
                replica.next_read_context += 1;
                // A read round renews the lease at once; its result is not needed.
                let _ = replica.raft.read_index(context);
            }
            let deadline = tokio::time::Instant::now() + LEASE_WAIT;
            replica.lease_waiters.push(LeaseWaiter { deadline, key, value, reply });
            return;
        }
        let timestamp = now
            .latest
            .as_nanos()
            .max(replica.max_assigned + 1)
            .max(replica.state.applied().max_timestamp + 1);
        let command = match &value {
            Some(value) => encode_put(&key, value, timestamp),
            None => encode_delete(&key, timestamp),
        };
        match replica.raft.propose(command) {
            Ok(index) => {
                metrics::counter!("meridian_raft_proposals_total").increment(1);
                replica.max_assigned = timestamp;
                let term = replica.raft.term();
                replica
                    .proposals
                    .insert(index, Proposal { term, pending: Pending::Write { timestamp, reply } });
            }
            Err(error) => {
                let _ = reply.send(Err(NodeError::Unavailable(error.to_string())));
            }
        }
    }

    /// Proposes the writes whose leader now has a lease; fails those that waited too long.
    pub(super) fn retry_lease_waiters(&mut self) {
        let now = tokio::time::Instant::now();
        let mut retry = Vec::new();
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.lease_waiters.is_empty() {
                continue;
            }
            let has_lease = replica.raft.lease_read(raft_interval(&self.truetime)).is_some();
            for waiter in std::mem::take(&mut replica.lease_waiters) {
                if has_lease || replica.raft.role() != Role::Leader {
                    retry.push((replica.range, waiter));
                } else if waiter.deadline <= now {
                    let _ = waiter.reply.send(Err(NodeError::Unavailable(
                        "the leader could not obtain a lease".into(),
                    )));
                } else {
                    replica.lease_waiters.push(waiter);
                }
            }
        }
        for (range, waiter) in retry {
            self.write(range, waiter.key, waiter.value, waiter.reply);
        }
    }

    pub(super) fn read(&mut self, request: ReadRequest) {
        if request.range() == META_RANGE && request.key().is_some() {
            return request
                .fail(NodeError::InvalidArgument("the meta range holds no user keys".into()));
        }
        let interval = raft_interval(&self.truetime);
        let replica = match self.leader_replica(request.range(), request.key()) {
            Ok(replica) => replica,
            Err(error) => return request.fail(error),
        };
        replica.idle_ticks = 0;
        if let Some(lease) = replica.raft.lease_read(interval) {
            replica.confirmed.push((lease.index, request));
            return;
        }
        let context = replica.next_read_context;
        replica.next_read_context += 1;
        match replica.raft.read_index(context) {
            Ok(()) => {
                replica.reads.insert(context, request);
            }
            Err(error) => request.fail(NodeError::Unavailable(error.to_string())),
        }
    }

    /// Fails the requests a replica can no longer answer because it lost leadership: reads
    /// still waiting for their ReadIndex round, and proposals not yet applied (their outcome
    /// is unknown: the entry may still commit under the new leader).
    pub(super) fn fail_requests_of_former_leaders(&mut self) {
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.raft.role() == Role::Leader {
                continue;
            }
            // A new leader must record its descriptor again (the meta range may have missed
            // an update of the old leader's).
            replica.published = None;
            for (_, request) in std::mem::take(&mut replica.reads) {
                request.fail(NodeError::Unavailable(
                    "leadership changed before the read was confirmed".into(),
                ));
            }
            for (_, proposal) in std::mem::take(&mut replica.proposals) {
                proposal.pending.fail(NodeError::Ambiguous(
                    "leadership changed before the command was applied; it may or may not take effect".into(),
                ));
            }
        }
    }

    pub(super) fn serve_confirmed_reads(&mut self) {
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if replica.confirmed.is_empty() {
                continue;
            }
            let applied = replica.state.applied().index;
            let (ready, waiting): (Vec<_>, Vec<_>) =
                replica.confirmed.drain(..).partition(|(index, _)| *index <= applied);
            replica.confirmed = waiting;
            for (_, request) in ready {
                serve_read(&self.mvcc, replica, request);
            }
        }
    }
}

/// Fails unless `replica`'s span holds `key`.
pub(super) fn check_key<E: Engine>(replica: &Replica<E>, key: &[u8]) -> Result<(), NodeError> {
    if replica.state.descriptor().contains(key) { Ok(()) } else { Err(key_not_in_range(replica)) }
}

pub(super) fn key_not_in_range<E: Engine>(replica: &Replica<E>) -> NodeError {
    NodeError::KeyNotInRange { descriptor: Box::new(replica.state.applied().wire_descriptor()) }
}

/// Serves a confirmed read from the replica's state; the key is checked again, since a split
/// may have applied since the read arrived.
pub(super) fn serve_read<E: Engine>(mvcc: &Mvcc<E>, replica: &Replica<E>, request: ReadRequest) {
    if let Some(key) = request.key()
        && let Err(error) = check_key(replica, key)
    {
        return request.fail(error);
    }
    match request {
        ReadRequest::Get { key, reply, .. } => {
            let result = mvcc
                .get(&key, Timestamp::MAX)
                .map(|version| version.map(|version| (version.value, version.commit_ts.as_nanos())))
                .map_err(internal);
            let _ = reply.send(result);
        }
        ReadRequest::Scan { start, end, limit, reply, .. } => {
            // Clamp to the range's end; past it the caller continues in the next range.
            let range_end = replica.state.descriptor().end.clone();
            let (end, resume_key) = match (end, range_end) {
                (Some(end), Some(range_end)) if range_end < end => {
                    (Some(range_end.clone()), Some(range_end))
                }
                (None, Some(range_end)) => (Some(range_end.clone()), Some(range_end)),
                (end, _) => (end, None),
            };
            let result = mvcc
                .scan(&start, end.as_deref(), Timestamp::MAX, ScanDirection::Forward, limit)
                .map(|rows| {
                    let rows: Vec<_> = rows
                        .into_iter()
                        .map(|(key, version)| (key, version.value, version.commit_ts.as_nanos()))
                        .collect();
                    let resume_key = if rows.len() < limit { resume_key } else { None };
                    ScanResult { rows, resume_key }
                })
                .map_err(internal);
            let _ = reply.send(result);
        }
        ReadRequest::Lookup { key, reply } => {
            let meta = replica.state.meta().expect("lookups go to the meta range");
            let result = meta.lookup(&key).cloned().ok_or_else(|| {
                NodeError::Unavailable(
                    "no range is recorded for this key yet (a split is being recorded); retry"
                        .into(),
                )
            });
            let _ = reply.send(result);
        }
        ReadRequest::List { reply } => {
            let meta = replica.state.meta().expect("listings go to the meta range");
            let _ = reply.send(Ok(meta.descriptors().cloned().collect()));
        }
    }
}
