#!/usr/bin/env bash
# The whole story, with the example CronJob and restore Job doing the work in the cluster:
#   rows -> full backup -> more rows -> incremental backup (reads only changed blocks)
#   -> backup-status, integrity-check, restore-dry-run (cbt commands)
#   -> delete the database and its PVC -> restore into a new PVC -> PostgreSQL on it
#   -> the row count matches, or this script exits non-zero.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need kubectl jq
ensure_cbt
WORK="$(mktemp -d)"
cleanup() { stop_s3_forward; rm -rf "$WORK"; }
trap cleanup EXIT

ROWS_FIRST="${ROWS_FIRST:-20000}"
ROWS_MORE="${ROWS_MORE:-5000}"
RESTORED_PVC=data-restored

# Runs the CronJob once now, as Job $1, and leaves cbt's JSON report in $WORK/$1.json.
backup() {
  local name=$1
  k -n "$NS" delete job "$name" --ignore-not-found --wait
  k -n "$NS" create job "$name" --from=cronjob/cbt-backup
  wait_job "$name" > "$WORK/$name.json"
  jq -r '.results[] | "\(.pvc): \(.report.mover.metadata_call // "failed"), read \(.report.mover.bytes_read) of \(.report.mover.volume_size) bytes, snapshot \(.report.mover.snapshot)"' \
    "$WORK/$name.json"
}

insert_rows() {
  psql_db "INSERT INTO items (payload) SELECT md5(g::text) FROM generate_series(1, $1) g" >/dev/null
  # Not needed for correctness (the snapshot is crash-consistent and PostgreSQL replays its
  # WAL on the restore), but it makes the restored database start without recovery work.
  psql_db 'CHECKPOINT' >/dev/null
}

log "the example CronJob (examples/kubernetes/cronjob.yaml), suspended: the demo starts runs itself"
example cronjob.yaml | k apply -f -
k -n "$NS" patch cronjob cbt-backup --type=merge -p '{"spec":{"suspend":true}}'

log "insert $ROWS_FIRST rows, then a full backup"
insert_rows "$ROWS_FIRST"
backup cbt-full
[[ "$(jq -r '.results[0].report.mover.parent' "$WORK/cbt-full.json")" == "null" ]] \
  || log "note: the repository already had a backup of $NS.data, so this run was incremental"

log "insert $ROWS_MORE more rows, then an incremental backup"
insert_rows "$ROWS_MORE"
expected="$(psql_db 'SELECT count(*) FROM items')"
backup cbt-incremental
call="$(jq -r '.results[0].report.mover.metadata_call' "$WORK/cbt-incremental.json")"
[[ "$call" == "GetMetadataDelta" ]] || die "the second backup was not incremental ($call)"
snapshot="$(jq -r '.results[0].report.mover.snapshot' "$WORK/cbt-incremental.json")"
log "backed up $expected rows as $NS.data/$snapshot"

start_s3_forward
log "backup-status: cbt list and cbt status"
cbt_local list --volume "$NS.data"
cbt_local status

log "integrity-check: cbt verify --read-data (every chunk downloaded and checksummed)"
cbt_local verify --read-data

log "restore-dry-run: the plan, then the objects a restore into a PVC would create"
cbt_local restore --volume "$NS.data" --snapshot "$snapshot" --target "$WORK/plan.img" --dry-run
# Printed only: the restore itself runs in the cluster (restore-job.yaml), where the S3
# endpoint is the Service's name rather than this machine's port-forward.
cbt_local restore --volume "$NS.data" --snapshot "$snapshot" --to-pvc "$RESTORED_PVC" \
  -n "$NS" --context "kind-$CLUSTER" --s3-secret "$S3_SECRET" --image "$MOVER_IMAGE" --dry-run

log "disaster: delete the database and its PVC"
k -n "$NS" delete deploy postgres --wait
k -n "$NS" wait --for=delete pod -l app.kubernetes.io/name=postgres --timeout=120s
k -n "$NS" delete pvc data --wait
k -n "$NS" delete pvc "$RESTORED_PVC" --ignore-not-found --wait

log "restore $NS.data/$snapshot into PVC $RESTORED_PVC (examples/kubernetes/restore-job.yaml)"
k -n "$NS" delete job cbt-restore-data --ignore-not-found --wait
example restore-job.yaml | sed -e "s#REPLACE-WITH-SNAPSHOT-NAME#$snapshot#" | k apply -f -
wait_job cbt-restore-data | jq -r '"wrote \(.mover.bytes_written) bytes, \(.mover.chunks_verified) chunks read back and verified"'

log "PostgreSQL on the restored PVC"
sed -e "s/claimName: data$/claimName: $RESTORED_PVC/" "$DEMO_DIR/manifests/postgres.yaml" | k apply -f -
wait_postgres
restored="$(psql_db 'SELECT count(*) FROM items')"
if [[ "$restored" != "$expected" ]]; then
  die "row count mismatch: $restored rows after the restore, $expected at the backup"
fi
log "OK: $restored rows after the restore, $expected at the backup"
