"""The staff admin for keys: always masked, filterable, with generate and reconcile buttons
that call the same services as the commands."""

from __future__ import annotations

import pytest

from accounts.models import User
from pool.models import ApiKey
from pool.services import pool_keys_create

pytestmark = pytest.mark.django_db
Status, State = ApiKey.Status, ApiKey.ProxyState
LIST = "/admin/pool/apikey/"


def test_key_list_never_shows_a_full_key(admin_client):
    keys = pool_keys_create(count=3)
    page = admin_client.get(LIST, {"whose": "pool"}).content.decode()
    for key in keys:
        assert key.value not in page
        assert key.key_hash not in page
        assert f"sk-kp-…{key.last4}" in page


def test_key_list_shows_peoples_keys_and_the_pool_apart_with_counts(admin_client):
    pool = pool_keys_create(count=3)
    owner = User.objects.create_user("ann@example.com")
    ApiKey.objects.filter(pk=pool[0].pk).update(status=Status.ACTIVE, owner=owner, value=None)
    page = admin_client.get(LIST).content.decode()  # people's keys by default
    assert f"…{pool[0].last4}" in page and f"…{pool[1].last4}" not in page
    assert "People&#x27;s keys: 1" in page and "Pool (unissued): 2" in page
    page = admin_client.get(LIST, {"whose": "pool"}).content.decode()
    assert f"…{pool[0].last4}" not in page and f"…{pool[2].last4}" in page
    page = admin_client.get(LIST, {"whose": "all"}).content.decode()
    assert all(f"…{k.last4}" in page for k in pool)


def test_key_detail_never_shows_a_full_key(admin_client):
    [key] = pool_keys_create(count=1)
    page = admin_client.get(f"{LIST}{key.pk}/change/").content.decode()
    assert key.value not in page and key.key_hash not in page
    assert key.masked in page


def test_key_list_filters_by_status(admin_client):
    pool_keys_create(count=2)
    owner = User.objects.create_user("ann@example.com")
    [issued] = pool_keys_create(count=1)
    ApiKey.objects.filter(pk=issued.pk).update(status=Status.ACTIVE, owner=owner, value=None)
    page = admin_client.get(LIST, {"status__exact": "active"}).content.decode()
    assert "ann@example.com" in page
    assert page.count('name="_selected_action"') == 1


def test_key_list_query_count_is_pinned(admin_client, django_assert_num_queries):
    owners = [User.objects.create_user(f"p{i}@example.com") for i in range(30)]
    for owner, key in zip(owners, pool_keys_create(count=30)):
        ApiKey.objects.filter(pk=key.pk).update(status=Status.ACTIVE, owner=owner, value=None)
    # session, user, pool counts, is there a CLIProxyAPI (none in the environment here), list
    # + filters (the upstream filter's choices, the people's / pool counts); not per row
    with django_assert_num_queries(10):
        assert admin_client.get(LIST).status_code == 200


def test_keys_cannot_be_added_or_deleted_in_the_admin(admin_client):
    [key] = pool_keys_create(count=1)
    assert admin_client.get(f"{LIST}add/").status_code == 403
    assert admin_client.post(f"{LIST}{key.pk}/delete/", {"post": "yes"}).status_code == 403
    assert ApiKey.objects.filter(pk=key.pk).exists()


def test_generate_button_pushes_new_keys(admin_client, fake_proxy):
    fake_proxy.api_keys = ["foreign-1", "foreign-2"]
    response = admin_client.post(f"{LIST}generate/", {"count": "25"}, follow=True)
    assert response.status_code == 200
    assert "Created 25 pool keys" in response.content.decode()
    assert len(fake_proxy.api_keys) == 27 and fake_proxy.api_keys[:2] == ["foreign-1", "foreign-2"]
    assert ApiKey.objects.filter(proxy_state=State.PUSHED).count() == 25


def test_generate_form_refuses_a_bad_count_and_changes_nothing(admin_client, fake_proxy):
    response = admin_client.post(f"{LIST}generate/", {"count": "0"})
    assert response.status_code == 200
    assert "greater than or equal to 1" in response.content.decode()
    assert ApiKey.objects.count() == 0 and fake_proxy.management_requests == []


