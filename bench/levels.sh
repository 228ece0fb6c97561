#!/usr/bin/env bash
# Compares two kernel levels of vitforge on this machine (`VITFORGE_MAX_ISA`), alternating them,
# and prints a table of speed ratios (LEVEL / BASELINE; > 1 means LEVEL is faster). Before any
# figure, it checks that this CPU runs LEVEL (the `path` that `vitforge bench` reports) and that
# every kernel it runs matches f64 (`cargo test --release --lib matmul`, which runs each level
# the CPU has, `amx` included where Linux grants the tile state).
#
# Usage: bench/levels.sh LEVEL BASELINE [configs] [batches] [modes] [iters] [precision]
#   e.g. on an AMX CPU:   ROUNDS=3 bench/levels.sh amx avx512bf16 small,base 8 infer,train 5 bf16
#        on AVX-512 BF16: bench/levels.sh avx512bf16 avx512 small 8 infer 5 bf16
# Env:   VITFORGE=path/to/vitforge (default: target/release/vitforge, built if missing)
#        ROUNDS=n  repeat each pair n times and keep the best of each (default 1)
#        SKIP_TESTS=1  skip the kernel tests
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { sed -n '2,14p' "$0" >&2; exit 2; }
level=$1 baseline=$2
configs=${3:-small,base}
batches=${4:-8}
modes=${5:-infer,train}
iters=${6:-5}
precision=${7:-bf16}
rounds=${ROUNDS:-1}
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
source bench/lib.sh
cpu_line >&2
for want in "$level" "$baseline"; do
  got=$(VITFORGE_MAX_ISA=$want "$bin" bench --config tiny --batch 1 --mode infer --iters 1 --warmup 0 --precision "$precision" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["path"])')
  if [[ $got != "$want" ]]; then
    echo "this CPU does not run level $want (VITFORGE_MAX_ISA=$want gives path $got)" >&2
    exit 1
  fi
done
if [[ -z ${SKIP_TESTS:-} ]]; then
  # --nocapture: the tests print which levels they checked.
  cargo test --release --locked --lib matmul -- --nocapture 2>&1 | grep -E 'checked at|test result|panicked|FAILED' >&2
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for config in ${configs//,/ }; do
  for batch in ${batches//,/ }; do
    for mode in ${modes//,/ }; do
      for _ in $(seq "$rounds"); do
        for isa in "$level" "$baseline"; do
          VITFORGE_MAX_ISA=$isa "$bin" bench --config "$config" --batch "$batch" --mode "$mode" --iters "$iters" --precision "$precision" 2>/dev/null | tee -a "$out" >&2
        done
      done
    done
  done
done
python3 - "$out" "$level" "$baseline" "$precision" <<'PY'
import json, sys
path, level, baseline, precision = sys.argv[1:]
best = {}
for line in open(path):
    r = json.loads(line)
    key = (r["config"], r["batch"], r["mode"], r["path"])
    if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
        best[key] = r
print(f"precision {precision}; best of each; ratio = {level} / {baseline}")
print(f"{'config':8} {'batch':>5} {'mode':10} {level + ' img/s':>16} {baseline + ' img/s':>18} {'ratio':>6} {level + ' MiB':>14} {baseline + ' MiB':>16}")
for c, b, m in sorted({k[:3] for k in best}):
    a, z = best.get((c, b, m, level)), best.get((c, b, m, baseline))
    if a and z:
        print(f"{c:8} {b:>5} {m:10} {a['images_per_s']:>16.2f} {z['images_per_s']:>18.2f} {a['images_per_s'] / z['images_per_s']:>6.2f}"
              f" {a['peak_rss_mb']:>14.0f} {z['peak_rss_mb']:>16.0f}")
PY
