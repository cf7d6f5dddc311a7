//! A range's replicated record of prepared transactions: the participant side of two-phase
//! commit (Spanner §4.2.1, DESIGN §6).
//!
//! A participant leader that holds a transaction's locks ([`LockTable::prepare`]) picks a
//! prepare timestamp ([`prepare_timestamp`]) and logs a [`PrepareRecord`] through Raft: the
//! writes, every lock the transaction holds here (shared spans too, so that a new leader
//! restores its reads' protection, see [`LockTable::restore_prepared`]) and its coordinator.
//! Every replica applies it to its [`PreparedSet`]. The outcome arrives from the coordinator
//! and is logged too; applying it removes the record and hands back the writes to apply at the
//! commit timestamp (or nothing, for an abort). Applying a prepare record again while the
//! transaction is prepared, or an outcome for a transaction not prepared here, changes
//! nothing. A prepare record applied *after* its transaction's outcome would prepare it again,
//! so a leader proposes a prepare only for a transaction its lock table holds active in the
//! current epoch, answers a repeated prepare of a prepared one with the recorded timestamp,
//! and clients never re-send a prepare whose outcome they do not know.
//!
//! A prepared transaction never aborts on its own. Its leader asks the coordinator when it has
//! heard nothing for a while ([`PreparedSet::due_queries`]); the coordinator's log decides.
//!
//! [`LockTable::prepare`]: crate::LockTable::prepare
//! [`LockTable::restore_prepared`]: crate::LockTable::restore_prepared
//! [`prepare_timestamp`]: crate::prepare_timestamp

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_clock::Timestamp;

use crate::coordinator::Decision;
use crate::{KeySpan, LockMode, Priority, RangeId, TxnId};

/// One buffered write: a value, or a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The key.
    pub key: Vec<u8>,
    /// The value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// What a participant logs when it prepares a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareRecord {
    /// The transaction.
    pub txn: TxnId,
    /// Its priority, for the restored locks.
    pub priority: Priority,
    /// The range coordinating its commit.
    pub coordinator: RangeId,
    /// The prepare timestamp: the commit timestamp is at or above it.
    pub prepare_ts: Timestamp,
    /// Every lock it holds here.
    pub locks: Vec<(LockMode, KeySpan)>,
    /// Its writes here.
    pub writes: Vec<Write>,
}

/// What applying an outcome does to the range's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Write these versions at `commit_ts`, then release the locks.
    Commit {
        /// The commit timestamp.
        commit_ts: Timestamp,
        /// The writes.
        writes: Vec<Write>,
    },
    /// Release the locks; nothing is written.
    Abort,
    /// The transaction is not prepared here (the outcome was applied already, or the
    /// prepare never was): nothing to do.
    Unknown,
}

/// The prepared transactions of one range: replicated state, plus (leader memory) when each
/// last asked its coordinator.
///
/// Invariant: a record leaves only by an applied outcome.
#[derive(Clone, Debug, Default)]
pub struct PreparedSet {
    prepared: BTreeMap<TxnId, PrepareRecord>,
    /// Leader memory: when the leader last heard of or asked about each transaction.
    last_contact: BTreeMap<TxnId, Timestamp>,
}

impl PreparedSet {
    /// Returns an empty set.
    pub fn new() -> PreparedSet {
        PreparedSet::default()
    }

    /// Applies a logged prepare record, the same way on every replica; returns whether it
    /// prepared the transaction (false when it was prepared already: nothing changes). The
    /// leader's status-query timer for it starts at the next [`PreparedSet::due_queries`].
    pub fn apply_prepare(&mut self, record: PrepareRecord) -> bool {
        if self.prepared.contains_key(&record.txn) {
            return false;
        }
        self.prepared.insert(record.txn, record);
        true
    }

    /// Applies a logged outcome and returns what it does to the data.
    pub fn apply_outcome(&mut self, txn: TxnId, decision: &Decision) -> Resolution {
        self.last_contact.remove(&txn);
        let Some(record) = self.prepared.remove(&txn) else { return Resolution::Unknown };
        match decision {
            Decision::Commit { commit_ts } => {
                assert!(
                    *commit_ts >= record.prepare_ts,
                    "commit timestamp {} of {txn} below its prepare timestamp {}",
                    commit_ts.as_nanos(),
                    record.prepare_ts.as_nanos()
                );
                Resolution::Commit { commit_ts: *commit_ts, writes: record.writes }
            }
            Decision::Abort { .. } => Resolution::Abort,
        }
    }

