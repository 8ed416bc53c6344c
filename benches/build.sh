#!/usr/bin/env bash
# Build benchmark: a 10-step Containerfile (FROM a busybox image in a local registry, RUN,
# COPY, ENV, WORKDIR, CMD…) built by `berth image build` and by `podman build` (buildah) of
# the same context, side by side: the first build, then RUNS unchanged rebuilds and RUNS
# rebuilds after one copied file changed (from step 7 on). Reports medians and ratios.
# Needs root, docker-registry, skopeo, podman (with runc), busybox-static, a release build.
#
#   bash benches/build.sh          # RUNS=5 by default
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-5}
BERTH=${BERTH:-target/release/berth}
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-build.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/bb:1"
out="127.0.0.1:$port/bench/built:1"
trap 'cleanup_bench; "${PODMAN[@]}" rmi -f "$out" >/dev/null 2>&1 || true' EXIT
export BERTH_CONFIG=/dev/null

start_registry "$work" "$port"
push_busybox "$work" "$ref" sh sleep mkdir echo cat ls rm true
mkdir -p "$work/ctx/src"
for i in $(seq 20); do head -c 100000 /dev/urandom > "$work/ctx/src/data$i"; done
echo one > "$work/ctx/changing.txt"
cat > "$work/ctx/Containerfile" <<EOF
FROM $ref
ENV APP_HOME=/app
WORKDIR /app
RUN mkdir -p /app/bin /app/data && echo built > /app/built
COPY src/ /app/data/
RUN ls /app/data > /app/listing
COPY changing.txt /app/changing.txt
RUN cat /app/changing.txt > /app/seen
LABEL bench=berth
CMD ["cat", "/app/seen"]
EOF

PB=(build --quiet --network none --tls-verify=false --ulimit nofile=1000:1000 --ulimit nproc=1000:1000 -t "$out" "$work/ctx")
b_build() { "$BERTH" --state-dir "$work/state" image build --quiet -t "$out" "$work/ctx" >/dev/null; }
p_build() { "${PODMAN[@]}" "${PB[@]}" >/dev/null; }

s=$(now); b_build; e=$(now); first_b=$(echo "$e - $s" | bc)
s=$(now); p_build; e=$(now); first_p=$(echo "$e - $s" | bc)
: > "$work/b.same"; : > "$work/p.same"; : > "$work/b.one"; : > "$work/p.one"
for r in $(seq "$RUNS"); do
  t b_build >> "$work/b.same"
  t p_build >> "$work/p.same"
  echo "change $r" > "$work/ctx/changing.txt"
  t b_build >> "$work/b.one"
  echo "change $r again" > "$work/ctx/changing.txt"
  t p_build >> "$work/p.one"
done
bs=$(median < "$work/b.same"); ps=$(median < "$work/p.same")
bo=$(median < "$work/b.one"); po=$(median < "$work/p.one")
echo
echo "first build: berth ${first_b}s, podman ${first_p}s"
echo "unchanged rebuild (median of $RUNS): berth ${bs}s, podman ${ps}s: podman / berth = $(echo "scale=1; $ps / $bs" | bc)x"
echo "one file changed (median of $RUNS): berth ${bo}s, podman ${po}s: podman / berth = $(echo "scale=1; $po / $bo" | bc)x"
