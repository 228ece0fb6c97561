# A private PostgreSQL server for tests and benchmarks (source it): pg_start DIR, then PG_URL;
# pg_stop. Used by scripts/test-postgres.sh and bench/cluster.sh.

# pg_start DIR: a private PostgreSQL (initdb into DIR, loopback port, trust authentication; as
# the `postgres` user when root). Sets PG_URL. PG_BIN overrides where its binaries are.
pg_start() {
  pg_dir=$1
  pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  [[ -x $pg_bin/initdb ]] || { echo "no PostgreSQL (apt-get install postgresql, or set PG_BIN)" >&2; exit 2; }
  pg_as=()
  if [[ $(id -u) == 0 ]]; then chown postgres: "$pg_dir"; pg_as=(runuser -u postgres --); fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${pg_as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
  "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
    -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" start >/dev/null
  PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

# pg_stop: stops the server of pg_start (if any).
pg_stop() {
  [[ -n ${pg_dir:-} ]] && "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
}
