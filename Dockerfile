# vitforge container image: a release build in a Rust image, copied into a slim runtime image.
#
#   docker build -t vitforge .                                  # CPU (Debian bookworm)
#   docker build -t vitforge:cuda --build-arg FEATURES=cuda --build-arg CUDA_COMPUTE_CAP=90 \
#     --build-arg BUILDER_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 .
#
# The builder and runtime images must be the same distribution release (bookworm with bookworm,
# Ubuntu 24.04 with Ubuntu 24.04): the binary links the C library dynamically. See the README's
# "Docker" section, and scripts/container-smoke.sh, which builds and exercises this file.

ARG BUILDER_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS builder
# Cargo features: empty for the CPU build, `cuda` for the GPU build.
ARG FEATURES=
# The Rust release installed when the builder image has no cargo (the NVIDIA CUDA images).
ARG RUST_VERSION=1.95.0
# GPU architecture the CUDA kernels are compiled for (80 = A100, 89 = L4/RTX 40xx, 90 = H100/H200):
# there is no GPU to ask during `docker build`. Ignored by the CPU build.
ARG CUDA_COMPUTE_CAP=
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH

# The official rust images have the toolchain and a C compiler (for the bundled SQLite, zstd,
# lz4 and libjpeg-turbo C sources); other builder images (NVIDIA CUDA) get them here. Every
# builder gets nasm, which assembles libjpeg-turbo's SIMD code (JPEG decoding twice as fast, the
# same pixels; without it the build would quietly take the C code alone).
RUN if ! command -v cargo >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           ca-certificates curl gcc libc6-dev pkg-config \
        && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
           | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$RUST_VERSION" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if ! command -v nasm >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nasm \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && cargo --version && nasm -v

WORKDIR /src

# Dependency layer. cargo-chef would need downloading into the builder (or vendoring), so this uses
# the equivalent trick by hand: build every dependency against the real Cargo.toml and Cargo.lock
# with stub sources. This layer depends on nothing but those two files (and the build args), so
# editing code under src/ rebuilds only the vitforge crate itself.
#
# The release profile keeps line tables for backtraces (file:line), which would be about 120 of the
# binary's 140 MB and several GB of build layers. The image builds without them and keeps the
# symbols, so backtraces still name functions. `--build-arg KEEP_DEBUG_INFO=1` keeps file:line.
ARG KEEP_DEBUG_INFO=
COPY Cargo.toml Cargo.lock ./
RUN if [ -z "$KEEP_DEBUG_INFO" ]; then export CARGO_PROFILE_RELEASE_DEBUG=false; fi \
    && mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && if [ -z "$CUDA_COMPUTE_CAP" ]; then unset CUDA_COMPUTE_CAP; fi \
    && cargo build --release --locked --features "$FEATURES" \
    && rm -rf src

# The real build, from the whole build context: `.dockerignore` decides what stays out, and a test
# (`cargo test --test repo`) holds it to every file the crate reads at compile time (sources,
# migrations, openapi.yaml, embedded assets), so a new one cannot be left out of the image unseen.
# COPY keeps the files' own modification times, which can be older than the stubs' build, so the
# stubs' outputs are deleted to make cargo rebuild the crate from the real sources.
COPY . .
# One step, not two: with a storage driver that copies whole layers (buildah's vfs), every step
# after the build would be another copy of the builder's target folder.
RUN if [ -z "$KEEP_DEBUG_INFO" ]; then export CARGO_PROFILE_RELEASE_DEBUG=false; fi \
    && rm -rf target/release/.fingerprint/vitforge-* target/release/deps/vitforge-* \
           target/release/deps/libvitforge-* target/release/vitforge \
    && if [ -z "$CUDA_COMPUTE_CAP" ]; then unset CUDA_COMPUTE_CAP; fi \
    && cargo build --release --locked --features "$FEATURES" \
    && install -D -m 0755 target/release/vitforge /out/vitforge \
    && if [ -z "$KEEP_DEBUG_INFO" ]; then objcopy --strip-debug /out/vitforge; fi

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: hub downloads of base models go over HTTPS. The health check below needs no
# extra package (it uses bash's /dev/tcp), which keeps curl and its libraries out of the image.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid, so a volume's ownership is predictable and `runAsNonRoot`
# policies can check it. /data is created and owned by it before VOLUME, so a new named volume
# starts out writable by the service.
ARG VITFORGE_UID=10001
RUN groupadd --system --gid "$VITFORGE_UID" vitforge \
    && useradd --system --uid "$VITFORGE_UID" --gid vitforge --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin vitforge \
    && mkdir -p /data/hf /data/base-models \
    && chown -R vitforge:vitforge /data

COPY --from=builder /out/vitforge /usr/local/bin/vitforge

# Listen on every interface of the container (publishing the port decides who can reach it);
# keep the database, blobs, models and downloaded Hugging Face base models in the volume.
ENV VITFORGE_HOST=0.0.0.0 \
    VITFORGE_PORT=8080 \
    VITFORGE_DATA_DIR=/data \
    HF_HOME=/data/hf
VOLUME /data
EXPOSE 8080
USER ${VITFORGE_UID}:${VITFORGE_UID}
WORKDIR /data

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${VITFORGE_PORT:-8080} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# The service is PID 1 and stops gracefully on SIGTERM (a running fine-tune goes back to the queue).
ENTRYPOINT ["/usr/local/bin/vitforge"]
CMD ["serve"]
