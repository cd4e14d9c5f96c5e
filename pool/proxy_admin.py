"""Running the proxy from the portal: its settings, upstream accounts and auth files, through
CLIProxyAPI's Management API. A sibling of pool/upstream.py: `ProxyAdminClient` *is* a
`ProxyClient`, so every call here goes through the same transport — the same timeout and page
budget, the same typed errors, and the same refusal latch (one 401, then nothing but the
latch's spaced probes: the proxy bans an address at its 5th failed login).

Built to the proxy's code (internal/api/handlers/management, 6.9.x and 7.x), not its docs:
- Scalar settings are `GET /<name>` → `{"<name>": value}` and `PUT /<name>` with a body of
  `{"value": …}` (a bare value is refused, 400 "invalid body").
- The usage queue's retention (`redis-usage-queue-retention-seconds`, 6.10+) has no route of
  its own: it is read from `GET /config` and written by changing that one line of
  `config.yaml` (`GET`/`PUT /config.yaml`; the proxy validates the file: 400 bad YAML,
  422 bad config). 6.9.x and older have no queue, and no such key.
- Provider keys (`/claude-api-key`, `/gemini-api-key`, `/codex-api-key`,
  `/openai-compatibility`) have no "add": the list is read, extended and PUT whole. Edits are
  `PATCH {"index": i, "value": {changed fields}}` (404 "item not found" when nothing is at i).
  A codex or OpenAI-compatible entry PATCHed with an empty base-url is *deleted* by the
  proxy, so this client never sends one. `DELETE ?index=i` for the key lists (`?api-key=` is
  ambiguous when a key is listed twice: 400), `?name=` for OpenAI-compatible providers (it
  removes every provider of that name, so only used when the name is unique).
- Disabling: OpenAI-compatible providers have a `disabled` flag; the key lists have none, and
  the proxy's own way (7.x's management UI) is the model pattern `*` in `excluded-models`,
  which every version since 6.x matches against every model.
- Auth files: `GET /auth-files` (7.x adds provider, status, disabled; older versions list the
  directory: name, size, modtime, type, email), `POST` multipart `file` (must end in .json),
  `DELETE ?name=`.

Secrets leave this module only masked (`mask_secret`, `mask_url`); entries carry a keyed
digest of their key (`ref`) so pages can name one without holding it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.utils.crypto import salted_hmac
from django.utils.functional import Promise
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from pool.upstream import (
    ProxyClient,
    UpstreamError,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamUnexpected,
    UpstreamUnreachable,
)

# --- masking ----------------------------------------------------------------------------------


def mask_secret(value: str) -> str:
    """The last 4 characters, and only when the secret is long enough that they give nothing
    away (a short secret is shown as … alone)."""
    value = value or ""
    if not value:
        return ""
    return f"…{value[-4:]}" if len(value) >= 12 else "…"


def mask_url(value: str) -> str:
    """A URL without what may be a secret in it: user and password (`socks5://u:p@host`) and
    query values (`?key=…`) become ***."""
    value = (value or "").strip()
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + host + (f":{port}" if port else "")
    query = re.sub(r"=([^&]*)", "=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def entry_ref(secret: str) -> str:
    """Names an entry by its key without carrying the key: a keyed digest (SECRET_KEY), so a
    page or form holds nothing that can be turned back into the key."""
    return salted_hmac("pool.proxy_admin.entry", secret).hexdigest()[:24]


# --- errors -----------------------------------------------------------------------------------


class EntryChanged(UpstreamError):
    """The entry a page showed is no longer where it was at the proxy (someone else changed
    the list meanwhile): nothing was written."""


class DisableUnsupported(UpstreamError):
    """The proxy took the change but its version has no such flag (it ignores unknown fields):
    the entry is still as it was."""


class ConfigEditRefused(UpstreamError):
    """config.yaml could not be changed safely (an unusual layout of the line to edit)."""


# --- settings ---------------------------------------------------------------------------------

BOOL, INT, TEXT = "bool", "int", "text"


@dataclass(frozen=True)
class ProxySetting:
    name: str  # the route and the answer's key
    kind: str
    label: Promise
    help: Promise

    @property
    def path(self) -> str:
        return f"/{self.name}"

    @property
    def answer_key(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def slug(self) -> str:
        return self.name.replace("/", "-")


STATISTICS = "usage-statistics-enabled"
RETENTION = "redis-usage-queue-retention-seconds"
RETENTION_MAX = 3600  # the proxy clamps anything larger

SETTINGS: tuple[ProxySetting, ...] = (
    ProxySetting(STATISTICS, BOOL, gettext_lazy("Usage statistics"),
                 gettext_lazy("Whether the proxy records usage at all. Off: the portal sees no "
                              "usage, and limits and the leaderboard stop moving.")),
    ProxySetting("debug", BOOL, gettext_lazy("Debug logging"),
                 gettext_lazy("Verbose logs at the proxy.")),
    ProxySetting("request-log", BOOL, gettext_lazy("Request log"),
                 gettext_lazy("The proxy writes every request and answer to its log files.")),
    ProxySetting("request-retry", INT, gettext_lazy("Request retries"),
                 gettext_lazy("How many times the proxy retries a failed upstream request.")),
    ProxySetting("proxy-url", TEXT, gettext_lazy("Outgoing proxy URL"),
                 gettext_lazy("An HTTP or SOCKS5 proxy the proxy uses to reach the providers; "
                              "empty: direct.")),
    ProxySetting("quota-exceeded/switch-project", BOOL,
                 gettext_lazy("On quota exceeded: switch project"),
                 gettext_lazy("Move to another Google Cloud project when one runs out of quota.")),
    ProxySetting("quota-exceeded/switch-preview-model", BOOL,
                 gettext_lazy("On quota exceeded: switch to a preview model"),
                 gettext_lazy("Fall back to a preview model when the quota runs out.")),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class SettingValue:
    setting: ProxySetting
    value: Any = None
    supported: bool = True  # False: this proxy version has no such route (404)
    error: str = ""

    @property
    def shown(self) -> str:
        if self.setting.name == "proxy-url":
            return mask_url(self.value or "")
        return "" if self.value is None else str(self.value)


# --- provider keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderKind:
    slug: str
    path: str
    label: Promise
    models: bool  # whether the proxy's PATCH takes `models`
    base_url_required: bool  # an empty base-url PATCH deletes the entry (codex, openai)
    named: bool = False  # OpenAI-compatible providers: a name and several keys

    @property
    def answer_key(self) -> str:
        return self.path.lstrip("/")


PROVIDERS: tuple[ProviderKind, ...] = (
    ProviderKind("claude", "/claude-api-key", gettext_lazy("Claude API keys"),
                 models=True, base_url_required=False),
    ProviderKind("gemini", "/gemini-api-key", gettext_lazy("Gemini API keys"),
                 models=False, base_url_required=False),
    ProviderKind("codex", "/codex-api-key", gettext_lazy("Codex API keys"),
                 models=True, base_url_required=True),
    ProviderKind("openai", "/openai-compatibility", gettext_lazy("OpenAI-compatible providers"),
                 models=True, base_url_required=True, named=True),
)
PROVIDERS_BY_SLUG = {p.slug: p for p in PROVIDERS}
DISABLE_ALL = "*"  # the model pattern that excludes every model: the proxy's "disabled"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    alias: str = ""


@dataclass
class UpstreamEntry:
    kind: ProviderKind
    index: int
    ref: str  # entry_ref of its key(s): says which entry, holds no secret
    keys_masked: list[str]
    name: str = ""
    base_url: str = ""
    proxy_url: str = ""
    models: list[ModelAlias] = field(default_factory=list)
    disabled: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # as the proxy sent it

    @property
    def base_url_masked(self) -> str:
        return mask_url(self.base_url)

    @property
    def proxy_url_masked(self) -> str:
        return mask_url(self.proxy_url)

    @property
    def label(self) -> str:
        """How the page and the audit log name the entry: never the key."""
        if self.kind.named:
            return self.name
        return ", ".join(self.keys_masked) or "—"

    def summary(self) -> dict[str, Any]:
        """The entry's shape for the audit log: masked, nothing secret."""
        out: dict[str, Any] = {"keys": self.keys_masked, "base_url": self.base_url_masked,
                               "proxy_url": self.proxy_url_masked,
                               "models": [f"{m.name}={m.alias}" if m.alias else m.name
                                          for m in self.models],
                               "disabled": self.disabled}
        if self.kind.named:
            out["name"] = self.name
        return out


