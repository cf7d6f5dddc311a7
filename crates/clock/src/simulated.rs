//! Simulated clocks for tests and deterministic simulation.
//!
//! A [`SimulatedTime`] is the true time of a simulation; the test advances it by hand. Each
//! simulated node reads it through its own [`SimulatedClock`], which models a real oscillator
//! disciplined by periodic synchronization:
//!
//! - at each [`SimulatedClock::sync`] the local clock is set to true time plus a *skew*
//!   (`offset_at_sync_ns`), like a time-master poll that leaves a residual error;
//! - between syncs the local clock runs `drift_ppm` parts per million too fast or too slow;
//! - the reported uncertainty ε starts at `max_offset` at each sync and grows with local elapsed
//!   time at the assumed worst-case drift `max_drift_ppm` (Spanner's sawtooth, §3).
//!
//! Invariant (proved in the module docs below, checked by property test): while
//! `|offset_at_sync_ns| <= max_offset` and `|drift_ppm| <= max_drift_ppm`, every interval contains
//! true time. Growth is computed as `ceil(local_elapsed * ρ / (10⁶ - ρ)) + 1ns` rather than
//! `local_elapsed * ρ / 10⁶` because a slow clock measures less elapsed time than really passed:
//! `true_elapsed <= local_elapsed / (1 - ρ/10⁶)`, plus one nanosecond for integer rounding.
//!
//! [`SimulatedClock::jump`] steps a clock by any amount at once, which is how tests inject skew
//! beyond the bound and show what breaks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::interval::duration_nanos;
use crate::{ClockReading, ClockSource, Error, Result, Timestamp, UncertaintyBound};

/// One million: drift rates are in parts per million.
const PPM: i128 = 1_000_000;

/// The largest drift bound accepted: beyond 50 % the growth formula's denominator degenerates.
pub const MAX_DRIFT_BOUND_PPM: u64 = 500_000;

/// Reads true time more precisely than the last [`SimulatedTime::set`], where it can.
type TimeSource = Arc<dyn Fn() -> Option<Timestamp> + Send + Sync>;

/// The true time of a simulation, shared by every simulated clock in it. Cheap to clone.
///
/// The test sets it ([`SimulatedTime::set`], [`SimulatedTime::advance`]); a simulator whose
/// hosts each run ahead of the last value set within a step (turmoil runs one host after the
/// other through each step) may also give it a *source* ([`SimulatedTime::with_source`]) that
/// reads the current host's time, so that clocks do not lag behind it by up to a step.
///
/// Invariant: true time as one reader sees it never goes backwards: values set only grow, and
/// a source's reading counts only where it is later than the value set. (Two hosts of one
/// step may read times up to a step apart in either order; they cannot communicate within a
/// step.)
#[derive(Clone)]
pub struct SimulatedTime {
    nanos: Arc<AtomicU64>,
    source: Option<TimeSource>,
}

impl std::fmt::Debug for SimulatedTime {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SimulatedTime")
            .field("nanos", &self.nanos.load(Ordering::SeqCst))
            .field("source", &self.source.is_some())
            .finish()
    }
}

impl SimulatedTime {
    /// Returns a simulation whose true time starts at `start`.
    pub fn new(start: Timestamp) -> Self {
        SimulatedTime { nanos: Arc::new(AtomicU64::new(start.as_nanos())), source: None }
    }

    /// Returns a simulation whose true time starts at `start` and is read from `source` when it
    /// answers and is later than the value last set (see the type's docs).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use meridian_clock::{SimulatedTime, Timestamp};
    ///
    /// let host_time = Arc::new(AtomicU64::new(0));
    /// let read = host_time.clone();
    /// let time = SimulatedTime::with_source(Timestamp::from_nanos(100), move || {
    ///     let nanos = read.load(Ordering::SeqCst);
    ///     (nanos > 0).then(|| Timestamp::from_nanos(nanos))
    /// });
    /// assert_eq!(time.now(), Timestamp::from_nanos(100)); // the source does not answer
    /// host_time.store(150, Ordering::SeqCst);
    /// assert_eq!(time.now(), Timestamp::from_nanos(150)); // a host ran ahead within a step
    /// time.set(Timestamp::from_nanos(200));
    /// assert_eq!(time.now(), Timestamp::from_nanos(200)); // an earlier reading never counts
    /// ```
    pub fn with_source(
        start: Timestamp,
        source: impl Fn() -> Option<Timestamp> + Send + Sync + 'static,
    ) -> Self {
        SimulatedTime {
            nanos: Arc::new(AtomicU64::new(start.as_nanos())),
            source: Some(Arc::new(source)),
        }
    }

