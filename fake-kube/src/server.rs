//! HTTP front of the fake: routes Kubernetes REST paths onto the store.
//!
//! Paths: `/api/v1/...` and `/apis/{group}/{version}/...`, cluster or namespaced
//! collections and items, `/status` subresources. Verbs: GET (get, list, watch),
//! POST, PUT, PATCH (merge, strategic for built-ins, JSON patch), DELETE. Errors are
//! metav1.Status bodies with the real codes and reasons. Watches stream one JSON
//! event per line and replay from `resourceVersion`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::faults::FaultAction;
use crate::rbac::{self, RequestAttributes};
use crate::store::{ApiError, Event, Part, PatchType, ResourceType, Selector, find_type};
use crate::{RecordedRequest, State};

/// Response body type.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Returned to hyper to drop the connection (simulated connection reset).
#[derive(Debug)]
pub(crate) struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault injection: connection dropped")
    }
}

impl std::error::Error for DropConnection {}

fn full(body: Vec<u8>) -> Body {
    Full::new(Bytes::from(body)).boxed()
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn fault_response(code: u16, retry_after_seconds: u32) -> Response<Body> {
    // The StatusReason the API server pairs with each code.
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    let mut status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("fault injected: {reason}"), "reason": reason, "code": code,
    });
    if retry_after_seconds > 0 {
        status["details"] = json!({"retryAfterSeconds": retry_after_seconds});
    }
    let mut resp = json_response(code, &status);
    if retry_after_seconds > 0
        && let Ok(v) = hyper::header::HeaderValue::from_str(&retry_after_seconds.to_string())
    {
        resp.headers_mut().insert(hyper::header::RETRY_AFTER, v);
    }
    resp
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

pub(crate) struct Route {
    pub(crate) rt: &'static ResourceType,
    pub(crate) ns: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) part: Part,
    /// A subresource other than `status` (`token`, `log`), answered by `subresources`.
    pub(crate) sub: Option<String>,
}

fn route(path: &str, types: &[&'static ResourceType]) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route()),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if *plural != "status" && *plural != "finalize" => {
            (Some(ns.to_string()), [&[*plural][..], tail].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => return Err(ApiError::no_route()),
    };
    let rt = find_type(types, group, version, plural).ok_or_else(ApiError::no_route)?;
    if ns.is_some() && !rt.namespaced {
        return Err(ApiError::no_route());
    }
    let (part, sub) = match sub {
        None => (Part::Main, None),
        Some("status") if rt.status_subresource => (Part::Status, None),
        Some(s) if crate::subresources::serves(rt, s) => (Part::Main, Some(s.to_string())),
        Some(_) => return Err(ApiError::no_route()),
    };
    Ok(Route {
        rt,
        ns,
        name,
        part,
        sub,
    })
}

/// Handles one request.
pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, DropConnection> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    state.record(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
    });
    let fault = state.faults.take_http(method.as_str(), &path);
    let mut fail_after = None;
    if let Some(fault) = fault {
        match fault.action {
            FaultAction::Reset => return Err(DropConnection),
            FaultAction::Status(code) => {
                return Ok(fault_response(code, fault.retry_after_seconds));
            }
            FaultAction::StatusAfterProcessing(code) => fail_after = Some(code),
        }
    }
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(user) = state.authenticate(authorization) else {
        return Ok(json_response(
            401,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Unauthorized", "reason": "Unauthorized", "code": 401}),
        ));
    };
    // Like the apiserver: authorize before the body is read or the path is resolved.
    let attributes = RequestAttributes::from_request(method.as_str(), &path, &query);
    if !state.authorize(&user, attributes.clone()) {
        return Ok(json_response(403, &rbac::forbidden(&user, &attributes)));
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(DropConnection),
    };
    let types = state.served_types();
    if method == Method::GET
        && let Some(doc) = crate::discovery::answer(&path, &types)
    {
        return Ok(match doc {
            Ok(v) => json_response(200, &v),
            Err(e) => error_response(&e),
        });
    }
    let route = match route(&path, &types) {
        Ok(r) => r,
        Err(e) => return Ok(error_response(&e)),
    };
    let dry_run = query_param(&query, "dryRun").is_some_and(|v| v == "All");
    let result = match crate::access_review::dispatch(&state, &user, &method, &route, &body) {
        Some(reply) => reply,
        None => dispatch(
            &state,
            &method,
            &route,
            &query,
            &content_type,
            &body,
            dry_run,
        ),
    };
    if let Some(code) = fail_after {
        // The change is made, but the client never hears so (a timeout after commit).
        if method != Method::GET {
            state.changed.notify_one();
        }
        return Ok(fault_response(code, 0));
    }
    match result {
        Ok(Reply::Json(code, v)) => {
            if method != Method::GET && !dry_run {
                state.changed.notify_one();
            }
            Ok(json_response(code, &v))
        }
        Ok(Reply::WatchExpired(e)) => {
            let line = event_line("ERROR", &e.to_status());
            let mut resp = Response::new(full(line.to_vec()));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Ok(Reply::Watch(replay, rx, filter, timeout)) => {
            Ok(watch_response(replay, rx, filter, timeout))
        }
        Ok(Reply::Text(code, text)) => {
            let mut resp = Response::new(full(text.into_bytes()));
            *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain"),
            );
            Ok(resp)
        }
        Err(e) => Ok(error_response(&e)),
    }
}