def _entry_keys(kind: ProviderKind, raw: dict[str, Any]) -> list[str]:
    if kind.named:
        entries = raw.get("api-key-entries") or []
        keys = [e.get("api-key", "") for e in entries if isinstance(e, dict)]
        keys += [k for k in raw.get("api-keys") or [] if isinstance(k, str)]  # before 6.x
        return [k for k in keys if isinstance(k, str) and k]
    key = raw.get("api-key")
    return [key] if isinstance(key, str) and key else []


def _entry_from(kind: ProviderKind, index: int, raw: Any) -> UpstreamEntry:
    if not isinstance(raw, dict):
        raise UpstreamUnexpected(
            _("The proxy answered GET %(path)s with an entry that is not an object.")
            % {"path": kind.path})
    keys = _entry_keys(kind, raw)
    models = []
    for item in raw.get("models") or []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            alias = item.get("alias")
            models.append(ModelAlias(item["name"], alias if isinstance(alias, str) else ""))
    proxy_url = raw.get("proxy-url") if isinstance(raw.get("proxy-url"), str) else ""
    if kind.named and not proxy_url:
        entries = [e for e in raw.get("api-key-entries") or [] if isinstance(e, dict)]
        proxy_url = next((e.get("proxy-url") for e in entries
                          if isinstance(e.get("proxy-url"), str) and e.get("proxy-url")), "")
    excluded = raw.get("excluded-models") or []
    disabled = bool(raw.get("disabled")) if kind.named else DISABLE_ALL in excluded
    name = raw.get("name") if isinstance(raw.get("name"), str) else ""
    return UpstreamEntry(
        kind=kind, index=index, ref=entry_ref(name + "\0" + "\0".join(keys)),
        keys_masked=[mask_secret(k) for k in keys], name=name,
        base_url=raw.get("base-url") if isinstance(raw.get("base-url"), str) else "",
        proxy_url=proxy_url, models=models, disabled=disabled, raw=raw,
    )


