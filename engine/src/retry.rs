//! One retry policy for calls to services that fail for a while (a broker restarting, an API
//! throttling, a registry behind a load balancer): exponential backoff, capped, with "equal
//! jitter" (half the delay fixed, half random: waits never collapse to zero, and many callers
//! that failed together do not retry together — AWS's architecture blog compares the
//! variants), bounded by a number of attempts and by the time since the first failure.
//!
//! Hand-written rather than a crate (`backoff`, `tokio-retry`): the policy is these twenty
//! lines, callers differ in what counts as retryable and in what they redo between attempts
//! (a new iterator, only the rejected records), and the jitter needs no RNG dependency (the
//! standard library's randomly keyed hasher supplies it).

use std::time::{Duration, Instant};

/// How long and how often to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait (before jitter).
    pub initial: Duration,
    /// The longest single wait.
    pub max_delay: Duration,
    /// Attempts after which the caller gives up (`None`: no limit by count).
    pub max_attempts: Option<u32>,
    /// Time since the first failure after which the caller gives up (`None`: no limit by
    /// time).
    pub give_up_after: Option<Duration>,
}

impl RetryPolicy {
    /// 100 ms doubling to 5 s, giving up after 20 retries or 2 minutes.
    pub const DEFAULT: Self = Self {
        initial: Duration::from_millis(100),
        max_delay: Duration::from_secs(5),
        max_attempts: Some(20),
        give_up_after: Some(Duration::from_secs(120)),
    };

    /// The retries of one call under this policy.
    pub fn start(self) -> Retry {
        Retry {
            policy: self,
            failures: 0,
            first_failure: None,
        }
    }
}

/// The retries of one call: ask [`Retry::next_delay`] (or [`Retry::wait`]) after each failure.
#[derive(Debug, Clone)]
pub struct Retry {
    policy: RetryPolicy,
    failures: u32,
    first_failure: Option<Instant>,
}

impl Retry {
    /// Records a failure: the wait before the next attempt, or `None` when the policy's
    /// budget is spent (give up, with the last error).
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.failures += 1;
        let first = *self.first_failure.get_or_insert_with(Instant::now);
        if self.policy.max_attempts.is_some_and(|n| self.failures > n) {
            return None;
        }
        let ceiling = self
            .policy
            .initial
            .saturating_mul(1u32 << (self.failures - 1).min(20))
            .min(self.policy.max_delay);
        let half = ceiling / 2;
        let delay = half + jitter(half);
        if self
            .policy
            .give_up_after
            .is_some_and(|limit| first.elapsed() + delay > limit)
        {
            return None;
        }
        Some(delay)
    }

    /// Records a failure and sleeps before the next attempt; `false` (at once) when the
    /// budget is spent.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }

    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.first_failure = None;
    }
}

/// A random duration in `[0, up_to]`.
fn jitter(up_to: Duration) -> Duration {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let nanos = up_to.as_nanos() as u64;
    Duration::from_nanos(if nanos == 0 { 0 } else { bits % (nanos + 1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_their_jitter_up_to_the_cap_and_stop_at_the_attempt_limit() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            max_attempts: Some(6),
            give_up_after: None,
        };
        let mut r = policy.start();
        let ceilings = [100u64, 200, 400, 800, 800, 800];
        for c in ceilings {
            let d = r.next_delay().expect("within the budget");
            let c = Duration::from_millis(c);
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
        }
        assert_eq!(r.next_delay(), None, "the seventh failure gives up");
        r.reset();
        assert!(r.next_delay().unwrap() <= Duration::from_millis(100));
    }

    #[test]
    fn the_time_limit_counts_from_the_first_failure() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(10),
            max_delay: Duration::from_secs(10),
            max_attempts: None,
            give_up_after: Some(Duration::from_secs(1)),
        };
        // The first wait alone (5–10 s) would pass the limit.
        assert_eq!(policy.start().next_delay(), None);
    }
}