    /// Returns the current true time.
    pub fn now(&self) -> Timestamp {
        let set = Timestamp::from_nanos(self.nanos.load(Ordering::SeqCst));
        match self.source.as_ref().and_then(|source| source()) {
            Some(read) if read > set => read,
            _ => set,
        }
    }

    /// Advances true time by `duration`, saturating at [`Timestamp::MAX`].
    pub fn advance(&self, duration: Duration) {
        let delta = duration_nanos(duration);
        // fetch_update cannot fail: the closure always returns Some.
        let _ = self.nanos.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |nanos| {
            Some(nanos.saturating_add(delta))
        });
    }

    /// Sets true time to `t`.
    ///
    /// # Panics
    ///
    /// If `t` is earlier than the current true time: true time never goes backwards.
    pub fn set(&self, t: Timestamp) {
        let previous = self.nanos.fetch_max(t.as_nanos(), Ordering::SeqCst);
        assert!(previous <= t.as_nanos(), "true time must not go backwards ({previous} > {t:?})");
    }
}

/// How a simulated clock deviates from true time, and the bounds it claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimulatedClockOptions {
    /// The local clock's offset from true time right after each sync (local − true), in ns.
    pub offset_at_sync_ns: i64,
    /// How fast the local clock runs relative to true time, in parts per million (negative is
    /// slow).
    pub drift_ppm: i64,
    /// The uncertainty claimed right after a sync: the bound on `|offset_at_sync_ns|`.
    pub max_offset: Duration,
    /// The drift bound assumed between syncs, in parts per million.
    pub max_drift_ppm: u64,
}

impl Default for SimulatedClockOptions {
    /// A perfect clock that claims Spanner's typical bounds: 1 ms after a sync and 200 ppm
    /// (200 µs per second) of drift.
    fn default() -> Self {
        SimulatedClockOptions {
            offset_at_sync_ns: 0,
            drift_ppm: 0,
            max_offset: Duration::from_millis(1),
            max_drift_ppm: 200,
        }
    }
}

impl SimulatedClockOptions {
    /// Checks the options. Offsets and drifts beyond the claimed bounds are allowed on purpose:
    /// tests use them to show what breaks.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `max_drift_ppm` exceeds [`MAX_DRIFT_BOUND_PPM`] or `max_offset`
    /// exceeds 10 seconds.
    pub fn validate(&self) -> Result<()> {
        if self.max_drift_ppm > MAX_DRIFT_BOUND_PPM {
            return Err(Error::InvalidInput(format!(
                "max drift {} ppm exceeds {MAX_DRIFT_BOUND_PPM} ppm",
                self.max_drift_ppm
            )));
        }
        if self.max_offset > crate::system::MAX_MAX_CLOCK_OFFSET {
            return Err(Error::InvalidInput(format!(
                "max offset {} ms is above 10 s",
                self.max_offset.as_millis()
            )));
        }
        Ok(())
    }

    /// Returns whether the clock's real behaviour stays within the bounds it claims, so that
    /// every interval it returns contains true time.
    pub fn within_bounds(&self) -> bool {
        u128::from(self.offset_at_sync_ns.unsigned_abs()) <= self.max_offset.as_nanos()
            && self.drift_ppm.unsigned_abs() <= self.max_drift_ppm
    }
}

/// One node's clock in a simulation. See the module docs for the model.
#[derive(Debug)]
pub struct SimulatedClock {
    time: SimulatedTime,
    state: Mutex<ClockState>,
}

/// The mutable state of a [`SimulatedClock`].
#[derive(Debug)]
struct ClockState {
    /// The clock's behaviour and claimed bounds.
    options: SimulatedClockOptions,
    /// The true time at which the current drift rate took effect.
    rate_anchor_true: i128,
    /// The local time at `rate_anchor_true`, in millionths of a nanosecond (exact).
    rate_anchor_local_scaled: i128,
    /// The local time of the last sync, from which the uncertainty grows.
    synced_local: i128,
}

