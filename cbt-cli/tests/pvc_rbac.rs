//! `cbt backup --pvc` and `cbt restore --to-pvc` under the least-privilege RBAC of
//! `examples/kubernetes/`: the manifests are read from disk at test time and loaded into the fake
//! API server's authorizer, the orchestrator's kubeconfig token authenticates as the example's
//! `cbt-backup` ServiceAccount, and the commands run are the ones in the example CronJob and
//! restore Job (only the repository URL, S3 endpoint and kubeconfig differ: the test's servers).
//!
//! `rbac-group.yaml` extends `rbac.yaml` for `--group` (`cronjob-group.yaml`); the policy loaded
//! is the two together, and the group CronJob's command runs under it.
//!
//! Proves the manifests complete (no request of any flow is denied), minimal (every grant is
//! used by some flow), and the mover's grant exactly what the metadata sidecar's
//! SubjectAccessReview asks for (without it the backup fails with a permission error; the mover
//! itself never calls the API). A new API call without a manifest change, or a grant nothing
//! uses, fails here.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cbt_csi::server::RunningServer;
use cbt_store::testing::S3TestServer;
use fake_kube::rbac::{Policy, RequestAttributes, UserInfo};
use fake_kube::{AccessRecord, FakeKube, SharedBackend};
use serde_json::Value;
use support::{DRIVER, sms};

const MIB: u64 = 1 << 20;
const AUDIENCE: &str = "cbt-rbac";
/// The bearer token the orchestrator's kubeconfig carries; fake-kube maps it to `cbt-backup`.
const TOKEN: &str = "cbt-backup-sa-token";
const ORCHESTRATOR: &str = "cbt-backup";
const MOVER: &str = "cbt-mover";
const SNAPSHOT_PLACEHOLDER: &str = "REPLACE-WITH-SNAPSHOT-NAME";
/// The RBAC manifests of the example, in the order `kubectl apply` would take them.
const RBAC_FILES: [&str; 2] = [
    "examples/kubernetes/rbac.yaml",
    "examples/kubernetes/rbac-group.yaml",
];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&read(rel)).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn yaml_doc(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel} holds one object");
    docs.remove(0)
}

/// One verb on one resource, namespaced (granted by a Role in the app namespace) or cluster
/// (granted by a ClusterRole through a ClusterRoleBinding): the unit the manifests grant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    scope: &'static str,
    group: String,
    resource: String,
    verb: String,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(
            f,
            "{} {} {} ({group})",
            self.scope, self.verb, self.resource
        )
    }
}

impl Grant {
    fn of(r: &AccessRecord) -> Self {
        let a = &r.attributes;
        Self {
            scope: if a.namespace.is_empty() {
                "cluster"
            } else {
                "namespace"
            },
            group: a.api_group.clone(),
            resource: a.combined_resource(),
            verb: a.verb.clone(),
        }
    }
}

/// The example manifests as the test uses them.
struct Example {
    policy: Policy,
    namespace: String,
    /// Namespace and ServiceAccount objects, created in the fake cluster as `kubectl apply` would.
    objects: Vec<Value>,
    cronjob: Value,
    /// The `--group` CronJob (cronjob-group.yaml).
    group_cronjob: Value,
    restore_job: Value,
    secret: Value,
}

impl Example {
    fn load() -> Self {
        let all_rbac: Vec<String> = RBAC_FILES.iter().map(|f| read(f)).collect();
        let policy = Policy::from_yaml(&all_rbac.join("\n---\n")).unwrap();
        let ns_obj = yaml_doc("examples/kubernetes/namespace.yaml");
        assert_eq!(ns_obj["kind"], "Namespace");
        let namespace = ns_obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut objects = vec![ns_obj];
        for doc in RBAC_FILES.iter().flat_map(|f| yaml_docs(f)) {
            if doc["kind"] == "ServiceAccount" {
                assert_eq!(doc["metadata"]["namespace"], namespace.as_str());
                objects.push(doc);
            }
        }
        let accounts: BTreeSet<&str> = policy
            .service_accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(accounts, BTreeSet::from([ORCHESTRATOR, MOVER]));
        Self {
            policy,
            namespace,
            objects,
            cronjob: yaml_doc("examples/kubernetes/cronjob.yaml"),
            group_cronjob: yaml_doc("examples/kubernetes/cronjob-group.yaml"),
            restore_job: yaml_doc("examples/kubernetes/restore-job.yaml"),
            secret: yaml_doc("examples/kubernetes/s3-secret.example.yaml"),
        }
    }

