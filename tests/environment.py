"""Loaded by pytest before Django is set up (`-p tests.environment` in pytest.ini): the
environment every test run starts from, whatever the developer's shell or .env holds. Only
DATABASE_URL passes through, so the same suite runs on SQLite and on PostgreSQL."""

import os

os.environ.update(
    {
        "SECRET_KEY": "test-only-secret-key-that-is-long-enough-for-django-checks",
        "DEBUG": "false",
        "ALLOWED_HOSTS": "testserver,127.0.0.1,localhost",
        "CLIPROXY_URL": "",
        "CLIPROXY_MANAGEMENT_KEY": "",
        "CLIPROXY_TIMEOUT": "2",
        "CRS_URL": "",
        "CRS_ADMIN_USERNAME": "",
        "CRS_ADMIN_PASSWORD": "",
        "CRS_PUBLIC_URL": "",
        "CCH_URL": "",
        "CCH_ADMIN_TOKEN": "",
        "CCH_PUBLIC_URL": "",
        "UPSTREAM_TIMEOUT": "5",
        "PORTAL_REQUEST_PROXY_BUDGET": "2",
        "PORTAL_RECONCILE_MAX_LOSS": "0.5",
        "PORTAL_KEY_PREFIX": "sk-kp-",
        "PORTAL_POOL_MIN": "0",
        "EMAIL_URL": "consolemail://",
        "TIME_ZONE": "UTC",
        "CACHE_URL": "dbcache://keyportal_cache",
        "LOG_LEVEL": "WARNING",
        "PORTAL_ALLOWED_EMAIL_DOMAINS": "",
        "PORTAL_LINK_MINUTES": "15",
        "PORTAL_RATE_WINDOW_SECONDS": "900",
        "PORTAL_RATE_PER_IP": "20",
        "PORTAL_RATE_PER_EMAIL": "5",
        "PORTAL_RATE_KEYS_PER_PERSON": "10",
        "PORTAL_LDAP_URL": "",
        "PORTAL_LDAP_BIND_DN": "",
        "PORTAL_LDAP_BIND_PASSWORD": "",
        "CLIPROXY_USAGE_MODE": "auto",
        "USAGE_QUEUE_BATCH": "1000",
        "USAGE_FOLLOW_INTERVAL": "15",
        # The poll path unless a test turns the live stream on (tests/usage/test_stream*.py).
        "USAGE_STREAM": "false",
        "USAGE_BATCH_KEEP_DAYS": "7",
        "PORTAL_HTTPS": "false",
        "SECURE_COOKIES": "false",
        "BEHIND_TLS_PROXY": "false",
        "PORTAL_HSTS_SECONDS": "31536000",
        "PORTAL_HSTS_INCLUDE_SUBDOMAINS": "true",
        "PORTAL_HSTS_PRELOAD": "false",
        "PORTAL_STAFF_SESSION_SECONDS": "43200",
        "PORTAL_BASE_URL": "https://keys.example.com",
        "PORTAL_SUPPORT_CONTACT": "",
    }
)

# The translations: every locale/*.po is compiled to its .mo (pure Python, only when the .po
# changed), so a run of `.venv/bin/pytest` reads the same catalogs as `make test` and `make run`.
from scripts.compilemessages import compile_all  # noqa: E402

compile_all()
