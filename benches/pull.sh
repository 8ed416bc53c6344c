#!/usr/bin/env bash
# Pull benchmark: berth vs podman (pull + unpack) vs skopeo (download only), side by side.
#
# Builds two ≥300 MB images of two layers each (plus busybox) and pushes them to a local
# docker-registry on 127.0.0.1:
#   random  LAYER_MB of random data per layer, half in 2 big files, half in 128 KB files:
#           incompressible, so every byte is hashed, copied and written twice;
#   files   LAYER_MB of real files per layer, taken in a fixed order from
#           /usr/lib/x86_64-linux-gnu (libraries) and /usr/share (mostly small text files):
#           what images are made of, ~12,000 files, compressing about 2:1.
# Then times each tool RUNS times per image and reports medians and ratios. Needs root,
# docker-registry, skopeo, podman, busybox-static, and a release build (cargo build --release).
#
#   bash benches/pull.sh                     # both images, RUNS=5
#   RUNS=3 IMAGES=random bash benches/pull.sh
#   LAYER_MB=160 BERTH=/path/to/berth bash benches/pull.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-5}
LAYER_MB=${LAYER_MB:-160}
IMAGES=${IMAGES:-random files}
BERTH=${BERTH:-target/release/berth}
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-bench.XXXXXX)
port=$(free_port)
ref=
# podman's run root must be short (≤ 50 characters): on /run, removed at exit like $work
runroot() { echo "/run/berth-bench-$$-$1"; }
trap 'rm -rf "$(runroot "")"*; cleanup_bench' EXIT

start_registry "$work" "$port"

build_random() {
  local d n i
  for n in 1 2; do
    d="$work/random/l$n/data$n"
    mkdir -p "$d/small"
    for i in 1 2; do head -c $((LAYER_MB / 4))M /dev/urandom > "$d/big$i"; done
    for i in $(seq 1 $((LAYER_MB * 4))); do head -c 131072 /dev/urandom > "$d/small/f$i"; done
  done
}

build_files() {
  python3 - "$work/files" "$LAYER_MB" <<'PY'
import os, shutil, sys
out, mb = sys.argv[1], int(sys.argv[2])
for n, src in ((1, "/usr/lib/x86_64-linux-gnu"), (2, "/usr/share")):
    total = 0
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            size = os.path.getsize(p)
            if total + size > mb << 20:
                continue
            d = os.path.join(out, f"l{n}", os.path.relpath(root, "/"))
            os.makedirs(d, exist_ok=True)
            shutil.copy2(p, os.path.join(d, f))
            total += size
PY
}

for image in $IMAGES; do
  echo "building the $image image (2 layers of $LAYER_MB MB over busybox)…"
  mkdir -p "$work/$image/l0/bin"
  cp /bin/busybox "$work/$image/l0/bin/busybox"
  "build_$image"
  python3 benches/mkimage.py "$work/$image/layout" 1 "$work/$image/l0" "$work/$image/l1" "$work/$image/l2" >/dev/null
  skopeo copy --quiet --dest-tls-verify=false "oci:$work/$image/layout:1" "docker://127.0.0.1:$port/bench/$image:1"
done
echo "images pushed ($(du -sm "$work/regdata" | cut -f1) MB in the registry)"

# Every tool pulls into a directory of its own that no run used before, and nothing is deleted
# until the end (the image sources included): on a journal-less ext4 like this machine's,
# creating files within 30 s of others being deleted makes the inode allocator skip the freed
# ones one by one (recently_deleted()), a cost that would depend on which tool ran before.
# Before each run: `sync`, the page cache dropped (so that no run starts with less free memory
# than another: on this VM, memory the guest has not used lately is slow to touch), then the
# registry's blobs and the tool's binary read back in (a registry that serves from memory).
warm() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  cat "$work"/regdata/docker/registry/v2/blobs/sha256/*/*/data "$@" > /dev/null
}
report=()
for image in $IMAGES; do
  ref="127.0.0.1:$port/bench/$image:1"
  : > "$work/berth.t"; : > "$work/podman.t"; : > "$work/skopeo.t"
  for i in $(seq "$RUNS"); do
    run="$work/run/$image.$i"
    mkdir -p "$run"
    warm "$BERTH"
    t "$BERTH" --state-dir "$run/berth" image pull -q "$ref" >> "$work/berth.t"
    warm "$(command -v podman)"
    t "${PODMAN[@]}" --root "$run/podman" --runroot "$(runroot "$image-$i")" pull -q --tls-verify=false "$ref" >> "$work/podman.t"
    warm "$(command -v skopeo)"
    t skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$run/skopeo:1" >> "$work/skopeo.t"
    echo "$image run $i: berth $(tail -1 "$work/berth.t")s podman $(tail -1 "$work/podman.t")s skopeo $(tail -1 "$work/skopeo.t")s"
  done
  b=$(median < "$work/berth.t"); p=$(median < "$work/podman.t"); s=$(median < "$work/skopeo.t")
  report+=("$image: medians over $RUNS runs: berth pull+unpack ${b}s, podman pull ${p}s, skopeo copy (download only) ${s}s"
    "  podman / berth = $(echo "scale=2; $p / $b" | bc)x (target ≥ 4x); berth / skopeo = $(echo "scale=2; $b / $s" | bc)x (target ≤ 2x)")
done
for i in $(seq "$RUNS"); do
  for image in $IMAGES; do
    "${PODMAN[@]}" --root "$work/run/$image.$i/podman" --runroot "$(runroot "$image-$i")" rmi -af >/dev/null 2>&1 || true
  done
done
echo
printf '%s\n' "${report[@]}"
