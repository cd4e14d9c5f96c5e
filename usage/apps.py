from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = _("Usage")

    def ready(self) -> None:
        # Keys are issued in pool, which must not import usage: usage hands pool its limit
        # check, so that no key is issued to someone over a limit (pool.services.key_assign).
        from pool.services import key_issue_guard_register
        from usage.limits import key_issue_guard

        key_issue_guard_register(key_issue_guard)
