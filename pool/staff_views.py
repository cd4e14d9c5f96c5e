"""Staff pages that run the proxy (inside the admin frame, outside /admin/): its settings
(/staff/proxy/settings), upstream accounts (/staff/proxy/upstreams) and OAuth auth files
(/staff/proxy/auth-files). Everything read is read live from the proxy through
`ProxyAdminClient` (pool/proxy_admin.py); nothing about the proxy is stored here.

Every change takes two POSTs: the first validates and shows what will change (before →
after), the second — carrying the change sealed (pool.escrow: encrypted with the portal's
secret, bound to the staff member, valid 15 minutes), so that no typed key or proxy password
is ever echoed into a page — re-reads the proxy, writes, and records the change in the audit
log with masked values only. The audit row is written once the proxy has confirmed.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from functools import partial, wraps
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from keyportal.admin_site import staff_password_required
from keyportal.audit import Action, audit_record, client_ip
from pool.escrow import EscrowUnreadable, escrow_open, escrow_seal
from pool.forms_proxy import AuthFileUploadForm, SettingChangeForm, UpstreamForm
from pool.proxy_admin import (
    BOOL,
    PROVIDERS,
    PROVIDERS_BY_SLUG,
    RETENTION,
    SETTINGS,
    SETTINGS_BY_NAME,
    STATISTICS,
    TEXT,
    EntryChanged,
    ProviderKind,
    ProxyAdminClient,
    SettingValue,
    UpstreamEntry,
    mask_secret,
    mask_url,
    models_json,
    models_text,
    pick_entry,
    read_all,
)
from pool.selectors import upstream_probes_forget
from pool.upstream import UpstreamError, UpstreamNotFound
from pool.upstreams.registry import cliproxyapi_in_use

PENDING_TTL = 15 * 60


def cliproxyapi_only(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """These pages run a CLIProxyAPI: on a portal without one (only claude-relay-service or
    Claude Code Hub) they say so instead of failing against an address that is not set. A
    portal with no upstream at all keeps the pages' own "no proxy is configured"."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not cliproxyapi_in_use():
            return _page(request, "admin/proxy/none.html", {"title": _("No CLIProxyAPI")})
        return view(request, *args, **kwargs)

    return wrapper


# --- shared -----------------------------------------------------------------------------------


def _client() -> ProxyAdminClient:
    return ProxyAdminClient.from_settings(budget=settings.PORTAL_REQUEST_PROXY_BUDGET)


def _page(request: HttpRequest, template: str, context: dict[str, Any],
          status: int = 200) -> HttpResponse:
    # The admin's header, breadcrumbs and sidebar need the admin site's context.
    return render(request, template, {**admin.site.each_context(request), **context},
                  status=status)


def _seal(request: HttpRequest, action: str, data: dict[str, Any]) -> str:
    return escrow_seal(json.dumps({"u": request.user.pk, "a": action, "t": time.time(),
                                   "d": data}))


def _unseal(request: HttpRequest, action: str) -> dict[str, Any] | None:
    """The change a confirmation page carried, if it is this staff member's, for this action,
    and recent; None otherwise."""
    try:
        pending = json.loads(escrow_open(request.POST.get("pending", "")))
    except (EscrowUnreadable, ValueError):
        return None
    if (not isinstance(pending, dict) or pending.get("u") != request.user.pk
            or pending.get("a") != action or time.time() - pending.get("t", 0) > PENDING_TTL):
        return None
    return pending.get("d")


def _submitted(request: HttpRequest, action: str) -> tuple[bool, Any]:
    """(confirmed, data): the change a confirmation page sealed (data None when it is not
    valid), or else the form as posted (None on a GET)."""
    if "pending" in request.POST:
        return True, _unseal(request, action)
    return False, request.POST if request.method == "POST" else None


