//! Waiting: backoff with jitter, a sleep that a stop cuts short, a task that ends with
//! its owner, and the pace of progress acks.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The delay before attempt `attempt + 1`: doubling from `base`, at most `max`, with
/// jitter (between half and all of it).
pub(crate) fn backoff(base: Duration, max: Duration, attempt: i32) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let full = base.saturating_mul(2u32.saturating_pow(exponent)).min(max);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // Between half and all of `full`: take off up to half. Computed as a cut, not a
    // product, so that a delay near `Duration::MAX` cannot overflow.
    let cut = 0.5 - (random % 1_000) as f64 / 2_000.0;
    let cut = Duration::try_from_secs_f64(full.as_secs_f64() * cut).unwrap_or(Duration::ZERO);
    full.saturating_sub(cut)
}

/// Sleeps for `duration` unless told to stop first; returns whether to stop.
pub(crate) async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(duration) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// How often a message in hand is reported in progress so that JetStream does not
/// redeliver it: a third of `ack_wait`, at least 100 ms.
pub(crate) fn progress_period(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(100))
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 1..40 {
            let delay = backoff(base, max, attempt);
            let full = (base * 2u32.pow((attempt - 1).min(30) as u32)).min(max);
            assert!(delay >= full / 2 && delay <= full, "{attempt}: {delay:?}");
        }
        assert!(backoff(base, max, 1) <= base);
        assert!(backoff(base, max, 30) >= max / 2);
    }

    #[test]
    fn backoff_never_overflows_at_the_extremes() {
        for attempt in [i32::MIN, -1, 0, 1, i32::MAX] {
            let delay = backoff(Duration::MAX, Duration::MAX, attempt);
            assert!(delay >= Duration::MAX / 2, "{attempt}: {delay:?}");
            assert_eq!(
                backoff(Duration::ZERO, Duration::MAX, attempt),
                Duration::ZERO
            );
        }
    }

    #[test]
    fn progress_is_a_third_of_ack_wait_and_never_below_100ms() {
        assert_eq!(
            progress_period(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            progress_period(Duration::from_millis(30)),
            Duration::from_millis(100)
        );
        assert_eq!(progress_period(Duration::ZERO), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_stop_cuts_the_sleep_short() {
        let (tx, mut rx) = watch::channel(false);
        let sleeping = tokio::spawn(async move { sleep_or_stop(&mut rx, Duration::MAX / 4).await });
        tx.send(true).unwrap();
        assert!(sleeping.await.unwrap());
        let (_tx, mut rx) = watch::channel(false);
        assert!(!sleep_or_stop(&mut rx, Duration::from_millis(1)).await);
    }
}
