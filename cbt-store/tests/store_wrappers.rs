//! The retrying and fault-injecting wrappers, driven through the ObjectStore trait over real
//! backends (local directory and the in-process S3 server).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cbt_store::store::fault::{Fault, FaultRule, FaultyStore, When};
use cbt_store::store::retry::{SleepFuture, Sleeper};
use cbt_store::store::{
    ErrorKind, LocalStore, ObjectStore, Op, PutMode, PutOutcome, RetryPolicy, RetryingStore,
    StoreError,
};
use cbt_store::testing::S3TestServer;
use cbt_store::testing::conformance::{self, Capabilities};
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};

/// Every operation a wrapper forwards (besides `sync`, which has none).
const EVERY_OP: [Op; 6] = [
    Op::Put,
    Op::Get,
    Op::GetRange,
    Op::Head,
    Op::List,
    Op::Delete,
];

/// Runs the conformance suite on a wrapper of a local store listing 7 keys a page.
async fn conforms_as_local(store: &dyn ObjectStore) {
    conformance::run_all(
        store,
        Capabilities {
            atomic_if_absent: true,
            page_size: Some(7),
            strict_list_order: true,
        },
    )
    .await;
}

/// Records requested delays instead of sleeping.
#[derive(Debug, Default)]
struct RecordingSleeper(Mutex<Vec<Duration>>);

impl Sleeper for RecordingSleeper {
    fn sleep(&self, delay: Duration) -> SleepFuture {
        self.0.lock().unwrap().push(delay);
        Box::pin(async {})
    }
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(1000),
    }
}

fn setup(
    max_attempts: u32,
    seed: u64,
) -> (
    tempfile::TempDir,
    FaultyStore,
    RetryingStore,
    Arc<RecordingSleeper>,
) {
    let dir = tempfile::tempdir().unwrap();
    let faulty = FaultyStore::over(Arc::new(LocalStore::new(dir.path()).unwrap()));
    let sleeper = Arc::new(RecordingSleeper::default());
    let retrying = RetryingStore::new(Arc::new(faulty.clone()), policy(max_attempts))
        .with_sleeper(sleeper.clone())
        .with_seed(seed);
    (dir, faulty, retrying, sleeper)
}

#[tokio::test]
async fn transient_failures_are_retried_with_growing_jittered_backoff() {
    let (_dir, faulty, store, sleeper) = setup(5, 7);
    faulty.add_rule(FaultRule::new(Op::Put, When::FirstN(3), Fault::Transient));
    let out = store
        .put("k", Bytes::from_static(b"v"), PutMode::IfAbsent)
        .await
        .unwrap();
    assert_eq!(out, PutOutcome::Created);
    assert_eq!(faulty.calls(Op::Put), 4);
    let delays = sleeper.0.lock().unwrap().clone();
    assert_eq!(delays.len(), 3);
    for (i, d) in delays.iter().enumerate() {
        let step = Duration::from_millis(100 << i);
        assert!(
            *d >= step / 2 && *d <= step,
            "retry {i}: {d:?} outside [{:?}, {step:?}]",
            step / 2
        );
    }
    // Same seed, same delays: jitter is reproducible.
    let (_dir2, faulty2, store2, sleeper2) = setup(5, 7);
    faulty2.add_rule(FaultRule::new(Op::Put, When::FirstN(3), Fault::Transient));
    store2
        .put("k", Bytes::from_static(b"v"), PutMode::IfAbsent)
        .await
        .unwrap();
    assert_eq!(*sleeper2.0.lock().unwrap(), delays);
}

