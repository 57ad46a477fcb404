#!/usr/bin/env bash
# Side-by-side: restic vs cbt on the same image, same disk, same run.
#
# Usage: benches/compare-restic.sh [SIZE_MIB]   (default 2048)
# Needs `restic` on PATH (Debian: apt-get install restic) and builds target/release/cbt.
#
# The image is 3/8 random, 3/8 compressible text and 1/4 holes, in 4 MiB stripes. The change
# rewrites 1% of the 4 MiB chunks in place. restic has no CBT, so it re-reads the whole image
# for the incremental; cbt is given the changed ranges, as a CSI GetMetadataDelta would.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
command -v restic >/dev/null || { echo "restic not on PATH (apt-get install restic)" >&2; exit 2; }
cargo build --release -q -p cbt-cli
cbt=$PWD/target/release/cbt

work=$(mktemp -d "${TMPDIR:-/var/tmp}/cbt-vs-restic.XXXXXX")
trap 'rm -rf "$work"' EXIT
img=$work/disk.img
chunks=$((size_mib / 4))

python3 - "$img" "$chunks" <<'EOF'
import os, random, sys
path, chunks = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
text = b"".join(b"row %08d value=%s\n" % (i, b"abcdefgh" * (i % 5 + 1)) for i in range(200000))
with open(path, "wb") as f:
    f.truncate(chunks * 4 << 20)
    for i in range(chunks):
        k = i % 8
        if k >= 6:
            continue  # hole
        f.seek(i * 4 << 20)
        f.write(os.urandom(4 << 20) if k <= 2 else text[: 4 << 20].ljust(4 << 20, b"."))
EOF

# Which chunks change: 1%, spread over the image, only data chunks.
changed=$(python3 - "$chunks" <<'EOF'
import random, sys
chunks = int(sys.argv[1]); rnd = random.Random(2)
data = [i for i in range(chunks) if i % 8 < 6]
print(" ".join(str(i) for i in sorted(rnd.sample(data, max(1, chunks // 100)))))
EOF
)

secs() { local s; s=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $s" | bc; }
sync
read_s=$(secs dd if="$img" of=/dev/null bs=4M status=none)

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$work/restic
restic init -q
r_full=$(secs restic backup -q "$img")
export CBT_REPO=file://$work/cbt
"$cbt" repo init >/dev/null
c_full=$(secs "$cbt" backup --device "$img" --volume disk --snapshot s1 --full)

ranges=""
for i in $changed; do
  dd if=/dev/urandom of="$img" bs=4M count=1 seek="$i" conv=notrunc status=none
  ranges="$ranges{\"offset\": $((i * 4194304)), \"length\": 4194304},"
done
echo "{\"volume_size\": $((chunks * 4194304)), \"ranges\": [${ranges%,}]}" > "$work/changed.json"
changed_mib=$(( $(echo "$changed" | wc -w) * 4 ))

r_incr=$(secs restic backup -q "$img")
c_incr=$(secs "$cbt" backup --device "$img" --volume disk --snapshot s2 --parent s1 --changed-ranges "$work/changed.json")

r_rest=$(secs restic restore latest -q --target "$work/r-out")
c_rest=$(secs "$cbt" restore --volume disk --snapshot s2 --target "$work/c-out.img")
cmp "$img" "$work/c-out.img" && cmp "$img" "$work/r-out$img"

r_size=$(du -sm "$work/restic" | cut -f1)
c_size=$(du -sm "$work/cbt" | cut -f1)
printf '\nimage %d MiB, %d MiB changed (1%% of chunks); plain read %.2f s\n' "$size_mib" "$changed_mib" "$read_s"
printf '%-12s %10s %10s %8s\n' step restic cbt speedup
for row in "full:$r_full:$c_full" "incremental:$r_incr:$c_incr" "restore:$r_rest:$c_rest"; do
  IFS=: read -r name r c <<<"$row"
  printf '%-12s %9.2fs %9.2fs %7.1fx\n' "$name" "$r" "$c" "$(echo "$r / $c" | bc -l)"
done
printf '%-12s %8d MiB %7d MiB\n' "repo size" "$r_size" "$c_size"
echo "both restores byte-identical to the changed image"
