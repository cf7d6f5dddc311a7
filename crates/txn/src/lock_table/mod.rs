//! The lock table of one range's leader: shared and exclusive locks on keys and key spans,
//! wound-wait, FIFO fairness by priority, leadership epochs and abandonment (Spanner §4.2.1,
//! DESIGN §6).
//!
//! A transaction asks for a lock with [`LockTable::acquire`]; the table grants it at once,
//! or queues it and later reports the grant as a [`LockEvent`]. Two locks *conflict* when they
//! belong to different transactions, their spans share a key and at least one is exclusive.
//! A transaction's own locks never conflict with each other, so holding a shared lock and
//! asking for an exclusive one on the same key is an upgrade.
//!
//! **Wound-wait.** A requester that conflicts with a holder *younger* than itself (by
//! [`Priority`], a total order in which a retry outranks its own earlier attempts) *wounds* it
//! unless the holder is prepared: the holder's locks here are released at once, its waiting
//! request (if any) is cancelled, and its next request, heartbeat or prepare here fails with
//! [`Error::Wounded`] naming the wounding transaction, the span and the mode (a wounded
//! transaction is remembered for [`LockTableOptions::abandon_after`] from the wound).
//! Releasing at once is safe because a wounded transaction can never prepare here any more,
//! and it keeps the older requester from waiting for a transaction that may itself be blocked
//! elsewhere. Otherwise the requester waits.
//!
//! **Fairness.** Waiting requests are queued by priority, oldest first, and then by arrival.
//! A waiting request is granted once it conflicts with no granted lock and with no request
//! queued ahead of it, so a stream of shared requests cannot starve an exclusive one, and
//! an older transaction is never overtaken by a younger one it conflicts with.
//!
//! **Epochs.** Locks live in the leader's memory; a new leader starts a new table at a new
//! epoch (its Raft term) and restores only prepared transactions' locks from their replicated
//! prepare records ([`LockTable::restore_prepared`]). A prepare record therefore holds the
//! transaction's shared spans as well as its writes: a prepared transaction's reads must stay
//! protected until it commits, or a writer could commit in between below its commit timestamp
//! (the simulation caught exactly that when only write locks were restored). Every request after a
//! transaction's first one here names the epoch its locks were taken under; a transaction
//! whose locks are gone (another epoch, or released after abandonment) fails with
//! [`Error::LocksLost`] and can never prepare here.
//!
//! **Abandonment.** A transaction that is not prepared and sends nothing (request or
//! heartbeat) for [`LockTableOptions::abandon_after`] loses its locks at the next
//! [`LockTable::expire`]. Prepared transactions never expire: only their coordinator's
//! decision ends them.
//!
//! Invariants ([`LockTable::check_invariants`] verifies them):
//! - No two granted locks conflict.
//! - Every queued request is blocked by a granted lock or a request queued ahead of it
//!   (no lost wake-up), and a transaction has at most one queued request.
//! - Wounded transactions hold no lock; wounded and prepared transactions wait for nothing.
//! - A requester waits only for holders older than itself or prepared, and for older
//!   requests queued ahead of it: so no waits-for cycle can form, here or across ranges,
//!   because every edge points to an older or a prepared transaction.
//!
//! Cost: single-key locks are in an ordered map; locks on wider spans (scans) are in a list
//! that each request walks, and each release walks the queue. Both are small in OLTP work
//! (scans are few per transaction, waiters few per range); an interval tree can replace the
//! list when measurements ask for it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;
use std::time::Duration;

use meridian_clock::Timestamp;

use crate::error::invalid_input;
use crate::{Epoch, Error, KeySpan, Priority, RequestId, Result, TxnId};

#[cfg(test)]
mod tests;

/// A lock's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockMode {
    /// Taken by reads; compatible with other shared locks.
    Shared,
    /// Taken by writes; compatible with nothing held by another transaction.
    Exclusive,
}

impl LockMode {
    /// Returns whether locks of the two modes held by different transactions conflict.
    pub fn conflicts_with(self, other: LockMode) -> bool {
        self == LockMode::Exclusive || other == LockMode::Exclusive
    }

