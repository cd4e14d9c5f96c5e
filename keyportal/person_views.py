"""A person's own webhook for their limit notices (/my-keys/notifications)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods

from keyportal.forms import PersonWebhookForm
from keyportal.models import Webhook
from keyportal.notify import webhook_test
from keyportal.services import person_webhook_delete, person_webhook_set


@sensitive_post_parameters("new_url", "new_secret")
@login_required
@require_http_methods(["GET", "POST"])
def my_notifications(request: HttpRequest) -> HttpResponse:
    hook = Webhook.objects.filter(owner=request.user).first()
    action = request.POST.get("action", "save") if request.method == "POST" else ""
    if action == "test" and hook is not None:
        webhook_test(webhook=hook)
        messages.success(request, _("A test message is on its way; reload this page in a few "
                                    "seconds to see whether it arrived."))
        return HttpResponseRedirect(reverse("my-notifications"), status=303)
    if action == "delete":
        person_webhook_delete(user=request.user)
        messages.success(request, _("Your webhook is removed; limit notices come by email only."))
        return HttpResponseRedirect(reverse("my-notifications"), status=303)
    form = PersonWebhookForm(request.POST if action == "save" else None,
                             initial={"kind": hook.kind} if hook else None,
                             has_url=hook is not None)
    if action == "save" and form.is_valid():
        person_webhook_set(user=request.user, kind=form.cleaned_data["kind"],
                           url=form.cleaned_data["new_url"],
                           secret=form.cleaned_data["new_secret"],
                           clear_secret=form.cleaned_data["clear_secret"])
        messages.success(request, _("Saved. Limit notices now also go to your chat."))
        return HttpResponseRedirect(reverse("my-notifications"), status=303)
    last = hook.deliveries.order_by("-created_at", "-pk").first() if hook else None
    return render(request, "keyportal/notifications.html",
                  {"hook": hook, "form": form, "last": last},
                  status=400 if action == "save" else 200)
