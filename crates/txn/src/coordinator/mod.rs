//! The coordinator of two-phase commit at one range's leader (Spanner §4.2.1, DESIGN §6).
//!
//! A client commits a transaction that wrote at several ranges by picking one of them as the
//! coordinator: it asks every participant to prepare, and the coordinator to commit, naming
//! the participants ([`Coordinator::request_commit`]). Each participant — the coordinator's
//! own range too — takes its write locks, logs a prepare record at a prepare timestamp and
//! *votes* ([`Coordinator::on_prepared`]). (Spanner's coordinator logs no prepare record of
//! its own; here it does, in parallel with the others, so that its locks and writes survive a
//! leader change and a split like every participant's, at the price of one more Raft write.) Once every participant voted, the coordinator picks the
//! commit timestamp `s` ([`commit_timestamp`]) and proposes a commit record through its
//! range's Raft group; any failure proposes an abort record instead. Records take effect when
//! applied ([`Coordinator::apply`]), and **the first record applied for a transaction
//! decides it**: a later one is ignored. That single rule makes every path safe to race — a
//! commit proposed by one leader and an abort proposed by the next, a participant's status
//! query and the client's commit — and makes commit idempotent by transaction id: asking
//! again returns the logged decision.
//!
//! A prepared participant never aborts on its own; when it hears nothing it votes again as a
//! status query, and a coordinator that knows nothing of the transaction logs an abort for it
//! (it cannot have committed it: a commit needs this participant's vote). A coordinator whose
//! client or participants fall silent aborts after [`CoordinatorOptions::vote_timeout`].
//! A new leader ([`Coordinator::become_leader`]) has lost the votes and requests in memory,
//! but keeps the applied decisions and notifies their participants again; clients re-send
//! their commit (idempotent), and participants vote again by status query.
//!
//! Only the leader's replica produces outputs (followers apply records alike), returned by
//! [`Coordinator::take_outputs`]: records to propose, replies to the
//! client (for a commit, after commit-wait until `after(s)`, which the node overlaps with the
//! record's replication), and outcomes to send to participants.
//!
//! Left for the node wiring: forgetting decisions once every participant applied them (a
//! replicated record).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meridian_clock::{Interval, Timestamp};

use crate::error::invalid_input;
use crate::{RangeId, Result, TxnId};

#[cfg(test)]
mod tests;

/// How a transaction ended, as its coordinator's range logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Committed at `commit_ts`.
    Commit {
        /// The commit timestamp `s`.
        commit_ts: Timestamp,
    },
    /// Aborted, for this reason.
    Abort {
        /// Why, for the client's message.
        reason: String,
    },
}

/// The record a coordinator logs for a transaction: its decision and the participants that
/// must learn it (the coordinator's own range among them when it has a part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnRecord {
    /// The decision.
    pub decision: Decision,
    /// The participants.
    pub participants: BTreeSet<RangeId>,
}

/// Something the node must do for the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorOutput {
    /// Propose this record through the range's Raft group. The range's timestamp floor rises
    /// to a commit record's `commit_ts` when it applies; until then the transaction's own
    /// prepared part there (at or below `commit_ts`) holds its locks.
    Propose {
        /// The transaction.
        txn: TxnId,
        /// The record.
        record: TxnRecord,
    },
    /// Answer the client's commit request with the logged decision; for a commit, only once
    /// `after(commit_ts)` holds (commit-wait).
    Reply {
        /// The transaction.
        txn: TxnId,
        /// The decision.
        decision: Decision,
    },
    /// Send the logged decision to these participants.
    Notify {
        /// The transaction.
        txn: TxnId,
        /// The participants to tell.
        participants: BTreeSet<RangeId>,
        /// The decision.
        decision: Decision,
    },
}

/// Options of a coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorOptions {
    /// A commit request still missing votes this long after it arrived is aborted.
    pub vote_timeout: Duration,
    /// Test-only switches that break one rule each, so that tests can show the simulation
    /// catches the violation. All off by default; never set them elsewhere.
    #[doc(hidden)]
    pub switches: CoordinatorSwitches,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            vote_timeout: Duration::from_secs(10),
            switches: CoordinatorSwitches::default(),
        }
    }
}