    /// Returns whether a lock of this mode gives everything one of `other` does.
    fn includes(self, other: LockMode) -> bool {
        self == LockMode::Exclusive || other == LockMode::Shared
    }

    /// The mode's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Options of a lock table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockTableOptions {
    /// A transaction that is not prepared and sends nothing for this long loses its locks.
    /// Clients heartbeat well within it.
    pub abandon_after: Duration,
    /// Test-only switches that break one rule each, so that tests can show the simulation
    /// catches the violation. All off by default; never set them elsewhere.
    #[doc(hidden)]
    pub switches: LockSwitches,
}

impl Default for LockTableOptions {
    fn default() -> Self {
        LockTableOptions {
            abandon_after: Duration::from_secs(5),
            switches: LockSwitches::default(),
        }
    }
}

/// Switches that deliberately break a locking rule (see [`LockTableOptions::switches`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockSwitches {
    /// An older requester waits for a younger holder instead of wounding it (breaks
    /// wound-wait, so waits-for cycles, that is deadlocks, can form).
    pub older_waits: bool,
    /// Wound prepared holders too (breaks "a prepared participant never aborts on its own":
    /// its locks go while its coordinator may still commit it).
    pub wound_prepared: bool,
    /// Accept requests and prepares of a transaction whose locks here were lost, to another
    /// epoch or by abandonment, as if it held them (breaks "a transaction never commits on
    /// locks it no longer holds").
    pub ignore_lost_locks: bool,
}

/// A request for one lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRequest {
    /// The caller's id for the request, named again in its [`LockEvent`]s.
    pub id: RequestId,
    /// The transaction asking.
    pub txn: TxnId,
    /// Its priority.
    pub priority: Priority,
    /// The mode asked for.
    pub mode: LockMode,
    /// The span asked for.
    pub span: KeySpan,
    /// The epoch the transaction's earlier locks at this range were taken under, or `None`
    /// when this is its first request here. The table cannot tell a first request from one
    /// sent after it forgot the transaction, so a client sends `None` only until its first
    /// request here is answered, and never re-sends a first request whose outcome it does not
    /// know (it aborts instead: it may hold locks here that it cannot vouch for).
    pub held_since: Option<Epoch>,
}

/// The immediate outcome of [`LockTable::acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The lock is held.
    Granted,
    /// The request is queued; a [`LockEvent`] will grant or cancel it.
    Waiting,
}

/// Why a transaction was wounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wound {
    /// The older transaction that wounded it.
    pub by: TxnId,
    /// The span the older transaction asked for.
    pub span: KeySpan,
    /// The mode it asked for.
    pub requested: LockMode,
}

/// Where a transaction the table knows stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnStanding {
    /// Taking locks.
    Active,
    /// Prepared: it takes no more locks, cannot be wounded and does not expire.
    Prepared,
    /// Wounded: it holds nothing here and every request of it fails.
    Wounded(Wound),
}

/// Something that happened to a transaction other than in reply to its own call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockEvent {
    /// A queued request was granted.
    Granted {
        /// The transaction.
        txn: TxnId,
        /// Its request.
        request: RequestId,
    },
    /// The transaction was wounded and its locks here released; its queued request, if
    /// any, failed with [`Error::Wounded`].
    Wounded {
        /// The transaction.
        txn: TxnId,
        /// Why.
        wound: Wound,
        /// Its queued request, which failed.
        cancelled: Option<RequestId>,
    },
    /// The transaction sent nothing for too long and its locks here were released; its
    /// queued request, if any, failed.
    Abandoned {
        /// The transaction.
        txn: TxnId,
        /// Its queued request, which failed.
        cancelled: Option<RequestId>,
    },
    /// The transaction was released (committed or aborted) while it had a queued request,
    /// which failed.
    Cancelled {
        /// The transaction.
        txn: TxnId,
        /// Its queued request.
        request: RequestId,
    },
}

/// What the table knows of one transaction.
#[derive(Clone, Debug)]
struct TxnEntry {
    priority: Priority,
    standing: TxnStanding,
    /// The locks it holds, in the order granted.
    held: Vec<(LockMode, KeySpan)>,
    /// Its queued request.
    waiting: Option<QueueKey>,
    /// When it last sent anything.
    last_seen: Timestamp,
}

