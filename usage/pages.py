"""Pages that show usage: /my-keys (list, add, revoke) and /my-keys/<id> for people, and the
staff leaderboard and proxy status under /staff/. They live here rather than in pool because
they read usage, and dependencies run usage -> pool -> accounts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import reswap, retarget, trigger_client_event

from accounts.models import User
from keyportal.admin_site import staff_password_required
from keyportal.api import api_error, api_token_of, staff_page_or_token
from keyportal.audit import client_ip
from pool.forms import KeyAddForm, KeyLabelForm
from pool.models import ApiKey
from pool.selectors import HealthCheck, PoolStatus, pool_status
from pool.services import (
    ImplausibleKeyList, KeyRefused, PoolEmpty, ReconcileReport, RelayUnavailable,
    UpstreamClosed, key_assign, key_rename, key_revoke, keys_reconcile,
    keys_reconcile_in_request, upstream_health_remember,
)
from pool.upstream import ProxyClient, UpstreamError
from pool.upstreams.registry import cliproxyapi_endpoint, cliproxyapi_in_use, open_to
from pool.views import key_addresses, key_limit_reached, key_shown, pool_empty
from usage.charts import chart_context
from usage.models import SyncRun, UsageSnapshot
from usage.limits import limit_reached
from usage.quota import quota_for, quota_limit_reached
from usage.selectors import (
    PERIODS, RANKINGS, Leaderboard, Totals, daily_all_usage, daily_by_model, key_usage,
    keys_with_usage, last_sync, leaderboard, person_audit, sync_backlog, totals_of_keys,
)

# --- /my-keys -----------------------------------------------------------------------------------


def _my_keys(user: User) -> list[ApiKey]:
    # One query: usage sums are annotations on the keys, totals are added up in Python.
    return list(keys_with_usage(owner=user).order_by("-issued_at", "-id"))


def _table_context(user: User, **extra: Any) -> dict[str, Any]:
    keys = _my_keys(user)
    # Revoked keys are folded under "Revoked (n)": split in Python, still one query.
    revoked = [k for k in keys if k.status == ApiKey.Status.REVOKED]
    return {
        "keys": keys, "totals": totals_of_keys(keys), "revoked_keys": revoked,
        "live_keys": [k for k in keys if k.status != ApiKey.Status.REVOKED], **extra,
    }


def _label_form(data: Any = None, *, key: ApiKey | None = None,
                user: User | None = None) -> KeyLabelForm:
    """The add form (for `user`: with the upstreams open to them to pick from when there are
    several), or a key's rename form (its own ids: several can share a page)."""
    if key is None:
        return KeyAddForm(data, choices=open_to(user) if user is not None else ())
    form = KeyLabelForm(data, initial={"label": key.label}, auto_id=f"rename-{key.pk}-%s")
    form.fields["label"].widget.attrs["autofocus"] = True  # htmx also honours it after a swap
    return form


def _focus_after_settle(response: HttpResponse, selector: str) -> HttpResponse:
    # static/js/portal.js moves focus there once htmx has settled the swap.
    return trigger_client_event(response, "kp:focus", {"selector": selector}, after="settle")


@login_required
@require_GET
def my_keys(request: HttpRequest) -> HttpResponse:
    # The add form (and its picker's query) only on the full page: htmx asks for the table.
    context = _table_context(request.user,
                             form=None if request.htmx else _label_form(user=request.user))
    if not request.htmx:  # banner, quota and chart sit outside the table htmx swaps
        context |= _insight(request, person=request.user, keys=context["keys"])
        context["limit"] = quota_limit_reached(context["quota"])
    template = "pool/my_keys.html#key-table" if request.htmx else "pool/my_keys.html"
    response = render(request, template, context)
    patch_vary_headers(response, ["HX-Request"])
    return response


