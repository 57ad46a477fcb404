//! Requests per operation on S3, counted by the real client against the in-process server:
//! each request is a round trip and, on a server sharing the machine, its CPU. The bounds are
//! what a command costs today, as the `cbt` binary makes it (connect, open, lock, back up or
//! restore); a change that adds requests per chunk or per command fails here.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod engine_support;

use std::sync::Arc;

use cbt_core::RangeSet;
use cbt_store::engine::{self, BackupMode, EngineOptions, FileSource};
use cbt_store::repo::Repository;
use cbt_store::store::s3::{PROBE_KEY, RequestCounts, S3Store};
use cbt_store::store::{ConditionalWrites, ObjectStore, list_all};
use cbt_store::testing::S3TestServer;
use engine_support::*;

/// Chunks of the test volume (all allocated: random data, none repeated).
const CHUNKS: u64 = 40;

/// What `f` cost in requests on `store` (and every clone of it).
async fn counted<T>(
    store: &S3Store,
    f: impl std::future::Future<Output = T>,
) -> (T, RequestCounts) {
    let before = store.request_counts();
    let out = f.await;
    let after = store.request_counts();
    let d = RequestCounts {
        put: after.put - before.put,
        get: after.get - before.get,
        head: after.head - before.head,
        list: after.list - before.list,
        delete: after.delete - before.delete,
        other: after.other - before.other,
        get_with_checksum: after.get_with_checksum - before.get_with_checksum,
    };
    (out, d)
}

/// A fresh connection, as a new `cbt` process makes it; its requests are counted too (the
/// conditional-write probe, which `connect` leaves running in the background, included).
async fn connect(server: &S3TestServer) -> (S3Store, RequestCounts) {
    let cfg = server.config("bkt", "repo");
    let store = S3Store::connect(cfg).await.unwrap();
    store.conditional_writes().await.unwrap();
    let counts = store.request_counts();
    (store, counts)
}

fn engine_opts() -> EngineOptions {
    EngineOptions {
        transfers: 4,
        ..opts()
    }
}

#[tokio::test]
async fn a_connect_costs_two_requests_once_the_probe_marker_exists() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    // First connect to a prefix: listing, create, refused create, read back.
    let (first, c) = connect(&server).await;
    assert_eq!(
        first.conditional_writes().await.unwrap(),
        ConditionalWrites::Honoured
    );
    assert_eq!(c.total(), 4, "{c:?}");
    // Every later one: the listing and one refused create.
    for _ in 0..2 {
        let (store, c) = connect(&server).await;
        assert_eq!(
            store.conditional_writes().await.unwrap(),
            ConditionalWrites::Honoured
        );
        assert_eq!(
            c,
            RequestCounts {
                put: 1,
                list: 1,
                ..RequestCounts::default()
            }
        );
    }
    // The marker is the store's own: listings do not show it, but it is there.
    assert!(list_all(&first, "").await.unwrap().is_empty());
    assert!(
        server
            .object_path("bkt", &format!("repo/{PROBE_KEY}"))
            .exists()
    );
}

#[tokio::test]
async fn opening_a_repository_costs_two_sequential_round_trips() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    let (setup, _) = connect(&server).await;
    init(Arc::new(setup)).await;

    // The server holds the probe's answer until the config read arrives: a client that waited
    // for the probe before reading the config would wait out the hold and fail below.
    let probe = format!("repo/{PROBE_KEY}");
    server.hold_put_until_get(&probe, "repo/config");
    let seen = server.request_log().len();
    let s3 = S3Store::connect(server.config("bkt", "repo"))
        .await
        .unwrap();
    let repo = Repository::open(Arc::new(s3.clone())).await.unwrap();
    assert_eq!(repo.config().chunk_size, CS);
    assert_eq!(
        s3.conditional_writes().await.unwrap(),
        ConditionalWrites::Honoured
    );
    assert_eq!(server.held_put_overlapped(), Some(true));
    assert_eq!(
        s3.request_counts(),
        RequestCounts {
            list: 1,
            put: 1,
            get: 1,
            // The config is metadata: its read asks for the stored checksum (chunks do not).
            get_with_checksum: 1,
            ..RequestCounts::default()
        }
    );
    // The listing goes first and alone (it proves the bucket and the credentials before any
    // write: some servers create a missing bucket on a write), then the other two together.
    let log = server.request_log().split_off(seen);
    assert_eq!(log[0], "LIST repo/", "{log:?}");
    let mut rest = log[1..].to_vec();
    rest.sort();
    assert_eq!(
        rest,
        ["GET repo/config".to_string(), format!("PUT {probe}")]
    );
}