    fn user(&self, account: &str) -> UserInfo {
        UserInfo::service_account(&self.namespace, account)
    }

    /// Every grant bound to `account`, checking the shape rbac.yaml promises: one group,
    /// resource and verb per rule, no wildcards, no names.
    fn grants(&self, account: &str) -> Vec<Grant> {
        let user = self.user(account);
        let mut out = Vec::new();
        for binding in &self.policy.bindings {
            let subject_is_user = binding.subjects.iter().any(|s| {
                s.name == account
                    && s.namespace.as_deref().or(binding.namespace.as_deref())
                        == Some(self.namespace.as_str())
            });
            if !subject_is_user {
                continue;
            }
            let scope = match &binding.namespace {
                Some(ns) => {
                    assert_eq!(ns, &self.namespace, "bindings only in the app namespace");
                    "namespace"
                }
                None => "cluster",
            };
            let role_ns = if binding.cluster_role {
                None
            } else {
                binding.namespace.as_deref()
            };
            let role = self
                .policy
                .roles
                .iter()
                .find(|r| r.name == binding.role && r.namespace.as_deref() == role_ns)
                .unwrap_or_else(|| panic!("binding {} names a missing role", binding.name));
            for rule in &role.rules {
                let (group, resource, verb) = rule.single_grant().unwrap_or_else(|| {
                    panic!(
                        "{}: one group, resource and verb per rule, no wildcards, no names: {rule:?}",
                        role.name
                    )
                });
                out.push(Grant {
                    scope,
                    group: group.into(),
                    resource: resource.into(),
                    verb: verb.into(),
                });
            }
        }
        let unique: BTreeSet<&Grant> = out.iter().collect();
        assert_eq!(unique.len(), out.len(), "no grant twice for {account}");
        assert!(
            out.iter().all(|g| self.policy.allows(
                &user,
                &RequestAttributes::resource(
                    &g.verb,
                    &g.group,
                    &g.resource,
                    if g.scope == "namespace" {
                        &self.namespace
                    } else {
                        ""
                    },
                    "x"
                )
            )),
            "every rule listed is effective for {account}"
        );
        out
    }

    /// The policy without the mover's rule(s).
    fn without_mover_rights(&self) -> Policy {
        let mut p = self.policy.clone();
        p.bindings.retain(|b| {
            !b.subjects
                .iter()
                .any(|s| s.name == MOVER && s.namespace.as_deref() == Some(&self.namespace))
        });
        p
    }
}

/// The pod spec of a Job or CronJob.
fn pod_spec(obj: &Value) -> &Value {
    match obj["kind"].as_str() {
        Some("CronJob") => &obj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &obj["spec"]["template"]["spec"],
    }
}

/// The container's `command` after `cbt`.
fn cbt_args(obj: &Value) -> Vec<String> {
    let containers = pod_spec(obj)["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let command: Vec<String> = containers[0]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[0], "cbt", "the image puts cbt on PATH");
    command[1..].to_vec()
}

/// The value following `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} in {args:?}"));
    &args[i + 1]
}

/// `args` with the value following `name` replaced.
fn with_flag(mut args: Vec<String>, name: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == name).unwrap();
    args[i + 1] = value.to_string();
    args
}

struct Env {
    t: tempfile::TempDir,
    kube: FakeKube,
    s3: S3TestServer,
    _sidecar: RunningServer,
    /// The orchestrator's kubeconfig: the cbt-backup ServiceAccount's token.
    kubeconfig: PathBuf,
    repo: String,
}

