//! When the announcement rounds go out, and how to stop them early.
//!
//! Round 0 goes out at once; round `k + 1` follows round `k` after the gap
//!
//! ```text
//! gap(k) = min(max_interval, interval × backoff^k + step × k)
//! ```
//!
//! Rounds are timed from the start (offsets, not sleeps after each send), so slow sends do not
//! stretch the series.
//!
//! # Defaults
//!
//! `count = 4, interval = 50 ms, step = 100 ms, backoff = 1.0, max_interval = 1 s`: rounds at
//! 0, 50, 200 and 450 ms (gaps 50, 150, 250 ms). This is the series of ferry's migration
//! design (`release`: "first at once, then e.g. 50, 150, 250 ms"), which is also QEMU's
//! self-announce after live migration (initial 50 ms, +100 ms a round). Linux itself sends one
//! notification by default (`arp_notify`, bonding's `num_grat_arp` / `num_unsol_na` = 1); one
//! is too few here: an announcement is a broadcast that nobody acknowledges or retransmits, and
//! the first round races with the end of the restore (the port's carrier, a busy peer).
//! Repeats cost little (each round is two 60-byte frames per IPv4 address and one 86-byte frame
//! per IPv6 address) and the whole series is over within half a second, well inside any ARP or
//! bridge timer, so it never outlives the move it announces.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Upper bound for `count`.
pub const MAX_COUNT: u32 = 1000;
/// Upper bound for `interval`, `step` and `max_interval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Upper bound for `backoff`.
pub const MAX_BACKOFF: f64 = 16.0;

/// How many rounds, and the gaps between them. See the module docs for the formula and the
/// defaults.
///
/// Deserializes from (all optional, unknown fields refused, validated while parsing):
/// `{"count": 4, "interval_ms": 50, "step_ms": 100, "backoff": 1.0, "max_interval_ms": 1000}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ScheduleConfig", into = "ScheduleConfig")]
pub struct Schedule {
    /// Number of rounds, at least 1.
    pub count: u32,
    /// Gap between round 0 and round 1.
    pub interval: Duration,
    /// Added to each following gap (linear growth, QEMU's "step").
    pub step: Duration,
    /// Multiplies each following gap (exponential growth); 1.0 = none.
    pub backoff: f64,
    /// No gap is longer than this.
    pub max_interval: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            count: 4,
            interval: Duration::from_millis(50),
            step: Duration::from_millis(100),
            backoff: 1.0,
            max_interval: Duration::from_secs(1),
        }
    }
}

impl Schedule {
    /// A single round.
    pub fn once() -> Self {
        Schedule::fixed(1, Duration::ZERO)
    }

    /// `count` rounds, `interval` apart.
    pub fn fixed(count: u32, interval: Duration) -> Self {
        Schedule {
            count,
            interval,
            step: Duration::ZERO,
            backoff: 1.0,
            max_interval: MAX_INTERVAL,
        }
    }

    /// `count` rounds, the gaps starting at `first` and multiplied by `factor` each time.
    pub fn exponential(count: u32, first: Duration, factor: f64) -> Self {
        Schedule {
            backoff: factor,
            ..Schedule::fixed(count, first)
        }
    }

    /// Checks the ranges: `1 <= count <= 1000`, durations at most an hour,
    /// `1.0 <= backoff <= 16.0`.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidSchedule(msg));
        if self.count == 0 {
            return bad("count must be at least 1".into());
        }
        if self.count > MAX_COUNT {
            return bad(format!("count {} is above {MAX_COUNT}", self.count));
        }
        for (name, d) in [
            ("interval", self.interval),
            ("step", self.step),
            ("max_interval", self.max_interval),
        ] {
            if d > MAX_INTERVAL {
                return bad(format!("{name} {d:?} is above {MAX_INTERVAL:?}"));
            }
        }
        if !self.backoff.is_finite() || !(1.0..=MAX_BACKOFF).contains(&self.backoff) {
            return bad(format!(
                "backoff {} must be between 1.0 and {MAX_BACKOFF}",
                self.backoff
            ));
        }
        Ok(())
    }

    /// The gap after round `k` (0-based), before round `k + 1`.
    pub fn gap(&self, k: u32) -> Duration {
        let exp = i32::try_from(k).unwrap_or(i32::MAX);
        let secs = self.interval.as_secs_f64() * self.backoff.powi(exp)
            + self.step.as_secs_f64() * f64::from(k);
        let cap = self.max_interval.as_secs_f64();
        // `secs` may be +inf for a large k; `min` keeps it finite (both operands are >= 0).
        Duration::from_secs_f64(secs.min(cap).max(0.0))
    }

    /// When each round goes out, from the start: `[0, gap(0), gap(0) + gap(1), ...]`,
    /// `count` entries (none if `count` is 0).
    pub fn offsets(&self) -> Vec<Duration> {
        let mut at = Duration::ZERO;
        (0..self.count)
            .map(|k| {
                if k > 0 {
                    at = at.saturating_add(self.gap(k - 1));
                }
                at
            })
            .collect()
    }

    /// When the last round goes out.
    pub fn duration(&self) -> Duration {
        self.offsets().last().copied().unwrap_or_default()
    }
}

