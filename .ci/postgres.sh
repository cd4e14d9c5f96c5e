# Sourced by .ci/run (and usable by hand: `source .ci/postgres.sh`): installs PostgreSQL when
# the machine lacks it, starts a throw-away cluster on 127.0.0.1, and exports DATABASE_URL.
# The cluster lives in a temporary folder and is stopped by `pg_stop`.

PG_PORT="${PG_PORT:-54329}"

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(_pg_bin)" ]; then
  echo "== installing PostgreSQL (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN="$(_pg_bin)"
if [ -z "$PG_BIN" ]; then
  echo "PostgreSQL could not be installed" >&2
  return 1 2>/dev/null || exit 1
fi

PG_DIR="$(mktemp -d /tmp/keyportal-pg.XXXXXX)"
if [ "$(id -u)" = "0" ]; then
  # The server refuses to run as root: run it as the postgres user the package created.
  id postgres >/dev/null 2>&1 || useradd --system --home "$PG_DIR" postgres
  chown postgres "$PG_DIR"
  _pg() { runuser -u postgres -- "$@"; }
else
  _pg() { "$@"; }
fi
_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U keyportal --auth=trust -E UTF8 >/dev/null
_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U keyportal keyportal

export DATABASE_URL="postgres://keyportal@127.0.0.1:$PG_PORT/keyportal"
echo "== PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"

pg_stop() { _pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1; rm -rf "$PG_DIR"; }
