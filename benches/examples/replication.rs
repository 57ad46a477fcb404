//! Measures the replication controller against fake-kube with N VolumeReplications (default
//! 1,000) on the simulated Trident backend.
//!
//! Phases, all in one run:
//! 1. cold start: N VolumeReplications exist (primary), the controller starts; time until all
//!    report Primary with Completed=True, and reconciles per second over that time;
//! 2. baseline: one VR at a time (the rest converged and idle), `spec.replicationState` flipped;
//!    latency from the spec change (the watch event) to the first status write of the new
//!    generation, as seen through a watch;
//! 3. burst: all N flipped at once; the same latency per VR (p50/p99), and reconciles/s.
//!
//! `cargo run --release -p cbt-benches --example replication [-- N]`
//!
//! Figures (before/after the cache and fake-kube indexing work, same machine, same run) are in
//! the README's replication section. The last line breaks the reconciles down by verdict:
//! `conflict` counts reconciles that met a newer object than the one they read.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cbt_k8s::replication::controller::testing::{self, Running};
use cbt_k8s::replication::controller::{Config, Leadership, Metrics};
use cbt_k8s::replication::types::VolumeReplication;
use fake_kube::FakeKube;
use futures::StreamExt;
use kube::Api;
use kube::runtime::watcher;
use serde_json::json;

const NS: &str = "bench";
const VR_API: &str = "replication.storage.openshift.io/v1alpha1";
const TRIDENT: &str = "csi.trident.netapp.io";

/// name -> (generation awaited, when the spec change was made, when its first status came).
type Pending = Arc<Mutex<HashMap<String, (i64, Instant, Option<Instant>)>>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

const VERDICTS: [&str; 6] = [
    "converged",
    "in_progress",
    "conflict",
    "rejected",
    "not_converging",
    "error",
];

fn total_reconciles(m: &Metrics) -> u64 {
    m.reconcile_total("VolumeReplication")
}

