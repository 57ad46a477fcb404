//! The simulated Job controller and the garbage collector for job pods.
//!
//! A Job gets its selector and pod labels (`batch.kubernetes.io/controller-uid`,
//! `batch.kubernetes.io/job-name` and the legacy `controller-uid`/`job-name`), then pods named
//! `<job>-<5 random chars>` from its template, owned by the Job. Each failed pod is replaced by
//! a new one after an exponential back-off (base configurable, real clusters use 10 s) until
//! `backoffLimit + 1` pods failed (condition Failed, reason BackoffLimitExceeded); a pod that
//! succeeds completes the Job; `activeDeadlineSeconds` past `startTime` fails it with reason
//! DeadlineExceeded. Failing a Job deletes its active pods, which makes the kubelet kill them.
//!
//! Deleting a Job: the API's default for batch/v1 Jobs is to orphan its pods (their
//! ownerReferences are removed); with `propagationPolicy` Background or Foreground the
//! collector deletes pods whose owning Job is gone. Foreground is collected like Background
//! (the Job does not wait, terminating, for its pods).
//!
//! Not simulated: parallelism or completions above 1 in a meaningful way (counts are honoured,
//! but pods are created one batch at a time), Indexed completion, podFailurePolicy,
//! successPolicy, suspend beyond "create no pods", ttlSecondsAfterFinished, pod tracking
//! finalizers.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::State;
use crate::kinds::{JOBS, PODS, SERVICE_ACCOUNTS, pod_forbidden_missing_sa, record_event};
use crate::store::{ResourceType, Selector, Store};
use crate::values::{rfc3339_now, unix_nanos_now};

/// Longest back-off between pod retries (the real controller's cap).
const MAX_BACKOFF: Duration = Duration::from_secs(360);

/// Back-off bookkeeping of the Job controller.
pub(crate) struct JobController {
    backoff_base: Duration,
    /// Per job uid: failures already seen, and when the next pod may be created.
    retry: Mutex<BTreeMap<String, (i64, Instant)>>,
}

impl JobController {
    /// A controller whose retry delay after the n-th failure is `base * 2^(n-1)`.
    pub(crate) fn new(backoff_base: Duration) -> Self {
        Self {
            backoff_base,
            retry: Mutex::new(BTreeMap::new()),
        }
    }

    fn retry(&self) -> MutexGuard<'_, BTreeMap<String, (i64, Instant)>> {
        self.retry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if a pod may be created now; records newly seen failures.
    fn may_create(&self, job_uid: &str, failed: i64) -> bool {
        let now = Instant::now();
        let mut retry = self.retry();
        let entry = retry.entry(job_uid.to_string()).or_insert((0, now));
        if failed > entry.0 {
            let exp = u32::try_from(failed - 1).unwrap_or(u32::MAX).min(20);
            let delay = self
                .backoff_base
                .saturating_mul(1u32 << exp)
                .min(MAX_BACKOFF);
            *entry = (failed, now + delay);
        }
        now >= entry.1
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|x| !x.is_empty())
}

/// Unix seconds of an RFC 3339 UTC timestamp as metav1.Time writes it (`...Z`, optional fraction).
pub(crate) fn parse_rfc3339(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant), the inverse of the date arithmetic behind
    // `cbt_core::Timestamp::to_rfc3339`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn now_secs() -> i64 {
    unix_nanos_now().div_euclid(1_000_000_000)
}

/// True if `pod` names the job with uid `uid` as an owner.
fn owned_by(pod: &Value, uid: &str) -> bool {
    pod["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
}

fn condition(ty: &str, reason: &str, message: &str, now: &str) -> Value {
    json!({"type": ty, "status": "True", "reason": reason, "message": message,
           "lastProbeTime": now, "lastTransitionTime": now})
}

fn finished(job: &Value) -> bool {
    job["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
    })
}

/// Runs the Job controller and the job-pod garbage collector once; true if anything changed.
pub(crate) fn reconcile(state: &State, store: &mut Store) -> bool {
    let mut changed = collect_garbage(store);
    let jobs = store.list(&JOBS, None, &Selector::default());
    // Forget the back-off of jobs that are gone.
    let live: std::collections::BTreeSet<&str> = jobs
        .iter()
        .filter_map(|j| j["metadata"]["uid"].as_str())
        .collect();
    state
        .kubelet
        .jobs
        .retry()
        .retain(|uid, _| live.contains(uid.as_str()));
    for job in &jobs {
        changed |= sync_job(state, store, job);
    }
    changed
}

/// Deletes pods whose owning Job is gone (Background/Foreground deletion).
fn collect_garbage(store: &mut Store) -> bool {
    let mut changed = false;
    for pod in store.list(&PODS, None, &Selector::default()) {
        let ns = s(&pod, &["metadata", "namespace"])
            .unwrap_or("")
            .to_string();
        let name = s(&pod, &["metadata", "name"]).unwrap_or("").to_string();
        let Some(refs) = pod["metadata"]["ownerReferences"].as_array() else {
            continue;
        };
        let job_refs: Vec<&Value> = refs.iter().filter(|r| r["kind"] == "Job").collect();
        if job_refs.is_empty() {
            continue;
        }
        let owner_alive = job_refs.iter().any(|r| {
            store
                .get(&JOBS, &ns, r["name"].as_str().unwrap_or(""))
                .ok()
                .is_some_and(|j| j["metadata"]["uid"] == r["uid"])
        });
        if !owner_alive {
            changed |= store.delete(&PODS, &ns, &name, false).is_ok();
        }
    }
    changed
}

