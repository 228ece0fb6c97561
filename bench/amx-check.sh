#!/usr/bin/env bash
# The CPU half of issue 15 on a machine with AMX, without a Rust toolchain: binaries built
# beforehand (any build of vitforge runs its CPU kernels; the CUDA one does too), run in this
# order, each step time-boxed so that what finished comes back:
#   1. the kernel tests of the library (`model::fast`: every matrix product and element-wise
#      kernel at every level this CPU runs, `amx` included where Linux grants the tiles, against
#      f64), from a test binary made by `cargo test --release --lib --no-run`;
#   2. `vitforge selfcheck --device cpu` at each level from avx512 up (the golden files: logits,
#      loss and every gradient, in f32 and bf16);
#   3. bench/levels.sh amx against avx512bf16 (bf16; small and base; inference and a training
#      step; batch 8), on 2 cores as the issue's table;
#   4. bench/compare.sh against PyTorch on the same 2 cores: bf16 at the amx level (small and
#      base), then f32 (small);
#   5. where the time goes (`vitforge bench --breakdown`, bf16, ViT-S, inference and a training
#      step) at amx and at avx512bf16, each stage's share side by side.
#
#   cargo test --release --lib --no-run   # prints the test binary's path
#   strip -o .gpu/vitforge-libtests target/release/deps/vitforge-HASH && gzip -f .gpu/vitforge-libtests
#   bench/amx-check.sh .gpu/vitforge.gz .gpu/vitforge-libtests.gz     # on the AMX machine
#
# Results go to $AMX_CHECK_OUT (default ./amx-check-out); where $OUT is set (the device tool's
# folder for files to bring back), amx-summary.md and a gzipped tar of everything are copied there.
# CORES (default 0,1) are the cores the measurements are pinned to.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
BIN=$(unpack_binary "${1:?the vitforge binary}")
TESTS=$(unpack_binary "${2:?the test binary of the library}")
CORES=${CORES:-0,1}
RES=${AMX_CHECK_OUT:-$PWD/amx-check-out}
mkdir -p "$RES"
summary_to "$RES/amx-summary.md"
threads=$(tr ',' '\n' <<<"$CORES" | wc -l)
pinned() { RAYON_NUM_THREADS=$threads taskset -c "$CORES" "$@"; }
FAILED=0

summary "# vitforge AMX check, $(date -u +%Y-%m-%dT%H:%MZ)"
summary ""
summary "CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-); $(nproc) cores; flags: $(grep -ow 'avx2\|avx512f\|avx512_bf16\|avx512_fp16\|amx_tile\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
summary "L2: $(lscpu 2>/dev/null | grep -m1 'L2' | tr -s ' ')"
summary "measurements pinned to cores $CORES"

summary ""
summary "## 1. kernel tests (model::fast, against f64)"
timeout 90 "$TESTS" model::fast --nocapture >"$RES/kernel-tests.log" 2>&1
rc=$?
grep -E 'checked at|test result|panicked|FAILED' "$RES/kernel-tests.log" | sed 's/^/    /' | tee -a "${sumfiles[@]}"
((rc == 0)) || { FAILED=1; summary "FAIL  kernel tests (exit $rc)"; }

summary ""
summary "## 2. golden files at each level (selfcheck --device cpu)"
for level in avx512 avx512bf16 amx; do
    if VITFORGE_MAX_ISA=$level timeout 60 "$BIN" selfcheck --device cpu >"$RES/selfcheck-$level.json" 2>"$RES/selfcheck-$level.log"; then
        path=$(VITFORGE_MAX_ISA=$level "$BIN" bench --config tiny --batch 1 --mode infer --iters 1 --warmup 0 --precision bf16 2>/dev/null |
            python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["path"])' 2>/dev/null)
        summary "PASS  VITFORGE_MAX_ISA=$level (kernels run: ${path:-?}): $(grep -c '^PASS' "$RES/selfcheck-$level.log") checks"
    else
        FAILED=1
        summary "FAIL  $level:"
        grep -E '^FAIL|Error' "$RES/selfcheck-$level.log" | head -n 8 | sed 's/^/    /' | tee -a "${sumfiles[@]}"
    fi
done

summary ""
summary "## 3. amx against avx512bf16 (bench/levels.sh, bf16)"
pinned env SKIP_TESTS=1 VITFORGE="$BIN" timeout 120 bench/levels.sh amx avx512bf16 small,base 8 infer,train 3 bf16 \
    >"$RES/levels.txt" 2>"$RES/levels.log" || summary "note: levels.sh did not finish (levels.log)"
sed 's/^/    /' "$RES/levels.txt" | tee -a "${sumfiles[@]}"

summary ""
summary "## 4. against PyTorch on the same cores (bench/compare.sh)"
for run in "bf16 amx small,base 150" "f32 default small 60"; do
    read -r precision level configs limit <<<"$run"
    env=()
    [[ $level == amx ]] && env=(VITFORGE_MAX_ISA=amx)
    summary ""
    summary "precision $precision, vitforge level $level:"
    pinned env "${env[@]}" VITFORGE="$BIN" timeout "$limit" bench/compare.sh "$configs" 8 infer,train 3 "$precision" \
        >"$RES/compare-$precision-$level.txt" 2>"$RES/compare-$precision-$level.log" || summary "note: compare.sh did not finish (compare-$precision-$level.log)"
    sed 's/^/    /' "$RES/compare-$precision-$level.txt" | tee -a "${sumfiles[@]}"
done

summary ""
summary "## 5. where the time goes (vitforge bench --breakdown, bf16, small, batch 8): share by stage"
for mode in infer train; do
    for level in amx avx512bf16; do
        pinned env VITFORGE_MAX_ISA=$level timeout 60 "$BIN" bench --config small --batch 8 --mode $mode --iters 3 \
            --warmup 1 --precision bf16 --breakdown >"$RES/breakdown-$mode-$level.json" 2>"$RES/breakdown-$mode-$level.log" ||
            summary "note: the $mode breakdown at $level did not finish (breakdown-$mode-$level.log)"
    done
    python3 - "$RES/breakdown-$mode-amx.json" "$RES/breakdown-$mode-avx512bf16.json" <<'PY' | sed 's/^/    /' | tee -a "${sumfiles[@]}"
import json, sys
runs = []
for path in sys.argv[1:]:
    try:
        runs.append(json.loads(open(path).readline()))
    except (OSError, ValueError):
        runs.append({})
print(f"{runs[0].get('mode', '?')}: " + ", ".join(f"{r.get('path', '?')} {r.get('images_per_s', '?')} img/s" for r in runs))
stages = list(dict.fromkeys(k for r in runs for k in r.get("breakdown", {})))
print(f"{'stage':<20}" + "".join(f"{r.get('path', '?'):>12}" for r in runs))
for s in stages:
    print(f"{s:<20}" + "".join(f"{100 * r.get('breakdown', {}).get(s, 0):>11.1f}%" for r in runs))
PY
done

summary ""
summary "result: $([[ $FAILED == 0 ]] && echo PASS || echo FAIL)"
pack_results "$RES" amx-check
exit $FAILED
