# Shared by the bench scripts (source it): start and stop `vitforge serve`, upload a dataset and
# run a fine-tune to its end, read JSON fields.
# The caller sets `work` (a scratch folder) and removes it.

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
