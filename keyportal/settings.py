"""The one real settings module. Everything that differs between machines comes from the
environment (or a `.env` file beside manage.py, read only when present); `.env.example`
documents every variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    # Variables already set in the environment win over the file.
    env.read_env(BASE_DIR / ".env", overwrite=False)



def setting(name: str, default: str) -> str:
    """The variable's value, or the default when unset or left empty (as in .env.example)."""
    return env.str(name, default="") or default


def number(name: str, default: str, kind: type = int) -> Any:
    raw = setting(name, default)
    try:
        return kind(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}.") from None


DEBUG = env.bool("DEBUG", default=False)

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Put a long random value in the environment or in .env "
            "(`make run` writes one for you)."
        )
    SECRET_KEY = "insecure-development-only-key"  # noqa: S105 - DEBUG only

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "keyportal.apps.PortalAdminConfig",  # django.contrib.admin with the portal's site class
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    # Before keyportal: keyportal/admin.py replaces otp_totp's admin with one that never
    # shows a device's secret.
    "django_otp",
    "django_otp.plugins.otp_totp",
    # Sign-in through the company's identity provider (accounts/oidc.py): allauth speaks the
    # protocol; who may sign in, and as whom, stays the portal's (accounts/services.py).
    "allauth",
    "allauth.account",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "allauth.socialaccount.providers.dingtalk",
    "allauth.socialaccount.providers.feishu",
    "keyportal",
    "accounts",
    "pool",
    "usage",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "keyportal.csp.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Required by allauth.account; with none of allauth's account URLs mounted it only keeps
    # allauth's request context.
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "keyportal.urls"
WSGI_APPLICATION = "keyportal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

