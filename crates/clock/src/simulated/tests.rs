//! Tests of the simulated clock: the sawtooth, containment of true time within the bounds, and
//! what breaks beyond them.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::{Interval, TrueTime};

const START: Timestamp = Timestamp::from_nanos(1_795_305_918_000_000_000);
const MS: i64 = 1_000_000;

fn clock(options: SimulatedClockOptions) -> (SimulatedTime, SimulatedClock) {
    let time = SimulatedTime::new(START);
    let clock = SimulatedClock::new(time.clone(), options).unwrap();
    (time, clock)
}

#[test]
fn uncertainty_is_a_sawtooth() {
    let (time, clock) = clock(SimulatedClockOptions::default());
    // (advance true time by ms, sync first?, expected ε in ns)
    let steps = [
        (0, false, 1_000_000),
        // 1 s at 200 ppm: 200 µs of growth (+ the rounding allowance of the slow-clock bound).
        (1_000, false, 1_200_043),
        (1_000, false, 1_400_083),
        (0, true, 1_000_000),
        (500, false, 1_100_023),
        (30_000, false, 7_101_223),
        (0, true, 1_000_000),
    ];
    for (index, (advance_ms, sync, uncertainty_ns)) in steps.into_iter().enumerate() {
        time.advance(Duration::from_millis(advance_ms));
        if sync {
            clock.sync();
        }
        let reading = clock.read();
        assert_eq!(reading.uncertainty, Duration::from_nanos(uncertainty_ns), "step {index}");
        assert!(reading.interval().contains(time.now()), "step {index}");
    }
}

#[test]
fn skew_and_drift_move_the_local_clock() {
    let options =
        SimulatedClockOptions { offset_at_sync_ns: -300_000, drift_ppm: 150, ..Default::default() };
    let (time, clock) = clock(options);
    assert_eq!(clock.true_offset_ns(), -300_000);
    time.advance(Duration::from_secs(2));
    // 2 s at +150 ppm gains 300 µs: the offset is back to zero.
    assert_eq!(clock.true_offset_ns(), 0);
    clock.set_drift_ppm(-100);
    time.advance(Duration::from_secs(1));
    assert_eq!(clock.true_offset_ns(), -100_000);
    clock.jump(5 * MS);
    assert_eq!(clock.true_offset_ns(), 4_900_000);
    clock.sync();
    assert_eq!(clock.true_offset_ns(), -300_000);
}

#[test]
fn options_validate() {
    let valid = SimulatedClockOptions::default();
    assert!(valid.validate().is_ok());
    let drift = SimulatedClockOptions { max_drift_ppm: MAX_DRIFT_BOUND_PPM + 1, ..valid };
    assert!(matches!(drift.validate(), Err(Error::InvalidInput(_))));
    let offset = SimulatedClockOptions { max_offset: Duration::from_secs(11), ..valid };
    assert!(matches!(offset.validate(), Err(Error::InvalidInput(_))));
    // Behaviour beyond the claimed bounds is allowed, and reported as such.
    let lying = SimulatedClockOptions { offset_at_sync_ns: 2 * MS, ..valid };
    assert!(lying.validate().is_ok());
    assert!(!lying.within_bounds());
}

#[test]
#[should_panic(expected = "true time must not go backwards")]
fn true_time_never_goes_backwards() {
    let time = SimulatedTime::new(START);
    time.set(Timestamp::from_nanos(START.as_nanos() - 1));
}

/// One step of a simulated clock's life.
#[derive(Clone, Debug)]
enum Step {
    Advance(Duration),
    Sync,
    SetDrift(i64),
    SetOffsetAtSync(i64),
}

fn steps(max_offset_ns: i64, max_drift_ppm: i64) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        4 => (0u64..120_000_000_000).prop_map(|nanos| Step::Advance(Duration::from_nanos(nanos))),
        1 => Just(Step::Sync),
        1 => (-max_drift_ppm..=max_drift_ppm).prop_map(Step::SetDrift),
        1 => (-max_offset_ns..=max_offset_ns).prop_map(Step::SetOffsetAtSync),
    ];
    proptest::collection::vec(step, 1..60)
}

