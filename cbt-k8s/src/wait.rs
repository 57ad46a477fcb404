//! Waiting for an object to reach a state: get, then watch from its
//! resourceVersion, re-getting after a closed or expired watch, all under one deadline.
//! A caller without `watch` permission still gets there: a 403 on the watch switches
//! the wait to polling with `get` (recorded in [`Notice`], so the caller can say so).

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::core::Resource;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, timeout_at};

use crate::retry::RetryPolicy;

/// Verdict of a state check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The awaited state is reached.
    Done,
    /// Not yet; the string describes the current state.
    Pending(String),
    /// It will never be reached; the string says why.
    Failed(String),
}

/// How a wait learns that the object changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Notice {
    /// Watch from the last seen resourceVersion: prompt, one request per change.
    #[default]
    Watch,
    /// Poll with `get`, backing off from 250 ms to 2 s: what is left when `watch` is forbidden.
    Poll,
}

const FIRST_POLL: Duration = Duration::from_millis(250);
const MAX_POLL: Duration = Duration::from_secs(2);

/// Why a wait ended without reaching the state.
#[derive(Debug)]
pub enum WaitError {
    /// The check said it will never be reached.
    Failed(String),
    /// The deadline passed; the last observed state.
    Timeout(String),
    /// The object does not exist (or was deleted while waiting).
    Gone,
    /// A non-transient API error.
    Api(kube::Error),
}

/// Waits until `check` says [`Check::Done`] for object `name`, or `deadline`.
///
/// `notice` says how changes are noticed; a watch answered 403 Forbidden turns it into
/// [`Notice::Poll`] for the rest of this wait (and tells the caller so through it).
///
/// # Errors
/// See [`WaitError`].
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    retry: &RetryPolicy,
    deadline: Instant,
    notice: &mut Notice,
    check: impl Fn(&K) -> Check,
) -> Result<K, WaitError>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut last = "not observed yet".to_string();
    let mut poll = FIRST_POLL;
    loop {
        let got = match timeout_at(deadline, retry.run(Some(deadline), || api.get_opt(name))).await
        {
            Err(_) => return Err(WaitError::Timeout(last)),
            Ok(Err(e)) if crate::retry::is_transient(&e) => {
                if Instant::now() >= deadline {
                    return Err(WaitError::Timeout(last));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Err(e)) => return Err(WaitError::Api(e)),
            Ok(Ok(None)) => return Err(WaitError::Gone),
            Ok(Ok(Some(obj))) => obj,
        };
        match check(&got) {
            Check::Done => return Ok(got),
            Check::Failed(why) => return Err(WaitError::Failed(why)),
            Check::Pending(state) => last = state,
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(WaitError::Timeout(last));
        }
        if *notice == Notice::Poll {
            // Sleeping past the deadline would only delay the timeout.
            let nap = poll.min(remaining);
            tokio::time::sleep(nap).await;
            poll = (poll * 2).min(MAX_POLL);
            continue;
        }
        let rv = got.meta().resource_version.clone().unwrap_or_default();
        let secs = u32::try_from(remaining.as_secs().clamp(1, 290)).unwrap_or(290);
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(secs);
        let stream = match timeout_at(deadline, api.watch(&params, &rv)).await {
            Err(_) => return Err(WaitError::Timeout(last)),
            Ok(Err(e)) if crate::error::is_forbidden(&e) => {
                tracing::debug!(error = %e, "watch forbidden, polling with get instead");
                *notice = Notice::Poll;
                continue;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "watch failed, falling back to get");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Ok(Ok(s)) => s,
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            match timeout_at(deadline, stream.next()).await {
                Err(_) => return Err(WaitError::Timeout(last)),
                Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(event))) => match event {
                    WatchEvent::Added(obj) | WatchEvent::Modified(obj) => match check(&obj) {
                        Check::Done => return Ok(obj),
                        Check::Failed(why) => return Err(WaitError::Failed(why)),
                        Check::Pending(state) => last = state,
                    },
                    WatchEvent::Deleted(_) => return Err(WaitError::Gone),
                    WatchEvent::Bookmark(_) => {}
                    // 410 Expired and friends: start over from a fresh get.
                    WatchEvent::Error(_) => break,
                },
            }
        }
        // Don't spin if a server closes watches immediately.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
