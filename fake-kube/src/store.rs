//! The object store of one fake cluster: the resource table, metadata assignment
//! (uid, resourceVersion, creationTimestamp, generation), validation with
//! metav1.Status errors, label/field selectors, merge and JSON patches, and the
//! bounded event log that watches replay from.
//!
//! It knows nothing about HTTP; `server` maps requests onto it and the simulated
//! controller writes through [`Store::controller_update`].

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::values::rfc3339_now;

/// One served resource type.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group ("" for core).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Plural resource name used in paths.
    pub plural: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Namespaced or cluster scoped.
    pub namespaced: bool,
    /// Has a status subresource (status ignored on main writes, spec on status writes).
    pub status_subresource: bool,
    /// Served from a CRD (no strategic merge patch).
    pub crd: bool,
}

impl ResourceType {
    /// `apiVersion` value of objects of this type.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` as the API server names resources in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// Core namespaces.
pub static NAMESPACES: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "namespaces",
    kind: "Namespace",
    namespaced: false,
    status_subresource: true,
    crd: false,
};
/// Core persistent volume claims.
pub static PVCS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "persistentvolumeclaims",
    kind: "PersistentVolumeClaim",
    namespaced: true,
    status_subresource: true,
    crd: false,
};
/// storage.k8s.io CSIDriver objects.
pub static CSIDRIVERS: ResourceType = ResourceType {
    group: "storage.k8s.io",
    version: "v1",
    plural: "csidrivers",
    kind: "CSIDriver",
    namespaced: false,
    status_subresource: false,
    crd: false,
};
/// storage.k8s.io StorageClass objects.
pub static STORAGE_CLASSES: ResourceType = ResourceType {
    group: "storage.k8s.io",
    version: "v1",
    plural: "storageclasses",
    kind: "StorageClass",
    namespaced: false,
    status_subresource: false,
    crd: false,
};
/// VolumeSnapshot.
pub static VOLUME_SNAPSHOTS: ResourceType = ResourceType {
    group: "snapshot.storage.k8s.io",
    version: "v1",
    plural: "volumesnapshots",
    kind: "VolumeSnapshot",
    namespaced: true,
    status_subresource: true,
    crd: true,
};
/// VolumeSnapshotContent.
pub static VOLUME_SNAPSHOT_CONTENTS: ResourceType = ResourceType {
    group: "snapshot.storage.k8s.io",
    version: "v1",
    plural: "volumesnapshotcontents",
    kind: "VolumeSnapshotContent",
    namespaced: false,
    status_subresource: true,
    crd: true,
};
/// VolumeSnapshotClass (no spec, no status).
pub static VOLUME_SNAPSHOT_CLASSES: ResourceType = ResourceType {
    group: "snapshot.storage.k8s.io",
    version: "v1",
    plural: "volumesnapshotclasses",
    kind: "VolumeSnapshotClass",
    namespaced: false,
    status_subresource: false,
    crd: true,
};

/// Every type this fake serves.
pub static TYPES: [&ResourceType; 7] = [
    &NAMESPACES,
    &PVCS,
    &CSIDRIVERS,
    &STORAGE_CLASSES,
    &VOLUME_SNAPSHOTS,
    &VOLUME_SNAPSHOT_CONTENTS,
    &VOLUME_SNAPSHOT_CLASSES,
];

/// Finds a type by path components.
pub fn find_type(
    types: &[&'static ResourceType],
    group: &str,
    version: &str,
    plural: &str,
) -> Option<&'static ResourceType> {
    types
        .iter()
        .copied()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
}

/// Finds a type by `apiVersion` and `kind`.
pub fn find_type_by_kind(
    types: &[&'static ResourceType],
    api_version: &str,
    kind: &str,
) -> Option<&'static ResourceType> {
    types
        .iter()
        .copied()
        .find(|t| t.api_version() == api_version && t.kind == kind)
}

/// One field-level cause of a 422 Invalid answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// metav1.CauseType, e.g. `FieldValueRequired`.
    pub reason: &'static str,
    /// Field path, e.g. `spec.driver`.
    pub field: String,
    /// Human message, e.g. `Required value`.
    pub message: String,
}