#[tokio::test]
async fn permanent_failures_are_not_retried() {
    let (_dir, faulty, store, sleeper) = setup(5, 1);
    faulty.add_rule(FaultRule::new(Op::Get, When::After(0), Fault::Permanent));
    let err = store.get("k").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Backend { op: Op::Get, .. }),
        "{err:?}"
    );
    assert_eq!(faulty.calls(Op::Get), 1);
    assert!(sleeper.0.lock().unwrap().is_empty());
    // NotFound is an answer, not a failure: no retry either.
    faulty.clear_rules();
    assert!(matches!(
        store.get("absent").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(faulty.calls(Op::Get), 2);
}

#[tokio::test]
async fn retries_give_up_after_max_attempts_with_the_last_error() {
    let (_dir, faulty, store, sleeper) = setup(4, 1);
    faulty.add_rule(FaultRule::new(Op::Head, When::After(0), Fault::Transient));
    let err = store.head("k").await.unwrap_err();
    assert!(err.is_transient());
    assert_eq!(faulty.calls(Op::Head), 4);
    assert_eq!(sleeper.0.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn lost_answer_after_a_landed_write_is_safe_to_retry() {
    let (_dir, faulty, store, _sleeper) = setup(3, 1);
    faulty.add_rule(FaultRule::new(
        Op::Put,
        When::Nth(1),
        Fault::TransientAfterCall,
    ));
    let out = store
        .put("k", Bytes::from_static(b"v"), PutMode::IfAbsent)
        .await
        .unwrap();
    assert_eq!(out, PutOutcome::AlreadyExists, "the first attempt landed");
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"v"));
}

#[tokio::test]
async fn fault_store_damages_bodies_and_counts_calls() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = FaultyStore::over(Arc::new(LocalStore::new(dir.path()).unwrap()));
    let data = Bytes::from(vec![7u8; 1000]);
    faulty.add_rule(
        FaultRule::new(Op::Put, When::Nth(2), Fault::Truncate(10)).on_keys_containing("chunks/"),
    );
    faulty
        .put("chunks/a", data.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    faulty
        .put("manifest", data.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    faulty
        .put("chunks/b", data.clone(), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(faulty.get("chunks/a").await.unwrap().len(), 1000);
    assert_eq!(faulty.get("manifest").await.unwrap().len(), 1000);
    assert_eq!(
        faulty.get("chunks/b").await.unwrap().len(),
        10,
        "second chunk put was truncated"
    );

    faulty.add_rule(FaultRule::new(Op::Get, When::Nth(1), Fault::FlipBit));
    let flipped = faulty.get("chunks/a").await.unwrap();
    assert_eq!(flipped.len(), 1000);
    assert!(flipped != data, "flip rule did not damage the body");
    assert_eq!(
        faulty.get("chunks/a").await.unwrap(),
        data,
        "only the first get after the rule is damaged"
    );

    faulty.fail_after(Op::Delete, 1);
    faulty.delete("chunks/a").await.unwrap();
    assert!(faulty.delete("chunks/b").await.is_err());
    let counts = faulty.call_counts();
    assert_eq!(counts[&Op::Put], 3);
    assert_eq!(counts[&Op::Get], 5);
    assert_eq!(counts[&Op::Delete], 2);
    assert_eq!(faulty.injected(), 3);
}

#[tokio::test]
async fn retry_wrapper_over_s3_retries_a_dropped_connection_and_not_bad_credentials() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("retry").unwrap();
    let s3 = Arc::new(server.store("retry", "").await.unwrap());
    let faulty = FaultyStore::over(s3);
    faulty.fail_nth(Op::Put, 1);
    let sleeper = Arc::new(RecordingSleeper::default());
    let store =
        RetryingStore::new(Arc::new(faulty.clone()), policy(3)).with_sleeper(sleeper.clone());
    store
        .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(faulty.calls(Op::Put), 2);
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"v"));

    let mut bad = server.config("retry", "");
    bad.check_on_connect = false;
    bad.credentials = Some(cbt_store::store::s3::StaticCredentials {
        access_key_id: cbt_store::testing::TEST_ACCESS_KEY.into(),
        secret_access_key: "wrong".into(),
    });
    let bad = FaultyStore::over(Arc::new(
        cbt_store::store::S3Store::connect(bad).await.unwrap(),
    ));
    let store = RetryingStore::new(Arc::new(bad.clone()), policy(3)).with_sleeper(sleeper.clone());
    let err = store.get("k").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert_eq!(bad.calls(Op::Get), 1, "credential errors are not retried");
}

/// Records the operation and key of every call it sees and counts the calls answered; fails
/// deletes of `keep/` keys.
#[derive(Debug, Default)]
struct Witness(
    Mutex<Vec<(Option<Op>, String)>>,
    std::sync::atomic::AtomicUsize,
);

