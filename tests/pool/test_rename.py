"""Renaming a key: /my-keys/<id>/rename (a page without JavaScript, a row in place with htmx)
and POST /api/rename-key. Owner only, POST only with CSRF, labels checked like on add, audited."""

from __future__ import annotations

import json

import pytest
from django import forms
from django.test import Client

from keyportal.models import AuditEvent
from pool.forms import label_clean
from pool.models import ApiKey
from pool.services import key_assign

pytestmark = pytest.mark.django_db
HTMX = {"HX-Request": "true"}


@pytest.fixture
def key(ann, ready_keys) -> ApiKey:
    return key_assign(user=ann, label="laptop").key


def renames() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=AuditEvent.Action.KEY_RENAMED))


# --- without JavaScript ---------------------------------------------------------------------


def test_the_rename_page_shows_the_current_label(client, ann, key):
    client.force_login(ann)
    page = client.get(f"/my-keys/{key.pk}/rename")
    body = page.content.decode()
    assert page.status_code == 200 and "<html" in body
    assert f'action="/my-keys/{key.pk}/rename"' in body and 'value="laptop"' in body
    assert 'name="csrfmiddlewaretoken"' in body


def test_renaming_changes_the_label_audits_it_and_goes_back_to_the_list(client, ann, key):
    client.force_login(ann)
    response = client.post(f"/my-keys/{key.pk}/rename", {"label": "  work laptop "},
                           REMOTE_ADDR="10.1.2.3")
    assert response.status_code == 303 and response["Location"] == "/my-keys"
    key.refresh_from_db()
    assert key.label == "work laptop"
    [event] = renames()
    assert (event.actor, event.target_id, event.ip) == (ann, str(key.pk), "10.1.2.3")
    assert (event.before, event.after) == ({"label": "laptop"}, {"label": "work laptop"})
    assert event.target_label == key.masked
    page = client.get("/my-keys").content.decode()
    assert "is now labelled “work laptop”" in page and "work laptop</th>" in page


def test_renaming_to_the_same_label_writes_no_audit_row(client, ann, key):
    client.force_login(ann)
    assert client.post(f"/my-keys/{key.pk}/rename", {"label": "laptop"}).status_code == 303
    assert renames() == []


def test_an_empty_label_removes_it(client, ann, key):
    client.force_login(ann)
    client.post(f"/my-keys/{key.pk}/rename", {"label": ""})
    key.refresh_from_db()
    assert key.label == ""
    assert "has no label now" in client.get("/my-keys").content.decode()


@pytest.mark.parametrize("label", [
    "x" * 101, "bad\x1b[31mred", "two\nlines", "tab\there", "nul\x00", "sep\u2028line",
], ids=["too-long", "escape", "newline", "tab", "nul", "line-separator"])
def test_a_bad_label_is_refused_and_changes_nothing(client, ann, key, label):
    client.force_login(ann)
    response = client.post(f"/my-keys/{key.pk}/rename", {"label": label})
    assert response.status_code == 400 and b'class="errorlist' in response.content
    htmx = client.post(f"/my-keys/{key.pk}/rename", {"label": label}, headers=HTMX)
    assert htmx.status_code == 200 and b'class="errorlist' in htmx.content
    assert htmx.content.lstrip().startswith(f'<tr id="key-{key.pk}" class="edit">'.encode())
    key.refresh_from_db()
    assert key.label == "laptop" and renames() == []


def test_lone_surrogates_and_control_characters_are_refused_by_the_label_check():
    for bad in ["\ud800", "a\udfffb", "\x7f", "\x85"]:
        with pytest.raises(forms.ValidationError):
            label_clean(bad)
    assert label_clean("笔记本 💻 laptop") == "笔记本 💻 laptop"


def test_adding_a_key_refuses_control_characters_too(client, ann, ready_keys):
    client.force_login(ann)
    response = client.post("/my-keys/add", {"label": "ci\x1b[2J"})
    assert response.status_code == 400 and b"control characters" in response.content
    assert not ApiKey.objects.filter(owner=ann).exists()


# --- with htmx ------------------------------------------------------------------------------


def test_htmx_gets_the_form_in_the_row_with_focus_on_the_field(client, ann, key):
    client.force_login(ann)
    body = client.get(f"/my-keys/{key.pk}/rename", headers=HTMX).content.decode().lstrip()
    assert body.startswith(f'<tr id="key-{key.pk}" class="edit">') and "<html" not in body
    field = body.split("<input", 2)[2].split(">", 1)[0]  # after the CSRF token's input
    assert 'name="label"' in field and 'value="laptop"' in field and "autofocus" in field
    assert f'id="rename-{key.pk}-label"' in field  # ids of its own, beside the add form's
    assert "data-cancel" in body and f'data-focus-after="#rename-{key.pk}"' in body


