//! The workload and volume kinds: PersistentVolumes, ServiceAccounts, Secrets, ConfigMaps,
//! Events, Pods and Jobs (plus TokenReview, which is create-only and never stored).
//!
//! It owns their table entries and what the API server does to them on the way in:
//! defaulting (pod and job defaults, Secret `stringData` folded into `data`), field
//! validation (422 causes) and the ServiceAccount admission check for pods. It also records
//! core/v1 Events for the simulated controllers. It must not run anything: the job
//! controller and kubelet live in `jobs` and `kubelet`.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::store::{ApiError, Cause, ResourceType, Selector, Store};
use crate::values::rfc3339_now;

/// Core PersistentVolumes.
pub(crate) static PERSISTENT_VOLUMES: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "persistentvolumes",
    kind: "PersistentVolume",
    namespaced: false,
    status_subresource: true,
    crd: false,
};
/// Core ServiceAccounts.
pub(crate) static SERVICE_ACCOUNTS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "serviceaccounts",
    kind: "ServiceAccount",
    namespaced: true,
    status_subresource: false,
    crd: false,
};
/// Core Secrets.
pub(crate) static SECRETS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "secrets",
    kind: "Secret",
    namespaced: true,
    status_subresource: false,
    crd: false,
};
/// Core ConfigMaps.
pub(crate) static CONFIG_MAPS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "configmaps",
    kind: "ConfigMap",
    namespaced: true,
    status_subresource: false,
    crd: false,
};
/// Core Events (what the simulated controllers report).
pub(crate) static EVENTS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "events",
    kind: "Event",
    namespaced: true,
    status_subresource: false,
    crd: false,
};
/// Core Pods.
pub(crate) static PODS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "pods",
    kind: "Pod",
    namespaced: true,
    status_subresource: true,
    crd: false,
};
/// batch/v1 Jobs.
pub(crate) static JOBS: ResourceType = ResourceType {
    group: "batch",
    version: "v1",
    plural: "jobs",
    kind: "Job",
    namespaced: true,
    status_subresource: true,
    crd: false,
};
/// authentication.k8s.io/v1 TokenReview: create-only, answered by `subresources`.
pub(crate) static TOKEN_REVIEWS: ResourceType = ResourceType {
    group: "authentication.k8s.io",
    version: "v1",
    plural: "tokenreviews",
    kind: "TokenReview",
    namespaced: false,
    status_subresource: false,
    crd: false,
};

/// The kinds this module adds to the served table.
pub(crate) static WORKLOAD_TYPES: [&ResourceType; 8] = [
    &PERSISTENT_VOLUMES,
    &SERVICE_ACCOUNTS,
    &SECRETS,
    &CONFIG_MAPS,
    &EVENTS,
    &PODS,
    &JOBS,
    &TOKEN_REVIEWS,
];

/// Field selector keys accepted beyond `metadata.name`/`metadata.namespace` (the ones the
/// API server supports for events, pods, secrets and jobs); matched as dotted paths.
pub(crate) const EXTRA_FIELD_LABELS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.fieldPath",
    "reason",
    "type",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.serviceAccountName",
    "status.phase",
    "status.podIP",
];

/// Reads a field selector value by dotted path ("" when absent, like the API server).
pub(crate) fn field_value<'a>(obj: &'a Value, key: &str) -> &'a str {
    let mut cur = obj;
    for p in key.split('.') {
        match cur.get(p) {
            Some(v) => cur = v,
            None => return "",
        }
    }
    cur.as_str().unwrap_or("")
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Decodes Secret `data` values.
pub(crate) fn secret_bytes(secret: &Value, key: &str) -> Option<Vec<u8>> {
    secret["data"][key]
        .as_str()
        .and_then(|s| b64().decode(s).ok())
}

