from __future__ import annotations

from django.apps import AppConfig


class KeyportalConfig(AppConfig):
    name = "keyportal"
    verbose_name = "Key Portal"

    def ready(self) -> None:
        from keyportal import checks  # noqa: F401 - registers the system checks
