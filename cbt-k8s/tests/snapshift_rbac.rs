//! SnapShift under the least-privilege RBAC of `examples/snapshift/`: two fake clusters
//! enforce the manifests, read from disk at test time, and every flow runs as their
//! ServiceAccount. Proves the manifests complete (no request of any flow is denied),
//! minimal (every grant is used by some flow), and the README's RBAC table true (removing
//! any one rule has the effect its row states: the flow fails with 403, or the check is
//! skipped with a warning). A new API call, or a new grant, without the other fails here.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use cbt_k8s::snapshift::{
    MigrateOptions, MigrationRequest, OptionalCheck, Outcome, Side, SkippedCheck, SnapShift,
};
use cbt_k8s::{ClusterTarget, Error, RetryPolicy, connect};
use fake_kube::rbac::{Policy, ServiceAccountRef, UserInfo};
use fake_kube::{AccessRecord, ClusterPair, FakeKube};
use futures::StreamExt;
use serde_json::json;

const SNAP: &str = "snapshot.storage.k8s.io/v1";
const TOKEN: &str = "snapshift-sa-token";

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// One verb on one resource for one side: the unit the manifests and the README grant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    side: &'static str,
    group: String,
    resource: String,
    verb: String,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.side, self.verb, self.resource)
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Origin => "origin",
        Side::Destination => "destination",
    }
}

#[derive(Clone)]
struct Manifests {
    origin: Policy,
    dest: Policy,
    account: ServiceAccountRef,
}

impl Manifests {
    fn load() -> Self {
        let origin = Policy::from_yaml(&read("examples/snapshift/origin.yaml")).unwrap();
        let dest = Policy::from_yaml(&read("examples/snapshift/destination.yaml")).unwrap();
        assert_eq!(origin.service_accounts.len(), 1, "one identity per side");
        assert_eq!(
            origin.service_accounts, dest.service_accounts,
            "the same ServiceAccount on both sides"
        );
        let account = origin.service_accounts[0].clone();
        Self {
            origin,
            dest,
            account,
        }
    }

    fn policy(&self, side: &str) -> &Policy {
        if side == "origin" {
            &self.origin
        } else {
            &self.dest
        }
    }

    /// Every grant, checking the shape the README promises: one group, resource and verb
    /// per rule, no wildcards, no names.
    fn grants(&self) -> Vec<Grant> {
        let mut out = Vec::new();
        for side in ["origin", "destination"] {
            for role in &self.policy(side).roles {
                for rule in &role.rules {
                    let (group, resource, verb) = rule.single_grant().unwrap_or_else(|| {
                        panic!(
                            "{side} {}: one group, resource and verb per rule, no wildcards, no names: {rule:?}",
                            role.name
                        )
                    });
                    out.push(Grant {
                        side,
                        group: group.into(),
                        resource: resource.into(),
                        verb: verb.into(),
                    });
                }
            }
        }
        let unique: BTreeSet<&Grant> = out.iter().collect();
        assert_eq!(unique.len(), out.len(), "no grant twice");
        out
    }

    /// The manifests without the rule granting `g`.
    fn without(&self, g: &Grant) -> Self {
        let mut m = self.clone();
        let policy = if g.side == "origin" {
            &mut m.origin
        } else {
            &mut m.dest
        };
        for role in &mut policy.roles {
            role.rules.retain(|r| {
                !(r.api_groups == [g.group.clone()]
                    && r.resources == [g.resource.clone()]
                    && r.verbs == [g.verb.clone()])
            });
        }
        m
    }
}

/// `need` per (side, resource, verb), from the README's RBAC table.
fn readme_table() -> BTreeMap<(String, String, String), String> {
    let readme = read("README.md");
    let start = readme
        .find("<!-- rbac-table")
        .expect("README has the RBAC table marker");
    let mut rows = BTreeMap::new();
    for line in readme[start..].lines().skip(3) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [side, resource, verb, need, ..] = cells.as_slice() else {
            panic!("malformed RBAC table row: {line}");
        };
        assert!(
            ["required", "optional", "cleanup", "recovery"].contains(need),
            "unknown need {need:?} in: {line}"
        );
        let key = (side.to_string(), resource.to_string(), verb.to_string());
        assert!(
            rows.insert(key, need.to_string()).is_none(),
            "row twice: {line}"
        );
    }
    rows
}

