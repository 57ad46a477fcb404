//! Finding and reaching a CSI driver's SnapshotMetadata service in a cluster: the
//! `SnapshotMetadataService` object (`cbt.storage.k8s.io/v1beta1`, named after the driver), an
//! audience-scoped ServiceAccount token (TokenRequest), and the TLS settings a client must use
//! (only the object's CA, the host of its address as server name), as contracts §4 describes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::{Client, CustomResource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// API group of the SnapshotMetadataService CRD.
pub const GROUP: &str = "cbt.storage.k8s.io";
/// The only served version (v1alpha1 was dropped without conversion in external-snapshot-metadata
/// v1.0.0).
pub const VERSION: &str = "v1beta1";
/// Shortest token lifetime the API server accepts in a TokenRequest.
pub const MIN_TOKEN_SECONDS: i64 = 600;

/// `spec` of a SnapshotMetadataService: where the driver's metadata sidecar listens.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cbt.storage.k8s.io",
    version = "v1beta1",
    kind = "SnapshotMetadataService",
    plural = "snapshotmetadataservices",
    shortname = "sms"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMetadataServiceSpec {
    /// gRPC `host:port` of the sidecar (usually a Service DNS name).
    pub address: String,
    /// Audience a client's token must carry.
    pub audience: String,
    /// PEM CA bundle the sidecar's certificate chains to (base64 in JSON).
    #[schemars(with = "String")]
    pub ca_cert: ByteString,
}

/// Everything a client needs to reach one driver's metadata service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataEndpoint {
    /// CSI driver name (the object's name).
    pub driver: String,
    /// `host:port` as the object gives it.
    pub address: String,
    /// Audience for the token.
    pub audience: String,
    /// The CA bundle: the only roots the client trusts.
    pub ca_pem: Vec<u8>,
    /// TLS server name: the host part of the address.
    pub server_name: String,
}

impl MetadataEndpoint {
    /// Checks and converts a SnapshotMetadataService.
    ///
    /// # Errors
    /// [`Error::MetadataService`] when the address has no port or the CA is not PEM.
    pub fn from_object(sms: &SnapshotMetadataService) -> Result<Self, Error> {
        let driver = sms.metadata.name.clone().unwrap_or_default();
        let bad = |problem: String| Error::MetadataService {
            driver: driver.clone(),
            problem,
        };
        let address = sms.spec.address.trim().to_string();
        let server_name = host_of(&address).ok_or_else(|| {
            bad(format!(
                "spec.address {address:?} is not host:port (e.g. csi-snapshot-metadata.kube-system:6443)"
            ))
        })?;
        let ca_pem = sms.spec.ca_cert.0.clone();
        if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(bad(
                "spec.caCert holds no PEM certificate (it must be the base64 of a PEM CA bundle)"
                    .into(),
            ));
        }
        if sms.spec.audience.trim().is_empty() {
            return Err(bad("spec.audience is empty".into()));
        }
        Ok(Self {
            driver,
            address,
            audience: sms.spec.audience.clone(),
            ca_pem,
            server_name,
        })
    }

    /// The gRPC client configuration: TLS to the address, only this CA, its host as name.
    pub fn client_config(&self) -> cbt_csi::ClientConfig {
        sidecar_client_config(&self.address, self.ca_pem.clone(), &self.server_name)
    }
}

/// TLS to a metadata sidecar at `address`, trusting only `ca_pem` and checking `server_name`:
/// the one place both the orchestrator's checks and the mover build this (no system roots, so
/// a certificate from any other CA is refused).
pub fn sidecar_client_config(
    address: &str,
    ca_pem: Vec<u8>,
    server_name: &str,
) -> cbt_csi::ClientConfig {
    cbt_csi::ClientConfig::new(format!("https://{address}"))
        .with_ca_pem(ca_pem)
        .with_server_name(server_name.to_string())
}

/// The host of `host:port` (IPv6 in brackets allowed), if a port is present.
fn host_of(address: &str) -> Option<String> {
    split_address(address).map(|(host, _)| host)
}

/// Splits a `spec.address` into host and port (IPv6 in brackets allowed); `None` without a
/// valid port or with an empty host.
pub fn split_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = match address.strip_prefix('[') {
        Some(rest) => rest.split_once("]:")?,
        None => address.rsplit_once(':')?,
    };
    let port = port.parse::<u16>().ok()?;
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// Reads the SnapshotMetadataService of `driver`.
///
/// # Errors
/// [`Error::NoMetadataService`] when the object (or its CRD) is missing, [`Error::Api`] for
/// other API failures, [`Error::MetadataService`] when the object is unusable.
pub async fn discover(
    client: &Client,
    cluster: &str,
    driver: &str,
) -> Result<MetadataEndpoint, Error> {
    let api: Api<SnapshotMetadataService> = Api::all(client.clone());
    match api.get_opt(driver).await {
        Ok(Some(sms)) => MetadataEndpoint::from_object(&sms),
        Ok(None) => Err(Error::NoMetadataService {
            cluster: cluster.to_string(),
            driver: driver.to_string(),
        }),
        // An API server without the CRD answers 404 for the whole resource, which kube reports
        // as an error rather than an absent object.
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::NoMetadataService {
            cluster: cluster.to_string(),
            driver: driver.to_string(),
        }),
        Err(e) => Err(Error::api(
            cluster,
            "get",
            "SnapshotMetadataService",
            driver,
            e,
        )),
    }
}