impl Cause {
    fn required(field: &str) -> Self {
        Self {
            reason: "FieldValueRequired",
            field: field.to_string(),
            message: "Required value".to_string(),
        }
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// An API failure, rendered as a metav1.Status body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// metav1.StatusReason.
    pub reason: &'static str,
    /// Human message.
    pub message: String,
    /// `details` object, if any.
    pub details: Option<Value>,
}

impl ApiError {
    fn details(rt: &ResourceType, name: &str, kind: &str) -> Value {
        json!({"name": name, "group": rt.group, "kind": kind})
    }

    /// 404 for a named object.
    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", rt.qualified()),
            details: Some(Self::details(rt, name, rt.plural)),
        }
    }

    /// 409 AlreadyExists.
    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", rt.qualified()),
            details: Some(Self::details(rt, name, rt.plural)),
        }
    }

    /// 409 Conflict on a stale resourceVersion.
    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        Self {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                rt.qualified()
            ),
            details: Some(Self::details(rt, name, rt.plural)),
        }
    }

    /// 422 Invalid with field causes.
    pub fn invalid(rt: &ResourceType, name: &str, causes: &[Cause]) -> Self {
        let summary: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let causes_json: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        let mut details = Self::details(rt, name, rt.kind);
        details["causes"] = Value::Array(causes_json);
        Self {
            code: 422,
            reason: "Invalid",
            message: format!(
                "{}.{} \"{name}\" is invalid: {}",
                rt.kind,
                if rt.group.is_empty() {
                    "core"
                } else {
                    rt.group
                },
                summary.join(", ")
            ),
            details: Some(details),
        }
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
            details: None,
        }
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> Self {
        Self {
            code: 405,
            reason: "MethodNotAllowed",
            message: "the server does not allow this method on the requested resource".into(),
            details: None,
        }
    }

    /// 415 UnsupportedMediaType.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self {
            code: 415,
            reason: "UnsupportedMediaType",
            message: message.into(),
            details: None,
        }
    }

    /// 410 Expired (resourceVersion too old for a watch).
    pub fn gone(rv: u64) -> Self {
        Self {
            code: 410,
            reason: "Expired",
            message: format!("too old resource version: {rv}"),
            details: None,
        }
    }

    /// 404 for a path no resource serves.
    pub fn no_route() -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: "the server could not find the requested resource".into(),
            details: None,
        }
    }

    /// The metav1.Status body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The object (status ignored where a status subresource exists).
    Main,
    /// The `/status` subresource (only status is taken).
    Status,
}

/// Patch flavours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// RFC 7386 JSON merge patch.
    Merge,
    /// Strategic merge (built-ins only; treated as a merge patch here).
    Strategic,
    /// RFC 6902 JSON patch.
    Json,
}

/// A change seen by watches.
#[derive(Clone, Debug)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    /// ADDED / MODIFIED / DELETED.
    pub kind: &'static str,
    /// Type of the object.
    pub rt: &'static ResourceType,
    /// Namespace ("" for cluster scoped).
    pub ns: String,
    /// The object after the change.
    pub object: Value,
}

type Key = (&'static str, String, String);

/// All objects of one fake cluster.
pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    uid: u64,
    log: VecDeque<Event>,
    compacted_through: u64,
    log_cap: usize,
    tx: broadcast::Sender<Event>,
}

