#!/usr/bin/env bash
# Installs the browser the end-to-end tests drive: Debian's chromium, from apt (Playwright's
# own browser download needs the internet, which an intranet build machine lacks). Playwright
# is pointed at /usr/bin/chromium by tests/browser/conftest.py. Idempotent; needs root.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "chromium is missing and installing it needs root: sudo apt-get install chromium" >&2
  exit 1
fi
echo "== installing chromium (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
test -x "$CHROMIUM" || { echo "chromium could not be installed" >&2; exit 1; }