/// Reconciles per verdict so far (conflicts are reconciles that met a newer object).
fn breakdown(m: &Metrics) -> String {
    VERDICTS
        .iter()
        .map(|r| format!("{r} {}", m.reconcile_count("VolumeReplication", r)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn flip(fake: &FakeKube, name: &str, to: &str) -> i64 {
    let o = fake
        .merge_patch(
            VR_API,
            "VolumeReplication",
            NS,
            name,
            &json!({"spec": {"replicationState": to}}),
        )
        .unwrap();
    o["metadata"]["generation"].as_i64().unwrap()
}

async fn wait_all(pending: &Pending, n: usize, limit: Duration) -> Vec<Duration> {
    let start = Instant::now();
    loop {
        let done: Vec<Duration> = pending
            .lock()
            .unwrap()
            .values()
            .filter_map(|(_, t0, t1)| t1.map(|t| t - *t0))
            .collect();
        if done.len() >= n || start.elapsed() > limit {
            let mut d = done;
            d.sort();
            return d;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let fake = FakeKube::builder()
        .replication_api()
        .event_log_capacity(20 * n.max(100))
        .start()
        .await
        .unwrap();
    fake.seed_namespace(NS).unwrap();
    fake.seed_storage_class("ontap", TRIDENT, false).unwrap();
    fake.create(
        json!({"apiVersion": VR_API, "kind": "VolumeReplicationClass",
        "metadata": {"name": "trident"}, "spec": {"provisioner": TRIDENT}}),
    )
    .unwrap();
    for i in 0..n {
        let name = format!("v{i:05}");
        fake.create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ontap",
                     "resources": {"requests": {"storage": "1Gi"}}}}))
            .unwrap();
        fake.create(json!({"apiVersion": VR_API, "kind": "VolumeReplication",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"volumeReplicationClass": "trident", "replicationState": "primary",
                     "dataSource": {"kind": "PersistentVolumeClaim", "name": name},
                     "autoResync": false, "replicationHandle": format!("svm1:vol_{i}")}}))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    fake.write_kubeconfig(&kubeconfig, "bench").unwrap();
    let mut config = Config::new(vec![TRIDENT.into()]);
    config.retry_base = Duration::from_millis(100);
    config.retry_max = Duration::from_secs(2);
    config.resync = Duration::from_secs(3600);
    let ctx = testing::context(&kubeconfig, config, Leadership::always())
        .await
        .unwrap();
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();

    // Our own watch: when did each VR's status first describe the awaited generation?
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let converged = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let watch_task;
    {
        let pending = pending.clone();
        let converged = converged.clone();
        let api: Api<VolumeReplication> = Api::namespaced(client.clone(), NS);
        watch_task = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let objs: Vec<VolumeReplication> = match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                    _ => continue,
                };
                let now = Instant::now();
                for o in objs {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    let Some(st) = o.status else { continue };
                    if let Some(entry) = pending.lock().unwrap().get_mut(&name)
                        && entry.2.is_none()
                        && st.observed_generation >= entry.0
                    {
                        entry.2 = Some(now);
                    }
                    let done = st.state.map(|s| s.as_str()) == Some("Primary")
                        && st
                            .conditions
                            .iter()
                            .any(|c| c.type_ == "Completed" && c.status == "True");
                    let mut c = converged.lock().unwrap();
                    if done {
                        c.insert(name);
                    } else {
                        c.remove(&name);
                    }
                }
            }
        });
    }

    let started = Instant::now();
    let controller = Running::start(ctx);
    while converged.lock().unwrap().len() < n {
        if started.elapsed() > Duration::from_secs(600) {
            panic!(
                "cold start did not converge: {}/{n}",
                converged.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cold = started.elapsed();
    let cold_reconciles = total_reconciles(&metrics);
    println!(
        "cold start: {n} VRs converged (Primary, Completed=True) in {:.2}s: {cold_reconciles} reconciles, {:.0} reconciles/s, {:.0} VRs/s",
        cold.as_secs_f64(),
        cold_reconciles as f64 / cold.as_secs_f64(),
        n as f64 / cold.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Baseline: one change at a time.
    let samples = n.min(100);
    let mut single = Vec::new();
    for i in 0..samples {
        let name = format!("v{i:05}");
        let t0 = Instant::now();
        let generation = flip(&fake, &name, "secondary");
        pending
            .lock()
            .unwrap()
            .insert(name.clone(), (generation, t0, None));
        let d = wait_all(&pending, i + 1, Duration::from_secs(30)).await;
        assert_eq!(d.len(), i + 1, "no status for {name}");
        single.push(pending.lock().unwrap()[&name].2.unwrap() - t0);
    }
    single.sort();
    println!(
        "baseline (one change at a time, {samples} samples): watch event -> status written p50 {:.1} ms, p99 {:.1} ms",
        percentile(&single, 0.5).as_secs_f64() * 1e3,
        percentile(&single, 0.99).as_secs_f64() * 1e3
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Burst: every VR changes at once (the first `samples` go back to primary, the rest demote).
    pending.lock().unwrap().clear();
    let before = total_reconciles(&metrics);
    let burst_start = Instant::now();
    for i in 0..n {
        let name = format!("v{i:05}");
        let to = if i < samples { "primary" } else { "secondary" };
        let t0 = Instant::now();
        let generation = flip(&fake, &name, to);
        pending.lock().unwrap().insert(name, (generation, t0, None));
    }
    let burst = wait_all(&pending, n, Duration::from_secs(600)).await;
    let burst_time = burst_start.elapsed();
    let burst_reconciles = total_reconciles(&metrics) - before;
    println!(
        "burst ({} changes at once): watch event -> status written p50 {:.1} ms, p99 {:.1} ms; all written after {:.2}s; {burst_reconciles} reconciles, {:.0} reconciles/s",
        burst.len(),
        percentile(&burst, 0.5).as_secs_f64() * 1e3,
        percentile(&burst, 0.99).as_secs_f64() * 1e3,
        burst_time.as_secs_f64(),
        burst_reconciles as f64 / burst_time.as_secs_f64()
    );
    println!("reconciles by verdict, whole run: {}", breakdown(&metrics));
    println!(
        "burst p50 / baseline p50 = {:.1}x",
        percentile(&burst, 0.5).as_secs_f64() / percentile(&single, 0.5).as_secs_f64().max(1e-9)
    );
    // Stop the controller before the runtime goes: dropping the runtime under a running
    // kube-runtime controller cancels its reconcile tasks while it still polls them, and it
    // panics on the cancelled JoinHandle.
    controller.stop().await;
    watch_task.abort();
    let _ = watch_task.await;
}
