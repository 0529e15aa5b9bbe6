//! Time is injected: every expiry, `nbf` and `iat` decision reads a [`Clock`], so tests
//! can move time with a [`FakeClock`] instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in whole seconds since the Unix epoch.
    fn now_unix(&self) -> UnixTime {
        self.now_unix_millis() / 1000
    }
    /// The current time in milliseconds since the Unix epoch.
    fn now_unix_millis(&self) -> i64;
}

/// A clock shared between components.
pub type SharedClock = Arc<dyn Clock>;

/// The wall clock. The only place in lanyard allowed to read the system time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl SystemClock {
    /// A shared handle to the wall clock.
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one sanctioned read of the wall clock
    fn now_unix_millis(&self) -> i64 {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A clock that only moves when told to. For tests.
#[derive(Debug, Clone)]
pub struct FakeClock {
    millis: Arc<AtomicI64>,
}

impl FakeClock {
    /// A fake clock set to `unix` seconds.
    pub fn at(unix: UnixTime) -> Self {
        Self {
            millis: Arc::new(AtomicI64::new(unix.saturating_mul(1000))),
        }
    }
    /// Move the clock forward (or back, with a negative value) by `secs` seconds.
    pub fn advance(&self, secs: i64) {
        self.millis
            .fetch_add(secs.saturating_mul(1000), Ordering::SeqCst);
    }
    /// Set the clock to `unix` seconds.
    pub fn set(&self, unix: UnixTime) {
        self.millis
            .store(unix.saturating_mul(1000), Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_unix_millis(&self) -> i64 {
        self.millis.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_told() {
        let c = FakeClock::at(1_000);
        assert_eq!(c.now_unix(), 1_000);
        c.advance(30);
        assert_eq!(c.now_unix(), 1_030);
        c.set(5);
        assert_eq!(c.now_unix_millis(), 5_000);
    }

    #[test]
    fn system_clock_is_after_2024() {
        assert!(SystemClock.now_unix() > 1_700_000_000);
    }
}
