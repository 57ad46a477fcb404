//! ServiceAccount tokens: the TokenRequest issuer and the TokenReview authenticator.
//!
//! Tokens are random opaque strings (not JWTs) held in a [`TokenRegistry`] per fake cluster.
//! The registry decides from what it minted: unknown, revoked or expired tokens and audience
//! mismatches are rejected with a [`TokenRejection`]. Whether the ServiceAccount (and the pod a
//! token is bound to) still exists is checked against the store by the TokenReview endpoint,
//! as the real authenticator does with the token's uid claims.
//!
//! It must not authorize anything: who may request tokens for whom is RBAC's business.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};

use crate::store::{ApiError, Cause, ResourceType, Store};
use crate::values::{rfc3339_from_unix_nanos, unix_nanos_now};

/// The audience tokens get when a TokenRequest names none (the API server's own).
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Shortest lifetime a TokenRequest may ask for (10 minutes, as the API server validates).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;

/// Longest lifetime a TokenRequest may ask for (2^32 seconds).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;

/// Lifetime when a TokenRequest or projected token names none (one hour).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

/// The ServiceAccount a token is issued for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountId {
    /// Namespace of the ServiceAccount.
    pub namespace: String,
    /// Name of the ServiceAccount.
    pub name: String,
    /// `metadata.uid` of the ServiceAccount when the token was minted.
    pub uid: String,
}

/// The object a token is bound to (a pod for projected tokens); the token dies with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundObject {
    /// Kind, e.g. `Pod`.
    pub kind: String,
    /// Name in the ServiceAccount's namespace.
    pub name: String,
    /// uid of the object the token was bound to.
    pub uid: String,
}

/// One token the registry issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintedToken {
    /// The bearer token string.
    pub token: String,
    /// Whom it authenticates as.
    pub service_account: ServiceAccountId,
    /// Audiences it is valid for.
    pub audiences: Vec<String>,
    /// Issue time, Unix seconds on the registry's clock.
    pub issued_at_unix: i64,
    /// Expiry, Unix seconds on the registry's clock.
    pub expires_at_unix: i64,
    /// Object the token is bound to, if any.
    pub bound_object: Option<BoundObject>,
}

impl MintedToken {
    /// `status.expirationTimestamp` as the API server writes it.
    pub fn expiration_timestamp(&self) -> String {
        rfc3339_from_unix_nanos(self.expires_at_unix.saturating_mul(1_000_000_000))
    }
}

/// The identity a TokenReview reports for an accepted token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenUser {
    /// `system:serviceaccount:<ns>:<name>`.
    pub username: String,
    /// The ServiceAccount's uid.
    pub uid: String,
    /// `system:serviceaccounts`, `system:serviceaccounts:<ns>`, `system:authenticated`.
    pub groups: Vec<String>,
    /// Extra attributes (pod name and uid for pod-bound tokens).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// An accepted token: who it is and which of the requested audiences it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// The authenticated user.
    pub user: TokenUser,
    /// Intersection of the requested audiences and the token's.
    pub audiences: Vec<String>,
    /// The registry's record of the token.
    pub token: MintedToken,
}

/// Why a TokenReview did not authenticate a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Never minted here, or revoked.
    #[error("invalid bearer token")]
    Unknown,
    /// Past its expiry.
    #[error("invalid bearer token, service account token has expired")]
    Expired,
    /// None of the requested audiences is one of the token's.
    #[error(
        "invalid bearer token, token audiences {token:?} is invalid for the target audiences {requested:?}"
    )]
    AudienceMismatch {
        /// Audiences the token carries.
        token: Vec<String>,
        /// Audiences the review asked for.
        requested: Vec<String>,
    },
    /// The ServiceAccount was deleted (or recreated with another uid) since minting.
    #[error("invalid bearer token, service account {namespace}/{name} has been deleted")]
    ServiceAccountDeleted {
        /// Namespace of the account.
        namespace: String,
        /// Name of the account.
        name: String,
    },
    /// The pod the token is bound to is gone.
    #[error("invalid bearer token, {kind} {name} has been deleted")]
    BoundObjectDeleted {
        /// Kind of the bound object.
        kind: String,
        /// Name of the bound object.
        name: String,
    },
}

#[derive(Debug, Default)]
struct Inner {
    tokens: BTreeMap<String, MintedToken>,
    clock_offset_secs: i64,
}

/// The tokens one fake cluster issued, with an adjustable clock; clones share state.
#[derive(Clone, Debug, Default)]
pub struct TokenRegistry {
    inner: Arc<Mutex<Inner>>,
}