#[async_trait::async_trait]
impl StoreHook for Witness {
    async fn before(&self, _inner: &dyn ObjectStore, call: &Call<'_>) -> Result<(), StoreError> {
        self.0
            .lock()
            .unwrap()
            .push((call.op(), call.key().to_string()));
        match call {
            Call::Delete { key } if key.starts_with("keep/") => Err(StoreError::Backend {
                op: Op::Delete,
                key: key.to_string(),
                message: "refused by the hook".into(),
            }),
            _ => Ok(()),
        }
    }

    fn finished(&self, _call: &Call<'_>) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The shared forwarding test store changes nothing it is not told to: over a local store it
/// passes the whole conformance suite, its hook sees calls of every operation (and syncs) going
/// in and coming back, and an error from the hook is the caller's answer with the inner store
/// left untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooked_store_forwards_every_call_and_shows_it_to_its_hook() {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(LocalStore::new(dir.path()).unwrap().with_page_size(7));
    let hooked = HookedStore::new(local.clone(), Witness::default());
    conforms_as_local(&hooked).await;
    let seen: BTreeSet<Option<Op>> = hooked
        .hook()
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    for op in EVERY_OP {
        assert!(seen.contains(&Some(op)), "{op} not seen: {seen:?}");
    }

    hooked
        .put("keep/a", Bytes::from_static(b"v"), PutMode::Overwrite)
        .await
        .unwrap();
    hooked.sync().await.unwrap();
    let err = hooked.delete("keep/a").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Backend { op: Op::Delete, key, .. } if key == "keep/a"),
        "{err:?}"
    );
    assert_eq!(local.get("keep/a").await.unwrap(), Bytes::from_static(b"v"));
    // A hook that does not take reads on the caller's thread keeps every read where it sees
    // it, although the local store offers them.
    assert!(local.reads_now() && !hooked.reads_now());
    assert!(hooked.get_unchecked_now("keep/a", 1 << 20, None).is_none());
    let log = hooked.hook().0.lock().unwrap();
    // Every call was answered by the inner store except the one the hook refused.
    let answered = hooked.hook().1.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(answered, log.len() - 1);
    assert_eq!(
        log[log.len() - 3..],
        [
            (Some(Op::Put), "keep/a".to_string()),
            (None, String::new()),
            (Some(Op::Delete), "keep/a".to_string()),
        ]
    );
}

/// The fault store is a [`HookedStore`]: with no rule it passes the conformance suite and
/// counts what went through; clones share rules and counters; a body damaged on its way into
/// `put_with` is stored with a checksum of its own (so it reads back as the damaged bytes, not
/// as a checksum failure); and a lost answer comes after the call took effect, for deletes and
/// reads as for puts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_store_without_rules_conforms_and_injects_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(LocalStore::new(dir.path()).unwrap().with_page_size(7));
    let faulty = FaultyStore::over(local.clone());
    conforms_as_local(&faulty).await;
    assert_eq!(faulty.injected(), 0);
    for op in EVERY_OP {
        assert!(faulty.calls(op) > 0, "{op} not counted");
    }

    let other = faulty.clone();
    other.reset_counts();
    other.add_rule(FaultRule::new(Op::Put, When::Nth(1), Fault::Truncate(3)));
    let body = Bytes::from_static(b"twelve bytes");
    let opts = cbt_store::store::PutOptions {
        crc32c: Some(crc32c::crc32c(&body)),
        ..cbt_store::store::PutOptions::new(PutMode::Overwrite)
    };
    faulty.put_with("cut", body, opts).await.unwrap();
    assert_eq!(local.get("cut").await.unwrap(), Bytes::from_static(b"twe"));
    assert_eq!((faulty.calls(Op::Put), faulty.injected()), (1, 1));

    for op in [Op::Get, Op::Delete] {
        faulty.add_rule(FaultRule::new(op, When::Nth(1), Fault::TransientAfterCall));
    }
    let err = faulty.get("cut").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Transient { op: Op::Get, key, .. } if key == "cut"),
        "{err:?}"
    );
    assert_eq!(faulty.get("cut").await.unwrap(), Bytes::from_static(b"twe"));
    let err = faulty.delete("cut").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Transient { op: Op::Delete, key, .. } if key == "cut"),
        "{err:?}"
    );
    assert!(
        local.head("cut").await.unwrap().is_none(),
        "the delete landed"
    );
}
