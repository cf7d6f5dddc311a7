//! Fault injection: a clock source that reads another one shifted by a settable skew.
//!
//! The skew is not reflected in the uncertainty, so a skew beyond the bound makes the clock
//! lie, which is exactly what clock-offset checks between nodes must catch. Nodes accept a skew
//! only through an explicit fault-injection flag, for tests of those checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::{ClockReading, ClockSource, Timestamp};

/// A clock that reads `inner` plus a skew.
#[derive(Debug)]
pub struct SkewedClock {
    inner: Arc<dyn ClockSource>,
    skew_ns: AtomicI64,
}

impl SkewedClock {
    /// Returns `inner` shifted by `skew_ns` (positive: ahead of `inner`).
    pub fn new(inner: Arc<dyn ClockSource>, skew_ns: i64) -> Self {
        SkewedClock { inner, skew_ns: AtomicI64::new(skew_ns) }
    }

    /// Changes the skew.
    pub fn set_skew_ns(&self, skew_ns: i64) {
        self.skew_ns.store(skew_ns, Ordering::SeqCst);
    }
}

impl ClockSource for SkewedClock {
    fn read(&self) -> ClockReading {
        let reading = self.inner.read();
        let local =
            reading.local.as_nanos().saturating_add_signed(self.skew_ns.load(Ordering::SeqCst));
        ClockReading { local: Timestamp::from_nanos(local), ..reading }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{SimulatedClock, SimulatedClockOptions, SimulatedTime};

    #[test]
    fn skew_shifts_readings_but_not_uncertainty() {
        let time = SimulatedTime::new(Timestamp::from_nanos(10_000_000_000));
        let inner: Arc<dyn ClockSource> =
            Arc::new(SimulatedClock::new(time, SimulatedClockOptions::default()).unwrap());
        let skewed = SkewedClock::new(inner.clone(), 5_000_000);
        let (plain, shifted) = (inner.read(), skewed.read());
        assert_eq!(shifted.local.as_nanos(), plain.local.as_nanos() + 5_000_000);
        assert_eq!(shifted.uncertainty, plain.uncertainty);
        skewed.set_skew_ns(-2_000_000);
        assert_eq!(skewed.read().local.saturating_add(Duration::from_millis(2)), plain.local);
    }
}
