//! `engine::cbt::plan_cbt_backup` against the file-backed SnapshotMetadata server: which ranges,
//! which parent, what is recorded, and when a full backup replaces a delta.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use cbt_core::lineage::LineageError;
use cbt_core::{ByteRange, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_csi::server::{FileMetadataService, Listen, ServerOptions, spawn};
use cbt_csi::{ClientConfig, MetadataClient};
use cbt_store::engine::cbt::{CbtBackupSpec, CbtPlanError, CbtTarget, DeltaBase, plan_cbt_backup};
use cbt_store::engine::{self, BackupMode, BackupRequest, EngineOptions, FileSource};
use cbt_store::repo::{InitOptions, Repository};
use cbt_store::store::{LocalStore, ObjectStore};

const KIB: u64 = 1024;
const SIZE: u64 = 2 << 20;

fn image(dir: &Path, id: &str, size: u64, writes: &[(u64, u8)]) {
    let f = std::fs::File::create(dir.join(id)).unwrap();
    f.set_len(size).unwrap();
    for &(off, b) in writes {
        f.write_all_at(&[b; 4096], off).unwrap();
    }
}

struct Fixture {
    _t: tempfile::TempDir,
    snaps: std::path::PathBuf,
    repo: Repository,
    client: MetadataClient,
    _server: cbt_csi::server::RunningServer,
    volume: VolumeName,
}

async fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let snaps = t.path().join("snaps");
    std::fs::create_dir(&snaps).unwrap();
    image(&snaps, "h1", SIZE, &[(0, 1), (256 * KIB, 2)]);
    image(
        &snaps,
        "h2",
        SIZE,
        &[(0, 1), (256 * KIB, 3), (KIB * 1024, 4)],
    );
    image(&snaps, "big", 2 * SIZE, &[(0, 1)]);
    let mut o = ServerOptions::new(&snaps);
    o.block_size = 4 * KIB;
    let server = spawn(
        FileMetadataService::new(o).unwrap(),
        Listen::Unix(t.path().join("m.sock")),
        None,
    )
    .await
    .unwrap();
    let client = MetadataClient::connect(ClientConfig::new(server.endpoint()))
        .await
        .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(t.path().join("repo")).unwrap());
    let repo = Repository::init(
        store,
        InitOptions {
            chunk_size: Some(64 * KIB),
            now: Timestamp::from_unix_secs(1),
        },
    )
    .await
    .unwrap();
    Fixture {
        _t: t,
        snaps,
        repo,
        client,
        _server: server,
        volume: VolumeName::new("v").unwrap(),
    }
}

impl Fixture {
    fn spec(&self, id: &str, base: DeltaBase) -> CbtBackupSpec {
        let mut s = CbtBackupSpec::new(
            self.volume.clone(),
            CbtTarget::Csi {
                snapshot_id: id.into(),
            },
        );
        s.base = base;
        s
    }

    /// Plans and runs a backup of image `id` as snapshot `name`, at time `secs`.
    async fn backup(&self, id: &str, name: &str, secs: i64, spec: &CbtBackupSpec) {
        let plan = plan_cbt_backup(&self.repo, &self.client, spec)
            .await
            .unwrap();
        engine::backup(
            &self.repo,
            Arc::new(FileSource::open(self.snaps.join(id)).unwrap()),
            BackupRequest {
                volume: self.volume.clone(),
                snapshot: SnapshotName::new(name).unwrap(),
                mode: plan.mode,
                created: Timestamp::from_unix_secs(secs),
                source_info: plan.source,
                labels: Default::default(),
                chunk_size: None,
                volume_size: plan.volume_size,
            },
            &EngineOptions::default(),
        )
        .await
        .unwrap();
    }
}

fn ranges(v: &[(u64, u64)]) -> RangeSet {
    let mut s = RangeSet::new();
    for &(o, l) in v {
        s.insert(ByteRange::new(o, l).unwrap());
    }
    s
}