impl Env {
    async fn start(ex: &Example) -> Self {
        let t = tempfile::tempdir().unwrap();
        let backend = SharedBackend::with_data_dir(t.path().join("array")).unwrap();
        let mut builder = FakeKube::builder()
            .driver(DRIVER)
            .backend(backend)
            .serve(sms())
            .group_snapshot_api()
            .rbac(ex.policy.clone())
            .user(TOKEN, ex.user(ORCHESTRATOR));
        // The images the examples name all run this build of cbt.
        for obj in [&ex.cronjob, &ex.group_cronjob, &ex.restore_job] {
            let args = cbt_args(obj);
            builder = builder.image(flag(&args, "--image"), env!("CARGO_BIN_EXE_cbt"));
        }
        let kube = builder.start().await.unwrap();
        // What `kubectl apply -f namespace.yaml -f rbac.yaml` creates besides RBAC (the
        // authorizer holds that), and what the cluster has: a CSI driver with classes.
        for obj in &ex.objects {
            kube.create(obj.clone()).unwrap();
        }
        kube.seed_csidriver(DRIVER).unwrap();
        kube.seed_storage_class("csi-hostpath-sc", DRIVER, true)
            .unwrap();
        kube.seed_snapshot_class("csi-snapclass", DRIVER, true)
            .unwrap();
        kube.seed_group_snapshot_class("csi-group", DRIVER, true)
            .unwrap();
        let admin_kubeconfig = t.path().join("admin-kubeconfig");
        kube.write_kubeconfig(&admin_kubeconfig, "admin").unwrap();
        let kubeconfig = t.path().join("kubeconfig");
        kube.write_kubeconfig_as(&kubeconfig, "cbt-backup", TOKEN)
            .unwrap();

        // The repository, and the Secret of the example with the test server's credentials.
        let s3 = support::s3_server().await;
        let creds = support::s3_credentials(&s3);
        let mut secret = ex.secret.clone();
        for (k, v) in &creds {
            assert!(
                secret["stringData"].get(k).is_some(),
                "s3-secret.example.yaml has key {k}"
            );
            secret["stringData"][k] = v.clone();
        }
        kube.create(secret).unwrap();

        // The metadata sidecar with an administrator's client, as in pvc_e2e.rs: its
        // SubjectAccessReview for the mover's token is answered from the example policy.
        let sidecar = support::start_sidecar(&kube, &admin_kubeconfig, AUDIENCE).await;
        support::register_sidecar(&kube, &sidecar, AUDIENCE);
        Env {
            t,
            kube,
            repo: "s3://backups/cluster-a".into(),
            s3,
            _sidecar: sidecar,
            kubeconfig,
        }
    }

    /// Runs `cbt` with `args` as a pod would (S3 credentials in the environment), against the
    /// test's repository and S3 server, with the orchestrator's kubeconfig.
    async fn cbt(&self, args: &[String]) -> std::process::Output {
        let mut args = args.to_vec();
        if args.iter().any(|a| a == "--repo") {
            args = with_flag(args, "--repo", &self.repo);
            args = with_flag(args, "--s3-endpoint", &self.s3.endpoint());
        } else {
            args.extend(["--repo".into(), self.repo.clone()]);
            args.extend(["--s3-endpoint".into(), self.s3.endpoint()]);
        }
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cbt"));
        cmd.args(&args);
        cmd.env_remove("CBT_REPO")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST");
        for (k, v) in self.s3.env() {
            cmd.env(k, v);
        }
        cmd.output().await.unwrap()
    }

    async fn ok(&self, args: &[String]) -> Value {
        support::succeeded(&format!("cbt {args:?}"), &self.cbt(args).await)
    }

    /// Example args plus the orchestrator's kubeconfig (in a pod: the mounted token).
    fn in_cluster(&self, args: Vec<String>) -> Vec<String> {
        let mut args = args;
        args.extend([
            "--kubeconfig".to_string(),
            self.kubeconfig.to_str().unwrap().to_string(),
        ]);
        args
    }

