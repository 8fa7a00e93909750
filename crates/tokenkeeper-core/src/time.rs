//! Time as the library sees it: an absolute [`Timestamp`] with nanosecond resolution and an
//! injectable [`Clock`].
//!
//! All lifecycle decisions (is this token fresh? is this lease still valid?) compare timestamps
//! taken from a `Clock`, never `SystemTime::now()` directly, so tests can move time by exactly
//! one nanosecond across a boundary without sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch (UTC). Covers the years 1678 to 2262.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);
    /// The earliest representable instant.
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// The latest representable instant.
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// From nanoseconds since the epoch.
    pub const fn from_unix_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    /// From whole seconds since the epoch (saturating).
    pub const fn from_unix_secs(secs: i64) -> Self {
        Self(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the epoch.
    pub const fn unix_nanos(self) -> i64 {
        self.0
    }

    /// `self + d`, saturating at [`Timestamp::MAX`].
    pub fn saturating_add(self, d: Duration) -> Self {
        let nanos = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(nanos))
    }

    /// `self - d`, saturating at [`Timestamp::MIN`].
    pub fn saturating_sub(self, d: Duration) -> Self {
        let nanos = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(nanos))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn duration_since(self, earlier: Timestamp) -> Duration {
        let diff = i128::from(self.0) - i128::from(earlier.0);
        if diff <= 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(u64::try_from(diff).unwrap_or(u64::MAX))
        }
    }

    /// As a `SystemTime`, if representable.
    pub fn to_system_time(self) -> Option<SystemTime> {
        if self.0 >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_nanos(self.0.unsigned_abs()))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_nanos(self.0.unsigned_abs()))
        }
    }

    /// From a `SystemTime` (saturating outside the representable range).
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            Err(e) => Self(
                i64::try_from(e.duration().as_nanos())
                    .map(|n| -n)
                    .unwrap_or(i64::MIN),
            ),
        }
    }
}

/// RFC 3339 in UTC, e.g. `2026-11-26T01:11:14.000000001Z`.
/// Whole seconds in RFC 3339 (`2026-01-01T00:00:00Z`): what people read in messages and
/// explanations. `Debug` keeps the exact nanoseconds.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_system_time() {
            Some(t) if self.0 >= 0 => write!(f, "{}", humantime::format_rfc3339_seconds(t)),
            _ => write!(f, "{}s since the epoch", self.0.div_euclid(1_000_000_000)),
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_system_time() {
            Some(t) if self.0 >= 0 && self.0 % 1_000_000_000 == 0 => {
                write!(f, "{}", humantime::format_rfc3339_seconds(t))
            }
            Some(t) if self.0 >= 0 => write!(f, "{}", humantime::format_rfc3339_nanos(t)),
            _ => write!(f, "{}ns since the epoch", self.0),
        }
    }
}

/// A source of the current time. Implementations must be cheap: the hot path calls it.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use tokenkeeper_core::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
/// clock.advance(Duration::from_nanos(1));
/// assert_eq!(clock.now().unix_nanos(), 1_000_000_000_001);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(start.unix_nanos())))
    }

    /// Moves the clock forward by `d` (saturating).
    pub fn advance(&self, d: Duration) {
        let nanos = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(nanos))
            });
    }

    /// Sets the clock to `t` (backwards too: clocks between machines disagree).
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.unix_nanos(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_nanos(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(
            Timestamp::MAX.saturating_add(Duration::from_secs(1)),
            Timestamp::MAX
        );
        assert_eq!(
            Timestamp::MIN.saturating_sub(Duration::from_secs(1)),
            Timestamp::MIN
        );
        let t = Timestamp::from_unix_secs(10);
        assert_eq!(
            t.duration_since(Timestamp::from_unix_secs(4)),
            Duration::from_secs(6)
        );
        assert_eq!(
            Timestamp::from_unix_secs(4).duration_since(t),
            Duration::ZERO
        );
    }

    #[test]
    fn displays_whole_seconds_and_debugs_exactly() {
        assert_eq!(
            Timestamp::from_unix_secs(1_764_119_474).to_string(),
            "2025-11-26T01:11:14Z"
        );
        let odd = Timestamp::from_unix_nanos(1_764_119_474_999_999_999);
        assert_eq!(odd.to_string(), "2025-11-26T01:11:14Z");
        assert_eq!(format!("{odd:?}"), "2025-11-26T01:11:14.999999999Z");
        assert_eq!(
            Timestamp::from_unix_nanos(-1_500_000_000).to_string(),
            "-2s since the epoch"
        );
    }

    #[test]
    fn system_clock_round_trips() {
        let now = SystemClock.now();
        assert_eq!(
            Timestamp::from_system_time(now.to_system_time().unwrap()),
            now
        );
    }
}
