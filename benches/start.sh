#!/usr/bin/env bash
# Start benchmark: `berth apply` adding one /bin/true container (network none) to an already
# converged host, against `podman run -d` of the same image, side by side, RUNS times each;
# reports medians and the ratio. The image (busybox-static) is pushed to a local
# docker-registry on 127.0.0.1 and pulled by both tools before timing starts. Needs root,
# docker-registry, skopeo, podman, busybox-static and a release build.
#
#   bash benches/start.sh           # RUNS=11 by default
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-11}
BERTH=${BERTH:-target/release/berth}
PODMAN_RUN=(run -d --network none --ulimit nofile=1000:1000 --ulimit nproc=1000:1000)
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-start.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/bb:1"
trap cleanup_bench EXIT
export BERTH_CONFIG=/dev/null

start_registry "$work" "$port"

push_busybox "$work" "$ref" sh true sleep
"$BERTH" --state-dir "$work/state" image pull -q "$ref"
"${PODMAN[@]}" pull -q --tls-verify=false "$ref" >/dev/null

# the converged host: one long-running container
mkdir -p "$work/m"
base() {
  cat <<TOML
[image.bb]
ref = "$ref"
pull = "never"

[container.base]
image = "bb"
command = ["sleep", "100000"]
networks = ["none"]
stop_timeout = "1s"
TOML
}
base > "$work/m/base.toml"
"$BERTH" --state-dir "$work/state" apply "$work/m" >/dev/null


: > "$work/berth.t"; : > "$work/podman.t"
for i in $(seq "$RUNS"); do
  cat > "$work/m/new.toml" <<TOML
[container.new$i]
image = "bb"
command = ["true"]
networks = ["none"]
TOML
  t "$BERTH" --state-dir "$work/state" apply "$work/m" >> "$work/berth.t"
  rm "$work/m/new.toml"
  "$BERTH" --state-dir "$work/state" apply "$work/m" >/dev/null
  t "${PODMAN[@]}" "${PODMAN_RUN[@]}" --label berth-bench=1 --name "bench-new$i" "$ref" true >> "$work/podman.t"
  "${PODMAN[@]}" rm -f "bench-new$i" >/dev/null 2>&1
  echo "run $i: berth $(tail -1 "$work/berth.t")s podman $(tail -1 "$work/podman.t")s"
done
b=$(median < "$work/berth.t"); p=$(median < "$work/podman.t")
echo
echo "medians over $RUNS runs: berth apply (+1 container) ${b}s, podman run -d ${p}s"
echo "podman / berth = $(echo "scale=1; $p / $b" | bc)x   (target ≥ 10x)"
