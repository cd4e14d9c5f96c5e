from __future__ import annotations

import unicodedata

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


class KeyRevokeForm(forms.Form):
    """The API's revoke-key body: the key's id, or its full value."""

    id = forms.IntegerField(required=False, min_value=1)
    key = forms.CharField(required=False, max_length=128)

    def clean(self) -> dict:
        cleaned = super().clean()
        if not cleaned.get("id") and not cleaned.get("key"):
            raise forms.ValidationError(_("Give the key's `id` (or its full value as `key`)."))
        return cleaned
