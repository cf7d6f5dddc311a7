//! What a range's leader does for read-write transactions: its lock table, locking reads, and
//! the parts of commits that take locks here — one-range commits, and the parts a two-phase
//! commit prepares here (as a participant, or as the coordinator's own part; the
//! coordinator's side is in `two_phase.rs`).
//!
//! - **The lock table** belongs to one leadership of one span: its epoch is made of the Raft
//!   term and the range's generation ([`lock_epoch`]). It is created at the leader's first
//!   transaction request (restoring the prepare records the range holds) and dropped with
//!   everything waiting on it when leadership is lost. A leader serves transactions only
//!   once it applied an entry of its own term (`two_phase::txn_ready`): before that, its
//!   predecessor's prepare records may not be applied yet, and a table built without them
//!   would grant locks that prepared transactions hold. A request that finds a table of
//!   another epoch replaces it: after leadership was lost and regained, or after a split
//!   (whose moved keys' locks would otherwise stay here, protecting nothing), the locks are
//!   gone, which the epoch check tells their transactions.
//! - **A locking read** takes its lock here (waiting while the lock table queues it, at most
//!   until the caller's deadline); the service then reads through the ordinary linearizable
//!   read path, which sees every commit applied before the lock was granted, and answers the
//!   epoch with the data. Retrying a lock request is harmless: a held lock is granted again.
//! - **A commit's part** ([`PartKind`]) takes exclusive locks on its writes one key at a time
//!   (each may wait), then marks the transaction prepared in the table (no longer woundable;
//!   a part without writes only checks that its earlier locks are still held), then waits in
//!   the leader's admission queue for a timestamp from the lease, like a write, and proposes
//!   one entry: all the writes of a one-range commit, or a prepare record (its writes and
//!   every lock it holds here) at that timestamp, the prepare timestamp. A one-range commit
//!   is answered after commit-wait, and its locks are released once `after(commit_ts)` holds
//!   on this node's clock (Spanner holds locks through commit-wait; releasing at apply is an
//!   optimization not adopted yet). A prepared participant answers its caller with the
//!   prepare timestamp and votes to the coordinator; its locks go when the outcome applies
//!   (outcomes of commits are sent only after the coordinator's commit-wait). If anything
//!   fails before the proposal, the part's locks are released (and a coordinator's own part
//!   aborts the transaction); after it, the outcome is ambiguous.

use std::collections::VecDeque;

use meridian_txn::{
    Acquired, Epoch, KeySpan, LockEvent, LockMode, LockRequest, LockTable, LockTableOptions,
    PrepareRecord, Priority, RangeId as TxnRangeId, RequestId, TxnId, Write,
};

use super::leader::{Waiting, check_key, propose_tracked};
use super::two_phase::{DecisionWaiter, txn_ready};
use super::*;
use crate::state_machine::encode_prepare;

/// A request waiting in the lock table.
enum Waiter {
    /// A locking read's lock: answer the epoch once granted.
    Lock { txn: TxnId, deadline: Instant, reply: Reply<u64> },
    /// One of a commit part's write locks.
    Commit { txn: TxnId },
}

/// What a transaction's part at this range commits as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PartKind {
    /// Every lock and write of the transaction is here: one entry commits it.
    OnePhase,
    /// A participant of a two-phase commit coordinated by this range: it logs a prepare
    /// record and votes.
    Participant { coordinator: TxnRangeId },
    /// The coordinator's own part: it prepares and votes like every participant, and its
    /// failure aborts the transaction (the client waits for the decision, not for it).
    Coordinator,
    /// Exclusive locks on a two-phase commit's writes, taken before any part prepares (its
    /// caller gets the epoch): a part then finds its locks held and prepares without waiting,
    /// so a transaction prepared at one range never waits for a lock at another. (Waiting
    /// there would close a cycle wound-wait cannot break: an older transaction waiting for
    /// its prepared locks, itself waiting for the older one's.)
    LockOnly,
}

