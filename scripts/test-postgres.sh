#!/usr/bin/env bash
# Runs the API tests against PostgreSQL instead of SQLite: starts a private PostgreSQL server (initdb
# into a temporary folder, loopback port, trust authentication, as the `postgres` user when run as
# root, since initdb refuses root), points the tests at it with VITFORGE_TEST_POSTGRES, and removes
# it afterwards. Every test gets a database of its own (tests/support: `database_url`).
#   scripts/test-postgres.sh [cargo test arguments after --test api, e.g. -- restart]
# PG_BIN overrides where initdb and pg_ctl are (default: the newest /usr/lib/postgresql/*/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/postgres.sh
dir=$(mktemp -d /tmp/vitforge-pg.XXXXXX)
trap 'pg_stop; rm -rf "$dir"' EXIT
pg_start "$dir"
echo "test-postgres: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') at $PG_URL"
export VITFORGE_TEST_POSTGRES=$PG_URL
cargo test --locked --test api "$@"