proptest! {
    /// Within the bounds, every interval contains true time, whatever the skew, drift, drift
    /// changes and sync pattern.
    #[test]
    fn within_bounds_every_interval_contains_true_time(
        max_offset_ns in 1i64..10 * MS,
        max_drift_ppm in 0i64..1_000,
        offset_fraction in -1.0f64..=1.0,
        drift_fraction in -1.0f64..=1.0,
        steps in steps(10 * MS, 1_000),
    ) {
        let options = SimulatedClockOptions {
            offset_at_sync_ns: (max_offset_ns as f64 * offset_fraction) as i64,
            drift_ppm: (max_drift_ppm as f64 * drift_fraction) as i64,
            max_offset: Duration::from_nanos(max_offset_ns as u64),
            max_drift_ppm: max_drift_ppm as u64,
        };
        prop_assert!(options.within_bounds());
        let (time, clock) = clock(options);
        for step in steps {
            match step {
                Step::Advance(duration) => time.advance(duration),
                Step::Sync => clock.sync(),
                // Keep the generated values within this clock's own bounds.
                Step::SetDrift(drift) => clock.set_drift_ppm(drift.clamp(-max_drift_ppm, max_drift_ppm)),
                Step::SetOffsetAtSync(offset) => {
                    clock.set_offset_at_sync(offset.clamp(-max_offset_ns, max_offset_ns))
                }
            }
            let interval = clock.read().interval();
            prop_assert!(
                interval.contains(time.now()),
                "{interval:?} misses true time {:?} with offset {} ns",
                time.now(),
                clock.true_offset_ns()
            );
        }
    }
}

#[test]
fn beyond_the_bound_intervals_miss_true_time() {
    // (name, options, ms to run without a sync, interval contains true time?)
    let base = SimulatedClockOptions::default();
    let cases = [
        ("skew at the bound", SimulatedClockOptions { offset_at_sync_ns: MS, ..base }, 0, true),
        (
            "skew past the bound",
            SimulatedClockOptions { offset_at_sync_ns: MS + 1, ..base },
            0,
            false,
        ),
        (
            "slow skew past the bound",
            SimulatedClockOptions { offset_at_sync_ns: -MS - 1, ..base },
            0,
            false,
        ),
        ("drift at the bound", SimulatedClockOptions { drift_ppm: 200, ..base }, 60_000, true),
        // 300 ppm for 60 s gains 18 ms; ε grew by only 12 ms on top of its 1 ms.
        ("drift past the bound", SimulatedClockOptions { drift_ppm: 300, ..base }, 60_000, false),
        (
            "slow drift past the bound",
            SimulatedClockOptions { drift_ppm: -300, ..base },
            60_000,
            false,
        ),
    ];
    for (name, options, run_ms, contains) in cases {
        let (time, clock) = clock(options);
        time.advance(Duration::from_millis(run_ms));
        assert_eq!(options.within_bounds(), contains, "{name}");
        assert_eq!(clock.read().interval().contains(time.now()), contains, "{name}");
    }
}

/// Runs Spanner's external-consistency argument (§4.1.2) across two nodes: a writer on node A
/// commits at `s = A.now().latest` and acknowledges after commit-wait; a reader on node B starts
/// after the acknowledgement and reads at `B.now().latest`. Returns `(s, read_ts)`.
fn commit_then_read(offset_a_ns: i64, offset_b_ns: i64) -> (Timestamp, Timestamp) {
    let time = SimulatedTime::new(START);
    let node = |offset_at_sync_ns| {
        let options = SimulatedClockOptions { offset_at_sync_ns, ..Default::default() };
        TrueTime::new(Arc::new(SimulatedClock::new(time.clone(), options).unwrap()))
    };
    let (a, b) = (node(offset_a_ns), node(offset_b_ns));
    let commit_ts = a.now().latest;
    // Commit-wait in 10 µs steps of true time, bounded.
    for _ in 0..10_000 {
        if a.after(commit_ts) {
            break;
        }
        time.advance(Duration::from_micros(10));
    }
    assert!(a.after(commit_ts), "commit-wait did not finish");
    // The acknowledgement reaches the client; the client then starts a read on node B.
    let read_ts = b.now().latest;
    (commit_ts, read_ts)
}

#[test]
fn commit_wait_gives_external_consistency_only_within_the_bound() {
    // (name, A's offset, B's offset, does the later read see the commit?)
    let cases = [
        ("perfect clocks", 0, 0, true),
        ("A fast, B slow, both at the bound", MS, -MS, true),
        ("A slow, B fast, both at the bound", -MS, MS, true),
        // A's clock runs 3 ms ahead while claiming 1 ms: it waits out a timestamp that true time
        // has not reached, and B (honest) reads below it: a stale read after the commit.
        ("A fast beyond the bound", 3 * MS, 0, false),
        // B's clock runs 3 ms behind while claiming 1 ms: B picks a read timestamp in the past.
        ("B slow beyond the bound", 0, -3 * MS, false),
    ];
    for (name, offset_a, offset_b, consistent) in cases {
        let (commit_ts, read_ts) = commit_then_read(offset_a, offset_b);
        assert_eq!(read_ts > commit_ts, consistent, "{name}: s={commit_ts:?} read={read_ts:?}");
    }
}

#[test]
fn interval_of_reading_matches_truetime_now() {
    let (time, clock) =
        clock(SimulatedClockOptions { offset_at_sync_ns: 250_000, ..Default::default() });
    time.advance(Duration::from_secs(3));
    let reading = clock.read();
    assert_eq!(reading.interval(), Interval::around(reading.local, reading.uncertainty));
    assert_eq!(TrueTime::new(Arc::new(clock)).now(), reading.interval());
}
