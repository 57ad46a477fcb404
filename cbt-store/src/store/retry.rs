//! Retrying wrapper: re-runs operations that failed with a transient error, with exponential
//! backoff and jitter, up to a bounded number of attempts.
//!
//! Owns the retry policy only; which errors are transient is decided by
//! [`StoreError::is_transient`]. Sleep and randomness are injected so tests are deterministic.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::{
    ListPage, ObjectMeta, ObjectStore, Op, PutMode, PutOptions, PutOutcome, StoreError,
    UncheckedBody,
};

/// How often and how patiently to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = no retries).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles for each later one.
    pub base_delay: Duration,
    /// Upper bound of any single backoff.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Backoff before retry number `retry` (0-based): half of the exponential step fixed, the
    /// other half drawn from `unit` (a number in [0, 1)), capped at `max_delay`.
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A boxed future returned by a [`Sleeper`].
pub type SleepFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Waits between attempts; injected so tests can record delays instead of sleeping.
pub trait Sleeper: Send + Sync + fmt::Debug + 'static {
    /// Returns a future that completes after `delay`.
    fn sleep(&self, delay: Duration) -> SleepFuture;
}

/// [`Sleeper`] backed by `tokio::time::sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, delay: Duration) -> SleepFuture {
        Box::pin(tokio::time::sleep(delay))
    }
}

/// [`ObjectStore`] that retries transient failures of an inner store.
///
/// # Guarantees
/// Non-transient errors are returned at once. After `max_attempts` transient failures the last
/// error is returned. A `put` with [`PutMode::IfAbsent`] whose first attempt landed but whose
/// answer was lost reports [`PutOutcome::AlreadyExists`] on retry; callers that need to tell
/// "mine" from "someone else's" compare contents (content-addressed keys make this moot).
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    sleeper: Arc<dyn Sleeper>,
    rng: Mutex<u64>,
}

impl fmt::Debug for RetryingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryingStore")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RetryingStore {
    /// Wraps `inner` with `policy`, real sleeps and a time-seeded jitter source.
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self {
            inner,
            policy,
            sleeper: Arc::new(TokioSleeper),
            rng: Mutex::new(seed | 1),
        }
    }

    /// Replaces the sleeper (tests record delays instead of waiting).
    pub fn with_sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }

    /// Seeds the jitter source so delays are reproducible.
    pub fn with_seed(self, seed: u64) -> Self {
        Self {
            rng: Mutex::new(seed | 1),
            ..self
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn next_unit(&self) -> f64 {
        // xorshift64*: plenty for jitter, and reproducible from a seed.
        let mut state = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn run<'a, T, F, Fut>(&'a self, op: Op, key: &str, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut(&'a dyn ObjectStore) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + 'a,
    {
        let mut attempt = 1;
        loop {
            match f(self.inner.as_ref()).await {
                Err(e) if e.is_transient() && attempt < self.policy.max_attempts.max(1) => {
                    let delay = self.policy.backoff(attempt - 1, self.next_unit());
                    tracing::debug!(%op, key, attempt, ?delay, error = %e, "retrying transient object store error");
                    self.sleeper.sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for RetryingStore {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        self.run(Op::Put, key, |s| s.put(key, body.clone(), mode))
            .await
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        self.run(Op::Put, key, |s| s.put_with(key, body.clone(), opts))
            .await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.run(Op::Put, "", |s| s.sync()).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.run(Op::Get, key, |s| s.get(key)).await
    }

    async fn get_bounded(&self, key: &str, max_len: u64) -> Result<Bytes, StoreError> {
        self.run(Op::Get, key, |s| s.get_bounded(key, max_len))
            .await
    }

    async fn get_bounded_aligned(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: usize,
    ) -> Result<Bytes, StoreError> {
        self.run(Op::Get, key, |s| {
            s.get_bounded_aligned(key, max_len, aligned_at)
        })
        .await
    }

    async fn get_unchecked(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody, StoreError> {
        self.run(Op::Get, key, |s| s.get_unchecked(key, max_len, aligned_at))
            .await
    }

    fn reads_now(&self) -> bool {
        self.inner.reads_now()
    }

    fn get_unchecked_now(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Option<Result<UncheckedBody, StoreError>> {
        self.inner.get_unchecked_now(key, max_len, aligned_at)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.run(Op::GetRange, key, |s| s.get_range(key, range.clone()))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.run(Op::Head, key, |s| s.head(key)).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError> {
        self.run(Op::List, prefix, |s| {
            s.list_page(prefix, continuation.clone())
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run(Op::Delete, key, |s| s.delete(key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        assert_eq!(p.backoff(0, 0.0), Duration::from_millis(50));
        assert_eq!(p.backoff(0, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(800));
        assert_eq!(p.backoff(4, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(40, 1.0), Duration::from_secs(1));
    }
}
