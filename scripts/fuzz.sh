#!/usr/bin/env bash
# Fuzzes the ingest and image-decoding entry points with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     # default: 600 s, ingest and decode_image
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and `cargo install cargo-fuzz`.
# Seeds come from `fuzz/src/seeds.rs` (a valid zip, tar, tar.gz and Parquet dataset; one image per
# format); the corpus grows under fuzz/corpus/<target>/ and crashes land in fuzz/artifacts/<target>/
# (both ignored by git). Each input is capped at 1 MiB, 4 GiB of RSS and 10 s; a crash, a leak
# report, an out-of-memory or a timeout stops the target and makes the script exit non-zero. The
# last line per target is libFuzzer's summary: executions, seconds, corpus size.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-600}
shift || true
TARGETS=("$@")
[[ ${#TARGETS[@]} -eq 0 ]] && TARGETS=(ingest decode_image)
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}

# One build for every binary of the fuzz crate (release, debug assertions on, ASan), seeds included.
cargo +"$TOOLCHAIN" fuzz build || exit 1
if [[ ! -d corpus/ingest || ! -d corpus/decode_image ]]; then
  target/x86_64-unknown-linux-gnu/release/seeds || exit 1
fi
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" logs
  echo "== $t: $SECS s, seeds $(ls "corpus/$t" | wc -l) =="
  cargo +"$TOOLCHAIN" fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$SECS" -max_len=1048576 -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 \
    >"logs/$t.log" 2>&1 || status=1
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done|SUMMARY|^==[0-9]+==ERROR|panicked' "logs/$t.log"
  echo "corpus: $(ls "corpus/$t" | wc -l) inputs; artifacts: $(ls "artifacts/$t" | wc -l)"
done
exit $status
