#!/usr/bin/env bash
# Two builds (or settings) of `vitforge bench` in alternating rounds, for changes smaller than a
# shared VM's drift: each round runs A then B (B then A in even rounds), and prints both runs'
# images/s with the process's wall, user and system seconds and minor page faults, then the
# median and mean of the per-round ratios B / A.
#
# Usage: bench/ab.sh "COMMAND A" "COMMAND B" ROUNDS BENCH-ARGS...
#   COMMAND: a vitforge binary, optionally after `env VAR=value`, e.g. to compare a commit with
#   the one before it:
#   git worktree add /tmp/before HEAD~1 && (cd /tmp/before && cargo build --release)
#   bench/ab.sh /tmp/before/target/release/vitforge target/release/vitforge 6 \
#       --config small --batch 8 --mode train --iters 5 --precision bf16
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n '2,13p' "$0" >&2; exit 2; }
a=$1 b=$2 rounds=$3
shift 3
# run COMMAND ARGS...: "images/s wall user sys faults" of one `vitforge bench` run.
run() {
    local out
    out=$(/usr/bin/time -f 'TIME %e %U %S %R' $1 bench "${@:2}" 2>&1) || { echo "$out" >&2; return 1; }
    local ips
    ips=$(grep -o '"images_per_s":[0-9.]*' <<<"$out" | cut -d: -f2)
    echo "$ips $(grep '^TIME' <<<"$out" | cut -d' ' -f2-)"
}
ratios=()
printf '%-5s %-4s %10s %8s %8s %8s %10s\n' round run 'images/s' 'wall s' 'user s' 'sys s' faults
for ((r = 1; r <= rounds; r++)); do
    order="a b"
    ((r % 2)) || order="b a"
    for v in $order; do
        if [[ $v == a ]]; then ra=$(run "$a" "$@"); line=$ra; else rb=$(run "$b" "$@"); line=$rb; fi
        # shellcheck disable=SC2086
        printf '%-5s %-4s %10s %8s %8s %8s %10s\n' "$r" "${v^^}" $line
    done
    ratios+=("$(python3 -c 'import sys; print(float(sys.argv[2]) / float(sys.argv[1]))' "${ra%% *}" "${rb%% *}")")
done
python3 - "${ratios[@]}" <<'EOF'
import statistics, sys
r = [float(x) for x in sys.argv[1:]]
print(f"B / A images/s: median {statistics.median(r):.3f}, mean {statistics.mean(r):.3f}, "
      f"B ahead in {sum(x > 1 for x in r)} of {len(r)} rounds")
EOF
