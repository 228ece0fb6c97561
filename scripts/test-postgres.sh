#!/usr/bin/env bash
# Runs the API tests against PostgreSQL instead of SQLite, and with an S3-compatible object store
# instead of the data folder alone (the cluster's backends): starts a private PostgreSQL server
# (initdb into a temporary folder, loopback port, trust authentication, as the `postgres` user when
# run as root, since initdb refuses root) and, where `moto_server` (PyPI `moto[server]`) is
# installed, a private S3 server with one bucket; points the tests at them with
# VITFORGE_TEST_POSTGRES and VITFORGE_TEST_S3 (plus the AWS_* variables), and removes both
# afterwards. Every test gets a database and a bucket prefix of its own (tests/support).
#   scripts/test-postgres.sh [cargo test arguments after --test api, e.g. -- restart]
# PG_BIN overrides where initdb and pg_ctl are (default: the newest /usr/lib/postgresql/*/bin).
# VITFORGE_REQUIRE_S3=1 makes a missing moto_server an error instead of a PostgreSQL-only run.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/postgres.sh
source scripts/s3.sh
dir=$(mktemp -d /tmp/vitforge-pg.XXXXXX)
trap 's3_stop; pg_stop; rm -rf "$dir"' EXIT
pg_start "$dir"
echo "test-postgres: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') at $PG_URL"
export VITFORGE_TEST_POSTGRES=$PG_URL
if command -v moto_server >/dev/null 2>&1; then
    s3_start vitforge-test
    export VITFORGE_TEST_S3=s3://vitforge-test
    echo "test-postgres: S3 (moto_server) at $AWS_ENDPOINT_URL"
elif [[ ${VITFORGE_REQUIRE_S3:-} == 1 ]]; then
    echo "test-postgres: VITFORGE_REQUIRE_S3=1 but moto_server is not installed (pip install 'moto[server]')" >&2
    exit 2
else
    echo "test-postgres: no moto_server: the object store is the data folder in this run"
fi
cargo test --locked --test api "$@"
