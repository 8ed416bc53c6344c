#!/usr/bin/env bash
# Teardown benchmark: N busybox containers that exit on SIGTERM (a shell trapping TERM),
# network none, removed by one `berth apply --allow-empty` of an empty directory against
# `podman rm -f -t 10` of the same N started with `podman run -d`, side by side, RUNS times
# each; reports medians and the ratio. Starting the containers is not timed. Needs root,
# docker-registry, skopeo, podman (with runc), busybox-static and a release build.
#
#   bash benches/teardown.sh          # RUNS=3, N=100 by default
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-3}
N=${N:-100}
BERTH=${BERTH:-target/release/berth}
PODMAN_RUN=(run -d --network none --ulimit nofile=1000:1000 --ulimit nproc=1000:1000)
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-teardown.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/bb:1"
trap cleanup_bench EXIT
export BERTH_CONFIG=/dev/null

start_registry "$work" "$port"
push_busybox "$work" "$ref" sh sleep
"$BERTH" --state-dir "$work/state" image pull -q "$ref"
"${PODMAN[@]}" pull -q --tls-verify=false "$ref" >/dev/null

mkdir -p "$work/m" "$work/empty"
{
  printf '[image.bb]\nref = "%s"\npull = "never"\n' "$ref"
  for i in $(seq "$N"); do
    printf '\n[container.c%s]\nimage = "bb"\ncommand = ["sh", "-c", "trap \\"exit 0\\" TERM; sleep 100000 & wait"]\nnetworks = ["none"]\n' "$i"
  done
} > "$work/m/all.toml"

: > "$work/berth.t"; : > "$work/podman.t"
for r in $(seq "$RUNS"); do
  "$BERTH" --state-dir "$work/state" apply "$work/m" >/dev/null
  s=$(now)
  "$BERTH" --state-dir "$work/state" apply --allow-empty --max-deletions 100000 "$work/empty" >/dev/null
  e=$(now)
  echo "$e - $s" | bc >> "$work/berth.t"
  left=$("$BERTH" --state-dir "$work/state" ps -a --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
  [ "$left" -eq 0 ] || { echo "berth: $left containers left"; exit 1; }

  for i in $(seq "$N"); do
    "${PODMAN[@]}" "${PODMAN_RUN[@]}" --label berth-bench=1 --name "bench-c$i" "$ref" sh -c 'trap "exit 0" TERM; sleep 100000 & wait' >/dev/null
  done
  ids=$("${PODMAN[@]}" ps -aq --filter label=berth-bench=1)
  s=$(now)
  "${PODMAN[@]}" rm -f -t 10 $ids >/dev/null
  e=$(now)
  echo "$e - $s" | bc >> "$work/podman.t"
  echo "run $r: berth $(tail -1 "$work/berth.t")s podman $(tail -1 "$work/podman.t")s"
done
b=$(median < "$work/berth.t"); p=$(median < "$work/podman.t")
echo
echo "medians over $RUNS runs of $N containers: berth apply --allow-empty ${b}s, podman rm -f -t 10 ${p}s"
echo "podman / berth = $(echo "scale=1; $p / $b" | bc)x   (target ≥ 5x)"
