//! Two-phase commit at range leaders (Spanner §4.2.1, DESIGN §6): the coordinator's side —
//! commit requests, votes, aborts, the decision records and what follows them — and the
//! participant's side of the messages between leaders (outcomes, status queries). The pure
//! protocol is `meridian_txn`'s [`Coordinator`] and [`PreparedSet`], which live in the
//! range's replicated state (`txn_state.rs`); this module gives them requests and time and
//! carries out what they output.
//!
//! - **A commit request** names the participants (this range among them): the coordinator
//!   notes it ([`Coordinator::request_commit`]), and its own part prepares like every
//!   participant's (`txn.rs`). Participants vote once their prepare record applied, through
//!   the node's background task (`Background::TxnVote`); this range's own part votes locally.
//!   With every vote in, the coordinator proposes the decision record at the commit
//!   timestamp; the first decision record applied for a transaction decides it, and resolves
//!   the coordinator's own part in the same entry (its locks go after commit-wait).
//! - **The caller** waits for the decision ([`DecisionWaiter`]): a commit is answered only
//!   once `after(commit_ts)` holds on this node's clock (commit-wait), an abort at once, with
//!   its reason. If this node loses the leadership first, the caller is told the outcome is
//!   unknown; asking the coordinator to abort (`TxnAbort`) then answers the decision in
//!   effect — the commit, if one was logged first — so an ambiguous commit can be resolved.
//! - **Participants learn the decision** from `Background::TxnOutcome`, sent once the
//!   decision applied (a commit's only after commit-wait, so that its locks are held through
//!   it everywhere); each logs it as the outcome, which applies the writes and releases the
//!   locks. Nothing waits for these messages: a prepared participant that heard nothing for
//!   [`STATUS_QUERY_AFTER`] votes again as a status query, and the coordinator answers with
//!   the decision, or logs an abort if it knows nothing of the transaction. That one path
//!   recovers from every lost message and from leader changes on either side, so a new
//!   coordinator leader drops the re-notification of every past decision that
//!   [`Coordinator::become_leader`] produces (decisions are never forgotten yet: there would
//!   be one message per transaction ever coordinated here).
//! - **Roles.** The coordinator acts as leader exactly while the replica may serve
//!   transactions ([`txn_ready`]): it leads and applied an entry of its own term, so every
//!   decision its predecessors logged is known before it answers from them.
//!
//! [`PreparedSet`]: meridian_txn::PreparedSet

use meridian_txn::{Coordinator, CoordinatorOutput, Decision, RangeId as TxnRangeId, TxnId};

use super::txn::{CommitPart, PartKind, PartReply};
use super::*;
use crate::state_machine::{encode_decision, encode_outcome};

/// A prepared participant that heard no outcome for this long asks its coordinator.
pub(super) const STATUS_QUERY_AFTER: Duration = Duration::from_secs(2);

/// A caller waiting for the decision of a transaction this range coordinates.
pub(super) enum DecisionWaiter {
    /// A commit request: the commit after commit-wait, or a txn-retry error naming why it
    /// aborted.
    Commit(Reply<Committed>),
    /// An abort request: the decision in effect.
    Decision(Reply<Decision>),
}

impl DecisionWaiter {
    pub(super) fn fail(self, error: NodeError) {
        match self {
            DecisionWaiter::Commit(reply) => drop(reply.send(Err(error))),
            DecisionWaiter::Decision(reply) => drop(reply.send(Err(error))),
        }
    }

    /// Answers with `decision`: a commit only once `after(commit_ts)` holds (commit-wait).
    fn answer(self, truetime: &TrueTime, skip_commit_wait: bool, decision: Decision) {
        let commit_ts = match &decision {
            Decision::Commit { commit_ts } => *commit_ts,
            Decision::Abort { reason } => {
                return match self {
                    DecisionWaiter::Commit(reply) => drop(reply.send(Err(NodeError::TxnRetry(
                        format!("its coordinator aborted it: {reason}"),
                    )))),
                    DecisionWaiter::Decision(reply) => drop(reply.send(Ok(decision))),
                };
            }
        };
        acknowledge_after_commit_wait(
            truetime,
            commit_ts.as_nanos(),
            skip_commit_wait,
            move |result| match self {
                DecisionWaiter::Commit(reply) => drop(reply.send(result)),
                DecisionWaiter::Decision(reply) => drop(reply.send(result.map(|_| decision))),
            },
        );
    }
}