/// The position of a queued request: oldest priority first, then arrival.
type QueueKey = (Priority, u64);

/// A queued request.
#[derive(Clone, Debug)]
struct Waiter {
    id: RequestId,
    txn: TxnId,
    mode: LockMode,
    span: KeySpan,
}

/// The lock table of one range's leader (see the module documentation).
#[derive(Debug)]
pub struct LockTable {
    epoch: Epoch,
    options: LockTableOptions,
    txns: BTreeMap<TxnId, TxnEntry>,
    /// Granted locks on single keys: key → holders.
    key_locks: BTreeMap<Vec<u8>, Vec<(TxnId, LockMode)>>,
    /// Granted locks on spans wider than one key.
    span_locks: Vec<(TxnId, LockMode, KeySpan)>,
    /// Queued requests.
    queue: BTreeMap<QueueKey, Waiter>,
    next_arrival: u64,
    events: Vec<LockEvent>,
}

impl LockTable {
    /// Returns an empty table for a leader of `epoch`.
    pub fn new(epoch: Epoch, options: LockTableOptions) -> LockTable {
        LockTable {
            epoch,
            options,
            txns: BTreeMap::new(),
            key_locks: BTreeMap::new(),
            span_locks: Vec::new(),
            queue: BTreeMap::new(),
            next_arrival: 0,
            events: Vec::new(),
        }
    }

    /// The leadership epoch the table's locks are taken under.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Asks for a lock at time `now`: grants it, or queues it (a later [`LockEvent`] grants
    /// or cancels it). Asking for a lock the transaction already holds (or a stronger one
    /// over a wider span) is granted at once. May wound younger holders, which it reports as
    /// events.
    ///
    /// # Errors
    /// [`Error::Wounded`] if the transaction was wounded here, [`Error::LocksLost`] if its
    /// earlier locks here are gone, [`Error::InvalidInput`] if it is prepared, already has a
    /// queued request, or names another priority than before.
    pub fn acquire(&mut self, request: LockRequest, now: Timestamp) -> Result<Acquired> {
        let txn = request.txn;
        self.check_held_since(txn, request.held_since)?;
        let entry = self.txns.entry(txn).or_insert_with(|| TxnEntry {
            priority: request.priority,
            standing: TxnStanding::Active,
            held: Vec::new(),
            waiting: None,
            last_seen: now,
        });
        match &entry.standing {
            TxnStanding::Active => {}
            TxnStanding::Prepared => {
                return Err(invalid_input!(
                    "transaction {txn} is prepared and takes no more locks"
                ));
            }
            TxnStanding::Wounded(wound) => return Err(wounded_error(txn, wound)),
        }
        if entry.priority != request.priority {
            return Err(invalid_input!(
                "transaction {txn} asked with priority {}, earlier with {}",
                request.priority,
                entry.priority
            ));
        }
        if let Some(queued) = entry.waiting {
            return Err(invalid_input!(
                "transaction {txn} already waits for request {}",
                self.queue[&queued].id
            ));
        }
        entry.last_seen = now;
        let covered = entry
            .held
            .iter()
            .any(|(mode, span)| mode.includes(request.mode) && span.covers(&request.span));
        if covered {
            return Ok(Acquired::Granted);
        }

        // Wound every younger conflicting holder that is not prepared.
        let wound = Wound { by: txn, span: request.span.clone(), requested: request.mode };
        for holder in self.conflicting_holders(txn, request.mode, &request.span) {
            let holder_entry = &self.txns[&holder];
            let woundable = match holder_entry.standing {
                TxnStanding::Active => true,
                TxnStanding::Prepared => self.options.switches.wound_prepared,
                TxnStanding::Wounded(_) => false,
            };
            let younger = request.priority.is_older_than(&holder_entry.priority);
            if woundable && younger && !self.options.switches.older_waits {
                self.wound(holder, wound.clone(), now);
            }
        }

        // Queue the request, then grant whatever the queue allows: the request itself is
        // granted at once when nothing blocks it.
        let key = (request.priority, self.next_arrival);
        self.next_arrival += 1;
        self.queue
            .insert(key, Waiter { id: request.id, txn, mode: request.mode, span: request.span });
        self.txns.get_mut(&txn).expect("entry inserted above").waiting = Some(key);
        let mut granted_now = false;
        for (granted_key, waiter) in self.grant_queued() {
            if granted_key == key {
                granted_now = true;
            } else {
                self.events.push(LockEvent::Granted { txn: waiter.txn, request: waiter.id });
            }
        }
        Ok(if granted_now { Acquired::Granted } else { Acquired::Waiting })
    }

