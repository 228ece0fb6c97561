#!/usr/bin/env bash
# Trains on one image folder and tests on another; prints one JSON line with test accuracy,
# macro-F1, calibration error (before and after the temperature fit) and the training wall time
# (import, fine-tune, test pass and writing the model).
#
# Usage: bench/quality.sh TRAIN_DIR TEST_DIR BASE_MODEL [vitforge train flags...]
#   e.g. bench/quality.sh /tmp/split/train /tmp/split/test ../shared/models/vit-small-patch14-pretrained
#        bench/quality.sh ... --recipe manual            # Hugging Face's defaults
#        bench/quality.sh ... --learning-rate 1e-5       # any hyper-parameter flag of `vitforge train`
# Env:   VITFORGE=path/to/vitforge (default: target/release/vitforge, built if missing)
#        LABEL=text  a name for the run in the JSON line (default: the flags)
# The test images go in as the dataset's test split (copied beside the training images), so the
# run scores them with the final model before and after calibration; they are never trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 3)); then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
train=$1 test=$2 base=$3
shift 3
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data"
cp -r "$train" "$work/data/train"
cp -r "$test" "$work/data/test"
start=$(date +%s.%N)
"$bin" train --data "$work/data" --base-model "$base" --output "$work/model" --device cpu "$@" >"$work/train.json"
end=$(date +%s.%N)
python3 - "$work/train.json" "$start" "$end" "${LABEL:-$*}" <<'PY'
import json, sys
train = json.load(open(sys.argv[1]))
test = train["test"]
cal = train.get("calibration") or {}
print(json.dumps({
    "label": sys.argv[4] or "default",
    "recipe": train.get("recipe"),
    "test_images": sum(map(sum, test["confusion_matrix"])),
    "accuracy": round(test["accuracy"], 4),
    "macro_f1": round(test["f1"], 4),
    "train_wall_s": round(float(sys.argv[3]) - float(sys.argv[2]), 1),
    "best_epoch": train["best_epoch"],
    "epochs_run": train["epochs_run"],
    "decision": (train.get("decision") or {}).get("reason"),
    "validation_f1": round(train["validation"]["f1"], 4),
    "test_ece": round(test["ece"], 4),
    "test_mean_score": round(test["mean_score"], 4),
    "temperature": round(cal.get("temperature", 1.0), 3),
    "calibrated": bool(cal.get("fitted", False)),
    "validation_ece_before_calibration": cal.get("validation_ece_before"),
    "validation_ece_after_calibration": cal.get("validation_ece_after"),
    "test_ece_before_calibration": cal.get("test_ece_before"),
}))
PY