/// Defaulting and normalisation on create and update.
///
/// # Errors
/// 400 BadRequest for Secret `data` that is not base64 (the API server fails to decode it).
pub(crate) fn normalize(rt: &ResourceType, obj: &mut Value) -> Result<(), ApiError> {
    crate::network::normalize(rt, obj);
    if rt == &SECRETS {
        normalize_secret(obj)?;
    } else if rt == &PODS {
        if obj["spec"].is_object() {
            default_pod_spec(&mut obj["spec"], true);
        }
    } else if rt == &JOBS {
        let spec = &mut obj["spec"];
        if spec.is_object() {
            for (k, v) in [
                ("backoffLimit", json!(6)),
                ("completions", json!(1)),
                ("parallelism", json!(1)),
                ("completionMode", json!("NonIndexed")),
                ("suspend", json!(false)),
                ("podReplacementPolicy", json!("TerminatingOrFailed")),
            ] {
                if spec.get(k).is_none_or(Value::is_null) {
                    spec[k] = v;
                }
            }
            if spec["template"]["spec"].is_object() {
                // A job's restartPolicy is never defaulted: it must say Never or OnFailure.
                default_pod_spec(&mut spec["template"]["spec"], false);
            }
        }
    }
    Ok(())
}

fn normalize_secret(obj: &mut Value) -> Result<(), ApiError> {
    if let Some(data) = obj["data"].as_object() {
        for (k, v) in data {
            let ok = v.as_str().is_some_and(|s| b64().decode(s).is_ok());
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data in data[{k:?}]"
                )));
            }
        }
    }
    let Some(map) = obj.as_object_mut() else {
        return Ok(());
    };
    // stringData is write-only: merged over data, then dropped, as the API server does.
    if let Some(Value::Object(string_data)) = map.remove("stringData") {
        let data = map
            .entry("data")
            .or_insert_with(|| Value::Object(Map::new()));
        if !data.is_object() {
            *data = Value::Object(Map::new());
        }
        for (k, v) in string_data {
            let s = v.as_str().unwrap_or("").to_string();
            data[k.as_str()] = json!(b64().encode(s.as_bytes()));
        }
    }
    if map.get("type").is_none_or(Value::is_null) {
        map.insert("type".into(), json!("Opaque"));
    }
    Ok(())
}

fn default_pod_spec(spec: &mut Value, restart_policy: bool) {
    let defaults = [
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("securityContext", json!({})),
    ];
    for (k, v) in defaults {
        if spec.get(k).is_none_or(Value::is_null) {
            spec[k] = v;
        }
    }
    if restart_policy && spec.get("restartPolicy").is_none_or(Value::is_null) {
        spec["restartPolicy"] = json!("Always");
    }
    // The ServiceAccount admission plugin fills in `default`.
    let sa = spec["serviceAccountName"]
        .as_str()
        .or_else(|| spec["serviceAccount"].as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    spec["serviceAccountName"] = json!(sa);
    spec["serviceAccount"] = json!(sa);
    if let Some(containers) = spec["containers"].as_array_mut() {
        for c in containers {
            if !c.is_object() {
                continue;
            }
            if c.get("terminationMessagePath").is_none_or(Value::is_null) {
                c["terminationMessagePath"] = json!("/dev/termination-log");
            }
            if c.get("terminationMessagePolicy").is_none_or(Value::is_null) {
                c["terminationMessagePolicy"] = json!("File");
            }
            if c.get("imagePullPolicy").is_none_or(Value::is_null) {
                let image = c["image"].as_str().unwrap_or("");
                let tag = image
                    .rsplit('/')
                    .next()
                    .and_then(|last| last.split_once(':'));
                let latest = tag.is_none_or(|(_, t)| t == "latest");
                c["imagePullPolicy"] = json!(if latest { "Always" } else { "IfNotPresent" });
            }
        }
    }
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        for v in volumes {
            for kind in ["secret", "configMap", "projected"] {
                if v[kind].is_object() && v[kind].get("defaultMode").is_none() {
                    v[kind]["defaultMode"] = json!(420);
                }
            }
            if let Some(sources) = v["projected"]["sources"].as_array_mut() {
                for s in sources {
                    let t = &mut s["serviceAccountToken"];
                    if t.is_object() && t.get("expirationSeconds").is_none_or(Value::is_null) {
                        t["expirationSeconds"] = json!(crate::tokens::DEFAULT_EXPIRATION_SECONDS);
                    }
                }
            }
        }
    }
}

