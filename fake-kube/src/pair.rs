//! Two fake clusters over one storage backend: what a snapshot migration between clusters
//! (snapshift) runs against, started the same way by every test that drives one.

use crate::{ApiError, FakeKube, FakeKubeBuilder, SharedBackend};

/// The origin cluster `east` and the destination `west`, sharing `backend` (a snapshot cut
/// in one is a storage snapshot the other can import).
pub struct ClusterPair {
    /// The storage both clusters see.
    pub backend: SharedBackend,
    /// The origin.
    pub east: FakeKube,
    /// The destination.
    pub west: FakeKube,
}

impl ClusterPair {
    /// Starts `east` and `west` from their builders over one new shared backend (replacing
    /// any backend the builders set).
    ///
    /// # Errors
    /// When a server cannot bind its port.
    pub async fn start(east: FakeKubeBuilder, west: FakeKubeBuilder) -> std::io::Result<Self> {
        let backend = SharedBackend::new();
        let east = east.backend(backend.clone()).start().await?;
        let west = west.backend(backend.clone()).start().await?;
        Ok(ClusterPair {
            backend,
            east,
            west,
        })
    }

    /// Seeds the PVCs the migration tests move, in namespace `ns` of `east`: `db` (2Gi,
    /// Block, ReadWriteOnce, label `app=db`) and `web` (1Gi, Filesystem, ReadWriteMany,
    /// `app=web`).
    ///
    /// # Errors
    /// As [`FakeKube::seed_pvc`].
    pub fn seed_db_and_web(&self, ns: &str) -> Result<(), ApiError> {
        self.east.seed_pvc(
            ns,
            "db",
            "2Gi",
            "Block",
            &["ReadWriteOnce"],
            &[("app", "db")],
        )?;
        self.east.seed_pvc(
            ns,
            "web",
            "1Gi",
            "Filesystem",
            &["ReadWriteMany"],
            &[("app", "web")],
        )?;
        Ok(())
    }
}
