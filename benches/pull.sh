#!/usr/bin/env bash
# Pull benchmark: berth vs podman (pull + unpack) vs skopeo (download only), side by side.
#
# Builds a ≥300 MB image of two layers (plus busybox), pushes it to a local docker-registry on
# 127.0.0.1, then times each tool RUNS times from a cold local store and reports medians and
# ratios. Needs root, docker-registry, skopeo, podman, busybox-static, and a release
# build (cargo build --release).
#
#   bash benches/pull.sh            # RUNS=5 by default
#   RUNS=3 LAYER_MB=160 bash benches/pull.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-5}
LAYER_MB=${LAYER_MB:-160}
BERTH=${BERTH:-target/release/berth}
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-bench.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/big:1"
trap cleanup_bench EXIT

start_registry "$work" "$port"

echo "building a $((2 * LAYER_MB)) MB image (2 random-data layers over busybox)…"
mkdir -p "$work/l0/bin" "$work/l1/data1" "$work/l2/data2"
cp /bin/busybox "$work/l0/bin/busybox"
# many files of mixed sizes: half the bytes in 4 big files, half in small ones
for n in 1 2; do
  d="$work/l$n/data$n"
  for i in 1 2; do head -c $((LAYER_MB / 4))M /dev/urandom > "$d/big$i"; done
  mkdir -p "$d/small"
  for i in $(seq 1 $((LAYER_MB * 4))); do head -c 131072 /dev/urandom > "$d/small/f$i"; done
done
python3 benches/mkimage.py "$work/layout" 1 "$work/l0" "$work/l1" "$work/l2" >/dev/null
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:1" "docker://$ref"
size=$(du -sm "$work/regdata" | cut -f1)
echo "image pushed: $ref (${size} MB in the registry)"


: > "$work/berth.t"; : > "$work/podman.t"; : > "$work/skopeo.t"
for i in $(seq "$RUNS"); do
  rm -rf "$work/bs"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t "$BERTH" --state-dir "$work/bs" image pull -q "$ref" >> "$work/berth.t"
  "${PODMAN[@]}" rmi -f "$ref" >/dev/null 2>&1 || true; sync
  t "${PODMAN[@]}" pull -q --tls-verify=false "$ref" >> "$work/podman.t"
  rm -rf "$work/sk"; sync
  t skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$work/sk:1" >> "$work/skopeo.t"
  echo "run $i: berth $(tail -1 "$work/berth.t")s podman $(tail -1 "$work/podman.t")s skopeo $(tail -1 "$work/skopeo.t")s"
done
b=$(median < "$work/berth.t"); p=$(median < "$work/podman.t"); s=$(median < "$work/skopeo.t")
echo
echo "medians over $RUNS runs: berth pull+unpack ${b}s, podman pull ${p}s, skopeo copy (download only) ${s}s"
echo "podman / berth = $(echo "scale=2; $p / $b" | bc)x   (target ≥ 4x)"
echo "berth / skopeo = $(echo "scale=2; $b / $s" | bc)x   (target ≤ 2x)"
