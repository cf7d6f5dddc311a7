//! TrueTime: a clock that answers with an interval guaranteed to contain true time.
//!
//! Spanner (OSDI 2012, §3) replaces "what time is it?" with "what is the earliest and the latest
//! time it could be?". [`TrueTime::now`] returns an [`Interval`] `[earliest, latest]` whose width
//! is twice the clock's uncertainty ε. Two derived predicates follow:
//!
//! - [`TrueTime::after`]`(t)`: `t < now().earliest`, so `t` has certainly passed everywhere;
//! - [`TrueTime::before`]`(t)`: `t > now().latest`, so `t` has certainly not arrived anywhere.
//!
//! **Commit-wait** (Spanner §4.1.2) is built on `after`: a write committed at `s` is acknowledged
//! only once `after(s)` holds, so any transaction that starts later, on any node, picks a larger
//! timestamp. That is what makes the database externally consistent. [`CommitWait`] expresses the
//! wait as data (for the pure protocol cores); [`TrueTime::wait_until_after`] performs it at the
//! edges.
//!
//! Where the uncertainty comes from ([`ClockSource`]):
//!
//! - [`SystemClock`] reads the operating system clock. ε is the kernel's own error bound
//!   (`adjtimex` maxerror) while chrony or ntpd keeps the clock synchronized, and otherwise the
//!   configured [`ClockOptions::max_clock_offset`]; the reading says which ([`UncertaintyBound`]).
//! - [`SimulatedClock`] models one node's clock against a shared [`SimulatedTime`]: a skew set at
//!   each synchronization, a drift rate, and an uncertainty that grows between synchronizations
//!   and drops back at each one (Spanner's sawtooth, §3).
//!
//! Invariant: when a clock's real offset and drift stay within the bounds it was configured with,
//! every interval it returns contains true time. The tests show this over random skews and drifts
//! and show exactly what breaks (external consistency) when the bound is violated.
//!
//! [`SkewedClock`] shifts another source by a settable skew, for fault injection.
//!
//! Left out on purpose: measuring offsets between nodes and self-eviction belong to the node
//! layer, which measures them on its RPC round trips.

mod error;
mod interval;
mod simulated;
mod skewed;
mod system;
mod truetime;

pub use error::{Error, Result};
pub use interval::{Interval, Timestamp};
pub use simulated::{SimulatedClock, SimulatedClockOptions, SimulatedTime};
pub use skewed::SkewedClock;
pub use system::{ClockOptions, DEFAULT_MAX_CLOCK_OFFSET, SystemClock};
pub use truetime::{ClockReading, ClockSource, CommitWait, TrueTime, UncertaintyBound};
