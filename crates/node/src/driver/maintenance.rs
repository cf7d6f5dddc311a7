//! The driver's maintenance round, run once a second between cycles: placement of replicas
//! and leaders, recording descriptors in the meta range, size-triggered splits, removal of
//! replicas this node no longer belongs to, and the gauges. Quiesced ranges are visited here
//! (and only here) without being woken, unless something must change.

use super::*;

impl<E: Engine> Driver<E> {
    /// Runs the maintenance round.
    ///
    /// # Errors
    ///
    /// [`NodeError::Internal`] on a storage failure.
    pub(super) fn maintain(&mut self) -> Result<(), NodeError> {
        self.hand_leaderships_away();
        self.place_replicas();
        self.record_gauges();
        self.publish_descriptors();
        self.check_membership();
        self.destroy_removed_replicas()?;
        self.collect_garbage();
        self.split_large_ranges()
    }

    /// Proposes garbage collection at the awake data ranges this node leads and serves
    /// transactions for: a GC horizon of `now().earliest - gc_ttl`, kept below every
    /// prepared transaction (it may still commit there) and every snapshot read waiting here,
    /// once it moved a tenth of the TTL (at least a second) past the range's horizon. The
    /// record applies on every replica alike (`RangeStateMachine::apply_gc`). Quiesced ranges
    /// wait until they wake; a read-only transaction older than the TTL may find its versions
    /// gone and is refused.
    fn collect_garbage(&mut self) {
        let earliest = self.truetime.now().earliest.as_nanos();
        let Some(candidate) = earliest.checked_sub(self.gc_ttl.as_nanos() as u64) else {
            return;
        };
        let step = (self.gc_ttl / 10).max(Duration::from_secs(1)).as_nanos() as u64;
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            if *range == META_RANGE || !super::two_phase::txn_ready(replica) {
                continue;
            }
            let prepared = replica.state.prepared_records().map(|r| r.prepare_ts.as_nanos()).min();
            let reading = super::snapshot_reads::oldest_fixed(replica).map(|t| t.as_nanos());
            let horizon = [Some(candidate), prepared.map(|t| t.saturating_sub(1)), reading]
                .into_iter()
                .flatten()
                .min()
                .expect("the candidate");
            if horizon < replica.state.applied().gc_horizon.saturating_add(step) {
                continue;
            }
            if replica.raft.propose(encode_gc(horizon)).is_ok() {
                metrics::counter!("meridian_raft_proposals_total").increment(1);
                debug!(range = range.0, horizon, "proposed garbage collection");
            }
        }
    }

    /// Lets every range this node leads move toward its target placement (see `placement.rs`),
    /// with at most [`MAX_MOVES_IN_FLIGHT`] rebalancing moves at a time, then hands some
    /// leaderships to less busy nodes.
    fn place_replicas(&mut self) {
        // A node that missed its last hellos gets no new replica (it counts as dead only after
        // the dead-node timeout).
        let (live, dead) = &self.liveness;
        let mut live: BTreeSet<NodeId> = live.difference(&self.unreachable).copied().collect();
        live.insert(self.node_id);
        let draining: BTreeSet<NodeId> = self
            .loads
            .iter()
            .filter(|(_, load)| load.draining)
            .map(|(node, _)| *node)
            .chain(self.draining.then_some(self.node_id))
            .collect();
        let mut load: BTreeMap<NodeId, u64> =
            self.loads.iter().map(|(node, load)| (*node, load.replicas)).collect();
        let counted = self.counted_replicas();
        self.load.replicas.store(counted, std::sync::atomic::Ordering::Relaxed);
        load.insert(self.node_id, counted);
        // Quiesced ranges are looked at every tenth round only: they rarely need a change,
        // and a node may lead thousands of them.
        self.placement_rounds += 1;
        let full_round = self.placement_rounds.is_multiple_of(QUIESCED_PLACEMENT_EVERY);
        let mut moves = self
            .replicas
            .values()
            .filter(|replica| {
                replica.raft.role() == Role::Leader
                    && !replica.raft.configuration().learners.is_empty()
            })
            .count();
        let mut input = PlacementInput {
            leader: self.node_id,
            move_source: None,
            config: Configuration::default(),
            live: live.clone(),
            dead: dead.clone(),
            draining: draining.clone(),
            load,
            commit: LogIndex(0),
            learner_match: Vec::new(),
            may_rebalance: false,
        };
        for replica in self.replicas.values_mut() {
            if replica.raft.role() != Role::Leader
                || replica.raft.config_change_pending()
                || (replica.raft.is_quiesced() && !full_round)
            {
                continue;
            }
            let config = replica.raft.configuration();
            input.learner_match = config
                .learners
                .iter()
                .map(|learner| (*learner, replica.raft.match_index(*learner).unwrap_or_default()))
                .collect();
            let rested = replica.rebalanced_at.is_none_or(|at| at.elapsed() >= REBALANCE_REST);
            input.config.clone_from(config);
            input.move_source = replica.move_source;
            input.commit = replica.raft.commit_index();
            input.may_rebalance = moves < MAX_MOVES_IN_FLIGHT && rested;
            if let Some((voters, learners)) = plan(&input) {
                info!(range = replica.range.0, from = %input.config, ?voters, ?learners, "changing replicas");
                let adds_learner = learners.len() > input.config.learners.len();
                let removed: Vec<NodeId> =
                    input.config.voters.difference(&voters).copied().collect();
                match replica.raft.propose_config_change(voters, learners) {
                    Ok(_) => {
                        replica.idle_ticks = 0;
                        self.awake.insert(replica.range);
                        if adds_learner {
                            replica.move_source = input.voter_to_remove();
                        } else if !input.config.learners.is_empty() {
                            // The learner was promoted or dropped: the move is over.
                            replica.move_source = None;
                            replica.rebalanced_at = Some(tokio::time::Instant::now());
                        }
                        for node in removed {
                            let count = input.load.entry(node).or_default();
                            *count = count.saturating_sub(1);
                        }
                        if adds_learner {
                            moves += 1;
                            // Count the replica where it goes, so later ranges of this round
                            // see it.
                            if let Some(newcomer) =
                                replica.raft.configuration().learners.iter().next()
                            {
                                *input.load.entry(*newcomer).or_default() += 1;
                            }
                        }
                    }
                    Err(error) => {
                        warn!(range = replica.range.0, %error, "could not change replicas")
                    }
                }
            }
        }
        self.spread_leaders(&live, &draining);
    }

    /// Hands every leadership to another voter while this node must not lead: its clock
    /// cannot be trusted (it must not assign timestamps) or it is being decommissioned. These
    /// go at once, transactions or not: the open transactions holding locks there lose them
    /// and retry (prepared ones keep theirs, restored by the new leader).
    fn hand_leaderships_away(&mut self) {
        if self.clock_healthy && !self.draining {
            return;
        }
        for replica in self.replicas.values_mut() {
            if replica.raft.role() != Role::Leader {
                continue;
            }
            let target = replica.raft.configuration().voters.iter().copied().find(|id| {
                *id != self.node_id
                    && !self.unreachable.contains(id)
                    && !self.loads.get(id).is_some_and(|load| load.draining)
            });
            if let Some(target) = target
                && replica.raft.transfer_leadership(target).is_ok()
            {
                self.awake.insert(replica.range);
            }
        }
    }

    /// Hands leadership of a few ranges to other voters when this node leads clearly more
    /// than its share (ranges led across live nodes, from their hellos). Ranges whose leader
    /// holds transactions' locks, or has two-phase work, are left for a later round: a
    /// transfer would make their open transactions lose their locks and retry, so rebalancing
    /// waits until they are quiet rather than abort them.
    fn spread_leaders(&mut self, live: &BTreeSet<NodeId>, draining: &BTreeSet<NodeId>) {
        if self.draining {
            return; // Every leadership goes, in the tick loop.
        }
        let leaders = |node: &NodeId| self.loads.get(node).map_or(0, |load| load.leaders);
        let mine =
            self.replicas.values().filter(|replica| replica.raft.role() == Role::Leader).count()
                as u64;
        let eligible: Vec<NodeId> =
            live.iter().copied().filter(|node| !draining.contains(node)).collect();
        if eligible.len() < 2 {
            return;
        }
        let total: u64 =
            mine + eligible.iter().filter(|node| **node != self.node_id).map(leaders).sum::<u64>();
        let share = total.div_ceil(eligible.len() as u64);
        if mine <= share + 1 {
            return;
        }
        let limit = MIN_TRANSFERS_PER_ROUND.max((mine - share) / 16);
        let mut transfers = 0;
        for replica in self.replicas.values_mut() {
            if transfers >= limit || mine - transfers <= share {
                break;
            }
            if replica.raft.role() != Role::Leader
                || replica.raft.config_change_pending()
                || replica.leadership.txns.is_busy()
                || replica.state.has_txn_work()
            {
                continue;
            }
            let target = replica
                .raft
                .configuration()
                .voters
                .iter()
                .copied()
                .filter(|voter| *voter != self.node_id && eligible.contains(voter))
                .filter(|voter| leaders(voter) + 1 < share)
                .min_by_key(|voter| leaders(voter));
            if let Some(target) = target
                && replica.raft.transfer_leadership(target).is_ok()
            {
                self.awake.insert(replica.range);
                transfers += 1;
            }
        }
        if transfers > 0 {
            info!(transfers, led = mine, share, "handing leaderships to less busy nodes");
        }
    }

    /// Asks the background task to record the descriptors of the data ranges this node leads
    /// whose current version the meta range may not have yet.
    fn publish_descriptors(&mut self) {
        let mut batch = Vec::new();
        for replica in self.replicas.values_mut() {
            let version = replica.descriptor_version();
            if replica.range == META_RANGE
                || replica.raft.role() != Role::Leader
                || !replica.state.is_initialized()
                || replica.publishing
                || replica.published == Some(version)
            {
                continue;
            }
            replica.publishing = true;
            batch.push((replica.range, version, replica.state.applied().wire_descriptor()));
        }
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(PUBLISH_CHUNK));
            let _ = self.background.send(Background::Publish(batch));
            batch = rest;
        }
    }

    /// Asks the background task whether this node still belongs to the ranges of some of its
    /// replicas. A node removed from a range while it was away (or before it applied its
    /// removal) is told by nobody else, so are asked about: replicas that have known no leader
    /// for a while; replicas waiting for a first snapshot, which may believe for ever in the
    /// leader whose message created them; and, every `replica_check_interval`, every
    /// replica (one listing of the meta range answers them all), since a quiesced replica cut off while it was removed does not tick and keeps
    /// believing in its leader, or in its own leadership of an old term.
    fn check_membership(&mut self) {
        self.membership_rounds += 1;
        let sweep = self.membership_rounds.is_multiple_of(self.sweep_rounds);
        let mut batch = Vec::new();
        for replica in self.replicas.values_mut() {
            let due = if replica.state.is_initialized() {
                replica.leaderless_ticks >= LEADERLESS_TICKS_BEFORE_CHECK || sweep
            } else {
                replica.uninitialized_rounds += 1;
                replica.uninitialized_rounds > UNINITIALIZED_ROUNDS_BEFORE_CHECK
            };
            if replica.checking_membership || !due {
                continue;
            }
            replica.checking_membership = true;
            batch.push(MembershipCheck {
                range: replica.range,
                version: replica.descriptor_version(),
                descriptor: replica.state.applied().wire_descriptor(),
                initialized: replica.state.is_initialized(),
            });
        }
        if !batch.is_empty() {
            let _ = self.background.send(Background::CheckMembership(batch));
        }
    }

    /// Destroys the replicas that applied their own removal from their range.
    fn destroy_removed_replicas(&mut self) -> Result<(), NodeError> {
        let removed: Vec<(RangeId, DescriptorVersion)> = self
            .replicas
            .values()
            .filter(|replica| {
                let config = replica.raft.configuration();
                replica.state.is_initialized()
                    && !config.is_voter(self.node_id)
                    && !config.learners.contains(&self.node_id)
            })
            .map(|replica| (replica.range, replica.descriptor_version()))
            .collect();
        for (range, version) in removed {
            self.destroy_replica(range, version)?;
        }
        Ok(())
    }

    /// Destroys the replica of `range` if it is still at `version`: deletes its Raft state
    /// (keeping its term and vote) and its data where no other replica here holds the keys.
    ///
    /// The version guards the verdict: it was that a configuration at least as new as
    /// `version` lacks this node. A replica that applied anything newer meanwhile (or received
    /// its first snapshot) is asked about again later instead.
    pub(super) fn destroy_replica(
        &mut self,
        range: RangeId,
        version: DescriptorVersion,
    ) -> Result<(), NodeError> {
        let Some(replica) = self.replicas.get(&range) else { return Ok(()) };
        if replica.descriptor_version() != version {
            if let Some(replica) = self.replicas.get_mut(&range) {
                replica.checking_membership = false;
            }
            return Ok(());
        }
        let descriptor = replica.state.descriptor().clone();
        let holes: Vec<RangeDescriptor> = self
            .replicas
            .values()
            .filter(|other| other.range != range && other.state.is_initialized())
            .map(|other| other.state.descriptor().clone())
            .filter(|other| other.overlaps(&descriptor))
            .collect();
        let initialized = replica.state.is_initialized();
        let mut batch = WriteBatch::new();
        stage_destroy_replica(self.engine.as_ref(), range, &mut batch).map_err(internal)?;
        if !initialized {
            // A replica waiting for its first snapshot holds no data (and its descriptor, a
            // default, spans every key).
        } else if range == META_RANGE {
            // The meta range's data is its index, in a key space of its own.
            if let Some(replica) = self.replicas.get_mut(&range) {
                replica.state.stage_clear_meta_index(&mut batch);
            }
        } else {
            for (start, end) in uncovered(&descriptor, &holes) {
                self.mvcc.stage_clear(&mut batch, &start, end.as_deref()).map_err(internal)?;
            }
        }
        self.engine.write(batch, true).map_err(internal)?;
        self.awake.remove(&range);
        if let Some(mut replica) = self.replicas.remove(&range) {
            replica.leadership.abandon(
                || NodeError::RangeNotFound(range),
                "the replica was destroyed (this node left the range)",
            );
            for read in replica.follower_reads.drain(..) {
                read.fail(NodeError::RangeNotFound(range));
            }
        }
        info!(range = range.0, "destroyed a replica this node no longer belongs to");
        metrics::counter!("meridian_replicas_destroyed_total").increment(1);
        Ok(())
    }

    /// Asks the background task to split the data ranges this node leads that grew past the
    /// size threshold, at their middle key.
    fn split_large_ranges(&mut self) -> Result<(), NodeError> {
        for replica in self.replicas.values_mut() {
            if replica.range == META_RANGE
                || replica.raft.role() != Role::Leader
                || !replica.state.is_initialized()
                || replica.splitting
            {
                continue;
            }
            let descriptor = replica.state.descriptor();
            let size = match replica.size_bytes {
                Some(size) => size,
                None => {
                    let size = self
                        .mvcc
                        .span_size(&descriptor.start, descriptor.end.as_deref())
                        .map_err(internal)?
                        .bytes;
                    replica.size_bytes = Some(size);
                    size
                }
            };
            if size <= self.range_max_bytes {
                continue;
            }
            let span = self
                .mvcc
                .span_size(&descriptor.start, descriptor.end.as_deref())
                .map_err(internal)?;
            replica.size_bytes = Some(span.bytes);
            if let Some(key) = span.middle_key
                && span.bytes > self.range_max_bytes
            {
                info!(range = replica.range.0, bytes = span.bytes, "range is too large; splitting");
                replica.splitting = true;
                let _ = self.background.send(Background::Split { range: replica.range, key });
            }
        }
        Ok(())
    }

    /// The replicas this node counts as its load: initialized members of their range with a
    /// known leader (a replica removed from its range is destroyed soon, but not at once).
    fn counted_replicas(&self) -> u64 {
        let node = self.node_id;
        self.replicas
            .values()
            .filter(|replica| {
                let config = replica.raft.configuration();
                replica.state.is_initialized()
                    && replica.raft.leader().is_some()
                    && (config.is_voter(node) || config.learners.contains(&node))
            })
            .count() as u64
    }

    /// Updates the gauges describing the replicas, and counts elections won (every placement
    /// round: a pass over thousands of replicas is too dear for every cycle).
    fn record_gauges(&mut self) {
        let mut led: u32 = 0;
        let mut quiesced: u32 = 0;
        let mut apply_lag = 0;
        let mut oldest_prepare: Option<Timestamp> = None;
        for replica in self.replicas.values_mut() {
            // Cheap accessors only: this runs every cycle (`status()` clones the configuration).
            let raft = &replica.raft;
            if raft.role() == Role::Leader {
                led += 1;
                if replica.led_term != Some(raft.term()) {
                    replica.led_term = Some(raft.term());
                    debug!(range = replica.range.0, term = raft.term().0, "leading");
                    metrics::counter!("meridian_raft_leader_elections_won_total").increment(1);
                }
                if replica.state.has_prepared() {
                    let oldest = replica.state.prepared_records().map(|record| record.prepare_ts);
                    oldest_prepare = oldest.chain(oldest_prepare).min();
                }
            }
            apply_lag += raft.commit_index().0 - raft.applied_index().0;
            quiesced += u32::from(raft.is_quiesced());
        }
        metrics::gauge!("meridian_ranges_quiesced").set(f64::from(quiesced));
        metrics::gauge!("meridian_ranges").set(self.replicas.len() as f64);
        self.load.leaders.store(u64::from(led), std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("meridian_ranges_led").set(f64::from(led));
        metrics::gauge!("meridian_raft_apply_lag_entries").set(apply_lag as f64);
        // The age of the oldest transaction prepared at a range this node leads (one waiting
        // for its outcome for long points at a coordinator that cannot be reached).
        let age = oldest_prepare.map_or(Duration::ZERO, |prepared| {
            self.local_now().saturating_duration_since(prepared)
        });
        metrics::gauge!("meridian_txn_prepared_oldest_age_seconds").set(age.as_secs_f64());
    }
}
