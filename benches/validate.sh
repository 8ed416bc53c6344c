#!/usr/bin/env bash
# Validation and planning benchmark, on generated manifests:
#   - `berth validate` of 10,000 containers in one file (~0.75 MB), and of one container listing
#     100,000 undeclared networks (the diagnostics' path: 100,000 errors with positions);
#   - a no-op `berth plan` over 1,000 volumes that `apply` created first.
# Each is run RUNS times; the median is reported, next to the median of Python's tomllib
# merely parsing the same file (the floor any TOML tool pays) as the ratio. Needs a release
# build (built if missing) and root (apply makes the volumes under a throw-away state dir).
#
#   bash benches/validate.sh          # RUNS=7 by default
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-7}
BERTH=${BERTH:-target/release/berth}
[ -x "$BERTH" ] || cargo build --release
export BERTH_CONFIG=/dev/null
work=$(mktemp -d /var/tmp/berth-validate.XXXXXX)
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'PY'
import os, sys
w = sys.argv[1]
for d in ("c10k", "u100k", "v1k"):
    os.makedirs(f"{w}/{d}")
with open(f"{w}/c10k/all.toml", "w") as f:
    f.write('[image.bb]\nref = "127.0.0.1:5000/bb:1"\npull = "missing"\n[network.n]\n')
    for i in range(10000):
        f.write(f'[container.c{i}]\nimage = "bb"\ncommand = ["sleep", "1000"]\n'
                f'networks = ["n"]\nports = ["127.0.0.1:{10000 + i}:80"]\nmemory = "64MiB"\n')
with open(f"{w}/u100k/all.toml", "w") as f:
    f.write('[image.bb]\nref = "127.0.0.1:5000/bb:1"\n[container.many]\nimage = "bb"\nnetworks = ['
            + ",".join(f'"u{i}"' for i in range(100000)) + "]\n")
with open(f"{w}/v1k/all.toml", "w") as f:
    for i in range(1000):
        f.write(f"[volume.v{i}]\n")
PY

# median of RUNS timings (seconds) of a command
median() {
  local t=() i s e
  for ((i = 0; i < RUNS; i++)); do
    s=$(date +%s.%N)
    "$@" >/dev/null 2>&1 || true
    e=$(date +%s.%N)
    t+=("$(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.4f", e - s }')")
  done
  printf '%s\n' "${t[@]}" | sort -n | sed -n "$(((RUNS + 1) / 2))p"
}
parse() { python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$1"; }

"$BERTH" --state-dir "$work/state" apply "$work/v1k" >/dev/null
"$BERTH" --state-dir "$work/state" plan --detailed-exitcode "$work/v1k" >/dev/null

report() {
  local what=$1 file=$2
  shift 2
  local b p
  b=$(median "$@")
  p=$(median parse "$file")
  awk -v w="$what" -v b="$b" -v p="$p" \
    'BEGIN { printf "%-40s berth %6.3f s   tomllib parse %6.3f s   ratio %.2f\n", w, b, p, b / p }'
}
report "validate: 10,000 containers" "$work/c10k/all.toml" "$BERTH" validate "$work/c10k"
report "validate: 100,000 undeclared networks" "$work/u100k/all.toml" "$BERTH" validate "$work/u100k"
report "plan (no-op): 1,000 volumes" "$work/v1k/all.toml" \
  "$BERTH" --state-dir "$work/state" plan "$work/v1k"
