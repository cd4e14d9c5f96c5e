from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from keyportal.api import api_view
from pool.selectors import pool_status


@api_view(methods=("GET",), staff=True)
def api_key_pool_status(request: HttpRequest) -> JsonResponse:
    status = pool_status()
    return JsonResponse(
        {"total": status.total, "unused": status.unused, "assigned": status.assigned}
    )