def pick_entry(entries: list[UpstreamEntry], *, index: int, ref: str) -> UpstreamEntry:
    """The entry at `index` if it is still the one `ref` names: a page's index goes stale
    when someone else changes the list, and a PATCH by a stale index edits another entry."""
    if not 0 <= index < len(entries) or entries[index].ref != ref:
        raise EntryChanged(_("That entry has changed or moved at the proxy since the page was "
                             "shown; nothing was changed. Look again and retry."))
    return entries[index]


def models_json(models: list[ModelAlias]) -> list[dict[str, str]]:
    return [{"name": m.name, "alias": m.alias} for m in models]


# --- auth files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthFile:
    name: str
    provider: str = ""
    email: str = ""
    status: str = ""  # "" when the version does not report one
    disabled: bool | None = None  # None: not reported (before 7.x)
    size: int | None = None
    modified: str = ""


def _auth_file(raw: Any) -> AuthFile:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise UpstreamUnexpected(_("The proxy answered GET /auth-files with a malformed entry."))

    def text(key: str) -> str:
        value = raw.get(key)
        return value if isinstance(value, str) else ""

    size = raw.get("size")
    disabled = raw.get("disabled")
    return AuthFile(
        name=raw["name"], provider=text("provider") or text("type"), email=text("email"),
        status=text("status"), disabled=disabled if isinstance(disabled, bool) else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        modified=text("modtime")[:19].replace("T", " "),
    )


# --- config.yaml: one line --------------------------------------------------------------------

_RETENTION_LINE = re.compile(
    rf"^{re.escape(RETENTION)}[ \t]*:[ \t]*[\"']?(-?\d+)?[\"']?[ \t]*(#.*)?$", re.MULTILINE)


