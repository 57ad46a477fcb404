//! Building clients from kubeconfig the way kubectl resolves it.
//!
//! An explicit kubeconfig path wins; otherwise `KUBECONFIG` (a list of files,
//! merged first-wins) or `~/.kube/config`. The context is the one named, else
//! the current-context. Each side of a migration may use its own file.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::Error;

/// Where to find one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterTarget {
    /// Kubeconfig file; `None` = `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Context; `None` = current-context.
    pub context: Option<String>,
}

/// A connected cluster.
#[derive(Clone)]
pub struct Cluster {
    /// Client for the context.
    pub client: kube::Client,
    /// Context name (used in messages and provenance).
    pub context: String,
    /// API server URL.
    pub server: String,
    /// The context's default namespace.
    pub default_namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("context", &self.context)
            .field("server", &self.server)
            .finish()
    }
}

/// Loads the kubeconfig for a target; returns it with a description of its origin.
///
/// # Errors
/// [`Error::Kubeconfig`] when a file is missing or malformed.
pub fn load_kubeconfig(target: &ClusterTarget) -> Result<(Kubeconfig, String), Error> {
    match &target.kubeconfig {
        Some(path) => {
            let origin = path.display().to_string();
            Kubeconfig::read_from(path)
                .map(|kc| (kc, origin.clone()))
                .map_err(|source| Error::Kubeconfig { origin, source })
        }
        None => {
            let origin = match std::env::var_os("KUBECONFIG") {
                Some(v) if !v.is_empty() => format!("KUBECONFIG={}", v.to_string_lossy()),
                _ => "~/.kube/config".to_string(),
            };
            Kubeconfig::read()
                .map(|kc| (kc, origin.clone()))
                .map_err(|source| Error::Kubeconfig { origin, source })
        }
    }
}

/// Connects to the target's context.
///
/// # Errors
/// Missing/malformed kubeconfig, unknown or absent context, unusable client settings.
pub async fn connect(target: &ClusterTarget) -> Result<Cluster, Error> {
    let (kubeconfig, origin) = load_kubeconfig(target)?;
    let context = match target
        .context
        .clone()
        .or_else(|| kubeconfig.current_context.clone())
    {
        Some(c) => c,
        None => return Err(Error::NoContext { origin }),
    };
    if !kubeconfig.contexts.iter().any(|c| c.name == context) {
        let available: Vec<&str> = kubeconfig
            .contexts
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        return Err(Error::ContextNotFound {
            context,
            origin,
            available: if available.is_empty() {
                "none".into()
            } else {
                available.join(", ")
            },
        });
    }
    let options = KubeConfigOptions {
        context: Some(context.clone()),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| Error::Kubeconfig {
            origin: format!("{origin} (context {context})"),
            source,
        })?;
    // Our RetryPolicy decides retries (bounded by deadlines); kube's layer would retry up to 15 times.
    config.default_retry = false;
    let server = config.cluster_url.to_string();
    let default_namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).map_err(|source| Error::Client {
        context: context.clone(),
        source: Box::new(source),
    })?;
    Ok(Cluster {
        client,
        context,
        server,
        default_namespace,
    })
}