impl Store {
    /// An empty store keeping the last `log_cap` events for watch replay.
    pub fn new(log_cap: usize) -> Self {
        // Each watch connection has its own cursor into this ring; one that falls further behind
        // than the event log reaches must re-list anyway (410), so the ring is as deep as the log.
        let (tx, _) = broadcast::channel(log_cap.clamp(1024, 1 << 20));
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            uid: 0,
            log: VecDeque::new(),
            compacted_through: 0,
            log_cap,
            tx,
        }
    }

    /// Current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key(rt: &'static ResourceType, ns: &str, name: &str) -> Key {
        let ns = if rt.namespaced { ns } else { "" };
        (rt.plural, ns.to_string(), name.to_string())
    }

    fn emit(&mut self, kind: &'static str, rt: &'static ResourceType, ns: &str, object: Value) {
        let event = Event {
            rv: self.rv,
            kind,
            rt,
            ns: ns.to_string(),
            object,
        };
        self.log.push_back(event.clone());
        while self.log.len() > self.log_cap {
            if let Some(old) = self.log.pop_front() {
                self.compacted_through = old.rv;
            }
        }
        // No receivers is normal.
        let _ = self.tx.send(event);
    }

    /// The `openAPIV3Schema` of a CRD-served type's version, while its CRD exists.
    fn crd_schema(&self, rt: &'static ResourceType) -> Option<&Value> {
        if !rt.crd {
            return None;
        }
        let crd = self.objects.get(&(
            crate::crds::CUSTOM_RESOURCE_DEFINITIONS.plural,
            String::new(),
            format!("{}.{}", rt.plural, rt.group),
        ))?;
        crd["spec"]["versions"]
            .as_array()?
            .iter()
            .find(|v| v["name"].as_str() == Some(rt.version))
            .map(|v| &v["schema"]["openAPIV3Schema"])
            .filter(|v| v.is_object())
    }

    fn next_uid(&mut self) -> String {
        self.uid += 1;
        // Deterministic, UUID-shaped.
        format!("00000000-0000-4000-8000-{:012x}", self.uid)
    }

    /// Reads one object.
    pub fn get(&self, rt: &'static ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(rt, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Every stored object of a type, borrowed (no copies: CRDs are large).
    pub fn iter_type(&self, rt: &'static ResourceType) -> impl Iterator<Item = &Value> {
        self.iter_in(rt, None)
    }

    /// Objects of a type, in one namespace or all, borrowed. Keys sort by type, then
    /// namespace, so this visits only the requested range (a pass over one kind costs what
    /// that kind holds, not what the whole cluster holds).
    pub fn iter_in<'a>(
        &'a self,
        rt: &'static ResourceType,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let ns = ns.filter(|_| rt.namespaced);
        let start = (rt.plural, ns.unwrap_or("").to_string(), String::new());
        self.objects
            .range(start..)
            .take_while(move |((plural, ons, _), _)| {
                *plural == rt.plural && ns.is_none_or(|n| n == ons)
            })
            .map(|(_, v)| v)
    }

    /// Lists objects of a type, in one namespace or all, filtered by a selector.
    pub fn list(&self, rt: &'static ResourceType, ns: Option<&str>, sel: &Selector) -> Vec<Value> {
        self.list_where(rt, ns, |v| sel.matches(v))
    }

    /// Copies of the objects of a type (one namespace or all) that `keep` accepts; the
    /// others are never copied.
    pub fn list_where(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        self.iter_in(rt, ns).filter(|v| keep(v)).cloned().collect()
    }

    /// The events since resourceVersion `rv`, oldest first, or None when the log no longer
    /// reaches back that far (the caller must then look at everything).
    pub fn changes_since(&self, rv: u64) -> Option<impl Iterator<Item = &Event>> {
        if rv < self.compacted_through {
            return None;
        }
        let newer = self.log.iter().rev().take_while(|e| e.rv > rv).count();
        Some(self.log.iter().skip(self.log.len() - newer))
    }

    /// Creates an object. `url_ns` is the namespace from the request path.
    pub fn create(
        &mut self,
        rt: &'static ResourceType,
        url_ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        check_type_meta(rt, map)?;
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        if meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
            && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
        {
            let generated = format!("{prefix}{:05x}", self.uid + 1);
            meta["name"] = Value::String(generated);
        }
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ns = if rt.namespaced {
            let Some(url_ns) = url_ns else {
                return Err(ApiError::method_not_allowed());
            };
            match meta.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if body_ns != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            meta["namespace"] = Value::String(url_ns.to_string());
            if !self
                .objects
                .contains_key(&Self::key(&NAMESPACES, "", url_ns))
            {
                return Err(ApiError::not_found(&NAMESPACES, url_ns));
            }
            url_ns.to_string()
        } else {
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        if rt == &PVCS {
            self.default_storage_class(&mut obj);
        }
        crate::kinds::normalize(rt, &mut obj)?;
        crate::kinds::admit(self, rt, &obj)?;
        let mut causes = validate(rt, &obj);
        if let Some(schema) = self.crd_schema(rt) {
            causes.extend(crate::schema::check(schema, &mut obj));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, &name, &causes));
        }
        let key = Self::key(rt, &ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        if rt.status_subresource
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        if rt == &NAMESPACES {
            obj["status"] = json!({"phase": "Active"});
        }
        let uid = self.next_uid();
        let meta = &mut obj["metadata"];
        meta["uid"] = Value::String(uid);
        meta["creationTimestamp"] = Value::String(rfc3339_now());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
        }
        if dry_run {
            return Ok(obj);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.objects.insert(key, obj.clone());
        self.emit("ADDED", rt, &ns, obj.clone());
        Ok(obj)
    }

    /// The DefaultStorageClass admission plugin: a PVC that names no class (the field
    /// absent, not "") gets the default one, the most recently created if several.
    fn default_storage_class(&self, pvc: &mut Value) {
        if pvc["spec"]
            .get("storageClassName")
            .is_some_and(|c| !c.is_null())
        {
            return;
        }
        let default = self
            .list(&STORAGE_CLASSES, None, &Selector::default())
            .into_iter()
            .filter(|c| {
                let a = &c["metadata"]["annotations"];
                a["storageclass.kubernetes.io/is-default-class"] == "true"
                    || a["storageclass.beta.kubernetes.io/is-default-class"] == "true"
            })
            .max_by_key(|c| {
                c["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            });
        if let (Some(class), Some(spec)) = (default, pvc["spec"].as_object_mut()) {
            spec.insert("storageClassName".into(), class["metadata"]["name"].clone());
        }
    }

    /// Replaces an object (PUT).
    pub fn replace(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        obj: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let existing = self.get(rt, ns, name)?;
        let mut obj = obj;
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        check_type_meta(rt, map)?;
        if obj["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        self.finish_update(rt, ns, name, existing, obj, part, dry_run)
    }

    /// Patches an object.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        patch_type: PatchType,
        patch: &Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let existing = self.get(rt, ns, name)?;
        let mut patched = existing.clone();
        match patch_type {
            PatchType::Strategic if rt.crd => {
                return Err(ApiError::unsupported_media_type(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                ));
            }
            PatchType::Merge | PatchType::Strategic => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                merge_patch(&mut patched, patch);
            }
            PatchType::Json => json_patch(&mut patched, patch).map_err(|message| ApiError {
                code: 422,
                reason: "Invalid",
                message,
                details: None,
            })?,
        }
        self.finish_update(rt, ns, name, existing, patched, part, dry_run)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_update(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        existing: Value,
        incoming: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let current_rv = existing["metadata"]["resourceVersion"].clone();
        if let Some(rv) = incoming["metadata"]["resourceVersion"].as_str()
            && Some(rv) != current_rv.as_str()
        {
            return Err(ApiError::conflict(rt, name));
        }
        let mut new = match part {
            Part::Main => {
                let mut new = incoming;
                if rt.status_subresource {
                    match existing.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                new
            }
            Part::Status => {
                let mut new = existing.clone();
                match incoming.get("status") {
                    Some(s) if !s.is_null() => new["status"] = s.clone(),
                    _ => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                new
            }
        };
        if !new["metadata"].is_object() {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        // Server-owned metadata is never taken from the client.
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "namespace",
            "name",
            "generation",
        ] {
            match existing["metadata"].get(field) {
                Some(v) => new["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        new["metadata"]["resourceVersion"] = current_rv;
        crate::kinds::normalize(rt, &mut new)?;
        let causes = validate(rt, &new);
        let mut causes = causes;
        causes.extend(immutability(rt, &existing, &new));
        if let Some(schema) = self.crd_schema(rt) {
            causes.extend(crate::schema::check(schema, &mut new));
            causes.extend(crate::schema::transitions(schema, &existing, &new));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(rt, name, &causes));
        }
        if new == existing {
            return Ok(existing);
        }
        if new.get("spec") != existing.get("spec") {
            let generation = existing["metadata"]["generation"].as_i64().unwrap_or(0);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        if dry_run {
            return Ok(new);
        }
        if new["metadata"].get("deletionTimestamp").is_some()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty())
        {
            // The last finalizer is gone: the pending deletion completes.
            self.store_modified(rt, ns, name, new);
            return self.delete(rt, ns, name, false);
        }
        // The answer carries the new resourceVersion, as the API server's does.
        Ok(self.store_modified(rt, ns, name, new))
    }

    /// Stores an updated object under a new resourceVersion; returns it as stored.
    fn store_modified(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.objects.insert(Self::key(rt, ns, name), obj.clone());
        self.emit(
            "MODIFIED",
            rt,
            if rt.namespaced { ns } else { "" },
            obj.clone(),
        );
        obj
    }

    /// Deletes an object, returning it.
    pub fn delete(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let key = Self::key(rt, ns, name);
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(rt, name));
        };
        if dry_run {
            return Ok(obj);
        }
        // Finalizers hold the object, marked terminating, until an update removes the last one.
        if obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                obj["metadata"]["deletionTimestamp"] = Value::String(rfc3339_now());
                self.store_modified(rt, ns, name, obj.clone());
            }
            return self.get(rt, ns, name);
        }
        self.objects.remove(&key);
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.emit(
            "DELETED",
            rt,
            if rt.namespaced { ns } else { "" },
            obj.clone(),
        );
        Ok(obj)
    }

    /// A write by the simulated controllers: no validation, status included.
    /// Returns false if the object is gone or `f` changed nothing.
    pub fn controller_update(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> bool {
        let Ok(existing) = self.get(rt, ns, name) else {
            return false;
        };
        let mut new = existing.clone();
        f(&mut new);
        if new == existing {
            return false;
        }
        self.store_modified(rt, ns, name, new);
        true
    }

    /// A create by the simulated controllers (status kept, no validation).
    pub fn controller_create(&mut self, rt: &'static ResourceType, ns: &str, mut obj: Value) {
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        obj["apiVersion"] = Value::String(rt.api_version());
        obj["kind"] = Value::String(rt.kind.to_string());
        obj["metadata"]["uid"] = Value::String(self.next_uid());
        obj["metadata"]["creationTimestamp"] = Value::String(rfc3339_now());
        obj["metadata"]["generation"] = json!(1);
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let ns = if rt.namespaced { ns } else { "" };
        self.objects.insert(Self::key(rt, ns, &name), obj.clone());
        self.emit("ADDED", rt, ns, obj);
    }

    /// Starts a watch: the events to replay and a receiver for later ones.
    pub fn watch(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        since: Option<u64>,
        sel: &Selector,
    ) -> Result<(Vec<Event>, broadcast::Receiver<Event>), ApiError> {
        let rx = self.tx.subscribe();
        let matches = |e: &Event| {
            e.rt == rt && ns.is_none_or(|n| !rt.namespaced || n == e.ns) && sel.matches(&e.object)
        };
        let replay = match since {
            None | Some(0) => self
                .list(rt, ns, sel)
                .into_iter()
                .map(|object| Event {
                    rv: self.rv,
                    kind: "ADDED",
                    rt,
                    ns: object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    object,
                })
                .collect(),
            Some(rv) => {
                if rv < self.compacted_through {
                    return Err(ApiError::gone(rv));
                }
                self.log
                    .iter()
                    .filter(|e| e.rv > rv && matches(e))
                    .cloned()
                    .collect()
            }
        };
        Ok((replay, rx))
    }
}

fn check_type_meta(rt: &ResourceType, map: &mut Map<String, Value>) -> Result<(), ApiError> {
    let api_version = rt.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != api_version => {
            return Err(ApiError::bad_request(format!(
                "apiVersion {v} does not match the request path ({api_version})"
            )));
        }
        _ => {}
    }
    match map.get("kind").and_then(Value::as_str) {
        Some(k) if k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "kind {k} does not match the request path ({})",
                rt.kind
            )));
        }
        _ => {}
    }
    map.insert("apiVersion".into(), Value::String(api_version));
    map.insert("kind".into(), Value::String(rt.kind.to_string()));
    Ok(())
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn non_empty(v: &Value, path: &[&str]) -> bool {
    str_at(v, path).is_some_and(|s| !s.is_empty())
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn one_of(v: &Value, base: &[&str], members: &[&str], field: &str, causes: &mut Vec<Cause>) {
    let mut path: Vec<&str> = base.to_vec();
    let set = members
        .iter()
        .filter(|m| {
            path.push(m);
            let present = non_empty(v, &path);
            path.pop();
            present
        })
        .count();
    match set {
        0 => causes.push(Cause::required(field)),
        1 => {}
        _ => causes.push(Cause::invalid(
            field,
            format!("exactly one of {} must be set", members.join(", ")),
        )),
    }
}

fn enum_field(v: &Value, path: &[&str], allowed: &[&str], required: bool, causes: &mut Vec<Cause>) {
    let field = path.join(".");
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => {
                if required {
                    causes.push(Cause::required(&field));
                }
                return;
            }
        }
    }
    match cur {
        Value::Null if !required => {}
        Value::String(s) if allowed.contains(&s.as_str()) => {}
        Value::Null => causes.push(Cause::required(&field)),
        other => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field,
            message: format!(
                "Unsupported value: {other}: supported values: {}",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Field checks the real API server (or CRD schema / CEL) would make.
pub fn validate(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match str_at(obj, &["metadata", "name"]) {
        None | Some("") => causes.push(Cause {
            reason: "FieldValueRequired",
            field: "metadata.name".into(),
            message: "name or generateName is required".into(),
        }),
        Some(n) if !is_dns_subdomain(n) => causes.push(Cause::invalid(
            "metadata.name",
            format!("Invalid value: \"{n}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"),
        )),
        Some(_) => {}
    }
    if rt == &PVCS {
        if obj["spec"]["accessModes"]
            .as_array()
            .is_none_or(|a| a.is_empty())
        {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: "spec.accessModes".into(),
                message: "Required value: at least 1 access mode is required".into(),
            });
        }
        if !non_empty(obj, &["spec", "resources", "requests", "storage"]) {
            causes.push(Cause::required("spec.resources[storage]"));
        }
        enum_field(
            obj,
            &["spec", "volumeMode"],
            &["Filesystem", "Block"],
            false,
            &mut causes,
        );
        if obj["spec"].get("dataSource").is_some_and(|d| !d.is_null()) {
            if !non_empty(obj, &["spec", "dataSource", "kind"]) {
                causes.push(Cause::required("spec.dataSource.kind"));
            }
            if !non_empty(obj, &["spec", "dataSource", "name"]) {
                causes.push(Cause::required("spec.dataSource.name"));
            }
        }
    } else if rt == &VOLUME_SNAPSHOTS {
        if obj["spec"]["source"].is_object() {
            one_of(
                obj,
                &["spec", "source"],
                &["persistentVolumeClaimName", "volumeSnapshotContentName"],
                "spec.source",
                &mut causes,
            );
        } else {
            causes.push(Cause::required("spec.source"));
        }
        if obj["spec"]
            .get("volumeSnapshotClassName")
            .is_some_and(|c| c.as_str() == Some(""))
        {
            causes.push(Cause::invalid(
                "spec.volumeSnapshotClassName",
                "spec.volumeSnapshotClassName must not be the empty string when set",
            ));
        }
    } else if rt == &VOLUME_SNAPSHOT_CONTENTS {
        if !obj["spec"]["volumeSnapshotRef"].is_object() {
            causes.push(Cause::required("spec.volumeSnapshotRef"));
        } else {
            if !non_empty(obj, &["spec", "volumeSnapshotRef", "name"]) {
                causes.push(Cause::required("spec.volumeSnapshotRef.name"));
            }
            if !non_empty(obj, &["spec", "volumeSnapshotRef", "namespace"]) {
                causes.push(Cause::required("spec.volumeSnapshotRef.namespace"));
            }
        }
        enum_field(
            obj,
            &["spec", "deletionPolicy"],
            &["Delete", "Retain"],
            true,
            &mut causes,
        );
        if !non_empty(obj, &["spec", "driver"]) {
            causes.push(Cause::required("spec.driver"));
        }
        if obj["spec"]["source"].is_object() {
            one_of(
                obj,
                &["spec", "source"],
                &["volumeHandle", "snapshotHandle"],
                "spec.source",
                &mut causes,
            );
        } else {
            causes.push(Cause::required("spec.source"));
        }
        enum_field(
            obj,
            &["spec", "sourceVolumeMode"],
            &["Filesystem", "Block"],
            false,
            &mut causes,
        );
    } else if rt == &STORAGE_CLASSES {
        if !non_empty(obj, &["provisioner"]) {
            causes.push(Cause::required("provisioner"));
        }
    } else if rt == &VOLUME_SNAPSHOT_CLASSES {
        if !non_empty(obj, &["driver"]) {
            causes.push(Cause::required("driver"));
        }
        enum_field(
            obj,
            &["deletionPolicy"],
            &["Delete", "Retain"],
            true,
            &mut causes,
        );
    }
    causes.extend(crate::kinds::validate(rt, obj));
    causes.extend(crate::groups::validate(rt, obj));
    causes
}