pub(crate) enum Reply {
    Json(u16, Value),
    /// A plain-text body (pod logs).
    Text(u16, String),
    WatchExpired(ApiError),
    Watch(
        Vec<Event>,
        tokio::sync::broadcast::Receiver<Event>,
        WatchFilter,
        Duration,
    ),
}

pub(crate) struct WatchFilter {
    rt: &'static ResourceType,
    ns: Option<String>,
    sel: Selector,
}

impl WatchFilter {
    fn matches(&self, e: &Event) -> bool {
        e.rt == self.rt
            && self
                .ns
                .as_deref()
                .is_none_or(|n| !self.rt.namespaced || n == e.ns)
            && self.sel.matches(&e.object)
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn dispatch(
    state: &State,
    method: &Method,
    route: &Route,
    query: &str,
    content_type: &str,
    body: &[u8],
    dry_run: bool,
) -> Result<Reply, ApiError> {
    let rt = route.rt;
    let ns = route.ns.as_deref().unwrap_or("");
    let mut store = state.lock_store();
    if let Some(reply) = crate::subresources::dispatch(state, &store, method, route, query, body) {
        return reply;
    }
    match (method, route.name.as_deref()) {
        (&Method::GET, None) => {
            let sel = Selector::parse(
                query_param(query, "labelSelector").as_deref(),
                query_param(query, "fieldSelector").as_deref(),
            )?;
            let watch = query_param(query, "watch").is_some_and(|v| v == "true" || v == "1");
            if watch {
                let since = match query_param(query, "resourceVersion").as_deref() {
                    None | Some("") => None,
                    Some(v) => Some(v.parse::<u64>().map_err(|_| {
                        ApiError::bad_request(format!("invalid resourceVersion {v:?}"))
                    })?),
                };
                let timeout = query_param(query, "timeoutSeconds")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1800);
                let (replay, rx) = match store.watch(rt, route.ns.as_deref(), since, &sel) {
                    Ok(w) => w,
                    // Like the real server: a watch from a compacted resourceVersion is
                    // answered 200 with one ERROR event carrying 410 Expired.
                    Err(e) if e.code == 410 => return Ok(Reply::WatchExpired(e)),
                    Err(e) => return Err(e),
                };
                return Ok(Reply::Watch(
                    replay,
                    rx,
                    WatchFilter {
                        rt,
                        ns: route.ns.clone(),
                        sel,
                    },
                    Duration::from_secs(timeout),
                ));
            }
            let items: Vec<Value> = store.list(rt, route.ns.as_deref(), &sel);
            Ok(Reply::Json(
                200,
                json!({
                    "apiVersion": rt.api_version(),
                    "kind": format!("{}List", rt.kind),
                    "metadata": {"resourceVersion": store.resource_version().to_string()},
                    "items": items,
                }),
            ))
        }
        (&Method::GET, Some(name)) => Ok(Reply::Json(200, store.get(rt, ns, name)?)),
        (&Method::POST, None) => {
            if route.part != Part::Main {
                return Err(ApiError::method_not_allowed());
            }
            let obj = parse_body(body)?;
            let created = store.create(rt, route.ns.as_deref(), obj, dry_run)?;
            Ok(Reply::Json(201, created))
        }
        (&Method::PUT, Some(name)) => {
            let obj = parse_body(body)?;
            Ok(Reply::Json(
                200,
                store.replace(rt, ns, name, obj, route.part, dry_run)?,
            ))
        }
        (&Method::PATCH, Some(name)) => {
            let patch_type = match content_type {
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/json-patch+json" => PatchType::Json,
                other => {
                    return Err(ApiError::unsupported_media_type(format!(
                        "fake-kube does not support patch content type {other:?} (server-side apply is not simulated)"
                    )));
                }
            };
            let patch = parse_body(body)?;
            Ok(Reply::Json(
                200,
                store.patch(rt, ns, name, patch_type, &patch, route.part, dry_run)?,
            ))
        }
        (&Method::DELETE, Some(name)) => {
            if route.part != Part::Main {
                return Err(ApiError::method_not_allowed());
            }
            let deleted = crate::controller::delete_with_effects(
                &mut store,
                &state.backend,
                &state.driver,
                rt,
                ns,
                name,
                dry_run,
            )?;
            if !dry_run {
                let policy =
                    crate::jobs::propagation_policy(query_param(query, "propagationPolicy"), body);
                crate::jobs::after_delete(&mut store, rt, &deleted, policy.as_deref());
            }
            Ok(Reply::Json(200, deleted))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

struct WatchState {
    replay: VecDeque<Event>,
    rx: tokio::sync::broadcast::Receiver<Event>,
    filter: WatchFilter,
    deadline: tokio::time::Instant,
    done: bool,
}

fn watch_response(
    replay: Vec<Event>,
    rx: tokio::sync::broadcast::Receiver<Event>,
    filter: WatchFilter,
    timeout: Duration,
) -> Response<Body> {
    let ws = WatchState {
        replay: replay.into(),
        rx,
        filter,
        deadline: tokio::time::Instant::now() + timeout,
        done: false,
    };
    let stream = futures::stream::unfold(ws, |mut ws| async move {
        if ws.done {
            return None;
        }
        if let Some(e) = ws.replay.pop_front() {
            return Some((event_line(e.kind, &e.object), ws));
        }
        loop {
            match tokio::time::timeout_at(ws.deadline, ws.rx.recv()).await {
                Err(_) | Ok(Err(RecvError::Closed)) => return None,
                Ok(Ok(e)) => {
                    if ws.filter.matches(&e) {
                        return Some((event_line(e.kind, &e.object), ws));
                    }
                }
                Ok(Err(RecvError::Lagged(_))) => {
                    // The watcher fell behind the buffer: tell it to re-list, as the real server does.
                    ws.done = true;
                    return Some((event_line("ERROR", &ApiError::gone(0).to_status()), ws));
                }
            }
        }
    });
    let body = StreamBody::new(stream.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::TYPES;

    #[test]
    fn routes() {
        let r = route(
            "/apis/snapshot.storage.k8s.io/v1/namespaces/a/volumesnapshots/x/status",
            &TYPES,
        )
        .unwrap();
        assert_eq!(r.rt.plural, "volumesnapshots");
        assert_eq!(r.ns.as_deref(), Some("a"));
        assert_eq!(r.name.as_deref(), Some("x"));
        assert_eq!(r.part, Part::Status);
        let r = route("/api/v1/namespaces/a", &TYPES).unwrap();
        assert_eq!((r.rt.plural, r.name.as_deref()), ("namespaces", Some("a")));
        let r = route("/api/v1/namespaces", &TYPES).unwrap();
        assert!(r.name.is_none());
        assert!(route("/apis/storage.k8s.io/v1/namespaces/a/csidrivers", &TYPES).is_err());
        assert_eq!(percent_decode("app%3Ddb%2Ctier+x"), "app=db,tier x");
        assert_eq!(
            query_param("a=1&labelSelector=app%3Ddb", "labelSelector").as_deref(),
            Some("app=db")
        );
    }
}