def _confirm(request: HttpRequest, *, title: str, action: str, data: dict[str, Any],
             changes: list[tuple[str, str, str]], back: str, warning: str = "",
             button: str = "") -> HttpResponse:
    return _page(request, "admin/proxy/confirm.html", {
        "title": title, "changes": changes, "warning": warning, "back": back,
        "pending": _seal(request, action, data), "button": button or _("Yes, change it"),
    })


def _expired(request: HttpRequest, back: str) -> HttpResponse:
    messages.error(request, _("That confirmation is no longer valid (it is older than 15 "
                              "minutes, or not yours). Nothing was changed; please start "
                              "again."))
    return HttpResponseRedirect(back)


def _failed(request: HttpRequest, exc: UpstreamError, back: str) -> HttpResponse:
    messages.error(request, _("Nothing was changed. %(why)s") % {"why": exc})
    return HttpResponseRedirect(back)


def _audit(request: HttpRequest, action: str, label: str, before: Any, after: Any,
           detail: str) -> None:
    audit_record(action=action, actor=request.user, target_label=label[:254], before=before,
                 after=after, ip=client_ip(request), detail=detail)


# --- settings ---------------------------------------------------------------------------------


def _shown(name: str, value: Any) -> str:
    """A setting's value for a page or the audit log."""
    if name == RETENTION:
        return _("%(s)d seconds") % {"s": value}
    kind = SETTINGS_BY_NAME[name].kind
    if kind == BOOL:
        return _("on") if value else _("off")
    if kind == TEXT:
        return mask_url(value) or _("(none: direct)")
    return str(value)


def _read_setting(client: ProxyAdminClient, name: str) -> Any:
    return client.queue_retention() if name == RETENTION else client.setting(SETTINGS_BY_NAME[name])


def _settings_rows(client: ProxyAdminClient) -> tuple[list[SettingValue], Any, str]:
    calls: list[tuple[str, Callable[[], Any]]] = [
        (s.name, partial(client.setting, s)) for s in SETTINGS]
    calls.append((RETENTION, client.queue_retention))
    results, stopped = read_all(calls)
    rows = []
    for setting in SETTINGS:
        if setting.name not in results:
            continue
        got = results[setting.name]
        if isinstance(got, UpstreamNotFound):
            rows.append(SettingValue(setting, supported=False))
        elif isinstance(got, UpstreamError):
            rows.append(SettingValue(setting, error=str(got)))
        else:
            rows.append(SettingValue(setting, value=got))
    return rows, results.get(RETENTION), stopped