/// A commit part: its writes here and who waits for it.
pub(super) struct CommitPart {
    pub(super) txn: TxnId,
    pub(super) priority: Priority,
    pub(super) writes: Vec<Write>,
    pub(super) kind: PartKind,
    pub(super) deadline: Instant,
    /// The caller; none for a coordinator's own part.
    pub(super) reply: Option<PartReply>,
}

/// Who waits for a commit part.
pub(super) enum PartReply {
    /// A one-range commit's caller: the commit, after commit-wait.
    Commit(Reply<Committed>),
    /// A participant's caller: the prepare timestamp; a lock request's: the epoch.
    Value(Reply<u64>),
}

impl PartReply {
    pub(super) fn fail(self, error: NodeError) {
        match self {
            PartReply::Commit(reply) => drop(reply.send(Err(error))),
            PartReply::Value(reply) => drop(reply.send(Err(error))),
        }
    }

    /// The participant's or lock request's caller (a one-range commit's is answered from its
    /// proposal).
    fn value(self) -> Option<Reply<u64>> {
        match self {
            PartReply::Value(reply) => Some(reply),
            PartReply::Commit(_) => None,
        }
    }
}

/// A commit part taking its write locks.
struct CommitInProgress {
    part: CommitPart,
    /// The write keys still to lock, in order.
    remaining: VecDeque<Vec<u8>>,
    held_since: Option<Epoch>,
}

/// A leader's transaction state (leader memory: gone with the leadership).
#[derive(Default)]
pub(super) struct TxnLeadership {
    table: Option<LockTable>,
    waiters: BTreeMap<RequestId, Waiter>,
    commits: BTreeMap<TxnId, CommitInProgress>,
    /// Committed transactions whose locks go once commit-wait is over: `(commit_ts, txn)`.
    releases: Vec<(Timestamp, TxnId)>,
    next_request: u64,
    /// Callers waiting for the decision of a transaction this range coordinates.
    pub(super) decision_waiters: BTreeMap<TxnId, Vec<DecisionWaiter>>,
    /// Transactions whose coordinator's own part failed before it was prepared, with why:
    /// the coordinator aborts them at the next settling.
    pub(super) own_part_failures: Vec<(TxnId, String)>,
}

impl TxnLeadership {
    /// Whether transactions hold or wait for anything here (the range stays awake).
    pub(super) fn is_busy(&self) -> bool {
        self.table.as_ref().is_some_and(|table| !table.is_empty())
            || !self.waiters.is_empty()
            || !self.commits.is_empty()
            || !self.releases.is_empty()
            || !self.decision_waiters.is_empty()
            || !self.own_part_failures.is_empty()
    }

    /// Fails everything waiting after the leadership was lost; the locks go with it.
    /// Callers waiting for a decision are told it is unknown (one may have been logged).
    pub(super) fn abandon(&mut self, refusal: impl Fn() -> NodeError) {
        for (_, waiter) in std::mem::take(&mut self.waiters) {
            if let Waiter::Lock { reply, .. } = waiter {
                let _ = reply.send(Err(refusal()));
            }
        }
        self.own_part_failures.clear();
        for (_, commit) in std::mem::take(&mut self.commits) {
            match commit.part.reply {
                Some(reply) => reply.fail(refusal()),
                // A coordinator's own part: the transaction aborts (if this node still
                // coordinates it).
                None => self.own_part_failures.push((commit.part.txn, refusal().to_string())),
            }
        }
        for (txn, waiters) in std::mem::take(&mut self.decision_waiters) {
            for waiter in waiters {
                waiter.fail(NodeError::Ambiguous(format!(
                    "the coordinator's leadership changed before transaction {txn}'s decision \
                     was known; ask its coordinator again"
                )));
            }
        }
        self.releases.clear();
        self.table = None;
    }

