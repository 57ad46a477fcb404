//! The endpoints that are not object CRUD: `serviceaccounts/{name}/token` (TokenRequest),
//! `tokenreviews` (create-only, never stored) and `pods/{name}/log`.
//!
//! `server` routes them like any resource (so request-path checks see the resource, name and
//! subresource) and hands them here before the store's CRUD dispatch.

use hyper::Method;
use serde_json::Value;

use crate::State;
use crate::kinds::{PODS, SERVICE_ACCOUNTS, TOKEN_REVIEWS};
use crate::server::{Reply, Route, query_param};
use crate::store::{ApiError, ResourceType, Store};

/// True for the subresources this module answers.
pub(crate) fn serves(rt: &ResourceType, sub: &str) -> bool {
    (rt == &SERVICE_ACCOUNTS && sub == "token") || (rt == &PODS && sub == "log")
}

fn body_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Answers the request if it is one of ours; None hands it to the CRUD dispatch.
pub(crate) fn dispatch(
    state: &State,
    store: &Store,
    method: &Method,
    route: &Route,
    query: &str,
    body: &[u8],
) -> Option<Result<Reply, ApiError>> {
    let ns = route.ns.as_deref().unwrap_or("");
    if route.rt == &TOKEN_REVIEWS {
        return Some(match (method, &route.name) {
            (&Method::POST, None) => body_json(body)
                .and_then(|b| crate::tokens::token_review(store, &state.tokens, &b))
                .map(|v| Reply::Json(201, v)),
            _ => Err(ApiError::method_not_allowed()),
        });
    }
    let name = route.name.as_deref().unwrap_or("");
    match route.sub.as_deref() {
        Some("token") => Some(match *method {
            Method::POST => body_json(body)
                .and_then(|b| {
                    crate::tokens::token_request(
                        store,
                        &state.tokens,
                        state.faults.token_request_forbidden(),
                        ns,
                        name,
                        &b,
                    )
                })
                .map(|v| Reply::Json(201, v)),
            _ => Err(ApiError::method_not_allowed()),
        }),
        Some("log") => Some(match *method {
            Method::GET => pod_log(state, store, ns, name, query).map(|t| Reply::Text(200, t)),
            _ => Err(ApiError::method_not_allowed()),
        }),
        _ => None,
    }
}

fn pod_log(
    state: &State,
    store: &Store,
    ns: &str,
    name: &str,
    query: &str,
) -> Result<String, ApiError> {
    let pod = store.get(&PODS, ns, name)?;
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("");
    let first = pod["spec"]["containers"][0]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let container = query_param(query, "container").unwrap_or_else(|| first.clone());
    let known = pod["spec"]["containers"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(&container)));
    if !known {
        return Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {name}"
        )));
    }
    if query_param(query, "previous").is_some_and(|v| v == "true") {
        return Err(ApiError::bad_request(format!(
            "previous terminated container \"{container}\" in pod \"{name}\" not found"
        )));
    }
    let launched = state.kubelet.log_of(uid).filter(|(_, c)| *c == container);
    let Some((path, _)) = launched else {
        let reason = pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            .as_str()
            .unwrap_or("ContainerCreating");
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        )));
    };
    let bytes = std::fs::read(&path).map_err(|e| ApiError {
        code: 500,
        reason: "InternalError",
        message: format!("reading the log of pod {name}: {e}"),
        details: None,
    })?;
    let mut out: &[u8] = &bytes;
    if let Some(n) = query_param(query, "tailLines").and_then(|v| v.parse::<usize>().ok()) {
        out = crate::kubelet::tail_lines(out, n);
    }
    if let Some(n) = query_param(query, "limitBytes").and_then(|v| v.parse::<usize>().ok()) {
        out = &out[..out.len().min(n)];
    }
    Ok(String::from_utf8_lossy(out).into_owned())
}
