#!/usr/bin/env bash
# The prepared GPU check: run from the repository root on a machine with an NVIDIA GPU, with a CUDA
# build of vitforge made beforehand (no Rust toolchain is needed there):
#
#   scripts/cuda-toolkit.sh cargo build --release --locked --features cuda      # on the build machine
#   mkdir -p .gpu && strip -o .gpu/vitforge target/release/vitforge && gzip -f .gpu/vitforge  # 26 MB
#   scripts/gpu-check.sh [BINARY]                                               # on the GPU machine
#
# BINARY defaults to .gpu/vitforge; a name ending in .gz is unpacked first. The CUDA libraries
# come from the machine's own Python installation (PyTorch's wheels carry libcublas.so.13,
# libcurand, libnvrtc, libcudart): they are found there and put on LD_LIBRARY_PATH. It runs, in
# under five minutes on an H200:
#   1. vitforge selfcheck --device cuda:0 (golden files: preprocessing, logits, loss, gradients,
#      training steps, save/load);
#   2. vitforge serve --device "$DEVICE" on a temporary folder: a generated dataset uploaded, a
#      fine-tune of a ViT-S/16 made by init-model through the API to `succeeded`, /predict on it;
#   3. vitforge bench --device "$DEVICE" for base/16 at batch 64 (inference and training step, f32
#      and bf16; on a GPU with layer norm and softmax fused, the default, and composed), beside
#      bench/torch_reference.py on the same GPU (f32 with PyTorch's defaults, and bf16: bf16
#      weights for inference, autocast for a training step), with peak GPU memory
#      (PyTorch's own count; for vitforge, the peak of nvidia-smi's memory.used while it runs);
#   4. where the time goes: Nsight Compute's duration of every kernel of one vitforge training
#      step (the first PROFILE_KERNELS launches), and PyTorch's profiler on its own step, each
#      summed by kernel name (skipped where ncu is missing; PROFILE_KERNELS=0 skips it).
# Results go to $GPU_CHECK_OUT (default ./gpu-check-out): one log per step, bench JSON lines,
# profiles, summary.md. Where $OUT is set (the device tool's folder for files to bring back,
# which takes few files), summary.md and a gzipped tar of everything are copied there.
# Exit status 1 when a step failed.
#
# Rehearsal without a GPU (every step of the script on the CPU, small): DEVICE=cpu BENCH_CONFIG=tiny
# BENCH_BATCH=4 scripts/gpu-check.sh target/release/vitforge
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BIN=$(unpack_binary "${1:-.gpu/vitforge}")
DEVICE=${DEVICE:-cuda:0}
BENCH_CONFIG=${BENCH_CONFIG:-base}
BENCH_BATCH=${BENCH_BATCH:-64}
TORCH_DEVICE=$([[ $DEVICE == cuda* ]] && echo cuda || echo cpu)
RES=${GPU_CHECK_OUT:-$PWD/gpu-check-out}
PROFILE_KERNELS=${PROFILE_KERNELS:-2000}
mkdir -p "$RES"
PY=${PYTHON:-python3}
FAILED=0
# The last lines of a failed step's log, indented, into the summary.
excerpt() { tail -n "${2:-6}" "$1" 2>/dev/null | cut -c1-400 | sed 's/^/      > /' | tee -a "${sumfiles[@]}"; }
step() { echo; echo "==> $*"; }
summary_to "$RES/summary.md"
summary "# vitforge GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"

# ---- the CUDA libraries of the machine's Python packages --------------------------------------
libs=$("$PY" - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = set()
for root in roots:
    for pattern in ("nvidia/*/lib", "nvidia/*/*/lib", "nvidia/cu13/lib*", "torch/lib"):
        for d in glob.glob(os.path.join(root, pattern)):
            if glob.glob(os.path.join(d, "lib*.so*")):
                dirs.add(d)
print(":".join(sorted(dirs)))
EOF
)
driver=""
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
    [[ -e $d/libcuda.so.1 ]] && driver=$d && break
done
paths=$(printf '%s\n' "$libs" "$driver" "${LD_LIBRARY_PATH:-}" | grep -v '^$' | paste -sd:)
export LD_LIBRARY_PATH="$paths"
{
    echo "binary: $BIN ($(du -h "$BIN" 2>/dev/null | cut -f1))"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)' 2>&1
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$BIN" 2>&1 | grep -E 'cuda|cublas|curand|nvrtc|not found'
} | tee "$RES/environment.txt"
summary ""
summary '```'
cat "$RES/environment.txt" | tee -a "${sumfiles[@]}" >/dev/null
summary '```'
if ! "$BIN" --version >/dev/null 2>"$RES/start.log"; then
    cat "$RES/start.log"
    summary "FAIL  the binary does not start (see start.log)"
    exit 1
fi