fn immutability(rt: &ResourceType, old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if (rt == &VOLUME_SNAPSHOTS || rt == &VOLUME_SNAPSHOT_CONTENTS)
        && old["spec"]["source"] != new["spec"]["source"]
    {
        causes.push(Cause::invalid("spec.source", "spec.source is immutable"));
    }
    if rt == &VOLUME_SNAPSHOT_CONTENTS {
        let old_mode = &old["spec"]["sourceVolumeMode"];
        if !old_mode.is_null() && old_mode != &new["spec"]["sourceVolumeMode"] {
            causes.push(Cause::invalid(
                "spec.sourceVolumeMode",
                "sourceVolumeMode is immutable once set",
            ));
        }
    }
    if rt == &PVCS && old["spec"]["dataSource"] != new["spec"]["dataSource"] {
        causes.push(Cause::invalid("spec.dataSource", "field is immutable"));
    }
    causes.extend(crate::groups::immutability(rt, old, new));
    causes
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(ptr: &str) -> Result<(Vec<String>, String), String> {
    if !ptr.starts_with('/') {
        return Err(format!("invalid JSON pointer {ptr:?}"));
    }
    let mut tokens: Vec<String> = ptr[1..].split('/').map(unescape).collect();
    let last = tokens.pop().unwrap_or_default();
    Ok((tokens, last))
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("path component {t:?} not found"))?,
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("bad array index {t:?}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("array index {i} out of range"))?
            }
            _ => return Err(format!("path component {t:?} is not a container")),
        };
    }
    Ok(cur)
}