#[tokio::test]
async fn full_incremental_and_restore_stay_within_their_request_budgets() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    let (setup, _) = connect(&server).await;
    init(Arc::new(setup)).await;
    let fx = Fixture::new().await; // only for its temp dir
    let mut img = noise(7, (CHUNKS * CS) as usize);
    let src = fx.write("d.img", &img);

    // Full: one put per chunk; asking for each chunk first stops after a few misses.
    let (s3, connect_cost) = connect(&server).await;
    assert_eq!(connect_cost.total(), 2);
    let store: Arc<dyn ObjectStore> = Arc::new(s3.clone());
    let (first, full) = counted(&s3, async {
        let repo = Repository::open(store.clone()).await.unwrap();
        let source = Arc::new(FileSource::open(&src).unwrap());
        let req = request("pvc", "one", BackupMode::Full { allocated: None }, 1);
        engine::backup(&repo, source, req, &engine_opts())
            .await
            .unwrap()
    })
    .await;
    assert_eq!(first.stats.objects_written, CHUNKS, "{:?}", first.stats);
    // Chunks, one segment, the manifest, the lock; config, lock and manifest reads; the
    // chunk heads until the misses stop them (at most `transfers` in flight past the point).
    assert!(full.put <= CHUNKS + 3, "{full:?}");
    assert!(full.head <= 8 + 4 + 2, "a head per chunk is back: {full:?}");
    assert_eq!(full.list, 0, "{full:?}");
    assert!(full.total() <= CHUNKS + 21, "{full:?}");

    // Incremental of 2 changed chunks, as `cbt backup --parent --changed-ranges` makes it.
    let mut extents = Vec::new();
    for i in [3_u64, 17] {
        let at = (i * CS) as usize;
        img[at..at + 100].copy_from_slice(&noise(i, 100));
        extents.push((i * CS, 100));
    }
    let changed = RangeSet::try_from_extents(extents).unwrap();
    std::fs::write(&src, &img).unwrap();
    let (s3, _) = connect(&server).await;
    let store: Arc<dyn ObjectStore> = Arc::new(s3.clone());
    let (second, incr) = counted(&s3, async {
        let repo = Repository::open(store.clone()).await.unwrap();
        let parent = repo.load_head(&vol("pvc"), &snap("one")).await.unwrap();
        let source = Arc::new(FileSource::open(&src).unwrap());
        let mode = BackupMode::IncrementalOf {
            parent: Box::new(parent),
            changed,
        };
        let req = request("pvc", "two", mode, 2);
        engine::backup(&repo, source, req, &engine_opts())
            .await
            .unwrap()
    })
    .await;
    assert_eq!(second.stats.objects_written, 2, "{:?}", second.stats);
    // Reads: the config, the parent's head once (the engine is handed it, and at the commit
    // reads it once more to see it still stands), the exclusive lock (absent), the one map
    // segment on the changed paths, our own lock before the commit. One head: the new name
    // (the changed chunks are created without asking first). Puts: the lock, the chunks,
    // the new segment, the head. The lock is deleted without reading it back (its key is
    // its own).
    assert_eq!(
        incr,
        RequestCounts {
            get: 6,
            get_with_checksum: 6,
            head: 1,
            put: 5,
            delete: 1,
            ..RequestCounts::default()
        }
    );

    // A full backup of what is stored already uploads nothing new: a head per chunk (the
    // misses of the backups before do not carry over to a new process).
    let (s3, _) = connect(&server).await;
    let store: Arc<dyn ObjectStore> = Arc::new(s3.clone());
    let (third, again) = counted(&s3, async {
        let repo = Repository::open(store.clone()).await.unwrap();
        let source = Arc::new(FileSource::open(&src).unwrap());
        let req = request("pvc", "three", BackupMode::Full { allocated: None }, 3);
        engine::backup(&repo, source, req, &engine_opts())
            .await
            .unwrap()
    })
    .await;
    assert_eq!(third.stats.objects_written, 0, "{:?}", third.stats);
    assert_eq!(third.stats.bytes_uploaded, 0, "{:?}", third.stats);
    assert!(again.put <= 3, "{again:?}");
    assert!(again.head <= CHUNKS + 2, "{again:?}");
    assert!(again.total() <= CHUNKS + 20, "{again:?}");

    // Restore into a new file: one get per chunk and no presence pass (a missing chunk fails
    // its fetch, and the partial file is removed).
    let (s3, _) = connect(&server).await;
    let store: Arc<dyn ObjectStore> = Arc::new(s3.clone());
    let out = fx.path("out.img");
    let (_, rest) = counted(&s3, async {
        let repo = Repository::open(store.clone()).await.unwrap();
        restore_file(&repo, &vol("pvc"), &snap("two"), &out)
            .await
            .unwrap()
    })
    .await;
    assert!(std::fs::read(&out).unwrap() == img);
    assert_eq!(rest.head, 0, "a head per chunk is back: {rest:?}");
    assert_eq!(rest.list, 0, "{rest:?}");
    assert!(rest.total() <= CHUNKS + 8, "{rest:?}");
    // Chunk GETs do not ask for the stored checksum, so the SDK does not validate it with a
    // crc32c pass of its own (the decoder's one pass compares the `cbt-crc32c` metadata);
    // the few metadata reads still do.
    assert!(rest.get >= CHUNKS, "{rest:?}");
    assert!(
        rest.get_with_checksum <= rest.get - CHUNKS,
        "chunk GETs ask for the checksum: {rest:?}"
    );

    // Restore in place over that file: every chunk is checked before the first write, by one
    // listing of `chunks/`, not a head each.
    let (s3, _) = connect(&server).await;
    let store: Arc<dyn ObjectStore> = Arc::new(s3.clone());
    let (_, in_place) = counted(&s3, async {
        let repo = Repository::open(store.clone()).await.unwrap();
        let opts = engine::RestoreOptions {
            overwrite: true,
            in_place: true,
            dry_run: false,
        };
        engine::restore(
            &repo,
            &vol("pvc"),
            &snap("two"),
            &out,
            &opts,
            &engine_opts(),
        )
        .await
        .unwrap()
    })
    .await;
    assert!(std::fs::read(&out).unwrap() == img);
    assert_eq!(in_place.head, 0, "a head per chunk is back: {in_place:?}");
    assert_eq!(in_place.list, 1, "{in_place:?}");
    assert!(in_place.total() <= CHUNKS + 8, "{in_place:?}");
}