    /// Returns the prepared transactions that heard nothing for `query_after` before `now`,
    /// with their coordinator and prepare timestamp, and records that they ask now. A
    /// transaction this replica has not timed yet (newly prepared, or prepared before it
    /// became leader) starts its timer at `now`.
    pub fn due_queries(
        &mut self,
        now: Timestamp,
        query_after: Duration,
    ) -> Vec<(TxnId, RangeId, Timestamp)> {
        let mut due = Vec::new();
        for (txn, record) in &self.prepared {
            let last = self.last_contact.entry(*txn).or_insert(now);
            if now.saturating_duration_since(*last) > query_after {
                *last = now;
                due.push((*txn, record.coordinator, record.prepare_ts));
            }
        }
        due
    }

    /// The prepare record of a transaction prepared here, if any.
    pub fn get(&self, txn: TxnId) -> Option<&PrepareRecord> {
        self.prepared.get(&txn)
    }

    /// Returns whether any transaction is prepared here.
    pub fn is_empty(&self) -> bool {
        self.prepared.is_empty()
    }

    /// The prepared transactions, for a new leader's lock table and queries.
    pub fn records(&self) -> impl Iterator<Item = &PrepareRecord> {
        self.prepared.values()
    }

    /// The highest prepare timestamp: a leader's timestamp floor is at least this.
    pub fn max_prepare_ts(&self) -> Option<Timestamp> {
        self.prepared.values().map(|record| record.prepare_ts).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(txn: u128, prepare_ts: u64) -> PrepareRecord {
        PrepareRecord {
            txn: TxnId(txn),
            priority: Priority {
                start: Timestamp::from_nanos(1),
                first_txn: TxnId(txn),
                attempt: 0,
            },
            coordinator: RangeId(7),
            prepare_ts: Timestamp::from_nanos(prepare_ts),
            locks: vec![(LockMode::Exclusive, KeySpan::key(b"k".to_vec()))],
            writes: vec![Write { key: b"k".to_vec(), value: Some(b"v".to_vec()) }],
        }
    }

    #[test]
    fn outcomes_apply_once() {
        let mut set = PreparedSet::new();
        assert!(set.apply_prepare(record(1, 10)));
        assert!(!set.apply_prepare(record(1, 10)));
        assert!(set.apply_prepare(record(2, 20)));
        assert_eq!(set.records().count(), 2);
        assert_eq!(set.max_prepare_ts(), Some(Timestamp::from_nanos(20)));
        let commit = Decision::Commit { commit_ts: Timestamp::from_nanos(15) };
        assert_eq!(
            set.apply_outcome(TxnId(1), &commit),
            Resolution::Commit {
                commit_ts: Timestamp::from_nanos(15),
                writes: record(1, 10).writes
            }
        );
        assert_eq!(set.apply_outcome(TxnId(1), &commit), Resolution::Unknown);
        let abort = Decision::Abort { reason: "test".into() };
        assert_eq!(set.apply_outcome(TxnId(2), &abort), Resolution::Abort);
        assert_eq!(set.records().count(), 0);
    }

    #[test]
    #[should_panic(expected = "below its prepare timestamp")]
    fn commit_below_the_prepare_timestamp_is_a_broken_invariant() {
        let mut set = PreparedSet::new();
        set.apply_prepare(record(1, 10));
        set.apply_outcome(TxnId(1), &Decision::Commit { commit_ts: Timestamp::from_nanos(9) });
    }

    #[test]
    fn silent_prepared_transactions_ask_their_coordinator() {
        let mut set = PreparedSet::new();
        let ms = |ms: u64| Timestamp::from_nanos(ms * 1_000_000);
        let after = Duration::from_millis(100);
        set.apply_prepare(record(1, 10));
        assert!(set.due_queries(ms(0), after).is_empty());
        set.apply_prepare(record(2, 10));
        assert!(set.due_queries(ms(50), after).is_empty());
        assert!(set.due_queries(ms(100), after).is_empty());
        assert_eq!(
            set.due_queries(ms(101), after),
            vec![(TxnId(1), RangeId(7), Timestamp::from_nanos(10))]
        );
        assert!(set.due_queries(ms(150), after).is_empty());
        assert_eq!(
            set.due_queries(ms(151), after),
            vec![(TxnId(2), RangeId(7), Timestamp::from_nanos(10))]
        );
        assert_eq!(set.due_queries(ms(202), after).len(), 1);
    }
}