/// Switches that deliberately break a commit rule (see [`CoordinatorOptions::switches`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorSwitches {
    /// A record applied later replaces the decision (breaks "the first record logged
    /// decides").
    pub later_record_wins: bool,
    /// Propose the commit once the first vote arrived (breaks "a commit needs every
    /// participant's vote").
    pub commit_on_first_vote: bool,
}

/// A commit request collecting votes (leader memory).
#[derive(Clone, Debug)]
struct PendingCommit {
    participants: BTreeSet<RangeId>,
    votes: BTreeMap<RangeId, Timestamp>,
    /// The clock reading when the request arrived: `s` is above its latest.
    arrival: Interval,
    /// When it arrived, on the local clock, for the vote timeout.
    arrived_at: Timestamp,
    /// The last record proposed for it, if any.
    proposal: Option<TxnRecord>,
    /// Whether Raft refused that proposal, so that the next tick proposes it again.
    propose_again: bool,
}

/// The two-phase-commit coordinator state of one range (see the module documentation).
///
/// Invariants:
/// - `decisions` changes only by [`Coordinator::apply`], identically on every replica, and a
///   transaction's decision never changes once recorded.
/// - A commit record is proposed only with a vote from every participant, at a timestamp
///   at or above every vote and above the request's arrival and the range's floor.
#[derive(Debug, Default)]
pub struct Coordinator {
    options: CoordinatorOptions,
    /// Whether this replica leads the range: only a leader produces outputs.
    is_leader: bool,
    /// Replicated: the decision of every transaction decided here.
    decisions: BTreeMap<TxnId, TxnRecord>,
    /// Leader memory: commit requests collecting votes or waiting for their record.
    pending: BTreeMap<TxnId, PendingCommit>,
    /// Leader memory: votes that arrived before their commit request.
    early_votes: BTreeMap<TxnId, BTreeMap<RangeId, Timestamp>>,
    /// Leader memory: transactions whose client waits for the decision.
    clients_waiting: BTreeSet<TxnId>,
    outputs: Vec<CoordinatorOutput>,
}

/// Formats a set of ranges for messages: `[r2, r3]`.
fn list_ranges(ranges: &BTreeSet<RangeId>) -> String {
    let names: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    format!("[{}]", names.join(", "))
}

/// Returns the commit timestamp for a transaction whose commit request arrived when the
/// coordinator's clock read `arrival`, with the participants' prepare timestamps, at a
/// coordinator whose range assigned or served timestamps up to `floor`: at or above every
/// prepare timestamp, above `arrival.latest` (so `s` is after the request's real-time start,
/// which commit-wait turns into external consistency), and above the floor.
///
/// Spanner's coordinator, which logs no prepare record, needs the last two terms. Here the
/// coordinator's range prepares its own part, after the request arrived and above its floor,
/// so its own vote already implies both (while it is prepared, conflicting writers wait for
/// its locks and reads at or above its prepare timestamp wait for its outcome): they stay as
/// a second line of defence, and a test-only switch that drops the floor goes uncaught by the
/// simulation for that reason.
pub fn commit_timestamp(
    arrival: Interval,
    prepare_timestamps: impl IntoIterator<Item = Timestamp>,
    floor: Timestamp,
) -> Timestamp {
    prepare_timestamps.into_iter().fold(arrival.latest.next().max(floor.next()), Timestamp::max)
}

/// Returns the prepare timestamp a participant whose clock reads `now` and whose range
/// assigned or served timestamps up to `floor` gives a transaction: at least `now.latest` and
/// above the floor.
pub fn prepare_timestamp(now: Interval, floor: Timestamp) -> Timestamp {
    now.latest.max(floor.next())
}

impl Coordinator {
    /// Returns a coordinator with no decisions.
    pub fn new(options: CoordinatorOptions) -> Coordinator {
        Coordinator { options, ..Coordinator::default() }
    }

