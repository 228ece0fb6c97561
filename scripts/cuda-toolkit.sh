#!/usr/bin/env bash
# A CUDA 13.0 toolkit from PyPI, for building vitforge with `--features cuda` without installing
# the NVIDIA CUDA packages and without a GPU.
#
#   scripts/cuda-toolkit.sh cargo build --release --features cuda   # run a command with it
#   eval "$(scripts/cuda-toolkit.sh)"                                # or set it up in this shell
#
# The first call creates a Python virtual environment (about 1.2 GB) at $VITFORGE_CUDA_VENV
# (default ~/.cache/vitforge-cuda13) with NVIDIA's wheels, pinned to CUDA 13.0 so the binary
# runs on drivers >= 580: nvcc, NVVM, the CRT and CCCL headers (nvcc compiles candle's kernels),
# and the cudart, cuBLAS, cuRAND and NVRTC libraries (cudarc links them). Later calls reuse it.
# It then adds, inside the environment only:
#   - the unversioned library names the linker looks for (libcublas.so -> libcublas.so.13, ...);
#   - lib/stubs/libcuda.so, a link-time stand-in for the driver library (which comes with the
#     NVIDIA driver, not with the toolkit; NVIDIA's own toolkit ships the same kind of stub). It
#     defines every function of the cuda.h it was built with and has the soname libcuda.so.1,
#     so the binary loads the real driver at run time. It is never put on the loader's path.
#
# Environment: CUDA_COMPUTE_CAP (default 90) is the GPU the kernels are compiled for, which has
# to be given because no GPU is asked: 80 A100, 86 RTX 30xx, 89 L4/RTX 40xx, 90 H100/H200.
# PYTHON (default python3) makes the environment; Debian and Ubuntu need `python3-venv`.
#
# Without a command it prints `export` lines for PATH, CUDA_HOME, CUDA_ROOT, CUDA_PATH,
# CUDA_COMPUTE_CAP and LD_LIBRARY_PATH (so the built binary finds cuBLAS etc. when run).
# Progress goes to stderr.
set -euo pipefail

venv="${VITFORGE_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vitforge-cuda13}"
python="${PYTHON:-python3}"
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)

log() { echo "cuda-toolkit: $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$python" -m venv "$venv" || {
        log "could not create a virtual environment (on Debian/Ubuntu: apt-get install python3-venv)"
        exit 1
    }
fi

stamp="$venv/.vitforge-cuda-pins"
if [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
    log "installing ${pins[*]}"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
    rm -f "$stamp"
fi

root="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
[ -x "$root/bin/nvcc" ] || { log "no nvcc under $root"; exit 1; }

if [ ! -f "$stamp" ]; then
    # Unversioned names for `-lcudart -lcublas -lcublasLt -lcurand -lnvrtc`.
    for lib in cudart cublas cublasLt nvrtc curand; do
        so="$(cd "$root/lib" && ls "lib$lib.so."[0-9]* | sort -V | tail -n 1)"
        ln -sfn "$so" "$root/lib/lib$lib.so"
    done
    # The driver stub: a no-op function for every cu* name in cuda.h (versioned names such as
    # cuMemAlloc_v2 appear there as macro targets) plus the profiler API, which cudarc also binds.
    mkdir -p "$root/lib/stubs"
    {
        grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$root/include/cuda.h"
        printf '%s\n' cuProfilerInitialize cuProfilerStart cuProfilerStop
    } | sort -u | awk '{ print "void " $1 "(void) {}" }' >"$root/lib/stubs/libcuda-stub.c"
    "${CC:-cc}" -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" \
        "$root/lib/stubs/libcuda-stub.c"
    echo "${pins[*]}" >"$stamp"
    log "ready: $("$root/bin/nvcc" --version | tail -n 2 | head -n 1)"
fi

export PATH="$root/bin:$PATH"
export CUDA_HOME="$root" CUDA_ROOT="$root" CUDA_PATH="$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
for var in PATH CUDA_HOME CUDA_ROOT CUDA_PATH CUDA_COMPUTE_CAP LD_LIBRARY_PATH; do
    printf 'export %s=%q\n' "$var" "${!var}"
done
