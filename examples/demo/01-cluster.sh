#!/usr/bin/env bash
# A kind cluster ready for CBT backups: the VolumeSnapshot CRDs and snapshot-controller
# (external-snapshotter), the SnapshotMetadataService CRD (external-snapshot-metadata), the CSI
# hostpath driver with the external-snapshot-metadata sidecar, a TLS certificate for the sidecar
# from a CA generated here, the SnapshotMetadataService object that tells clients about it, and
# the cbt images built from this repository and loaded into the node.
#
# Needs: kind, kubectl, docker, git, openssl. Versions can be overridden through the
# environment (below). Re-running is safe: existing objects are updated.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SNAPSHOTTER_VERSION="${SNAPSHOTTER_VERSION:-v8.2.0}"
SNAPSHOT_METADATA_VERSION="${SNAPSHOT_METADATA_VERSION:-v1.1.0}"
HOSTPATH_VERSION="${HOSTPATH_VERSION:-v1.17.0}"
# Audience the mover's projected token must carry; any string both sides agree on.
AUDIENCE="${AUDIENCE:-cbt-demo}"
# Where the hostpath deployment puts the sidecar's Service (see its deploy script).
SIDECAR_NS=default
SIDECAR_SERVICE=csi-snapshot-metadata
DRIVER=hostpath.csi.k8s.io

need kind kubectl docker git openssl base64
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if kind get clusters | grep -qx "$CLUSTER"; then
  log "kind cluster $CLUSTER exists; reusing it"
else
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$DEMO_DIR/kind-config.yaml" --wait 120s
fi

log "VolumeSnapshot CRDs and snapshot-controller ($SNAPSHOTTER_VERSION)"
SNAPSHOTTER_REPO="https://github.com/kubernetes-csi/external-snapshotter"
k kustomize "$SNAPSHOTTER_REPO/client/config/crd?ref=$SNAPSHOTTER_VERSION" | k apply -f -
k -n kube-system kustomize "$SNAPSHOTTER_REPO/deploy/kubernetes/snapshot-controller?ref=$SNAPSHOTTER_VERSION" \
  | k -n kube-system apply -f -
k -n kube-system rollout status deploy/snapshot-controller --timeout=300s

log "SnapshotMetadataService CRD ($SNAPSHOT_METADATA_VERSION)"
k apply -f "https://raw.githubusercontent.com/kubernetes-csi/external-snapshot-metadata/$SNAPSHOT_METADATA_VERSION/client/config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml"
k wait --for=condition=Established crd/snapshotmetadataservices.cbt.storage.k8s.io --timeout=60s

log "CSI hostpath driver $HOSTPATH_VERSION with the snapshot-metadata sidecar"
git clone --quiet --depth 1 --branch "$HOSTPATH_VERSION" \
  https://github.com/kubernetes-csi/csi-driver-host-path "$WORK/hostpath"
# The upstream script uses the current kubectl context; make it this cluster's.
kubectl config use-context "kind-$CLUSTER" >/dev/null
# SNAPSHOT_METADATA_TESTS adds the external-snapshot-metadata sidecar to the plugin pod, its
# RBAC, its Service, and a TLS Secret + SnapshotMetadataService from upstream test data; the
# certificate and the object are replaced below with ones from a CA made here.
SNAPSHOT_METADATA_TESTS=true "$WORK/hostpath/deploy/kubernetes-latest/deploy.sh"
containers="$(k -n "$SIDECAR_NS" get statefulset csi-hostpathplugin \
  -o 'jsonpath={.spec.template.spec.containers[*].name}')"
[[ " $containers " == *" csi-snapshot-metadata "* ]] \
  || die "the hostpath plugin has no csi-snapshot-metadata container ($containers): does $HOSTPATH_VERSION's deploy.sh support SNAPSHOT_METADATA_TESTS?"
k -n "$SIDECAR_NS" get service "$SIDECAR_SERVICE" >/dev/null \
  || die "Service $SIDECAR_NS/$SIDECAR_SERVICE is missing"

log "TLS for the sidecar: a CA made here, a server certificate for the Service's names"
host="$SIDECAR_SERVICE.$SIDECAR_NS"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=cbt-demo-ca" \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
# Clients connect to the host of the SnapshotMetadataService address and check it against
# these names (cbt uses exactly the host part of spec.address as the TLS server name).
printf 'subjectAltName=DNS:%s,DNS:%s.svc,DNS:%s.svc.cluster.local\n' "$host" "$host" "$host" \
  > "$WORK/san.cnf"
openssl x509 -req -days 30 -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
  -CAcreateserial -extfile "$WORK/san.cnf" -out "$WORK/server.pem" 2>/dev/null
k -n "$SIDECAR_NS" create secret tls csi-snapshot-metadata-certs \
  --cert="$WORK/server.pem" --key="$WORK/server.key" --dry-run=client -o yaml | k apply -f -

log "SnapshotMetadataService $DRIVER -> $host:6443, audience $AUDIENCE"
k apply -f - <<YAML
apiVersion: cbt.storage.k8s.io/v1beta1
kind: SnapshotMetadataService
metadata:
  name: $DRIVER
spec:
  address: $host:6443
  audience: $AUDIENCE
  caCert: $(base64 < "$WORK/ca.pem" | tr -d '\n')
YAML
# The sidecar reads its certificate at start, and the audience from the object per call.
k -n "$SIDECAR_NS" rollout restart statefulset/csi-hostpathplugin
k -n "$SIDECAR_NS" rollout status statefulset/csi-hostpathplugin --timeout=300s

log "StorageClass csi-hostpath-sc and the default VolumeSnapshotClass"
k apply -f "$WORK/hostpath/examples/csi-storageclass.yaml"
# cbt cuts snapshots with the driver's default class unless told --snapshot-class.
class="$(k get volumesnapshotclass -o "jsonpath={.items[?(@.driver=='$DRIVER')].metadata.name}")"
[[ -n "$class" ]] || die "no VolumeSnapshotClass for $DRIVER"
for c in $class; do
  k annotate volumesnapshotclass "$c" snapshot.storage.kubernetes.io/is-default-class=true --overwrite
done

log "cbt images from this repository: $CBT_IMAGE (orchestrator), $MOVER_IMAGE (mover)"
docker build -t "$CBT_IMAGE" "$REPO_ROOT"
docker build --target mover -t "$MOVER_IMAGE" "$REPO_ROOT"
kind load docker-image --name "$CLUSTER" "$CBT_IMAGE" "$MOVER_IMAGE"

log "cluster ready; next: 02-s3.sh"
