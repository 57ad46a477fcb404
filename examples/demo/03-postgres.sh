#!/usr/bin/env bash
# PostgreSQL on a raw block PVC (manifests/postgres-pvc.yaml, labelled backup=cbt) with a
# filesystem made and mounted inside the pod (manifests/postgres.yaml says how and why), and a
# table to count rows in.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need kubectl

log "block PVC $NS/data and PostgreSQL on it"
k apply -f "$DEMO_DIR/manifests/postgres-pvc.yaml" -f "$DEMO_DIR/manifests/postgres.yaml"
wait_postgres
[[ "$(k -n "$NS" get pvc data -o 'jsonpath={.spec.volumeMode}')" == "Block" ]] \
  || die "PVC $NS/data is not a block volume"
psql_db 'CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, payload text NOT NULL)'
log "PostgreSQL ready; next: 04-backup-restore.sh"
