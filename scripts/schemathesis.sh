#!/usr/bin/env bash
# Runs schemathesis (pip install schemathesis) against a live vitforge with openapi.yaml.
#
#   scripts/schemathesis.sh [path/to/vitforge] [max-examples]
#
# Defaults: target/release/vitforge (else target/debug/vitforge), 100 examples per operation.
# It starts the service on a fresh data folder with a tiny local base model, uploads a dataset
# and trains one model (so /predict, /models and /jobs have something real to serve), then runs
# every schemathesis check twice: without an API key, and with one (where every request carries
# the key, and `ignored_auth` checks that requests without it are refused). Reports land in
# schemathesis-report/. Exits non-zero if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}
if [[ -z "$BIN" ]]; then
  if [[ -x target/release/vitforge ]]; then BIN=target/release/vitforge; else BIN=target/debug/vitforge; fi
fi
EXAMPLES=${2:-100}
PORT=${PORT:-18089}
KEY=schemathesis-key-0123456789
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT

mkdir -p "$WORK/data/base-models"
cat > "$WORK/tiny.json" <<'EOF'
{"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 2, "intermediate_size": 64}
EOF
"$BIN" init-model --config "$WORK/tiny.json" --labels a,b --output "$WORK/data/base-models/tiny" >/dev/null
python3 - "$WORK/pets.zip" <<'EOF'
import io, sys, zipfile
from PIL import Image
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for cls in ("cat", "dog"):
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (i * 40, 100 if cls == "cat" else 200, 7)).save(buf, "PNG")
            z.writestr(f"{cls}/{i}.png", buf.getvalue())
EOF

run_server() {
  "$BIN" serve --port "$PORT" --data-dir "$WORK/data" "$@" >>"$WORK/server.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && return; sleep 0.1; done
  echo "vitforge did not start"; cat "$WORK/server.log"; exit 1
}

run_server
BASE="http://127.0.0.1:$PORT"
DATASET=$(curl -sf -F file=@"$WORK/pets.zip" "$BASE/datasets" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
JOB=$(curl -sf -H 'content-type: application/json' "$BASE/jobs" \
  -d "{\"dataset_id\": \"$DATASET\", \"base_model\": \"tiny\", \"params\": {\"epochs\": 1, \"batch_size\": 4}}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 600); do
  STATUS=$(curl -sf "$BASE/jobs/$JOB" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [[ "$STATUS" == succeeded ]] && break
  [[ "$STATUS" == failed ]] && { echo "training failed"; exit 1; }
  sleep 0.2
done

status=0
echo "== schemathesis, no API key =="
st run openapi.yaml --url "$BASE" --checks all --max-examples "$EXAMPLES" --seed 1 \
  --request-timeout 60 --report junit --report-junit-path schemathesis-report/open.xml || status=1
kill "$PID"; wait "$PID" || true

echo "== schemathesis, with an API key =="
run_server --api-key "$KEY"
st run openapi.yaml --url "$BASE" --checks all --max-examples "$EXAMPLES" --seed 2 -H "Authorization: Bearer $KEY" \
  --request-timeout 60 --report junit --report-junit-path schemathesis-report/keyed.xml || status=1
if grep -q panicked "$WORK/server.log"; then echo "the server panicked:"; grep -A5 panicked "$WORK/server.log"; status=1; fi
exit $status
