#!/usr/bin/env bash
# How recipes compare as the training set grows, on real photos: for each size (images per class)
# and seed, a seeded split of an image folder into train (SIZE per class) and test (the rest), then
# each recipe trained on train and evaluated on test with bench/quality.sh. One JSON line per run
# (with "size", "seed", "recipe" added), appended to OUT.
#
# Usage: bench/size_curve.sh IMAGES BASE_MODEL OUT "SIZES" "SEEDS" [RECIPES]
#   TEST_PER_CLASS=M (env) caps the test images per class (default: all the rest)
#   TRAIN_CAP="CLASS=K ..." (env) trains on only K images of CLASS (an imbalanced training set)
#   IMAGES  an image folder (<class>/<image>), e.g. catsdogs-dev and catsdogs-more merged
#   RECIPES comma-separated, from: probe (auto as of the probe epoch only), last2 (probe, then the
#           last 2 layers, lr 1e-4, no augmentation, up to 2 epochs), full (probe, then the whole
#           network, lr 1e-5, up to 2 epochs: LP-FT), auto (the recipe's own choice), hf (Hugging
#           Face's defaults), probe_mirror (the probe also fitted on each image's mirror image),
#           probe_crops (... and on 2 random resized crops as well), last2_balanced (last2 with the
#           class-balanced loss), auto_crops and auto_balanced (auto with probe_crops' views or
#           the class-balanced loss). Default: probe,last2,full
#   e.g. bench/size_curve.sh /tmp/catsdogs-all ../shared/models/vit-small-patch14-pretrained \
#          /tmp/curve.jsonl "25 50 100 300 550" "1" probe,last2,full
set -euo pipefail
cd "$(dirname "$0")/.."
if (($# < 5)); then
  sed -n '2,22p' "$0" >&2
  exit 2
fi
images=$1 base=$2 out=$3 sizes=$4 seeds=$5 recipes=${6:-probe,last2,full}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags() {
  case $1 in
    probe) echo "--recipe auto --epochs 1" ;;
    probe_mirror) echo "--recipe auto --epochs 1 --probe-views 1" ;;
    probe_crops) echo "--recipe auto --epochs 1 --probe-views 3" ;;
    last2) echo "--recipe auto --epochs 3 --train-mode last_n_layers --trainable-layers 2 --learning-rate 1e-4 --augment false" ;;
    last2_balanced) echo "$(flags last2) --class-balanced-loss true" ;;
    full) echo "--recipe auto --epochs 3" ;;
    auto) echo "" ;;
    auto_crops) echo "--recipe auto --probe-views 3" ;;
    auto_balanced) echo "--recipe auto --class-balanced-loss true" ;;
    hf) echo "--recipe manual" ;;
    *) echo "unknown recipe $1" >&2; exit 2 ;;
  esac
}
for seed in $seeds; do
  for size in $sizes; do
    caps=()
    for cap in ${TRAIN_CAP:-}; do caps+=(--train-cap "$cap"); done
    python3 bench/split.py "$images" "$work/split" --train-per-class "$size" --seed "$seed" ${TEST_PER_CLASS:+--test-per-class "$TEST_PER_CLASS"} "${caps[@]}"
    for recipe in ${recipes//,/ }; do
      # shellcheck disable=SC2046 # the flags are words
      line=$(LABEL=$recipe bench/quality.sh "$work/split/train" "$work/split/test" "$base" $(flags "$recipe") --seed "$seed")
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(size=int(sys.argv[2]), seed=int(sys.argv[3]), recipe=sys.argv[4]); print(json.dumps(d))' \
        "$line" "$size" "$seed" "$recipe" | tee -a "$out"
    done
  done
done