/// Whether `replica` may serve transactions: it leads its range and applied an entry of its
/// own term, so everything its predecessors committed (prepare records, decisions) is
/// applied.
pub(super) fn txn_ready<E: Engine>(replica: &Replica<E>) -> bool {
    replica.raft.role() == Role::Leader
        && replica.raft.log_term(replica.raft.applied_index()) == Some(replica.raft.term())
}

/// Gives the range's coordinator the leader role exactly while the replica may serve
/// transactions (see the module docs for the re-notifications it drops).
pub(super) fn sync_coordinator_role<E: Engine>(replica: &mut Replica<E>) {
    let leads = txn_ready(replica);
    let coordinator: &mut Coordinator = replica.state.coordinator_mut();
    if leads && !coordinator.is_leader() {
        coordinator.become_leader();
        let _ = coordinator.take_outputs();
    } else if !leads && coordinator.is_leader() {
        coordinator.become_follower();
    }
}

/// The coordinator's timestamp floor: above everything the range applied and everything its
/// leader served or assigned.
fn floor_of<E: Engine>(replica: &Replica<E>) -> Timestamp {
    let applied = replica.state.applied().safe_timestamp();
    Timestamp::from_nanos(applied.max(replica.raft.max_served_timestamp()))
}

impl<E: Engine> Driver<E> {
    /// A commit request: a one-range commit (no other participant), or a two-phase commit
    /// this range coordinates (see the module docs).
    pub(super) fn txn_commit(
        &mut self,
        range: RangeId,
        commit: TxnCommit,
        deadline: Instant,
        reply: Reply<Committed>,
    ) {
        let TxnCommit { txn, priority, held_since, writes, participants } = commit;
        let own = TxnRangeId(range.0);
        if participants.is_empty() || participants == BTreeSet::from([own]) {
            let kind = PartKind::OnePhase;
            let reply = Some(PartReply::Commit(reply));
            let part = CommitPart { txn, priority, writes, kind, deadline, reply };
            return self.start_part(range, part, held_since);
        }
        if !participants.contains(&own) {
            let error =
                format!("range {} coordinates a commit it is not a participant of", range.0);
            return drop(reply.send(Err(NodeError::InvalidArgument(error))));
        }
        if range == META_RANGE {
            let error = NodeError::InvalidArgument("the meta range holds no user keys".into());
            return drop(reply.send(Err(error)));
        }
        let (interval, local_now) = (self.truetime.now(), self.local_now());
        let replica = match self.coordinating(range, txn) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        let floor = floor_of(replica);
        let participant_count = participants.len();
        let coordinator = replica.state.coordinator_mut();
        if let Err(error) =
            coordinator.request_commit(txn, participants, interval, local_now, floor)
        {
            return drop(reply.send(Err(error.into())));
        }
        let decided = coordinator.decision(txn).is_some();
        replica
            .leadership
            .txns
            .decision_waiters
            .entry(txn)
            .or_default()
            .push(DecisionWaiter::Commit(reply));
        // Its own part prepares, unless this is a repeated request (then the part is decided,
        // prepared, or on its way, and starting it again changes nothing).
        if !decided && replica.state.prepared_record(txn).is_none() {
            metrics::histogram!("meridian_txn_participants").record(participant_count as f64);
            let kind = PartKind::Coordinator;
            let part = CommitPart { txn, priority, writes, kind, deadline, reply: None };
            self.start_part(range, part, held_since);
        }
        self.settle_coordinator(range);
    }

    /// The replica of `range` for a coordinator's request about `txn` (see `txn_replica`).
    /// Refuses it if the transaction is prepared there as a participant of another
    /// coordinator: only that one decides it.
    fn coordinating(&mut self, range: RangeId, txn: TxnId) -> Result<&mut Replica<E>, NodeError> {
        let replica = self.txn_replica(range)?;
        replica.idle_ticks = 0;
        match replica.state.prepared_record(txn) {
            Some(record) if record.coordinator.0 != range.0 => {
                Err(NodeError::InvalidArgument(format!(
                    "transaction {txn} is prepared here for coordinator {}, which alone decides it",
                    record.coordinator
                )))
            }
            _ => Ok(replica),
        }
    }