def test_htmx_rename_answers_the_row_the_sentence_and_where_focus_goes(client, ann, key):
    client.force_login(ann)
    response = client.post(f"/my-keys/{key.pk}/rename", {"label": "ci"}, headers=HTMX)
    body = response.content.decode().lstrip()
    assert response.status_code == 200 and body.startswith(f'<tr id="key-{key.pk}">')
    assert ">ci</th>" in body and 'data-label="Requests">0</td>' in body
    status = body.split('<p id="key-status" hx-swap-oob="innerHTML">', 1)[1].split("</p>", 1)[0]
    assert status == f"Key {key.masked} is now labelled “ci”."
    assert json.loads(response["HX-Trigger-After-Settle"]) == {
        "kp:focus": {"selector": f"#rename-{key.pk}"}
    }
    key.refresh_from_db()
    assert key.label == "ci" and len(renames()) == 1


def test_htmx_rename_sends_the_quota_card_and_the_limit_banner_with_the_new_label(
        client, ann, key):
    from datetime import timedelta

    from django.utils import timezone

    from tests.usage.conftest import served

    # The key's own daily limit is reached: the banner at the top names the key too.
    ApiKey.objects.filter(pk=key.pk).update(limit_tokens_day=10)
    served(key, at=timezone.now() - timedelta(minutes=1), input_tokens=50)
    client.force_login(ann)
    assert "“laptop”" in client.get("/my-keys").content.decode()

    body = client.post(f"/my-keys/{key.pk}/rename", {"label": "ci"}, headers=HTMX).content.decode()

    quota = body.split('<section class="card quota" id="quota"', 1)[1].split("</section>", 1)[0]
    assert 'hx-swap-oob="true"' in quota and f"<h3>ci <code>{key.masked}</code></h3>" in quota
    banner = body.split('id="limit-banner"', 1)[1].split("</section>", 1)[0]
    assert 'hx-swap-oob="true"' in banner and "“ci”" in banner
    assert "laptop" not in body


# --- who may --------------------------------------------------------------------------------


def test_someone_else_gets_404_and_changes_nothing(client, bob, key):
    client.force_login(bob)
    assert client.get(f"/my-keys/{key.pk}/rename").status_code == 404
    assert client.post(f"/my-keys/{key.pk}/rename", {"label": "mine"}).status_code == 404
    htmx = client.post(f"/my-keys/{key.pk}/rename", {"label": "mine"}, headers=HTMX)
    assert htmx.status_code == 404
    key.refresh_from_db()
    assert key.label == "laptop" and renames() == []


def test_anonymous_is_sent_to_sign_in(client, key):
    for response in (client.get(f"/my-keys/{key.pk}/rename"),
                     client.post(f"/my-keys/{key.pk}/rename", {"label": "x"})):
        assert response.status_code == 302 and response["Location"].startswith("/login")
    key.refresh_from_db()
    assert key.label == "laptop"


def test_a_post_without_the_csrf_token_is_refused(ann, key):
    client = Client(enforce_csrf_checks=True)
    client.force_login(ann)
    assert client.post(f"/my-keys/{key.pk}/rename", {"label": "x"}).status_code == 403
    key.refresh_from_db()
    assert key.label == "laptop"


def test_other_methods_are_refused(client, ann, key):
    client.force_login(ann)
    assert client.put(f"/my-keys/{key.pk}/rename").status_code == 405
    assert client.delete(f"/my-keys/{key.pk}/rename").status_code == 405


# --- the JSON API ---------------------------------------------------------------------------


def post(client, body):
    return client.post("/api/rename-key", json.dumps(body), content_type="application/json")


def test_the_api_renames_a_persons_own_key(client, ann, key):
    client.force_login(ann)
    response = post(client, {"id": key.pk, "label": " build box "})
    assert response.status_code == 200 and response.json()["label"] == "build box"
    key.refresh_from_db()
    assert key.label == "build box" and len(renames()) == 1


def test_the_api_refuses_bad_input_and_others_keys(client, ann, bob, key):
    client.force_login(bob)
    assert post(client, {"id": key.pk, "label": "x"}).status_code == 404
    client.force_login(ann)
    assert post(client, {"id": key.pk}).status_code == 400  # no label: nothing wiped
    assert post(client, {"id": key.pk, "label": 7}).status_code == 400
    assert post(client, {"id": key.pk, "label": "a\x1bb"}).status_code == 400
    assert post(client, {"label": "x"}).status_code == 400  # which key?
    key.refresh_from_db()
    assert key.label == "laptop" and renames() == []


def test_the_rename_page_and_row_cost_a_fixed_number_of_queries(
    client, ann, key, django_assert_num_queries
):
    client.force_login(ann)
    with django_assert_num_queries(3):  # session, person, the key
        assert client.get(f"/my-keys/{key.pk}/rename").status_code == 200
    with django_assert_num_queries(3):
        assert client.get(f"/my-keys/{key.pk}/rename", headers=HTMX).status_code == 200
