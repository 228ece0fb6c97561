#!/usr/bin/env bash
# Trains on one image folder and evaluates on another; prints one JSON line with accuracy,
# macro-F1 and the training wall time (import, fine-tune and writing the model).
#
# Usage: bench/quality.sh TRAIN_DIR TEST_DIR BASE_MODEL [vitforge train flags...]
#   e.g. bench/quality.sh /tmp/split/train /tmp/split/test ../shared/models/vit-small-patch14-pretrained
#        bench/quality.sh ... --recipe manual            # Hugging Face's defaults
#        bench/quality.sh ... --learning-rate 1e-5       # any hyper-parameter flag of `vitforge train`
# Env:   VITFORGE=path/to/vitforge (default: target/release/vitforge, built if missing)
#        LABEL=text  a name for the run in the JSON line (default: the flags)
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 3)); then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
train=$1 test=$2 base=$3
shift 3
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s.%N)
"$bin" train --data "$train" --base-model "$base" --output "$work/model" --device cpu "$@" >"$work/train.json"
end=$(date +%s.%N)
"$bin" eval --model "$work/model" --data "$test" --device cpu >"$work/eval.json"
python3 - "$work/train.json" "$work/eval.json" "$start" "$end" "${LABEL:-$*}" <<'PY'
import json, sys
train, ev = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(json.dumps({
    "label": sys.argv[5] or "default",
    "recipe": train.get("recipe"),
    "test_images": ev["num_images"],
    "accuracy": round(ev["accuracy"], 4),
    "macro_f1": round(ev["f1"], 4),
    "train_wall_s": round(float(sys.argv[4]) - float(sys.argv[3]), 1),
    "best_epoch": train["best_epoch"],
    "epochs_run": train["epochs_run"],
    "validation_f1": round(train["validation"]["f1"], 4),
    "test_ece": round(ev.get("ece", 0.0), 4),
    "test_mean_score": round(ev.get("mean_score", 0.0), 4),
    "temperature": round((train.get("calibration") or {}).get("temperature", 1.0), 3),
    "calibrated": bool((train.get("calibration") or {}).get("fitted", False)),
    "test_ece_before_calibration": (train.get("calibration") or {}).get("test_ece_before"),
}))
PY
