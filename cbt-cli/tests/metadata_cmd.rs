//! `cbt serve-metadata`, `cbt metadata allocated|delta` and `cbt backup --metadata-endpoint`
//! as real processes over a unix socket.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Server {
    child: Child,
    endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, sock: &Path, extra: &[&str]) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .args(["serve-metadata", "--dir"])
        .arg(dir)
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(["--block-size", "64KiB"])
        .args(extra)
        .env_remove("CBT_METADATA_SERVER_TOKEN")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        endpoint: format!("unix://{}", sock.display()),
    }
}

fn cbt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cbt"))
        .args(args)
        .env_remove("CBT_REPO")
        .env_remove("CBT_METADATA_ENDPOINT")
        .env_remove("CBT_METADATA_TOKEN")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = cbt(args);
    assert!(
        out.status.success(),
        "cbt {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `cbt -o json show` of snapshot `snapshot` of `volume` in `repo`.
fn show_json(repo: &str, volume: &str, snapshot: &str) -> serde_json::Value {
    let out = ok(&[
        "--repo",
        repo,
        "-o",
        "json",
        "show",
        "--volume",
        volume,
        "--snapshot",
        snapshot,
    ]);
    serde_json::from_str(&out).unwrap()
}

/// Restores snapshot `snapshot` of `volume` in `repo` to the file `target` and asserts that it
/// holds the bytes of `expected`.
fn assert_restores(repo: &str, volume: &str, snapshot: &str, target: &Path, expected: &Path) {
    ok(&[
        "--repo",
        repo,
        "restore",
        "--volume",
        volume,
        "--snapshot",
        snapshot,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(target).unwrap(),
        std::fs::read(expected).unwrap()
    );
}

fn image(path: &Path, size: u64, writes: &[(u64, u8, usize)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &(off, byte, len) in writes {
        f.write_all_at(&vec![byte; len], off).unwrap();
    }
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let snaps = t.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    let sock = t.path().join("m.sock");
    (t, snaps, sock)
}

#[test]
fn metadata_lists_allocated_and_delta_as_table_and_json() {
    let (_t, snaps, sock) = dirs();
    image(
        &snaps.join("s1"),
        8 * MIB,
        &[(0, 1, 100_000), (4 * MIB, 2, 10)],
    );
    std::fs::copy(snaps.join("s1"), snaps.join("s2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("s2"))
        .unwrap()
        .write_all_at(&[9], 6 * MIB)
        .unwrap();
    let srv = serve(
        &snaps,
        &sock,
        &[
            "--token",
            "tok",
            "--block-type",
            "fixed",
            "--max-results",
            "1",
        ],
    );
    let ep = srv.endpoint.as_str();

    let probe = ok(&["metadata", "probe", "--metadata-endpoint", ep]);
    assert!(
        probe.contains("SNAPSHOT_METADATA_SERVICE capability: yes") && probe.contains("ready: yes"),
        "{probe}"
    );
    let probe: serde_json::Value =
        serde_json::from_str(&ok(&["-o", "json", "metadata", "probe", "--endpoint", ep])).unwrap();
    assert_eq!(probe["serving"], true);
    assert_eq!(probe["driver"], "file.cbt.example.com");

    let table = ok(&[
        "metadata",
        "allocated",
        "--metadata-endpoint",
        ep,
        "--metadata-token",
        "tok",
        "-s",
        "s1",
    ]);
    assert!(table.contains("OFFSET"), "{table}");
    assert!(table.contains("ranges: 2  bytes: 196608"), "{table}");
    assert!(table.contains("FIXED_LENGTH (65536 B blocks)"), "{table}");

    let token_file = snaps.parent().unwrap().join("token");
    std::fs::write(&token_file, "tok\n").unwrap();
    let json = ok(&[
        "-o",
        "json",
        "metadata",
        "delta",
        "--endpoint",
        ep,
        "--metadata-token-file",
        token_file.to_str().unwrap(),
        // The spellings `cbt backup` uses (and the README shows) work here too.
        "--base-snapshot-id",
        "s1",
        "--snapshot-id",
        "s2",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["complete"], true);
    assert_eq!(
        v["ranges"],
        serde_json::json!([{"offset": 6 * MIB, "length": 65536}])
    );
    assert_eq!(v["summary"]["volume_capacity_bytes"], 8 * MIB);

    // The Kubernetes API flavour on the same server: VolumeSnapshot name + namespace.
    let k8s = ok(&[
        "metadata",
        "allocated",
        "--endpoint",
        ep,
        "--metadata-token",
        "tok",
        "--metadata-namespace",
        "default",
        "-s",
        "s1",
    ]);
    assert!(k8s.contains("ranges: 2  bytes: 196608"), "{k8s}");
    let out = cbt(&[
        "metadata",
        "allocated",
        "--endpoint",
        ep,
        "--metadata-token",
        "tok",
        "--metadata-namespace",
        "other",
        "-s",
        "s1",
        "--metadata-max-attempts",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "VolumeSnapshot not found/not ready is transient"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("readyToUse"));

    // Missing token: configuration error (exit 5) with a hint; unknown snapshot: usage (exit 2).
    let out = cbt(&["metadata", "allocated", "--endpoint", ep, "-s", "s1"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not authenticated"));
    let out = cbt(&[
        "-o",
        "json",
        "metadata",
        "allocated",
        "--endpoint",
        ep,
        "--metadata-token",
        "tok",
        "-s",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("snapshot not found")
    );
}

#[test]
fn metadata_resumes_a_dropped_stream() {
    let (_t, snaps, sock) = dirs();
    let writes: Vec<(u64, u8, usize)> = (0..20).map(|i| (i * 2 * 65536, 1u8, 10)).collect();
    image(&snaps.join("s"), 40 * 65536, &writes);
    let srv = serve(
        &snaps,
        &sock,
        &[
            "--max-results",
            "2",
            "--drop-after",
            "3",
            "--drop-times",
            "2",
        ],
    );
    let json = ok(&[
        "-o",
        "json",
        "metadata",
        "allocated",
        "--endpoint",
        &srv.endpoint,
        "-s",
        "s",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ranges"].as_array().unwrap().len(), 20);
    assert_eq!(v["summary"]["attempts"], 3);
}

#[test]
fn backup_takes_ranges_from_the_service_and_records_lineage() {
    let (t, snaps, sock) = dirs();
    let repo = format!("file://{}", t.path().join("repo").display());
    image(
        &snaps.join("snap-1"),
        16 * MIB,
        &[(0, 1, 300_000), (9 * MIB, 2, 5000)],
    );
    std::fs::copy(snaps.join("snap-1"), snaps.join("snap-2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("snap-2"))
        .unwrap()
        .write_all_at(&[7; 100], 12 * MIB)
        .unwrap();
    image(&snaps.join("resized"), 32 * MIB, &[(0, 1, 10)]);
    let srv = serve(&snaps, &sock, &[]);
    let ep = srv.endpoint.as_str();
    ok(&["--repo", &repo, "repo", "init", "--chunk-size", "1MiB"]);
    let dev = |id: &str| snaps.join(id).display().to_string();

    let full = cbt(&[
        "--repo",
        &repo,
        "backup",
        "--device",
        &dev("snap-1"),
        "--volume",
        "v",
        "--snapshot",
        "b1",
        "--metadata-endpoint",
        ep,
        "--snapshot-id",
        "snap-1",
    ]);
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    assert!(
        String::from_utf8_lossy(&full.stderr).contains("GetMetadataAllocated snap-1: 2 ranges")
    );
    let incr = cbt(&[
        "--repo",
        &repo,
        "backup",
        "--device",
        &dev("snap-2"),
        "--volume",
        "v",
        "--snapshot",
        "b2",
        "--metadata-endpoint",
        ep,
        "--snapshot-id",
        "snap-2",
        "--base-snapshot-id",
        "snap-1",
    ]);
    assert!(
        incr.status.success(),
        "{}",
        String::from_utf8_lossy(&incr.stderr)
    );
    assert!(
        String::from_utf8_lossy(&incr.stderr)
            .contains("GetMetadataDelta snap-1 -> snap-2: 1 ranges")
    );

    let show = show_json(&repo, "v", "b2");
    assert_eq!(show["parent"]["snapshot"], "b1");
    assert_eq!(show["source"]["csi_snapshot_id"], "snap-2");
    assert_eq!(show["source"]["base_csi_snapshot_id"], "snap-1");
    // Only the one changed 1 MiB chunk was read.
    assert_eq!(show["stats"]["bytes_read"], MIB);

    // The restored incremental equals the second snapshot.
    assert_restores(
        &repo,
        "v",
        "b2",
        &t.path().join("restored.img"),
        &snaps.join("snap-2"),
    );

    // A base that is not the latest backup is refused unless allowed.
    let again = [
        "--repo",
        &repo,
        "backup",
        "--device",
        &dev("snap-2"),
        "--volume",
        "v",
        "--snapshot",
        "b3",
        "--metadata-endpoint",
        ep,
        "--snapshot-id",
        "snap-2",
        "--base-snapshot-id",
        "snap-1",
    ];
    let out = cbt(&again);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-non-latest-base"));
    // --parent without a delta base would be a full backup ignoring it: refused.
    let mut no_base = again[..again.len() - 2].to_vec();
    no_base.extend(["--parent", "b1"]);
    let out = cbt(&no_base);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --base-snapshot-id"));
    let mut allowed = again.to_vec();
    allowed.push("--allow-non-latest-base");
    ok(&allowed);
    let show = show_json(&repo, "v", "b3");
    assert_eq!(show["parent"]["snapshot"], "b1");

    // A delta the service refuses (base of another size: FAILED_PRECONDITION) fails with a hint,
    // and with --fallback-full becomes a full backup.
    std::fs::copy(snaps.join("snap-2"), snaps.join("snap-2b")).unwrap();
    let refused = [
        "--repo",
        &repo,
        "backup",
        "--device",
        &dev("snap-2b"),
        "--volume",
        "w",
        "--snapshot",
        "c1",
        "--metadata-endpoint",
        ep,
        "--snapshot-id",
        "snap-2b",
    ];
    ok(&refused);
    let delta = [
        "--repo",
        &repo,
        "backup",
        "--device",
        &dev("resized"),
        "--volume",
        "w",
        "--snapshot",
        "c2",
        "--metadata-endpoint",
        ep,
        "--snapshot-id",
        "resized",
        "--base-snapshot-id",
        "snap-2b",
    ];
    let out = cbt(&delta);
    // No changed-block tracking across a resize: the storage does not offer it (exit 7).
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("full backup")
            && err.contains("retrying will not help")
            && err.contains("--fallback-full"),
        "{err}"
    );
    let mut fallback = delta.to_vec();
    fallback.push("--fallback-full");
    let out = cbt(&fallback);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The full backup still reads only what GetMetadataAllocated reports.
    assert!(
        err.contains("falling back to a full backup")
            && !err.contains("allocated ranges unavailable"),
        "{err}"
    );
    let show = show_json(&repo, "w", "c2");
    assert!(show["parent"].is_null());
    assert_eq!(show["volume_size"], 32 * MIB);
    // Recorded as taken from `resized`, with no delta base: the next incremental can build on it.
    assert_eq!(show["source"]["csi_snapshot_id"], "resized");
    assert!(show["source"]["base_csi_snapshot_id"].is_null());
    assert_eq!(show["stats"]["bytes_read"], MIB);
}

#[test]
fn backup_through_the_kubernetes_api_records_names_and_handles() {
    let (t, snaps, sock) = dirs();
    let repo = format!("file://{}", t.path().join("repo").display());
    image(&snaps.join("vs-1"), 4 * MIB, &[(0, 1, 70_000)]);
    std::fs::copy(snaps.join("vs-1"), snaps.join("vs-2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("vs-2"))
        .unwrap()
        .write_all_at(&[3; 10], 3 * MIB)
        .unwrap();
    let srv = serve(&snaps, &sock, &["--token", "sa-token"]);
    let ep = srv.endpoint.as_str();
    ok(&["--repo", &repo, "repo", "init", "--chunk-size", "1M"]);
    let dev = |id: &str| snaps.join(id).display().to_string();
    let d1 = dev("vs-1");
    let k8s = [
        "--metadata-endpoint",
        ep,
        "--metadata-namespace",
        "default",
        "--metadata-token",
        "sa-token",
    ];
    let mut full = vec![
        "--repo",
        &repo,
        "backup",
        "--device",
        &d1,
        "--volume",
        "pvc",
        "--snapshot",
        "k1",
        "--snapshot-id",
        "vs-1",
        "--snapshot-handle",
        "vs-1",
    ];
    full.extend_from_slice(&k8s);
    ok(&full);
    let d2 = dev("vs-2");
    let mut incr = vec![
        "--repo",
        &repo,
        "backup",
        "--device",
        &d2,
        "--volume",
        "pvc",
        "--snapshot",
        "k2",
        "--snapshot-id",
        "vs-2",
        "--snapshot-handle",
        "vs-2",
        "--base-snapshot-id",
        "vs-1",
    ];
    incr.extend_from_slice(&k8s);
    ok(&incr);
    let show = show_json(&repo, "pvc", "k2");
    assert_eq!(show["parent"]["snapshot"], "k1");
    assert_eq!(show["source"]["namespace"], "default");
    assert_eq!(show["source"]["volume_snapshot"], "vs-2");
    assert_eq!(show["source"]["csi_snapshot_id"], "vs-2");
    assert_eq!(show["source"]["base_csi_snapshot_id"], "vs-1");
    assert_eq!(show["stats"]["bytes_read"], MIB);
}

/// Starts `cbt serve-metadata` on a free loopback TCP port with the test TLS identity and
/// returns the server and its `https://127.0.0.1:PORT` endpoint (read from its stderr).
fn serve_tls(dir: &Path, extra: &[&str]) -> (Server, String) {
    serve_tls_with_token_env(dir, extra, None)
}

/// [`serve_tls`] with `CBT_METADATA_SERVER_TOKEN` set to `token_env` (unset for `None`).
fn serve_tls_with_token_env(
    dir: &Path,
    extra: &[&str],
    token_env: Option<&str>,
) -> (Server, String) {
    use std::io::BufRead;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cbt-csi/tests/fixtures");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cbt"));
    cmd.args(["serve-metadata", "--dir"])
        .arg(dir)
        .args(["--listen", "tcp://127.0.0.1:0", "--tls-cert"])
        .arg(fixtures.join("server.pem"))
        .arg("--tls-key")
        .arg(fixtures.join("server.key"))
        .args(extra)
        .env_remove("CBT_METADATA_SERVER_TOKEN");
    if let Some(t) = token_env {
        cmd.env("CBT_METADATA_SERVER_TOKEN", t);
    }
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // Keep draining, so later server output never meets a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let endpoint = line
        .trim()
        .rsplit(" on ")
        .next()
        .filter(|e| e.starts_with("https://"))
        .unwrap_or_else(|| panic!("unexpected server output {line:?}"))
        .to_string();
    (
        Server {
            child,
            endpoint: endpoint.clone(),
        },
        endpoint,
    )
}

#[test]
fn metadata_over_tls_with_the_ca_bundle_server_name_and_token() {
    let (_t, snaps, _sock) = dirs();
    image(&snaps.join("vs-1"), 4 * MIB, &[(0, 1, 70_000)]);
    let (_srv, https) = serve_tls(&snaps, &["--token", "sa-token"]);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cbt-csi/tests/fixtures");
    let ca = fixtures.join("ca.pem");
    let other_ca = fixtures.join("other-ca.pem");
    // As a SnapshotMetadataService gives it: bare host:port, caCert, audience-scoped token;
    // the server name stands in for the Service DNS name behind a port-forward.
    let host_port = https.trim_start_matches("https://").to_string();
    let k8s = |ca: &Path, name: &str| {
        cbt(&[
            "metadata",
            "allocated",
            "--endpoint",
            &host_port,
            "--metadata-ca-file",
            ca.to_str().unwrap(),
            "--metadata-server-name",
            name,
            "--metadata-namespace",
            "default",
            "--metadata-token",
            "sa-token",
            "--snapshot-id",
            "vs-1",
            "--metadata-max-attempts",
            "1",
        ])
    };
    let out = k8s(&ca, "snapshot-metadata.cbt-test.svc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ranges: 1  bytes: 131072"), "{stdout}");

    // A certificate from another CA, or for another name, is refused before any request.
    for (ca, name) in [
        (&other_ca, "snapshot-metadata.cbt-test.svc"),
        (&ca, "evil.example.com"),
    ] {
        let out = k8s(ca, name);
        let err = String::from_utf8_lossy(&out.stderr);
        // Retrying cannot help: a configuration error (exit 5), not a transient one.
        assert_eq!(out.status.code(), Some(5), "{name}: {err}");
        assert!(err.contains("invalid peer certificate"), "{name}: {err}");
    }
    // A file that is not a PEM bundle is a configuration error naming the problem.
    let bogus = snaps.join("vs-1");
    let out = k8s(&bogus, "snapshot-metadata.cbt-test.svc");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PEM certificate"));
}

#[test]
fn csi_secrets_from_a_file_reach_the_driver() {
    let (t, snaps, sock) = dirs();
    image(&snaps.join("s1"), 4 * MIB, &[(0, 1, 10)]);
    let required = t.path().join("driver-secrets.json");
    std::fs::write(&required, r#"{"userKey": "k3y"}"#).unwrap();
    let srv = serve(
        &snaps,
        &sock,
        &["--secrets-file", required.to_str().unwrap()],
    );
    let ep = srv.endpoint.as_str();
    let sent = t.path().join("secrets.json");
    let list = |secrets: Option<&Path>| {
        let mut args = vec!["metadata", "allocated", "--endpoint", ep, "-s", "s1"];
        if let Some(p) = secrets {
            args.extend(["--metadata-secrets-file", p.to_str().unwrap()]);
        }
        cbt(&args)
    };
    std::fs::write(&sent, r#"{"userID": "admin", "userKey": "k3y"}"#).unwrap();
    let out = list(Some(&sent));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ranges: 1"));

    let out = list(None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"userKey\" is required"));
    std::fs::write(&sent, r#"{"userKey": "wrong"}"#).unwrap();
    let out = list(Some(&sent));
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("credentials"));
    // A malformed file is refused without echoing its content.
    std::fs::write(&sent, r#"{"userKey": 12345678}"#).unwrap();
    let out = list(Some(&sent));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not a JSON object of string values") && !err.contains("12345678"),
        "{err}"
    );
    // The Kubernetes API takes secrets from the VolumeSnapshotClass, not from the client.
    let out = cbt(&[
        "metadata",
        "allocated",
        "--endpoint",
        ep,
        "--metadata-namespace",
        "default",
        "--metadata-secrets-file",
        sent.to_str().unwrap(),
        "-s",
        "s1",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// `cbt -o json metadata <args>` against `ep`: (exit code, the one JSON document on stdout).
fn metadata_json(ep: &str, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut all = vec!["-o", "json", "metadata"];
    all.extend_from_slice(&args[..1]);
    all.extend(["--endpoint", ep]);
    all.extend_from_slice(&args[1..]);
    let out = cbt(&all);
    let text = String::from_utf8(out.stdout).unwrap();
    // One document: serde_json::from_str refuses trailing content.
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (out.status.code(), v)
}

#[test]
fn listings_and_backups_resume_streams_cut_at_the_servers_time_limit() {
    let (t, snaps, sock) = dirs();
    let repo = format!("file://{}", t.path().join("repo").display());
    // 24 data blocks of 64 KiB separated by holes; snap-2 changes 8 of them.
    let writes: Vec<(u64, u8, usize)> = (0..24).map(|i| (i * 2 * 65536, 1u8, 65536)).collect();
    image(&snaps.join("snap-1"), 48 * 65536, &writes);
    std::fs::copy(snaps.join("snap-1"), snaps.join("snap-2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(snaps.join("snap-2"))
        .unwrap();
    for i in (0..24).step_by(3) {
        f.write_all_at(&[9; 100], i * 2 * 65536 + 1000).unwrap();
    }
    drop(f);

    let uncut = {
        let srv = serve(
            &snaps,
            &sock.with_file_name("a.sock"),
            &["--max-results", "1"],
        );
        let a = metadata_json(&srv.endpoint, &["allocated", "-s", "snap-2"]).1;
        let d = metadata_json(&srv.endpoint, &["delta", "-b", "snap-1", "-s", "snap-2"]).1;
        (a, d)
    };
    assert_eq!(uncut.0["ranges"].as_array().unwrap().len(), 24);
    assert_eq!(uncut.1["ranges"].as_array().unwrap().len(), 8);

    // Every stream ends with DEADLINE_EXCEEDED after 2 one-tuple messages, like a sidecar whose
    // --max-streaming-duration-min is far shorter than the listing.
    let cut_args = [
        "--max-results",
        "1",
        "--drop-after",
        "2",
        "--drop-times",
        "1000000",
        "--drop-deadline",
    ];
    {
        let srv = serve(&snaps, &sock.with_file_name("b.sock"), &cut_args);
        let (code, a) = metadata_json(&srv.endpoint, &["allocated", "-s", "snap-2"]);
        assert_eq!(code, Some(0), "{a}");
        assert_eq!(a["ranges"], uncut.0["ranges"]);
        assert_eq!(a["complete"], true);
        assert_eq!(a["summary"]["attempts"], 12, "24 blocks, 2 per stream");
        let (code, d) = metadata_json(&srv.endpoint, &["delta", "-b", "snap-1", "-s", "snap-2"]);
        assert_eq!(code, Some(0), "{d}");
        assert_eq!(d["ranges"], uncut.1["ranges"]);

        // cbt backup through the same cutting server: full, then an incremental that reads only
        // the changed chunks.
        ok(&["--repo", &repo, "repo", "init", "--chunk-size", "64K"]);
        let dev = |id: &str| snaps.join(id).display().to_string();
        for (snap, base) in [("snap-1", None), ("snap-2", Some("snap-1"))] {
            let mut args = vec![
                "--repo",
                &repo,
                "backup",
                "--volume",
                "v",
                "--metadata-endpoint",
                &srv.endpoint,
            ];
            let device = dev(snap);
            args.extend([
                "--device",
                &device,
                "--snapshot",
                snap,
                "--snapshot-id",
                snap,
            ]);
            if let Some(b) = base {
                args.extend(["--base-snapshot-id", b]);
            }
            ok(&args);
        }
        let show = show_json(&repo, "v", "snap-2");
        assert_eq!(show["stats"]["bytes_read"], 8 * 65536);
        assert_restores(
            &repo,
            "v",
            "snap-2",
            &t.path().join("restored.img"),
            &snaps.join("snap-2"),
        );
    }

    // A limit that cuts before the first message cannot make progress: a bounded number of
    // attempts, exit 4, and one complete JSON document that names the server's limit.
    {
        let srv = serve(
            &snaps,
            &sock.with_file_name("c.sock"),
            &[
                "--drop-after",
                "0",
                "--drop-times",
                "1000000",
                "--drop-deadline",
            ],
        );
        let (code, v) = metadata_json(
            &srv.endpoint,
            &[
                "delta",
                "-b",
                "snap-1",
                "-s",
                "snap-2",
                "--metadata-max-attempts",
                "3",
            ],
        );
        assert_eq!(code, Some(4), "{v}");
        assert_eq!(v["complete"], false);
        assert_eq!(v["ranges"], serde_json::json!([]));
        assert_eq!(v["summary"]["attempts"], 3);
        assert_eq!(v["error"]["class"], "transient");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("its own time limit"), "{msg}");
    }

    // A listing that fails midway (one broken stream, no retries allowed) is still one document:
    // the ranges received, complete=false, totals and the error.
    {
        let srv = serve(
            &snaps,
            &sock.with_file_name("d.sock"),
            &[
                "--max-results",
                "1",
                "--drop-after",
                "2",
                "--drop-times",
                "1",
            ],
        );
        let (code, v) = metadata_json(
            &srv.endpoint,
            &["allocated", "-s", "snap-2", "--metadata-max-attempts", "1"],
        );
        assert_eq!(code, Some(4), "{v}");
        assert_eq!(v["complete"], false);
        assert_eq!(v["ranges"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["summary"]["tuples_received"], 2);
        assert_eq!(v["error"]["exit_code"], 4);
    }
}

#[test]
fn a_tcp_listener_needs_tls_and_a_token_unless_insecure() {
    let (_t, snaps, _sock) = dirs();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cbt-csi/tests/fixtures");
    let cert = fixtures.join("server.pem").display().to_string();
    let key = fixtures.join("server.key").display().to_string();
    let dir = snaps.display().to_string();
    let base = [
        "serve-metadata",
        "--dir",
        &dir,
        "--listen",
        "tcp://127.0.0.1:0",
    ];
    let plain = cbt(&base);
    assert_eq!(plain.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&plain.stderr).contains("without TLS"));
    let mut tls = base.to_vec();
    tls.extend(["--tls-cert", &cert, "--tls-key", &key]);
    let open = cbt(&tls);
    assert_eq!(open.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&open.stderr).contains("without authentication"));
    // With --insecure it serves (and is stopped here).
    let mut insecure = base.to_vec();
    insecure.push("--insecure");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .args(&insecure)
        .env_remove("CBT_METADATA_SERVER_TOKEN")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("serving"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The server's token never has to be on its command line: from a file (one trailing newline
/// ignored) or from CBT_METADATA_SERVER_TOKEN; callers with another token are refused.
#[test]
fn a_tcp_server_takes_its_token_from_a_file_or_the_environment() {
    let (_t, snaps, _sock) = dirs();
    image(&snaps.join("vs-1"), 4 * MIB, &[(0, 1, 70_000)]);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cbt-csi/tests/fixtures");
    let ca = fixtures.join("ca.pem");
    let token_file = snaps.parent().unwrap().join("server-token");
    std::fs::write(&token_file, "from-a-file\n").unwrap();
    let call = |https: &str, token: &str| {
        cbt(&[
            "metadata",
            "allocated",
            "--endpoint",
            https.trim_start_matches("https://"),
            "--metadata-ca-file",
            ca.to_str().unwrap(),
            "--metadata-server-name",
            "snapshot-metadata.cbt-test.svc",
            "--metadata-namespace",
            "default",
            "--metadata-token",
            token,
            "--snapshot-id",
            "vs-1",
            "--metadata-max-attempts",
            "1",
        ])
    };
    let (_a, by_file) = serve_tls(&snaps, &["--token-file", token_file.to_str().unwrap()]);
    let (_b, by_env) = serve_tls_with_token_env(&snaps, &[], Some("from-the-env"));
    for (https, good, bad) in [
        (&by_file, "from-a-file", "from-the-env"),
        (&by_env, "from-the-env", "from-a-file"),
    ] {
        let out = call(https, good);
        assert!(
            out.status.success(),
            "{https}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("ranges: 1"));
        let out = call(https, bad);
        assert!(!out.status.success(), "{https} accepted another token");
        assert_eq!(
            out.status.code(),
            Some(5),
            "{https}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
