//! Building clients from kubeconfig the way kubectl resolves it.
//!
//! An explicit kubeconfig path wins; otherwise `KUBECONFIG` (a list of files,
//! merged first-wins, missing ones skipped) or `~/.kube/config`. The context is the one named, else
//! the current-context. Each side of a migration may use its own file.

use std::path::{Path, PathBuf};

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
/// Like kubectl: an explicit path must exist; files listed in `KUBECONFIG` that
/// do not exist are skipped (the others are merged, first wins); without
/// `KUBECONFIG`, `~/.kube/config` is read.
///
/// # Errors
/// [`Error::NoKubeconfig`] when no file is found (or a named one does not exist),
/// [`Error::Kubeconfig`] when one cannot be read or parsed.
pub fn load_kubeconfig(target: &ClusterTarget) -> Result<(Kubeconfig, String), Error> {
    let fix = "set KUBECONFIG, or name a kubeconfig file explicitly".to_string();
    if let Some(path) = &target.kubeconfig {
        let origin = path.display().to_string();
        if is_missing(path) {
            return Err(Error::NoKubeconfig {
                tried: format!("{origin} does not exist"),
                fix: "check the path".into(),
            });
        }
        return Kubeconfig::read_from(path)
            .map(|kc| (kc, origin.clone()))
            .map_err(|source| Error::Kubeconfig { origin, source });
    }
    let listed: Vec<PathBuf> = std::env::var_os("KUBECONFIG")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        let Some(home) = std::env::home_dir() else {
            return Err(Error::NoKubeconfig {
                tried: "KUBECONFIG is unset and the home directory is unknown".into(),
                fix,
            });
        };
        let path = home.join(".kube").join("config");
        if is_missing(&path) {
            return Err(Error::NoKubeconfig {
                tried: format!("KUBECONFIG is unset and {} does not exist", path.display()),
                fix,
            });
        }
        let origin = path.display().to_string();
        return Kubeconfig::read_from(&path)
            .map(|kc| (kc, origin.clone()))
            .map_err(|source| Error::Kubeconfig { origin, source });
    }
    let joined = std::env::join_paths(&listed)
        .map(|j| j.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{listed:?}"));
    let origin = format!("KUBECONFIG={joined}");
    let mut merged: Option<Kubeconfig> = None;
    for path in listed.iter().filter(|p| !is_missing(p)) {
        let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
            origin: path.display().to_string(),
            source,
        })?;
        merged = Some(match merged {
            None => kc,
            Some(m) => m.merge(kc).map_err(|source| Error::Kubeconfig {
                origin: origin.clone(),
                source,
            })?,
        });
    }
    match merged {
        Some(kc) => Ok((kc, origin)),
        None => Err(Error::NoKubeconfig {
            tried: format!("none of the files in {origin} exists"),
            fix,
        }),
    }
}

// kubectl skips missing files (broken symlinks included) but reports unreadable ones.
fn is_missing(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// Connects to the target's context.
///
/// # Errors
/// Missing/malformed kubeconfig, unknown or absent context, unusable client settings.
pub async fn connect(target: &ClusterTarget) -> Result<Cluster, Error> {
    let (kubeconfig, origin) = match load_kubeconfig(target) {
        Ok(found) => found,
        // Like kubectl in a pod: no kubeconfig anywhere, but a service account mounted.
        Err(Error::NoKubeconfig { .. })
            if target.kubeconfig.is_none()
                && target.context.is_none()
                && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() =>
        {
            return connect_in_cluster().await;
        }
        Err(e) => return Err(e),
    };
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
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| Error::Kubeconfig {
            origin: format!("{origin} (context {context})"),
            source,
        })?;
    cluster_from(config, context)
}

/// The client for `config`, with kube's own retries off, named `context` in every error.
fn cluster_from(mut config: kube::Config, context: String) -> Result<Cluster, Error> {
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

/// The pod's own service account, as kubectl uses it when no kubeconfig exists.
async fn connect_in_cluster() -> Result<Cluster, Error> {
    let context = "in-cluster".to_string();
    let config = kube::Config::incluster().map_err(|e| Error::NoKubeconfig {
        tried: format!("no kubeconfig, and the in-cluster configuration is unusable ({e})"),
        fix: "run inside a pod with a service account token, or set KUBECONFIG".into(),
    })?;
    cluster_from(config, context)
}