impl TokenRegistry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now on the registry's clock (system time plus [`Self::advance_clock`] offsets), Unix seconds.
    pub fn now_unix(&self) -> i64 {
        unix_nanos_now().div_euclid(1_000_000_000) + self.lock().clock_offset_secs
    }

    /// Moves the registry's clock forward, so tokens expire without waiting.
    pub fn advance_clock(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        let mut inner = self.lock();
        inner.clock_offset_secs = inner.clock_offset_secs.saturating_add(secs);
    }

    /// Issues a token for `sa` valid for `audiences` (the API server's audience if empty).
    pub fn mint(
        &self,
        sa: &ServiceAccountId,
        audiences: &[String],
        expiration_seconds: i64,
        bound_object: Option<BoundObject>,
    ) -> MintedToken {
        let now = self.now_unix();
        let audiences = if audiences.is_empty() {
            vec![API_SERVER_AUDIENCE.to_string()]
        } else {
            audiences.to_vec()
        };
        let minted = MintedToken {
            token: random_string(TOKEN_ALPHABET, 43),
            service_account: sa.clone(),
            audiences,
            issued_at_unix: now,
            expires_at_unix: now.saturating_add(expiration_seconds),
            bound_object,
        };
        self.lock()
            .tokens
            .insert(minted.token.clone(), minted.clone());
        minted
    }

    /// Checks a token against what was minted (not against the store; see the module docs).
    ///
    /// # Errors
    /// The [`TokenRejection`] a TokenReview reports in `status.error`.
    pub fn review(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<Authenticated, TokenRejection> {
        let now = self.now_unix();
        let minted = self
            .lock()
            .tokens
            .get(token)
            .cloned()
            .ok_or(TokenRejection::Unknown)?;
        if now >= minted.expires_at_unix {
            return Err(TokenRejection::Expired);
        }
        let requested: Vec<String> = if audiences.is_empty() {
            vec![API_SERVER_AUDIENCE.to_string()]
        } else {
            audiences.to_vec()
        };
        let common: Vec<String> = requested
            .iter()
            .filter(|a| minted.audiences.contains(a))
            .cloned()
            .collect();
        if common.is_empty() {
            return Err(TokenRejection::AudienceMismatch {
                token: minted.audiences.clone(),
                requested,
            });
        }
        let sa = &minted.service_account;
        let mut extra = BTreeMap::new();
        if let Some(b) = &minted.bound_object
            && b.kind == "Pod"
        {
            extra.insert(
                "authentication.kubernetes.io/pod-name".to_string(),
                vec![b.name.clone()],
            );
            extra.insert(
                "authentication.kubernetes.io/pod-uid".to_string(),
                vec![b.uid.clone()],
            );
        }
        Ok(Authenticated {
            user: TokenUser {
                username: format!("system:serviceaccount:{}:{}", sa.namespace, sa.name),
                uid: sa.uid.clone(),
                groups: vec![
                    "system:serviceaccounts".to_string(),
                    format!("system:serviceaccounts:{}", sa.namespace),
                    "system:authenticated".to_string(),
                ],
                extra,
            },
            audiences: common,
            token: minted,
        })
    }

    /// Every token minted and not revoked, oldest first.
    pub fn minted(&self) -> Vec<MintedToken> {
        let mut all: Vec<MintedToken> = self.lock().tokens.values().cloned().collect();
        all.sort_by_key(|t| t.issued_at_unix);
        all
    }

    /// Forgets a token, so reviews reject it as unknown; true if it existed.
    pub fn revoke(&self, token: &str) -> bool {
        self.lock().tokens.remove(token).is_some()
    }

    /// Makes a token expire now (reviews reject it as expired); true if it exists.
    pub fn expire(&self, token: &str) -> bool {
        let now = self.now_unix();
        match self.lock().tokens.get_mut(token) {
            Some(t) => {
                t.expires_at_unix = now;
                true
            }
            None => false,
        }
    }
}

impl crate::FakeKube {
    /// The cluster's token registry: what TokenRequests and projected volumes minted.
    pub fn tokens(&self) -> &TokenRegistry {
        &self.state.tokens
    }
}