    /// The lock table of `epoch`, created (or replaced, if it belongs to another epoch) with
    /// the prepared transactions restored. Call it through [`lock_table`].
    fn table<'a>(
        &mut self,
        epoch: u64,
        prepared: impl Iterator<Item = &'a PrepareRecord>,
        now: Timestamp,
    ) -> Result<&mut LockTable, NodeError> {
        if self.table.as_ref().is_none_or(|table| table.epoch() != Epoch(epoch)) {
            let refusal =
                || NodeError::Unavailable("the range's leadership or span changed".into());
            // Decisions waited for here stay valid: only the locks' epoch changed.
            let decision_waiters = std::mem::take(&mut self.decision_waiters);
            self.abandon(refusal);
            self.decision_waiters = decision_waiters;
            let mut table = LockTable::new(Epoch(epoch), LockTableOptions::default());
            for record in prepared {
                table.restore_prepared(record.txn, record.priority, record.locks.clone(), now)?;
            }
            self.table = Some(table);
        }
        Ok(self.table.as_mut().expect("created above"))
    }

    fn next_request(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// The table, if it belongs to `epoch` (a table of another epoch holds no valid lock).
    fn current_table(&mut self, epoch: u64) -> Option<&mut LockTable> {
        self.table.as_mut().filter(|table| table.epoch() == Epoch(epoch))
    }

    /// Every lock a transaction holds here.
    pub(super) fn held(&self, txn: TxnId) -> Vec<(LockMode, KeySpan)> {
        self.table.as_ref().map(|table| table.held(txn).to_vec()).unwrap_or_default()
    }

    /// Whether a commit part of `txn` is taking its locks here.
    pub(super) fn is_committing(&self, txn: TxnId) -> bool {
        self.commits.contains_key(&txn)
    }

    /// Refuses a commit part that was not proposed and releases the transaction's locks
    /// here: its caller is told why, or, for a coordinator's own part, the transaction aborts.
    pub(super) fn refuse_part(&mut self, part: CommitPart, error: NodeError) {
        debug!(txn = %part.txn, kind = ?part.kind, %error, "a commit part was refused");
        self.release(part.txn);
        match part.reply {
            Some(reply) => reply.fail(error),
            None => self.own_part_failures.push((part.txn, error.to_string())),
        }
    }

    /// Fails a commit part taking its locks and releases the transaction's locks here.
    pub(super) fn fail_commit(&mut self, txn: TxnId, error: NodeError) {
        match self.commits.remove(&txn) {
            Some(commit) => self.refuse_part(commit.part, error),
            None => self.release(txn),
        }
    }

    /// Releases a transaction's locks here (its commit failed before or while it was
    /// proposed, or its outcome applied).
    pub(super) fn release(&mut self, txn: TxnId) {
        if let Some(table) = self.table.as_mut() {
            table.release(txn);
        }
    }

    /// Releases a committed transaction's locks once `after(commit_ts)` holds.
    pub(super) fn release_after_commit_wait(&mut self, txn: TxnId, commit_ts: Timestamp) {
        self.releases.push((commit_ts, txn));
    }

    /// The decision of `txn` applied here (its outcome at a participant, its decision record
    /// at the coordinator): a part still taking its locks fails, and the locks go — once
    /// `after(commit_wait)` holds, if given (a commit at its coordinator; outcomes of commits
    /// reach participants only after the coordinator's commit-wait).
    pub(super) fn on_decided(&mut self, txn: TxnId, commit_wait: Option<Timestamp>) {
        if let Some(commit) = self.commits.remove(&txn)
            && let Some(reply) = commit.part.reply
        {
            let error = NodeError::TxnRetry(format!(
                "transaction {txn} was decided by its coordinator before this part prepared"
            ));
            reply.fail(error);
        }
        let held = self.table.as_ref().is_some_and(|table| table.standing(txn).is_some());
        match commit_wait {
            Some(commit_ts) if held => self.release_after_commit_wait(txn, commit_ts),
            _ => self.release(txn),
        }
    }
}

