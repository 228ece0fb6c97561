#!/usr/bin/env bash
# /predict latency and throughput against a release build, next to the engine's own forward time.
#
# Starts `vitforge serve` on a temporary data folder, installs BASE_MODEL as a base model, uploads
# DATA_DIR (an image folder) and fine-tunes it with the default recipe, then measures with
# bench/predict_load.py: single-image latency with one client, and throughput and latency with
# 16 concurrent clients; finally `vitforge bench --model` gives the forward time of batches of 1
# and 16 for the same model. Prints JSON lines.
#
# The image sent is the first JPEG or PNG under DATA_DIR, or IMAGE when set (a phone photo of
# 12 megapixels, say, where decoding and resizing weigh more).
#
# Usage: [IMAGE=photo.jpg] bench/predict_latency.sh BASE_MODEL DATA_DIR [SECONDS]
#   e.g. bench/predict_latency.sh ../shared/models/vit-small-patch14-pretrained ../shared/data/catsdogs-dev 30
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
base=$(realpath "$1") data=$(realpath "$2") secs=${3:-30}
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
cpu_line >&2
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
cleanup() { [[ -n ${pid:-} ]] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/data/base-models"
cp -r "$base" "$work/data/base-models/base"
"$bin" serve --port "$port" --data-dir "$work/data" >"$work/serve.log" 2>&1 &
pid=$!
url=http://127.0.0.1:$port
wait_healthy "$url" "$work/serve.log"
(cd "$data" && zip -qr "$work/data.zip" .)
job=$(train_job "$url" "$work/data.zip" base "" "$work/serve.log")
model=$(curl -sf "$url/jobs/$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["model_id"])')
# (-print -quit, not `| head -1`: under pipefail, find killed by SIGPIPE would end the script.)
image=${IMAGE:-$(find "$data" -type f \( -iname '*.jpg' -o -iname '*.png' \) -print -quit)}
python3 bench/predict_load.py "$url/predict" "$image" --concurrency 1 --requests 5 >/dev/null # warm-up
python3 bench/predict_load.py "$url/predict" "$image" --concurrency 1 --seconds "$secs"
python3 bench/predict_load.py "$url/predict" "$image" --concurrency 16 --seconds "$secs"
curl -sf "$url/metrics" | grep -E '^vitforge_predict_batch_size_(sum|count)' >&2 || true
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
"$bin" bench --model "$work/data/models/$model" --batch 1,16 --mode infer --iters 10 --precision "${VITFORGE_PRECISION:-f32}"