    /// Records that the transaction is alive at time `now`.
    ///
    /// # Errors
    /// [`Error::Wounded`] or [`Error::LocksLost`], which tell its client to abort early.
    pub fn heartbeat(&mut self, txn: TxnId, held_since: Epoch, now: Timestamp) -> Result<()> {
        self.check_held_since(txn, Some(held_since))?;
        let Some(entry) = self.txns.get_mut(&txn) else {
            // Only with `ignore_lost_locks`.
            return Ok(());
        };
        if let TxnStanding::Wounded(wound) = &entry.standing {
            return Err(wounded_error(txn, wound));
        }
        entry.last_seen = now;
        Ok(())
    }

    /// Marks the transaction prepared once it holds every lock it needs here (the caller
    /// has acquired exclusive locks on its writes): from now on it cannot be wounded and does
    /// not expire. The caller then logs the prepare record; if that fails, it releases.
    ///
    /// # Errors
    /// [`Error::LocksLost`] if its locks here are gone (it must never prepare on them),
    /// [`Error::Wounded`] if it was wounded, [`Error::InvalidInput`] if it still waits.
    pub fn prepare(&mut self, txn: TxnId, held_since: Epoch, now: Timestamp) -> Result<()> {
        self.check_held_since(txn, Some(held_since))?;
        let Some(entry) = self.txns.get_mut(&txn) else {
            // Only with `ignore_lost_locks`: prepare on nothing.
            return Ok(());
        };
        match &entry.standing {
            TxnStanding::Active if entry.waiting.is_some() => {
                Err(invalid_input!("transaction {txn} cannot prepare while it waits for a lock"))
            }
            TxnStanding::Active | TxnStanding::Prepared => {
                entry.standing = TxnStanding::Prepared;
                entry.last_seen = now;
                Ok(())
            }
            TxnStanding::Wounded(wound) => Err(wounded_error(txn, wound)),
        }
    }

    /// Releases everything the transaction holds or waits for and forgets it: its outcome
    /// applied here, or it rolled back (see [`LockTable::rollback`]). Its queued request, if any, is cancelled (an event), and queued
    /// requests it blocked are granted (events). Releasing an unknown transaction does nothing.
    pub fn release(&mut self, txn: TxnId) {
        let Some(entry) = self.txns.remove(&txn) else { return };
        if let Some(queued) = entry.waiting {
            let waiter = self.queue.remove(&queued).expect("queued request of a txn");
            self.events.push(LockEvent::Cancelled { txn, request: waiter.id });
        }
        self.remove_locks(txn, &entry.held);
        self.grant_and_report();
    }

    /// The transaction's queued request, if it has one.
    pub fn queued_request(&self, txn: TxnId) -> Option<RequestId> {
        let key = self.txns.get(&txn)?.waiting?;
        Some(self.queue[&key].id)
    }

    /// Withdraws a queued request (its caller stopped waiting): the transaction keeps the
    /// locks it holds; requests it blocked may be granted (events). Returns whether the
    /// request was queued.
    pub fn cancel(&mut self, txn: TxnId, request: RequestId) -> bool {
        let Some(entry) = self.txns.get_mut(&txn) else { return false };
        let Some(key) = entry.waiting else { return false };
        if self.queue[&key].id != request {
            return false;
        }
        entry.waiting = None;
        self.queue.remove(&key);
        self.grant_and_report();
        true
    }

