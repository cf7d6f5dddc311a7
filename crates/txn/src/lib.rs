//! Meridian's transaction protocol as pure state machines (Spanner §4.2, DESIGN §6).
//!
//! Read-write transactions take locks at the leaders of the ranges they touch: shared locks
//! for reads (a key for a point read, a key span for a scan, so that no phantom can appear),
//! exclusive locks for the writes they commit. Locks are held until the transaction commits or
//! aborts (strict two-phase locking), so the commit order of conflicting transactions is the
//! order of their conflicts. Deadlocks are prevented by *wound-wait*: each transaction has a
//! [`Priority`], the timestamp of its first start kept across retries, and an older requester
//! *wounds* a younger conflicting holder (which then aborts and retries with its old priority)
//! while a younger requester waits. Priorities are totally ordered (a retry outranks its own
//! earlier attempts), so a transaction only ever waits for older ones or for prepared ones
//! (which wait for nothing but their coordinator): the waits-for graph has no cycle, and the
//! oldest transaction never waits for a younger one: nothing starves. That a prepared
//! transaction waits for no lock is the caller's part: a transaction must hold every lock it
//! needs, at every range, before any of its parts prepares (the node's client takes all
//! write locks first, then prepares).
//!
//! This crate has no IO, no threads, no async and no wall clock: the node gives each call the
//! current time and turns the returned events into replies. What is here:
//!
//! - [`LockTable`] (`lock_table/`): the locks of one range's leader, with wound-wait, FIFO
//!   fairness by priority, leadership epochs and abandonment.
//! - [`Coordinator`] (`coordinator/`): two-phase commit's coordinator at a range leader —
//!   votes, the commit timestamp rule ([`commit_timestamp`]), records where the first one
//!   logged decides, status queries, timeouts and a new leader finishing what was decided.
//! - [`PreparedSet`] (`participant.rs`): a range's replicated prepare records, outcomes
//!   applied idempotently, and status queries of prepared transactions that heard nothing.
//!
//! Tests: golden scripts in `testscripts/lock_table/` and `testscripts/coordinator/`, a
//! property test of the lock table's invariants, and two seeded simulations:
//! `tests/simulation.rs` runs many transactions over one lock table — with wounds, abandoned
//! clients, lost rollbacks and leader changes — and checks that the committed history is
//! serializable and that no deadlock and no starvation occurs; `tests/commit_simulation.rs`
//! runs every core together over three ranges with skewed clocks, commit-wait, lost messages
//! and records, and checks strict serializability, external consistency and atomic
//! commitment. Each deliberately broken rule ([`LockSwitches`], [`CoordinatorSwitches`], and
//! the simulations' own switches) has a test showing a seed catches it.

mod coordinator;
mod error;
mod lock_table;
mod participant;
#[cfg(test)]
mod script_support;
mod span;

use std::fmt;

pub use coordinator::{
    Coordinator, CoordinatorOptions, CoordinatorOutput, CoordinatorSwitches, Decision, TxnRecord,
    commit_timestamp, prepare_timestamp,
};
pub use error::{Error, Result};
pub use lock_table::{
    Acquired, LockEvent, LockMode, LockRequest, LockSwitches, LockTable, LockTableOptions,
    TxnStanding, Wound,
};
pub use meridian_clock::{Interval, Timestamp};
pub use participant::{PrepareRecord, PreparedSet, Resolution, Write};
pub use span::KeySpan;

/// A transaction's identity: chosen at random by the client that begins it, so that gateways
/// need no coordination to name transactions. Kept across the transaction's retries only
/// through its [`Priority`]; each attempt has an id of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnId(pub u128);

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A transaction's priority under wound-wait: the timestamp of its first attempt's start,
/// kept across retries so that a transaction ages and eventually wins, with the id of that
/// first attempt as a tie-breaker, and then the attempt number: a later attempt of the same
/// transaction outranks an earlier one, whose client gave it up (its rollback may not have
/// arrived yet). Smaller is older, and older wins; two attempts never have equal priorities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Priority {
    /// When the transaction first started.
    pub start: Timestamp,
    /// The id of its first attempt, which makes priorities of transactions unique.
    pub first_txn: TxnId,
    /// The attempt: 0 for the first, counting up with each retry.
    pub attempt: u32,
}

impl Priority {
    /// Returns whether a transaction of this priority is older than one of `other`, and so
    /// wins a conflict with it.
    pub fn is_older_than(&self, other: &Priority) -> bool {
        self < other
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.start, self.first_txn, std::cmp::Reverse(self.attempt)).cmp(&(
            other.start,
            other.first_txn,
            std::cmp::Reverse(other.attempt),
        ))
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.start.as_nanos(), self.first_txn, self.attempt)
    }
}

/// A leadership epoch of a range: the Raft term of the leader whose memory holds a lock table.
/// Locks live only in that memory, so every lock is taken under an epoch, and a transaction
/// whose locks were taken under an earlier epoch has lost them (a leader is unique per term).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The id of a range, as the transaction protocol names participants and coordinators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeId(pub u64);

impl fmt::Display for RangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// The id of one lock request, chosen by the caller (the node) so that it can match the
/// [`LockEvent`]s of requests that waited to the calls waiting for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Formats a key for messages: printable ASCII as is, other bytes as `\xNN`.
pub fn display_key(key: &[u8]) -> String {
    let mut text = String::with_capacity(key.len());
    for &byte in key {
        if byte.is_ascii_graphic() && byte != b'\\' {
            text.push(byte as char);
        } else {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}