fn sync_job(state: &State, store: &mut Store, job: &Value) -> bool {
    let (Some(ns), Some(name), Some(uid)) = (
        s(job, &["metadata", "namespace"]).map(str::to_string),
        s(job, &["metadata", "name"]).map(str::to_string),
        s(job, &["metadata", "uid"]).map(str::to_string),
    ) else {
        return false;
    };
    if job["metadata"].get("deletionTimestamp").is_some() || finished(job) {
        return false;
    }
    let mut changed = false;
    if job["spec"]["selector"].is_null() {
        // What the API server's Job strategy does on create: a generated selector and labels.
        changed |= store.controller_update(&JOBS, &ns, &name, |o| {
            let labels = [
                ("batch.kubernetes.io/controller-uid", uid.as_str()),
                ("batch.kubernetes.io/job-name", name.as_str()),
                ("controller-uid", uid.as_str()),
                ("job-name", name.as_str()),
            ];
            o["spec"]["selector"] =
                json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
            let tl = &mut o["spec"]["template"]["metadata"]["labels"];
            if !tl.is_object() {
                *tl = json!({});
            }
            for (k, v) in labels {
                tl[k] = json!(v);
            }
        });
    }
    if job["spec"]["suspend"] == json!(true) {
        return changed;
    }
    let Ok(job) = store.get(&JOBS, &ns, &name) else {
        return changed;
    };
    let pods: Vec<Value> = store
        .list(&PODS, Some(&ns), &Selector::default())
        .into_iter()
        .filter(|p| owned_by(p, &uid))
        .collect();
    let phase = |p: &Value| s(p, &["status", "phase"]).unwrap_or("Pending").to_string();
    let active: Vec<&Value> = pods
        .iter()
        .filter(|p| {
            let ph = phase(p);
            ph != "Succeeded" && ph != "Failed" && p["metadata"].get("deletionTimestamp").is_none()
        })
        .collect();
    let ready = active.iter().filter(|p| phase(p) == "Running").count();
    // Counts never go down: a finished pod deleted by hand stays counted, as with the
    // real controller's tracking finalizers.
    let count = |ph: &str, field: &str| {
        let seen = pods.iter().filter(|p| phase(p) == ph).count();
        i64::try_from(seen)
            .unwrap_or(i64::MAX)
            .max(job["status"][field].as_i64().unwrap_or(0))
    };
    let succeeded = count("Succeeded", "succeeded");
    let failed = count("Failed", "failed");
    let now = rfc3339_now();
    let start_time = s(&job, &["status", "startTime"])
        .unwrap_or(&now)
        .to_string();
    let backoff_limit = job["spec"]["backoffLimit"].as_i64().unwrap_or(6);
    let completions = job["spec"]["completions"].as_i64().unwrap_or(1);
    let parallelism = job["spec"]["parallelism"].as_i64().unwrap_or(1);
    let deadline_passed = job["spec"]["activeDeadlineSeconds"]
        .as_i64()
        .zip(parse_rfc3339(&start_time))
        .is_some_and(|(ads, start)| now_secs() - start >= ads);

    let failure = if failed > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if deadline_passed {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };
    let mut status = json!({
        "startTime": start_time,
        "active": active.len(),
        "ready": ready,
        "succeeded": succeeded,
        "failed": failed,
        "terminating": 0,
        "uncountedTerminatedPods": {},
    });
    if let Some((reason, message)) = failure {
        for p in &active {
            let pod_name = s(p, &["metadata", "name"]).unwrap_or("");
            let _ = store.delete(&PODS, &ns, pod_name, false);
        }
        status["active"] = json!(0);
        status["ready"] = json!(0);
        status["conditions"] = json!([
            condition("FailureTarget", reason, message, &now),
            condition("Failed", reason, message, &now),
        ]);
        record_event(store, &job, "Warning", reason, message, "job-controller");
    } else if succeeded >= completions {
        let message = "Reached expected number of succeeded pods";
        status["completionTime"] = json!(now);
        status["conditions"] = json!([
            condition("SuccessCriteriaMet", "CompletionsReached", message, &now),
            condition("Complete", "CompletionsReached", message, &now),
        ]);
        record_event(
            store,
            &job,
            "Normal",
            "Completed",
            "Job completed",
            "job-controller",
        );
    } else {
        let wanted = parallelism.min(completions - succeeded);
        let missing = wanted - i64::try_from(active.len()).unwrap_or(0);
        if missing > 0 && state.kubelet.jobs.may_create(&uid, failed) {
            for _ in 0..missing {
                if create_pod(store, &job, &ns, &name, &uid) {
                    status["active"] = json!(status["active"].as_i64().unwrap_or(0) + 1);
                }
            }
        }
    }
    changed |= store.controller_update(&JOBS, &ns, &name, |o| {
        let conditions = o["status"]["conditions"].clone();
        o["status"] = status;
        if o["status"]["conditions"].is_null() && !conditions.is_null() {
            o["status"]["conditions"] = conditions;
        }
    });
    changed
}

