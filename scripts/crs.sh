#!/usr/bin/env bash
# Installs what the contract tests against the real claude-relay-service need
# (tests/upstreams/test_crs_contract.py): Debian's nodejs and npm (CRS runs as `node src/app.js`,
# its dependencies come from `npm ci`) and redis-server (CRS keeps everything in Redis).
# Those tests skip when these are missing. Idempotent; needs root only to install.
set -euo pipefail
here="$(dirname "$0")"
bash "$here/apt-install.sh" nodejs "command -v node && command -v npm" nodejs npm
bash "$here/apt-install.sh" redis-server "command -v redis-server" redis-server
