"""The usage part of the JSON API (paths kept from the original portal)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.utils.translation import gettext as _

from accounts.models import User
from accounts.selectors import person_email
from accounts.signin import staff_with_password
from keyportal.api import STAFF_SIGN_IN, api_error, api_token_of, api_view
from usage.selectors import keys_with_usage, people_with_usage, usage_totals
from usage.models import UsageSnapshot
from usage.services import SyncBusy, SyncFailed, usage_sync


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _cost_fields(cost: Decimal | None, unpriced: int, incomplete: int = 0) -> dict[str, Any]:
    # A total that includes unknown-cost usage, or requests whose counts the proxy lost, says
    # so rather than passing as the full price.
    return {"total_cost": _money(cost), "cost_complete": unpriced == 0 and incomplete == 0}


@api_view(methods=("GET",))
def api_user_stats(request: HttpRequest, email: str) -> JsonResponse:
    if "\x00" in email:  # PostgreSQL cannot even compare text holding NUL; no one has it
        return api_error(_("No such person."), 404)
    email = person_email(email=email)
    if email != request.user.email:
        if not request.user.is_staff:
            return api_error(_("You may only read your own usage."), 403)
        # Another person's usage is a staff read: the rule of the other staff endpoints
        # (api_view(staff=True)). A session from an emailed link, or a password sign-in that
        # still owes its authenticator code, reads only its own usage.
        if api_token_of(request) is None and not staff_with_password(request):
            return api_error(str(STAFF_SIGN_IN), 403)
    person = User.objects.filter(email=email).first()
    if person is None:
        return api_error(_("No such person."), 404)
    keys = [
        {
            "id": k.pk, "key": k.masked, "label": k.label, "status": k.status,
            # No upstream: the CLIProxyAPI's key (the pool's); keys_with_usage joins the row.
            "upstream": k.upstream.name if k.upstream_id is not None else "CLIProxyAPI",
            "requests": k.total_requests, "tokens": k.total_tokens,
            "cost": _money(k.total_cost),
            "cost_complete": k.unpriced_requests == 0 and k.incomplete_requests == 0,
            "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
        }
        for k in keys_with_usage(owner=person)
    ]
    totals = usage_totals(UsageSnapshot.objects.filter(api_key__owner=person))
    return JsonResponse({
        "email": person.email, "name": person.name, "key_count": len(keys),
        "total_requests": totals["sum_requests"], "total_tokens": totals["sum_total_tokens"],
        "input_tokens": totals["sum_input_tokens"], "output_tokens": totals["sum_output_tokens"],
        "reasoning_tokens": totals["sum_reasoning_tokens"],
        "cache_read_tokens": totals["sum_cached_tokens"],
        "cache_write_tokens": totals["sum_cache_creation_tokens"],
        "incomplete_requests": totals["incomplete_requests"],
        "failures": totals["sum_failures"],
        **_cost_fields(totals["sum_cost"], totals["unpriced_requests"],
                       totals["incomplete_requests"]),
        "keys": keys,
    })


@api_view(methods=("GET",), staff=True)
def api_all_users_stats(request: HttpRequest) -> JsonResponse:
    users = [
        {
            "email": u.email, "name": u.name, "key_count": u.key_count,
            "total_requests": u.total_requests, "total_tokens": u.total_tokens,
            **_cost_fields(u.total_cost, u.unpriced_requests, u.incomplete_requests),
        }
        for u in people_with_usage()
    ]
    known = [Decimal(u["total_cost"]) for u in users if u["total_cost"] is not None]
    summary = {
        "total_users": len(users),
        "total_keys": sum(u["key_count"] for u in users),
        "total_requests": sum(u["total_requests"] for u in users),
        "total_tokens": sum(u["total_tokens"] for u in users),
        "total_cost": _money(sum(known, Decimal(0))) if known else None,
        "cost_complete": all(u["cost_complete"] for u in users),
    }
    return JsonResponse({"users": users, "summary": summary})


@api_view(methods=("POST",), staff=True)
def api_sync_usage(request: HttpRequest) -> JsonResponse:
    try:
        report = usage_sync()
    except SyncBusy as exc:
        return api_error(str(exc), 409)
    except SyncFailed as exc:
        return api_error(str(exc), 502)
    return JsonResponse(report.as_dict(), status=200)
