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
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
base=$(realpath "$1") new=$(realpath "$2") size_mib=${3:-1024} runs=${4:-3}
stores=${STORES:-local seaweedfs}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/cbt-ab.XXXXXX")
trap cleanup EXIT

img=$work/disk.img
make_image "$img" "$size_mib"
cat "$img" >/dev/null # in the page cache for every run alike

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
    seaweedfs) start_seaweed "$new" || continue ;;
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
