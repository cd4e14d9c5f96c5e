"""Issuing keys: key_assign, the registration link, an empty pool, and concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core import mail
from django.db import connection, connections
from django.db.models import QuerySet

from accounts.models import SignInLink, User
from pool.models import ApiKey, key_digest
from pool.services import PoolEmpty, key_assign, pool_keys_create, registration_complete
from tests.accounts.mailbox import emailed_path

Status, State = ApiKey.Status, ApiKey.ProxyState


def register(client, email="new@example.com", name="New Person", label="laptop") -> str:
    response = client.post("/register", {"email": email, "name": name, "label": label})
    assert response.status_code == 200
    return emailed_path()


# --- key_assign -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_assign_takes_a_pushed_pool_key_and_keeps_only_its_hash(ann, ready_keys, fake_proxy):
    issued = key_assign(user=ann, label="laptop")
    key = ApiKey.objects.get(pk=issued.key.pk)
    assert (key.owner, key.label, key.status) == (ann, "laptop", Status.ACTIVE)
    assert key.value is None and key.issued_at is not None
    assert key.key_hash == key_digest(issued.value) and key.last4 == issued.value[-4:]
    assert fake_proxy.management_requests == []  # no call to the proxy at all


@pytest.mark.django_db
def test_assign_never_hands_out_unpushed_revoked_or_owned_keys(ann, bob, make_ready_keys):
    unpushed = pool_keys_create(count=1)[0]
    ready = make_ready_keys(2)
    ApiKey.objects.filter(pk=ready[0].pk).update(
        status=Status.REVOKED, value=None, proxy_state=State.REMOVED
    )
    first = key_assign(user=ann, label="")
    assert first.key.pk == ready[1].pk
    with pytest.raises(PoolEmpty):
        key_assign(user=bob, label="")
    assert ApiKey.objects.get(pk=unpushed.pk).status == Status.POOL
    assert ApiKey.objects.filter(owner=bob).count() == 0


@pytest.mark.django_db
def test_two_people_get_different_keys(ann, bob, ready_keys):
    a, b = key_assign(user=ann, label=""), key_assign(user=bob, label="")
    assert a.key.pk != b.key.pk and a.value != b.value


@pytest.mark.django_db
def test_a_key_taken_between_select_and_update_is_skipped(
    ann, bob, monkeypatch, make_ready_keys
):
    """What the conditional UPDATE is for (and all SQLite has): another process takes the
    row this one just picked. The row count says so, and the next key is taken instead."""
    first, second = make_ready_keys(2)
    real_first = QuerySet.first
    raced = []

    def first_then_lose_the_race(self):
        row = real_first(self)
        if not raced and row is not None:
            raced.append(row)
            ApiKey.objects.filter(pk=first.pk).update(
                owner=bob, status=Status.ACTIVE, value=None
            )
        return row

    monkeypatch.setattr(QuerySet, "first", first_then_lose_the_race)
    issued = key_assign(user=ann, label="")

    assert raced and raced[0][0] == first.pk
    assert issued.key.pk == second.pk and issued.key.owner == ann
    assert ApiKey.objects.get(pk=first.pk).owner == bob


# --- the registration link ------------------------------------------------------------------


@pytest.mark.django_db
def test_registration_link_creates_the_person_signs_in_and_shows_the_key_once(
    client, ready_keys, fake_proxy, settings
):
    settings.CLIPROXY_PUBLIC_URL = fake_proxy.url
    path = register(client)
    assert client.get(path).status_code == 200
    assert not User.objects.filter(email="new@example.com").exists()  # a GET does nothing

    response = client.post(path, follow=True)

    assert response.status_code == 200
    person = User.objects.get(email="new@example.com")
    assert person.name == "New Person"
    assert client.session["_auth_user_id"] == str(person.pk)
    key = ApiKey.objects.get(owner=person)
    assert key.label == "laptop"
    page = response.content.decode()
    value = page.split('id="key-value">', 1)[1].split("<", 1)[0]
    assert key_digest(value) == key.key_hash
    assert "no-store" in response["Cache-Control"]
    assert f"ANTHROPIC_AUTH_TOKEN={value}" in page
    assert f'"ANTHROPIC_BASE_URL": "{fake_proxy.url}"' in page
    assert f'base_url = "{fake_proxy.url}/v1"' in page
    assert f"curl {fake_proxy.url}/v1/models" in page
    assert all(value not in str(v) for v in client.session.values())
    # Used: the same link neither signs in again nor issues a second key.
    client.logout()
    assert client.post(path).status_code == 410
    assert ApiKey.objects.filter(owner=person).count() == 1


@pytest.mark.django_db
def test_registration_of_a_known_person_adds_a_key(client, ann, ready_keys):
    path = register(client, email="ann@example.com", name="Other", label="ci")
    assert client.post(path, follow=True).status_code == 200
    ann.refresh_from_db()
    assert ann.name == "Ann"  # a registration link does not rename anyone
    assert list(ApiKey.objects.filter(owner=ann).values_list("label", flat=True)) == ["ci"]


@pytest.mark.django_db
def test_expired_registration_link_is_refused_and_issues_nothing(client, ready_keys):
    path = register(client)
    SignInLink.objects.update(expires_at="2000-01-01T00:00:00Z")
    assert client.get(path).status_code == 410
    assert client.post(path).status_code == 410
    assert not User.objects.filter(email="new@example.com").exists()
    assert ApiKey.objects.filter(status=Status.POOL).count() == 5


@pytest.mark.django_db
def test_empty_pool_tells_the_person_and_staff_and_leaves_nothing_half_done(
    client, make_ready_keys
):
    User.objects.create_user("staff@example.com", password="x" * 12, is_staff=True)
    path = register(client)
    mail.outbox.clear()

    response = client.post(path)

    assert response.status_code == 503
    assert b"No key is available right now" in response.content
    assert not User.objects.filter(email="new@example.com").exists()
    assert "_auth_user_id" not in client.session
    assert SignInLink.objects.get().used_at is None  # the link still works later
    assert [m.to for m in mail.outbox] == [["staff@example.com"]]
    assert "pool is empty" in mail.outbox[0].subject
    # Staff are told once, not once per attempt.
    client.post(path)
    assert len(mail.outbox) == 1
    # Once the pool has keys again, the same link completes the registration.
    make_ready_keys(1)
    assert client.post(path, follow=True).status_code == 200
    assert ApiKey.objects.get().owner.email == "new@example.com"


# --- PostgreSQL: many processes' worth of sign-ups at once ----------------------------------


@pytest.mark.postgres
def test_32_threads_registering_at_once_get_32_different_keys(transactional_db, make_ready_keys):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL=postgres://...)")
    from accounts.services import _link_new

    make_ready_keys(40)
    tokens = [
        _link_new(email=f"p{n}@example.com", purpose=SignInLink.Purpose.REGISTER, label=f"k{n}")
        for n in range(32)
    ]
    barrier = threading.Barrier(32)
    errors: list[BaseException] = []

    def complete(token: str) -> str | None:
        try:
            barrier.wait()
            return registration_complete(token=token)[1].value
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
            return None
        finally:
            connections.close_all()

    with ThreadPoolExecutor(32) as pool:
        values = list(pool.map(complete, tokens))

    assert errors == []
    assert len(set(values)) == 32
    owned = ApiKey.objects.filter(status=Status.ACTIVE)
    assert owned.count() == 32 and owned.values("owner").distinct().count() == 32
    assert ApiKey.objects.filter(status=Status.POOL).count() == 8


# --- the key's page is safe to reload (Post/Redirect/Get) -----------------------------------


@pytest.mark.django_db
def test_the_registration_post_redirects_and_a_reload_says_the_key_was_shown(client, ready_keys):
    path = register(client)
    response = client.post(path)
    # 303 to a page of its own: the value is in neither the URL nor the redirect.
    assert response.status_code == 303 and response["Location"] == "/my-keys/new-key"
    shown = client.get("/my-keys/new-key")
    value = shown.content.decode().split('id="key-value">', 1)[1].split("<", 1)[0]
    key = ApiKey.objects.get(owner__email="new@example.com")
    assert key_digest(value) == key.key_hash and "no-store" in shown["Cache-Control"]
    assert all(value not in str(v) for v in client.session.values())  # one-shot: gone

    reload = client.get("/my-keys/new-key")
    page = reload.content.decode()
    assert reload.status_code == 200 and "This key was shown once" in page
    assert 'href="/my-keys"' in page and value not in page and 'id="key-value"' not in page
    assert ApiKey.objects.filter(owner=key.owner).count() == 1


@pytest.mark.django_db
def test_resubmitting_the_registration_form_gets_the_portals_page_not_djangos(ready_keys):
    from django.test import Client

    # A browser's Back then resubmit: the old page's token, after the sign-in rotated it.
    client = Client(enforce_csrf_checks=True, HTTP_ACCEPT_LANGUAGE="zh-CN")
    path = register(Client())
    form = client.get(path).content.decode()
    token = form.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
    assert client.post(path, {"csrfmiddlewaretoken": token}).status_code == 303

    again = client.post(path, {"csrfmiddlewaretoken": token})
    body = again.content.decode()
    assert again.status_code == 403 and "此表单已过期" in body and 'href="/my-keys"' in body
    assert "CSRF verification failed" not in body
    assert ApiKey.objects.filter(owner__email="new@example.com").count() == 1


@pytest.mark.django_db
def test_the_key_page_shows_nothing_to_someone_else_or_anonymous(client, ann, bob, ready_keys):
    client.force_login(ann)
    client.post("/my-keys/add", {"label": "ci"})
    # The one-shot value belongs to ann's session: bob's session has nothing to show.
    other = client.__class__()
    other.force_login(bob)
    page = other.get("/my-keys/new-key").content.decode()
    assert "This key was shown once" in page and 'id="key-value"' not in page
    anonymous = client.__class__().get("/my-keys/new-key")
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login")
    assert 'id="key-value"' in client.get("/my-keys/new-key").content.decode()