/// `need` per (side, resource, verb), from the comment above each rule of the manifests.
fn manifest_comments() -> BTreeMap<(String, String, String), String> {
    let mut out = BTreeMap::new();
    for (side, file) in [
        ("origin", "examples/snapshift/origin.yaml"),
        ("destination", "examples/snapshift/destination.yaml"),
    ] {
        let text = read(file);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let list = |line: &str, key: &str| -> String {
            let v = line
                .strip_prefix(key)
                .unwrap_or_else(|| panic!("{file}: {line}"));
            v.trim()
                .trim_matches(|c| c == '[' || c == ']')
                .trim_matches('"')
                .to_string()
        };
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with("- apiGroups:") {
                continue;
            }
            let comment = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.starts_with('#'))
                .last()
                .unwrap_or_else(|| panic!("{file}: rule at line {} has no comment", i + 1));
            let need = comment
                .trim_start_matches('#')
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
            let resource = list(lines[i + 1], "resources:");
            let verb = list(lines[i + 2], "verbs:");
            out.insert((side.to_string(), resource, verb), need);
        }
    }
    out
}

#[test]
fn the_readme_table_and_the_manifest_comments_match_the_manifests() {
    let m = Manifests::load();
    let granted: BTreeSet<(String, String, String)> = m
        .grants()
        .iter()
        .map(|g| (g.side.to_string(), g.resource.clone(), g.verb.clone()))
        .collect();
    let table = readme_table();
    let documented: BTreeSet<_> = table.keys().cloned().collect();
    assert_eq!(
        documented, granted,
        "README RBAC table rows vs manifest rules"
    );
    assert_eq!(
        manifest_comments(),
        table,
        "the comment above each rule starts with the need the README gives it"
    );
    // Every optional row is a check the code knows how to skip, and the other way round.
    let optional: BTreeSet<_> = table
        .iter()
        .filter(|(_, need)| *need == "optional")
        .map(|((side, resource, verb), _)| (side.clone(), resource.clone(), verb.clone()))
        .collect();
    let checks: BTreeSet<_> = ALL_CHECKS
        .iter()
        .map(|c| {
            let resource = c.resource().split('.').next().unwrap().to_string();
            (
                side_name(c.side()).to_string(),
                resource,
                c.verb().to_string(),
            )
        })
        .collect();
    assert_eq!(optional, checks, "optional rows vs OptionalCheck");
}

const ALL_CHECKS: [OptionalCheck; 7] = [
    OptionalCheck::OriginDriver,
    OptionalCheck::DestinationNamespace,
    OptionalCheck::DestinationDriver,
    OptionalCheck::NamedSnapshotClass,
    OptionalCheck::RestoreStorageClass,
    OptionalCheck::WatchSnapshots(Side::Origin),
    OptionalCheck::WatchSnapshots(Side::Destination),
];

struct Env {
    east: FakeKube,
    west: FakeKube,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn env(m: &Manifests) -> Env {
    let sa = UserInfo::service_account(&m.account.namespace, &m.account.name);
    let pair = ClusterPair::start(
        FakeKube::builder()
            .rbac(m.origin.clone())
            .user(TOKEN, sa.clone()),
        FakeKube::builder().rbac(m.dest.clone()).user(TOKEN, sa),
    )
    .await
    .unwrap();
    // Seeding acts as the cluster (no RBAC): only snapshift's own requests are checked.
    pair.east.seed_standard("apps").unwrap();
    pair.west.seed_standard("dr").unwrap();
    pair.seed_db_and_web("apps").unwrap();
    let ClusterPair { east, west, .. } = pair;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        fake_kube::kubeconfig_yaml_as(
            &[(&east, "east", Some(TOKEN)), (&west, "west", Some(TOKEN))],
            "east",
        ),
    )
    .unwrap();
    Env {
        east,
        west,
        _dir: dir,
        kubeconfig,
    }
}

fn opts() -> MigrateOptions {
    MigrateOptions {
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        ..Default::default()
    }
}

async fn shift(env: &Env, opts: MigrateOptions) -> SnapShift {
    let target = |ctx: &str| ClusterTarget {
        kubeconfig: Some(env.kubeconfig.clone()),
        context: Some(ctx.to_string()),
    };
    SnapShift::new(
        connect(&target("east")).await.unwrap(),
        connect(&target("west")).await.unwrap(),
        opts,
    )
}

