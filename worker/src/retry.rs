//! Backoff with full jitter for transient failures.

use std::time::Duration;

use rand::Rng;

/// How a transient failure is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Model attempts per message, the first included.
    pub max_attempts: u32,
    /// The backoff ceiling of the first retry; it doubles with each further one.
    pub base_delay: Duration,
    /// No single wait is longer than this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 4, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(10) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry): a uniformly random
    /// duration up to the exponential ceiling ("full jitter"), so that many sessions hitting
    /// the same rate limit do not retry in lock-step. A server's `Retry-After` is a floor.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let jittered = if ceiling.is_zero() { ceiling } else { rand::rng().random_range(Duration::ZERO..=ceiling) };
        jittered.max(retry_after.unwrap_or_default()).min(self.max_delay.max(retry_after.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_an_exponential_ceiling_capped_at_the_maximum() {
        let p =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) };
        for _ in 0..200 {
            assert!(p.delay(1, None) <= Duration::from_millis(100));
            assert!(p.delay(3, None) <= Duration::from_millis(400));
            assert!(p.delay(30, None) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn delays_are_jittered() {
        let p =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_secs(1), max_delay: Duration::from_secs(10) };
        let samples: std::collections::HashSet<_> = (0..50).map(|_| p.delay(2, None)).collect();
        assert!(samples.len() > 1);
    }

    #[test]
    fn retry_after_is_honoured_as_a_floor() {
        let p =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_millis(10), max_delay: Duration::from_secs(10) };
        assert!(p.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
    }
}