@staff_password_required
@cliproxyapi_only
@require_http_methods(["GET", "POST"])
def proxy_settings(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _setting_change(request)
    return _settings_page(request)


def _settings_page(request: HttpRequest, *, form: SettingChangeForm | None = None,
                   status: int = 200) -> HttpResponse:
    rows, retention, error = [], None, ""
    try:
        with _client() as client:
            rows, retention, error = _settings_rows(client)
    except UpstreamError as exc:
        error = str(exc)
    if rows and not any(row.supported for row in rows):
        error = _("The proxy answered 404 to every setting: its management API is probably "
                  "disabled (remote-management.secret-key is empty in its config.yaml).")
        rows = []
    return _page(request, "admin/proxy/settings.html", {
        "title": _("Proxy settings"), "rows": rows, "error": error, "form": form,
        "retention": retention, "retention_name": RETENTION,
        "retention_missing": retention is None or isinstance(retention, UpstreamNotFound),
        "retention_error": str(retention) if isinstance(retention, UpstreamError)
        and not isinstance(retention, UpstreamNotFound) else "",
    }, status=status)


def _setting_change(request: HttpRequest) -> HttpResponse:
    back = reverse("staff-proxy-settings")
    confirmed, data = _submitted(request, "setting")
    if data is None:
        return _expired(request, back)
    form = SettingChangeForm(data)
    if not form.is_valid():
        return _settings_page(request, form=form, status=400)
    name, value = form.cleaned_data["setting"], form.cleaned_data["parsed"]
    label = str(SETTINGS_BY_NAME[name].label) if name in SETTINGS_BY_NAME else _(
        "Usage queue retention")
    try:
        with _client() as client:
            before = _read_setting(client, name)
            if before is None:  # the retention, on a proxy without a usage queue
                messages.error(request, _("This proxy version has no usage queue, so no "
                                          "retention to set; nothing was changed."))
                return HttpResponseRedirect(back)
            if before == value:
                messages.info(request, _("%(setting)s is already %(value)s: nothing to change.")
                              % {"setting": label, "value": _shown(name, value)})
                return HttpResponseRedirect(back)
            if not confirmed:
                warning = ""
                if name == STATISTICS and not value:
                    warning = _("With statistics off the proxy records no usage: the portal's "
                                "usage pages, limits and leaderboard stop moving until it is "
                                "turned on again.")
                return _confirm(request, title=_("Change a proxy setting"), action="setting",
                                data={"setting": name, "value": form.cleaned_data["value"]},
                                changes=[(label, _shown(name, before), _shown(name, value))],
                                back=back, warning=warning)
            if name == RETENTION:
                client.set_queue_retention(value)
            else:
                client.set_setting(SETTINGS_BY_NAME[name], value)
    except UpstreamNotFound:
        messages.error(request, _("This proxy version does not have the %(setting)s setting "
                                  "(it answered 404); nothing was changed.") % {"setting": label})
        return HttpResponseRedirect(back)
    except UpstreamError as exc:
        return _failed(request, exc, back)
    _audit(request, Action.PROXY_SETTING_CHANGED, name, {name: _shown(name, before)},
           {name: _shown(name, value)}, detail=f"proxy setting {name}")
    upstream_probes_forget()  # the admin index's checklist shows the statistics switch
    messages.success(request, _("%(setting)s is now %(value)s.")
                     % {"setting": label, "value": _shown(name, value)})
    return HttpResponseRedirect(back)


# --- upstream accounts ------------------------------------------------------------------------


def _kind(slug: str) -> ProviderKind:
    from django.http import Http404

    try:
        return PROVIDERS_BY_SLUG[slug]
    except KeyError:
        raise Http404 from None


@staff_password_required
@cliproxyapi_only
@require_GET
def upstream_list(request: HttpRequest) -> HttpResponse:
    sections, error = [], ""
    try:
        with _client() as client:
            results, error = read_all(
                [(kind.slug, partial(client.upstream_entries, kind)) for kind in PROVIDERS])
    except UpstreamError as exc:
        results, error = {}, str(exc)
    for kind in PROVIDERS:
        if kind.slug in results:
            got = results[kind.slug]
            sections.append({
                "kind": kind, "entries": [] if isinstance(got, Exception) else got,
                "missing": isinstance(got, UpstreamNotFound),
                "error": str(got) if isinstance(got, UpstreamError)
                and not isinstance(got, UpstreamNotFound) else "",
            })
    return _page(request, "admin/proxy/upstreams.html", {
        "title": _("Upstream accounts"), "sections": sections, "error": error})


def _entry_value(kind: ProviderKind, form_data: dict[str, Any],
                 current: UpstreamEntry | None) -> dict[str, Any]:
    """The fields to send: a whole new entry (current None), or what changed in it. A URL
    field that still reads as its masked form was left alone."""
    value: dict[str, Any] = {}
    for field, key in (("base_url", "base-url"), ("proxy_url", "proxy-url")):
        new = form_data.get(field, "")
        old = getattr(current, field) if current else ""
        if current and new == mask_url(old):
            new = old
        if current is None or new != old:
            value[key] = new
    if kind.models and (current is None or form_data["models"] != current.models):
        value["models"] = models_json(form_data["models"])
    if kind.named and "proxy-url" in value:
        # Per key at OpenAI-compatible providers: every key of the provider gets it.
        proxy = value.pop("proxy-url")
        entries = (current.raw.get("api-key-entries") or []) if current else [
            {"api-key": form_data["api_key"]}]
        kept = [{k: v for k, v in e.items() if k != "proxy-url"}
                for e in entries if isinstance(e, dict)]
        value["api-key-entries"] = [{**e, "proxy-url": proxy} if proxy else e for e in kept]
    if current is None:
        if kind.named:
            value["name"] = form_data["name"]
        else:
            value["api-key"] = form_data["api_key"]
        if not value.get("base-url"):
            value.pop("base-url", None)
    return value


def _value_summary(kind: ProviderKind, value: dict[str, Any]) -> dict[str, Any]:
    """A change for pages and the audit log: keys and URLs masked."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "api-key":
            out["keys"] = [mask_secret(item)]
        elif key == "api-key-entries":
            out["keys"] = [mask_secret(e.get("api-key", "")) for e in item]
            out["proxy_url"] = mask_url(item[0].get("proxy-url", "")) if item else ""
        elif key in ("base-url", "proxy-url"):
            out[key.replace("-", "_")] = mask_url(item)
        elif key == "models":
            out["models"] = [f"{m['name']}={m['alias']}" if m["alias"] else m["name"] for m in item]
        else:
            out[key.replace("-", "_")] = item
    return out


FIELD_LABELS = {
    "keys": gettext_lazy("Key"), "name": gettext_lazy("Name"),
    "base_url": gettext_lazy("Base URL"), "proxy_url": gettext_lazy("Proxy URL"),
    "models": gettext_lazy("Models"), "disabled": gettext_lazy("Disabled"),
    "provider": gettext_lazy("Provider"), "email": gettext_lazy("Account"),
}


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, before, after) for each field that differs, for a confirmation page."""
    def text(v: Any) -> str:
        return ", ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))

    return [(str(FIELD_LABELS.get(key, key)), text(before.get(key)), text(after[key]))
            for key in after if text(before.get(key)) != text(after[key])]


def _upstream_form_page(request: HttpRequest, kind: ProviderKind, form: UpstreamForm,
                        entry: UpstreamEntry | None, status: int = 200) -> HttpResponse:
    return _page(request, "admin/proxy/upstream_form.html", {
        "title": _("Edit %(entry)s in %(what)s") % {"entry": entry.label, "what": kind.label}
        if entry else _("Add to %(what)s") % {"what": kind.label},
        "kind": kind, "form": form, "entry": entry}, status=status)


@staff_password_required
@cliproxyapi_only
@require_http_methods(["GET", "POST"])
def upstream_add(request: HttpRequest, kind: str) -> HttpResponse:
    provider, back = _kind(kind), reverse("staff-proxy-upstreams")
    confirmed, data = _submitted(request, f"add:{kind}")
    if confirmed and data is None:
        return _expired(request, back)
    form = UpstreamForm(data, kind=provider, adding=True)
    if not form.is_valid():
        return _upstream_form_page(request, provider, form, None, status=400 if data else 200)
    value = _entry_value(provider, form.cleaned_data, None)
    summary = _value_summary(provider, value)
    if not confirmed:
        return _confirm(request, title=_("Add to %(what)s") % {"what": provider.label},
                        action=f"add:{kind}", data=dict(request.POST.items()),
                        changes=_changes({}, summary), back=back)
    try:
        with _client() as client:
            if provider.named and any(e.name == value["name"]
                                      for e in client.upstream_entries(provider)):
                raise EntryChanged(_("A provider named %(name)s exists already.")
                                   % {"name": value["name"]})
            client.upstream_add(provider, value)
    except UpstreamError as exc:
        return _failed(request, exc, back)
    _audit(request, Action.PROXY_UPSTREAM_CHANGED, f"{kind}: {', '.join(summary.get('keys', []))}",
           None, summary, detail=f"added to {provider.path}")
    messages.success(request, _("Added to %(what)s.") % {"what": provider.label})
    return HttpResponseRedirect(back)


@staff_password_required
@cliproxyapi_only
@require_http_methods(["GET", "POST"])
def upstream_edit(request: HttpRequest, kind: str, index: int) -> HttpResponse:
    provider, back = _kind(kind), reverse("staff-proxy-upstreams")
    confirmed, data = _submitted(request, f"edit:{kind}:{index}")
    if confirmed and data is None:
        return _expired(request, back)
    ref = (data or request.GET).get("ref", "")
    try:
        with _client() as client:
            entry = client.upstream_entry(provider, index=index, ref=ref)
            if data is None:
                form = UpstreamForm(kind=provider, adding=False, initial={
                    "base_url": entry.base_url_masked, "proxy_url": entry.proxy_url_masked,
                    "models": models_text(entry.models)})
                return _upstream_form_page(request, provider, form, entry)
            form = UpstreamForm(data, kind=provider, adding=False)
            if not form.is_valid():
                return _upstream_form_page(request, provider, form, entry, status=400)
            value = _entry_value(provider, form.cleaned_data, entry)
            changes = _changes(entry.summary(), _value_summary(provider, value))
            if not changes:
                messages.info(request, _("Nothing to change."))
                return HttpResponseRedirect(back)
            if not confirmed:
                return _confirm(request, title=_("Edit %(what)s") % {"what": entry.label},
                                action=f"edit:{kind}:{index}", data=dict(request.POST.items()),
                                changes=changes, back=back)
            client.upstream_patch(provider, index=index, value=value)
    except UpstreamError as exc:
        return _failed(request, exc, back)
    _audit(request, Action.PROXY_UPSTREAM_CHANGED, f"{kind}: {entry.label}", entry.summary(),
           _value_summary(provider, value), detail=f"PATCH {provider.path} index {index}")
    messages.success(request, _("%(what)s changed.") % {"what": entry.label})
    return HttpResponseRedirect(back)


def _entry_action(request: HttpRequest, kind: str, index: int, action: str,
                  act: Callable[[ProxyAdminClient, UpstreamEntry, list[UpstreamEntry]], Any],
                  describe: Callable[[UpstreamEntry], tuple[str, str, Any, str]]) -> HttpResponse:
    """Disable/enable and delete: confirm, then re-read, check, act and audit."""
    provider, back = _kind(kind), reverse("staff-proxy-upstreams")
    confirmed, data = _submitted(request, f"{action}:{kind}:{index}")
    if data is None:
        return _expired(request, back)
    try:
        with _client() as client:
            entries = client.upstream_entries(provider)
            entry = pick_entry(entries, index=index, ref=str(data.get("ref", "")))
            title, after_text, after, done = describe(entry)
            if not confirmed:
                return _confirm(request, title=title, action=f"{action}:{kind}:{index}",
                                data={"ref": entry.ref},
                                changes=[(entry.label, _("disabled") if entry.disabled else
                                          _("enabled"), after_text)], back=back, button=title)
            act(client, entry, entries)
    except UpstreamError as exc:
        return _failed(request, exc, back)
    _audit(request, Action.PROXY_UPSTREAM_CHANGED, f"{kind}: {entry.label}", entry.summary(),
           after, detail=f"{action} in {provider.path} index {index}")
    messages.success(request, done)
    return HttpResponseRedirect(back)


def _toggle(client: ProxyAdminClient, entry: UpstreamEntry, entries: list[UpstreamEntry]) -> None:
    client.upstream_set_disabled(entry, not entry.disabled)


@staff_password_required
@cliproxyapi_only
@require_POST
def upstream_toggle(request: HttpRequest, kind: str, index: int) -> HttpResponse:
    def describe(entry: UpstreamEntry) -> tuple[str, str, Any, str]:
        after = {**entry.summary(), "disabled": not entry.disabled}
        if entry.disabled:
            return (_("Enable %(what)s") % {"what": entry.label}, _("enabled"), after,
                    _("%(what)s is enabled.") % {"what": entry.label})
        return (_("Disable %(what)s") % {"what": entry.label},
                _("disabled: the proxy routes no model to it"), after,
                _("%(what)s is disabled.") % {"what": entry.label})

    return _entry_action(request, kind, index, "toggle", _toggle, describe)


@staff_password_required
@cliproxyapi_only
@require_POST
def upstream_delete(request: HttpRequest, kind: str, index: int) -> HttpResponse:
    def describe(entry: UpstreamEntry) -> tuple[str, str, Any, str]:
        return (_("Delete %(what)s") % {"what": entry.label}, _("deleted"), None,
                _("%(what)s is deleted.") % {"what": entry.label})

    return _entry_action(
        request, kind, index, "delete",
        lambda client, entry, entries: client.upstream_delete(entry, siblings=entries), describe)


# --- auth files -------------------------------------------------------------------------------


def _auth_files_page(request: HttpRequest, form: AuthFileUploadForm,
                     status: int = 200) -> HttpResponse:
    files, error, missing = [], "", False
    try:
        with _client() as client:
            files = client.auth_files()
    except UpstreamNotFound:
        missing = True
    except UpstreamError as exc:
        error = str(exc)
    return _page(request, "admin/proxy/auth_files.html", {
        "title": _("Auth files"), "files": files, "error": error, "missing": missing,
        "form": form, "reports_status": any(f.disabled is not None for f in files),
    }, status=status)


@staff_password_required
@cliproxyapi_only
@require_http_methods(["GET", "POST"])
def auth_files(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return _auth_files_page(request, AuthFileUploadForm())
    back = reverse("staff-proxy-auth-files")
    confirmed, pending = _submitted(request, "upload")
    if confirmed:
        if pending is None:
            return _expired(request, back)
        name, content = pending["name"], base64.b64decode(pending["content"])
        parsed = json.loads(content)
    else:
        form = AuthFileUploadForm(request.POST, request.FILES)
        if not form.is_valid():
            return _auth_files_page(request, form, status=400)
        name, content, parsed = (form.cleaned_data["file"].name, form.cleaned_data["content"],
                                 form.cleaned_data["parsed"])
    described = {"name": name, "provider": str(parsed.get("type") or ""),
                 "email": str(parsed.get("email") or "")}
    if not confirmed:
        return _confirm(request, title=_("Upload an auth file"), action="upload",
                        data={"name": name, "content": base64.b64encode(content).decode()},
                        changes=_changes({}, {k: v for k, v in described.items() if v}),
                        back=back,
                        button=_("Yes, upload it"))
    try:
        with _client() as client:
            client.auth_file_upload(name=name, content=content)
    except UpstreamError as exc:
        return _failed(request, exc, back)
    _audit(request, Action.PROXY_AUTH_FILE_CHANGED, name, None, described,
           detail="uploaded to /auth-files")
    messages.success(request, _("Uploaded %(name)s.") % {"name": name})
    return HttpResponseRedirect(back)


@staff_password_required
@cliproxyapi_only
@require_POST
def auth_file_delete(request: HttpRequest) -> HttpResponse:
    back = reverse("staff-proxy-auth-files")
    confirmed, data = _submitted(request, "delete-file")
    if data is None:
        return _expired(request, back)
    name = str(data.get("name", "")).strip()
    try:
        with _client() as client:
            found = next((f for f in client.auth_files() if f.name == name), None)
            if found is None:
                raise EntryChanged(_("The proxy has no auth file named %(name)s.") % {"name": name})
            if not confirmed:
                return _confirm(request, title=_("Delete an auth file"), action="delete-file",
                                data={"name": name}, changes=[(name, found.email, _("deleted"))],
                                back=back, button=_("Yes, delete it"))
            client.auth_file_delete(name=name)
    except UpstreamError as exc:
        return _failed(request, exc, back)
    _audit(request, Action.PROXY_AUTH_FILE_CHANGED, name,
           {"name": name, "provider": found.provider, "email": found.email}, None,
           detail="deleted from /auth-files")
    messages.success(request, _("Deleted %(name)s.") % {"name": name})
    return HttpResponseRedirect(back)