/// One captured log event: its fields by name (`message` included), as text.
type Event = std::collections::BTreeMap<&'static str, String>;

/// A tracing layer that keeps every event it sees, for tests that check what is logged.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<Event>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Fields<'a>(&'a mut Event);
        impl tracing::field::Visit for Fields<'_> {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.insert(field.name(), value.to_string());
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.insert(field.name(), format!("{value:?}"));
            }
        }
        let mut fields = Event::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(fields);
    }
}

/// With debug logging on, every request the store sends is logged when it goes out and again,
/// with its HTTP status, when its answer arrives: a `200` for an object read, a `404` for a
/// missing one, and an answer line for each request line.
#[tokio::test]
async fn debug_logging_shows_each_request_and_its_answer_with_the_status() {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    // Process-wide: a callsite's interest is shared by every thread, so a subscriber set for
    // this thread alone can miss events whose interest other tests' threads settled. Other
    // tests' requests are logged here too; only this server's are looked at.
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(captured.clone()))
        .unwrap();
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("bkt").unwrap();
    let (store, _) = connect(&server).await;
    store
        .put(
            "k",
            bytes::Bytes::from_static(b"v"),
            cbt_store::store::PutMode::Overwrite,
        )
        .await
        .unwrap();
    assert_eq!(store.get("k").await.unwrap().as_ref(), b"v");
    assert!(store.get("gone").await.is_err());
    let sent = store.request_counts().total();

    let events = captured.0.lock().unwrap().clone();
    let ours = format!(" {}/", server.endpoint().trim_end_matches('/'));
    let of = |message: &str| -> Vec<&Event> {
        (events.iter())
            .filter(|e| e.get("message").map(String::as_str) == Some(message))
            .filter(|e| {
                let request = match (e.get("request"), e.get("method"), e.get("uri")) {
                    (Some(r), _, _) => r.clone(),
                    (None, Some(m), Some(u)) => format!("{m} {u}"),
                    _ => return false,
                };
                request.contains(&ours)
            })
            .collect()
    };
    let requests: Vec<String> = of("S3 request")
        .iter()
        .map(|e| format!("{} {}", e["method"], e["uri"]))
        .collect();
    let mut answered: Vec<String> = of("S3 answer")
        .iter()
        .map(|e| e["request"].clone())
        .collect();
    assert_eq!(requests.len() as u64, sent, "{requests:#?}");
    let mut asked = requests.clone();
    asked.sort();
    answered.sort();
    assert_eq!(asked, answered, "one answer line per request line");
    let status_of = |method: &str, key: &str| -> Vec<String> {
        of("S3 answer")
            .iter()
            .filter(|e| {
                e["request"].starts_with(&format!("{method} "))
                    && e["request"].contains(&format!("/bkt/repo/{key}"))
            })
            .map(|e| e["status"].clone())
            .collect()
    };
    assert_eq!(status_of("PUT", "k"), ["Some(200)"]);
    assert_eq!(status_of("GET", "k"), ["Some(200)"]);
    assert_eq!(status_of("GET", "gone"), ["Some(404)"]);
}
