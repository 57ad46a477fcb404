//! Fault-injecting wrapper for tests: fails chosen calls, damages bodies, and counts calls per
//! operation, so crash, resume and retry behaviour can be tested deterministically.
//!
//! Owns only the rules and the counting: the forwarding is [`HookedStore`]'s (proved by the
//! conformance suite), so every call that no rule hits reaches the inner store unchanged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use super::{ObjectStore, Op, StoreError};
use crate::testing::hooked::{Call, Forward, HookedStore, StoreHook};

/// Which matching calls a [`FaultRule`] hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Only the n-th matching call (1-based), counted from when the rule was added.
    Nth(u64),
    /// Every matching call after the first n (n = 0: every call).
    After(u64),
    /// The first n matching calls, then no more.
    FirstN(u64),
}

/// What happens to a call a rule hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Fail with [`StoreError::Transient`] without touching the inner store.
    Transient,
    /// Forward the call, then fail with [`StoreError::Transient`] (the write landed, the answer
    /// was lost).
    TransientAfterCall,
    /// Fail with a non-transient [`StoreError::Backend`] without touching the inner store.
    Permanent,
    /// `put`: store only the first n bytes; `get`/`get_range`: return only the first n bytes.
    Truncate(usize),
    /// `put`: store the body with one bit flipped; `get`/`get_range`: return it flipped.
    /// The flipped bit is in the middle of the body (empty bodies are left alone).
    FlipBit,
    /// Wait this long, then forward the call unchanged (a slow request: one upload that
    /// stalls while the others go on).
    Delay(std::time::Duration),
}

/// One injection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Operation the rule applies to (`None`: all operations).
    pub op: Option<Op>,
    /// Only keys containing this substring (`None`: all keys).
    pub key_contains: Option<String>,
    /// Which matching calls are hit.
    pub when: When,
    /// What happens to them.
    pub fault: Fault,
}

impl FaultRule {
    /// Rule for `op` on every key.
    pub fn new(op: Op, when: When, fault: Fault) -> Self {
        Self {
            op: Some(op),
            key_contains: None,
            when,
            fault,
        }
    }

    /// Same rule restricted to keys containing `needle`.
    pub fn on_keys_containing(mut self, needle: impl Into<String>) -> Self {
        self.key_contains = Some(needle.into());
        self
    }
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<(FaultRule, u64)>,
    calls: BTreeMap<Op, u64>,
    injected: u64,
}

/// The hook of a [`FaultyStore`]: its rules and call counters, shared by every clone.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

/// [`ObjectStore`] wrapper that injects faults by rule and counts calls: a [`HookedStore`]
/// whose hook is [`Faults`]. Clones share the rules and the counters.
pub type FaultyStore = HookedStore<Faults>;

impl HookedStore<Faults> {
    /// Wraps `inner` with no rules.
    pub fn over(inner: Arc<dyn ObjectStore>) -> Self {
        HookedStore::new(inner, Faults::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.hook().state()
    }

    /// Adds a rule; rules are checked in the order added and the first hit wins.
    pub fn add_rule(&self, rule: FaultRule) -> &Self {
        self.state().rules.push((rule, 0));
        self
    }

    /// Shorthand: fail the n-th (1-based) call of `op` with a transient error.
    pub fn fail_nth(&self, op: Op, n: u64) -> &Self {
        self.add_rule(FaultRule::new(op, When::Nth(n), Fault::Transient))
    }

    /// Shorthand: every call of `op` after the first `n` fails permanently, as if the process
    /// lost its store mid-run (a "crash" point for resume tests).
    pub fn fail_after(&self, op: Op, n: u64) -> &Self {
        self.add_rule(FaultRule::new(op, When::After(n), Fault::Permanent))
    }

    /// Removes every rule (counters are kept).
    pub fn clear_rules(&self) {
        self.state().rules.clear();
    }

    /// Calls of `op` seen so far (hit by a rule or not).
    pub fn calls(&self, op: Op) -> u64 {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// Calls of every operation seen so far.
    pub fn call_counts(&self) -> BTreeMap<Op, u64> {
        self.state().calls.clone()
    }

    /// Number of calls a rule has hit.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    /// Zeroes the call counters.
    pub fn reset_counts(&self) {
        let mut s = self.state();
        s.calls.clear();
        s.injected = 0;
    }
}

impl Faults {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the call and returns the fault of the first rule it hits, if any (every matching
    /// rule counts the call, hit or not, so `Nth` stays true to its own count).
    fn check(&self, op: Op, key: &str) -> Option<Fault> {
        let mut s = self.state();
        *s.calls.entry(op).or_default() += 1;
        let mut hit = None;
        for (rule, seen) in s.rules.iter_mut() {
            if rule.op.is_some_and(|o| o != op)
                || rule
                    .key_contains
                    .as_deref()
                    .is_some_and(|n| !key.contains(n))
            {
                continue;
            }
            *seen += 1;
            let fires = match rule.when {
                When::Nth(n) => *seen == n,
                When::After(n) => *seen > n,
                When::FirstN(n) => *seen <= n,
            };
            if fires && hit.is_none() {
                hit = Some(rule.fault.clone());
            }
        }
        if hit.is_some() {
            s.injected += 1;
        }
        hit
    }
}

#[async_trait::async_trait]
impl StoreHook for Faults {
    async fn forward(
        &self,
        _inner: &dyn ObjectStore,
        call: &Call<'_>,
    ) -> Result<Forward, StoreError> {
        // A sync is neither counted nor failed: rules name operations that move objects.
        let Some(op) = call.op() else {
            return Ok(Forward::as_is());
        };
        let key = call.key();
        Ok(match self.check(op, key) {
            None => Forward::as_is(),
            Some(Fault::Transient) => return Err(injected(op, key, false)),
            Some(Fault::Permanent) => return Err(injected(op, key, true)),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Forward::as_is()
            }
            Some(Fault::TransientAfterCall) => Forward {
                then_fail: Some(injected(op, key, false)),
                ..Forward::default()
            },
            Some(fault @ (Fault::Truncate(_) | Fault::FlipBit)) => Forward {
                body: Some(Box::new(move |body| damage(body, &fault))),
                ..Forward::default()
            },
        })
    }
}

fn injected(op: Op, key: &str, permanent: bool) -> StoreError {
    if permanent {
        StoreError::Backend {
            op,
            key: key.to_string(),
            message: "injected permanent fault".into(),
        }
    } else {
        StoreError::Transient {
            op,
            key: key.to_string(),
            message: "injected transient fault".into(),
        }
    }
}

fn damage(body: Bytes, fault: &Fault) -> Bytes {
    match fault {
        Fault::Truncate(n) => body.slice(..(*n).min(body.len())),
        Fault::FlipBit if !body.is_empty() => {
            let mut b = BytesMut::from(body.as_ref());
            let mid = b.len() / 2;
            b[mid] ^= 0x10;
            b.freeze()
        }
        _ => body,
    }
}
