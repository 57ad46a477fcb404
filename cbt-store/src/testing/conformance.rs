//! One conformance suite for every [`ObjectStore`]: plain async functions taking
//! `&dyn ObjectStore`, run by the tests of each backend (local, in-process S3, SeaweedFS).
//!
//! Each case works under its own key prefix, so cases can share one store. Cases panic with a
//! message naming the property that failed.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::store::{ErrorKind, ObjectStore, PutMode, PutOutcome, StoreError, list_all};

/// What a backend promises beyond the trait's minimum, so the suite checks the right thing.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// `IfAbsent` is atomic under concurrency (exactly one of N racers wins). s3s-fs checks
    /// then writes (and stores checksums beside the body), so for it the race case only checks
    /// that what a reader gets is a winner's body or an integrity error, never wrong bytes.
    pub atomic_if_absent: bool,
    /// The backend's listing page size, if known, so pagination can be asserted to happen.
    pub page_size: Option<usize>,
    /// Listing follows byte order even across "directories". SeaweedFS lists a directory's
    /// children before keys that extend its name with a byte below `/` (`a/b` before `a-b`);
    /// for it the suite checks completeness and the order of keys without such siblings.
    pub strict_list_order: bool,
}

/// Deterministic pseudo-random body of `len` bytes (so failures are reproducible).
pub fn body(seed: u64, len: usize) -> Bytes {
    Bytes::from(cbt_core::testing::noise(seed, len))
}

/// Runs every case against `store`.
pub async fn run_all(store: &dyn ObjectStore, caps: Capabilities) {
    round_trip(store).await;
    if_absent(store).await;
    if_absent_race(store, caps).await;
    ranged_get(store).await;
    bounded_get(store).await;
    pagination(store, caps).await;
    delete(store).await;
    missing_objects(store).await;
    invalid_keys(store).await;
}

/// `get_bounded` returns objects up to the limit and refuses larger ones with `TooLarge`,
/// an integrity error (an object larger than its kind allows is damage, not a hiccup).
pub async fn bounded_get(store: &dyn ObjectStore) {
    let key = "conf/bounded/object";
    let data = body(77, 4096);
    store
        .put(key, data.clone(), PutMode::Overwrite)
        .await
        .expect("put for bounded get");
    assert_eq!(
        store.get_bounded(key, 4096).await.expect("exact limit"),
        data,
        "get_bounded at the exact size returns the body"
    );
    // The aligned variant is the same read with a wish about memory: same bytes, same limit.
    for aligned_at in [0, 1, 48, 4095, 4096, 5000] {
        assert_eq!(
            store
                .get_bounded_aligned(key, 4096, aligned_at)
                .await
                .expect("aligned get at the exact limit"),
            data,
            "get_bounded_aligned({aligned_at}) returns the body"
        );
        assert!(
            matches!(
                store.get_bounded_aligned(key, 4095, aligned_at).await,
                Err(StoreError::TooLarge { .. })
            ),
            "get_bounded_aligned below the size must be TooLarge"
        );
    }
    // The unchecked read: same bytes and limit; whatever check it leaves pending is the
    // body's stored crc32c, and a wrong one is refused as `Corrupt`.
    for aligned_at in [None, Some(0), Some(48), Some(4095)] {
        let read = store
            .get_unchecked(key, 4096, aligned_at)
            .await
            .expect("unchecked get at the exact limit");
        assert_eq!(
            read.clone().into_parts().0,
            data,
            "get_unchecked({aligned_at:?}) returns the body"
        );
        if let (_, _, Some(before)) = read.clone().into_parts() {
            assert_eq!(
                before,
                crc32c::crc32c(&data[..data.len() - 4]),
                "get_unchecked({aligned_at:?}): the crc32c computed on arrival covers all but the last four bytes"
            );
        }
        let crc = crc32c::crc32c(&data);
        if let Some(pending) = read.pending_crc32c() {
            assert_eq!(pending, crc, "the pending crc32c is the body's stored one");
            assert!(
                matches!(read.check(crc ^ 1), Err(StoreError::Corrupt { .. })),
                "a pending check refuses a wrong crc32c"
            );
        }
        read.check(crc).expect("the right crc32c passes");
        assert_eq!(read.into_checked().expect("into_checked"), data);
        assert!(
            matches!(
                store.get_unchecked(key, 4095, aligned_at).await,
                Err(StoreError::TooLarge { .. })
            ),
            "get_unchecked below the size must be TooLarge"
        );
    }
    assert!(
        matches!(
            store.get_unchecked("conf/bounded/missing", 10, None).await,
            Err(StoreError::NotFound { .. })
        ),
        "get_unchecked of a missing key is NotFound"
    );
    match store.get_bounded(key, 4095).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            assert_eq!(
                e.kind(),
                ErrorKind::Integrity,
                "TooLarge is an integrity error"
            );
            assert!(!e.is_transient(), "TooLarge must not be retried");
        }
        other => panic!("get_bounded below the size must be TooLarge, got {other:?}"),
    }
    assert!(
        matches!(
            store.get_bounded("conf/bounded/missing", 10).await,
            Err(StoreError::NotFound { .. })
        ),
        "get_bounded of a missing key is NotFound"
    );
    store.delete(key).await.expect("delete");
}