fn db(create_pvc: bool) -> MigrationRequest {
    let mut r = MigrationRequest::for_pvc("apps", "db");
    r.to_namespace = Some("dr".into());
    r.create_pvc = create_pvc;
    r
}

/// Every flow snapshift has, each with what must already exist and what success is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// migrate --pvc --create-pvc, from scratch.
    PvcWithRestore,
    /// The same command again: already migrated.
    Rerun,
    /// migrate --pvc --snapshot-class, without --create-pvc.
    NamedClass,
    /// migrate --pvc --create-pvc --dry-run.
    DryRun,
    /// migrate --snapshot (an existing origin snapshot) --create-pvc.
    ExistingSnapshot,
    /// migrate --selector: finding the PVCs.
    Selector,
    /// verify without names.
    VerifyAll,
    /// verify --snapshot.
    VerifyNamed,
    /// migrate --pvc with snapshots that take a while to be ready: the waits watch.
    SlowSnapshots,
    /// Re-run after someone deleted the destination snapshot: its content is re-bound.
    Rebind,
    /// A destination snapshot that never becomes ready: the run removes what it created.
    Cleanup,
}

const FLOWS: [Flow; 11] = [
    Flow::PvcWithRestore,
    Flow::Rerun,
    Flow::NamedClass,
    Flow::DryRun,
    Flow::ExistingSnapshot,
    Flow::Selector,
    Flow::VerifyAll,
    Flow::VerifyNamed,
    Flow::SlowSnapshots,
    Flow::Rebind,
    Flow::Cleanup,
];

/// How a flow ended.
#[derive(Debug)]
// The payloads are read through Debug, in failure messages.
#[allow(dead_code)]
enum Ending {
    Passed,
    /// The run failed because a call was forbidden.
    Forbidden(Error),
    /// It did not do what it should, for another reason.
    Failed(String),
}

struct Observed {
    flow: Flow,
    ending: Ending,
    skipped: Vec<SkippedCheck>,
    used: BTreeSet<Grant>,
    denied: BTreeSet<Grant>,
}

fn grant_of(side: &'static str, r: &AccessRecord) -> Grant {
    Grant {
        side,
        group: r.attributes.api_group.clone(),
        resource: r.attributes.combined_resource(),
        verb: r.attributes.verb.clone(),
    }
}

fn ending_of(result: Result<Outcome, Error>, ok: impl Fn(&Outcome) -> bool) -> Ending {
    match result {
        Ok(o) if ok(&o) => Ending::Passed,
        Ok(o) => Ending::Failed(format!("unexpected outcome {o:?}")),
        Err(e) if e.is_forbidden() => Ending::Forbidden(e),
        Err(e) => Ending::Failed(e.to_string()),
    }
}

