#!/usr/bin/env bash
# Runs the API tests against PostgreSQL instead of SQLite: starts a private PostgreSQL server (initdb
# into a temporary folder, loopback port, trust authentication, as the `postgres` user when run as
# root, since initdb refuses root), points the tests at it with VITFORGE_TEST_POSTGRES, and removes
# it afterwards. Every test gets a database of its own (tests/support: `database_url`).
#   scripts/test-postgres.sh [cargo test arguments after --test api, e.g. -- restart]
# PG_BIN overrides where initdb and pg_ctl are (default: the newest /usr/lib/postgresql/*/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
if [[ -z $pg_bin || ! -x $pg_bin/initdb ]]; then
    echo "test-postgres: no PostgreSQL found (apt-get install postgresql, or set PG_BIN)" >&2
    exit 2
fi
dir=$(mktemp -d /tmp/vitforge-pg.XXXXXX)
run_as=()
if [[ $(id -u) == 0 ]]; then
    chown postgres: "$dir"
    run_as=(runuser -u postgres --)
fi
cleanup() {
    "${run_as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${run_as[@]}" "$pg_bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
# fsync off: a test server's data is thrown away, and fsync costs more than the tests.
"${run_as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" start >/dev/null
echo "test-postgres: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
export VITFORGE_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/postgres"
cargo test --locked --test api "$@"
