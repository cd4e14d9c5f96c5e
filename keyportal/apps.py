from __future__ import annotations

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps
from django.utils.translation import gettext_lazy as _


class KeyportalConfig(AppConfig):
    name = "keyportal"
    verbose_name = _("Key Portal")

    def ready(self) -> None:
        from django.conf import settings

        from keyportal import checks  # noqa: F401 - registers the system checks
        from keyportal.sqlite_file import create_private_sqlite_files

        # Before any connection opens (they open lazily, after start-up): a SQLite file the
        # portal creates is private to its user from the start.
        create_private_sqlite_files(settings.DATABASES)


class PortalAdminConfig(admin_apps.AdminConfig):
    """The admin, served by the portal's own site class (keyportal.admin_site)."""

    default = False  # named in INSTALLED_APPS; "keyportal" itself stays KeyportalConfig

    default_site = "keyportal.admin_site.PortalAdminSite"
