# Shared by the benchmark scripts: sourced, not run.

PODMAN=(podman --cgroup-manager=cgroupfs --runtime runc)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_registry WORK PORT: Debian's docker-registry on 127.0.0.1:PORT, data under WORK;
# sets regpid (the caller's cleanup kills it) and returns once it answers.
start_registry() {
  cat > "$1/reg.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $1/regdata}}
http: {addr: 127.0.0.1:$2}
YML
  docker-registry serve "$1/reg.yml" >/dev/null 2>&1 &
  regpid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$2/v2/" >/dev/null && return; sleep 0.1; done
  echo "the registry on 127.0.0.1:$2 did not come up" >&2
  return 1
}

# push_busybox WORK REF APPLET…: a one-layer busybox-static image with those applets, pushed
# to REF.
push_busybox() {
  local work=$1 ref=$2 a
  shift 2
  mkdir -p "$work/rootfs/bin"
  cp /bin/busybox "$work/rootfs/bin/busybox"
  for a in "$@"; do ln -s busybox "$work/rootfs/bin/$a"; done
  python3 benches/mkimage.py "$work/layout" 1 "$work/rootfs" >/dev/null
  skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:1" "docker://$ref"
}

# cleanup_bench: remove what a benchmark made, on exit: berth's containers (state in
# $work/state), podman's (label berth-bench=1), the network $net if set, the image $ref, the
# registry, and $work.
cleanup_bench() {
  if [ -d "$work/state" ]; then
    mkdir -p "$work/empty"
    "$BERTH" --state-dir "$work/state" apply --allow-empty --max-deletions 100000 "$work/empty" >/dev/null 2>&1 || true
  fi
  "${PODMAN[@]}" rm -f -t 0 $("${PODMAN[@]}" ps -aq --filter label=berth-bench=1 2>/dev/null) >/dev/null 2>&1 || true
  [ -n "${net:-}" ] && "${PODMAN[@]}" network rm -f "$net" >/dev/null 2>&1 || true
  "${PODMAN[@]}" rmi -f "$ref" >/dev/null 2>&1 || true
  [ -n "${regpid:-}" ] && kill "$regpid" 2>/dev/null || true
  rm -rf "$work"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# $EPOCHREALTIME (bash 5) rather than $(date): no helper process inside the timed span
now() { echo "$EPOCHREALTIME"; }
t() { local s e; s=$EPOCHREALTIME; "$@" >/dev/null 2>&1; e=$EPOCHREALTIME; echo "$e - $s" | bc; }
