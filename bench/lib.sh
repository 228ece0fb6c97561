# Shared by the bench scripts (source it): start and stop `vitforge serve`, upload a dataset and
# run a fine-tune to its end, read JSON fields.
# The caller sets `work` (a scratch folder) and removes it.

# cpu_line: the CPU every figure belongs to, for the log: its name, family and model (a VM's name
# can be as vague as "AMD EPYC": family 25 model 17 is a Zen 4, family 26 a Zen 5), its cores,
# and which of the instruction sets our kernels choose by it has.
cpu_line() {
  echo "CPU: $(cpu_field 'model name') (family $(cpu_field 'cpu family') model $(cpu_field model)), $(nproc) cores;" \
    "flags: $(grep -ow 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
}

# cpu_field NAME: one field of /proc/cpuinfo's first processor.
cpu_field() { grep -m1 "^$1[[:space:]]*:" /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'; }

# json_field FIELD: one top-level field of the JSON on stdin.
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# wait_healthy URL [LOG]: until URL/healthz answers (30 s), else print LOG and fail.
wait_healthy() {
  for _ in $(seq 150); do curl -sf "$1/healthz" >/dev/null && return; sleep 0.2; done
  echo "server at $1 did not start" >&2; [[ -n ${2:-} ]] && cat "$2" >&2; exit 1
}

# upload_zip URL ZIP: uploads a dataset archive; prints its id.
upload_zip() { curl -sf -F file=@"$2" "$1/datasets" | json_field id; }

# submit_job URL DATASET BASE_MODEL [PARAMS_JSON]: queues a job; prints its id.
submit_job() {
  local params=${4:-}
  local body="{\"dataset_id\": \"$2\", \"base_model\": \"$3\"${params:+, \"params\": $params}}"
  curl -sf -H 'content-type: application/json' -d "$body" "$1/jobs" | json_field id
}

# wait_job URL JOB [POLL_SECONDS]: until the job ends; prints its final status.
wait_job() {
  local status
  while :; do
    status=$(curl -sf "$1/jobs/$2" | json_field status)
    [[ $status == queued || $status == running ]] || break
    sleep "${3:-1}"
  done
  echo "$status"
}

# train_job URL ZIP BASE_MODEL [PARAMS_JSON] [LOG]: uploads ZIP, fine-tunes BASE_MODEL on it and
# waits; prints the job id, or prints LOG and fails unless the job succeeded.
train_job() {
  local dataset job status
  dataset=$(upload_zip "$1" "$2")
  job=$(submit_job "$1" "$dataset" "$3" "${4:-}")
  status=$(wait_job "$1" "$job" 2)
  [[ $status == succeeded ]] || { echo "fine-tune $status" >&2; [[ -n ${5:-} ]] && cat "$5" >&2; exit 1; }
  echo "$job"
}

# For the checks run through the device tool (scripts/gpu-check.sh, bench/amx-check.sh), whose
# $OUT folder brings back a few files only.

# unpack_binary FILE: prints FILE, or for FILE.gz the path of an executable copy unpacked into
# $TMPDIR (a stripped CUDA build is 86 MB, over the 64 MiB the device tool carries; 26 MB gzipped).
unpack_binary() {
  if [[ $1 == *.gz ]]; then
    local dest=${TMPDIR:-/tmp}/$(basename "$1" .gz)
    gunzip -c "$1" >"$dest" && chmod +x "$dest" && echo "$dest"
  else
    echo "$1"
  fi
}

# summary_to FILE: starts an empty summary at FILE and, where $OUT is set, at $OUT/<its name> too,
# written as it grows, so that a run stopped at its limit still brings back what it found;
# `summary TEXT...` then adds a line, and `... | tee -a "${sumfiles[@]}"` adds output.
summary_to() {
  sumfiles=("$1")
  [[ -n ${OUT:-} && -d ${OUT:-} && $OUT != "$(dirname "$1")" ]] && sumfiles+=("$OUT/$(basename "$1")")
  : | tee "${sumfiles[@]}"
}
summary() { echo "$*" | tee -a "${sumfiles[@]}"; }

# pack_results DIR NAME: where $OUT is set, DIR's files as $OUT/NAME.tar.gz.
pack_results() {
  if [[ -n ${OUT:-} && -d ${OUT:-} && $OUT != "$1" ]]; then
    tar -czf "$OUT/$2.tar.gz" -C "$1" .
  fi
}