/// Reviews a token and checks that its ServiceAccount and bound object still exist.
pub(crate) fn review_in_cluster(
    store: &Store,
    registry: &TokenRegistry,
    token: &str,
    audiences: &[String],
) -> Result<Authenticated, TokenRejection> {
    let ok = registry.review(token, audiences)?;
    let sa = &ok.token.service_account;
    let live_uid = store
        .get(&crate::kinds::SERVICE_ACCOUNTS, &sa.namespace, &sa.name)
        .ok()
        .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
    if live_uid.as_deref() != Some(sa.uid.as_str()) {
        return Err(TokenRejection::ServiceAccountDeleted {
            namespace: sa.namespace.clone(),
            name: sa.name.clone(),
        });
    }
    if let Some(b) = &ok.token.bound_object {
        let live = (b.kind == "Pod")
            .then(|| store.get(&crate::kinds::PODS, &sa.namespace, &b.name).ok())
            .flatten();
        if live.as_ref().and_then(|p| p["metadata"]["uid"].as_str()) != Some(b.uid.as_str()) {
            return Err(TokenRejection::BoundObjectDeleted {
                kind: b.kind.clone(),
                name: b.name.clone(),
            });
        }
    }
    Ok(ok)
}

/// TokenRequest objects, only for error messages (the resource is the `token` subresource).
static TOKEN_REQUESTS: ResourceType = ResourceType {
    group: "authentication.k8s.io",
    version: "v1",
    plural: "tokenrequests",
    kind: "TokenRequest",
    namespaced: true,
    status_subresource: false,
    crd: false,
};

fn string_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Validates `spec.expirationSeconds` as the API server does (apiserver validation text).
pub(crate) fn validate_expiration(field: &str, seconds: i64) -> Option<Cause> {
    let message = if seconds < MIN_EXPIRATION_SECONDS {
        "may not specify a duration less than 10 minutes"
    } else if seconds > MAX_EXPIRATION_SECONDS {
        "may not specify a duration larger than 2^32 seconds"
    } else {
        return None;
    };
    Some(Cause {
        reason: "FieldValueInvalid",
        field: field.to_string(),
        message: format!("Invalid value: {seconds}: {message}"),
    })
}

/// POST `serviceaccounts/{name}/token`: mints a token and answers the TokenRequest.
pub(crate) fn token_request(
    store: &Store,
    registry: &TokenRegistry,
    forbidden: bool,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    if forbidden {
        return Err(ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "serviceaccounts \"{name}\" is forbidden: User \"fake-kube-client\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"{ns}\""
            ),
            details: Some(json!({"name": name, "kind": "serviceaccounts"})),
        });
    }
    let sa = store.get(&crate::kinds::SERVICE_ACCOUNTS, ns, name)?;
    let spec = &body["spec"];
    let expiration = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_EXPIRATION_SECONDS,
        v => v.as_i64().ok_or_else(|| {
            ApiError::bad_request("spec.expirationSeconds must be an integer".to_string())
        })?,
    };
    if let Some(cause) = validate_expiration("spec.expirationSeconds", expiration) {
        return Err(ApiError::invalid(&TOKEN_REQUESTS, name, &[cause]));
    }
    let bound = match spec["boundObjectRef"]["name"].as_str() {
        None => None,
        Some(pod_name) => {
            let kind = spec["boundObjectRef"]["kind"].as_str().unwrap_or("");
            if kind != "Pod" {
                return Err(ApiError::invalid(
                    &TOKEN_REQUESTS,
                    name,
                    &[Cause {
                        reason: "FieldValueNotSupported",
                        field: "spec.boundObjectRef.kind".into(),
                        message: format!(
                            "Unsupported value: \"{kind}\": fake-kube binds tokens only to pods"
                        ),
                    }],
                ));
            }
            let pod = store.get(&crate::kinds::PODS, ns, pod_name)?;
            let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
            if let Some(want) = spec["boundObjectRef"]["uid"].as_str()
                && want != uid
            {
                return Err(ApiError {
                    code: 409,
                    reason: "Conflict",
                    message: format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record ({uid}). The object might have been deleted and then recreated"
                    ),
                    details: None,
                });
            }
            Some(BoundObject {
                kind: "Pod".into(),
                name: pod_name.to_string(),
                uid,
            })
        }
    };
    let sa_ref = ServiceAccountId {
        namespace: ns.to_string(),
        name: name.to_string(),
        uid: sa["metadata"]["uid"].as_str().unwrap_or("").to_string(),
    };
    let minted = registry.mint(&sa_ref, &string_list(&spec["audiences"]), expiration, bound);
    let mut spec_out = json!({
        "audiences": minted.audiences,
        "expirationSeconds": expiration,
    });
    if !spec["boundObjectRef"].is_null() {
        spec_out["boundObjectRef"] = spec["boundObjectRef"].clone();
    }
    Ok(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": crate::values::rfc3339_now()},
        "spec": spec_out,
        "status": {"token": minted.token, "expirationTimestamp": minted.expiration_timestamp()},
    }))
}

