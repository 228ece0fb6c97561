#!/usr/bin/env bash
# Runs `vitforge bench` and bench/torch_reference.py alternately, one mode per process (so peak
# memory is per mode), for the same configs and batch sizes, and prints a table of ratios
# (vitforge / PyTorch; > 1 means vitforge is faster, or for memory, uses more).
#
# Usage: bench/compare.sh [configs] [batches] [modes] [iters] [precision]
#   e.g. bench/compare.sh tiny,small,base 8 infer,train,head_only 5
#        bench/compare.sh small,base 8 infer,train 5 bf16
#   precision: f32 (default) or bf16 — vitforge `--precision bf16` against PyTorch with bf16
#   weights under inference_mode (inference) and torch.autocast(bfloat16) with AdamW (training)
# Env:   VITFORGE=path/to/vitforge (default: target/release/vitforge, built if missing)
#        ROUNDS=n  repeat each pair n times and keep the best of each (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
configs=${1:-tiny,small,base}
batches=${2:-8}
modes=${3:-infer,train,head_only}
iters=${4:-5}
precision=${5:-f32}
rounds=${ROUNDS:-1}
bin=${VITFORGE:-target/release/vitforge}
if [[ ! -x $bin ]]; then
  cargo build --release --locked
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# Every figure belongs to a CPU: say which, and which of the instruction sets that matter it has.
source bench/lib.sh
cpu_line >&2
for config in ${configs//,/ }; do
  for batch in ${batches//,/ }; do
    for mode in ${modes//,/ }; do
      for _ in $(seq "$rounds"); do
        "$bin" bench --config "$config" --batch "$batch" --mode "$mode" --iters "$iters" --precision "$precision" | tee -a "$out" >&2
        python3 bench/torch_reference.py --config "$config" --batch "$batch" --mode "$mode" --iters "$iters" --precision "$precision" | tee -a "$out" >&2
      done
    done
  done
done
echo "precision: $precision" >&2
python3 - "$out" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["config"], r["batch"], r["mode"], r["impl"])
    old = best.get(key)
    if old is None or r["images_per_s"] > old["images_per_s"]:
        best[key] = r
rows = sorted({k[:3] for k in best})
print(f"{'config':8} {'batch':>5} {'mode':10} {'vitforge img/s':>15} {'pytorch img/s':>14} {'speed ratio':>11} {'vf MiB':>8} {'pt MiB':>8} {'mem ratio':>9}")
for c, b, m in rows:
    v, p = best.get((c, b, m, "vitforge")), best.get((c, b, m, "pytorch"))
    if not v or not p:
        continue
    print(f"{c:8} {b:>5} {m:10} {v['images_per_s']:>15.2f} {p['images_per_s']:>14.2f} {v['images_per_s'] / p['images_per_s']:>11.2f}"
          f" {v['peak_rss_mb']:>8.0f} {p['peak_rss_mb']:>8.0f} {v['peak_rss_mb'] / p['peak_rss_mb']:>9.2f}")
PY
