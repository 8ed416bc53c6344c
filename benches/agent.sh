#!/usr/bin/env bash
# Agent benchmark. With `berth agent` running on a manifest directory:
#  (a) latency from a manifest write (a new file renamed into the directory) to the
#      container running (its supervisor wrote state.json), median over RUNS writes;
#  (b) the agent's RSS and CPU over IDLE seconds idle with N running containers (default
#      resync of 30 s, so two resyncs fall inside);
#  (c) the supervisor's private memory per container (Private_Dirty in smaps_rollup, the
#      mean over the N shims) beside podman's conmon measured the same way (M containers
#      started with `podman run -d`).
# Needs root, docker-registry, skopeo, podman (with runc), busybox-static, a release build.
#
#   bash benches/agent.sh          # RUNS=11 N=100 IDLE=60 M=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
RUNS=${RUNS:-11}
N=${N:-100}
IDLE=${IDLE:-60}
M=${M:-10}
BERTH=${BERTH:-target/release/berth}
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-agent.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/bb:1"
agent=
stop_agent() { [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true; agent=; }
trap 'stop_agent; cleanup_bench' EXIT
trap 'exit 1' INT TERM
export BERTH_CONFIG=/dev/null

start_registry "$work" "$port"
push_busybox "$work" "$ref" sh sleep
"$BERTH" --state-dir "$work/state" image pull -q "$ref"
"${PODMAN[@]}" pull -q --tls-verify=false "$ref" >/dev/null

mkdir -p "$work/m"
printf '[image.bb]\nref = "%s"\npull = "never"\n' "$ref" > "$work/m/image.toml"
"$BERTH" --state-dir "$work/state" agent --max-deletions 100000 "$work/m" 2>"$work/agent.log" &
agent=$!
until "$BERTH" --state-dir "$work/state" status --json 2>/dev/null | grep -q '"last_reconcile": {'; do sleep 0.05; done

container() { # container NAME: a manifest for one sleeping container, network none
  printf '[container.%s]\nimage = "bb"\ncommand = ["sleep", "100000"]\nnetworks = ["none"]\n' "$1"
}

# (a) write → running
: > "$work/latency.t"
for r in $(seq "$RUNS"); do
  container "lat$r" > "$work/.lat$r.toml"
  s=$(now)
  mv "$work/.lat$r.toml" "$work/m/lat$r.toml"
  until [ -e "$work/state/containers/lat$r/state.json" ]; do sleep 0.001; done
  e=$(now)
  echo "$e - $s" | bc >> "$work/latency.t"
  sleep 0.3
done
lat=$(median < "$work/latency.t")
rm -f "$work"/m/lat*.toml
sleep 1

# (b) N containers, then idle
{ for i in $(seq "$N"); do container "c$i"; echo; done; } > "$work/.all.toml"
mv "$work/.all.toml" "$work/m/all.toml"
until [ "$(ls "$work"/state/containers/c*/state.json 2>/dev/null | wc -l)" -ge "$N" ]; do sleep 0.2; done
sleep 5
ticks() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks); s=$(now)
sleep "$IDLE"
t1=$(ticks); e=$(now)
rss_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$agent/status")
cpu_pct=$(echo "scale=3; 100 * ($t1 - $t0) / $hz / ($e - $s)" | bc)

# (c) private memory per supervisor, berth's shims and podman's conmon
private_dirty() { awk '/^Private_Dirty/ {print $2}' "/proc/$1/smaps_rollup"; }
shim_total=0
for i in $(seq "$N"); do
  pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["shim_pid"])' "$work/state/containers/c$i/state.json")
  shim_total=$((shim_total + $(private_dirty "$pid")))
done
for i in $(seq "$M"); do
  "${PODMAN[@]}" run -d --network none --ulimit nofile=1000:1000 --ulimit nproc=1000:1000 --label berth-bench=1 --name "bench-agent-$i" "$ref" sleep 100000 >/dev/null
done
conmon_total=0
for id in $("${PODMAN[@]}" ps -q --filter label=berth-bench=1); do
  pid=$("${PODMAN[@]}" inspect --format '{{.State.ConmonPid}}' "$id")
  conmon_total=$((conmon_total + $(private_dirty "$pid")))
done

echo
echo "(a) manifest write → container running: median ${lat}s over $RUNS writes (target < 0.3 s)"
echo "(b) agent idle with $N containers over ${IDLE}s: RSS $((rss_kb / 1024)) MiB ($rss_kb kB; target < 20 MiB), CPU ${cpu_pct}% of a core (target < 1%)"
echo "(c) Private_Dirty per supervisor: berth shim $((shim_total / N)) kB (mean of $N; target < 1024 kB), podman conmon $((conmon_total / M)) kB (mean of $M)"