def test_reconcile_button_reports_and_changes_the_proxy(admin_client, fake_proxy):
    fake_proxy.api_keys = ["foreign-1"]
    pool_keys_create(count=2)  # in the portal, not yet at the proxy
    response = admin_client.post(f"{LIST}reconcile/", follow=True)
    page = response.content.decode()
    assert "2 pool keys added to the proxy" in page
    assert len(fake_proxy.api_keys) == 3


def test_reconcile_button_shows_a_refusal_without_the_key(admin_client, fake_proxy, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-management-key"
    page = admin_client.post(f"{LIST}reconcile/", follow=True).content.decode()
    assert "CLIPROXY_MANAGEMENT_KEY" in page
    assert "wrong-management-key" not in page
    assert len(fake_proxy.management_requests) == 1


def test_reconcile_by_get_changes_nothing(admin_client, fake_proxy):
    pool_keys_create(count=1)
    admin_client.get(f"{LIST}reconcile/")
    assert fake_proxy.management_requests == []


def test_buttons_are_for_staff_only(client, fake_proxy):
    person = User.objects.create_user("ann@example.com")
    client.force_login(person)
    client.post(f"{LIST}reconcile/")
    client.post(f"{LIST}generate/", {"count": "5"})
    assert fake_proxy.management_requests == [] and ApiKey.objects.count() == 0


def test_staff_without_key_permissions_cannot_generate(client, fake_proxy):
    clerk = User.objects.create_user("clerk@example.com", "a-long-password-1", is_staff=True)
    client.force_login(clerk)
    assert client.post(f"{LIST}generate/", {"count": "5"}).status_code == 403
    assert ApiKey.objects.count() == 0


# --- staff actions on issued keys -----------------------------------------------------------


def act(admin_client, action: str, key: ApiKey):
    return admin_client.post(LIST, {"action": action, "_selected_action": [key.pk]}, follow=True)


def test_staff_suspend_and_resume_a_key_through_the_proxy(admin_client, live_key, proxy_accepts):
    from keyportal.models import AuditEvent

    key, value = live_key
    page = act(admin_client, "suspend_keys", key).content.decode()
    assert "1 keys suspended." in page
    key.refresh_from_db()
    assert (key.status, key.suspended_for) == (Status.SUSPENDED, "staff")
    assert not proxy_accepts(value)

    act(admin_client, "resume_keys", key)
    key.refresh_from_db()
    assert key.status == Status.ACTIVE and proxy_accepts(value)
    actions = list(AuditEvent.objects.filter(target_type="apikey").order_by("id")
                   .values_list("action", "actor_kind"))
    assert actions == [("key_suspended", "staff"), ("key_restored", "staff")]


def test_staff_revoke_a_key(admin_client, live_key, proxy_accepts):
    key, value = live_key
    act(admin_client, "revoke_keys", key)
    key.refresh_from_db()
    assert key.status == Status.REVOKED and not proxy_accepts(value)


def test_actions_on_keys_in_the_wrong_state_change_nothing(admin_client, live_key):
    key, _value = live_key
    page = act(admin_client, "resume_keys", key).content.decode()
    assert "0 keys resumed." in page
    key.refresh_from_db()
    assert key.status == Status.ACTIVE


def test_staff_set_a_keys_expiry_and_limits_with_one_audit_row(admin_client, live_key):
    from keyportal.models import AuditEvent

    key, _value = live_key
    admin_client.post(f"{LIST}{key.pk}/change/", {
        "label": "renamed", "expires_at_0": "2027-01-31", "expires_at_1": "18:00:00",
        "limit_tokens_day": "50000", "limit_tokens_month": "", "limit_cost_day": "",
        "limit_cost_month": ""})
    key.refresh_from_db()
    assert key.limit_tokens_day == 50000 and key.expires_at.year == 2027
    [event] = AuditEvent.objects.filter(action="limits_changed")
    assert set(event.after) == {"expires_at", "limit_tokens_day"}
