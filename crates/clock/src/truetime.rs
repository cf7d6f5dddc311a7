//! The TrueTime API over a pluggable [`ClockSource`], and commit-wait.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, Interval, Result, Timestamp};

/// Where the uncertainty of a clock reading comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UncertaintyBound {
    /// The operating system's error bound (`adjtimex` maxerror) of a synchronized clock.
    Kernel,
    /// The configured maximum clock offset, used when the operating system reports no bound.
    Configured,
    /// A simulated clock's modelled bound (tests and simulation only).
    Simulated,
}

impl fmt::Display for UncertaintyBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UncertaintyBound::Kernel => "kernel",
            UncertaintyBound::Configured => "configured",
            UncertaintyBound::Simulated => "simulated",
        })
    }
}

/// One reading of a local clock: its value and how far from true time it may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockReading {
    /// The local clock's value.
    pub local: Timestamp,
    /// The bound ε on `|local - true time|`.
    pub uncertainty: Duration,
    /// Where `uncertainty` comes from.
    pub bound: UncertaintyBound,
}

impl ClockReading {
    /// Returns the TrueTime interval of this reading.
    pub fn interval(&self) -> Interval {
        Interval::around(self.local, self.uncertainty)
    }
}

/// A local clock with an error bound. Implementations must guarantee, as long as the clock works
/// within its configured limits, that true time lies within `uncertainty` of `local`.
pub trait ClockSource: Send + Sync + fmt::Debug {
    /// Reads the clock.
    fn read(&self) -> ClockReading;
}

/// The TrueTime API (Spanner §3): intervals that contain true time, and commit-wait.
///
/// Cheap to clone; all clones read the same [`ClockSource`].
#[derive(Clone, Debug)]
pub struct TrueTime {
    source: Arc<dyn ClockSource>,
}

impl TrueTime {
    /// Returns TrueTime over the given clock source.
    pub fn new(source: Arc<dyn ClockSource>) -> Self {
        TrueTime { source }
    }

    /// Reads the underlying clock, with the uncertainty and its origin (for metrics and
    /// `SHOW CLOCK`).
    pub fn read(&self) -> ClockReading {
        self.source.read()
    }

    /// Returns an interval that contains true time.
    pub fn now(&self) -> Interval {
        self.read().interval()
    }

    /// Returns whether `t` has certainly passed: `t < now().earliest`.
    pub fn after(&self, t: Timestamp) -> bool {
        self.now().after(t)
    }

    /// Returns whether `t` has certainly not arrived: `t > now().latest`.
    pub fn before(&self, t: Timestamp) -> bool {
        self.now().before(t)
    }

    /// Returns the commit-wait for a write committed at `commit_ts`, computed from a fresh
    /// reading.
    pub fn commit_wait(&self, commit_ts: Timestamp) -> CommitWait {
        CommitWait::new(commit_ts, self.read())
    }

    /// Waits until `after(commit_ts)` holds and returns how long it waited.
    ///
    /// It sleeps with `tokio::time`, re-reading the clock after every sleep because the
    /// uncertainty may have grown meanwhile. A simulated clock must be advanced by someone else
    /// for this to return.
    ///
    /// # Errors
    ///
    /// [`Error::CommitWaitStalled`] if `after(commit_ts)` still does not hold after
    /// `max_wait`: the clock stalled, went backwards, or `commit_ts` lies far in the future. The
    /// caller must then not acknowledge the commit as externally consistent.
    pub async fn wait_until_after(
        &self,
        commit_ts: Timestamp,
        max_wait: Duration,
    ) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        loop {
            let wait = self.commit_wait(commit_ts);
            if wait.is_over() {
                return Ok(started.elapsed());
            }
            let waited = started.elapsed();
            if waited >= max_wait {
                return Err(Error::CommitWaitStalled {
                    commit_ts,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    reason: format!(
                        "after({commit_ts}) still false with {} ms to go",
                        wait.remaining().as_millis()
                    ),
                });
            }
            tokio::time::sleep(wait.remaining().min(max_wait - waited)).await;
        }
    }
}

