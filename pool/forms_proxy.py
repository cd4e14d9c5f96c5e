"""Forms of the staff pages that run the proxy: they only validate (pool/staff_views.py acts)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from pool.proxy_admin import (
    BOOL,
    INT,
    RETENTION,
    RETENTION_MAX,
    SETTINGS_BY_NAME,
    ModelAlias,
    ProviderKind,
    parse_models,
)

REQUEST_RETRY_MAX = 100
AUTH_FILE_MAX_BYTES = 64 * 1024  # OAuth token files are a few KB
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


def _checked_url(value: str, *, schemes: tuple[str, ...], what: str) -> str:
    value = (value or "").strip()
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValidationError(_("%(what)s is not a valid URL.") % {"what": what})
    if parts.scheme not in schemes or not parts.hostname:
        raise ValidationError(
            _("%(what)s must start with %(schemes)s and name a host.")
            % {"what": what, "schemes": ", ".join(f"{s}://" for s in schemes)})
    if any(c.isspace() for c in value):
        raise ValidationError(_("%(what)s must not contain spaces.") % {"what": what})
    return value


def proxy_url(value: str) -> str:
    return _checked_url(value, schemes=PROXY_SCHEMES, what=_("The proxy URL"))


def base_url(value: str) -> str:
    return _checked_url(value, schemes=("http", "https"), what=_("The base URL"))


class SettingChangeForm(forms.Form):
    """One setting and its new value, as text; `cleaned_data["parsed"]` holds it typed."""

    setting = forms.ChoiceField(choices=[(n, n) for n in [*SETTINGS_BY_NAME, RETENTION]])
    value = forms.CharField(required=False, max_length=500, strip=True)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        name, raw = data.get("setting"), data.get("value", "")
        if name is None:
            return data
        if name == RETENTION:
            data["parsed"] = self._number(raw, low=1, high=RETENTION_MAX)
            return data
        kind = SETTINGS_BY_NAME[name].kind
        if kind == BOOL:
            if raw not in ("true", "false"):
                raise ValidationError(_("Choose on or off."))
            data["parsed"] = raw == "true"
        elif kind == INT:
            data["parsed"] = self._number(raw, low=0, high=REQUEST_RETRY_MAX)
        else:
            data["parsed"] = proxy_url(raw)
        return data

    @staticmethod
    def _number(raw: str, *, low: int, high: int) -> int:
        try:
            number = int(raw)
        except ValueError:
            raise ValidationError(_("Enter a whole number."))
        if not low <= number <= high:
            raise ValidationError(_("Enter a number from %(low)d to %(high)d.")
                                  % {"low": low, "high": high})
        return number


class UpstreamForm(forms.Form):
    """An upstream account, to add (`adding`) or edit. The key itself is only ever typed in,
    for a new entry: pages never hold an existing one."""

    api_key = forms.CharField(label=_("API key"), required=False, max_length=500, strip=True,
                              widget=forms.PasswordInput(render_value=False,
                                                         attrs={"autocomplete": "off"}))
    name = forms.CharField(label=_("Provider name"), required=False, max_length=100)
    base_url = forms.CharField(label=_("Base URL"), required=False, max_length=500)
    proxy_url = forms.CharField(label=_("Proxy URL"), required=False, max_length=500,
                                help_text=_("Empty: the proxy's own outgoing proxy setting."))
    models = forms.CharField(
        label=_("Models"), required=False, max_length=5000,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text=_("One model a line: the upstream name, or “upstream name = alias” to offer "
                    "it to clients under the alias."))

    def __init__(self, *args: Any, kind: ProviderKind, adding: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.adding = kind, adding
        if not adding:
            del self.fields["api_key"]
        if not kind.named:
            del self.fields["name"]
        if not kind.models:
            del self.fields["models"]
        if kind.base_url_required:
            self.fields["base_url"].required = True
        if adding and "name" in self.fields:
            self.fields["name"].required = True
        if adding:
            self.fields["api_key"].required = True

    def clean_base_url(self) -> str:
        return base_url(self.cleaned_data.get("base_url", ""))

    def clean_proxy_url(self) -> str:
        return proxy_url(self.cleaned_data.get("proxy_url", ""))

    def clean_api_key(self) -> str:
        value = self.cleaned_data.get("api_key", "")
        if value and (len(value) < 8 or any(c.isspace() for c in value)):
            raise ValidationError(_("An API key has at least 8 characters and no spaces."))
        return value

    def clean_models(self) -> list[ModelAlias]:
        models = parse_models(self.cleaned_data.get("models", ""))
        for model in models:
            if not model.name or any(c.isspace() for c in model.name + model.alias):
                raise ValidationError(_("Each line is a model name, optionally “= alias”, "
                                        "without spaces inside the names."))
        return models


class AuthFileUploadForm(forms.Form):
    file = forms.FileField(label=_("Auth file (.json)"))

    def clean_file(self) -> Any:
        upload = self.cleaned_data["file"]
        name = upload.name or ""
        if not name.lower().endswith(".json") or "/" in name or "\\" in name or name == ".json":
            raise ValidationError(_("The file must be a .json file."))
        if upload.size > AUTH_FILE_MAX_BYTES:
            raise ValidationError(_("The file is larger than %(kb)d KB; an auth file is a few KB.")
                                  % {"kb": AUTH_FILE_MAX_BYTES // 1024})
        content = upload.read()
        try:
            parsed = json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ValidationError(_("The file is not valid JSON."))
        if not isinstance(parsed, dict):
            raise ValidationError(_("The file must hold a JSON object, as the proxy's auth files "
                                    "do."))
        self.cleaned_data["content"] = content
        self.cleaned_data["parsed"] = parsed
        return upload