    /// A client's rollback: releases the transaction unless it is prepared here, where only
    /// its coordinator's decision may end it.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the transaction is prepared.
    pub fn rollback(&mut self, txn: TxnId) -> Result<()> {
        if self.standing(txn) == Some(&TxnStanding::Prepared) {
            return Err(invalid_input!(
                "transaction {txn} is prepared here: only its coordinator's decision ends it"
            ));
        }
        self.release(txn);
        Ok(())
    }

    /// Releases the locks of transactions that are not prepared and sent nothing for
    /// [`LockTableOptions::abandon_after`] before `now`, and forgets wounded ones after as long.
    pub fn expire(&mut self, now: Timestamp) {
        let abandon_after = self.options.abandon_after;
        let expired: Vec<TxnId> = self
            .txns
            .iter()
            .filter(|(_, entry)| {
                entry.standing != TxnStanding::Prepared
                    && now.saturating_duration_since(entry.last_seen) > abandon_after
            })
            .map(|(txn, _)| *txn)
            .collect();
        for txn in expired {
            let entry = self.txns.remove(&txn).expect("listed above");
            if matches!(entry.standing, TxnStanding::Wounded(_)) {
                continue;
            }
            let cancelled =
                entry.waiting.map(|queued| self.queue.remove(&queued).expect("queued").id);
            self.remove_locks(txn, &entry.held);
            self.events.push(LockEvent::Abandoned { txn, cancelled });
        }
        self.grant_and_report();
    }

    /// Restores a prepared transaction's locks (its shared spans and its exclusive writes)
    /// in a new leader's table, from its replicated prepare record. A new leader restores
    /// every prepared transaction before it serves any lock request.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the transaction is known already or a lock conflicts with
    /// one held: prepared transactions held their locks together, so the records are
    /// inconsistent.
    pub fn restore_prepared(
        &mut self,
        txn: TxnId,
        priority: Priority,
        held: Vec<(LockMode, KeySpan)>,
        now: Timestamp,
    ) -> Result<()> {
        if self.txns.contains_key(&txn) {
            return Err(invalid_input!("prepared transaction {txn} restored twice"));
        }
        for (mode, span) in &held {
            if let Some(holder) = self.conflicting_holders(txn, *mode, span).first() {
                return Err(invalid_input!(
                    "restored {mode} lock of prepared transaction {txn} on {span} conflicts \
                     with a lock of {holder}"
                ));
            }
        }
        for (mode, span) in &held {
            self.add_lock(txn, *mode, span.clone());
        }
        self.txns.insert(
            txn,
            TxnEntry {
                priority,
                standing: TxnStanding::Prepared,
                held,
                waiting: None,
                last_seen: now,
            },
        );
        Ok(())
    }

    /// Where the transaction stands, if the table knows it.
    pub fn standing(&self, txn: TxnId) -> Option<&TxnStanding> {
        self.txns.get(&txn).map(|entry| &entry.standing)
    }

    /// The locks the transaction holds, in the order granted.
    pub fn held(&self, txn: TxnId) -> &[(LockMode, KeySpan)] {
        self.txns.get(&txn).map_or(&[], |entry| &entry.held)
    }

    /// The transactions a queued request of `txn` waits for: conflicting holders, then
    /// conflicting requests queued ahead of it. Empty when it waits for nothing.
    pub fn blockers(&self, txn: TxnId) -> Vec<TxnId> {
        let Some(key) = self.txns.get(&txn).and_then(|entry| entry.waiting) else {
            return Vec::new();
        };
        let waiter = &self.queue[&key];
        let mut blockers = self.conflicting_holders(txn, waiter.mode, &waiter.span);
        for (_, ahead) in self.queue.range(..key) {
            if ahead.txn != txn
                && ahead.mode.conflicts_with(waiter.mode)
                && ahead.span.overlaps(&waiter.span)
                && !blockers.contains(&ahead.txn)
            {
                blockers.push(ahead.txn);
            }
        }
        blockers
    }

    /// Returns whether events wait to be taken.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Takes the events that happened since the last call, in order.
    pub fn take_events(&mut self) -> Vec<LockEvent> {
        std::mem::take(&mut self.events)
    }

