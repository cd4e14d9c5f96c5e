"""Webhook forms: the URL and the secret are write-only (never rendered back)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.core.validators import URLValidator
from django.utils.translation import gettext_lazy as _

from keyportal.models import Webhook
from keyportal.notify import STAFF_EVENTS
from keyportal.webhooks import host_of

KEEP = _("Stored, not shown. Leave empty to keep it.")


def _secret_input() -> forms.PasswordInput:
    # render_value=False: a re-rendered form (an error elsewhere) never echoes the value.
    return forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"})


class WebhookSecretsMixin(forms.Form):
    new_url = forms.CharField(label=_("Webhook URL"), required=False, max_length=2000,
                              widget=_secret_input())
    new_secret = forms.CharField(
        label=_("Signing secret"), required=False, max_length=500, widget=_secret_input(),
        help_text=_("DingTalk: the SEC… string of “加签”; Feishu / Lark: the signature "
                    "verification secret; generic JSON: signs the body (X-Portal-Signature). "
                    "WeCom and Slack have none."),
    )
    clear_secret = forms.BooleanField(label=_("Remove the signing secret"), required=False)

    has_url = False  # an existing webhook keeps its URL when the field is left empty

    def clean_new_url(self) -> str:
        url = self.cleaned_data["new_url"].strip()
        if not url:
            if not self.has_url:
                raise forms.ValidationError(_("Enter the webhook URL."))
            return ""
        try:
            URLValidator(schemes=["http", "https"])(url)
        except forms.ValidationError:
            # Not Django's message: it would not quote the URL, but say it in our words.
            raise forms.ValidationError(_("Enter a full http:// or https:// address.")) from None
        return url


class WebhookAdminForm(WebhookSecretsMixin, forms.ModelForm):
    events = forms.MultipleChoiceField(
        label=_("Alerts"), required=False, widget=forms.CheckboxSelectMultiple,
        choices=list(STAFF_EVENTS.items()),
        help_text=_("None ticked: every staff alert."),
    )

    class Meta:
        model = Webhook
        fields = ("name", "kind", "enabled", "events")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.has_url = bool(self.instance.pk)
        if self.has_url:
            self.fields["new_url"].help_text = KEEP
            if self.instance.secret:
                self.fields["new_secret"].help_text = KEEP


PERSON_KINDS = [(k, label) for k, label in Webhook.Kind.choices if k != Webhook.Kind.JSON]


class PersonWebhookForm(WebhookSecretsMixin):
    kind = forms.ChoiceField(label=_("Chat"), choices=PERSON_KINDS)

    def __init__(self, *args: Any, has_url: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.has_url = has_url

    def clean_new_url(self) -> str:
        url = super().clean_new_url()
        # A person's webhook goes to the chat platforms only: the portal must not become a
        # way to POST into the network it runs in.
        if url and host_of(url) not in settings.PORTAL_PERSON_WEBHOOK_HOSTS:
            raise forms.ValidationError(
                _("Use your chat robot's own address (allowed hosts: %(hosts)s).")
                % {"hosts": ", ".join(settings.PORTAL_PERSON_WEBHOOK_HOSTS)})
        return url