/// Put then get returns the same bytes; overwrite replaces; head reports the body size.
pub async fn round_trip(store: &dyn ObjectStore) {
    let key = "conf/rt/object";
    let first = body(1, 300 * 1024 + 7);
    assert_eq!(
        store
            .put(key, first.clone(), PutMode::Overwrite)
            .await
            .expect("put"),
        PutOutcome::Created
    );
    assert_eq!(
        store.get(key).await.expect("get"),
        first,
        "round trip changed bytes"
    );
    let meta = store
        .head(key)
        .await
        .expect("head")
        .expect("head finds the object");
    assert_eq!(meta.key, key);
    assert_eq!(meta.size, first.len() as u64, "head size is the body size");

    let second = body(2, 1234);
    store
        .put(key, second.clone(), PutMode::Overwrite)
        .await
        .expect("overwrite");
    assert_eq!(
        store.get(key).await.expect("get"),
        second,
        "overwrite not visible"
    );

    let empty_key = "conf/rt/empty";
    store
        .put(empty_key, Bytes::new(), PutMode::Overwrite)
        .await
        .expect("put empty");
    assert!(store.get(empty_key).await.expect("get empty").is_empty());
    assert_eq!(
        store.head(empty_key).await.expect("head").map(|m| m.size),
        Some(0)
    );
}

/// A second IfAbsent put does not replace the first body.
pub async fn if_absent(store: &dyn ObjectStore) {
    let key = "conf/ifabsent/object";
    let first = body(3, 4096);
    assert_eq!(
        store
            .put(key, first.clone(), PutMode::IfAbsent)
            .await
            .expect("first create"),
        PutOutcome::Created
    );
    assert_eq!(
        store
            .put(key, body(4, 100), PutMode::IfAbsent)
            .await
            .expect("second create"),
        PutOutcome::AlreadyExists
    );
    assert_eq!(
        store.get(key).await.expect("get"),
        first,
        "IfAbsent replaced the body"
    );
}

/// N concurrent IfAbsent puts of different bodies: the stored body is a winner's, and with an
/// atomic backend there is exactly one winner.
pub async fn if_absent_race(store: &dyn ObjectStore, caps: Capabilities) {
    const RACERS: u64 = 8;
    for round in 0..4u64 {
        let key = format!("conf/race/object-{round}");
        let bodies: Vec<Bytes> = (0..RACERS)
            .map(|i| body(100 + round * RACERS + i, 64 * 1024))
            .collect();
        let results = futures::future::join_all(
            bodies
                .iter()
                .map(|b| store.put(&key, b.clone(), PutMode::IfAbsent)),
        )
        .await;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Ok(PutOutcome::Created)))
            .map(|(i, _)| i)
            .collect();
        for r in &results {
            assert!(r.is_ok(), "racing put failed: {r:?}");
        }
        assert!(!winners.is_empty(), "no racer won");
        let stored = match store.get(&key).await {
            Ok(stored) => stored,
            // A non-atomic server (s3s-fs) can interleave two writers' body and checksum; the
            // store must then report damage, never hand out a silently wrong body.
            Err(e) if !caps.atomic_if_absent && e.kind() == ErrorKind::Integrity => continue,
            Err(e) => panic!("get after race: {e:?}"),
        };
        if caps.atomic_if_absent {
            assert_eq!(
                winners.len(),
                1,
                "IfAbsent let {} racers win",
                winners.len()
            );
        }
        assert!(
            winners.iter().any(|&i| bodies[i] == stored),
            "stored body belongs to no racer that was told it won"
        );
    }
}

/// Ranged reads return exactly the requested bytes; bad ranges are typed errors.
pub async fn ranged_get(store: &dyn ObjectStore) {
    let key = "conf/range/object";
    let data = body(5, 10_000);
    store
        .put(key, data.clone(), PutMode::Overwrite)
        .await
        .expect("put");
    for (s, e) in [
        (0u64, 1u64),
        (10, 5000),
        (9_999, 10_000),
        (0, 10_000),
        (4096, 8192),
    ] {
        let got = store.get_range(key, s..e).await.expect("get_range");
        assert_eq!(got, data.slice(s as usize..e as usize), "range {s}..{e}");
    }
    for (s, e) in [
        (9_990u64, 10_001u64),
        (10_000, 10_010),
        (20_000, 20_001),
        (5, 5),
    ] {
        let err = store
            .get_range(key, s..e)
            .await
            .expect_err("bad range must fail");
        assert!(
            matches!(err, StoreError::RangeNotSatisfiable { .. }),
            "range {s}..{e}: expected RangeNotSatisfiable, got {err:?}"
        );
    }
    let err = store
        .get_range("conf/range/missing", 0..1)
        .await
        .expect_err("missing object");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
}