    fn write(&self, ns: &str, pvc: &str, offset: u64, byte: u8, len: usize) {
        let path = self.kube.pvc_backing_file(ns, pvc).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&vec![byte; len], offset).unwrap();
    }
}

/// Lets the controllers run again once a watch was made (or after 5 s, so a client that does
/// not watch still gets there by polling and the test fails on the unused grant instead).
async fn release_on_watch(kube: &FakeKube, from: usize) {
    let started = tokio::time::Instant::now();
    loop {
        let watched = kube.access_log()[from..]
            .iter()
            .any(|r| r.attributes.verb == "watch");
        if watched || started.elapsed() > std::time::Duration::from_secs(5) {
            kube.faults().set_controller_paused(false);
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `(identity, scope, resource, verb) -> need` from the README's RBAC table.
fn readme_table() -> BTreeMap<(String, String, String, String), String> {
    let readme = read("README.md");
    let start = readme
        .find("<!-- cbt-rbac-table")
        .expect("README has the cbt RBAC table marker");
    let mut rows = BTreeMap::new();
    for line in readme[start..].lines().skip(3) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [identity, scope, resource, verb, need, ..] = cells.as_slice() else {
            panic!("malformed RBAC table row: {line}");
        };
        let key = (
            identity.to_string(),
            scope.to_string(),
            resource.to_string(),
            verb.to_string(),
        );
        assert!(
            rows.insert(key, need.to_string()).is_none(),
            "row twice: {line}"
        );
    }
    rows
}

/// The same key -> the first word of the comment above each rule of the RBAC files (its need).
/// The identity is the account the rule's Role or ClusterRole is bound to.
fn manifest_comments(ex: &Example) -> BTreeMap<(String, String, String, String), String> {
    let mut out = BTreeMap::new();
    for file in RBAC_FILES {
        for ((role, scope, resource, verb), need) in file_comments(file) {
            let accounts: BTreeSet<&str> = ex
                .policy
                .bindings
                .iter()
                .filter(|b| b.role == role && b.cluster_role == (scope == "cluster"))
                .flat_map(|b| b.subjects.iter().map(|s| s.name.as_str()))
                .collect();
            let [account] = accounts.into_iter().collect::<Vec<_>>()[..] else {
                panic!("{file}: role {role} is bound to exactly one account");
            };
            let key = (account.to_string(), scope, resource, verb);
            assert!(
                out.insert(key.clone(), need).is_none(),
                "{key:?} twice in the RBAC files"
            );
        }
    }
    out
}

/// `(role, scope, resource, verb) -> need` of one file.
fn file_comments(file: &str) -> BTreeMap<(String, String, String, String), String> {
    let text = read(file);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let value = |line: &str, key: &str| -> String {
        line.strip_prefix(key)
            .unwrap_or_else(|| panic!("{file}: expected {key} in {line:?}"))
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .trim_matches('"')
            .to_string()
    };
    let mut out = BTreeMap::new();
    let (mut scope, mut role) = ("", String::new());
    for (i, line) in lines.iter().enumerate() {
        match *line {
            "kind: Role" => scope = "namespace",
            "kind: ClusterRole" => scope = "cluster",
            l if l.starts_with("kind: ") => scope = "",
            _ => {}
        }
        if *line == "metadata:" && !scope.is_empty() {
            role = value(lines[i + 1], "name:");
        }
        if !line.starts_with("- apiGroups:") {
            continue;
        }
        let comment = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.starts_with('#'))
            .last()
            .unwrap_or_else(|| panic!("{file}: the rule at line {} has no comment", i + 1));
        let need = comment
            .trim_start_matches('#')
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let key = (
            role.clone(),
            scope.to_string(),
            value(lines[i + 1], "resources:"),
            value(lines[i + 2], "verbs:"),
        );
        out.insert(key, need);
    }
    out
}

#[test]
fn the_readme_table_and_the_manifest_comments_match_the_rules() {
    let ex = Example::load();
    let mut granted = BTreeSet::new();
    for account in [ORCHESTRATOR, MOVER] {
        for g in ex.grants(account) {
            granted.insert((account.to_string(), g.scope.to_string(), g.resource, g.verb));
        }
    }
    let table = readme_table();
    let documented: BTreeSet<_> = table.keys().cloned().collect();
    assert_eq!(
        documented, granted,
        "README RBAC table rows vs rbac.yaml rules"
    );
    for need in table.values() {
        assert!(
            ["required", "optional", "cleanup"].contains(&need.as_str()),
            "unknown need {need:?}"
        );
    }
    assert_eq!(
        manifest_comments(&ex),
        table,
        "the comment above each rule starts with the need the README gives it"
    );
}

#[test]
fn the_example_jobs_run_as_the_example_identity_with_the_example_secret() {
    let ex = Example::load();
    let secret_name = ex.secret["metadata"]["name"].as_str().unwrap();
    assert_eq!(ex.secret["metadata"]["namespace"], ex.namespace.as_str());
    let keys: BTreeSet<&str> = ex.secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    );
    let mut images = BTreeSet::new();
    for obj in [&ex.cronjob, &ex.group_cronjob, &ex.restore_job] {
        let kind = obj["kind"].as_str().unwrap();
        assert_eq!(
            obj["metadata"]["namespace"],
            ex.namespace.as_str(),
            "{kind}"
        );
        let pod = pod_spec(obj);
        assert_eq!(pod["serviceAccountName"], ORCHESTRATOR, "{kind}");
        let args = cbt_args(obj);
        assert_eq!(flag(&args, "-n"), ex.namespace, "{kind}: -n");
        assert_eq!(flag(&args, "--s3-secret"), secret_name, "{kind}");
        assert!(
            !args.iter().any(|a| a == "--service-account"),
            "{kind}: the mover runs as the default, {MOVER}"
        );
        images.insert(flag(&args, "--image").to_string());
        // The orchestrator opens the repository with the same Secret, by reference.
        let env = pod["containers"][0]["env"].as_array().unwrap();
        let mut required = BTreeSet::new();
        for e in env {
            let r = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(r["name"], secret_name, "{kind}: {e}");
            assert_eq!(
                e["name"], r["key"],
                "{kind}: the AWS variable of the same name"
            );
            if r["optional"] != true {
                required.insert(r["key"].as_str().unwrap());
            }
        }
        assert_eq!(
            required, keys,
            "{kind}: required keys are in the example Secret"
        );
    }
    assert_eq!(images.len(), 1, "one mover image: {images:?}");
    let schedule = &ex.cronjob["spec"];
    assert_eq!(schedule["concurrencyPolicy"], "Forbid");
    let args = cbt_args(&ex.cronjob);
    assert_eq!(args[0], "backup");
    assert!(
        args.iter().any(|a| a == "--selector"),
        "the CronJob backs up a labelled set"
    );
    assert_eq!(cbt_args(&ex.restore_job)[0], "restore");
    let group = cbt_args(&ex.group_cronjob);
    assert_eq!(group[0], "backup");
    assert!(
        group.iter().any(|a| a == "--group") && group.iter().any(|a| a == "--selector"),
        "the group CronJob cuts a labelled set at once: {group:?}"
    );
    assert_eq!(ex.group_cronjob["spec"]["concurrencyPolicy"], "Forbid");
    assert_ne!(
        ex.group_cronjob["metadata"]["name"], ex.cronjob["metadata"]["name"],
        "both CronJobs can be applied together"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_flow_works_with_exactly_the_example_rights_and_the_mover_needs_its_rule() {
    let ex = Example::load();
    let env = Env::start(&ex).await;
    let ns = ex.namespace.clone();
    let selector = flag(&cbt_args(&ex.cronjob), "--selector").to_string();
    let (label, value) = selector.split_once('=').unwrap();
    env.ok(&strings(&["repo", "init", "--chunk-size", "256K"]))
        .await;
    env.kube
        .seed_pvc(
            &ns,
            "data",
            "32Mi",
            "Block",
            &["ReadWriteOnce"],
            &[(label, value)],
        )
        .unwrap();
    // Not labelled: the CronJob leaves it alone.
    env.kube
        .seed_pvc(&ns, "scratch", "8Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    env.write(&ns, "data", 0, 1, 3 * MIB as usize);

    // Dry runs: what `cbt backup --pvc --dry-run` reads (with and without a named class).
    let image = flag(&cbt_args(&ex.cronjob), "--image").to_string();
    let base = strings(&[
        "backup",
        "--pvc",
        "data",
        "-n",
        &ns,
        "--dry-run",
        "--image",
        &image,
    ]);
    let dry = env.ok(&env.in_cluster(base.clone())).await;
    assert!(dry.is_null(), "YAML, not JSON");
    let mut named = base.clone();
    named.extend(strings(&["--snapshot-class", "csi-snapclass"]));
    env.ok(&env.in_cluster(named)).await;

    // The CronJob's command: a full backup, then (after a change) an incremental that also
    // deletes the first run's snapshot.
    let cron = env.in_cluster(cbt_args(&ex.cronjob));
    // The snapshot controller is held until cbt watches the new snapshot: a real snapshot
    // takes a while, and the optional watch rule must be exercised, not skipped by luck.
    let from = env.kube.access_log().len();
    env.kube.faults().set_controller_paused(true);
    let (first, ()) = tokio::join!(env.ok(&cron), release_on_watch(&env.kube, from));
    let results = first["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "only the labelled PVC: {first:#}");
    assert_eq!(results[0]["pvc"], "data");
    assert_eq!(
        results[0]["report"]["mover"]["metadata_call"],
        "GetMetadataAllocated"
    );
    env.write(&ns, "data", 5 * MIB, 9, 64 * 1024);
    // Runs are named by the second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = env.ok(&cron).await;
    let report = &second["results"][0]["report"];
    assert_eq!(
        report["mover"]["metadata_call"], "GetMetadataDelta",
        "{second:#}"
    );
    assert_eq!(report["deleted_snapshots"].as_array().unwrap().len(), 1);
    let snapshot = report["mover"]["snapshot"].as_str().unwrap().to_string();

    // The restore Job's command with a real snapshot name, and its dry run.
    let restore = cbt_args(&ex.restore_job);
    assert_eq!(
        flag(&restore, "--volume"),
        format!("{ns}.data"),
        "the example restores the PVC the CronJob backs up"
    );
    let restore = env.in_cluster(with_flag(restore.clone(), "--snapshot", &snapshot));
    assert!(read("examples/kubernetes/restore-job.yaml").contains(SNAPSHOT_PLACEHOLDER));
    let mut dry = restore.clone();
    dry.push("--dry-run".into());
    env.ok(&dry).await;
    let restored = env.ok(&restore).await;
    assert!(restored["mover"]["chunks_verified"].as_u64().unwrap() > 0);
    let target = flag(&restore, "--to-pvc").to_string();
    assert_eq!(
        std::fs::read(env.kube.pvc_backing_file(&ns, &target).unwrap()).unwrap(),
        std::fs::read(env.kube.pvc_backing_file(&ns, "data").unwrap()).unwrap()
    );
    let denied = env.kube.denied();
    assert!(
        denied.is_empty(),
        "requests the manifests do not grant: {denied:#?}"
    );

    // The group CronJob's command: a PostgreSQL-like set cut at one instant, twice (full, then
    // incremental with the first group deleted by retention), with rbac-group.yaml's rules.
    let group_cron = env.in_cluster(cbt_args(&ex.group_cronjob));
    let group_selector = flag(&group_cron, "--selector").to_string();
    let (glabel, gvalue) = group_selector.split_once('=').unwrap();
    for (pvc, size) in [("pg-data", "16Mi"), ("pg-wal", "8Mi"), ("pg-conf", "4Mi")] {
        env.kube
            .seed_pvc(
                &ns,
                pvc,
                size,
                "Block",
                &["ReadWriteOnce"],
                &[(glabel, gvalue)],
            )
            .unwrap();
    }
    env.write(&ns, "pg-data", 0, 4, 2 * MIB as usize);
    env.write(&ns, "pg-wal", 0, 5, MIB as usize);
    let from = env.kube.access_log().len();
    env.kube.faults().set_controller_paused(true);
    let (gfirst, ()) = tokio::join!(env.ok(&group_cron), release_on_watch(&env.kube, from));
    let members = gfirst["results"].as_array().unwrap();
    assert_eq!(members.len(), 3, "the labelled set only: {gfirst:#}");
    assert!(members.iter().all(|m| m["ok"] == true), "{gfirst:#}");
    env.write(&ns, "pg-wal", 2 * MIB, 6, 64 * 1024);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let gsecond = env.ok(&group_cron).await;
    let wal = gsecond["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["pvc"] == "pg-wal")
        .unwrap();
    assert_eq!(
        wal["report"]["mover"]["metadata_call"], "GetMetadataDelta",
        "{gsecond:#}"
    );
    assert_eq!(
        gsecond["group"]["deleted_groups"].as_array().map(Vec::len),
        Some(1),
        "retention deleted the first group: {gsecond:#}"
    );
    let denied = env.kube.denied();
    assert!(
        denied.is_empty(),
        "requests the manifests do not grant: {denied:#?}"
    );

    // The mover's rule, removed: the sidecar's SubjectAccessReview for the mover's token is
    // refused, the mover fails with the permission error, and the orchestrator reports it
    // (with the mover's log) and cleans up, all within its own rights.
    assert!(ex.policy.allows(
        &ex.user(MOVER),
        &RequestAttributes::resource("get", "snapshot.storage.k8s.io", "volumesnapshots", &ns, "")
    ));
    env.kube.set_rbac(Some(ex.without_mover_rights()));
    env.write(&ns, "data", 9 * MIB, 7, 64 * 1024);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let out = env.cbt(&cron).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    // A permission problem is the user's to fix: the configuration class (exit 5), not a
    // transient failure that a retry would cure.
    assert_eq!(out.status.code(), Some(5), "{doc:#}");
    assert_eq!(doc["results"][0]["error"]["class"], "config", "{doc:#}");
    let error = doc["results"][0]["error"].to_string();
    assert!(
        error.contains(&format!(
            "system:serviceaccount:{ns}:{MOVER} may not get volumesnapshots in namespace {ns}"
        )),
        "{doc:#}"
    );
    assert!(
        env.kube
            .list("batch/v1", "Job")
            .iter()
            .all(|j| j["metadata"]["namespace"] != ns.as_str()),
        "the failed run's Job was deleted"
    );
    env.kube.set_rbac(Some(ex.policy.clone()));

    // Complete: nothing was denied. Minimal: every grant of the orchestrator was used.
    let log = env.kube.access_log();
    let denied: Vec<&AccessRecord> = log.iter().filter(|r| !r.allowed).collect();
    assert!(
        denied.is_empty(),
        "requests the manifests do not grant: {denied:#?}"
    );
    let orchestrator = ex.user(ORCHESTRATOR).name;
    let used: BTreeSet<Grant> = log
        .iter()
        .filter(|r| r.user == orchestrator)
        .map(Grant::of)
        .collect();
    let granted: BTreeSet<Grant> = ex.grants(ORCHESTRATOR).into_iter().collect();
    let unused: Vec<String> = granted.difference(&used).map(ToString::to_string).collect();
    assert!(
        unused.is_empty(),
        "granted in the RBAC files but used by no flow (remove the rule): {unused:?}"
    );
    let ungranted: Vec<String> = used.difference(&granted).map(ToString::to_string).collect();
    assert!(ungranted.is_empty(), "used but not granted: {ungranted:?}");

    // The mover never calls the API: its only right is the one the sidecar checks for it.
    let mover = ex.user(MOVER).name;
    assert!(log.iter().all(|r| r.user != mover));
    assert_eq!(
        ex.grants(MOVER),
        [Grant {
            scope: "namespace",
            group: "snapshot.storage.k8s.io".into(),
            resource: "volumesnapshots".into(),
            verb: "get".into(),
        }]
    );
    drop(env.t);
}