/// Commit-wait as data (Spanner §4.1.2): when a write committed at `commit_ts` may be
/// acknowledged.
///
/// Protocol cores return this instead of sleeping; the edge that sends the acknowledgement waits
/// until the local clock reads [`CommitWait::local_deadline`] and then re-checks `after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitWait {
    /// The commit timestamp being waited out.
    pub commit_ts: Timestamp,
    /// The earliest local clock reading at which `after(commit_ts)` holds if the uncertainty
    /// stays as it was when this was computed: `commit_ts + ε + 1ns`.
    pub local_deadline: Timestamp,
    /// The local clock reading this was computed from.
    pub computed_at: Timestamp,
}

impl CommitWait {
    /// Computes the commit-wait for `commit_ts` from a clock reading.
    pub fn new(commit_ts: Timestamp, reading: ClockReading) -> Self {
        CommitWait {
            commit_ts,
            local_deadline: commit_ts.saturating_add(reading.uncertainty).next(),
            computed_at: reading.local,
        }
    }

    /// Returns whether the wait was already over when it was computed.
    pub fn is_over(&self) -> bool {
        self.computed_at >= self.local_deadline
    }

    /// Returns the local clock time that was left to wait when this was computed.
    pub fn remaining(&self) -> Duration {
        self.local_deadline.saturating_duration_since(self.computed_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClockOptions, SimulatedClock, SimulatedClockOptions, SimulatedTime, SystemClock};

    fn reading(local: u64, uncertainty: u64) -> ClockReading {
        ClockReading {
            local: Timestamp::from_nanos(local),
            uncertainty: Duration::from_nanos(uncertainty),
            bound: UncertaintyBound::Simulated,
        }
    }

    #[test]
    fn commit_wait_deadline_is_commit_plus_uncertainty() {
        // (commit_ts, local, ε, deadline, over, remaining)
        let cases = [
            (100, 50, 10, 111, false, 61),
            (100, 110, 10, 111, false, 1),
            (100, 111, 10, 111, true, 0),
            (100, 500, 10, 111, true, 0),
            (100, 100, 0, 101, false, 1),
        ];
        for (commit_ts, local, uncertainty, deadline, over, remaining) in cases {
            let reading = reading(local, uncertainty);
            let wait = CommitWait::new(Timestamp::from_nanos(commit_ts), reading);
            assert_eq!(wait.local_deadline, Timestamp::from_nanos(deadline));
            assert_eq!(wait.is_over(), over, "{wait:?}");
            assert_eq!(wait.remaining(), Duration::from_nanos(remaining), "{wait:?}");
            // The wait is over exactly when after(commit_ts) holds for the reading.
            assert_eq!(wait.is_over(), reading.interval().after(Timestamp::from_nanos(commit_ts)));
        }
    }

    #[tokio::test]
    async fn wait_until_after_returns_only_once_after_holds() {
        let truetime = TrueTime::new(Arc::new(
            SystemClock::new(ClockOptions {
                max_clock_offset: Duration::from_millis(2),
                use_kernel_bound: false,
            })
            .unwrap(),
        ));
        let commit_ts = truetime.now().latest;
        assert!(!truetime.after(commit_ts));
        let waited = truetime.wait_until_after(commit_ts, Duration::from_secs(5)).await.unwrap();
        assert!(truetime.after(commit_ts));
        // The wait covers at least the interval's width: ε to reach `commit_ts`, ε more to pass it.
        assert!(waited >= Duration::from_millis(4), "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_after_gives_up_on_a_stalled_clock() {
        // Nobody advances the simulated clock, so after() never becomes true.
        let time = SimulatedTime::new(Timestamp::from_nanos(1_000_000_000));
        let clock = SimulatedClock::new(time, SimulatedClockOptions::default()).unwrap();
        let truetime = TrueTime::new(Arc::new(clock));
        let commit_ts = truetime.now().latest;
        let error = truetime.wait_until_after(commit_ts, Duration::from_millis(100)).await;
        assert!(matches!(error, Err(Error::CommitWaitStalled { .. })), "{error:?}");
    }
}
