//! Where a reconcile reads the cluster: the API server (one-shot reconciles) or, in the
//! running controller, reflector caches for everything that does not guard a write.
//!
//! Owns every read of a reconcile; writes stay in the parent module. It must not decide
//! anything: it only answers "what is there", the same way from both sources.
//!
//! # Guarantees
//! - A running reconcile makes O(1) API reads per member, never a LIST: the subject, its
//!   members' TridentMirrorRelationships and its DellCSIReplicationGroups are GET by name
//!   (every write is computed from them and guarded by their `resourceVersion`; the watch
//!   that triggered the reconcile is a different stream than a cache and may be ahead of
//!   it, so a cached copy would often be our own write's predecessor and end in a
//!   conflict); classes, PVCs, PVs, StorageClasses and our own TMRs/TAMUs (orphans, resync
//!   requests) come from caches.
//! - A cached read may be older than the cluster: whatever is written because of it is
//!   guarded (creates fail on an existing name, patches carry the `resourceVersion`), so a
//!   stale read ends as a conflict and a retry, never as a repeated Dell verb.
//! - The caches are complete before the first reconcile ([`Caches::start`] waits for every
//!   initial list), so "not in the cache" means "not in the cluster" as of that list.

use std::collections::BTreeMap;
use std::future::Future;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::ListParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::super::translate::{
    Backend, ClassView, DellObserved, MANAGED_BY, MANAGED_BY_LABEL, Observed, PvcInfo, Request,
    Subject, SubjectKind, SubjectSource, TridentObserved, dell,
};
use super::super::types::{
    DellCSIReplicationGroup, TridentActionMirrorUpdate, TridentMirrorRelationship,
    VolumeGroupReplication, VolumeGroupReplicationClass, VolumeReplication, VolumeReplicationClass,
};
use super::{Context, OWNER_UID_LABEL, Object};
use crate::Error;
use crate::error::ns_name;

/// Reflector caches of every kind a reconcile reads besides the subject.
#[derive(Clone)]
pub struct Caches {
    volume_classes: Store<VolumeReplicationClass>,
    group_classes: Store<VolumeGroupReplicationClass>,
    pvcs: Store<PersistentVolumeClaim>,
    pvs: Store<PersistentVolume>,
    storage_classes: Store<StorageClass>,
    /// Our TMRs (by label): those of PVCs that left a group are found here.
    tmrs: Option<Store<TridentMirrorRelationship>>,
    tamus: Option<Store<TridentActionMirrorUpdate>>,
}

/// Runs a reflector for `api` until the returned future is dropped.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (reader, writer) = reflector::store();
    let task = reflector::reflector(writer, watcher::watcher(api, config))
        .default_backoff()
        .for_each(|_| async {});
    (reader, task)
}

impl Caches {
    /// Starts the reflectors (the Trident ones only if `serves_trident`) and waits until each
    /// has listed once. The returned tasks
    /// must be polled (spawned) for the caches to follow the cluster.
    pub(super) async fn start(
        client: &kube::Client,
        serves_trident: bool,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let all = watcher::Config::default;
        let ours = || all().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let mut tasks = Vec::new();
        macro_rules! cache {
            ($api:expr, $cfg:expr) => {{
                let (store, task) = reflect($api, $cfg);
                tasks.push(tokio::spawn(task));
                store
            }};
        }
        let caches = Self {
            volume_classes: cache!(Api::all(client.clone()), all()),
            group_classes: cache!(Api::all(client.clone()), all()),
            pvcs: cache!(Api::all(client.clone()), all()),
            pvs: cache!(Api::all(client.clone()), all()),
            storage_classes: cache!(Api::all(client.clone()), all()),
            tmrs: serves_trident.then(|| cache!(Api::all(client.clone()), ours())),
            tamus: serves_trident.then(|| cache!(Api::all(client.clone()), ours())),
        };
        caches.ready().await;
        (caches, tasks)
    }

    /// Waits for the initial list of every cache (a writer dropped at shutdown also ends it).
    async fn ready(&self) {
        let _ = self.volume_classes.wait_until_ready().await;
        let _ = self.group_classes.wait_until_ready().await;
        let _ = self.pvcs.wait_until_ready().await;
        let _ = self.pvs.wait_until_ready().await;
        let _ = self.storage_classes.wait_until_ready().await;
        if let Some(s) = &self.tmrs {
            let _ = s.wait_until_ready().await;
        }
        if let Some(s) = &self.tamus {
            let _ = s.wait_until_ready().await;
        }
    }
}