/// Makes sure `replica`'s lock table belongs to its current epoch, creating it or replacing
/// one of an earlier span. Within one leadership the span changes only by a split, which
/// invalidates the old table's locks: a replacement first waits (refusing the request as
/// retryable) until no commit part proposed under the old table is in flight and no
/// committed transaction still holds its locks through commit-wait — the new table, built from
/// the applied prepare records, would not know their locks — and refuses the parts waiting
/// for a timestamp, whose locks it would not know either.
fn lock_table<E: Engine>(replica: &mut Replica<E>, now: Timestamp) -> Result<(), NodeError> {
    let epoch = epoch_of(replica);
    let leadership = &mut replica.leadership;
    let Some(old) = leadership.txns.table.as_ref() else {
        leadership.txns.table(epoch, replica.state.prepared_records(), now)?;
        return Ok(());
    };
    if old.epoch() == Epoch(epoch) {
        return Ok(());
    }
    let in_flight = leadership.proposals.values().any(|proposal| {
        matches!(proposal.pending, Pending::TxnCommit { .. } | Pending::TxnPrepare { .. })
    });
    if in_flight || !leadership.txns.releases.is_empty() {
        return Err(NodeError::Unavailable(
            "the range split while commits were finishing; retry".into(),
        ));
    }
    let waiting = std::mem::take(&mut leadership.waiting);
    for request in waiting {
        match request {
            Waiting::TxnCommit(part) => {
                let error = NodeError::TxnRetry(format!(
                    "transaction {} lost its locks at this range: it split",
                    part.txn
                ));
                leadership.txns.refuse_part(part, error);
            }
            request => leadership.waiting.push_back(request),
        }
    }
    leadership.txns.table(epoch, replica.state.prepared_records(), now)?;
    Ok(())
}

/// The lock epoch of a leadership in `term` over a range of `generation`: unique per range as
/// long as a range's lineage splits fewer than 2^24 times within one term.
pub(super) fn lock_epoch(term: u64, generation: u64) -> u64 {
    term.saturating_mul(1 << 24).saturating_add(generation % (1 << 24))
}

/// The span a lock request names, clamped to the range.
fn lock_span(lock: &TxnLock, descriptor: &RangeDescriptor) -> Result<KeySpan, NodeError> {
    if lock.is_key {
        return Ok(KeySpan::key(lock.start.clone()));
    }
    let end = match (&lock.end, &descriptor.end) {
        (Some(end), Some(range_end)) => Some(end.clone().min(range_end.clone())),
        (Some(end), None) => Some(end.clone()),
        (None, range_end) => range_end.clone(),
    };
    Ok(KeySpan::range(lock.start.clone(), end)?)
}

/// The lock epoch of `replica`'s current leadership and span.
fn epoch_of<E: Engine>(replica: &Replica<E>) -> u64 {
    lock_epoch(replica.raft.term().0, replica.state.descriptor().generation)
}

/// Refuses a commit part that never reached a leader: its caller is told why. (A
/// coordinator's own part always comes with a caller waiting for the decision, who is told by
/// the coordinator's refusal instead.)
fn refuse(part: CommitPart, error: NodeError) {
    debug!(txn = %part.txn, kind = ?part.kind, %error, "a commit part was refused");
    if let Some(reply) = part.reply {
        reply.fail(error);
    }
}

/// Proposes a commit part whose locks are held at the timestamp the lease granted: a
/// one-range commit's writes, or a prepare record. If Raft refuses it, its locks go.
pub(super) fn propose_part<E: Engine>(replica: &mut Replica<E>, part: CommitPart, timestamp: u64) {
    let txn = part.txn;
    let coordinator = match &part.kind {
        PartKind::OnePhase => None,
        PartKind::Participant { coordinator } => Some(*coordinator),
        PartKind::Coordinator => Some(TxnRangeId(replica.range.0)),
        PartKind::LockOnly => unreachable!("lock requests are answered once their locks are held"),
    };
    let Some(coordinator) = coordinator else {
        let Some(PartReply::Commit(reply)) = part.reply else {
            unreachable!("a one-range commit has a caller waiting for the commit")
        };
        let command = encode_one_phase_commit(txn, &part.writes, timestamp);
        if !propose_tracked(replica, command, Pending::TxnCommit { txn, timestamp, reply }) {
            replica.leadership.txns.release(txn);
        }
        return;
    };
    let record = PrepareRecord {
        txn,
        priority: part.priority,
        coordinator,
        prepare_ts: Timestamp::from_nanos(timestamp),
        locks: replica.leadership.txns.held(txn),
        writes: part.writes,
    };
    let pending =
        Pending::TxnPrepare { txn, coordinator, reply: part.reply.and_then(PartReply::value) };
    if !propose_tracked(replica, encode_prepare(&record), pending) {
        replica.leadership.txns.release(txn);
        if part.kind == PartKind::Coordinator {
            let reason = "its coordinator could not propose its own prepare record".to_string();
            replica.leadership.txns.own_part_failures.push((txn, reason));
        }
    }
}

