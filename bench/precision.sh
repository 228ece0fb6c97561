#!/usr/bin/env bash
# Do bf16 and f32 agree on real photos? A seeded split of an image folder, one model trained in
# f32 and one in bf16 (mixed precision) with the same flags and seed, then every test image
# classified by each model with f32 and with bf16 products. Prints one JSON line: each model's
# test accuracy in each precision, how many test images get the same top-1 label from the f32
# model in f32 and in bf16 (what `/predict --precision bf16` changes), and from the two models
# (what training in bf16 changes), each run's probe C, and the wall times.
#
# Usage: bench/precision.sh IMAGES BASE_MODEL PER_CLASS SEED [vitforge train flags...]
#   TEST_PER_CLASS=M (env) caps the test images per class (default: all the rest)
#   EXTRA_TEST=DIR (env): a second, held-out folder (DIR/<class>/images) that each model also
#   classifies in its own precision, reported as "extra" (a larger test than the split's)
#   Default flags: the probe, then the last 2 layers for 2 epochs (lr 1e-4, no augmentation), so
#   that gradient steps run in bf16 too.
#   e.g. bench/precision.sh ../shared/data/catsdogs-dev ../shared/models/vit-small-patch14-pretrained 50 1
# Env:   VITFORGE=path/to/vitforge (default: target/release/vitforge, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 4)); then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
images=$1 base=$2 per_class=$3 seed=$4
shift 4
flags=("$@")
((${#flags[@]})) || flags=(--recipe auto --epochs 3 --train-mode last_n_layers --trainable-layers 2 --learning-rate 1e-4 --augment false)
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/split.py "$images" "$work/split" --train-per-class "$per_class" --seed "$seed" \
  ${TEST_PER_CLASS:+--test-per-class "$TEST_PER_CLASS"} >/dev/null
mapfile -t tests < <(find "$work/split/test" -type f | sort)
for train_in in f32 bf16; do
  start=$(date +%s.%N)
  "$bin" train --data "$work/split/train" --base-model "$base" --output "$work/model-$train_in" --device cpu \
    --seed "$seed" --precision "$train_in" "${flags[@]}" >"$work/train-$train_in.json" 2>"$work/train-$train_in.log"
  echo "$start $(date +%s.%N)" >"$work/train-$train_in.secs"
  for products in f32 bf16; do
    start=$(date +%s.%N)
    "$bin" predict --model "$work/model-$train_in" --device cpu --top-k 1 --precision "$products" "${tests[@]}" \
      >"$work/predict-$train_in-$products.json"
    echo "$start $(date +%s.%N)" >"$work/predict-$train_in-$products.secs"
  done
  if [[ -n ${EXTRA_TEST:-} ]]; then
    "$bin" predict --model "$work/model-$train_in" --device cpu --top-k 1 --precision "$train_in" "$EXTRA_TEST" \
      >"$work/extra-$train_in.json"
  fi
done
python3 - "$work" "$per_class" "$seed" "${flags[*]}" <<'PY'
import json, re, sys
from pathlib import Path
work, per_class, seed, flags = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def labels(train, products):
    preds = json.load(open(work / f"predict-{train}-{products}.json"))["predictions"]
    return [(Path(p["file"]).parent.name, p["label"]) for p in preds]
runs = {(t, p): labels(t, p) for t in ("f32", "bf16") for p in ("f32", "bf16")}
n = len(runs[("f32", "f32")])
acc = lambda r: round(sum(truth == got for truth, got in r) / n, 4)
same = lambda a, b: sum(x[1] == y[1] for x, y in zip(runs[a], runs[b]))
def extra():
    if not (work / "extra-f32.json").exists():
        return {}
    got = {t: [(Path(p["file"]).parent.name, p["label"]) for p in json.load(open(work / f"extra-{t}.json"))["predictions"]]
           for t in ("f32", "bf16")}
    m = len(got["f32"])
    return {"extra": {
        "images": m,
        "accuracy_own_precision": {t: round(sum(a == b for a, b in got[t]) / m, 4) for t in got},
        "same_top1_f32_vs_bf16_model": sum(x[1] == y[1] for x, y in zip(got["f32"], got["bf16"])),
    }}
def probe_c(train):
    # The C the probe's cross-validation chose, from the training log (none without a probe).
    found = re.search(r"probe head fitted.*: C = ([0-9.e+-]+)", (work / f"train-{train}.log").read_text())
    return float(found.group(1)) if found else None
def secs(name):
    start, end = map(float, (work / f"{name}.secs").read_text().split())
    return round(end - start, 1)
print(json.dumps({
    "per_class": per_class, "seed": seed, "flags": flags, "test_images": n,
    "accuracy": {f"{t}_model_{p}_products": acc(runs[(t, p)]) for t, p in runs},
    "same_top1_f32_model_f32_vs_bf16_products": same(("f32", "f32"), ("f32", "bf16")),
    "same_top1_f32_vs_bf16_model_own_products": same(("f32", "f32"), ("bf16", "bf16")),
    "train_wall_s": {t: secs(f"train-{t}") for t in ("f32", "bf16")},
    "predict_wall_s": {f"{t}_{p}": secs(f"predict-{t}-{p}") for t, p in runs},
    "validation_f1": {t: round(json.load(open(work / f"train-{t}.json"))["validation"]["f1"], 4) for t in ("f32", "bf16")},
    "best_epoch": {t: json.load(open(work / f"train-{t}.json"))["best_epoch"] for t in ("f32", "bf16")},
    "probe_c": {t: probe_c(t) for t in ("f32", "bf16")},
    **extra(),
}))
PY