fn required(field: &str, message: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        field: field.to_string(),
        message: message.to_string(),
    }
}

fn validate_pod_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let containers = spec["containers"].as_array();
    if containers.is_none_or(|c| c.is_empty()) {
        causes.push(required(&format!("{path}.containers"), "Required value"));
    }
    let volumes: Vec<&Value> = spec["volumes"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let volume = |name: &str| volumes.iter().find(|v| v["name"].as_str() == Some(name));
    for (vi, v) in volumes.iter().enumerate() {
        if let Some(sources) = v["projected"]["sources"].as_array() {
            for (si, s) in sources.iter().enumerate() {
                if let Some(secs) = s["serviceAccountToken"]["expirationSeconds"].as_i64()
                    && let Some(cause) = crate::tokens::validate_expiration(
                        &format!(
                            "{path}.volumes[{vi}].projected.sources[{si}].serviceAccountToken.expirationSeconds"
                        ),
                        secs,
                    )
                {
                    causes.push(cause);
                }
            }
        }
    }
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let cpath = format!("{path}.containers[{i}]");
        if c["name"].as_str().is_none_or(str::is_empty) {
            causes.push(required(&format!("{cpath}.name"), "Required value"));
        }
        if c["image"].as_str().is_none_or(str::is_empty) {
            causes.push(required(&format!("{cpath}.image"), "Required value"));
        }
        for (list, what) in [
            ("volumeMounts", "volumeMounts"),
            ("volumeDevices", "volumeDevices"),
        ] {
            for (j, m) in c[list].as_array().into_iter().flatten().enumerate() {
                let name = m["name"].as_str().unwrap_or("");
                let field = format!("{cpath}.{what}[{j}].name");
                match volume(name) {
                    None => causes.push(Cause {
                        reason: "FieldValueNotFound",
                        field,
                        message: format!("Not found: \"{name}\""),
                    }),
                    Some(v)
                        if list == "volumeDevices" && !v["persistentVolumeClaim"].is_object() =>
                    {
                        causes.push(Cause {
                            reason: "FieldValueInvalid",
                            field,
                            message: format!(
                                "Invalid value: \"{name}\": can only use volume source type of PersistentVolumeClaim or Ephemeral for block mode"
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// Field checks the API server makes for these kinds (appended to the store's own).
pub(crate) fn validate(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut causes = crate::network::validate(rt, obj);
    if rt == &crate::crds::CUSTOM_RESOURCE_DEFINITIONS {
        causes.extend(crate::crds::validate(obj));
    }
    if rt == &PODS {
        validate_pod_spec(&obj["spec"], "spec", &mut causes);
    } else if rt == &JOBS {
        let tspec = &obj["spec"]["template"]["spec"];
        if !tspec.is_object() {
            causes.push(required("spec.template.spec", "Required value"));
        } else {
            validate_pod_spec(tspec, "spec.template.spec", &mut causes);
            match tspec["restartPolicy"].as_str() {
                Some("Never") | Some("OnFailure") => {}
                None => causes.push(required(
                    "spec.template.spec.restartPolicy",
                    "Required value: valid values: \"OnFailure\", \"Never\"",
                )),
                Some(other) => causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    field: "spec.template.spec.restartPolicy".into(),
                    message: format!(
                        "Unsupported value: \"{other}\": supported values: \"OnFailure\", \"Never\""
                    ),
                }),
            }
        }
        if obj["spec"]["backoffLimit"].as_i64().is_some_and(|b| b < 0) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                field: "spec.backoffLimit".into(),
                message: "Invalid value: must be greater than or equal to 0".into(),
            });
        }
    } else if rt == &PERSISTENT_VOLUMES {
        if obj["spec"]["capacity"]["storage"].is_null() {
            causes.push(required("spec.capacity", "Required value"));
        }
        if obj["spec"]["accessModes"]
            .as_array()
            .is_none_or(|a| a.is_empty())
        {
            causes.push(required("spec.accessModes", "Required value"));
        }
    }
    causes
}

/// Admission on create: a pod's ServiceAccount must exist (the ServiceAccount plugin).
///
/// # Errors
/// 403 Forbidden naming the missing account.
pub(crate) fn admit(store: &Store, rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    if rt != &PODS {
        return Ok(());
    }
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let sa = obj["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    if store.get(&SERVICE_ACCOUNTS, ns, sa).is_err() {
        return Err(pod_forbidden_missing_sa(ns, name, sa));
    }
    Ok(())
}

/// The 403 the ServiceAccount admission plugin answers for a pod naming a missing account.
pub(crate) fn pod_forbidden_missing_sa(ns: &str, pod: &str, sa: &str) -> ApiError {
    ApiError {
        code: 403,
        reason: "Forbidden",
        message: format!(
            "pods \"{pod}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
        ),
        details: Some(json!({"name": pod, "kind": "pods"})),
    }
}

/// The object reference an Event points at.
fn involved(obj: &Value) -> Value {
    json!({
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "namespace": obj["metadata"]["namespace"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "resourceVersion": obj["metadata"]["resourceVersion"],
    })
}

/// Records a core/v1 Event about `obj` once: an identical event (same object uid, reason and
/// message) is not repeated, so level-triggered controllers do not churn the store each tick.
/// Returns true if an event was created.
pub(crate) fn record_event(
    store: &mut Store,
    obj: &Value,
    event_type: &str,
    reason: &str,
    message: &str,
    component: &str,
) -> bool {
    let uid = obj["metadata"]["uid"].as_str().unwrap_or("");
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
    let seen = store
        .list(&EVENTS, Some(ns), &Selector::default())
        .iter()
        .any(|e| {
            e["involvedObject"]["uid"].as_str() == Some(uid)
                && e["reason"].as_str() == Some(reason)
                && e["message"].as_str() == Some(message)
        });
    if seen {
        return false;
    }
    let now = rfc3339_now();
    let name = format!(
        "{}.{}",
        obj["metadata"]["name"].as_str().unwrap_or("object"),
        crate::tokens::random_string(b"0123456789abcdef", 16)
    );
    store.controller_create(
        &EVENTS,
        ns,
        json!({
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": involved(obj),
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        }),
    );
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secret_string_data_is_merged_into_base64_data() {
        let mut s = json!({"metadata": {"name": "s"}, "data": {"a": "eA=="}, "stringData": {"b": "hello", "a": "y"}});
        normalize(&SECRETS, &mut s).unwrap();
        assert_eq!(s["data"], json!({"a": "eQ==", "b": "aGVsbG8="}));
        assert!(s.get("stringData").is_none());
        assert_eq!(s["type"], "Opaque");
        assert_eq!(secret_bytes(&s, "b").unwrap(), b"hello");
        let mut bad = json!({"data": {"a": "not base64!"}});
        assert_eq!(normalize(&SECRETS, &mut bad).unwrap_err().code, 400);
    }

    #[test]
    fn job_defaults_and_validation() {
        let mut job = json!({"metadata": {"name": "j"}, "spec": {"template": {"spec": {
            "containers": [{"name": "c", "image": "busybox", "volumeDevices": [{"name": "nope", "devicePath": "/dev/xvda"}]}]}}}});
        normalize(&JOBS, &mut job).unwrap();
        assert_eq!(job["spec"]["backoffLimit"], 6);
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(c["imagePullPolicy"], "Always");
        let fields: Vec<String> = validate(&JOBS, &job).into_iter().map(|c| c.field).collect();
        assert!(fields.contains(&"spec.template.spec.restartPolicy".to_string()));
        assert!(
            fields.contains(&"spec.template.spec.containers[0].volumeDevices[0].name".to_string())
        );
    }

    #[test]
    fn field_values_by_dotted_path() {
        let e = json!({"involvedObject": {"name": "p"}, "reason": "X"});
        assert_eq!(field_value(&e, "involvedObject.name"), "p");
        assert_eq!(field_value(&e, "involvedObject.uid"), "");
    }
}
