//! Failure injection: HTTP-level faults and simulated-driver misbehaviour.
//!
//! HTTP faults are matched against every request before it is routed, so a test
//! can make "the 3rd POST to volumesnapshotcontents" answer 429 or drop the
//! connection. Driver faults change what the simulated snapshot controller does.

use std::sync::{Arc, Mutex, MutexGuard};

/// What a matching request gets instead of its normal answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Answer with this HTTP status and a metav1.Status body (429, 500, 503, ...).
    Status(u16),
    /// Close the connection without an answer (the client sees a reset / incomplete message).
    Reset,
    /// Carry the request out, then answer with this status anyway (a timeout after commit).
    StatusAfterProcessing(u16),
}

/// One HTTP fault rule.
#[derive(Clone, Debug)]
pub struct HttpFault {
    /// Only requests with this method (upper case), if set.
    pub method: Option<String>,
    /// Only requests whose path contains this, if set.
    pub path_contains: Option<String>,
    /// Matching requests to let through before the fault fires.
    pub skip: u32,
    /// How many matching requests fail once `skip` is used up.
    pub times: u32,
    /// What failing requests get.
    pub action: FaultAction,
    /// `Retry-After` seconds to advertise on a Status answer (0 = none).
    pub retry_after_seconds: u32,
}

impl HttpFault {
    /// A fault that fails the next `times` requests of any kind with `status`.
    pub fn status(status: u16, times: u32) -> Self {
        Self {
            method: None,
            path_contains: None,
            skip: 0,
            times,
            action: FaultAction::Status(status),
            retry_after_seconds: 0,
        }
    }

    /// Restricts the fault to one HTTP method.
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Restricts the fault to paths containing `fragment`.
    pub fn path_contains(mut self, fragment: &str) -> Self {
        self.path_contains = Some(fragment.to_string());
        self
    }

    /// Lets `skip` matching requests through first (so `skip(n-1)` fails the n-th).
    pub fn skip(mut self, skip: u32) -> Self {
        self.skip = skip;
        self
    }

    /// Applies the request, then answers with the fault's status instead of the result.
    pub fn after_processing(mut self) -> Self {
        if let FaultAction::Status(code) = self.action {
            self.action = FaultAction::StatusAfterProcessing(code);
        }
        self
    }

    /// Drops the connection instead of answering.
    pub fn reset(mut self) -> Self {
        self.action = FaultAction::Reset;
        self
    }
}

#[derive(Default, Debug)]
struct Inner {
    http: Vec<HttpFault>,
    snapshot_error: Option<String>,
    never_ready: bool,
    controller_paused: bool,
    token_request_forbidden: bool,
    oom_kills: u32,
}

/// The fault switches of one fake server; clones share state.
#[derive(Clone, Default, Debug)]
pub struct Faults {
    inner: Arc<Mutex<Inner>>,
}

impl Faults {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Adds an HTTP fault rule.
    pub fn add_http(&self, fault: HttpFault) {
        self.lock().http.push(fault);
    }

    /// Fails the n-th request from now on (1-based) with `status`.
    pub fn fail_nth_request(&self, n: u32, status: u16) {
        self.add_http(HttpFault::status(status, 1).skip(n.saturating_sub(1)));
    }

    /// Makes the simulated driver fail every dynamic CreateSnapshot with `message` (None heals).
    pub fn set_snapshot_error(&self, message: Option<&str>) {
        self.lock().snapshot_error = message.map(str::to_string);
    }

    /// Makes snapshot contents never report readyToUse=true.
    pub fn set_never_ready(&self, never: bool) {
        self.lock().never_ready = never;
    }

    /// Stops (true) or resumes (false) the simulated controllers, to hold objects in a state.
    pub fn set_controller_paused(&self, paused: bool) {
        self.lock().controller_paused = paused;
    }

    pub(crate) fn controller_paused(&self) -> bool {
        self.lock().controller_paused
    }

    pub(crate) fn snapshot_error(&self) -> Option<String> {
        self.lock().snapshot_error.clone()
    }

    pub(crate) fn never_ready(&self) -> bool {
        self.lock().never_ready
    }

    /// Consumes a matching HTTP fault for this request, if any.
    pub(crate) fn take_http(&self, method: &str, path: &str) -> Option<HttpFault> {
        let mut inner = self.lock();
        for fault in inner.http.iter_mut() {
            if fault.times == 0 {
                continue;
            }
            if fault.method.as_deref().is_some_and(|m| m != method) {
                continue;
            }
            if fault
                .path_contains
                .as_deref()
                .is_some_and(|p| !path.contains(p))
            {
                continue;
            }
            if fault.skip > 0 {
                fault.skip -= 1;
                continue;
            }
            fault.times -= 1;
            return Some(fault.clone());
        }
        None
    }
}

/// Workload faults: token issuance and the simulated kubelet.
impl Faults {
    /// Makes every TokenRequest (`serviceaccounts/<name>/token`) answer 403 Forbidden (false heals).
    pub fn set_token_request_forbidden(&self, forbidden: bool) {
        self.lock().token_request_forbidden = forbidden;
    }

    /// OOM-kills the next `pods` containers the kubelet starts: the process is killed at once
    /// and reported terminated with reason `OOMKilled`, exit code 137.
    pub fn oom_kill_next_pods(&self, pods: u32) {
        self.lock().oom_kills = pods;
    }

    pub(crate) fn token_request_forbidden(&self) -> bool {
        self.lock().token_request_forbidden
    }

    /// Consumes one pending OOM kill, if any.
    pub(crate) fn take_oom_kill(&self) -> bool {
        let mut inner = self.lock();
        if inner.oom_kills > 0 {
            inner.oom_kills -= 1;
            true
        } else {
            false
        }
    }
}
