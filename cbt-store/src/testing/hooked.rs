//! A forwarding [`ObjectStore`] for tests that need a store with one twist (counting what is
//! read, recording puts, delaying a delete, acting on the store mid-run, handing out bodies at
//! odd addresses): [`HookedStore`] forwards every call to an inner store and shows it to a
//! [`StoreHook`], so a test writes only the twist, not another copy of the forwarding.
//!
//! Owns only forwarding and the hook points; rule-based fault injection (fail the n-th call,
//! damage a body, lose an answer) is [`crate::store::fault::FaultyStore`]'s, itself a
//! [`HookedStore`] whose hook decides each call's [`Forward`].

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::store::{
    ListPage, ObjectMeta, ObjectStore, Op, PutMode, PutOptions, PutOutcome, StoreError,
    UncheckedBody,
};

/// One call to a [`HookedStore`], as its hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call<'a> {
    /// [`ObjectStore::put`] (shown with `PutOptions::new(mode)`) or [`ObjectStore::put_with`]
    /// of a body of `len` bytes.
    Put {
        /// Key written.
        key: &'a str,
        /// Length of the body.
        len: u64,
        /// Options of the put.
        opts: PutOptions,
    },
    /// [`ObjectStore::sync`].
    Sync,
    /// [`ObjectStore::get`], [`ObjectStore::get_bounded`] (with `max_len`),
    /// [`ObjectStore::get_bounded_aligned`] (with `max_len` and `aligned_at`), or a read on the
    /// caller's thread, [`ObjectStore::get_unchecked_now`] (see [`StoreHook::reads_now`]).
    Get {
        /// Key read.
        key: &'a str,
        /// The bound asked for, if any.
        max_len: Option<u64>,
        /// The alignment wish, if any.
        aligned_at: Option<usize>,
    },
    /// [`ObjectStore::get_range`].
    GetRange {
        /// Key read.
        key: &'a str,
        /// Bytes asked for.
        range: Range<u64>,
    },
    /// [`ObjectStore::head`].
    Head {
        /// Key asked about.
        key: &'a str,
    },
    /// [`ObjectStore::list_page`].
    List {
        /// Prefix listed.
        prefix: &'a str,
        /// Where the page starts.
        continuation: Option<&'a str>,
    },
    /// [`ObjectStore::delete`].
    Delete {
        /// Key removed.
        key: &'a str,
    },
}

impl Call<'_> {
    /// The operation as [`StoreError`]s name it; `None` for a sync.
    pub fn op(&self) -> Option<Op> {
        match self {
            Call::Put { .. } => Some(Op::Put),
            Call::Sync => None,
            Call::Get { .. } => Some(Op::Get),
            Call::GetRange { .. } => Some(Op::GetRange),
            Call::Head { .. } => Some(Op::Head),
            Call::List { .. } => Some(Op::List),
            Call::Delete { .. } => Some(Op::Delete),
        }
    }

    /// The key of the call (the prefix of a listing, empty for a sync).
    pub fn key(&self) -> &str {
        match self {
            Call::Put { key, .. }
            | Call::Get { key, .. }
            | Call::GetRange { key, .. }
            | Call::Head { key }
            | Call::Delete { key } => key,
            Call::List { prefix, .. } => prefix,
            Call::Sync => "",
        }
    }
}

/// How a [`HookedStore`] forwards one call, as [`StoreHook::forward`] decided for it: the
/// decision travels with the call, so concurrent calls never see each other's.
#[derive(Default)]
pub struct Forward {
    /// Replaces the body: a put's before it is stored (then with a checksum of its own, not
    /// the one the caller gave), a read's before [`StoreHook::read`] sees it.
    pub body: Option<Box<dyn FnOnce(Bytes) -> Bytes + Send>>,
    /// Once the inner store has answered a call successfully, fail it with this error
    /// instead: the call took effect, its answer was lost.
    pub then_fail: Option<StoreError>,
}

impl Forward {
    /// Forward the call as it is.
    pub fn as_is() -> Self {
        Forward::default()
    }

    fn reshape(&mut self, body: Bytes) -> Bytes {
        match self.body.take() {
            Some(f) => f(body),
            None => body,
        }
    }

    fn answer<T>(self, out: T) -> Result<T, StoreError> {
        match self.then_fail {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("body", &self.body.as_ref().map(|_| "replaced"))
            .field("then_fail", &self.then_fail)
            .finish()
    }
}

/// The twist of a [`HookedStore`]; every method defaults to doing nothing.
#[async_trait::async_trait]
pub trait StoreHook: fmt::Debug + Send + Sync + 'static {
    /// Runs before `call` is forwarded, with the inner store at hand (to act on it first, or to
    /// wait); an error is returned to the caller and the call is not forwarded.
    async fn before(&self, inner: &dyn ObjectStore, call: &Call<'_>) -> Result<(), StoreError> {
        let _ = (inner, call);
        Ok(())
    }

    /// Decides how `call` is forwarded (a hook that changes bodies or loses answers overrides
    /// this); the default runs [`StoreHook::before`] and forwards the call as it is.
    async fn forward(
        &self,
        inner: &dyn ObjectStore,
        call: &Call<'_>,
    ) -> Result<Forward, StoreError> {
        self.before(inner, call).await.map(|()| Forward::as_is())
    }

    /// Whether reads on the caller's thread ([`ObjectStore::get_unchecked_now`]) are forwarded
    /// where the inner store offers them. Only a hook that sees them through
    /// [`StoreHook::before_now`] says yes: on that path no other hook point runs but
    /// [`StoreHook::finished`]. The default keeps every read on the async path.
    fn reads_now(&self) -> bool {
        false
    }

