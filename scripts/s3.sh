# A private S3-compatible server for tests and benchmarks (source it): s3_start BUCKET starts
# `moto_server` (PyPI `moto[server]`) on a free loopback port, creates BUCKET and exports the
# AWS_* variables vitforge reads; s3_stop stops it. Used by scripts/test-postgres.sh and
# bench/cluster.sh. moto keeps everything in memory. Needs only Python 3 (moto's own).

s3_start() {
  local bucket=$1 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  s3_pid=$!
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
    AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
  # Creates the bucket once the server answers (30 s at most).
  python3 - "$AWS_ENDPOINT_URL/$bucket" <<'PY' || { echo "moto_server did not start within 30 s" >&2; exit 2; }
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="PUT"), timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
PY
}

s3_stop() {
  [[ -n ${s3_pid:-} ]] && kill "$s3_pid" 2>/dev/null || true
}