    /// The number of transactions the table knows.
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    /// Returns whether the table knows no transaction.
    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }

    /// Checks the table's invariants (see the module documentation); for tests, as it
    /// compares every pair of locks.
    ///
    /// # Errors
    /// A description of the first invariant found broken.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let granted: Vec<(TxnId, LockMode, &KeySpan)> = self
            .txns
            .iter()
            .flat_map(|(txn, entry)| entry.held.iter().map(move |(mode, span)| (*txn, *mode, span)))
            .collect();
        for (i, (txn, mode, span)) in granted.iter().enumerate() {
            for (other_txn, other_mode, other_span) in &granted[i + 1..] {
                if txn != other_txn && mode.conflicts_with(*other_mode) && span.overlaps(other_span)
                {
                    return Err(format!(
                        "{txn} holds {mode} {span} while {other_txn} holds {other_mode} {other_span}"
                    ));
                }
            }
        }
        let mut indexed: Vec<(TxnId, LockMode, KeySpan)> = self
            .key_locks
            .iter()
            .flat_map(|(key, holders)| {
                holders.iter().map(|(txn, mode)| (*txn, *mode, KeySpan::key(key.clone())))
            })
            .chain(self.span_locks.iter().cloned())
            .collect();
        let mut held: Vec<(TxnId, LockMode, KeySpan)> =
            granted.iter().map(|(txn, mode, span)| (*txn, *mode, (*span).clone())).collect();
        indexed.sort();
        held.sort();
        if indexed != held {
            return Err(format!("locks indexed {indexed:?} differ from locks held {held:?}"));
        }
        for (txn, entry) in &self.txns {
            match (&entry.standing, entry.waiting) {
                (TxnStanding::Wounded(_), _) if !entry.held.is_empty() => {
                    return Err(format!("wounded {txn} holds locks"));
                }
                (TxnStanding::Wounded(_) | TxnStanding::Prepared, Some(_)) => {
                    return Err(format!("{txn} waits though it is {:?}", entry.standing));
                }
                (_, Some(key)) if self.queue.get(&key).is_none_or(|w| w.txn != *txn) => {
                    return Err(format!("{txn} waits for a request not queued"));
                }
                _ => {}
            }
        }
        for (key, waiter) in &self.queue {
            if self.txns.get(&waiter.txn).and_then(|entry| entry.waiting) != Some(*key) {
                return Err(format!(
                    "request {} of {} is queued but not recorded",
                    waiter.id, waiter.txn
                ));
            }
            let blockers = self.blockers(waiter.txn);
            if blockers.is_empty() {
                return Err(format!(
                    "request {} of {} for {} {} waits for nothing (lost wake-up)",
                    waiter.id, waiter.txn, waiter.mode, waiter.span
                ));
            }
            // Wound-wait. Not checked with `older_waits`, so that tests see what breaking the
            // rule leads to (a deadlock) rather than the broken rule itself.
            let priority = &self.txns[&waiter.txn].priority;
            for blocker in blockers {
                let entry = &self.txns[&blocker];
                if !self.options.switches.older_waits
                    && entry.standing != TxnStanding::Prepared
                    && !entry.priority.is_older_than(priority)
                {
                    return Err(format!(
                        "{} waits for the younger {blocker}, which is not prepared",
                        waiter.txn
                    ));
                }
            }
        }
        Ok(())
    }

    /// Fails unless the transaction's earlier locks, taken under `held_since`, are still
    /// here. A first request (`None`) always passes.
    fn check_held_since(&self, txn: TxnId, held_since: Option<Epoch>) -> Result<()> {
        let Some(held_since) = held_since else { return Ok(()) };
        if self.options.switches.ignore_lost_locks {
            return Ok(());
        }
        if held_since != self.epoch {
            return Err(Error::epoch_changed(txn, held_since, self.epoch));
        }
        if !self.txns.contains_key(&txn) {
            return Err(Error::LocksLost {
                txn,
                reason: format!(
                    "the leader holds none (it releases them after {:?} without a request or \
                     heartbeat)",
                    self.options.abandon_after
                ),
            });
        }
        Ok(())
    }

    /// The transactions other than `txn` holding a lock that conflicts with `mode` on `span`,
    /// in id order.
    fn conflicting_holders(&self, txn: TxnId, mode: LockMode, span: &KeySpan) -> Vec<TxnId> {
        let mut holders = BTreeSet::new();
        let end = span.end().map_or(Bound::Unbounded, Bound::Excluded);
        let keys = self.key_locks.range::<[u8], _>((Bound::Included(span.start()), end));
        for (_, key_holders) in keys {
            for (holder, held_mode) in key_holders {
                if *holder != txn && held_mode.conflicts_with(mode) {
                    holders.insert(*holder);
                }
            }
        }
        for (holder, held_mode, held_span) in &self.span_locks {
            if *holder != txn && held_mode.conflicts_with(mode) && held_span.overlaps(span) {
                holders.insert(*holder);
            }
        }
        holders.into_iter().collect()
    }

    /// Wounds a holder: releases its locks, cancels its queued request and records why.
    fn wound(&mut self, victim: TxnId, wound: Wound, now: Timestamp) {
        let entry = self.txns.get_mut(&victim).expect("holders are known");
        entry.last_seen = now;
        let held = std::mem::take(&mut entry.held);
        let cancelled = entry.waiting.take();
        entry.standing = TxnStanding::Wounded(wound.clone());
        let cancelled = cancelled.map(|key| self.queue.remove(&key).expect("queued").id);
        self.remove_locks(victim, &held);
        self.events.push(LockEvent::Wounded { txn: victim, wound, cancelled });
    }

    fn add_lock(&mut self, txn: TxnId, mode: LockMode, span: KeySpan) {
        match span.as_key() {
            Some(key) => self.key_locks.entry(key.to_vec()).or_default().push((txn, mode)),
            None => self.span_locks.push((txn, mode, span)),
        }
    }

    fn remove_locks(&mut self, txn: TxnId, held: &[(LockMode, KeySpan)]) {
        let mut removed_span_lock = false;
        for (_, span) in held {
            match span.as_key() {
                Some(key) => {
                    if let Some(holders) = self.key_locks.get_mut(key) {
                        holders.retain(|(holder, _)| *holder != txn);
                        if holders.is_empty() {
                            self.key_locks.remove(key);
                        }
                    }
                }
                None => removed_span_lock = true,
            }
        }
        if removed_span_lock {
            self.span_locks.retain(|(holder, _, _)| *holder != txn);
        }
    }

    /// Grants queued requests, in queue order, that conflict with no granted lock and no
    /// request still queued ahead of them; returns them.
    fn grant_queued(&mut self) -> Vec<(QueueKey, Waiter)> {
        let mut granted = Vec::new();
        let mut still_queued: Vec<(TxnId, LockMode, KeySpan)> = Vec::new();
        let keys: Vec<QueueKey> = self.queue.keys().copied().collect();
        for key in keys {
            let waiter = &self.queue[&key];
            let blocked =
                !self.conflicting_holders(waiter.txn, waiter.mode, &waiter.span).is_empty()
                    || still_queued.iter().any(|(txn, mode, span)| {
                        *txn != waiter.txn
                            && mode.conflicts_with(waiter.mode)
                            && span.overlaps(&waiter.span)
                    });
            if blocked {
                still_queued.push((waiter.txn, waiter.mode, waiter.span.clone()));
                continue;
            }
            let waiter = self.queue.remove(&key).expect("listed above");
            let entry = self.txns.get_mut(&waiter.txn).expect("queued txns are known");
            entry.waiting = None;
            entry.held.push((waiter.mode, waiter.span.clone()));
            self.add_lock(waiter.txn, waiter.mode, waiter.span.clone());
            granted.push((key, waiter));
        }
        granted
    }

    fn grant_and_report(&mut self) {
        for (_, waiter) in self.grant_queued() {
            self.events.push(LockEvent::Granted { txn: waiter.txn, request: waiter.id });
        }
    }
}

/// The error for a wounded transaction's requests.
fn wounded_error(txn: TxnId, wound: &Wound) -> Error {
    Error::Wounded {
        txn,
        by: wound.by,
        span: wound.span.clone(),
        requested: wound.requested.name(),
    }
}