@login_required
@require_POST
def key_add(request: HttpRequest) -> HttpResponse:
    form = _label_form(request.POST, user=request.user)
    if form.is_valid() and key_limit_reached(request.user):
        form.add_error(
            "label",
            _("You have added many keys in a short time. Please wait %(minutes)d minutes.")
            % {"minutes": settings.PORTAL_RATE_WINDOW_SECONDS // 60},
        )
    if not form.is_valid():
        return _add_form_refused(request, form, status=400)
    try:
        issued = key_assign(
            user=request.user, label=form.cleaned_data["label"], ip=client_ip(request),
            upstream=form.picked(),
        )
    except UpstreamClosed as exc:
        form.add_error(None, str(exc))
        return _add_form_refused(request, form, status=403)
    except KeyRefused as exc:
        # Over a limit: no key changes hands, and the form says which limit and until when.
        form.add_error("label", str(exc))
        return _add_form_refused(request, form, status=403)
    except RelayUnavailable as exc:
        # A relay that makes its own keys did not make it: nothing was filed; say which.
        form.add_error("label", str(exc))
        return _add_form_refused(request, form, status=503)
    except PoolEmpty:
        response = pool_empty(
            request, "pool/key_shown.html#pool-empty" if request.htmx else "pool/pool_empty.html"
        )
        return _focus_after_settle(response, "#issued h2") if request.htmx else response
    if not request.htmx:
        return key_shown(request, issued, "pool/key_shown.html")
    # The new key's panel; out of band, the table (so it lists the new key too) and an empty
    # add form (Enter in the old one would issue a second key with the same label).
    response = key_shown(request, issued, "pool/key_shown.html#issued")
    for part, context in (("key-table", _table_context(request.user, oob=True)),
                          ("add-form", {"form": _label_form(user=request.user),
                                        "oob": True})):
        response.content += render_to_string(
            f"pool/my_keys.html#{part}", context, request=request
        ).encode()
    return _focus_after_settle(response, "#issued h2")


def _add_form_refused(request: HttpRequest, form: KeyLabelForm, *, status: int) -> HttpResponse:
    """The add form again with its error: in place with htmx (200, which htmx swaps), or the
    whole page with `status`."""
    if request.htmx:
        form.fields["label"].widget.attrs["autofocus"] = True  # htmx focuses it after the swap
        response = render(request, "pool/my_keys.html#add-form", {"form": form})
        return reswap(retarget(response, "#add-form"), "outerHTML")
    context = _table_context(request.user, form=form, limit=limit_reached(person=request.user))
    return render(request, "pool/my_keys.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def key_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    """GET asks for confirmation (a row in place with htmx, a page without); POST revokes."""
    key = get_object_or_404(ApiKey, pk=pk, owner=request.user)
    if request.method == "GET":
        template = "pool/key_revoke.html#confirm-row" if request.htmx else "pool/key_revoke.html"
        return render(request, template, {"key": key})
    if key_revoke(key=key, by=request.user, ip=client_ip(request)):
        keys_reconcile_in_request()  # committed already: a slow proxy only postpones removal
        message = _("Key %(key)s is revoked.") % {"key": key.masked}
    else:
        message = _("Key %(key)s is already revoked.") % {"key": key.masked}
    if request.htmx:
        # The whole list again: the key moves under "Revoked (n)", which takes the focus.
        return render(request, "pool/key_revoke.html#revoked",
                      _table_context(request.user, focus_revoked=True, message=message))
    messages.success(request, message)
    return HttpResponseRedirect(reverse("my-keys"), status=303)


@login_required
@require_http_methods(["GET", "POST"])
def key_rename_view(request: HttpRequest, pk: int) -> HttpResponse:
    """GET shows the form (in the key's row with htmx, a page without); POST renames."""
    key = get_object_or_404(ApiKey, pk=pk, owner=request.user)
    form = _label_form(request.POST if request.method == "POST" else None, key=key)
    if request.method == "GET" or not form.is_valid():
        if request.htmx:  # 200: htmx swaps only 2xx answers, and the errors must show
            return render(request, "pool/key_rename.html#edit-row", {"key": key, "form": form})
        status = 200 if request.method == "GET" else 400
        return render(request, "pool/key_rename.html", {"key": key, "form": form}, status=status)
    label = form.cleaned_data["label"]
    key_rename(key=key, label=label, by=request.user, ip=client_ip(request))
    if label:
        message = _("Key %(key)s is now labelled “%(label)s”.") % {
            "key": key.masked, "label": label,
        }
    else:
        message = _("Key %(key)s has no label now.") % {"key": key.masked}
    if request.htmx:
        # The row again, with its usage columns: read back through the annotated query.
        row = keys_with_usage(owner=request.user).get(pk=key.pk)
        response = render(request, "pool/key_rename.html#renamed", {"key": row, "message": message})
        return _focus_after_settle(response, f"#rename-{key.pk}")
    messages.success(request, message)
    return HttpResponseRedirect(reverse("my-keys"), status=303)


@login_required
@require_GET
def key_detail(request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=pk, owner=request.user)  # others get 404, not 403
    return render(request, "usage/key_detail.html", {
        "key": key, "urls": key_addresses(key), "usage": key_usage(key=key),
        "time_zone": settings.TIME_ZONE,
        "quota": quota_for(person=request.user, keys=[key]),
        "usage_chart": chart_context(
            partial(daily_by_model, rows=UsageSnapshot.objects.filter(api_key=key)),
            query=request.GET, chart_id="key-chart", title=_("This key's daily usage by model"),
        ),
    })


def _insight(request: HttpRequest, *, person: User, keys: list[ApiKey],
             title: str | None = None) -> dict[str, Any]:
    """Quota bars and the daily chart of a person: two queries, whatever their history."""
    return {
        "quota": quota_for(person=person, keys=keys),
        "usage_chart": chart_context(
            partial(daily_by_model, rows=UsageSnapshot.objects.filter(api_key__owner=person)),
            query=request.GET, chart_id="usage-chart",
            title=title or _("Your daily usage by model"),
        ),
    }


# --- staff --------------------------------------------------------------------------------------


def _admin_page(request: HttpRequest, template: str, context: dict[str, Any],
                status: int = 200) -> HttpResponse:
    # The admin's header, breadcrumbs and sidebar need the admin site's context.
    return render(request, template, {**admin.site.each_context(request), **context},
                  status=status)


def _totals_json(totals: Totals) -> dict[str, Any]:
    # The known cost as a string (exact decimal); cost_complete false: part has no price.
    return {"requests": totals.requests, "tokens": totals.tokens, "cost": str(totals.cost),
            "cost_complete": totals.cost_status == "known"}


def _leaderboard_json(board: Leaderboard) -> JsonResponse:
    return JsonResponse({
        "period": board.period, "by": board.by,
        "since": board.since.isoformat() if board.since else None,
        "totals": _totals_json(board.totals), "active_people": board.active_people,
        "people_with_keys": board.people_with_keys, "keys_held": board.keys_held,
        "rows": [
            {"rank": n, "email": row.person.email, "name": row.person.name,
             **_totals_json(row.totals), "share": row.share}
            for n, row in enumerate(board.rows, 1)
        ],
    })


@staff_page_or_token
@require_GET
def staff_leaderboard(request: HttpRequest) -> HttpResponse:
    """The page; for a staff API token caller, the same board as JSON."""
    period = request.GET.get("period", "7d")
    by = request.GET.get("by", "tokens")
    if period not in PERIODS or by not in RANKINGS:
        error = _("Unknown period or ranking: period is one of %(periods)s, by is one of "
                  "%(rankings)s.") % {
            "periods": ", ".join(PERIODS), "rankings": ", ".join(RANKINGS)
        }
        if api_token_of(request) is not None:
            return api_error(error, 400)
        return _admin_page(request, "usage/leaderboard.html", {"error": error,
                           "title": _("Leaderboard")}, status=400)
    board = leaderboard(period=period, by=by)
    if api_token_of(request) is not None:
        return _leaderboard_json(board)
    keys_url = reverse("admin:pool_apikey_changelist")
    return _admin_page(request, "usage/leaderboard.html", {
        "title": _("Leaderboard"), "board": board, "periods": PERIODS, "rankings": RANKINGS,
        "keys_url": keys_url,
        "usage_chart": chart_context(daily_all_usage, query=request.GET, chart_id="trend",
                                     title=_("Daily trend of all usage")),
    })


@staff_password_required
@require_GET
def staff_person(request: HttpRequest, pk: int) -> HttpResponse:
    """One person's usage for staff: charts, keys (masked), limits and quota, audit rows."""
    person = get_object_or_404(User, pk=pk)
    keys = _my_keys(person)
    return _admin_page(request, "usage/staff_person.html", {
        "title": _("Usage of %(person)s") % {"person": person.email}, "person": person,
        "keys": keys, "totals": totals_of_keys(keys),
        "audit": person_audit(person=person, keys=keys), "quota_staff": True,
        **_insight(request, person=person, keys=keys, title=_("Daily usage by model")),
    })


@dataclass
class ProxyReport:
    configured: bool
    error: str = ""  # the UpstreamError's sentence: never carries the management key
    mode: str = ""
    statistics: bool | None = None
    drift: ReconcileReport | None = None
    key_list_refused: str = ""  # reconcile would refuse the proxy's list: why, instead of drift


def _proxy_report() -> ProxyReport:
    if not cliproxyapi_endpoint().management_url:
        return ProxyReport(configured=False)
    report = ProxyReport(configured=True)
    try:
        # A page: all its calls share the page budget, each bounded to its last byte.
        with ProxyClient.from_settings(budget=settings.PORTAL_REQUEST_PROXY_BUDGET) as client:
            report.statistics = client.usage_statistics_enabled()
            report.mode = client.usage_mode()
            try:
                report.drift = keys_reconcile(client=client, dry_run=True)
            except ImplausibleKeyList as exc:
                report.key_list_refused = str(exc)
    except UpstreamError as exc:
        report.error = str(exc)
    return report


@staff_password_required
@require_GET
def staff_proxy(request: HttpRequest) -> HttpResponse:
    # The CLIProxyAPI's part only on a portal that has one; each other upstream's health is
    # asked at the same time, within the same page budget.
    check = HealthCheck(budget=settings.PORTAL_REQUEST_PROXY_BUDGET)
    has_proxy = cliproxyapi_in_use()
    report = _proxy_report() if has_proxy else ProxyReport(configured=False)
    health = check.results()
    # What the staff dashboard shows as each relay's last known health (it asks at most
    # once a minute itself).
    upstream_health_remember(found=[(h.upstream, h.health) for h in health],
                             now=timezone.now())
    pool: PoolStatus = pool_status()
    sync: SyncRun | None = last_sync()
    backlog = sync_backlog(now=timezone.now())
    drift = report.drift
    return _admin_page(request, "usage/proxy_status.html", {
        "title": _("Proxy status"), "report": report, "pool": pool, "sync": sync,
        "has_proxy": has_proxy, "upstreams_health": health,
        "pool_min": settings.PORTAL_POOL_MIN, "backlog": backlog,
        # In reconcile's terms: pool keys it would push, issued keys the proxy lost, keys it
        # would bring back from escrow; and keys it would remove, listed twice included.
        "missing": drift.pushed + drift.missing + drift.restored if drift else 0,
        "extra": drift.removed + drift.duplicates if drift else 0,
    })
