"""Infrastructure shared by every app: cross-process leases."""

from __future__ import annotations

from django.db import models


class Lease(models.Model):
    """A named lock that works across processes and machines on SQLite and PostgreSQL.

    A row per name; whoever moves `holder` from empty (or expired) to itself with one
    conditional UPDATE owns it. The expiry frees a lease whose holder was killed."""

    name = models.CharField(max_length=100, primary_key=True)
    holder = models.CharField(max_length=100, blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name