    /// The client asks to commit `txn`, whose participants are `participants` (their votes
    /// decide; the coordinator's own range votes like the others), at clock reading `now` (`local_now` on the local clock, for the vote
    /// timeout), on a range whose timestamp floor is `floor`. Asking again is harmless: a
    /// decided transaction gets its decision at once.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when this replica is not the
    /// leader, or a request repeated while votes are collected names other participants.
    pub fn request_commit(
        &mut self,
        txn: TxnId,
        participants: BTreeSet<RangeId>,
        now: Interval,
        local_now: Timestamp,
        floor: Timestamp,
    ) -> Result<()> {
        if !self.is_leader {
            return Err(invalid_input!("commit of {txn} sent to a replica that is not the leader"));
        }
        if let Some(record) = self.decisions.get(&txn) {
            // A record logged for a status query names only the participant that asked; the
            // others the client names learn the decision too (an abort, for a range that is
            // not among a commit's voters).
            let decision = record.decision.clone();
            for range in participants.difference(&record.participants).copied().collect::<Vec<_>>()
            {
                self.notify_outsider(txn, range);
            }
            self.outputs.push(CoordinatorOutput::Reply { txn, decision });
            return Ok(());
        }
        self.clients_waiting.insert(txn);
        if let Some(pending) = self.pending.get(&txn) {
            if pending.participants != participants {
                return Err(invalid_input!(
                    "commit of {txn} names participants {}, earlier {}",
                    list_ranges(&participants),
                    list_ranges(&pending.participants)
                ));
            }
            return Ok(());
        }
        let votes = self.early_votes.remove(&txn).unwrap_or_default();
        self.pending.insert(
            txn,
            PendingCommit {
                participants,
                votes,
                arrival: now,
                arrived_at: local_now,
                proposal: None,
                propose_again: false,
            },
        );
        self.maybe_decide(txn, floor);
        Ok(())
    }

    /// A participant prepared `txn` at `prepare_ts` and votes to commit. With `query` set it
    /// is a prepared participant's status query (it heard nothing for a while): if the
    /// coordinator knows nothing of the transaction, it logs an abort.
    pub fn on_prepared(
        &mut self,
        txn: TxnId,
        participant: RangeId,
        prepare_ts: Timestamp,
        query: bool,
        floor: Timestamp,
    ) {
        if !self.is_leader {
            return;
        }
        if let Some(record) = self.decisions.get(&txn) {
            if record.participants.contains(&participant) {
                self.outputs.push(CoordinatorOutput::Notify {
                    txn,
                    participants: BTreeSet::from([participant]),
                    decision: record.decision.clone(),
                });
            } else {
                self.notify_outsider(txn, participant);
            }
            return;
        }
        if let Some(pending) = self.pending.get_mut(&txn) {
            if pending.participants.contains(&participant) {
                pending.votes.insert(participant, prepare_ts);
                self.maybe_decide(txn, floor);
            }
            return;
        }
        if query {
            // No commit request and no record: the client never asked, or asked a former
            // leader and will ask again. No commit record can exist without this vote, so
            // aborting is safe; if the client's request comes later, it finds the abort.
            self.early_votes.remove(&txn);
            self.outputs.push(CoordinatorOutput::Propose {
                txn,
                record: TxnRecord {
                    decision: Decision::Abort {
                        reason: format!(
                            "its coordinator had no commit request when participant \
                             {participant} asked"
                        ),
                    },
                    participants: BTreeSet::from([participant]),
                },
            });
        } else {
            self.early_votes.entry(txn).or_default().insert(participant, prepare_ts);
        }
    }

    /// A participant could not prepare `txn` (wounded, locks lost, ...): the transaction
    /// aborts, unless a commit record was already proposed (which needed that participant's
    /// vote, so it cannot be).
    pub fn on_prepare_failed(&mut self, txn: TxnId, participant: RangeId, reason: String) {
        if !self.is_leader || self.decisions.contains_key(&txn) {
            return;
        }
        let participants = self
            .pending
            .get(&txn)
            .map_or_else(|| BTreeSet::from([participant]), |pending| pending.participants.clone());
        let record = TxnRecord {
            decision: Decision::Abort {
                reason: format!("participant {participant} could not prepare: {reason}"),
            },
            participants,
        };
        self.propose(txn, record);
    }

