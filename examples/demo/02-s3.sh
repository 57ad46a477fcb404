#!/usr/bin/env bash
# An S3 server in the cluster (SeaweedFS, manifests/seaweedfs.yaml) with random credentials,
# the bucket of the example repository, the example namespace and RBAC
# (examples/kubernetes/namespace.yaml, rbac.yaml), the Secret the cbt Jobs read the credentials
# from (the example's `cbt-s3`, with the generated values), and the repository itself.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need kubectl openssl base64

log "SeaweedFS in namespace $S3_NS"
k apply -f "$DEMO_DIR/manifests/seaweedfs.yaml"
if k -n "$S3_NS" get secret seaweedfs-s3-config >/dev/null 2>&1; then
  log "reusing the existing credentials"
else
  access_key="cbt$(openssl rand -hex 8)"
  secret_key="$(openssl rand -hex 24)"
  # One identity that may read and write; SeaweedFS checks every request's signature.
  config="$(printf '{"identities":[{"name":"cbt","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
    "$access_key" "$secret_key")"
  k -n "$S3_NS" create secret generic seaweedfs-s3-config --from-literal="s3.json=$config"
  k apply -f "$EXAMPLES/namespace.yaml"
  # The example Secret's keys, with this server's values.
  k -n "$NS" create secret generic "$S3_SECRET" \
    --from-literal="AWS_ACCESS_KEY_ID=$access_key" \
    --from-literal="AWS_SECRET_ACCESS_KEY=$secret_key" \
    --dry-run=client -o yaml | k apply -f -
fi
k -n "$S3_NS" rollout status deploy/seaweedfs --timeout=300s

log "bucket $BUCKET"
# `weed shell` talks to the master in the same pod; creating an existing bucket fails, so
# look first.
if ! k -n "$S3_NS" exec deploy/seaweedfs -- sh -c 'echo s3.bucket.list | weed shell' 2>/dev/null \
    | grep -qw "$BUCKET"; then
  k -n "$S3_NS" exec deploy/seaweedfs -- sh -c "echo 's3.bucket.create -name $BUCKET' | weed shell"
fi

log "namespace $NS and the cbt identities (examples/kubernetes/rbac.yaml)"
k apply -f "$EXAMPLES/namespace.yaml" -f "$EXAMPLES/rbac.yaml"

log "repository $REPO_URL"
ensure_cbt
start_s3_forward
if cbt_local status >/dev/null 2>&1; then
  log "repository exists"
else
  # 1 MiB chunks: a database writes small scattered pages (README: Performance).
  cbt_local repo init --chunk-size 1M
fi
log "S3 ready; next: 03-postgres.sh"