/// Asks the API server for a token of ServiceAccount `namespace/name` for `audience`
/// (TokenRequest), valid for `lifetime` (at least 600 s, as the API server requires).
///
/// # Errors
/// [`Error::Api`] (403 when the caller may not create `serviceaccounts/token`), or
/// [`Error::MetadataService`] if the answer carries no token.
pub async fn request_token(
    client: &Client,
    cluster: &str,
    namespace: &str,
    name: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<(String, Duration), Error> {
    let secs = i64::try_from(lifetime.as_secs())
        .unwrap_or(i64::MAX)
        .max(MIN_TOKEN_SECONDS);
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(secs),
            bound_object_ref: None,
        }),
        ..Default::default()
    };
    let object = format!("{namespace}/{name}");
    let answer = api
        .create_token_request(name, &PostParams::default(), &req)
        .await
        .map_err(|e| Error::api(cluster, "create token for", "ServiceAccount", &object, e))?;
    let token = answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::MetadataService {
            driver: String::new(),
            problem: format!("the TokenRequest for {object} returned no token"),
        })?;
    Ok((token, Duration::from_secs(secs.unsigned_abs())))
}

/// A [`cbt_csi::client::TokenSource`] that mints audience-scoped tokens through TokenRequest and reuses
/// one until a minute before it expires, so a long, resumed listing keeps a valid token.
#[derive(Clone)]
pub struct TokenRequestSource {
    client: Client,
    cluster: String,
    namespace: String,
    name: String,
    audience: String,
    lifetime: Duration,
    cached: Arc<tokio::sync::Mutex<Option<(String, Instant)>>>,
}

impl std::fmt::Debug for TokenRequestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequestSource")
            .field(
                "service_account",
                &format!("{}/{}", self.namespace, self.name),
            )
            .field("audience", &self.audience)
            .finish()
    }
}

impl TokenRequestSource {
    /// Tokens of ServiceAccount `namespace/name` for `audience`.
    pub fn new(client: Client, cluster: &str, namespace: &str, name: &str, audience: &str) -> Self {
        Self {
            client,
            cluster: cluster.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            audience: audience.to_string(),
            lifetime: Duration::from_secs(600),
            cached: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Mints (or reuses) a token.
    ///
    /// # Errors
    /// As [`request_token`].
    pub async fn fetch(&self) -> Result<String, Error> {
        let mut cached = self.cached.lock().await;
        if let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let (token, valid) = request_token(
            &self.client,
            &self.cluster,
            &self.namespace,
            &self.name,
            &self.audience,
            self.lifetime,
        )
        .await?;
        let until = Instant::now() + valid.saturating_sub(Duration::from_secs(60));
        *cached = Some((token.clone(), until));
        Ok(token)
    }
}

#[async_trait::async_trait]
impl cbt_csi::client::TokenSource for TokenRequestSource {
    async fn token(&self) -> Result<String, String> {
        self.fetch().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sms(address: &str, ca: &str) -> SnapshotMetadataService {
        let mut o = SnapshotMetadataService::new(
            "hostpath.csi.k8s.io",
            SnapshotMetadataServiceSpec {
                address: address.into(),
                audience: "aud".into(),
                ca_cert: ByteString(ca.as_bytes().to_vec()),
            },
        );
        o.metadata.name = Some("hostpath.csi.k8s.io".into());
        o
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_server_name_is_the_host_of_the_address() {
        let e = MetadataEndpoint::from_object(&sms("svc.ns:6443", PEM)).expect("valid");
        assert_eq!(e.server_name, "svc.ns");
        assert_eq!(e.client_config().endpoint, "https://svc.ns:6443");
        let e = MetadataEndpoint::from_object(&sms("[::1]:50051", PEM)).expect("valid");
        assert_eq!(e.server_name, "::1");
    }

    #[test]
    fn unusable_objects_are_refused() {
        for (addr, ca) in [("svc.ns", PEM), ("svc.ns:http", PEM), ("svc:1", "not pem")] {
            assert!(
                matches!(
                    MetadataEndpoint::from_object(&sms(addr, ca)),
                    Err(Error::MetadataService { .. })
                ),
                "{addr} {ca}"
            );
        }
    }

    #[test]
    fn the_ca_is_base64_in_json() {
        let json = serde_json::to_value(sms("a:1", PEM)).expect("serializes");
        assert_eq!(json["apiVersion"], "cbt.storage.k8s.io/v1beta1");
        assert!(
            json["spec"]["caCert"]
                .as_str()
                .is_some_and(|s| s.starts_with("LS0tLS1"))
        );
    }
}