    /// The client gives `txn` up after asking participants to prepare, or the coordinator's
    /// own locks are gone: logs an abort that `participants` learn, and answers the client
    /// with the decision in effect (a commit logged first still wins).
    pub fn request_abort(&mut self, txn: TxnId, participants: BTreeSet<RangeId>, reason: String) {
        if !self.is_leader {
            return;
        }
        if let Some(record) = self.decisions.get(&txn) {
            let decision = record.decision.clone();
            for range in participants.difference(&record.participants).copied().collect::<Vec<_>>()
            {
                self.notify_outsider(txn, range);
            }
            self.outputs.push(CoordinatorOutput::Reply { txn, decision });
            return;
        }
        self.clients_waiting.insert(txn);
        self.propose(txn, TxnRecord { decision: Decision::Abort { reason }, participants });
    }

    /// Raft refused the last record proposed for `txn` (the leader is transferring its
    /// leadership, say) while this replica stays leader: the next [`Coordinator::tick`]
    /// proposes it again, so that a commit is never stranded. Returns whether it will; if
    /// not (an abort asked for outside a commit request, or for a status query), nothing was
    /// logged: the caller tells whoever waits for it, who may ask again.
    pub fn on_proposal_refused(&mut self, txn: TxnId) -> bool {
        if let Some(pending) = self.pending.get_mut(&txn)
            && pending.proposal.is_some()
        {
            pending.propose_again = true;
            return true;
        }
        false
    }

    /// Proposes again the records Raft refused, and aborts commit requests that have waited
    /// for votes longer than the vote timeout (a follower has none).
    pub fn tick(&mut self, local_now: Timestamp) {
        let timeout = self.options.vote_timeout;
        let mut proposals = Vec::new();
        for (txn, pending) in &mut self.pending {
            if pending.propose_again {
                pending.propose_again = false;
                proposals.push((*txn, pending.proposal.clone().expect("refused proposals exist")));
                continue;
            }
            if pending.proposal.is_some()
                || local_now.saturating_duration_since(pending.arrived_at) <= timeout
            {
                continue;
            }
            let missing: Vec<String> = pending
                .participants
                .iter()
                .filter(|range| !pending.votes.contains_key(range))
                .map(ToString::to_string)
                .collect();
            let record = TxnRecord {
                decision: Decision::Abort {
                    reason: format!(
                        "no vote from participants {} within {timeout:?}",
                        missing.join(", ")
                    ),
                },
                participants: pending.participants.clone(),
            };
            pending.proposal = Some(record.clone());
            proposals.push((*txn, record));
        }
        for (txn, record) in proposals {
            self.outputs.push(CoordinatorOutput::Propose { txn, record });
        }
    }

    /// Applies a logged record (on every replica, in log order) and returns the decision in
    /// effect: the first record applied for a transaction wins; later ones change nothing.
    /// At the leader, the waiting client gets the decision and the participants are told.
    pub fn apply(&mut self, txn: TxnId, record: TxnRecord) -> Decision {
        let record = if self.options.switches.later_record_wins {
            self.decisions.insert(txn, record.clone());
            record
        } else {
            self.decisions.entry(txn).or_insert(record).clone()
        };
        self.pending.remove(&txn);
        self.early_votes.remove(&txn);
        if self.clients_waiting.remove(&txn) {
            self.outputs.push(CoordinatorOutput::Reply { txn, decision: record.decision.clone() });
        }
        if self.is_leader && !record.participants.is_empty() {
            self.outputs.push(CoordinatorOutput::Notify {
                txn,
                participants: record.participants.clone(),
                decision: record.decision.clone(),
            });
        }
        record.decision
    }