    /// [`StoreHook::before`] for a read on the caller's thread (a blocking thread: nothing to
    /// await); an error is returned to the caller and the read is not forwarded.
    fn before_now(&self, call: &Call<'_>) -> Result<(), StoreError> {
        let _ = call;
        Ok(())
    }

    /// Sees the body a read returned; the caller gets what this returns.
    fn read(&self, call: &Call<'_>, body: Bytes) -> Bytes {
        let _ = call;
        body
    }

    /// Sees the outcome of a put the inner store accepted.
    fn put_done(&self, call: &Call<'_>, outcome: PutOutcome) {
        let _ = (call, outcome);
    }

    /// Runs when the inner store has answered a forwarded call, whatever the answer (with
    /// [`StoreHook::before`], brackets the call: e.g. to count calls in flight).
    fn finished(&self, call: &Call<'_>) {
        let _ = call;
    }
}

/// [`ObjectStore`] that forwards every call to `inner` through a [`StoreHook`].
#[derive(Debug)]
pub struct HookedStore<H> {
    inner: Arc<dyn ObjectStore>,
    hook: H,
}

impl<H: StoreHook> HookedStore<H> {
    /// Wraps `inner` with `hook`.
    pub fn new(inner: Arc<dyn ObjectStore>, hook: H) -> Self {
        HookedStore { inner, hook }
    }

    /// The hook, for a test to read what it recorded.
    pub fn hook(&self) -> &H {
        &self.hook
    }

    async fn forward(&self, call: &Call<'_>) -> Result<Forward, StoreError> {
        self.hook.forward(self.inner.as_ref(), call).await
    }
}

impl<H: StoreHook + Clone> Clone for HookedStore<H> {
    /// Another handle on the same inner store with a clone of the hook (a hook whose state
    /// sits behind an `Arc` is then shared by both).
    fn clone(&self) -> Self {
        HookedStore {
            inner: self.inner.clone(),
            hook: self.hook.clone(),
        }
    }
}

#[async_trait::async_trait]
impl<H: StoreHook> ObjectStore for HookedStore<H> {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        let call = Call::Put {
            key,
            len: body.len() as u64,
            opts: PutOptions::new(mode),
        };
        let mut how = self.forward(&call).await?;
        let out = self.inner.put(key, how.reshape(body), mode).await;
        self.hook.finished(&call);
        let out = out?;
        self.hook.put_done(&call, out);
        how.answer(out)
    }

    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        let call = Call::Put {
            key,
            len: body.len() as u64,
            opts,
        };
        let mut how = self.forward(&call).await?;
        // A replaced body is stored with its own checksum: the caller's was of the old one.
        let opts = match how.body {
            Some(_) => PutOptions {
                crc32c: None,
                ..opts
            },
            None => opts,
        };
        let out = self.inner.put_with(key, how.reshape(body), opts).await;
        self.hook.finished(&call);
        let out = out?;
        self.hook.put_done(&call, out);
        how.answer(out)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let call = Call::Sync;
        let how = self.forward(&call).await?;
        let out = self.inner.sync().await;
        self.hook.finished(&call);
        how.answer(out?)
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let call = Call::Get {
            key,
            max_len: None,
            aligned_at: None,
        };
        let mut how = self.forward(&call).await?;
        let body = self.inner.get(key).await;
        self.hook.finished(&call);
        let body = how.reshape(body?);
        let body = self.hook.read(&call, body);
        how.answer(body)
    }

    async fn get_bounded(&self, key: &str, max_len: u64) -> Result<Bytes, StoreError> {
        let call = Call::Get {
            key,
            max_len: Some(max_len),
            aligned_at: None,
        };
        let mut how = self.forward(&call).await?;
        let body = self.inner.get_bounded(key, max_len).await;
        self.hook.finished(&call);
        let body = how.reshape(body?);
        let body = self.hook.read(&call, body);
        how.answer(body)
    }

    async fn get_bounded_aligned(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: usize,
    ) -> Result<Bytes, StoreError> {
        let call = Call::Get {
            key,
            max_len: Some(max_len),
            aligned_at: Some(aligned_at),
        };
        let mut how = self.forward(&call).await?;
        let body = self
            .inner
            .get_bounded_aligned(key, max_len, aligned_at)
            .await;
        self.hook.finished(&call);
        let body = how.reshape(body?);
        let body = self.hook.read(&call, body);
        how.answer(body)
    }

    fn reads_now(&self) -> bool {
        self.hook.reads_now() && self.inner.reads_now()
    }

    fn get_unchecked_now(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Option<Result<UncheckedBody, StoreError>> {
        if !self.reads_now() {
            return None;
        }
        let call = Call::Get {
            key,
            max_len: Some(max_len),
            aligned_at,
        };
        if let Err(e) = self.hook.before_now(&call) {
            return Some(Err(e));
        }
        let out = self.inner.get_unchecked_now(key, max_len, aligned_at);
        self.hook.finished(&call);
        out
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let call = Call::GetRange {
            key,
            range: range.clone(),
        };
        let mut how = self.forward(&call).await?;
        let body = self.inner.get_range(key, range).await;
        self.hook.finished(&call);
        let body = how.reshape(body?);
        let body = self.hook.read(&call, body);
        how.answer(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let call = Call::Head { key };
        let how = self.forward(&call).await?;
        let out = self.inner.head(key).await;
        self.hook.finished(&call);
        how.answer(out?)
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError> {
        let asked = continuation.clone();
        let call = Call::List {
            prefix,
            continuation: asked.as_deref(),
        };
        let how = self.forward(&call).await?;
        let out = self.inner.list_page(prefix, continuation).await;
        self.hook.finished(&call);
        how.answer(out?)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let call = Call::Delete { key };
        let how = self.forward(&call).await?;
        let out = self.inner.delete(key).await;
        self.hook.finished(&call);
        how.answer(out?)
    }
}
