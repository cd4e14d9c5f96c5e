from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _


class KeyLabelForm(forms.Form):
    label = forms.CharField(
        label=_("Label"),
        max_length=100,
        required=False,
        help_text=_("Where you will use the key, e.g. “laptop” or “CI”."),
    )

    def clean_label(self) -> str:
        return self.cleaned_data["label"].strip()


class KeyRevokeForm(forms.Form):
    """The API's revoke-key body: the key's id, or its full value."""

    id = forms.IntegerField(required=False, min_value=1)
    key = forms.CharField(required=False, max_length=128)

    def clean(self) -> dict:
        cleaned = super().clean()
        if not cleaned.get("id") and not cleaned.get("key"):
            raise forms.ValidationError(_("Give the key's `id` (or its full value as `key`)."))
        return cleaned
