#!/usr/bin/env bash
# Zero-downtime benchmark. A client on 127.0.0.1 opens connections one after another to a
# published port (each: connect, GET /, read the whole answer) while the container behind
# it is replaced REPLACEMENTS times (an env change each time). Reported per contender:
# answered, refused, reset, dropped (closed without an answer) and timed-out connections.
# Contenders, side by side, with the same busybox httpd image and stop timeout:
#  - berth `update = "start-first"` (the target: nothing but answered),
#  - berth `update = "stop-first"` (the default),
#  - podman: `podman stop` + `podman rm` + `podman run` of the same image.
# Needs root, docker-registry, skopeo, podman (with runc), busybox-static, python3.
#
#   bash benches/update.sh          # REPLACEMENTS=5 by default
#   CONTENDERS="berth_run:start-first podman_run:" SERVE='…' bash benches/update.sh
#                                   # some contenders only; another server command
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
REPLACEMENTS=${REPLACEMENTS:-5}
BERTH=${BERTH:-target/release/berth}
[ -x "$BERTH" ] || cargo build --release

work=$(mktemp -d /var/tmp/berth-update.XXXXXX)
port=$(free_port)
ref="127.0.0.1:$port/bench/httpd:1"
trap 'cleanup_bench' EXIT
trap 'exit 1' INT TERM
export BERTH_CONFIG=/dev/null

start_registry "$work" "$port"
push_busybox "$work" "$ref" sh httpd mkdir echo sleep
"$BERTH" --state-dir "$work/state" image pull -q "$ref"
"${PODMAN[@]}" pull -q --tls-verify=false "$ref" >/dev/null

# the client: counts until the stop file appears, then prints its counts
cat > "$work/client.py" <<'PY'
import os, socket, sys, time
port, stop = int(sys.argv[1]), sys.argv[2]
n = dict(answered=0, refused=0, reset=0, dropped=0, timeout=0, other=0)
while not os.path.exists(stop) and os.path.isdir(os.path.dirname(stop)):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        s.close()
        first = data.split(b"\r\n", 1)[0]
        n["answered" if first.startswith(b"HTTP/1.") and b" 200 " in first else "dropped"] += 1
    except ConnectionRefusedError:
        n["refused"] += 1
    except ConnectionResetError:
        n["reset"] += 1
    except (socket.timeout, TimeoutError):
        n["timeout"] += 1
    except OSError:
        n["other"] += 1
    # a connection every millisecond or so: counts compare across contenders
    time.sleep(0.001)
print(" ".join(f"{k}={v}" for k, v in n.items()))
PY

serve=${SERVE:-'mkdir -p /www && echo "v$V" > /www/index.html && exec httpd -f -p 80 -h /www'}

# client PORT → starts the client in the background (pid in $client)
client() { rm -f "$work/stop"; python3 "$work/client.py" "$1" "$work/stop" > "$work/counts" 2>"$work/client.err" & client=$!; sleep 1; }
# finish LABEL → stops the client (in this shell: it is this shell's child) and prints its
# counts after LABEL
finish() {
  local rc=0
  sleep 1
  touch "$work/stop"
  wait "$client" || rc=$?
  echo "$1: $(cat "$work/counts" "$work/client.err")"
  [ "$rc" = 0 ] || echo "(the client exited with status $rc)"
}

berth_run() { # berth_run STRATEGY
  local strategy=$1 p m i
  p=$(free_port)
  m="$work/m-$strategy"
  mkdir -p "$m"
  manifest() {
    cat > "$m/web.toml" <<TOML
[image.bb]
ref = "$ref"
pull = "never"
[network.upd]
[container.web]
image = "bb"
command = ["sh", "-c", '$serve']
env = { V = "$1" }
networks = ["upd"]
ports = ["127.0.0.1:$p:80"]
stop_timeout = "2s"
update = "$strategy"
[container.web.rollout]
min_ready = "1s"
TOML
  }
  manifest 0
  "$BERTH" --state-dir "$work/state" apply "$m" >/dev/null
  client "$p"
  for i in $(seq "$REPLACEMENTS"); do
    manifest "$i"
    "$BERTH" --state-dir "$work/state" apply "$m" >/dev/null
  done
  finish "berth $strategy"
  "$BERTH" --state-dir "$work/state" apply --allow-empty "$work/empty" >/dev/null 2>&1 || true
}

podman_run() {
  local p i
  p=$(free_port)
  net=berth-bench-upd
  "${PODMAN[@]}" network create "$net" >/dev/null
  run() {
    "${PODMAN[@]}" run -d --ulimit nofile=1000:1000 --ulimit nproc=1000:1000 \
      --name berth-bench-upd --label berth-bench=1 --network "$net" \
      -p "127.0.0.1:$p:80" -e "V=$1" --stop-timeout 2 "$ref" sh -c "$serve" >/dev/null
  }
  run 0
  client "$p"
  for i in $(seq "$REPLACEMENTS"); do
    "${PODMAN[@]}" stop -t 2 berth-bench-upd >/dev/null
    "${PODMAN[@]}" rm berth-bench-upd >/dev/null
    run "$i"
  done
  finish "podman stop+run"
}

mkdir -p "$work/empty"
echo "$REPLACEMENTS replacements each, a client connecting continuously to 127.0.0.1"
for c in ${CONTENDERS:-berth_run:start-first berth_run:stop-first podman_run:}; do
  "${c%%:*}" ${c#*:}
done
