#!/usr/bin/env bash
# Installs GNU gettext (xgettext, msgmerge, msgfmt) for the developer tools: `make messages`
# re-extracts strings with it, and tests/test_i18n.py uses it to find strings left without a
# translation. Running the portal never needs it (scripts/compilemessages.py builds the .mo
# in pure Python). Idempotent; needs root only when gettext is missing. Mirrors browser.sh.
set -euo pipefail

if command -v xgettext >/dev/null && command -v msgmerge >/dev/null && command -v msgfmt >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "gettext is missing and installing it needs root: sudo apt-get install gettext" >&2
  exit 1
fi
echo "== installing gettext (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends gettext >/dev/null
command -v xgettext >/dev/null || { echo "gettext could not be installed" >&2; exit 1; }