# SQLite is the embedded default; PostgreSQL (DATABASE_URL=postgres://...) lets several
# portal processes on several machines share one database.
DATABASES = {
    "default": env.db_url_config(setting("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"))
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE takes the write lock when a transaction starts, so two processes never
    # deadlock upgrading a read lock; WAL lets readers go on while one process writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            # Seconds a statement waits for another writer's lock before "database is
            # locked"; sync_usage retries on top of it (USAGE_DB_RETRY_SECONDS).
            "timeout": number("SQLITE_BUSY_TIMEOUT", "20", float),
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
else:
    DATABASES["default"]["CONN_MAX_AGE"] = number("CONN_MAX_AGE", "60")
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A cache every portal process shares (rate limits, the upstream refusal latch). The
# database cache needs no extra service; `manage.py migrate` creates its table
# (keyportal/migrations/0003_cache_table.py).
CACHES = {"default": env.cache_url_config(setting("CACHE_URL", "dbcache://keyportal_cache"))}

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/login"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = setting("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
# Numbers group by thousands (4,220,812) and table dates read 2026-11-23 22:32 in every
# language: keyportal/formats/<locale>/formats.py override Django's per-language formats.
USE_THOUSAND_SEPARATOR = True
FORMAT_MODULE_PATH = ["keyportal.formats"]
# The language switch's choice: a year, like Django's default, but never sent to other sites.
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600
LANGUAGE_COOKIE_SAMESITE = "Lax"

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# Email: django-environ's EMAIL_URL form (smtp+tls://user:pass@host:587); the console by
# default, so sign-in links show up in the portal's output until SMTP is configured.
vars().update(env.email_url_config(setting("EMAIL_URL", "consolemail://")))
DEFAULT_FROM_EMAIL = setting("DEFAULT_FROM_EMAIL", "Key Portal <keyportal@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# HTTPS. PORTAL_HTTPS=true is the one switch for a portal served over TLS (directly or by a
# proxy that sets X-Forwarded-Proto): plain-HTTP requests are redirected, browsers are told
# to use HTTPS only (HSTS), cookies go over HTTPS only, and X-Forwarded-Proto: https from the
# proxy counts as a secure request. Off by default: `make run` serves plain HTTP on 127.0.0.1.
# The older SECURE_COOKIES and BEHIND_TLS_PROXY still turn on their part alone.
PORTAL_HTTPS = env.bool("PORTAL_HTTPS", default=False)
SESSION_COOKIE_SECURE = PORTAL_HTTPS or env.bool("SECURE_COOKIES", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# A refused form gets the portal's own page (translated, with a way on), not Django's.
CSRF_FAILURE_VIEW = "keyportal.views.csrf_failure"
LANGUAGE_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
if PORTAL_HTTPS or env.bool("BEHIND_TLS_PROXY", default=False):
    # Only safe when the proxy overwrites X-Forwarded-Proto (nginx: proxy_set_header
    # X-Forwarded-Proto $scheme;) and the portal cannot be reached around the proxy.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = PORTAL_HTTPS
SECURE_HSTS_SECONDS = number("PORTAL_HSTS_SECONDS", "31536000") if PORTAL_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = PORTAL_HTTPS and env.bool(
    "PORTAL_HSTS_INCLUDE_SUBDOMAINS", default=True
)
# Preloading puts the domain in browsers' built-in HTTPS-only lists, which takes months to
# undo: off unless asked for. Django's deploy check warns about it (security.W021); that
# warning is silenced while preload is deliberately off.
SECURE_HSTS_PRELOAD = PORTAL_HTTPS and env.bool("PORTAL_HSTS_PRELOAD", default=False)
SILENCED_SYSTEM_CHECKS: list[str] = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
# People's sessions last SESSION_COOKIE_AGE (Django's two weeks); a staff member's password
# sign-in to the admin (which also opens /staff/ and the staff API) lasts this many seconds.
PORTAL_STAFF_SESSION_SECONDS = number("PORTAL_STAFF_SESSION_SECONDS", str(12 * 3600))
# Staff who set up an authenticator app (/admin/totp/setup/) give a 6-digit code after their
# password. With PORTAL_STAFF_TOTP_REQUIRED every staff member must set one up before the
# admin opens.
PORTAL_STAFF_TOTP_REQUIRED = env.bool("PORTAL_STAFF_TOTP_REQUIRED", default=False)
OTP_TOTP_ISSUER = env.str("PORTAL_TOTP_ISSUER", default="Key Portal")
OTP_ADMIN_HIDE_SENSITIVE_DATA = True

# --- The proxy (CLIProxyAPI) ---------------------------------------------------------------
# Base URL of the proxy, e.g. http://127.0.0.1:8317 (the Management API lives under
# /v0/management). Empty: the portal runs and says on its status page that no proxy is set.
CLIPROXY_URL = setting("CLIPROXY_URL", "").rstrip("/")
CLIPROXY_MANAGEMENT_KEY = env.str("CLIPROXY_MANAGEMENT_KEY", default="")
# Seconds a command (sync_usage, reconcile_keys, ...) gives each proxy call, from connect to
# the answer's last byte: a proxy that drips its answer is cut off at this deadline, not only
# one that stays silent.
CLIPROXY_TIMEOUT = number("CLIPROXY_TIMEOUT", "10", float)
# The largest answer the portal reads into memory from the proxy, in bytes (default 64 MiB):
# a larger one is refused with a sentence and the connection closed. A /usage-queue pop is
# streamed to the spool instead (its records are gone from the proxy: never refused); one
# bigger than this is counted in pieces, and the next pops ask for fewer records.
CLIPROXY_MAX_ANSWER_BYTES = max(number("CLIPROXY_MAX_ANSWER_BYTES", str(64 * 1024 * 1024)), 1024)
# Base URL people paste into their tools; defaults to CLIPROXY_URL.
CLIPROXY_PUBLIC_URL = setting("CLIPROXY_PUBLIC_URL", CLIPROXY_URL).rstrip("/")
# --- Other upstreams, declared in the environment (staff can add more in the admin) ----------
# claude-relay-service: its address, and the admin account the portal signs in with. With
# these and no CLIPROXY_URL, the portal works with claude-relay-service alone.
CRS_URL = setting("CRS_URL", "").rstrip("/")
CRS_ADMIN_USERNAME = env.str("CRS_ADMIN_USERNAME", default="")
CRS_ADMIN_PASSWORD = env.str("CRS_ADMIN_PASSWORD", default="")
CRS_PUBLIC_URL = setting("CRS_PUBLIC_URL", "").rstrip("/")
# Claude Code Hub: its address and ADMIN_TOKEN (its /api/v1 management API).
CCH_URL = setting("CCH_URL", "").rstrip("/")
CCH_ADMIN_TOKEN = env.str("CCH_ADMIN_TOKEN", default="")
CCH_PUBLIC_URL = setting("CCH_PUBLIC_URL", "").rstrip("/")
# Seconds each call to a claude-relay-service or Claude Code Hub may take, connect to last byte.
UPSTREAM_TIMEOUT = number("UPSTREAM_TIMEOUT", "10", float)

# A page that changes keys (revoke; the admin's revoke, suspend and resume) asks the proxy to
# follow at once but waits for it at most this many seconds in all, and never for another
# portal process's write: past that the change stays pending at the proxy (it is already
# committed in the portal) and the next sync or reconcile_keys finishes it. Staff pages that
# read the proxy (/staff/proxy, its settings pages) get the same budget for all their calls.
PORTAL_REQUEST_PROXY_BUDGET = number("PORTAL_REQUEST_PROXY_BUDGET", "2", float)
# Reconcile refuses a key list from the proxy that lacks more than this share of the keys the
# portal put there (and at least 3 of them), or lacks all of them: a proxy whose config was
# reset or answered garbage must not make the portal mark every issued key missing.
# `reconcile_keys --force` goes ahead anyway.
PORTAL_RECONCILE_MAX_LOSS = number("PORTAL_RECONCILE_MAX_LOSS", "0.5", float)

# --- The key pool ---------------------------------------------------------------------------
PORTAL_KEY_PREFIX = env.str("PORTAL_KEY_PREFIX", default="sk-kp-")  # empty is allowed
# reconcile_keys refills the pool when fewer than PORTAL_POOL_MIN unused keys remain, up to
# PORTAL_POOL_TARGET (default twice the minimum), so that not every sign-up causes a write.
PORTAL_POOL_MIN = number("PORTAL_POOL_MIN", "20")
PORTAL_POOL_TARGET = max(number("PORTAL_POOL_TARGET", str(2 * PORTAL_POOL_MIN)), PORTAL_POOL_MIN)
# Encrypts the values of suspended and expired keys while they are off the proxy, so they can
# come back on their own (pool/escrow.py). A Fernet key (`python -c "from cryptography.fernet
# import Fernet; print(Fernet.generate_key().decode())"`); empty: derived from SECRET_KEY.
PORTAL_ESCROW_KEY = env.str("PORTAL_ESCROW_KEY", default="")

# --- Alerts and limits ----------------------------------------------------------------------
# Staff alerts (pool empty, an unissued key used, ...) go to every active staff member by
# email and, when set, as a JSON POST to this URL.
PORTAL_STAFF_WEBHOOK_URL = setting("PORTAL_STAFF_WEBHOOK_URL", "")
PORTAL_WEBHOOK_TIMEOUT = number("PORTAL_WEBHOOK_TIMEOUT", "5", float)
# The portal's own address as people open it (https://keys.example.com), for links in what
# is sent outside a request (limit emails from the sync). Unset: guessed from ALLOWED_HOSTS,
# and the system check (keyportal.W030) says so.
PORTAL_BASE_URL = setting("PORTAL_BASE_URL", "")
# Whom people ask about their keys and limits, named in limit emails (an address, a chat
# channel, a URL). Unset: the email addresses of the active staff (at most three).
PORTAL_SUPPORT_CONTACT = setting("PORTAL_SUPPORT_CONTACT", "")
# Team chat webhooks (docs/notifications.md): tries per alert before it is kept as failed,
# with backoff between them (30 s, 2 min, 8 min, 32 min, ...).
PORTAL_WEBHOOK_ATTEMPTS = max(number("PORTAL_WEBHOOK_ATTEMPTS", "6"), 1)
# Send queued alerts at once in a background thread of the process that raised them. Off:
# only `sync_usage` and `manage.py send_notifications` send them.
PORTAL_WEBHOOK_BACKGROUND = env.bool("PORTAL_WEBHOOK_BACKGROUND", default=True)
# Sent and given-up deliveries are deleted after this many days (send_notifications).
PORTAL_WEBHOOK_KEEP_DAYS = max(number("PORTAL_WEBHOOK_KEEP_DAYS", "30"), 1)
# Hosts a person's own webhook may point at (the chat platforms' robot hosts): a person must
# not make the portal POST into the intranet. Staff webhooks may point anywhere.
PORTAL_PERSON_WEBHOOK_HOSTS = env.list("PORTAL_PERSON_WEBHOOK_HOSTS", default=[
    "oapi.dingtalk.com", "open.feishu.cn", "open.larksuite.com", "qyapi.weixin.qq.com",
    "hooks.slack.com",
])
# Owners are emailed this many days before a key expires (once per key).
PORTAL_EXPIRY_WARNING_DAYS = number("PORTAL_EXPIRY_WARNING_DAYS", "7")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "keyportal.logging.RedactSecretsFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]}
    },
    "root": {"handlers": ["console"], "level": setting("LOG_LEVEL", "INFO")},
    "loggers": {
        # urllib3 logs whole request lines at DEBUG; a DELETE ?value=<key> would put a key
        # in the log, so it stays at WARNING whatever LOG_LEVEL says.
        "urllib3": {"level": "WARNING"},
        # Django's own handlers (a console one under DEBUG, mail to ADMINS) have no redaction:
        # its records go to the root handler above instead. Refused requests are logged with
        # their path, and a path can hold a sign-in link's token.
        "django": {"handlers": [], "propagate": True},
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}

# --- Self-service (accounts) ---
# Sign-in and registration links: how long they work (each works once).
PORTAL_LINK_MINUTES = number("PORTAL_LINK_MINUTES", "15")
# Only addresses at these domains may register or sign in (comma-separated; empty: any).
PORTAL_ALLOWED_EMAIL_DOMAINS = [
    d.strip().lower().lstrip("@") for d in env.list("PORTAL_ALLOWED_EMAIL_DOMAINS", default=[])
    if d.strip()
]
# One person per mailbox: ann+ci@x.com signs in and registers as ann@x.com, and links go to
# ann@x.com. People already stored with a +tag keep their address. Turn off only when a mail
# server treats "+" as an ordinary character (ann+ci would be someone else's mailbox).
PORTAL_FOLD_PLUS_ADDRESSING = env.bool("PORTAL_FOLD_PLUS_ADDRESSING", default=True)
# With folding on, how many people one mailbox may hold (counting people stored with a +tag
# before folding was on): registering one more is refused with an email saying so.
PORTAL_PEOPLE_PER_MAILBOX = number("PORTAL_PEOPLE_PER_MAILBOX", "1")
# Rate limits on /login and /register, counted in the shared cache over a window: per client
# address and per email address.
PORTAL_RATE_WINDOW_SECONDS = number("PORTAL_RATE_WINDOW_SECONDS", "900")
PORTAL_RATE_PER_IP = number("PORTAL_RATE_PER_IP", "20")
PORTAL_RATE_PER_EMAIL = number("PORTAL_RATE_PER_EMAIL", "5")
# Proxies in front of the portal (nginx, a load balancer), comma-separated addresses or
# networks (10.0.0.5, 10.1.0.0/16, ::1). When a request comes from one of them, the client
# address (rate limits, the audit log) is the right-most X-Forwarded-For entry that is not
# itself one of them; otherwise it is REMOTE_ADDR, and X-Forwarded-For is ignored. Empty (the
# default): nothing is trusted, which behind a proxy puts everyone in one rate-limit budget.
PORTAL_TRUSTED_PROXIES: list[str] = [
    p.strip() for p in env.list("PORTAL_TRUSTED_PROXIES", default=[]) if p.strip()
]
for _proxy in PORTAL_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"PORTAL_TRUSTED_PROXIES: {_proxy!r} is not an IP address or network."
        ) from None
# Keys one person may add per window (the my-keys page and the API), so that a signed-in
# person cannot drain the pool.
PORTAL_RATE_KEYS_PER_PERSON = number("PORTAL_RATE_KEYS_PER_PERSON", "10")
# The admin's password sign-in is refused for the rest of a window once a client address, or
# an account, has had this many wrong passwords in it (shared cache; each refusal audited).
PORTAL_ADMIN_LOGIN_FAILURES = number("PORTAL_ADMIN_LOGIN_FAILURES", "10")
PORTAL_ADMIN_LOGIN_WINDOW_SECONDS = number("PORTAL_ADMIN_LOGIN_WINDOW_SECONDS", "900")
LOGIN_REDIRECT_URL = "/my-keys"

# --- Sign-in through an OpenID Connect provider (docs/sign-in.md) -------------------------------
# Off unless PORTAL_OIDC_DISCOVERY_URL is set. The provider's verified email is the identity:
# the allow-list and +tag folding above apply to it as to an emailed link.
PORTAL_OIDC_DISCOVERY_URL = setting("PORTAL_OIDC_DISCOVERY_URL", "")
PORTAL_OIDC_CLIENT_ID = env.str("PORTAL_OIDC_CLIENT_ID", default="")
PORTAL_OIDC_CLIENT_SECRET = env.str("PORTAL_OIDC_CLIENT_SECRET", default="")
# The button's label: "Sign in with <name>".
PORTAL_OIDC_NAME = setting("PORTAL_OIDC_NAME", "OpenID Connect")
# Part of the callback address (/auth/oidc/<id>/login/callback/) and of every link between a
# person and their provider account: choose it once (letters, digits, - and _).
PORTAL_OIDC_ID = setting("PORTAL_OIDC_ID", "oidc")
if PORTAL_OIDC_DISCOVERY_URL and not PORTAL_OIDC_CLIENT_ID:
    raise ImproperlyConfigured(
        "PORTAL_OIDC_DISCOVERY_URL is set but PORTAL_OIDC_CLIENT_ID is not: give the client id "
        "(and PORTAL_OIDC_CLIENT_SECRET) the identity provider registered for the portal."
    )
SOCIALACCOUNT_PROVIDERS: dict[str, Any] = {
    "openid_connect": {
        # The portal's provider class always checks the id_token's signature and nonce
        # (allauth's own skips both on the code flow).
        "provider_class": "accounts.oidc.PortalOIDCProvider",
        "OAUTH_PKCE_ENABLED": True,
        "APPS": [
            {
                "provider_id": PORTAL_OIDC_ID,
                "name": PORTAL_OIDC_NAME,
                "client_id": PORTAL_OIDC_CLIENT_ID,
                "secret": PORTAL_OIDC_CLIENT_SECRET,
                "settings": {"server_url": PORTAL_OIDC_DISCOVERY_URL},
            }
        ] if PORTAL_OIDC_DISCOVERY_URL else [],
    }
}
# --- Sign-in through DingTalk and Feishu / Lark (docs/sign-in.md, accounts/platforms.py) ------
# Each is off until its app id is set. Their user-info answers carry no "verified" flag: which
# address counts as the person's is the portal's decision, explained in docs/sign-in.md.
PORTAL_DINGTALK_CLIENT_ID = env.str("PORTAL_DINGTALK_CLIENT_ID", default="")
PORTAL_DINGTALK_CLIENT_SECRET = env.str("PORTAL_DINGTALK_CLIENT_SECRET", default="")
# DingTalk's identity is the company mailbox (org_email) in the organisation's directory. The
# account's own `email` is not one the company issued: trusted only when the operator says so.
PORTAL_DINGTALK_TRUST_EMAIL = env.bool("PORTAL_DINGTALK_TRUST_EMAIL", default=False)
PORTAL_DINGTALK_LOGIN_URL = setting("PORTAL_DINGTALK_LOGIN_URL", "https://login.dingtalk.com")
PORTAL_DINGTALK_API_URL = setting("PORTAL_DINGTALK_API_URL", "https://api.dingtalk.com")
# The older API host, where the directory entry (with the company mailbox) is read.
PORTAL_DINGTALK_OAPI_URL = setting("PORTAL_DINGTALK_OAPI_URL", "https://oapi.dingtalk.com")
PORTAL_FEISHU_APP_ID = env.str("PORTAL_FEISHU_APP_ID", default="")
PORTAL_FEISHU_APP_SECRET = env.str("PORTAL_FEISHU_APP_SECRET", default="")
# Feishu's open platform; Lark (the international edition) is https://open.larksuite.com.
PORTAL_FEISHU_URL = setting("PORTAL_FEISHU_URL", "https://open.feishu.cn").rstrip("/")
# Feishu's `enterprise_email` is the company's mailbox and always counts; its `email` (the
# contact address in the directory) only when the operator trusts it.
PORTAL_FEISHU_TRUST_EMAIL = env.bool("PORTAL_FEISHU_TRUST_EMAIL", default=False)
for _name, _id, _secret in (("DINGTALK", PORTAL_DINGTALK_CLIENT_ID, PORTAL_DINGTALK_CLIENT_SECRET),
                            ("FEISHU", PORTAL_FEISHU_APP_ID, PORTAL_FEISHU_APP_SECRET)):
    if _id and not _secret:
        raise ImproperlyConfigured(f"The {_name.title()} app id is set but its secret is not: "
                                   f"give both (docs/sign-in.md).")
SOCIALACCOUNT_PROVIDERS["dingtalk"] = {
    "provider_class": "accounts.platforms.PortalDingTalkProvider",
    # DingTalk's authorization page asks for prompt=consent.
    "AUTH_PARAMS": {"prompt": "consent"},
    "APPS": [{"client_id": PORTAL_DINGTALK_CLIENT_ID, "secret": PORTAL_DINGTALK_CLIENT_SECRET}]
    if PORTAL_DINGTALK_CLIENT_ID else [],
}
SOCIALACCOUNT_PROVIDERS["feishu"] = {
    "provider_class": "accounts.platforms.PortalFeishuProvider",
    "APPS": [{"client_id": PORTAL_FEISHU_APP_ID, "secret": PORTAL_FEISHU_APP_SECRET}]
    if PORTAL_FEISHU_APP_ID else [],
}
# The emailed link beside the providers (true), or the providers only (false; a system check
# refuses false when no provider is on).
# Left empty (as in .env.example) it stays on.
PORTAL_EMAIL_LINK_SIGNIN = (env.bool("PORTAL_EMAIL_LINK_SIGNIN")
                            if env.str("PORTAL_EMAIL_LINK_SIGNIN", default="") else True)
# A provider sign-in opens the admin for staff, without the portal's password and
# authenticator app: only for providers that enforce MFA themselves (docs/sign-in.md).
PORTAL_PROVIDER_OPENS_ADMIN = env.bool("PORTAL_PROVIDER_OPENS_ADMIN", default=False)
SOCIALACCOUNT_ADAPTER = "accounts.oidc.PortalSocialAccountAdapter"
ACCOUNT_ADAPTER = "accounts.oidc.PortalAccountAdapter"
# Seconds each call to the identity provider (discovery, token, keys, userinfo) may take.
SOCIALACCOUNT_REQUESTS_TIMEOUT = number("PORTAL_OIDC_TIMEOUT", "10", float)
# The provider's tokens are not kept: the portal needs the identity once, at sign-in.
SOCIALACCOUNT_STORE_TOKENS = False
# No allauth accounts of its own: people are made by the portal's services, identified by email.
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_EMAIL_VERIFICATION = "none"
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "https" if PORTAL_HTTPS else "http"

# --- Sign-in with a company account from an LDAP directory (docs/sign-in.md) -------------------
# Off unless PORTAL_LDAP_URL is set (ldap://host[:port] or ldaps://host[:port]). The account
# is found by a search under PORTAL_LDAP_USER_SEARCH_BASE (as the service account
# PORTAL_LDAP_BIND_DN, or anonymously), or named directly by PORTAL_LDAP_USER_DN_TEMPLATE; the
# person's password is then checked by binding as it. The email attribute is the identity.
PORTAL_LDAP_URL = setting("PORTAL_LDAP_URL", "")
PORTAL_LDAP_BIND_DN = env.str("PORTAL_LDAP_BIND_DN", default="")
PORTAL_LDAP_BIND_PASSWORD = env.str("PORTAL_LDAP_BIND_PASSWORD", default="")
PORTAL_LDAP_USER_SEARCH_BASE = setting("PORTAL_LDAP_USER_SEARCH_BASE", "")
# %(user)s is the username as typed, escaped for the filter. Active Directory:
# (sAMAccountName=%(user)s), or (userPrincipalName=%(user)s) for ann@corp.example.com.
PORTAL_LDAP_USER_FILTER = setting("PORTAL_LDAP_USER_FILTER", "(uid=%(user)s)")
# Instead of a search: uid=%(user)s,ou=people,dc=example,dc=com (no service account needed).
PORTAL_LDAP_USER_DN_TEMPLATE = setting("PORTAL_LDAP_USER_DN_TEMPLATE", "")
PORTAL_LDAP_EMAIL_ATTR = setting("PORTAL_LDAP_EMAIL_ATTR", "mail")
# StartTLS on an ldap:// URL (ldaps:// is TLS from the start); the CA file that signed the
# directory's certificate when it is not in the system's store.
PORTAL_LDAP_START_TLS = env.bool("PORTAL_LDAP_START_TLS", default=False)
PORTAL_LDAP_CA_FILE = setting("PORTAL_LDAP_CA_FILE", "")
# Seconds the connection, and each bind or search, may take.
PORTAL_LDAP_TIMEOUT = number("PORTAL_LDAP_TIMEOUT", "5", float)
if PORTAL_LDAP_URL and not (PORTAL_LDAP_USER_SEARCH_BASE or PORTAL_LDAP_USER_DN_TEMPLATE):
    raise ImproperlyConfigured(
        "PORTAL_LDAP_URL is set but neither PORTAL_LDAP_USER_SEARCH_BASE nor "
        "PORTAL_LDAP_USER_DN_TEMPLATE is: say where the directory keeps its people."
    )
if PORTAL_LDAP_URL and "%(user)s" not in (
    PORTAL_LDAP_USER_DN_TEMPLATE or PORTAL_LDAP_USER_FILTER
):
    raise ImproperlyConfigured(
        "PORTAL_LDAP_USER_FILTER (or PORTAL_LDAP_USER_DN_TEMPLATE) must contain %(user)s, "
        "where the username goes."
    )

# --- Usage ---
# How sync_usage reads the proxy: "auto" asks it (queue on 6.10.8+, snapshot before), or force
# "queue" (GET /usage-queue) or "snapshot" (GET /usage).
CLIPROXY_USAGE_MODE = setting("CLIPROXY_USAGE_MODE", "auto").lower()
if CLIPROXY_USAGE_MODE not in ("auto", "queue", "snapshot"):
    raise ImproperlyConfigured(
        f"CLIPROXY_USAGE_MODE must be auto, queue or snapshot, not {CLIPROXY_USAGE_MODE!r}."
    )
# Records per /usage-queue pop; each pop is spooled and committed before it is counted. 5,000
# is measured (docs/benchmarks.md: pop size): the smallest pop whose ingest on PostgreSQL,
# spool and fsync included, stays within 3x json.loads of the same bytes (smaller pops pay the
# fixed commits and fsync per pop more often), and about 6.6 MB, well inside one spool piece
# (an eighth of CLIPROXY_MAX_ANSWER_BYTES); a kill -9 while the proxy serialises or the portal
# reads a pop loses at most that one pop.
USAGE_QUEUE_BATCH = max(number("USAGE_QUEUE_BATCH", "5000"), 1)
# Seconds between passes of `sync_usage --follow`: well under the proxy's queue retention
# (redis-usage-queue-retention-seconds, 60 s by default), or records expire unread.
USAGE_FOLLOW_INTERVAL = number("USAGE_FOLLOW_INTERVAL", "15", float)
# `sync_usage --follow` subscribes to the proxy's usage stream (RESP, on CLIPROXY_URL's port) on
# proxies that have it (7.x) and polls the others; false: always poll.
USAGE_STREAM = env.bool("USAGE_STREAM", default=True)
# The stream commits (stores, counts, checks limits) as soon as pushes pause, and under steady
# traffic at least this often (seconds).
USAGE_STREAM_COMMIT_SECONDS = max(number("USAGE_STREAM_COMMIT_SECONDS", "1", float), 0.05)
# The stream writes one progress row (SyncRun, mode "stream") this often, even when idle.
USAGE_STREAM_RUN_SECONDS = max(number("USAGE_STREAM_RUN_SECONDS", "60", float), 1.0)
# After the proxy refused the stream (no RESP, or AUTH refused), poll this long before trying
# the stream again (a refused AUTH counts toward the proxy's ban of the address).
USAGE_STREAM_RETRY_SECONDS = max(number("USAGE_STREAM_RETRY_SECONDS", "600", float), 1.0)
# Days a counted queue batch (hashed keys only) is kept for inspection before it is dropped.
USAGE_BATCH_KEEP_DAYS = number("USAGE_BATCH_KEEP_DAYS", "7")
# Where sync_usage writes each popped body (sealed, fsynced) before any database write, so a
# locked, full or absent database loses nothing (usage/spool.py). Created 0700; on a local
# disk, not on the database's volume if that can fill up.
USAGE_SPOOL_DIR = Path(setting("USAGE_SPOOL_DIR", str(BASE_DIR / "var" / "spool")))
# Seconds sync_usage keeps retrying a database write that fails because the database is
# locked, full or away, before it leaves the body in the spool for the next run.
USAGE_DB_RETRY_SECONDS = number("USAGE_DB_RETRY_SECONDS", "60", float)