fn pointer_get(doc: &Value, ptr: &str) -> Option<Value> {
    doc.pointer(ptr).cloned()
}

fn pointer_remove(doc: &mut Value, ptr: &str) -> Result<Value, String> {
    let (tokens, last) = split_pointer(ptr)?;
    match parent_mut(doc, &tokens)? {
        Value::Object(m) => m.remove(&last).ok_or_else(|| format!("{ptr} not found")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("bad array index {last:?}"))?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(format!("{ptr} out of range"))
            }
        }
        _ => Err(format!("{ptr}: parent is not a container")),
    }
}

fn pointer_add(doc: &mut Value, ptr: &str, value: Value, replace: bool) -> Result<(), String> {
    if ptr.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (tokens, last) = split_pointer(ptr)?;
    match parent_mut(doc, &tokens)? {
        Value::Object(m) => {
            if replace && !m.contains_key(&last) {
                return Err(format!("{ptr} not found"));
            }
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("bad array index {last:?}"))?;
            if replace {
                let slot = a.get_mut(i).ok_or_else(|| format!("{ptr} out of range"))?;
                *slot = value;
            } else if i <= a.len() {
                a.insert(i, value);
            } else {
                return Err(format!("{ptr} out of range"));
            }
            Ok(())
        }
        _ => Err(format!("{ptr}: parent is not a container")),
    }
}

/// RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or_else(|| "a JSON patch must be an array of operations".to_string())?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| "operation without a path".to_string())?;
        match op["op"].as_str() {
            Some("add") => pointer_add(doc, path, op["value"].clone(), false)?,
            Some("replace") => pointer_add(doc, path, op["value"].clone(), true)?,
            Some("remove") => {
                pointer_remove(doc, path)?;
            }
            Some("test") => {
                if pointer_get(doc, path).as_ref() != Some(&op["value"]) {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            Some("move") | Some("copy") => {
                let from = op["from"]
                    .as_str()
                    .ok_or_else(|| "move/copy without from".to_string())?;
                let value = if op["op"] == "move" {
                    pointer_remove(doc, from)?
                } else {
                    pointer_get(doc, from).ok_or_else(|| format!("{from} not found"))?
                };
                pointer_add(doc, path, value, false)?;
            }
            other => return Err(format!("unsupported JSON patch op {other:?}")),
        }
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector plus field selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<(String, String, bool)>,
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                cur.push(c);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a (value, ...) set, got {rest:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    /// Parses `labelSelector` and `fieldSelector` query values.
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        let mut sel = Selector::default();
        for part in split_top_level(labels.unwrap_or("")) {
            let req = if let Some(k) = part.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelReq::NotIn(
                    k.trim().into(),
                    parse_set(rest).map_err(ApiError::bad_request)?,
                )
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelReq::In(
                    k.trim().into(),
                    parse_set(rest).map_err(ApiError::bad_request)?,
                )
            } else if part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                LabelReq::Exists(part.clone())
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?}"
                )));
            };
            sel.labels.push(req);
        }
        for part in split_top_level(fields.unwrap_or("")) {
            let (k, v, eq) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {part:?}"
                )));
            };
            let k = k.trim();
            if k != "metadata.name"
                && k != "metadata.namespace"
                && !crate::kinds::EXTRA_FIELD_LABELS.contains(&k)
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {k}"
                )));
            }
            sel.fields.push((k.to_string(), v.trim().to_string(), eq));
        }
        Ok(sel)
    }

    /// True if the object satisfies every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(k, v, eq)| {
                let actual = crate::kinds::field_value(obj, k);
                (actual == v) == *eq
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_match() {
        let obj = json!({"metadata": {"name": "a", "namespace": "n", "labels": {"app": "db", "tier": "x"}}});
        let ok = |l: &str, f: &str| {
            Selector::parse(Some(l), Some(f))
                .map(|s| s.matches(&obj))
                .unwrap_or(false)
        };
        assert!(ok("app=db", ""));
        assert!(ok("app==db,tier", ""));
        assert!(!ok("app!=db", ""));
        assert!(ok("app in (web, db)", "metadata.name=a"));
        assert!(!ok("app notin (db)", ""));
        assert!(ok("!missing", "metadata.namespace!=other"));
        assert!(!ok("", "metadata.name=b"));
        assert!(Selector::parse(None, Some("spec.x=1")).is_err());
    }

    #[test]
    fn patches() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [1, 2]}));
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "replace", "path": "/a/c", "value": 9},
                {"op": "remove", "path": "/a/d"},
                {"op": "test", "path": "/l/2", "value": 3}
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"c": 9}, "l": [1, 2, 3]}));
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/a/c", "value": 1}])
            )
            .is_err()
        );
    }

    #[test]
    fn create_assigns_metadata_and_rejects_duplicates_and_invalid() {
        let mut store = Store::new(16);
        store
            .create(
                &NAMESPACES,
                None,
                json!({"metadata": {"name": "ns1"}}),
                false,
            )
            .unwrap();
        let vsc = json!({"metadata": {"name": "c1"}, "spec": {"driver": "d", "deletionPolicy": "Retain",
            "source": {"snapshotHandle": "h"}, "volumeSnapshotRef": {"name": "s", "namespace": "ns1"}},
            "status": {"readyToUse": true}});
        let created = store
            .create(&VOLUME_SNAPSHOT_CONTENTS, None, vsc.clone(), false)
            .unwrap();
        assert_eq!(created["metadata"]["resourceVersion"], "2");
        assert!(created.get("status").is_none(), "status is a subresource");
        assert_eq!(
            store
                .create(&VOLUME_SNAPSHOT_CONTENTS, None, vsc, false)
                .unwrap_err()
                .code,
            409
        );
        let err = store
            .create(
                &VOLUME_SNAPSHOT_CONTENTS,
                None,
                json!({"metadata": {"name": "c2"}, "spec": {"source": {}}}),
                false,
            )
            .unwrap_err();
        assert_eq!(err.code, 422);
        let fields: Vec<_> = err.details.unwrap()["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap().to_string())
            .collect();
        assert!(fields.contains(&"spec.driver".to_string()));
        assert!(fields.contains(&"spec.volumeSnapshotRef".to_string()));
        let err = store
            .create(
                &VOLUME_SNAPSHOTS,
                Some("missing"),
                json!({"metadata": {"name": "s"}, "spec": {"source": {"persistentVolumeClaimName": "p"}}}),
                false,
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason), (404, "NotFound"));
        assert!(err.message.contains("namespaces \"missing\""));
    }
}
