#!/usr/bin/env bash
# Installs the browser the end-to-end tests drive: Debian's chromium, from apt (Playwright's
# own browser download needs the internet, which an intranet build machine lacks). Playwright
# is pointed at /usr/bin/chromium by tests/browser/conftest.py. Idempotent; needs root.
set -euo pipefail
exec bash "$(dirname "$0")/apt-install.sh" chromium "test -x /usr/bin/chromium" \
  chromium fonts-dejavu-core
