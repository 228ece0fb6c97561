#!/usr/bin/env bash
# Builds the real Dockerfile with buildah and exercises the image end to end, without a Docker
# engine and without pulling anything from an image registry.
#
# 1. Stand-in base images, made locally and cached under $VITFORGE_SMOKE_CACHE
#    (default ~/.cache/vitforge-smoke):
#    - runtime: a Debian bookworm root from `debootstrap --variant=minbase`, trimmed like
#      debian:bookworm-slim, imported with `buildah from scratch` + `buildah commit`;
#    - builder: the runtime stand-in plus gcc, libc6-dev, pkg-config, ca-certificates and this
#      machine's Rust toolchain (`$RUSTC --print sysroot`) laid out like the official rust image
#      (/usr/local/rustup, /usr/local/cargo/bin on PATH).
# 2. `buildah build --layers --format docker` of ./Dockerfile with --build-arg BUILDER_IMAGE and
#    RUNTIME_IMAGE pointing at the stand-ins (crates are fetched from crates.io, Debian packages
#    from the Debian mirror, as in a real `docker build`).
# 3. The image is run with `buildah run --isolation chroot --network host`, using the image's own
#    ENTRYPOINT, CMD, USER and ENV, with a host folder bind-mounted at /data as the volume, and
#    checked: image config, /healthz, the image's HEALTHCHECK command, a dataset upload, a base
#    model written by `vitforge init-model` inside the container, a 1-epoch fine-tune,
#    /predict, the uid of the server process, the files in the volume, and a clean SIGTERM stop.
#
# Needs root (debootstrap, buildah's storage and chroot isolation), buildah, debootstrap,
# curl, python3 with Pillow, and a Rust toolchain: rustc on PATH, or $RUSTC naming one (under
# sudo: `sudo RUSTC="$(rustup which rustc)" scripts/container-smoke.sh`). Exits 0 with "SKIPPED: buildah not installed"
# where there is no buildah; otherwise prints PASS/FAIL per check and exits 1 on any failure.
#
# Environment: VITFORGE_SMOKE_CACHE (stand-in roots, buildah storage, layer cache),
# VITFORGE_SMOKE_DRIVER (buildah storage driver: overlay where it mounts, else vfs),
# VITFORGE_SMOKE_MIRROR (Debian mirror, default http://deb.debian.org/debian),
# VITFORGE_SMOKE_KEEP=1 (keep the run folder: logs and the /data volume).
set -uo pipefail

