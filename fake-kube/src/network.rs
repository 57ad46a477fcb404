//! Core Services and `discovery.k8s.io/v1` EndpointSlices: what a client needs to find out
//! whether a Service DNS name (`svc.ns.svc:port`) leads anywhere.
//!
//! It owns their table entries, the API server's defaulting (Service `type: ClusterIP`, a
//! `clusterIP` from 10.96.0.0/16, port `protocol: TCP` and `targetPort` = `port`) and the
//! field checks that matter to readers (ports, `addressType`, endpoint addresses). There is no
//! endpoint-slice controller: tests write the slices a controller would (labelled
//! `kubernetes.io/service-name`), so "a Service without endpoints" is simply one without
//! slices. There is no proxying: nothing listens on a cluster IP.

use serde_json::{Value, json};

use crate::store::{Cause, ResourceType};

/// Core Services.
pub(crate) static SERVICES: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "services",
    kind: "Service",
    namespaced: true,
    status_subresource: true,
    crd: false,
};

/// discovery.k8s.io/v1 EndpointSlices.
pub(crate) static ENDPOINT_SLICES: ResourceType = ResourceType {
    group: "discovery.k8s.io",
    version: "v1",
    plural: "endpointslices",
    kind: "EndpointSlice",
    namespaced: true,
    status_subresource: false,
    crd: false,
};

/// The kinds this module adds to the served table.
pub(crate) static NETWORK_TYPES: [&ResourceType; 2] = [&SERVICES, &ENDPOINT_SLICES];

/// Defaulting on create and update.
pub(crate) fn normalize(rt: &ResourceType, obj: &mut Value) {
    if rt != &SERVICES || !obj["spec"].is_object() {
        return;
    }
    let spec = &mut obj["spec"];
    if spec.get("type").is_none_or(Value::is_null) {
        spec["type"] = json!("ClusterIP");
    }
    let headless_or_external =
        spec["type"] == "ExternalName" || spec["clusterIP"].as_str() == Some("None");
    if !headless_or_external && spec.get("clusterIP").is_none_or(Value::is_null) {
        // Stable per name, so a re-created Service keeps its address as often as not.
        let name = obj["metadata"]["name"].as_str().unwrap_or("");
        let h = name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let ip = format!("10.96.{}.{}", (h >> 8) % 256, (h % 254) + 1);
        obj["spec"]["clusterIP"] = json!(ip);
        obj["spec"]["clusterIPs"] = json!([ip]);
    }
    if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
        for p in ports {
            if p.get("protocol").is_none_or(Value::is_null) {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none_or(Value::is_null) {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
}

fn port_ok(v: &Value) -> bool {
    v.as_i64().is_some_and(|p| (1..=65535).contains(&p))
}

/// Field checks the API server makes for these kinds.
pub(crate) fn validate(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if rt == &SERVICES {
        let external = obj["spec"]["type"] == "ExternalName";
        let ports = obj["spec"]["ports"].as_array().cloned().unwrap_or_default();
        if ports.is_empty() && !external {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: "spec.ports".into(),
                message: "Required value".into(),
            });
        }
        for (i, p) in ports.iter().enumerate() {
            if !port_ok(&p["port"]) {
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    field: format!("spec.ports[{i}].port"),
                    message: format!(
                        "Invalid value: {}: must be between 1 and 65535, inclusive",
                        p["port"]
                    ),
                });
            }
            if ports.len() > 1 && p["name"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    field: format!("spec.ports[{i}].name"),
                    message: "Required value".into(),
                });
            }
        }
    } else if rt == &ENDPOINT_SLICES {
        match obj["addressType"].as_str() {
            Some("IPv4" | "IPv6" | "FQDN") => {}
            None => causes.push(Cause {
                reason: "FieldValueRequired",
                field: "addressType".into(),
                message: "Required value".into(),
            }),
            Some(other) => causes.push(Cause {
                reason: "FieldValueNotSupported",
                field: "addressType".into(),
                message: format!(
                    "Unsupported value: \"{other}\": supported values: \"FQDN\", \"IPv4\", \"IPv6\""
                ),
            }),
        }
        for (i, e) in obj["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if e["addresses"].as_array().is_none_or(|a| a.is_empty()) {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    field: format!("endpoints[{i}].addresses"),
                    message: "Required value: must contain at least 1 address".into(),
                });
            }
        }
        for (i, p) in obj["ports"].as_array().into_iter().flatten().enumerate() {
            if !p["port"].is_null() && !port_ok(&p["port"]) {
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    field: format!("ports[{i}].port"),
                    message: "Invalid value: must be between 1 and 65535, inclusive".into(),
                });
            }
        }
    }
    causes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn services_get_a_cluster_ip_and_port_defaults() {
        let mut svc = json!({"metadata": {"name": "sm"}, "spec": {"ports": [{"port": 6443}]}});
        normalize(&SERVICES, &mut svc);
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert!(
            svc["spec"]["clusterIP"]
                .as_str()
                .unwrap()
                .starts_with("10.96.")
        );
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 6443);
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        assert!(validate(&SERVICES, &svc).is_empty());
        let bad = json!({"spec": {"ports": []}});
        assert_eq!(validate(&SERVICES, &bad)[0].field, "spec.ports");
    }

    #[test]
    fn endpoint_slices_need_an_address_type_and_addresses() {
        let bad = json!({"endpoints": [{"addresses": []}]});
        let fields: Vec<String> = validate(&ENDPOINT_SLICES, &bad)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, ["addressType", "endpoints[0].addresses"]);
    }
}