    /// Locks a transaction's writes at `range` before its two-phase commit (see `txn.rs`).
    pub(super) fn txn_lock_writes(
        &mut self,
        range: RangeId,
        lock: TxnPrepare,
        deadline: Instant,
        reply: Reply<u64>,
    ) {
        let TxnPrepare { txn, priority, held_since, writes, .. } = lock;
        if writes.is_empty() {
            let error = NodeError::InvalidArgument("a lock request names no keys".into());
            return drop(reply.send(Err(error)));
        }
        let kind = PartKind::LockOnly;
        let reply = Some(PartReply::Value(reply));
        let part = CommitPart { txn, priority, writes, kind, deadline, reply };
        self.start_part(range, part, held_since);
    }

    /// A participant's part of a two-phase commit (see `txn.rs`).
    pub(super) fn txn_prepare(
        &mut self,
        range: RangeId,
        prepare: TxnPrepare,
        deadline: Instant,
        reply: Reply<u64>,
    ) {
        let TxnPrepare { txn, priority, held_since, coordinator, writes } = prepare;
        if coordinator == TxnRangeId(range.0) {
            let error = "the coordinator's own part comes with its commit request, not a prepare";
            return drop(reply.send(Err(NodeError::InvalidArgument(error.into()))));
        }
        let kind = PartKind::Participant { coordinator };
        let reply = Some(PartReply::Value(reply));
        let part = CommitPart { txn, priority, writes, kind, deadline, reply };
        self.start_part(range, part, held_since);
    }

    /// Aborts a transaction this range coordinates unless a decision was logged first;
    /// answers the decision in effect.
    pub(super) fn txn_abort(
        &mut self,
        range: RangeId,
        txn: TxnId,
        participants: BTreeSet<TxnRangeId>,
        reason: String,
        reply: Reply<Decision>,
    ) {
        let replica = match self.coordinating(range, txn) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        let txns = &mut replica.leadership.txns;
        if txns.is_committing(txn) {
            txns.fail_commit(txn, NodeError::TxnRetry(format!("transaction {txn} is aborting")));
        }
        txns.decision_waiters.entry(txn).or_default().push(DecisionWaiter::Decision(reply));
        replica.state.coordinator_mut().request_abort(txn, participants, reason);
        self.settle_coordinator(range);
    }

    /// A participant's vote (or status query) at this coordinator.
    pub(super) fn txn_vote(
        &mut self,
        range: RangeId,
        txn: TxnId,
        participant: TxnRangeId,
        prepare_ts: Timestamp,
        query: bool,
        reply: Reply<()>,
    ) {
        let replica = match self.coordinating(range, txn) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        let floor = floor_of(replica);
        replica.state.coordinator_mut().on_prepared(txn, participant, prepare_ts, query, floor);
        let _ = reply.send(Ok(()));
        self.settle_coordinator(range);
    }

    /// The coordinator's decision at this participant: logged as the outcome if the
    /// transaction is prepared here.
    pub(super) fn txn_outcome(
        &mut self,
        range: RangeId,
        txn: TxnId,
        decision: Decision,
        reply: Reply<()>,
    ) {
        let replica = match self.txn_replica(range) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        if replica.state.prepared_record(txn).is_some_and(|record| record.coordinator.0 == range.0)
        {
            let error = format!("transaction {txn} is coordinated here: its decision resolves it");
            return drop(reply.send(Err(NodeError::InvalidArgument(error))));
        }
        if replica.state.prepared_record(txn).is_none() {
            // Resolved already, or its prepare has not applied yet (then it asks once it has).
            // A part still taking its locks stops on an abort.
            let txns = &mut replica.leadership.txns;
            if matches!(decision, Decision::Abort { .. }) && txns.is_committing(txn) {
                let error =
                    NodeError::TxnRetry(format!("its coordinator aborted it: {decision:?}"));
                txns.fail_commit(txn, error);
            }
            let _ = reply.send(Ok(()));
            return self.settle_txn_events(range);
        }
        replica.idle_ticks = 0;
        let command = encode_outcome(txn, &decision);
        super::leader::propose_tracked(replica, command, Pending::TxnOutcome { reply });
    }