if ! command -v buildah >/dev/null 2>&1; then
    echo "SKIPPED: buildah not installed (apt-get install buildah debootstrap); nothing was built or tested"
    exit 0
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VITFORGE_SMOKE_CACHE:-$HOME/.cache/vitforge-smoke}
MIRROR=${VITFORGE_SMOKE_MIRROR:-http://deb.debian.org/debian}
KEEP=${VITFORGE_SMOKE_KEEP:-0}
IMAGE=localhost/vitforge:smoke
RUNTIME_STANDIN=localhost/vitforge-smoke/debian:bookworm-slim
SUITE=bookworm
export BUILDAH_ISOLATION=chroot

RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $1"); echo "PASS  $1"; }
fail() { RESULTS+=("FAIL  $1${2:+: $2}"); FAILED=1; echo "FAIL  $1${2:+: $2}"; }
step() { echo; echo "==> $*"; }
die() { fail "$1" "${2:-}"; exit 1; }

# buildah with storage of its own under the cache, so the stand-ins and layer cache persist between
# runs and nothing touches the machine's default container storage. The overlay driver stores each
# layer as its changes; vfs (the fallback, where the kernel's overlayfs cannot be mounted here)
# stores every layer as a whole copy of the file system, which took 17 GB for one cold build and
# filled a CI machine's disk. VITFORGE_SMOKE_DRIVER=vfs|overlay chooses.
mkdir -p "$CACHE"
overlay_mounts() {
    local t
    t=$(mktemp -d "$CACHE/overlay-probe.XXXXXX") || return 1
    mkdir -p "$t"/{lower,upper,work,merged}
    mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work" "$t/merged" 2>/dev/null \
        && umount "$t/merged"
    local rc=$?
    rm -rf "$t"
    return $rc
}
DRIVER=${VITFORGE_SMOKE_DRIVER:-}
if [[ -z $DRIVER ]]; then
    if overlay_mounts; then DRIVER=overlay; else DRIVER=vfs; fi
fi
STORAGE=$CACHE/storage-$DRIVER
B() { buildah --root "$STORAGE" --runroot "$CACHE/runroot-$DRIVER" --storage-driver "$DRIVER" "$@"; }

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vitforge-smoke.XXXXXX")
DATA=$RUN_DIR/data
CTR=""
SERVER_PID=""
BUILD_SECS="-"
IMAGE_SIZE="-"
BINARY_SIZE="-"
STANDINS="-"

summary() {
    echo
    echo "================ vitforge container smoke: summary ================"
    echo "image:        $IMAGE ($IMAGE_SIZE; binary $BINARY_SIZE)"
    echo "base images:  $STANDINS"
    echo "build time:   $BUILD_SECS"
    echo "storage:      $DRIVER driver, $(du -shx "$STORAGE" 2>/dev/null | cut -f1) in $STORAGE; $(df -h --output=avail "$CACHE" | tail -n 1 | tr -d ' ') left on its disk"
    printf '%s\n' "${RESULTS[@]}"
    local n_fail=0 r
    for r in "${RESULTS[@]}"; do [[ $r == FAIL* ]] && n_fail=$((n_fail + 1)); done
    if [[ $FAILED == 0 ]]; then
        echo "RESULT: PASS (${#RESULTS[@]} checks)"
    else
        echo "RESULT: FAIL ($n_fail of ${#RESULTS[@]} checks failed); logs in $RUN_DIR"
    fi
}

cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        sleep 5
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    [[ -n $CTR ]] && B rm "$CTR" >/dev/null 2>&1
    summary
    if [[ $FAILED == 0 && $KEEP != 1 ]]; then
        rm -rf "$RUN_DIR"
    fi
    [[ $FAILED != 0 && $rc == 0 ]] && rc=1
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
step "prerequisites"
missing=()
[[ $(id -u) == 0 ]] || missing+=("root (debootstrap and buildah's chroot isolation)")
RUSTC=${RUSTC:-rustc}
for tool in debootstrap curl python3 "$RUSTC" tar; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
python3 -c 'import PIL' 2>/dev/null || missing+=("python3 Pillow")
if ((${#missing[@]})); then
    die "prerequisites" "missing: ${missing[*]}"
fi
mkdir -p "$CACHE"
RUST_VERSION=$("$RUSTC" --version | awk '{print $2}')
SYSROOT=$("$RUSTC" --print sysroot)
BUILDER_STANDIN=localhost/vitforge-smoke/rust:${RUST_VERSION}-slim-bookworm
STANDINS="builder $BUILDER_STANDIN, runtime $RUNTIME_STANDIN (debootstrap $SUITE)"
echo "buildah $(buildah --version | awk '{print $3}'), rust $RUST_VERSION from $SYSROOT, cache $CACHE ($DRIVER storage), run folder $RUN_DIR"
echo "disk: $(df -h --output=avail "$CACHE" | tail -n 1 | tr -d ' ') free where the cache is (a cold build takes about 6 GB with overlay)"

# ---------------------------------------------------------------------------------------------
step "stand-in base images"
have_image() { B inspect --type image "$1" >/dev/null 2>&1; }

if ! have_image "$RUNTIME_STANDIN"; then
    rootfs_tar=$CACHE/$SUITE-minbase.tar
    if [[ ! -s $rootfs_tar ]]; then
        echo "debootstrap $SUITE (minbase) from $MIRROR ..."
        root=$CACHE/$SUITE-root.tmp
        rm -rf "$root"
        debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$RUN_DIR/debootstrap.log" 2>&1 \
            || { tail -n 30 "$RUN_DIR/debootstrap.log"; die "stand-in runtime image" "debootstrap failed"; }
        # Trim and configure it the way debian:bookworm-slim is: deb822 sources with security
        # updates, no documentation or locales installed, no package lists shipped.
        rm -f "$root/etc/apt/sources.list"
        cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${MIRROR}
Suites: ${SUITE} ${SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: ${SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
        find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null
        rm -rf "$root"/usr/share/{man,info,locale}/* "$root"/var/lib/apt/lists/* \
            "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
        tar --numeric-owner -C "$root" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
        rm -rf "$root"
    fi
    ctr=$(B from scratch) || die "stand-in runtime image" "buildah from scratch failed"
    mnt=$(B mount "$ctr") && tar --numeric-owner -xpf "$rootfs_tar" -C "$mnt" && B umount "$ctr" >/dev/null \
        || die "stand-in runtime image" "could not unpack the root into the container"
    B config --os linux --arch amd64 \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd bash "$ctr"
    B commit --rm --quiet "$ctr" "$RUNTIME_STANDIN" >/dev/null || die "stand-in runtime image" "commit failed"
    echo "made $RUNTIME_STANDIN"
else
    echo "cached $RUNTIME_STANDIN"
fi

if ! have_image "$BUILDER_STANDIN"; then
    # Like rust:<version>-slim-bookworm: a C toolchain (for the bundled SQLite/zstd/lz4 sources),
    # ca-certificates, and rustc + cargo under /usr/local/rustup with /usr/local/cargo/bin on PATH.
    ctr=$(B from --pull=never "$RUNTIME_STANDIN") || die "stand-in builder image" "buildah from failed"
    B run --network host "$ctr" -- sh -c 'apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev pkg-config && rm -rf /var/lib/apt/lists/*' >"$RUN_DIR/builder-apt.log" 2>&1 \
        || { tail -n 30 "$RUN_DIR/builder-apt.log"; B rm "$ctr" >/dev/null; die "stand-in builder image" "apt-get failed"; }
    tc=/usr/local/rustup/toolchains/$RUST_VERSION-x86_64-unknown-linux-gnu
    mnt=$(B mount "$ctr")
    mkdir -p "$mnt$tc" "$mnt/usr/local/cargo/bin"
    # Only what builds: cargo, rustc, rustdoc and lib/ (rustc's libraries, the std rlibs and the
    # bundled rust-lld linker); not the documentation or rust-src.
    tar -C "$SYSROOT" --exclude=lib/rustlib/src -cf - bin/cargo bin/rustc bin/rustdoc lib | tar -C "$mnt$tc" -xf - \
        || die "stand-in builder image" "copying the toolchain failed"
    for b in cargo rustc rustdoc; do ln -sf "$tc/bin/$b" "$mnt/usr/local/cargo/bin/$b"; done
    # CAs added to this machine's trust store (Debian's /usr/local/share/ca-certificates), e.g. of
    # a TLS-inspecting proxy in front of crates.io: the builder needs them to fetch crates, as any
    # builder image behind such a proxy would.
    shopt -s nullglob
    local_cas=(/usr/local/share/ca-certificates/*.crt)
    shopt -u nullglob
    ((${#local_cas[@]})) && cp "${local_cas[@]}" "$mnt/usr/local/share/ca-certificates/"
    B umount "$ctr" >/dev/null
    if ((${#local_cas[@]})); then
        B run "$ctr" -- update-ca-certificates >>"$RUN_DIR/builder-apt.log" 2>&1 \
            || { B rm "$ctr" >/dev/null; die "stand-in builder image" "update-ca-certificates failed"; }
        echo "builder stand-in trusts this machine's local CAs: ${local_cas[*]##*/}"
    fi
    B config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env RUST_VERSION="$RUST_VERSION" "$ctr"
    B run "$ctr" -- cargo --version || { B rm "$ctr" >/dev/null; die "stand-in builder image" "cargo does not run in it"; }
    B commit --rm --quiet "$ctr" "$BUILDER_STANDIN" >/dev/null || die "stand-in builder image" "commit failed"
    echo "made $BUILDER_STANDIN"
else
    echo "cached $BUILDER_STANDIN"
fi
pass "stand-in base images ($SUITE root by debootstrap; rust $RUST_VERSION)"

# ---------------------------------------------------------------------------------------------
step "build the Dockerfile (release build; slow on a cold cache, log: $RUN_DIR/build.log)"
t0=$(date +%s)
B build --isolation chroot --layers --format docker --pull=never \
    --build-arg BUILDER_IMAGE="$BUILDER_STANDIN" --build-arg RUNTIME_IMAGE="$RUNTIME_STANDIN" \
    -f "$REPO/Dockerfile" -t "$IMAGE" "$REPO" >"$RUN_DIR/build.log" 2>&1
build_rc=$?
t1=$(date +%s)
cached_steps=$(grep -c 'Using cache' "$RUN_DIR/build.log")
BUILD_SECS="$((t1 - t0)) s ($(((t1 - t0) / 60)) min $(((t1 - t0) % 60)) s; $cached_steps steps from the layer cache)"
if [[ $build_rc != 0 ]]; then
    tail -n 40 "$RUN_DIR/build.log"
    die "docker build of ./Dockerfile" "buildah build exited $build_rc"
fi
pass "docker build of ./Dockerfile with the stand-in BUILDER_IMAGE/RUNTIME_IMAGE"
IMAGE_SIZE=$(B images --format '{{.Size}}' "$IMAGE" | head -n 1)

# ---------------------------------------------------------------------------------------------
step "image configuration"
# (buildah 1.28's --format has no `json` function: take the whole inspect document.)
B inspect --type image "$IMAGE" | python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["Docker"]["config"], sys.stdout)' \
    >"$RUN_DIR/config.json"
cfg_problems=$(python3 - "$RUN_DIR/config.json" 2>&1 <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
env = dict(e.split("=", 1) for e in c.get("Env") or [])
want_env = {"VITFORGE_HOST": "0.0.0.0", "VITFORGE_DATA_DIR": "/data", "HF_HOME": "/data/hf"}
problems = [f"env {k}={env.get(k)!r}, want {v!r}" for k, v in want_env.items() if env.get(k) != v]
user = c.get("User") or ""
if not user or user.split(":")[0] in ("", "0", "root"):
    problems.append(f"user {user!r} is root")
if "8080/tcp" not in (c.get("ExposedPorts") or {}):
    problems.append("8080/tcp not exposed")
if "/data" not in (c.get("Volumes") or {}):
    problems.append("no VOLUME /data")
hc = (c.get("Healthcheck") or {}).get("Test") or []
if not hc or "/healthz" not in " ".join(hc):
    problems.append("no HEALTHCHECK on /healthz")
print("; ".join(problems) or "OK")
EOF
)
read_cfg() { python3 -c "import json,sys; c=json.load(open('$RUN_DIR/config.json')); print($1)"; }
IMAGE_USER=$(read_cfg 'c.get("User") or ""')
[[ -n $IMAGE_USER ]] || die "image config" "no USER in $RUN_DIR/config.json"
if [[ $cfg_problems == OK ]]; then
    pass "image config: USER $IMAGE_USER, EXPOSE 8080, VOLUME /data, VITFORGE_HOST/DATA_DIR, HF_HOME, HEALTHCHECK"
else
    fail "image config" "$cfg_problems"
fi
UID_WANT=${IMAGE_USER%%:*}

CTR=$(B from --pull=never --name "vitforge-smoke-$$" "$IMAGE") || die "start a container" "buildah from failed"
mnt=$(B mount "$CTR")
BINARY_SIZE=$(du -h "$mnt/usr/local/bin/vitforge" | cut -f1)
# The builder installs nasm so that libjpeg-turbo's SIMD code is in the binary (without nasm the
# build quietly takes the C code alone): its AVX2 inverse DCT must be there, by name.
simd_symbols=$(grep -c -a jsimd_idct_islow_avx2 "$mnt/usr/local/bin/vitforge" || true)
data_owner=$(stat -c '%u:%g' "$mnt/data" "$mnt/data/hf" "$mnt/data/base-models" | sort -u | tr '\n' ' ')
B umount "$CTR" >/dev/null
if ((simd_symbols > 0)); then
    pass "libjpeg-turbo's SIMD code is in the binary (nasm in the builder)"
else
    fail "libjpeg-turbo's SIMD code in the binary" "no jsimd_idct_islow_avx2 symbol: was nasm missing from the builder?"
fi
if [[ $data_owner == "$UID_WANT:"*" " && $(wc -w <<<"$data_owner") == 1 ]]; then
    pass "the image's /data, /data/hf and /data/base-models belong to uid $UID_WANT (a new named volume starts writable)"
else
    fail "ownership of /data in the image" "got $data_owner, want uid $UID_WANT"
fi

# ---------------------------------------------------------------------------------------------
step "run the image"
# The host folder plays the named volume: owned by the image's user, as Docker would copy the
# image's /data into a new volume.
mkdir -p "$DATA"
chown "$IMAGE_USER" "$DATA"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
# chroot isolation shares the host's network, so the service gets a free port instead of 8080.
# `buildah run` mounts an anonymous volume of its own over a declared VOLUME and ignores -v for
# that path, so the working container drops the declaration and gets the host folder, as
# `docker run -v vitforge-data:/data` replaces the image's /data with the named volume.
B config --env VITFORGE_PORT="$PORT" --volume /data- "$CTR"
ENTRY=$(read_cfg '" ".join((c.get("Entrypoint") or []) + (c.get("Cmd") or []))')
[[ -n $ENTRY ]] || die "run the image" "no ENTRYPOINT/CMD in $RUN_DIR/config.json"
run_in() { B run --isolation chroot --network host -v "$DATA:/data" "$CTR" -- "$@"; }

# A tiny random base model (32×32 images, patch 8, 2 layers), written by the image's own binary
# into the volume's base-models folder, as a user without internet access would provide one.
cat >"$RUN_DIR/tiny-config.json" <<'EOF'
{"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 2, "intermediate_size": 64}
EOF
cp "$RUN_DIR/tiny-config.json" "$DATA/tiny-config.json"
if run_in vitforge init-model --config /data/tiny-config.json --labels a,b --output /data/base-models/tiny \
    >"$RUN_DIR/init-model.log" 2>&1 && [[ -s $DATA/base-models/tiny/model.safetensors ]]; then
    pass "vitforge init-model inside the container wrote /data/base-models/tiny"
else
    cat "$RUN_DIR/init-model.log"
    fail "vitforge init-model inside the container"
fi

echo "starting: $ENTRY (port $PORT, log $RUN_DIR/server.log)"
# shellcheck disable=SC2086 # ENTRY is the image's ENTRYPOINT + CMD, words without spaces
run_in $ENTRY >"$RUN_DIR/server.log" 2>&1 &
RUN_PID=$!
SERVER_PID=$RUN_PID

healthy=0
for _ in $(seq 1 120); do
    if [[ $(curl -s -o /dev/null -w '%{http_code}' "$BASE/healthz") == 200 ]]; then healthy=1; break; fi
    kill -0 "$RUN_PID" 2>/dev/null || break
    sleep 0.5
done
if [[ $healthy == 1 ]]; then
    pass "GET /healthz answers 200"
else
    tail -n 30 "$RUN_DIR/server.log"
    die "GET /healthz" "no 200 within 60 s"
fi

# The server process: the buildah run's descendant running /usr/local/bin/vitforge.
descendants() { local p; for p in $(cat /proc/"$1"/task/*/children 2>/dev/null); do echo "$p"; descendants "$p"; done; }
VF_PID=""
for p in $(descendants "$RUN_PID"); do
    if [[ $(readlink "/proc/$p/exe" 2>/dev/null) == */usr/local/bin/vitforge ]]; then VF_PID=$p; fi
done
if [[ -n $VF_PID ]]; then
    SERVER_PID=$VF_PID
    uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$VF_PID/status")
    if [[ $uids == "$UID_WANT $UID_WANT $UID_WANT $UID_WANT" ]]; then
        pass "the server process runs as uid $UID_WANT, not root (pid $VF_PID)"
    else
        fail "non-root server process" "uids $uids"
    fi
else
    fail "non-root server process" "no vitforge process under the buildah run (pid $RUN_PID)"
fi

hc_cmd=$(read_cfg '"\n".join((c.get("Healthcheck") or {}).get("Test") or [])')
mapfile -t hc_argv <<<"$hc_cmd"
if [[ ${hc_argv[0]} == CMD ]] && run_in "${hc_argv[@]:1}" >"$RUN_DIR/healthcheck.log" 2>&1; then
    pass "the image's HEALTHCHECK command exits 0 inside the container"
else
    cat "$RUN_DIR/healthcheck.log"
    fail "the image's HEALTHCHECK command" "${hc_argv[*]}"
fi

# ---------------------------------------------------------------------------------------------
step "dataset, fine-tune, predict"
python3 - "$RUN_DIR" <<'EOF'
import io, random, sys, zipfile
from PIL import Image
run = sys.argv[1]
rng = random.Random(0)
colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
with zipfile.ZipFile(f"{run}/colours.zip", "w") as z:
    for label, (r, g, b) in colours.items():
        for i in range(10):
            img = Image.new("RGB", (48, 48))
            img.putdata([tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in (r, g, b)) for _ in range(48 * 48)])
            buf = io.BytesIO()
            img.save(buf, "PNG")
            z.writestr(f"colours/{label}/{i}.png", buf.getvalue())
            if i == 0:
                img.save(f"{run}/{label}.png")
EOF
json_get() { python3 -c "import json,sys; d=json.load(open('$1')); print($2)"; }

code=$(curl -s -o "$RUN_DIR/dataset.json" -w '%{http_code}' -F file=@"$RUN_DIR/colours.zip" -F name=smoke "$BASE/datasets")
if [[ $code == 201 ]] && [[ $(json_get "$RUN_DIR/dataset.json" 'd["num_images"], sorted(d["classes"])') == "20 ['blue', 'red']" ]]; then
    DATASET=$(json_get "$RUN_DIR/dataset.json" 'd["id"]')
    pass "POST /datasets: 201, 20 images in classes blue, red"
else
    cat "$RUN_DIR/dataset.json"; echo
    die "POST /datasets" "status $code"
fi

code=$(curl -s -o "$RUN_DIR/job.json" -w '%{http_code}' -H 'content-type: application/json' \
    -d "{\"dataset_id\": \"$DATASET\", \"base_model\": \"tiny\", \"params\": {\"epochs\": 1}}" "$BASE/jobs")
[[ $code == 202 ]] || { cat "$RUN_DIR/job.json"; echo; die "POST /jobs" "status $code"; }
JOB=$(json_get "$RUN_DIR/job.json" 'd["id"]')
status=queued
t0=$(date +%s)
while (($(date +%s) - t0 < 600)); do
    curl -s -o "$RUN_DIR/job.json" "$BASE/jobs/$JOB"
    status=$(json_get "$RUN_DIR/job.json" 'd["status"]' 2>/dev/null)
    [[ $status == succeeded || $status == failed || $status == cancelled ]] && break
    sleep 2
done
if [[ $status == succeeded ]]; then
    pass "POST /jobs (base_model tiny, 1 epoch) reached succeeded within $(($(date +%s) - t0 + 1)) s"
else
    cat "$RUN_DIR/job.json"; echo
    die "fine-tune job" "status $status"
fi

code=$(curl -s -o "$RUN_DIR/predict.json" -w '%{http_code}' --data-binary @"$RUN_DIR/red.png" \
    -H 'content-type: image/png' "$BASE/predict?top_k=2")
verdict=$(python3 - "$RUN_DIR/predict.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["predictions"][0]
ok = (d.get("model_id") and len(d["predictions"]) == 1 and p["label"] in ("red", "blue")
      and 0.0 <= p["score"] <= 1.0 and {t["label"] for t in p["top_k"]} == {"red", "blue"}
      and abs(sum(t["score"] for t in p["top_k"]) - 1.0) < 1e-3)
print("ok" if ok else "bad", p["label"], round(p["score"], 3))
EOF
)
if [[ $code == 200 && $verdict == ok* ]]; then
    pass "POST /predict: 200, label '$(cut -d' ' -f2 <<<"$verdict")' score $(cut -d' ' -f3 <<<"$verdict"), top_k over red/blue"
else
    cat "$RUN_DIR/predict.json"; echo
    fail "POST /predict" "status $code, $verdict"
fi

# ---------------------------------------------------------------------------------------------
step "the volume"
model_files=$(find "$DATA/models" -name model.safetensors 2>/dev/null | wc -l)
blobs=$(find "$DATA/blobs" -type f 2>/dev/null | wc -l)
foreign=$(find "$DATA" ! -uid "$UID_WANT" ! -path "$DATA/tiny-config.json" | head -n 3)
if [[ -s $DATA/vitforge.db && $model_files -ge 1 && $blobs -ge 20 && -z $foreign ]]; then
    pass "the volume holds vitforge.db, $blobs image blobs and $model_files fine-tuned model, all owned by uid $UID_WANT"
else
    ls -laR "$DATA" | head -n 40
    fail "data in the volume" "db $(stat -c %s "$DATA/vitforge.db" 2>/dev/null) bytes, $blobs blobs, $model_files models, not uid $UID_WANT: ${foreign:-none}"
fi

step "stop"
kill -TERM "$SERVER_PID"
stopped=0
for _ in $(seq 1 60); do
    kill -0 "$RUN_PID" 2>/dev/null || { stopped=1; break; }
    sleep 0.5
done
if [[ $stopped == 1 ]] && wait "$RUN_PID"; then
    SERVER_PID=""
    pass "SIGTERM stops the service cleanly (exit 0)"
else
    tail -n 20 "$RUN_DIR/server.log"
    fail "graceful stop" "still running or non-zero exit after SIGTERM"
fi
