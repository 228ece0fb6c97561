#!/usr/bin/env bash
# Fetches Intel MKL's static libraries for the `mkl` cargo feature (f32 products by MKL's
# sequential sgemm where they are faster than ours: Intel CPUs, see README "Why our own
# kernels") and prints the folder to give as MKL_LIB_DIR:
#
#   export MKL_LIB_DIR=$(bash scripts/mkl.sh)
#   cargo build --release --locked --features mkl
#
# The libraries come from PyPI's `mkl-static` wheel (Intel's own build, 248 MB), pinned by
# version and SHA-256; the three that vitforge links (640 MB) are kept in $VITFORGE_MKL_CACHE
# (default ~/.cache/vitforge-mkl), so a second run only prints the folder. Needs Python 3 with
# pip.
set -euo pipefail

version=2026.2.0
sha256=090e439bf202b45579c75d2ba50ff7ead05752d553a06aba79c3ed2b5247921b
cache=${VITFORGE_MKL_CACHE:-$HOME/.cache/vitforge-mkl}
lib="$cache/mkl_static-$version.data/data/lib"

if [[ ! -f $lib/libmkl_core.a ]]; then
    mkdir -p "$cache"
    req=$(mktemp)
    trap 'rm -f "$req"' EXIT
    echo "mkl-static==$version --hash=sha256:$sha256" > "$req"
    echo "scripts/mkl.sh: downloading mkl-static $version from PyPI into $cache" >&2
    python3 -m pip download -q --no-deps --require-hashes -r "$req" -d "$cache" >&2
    python3 - "$cache/mkl_static-$version-py2.py3-none-manylinux_2_28_x86_64.whl" "$cache" <<'PY'
import sys, zipfile
wanted = {f"lib{name}.a" for name in ("mkl_intel_lp64", "mkl_sequential", "mkl_core")}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for member in wheel.namelist():
        if member.rsplit("/", 1)[-1] in wanted or member.endswith("LICENSE.txt"):
            wheel.extract(member, sys.argv[2])
PY
    rm -f "$cache"/mkl_static-*.whl
fi
for name in mkl_intel_lp64 mkl_sequential mkl_core; do
    [[ -f $lib/lib$name.a ]] || { echo "scripts/mkl.sh: $lib/lib$name.a is missing" >&2; exit 1; }
done
echo "$lib"
