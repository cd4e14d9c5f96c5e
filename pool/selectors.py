"""Reads on keys shared by several callers."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Q

from pool.models import ApiKey

Status = ApiKey.Status


@dataclass(frozen=True)
class PoolStatus:
    unused: int  # unissued keys in the pool (at the proxy or about to be)
    ready: int  # of those, the ones already at the proxy: what sign-ups can be given
    assigned: int  # keys people hold: active, suspended or expired (revoked ones excluded)

    @property
    def total(self) -> int:
        return self.unused + self.assigned


def pool_status() -> PoolStatus:
    counts = ApiKey.objects.aggregate(
        unused=Count("id", filter=Q(status=Status.POOL)),
        ready=Count("id", filter=Q(status=Status.POOL, proxy_state=ApiKey.ProxyState.PUSHED)),
        assigned=Count(
            "id", filter=Q(status__in=[Status.ACTIVE, Status.SUSPENDED, Status.EXPIRED])
        ),
    )
    return PoolStatus(**counts)