# ---- 1. selfcheck ----------------------------------------------------------------------------
step "selfcheck"
if timeout 300 "$BIN" selfcheck --device "$DEVICE" >"$RES/selfcheck.json" 2>"$RES/selfcheck.log"; then
    summary "PASS  selfcheck --device $DEVICE"
else
    FAILED=1
    summary "FAIL  selfcheck --device $DEVICE"
    excerpt "$RES/selfcheck.log" 3
fi
grep -E '^(PASS|FAIL)' "$RES/selfcheck.log" | sed 's/^/      /' | tee -a "${sumfiles[@]}"
if ((FAILED)); then
    # Which part is at fault: the same checks without the fused kernels.
    if VITFORGE_FUSED=0 VITFORGE_FUSED_TRAINING=0 timeout 300 "$BIN" selfcheck --device "$DEVICE" >"$RES/selfcheck-unfused.json" 2>"$RES/selfcheck-unfused.log"; then
        summary "      with VITFORGE_FUSED=0 VITFORGE_FUSED_TRAINING=0 every check passes"
    else
        summary "      with VITFORGE_FUSED=0 VITFORGE_FUSED_TRAINING=0:"
        grep -E '^FAIL' "$RES/selfcheck-unfused.log" | sed 's/^/      /' | tee -a "${sumfiles[@]}"
    fi
fi

# ---- 2. the service on the GPU ----------------------------------------------------------------
step "serve --device $DEVICE: dataset, fine-tune, predict"
work=$(mktemp -d)
data=$work/data
mkdir -p "$data/base-models"
"$BIN" init-model --config small --labels a,b --output "$data/base-models/vit-s16" 2>>"$RES/serve.log"
"$PY" - "$work" <<'EOF'
import io, random, sys, zipfile
from PIL import Image
rng = random.Random(0)
with zipfile.ZipFile(f"{sys.argv[1]}/colours.zip", "w") as z:
    for label, rgb in {"red": (200, 40, 40), "blue": (40, 40, 200)}.items():
        for i in range(24):
            img = Image.new("RGB", (96, 80), tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in rgb))
            buf = io.BytesIO()
            img.save(buf, "PNG")
            z.writestr(f"{label}/{i}.png", buf.getvalue())
            if i == 0:
                img.save(f"{sys.argv[1]}/{label}.png")
EOF
RUST_LOG=info,vitforge::startup=info "$BIN" serve --device "$DEVICE" --port 0 --data-dir "$data" --log-format json >/dev/null 2>"$RES/serve.log" &
server=$!
base=""
for _ in $(seq 1 120); do
    addr=$(grep -o '"addr":"[^"]*"' "$RES/serve.log" | head -n 1 | cut -d'"' -f4)
    [[ -n $addr ]] && base=http://$addr && break
    kill -0 $server 2>/dev/null || break
    sleep 0.5
