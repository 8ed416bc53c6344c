#!/usr/bin/env bash
# Converge benchmark: 100 busybox `sleep` containers on one bridge network, from a host that
# has the image but no containers: one `berth apply` against the same 100 started with
# `podman run -d --network NAME` in a loop, side by side, RUNS times each; reports medians and
# the ratio. Both tools pull the image from a local docker-registry on 127.0.0.1 before
# timing starts; teardown is not timed. Needs root, docker-registry, skopeo, podman,
# busybox-static and a release build.
#
#   bash benches/converge.sh          # RUNS=3, N=100 by default
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-3}
N=${N:-100}
BERTH=${BERTH:-target/release/berth}
PODMAN_RUN=(run -d --ulimit nofile=1000:1000 --ulimit nproc=1000:1000)
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-converge.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/bb:1"
net="berthbench$$"
trap cleanup_bench EXIT
export BERTH_CONFIG=/dev/null

start_registry "$work" "$port"

push_busybox "$work" "$ref" sh sleep
"$BERTH" --state-dir "$work/state" image pull -q "$ref"
"${PODMAN[@]}" pull -q --tls-verify=false "$ref" >/dev/null
"${PODMAN[@]}" network create "$net" >/dev/null

mkdir -p "$work/m" "$work/empty"
{
  printf '[image.bb]\nref = "%s"\npull = "never"\n\n[network.bench]\n' "$ref"
  for i in $(seq "$N"); do
    printf '\n[container.c%s]\nimage = "bb"\ncommand = ["sh", "-c", "trap \\"exit 0\\" TERM; sleep 100000 & wait"]\nnetworks = ["bench"]\n' "$i"
  done
} > "$work/m/all.toml"


: > "$work/berth.t"; : > "$work/podman.t"
for r in $(seq "$RUNS"); do
  s=$(now); "$BERTH" --state-dir "$work/state" apply ${PARALLEL:+--parallel $PARALLEL} "$work/m" >/dev/null; e=$(now)
  echo "$e - $s" | bc >> "$work/berth.t"
  running=$("$BERTH" --state-dir "$work/state" ps --json | python3 -c 'import json,sys; print(sum(r["state"] == "running" for r in json.load(sys.stdin)))')
  [ "$running" -eq "$N" ] || { echo "berth: only $running of $N running"; exit 1; }
  "$BERTH" --state-dir "$work/state" apply --allow-empty --max-deletions 100000 "$work/empty" >/dev/null

  s=$(now)
  for i in $(seq "$N"); do
    "${PODMAN[@]}" "${PODMAN_RUN[@]}" --network "$net" --label berth-bench=1 --name "bench-c$i" "$ref" sh -c 'trap "exit 0" TERM; sleep 100000 & wait' >/dev/null
  done
  e=$(now)
  echo "$e - $s" | bc >> "$work/podman.t"
  "${PODMAN[@]}" rm -f -t 0 $("${PODMAN[@]}" ps -aq --filter label=berth-bench=1) >/dev/null
  echo "run $r: berth $(tail -1 "$work/berth.t")s podman $(tail -1 "$work/podman.t")s"
done
b=$(median < "$work/berth.t"); p=$(median < "$work/podman.t")
echo
echo "medians over $RUNS runs of $N containers: berth apply ${b}s, podman run -d loop ${p}s"
echo "podman / berth = $(echo "scale=1; $p / $b" | bc)x   (target ≥ 15x)"