impl<E: Engine> Driver<E> {
    pub(super) fn local_now(&self) -> Timestamp {
        self.truetime.read().local
    }

    /// The replica of `range` if this node leads it and may serve transactions: it applied
    /// an entry of its own term (see the module docs). Keeps the coordinator's role in step.
    pub(super) fn txn_replica(&mut self, range: RangeId) -> Result<&mut Replica<E>, NodeError> {
        if range == META_RANGE {
            return Err(NodeError::InvalidArgument(
                "the meta range takes no part in transactions".into(),
            ));
        }
        let replica = self.leader_replica(range, None)?;
        if !txn_ready(replica) {
            return Err(NodeError::Unavailable(
                "the range's new leader is still applying its predecessor's log".into(),
            ));
        }
        super::two_phase::sync_coordinator_role(replica);
        Ok(replica)
    }

    /// Takes a transaction's lock at `range`'s leader (see the module docs).
    pub(super) fn txn_lock(
        &mut self,
        range: RangeId,
        lock: TxnLock,
        deadline: Instant,
        reply: Reply<u64>,
    ) {
        let now = self.local_now();
        if range == META_RANGE {
            let error = NodeError::InvalidArgument("the meta range holds no user keys".into());
            return drop(reply.send(Err(error)));
        }
        let replica = match self.txn_replica(range) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        if let Err(error) = check_key(replica, &lock.start) {
            return drop(reply.send(Err(error)));
        }
        replica.idle_ticks = 0;
        let span = match lock_span(&lock, replica.state.descriptor()) {
            Ok(span) => span,
            Err(error) => return drop(reply.send(Err(error))),
        };
        let epoch = epoch_of(replica);
        if let Err(error) = lock_table(replica, now) {
            return drop(reply.send(Err(error)));
        }
        let txns = &mut replica.leadership.txns;
        let id = txns.next_request();
        let table = txns.table.as_mut().expect("created above");
        // A client retrying a request still queued here (its first attempt timed out on the
        // way) replaces it.
        if let Some(stale) = table.queued_request(lock.txn) {
            table.cancel(lock.txn, stale);
            if let Some(Waiter::Lock { reply, .. }) = txns.waiters.remove(&stale) {
                let error = NodeError::Unavailable("superseded by a retry of the request".into());
                let _ = reply.send(Err(error));
            }
        }
        let table = txns.table.as_mut().expect("created above");
        let request = LockRequest {
            id,
            txn: lock.txn,
            priority: lock.priority,
            mode: lock.mode,
            span,
            held_since: lock.held_since.map(Epoch),
        };
        match table.acquire(request, now) {
            Ok(Acquired::Granted) => {
                let _ = reply.send(Ok(epoch));
            }
            Ok(Acquired::Waiting) => {
                txns.waiters.insert(id, Waiter::Lock { txn: lock.txn, deadline, reply });
            }
            Err(error) => {
                let _ = reply.send(Err(error.into()));
            }
        }
        self.settle_txn_events(range);
    }

