from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

LABEL_MAX_LENGTH = 100  # ApiKey.label's column

# Control characters (NUL, tabs, escapes that repaint a terminal), line and paragraph
# separators, and lone surrogates (not valid Unicode: UTF-8 cannot encode them, PostgreSQL
# cannot store them). A label is shown in pages, the admin, CSV exports and logs.
_REFUSED_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


def label_clean(value: str) -> str:
    """A key label as stored (the field has trimmed it): refused when it holds a character no
    label needs."""
    if any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in value):
        raise forms.ValidationError(
            _("The label cannot contain control characters or line breaks."), code="control"
        )
    return value.strip()


class KeyLabelForm(forms.Form):
    """A key's label, when adding a key and when renaming one."""

    label = forms.CharField(
        label=_("Label"),
        max_length=LABEL_MAX_LENGTH,
        required=False,
        help_text=_("Where you will use the key, e.g. “laptop” or “CI”."),
    )

    def clean_label(self) -> str:
        return label_clean(self.cleaned_data["label"])


def upstream_choice_label(upstream: Any) -> str:
    return f"{upstream.name} ({upstream.get_kind_display()})"


class KeyAddForm(KeyLabelForm):
    """Adding a key: its label, and where it is made when more than one upstream is open to
    the person (`choices`: those upstreams, oldest first; with one or none there is nothing
    to pick and the field is left out)."""

    def __init__(self, *args: Any, choices: Sequence[Any] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upstreams = list(choices)
        if len(self.upstreams) > 1:
            self.fields["upstream"] = forms.TypedChoiceField(
                label=_("Where"), coerce=int, widget=forms.RadioSelect,
                choices=[(u.pk, upstream_choice_label(u)) for u in self.upstreams],
                initial=self.upstreams[0].pk,
                help_text=_("The relay the key is made at; its settings below follow it."),
            )

    def picked(self) -> Any:
        """The upstream picked (None: nothing to pick, the default applies)."""
        if "upstream" not in self.fields:
            return None
        wanted = self.cleaned_data["upstream"]
        return next(u for u in self.upstreams if u.pk == wanted)


class KeyRevokeForm(forms.Form):
    """The API's revoke-key body: the key's id, or its full value."""

    id = forms.IntegerField(required=False, min_value=1)
    key = forms.CharField(required=False, max_length=128)

    def clean(self) -> dict:
        cleaned = super().clean()
        if not cleaned.get("id") and not cleaned.get("key"):
            raise forms.ValidationError(_("Give the key's `id` (or its full value as `key`)."))
        return cleaned
