//! Resume policy of broken streams: bounded attempts, exponential backoff with jitter.

use std::time::Duration;

/// How a broken stream is resumed.
///
/// `max_attempts` bounds *consecutive* failed attempts that made no progress; an attempt that
/// moved the resume offset resets the count, so a long stream over a flaky link still finishes
/// while a dead service fails after `max_attempts` tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Consecutive failures without progress before the call fails (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any single delay.
    pub max_backoff: Duration,
    /// Seed for the jitter; `None` seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            seed: None,
        }
    }
}

impl RetryPolicy {
    /// No retries at all: the first broken stream fails the call.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Delay before retry number `failures` (1-based): "equal jitter" over an exponential
    /// ceiling, i.e. uniformly in [ceiling/2, ceiling].
    pub fn delay(&self, failures: u32, rng: &mut Jitter) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let half = ceiling / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let extra = if nanos == 0 {
            0
        } else {
            rng.next() % (nanos + 1)
        };
        half + Duration::from_nanos(extra)
    }
}

/// Small deterministic PRNG (splitmix64) for backoff jitter; seedable for tests.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeds from `seed` or from the clock.
    pub fn new(seed: Option<u64>) -> Self {
        let s = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15)
        });
        Self(s)
    }

    /// Next pseudo-random value.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds_and_cap() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..Default::default()
        };
        let mut rng = Jitter::new(Some(7));
        for (n, ceiling_ms) in [
            (1, 100u64),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (9, 1000),
        ] {
            for _ in 0..50 {
                let d = p.delay(n, &mut rng);
                assert!(
                    d >= Duration::from_millis(ceiling_ms / 2)
                        && d <= Duration::from_millis(ceiling_ms),
                    "{n}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_is_deterministic_per_seed() {
        let mut a = Jitter::new(Some(1));
        let mut b = Jitter::new(Some(1));
        assert_eq!((a.next(), a.next()), (b.next(), b.next()));
    }
}
