#!/usr/bin/env bash
# What the in-flight memory budget costs /predict under normal load: the same small model served
# by two binaries (e.g. the commit before the budget and HEAD), measured in alternating rounds of
# bench/predict_load.py with 16 clients (A first in odd rounds, B in even ones), so a busy machine
# slows both alike. Prints one JSON line per round and binary, then the mean requests per second
# of each.
#
# Usage: bench/budget_cost.sh BIN_A BIN_B [ROUNDS] [SECONDS]
#   e.g. git worktree add /tmp/before c25af28^ && (cd /tmp/before && cargo build --release)
#        bench/budget_cost.sh /tmp/before/target/release/vitforge target/release/vitforge 4 15
# The model is a random `tiny` ViT fine-tuned for one epoch on 40 generated images, so that the
# HTTP path (body, decode, budget, batching) is a large share of each request's time.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
a=$(realpath "$1") b=$(realpath "$2") rounds=${3:-4} secs=${4:-15}
work=$(mktemp -d)
cleanup() { [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
url=http://127.0.0.1:$port
serve() { # BIN DATA_DIR
  "$1" serve --port "$port" --data-dir "$2" >>"$work/serve.log" 2>&1 &
  pid=$!
  wait_healthy "$url" "$work/serve.log"
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

# One trained model, made by the older binary (A): B's extra migrations apply on top of a copy.
python3 bench/make_textures.py "$work/images" --per-class 20 --seed 0 >/dev/null
(cd "$work/images" && zip -qr "$work/data.zip" .)
"$a" init-model --config tiny --labels x --output "$work/seed/base-models/tiny" >/dev/null
serve "$a" "$work/seed"
train_job "$url" "$work/data.zip" tiny '{"epochs": 1}' "$work/serve.log" >/dev/null
stop
image=$(find "$work/images" -name '*.png' | head -1)
for bin in a b; do cp -r "$work/seed" "$work/data-$bin"; done
for round in $(seq "$rounds"); do
  order="a b"; ((round % 2)) || order="b a" # alternate who goes first
  for bin in $order; do
    path=$a; [[ $bin == b ]] && path=$b
    serve "$path" "$work/data-$bin"
    python3 bench/predict_load.py "$url/predict" "$image" --concurrency 1 --requests 20 >/dev/null # warm-up
    python3 bench/predict_load.py "$url/predict" "$image" --concurrency 16 --seconds "$secs" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(binary=sys.argv[1], round=int(sys.argv[2])); print(json.dumps(r))' "$bin" "$round" |
      tee -a "$work/rounds.jsonl"
    stop
  done
done
python3 - "$work/rounds.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
key = "ok_per_s"
for b in "ab":
    xs = [r[key] for r in rows if r["binary"] == b]
    print(json.dumps({"binary": b, "rounds": len(xs), "mean_ok_per_s": round(sum(xs) / len(xs), 1), "min": min(xs), "max": max(xs)}))
PY
