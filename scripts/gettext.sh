#!/usr/bin/env bash
# Installs GNU gettext (xgettext, msgmerge, msgfmt) for the developer tools: `make messages`
# re-extracts strings with it, and tests/test_i18n.py uses it to find strings left without a
# translation. Running the portal never needs it (scripts/compilemessages.py builds the .mo
# in pure Python). Idempotent; needs root only when gettext is missing.
set -euo pipefail
exec bash "$(dirname "$0")/apt-install.sh" gettext \
  "command -v xgettext && command -v msgmerge && command -v msgfmt" gettext