/// POST `tokenreviews`: answers with the review's status (nothing is stored, as upstream).
pub(crate) fn token_review(
    store: &Store,
    registry: &TokenRegistry,
    body: &Value,
) -> Result<Value, ApiError> {
    let token = body["spec"]["token"].as_str().unwrap_or("");
    let audiences = string_list(&body["spec"]["audiences"]);
    let mut out = body.clone();
    if !out.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenReview");
    if !out["metadata"].is_object() {
        out["metadata"] = json!({});
    }
    out["metadata"]["creationTimestamp"] = Value::Null;
    out["status"] = match review_in_cluster(store, registry, token, &audiences) {
        Ok(ok) => json!({
            "authenticated": true,
            "user": {
                "username": ok.user.username,
                "uid": ok.user.uid,
                "groups": ok.user.groups,
                "extra": ok.user.extra,
            },
            "audiences": ok.audiences,
        }),
        Err(rejection) => json!({
            "authenticated": false,
            "user": {},
            "error": rejection.to_string(),
        }),
    };
    Ok(out)
}

/// The alphabet of token strings (URL-safe base64 characters).
const TOKEN_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The alphabet apimachinery's `rand.String` uses for generated name suffixes.
pub(crate) const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A random string over `alphabet`; std's per-instance random SipHash keys are the entropy.
pub(crate) fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut counter: u64 = 0;
    while out.len() < len {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(counter);
        h.write_i64(unix_nanos_now());
        let mut bits = h.finish();
        counter += 1;
        // Six characters per hash keeps well inside 64 bits for alphabets up to 64 symbols.
        for _ in 0..6 {
            if out.len() == len {
                break;
            }
            let i = usize::try_from(bits % alphabet.len() as u64).unwrap_or(0);
            out.push(char::from(alphabet[i]));
            bits /= alphabet.len() as u64;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sa() -> ServiceAccountId {
        ServiceAccountId {
            namespace: "ns".into(),
            name: "backup".into(),
            uid: "u1".into(),
        }
    }

    #[test]
    fn review_checks_audience_expiry_and_revocation() {
        let reg = TokenRegistry::default();
        let t = reg.mint(&sa(), &["aud-a".into(), "aud-b".into()], 600, None);
        assert_ne!(t.token, reg.mint(&sa(), &[], 600, None).token);
        let ok = reg.review(&t.token, &["aud-b".into(), "x".into()]).unwrap();
        assert_eq!(ok.user.username, "system:serviceaccount:ns:backup");
        assert_eq!(ok.audiences, vec!["aud-b".to_string()]);
        assert!(matches!(
            reg.review(&t.token, &["x".into()]),
            Err(TokenRejection::AudienceMismatch { .. })
        ));
        // No audiences in a review means the API server's own, which this token lacks.
        assert!(reg.review(&t.token, &[]).is_err());
        reg.advance_clock(Duration::from_secs(601));
        assert_eq!(
            reg.review(&t.token, &["aud-a".into()]),
            Err(TokenRejection::Expired)
        );
        let t2 = reg.mint(&sa(), &["aud-a".into()], 600, None);
        assert!(reg.review(&t2.token, &["aud-a".into()]).is_ok());
        assert!(reg.expire(&t2.token));
        assert_eq!(
            reg.review(&t2.token, &["aud-a".into()]),
            Err(TokenRejection::Expired)
        );
        assert!(reg.revoke(&t2.token));
        assert_eq!(
            reg.review(&t2.token, &["aud-a".into()]),
            Err(TokenRejection::Unknown)
        );
        assert_eq!(reg.minted().len(), 2);
    }

    #[test]
    fn expiration_bounds() {
        assert!(validate_expiration("f", 599).is_some());
        assert!(validate_expiration("f", 600).is_none());
        assert!(validate_expiration("f", 1 << 32).is_none());
        assert!(validate_expiration("f", (1 << 32) + 1).is_some());
    }

    #[test]
    fn random_strings_use_the_alphabet() {
        let s = random_string(NAME_ALPHABET, 5);
        assert_eq!(s.len(), 5);
        assert!(s.bytes().all(|b| NAME_ALPHABET.contains(&b)));
    }
}
