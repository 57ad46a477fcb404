# shellcheck shell=bash
# Shared settings and helpers of the demo scripts (sourced, not run).
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file

DEMO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$DEMO_DIR/../.." && pwd)"
EXAMPLES="$REPO_ROOT/examples/kubernetes"

CLUSTER="${CLUSTER:-cbt-demo}"
# The example manifests' namespace, repository and S3 Secret: the demo uses them unchanged.
NS=db
S3_NS=cbt-s3
BUCKET=cbt-backups
REPO_URL=s3://cbt-backups/cluster-a
S3_SECRET=cbt-s3
# Built from the repository's Dockerfile by 01-cluster.sh and loaded into the kind node.
CBT_IMAGE=cbt:demo
MOVER_IMAGE=cbt-mover:demo
# The local port the repository commands on this machine reach SeaweedFS through.
S3_LOCAL_PORT="${S3_LOCAL_PORT:-18333}"
# The `cbt` binary for repository commands run here (list, status, verify, dry runs).
CBT="${CBT:-$REPO_ROOT/target/release/cbt}"

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

need() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "$c is required on PATH"
  done
}

# kubectl against the demo cluster only, whatever the current context is.
k() { kubectl --context "kind-$CLUSTER" "$@"; }

# Prints an example manifest with the demo's images instead of the placeholders.
example() {
  sed -e "s#registry.example.com/cbt-mover:0.1.0#$MOVER_IMAGE#" \
      -e "s#registry.example.com/cbt:0.1.0#$CBT_IMAGE#" \
      "$EXAMPLES/$1"
}

# Builds the local cbt binary if it is missing.
ensure_cbt() {
  if [[ ! -x "$CBT" ]]; then
    need cargo
    log "building cbt for the repository commands run on this machine"
    cargo build --release -p cbt-cli --manifest-path "$REPO_ROOT/Cargo.toml"
  fi
}

# Forwards SeaweedFS to 127.0.0.1:$S3_LOCAL_PORT until the script exits, and exports the
# repository credentials from the cluster's Secret for the local cbt.
S3_FORWARD_PID=""
stop_s3_forward() {
  if [[ -n "$S3_FORWARD_PID" ]]; then
    kill "$S3_FORWARD_PID" 2>/dev/null || true
    S3_FORWARD_PID=""
  fi
}
start_s3_forward() {
  k -n "$S3_NS" port-forward svc/seaweedfs "$S3_LOCAL_PORT:8333" >/dev/null 2>&1 &
  S3_FORWARD_PID=$!
  trap stop_s3_forward EXIT
  local i
  for i in $(seq 1 30); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$S3_LOCAL_PORT") 2>/dev/null; then
      break
    fi
    [[ $i -eq 30 ]] && die "port-forward to SeaweedFS did not come up on port $S3_LOCAL_PORT"
    sleep 1
  done
  AWS_ACCESS_KEY_ID="$(secret_value AWS_ACCESS_KEY_ID)"
  AWS_SECRET_ACCESS_KEY="$(secret_value AWS_SECRET_ACCESS_KEY)"
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
}

secret_value() {
  k -n "$NS" get secret "$S3_SECRET" -o "jsonpath={.data.$1}" | base64 -d
}

# cbt on this machine against the demo repository (through the port-forward).
cbt_local() {
  "$CBT" --repo "$REPO_URL" --s3-endpoint "http://127.0.0.1:$S3_LOCAL_PORT" "$@"
}

# Runs SQL in the database pod and prints the bare result.
psql_db() {
  k -n "$NS" exec deploy/postgres -c postgres -- psql -U postgres -v ON_ERROR_STOP=1 -tAc "$1"
}

wait_postgres() {
  k -n "$NS" rollout status deploy/postgres --timeout=300s
  local i
  for i in $(seq 1 60); do
    if psql_db 'SELECT 1' >/dev/null 2>&1; then
      return 0
    fi
    sleep 2
  done
  die "PostgreSQL did not accept connections"
}

# Waits for Job NAME in the demo namespace and prints its log (cbt's JSON report); exits with
# the log when the Job fails. Usage: wait_job NAME [TIMEOUT_SECONDS]
wait_job() {
  local name=$1 timeout=${2:-900}
  local i
  for i in $(seq 1 "$timeout"); do
    if [[ "$(k -n "$NS" get job "$name" -o 'jsonpath={.status.succeeded}')" == "1" ]]; then
      k -n "$NS" logs "job/$name"
      return 0
    fi
    if [[ "$(k -n "$NS" get job "$name" -o 'jsonpath={.status.failed}')" =~ ^[1-9] ]]; then
      k -n "$NS" logs "job/$name" >&2 || true
      die "Job $NS/$name failed (its log is above)"
    fi
    sleep 1
  done
  die "Job $NS/$name did not finish in $timeout s"
}
