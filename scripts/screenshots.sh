#!/usr/bin/env bash
# Screenshots of the portal's main pages, for people who want to see it without running it.
# Not part of CI. Starts a throwaway portal on a temporary SQLite database filled with demo
# data (manage.py seed_demo; CNY as the display currency, DISPLAY_CURRENCY=USD: 1 for
# dollars), and writes PNGs of the admin dashboard, the API keys list, /my-keys, the
# leaderboard, a key page and the staff person page at 1280 and 390 px, in English and in
# zh-CN (<page>-<width>-<locale>.png), into the directory given (default docs/screenshots/).
# It exits non-zero naming the shot when a list is wider than its column, a page wider than
# the window, or two chart series share a colour. Needs the dev setup (make setup-dev):
# the venv's Playwright and the system Chromium (/usr/bin/chromium).
#
#   scripts/screenshots.sh [OUT_DIR] [--locales en,zh-CN]
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-docs/screenshots}"
shift || true
PY=.venv/bin/python
TMP="$(mktemp -d)"
PORT="${PORT:-8765}"
PASSWORD="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
trap 'kill "${SERVER:-}" 2>/dev/null || true; rm -rf "$TMP"' EXIT

# The same environment for the seed, the server and the browser script: nothing from .env.
export SECRET_KEY="screenshots-only-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DEBUG=true ALLOWED_HOSTS=127.0.0.1,localhost CLIPROXY_URL= CLIPROXY_MANAGEMENT_KEY=
export DATABASE_URL="sqlite:///$TMP/db.sqlite3" CACHE_URL=dbcache://keyportal_cache
export EMAIL_URL=consolemail:// PORTAL_POOL_MIN=20 TIME_ZONE="${TIME_ZONE:-Asia/Shanghai}"
export LOG_LEVEL=WARNING PYTHONWARNINGS=ignore

if command -v fc-list >/dev/null && [ -z "$(fc-list :lang=zh 2>/dev/null)" ]; then
  echo "warning: no Chinese font installed; zh-Hans text shows as boxes" \
       "(sudo apt-get install fonts-wqy-microhei)" >&2
fi

echo "== demo database in $TMP"
$PY manage.py migrate --noinput -v0
$PY manage.py seed_demo --staff-password "$PASSWORD" --currency "${DISPLAY_CURRENCY:-CNY:7.1}"
$PY manage.py compilemessages -v0 >/dev/null 2>&1 || true  # when locale/ exists

echo "== portal on 127.0.0.1:$PORT"
$PY manage.py runserver "127.0.0.1:$PORT" --noreload --skip-checks >"$TMP/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:$PORT/login" 2>/dev/null && break
  sleep 0.2
done

mkdir -p "$OUT"
$PY scripts/screenshots.py --base "http://127.0.0.1:$PORT" --out "$OUT" \
  --staff-email staff@example.com --staff-password "$PASSWORD" "$@"
