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
RUNS=${RUNS:-11}
BERTH=${BERTH:-target/release/berth}
PODMAN=(podman --cgroup-manager=cgroupfs --runtime runc)
PODMAN_RUN=(run -d --network none --ulimit nofile=1000:1000 --ulimit nproc=1000:1000)
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-start.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ref="127.0.0.1:$port/bench/bb:1"
cleanup() {
  mkdir -p "$work/empty"
  "$BERTH" --state-dir "$work/state" apply --allow-empty --max-deletions 100000 "$work/empty" >/dev/null 2>&1 || true
  "${PODMAN[@]}" rm -f $("${PODMAN[@]}" ps -aq --filter label=berth-bench=1 2>/dev/null) >/dev/null 2>&1 || true
  "${PODMAN[@]}" rmi -f "$ref" >/dev/null 2>&1 || true
  [ -n "${regpid:-}" ] && kill "$regpid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export BERTH_CONFIG=/dev/null

cat > "$work/reg.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/regdata}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/reg.yml" >/dev/null 2>&1 &
regpid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/busybox"
for a in sh true sleep; do ln -s busybox "$work/rootfs/bin/$a"; done
python3 benches/mkimage.py "$work/layout" 1 "$work/rootfs" >/dev/null
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:1" "docker://$ref"
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

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# $EPOCHREALTIME (bash 5) rather than $(date): no helper process inside the timed span
t() { local s e; s=$EPOCHREALTIME; "$@" >/dev/null 2>&1; e=$EPOCHREALTIME; echo "$e - $s" | bc; }

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
