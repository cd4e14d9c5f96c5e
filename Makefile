# Key Portal: `make run` sets up and serves the portal on SQLite; `make test` sets up and runs
# the whole suite. Both work on a fresh machine with Python 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2

.PHONY: run test setup setup-dev serve migrate clean messages translations ldap

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# python-ldap (LDAP sign-in) is built from source: scripts/ldap.sh installs its headers and a
# compiler first when they are missing (apt-get, as root). Only `make ldap` and `make test`.
$(VENV)/.ldap-deps: requirements.txt requirements-ldap.txt | $(BIN)/python
	bash scripts/ldap.sh build
	$(BIN)/pip install --quiet -r requirements-ldap.txt
	touch $@

ldap: $(VENV)/.ldap-deps

$(VENV)/.dev-deps: requirements.txt requirements-ldap.txt requirements-dev.txt | $(VENV)/.ldap-deps
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# A first run writes .env from .env.example with a freshly generated SECRET_KEY.
.env: | $(VENV)/.run-deps
	$(BIN)/python scripts/bootstrap_env.py

setup: $(VENV)/.run-deps .env migrate translations
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0

# The .mo catalogs are built from the committed .po files by a pure-Python compiler: no GNU
# gettext (msgfmt) is needed to run the portal, so `make run` needs no root and no package mirror.
translations: | $(BIN)/python
	$(BIN)/python scripts/compilemessages.py

# After changing strings: re-extract them into locale/*/django.po (needs gettext; scripts/gettext.sh
# installs it when missing), then translate the new entries.
messages: $(VENV)/.run-deps
	bash scripts/messages.sh

# Migrations include the shared cache's table (keyportal/migrations/0003_cache_table.py):
# no separate `createcachetable` step.
migrate: $(VENV)/.run-deps .env
	$(BIN)/python manage.py migrate --noinput

run: setup
	@echo ""
	@echo "Key Portal on http://$(HOST):$(PORT)/  (admin: http://$(HOST):$(PORT)/admin/)"
	@echo "Next steps:"
	@echo "  1. First staff account:  $(BIN)/python manage.py createsuperuser"
	@echo "  2. Point it at your relay in .env: CLIPROXY_URL + CLIPROXY_MANAGEMENT_KEY, or CRS_URL +"
	@echo "     CRS_ADMIN_USERNAME + CRS_ADMIN_PASSWORD, or CCH_URL + CCH_ADMIN_TOKEN (docs/upstreams.md),"
	@echo "     then restart make run; or add it in the admin under Upstreams."
	@echo "  3. Sign in at /admin/ and follow its Getting started checklist: the public URL people's"
	@echo "     tools get, the key pool, usage statistics, a first sync (docs/first-run.md)."
	@echo "  4. Keep usage counted: $(BIN)/python manage.py sync_usage --follow (or sync_usage from cron)."
	@echo ""
	exec $(BIN)/gunicorn keyportal.wsgi --bind $(HOST):$(PORT) --workers $(WORKERS) --timeout 60

# The browser tests drive Debian's chromium, tests/test_i18n.py gettext's xgettext and msgfmt,
# tests/upstreams/test_crs_contract.py node, npm and redis-server, tests/accounts/test_ldap.py
# slapd; scripts/browser.sh, scripts/crs.sh, scripts/gettext.sh and scripts/ldap.sh install them
# when missing.
setup-dev: $(VENV)/.dev-deps translations
	bash scripts/browser.sh
	bash scripts/crs.sh
	bash scripts/gettext.sh
	bash scripts/ldap.sh server

# Under `make test` a missing slapd fails the LDAP tests instead of skipping them.
test: setup-dev
	KEYPORTAL_REQUIRE_SLAPD=1 bash scripts/test.sh

clean:
	rm -rf $(VENV) staticfiles .pytest_cache locale/*/LC_MESSAGES/*.mo