def config_with_retention(text: str, seconds: int) -> str:
    """config.yaml with the retention set to `seconds`, every other byte as it was (comments,
    order, keys): the line is replaced, or added at the end when missing."""
    matches = list(_RETENTION_LINE.finditer(text))
    if len(matches) > 1:
        raise ConfigEditRefused(
            _("config.yaml sets %(key)s more than once: edit it by hand.") % {"key": RETENTION})
    line = f"{RETENTION}: {seconds}"
    if matches:
        return text[:matches[0].start()] + line + text[matches[0].end():]
    if re.search(rf"^\s+{re.escape(RETENTION)}\s*:|^{re.escape(RETENTION)}\s*:", text,
                 re.MULTILINE):
        # Present, but not as a plain top-level `key: number` line.
        raise ConfigEditRefused(
            _("config.yaml sets %(key)s in a form the portal does not edit: edit it by hand.")
            % {"key": RETENTION})
    return text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"


# --- the client -------------------------------------------------------------------------------


class ProxyAdminClient(ProxyClient):
    """The Management API calls behind the staff pages. Build it with `from_settings()`."""

    # -- scalar settings ---------------------------------------------------------------------

    def setting(self, setting: ProxySetting) -> Any:
        payload = self._json("GET", setting.path)
        value = payload.get(setting.answer_key) if isinstance(payload, dict) else None
        expected = {BOOL: bool, INT: int, TEXT: str}[setting.kind]
        if value is None and setting.kind == TEXT:
            return ""
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UpstreamUnexpected(
                _("The proxy answered GET %(path)s without a value of the expected kind.")
                % {"path": setting.path})
        return value

    def set_setting(self, setting: ProxySetting, value: Any) -> None:
        self._write("PUT", setting.path, json={"value": value})

    def queue_retention(self) -> int | None:
        """Seconds, or None when this proxy has no usage queue (6.9.x and older)."""
        payload = self._json("GET", "/config")
        if not isinstance(payload, dict):
            raise UpstreamUnexpected(_("The proxy answered GET /config with something that is "
                                       "not an object."))
        value = payload.get(RETENTION)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise UpstreamUnexpected(_("The proxy's %(key)s is not a number.")
                                     % {"key": RETENTION})
        return value

    def set_queue_retention(self, seconds: int) -> None:
        text = self._send("GET", "/config.yaml").text
        updated = config_with_retention(text, seconds)
        payload = self._json("PUT", "/config.yaml", data=updated.encode(),
                             headers={"Content-Type": "application/yaml"})
        if not isinstance(payload, dict) or payload.get("ok") is not True:
            raise UpstreamUnexpected(_("The proxy did not confirm the change to config.yaml."))

    # -- provider keys -----------------------------------------------------------------------

    def upstream_entries(self, kind: ProviderKind) -> list[UpstreamEntry]:
        payload = self._json("GET", kind.path)
        if not isinstance(payload, dict) or kind.answer_key not in payload:
            raise UpstreamUnexpected(
                _("The proxy answered GET %(path)s without a %(key)s list.")
                % {"path": kind.path, "key": kind.answer_key})
        items = payload[kind.answer_key] or []
        if not isinstance(items, list):
            raise UpstreamUnexpected(_("The proxy answered GET %(path)s with a %(key)s that is "
                                       "not a list.") % {"path": kind.path, "key": kind.answer_key})
        return [_entry_from(kind, i, raw) for i, raw in enumerate(items)]

    def upstream_entry(self, kind: ProviderKind, *, index: int, ref: str) -> UpstreamEntry:
        """The entry at `index`, read now, and only if it is still the one named by `ref`."""
        return pick_entry(self.upstream_entries(kind), index=index, ref=ref)

    def upstream_add(self, kind: ProviderKind, entry: dict[str, Any]) -> list[UpstreamEntry]:
        """Appends `entry`: the proxy has no "add", so the list is read and PUT whole, each
        other entry exactly as the proxy sent it. Returns the list as it was before."""
        before = self.upstream_entries(kind)
        self._write("PUT", kind.path, json=[e.raw for e in before] + [entry])
        return before

    def upstream_patch(self, kind: ProviderKind, *, index: int, value: dict[str, Any]) -> None:
        if kind.base_url_required and "base-url" in value and not value["base-url"]:
            # The proxy would delete the entry rather than clear its URL.
            raise ValueError("an empty base-url deletes a codex or OpenAI-compatible entry")
        try:
            self._write("PATCH", kind.path, json={"index": index, "value": value})
        except UpstreamNotFound:
            # The route answered the GET just before: this 404 is "item not found".
            raise EntryChanged(_("The proxy no longer has that entry; nothing was changed."))

    def upstream_set_disabled(self, entry: UpstreamEntry, disabled: bool) -> None:
        """Disables or enables an entry, then reads it back: a release without the flag
        (key lists before 6.6, OpenAI-compatible providers before late 6.9) answers ok and
        ignores it."""
        if entry.kind.named:
            value: dict[str, Any] = {"disabled": disabled}
        else:
            kept = [m for m in entry.raw.get("excluded-models") or [] if m != DISABLE_ALL]
            value = {"excluded-models": [*kept, DISABLE_ALL] if disabled else kept}
        self.upstream_patch(entry.kind, index=entry.index, value=value)
        now = self.upstream_entries(entry.kind)
        if entry.index >= len(now) or now[entry.index].disabled is not disabled:
            raise DisableUnsupported(
                _("This proxy version cannot disable entries of %(what)s (it ignored the setting); "
                  "delete the entry instead, or update the proxy.") % {"what": entry.kind.label})

    def upstream_delete(self, entry: UpstreamEntry, *, siblings: list[UpstreamEntry]) -> None:
        kind = entry.kind
        if kind.named and sum(1 for e in siblings if e.name == entry.name) == 1:
            params: dict[str, Any] = {"name": entry.name}
        else:
            params = {"index": entry.index}
        try:
            self._write("DELETE", kind.path, params=params)
        except UpstreamNotFound:
            raise EntryChanged(_("The proxy no longer has that entry; nothing was changed."))

    # -- auth files --------------------------------------------------------------------------

    def auth_files(self) -> list[AuthFile]:
        payload = self._json("GET", "/auth-files")
        files = payload.get("files") if isinstance(payload, dict) else None
        if files is None and isinstance(payload, dict) and "files" in payload:
            files = []
        if not isinstance(files, list):
            raise UpstreamUnexpected(_("The proxy answered GET /auth-files without a files list."))
        return [_auth_file(item) for item in files]

    def auth_file_upload(self, *, name: str, content: bytes) -> None:
        self._write("POST", "/auth-files",
                    files={"file": (name, content, "application/json")})

    def auth_file_delete(self, *, name: str) -> None:
        self._write("DELETE", "/auth-files", params={"name": name})


def read_all(calls: list[tuple[str, Callable[[], Any]]]) -> tuple[dict[str, Any], str]:
    """Runs read calls in turn: ({name: value or the UpstreamNotFound/UpstreamUnexpected it
    raised}, the sentence that stopped them all). A refusal or no answer stops the rest at
    once: the latch holds after one 401, and a dead proxy is not asked seven times."""
    out: dict[str, Any] = {}
    for name, call in calls:
        try:
            out[name] = call()
        except (UpstreamRefused, UpstreamUnreachable) as exc:
            return out, str(exc)
        except (UpstreamNotFound, UpstreamUnexpected, EntryChanged) as exc:
            out[name] = exc
    return out, ""


def parse_models(text: str) -> list[ModelAlias]:
    """`name` or `name = alias`, one a line (also `name => alias` / `name, alias`)."""
    models = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, alias = re.split(r"\s*(?:=>|=|,)\s*", line, maxsplit=1) + [""] * (
            0 if re.search(r"=>|=|,", line) else 1)
        models.append(ModelAlias(name.strip(), alias.strip()))
    return models


def models_text(models: list[ModelAlias]) -> str:
    return "\n".join(f"{m.name} = {m.alias}" if m.alias else m.name for m in models)
