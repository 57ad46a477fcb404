//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it.
//!
//! Owns acquiring, renewing and releasing one Lease, and the [`Leadership`]
//! flag the reconciler checks before every write. The flag expires on its own
//! one lease duration after the last successful renewal (measured from before
//! that request was sent), so a replica cut off from the API server stops
//! writing before another one can take the Lease over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::Error;

/// Whether this replica may write now.
#[derive(Clone, Debug)]
pub struct Leadership(Arc<LeaderState>);

#[derive(Debug)]
struct LeaderState {
    always: bool,
    valid_until: Mutex<Option<Instant>>,
    ever: AtomicBool,
}

impl Leadership {
    /// A replica that is always the leader (single replica, tests).
    pub fn always() -> Self {
        Self(Arc::new(LeaderState {
            always: true,
            valid_until: Mutex::new(None),
            ever: AtomicBool::new(true),
        }))
    }

    /// A replica that is leader only while it holds a Lease.
    pub fn elected() -> Self {
        Self(Arc::new(LeaderState {
            always: false,
            valid_until: Mutex::new(None),
            ever: AtomicBool::new(false),
        }))
    }

    /// True while this replica holds the Lease (or is always leader).
    pub fn is_leader(&self) -> bool {
        if self.0.always {
            return true;
        }
        let until = *self.0.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    fn grant(&self, until: Instant) {
        *self.0.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
        self.0.ever.store(true, Ordering::Relaxed);
    }

    fn revoke(&self) {
        *self.0.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// True once this replica has been leader at least once.
    pub fn was_leader(&self) -> bool {
        self.0.ever.load(Ordering::Relaxed)
    }
}

/// Where the Lease lives and how it is timed.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a holder's claim lasts without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and a follower retries).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Defaults like client-go's (15 s lease, 2 s retry).
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One attempt to acquire or renew; true if we hold the Lease afterwards.
///
/// # Errors
/// API errors other than a lost race (409), which is "not leader".
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let now = now_micro();
    let existing = api.get_opt(&cfg.name).await?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mine = holder == cfg.identity;
    if !mine && !holder.is_empty() {
        let duration = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.as_second().saturating_add(duration) < now.0.as_second());
        if !expired {
            return Ok(false);
        }
    }
    let mut new_spec = spec.clone();
    new_spec.holder_identity = Some(cfg.identity.clone());
    new_spec.lease_duration_seconds = Some(secs);
    new_spec.renew_time = Some(now.clone());
    if !mine {
        new_spec.acquire_time = Some(now);
        new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    lease.spec = Some(new_spec);
    // The resourceVersion read above makes a concurrent takeover fail with 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up if we hold it, so another replica takes over at once.
///
/// # Errors
/// API errors.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Holds the Lease until `stop` turns true: renews every retry period, keeps
/// `leadership` current, and releases the Lease on the way out.
///
/// # Errors
/// Only when the Lease API itself is unusable (403, 404 on the resource):
/// transient failures just drop leadership until the next success.
pub async fn hold(
    client: kube::Client,
    cfg: LeaseConfig,
    leadership: Leadership,
    mut stop: watch::Receiver<bool>,
    on_change: impl Fn(bool) + Send,
) -> Result<(), Error> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let object = format!("{}/{}", cfg.namespace, cfg.name);
    let mut was = false;
    loop {
        let started = Instant::now();
        match try_acquire(&api, &cfg).await {
            Ok(true) => leadership.grant(started + cfg.lease_duration),
            Ok(false) => leadership.revoke(),
            Err(e) => {
                leadership.revoke();
                if matches!(&e, kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404)) {
                    on_change(false);
                    return Err(Error::api("in-cluster", "update", "Lease", object, e));
                }
                tracing::warn!(error = %e, "cannot renew the leader Lease");
            }
        }
        let now = leadership.is_leader();
        if now != was {
            tracing::info!(leader = now, identity = %cfg.identity, "leadership changed");
            on_change(now);
            was = now;
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.retry_period) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            leadership.revoke();
            on_change(false);
            if let Err(e) = release(&api, &cfg).await {
                tracing::warn!(error = %e, "cannot release the leader Lease");
            }
            return Ok(());
        }
    }
}