/// Listing returns every key under the prefix exactly once, in byte order, over several pages,
/// and nothing outside the prefix; nested "directories" sort correctly against siblings.
pub async fn pagination(store: &dyn ObjectStore, caps: Capabilities) {
    let mut expected = BTreeSet::new();
    let mut keys: Vec<String> = (0..57).map(|i| format!("conf/list/k{i:03}")).collect();
    // '-' (0x2d) < '.' (0x2e) < '/' (0x2f) < '0': a naive per-directory walk gets this wrong.
    keys.extend(
        [
            "conf/list/a-b",
            "conf/list/a.b",
            "conf/list/a/b",
            "conf/list/a/c/d",
            "conf/list/a0",
            "conf/list/k0/x",
        ]
        .map(String::from),
    );
    let tiny = Bytes::from_static(b"x");
    for k in &keys {
        store
            .put(k, tiny.clone(), PutMode::Overwrite)
            .await
            .expect("put");
        expected.insert(k.clone());
    }
    for outside in ["conf/lis", "conf/listx", "conf/lisu/z"] {
        store
            .put(outside, tiny.clone(), PutMode::Overwrite)
            .await
            .expect("put");
    }

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut token = None;
    loop {
        let page = store
            .list_page("conf/list/", token.take())
            .await
            .expect("list_page");
        pages += 1;
        if let Some(size) = caps.page_size {
            assert!(page.objects.len() <= size, "page larger than the page size");
        }
        seen.extend(page.objects.into_iter().map(|m| {
            assert_eq!(m.size, 1, "listed size of {}", m.key);
            m.key
        }));
        match page.next {
            Some(t) => token = Some(t),
            None => break,
        }
        assert!(pages < 1000, "listing does not terminate");
    }
    let want: Vec<String> = expected.iter().cloned().collect();
    if caps.strict_list_order {
        assert_eq!(
            seen, want,
            "listing is not the sorted set of keys under the prefix"
        );
    } else {
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "listing repeated a key");
        assert_eq!(
            unique, expected,
            "listing is not the set of keys under the prefix"
        );
        let plain: Vec<&String> = seen
            .iter()
            .filter(|k| k.starts_with("conf/list/k0"))
            .collect();
        assert!(
            plain.windows(2).all(|w| w[0] < w[1]),
            "keys without nested siblings out of order"
        );
    }
    if let Some(size) = caps.page_size {
        assert!(
            pages >= want.len().div_ceil(size),
            "expected several pages, got {pages}"
        );
    }

    // A prefix that is not a "directory" boundary.
    let mut all: Vec<String> = list_all(store, "conf/list/a")
        .await
        .expect("list_all")
        .into_iter()
        .map(|m| m.key)
        .collect();
    if !caps.strict_list_order {
        all.sort();
    }
    assert_eq!(
        all,
        [
            "conf/list/a-b",
            "conf/list/a.b",
            "conf/list/a/b",
            "conf/list/a/c/d",
            "conf/list/a0"
        ]
    );
    assert!(
        list_all(store, "conf/nothing-here/")
            .await
            .expect("empty list")
            .is_empty()
    );
}

/// Delete removes the object and is idempotent.
pub async fn delete(store: &dyn ObjectStore) {
    let key = "conf/delete/object";
    store
        .put(key, body(6, 10), PutMode::Overwrite)
        .await
        .expect("put");
    store.delete(key).await.expect("delete");
    assert!(
        store.head(key).await.expect("head").is_none(),
        "deleted object still there"
    );
    assert!(matches!(
        store.get(key).await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .delete(key)
        .await
        .expect("deleting an absent key succeeds");
    assert!(
        list_all(store, "conf/delete/")
            .await
            .expect("list")
            .is_empty()
    );
}

/// Absent objects: get is NotFound, head is None.
pub async fn missing_objects(store: &dyn ObjectStore) {
    let err = store
        .get("conf/missing/object")
        .await
        .expect_err("get of a missing key");
    assert!(
        matches!(&err, StoreError::NotFound { key } if key == "conf/missing/object"),
        "got {err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        store
            .head("conf/missing/object")
            .await
            .expect("head")
            .is_none()
    );
}

/// Keys that could escape the root are rejected by every operation before any I/O.
pub async fn invalid_keys(store: &dyn ObjectStore) {
    for key in ["../escape", "a/../../b", "/abs", "a//b", "", "a\0b"] {
        let put = store
            .put(key, Bytes::from_static(b"x"), PutMode::Overwrite)
            .await;
        assert!(
            matches!(put, Err(StoreError::InvalidKey { .. })),
            "put {key:?}: {put:?}"
        );
        assert!(
            matches!(store.get(key).await, Err(StoreError::InvalidKey { .. })),
            "get {key:?}"
        );
        assert!(
            matches!(store.head(key).await, Err(StoreError::InvalidKey { .. })),
            "head {key:?}"
        );
        assert!(
            matches!(store.delete(key).await, Err(StoreError::InvalidKey { .. })),
            "delete {key:?}"
        );
        assert!(
            matches!(
                store.get_range(key, 0..1).await,
                Err(StoreError::InvalidKey { .. })
            ),
            "get_range {key:?}"
        );
    }
    assert!(matches!(
        store.list_page("../", None).await,
        Err(StoreError::InvalidKey { .. })
    ));
}
