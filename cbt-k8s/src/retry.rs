//! Retrying API calls on transient failures with capped exponential backoff.
//!
//! kube's own retry layer is switched off by [`crate::connect()`] so that this
//! policy alone decides: it also covers 500/502 and dropped connections, and it
//! never sleeps past the caller's deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often and how patiently to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of one wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// True for errors worth retrying: 429, 500, 502, 503, 504, and transport failures.
pub fn is_transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails permanently, runs out of attempts, or
    /// the next wait would pass `deadline`. Honours a server's `retryAfterSeconds`.
    ///
    /// # Errors
    /// The last error from `op`.
    pub async fn run<T, F, Fut>(
        &self,
        deadline: Option<Instant>,
        mut op: F,
    ) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut attempt = 1;
        let mut delay = self.initial_backoff;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) && attempt < self.max_attempts => {
                    let mut wait = delay;
                    if let kube::Error::Api(status) = &e
                        && let Some(details) = &status.details
                        && details.retry_after_seconds > 0
                    {
                        wait =
                            wait.max(Duration::from_secs(u64::from(details.retry_after_seconds)));
                    }
                    let wait = wait.min(self.max_backoff);
                    if deadline.is_some_and(|d| Instant::now() + wait > d) {
                        return Err(e);
                    }
                    tracing::warn!(attempt, ?wait, error = %crate::error::describe(&e), "transient API error, retrying");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(self.max_backoff);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn api_err(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status {
                code,
                ..Default::default()
            }
            .boxed(),
        )
    }

    #[tokio::test]
    async fn retries_transient_then_gives_up_on_permanent() {
        let policy = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        };
        let calls = AtomicU32::new(0);
        let v = policy
            .run(None, || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        Err(api_err(if n == 0 { 429 } else { 500 }))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(v, 2);
        calls.store(0, Ordering::SeqCst);
        let e = policy
            .run(None, || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(api_err(404)) }
            })
            .await
            .unwrap_err();
        assert!(matches!(e, kube::Error::Api(s) if s.code == 404));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        calls.store(0, Ordering::SeqCst);
        assert!(
            policy
                .run(None, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Err::<(), _>(api_err(503)) }
                })
                .await
                .is_err()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