/// Prepares `flow` with the full manifests (as snapshift itself, or as the cluster).
async fn setup(flow: Flow, env: &Env) {
    match flow {
        Flow::Rerun | Flow::VerifyAll | Flow::VerifyNamed => {
            let r = shift(env, opts()).await.migrate(&db(true)).await;
            assert!(r.result.is_ok(), "setup: {:?}", r.result);
        }
        Flow::Rebind => {
            let r = shift(env, opts()).await.migrate(&db(false)).await;
            assert!(r.result.is_ok(), "setup: {:?}", r.result);
            env.west
                .delete(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
                .unwrap();
        }
        Flow::ExistingSnapshot => {
            env.east
                .create(json!({
                    "apiVersion": SNAP, "kind": "VolumeSnapshot",
                    "metadata": {"name": "manual", "namespace": "apps"},
                    "spec": {"source": {"persistentVolumeClaimName": "web"}},
                }))
                .unwrap();
            for _ in 0..200 {
                let vs = env.east.get(SNAP, "VolumeSnapshot", "apps", "manual");
                if vs.is_some_and(|v| v["status"]["readyToUse"] == true) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Flow::Cleanup => env.west.faults().set_never_ready(true),
        Flow::PvcWithRestore
        | Flow::NamedClass
        | Flow::DryRun
        | Flow::Selector
        | Flow::SlowSnapshots => {}
    }
}

/// Lets `server`'s controllers run once a watch was made on it (or after a second, so a
/// client that may not watch still gets there by polling).
async fn release_on_watch(server: &FakeKube, from: usize) {
    let started = tokio::time::Instant::now();
    loop {
        let watched = server.access_log()[from..]
            .iter()
            .any(|r| r.attributes.verb == "watch");
        if watched || started.elapsed() > Duration::from_secs(1) {
            server.faults().set_controller_paused(false);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn report_ending(
    report: cbt_k8s::snapshift::MigrationReport,
    ok: impl Fn(&Outcome) -> bool,
) -> (Ending, Vec<SkippedCheck>) {
    (ending_of(report.result, ok), report.skipped_checks)
}

fn migrated(n: usize) -> impl Fn(&Outcome) -> bool {
    move |o| matches!(o, Outcome::Migrated { created } if created.len() == n)
}

/// Runs the part of `flow` that is measured, under whatever policy is loaded now.
async fn measured(flow: Flow, env: &Env) -> (Ending, Vec<SkippedCheck>) {
    let s = shift(env, opts()).await;
    let api_ending = |e: Error| {
        if e.is_forbidden() {
            Ending::Forbidden(e)
        } else {
            Ending::Failed(e.to_string())
        }
    };
    match flow {
        Flow::PvcWithRestore => report_ending(s.migrate(&db(true)).await, migrated(3)),
        Flow::Rerun => report_ending(s.migrate(&db(true)).await, |o| {
            matches!(o, Outcome::AlreadyMigrated)
        }),
        Flow::NamedClass => {
            let mut req = MigrationRequest::for_pvc("apps", "web");
            req.to_namespace = Some("dr".into());
            req.snapshot_class = Some("csi-snapclass".into());
            report_ending(s.migrate(&req).await, migrated(2))
        }
        Flow::DryRun => {
            let mut o = opts();
            o.dry_run = true;
            let r = shift(env, o).await.migrate(&db(true)).await;
            report_ending(r, |o| matches!(o, Outcome::DryRun(p) if p.len() == 4))
        }
        Flow::ExistingSnapshot => {
            let mut req = MigrationRequest::for_snapshot("apps", "manual");
            req.to_namespace = Some("dr".into());
            req.create_pvc = true;
            report_ending(s.migrate(&req).await, migrated(3))
        }
        Flow::Selector => {
            let ending = match s.pvcs_matching("apps", "app=db").await {
                Ok(names) if names == ["db"] => Ending::Passed,
                Ok(names) => Ending::Failed(format!("{names:?}")),
                Err(e) => api_ending(e),
            };
            (ending, Vec::new())
        }
        Flow::VerifyAll | Flow::VerifyNamed => {
            let names = match flow {
                Flow::VerifyAll => vec![],
                _ => vec!["db-snapshift".to_string()],
            };
            let ending = match s.verify("dr", &names).await {
                Ok(r) if r.len() == 1 && r[0].problems.is_empty() => Ending::Passed,
                Ok(r) => Ending::Failed(format!("{r:?}")),
                Err(e) => api_ending(e),
            };
            (ending, Vec::new())
        }
        Flow::SlowSnapshots => {
            let (east0, west0) = (env.east.access_log().len(), env.west.access_log().len());
            env.east.faults().set_controller_paused(true);
            env.west.faults().set_controller_paused(true);
            let req = db(false);
            let (report, (), ()) = tokio::join!(
                s.migrate(&req),
                release_on_watch(&env.east, east0),
                release_on_watch(&env.west, west0),
            );
            report_ending(report, migrated(2))
        }
        Flow::Rebind => report_ending(s.migrate(&db(false)).await, migrated(1)),
        Flow::Cleanup => {
            let mut o = opts();
            o.timeout = Duration::from_millis(800);
            let r = shift(env, o).await.migrate(&db(false)).await;
            let ending = match r.result {
                Err(Error::Timeout { .. }) if r.removed.len() == 2 && r.kept.is_empty() => {
                    Ending::Passed
                }
                Err(e) if e.is_forbidden() => Ending::Forbidden(e),
                other => Ending::Failed(format!(
                    "{other:?}; removed {:?}, kept {:?}",
                    r.removed, r.kept
                )),
            };
            (ending, r.skipped_checks)
        }
    }
}

/// Sets `flow` up under the full manifests, then runs it under `m`, recording which grants
/// its requests used and which were denied.
async fn observe(flow: Flow, full: &Manifests, m: &Manifests) -> Observed {
    let env = env(full).await;
    setup(flow, &env).await;
    let (east0, west0) = (env.east.access_log().len(), env.west.access_log().len());
    env.east.set_rbac(Some(m.origin.clone()));
    env.west.set_rbac(Some(m.dest.clone()));
    let (ending, skipped) = measured(flow, &env).await;
    let mut used = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for (side, log) in [
        ("origin", &env.east.access_log()[east0..]),
        ("destination", &env.west.access_log()[west0..]),
    ] {
        for r in log {
            let g = grant_of(side, r);
            if r.allowed {
                used.insert(g);
            } else {
                denied.insert(g);
            }
        }
    }
    Observed {
        flow,
        ending,
        skipped,
        used,
        denied,
    }
}

async fn observe_all(flows: &[Flow], full: &Manifests, m: &Manifests) -> Vec<Observed> {
    futures::stream::iter(flows.iter().copied())
        .map(|f| observe(f, full, m))
        .buffer_unordered(4)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flow_works_with_exactly_the_granted_rights() {
    let m = Manifests::load();
    let observed = observe_all(&FLOWS, &m, &m).await;
    let mut used = BTreeSet::new();
    for o in &observed {
        assert!(
            matches!(o.ending, Ending::Passed),
            "{:?} under the example manifests: {:?}",
            o.flow,
            o.ending
        );
        assert!(
            o.denied.is_empty(),
            "{:?} made requests the manifests do not grant: {:?}",
            o.flow,
            o.denied
        );
        assert!(
            o.skipped.is_empty(),
            "{:?} skipped checks: {:?}",
            o.flow,
            o.skipped
        );
        used.extend(o.used.iter().cloned());
    }
    let granted: BTreeSet<Grant> = m.grants().into_iter().collect();
    let unused: Vec<String> = granted.difference(&used).map(ToString::to_string).collect();
    assert!(
        unused.is_empty(),
        "granted but used by no flow (remove from the manifests and the README): {unused:?}"
    );
    assert_eq!(used, granted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_any_rule_has_the_effect_the_readme_states() {
    let full = Manifests::load();
    let table = readme_table();
    let baseline = observe_all(&FLOWS, &full, &full).await;
    let mut problems = Vec::new();
    for g in full.grants() {
        let need = table
            .get(&(g.side.to_string(), g.resource.clone(), g.verb.clone()))
            .unwrap_or_else(|| panic!("{g} is not in the README table"));
        let affected: Vec<Flow> = baseline
            .iter()
            .filter(|o| o.used.contains(&g))
            .map(|o| o.flow)
            .collect();
        let reduced = full.without(&g);
        let runs = observe_all(&affected, &full, &reduced).await;
        for r in &runs {
            if let Some(other) = r.denied.iter().find(|d| **d != g) {
                problems.push(format!("{g}: {:?} was also denied {other}", r.flow));
            }
        }
        let skipped_it = |r: &Observed| {
            r.skipped.iter().any(|s| {
                side_name(s.check.side()) == g.side
                    && s.check.verb() == g.verb
                    && s.check.resource().split('.').next() == Some(g.resource.as_str())
            })
        };
        match need.as_str() {
            "optional" => {
                // Degrades: a flow refused it goes on with a skipped check, never fails with 403
                // (a flow that cannot do without it, like --dry-run of a new snapshot without the
                // origin StorageClass, still reports why).
                for r in runs.iter().filter(|r| r.denied.contains(&g)) {
                    if matches!(r.ending, Ending::Forbidden(_)) || !skipped_it(r) {
                        problems.push(format!(
                            "optional {g}: {:?} should go on with a skipped check, got {:?} (skipped {:?})",
                            r.flow, r.ending, r.skipped
                        ));
                    }
                }
                if !runs.iter().any(|r| {
                    r.denied.contains(&g) && matches!(r.ending, Ending::Passed) && skipped_it(r)
                }) {
                    problems.push(format!(
                        "optional {g}: no flow was refused it and passed with a warning"
                    ));
                }
            }
            "required" | "recovery" => {
                if !runs
                    .iter()
                    .any(|r| matches!(r.ending, Ending::Forbidden(_)) && r.denied.contains(&g))
                {
                    problems.push(format!(
                        "{need} {g}: no flow fails with 403 without it: {:?}",
                        runs.iter().map(|r| (r.flow, &r.ending)).collect::<Vec<_>>()
                    ));
                }
            }
            "cleanup" => {
                if !runs
                    .iter()
                    .any(|r| matches!(r.ending, Ending::Failed(_)) && r.denied.contains(&g))
                {
                    problems.push(format!("cleanup {g}: cleanup still complete without it"));
                }
            }
            other => problems.push(format!("{g}: unknown need {other}")),
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
