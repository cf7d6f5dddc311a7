//! The operating system clock as a TrueTime source.
//!
//! The uncertainty follows the kernel's own error bound when there is one: Linux keeps
//! `maxerror` (in `adjtimex`) up to date while chrony or ntpd disciplines the clock, growing it by
//! the worst-case drift between updates, which is exactly TrueTime's sawtooth. When the kernel
//! says the clock is unsynchronized (or on other systems), the configured
//! [`ClockOptions::max_clock_offset`] applies. Each reading says which bound it used.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::interval::duration_nanos;
use crate::{ClockReading, ClockSource, Error, Result, Timestamp, UncertaintyBound};

/// The default maximum clock offset: Spanner reports ε between 1 and 7 ms (§3), and a cluster
/// synchronized by NTP over a LAN stays well within it.
pub const DEFAULT_MAX_CLOCK_OFFSET: Duration = Duration::from_millis(7);

/// The largest maximum clock offset we accept. Every commit waits about twice ε, so a larger bound
/// is almost certainly a unit mistake.
pub const MAX_MAX_CLOCK_OFFSET: Duration = Duration::from_secs(10);

/// Options of the system clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockOptions {
    /// The bound on the local clock's offset from true time assumed when the operating system
    /// reports none.
    pub max_clock_offset: Duration,
    /// Whether to use the kernel's error bound while the clock is synchronized.
    pub use_kernel_bound: bool,
}

impl Default for ClockOptions {
    fn default() -> Self {
        ClockOptions { max_clock_offset: DEFAULT_MAX_CLOCK_OFFSET, use_kernel_bound: true }
    }
}

impl ClockOptions {
    /// Checks the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `max_clock_offset` is zero or above [`MAX_MAX_CLOCK_OFFSET`].
    pub fn validate(&self) -> Result<()> {
        if self.max_clock_offset.is_zero() {
            return Err(Error::InvalidInput("max clock offset must be positive".into()));
        }
        if self.max_clock_offset > MAX_MAX_CLOCK_OFFSET {
            return Err(Error::InvalidInput(format!(
                "max clock offset {} ms exceeds the limit of {} ms",
                self.max_clock_offset.as_millis(),
                MAX_MAX_CLOCK_OFFSET.as_millis()
            )));
        }
        Ok(())
    }
}

/// The operating system's real-time clock with an uncertainty bound.
#[derive(Debug)]
pub struct SystemClock {
    options: ClockOptions,
}

impl SystemClock {
    /// Returns the system clock with the given options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if the options do not validate.
    pub fn new(options: ClockOptions) -> Result<Self> {
        options.validate()?;
        Ok(SystemClock { options })
    }
}

impl ClockSource for SystemClock {
    fn read(&self) -> ClockReading {
        // Read the bound before the time, so the bound is never older than the reading it covers.
        let kernel_bound = if self.options.use_kernel_bound { kernel_max_error() } else { None };
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let local = Timestamp::from_nanos(duration_nanos(since_epoch));
        match kernel_bound {
            Some(uncertainty) => {
                ClockReading { local, uncertainty, bound: UncertaintyBound::Kernel }
            }
            None => ClockReading {
                local,
                uncertainty: self.options.max_clock_offset,
                bound: UncertaintyBound::Configured,
            },
        }
    }
}

/// Returns the kernel's maximum error of the real-time clock, or `None` if the clock is not
/// synchronized or the system has no such bound.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn kernel_max_error() -> Option<Duration> {
    // SAFETY: `timex` is a plain C struct for which all-zero bytes are a valid value, and with
    // `modes == 0` adjtimex(2) only reads the kernel's clock state into it.
    let mut timex: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer refers to a live, writable `timex` for the duration of the call.
    let state = unsafe { libc::adjtimex(&mut timex) };
    let unsynchronized =
        state == -1 || state == libc::TIME_ERROR || timex.status & libc::STA_UNSYNC != 0;
    if unsynchronized || timex.maxerror < 0 {
        return None;
    }
    Some(Duration::from_micros(timex.maxerror as u64))
}

/// Returns `None`: only Linux reports a clock error bound we read.
#[cfg(not(target_os = "linux"))]
pub fn kernel_max_error() -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_validate() {
        let cases = [
            (Duration::ZERO, false),
            (Duration::from_nanos(1), true),
            (DEFAULT_MAX_CLOCK_OFFSET, true),
            (MAX_MAX_CLOCK_OFFSET, true),
            (MAX_MAX_CLOCK_OFFSET + Duration::from_nanos(1), false),
        ];
        for (max_clock_offset, valid) in cases {
            let options = ClockOptions { max_clock_offset, use_kernel_bound: true };
            assert_eq!(options.validate().is_ok(), valid, "{max_clock_offset:?}");
        }
    }

    #[test]
    fn configured_bound_applies_without_the_kernel() {
        let options =
            ClockOptions { max_clock_offset: Duration::from_millis(3), use_kernel_bound: false };
        let reading = SystemClock::new(options).unwrap().read();
        assert_eq!(reading.bound, UncertaintyBound::Configured);
        assert_eq!(reading.uncertainty, Duration::from_millis(3));
        assert_eq!(reading.interval().width(), Duration::from_millis(6));
    }

    #[test]
    fn default_clock_reports_which_bound_it_uses() {
        let reading = SystemClock::new(ClockOptions::default()).unwrap().read();
        match reading.bound {
            UncertaintyBound::Kernel => assert!(!reading.uncertainty.is_zero()),
            UncertaintyBound::Configured => {
                assert_eq!(reading.uncertainty, DEFAULT_MAX_CLOCK_OFFSET)
            }
            UncertaintyBound::Simulated => panic!("the system clock is not simulated"),
        }
    }
}
