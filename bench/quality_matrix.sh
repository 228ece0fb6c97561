#!/usr/bin/env bash
# The comparison in bench/QUALITY.md: for several random splits of an image folder, trains with
# each recipe (bench/quality.sh) and fits the scikit-learn probe baseline (bench/probe_baseline.py)
# on the same split; prints JSON lines, then a mean ± spread table.
#
# Usage: bench/quality_matrix.sh DATA_DIR BASE_MODEL TRAIN_PER_CLASS "SEEDS" [RECIPES]
#   e.g. bench/quality_matrix.sh ../shared/data/catsdogs-dev ../shared/models/vit-small-patch14-pretrained 50 "1 2 3"
# RECIPES: comma-separated names from the list below (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
data=$1 base=$2 per_class=$3 seeds=$4 recipes=${5:-auto,probe_only,hf_default,hf_lr1e-5,sklearn}
out=${OUT:-$(mktemp)}
declare -A flags=(
  [auto]=""
  [probe_only]="--head-init probe --epochs 1"
  [hf_default]="--recipe manual"
  [hf_lr1e-5]="--learning-rate 1e-5"
)
for seed in $seeds; do
  split=$(mktemp -d)
  python3 bench/split.py "$data" "$split" --train-per-class "$per_class" --seed "$seed"
  for r in ${recipes//,/ }; do
    if [[ $r == sklearn ]]; then
      python3 bench/probe_baseline.py "$split/train" "$split/test" "$base" 2>/dev/null |
        python3 -c "import json,sys
for l in sys.stdin: d=json.loads(l); d['seed']=$seed; print(json.dumps(d))" | tee -a "$out"
    else
      # shellcheck disable=SC2086
      LABEL=$r bench/quality.sh "$split/train" "$split/test" "$base" --seed "$seed" ${flags[$r]} 2>/dev/null |
        python3 -c "import json,sys
for l in sys.stdin: d=json.loads(l); d['seed']=$seed; print(json.dumps(d))" | tee -a "$out"
    fi
  done
  rm -rf "$split"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows.setdefault(d["label"], []).append(d)
print(f"\n| recipe | runs | accuracy mean (min–max) | macro-F1 mean | train wall s mean |")
print("| --- | --- | --- | --- | --- |")
for label, rs in rows.items():
    acc = [r["accuracy"] for r in rs]
    f1 = [r["macro_f1"] for r in rs]
    wall = [r.get("train_wall_s", r.get("feature_s", 0)) for r in rs]
    print(f"| {label} | {len(rs)} | {100*statistics.mean(acc):.1f}% ({100*min(acc):.1f}–{100*max(acc):.1f}) | "
          f"{statistics.mean(f1):.4f} | {statistics.mean(wall):.0f} |")
PY
