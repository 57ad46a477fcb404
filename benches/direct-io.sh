#!/usr/bin/env bash
# A full backup of a block device read through the page cache (`--direct-io never`) against
# one read with O_DIRECT (`--direct-io always`): CPU seconds (user + system), wall seconds and
# the page cache's growth (/proc/meminfo Buffers + Cached, caches dropped before each run):
# its peak during the backup, sampled every 50 ms (a device's cache is dropped when its last
# opener closes it, so what the reads pushed out of the cache shows only while they run), what
# is left after, and the peak of the block devices' cache alone (Buffers: other processes'
# file I/O, and the repository's, do not count there). To a local repository and to SeaweedFS (S3 on loopback), the two modes
# alternated, each into a fresh repository; medians and spread of RUNS runs.
#
# Needs root (a loop device, and dropping caches). The loop device does its own I/O to the
# image with direct I/O (`losetup --direct-io=on`), as a disk would: the page cache measured is
# the device's, not the image file's.
#
# Usage: benches/direct-io.sh CBT [SIZE_MIB] [RUNS]     (defaults 1024, 3)
#   STORES="local" benches/direct-io.sh ...     skip SeaweedFS
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
cbt=$(realpath "$1") size_mib=${2:-1024} runs=${3:-3}
stores=${STORES:-local seaweedfs}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/cbt-dio.XXXXXX")
dev=""
finish() {
  if [ -n "$dev" ]; then losetup -d "$dev" || true; fi
  cleanup
}
trap finish EXIT

[ "$(id -u)" = 0 ] || { echo "needs root (losetup, drop_caches)" >&2; exit 1; }
img=$work/disk.img
make_image "$img" "$size_mib"
dev=$(losetup --direct-io=on -f --show "$img")

# Page cache in MiB: files' (Cached) and block devices' (Buffers, where a device read through
# the cache lands).
cached_mib() { awk '/^(Cached|Buffers):/ {kib += $2} END {print int(kib / 1024)}' /proc/meminfo; }
# The block devices' page cache alone, in MiB: other processes' file I/O does not add to it.
buffers_mib() { awk '/^Buffers:/ {print int($2 / 1024)}' /proc/meminfo; }
# watch_peak: writes the largest page cache and block-device cache sizes seen to $work/peak
# and $work/peak-dev until killed.
watch_peak() {
  local max=0 maxdev=0 v
  while :; do
    v=$(cached_mib)
    if [ "$v" -gt "$max" ]; then max=$v; echo "$max" >"$work/peak"; fi
    v=$(buffers_mib)
    if [ "$v" -gt "$maxdev" ]; then maxdev=$v; echo "$maxdev" >"$work/peak-dev"; fi
    sleep 0.05
  done
}
# one MODE URL: "cpu wall peak_growth growth_after device_cache_peak_growth" of `backup
# --full` of the device into a fresh repository at URL, read with --direct-io MODE, from cold
# caches.
one() {
  local mode=$1 url=$2 TIMEFORMAT='%3U %3S %3R' u s r before after before_dev watcher
  "$cbt" --repo "$url" repo init >/dev/null
  sync
  echo 1 >/proc/sys/vm/drop_caches
  before=$(cached_mib) before_dev=$(buffers_mib)
  echo "$before" >"$work/peak"
  echo "$before_dev" >"$work/peak-dev"
  watch_peak &
  watcher=$!
  { time "$cbt" --repo "$url" backup --device "$dev" --volume disk --snapshot s1 --full \
      --direct-io "$mode" >/dev/null 2>"$work/err"; } 2>"$work/time" || r=failed
  kill "$watcher"; wait "$watcher" 2>/dev/null || true
  if [ "${r:-}" = failed ]; then cat "$work/err" "$work/time" >&2; return 1; fi
  after=$(cached_mib)
  read -r u s r <"$work/time"
  echo "$(echo "$u + $s" | bc) $r $(($(cat "$work/peak") - before)) $((after - before))" \
    "$(($(cat "$work/peak-dev") - before_dev))"
}
stats() { # values...: "median (min-max)"
  printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%.2f (%.2f-%.2f)", v[int((NR+1)/2)], v[1], v[NR]}'
}

printf '%-9s %-6s %-20s %-20s %-26s %-26s %s\n' store mode "cpu s" "wall s" "cache peak +MiB" \
  "cache after +MiB" "device cache peak +MiB"
for store in $stores; do
  case $store in
    local) ;;
    seaweedfs) start_seaweed "$cbt" || continue ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
  declare -A cpu=() wall=() peak=() grow=() devc=()
  for i in $(seq "$runs"); do
    for mode in never always; do
      case $store in
        local) url="file://$work/repo-$mode-$i" ;;
        seaweedfs) url="s3://bench/$mode-$i" ;;
      esac
      read -r c w p g d < <(one "$mode" "$url")
      cpu[$mode]+="$c " wall[$mode]+="$w " peak[$mode]+="$p " grow[$mode]+="$g " devc[$mode]+="$d "
      [ "$store" = local ] && rm -rf "$work/repo-$mode-$i"
    done
  done
  for mode in never always; do
    # shellcheck disable=SC2086 # word splitting of the collected values is intended
    printf '%-9s %-6s %-20s %-20s %-26s %-26s %s\n' "$store" "$mode" "$(stats ${cpu[$mode]})" \
      "$(stats ${wall[$mode]})" "$(stats ${peak[$mode]})" "$(stats ${grow[$mode]})" \
      "$(stats ${devc[$mode]})"
  done
  unset cpu wall peak grow devc
done