    /// This replica became the range's leader: what the former leader held in memory is
    /// gone; every logged decision is sent to its participants again (they apply outcomes
    /// idempotently), so that commits in flight are finished.
    pub fn become_leader(&mut self) {
        self.become_follower();
        self.is_leader = true;
        for (txn, record) in &self.decisions {
            if !record.participants.is_empty() {
                self.outputs.push(CoordinatorOutput::Notify {
                    txn: *txn,
                    participants: record.participants.clone(),
                    decision: record.decision.clone(),
                });
            }
        }
    }

    /// This replica is no longer the leader (or never was): it forgets what a leader keeps in
    /// memory and outputs nothing; it still applies records.
    pub fn become_follower(&mut self) {
        self.is_leader = false;
        self.pending.clear();
        self.early_votes.clear();
        self.clients_waiting.clear();
        self.outputs.clear();
    }

    /// Restores a decision logged earlier (from the range's persisted state or a snapshot),
    /// telling no one: on every replica, alike.
    pub fn restore(&mut self, txn: TxnId, record: TxnRecord) {
        self.decisions.entry(txn).or_insert(record);
    }

    /// Forgets every decision and what a leader holds in memory (a snapshot replaces the
    /// range's state); the leadership role stays.
    pub fn clear(&mut self) {
        let is_leader = self.is_leader;
        self.become_follower();
        self.decisions.clear();
        self.is_leader = is_leader;
    }

    /// Whether this replica acts as the range's leader (see [`Coordinator::become_leader`]).
    pub fn is_leader(&self) -> bool {
        self.is_leader
    }

    /// Whether commit requests wait here for votes or for their record (leader memory): the
    /// range must keep ticking meanwhile.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Every logged decision, in transaction order.
    pub fn decisions(&self) -> impl Iterator<Item = (&TxnId, &TxnRecord)> {
        self.decisions.iter()
    }

    /// The logged decision of a transaction, if any.
    pub fn decision(&self, txn: TxnId) -> Option<&Decision> {
        self.decisions.get(&txn).map(|record| &record.decision)
    }

    /// Takes the outputs produced since the last call, in order.
    pub fn take_outputs(&mut self) -> Vec<CoordinatorOutput> {
        std::mem::take(&mut self.outputs)
    }

    /// Proposes the commit record once every participant has voted.
    fn maybe_decide(&mut self, txn: TxnId, floor: Timestamp) {
        let Some(pending) = self.pending.get(&txn) else { return };
        let switches = self.options.switches;
        let missing_votes =
            pending.participants.iter().any(|range| !pending.votes.contains_key(range));
        let voted =
            if switches.commit_on_first_vote { !pending.votes.is_empty() } else { !missing_votes };
        if pending.proposal.is_some() || !voted {
            return;
        }
        let commit_ts = commit_timestamp(pending.arrival, pending.votes.values().copied(), floor);
        let record = TxnRecord {
            decision: Decision::Commit { commit_ts },
            participants: pending.participants.clone(),
        };
        self.propose(txn, record);
    }

    /// Proposes a record for `txn` and remembers it with the pending request, if any.
    fn propose(&mut self, txn: TxnId, record: TxnRecord) {
        if let Some(pending) = self.pending.get_mut(&txn) {
            pending.proposal = Some(record.clone());
            pending.propose_again = false;
        }
        self.early_votes.remove(&txn);
        self.outputs.push(CoordinatorOutput::Propose { txn, record });
    }

    /// Tells a range that is not among a logged decision's participants that its part of
    /// `txn` aborts: it never voted in that decision (an abort logged for another range's
    /// status query, or a client that named other participants than its commit did), so it
    /// must not commit, whatever the others do.
    fn notify_outsider(&mut self, txn: TxnId, range: RangeId) {
        let decision = Decision::Abort {
            reason: format!("range {range} is not a participant of {txn}'s logged decision"),
        };
        self.outputs.push(CoordinatorOutput::Notify {
            txn,
            participants: BTreeSet::from([range]),
            decision,
        });
    }
}