    /// Carries out what `range`'s coordinator output: proposes its records, answers the
    /// callers waiting for decisions, and hands outcomes for the participants to the
    /// background task. Aborts first the transactions whose own part failed here.
    pub(super) fn settle_coordinator(&mut self, range: RangeId) {
        let (truetime, skip_commit_wait) = (&self.truetime, self.switches.skip_commit_wait);
        let Some(replica) = self.replicas.get_mut(&range) else { return };
        let own = TxnRangeId(range.0);
        for (txn, reason) in std::mem::take(&mut replica.leadership.txns.own_part_failures) {
            replica.state.coordinator_mut().on_prepare_failed(txn, own, reason);
        }
        for output in replica.state.coordinator_mut().take_outputs() {
            match output {
                CoordinatorOutput::Propose { txn, record } => {
                    replica.idle_ticks = 0;
                    // The record raises the range's floor to the commit timestamp when it
                    // applies; no entry proposed after it may carry a smaller timestamp, or a
                    // follower that applied the record would take the floor for its safe
                    // time while an earlier write is still to come (`follower_reads.rs`).
                    if let Decision::Commit { commit_ts } = record.decision {
                        replica.raft.record_assigned_timestamp(commit_ts.as_nanos());
                    }
                    match replica.raft.propose(encode_decision(txn, &record)) {
                        Ok(_) => metrics::counter!("meridian_raft_proposals_total").increment(1),
                        Err(error) => {
                            debug!(range = range.0, %txn, %error, "decision record refused");
                            if !replica.state.coordinator_mut().on_proposal_refused(txn) {
                                // Not proposed again: nothing was logged, and the callers
                                // may ask again.
                                let waiters = replica.leadership.txns.decision_waiters.remove(&txn);
                                for waiter in waiters.into_iter().flatten() {
                                    waiter.fail(NodeError::Unavailable(format!(
                                        "the coordinator could not log the abort: {error}"
                                    )));
                                }
                            }
                        }
                    }
                }
                CoordinatorOutput::Reply { txn, decision } => {
                    let waiters = replica.leadership.txns.decision_waiters.remove(&txn);
                    for waiter in waiters.into_iter().flatten() {
                        waiter.answer(truetime, skip_commit_wait, decision.clone());
                    }
                }
                CoordinatorOutput::Notify { txn, participants, decision } => {
                    for participant in participants.into_iter().filter(|range| *range != own) {
                        let _ = self.background.send(Background::TxnOutcome {
                            participant: RangeId(participant.0),
                            txn,
                            decision: decision.clone(),
                        });
                    }
                }
            }
        }
    }

    /// On ticks: keeps coordinators' roles in step with leadership; at leaders with
    /// two-phase work, times out votes, proposes refused records again, and sends the status
    /// queries of prepared transactions that heard nothing.
    pub(super) fn tick_two_phase(&mut self) {
        let local_now = self.local_now();
        let mut settle = Vec::new();
        for range in &self.awake {
            let Some(replica) = self.replicas.get_mut(range) else { continue };
            sync_coordinator_role(replica);
            let failures = !replica.leadership.txns.own_part_failures.is_empty();
            if !txn_ready(replica) || !(replica.state.has_txn_work() || failures) {
                continue;
            }
            replica.state.coordinator_mut().tick(local_now);
            let floor = floor_of(replica);
            let own = TxnRangeId(range.0);
            for (txn, coordinator, prepare_ts) in
                replica.state.prepared_mut().due_queries(local_now, STATUS_QUERY_AFTER)
            {
                debug!(range = range.0, %txn, %coordinator, "asking a prepared transaction's coordinator");
                if coordinator == own {
                    replica.state.coordinator_mut().on_prepared(txn, own, prepare_ts, true, floor);
                } else {
                    let _ = self.background.send(Background::TxnVote {
                        coordinator: RangeId(coordinator.0),
                        txn,
                        participant: *range,
                        prepare_ts,
                        query: true,
                    });
                }
            }
            settle.push(*range);
        }
        for range in settle {
            self.settle_coordinator(range);
        }
    }

    /// Casts the vote of a part whose prepare record applied at `range`'s leader: locally if
    /// this range coordinates, otherwise through the background task.
    pub(super) fn vote(
        &mut self,
        range: RangeId,
        txn: TxnId,
        coordinator: TxnRangeId,
        prepare_ts: Timestamp,
    ) {
        let Some(replica) = self.replicas.get_mut(&range) else { return };
        if coordinator == TxnRangeId(range.0) {
            sync_coordinator_role(replica);
            let floor = floor_of(replica);
            let own = TxnRangeId(range.0);
            replica.state.coordinator_mut().on_prepared(txn, own, prepare_ts, false, floor);
        } else {
            let _ = self.background.send(Background::TxnVote {
                coordinator: RangeId(coordinator.0),
                txn,
                participant: range,
                prepare_ts,
                query: false,
            });
        }
    }
}
