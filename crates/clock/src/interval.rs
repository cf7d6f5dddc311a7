//! Timestamps and TrueTime intervals.

use std::fmt;
use std::time::Duration;

/// A point in time: nanoseconds since the Unix epoch, UTC.
///
/// Timestamps are totally ordered and are what every MVCC version, lease and commit carries.
/// Arithmetic saturates at [`Timestamp::ZERO`] and [`Timestamp::MAX`] instead of wrapping, so a
/// computed bound can never jump to the other end of time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The smallest timestamp, the Unix epoch.
    pub const ZERO: Timestamp = Timestamp(0);
    /// The largest timestamp (in the year 2554).
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    /// Returns the timestamp `nanos` nanoseconds after the Unix epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// Returns the number of nanoseconds since the Unix epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Returns the timestamp `duration` later, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, duration: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(duration)))
    }

    /// Returns the timestamp `duration` earlier, saturating at [`Timestamp::ZERO`].
    pub fn saturating_sub(self, duration: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_nanos(duration)))
    }

    /// Returns the smallest timestamp greater than this one, saturating at [`Timestamp::MAX`].
    pub fn next(self) -> Self {
        Timestamp(self.0.saturating_add(1))
    }

    /// Returns the time from `earlier` to `self`, or zero if `earlier` is not earlier.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Converts a duration to nanoseconds, saturating at `u64::MAX` (584 years).
pub(crate) fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl fmt::Display for Timestamp {
    /// Formats as RFC 3339 UTC with nanoseconds, e.g. `2026-11-22T00:05:18.000000001Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = (self.0 / 1_000_000_000) as i64;
        let nanos = (self.0 % 1_000_000_000) as u32;
        match chrono::DateTime::from_timestamp(seconds, nanos) {
            Some(time) => write!(f, "{}", time.format("%Y-%m-%dT%H:%M:%S%.9fZ")),
            None => write!(f, "{}ns", self.0),
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.0)
    }
}

/// A TrueTime interval: true time lies somewhere in `[earliest, latest]`.
///
/// Invariants:
/// - `earliest <= latest`.
/// - The width `latest - earliest` is twice the uncertainty ε of the reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    /// The earliest true time could be.
    pub earliest: Timestamp,
    /// The latest true time could be.
    pub latest: Timestamp,
}

impl Interval {
    /// Returns the interval `[local - uncertainty, local + uncertainty]`.
    pub fn around(local: Timestamp, uncertainty: Duration) -> Self {
        Interval {
            earliest: local.saturating_sub(uncertainty),
            latest: local.saturating_add(uncertainty),
        }
    }

    /// Returns whether `t` lies within the interval (both ends included).
    pub fn contains(&self, t: Timestamp) -> bool {
        self.earliest <= t && t <= self.latest
    }

    /// Returns whether `t` has certainly passed: `t < earliest`.
    pub fn after(&self, t: Timestamp) -> bool {
        t < self.earliest
    }

    /// Returns whether `t` has certainly not arrived yet: `t > latest`.
    pub fn before(&self, t: Timestamp) -> bool {
        t > self.latest
    }

    /// Returns the local clock time still to pass before [`Interval::after`]`(t)` holds, given
    /// that the uncertainty does not grow meanwhile; zero if it already holds.
    pub fn time_until_after(&self, t: Timestamp) -> Duration {
        t.next().saturating_duration_since(self.earliest)
    }

    /// Returns the interval's width, twice its uncertainty.
    pub fn width(&self) -> Duration {
        self.latest.saturating_duration_since(self.earliest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_arithmetic_saturates() {
        let cases = [
            (Timestamp::MAX.saturating_add(Duration::from_nanos(1)), Timestamp::MAX),
            (Timestamp::ZERO.saturating_sub(Duration::from_secs(1)), Timestamp::ZERO),
            (
                Timestamp::from_nanos(5).saturating_add(Duration::from_nanos(3)),
                Timestamp::from_nanos(8),
            ),
            (
                Timestamp::from_nanos(5).saturating_sub(Duration::from_nanos(3)),
                Timestamp::from_nanos(2),
            ),
            (Timestamp::MAX.next(), Timestamp::MAX),
            (Timestamp::ZERO.saturating_add(Duration::MAX), Timestamp::MAX),
        ];
        for (index, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(got, want, "case {index}");
        }
    }

    #[test]
    fn timestamp_displays_as_rfc3339() {
        let t = Timestamp::from_nanos(1_795_305_918_000_000_001);
        assert_eq!(t.to_string(), "2026-11-22T00:05:18.000000001Z");
        assert_eq!(Timestamp::ZERO.to_string(), "1970-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn interval_predicates() {
        let interval = Interval::around(Timestamp::from_nanos(100), Duration::from_nanos(10));
        assert_eq!(interval.earliest, Timestamp::from_nanos(90));
        assert_eq!(interval.latest, Timestamp::from_nanos(110));
        assert_eq!(interval.width(), Duration::from_nanos(20));
        // (t, contains, after, before, time_until_after)
        let cases = [
            (89, false, true, false, 0),
            (90, true, false, false, 1),
            (100, true, false, false, 11),
            (110, true, false, false, 21),
            (111, false, false, true, 22),
        ];
        for (t, contains, after, before, wait) in cases {
            let t = Timestamp::from_nanos(t);
            assert_eq!(interval.contains(t), contains, "contains({t:?})");
            assert_eq!(interval.after(t), after, "after({t:?})");
            assert_eq!(interval.before(t), before, "before({t:?})");
            assert_eq!(interval.time_until_after(t), Duration::from_nanos(wait), "wait({t:?})");
        }
    }
}
