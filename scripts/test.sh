#!/usr/bin/env bash
# Runs the whole suite with the project's virtual environment. The database is SQLite unless
# DATABASE_URL says otherwise (.ci/run runs it on both).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${DATABASE_URL:-}" == postgres* ]]; then
  echo "== test suite on PostgreSQL"
else
  echo "== test suite on SQLite"
fi
exec .venv/bin/pytest "$@"
