"""Keeps secrets out of log output, whatever a log line was given."""

from __future__ import annotations

import logging
import re

from django.conf import settings


# The one-time links' token segment: /login/<token>, /register/<token>, with or without the
# host. Django logs the path of a refused request (CSRF failures, 4xx/5xx) and the link still
# works when the POST was refused, so the token must not reach the log.
# (The identity provider's callback, /auth/oidc/<id>/login/callback/, is not a token.)
LINK_TOKEN = re.compile(r"(/(?:login|register)/)(?!callback/|ldap(?![^/\s?#\"'<>]))[^/\s?#\"'<>]+")
# The identity provider's answer on the callback (?code=...&state=...): a code works once and
# only with the session that asked for it, but it is a credential all the same.
# DingTalk answers with `authCode` instead of `code`.
OIDC_QUERY = re.compile(r"([?&](?:code|authCode|state|id_token|access_token)=)[^&\s#\"'<>]+")


class RedactSecretsFilter(logging.Filter):
    """Masks the management key, the identity provider's client secret, anything shaped like a
    portal key, sign-in link tokens and the provider's codes in every record.

    Code never logs keys on purpose; this is the net under that rule, for messages that
    carry text from elsewhere (an upstream error body, a third-party library)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # args that do not fit the format: logging reports it, not us
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redact(text: str) -> str:
    secret = getattr(settings, "CLIPROXY_MANAGEMENT_KEY", "")
    if secret:
        text = text.replace(secret, "[management key]")
    for name in ("PORTAL_OIDC_CLIENT_SECRET", "PORTAL_DINGTALK_CLIENT_SECRET",
                 "PORTAL_FEISHU_APP_SECRET"):
        client_secret = getattr(settings, name, "")
        if len(client_secret) >= 8:  # a shorter one would mask ordinary words: no secret
            text = text.replace(client_secret, "[client secret]")
    text = OIDC_QUERY.sub(r"\1[redacted]", text)
    prefix = getattr(settings, "PORTAL_KEY_PREFIX", "")
    if prefix:
        text = re.sub(re.escape(prefix) + r"[A-Za-z0-9_\-]{8,}", prefix + "[redacted]", text)
    return LINK_TOKEN.sub(r"\1[redacted]", text)
