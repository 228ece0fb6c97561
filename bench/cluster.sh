#!/usr/bin/env bash
# Several processes on one PostgreSQL database (`--role api` / `--role worker`), measured:
#   1. queue throughput: JOBS fine-tunes of a minute ViT (32×32 input, 2 layers of width 32, the
#      tests' `tiny`; 1 epoch on 8 generated images) drained by one worker, then JOBS more by two
#      workers, in jobs per minute: the queue and each job's fixed costs, not model speed;
#   2. recovery: a worker SIGKILLed in the middle of a job, and the time until another worker
#      runs it (the lease, --lease-secs, plus the claim), at LEASE seconds;
#   3. /predict throughput of one API process, then of two (16 clients in all, split over them).
# Prints one JSON line per measurement. On a 2-core machine the processes share the two cores,
# so two workers or two replicas cannot be twice as fast; the figures show the overhead.
#
# Usage: bench/cluster.sh [JOBS] [LEASE] [SECONDS]     (defaults 20, 30, 15)
# VITFORGE names the binary (default target/release/vitforge, built if missing). OBJECT_STORE=s3
# puts the bytes in a private S3 server (moto_server, PyPI `moto[server]`) and gives every process
# a data folder of its own, as on separate machines; by default they share one data folder.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
source scripts/postgres.sh
source scripts/s3.sh
jobs=${1:-20} lease=${2:-30} secs=${3:-15}
store=${OBJECT_STORE:-folder}
bin=${VITFORGE:-target/release/vitforge}
[[ -x $bin ]] || cargo build --release --locked
work=$(mktemp -d /tmp/vitforge-cluster.XXXXXX)
pids=()
pg_home=$(mktemp -d /tmp/vitforge-pg.XXXXXX) # its own: the postgres user cannot enter $work
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null; pg_stop; rm -rf "$work" "$pg_home"; }
trap 's3_stop; cleanup' EXIT
mkdir -p "$work/data"
pg_start "$pg_home"
export VITFORGE_DATABASE_URL=$PG_URL
case $store in
  folder) ;;
  s3) s3_start vitforge-bench; export VITFORGE_OBJECT_STORE=s3://vitforge-bench/cluster ;;
  *) echo "OBJECT_STORE must be s3 or unset" >&2; exit 2 ;;
esac
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start ROLE NAME: a process of the cluster on the shared data folder (with S3, on a folder of its
# own holding only the base model); sets `url` and `last_pid`.
start() {
  local port; port=$(free_port)
  local extra=(); [[ $1 == worker ]] && extra=(--worker-name "$2" --lease-secs "$lease")
  local data=$work/data
  if [[ $store == s3 ]]; then
    data=$work/data-$2
    mkdir -p "$data/base-models" && cp -r "$work/data/base-models/tiny" "$data/base-models/"
  fi
  "$bin" serve --role "$1" "${extra[@]}" --port "$port" --data-dir "$data" >>"$work/$2.log" 2>&1 &
  last_pid=$!; pids+=("$last_pid")
  url=http://127.0.0.1:$port
  wait_healthy "$url" "$work/$2.log"
}
emit() { python3 -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:])))' "$@"; }

python3 bench/make_textures.py "$work/images" --per-class 4 --seed 0 >/dev/null
(cd "$work/images" && zip -qr "$work/data.zip" .)
cat >"$work/minute.json" <<'JSON'
{"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 2, "intermediate_size": 64}
JSON
"$bin" init-model --config "$work/minute.json" --labels x --output "$work/data/base-models/tiny" >/dev/null
start api api-1; api=$url
dataset=$(upload_zip "$api" "$work/data.zip")

# 1. Queue throughput: submit every job first, then time from the first claim to the last end.
drain() { # WORKERS
  local ids=() t0 t1 w
  for _ in $(seq "$jobs"); do ids+=("$(submit_job "$api" "$dataset" tiny '{"epochs": 1}')"); done
  t0=$(date +%s.%N)
  local started=()
  for w in $(seq "$1"); do start worker "drain$1-$w"; started+=("$last_pid"); done
  for id in "${ids[@]}"; do [[ $(wait_job "$api" "$id" 0.2) == succeeded ]] || { echo "job $id failed" >&2; exit 1; }; done
  t1=$(date +%s.%N)
  for p in "${started[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  emit measure=queue_drain store="$store" workers="$1" jobs="$jobs" seconds="$(python3 -c "print(round($t1-$t0, 2))")" \
    jobs_per_minute="$(python3 -c "print(round($jobs*60/($t1-$t0), 1))")"
}
drain 1
drain 2

# 2. Recovery: a 400-epoch job on worker A, SIGKILL A once it has run an epoch, B takes over.
start worker recover-a; a_pid=$last_pid
job=$(submit_job "$api" "$dataset" tiny '{"epochs": 400, "batch_size": 2}')
until [[ $(curl -sf "$api/jobs/$job" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["status"] == "running" and j["progress"]["epoch"] >= 1)') == True ]]; do sleep 0.1; done
start worker recover-b
kill -9 "$a_pid"; killed=$(date +%s.%N)
until [[ $(curl -sf "$api/jobs/$job" | json_field worker) == recover-b ]]; do sleep 0.05; done
taken=$(date +%s.%N)
until [[ $(curl -sf "$api/jobs/$job" | python3 -c 'import json,sys; print(json.load(sys.stdin)["progress"]["step"])') -gt 0 ]]; do sleep 0.05; done
resumed_step=$(curl -sf "$api/jobs/$job" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["progress"]["epoch"])')
emit measure=worker_death_to_claim store="$store" lease_secs="$lease" seconds="$(python3 -c "print(round($taken-$killed, 2))")" resumed_at_epoch="$resumed_step"
curl -sf -X POST "$api/jobs/$job/cancel" >/dev/null
[[ $(wait_job "$api" "$job" 0.2) == cancelled ]]

# 3. /predict: one API process, then two (8 + 8 clients). The model is the newest tiny one.
image=$(find "$work/images" -name '*.png' | head -1)
load() { python3 bench/predict_load.py "$1/predict" "$image" --concurrency "$2" --seconds "$secs"; }
load "$api" 1 >/dev/null # warm-up, loads the model
one=$(load "$api" 16)
emit measure=predict store="$store" replicas=1 result="$one"
start api api-2; api2=$url
load "$api2" 1 >/dev/null
load "$api" 8 >"$work/p1.json" & l1=$!
load "$api2" 8 >"$work/p2.json"
wait "$l1"
python3 - "$work/p1.json" "$work/p2.json" "$store" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(json.dumps({"measure": "predict", "store": sys.argv[3], "replicas": 2, "per_replica": [a, b],
                  "ok_per_s": round(sum(r["ok_per_s"] for r in (a, b)), 2)}))
PY
