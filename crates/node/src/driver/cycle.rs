//! The persist–send–apply cycle over every awake replica: group commit, messages batched per
//! peer, committed entries applied with their effects (splits, meta updates), acknowledgements
//! after commit-wait, and reads served once their index is applied.

use super::*;

impl<E: Engine> Driver<E> {
    /// Runs one persist–send–apply cycle over every replica.
    pub(super) fn cycle(&mut self) -> Result<(), NodeError> {
        let mut durable = WriteBatch::new();
        let mut readies: Vec<(RangeId, Ready)> = Vec::new();
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if let Some(metadata) = replica.compaction.take() {
                let staged = replica.raft.storage().stage_compaction(metadata, &mut durable);
                replica.raft.storage_mut().on_persisted(staged);
            }
            if !replica.raft.has_ready() {
                continue;
            }
            let ready = replica.raft.ready().map_err(internal)?;
            readies.push((replica.range, ready));
        }
        // Newest spans first: a replica installing a snapshot from before a split must see
        // the replicas of the ranges split off it that install in the same cycle, to leave
        // their spans alone (`newer_overlapping_replicas` reads their in-memory state).
        let mut installs: Vec<(RangeId, &Snapshot)> = readies
            .iter()
            .filter_map(|(range, ready)| ready.snapshot.as_ref().map(|snapshot| (*range, snapshot)))
            .collect();
        installs.sort_by_key(|(_, snapshot)| {
            std::cmp::Reverse(snapshot_descriptor(snapshot).map_or(0, |d| d.generation))
        });
        for (range, snapshot) in installs {
            let range = &range;
            let protected = if self.switches.snapshot_overwrites_newer_ranges {
                Vec::new()
            } else {
                self.newer_overlapping_replicas(*range, snapshot)
            };
            let clear = !self.switches.snapshot_keeps_old_data;
            let replica = self.replicas.get_mut(range).expect("replica exists");
            replica
                .state
                .stage_install(snapshot, &protected, clear, &mut durable)
                .map_err(internal)?;
            replica.size_bytes = None;
            let installed = replica.state.descriptor().clone();
            self.cede_to_newer(&installed);
            self.cede_from(*range);
            let replica = self.replicas.get_mut(range).expect("replica exists");
            // What became of proposals in the log the snapshot replaced is unknown here.
            replica.leadership.abandon(
                || NodeError::Unavailable("the replica was replaced by a snapshot".into()),
                "a snapshot replaced the replica's log",
            );
        }
        if readies.is_empty() && durable.is_empty() {
            // Lease reads of this cycle may be servable at once.
            self.serve_confirmed_reads();
            self.advance_all_snapshot_reads();
            self.advance_all_follower_reads();
            self.admit_all();
            self.forget_quiet_replicas();
            return Ok(());
        }
        let mut staged = Vec::new();
        for (range, ready) in &readies {
            let replica = self.replicas.get_mut(range).expect("replica exists");
            staged.push(replica.raft.storage().stage(ready, &mut durable));
        }
        if !durable.is_empty() {
            let (size, started) = (durable.size_bytes(), tokio::time::Instant::now());
            self.engine.write(durable, true).map_err(internal)?;
            metrics::histogram!("meridian_storage_sync_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("meridian_storage_sync_batch_bytes").record(size as f64);
        }
        // Messages grouped by destination node, sent only now that their promises are durable.
        let mut outgoing: BTreeMap<NodeId, Vec<(RangeId, Message)>> = BTreeMap::new();
        for ((range, ready), staged) in readies.iter_mut().zip(staged) {
            let replica = self.replicas.get_mut(range).expect("replica exists");
            replica.raft.storage_mut().on_persisted(staged);
            for message in ready.messages.drain(..) {
                outgoing.entry(message.to).or_default().push((*range, message));
            }
        }
        for (to, messages) in outgoing {
            metrics::counter!("meridian_raft_messages_sent_total").increment(messages.len() as u64);
            self.transport.send(to, messages);
        }
        let mut applied_batch = WriteBatch::new();
        let mut acknowledgements = Vec::new();
        // Garbage to collect once the applied batch is written: `(range, start, end, horizon)`.
        let mut collections = Vec::new();
        // The earliest commit whose locks go once its commit-wait is over.
        let mut first_release: Option<Timestamp> = None;
        // Replicas of ranges split off here, created once the loop is done, and whether this
        // node led the range they split from.
        let mut children: Vec<AppliedState> = Vec::new();
        let mut campaign = Vec::new();
        let mut publish = Vec::new();
        // Whether a split this node proposed applied (fault injection aborts after it).
        let mut own_split_applied = false;
        // Parts prepared here whose votes go to their coordinators: `(range, txn,
        // coordinator, prepare_ts)`; and ranges whose coordinators have outputs.
        let mut votes = Vec::new();
        let mut coordinators = BTreeSet::new();
        for (range, ready) in readies {
            let replica = self.replicas.get_mut(&range).expect("replica exists");
            metrics::counter!("meridian_raft_entries_applied_total")
                .increment(ready.committed_entries.len() as u64);
            for entry in &ready.committed_entries {
                let outcome = replica.state.apply(entry, &mut applied_batch).map_err(internal)?;
                let mut split_descriptors = Vec::new();
                match &outcome {
                    Applied::Write(_) | Applied::Prepared { .. } => {
                        if let Applied::Prepared { txn, prepare_ts } = &outcome {
                            debug!(range = range.0, %txn, prepare_ts, "transaction prepared");
                        }
                        // A prepare record carries the writes its outcome applies.
                        if let (Some(size), EntryKind::Command(data)) =
                            (replica.size_bytes.as_mut(), &entry.kind)
                        {
                            *size += data.len() as u64;
                        }
                    }
                    Applied::Collect { horizon, start, end } => {
                        collections.push((range, start.clone(), end.clone(), *horizon));
                    }
                    Applied::Decided { txn, decision } => {
                        debug!(range = range.0, %txn, ?decision, "transaction decided");
                        coordinators.insert(range);
                        if replica.raft.role() == Role::Leader {
                            // Its own part's locks go, a commit's after commit-wait.
                            let commit_wait = match decision {
                                meridian_txn::Decision::Commit { commit_ts } => Some(*commit_ts),
                                meridian_txn::Decision::Abort { .. } => None,
                            };
                            match commit_wait {
                                Some(ts) => {
                                    let commits = metrics::counter!(
                                        "meridian_txn_commits_total",
                                        "protocol" => "two_phase"
                                    );
                                    commits.increment(1);
                                    first_release = Some(first_release.map_or(ts, |t| t.min(ts)));
                                }
                                None => {
                                    let aborts = metrics::counter!(
                                        "meridian_txn_aborts_total",
                                        "reason" => "coordinator"
                                    );
                                    aborts.increment(1);
                                }
                            }
                            replica.leadership.txns.on_decided(*txn, commit_wait);
                        }
                    }
                    Applied::Resolved { txn } => {
                        debug!(range = range.0, %txn, "transaction outcome applied");
                        if replica.raft.role() == Role::Leader {
                            // Outcomes of commits are sent after the coordinator's
                            // commit-wait: the locks go at once.
                            replica.leadership.txns.on_decided(*txn, None);
                        }
                    }
                    Applied::RangeIds(first) => {
                        debug!(
                            index = entry.index.0,
                            term = entry.term.0,
                            first,
                            "range ids allocated"
                        );
                    }
                    Applied::Split(new_ranges) => {
                        info!(
                            range = range.0,
                            index = entry.index.0,
                            new_ranges = ?new_ranges.iter().map(|d| d.id.0).collect::<Vec<_>>(),
                            "range split"
                        );
                        replica.size_bytes = None;
                        split_descriptors.push(replica.state.applied().wire_descriptor());
                        for descriptor in new_ranges {
                            let mut state = replica.state.child_state(descriptor.clone());
                            if self.switches.child_without_floor {
                                state.max_timestamp = 0;
                                state.closed_timestamp = 0;
                            }
                            split_descriptors.push(state.wire_descriptor());
                            children.push(state);
                        }
                        if replica.raft.role() == Role::Leader {
                            publish.extend(split_descriptors.iter().cloned());
                        }
                        // The voters take turns to campaign for the new ranges, so that their
                        // leaders are spread from the start.
                        let voters = &replica.state.applied().config.voters;
                        for (i, descriptor) in new_ranges.iter().enumerate() {
                            if voters.iter().nth(i % voters.len().max(1)) == Some(&self.node_id) {
                                campaign.push(descriptor.id);
                            }
                        }
                    }
                    _ => {}
                }
                let Some(proposal) = replica.leadership.proposals.remove(&entry.index) else {
                    continue;
                };
                if proposal.term != entry.term {
                    // Another leader's entry took the index: this proposal can never commit.
                    proposal.pending.fail(NodeError::Unavailable(
                        "leadership changed; the command was not committed".into(),
                    ));
                    continue;
                }
                match (proposal.pending, outcome) {
                    (Pending::Write { timestamp, reply }, Applied::Write(applied))
                        if applied == timestamp =>
                    {
                        acknowledgements.push((reply, timestamp));
                    }
                    (Pending::TxnCommit { txn, timestamp, reply }, Applied::Write(applied))
                        if applied == timestamp =>
                    {
                        // Spanner holds the locks through commit-wait.
                        metrics::counter!("meridian_txn_commits_total", "protocol" => "one_phase")
                            .increment(1);
                        let commit_ts = Timestamp::from_nanos(timestamp);
                        replica.leadership.txns.release_after_commit_wait(txn, commit_ts);
                        first_release = Some(first_release.map_or(commit_ts, |t| t.min(commit_ts)));
                        acknowledgements.push((reply, timestamp));
                    }
                    (Pending::TxnCommit { txn, reply, .. }, outcome) => {
                        // Refused alike everywhere (a split applied first): nothing was
                        // written, and its locks go.
                        replica.leadership.txns.release(txn);
                        let error = match outcome {
                            Applied::KeyNotInRange => key_not_in_range(replica),
                            Applied::Rejected(reason) => NodeError::InvalidArgument(reason),
                            _ => NodeError::Ambiguous(
                                "the commit applied with an unexpected outcome".into(),
                            ),
                        };
                        let _ = reply.send(Err(error));
                    }
                    (
                        Pending::TxnPrepare { txn, coordinator, reply },
                        Applied::Prepared { prepare_ts, .. },
                    ) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(prepare_ts));
                        }
                        votes.push((range, txn, coordinator, Timestamp::from_nanos(prepare_ts)));
                    }
                    (Pending::TxnPrepare { txn, coordinator, reply }, outcome) => {
                        // Refused alike everywhere (a split applied first, or the transaction
                        // was decided already): nothing was prepared, and its locks go.
                        replica.leadership.txns.release(txn);
                        let error = match outcome {
                            Applied::KeyNotInRange => key_not_in_range(replica),
                            Applied::Rejected(reason) => NodeError::InvalidArgument(reason),
                            _ => NodeError::Ambiguous(
                                "the prepare applied with an unexpected outcome".into(),
                            ),
                        };
                        match reply {
                            Some(reply) => drop(reply.send(Err(error))),
                            None if coordinator.0 == range.0 => {
                                let reason = format!("its coordinator's own part failed: {error}");
                                replica.leadership.txns.own_part_failures.push((txn, reason));
                                coordinators.insert(range);
                            }
                            None => {}
                        }
                    }
                    (Pending::TxnOutcome { reply }, Applied::Resolved { .. }) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Pending::Split { reply }, Applied::Split(_)) => {
                        own_split_applied = true;
                        let _ = reply.send(Ok(split_descriptors));
                    }
                    (Pending::UpdateDescriptors { reply }, Applied::DescriptorsUpdated) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Pending::AllocateRangeIds { reply }, Applied::RangeIds(first)) => {
                        let _ = reply.send(Ok(first));
                    }
                    (pending, Applied::KeyNotInRange) => {
                        pending.fail(key_not_in_range(replica));
                    }
                    (pending, Applied::Rejected(reason)) => {
                        pending.fail(NodeError::InvalidArgument(reason));
                    }
                    // The entry is this proposal's (same index and term), yet it applied
                    // as something unexpected: report no verdict on it.
                    (pending, _) => pending.fail(NodeError::Ambiguous(
                        "the command applied with an unexpected outcome".into(),
                    )),
                }
            }
            let had_committed = !ready.committed_entries.is_empty();
            replica.raft.advance(ready).map_err(internal)?;
            if had_committed {
                replica.state.stage_applied_state(&mut applied_batch);
            }
            let applied = replica.raft.applied_index();
            if applied.0 > replica.raft.storage().first_index().0 + COMPACTION_THRESHOLD
                && let Ok(metadata) = replica.raft.applied_snapshot_metadata()
            {
                // Staged into the next synced batch, after this cycle's applied state.
                replica.compaction = Some(metadata);
            }
        }
        let children = self.new_replicas_of_splits(children)?;
        let sync = !children.is_empty();
        Self::stage_replicas(&children, &mut applied_batch);
        if !applied_batch.is_empty() {
            self.engine.write(applied_batch, sync).map_err(internal)?;
        }
        self.collect_applied_garbage(collections)?;
        for child in &children {
            let range = child.applied.descriptor.id;
            self.open_replica(range)?;
            self.cede_from(range);
            // One voter campaigns at once for each new range, so that it serves within a
            // round trip rather than an election timeout.
            if let Some(replica) = self.replicas.get_mut(&range) {
                replica.raft.forget_restart_promise();
                if campaign.contains(&range) {
                    replica.raft.campaign();
                }
            }
        }
        if self.crash_after_split && own_split_applied {
            error!(
                "fault injection: aborting right after a split, before the meta range records it"
            );
            std::process::abort();
        }
        if !publish.is_empty() {
            let _ = self.background.send(Background::Publish(
                publish
                    .into_iter()
                    .map(|descriptor| {
                        let version = (descriptor.generation, descriptor.config_index);
                        (RangeId(descriptor.range_id), version, descriptor)
                    })
                    .collect(),
            ));
        }
        if let Some(commit_ts) = first_release {
            let wakeup = Instant::now() + self.truetime.now().time_until_after(commit_ts);
            self.release_wakeup = Some(self.release_wakeup.map_or(wakeup, |w| w.min(wakeup)));
        }
        for (reply, timestamp) in acknowledgements {
            acknowledge_after_commit_wait(
                &self.truetime,
                timestamp,
                self.switches.skip_commit_wait,
                move |result| drop(reply.send(result)),
            );
        }
        self.serve_confirmed_reads();
        self.fail_requests_of_former_leaders();
        for (range, txn, coordinator, prepare_ts) in votes {
            coordinators.insert(range);
            self.vote(range, txn, coordinator, prepare_ts);
        }
        for range in coordinators {
            self.settle_coordinator(range);
        }
        self.admit_all();
        self.advance_all_snapshot_reads();
        self.advance_all_follower_reads();
        self.settle_all_txn_events();
        self.forget_quiet_replicas();
        Ok(())
    }

    /// Collects the garbage of the GC records this cycle applied, now that everything applied
    /// before them is in the store (see `RangeStateMachine::apply_gc`). Unsynced: a crash
    /// before it reaches the disk leaves garbage no read at or above the horizon can see, and
    /// the next collection removes it.
    fn collect_applied_garbage(
        &mut self,
        collections: Vec<(RangeId, Vec<u8>, Option<Vec<u8>>, u64)>,
    ) -> Result<(), NodeError> {
        for (range, start, end, horizon) in collections {
            let Some(replica) = self.replicas.get_mut(&range) else { continue };
            let mut batch = WriteBatch::new();
            let removed = replica
                .state
                .stage_collect(&mut batch, &start, end.as_deref(), horizon)
                .map_err(internal)?;
            if !batch.is_empty() {
                self.engine.write(batch, false).map_err(internal)?;
            }
            debug!(range = range.0, horizon, removed, "garbage collected");
            metrics::counter!("meridian_gc_versions_removed_total").increment(removed);
            // The size estimate is recomputed from the store when next needed.
            replica.size_bytes = None;
        }
        Ok(())
    }

    /// Tells the older replicas on this node that overlap `newer` (a range's descriptor after
    /// its replica here installed a snapshot) that its span is no longer theirs: they have
    /// not applied the split that made it, and must not replay writes into it.
    pub(super) fn cede_to_newer(&mut self, newer: &RangeDescriptor) {
        if newer.id == META_RANGE {
            return;
        }
        for other in self.replicas.values_mut() {
            if other.range != newer.id && other.range != META_RANGE && other.state.is_initialized()
            {
                other.state.cede(newer);
            }
        }
    }

    /// Tells `range`'s replica which parts of its span newer replicas on this node own (it
    /// was just created by a split it may be behind of, or installed a snapshot from before
    /// one).
    pub(super) fn cede_from(&mut self, range: RangeId) {
        if range == META_RANGE {
            return;
        }
        let newer: Vec<RangeDescriptor> = self
            .replicas
            .values()
            .filter(|other| {
                other.range != range && other.range != META_RANGE && other.state.is_initialized()
            })
            .map(|other| other.state.descriptor().clone())
            .collect();
        if let Some(replica) = self.replicas.get_mut(&range) {
            for owner in &newer {
                replica.state.cede(owner);
            }
        }
    }

    /// Returns the descriptors of the initialized replicas on this node that overlap the span of
    /// `snapshot` (for `range`) and are newer: ranges split off it after the snapshot's state.
    pub(super) fn newer_overlapping_replicas(
        &self,
        range: RangeId,
        snapshot: &Snapshot,
    ) -> Vec<RangeDescriptor> {
        if range == META_RANGE {
            return Vec::new();
        }
        let Some(incoming) = snapshot_descriptor(snapshot) else { return Vec::new() };
        self.replicas
            .values()
            .filter(|other| {
                other.range != range && other.range != META_RANGE && other.state.is_initialized()
            })
            .map(|other| other.state.descriptor())
            .filter(|other| other.generation > incoming.generation && other.overlaps(&incoming))
            .cloned()
            .collect()
    }
}