    /// Starts a commit part at `range` (see the module docs): one-range commits and
    /// participants' prepares come from their callers, a coordinator's own part from its
    /// commit request (`two_phase.rs`).
    pub(super) fn start_part(&mut self, range: RangeId, part: CommitPart, held_since: Option<u64>) {
        let now = self.local_now();
        if range == META_RANGE {
            let error = NodeError::InvalidArgument("the meta range holds no user keys".into());
            return refuse(part, error);
        }
        let replica = match self.txn_replica(range) {
            Ok(replica) => replica,
            Err(error) => return refuse(part, error),
        };
        replica.idle_ticks = 0;
        if part.writes.is_empty() && (part.kind == PartKind::OnePhase || held_since.is_none()) {
            let error = "a commit without writes or locks here: roll back a read-only transaction \
                         instead";
            return replica
                .leadership
                .txns
                .refuse_part(part, NodeError::InvalidArgument(error.into()));
        }
        if let Some(error) =
            part.writes.iter().find_map(|write| check_key(replica, &write.key).err())
        {
            return replica.leadership.txns.refuse_part(part, error);
        }
        let txn = part.txn;
        // The table first: creating it drops what belonged to a table of another epoch.
        if let Err(error) = lock_table(replica, now) {
            return replica.leadership.txns.refuse_part(part, error);
        }
        let txns = &mut replica.leadership.txns;
        let table = txns.table.as_mut().expect("created above");
        let prepared = table.standing(txn) == Some(&meridian_txn::TxnStanding::Prepared);
        let locking = txns.commits.get(&txn).is_some_and(|c| c.part.kind == PartKind::LockOnly);
        if locking && part.kind != PartKind::LockOnly {
            // An earlier lock request still waits here, so the client gave it up and lost
            // these locks: this part cannot prepare on them.
            let error = NodeError::TxnRetry(format!(
                "transaction {txn} lost its write locks here (their request was given up)"
            ));
            return txns.refuse_part(part, error);
        }
        if txns.commits.contains_key(&txn) && part.kind == PartKind::LockOnly {
            // A retry of a lock request still waiting: it is answered once the first is.
            let error = format!("transaction {txn} still waits for its write locks here");
            if let Some(reply) = part.reply {
                reply.fail(NodeError::Unavailable(error));
            }
            return;
        }
        if txns.commits.contains_key(&txn) || prepared {
            // A repeated commit: the first one's locks stay.
            let error = format!("transaction {txn} is already committing here");
            if let Some(reply) = part.reply {
                reply.fail(NodeError::InvalidArgument(error));
            }
            return;
        }
        let mut keys: Vec<Vec<u8>> = part.writes.iter().map(|write| write.key.clone()).collect();
        keys.sort();
        keys.dedup();
        let held_since = held_since.map(Epoch);
        txns.commits.insert(txn, CommitInProgress { part, remaining: keys.into(), held_since });
        self.continue_commit(range, txn);
        self.settle_txn_events(range);
    }

    /// Takes a commit part's next write locks; once all are held, marks the transaction
    /// prepared and queues its proposal.
    fn continue_commit(&mut self, range: RangeId, txn: TxnId) {
        let now = self.local_now();
        let Some(replica) = self.replicas.get_mut(&range) else { return };
        if let Err(error) = lock_table(replica, now) {
            return replica.leadership.txns.fail_commit(txn, error);
        }
        let TxnLeadership { table, waiters, commits, next_request, .. } =
            &mut replica.leadership.txns;
        let table = table.as_mut().expect("created above");
        let Some(commit) = commits.get_mut(&txn) else { return };
        let mut failure = None;
        while let Some(key) = commit.remaining.front().cloned() {
            *next_request += 1;
            let id = RequestId(*next_request);
            let request = LockRequest {
                id,
                txn,
                priority: commit.part.priority,
                mode: LockMode::Exclusive,
                span: KeySpan::key(key),
                held_since: commit.held_since,
            };
            match table.acquire(request, now) {
                Ok(outcome) => {
                    commit.held_since = Some(table.epoch());
                    commit.remaining.pop_front();
                    if outcome == Acquired::Waiting {
                        waiters.insert(id, Waiter::Commit { txn });
                        return;
                    }
                }
                Err(error) => {
                    failure = Some(NodeError::from(error));
                    break;
                }
            }
        }
        if failure.is_none() && commit.part.kind == PartKind::LockOnly {
            let commit = commits.remove(&txn).expect("found above");
            let epoch = table.epoch().0;
            if let Some(reply) = commit.part.reply.and_then(PartReply::value) {
                let _ = reply.send(Ok(epoch));
            }
            return;
        }
        if failure.is_none() {
            let epoch = commit.held_since.expect("a part without writes names its locks' epoch");
            failure = table.prepare(txn, epoch, now).err().map(NodeError::from);
        }
        if let Some(error) = failure {
            return replica.leadership.txns.fail_commit(txn, error);
        }
        let commit = commits.remove(&txn).expect("found above");
        replica.leadership.waiting.push_back(Waiting::TxnCommit(commit.part));
        self.admit(range);
    }