done
serve_ok=0
if [[ -n $base ]]; then
    dataset=$(curl -s -F file=@"$work/colours.zip" "$base/datasets" | tee "$RES/dataset.json" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    job=$(curl -s -H 'content-type: application/json' -d "{\"dataset_id\": \"$dataset\", \"base_model\": \"vit-s16\", \"params\": {\"epochs\": 2, \"batch_size\": 16, \"learning_rate\": 1e-4}}" "$base/jobs" \
        | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    t0=$(date +%s)
    status=queued
    while (($(date +%s) - t0 < 300)); do
        status=$(curl -s "$base/jobs/$job" | tee "$RES/job.json" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["status"])')
        [[ $status == succeeded || $status == failed || $status == cancelled ]] && break
        sleep 1
    done
    curl -s "$base/jobs/$job/metrics" >"$RES/job-metrics.json"
    code=$(curl -s -o "$RES/predict.json" -w '%{http_code}' --data-binary @"$work/red.png" -H 'content-type: image/png' "$base/predict?top_k=2")
    if [[ $status == succeeded && $code == 200 ]]; then
        serve_ok=1
        summary "PASS  serve --device $DEVICE: job $status in $(($(date +%s) - t0)) s, /predict $code: $(cat "$RES/predict.json")"
    else
        summary "FAIL  serve --device $DEVICE: job $status, /predict $code (job.json, serve.log)"
        excerpt "$RES/job.json" 1
        grep -iE '"level":"(ERROR|WARN)"' "$RES/serve.log" >"$RES/serve-errors.log"
        excerpt "$RES/serve-errors.log" 4
    fi
else
    summary "FAIL  serve --device $DEVICE did not start (serve.log)"
fi
kill -TERM $server 2>/dev/null
wait $server 2>/dev/null
((serve_ok)) || FAILED=1

# ---- 3. speed beside PyTorch -------------------------------------------------------------------
step "bench $BENCH_CONFIG/16, batch $BENCH_BATCH"
# Runs a command while sampling nvidia-smi's memory.used, and writes the peak (MiB; the CUDA
# context included) to $log.peak.
peak_gpu() {
    local log=$1
    shift
    : >"$log.mem"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log.mem" 2>/dev/null &
    local smi=$!
    "$@"
    local rc=$?
    kill $smi 2>/dev/null
    wait $smi 2>/dev/null
    sort -n "$log.mem" | tail -n 1 >"$log.peak"
    return $rc
}
: >"$RES/bench.jsonl"
# vitforge's layer norm and softmax: fused kernels (the default on a GPU), and the composed
# candle ops (VITFORGE_FUSED=0 VITFORGE_FUSED_TRAINING=0), to show what the fused ones gain.
variants=(default)
[[ $DEVICE == cuda* ]] && variants=(fused composed)
for mode in infer train; do
    for precision in f32 bf16; do
        for variant in "${variants[@]}"; do
            run=vitforge-$mode-$precision-$variant
            env=()
            [[ $variant == composed ]] && env=(VITFORGE_FUSED=0 VITFORGE_FUSED_TRAINING=0)
            peak_gpu "$RES/$run" env "${env[@]}" timeout 240 "$BIN" bench --device "$DEVICE" --config "$BENCH_CONFIG" --batch "$BENCH_BATCH" --mode $mode \
                --precision $precision --iters 10 --warmup 3 2>"$RES/bench-$run.log" >"$RES/$run.json"
            mem=$(cat "$RES/$run.peak" 2>/dev/null)
            if [[ -s $RES/$run.json ]]; then
                "$PY" -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().splitlines()[-1]); d.update(device=sys.argv[3], peak_gpu_mb=int(sys.argv[2] or 0), kernels=sys.argv[4]); print(json.dumps(d))' \
                    "$RES/$run.json" "$mem" "$TORCH_DEVICE" "$variant" >>"$RES/bench.jsonl"
            else
                FAILED=1
                summary "FAIL  vitforge bench --mode $mode --precision $precision ($variant; bench-$run.log)"
                excerpt "$RES/bench-$run.log" 3
            fi
        done
    done
    for precision in f32 bf16; do
        timeout 240 "$PY" bench/torch_reference.py --device "$TORCH_DEVICE" --precision $precision --config "$BENCH_CONFIG" --batch "$BENCH_BATCH" --mode $mode --iters 10 --warmup 3 \
            >>"$RES/bench.jsonl" 2>"$RES/bench-torch-$mode-$precision.log" || {
            FAILED=1
            summary "FAIL  torch_reference $mode $precision (bench-torch-$mode-$precision.log)"
            excerpt "$RES/bench-torch-$mode-$precision.log" 2
        }
    done
done
summary ""
summary "| impl | precision | mode | images/s | peak GPU MiB | layer norm, softmax |"
summary "| --- | --- | --- | --- | --- | --- |"
"$PY" - "$RES/bench.jsonl" <<'EOF' | tee -a "${sumfiles[@]}"
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(f"| {d['impl']} | {d.get('precision', 'f32')} | {d['mode']} | {d['images_per_s']} | {d.get('peak_gpu_mb', '-')} | {d.get('kernels', '')} |")
EOF
# ---- 4. where the time goes --------------------------------------------------------------------
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
if [[ $DEVICE == cuda* && $PROFILE_KERNELS != 0 ]]; then
    step "profiles of one training step"
    if [[ -n $ncu ]]; then
        # One metric, so that no kernel is replayed; the clocks are left as they are.
        timeout 150 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --page raw --print-units base --launch-count "$PROFILE_KERNELS" \
            "$BIN" bench --device "$DEVICE" --config "$BENCH_CONFIG" --batch "$BENCH_BATCH" --mode train --iters 1 --warmup 0 \
            >"$RES/ncu-vitforge-train.csv" 2>"$RES/ncu-vitforge-train.log" ||
            summary "note: ncu did not finish (ncu-vitforge-train.log)"
    else
        summary "note: no ncu on this machine, no kernel profile of vitforge"
    fi
    timeout 120 "$PY" bench/torch_reference.py --device "$TORCH_DEVICE" --precision f32 --config "$BENCH_CONFIG" --batch "$BENCH_BATCH" --mode train \
        --iters 1 --warmup 2 --profile "$RES/torch-profile-train-f32.json" >/dev/null 2>"$RES/torch-profile.log" ||
        summary "note: the PyTorch profile failed (torch-profile.log)"
    "$PY" bench/kernel_shares.py "$RES/ncu-vitforge-train.csv" "$RES/torch-profile-train-f32.json" | tee -a "${sumfiles[@]}"
fi

rm -rf "$work"
summary ""
summary "result: $([[ $FAILED == 0 ]] && echo PASS || echo FAIL)"
pack_results "$RES" gpu-check
exit $FAILED
