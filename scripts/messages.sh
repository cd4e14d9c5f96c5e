#!/usr/bin/env bash
# Re-extracts every translatable string into locale/<lang>/LC_MESSAGES/django.po (new strings
# arrive with an empty msgstr; changed ones are marked fuzzy), then compiles the catalogs.
# Translate the new entries and run `make test`: tests/test_i18n.py lists any left empty or
# fuzzy. Extraction needs GNU gettext (xgettext, msgmerge); installed here when missing and
# we are root, as scripts/browser.sh does for chromium. Running the portal never needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v xgettext >/dev/null || ! command -v msgmerge >/dev/null; then
  if [ "$(id -u)" != "0" ]; then
    echo "gettext is missing and installing it needs root: sudo apt-get install gettext" >&2
    exit 1
  fi
  echo "== installing gettext (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends gettext >/dev/null
fi

# Same options as tests/test_i18n.py uses to find untranslated strings.
SECRET_KEY="${SECRET_KEY:-messages-only}" DEBUG=true .venv/bin/python manage.py makemessages \
  --locale zh_Hans --add-location file --no-obsolete \
  --ignore .venv --ignore staticfiles --ignore tests --ignore bench --ignore var
.venv/bin/python scripts/compilemessages.py
echo "== untranslated or fuzzy entries:"
.venv/bin/python scripts/compilemessages.py --untranslated || true