    /// Releases what a transaction holds at `range`, unless it is prepared there.
    pub(super) fn txn_rollback(&mut self, range: RangeId, txn: TxnId, reply: Reply<()>) {
        let replica = match self.txn_replica(range) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        let epoch = epoch_of(replica);
        let txns = &mut replica.leadership.txns;
        if let Some(commit) = txns.commits.remove(&txn) {
            let error = NodeError::TxnRetry(format!("transaction {txn} was rolled back"));
            txns.refuse_part(commit.part, error);
        }
        let result = match txns.current_table(epoch) {
            Some(table) => table.rollback(txn).map_err(NodeError::from),
            None => Ok(()),
        };
        let _ = reply.send(result);
        self.settle_txn_events(range);
    }

    /// Keeps a transaction's locks at `range`.
    pub(super) fn txn_heartbeat(
        &mut self,
        range: RangeId,
        txn: TxnId,
        epoch: u64,
        reply: Reply<()>,
    ) {
        let now = self.local_now();
        let replica = match self.txn_replica(range) {
            Ok(replica) => replica,
            Err(error) => return drop(reply.send(Err(error))),
        };
        let current = epoch_of(replica);
        let result = match replica.leadership.txns.current_table(current) {
            Some(table) => table.heartbeat(txn, Epoch(epoch), now).map_err(NodeError::from),
            None => Err(NodeError::TxnRetry(format!(
                "transaction {txn} lost its locks at this range: its leadership or span changed"
            ))),
        };
        let _ = reply.send(result);
    }

    /// Answers the waiters the lock table's events concern: grants, wounds, abandonment; a
    /// coordinator's own parts that failed abort their transactions.
    pub(super) fn settle_txn_events(&mut self, range: RangeId) {
        self.settle_lock_events(range);
        let failures = self
            .replicas
            .get(&range)
            .is_some_and(|replica| !replica.leadership.txns.own_part_failures.is_empty());
        if failures {
            self.settle_coordinator(range);
        }
    }

    fn settle_lock_events(&mut self, range: RangeId) {
        let mut commits_to_continue = Vec::new();
        {
            let Some(replica) = self.replicas.get_mut(&range) else { return };
            let txns = &mut replica.leadership.txns;
            let Some(table) = txns.table.as_mut() else { return };
            let epoch = table.epoch().0;
            let events = table.take_events();
            for event in events {
                match &event {
                    LockEvent::Wounded { .. } => {
                        metrics::counter!("meridian_txn_wounds_total").increment(1);
                        metrics::counter!("meridian_txn_aborts_total", "reason" => "wounded")
                            .increment(1);
                    }
                    LockEvent::Abandoned { .. } => {
                        metrics::counter!("meridian_txn_aborts_total", "reason" => "abandoned")
                            .increment(1);
                    }
                    LockEvent::Granted { .. } | LockEvent::Cancelled { .. } => {}
                }
                let (request, failure) = match event {
                    LockEvent::Granted { request, .. } => (request, None),
                    LockEvent::Wounded { txn, wound, cancelled: Some(request) } => {
                        let error = meridian_txn::Error::Wounded {
                            txn,
                            by: wound.by,
                            span: wound.span,
                            requested: wound.requested.name(),
                        };
                        (request, Some(NodeError::from(error)))
                    }
                    LockEvent::Abandoned { txn, cancelled: Some(request) } => {
                        let error = NodeError::TxnRetry(format!(
                            "transaction {txn} lost its locks at this range: it sent nothing \
                             for too long"
                        ));
                        (request, Some(error))
                    }
                    LockEvent::Cancelled { txn, request } => {
                        let error =
                            NodeError::TxnRetry(format!("transaction {txn} was rolled back"));
                        (request, Some(error))
                    }
                    LockEvent::Wounded { .. } | LockEvent::Abandoned { .. } => continue,
                };
                match (txns.waiters.remove(&request), failure) {
                    (Some(Waiter::Lock { reply, .. }), None) => {
                        let _ = reply.send(Ok(epoch));
                    }
                    (Some(Waiter::Lock { reply, .. }), Some(error)) => {
                        let _ = reply.send(Err(error));
                    }
                    (Some(Waiter::Commit { txn }), None) => commits_to_continue.push(txn),
                    (Some(Waiter::Commit { txn }), Some(error)) => txns.fail_commit(txn, error),
                    (None, _) => {}
                }
            }
        }
        for txn in commits_to_continue {
            self.continue_commit(range, txn);
        }
        // Continuing may have produced more events.
        let more = self
            .replicas
            .get_mut(&range)
            .and_then(|replica| replica.leadership.txns.table.as_mut())
            .is_some_and(|table| table.has_events());
        if more {
            self.settle_lock_events(range);
        }
    }