#[tokio::test]
async fn latest_base_plans_a_full_then_a_delta_from_the_recorded_handle() {
    let f = fixture().await;
    let first = plan_cbt_backup(&f.repo, &f.client, &f.spec("h1", DeltaBase::Latest))
        .await
        .unwrap();
    match &first.mode {
        BackupMode::Full { allocated: Some(a) } => {
            assert_eq!(a, &ranges(&[(0, 4 * KIB), (256 * KIB, 4 * KIB)]))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(first.volume_size, Some(SIZE));
    assert_eq!(first.source.csi_snapshot_id.as_deref(), Some("h1"));
    assert_eq!(first.source.base_csi_snapshot_id, None);
    assert!(first.notes.is_empty(), "{:?}", first.notes);

    f.backup("h1", "b1", 10, &f.spec("h1", DeltaBase::Latest))
        .await;
    let second = plan_cbt_backup(&f.repo, &f.client, &f.spec("h2", DeltaBase::Latest))
        .await
        .unwrap();
    match &second.mode {
        BackupMode::IncrementalOf { parent, changed } => {
            assert_eq!(parent.snapshot.as_str(), "b1");
            assert_eq!(
                changed,
                &ranges(&[(256 * KIB, 4 * KIB), (1024 * KIB, 4 * KIB)])
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(second.source.base_csi_snapshot_id.as_deref(), Some("h1"));
    assert_eq!(second.source.csi_snapshot_id.as_deref(), Some("h2"));
}

#[tokio::test]
async fn a_latest_backup_without_a_handle_gives_a_full_backup_with_lineage() {
    let f = fixture().await;
    // A backup read without CBT records no CSI handle.
    engine::backup(
        &f.repo,
        Arc::new(FileSource::open(f.snaps.join("h1")).unwrap()),
        BackupRequest {
            volume: f.volume.clone(),
            snapshot: SnapshotName::new("plain").unwrap(),
            mode: BackupMode::Full { allocated: None },
            created: Timestamp::from_unix_secs(5),
            source_info: Default::default(),
            labels: Default::default(),
            chunk_size: None,
            volume_size: None,
        },
        &EngineOptions::default(),
    )
    .await
    .unwrap();
    let plan = plan_cbt_backup(&f.repo, &f.client, &f.spec("h2", DeltaBase::Latest))
        .await
        .unwrap();
    match &plan.mode {
        BackupMode::FullWithParent {
            allocated: Some(_),
            parent,
        } => assert_eq!(parent.snapshot.as_str(), "plain"),
        other => panic!("{other:?}"),
    }
    assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
}

#[tokio::test]
async fn a_refused_delta_fails_unless_a_full_backup_is_allowed() {
    let f = fixture().await;
    f.backup("h1", "b1", 10, &f.spec("h1", DeltaBase::Full))
        .await;
    // Snapshots of different sizes: the server answers FAILED_PRECONDITION (a resize).
    let spec = f.spec("big", DeltaBase::Handle("h1".into()));
    match plan_cbt_backup(&f.repo, &f.client, &spec).await {
        Err(CbtPlanError::Metadata { refused: true, .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut spec = spec;
    spec.fallback_full = true;
    let plan = plan_cbt_backup(&f.repo, &f.client, &spec).await.unwrap();
    match &plan.mode {
        BackupMode::Full { allocated: Some(a) } => assert_eq!(a, &ranges(&[(0, 4 * KIB)])),
        other => panic!("{other:?}"),
    }
    assert_eq!(plan.volume_size, Some(2 * SIZE));
    assert_eq!(plan.source.base_csi_snapshot_id, None);
    assert!(!plan.notes.is_empty());
}

#[tokio::test]
async fn lineage_refusals_and_a_parent_without_base_are_typed() {
    let f = fixture().await;
    f.backup("h1", "b1", 10, &f.spec("h1", DeltaBase::Full))
        .await;
    f.backup(
        "h2",
        "b2",
        20,
        &f.spec("h2", DeltaBase::Handle("h1".into())),
    )
    .await;
    match plan_cbt_backup(
        &f.repo,
        &f.client,
        &f.spec("h2", DeltaBase::Handle("h1".into())),
    )
    .await
    {
        Err(CbtPlanError::Lineage(LineageError::BaseNotLatest { latest, .. })) => {
            assert_eq!(latest.as_str(), "b2")
        }
        other => panic!("{other:?}"),
    }
    let mut spec = f.spec("h2", DeltaBase::Full);
    spec.explicit_parent = Some(SnapshotName::new("b1").unwrap());
    assert!(matches!(
        plan_cbt_backup(&f.repo, &f.client, &spec).await,
        Err(CbtPlanError::ParentWithoutBase { .. })
    ));
}

#[tokio::test]
async fn a_kubernetes_target_records_names_and_warns_without_a_handle() {
    let f = fixture().await;
    cbt_csi::server::write_snapshot_meta(
        &f.snaps,
        "h1",
        &cbt_csi::server::SnapshotMeta {
            volume_id: None,
            namespace: Some("db".into()),
            cbt: None,
        },
    )
    .unwrap();
    let mut spec = f.spec("h1", DeltaBase::Latest);
    spec.target = CbtTarget::Kubernetes {
        namespace: "db".into(),
        snapshot_name: "h1".into(),
        snapshot_handle: None,
    };
    // The Kubernetes API needs a token; the file server takes any when it requires none.
    let client = MetadataClient::connect(
        ClientConfig::new(f.client.config().endpoint.clone()).with_token("t"),
    )
    .await
    .unwrap();
    let plan = plan_cbt_backup(&f.repo, &client, &spec).await.unwrap();
    assert_eq!(plan.source.namespace.as_deref(), Some("db"));
    assert_eq!(plan.source.volume_snapshot.as_deref(), Some("h1"));
    assert_eq!(plan.source.csi_snapshot_id, None);
    assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
}
