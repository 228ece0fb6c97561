#!/usr/bin/env bash
# Test-time flip, measured: accuracy of a model on labelled images (TEST_DIR/<class>/<image>)
# without and with `--flip`, the images where the two disagree, and the time of each pass.
# Prints one JSON line per pass, then the difference.
#   bench/tta.sh MODEL_DIR TEST_DIR
# VITFORGE names the binary (default target/release/vitforge, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 test=$2
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
find -L "$test" -mindepth 2 -maxdepth 2 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort >"$work/files"
for mode in plain flip; do
  flag=(); [[ $mode == flip ]] && flag=(--flip)
  start=$(date +%s.%N)
  xargs -a "$work/files" -d '\n' "$bin" predict --model "$model" --top-k 1 "${flag[@]}" >"$work/$mode.json"
  echo "$(date +%s.%N) - $start" | bc >"$work/$mode.secs"
done
python3 - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
truth = {}
answers = {}
def documents(path):
    # xargs may have run the binary more than once: one JSON document per run.
    text, at, dec = open(path).read(), 0, json.JSONDecoder()
    while text[at:].strip():
        doc, at = dec.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        yield doc
for mode in ("plain", "flip"):
    preds = [p for d in documents(os.path.join(work, mode + ".json")) for p in d["predictions"]]
    answers[mode] = {p["file"]: p["label"] for p in preds}
    right = sum(p["label"] == os.path.basename(os.path.dirname(p["file"])) for p in preds)
    secs = float(open(os.path.join(work, mode + ".secs")).read())
    print(json.dumps({"mode": mode, "images": len(preds), "right": right, "accuracy": round(right / len(preds), 4), "seconds": round(secs, 1)}))
changed = [f for f in answers["plain"] if answers["plain"][f] != answers["flip"][f]]
fixed = sum(answers["flip"][f] == os.path.basename(os.path.dirname(f)) for f in changed)
print(json.dumps({"answers_changed": len(changed), "fixed_by_flip": fixed, "broken_by_flip": len(changed) - fixed}))
PY
