#!/usr/bin/env bash
# Re-extracts every translatable string into locale/<lang>/LC_MESSAGES/django.po (new strings
# arrive with an empty msgstr; changed ones are marked fuzzy), then compiles the catalogs.
# Translate the new entries and run `make test`: tests/test_i18n.py lists any left empty or
# fuzzy. Extraction needs GNU gettext (scripts/gettext.sh installs it when missing); running
# the portal never does.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/gettext.sh

# Same options as tests/test_i18n.py uses to find untranslated strings.
SECRET_KEY="${SECRET_KEY:-messages-only}" DEBUG=true .venv/bin/python manage.py makemessages \
  --locale zh_Hans --add-location file --no-obsolete \
  --ignore .venv --ignore staticfiles --ignore tests --ignore bench --ignore var
.venv/bin/python scripts/compilemessages.py
echo "== untranslated or fuzzy entries:"
.venv/bin/python scripts/compilemessages.py --untranslated || true
