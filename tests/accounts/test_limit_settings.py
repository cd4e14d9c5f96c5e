"""Limits are set by staff in the admin: defaults for new people, per person; each change
leaves one audit row with the old and new values."""

from __future__ import annotations

from decimal import Decimal

import pytest

from accounts.models import LimitDefaults, User
from accounts.services import person_get_or_create
from keyportal.models import AuditEvent

pytestmark = pytest.mark.django_db


def test_new_people_start_with_the_staffs_defaults(admin_client):
    LimitDefaults.objects.create(id=1, limit_tokens_day=100_000, limit_cost_month=Decimal("25"))
    person = person_get_or_create(email="new@example.com")
    assert person.limit_tokens_day == 100_000 and person.limit_cost_month == Decimal("25")
    assert person.limit_tokens_month is None
    admin_client.post("/admin/accounts/user/add/", {"email": "added@example.com"})
    assert User.objects.get(email="added@example.com").limit_tokens_day == 100_000


def test_without_defaults_people_have_no_limits():
    person = person_get_or_create(email="new@example.com")
    assert not person.has_limits


def test_the_defaults_page_is_a_single_row(admin_client):
    response = admin_client.get("/admin/accounts/limitdefaults/")
    assert response.status_code == 302
    defaults = LimitDefaults.objects.get()
    assert response["Location"].endswith(f"/admin/accounts/limitdefaults/{defaults.pk}/change/")
    assert admin_client.get("/admin/accounts/limitdefaults/add/").status_code == 403


def test_changing_the_defaults_leaves_one_audit_row(admin_client):
    defaults = LimitDefaults.current()
    admin_client.post(f"/admin/accounts/limitdefaults/{defaults.pk}/change/", {
        "limit_tokens_day": "5000", "limit_tokens_month": "", "limit_cost_day": "",
        "limit_cost_month": "", "key_valid_days": "90"})
    [event] = AuditEvent.objects.all()
    assert event.action == AuditEvent.Action.LIMITS_CHANGED
    assert event.before == {"limit_tokens_day": None, "key_valid_days": None}
    assert event.after == {"limit_tokens_day": 5000, "key_valid_days": 90}


def test_changing_a_persons_limits_leaves_one_audit_row_and_other_edits_none(admin_client, ann):
    form = {"email": ann.email, "name": "Ann", "is_active": "on", "limit_tokens_day": "",
            "limit_tokens_month": "", "limit_cost_day": "", "limit_cost_month": "",
            "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    admin_client.post(f"/admin/accounts/user/{ann.pk}/change/", {**form, "name": "Ann Lee"})
    assert not AuditEvent.objects.exists()
    admin_client.post(f"/admin/accounts/user/{ann.pk}/change/", {**form, "limit_cost_day": "2.50"})
    ann.refresh_from_db()
    assert ann.limit_cost_day == Decimal("2.50")
    [event] = AuditEvent.objects.all()
    assert event.before == {"limit_cost_day": None} and event.after == {"limit_cost_day": "2.50"}
    assert event.target_label == ann.email


def test_a_negative_limit_is_refused_on_the_field(admin_client, ann):
    response = admin_client.post(f"/admin/accounts/user/{ann.pk}/change/", {
        "email": ann.email, "is_active": "on", "limit_tokens_day": "-5",
        "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"})
    assert response.status_code == 200 and b"greater than or equal to 0" in response.content
    ann.refresh_from_db()
    assert ann.limit_tokens_day is None


def test_a_negative_cost_limit_is_refused_on_the_field(admin_client, ann):
    response = admin_client.post(f"/admin/accounts/user/{ann.pk}/change/", {
        "email": ann.email, "is_active": "on", "limit_cost_month": "-1",
        "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"})
    assert response.status_code == 200 and b"greater than or equal to 0" in response.content
