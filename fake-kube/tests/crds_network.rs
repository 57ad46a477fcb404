//! CustomResourceDefinitions (installing the upstream manifests serves their versions),
//! Services and EndpointSlices, API discovery, and the bootstrap grants every authenticated
//! user has, driven through kube::Client.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fake_kube::FakeKube;
use fake_kube::crds::upstream;
use fake_kube::rbac::{Policy, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

async fn client(yaml: &str, context: &str) -> kube::Client {
    let kc = Kubeconfig::from_yaml(yaml).unwrap();
    let opts = KubeConfigOptions {
        context: Some(context.into()),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .unwrap();
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

fn sms(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cbt.storage.k8s.io", version, "SnapshotMetadataService"),
        "snapshotmetadataservices",
    )
}

fn sms_object(version: &str, name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("cbt.storage.k8s.io/{version}"), "kind": "SnapshotMetadataService",
        "metadata": {"name": name},
        "spec": {"address": "sm.ns:6443", "audience": "a", "caCert": "Zm9v"},
    }))
    .unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> u16 {
    match r {
        Err(kube::Error::Api(s)) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_installed_crd_serves_its_versions_until_it_is_changed_or_deleted() {
    let server = FakeKube::builder().start().await.unwrap();
    let c = client(&server.kubeconfig_yaml("f"), "f").await;
    let beta: Api<DynamicObject> = Api::all_with(c.clone(), &sms("v1beta1"));
    assert_eq!(code(beta.list(&ListParams::default()).await), 404);
    assert_eq!(
        code(
            c.list_api_group_resources("cbt.storage.k8s.io/v1beta1")
                .await
        ),
        404
    );

    let created = server
        .install_yaml(upstream::SNAPSHOT_METADATA_SERVICES)
        .unwrap();
    assert_eq!(created.len(), 1);
    beta.create(&PostParams::default(), &sms_object("v1beta1", "d"))
        .await
        .unwrap();
    let resources = c
        .list_api_group_resources("cbt.storage.k8s.io/v1beta1")
        .await
        .unwrap();
    assert!(
        resources
            .resources
            .iter()
            .any(|r| r.name == "snapshotmetadataservices" && !r.namespaced)
    );
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "cbt.storage.k8s.io"));

    // The apiextensions controllers establish it.
    let crds: Api<CustomResourceDefinition> = Api::all(c.clone());
    let name = "snapshotmetadataservices.cbt.storage.k8s.io";
    let mut established = false;
    for _ in 0..100 {
        let crd = crds.get(name).await.unwrap();
        let conds = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        if conds
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
        {
            established = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(established);

    // The old release: only v1alpha1 served. The object stays, readable at the served version.
    let patch = json!({"spec": {"versions": [{"name": "v1alpha1", "served": true, "storage": true,
        "schema": {"openAPIV3Schema": {"type": "object"}}}]}});
    crds.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(code(beta.get("d").await), 404);
    let alpha: Api<DynamicObject> = Api::all_with(c.clone(), &sms("v1alpha1"));
    assert_eq!(alpha.get("d").await.unwrap().data["spec"]["audience"], "a");

    crds.delete(name, &DeleteParams::default()).await.unwrap();
    assert_eq!(code(alpha.list(&ListParams::default()).await), 404);

    // A CRD not named after its resource is refused.
    let mut bad: CustomResourceDefinition =
        serde_saphyr::from_str(upstream::SNAPSHOT_METADATA_SERVICES).unwrap();
    bad.metadata.name = Some("wrong.cbt.storage.k8s.io".into());
    assert_eq!(code(crds.create(&PostParams::default(), &bad).await), 422);
}

#[tokio::test]
async fn installing_the_snapshot_crds_into_a_fake_serving_them_changes_nothing() {
    let server = FakeKube::builder().start().await.unwrap();
    server.seed_standard("ns").unwrap();
    for yaml in [
        upstream::VOLUME_SNAPSHOTS,
        upstream::VOLUME_SNAPSHOT_CONTENTS,
        upstream::VOLUME_SNAPSHOT_CLASSES,
    ] {
        server.install_yaml(yaml).unwrap();
    }
    let c = client(&server.kubeconfig_yaml("f"), "f").await;
    let group = c
        .list_api_group_resources("snapshot.storage.k8s.io/v1")
        .await
        .unwrap();
    let names: Vec<&str> = group.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "volumesnapshots").count(),
        1,
        "{names:?}"
    );
    // v1beta1 is listed with served: false upstream.
    assert_eq!(
        code(
            c.list_api_group_resources("snapshot.storage.k8s.io/v1beta1")
                .await
        ),
        404
    );
    assert_eq!(
        server
            .list("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass")
            .len(),
        1
    );
}

#[tokio::test]
async fn services_and_endpoint_slices() {
    let server = FakeKube::builder().start().await.unwrap();
    server.seed_namespace("sm").unwrap();
    let c = client(&server.kubeconfig_yaml("f"), "f").await;
    let services: Api<Service> = Api::namespaced(c.clone(), "sm");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "snapshot-metadata"},
        "spec": {"selector": {"app": "hostpath"}, "ports": [{"port": 6443, "targetPort": 50051}]},
    }))
    .unwrap();
    let svc = services.create(&PostParams::default(), &svc).await.unwrap();
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert!(spec.cluster_ip.unwrap().starts_with("10.96."));
    let bad: Service =
        serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {}})).unwrap();
    assert_eq!(
        code(services.create(&PostParams::default(), &bad).await),
        422
    );

    let slices: Api<EndpointSlice> = Api::namespaced(c.clone(), "sm");
    for (name, service) in [
        ("snapshot-metadata-abc", "snapshot-metadata"),
        ("other-x", "other"),
    ] {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"port": 50051, "protocol": "TCP"}],
        }))
        .unwrap();
        slices.create(&PostParams::default(), &slice).await.unwrap();
    }
    let mine = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=snapshot-metadata"))
        .await
        .unwrap();
    assert_eq!(mine.items.len(), 1);
    assert_eq!(
        mine.items[0].endpoints.as_ref().unwrap()[0].addresses,
        ["127.0.0.1"]
    );
    let bad: EndpointSlice = serde_json::from_value(
        json!({"metadata": {"name": "b"}, "addressType": "IPv5", "endpoints": []}),
    )
    .unwrap();
    assert_eq!(code(slices.create(&PostParams::default(), &bad).await), 422);
}

#[tokio::test]
async fn discovery_and_self_reviews_are_open_to_every_authenticated_user() {
    let server = FakeKube::builder()
        .user("nobody-token", UserInfo::new("nobody", &[]))
        .rbac(Policy::new())
        .start()
        .await
        .unwrap();
    let c = client(&server.kubeconfig_yaml_as("n", "nobody-token"), "n").await;
    assert_eq!(c.apiserver_version().await.unwrap().major, "1");
    assert!(
        c.list_core_api_versions()
            .await
            .unwrap()
            .versions
            .contains(&"v1".to_string())
    );
    assert!(
        c.list_core_api_resources("v1")
            .await
            .unwrap()
            .resources
            .iter()
            .any(|r| r.name == "pods/log")
    );
    assert!(c.list_api_groups().await.is_ok());
    let reviews: Api<SelfSubjectAccessReview> = Api::all(c.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some("list".into()),
                resource: Some("pods".into()),
                namespace: Some("x".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    assert!(!answer.status.unwrap().allowed);
    // Everything else is still denied.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c, "x");
    assert_eq!(code(pods.list(&ListParams::default()).await), 403);
    assert!(
        server
            .denied()
            .iter()
            .all(|r| r.attributes.resource == "pods")
    );
}