/// The serialized form of a [`Schedule`]: durations in milliseconds, every field optional.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ScheduleConfig {
    count: u32,
    interval_ms: u64,
    step_ms: u64,
    backoff: f64,
    max_interval_ms: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Schedule::default().into()
    }
}

impl From<Schedule> for ScheduleConfig {
    fn from(s: Schedule) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ScheduleConfig {
            count: s.count,
            interval_ms: ms(s.interval),
            step_ms: ms(s.step),
            backoff: s.backoff,
            max_interval_ms: ms(s.max_interval),
        }
    }
}

impl TryFrom<ScheduleConfig> for Schedule {
    type Error = Error;

    fn try_from(c: ScheduleConfig) -> Result<Self> {
        let s = Schedule {
            count: c.count,
            interval: Duration::from_millis(c.interval_ms),
            step: Duration::from_millis(c.step_ms),
            backoff: c.backoff,
            max_interval: Duration::from_millis(c.max_interval_ms),
        };
        s.validate()?;
        Ok(s)
    }
}

/// A cancellation token: [`Cancel::cancel`] from any thread stops an
/// [`announce`](crate::announce) between rounds (a round that has started is finished). Clones
/// share the state.
#[derive(Clone, Debug, Default)]
pub struct Cancel {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Cancel {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels, waking any waiting announcer.
    pub fn cancel(&self) {
        let (lock, cv) = &*self.inner;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps until `deadline` or until cancelled; returns `true` if cancelled.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        let (lock, cv) = &*self.inner;
        let mut cancelled = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *cancelled {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            cancelled = cv
                .wait_timeout(cancelled, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn default_series_is_the_designs() {
        let s = Schedule::default();
        s.validate().unwrap();
        assert_eq!(s.offsets(), vec![ms(0), ms(50), ms(200), ms(450)]);
        assert_eq!(s.duration(), ms(450));
    }

    #[test]
    fn fixed_and_once() {
        assert_eq!(Schedule::once().offsets(), vec![ms(0)]);
        assert_eq!(
            Schedule::fixed(3, ms(100)).offsets(),
            vec![ms(0), ms(100), ms(200)]
        );
    }

    #[test]
    fn exponential_with_cap() {
        let mut s = Schedule::exponential(6, ms(100), 2.0);
        assert_eq!(
            s.offsets(),
            vec![ms(0), ms(100), ms(300), ms(700), ms(1500), ms(3100)]
        );
        s.max_interval = ms(500);
        assert_eq!(
            s.offsets(),
            vec![ms(0), ms(100), ms(300), ms(700), ms(1200), ms(1700)]
        );
    }

    #[test]
    fn huge_exponent_stays_finite() {
        let s = Schedule {
            count: MAX_COUNT,
            backoff: MAX_BACKOFF,
            ..Schedule::default()
        };
        s.validate().unwrap();
        assert_eq!(s.gap(MAX_COUNT - 1), s.max_interval);
    }

    #[test]
    fn validation() {
        let bad = [
            Schedule {
                count: 0,
                ..Schedule::default()
            },
            Schedule {
                count: MAX_COUNT + 1,
                ..Schedule::default()
            },
            Schedule {
                backoff: 0.5,
                ..Schedule::default()
            },
            Schedule {
                backoff: f64::NAN,
                ..Schedule::default()
            },
            Schedule {
                interval: MAX_INTERVAL + ms(1),
                ..Schedule::default()
            },
        ];
        for s in bad {
            assert!(
                matches!(s.validate(), Err(Error::InvalidSchedule(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn serde_defaults_and_validation() {
        let s: Schedule = serde_json::from_str("{}").unwrap();
        assert_eq!(s, Schedule::default());
        let s: Schedule = serde_json::from_str(r#"{"count": 2, "interval_ms": 20}"#).unwrap();
        assert_eq!(s.offsets(), vec![ms(0), ms(20)]);
        let err = serde_json::from_str::<Schedule>(r#"{"count": 0}"#).unwrap_err();
        assert!(
            err.to_string().contains("count must be at least 1"),
            "{err}"
        );
        assert!(serde_json::from_str::<Schedule>(r#"{"interval": 5}"#).is_err());
        let back: Schedule =
            serde_json::from_str(&serde_json::to_string(&Schedule::default()).unwrap()).unwrap();
        assert_eq!(back, Schedule::default());
    }

    #[test]
    fn cancel_wakes_a_sleeper() {
        let c = Cancel::new();
        assert!(!c.sleep_until(Instant::now() + ms(5)));
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            (
                c2.sleep_until(start + Duration::from_secs(30)),
                start.elapsed(),
            )
        });
        std::thread::sleep(ms(20));
        c.cancel();
        let (cancelled, waited) = t.join().unwrap();
        assert!(cancelled);
        assert!(waited < Duration::from_secs(5));
        assert!(c.is_cancelled());
    }
}
