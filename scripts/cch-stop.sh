#!/usr/bin/env bash
# Stops what scripts/cch.sh started (Claude Code Hub, the mock Anthropic server, Redis,
# PostgreSQL), each by the pid it recorded. Keeps the source, the build and the database under
# $CCH_WORK, so the next scripts/cch.sh starts in seconds; `--purge` also removes $CCH_WORK.
set -uo pipefail
WORK="${CCH_WORK:-/tmp/keyportal-cch}"
[ -d "$WORK" ] || { echo "nothing at $WORK"; exit 0; }

stop_pid() {  # name pidfile: TERM, wait up to 10 s, then KILL
  local name="$1" file="$2" pid
  [ -s "$file" ] || return 0
  pid="$(head -n 1 "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    echo "== stopping $name (pid $pid)"
    # cch.sh started CCH and the mock with setsid: their process group is their pid.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; }
  fi
  rm -f "$file"
}
stop_pid "Claude Code Hub" "$WORK/cch.pid"
stop_pid "mock Anthropic server" "$WORK/mock.pid"
stop_pid "Redis" "$WORK/redis.pid"

PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
if [ -n "$PG_BIN" ] && [ -f "$WORK/pg/data/postmaster.pid" ]; then
  echo "== stopping PostgreSQL"
  if [ "$(id -u)" = "0" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null
  else
    "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null
  fi
fi
if [ "${1:-}" = "--purge" ]; then
  echo "== removing $WORK"
  rm -rf "$WORK"
fi
