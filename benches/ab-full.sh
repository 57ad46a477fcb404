#!/usr/bin/env bash
# CPU seconds (user + system) of a full backup by two cbt binaries of the same image, to a local
# repository and to SeaweedFS (S3 on loopback), alternated, each into a fresh repository, and
# of the restore of that backup by the same binary (checked against the image); medians and
# spread of RUNS runs, and the ratio new / base. CPU time, not wall time, so that
# other load on the machine distorts it little.
#
# Usage: benches/ab-full.sh BASE_CBT NEW_CBT [SIZE_MIB] [RUNS]     (defaults 1024, 3)
#   STORES="local" benches/ab-full.sh ...     skip SeaweedFS
# The image is compare-restic.sh's: MiB blocks, 3/8 random, 3/8 text, 1/4 holes.
set -euo pipefail
base=$(realpath "$1") new=$(realpath "$2") size_mib=${3:-1024} runs=${4:-3}
stores=${STORES:-local seaweedfs}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/cbt-ab.XXXXXX")
weed_pid=""
cleanup() {
  if [ -n "$weed_pid" ]; then kill "$weed_pid" 2>/dev/null || true; wait "$weed_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.img
python3 - "$img" "$size_mib" <<'PY'
import os, random, sys
path, blocks = sys.argv[1], int(sys.argv[2])
mib = 1 << 20
line = lambda i: b"row %08d value=%s\n" % (i, b"abcdefgh" * (i % 5 + 1))
with open(path, "wb") as f:
    f.truncate(blocks * mib)
    for i in range(blocks):
        k = i % 8
        if k >= 6:
            continue
        f.seek(i * mib)
        if k <= 2:
            f.write(os.urandom(mib))
        else:
            text = b"".join(line(i * 40000 + j) for j in range(40000))
            f.write(text[:mib].ljust(mib, b"."))
PY
cat "$img" >/dev/null # in the page cache for every run alike

start_seaweed() {
  command -v weed >/dev/null || { echo "weed not on PATH: SeaweedFS skipped" >&2; return 1; }
  local port master volume filer conf
  read -r port master volume filer < <(python3 - <<'PY'
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
PY
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
  for _ in $(seq 120); do
    if "$new" --repo s3://bench/ready repo init >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "SeaweedFS did not come up" >&2
  tail -20 "$work/weed.log" >&2
  return 1
}

# cpu CMD...: CPU seconds of CMD (stdout discarded).
cpu() {
  local TIMEFORMAT='%3U %3S' u s
  { time "$@" >/dev/null 2>"$work/err"; } 2>"$work/time" || { cat "$work/err" >&2; return 1; }
  read -r u s <"$work/time"
  echo "$u + $s" | bc
}
# one BIN URL: CPU seconds of `backup --full` into a fresh repository at URL, then of the
# restore of that snapshot.
one() {
  local bin=$1 url=$2 b r
  "$bin" --repo "$url" repo init >/dev/null
  b=$(cpu "$bin" --repo "$url" backup --device "$img" --volume disk --snapshot s1 --full)
  rm -f "$work/out.img"
  r=$(cpu "$bin" --repo "$url" restore --volume disk --snapshot s1 --target "$work/out.img")
  cmp "$img" "$work/out.img"
  rm -f "$work/out.img"
  echo "$b $r"
}
stats() { # values...: "median (min-max)"
  printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%.3f (%.3f-%.3f)", v[int((NR+1)/2)], v[1], v[NR]}'
}
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

for store in $stores; do
  case $store in
    local) ;;
    seaweedfs) start_seaweed || continue ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
  b=() n=() rb=() rn=()
  for i in $(seq "$runs"); do
    for which in base new; do
      bin=$base; [ "$which" = new ] && bin=$new
      case $store in
        local) url="file://$work/repo-$which-$i" ;;
        seaweedfs) url="s3://bench/$which-$i" ;;
      esac
      read -r t r < <(one "$bin" "$url")
      if [ "$which" = base ]; then b+=("$t") rb+=("$r"); else n+=("$t") rn+=("$r"); fi
      if [ "$store" = local ]; then rm -rf "$work/repo-$which-$i"; fi
    done
  done
  printf '%s full, CPU s: base %s, new %s, new/base %.3f\n' "$store" "$(stats "${b[@]}")" "$(stats "${n[@]}")" \
    "$(echo "$(median "${n[@]}") / $(median "${b[@]}")" | bc -l)"
  printf '%s restore, CPU s: base %s, new %s, new/base %.3f\n' "$store" "$(stats "${rb[@]}")" "$(stats "${rn[@]}")" \
    "$(echo "$(median "${rn[@]}") / $(median "${rb[@]}")" | bc -l)"
done