impl ClockState {
    /// Returns the local clock's value at true time `now`.
    fn local_at(&self, now: i128) -> i128 {
        self.local_scaled_at(now).div_euclid(PPM)
    }

    /// Returns the local clock's value at true time `now` in millionths of a nanosecond.
    fn local_scaled_at(&self, now: i128) -> i128 {
        let elapsed = now - self.rate_anchor_true;
        self.rate_anchor_local_scaled + elapsed * (PPM + i128::from(self.options.drift_ppm))
    }

    /// Returns the uncertainty ε when the local clock reads `local`.
    fn uncertainty_at(&self, local: i128) -> i128 {
        let elapsed_local = (local - self.synced_local).max(0);
        let rho = i128::from(self.options.max_drift_ppm);
        let growth = if elapsed_local == 0 || rho == 0 {
            0
        } else {
            // ceil(elapsed * ρ / (10⁶ − ρ)) + 2 ns; see the module docs.
            (elapsed_local * rho + (PPM - rho) - 1) / (PPM - rho) + 2
        };
        self.options.max_offset.as_nanos() as i128 + growth
    }
}

impl SimulatedClock {
    /// Returns a clock over the simulation `time`, synchronized now.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if the options do not validate.
    pub fn new(time: SimulatedTime, options: SimulatedClockOptions) -> Result<Self> {
        options.validate()?;
        let now = i128::from(time.now().as_nanos());
        let local = now + i128::from(options.offset_at_sync_ns);
        let state = ClockState {
            options,
            rate_anchor_true: now,
            rate_anchor_local_scaled: local * PPM,
            synced_local: local,
        };
        Ok(SimulatedClock { time, state: Mutex::new(state) })
    }

    /// Synchronizes the clock: it reads true time plus `offset_at_sync_ns` again, and its
    /// uncertainty drops back to `max_offset`.
    pub fn sync(&self) {
        let now = i128::from(self.time.now().as_nanos());
        let mut state = self.state.lock();
        let local = now + i128::from(state.options.offset_at_sync_ns);
        state.rate_anchor_true = now;
        state.rate_anchor_local_scaled = local * PPM;
        state.synced_local = local;
    }

    /// Sets the offset the clock will have after its next sync.
    pub fn set_offset_at_sync(&self, offset_ns: i64) {
        self.state.lock().options.offset_at_sync_ns = offset_ns;
    }

    /// Changes the drift rate from now on; the local clock does not jump.
    pub fn set_drift_ppm(&self, drift_ppm: i64) {
        let now = i128::from(self.time.now().as_nanos());
        let mut state = self.state.lock();
        let local_scaled = state.local_scaled_at(now);
        state.rate_anchor_true = now;
        state.rate_anchor_local_scaled = local_scaled;
        state.options.drift_ppm = drift_ppm;
    }

    /// Steps the local clock by `delta_ns` at once (skew injection). The uncertainty does not
    /// account for it: a jump beyond the bound makes the clock lie.
    pub fn jump(&self, delta_ns: i64) {
        let mut state = self.state.lock();
        state.rate_anchor_local_scaled += i128::from(delta_ns) * PPM;
    }

    /// Returns the clock's current real offset from true time (local − true), in ns.
    pub fn true_offset_ns(&self) -> i128 {
        let now = i128::from(self.time.now().as_nanos());
        self.state.lock().local_at(now) - now
    }

    /// Returns the clock's current behaviour and claimed bounds.
    pub fn options(&self) -> SimulatedClockOptions {
        self.state.lock().options
    }
}

impl ClockSource for SimulatedClock {
    fn read(&self) -> ClockReading {
        let now = i128::from(self.time.now().as_nanos());
        let state = self.state.lock();
        let local = state.local_at(now);
        let uncertainty = state.uncertainty_at(local);
        let clamp = |nanos: i128| u64::try_from(nanos.max(0)).unwrap_or(u64::MAX);
        ClockReading {
            local: Timestamp::from_nanos(clamp(local)),
            uncertainty: Duration::from_nanos(clamp(uncertainty)),
            bound: UncertaintyBound::Simulated,
        }
    }
}

#[cfg(test)]
mod tests;