fn cached<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    ns: Option<&str>,
    name: &str,
) -> Option<K> {
    let mut r = ObjectRef::new(name);
    if let Some(ns) = ns {
        r = r.within(ns);
    }
    store.get(&r).map(|o| (*o).clone())
}

/// The source of a reconcile's reads.
#[derive(Clone, Copy)]
pub(super) enum Reader<'a> {
    /// GET/LIST on the API server (one-shot reconciles).
    Api(&'a Context),
    /// The running controller's caches (the subject itself still comes from the API).
    Cache(&'a Context, &'a Caches),
}

macro_rules! api_get {
    ($ctx:expr, $api:expr, $kind:literal, $name:expr, $shown:expr) => {
        $api.get_opt($name)
            .await
            .map_err(|e| Error::api(&$ctx.cluster, "get", $kind, $shown, e))
    };
}

impl Reader<'_> {
    /// The subject itself.
    pub(super) async fn subject(
        &self,
        kind: SubjectKind,
        ns: &str,
        name: &str,
    ) -> Result<Option<Object>, Error> {
        let shown = ns_name(ns, name);
        // The subject is always read from the API (one GET): our own status write of the
        // previous reconcile may not be in the cache yet, and the status patch is guarded by
        // the resourceVersion read here, so a cached read would conflict after every write.
        let ctx = self.ctx();
        Ok(match kind {
            SubjectKind::Volume => {
                let api: Api<VolumeReplication> = Api::namespaced(ctx.client.clone(), ns);
                api_get!(ctx, api, "VolumeReplication", name, &shown)?
                    .map(|o| Object::Volume(Box::new(o)))
            }
            SubjectKind::Group => {
                let api: Api<VolumeGroupReplication> = Api::namespaced(ctx.client.clone(), ns);
                api_get!(ctx, api, "VolumeGroupReplication", name, &shown)?
                    .map(|o| Object::Group(Box::new(o)))
            }
        })
    }

    /// The subject's class, as translation sees it.
    pub(super) async fn class(&self, s: &Subject) -> Result<Option<ClassView>, Error> {
        let name = s.class_name.as_str();
        if name.is_empty() {
            return Ok(None);
        }
        Ok(match (self, s.kind) {
            (Self::Api(ctx), SubjectKind::Volume) => {
                let api: Api<VolumeReplicationClass> = Api::all(ctx.client.clone());
                api_get!(ctx, api, "VolumeReplicationClass", name, name)?
                    .map(|c| ClassView::from_volume_class(&c))
            }
            (Self::Api(ctx), SubjectKind::Group) => {
                let api: Api<VolumeGroupReplicationClass> = Api::all(ctx.client.clone());
                api_get!(ctx, api, "VolumeGroupReplicationClass", name, name)?
                    .map(|c| ClassView::from_group_class(&c))
            }
            (Self::Cache(_, c), SubjectKind::Volume) => {
                cached(&c.volume_classes, None, name).map(|c| ClassView::from_volume_class(&c))
            }
            (Self::Cache(_, c), SubjectKind::Group) => {
                cached(&c.group_classes, None, name).map(|c| ClassView::from_group_class(&c))
            }
        })
    }

    async fn pvc(&self, ns: &str, name: &str) -> Result<Option<PersistentVolumeClaim>, Error> {
        match self {
            Self::Api(ctx) => {
                let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
                api_get!(ctx, api, "PersistentVolumeClaim", name, ns_name(ns, name))
            }
            Self::Cache(_, c) => Ok(cached(&c.pvcs, Some(ns), name)),
        }
    }

    /// PVCs of `ns`, all or those with label `key=value`.
    pub(super) async fn pvcs(
        &self,
        ns: &str,
        label: Option<(&str, &str)>,
    ) -> Result<Vec<PersistentVolumeClaim>, Error> {
        match self {
            Self::Api(ctx) => {
                let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
                let lp = match label {
                    Some((k, v)) => ListParams::default().labels(&format!("{k}={v}")),
                    None => ListParams::default(),
                };
                Ok(api
                    .list(&lp)
                    .await
                    .map_err(|e| Error::api(&ctx.cluster, "list", "PersistentVolumeClaim", ns, e))?
                    .items)
            }
            Self::Cache(_, c) => {
                let mut out: Vec<PersistentVolumeClaim> = c
                    .pvcs
                    .state_filter(|p| {
                        p.namespace().as_deref() == Some(ns)
                            && label.is_none_or(|(k, v)| {
                                p.labels().get(k).map(String::as_str) == Some(v)
                            })
                    })
                    .into_iter()
                    .map(|p| (*p).clone())
                    .collect();
                // The API lists by name; keep the same order for the planner.
                out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
                Ok(out)
            }
        }
    }

    async fn pv(&self, name: &str) -> Result<Option<PersistentVolume>, Error> {
        match self {
            Self::Api(ctx) => {
                let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
                api_get!(ctx, api, "PersistentVolume", name, name)
            }
            Self::Cache(_, c) => Ok(cached(&c.pvs, None, name)),
        }
    }

    async fn storage_class(&self, name: &str) -> Result<Option<StorageClass>, Error> {
        match self {
            Self::Api(ctx) => {
                let api: Api<StorageClass> = Api::all(ctx.client.clone());
                api_get!(ctx, api, "StorageClass", name, name)
            }
            Self::Cache(_, c) => Ok(cached(&c.storage_classes, None, name)),
        }
    }

    /// The PVCs translation needs: the data source of a VR (plus, for Dell, the PVCs of its
    /// protection group), or every PVC of the namespace for a group.
    pub(super) async fn pvc_infos(
        &self,
        s: &Subject,
        backend: Option<Backend>,
    ) -> Result<Vec<PvcInfo>, Error> {
        let raw: Vec<PersistentVolumeClaim> = match &s.source {
            SubjectSource::Pvc(name) => {
                let mut all: Vec<PersistentVolumeClaim> =
                    self.pvc(&s.namespace, name).await?.into_iter().collect();
                let group = all
                    .first()
                    .and_then(|p| p.labels().get(dell::RG_LABEL).cloned());
                if backend == Some(Backend::DellPowerStore)
                    && let Some(group) = group
                {
                    let same = self
                        .pvcs(&s.namespace, Some((dell::RG_LABEL, &group)))
                        .await?;
                    for p in same {
                        if p.metadata.name != all[0].metadata.name {
                            all.push(p);
                        }
                    }
                }
                all
            }
            SubjectSource::Other { .. } => Vec::new(),
            SubjectSource::Selector(_) => self.pvcs(&s.namespace, None).await?,
        };
        let mut drivers: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for pvc in &raw {
            let driver = self.pvc_driver(pvc, &mut drivers).await?;
            out.push(PvcInfo::from_pvc(pvc, driver));
        }
        Ok(out)
    }

    /// The CSI driver of a PVC: its PV's, or its StorageClass's provisioner.
    async fn pvc_driver(
        &self,
        pvc: &PersistentVolumeClaim,
        classes: &mut BTreeMap<String, Option<String>>,
    ) -> Result<Option<String>, Error> {
        let spec = pvc.spec.clone().unwrap_or_default();
        if let Some(pv_name) = spec.volume_name.filter(|n| !n.is_empty())
            && let Some(driver) = self
                .pv(&pv_name)
                .await?
                .and_then(|p| p.spec)
                .and_then(|s| s.csi)
                .map(|c| c.driver)
        {
            return Ok(Some(driver));
        }
        let Some(sc) = spec.storage_class_name.filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        if let Some(known) = classes.get(&sc) {
            return Ok(known.clone());
        }
        let driver = self.storage_class(&sc).await?.map(|c| c.provisioner);
        classes.insert(sc, driver.clone());
        Ok(driver)
    }

    /// TMRs (or TAMUs) in `ns` carrying our index label for `uid`.
    async fn trident_owned<K>(
        &self,
        cache: impl Fn(&Caches) -> Option<&Store<K>>,
        kind: &'static str,
        ns: &str,
        uid: &str,
    ) -> Result<Vec<K>, Error>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + 'static,
    {
        match self {
            Self::Api(ctx) => {
                let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
                let lp = ListParams::default().labels(&format!("{OWNER_UID_LABEL}={uid}"));
                Ok(api
                    .list(&lp)
                    .await
                    .map_err(|e| Error::api(&ctx.cluster, "list", kind, ns, e))?
                    .items)
            }
            Self::Cache(_, c) => {
                let Some(store) = cache(c) else {
                    return Ok(Vec::new());
                };
                let mut out: Vec<K> = store
                    .state_filter(|o| {
                        o.meta().namespace.as_deref() == Some(ns)
                            && o.labels().get(OWNER_UID_LABEL).map(String::as_str) == Some(uid)
                    })
                    .into_iter()
                    .map(|o| (*o).clone())
                    .collect();
                out.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
                Ok(out)
            }
        }
    }

    fn ctx(&self) -> &Context {
        match self {
            Self::Api(ctx) | Self::Cache(ctx, _) => ctx,
        }
    }

    /// A member's relationship, read from the API: the planner patches it guarded by this
    /// read, and the trigger that started this reconcile may be ahead of the cache (our own
    /// create or patch of a moment ago), which would only end in a conflict.
    async fn tmr(&self, ns: &str, name: &str) -> Result<Option<TridentMirrorRelationship>, Error> {
        let ctx = self.ctx();
        let api: Api<TridentMirrorRelationship> = Api::namespaced(ctx.client.clone(), ns);
        api_get!(
            ctx,
            api,
            "TridentMirrorRelationship",
            name,
            ns_name(ns, name)
        )
    }

    /// A protection group's RG, read from the API for the same reason as [`Self::tmr`].
    async fn rg(&self, name: &str) -> Result<Option<DellCSIReplicationGroup>, Error> {
        let ctx = self.ctx();
        let api: Api<DellCSIReplicationGroup> = Api::all(ctx.client.clone());
        api_get!(ctx, api, "DellCSIReplicationGroup", name, name)
    }

    /// The backend objects of the subject's members.
    pub(super) async fn observed(
        &self,
        req: &Request,
        backend: Option<Backend>,
        member_names: &[String],
    ) -> Result<Observed, Error> {
        let s = &req.subject;
        match backend {
            Some(Backend::Trident) => {
                let mut obs = TridentObserved::default();
                // The TMRs named after members, whoever made them (detects foreign ones).
                for name in member_names {
                    if let Some(t) = self.tmr(&s.namespace, name).await? {
                        obs.relationships.push(t);
                    }
                }
                if let Some(uid) = &s.uid {
                    // Ours named after PVCs that are no longer members (to delete).
                    let owned = self
                        .trident_owned(
                            |c| c.tmrs.as_ref(),
                            "TridentMirrorRelationship",
                            &s.namespace,
                            uid,
                        )
                        .await?;
                    obs.relationships.extend(owned.into_iter().filter(|t| {
                        !member_names
                            .iter()
                            .any(|m| t.metadata.name.as_deref() == Some(m.as_str()))
                    }));
                    obs.updates = self
                        .trident_owned(
                            |c| c.tamus.as_ref(),
                            "TridentActionMirrorUpdate",
                            &s.namespace,
                            uid,
                        )
                        .await?;
                }
                Ok(Observed::Trident(obs))
            }
            Some(Backend::DellPowerStore) => {
                let mut names: Vec<String> = req
                    .pvcs
                    .iter()
                    .filter(|p| member_names.contains(&p.name))
                    .filter_map(|p| p.labels.get(dell::RG_LABEL).cloned())
                    .collect();
                names.sort();
                names.dedup();
                let mut obs = DellObserved::default();
                for n in names {
                    if let Some(rg) = self.rg(&n).await? {
                        obs.groups.push(rg);
                    }
                }
                Ok(Observed::Dell(obs))
            }
            _ => Ok(Observed::Nothing),
        }
    }

    /// PV and CSI volume handle of the bound members of a group whose PV is of `driver`
    /// (members still pending have none yet: they join the content when bound).
    pub(super) async fn volume_handles(
        &self,
        ns: &str,
        members: &[String],
        driver: &str,
    ) -> Result<Vec<super::content::MemberVolume>, Error> {
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            let Some(pv_name) = self
                .pvc(ns, m)
                .await?
                .and_then(|p| p.spec)
                .and_then(|s| s.volume_name)
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            if let Some(csi) = self
                .pv(&pv_name)
                .await?
                .and_then(|p| p.spec)
                .and_then(|s| s.csi)
                .filter(|c| c.driver == driver)
            {
                out.push(super::content::MemberVolume {
                    pv: pv_name,
                    handle: csi.volume_handle,
                });
            }
        }
        Ok(out)
    }

    /// PVCs of `ns` whose annotation `key` is `value` (a released subject's claims).
    pub(super) async fn pvcs_annotated(
        &self,
        ns: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, Error> {
        Ok(self
            .pvcs(ns, None)
            .await?
            .into_iter()
            .filter(|p| p.annotations().get(key).map(String::as_str) == Some(value))
            .map(|p| p.name_any())
            .collect())
    }
}
