//! Time helpers for the lab and for what runs in it (the demo, the benchmarks): the wall clock
//! in Unix milliseconds, and waiting on a condition with a deadline.

use std::time::{Duration, Instant};

/// Milliseconds since the Unix epoch, fractional: the API's clock, so the lab's timelines
/// and the run reports share one time base.
pub use ferry_api::unix_ms_f64 as unix_ms;

/// A duration in fractional milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Calls `check` every `every` until it gives `Some` (returned), or until `timeout` has passed
/// (`Ok(None)`); an error from `check` ends the wait. Written here: a poll loop is a few lines,
/// and the retry crates are built around back-off and async.
pub fn wait_until<T, E>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(Some(v));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        std::thread::sleep(every.min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_condition_holds() {
        let mut calls = 0;
        let got = wait_until(Duration::from_secs(60), Duration::ZERO, || {
            calls += 1;
            Ok::<_, ()>((calls == 3).then_some(calls))
        });
        assert_eq!(got, Ok(Some(3)));
    }

    #[test]
    fn gives_up_at_the_deadline_after_checking_at_least_once() {
        let mut calls = 0;
        let got = wait_until(Duration::ZERO, Duration::from_millis(1), || {
            calls += 1;
            Ok::<Option<()>, ()>(None)
        });
        assert_eq!((got, calls), (Ok(None), 1));
    }

    #[test]
    fn an_error_ends_the_wait() {
        let got = wait_until(Duration::from_secs(60), Duration::ZERO, || {
            Err::<Option<()>, _>("broken")
        });
        assert_eq!(got, Err("broken"));
    }

    #[test]
    fn the_clock_is_after_2020_and_durations_convert() {
        assert!(unix_ms() > 1.577e12);
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }
}