fn create_pod(store: &mut Store, job: &Value, ns: &str, name: &str, uid: &str) -> bool {
    let template = &job["spec"]["template"];
    let sa = s(template, &["spec", "serviceAccountName"]).unwrap_or("default");
    if store.get(&SERVICE_ACCOUNTS, ns, sa).is_err() {
        let err = pod_forbidden_missing_sa(ns, &format!("{name}-"), sa);
        record_event(
            store,
            job,
            "Warning",
            "FailedCreate",
            &format!("Error creating: {}", err.message),
            "job-controller",
        );
        return false;
    }
    let pod_name = format!(
        "{name}-{}",
        crate::tokens::random_string(crate::tokens::NAME_ALPHABET, 5)
    );
    let mut labels = template["metadata"]["labels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    for (k, v) in [
        ("batch.kubernetes.io/controller-uid", uid),
        ("batch.kubernetes.io/job-name", name),
        ("controller-uid", uid),
        ("job-name", name),
    ] {
        labels[k] = json!(v);
    }
    let mut metadata = json!({
        "name": pod_name,
        "generateName": format!("{name}-"),
        "namespace": ns,
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
            "controller": true, "blockOwnerDeletion": true,
        }],
    });
    if template["metadata"]["annotations"].is_object() {
        metadata["annotations"] = template["metadata"]["annotations"].clone();
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": metadata,
        "spec": template["spec"],
    });
    match store.create(&PODS, Some(ns), pod, false) {
        Ok(_) => {
            record_event(
                store,
                job,
                "Normal",
                "SuccessfulCreate",
                &format!("Created pod: {pod_name}"),
                "job-controller",
            );
            true
        }
        Err(e) => {
            record_event(
                store,
                job,
                "Warning",
                "FailedCreate",
                &format!("Error creating: {}", e.message),
                "job-controller",
            );
            false
        }
    }
}

/// What a DELETE's `propagationPolicy` (or legacy `orphanDependents`) asks for; None = default.
pub(crate) fn propagation_policy(query_value: Option<String>, body: &[u8]) -> Option<String> {
    if query_value.is_some() {
        return query_value;
    }
    let opts: Value = serde_json::from_slice(body).ok()?;
    if let Some(p) = opts["propagationPolicy"].as_str() {
        return Some(p.to_string());
    }
    opts["orphanDependents"]
        .as_bool()
        .map(|o| if o { "Orphan" } else { "Background" }.to_string())
}

/// After a DELETE: orphaning (the batch/v1 Job default) strips the Job from its pods'
/// ownerReferences so the collector leaves them alone.
pub(crate) fn after_delete(
    store: &mut Store,
    rt: &ResourceType,
    deleted: &Value,
    policy: Option<&str>,
) {
    if rt != &JOBS || !matches!(policy, None | Some("Orphan")) {
        return;
    }
    let ns = s(deleted, &["metadata", "namespace"]).unwrap_or("");
    let Some(uid) = s(deleted, &["metadata", "uid"]) else {
        return;
    };
    for pod in store.list(&PODS, Some(ns), &Selector::default()) {
        if !owned_by(&pod, uid) {
            continue;
        }
        let name = s(&pod, &["metadata", "name"]).unwrap_or("").to_string();
        store.controller_update(&PODS, ns, &name, |o| {
            if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"].as_str() != Some(uid));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let nanos = 1_700_000_000_000_000_000;
        let ts = crate::values::rfc3339_from_unix_nanos(nanos);
        assert_eq!(parse_rfc3339(&ts), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2024-02-29T12:00:01.5Z"), Some(1_709_208_001));
        assert_eq!(parse_rfc3339("nope"), None);
    }

    #[test]
    fn backoff_delays_grow() {
        let c = JobController::new(Duration::from_millis(200));
        assert!(c.may_create("j", 0));
        assert!(!c.may_create("j", 1), "first failure waits one base delay");
        std::thread::sleep(Duration::from_millis(250));
        assert!(c.may_create("j", 1));
        assert!(!c.may_create("j", 2));
    }

    #[test]
    fn propagation_from_query_or_body() {
        assert_eq!(
            propagation_policy(None, br#"{"propagationPolicy":"Background"}"#).as_deref(),
            Some("Background")
        );
        assert_eq!(
            propagation_policy(Some("Foreground".into()), b"").as_deref(),
            Some("Foreground")
        );
        assert_eq!(
            propagation_policy(None, br#"{"orphanDependents":true}"#).as_deref(),
            Some("Orphan")
        );
        assert_eq!(propagation_policy(None, b""), None);
    }
}