    /// On ticks: withdraws lock requests whose callers' deadlines passed, releases abandoned
    /// transactions and committed ones whose commit-wait is over.
    pub(super) fn tick_txns(&mut self) {
        let (now, interval) = (self.local_now(), self.truetime.now());
        let instant = Instant::now();
        let ranges: Vec<RangeId> = self
            .awake
            .iter()
            .filter(|range| {
                self.replicas.get(range).is_some_and(|replica| replica.leadership.txns.is_busy())
            })
            .copied()
            .collect();
        for range in ranges {
            let replica = self.replicas.get_mut(&range).expect("listed above");
            let txns = &mut replica.leadership.txns;
            let late: Vec<TxnId> = txns
                .commits
                .iter()
                .filter(|(_, commit)| commit.part.deadline <= instant)
                .map(|(txn, _)| *txn)
                .collect();
            for txn in late {
                let error = NodeError::Unavailable(
                    "the commit's locks were not granted before its deadline".into(),
                );
                txns.fail_commit(txn, error);
            }
            let TxnLeadership { table, waiters, releases, .. } = txns;
            let Some(table) = table.as_mut() else {
                releases.clear();
                continue;
            };
            let expired: Vec<RequestId> = waiters
                .iter()
                .filter(|(_, waiter)| {
                    matches!(waiter, Waiter::Lock { deadline, .. } if *deadline <= instant)
                })
                .map(|(request, _)| *request)
                .collect();
            for request in expired {
                let Some(Waiter::Lock { txn, .. }) = waiters.get(&request) else { continue };
                // A request granted but not answered yet is answered by the grant instead.
                if table.cancel(*txn, request)
                    && let Some(Waiter::Lock { reply, .. }) = waiters.remove(&request)
                {
                    let error = NodeError::Unavailable(
                        "the lock was not granted before the request's deadline".into(),
                    );
                    let _ = reply.send(Err(error));
                }
            }
            table.expire(now);
            let (done, waiting): (Vec<_>, Vec<_>) =
                releases.drain(..).partition(|(commit_ts, _)| interval.after(*commit_ts));
            *releases = waiting;
            if let Some(next) = releases.iter().map(|(commit_ts, _)| *commit_ts).min() {
                let wakeup = instant + interval.time_until_after(next);
                self.release_wakeup = Some(self.release_wakeup.map_or(wakeup, |w| w.min(wakeup)));
            }
            for (_, txn) in done {
                table.release(txn);
            }
            self.settle_txn_events(range);
        }
    }

    /// Answers what lock tables released outside a transaction call (a commit refused or
    /// past its deadline in the admission queue, a commit refused at apply).
    pub(super) fn settle_all_txn_events(&mut self) {
        let ranges: Vec<RangeId> = self
            .awake
            .iter()
            .filter(|range| {
                self.replicas.get(range).is_some_and(|replica| {
                    let txns = &replica.leadership.txns;
                    txns.table.as_ref().is_some_and(LockTable::has_events)
                        || !txns.own_part_failures.is_empty()
                })
            })
            .copied()
            .collect();
        for range in ranges {
            self.settle_txn_events(range);
        }
    }
}
