"""The OpenAPI description (/api/schema) and its page (/api/docs): the document is valid
OpenAPI 3.1, every URL that answers JSON is in it, and every documented answer is provoked
for real and checked against the documented schema (and no undocumented status comes back)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.http import HttpResponse
from django.test import Client
from django.urls import URLPattern
from django.utils import timezone
from django.utils.html import escape
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from accounts.models import User
from keyportal import openapi
from keyportal.api import MAX_BODY_BYTES
from keyportal.locks import lease_acquire
from pool.models import ApiKey
from tests.conftest import MANAGEMENT_KEY
from tests.pool.conftest import make_ready_keys, ready_keys, staff, token  # noqa: F401
from tests.usage.conftest import issue, served
from usage import services as usage_services
from usage.models import ModelPrice

pytestmark = pytest.mark.django_db

OPENAPI_JSON = "application/vnd.oai.openapi+json"
FORMATS = Draft202012Validator.FORMAT_CHECKER


def _schema_of(client: Client) -> dict[str, Any]:
    response = client.get("/api/schema")
    assert response.status_code == 200
    return json.loads(response.content)


def _is_json(response: HttpResponse) -> bool:
    media = response.get("Content-Type", "").split(";")[0].strip()
    return media == "application/json" or media.endswith("+json")


def _validator(doc: dict[str, Any], ref: str) -> Draft202012Validator:
    # OpenAPI 3.1 schemas are JSON Schema 2020-12: the whole document is one resource, so
    # the components' $refs resolve inside it.
    registry = Registry().with_resource("urn:openapi", Resource(doc, DRAFT202012))
    return Draft202012Validator({"$ref": "urn:openapi" + ref}, registry=registry,
                                format_checker=FORMATS)


def _operation(doc: dict[str, Any], url_name: str, method: str) -> dict[str, Any]:
    return doc["paths"][openapi.path_of(url_name)][method]


def _documented() -> set[tuple[str, str, int]]:
    return {(op.url_name, op.method, code) for op in openapi.operations() for code in op.answers}


# --- the document ---------------------------------------------------------------------------


def test_the_schema_is_valid_openapi_31_with_the_requests_server(client, settings):
    settings.ALLOWED_HOSTS = ["portal.example.org"]
    response = client.get("/api/schema", HTTP_HOST="portal.example.org", secure=True)

    assert response.status_code == 200 and response["Content-Type"] == OPENAPI_JSON
    doc = json.loads(response.content)
    validate(doc)  # openapi-spec-validator picks the 3.1 validator from `openapi`
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"] == [{"url": "https://portal.example.org"}]
    assert set(doc["components"]["securitySchemes"]) == {"session", "csrf", "token"}


def test_an_invalid_document_would_be_caught(client):
    # The validator above is not a formality: a broken reference is refused.
    doc = _schema_of(client)
    doc["paths"]["/api/my-keys"]["post"]["responses"]["200"]["content"][openapi.JSON][
        "schema"] = {"$ref": "#/components/schemas/NoSuchThing"}
    with pytest.raises(Exception, match="NoSuchThing"):
        validate(doc)


def test_dates_and_emails_are_really_checked():
    # jsonschema skips a format whose checker library is missing; these must be checked.
    assert {"date-time", "date", "email"} <= set(FORMATS.checkers)


def test_every_example_on_the_docs_page_matches_its_schema(client):
    doc = _schema_of(client)
    for name in doc["components"]["schemas"]:
        ref = f"#/components/schemas/{name}"
        made_up = openapi.example({"$ref": ref}, doc["components"]["schemas"])
        _validator(doc, ref).validate(made_up)


# --- every JSON endpoint is documented ------------------------------------------------------

HTML_ONLY = {"api-docs"}  # under /api/ but a page


def _site_patterns() -> list[tuple[str, URLPattern]]:
    return [(route, p) for route, p in openapi.url_patterns() if not route.startswith("admin/")]


def _sample_url(route: str) -> str:
    samples = {"int": "1", "str": "x", "slug": "x", "path": "x",
               "uuid": "00000000-0000-0000-0000-000000000000"}
    return "/" + re.sub(r"<(?:(\w+):)?\w+>", lambda m: samples[m.group(1) or "str"], route)


def test_every_api_url_is_documented_and_every_documented_name_exists():
    documented = {op.url_name for op in openapi.operations()}
    api_names = {p.name for route, p in _site_patterns() if route.startswith("api/")}

    assert api_names - HTML_ONLY <= documented, "an /api/ URL is missing from keyportal/openapi.py"
    for name in documented:
        assert openapi.route_of(name)  # raises LookupError for a stale name


def test_every_url_that_answers_json_is_documented(fake_proxy, staff, token):  # noqa: F811
    """Calls every URL of the site (the admin aside) the ways a script could: with a staff API
    token (GET and POST, CSRF enforced as in production) and as a staff session. Any JSON
    answer must come from a documented path."""
    documented = {openapi.route_of(op.url_name) for op in openapi.operations()}
    answered_json = set()
    script = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {token}")
    browser = Client(enforce_csrf_checks=True)
    for route, _pattern in _site_patterns():
        url = _sample_url(route)
        browser.force_login(staff)  # again each time: a URL may sign out
        answers = [script.get(url), script.post(url, "{}", content_type=openapi.JSON),
                   browser.get(url)]
        if any(_is_json(a) for a in answers):
            answered_json.add(route)

    assert answered_json - documented == set()
    # The probe does reach JSON: every documented path answered it at least once.
    assert answered_json == documented


def test_documented_methods_are_exactly_what_the_views_allow(token):  # noqa: F811
    script = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    methods: dict[str, set[str]] = {}
    for op in openapi.operations():
        methods.setdefault(op.url_name, set()).add(op.method.upper())
    for url_name, allowed in methods.items():
        url = _sample_url(openapi.route_of(url_name))
        refused = script.put(url)
        assert refused.status_code == 405, url
        assert set(refused["Allow"].split(", ")) == allowed, url


# --- real answers against the schema --------------------------------------------------------

Case = Callable[[pytest.FixtureRequest], HttpResponse]
CASES: list[tuple[str, str, int, str, Case]] = []


def case(url_name: str, method: str, status: int, label: str = "") -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES.append((url_name, method, status, label or fn.__name__, fn))
        return fn

    return register


def _post(client: Client, url: str, body: Any = None, **extra: Any) -> HttpResponse:
    data = body if isinstance(body, str) else json.dumps(body or {})
    return client.post(url, data, content_type=openapi.JSON, **extra)


def _signed_in(fx: Callable[[str], Any], who: str) -> Client:
    client = Client()
    client.force_login(fx(who))
    return client


def _by_token(fx: Callable[[str], Any]) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {fx('token')}")


def _with_usage(fx: Callable[[str], Any]) -> ApiKey:
    """Ann holds a key with priced and unpriced usage in the last hours; returns it."""
    fx("ann")
    held = issue(1, ["ann@example.com"])[0]
    ModelPrice.objects.create(model="mock-gpt", input=Decimal("1"), output=Decimal("2"),
                              cache_read=Decimal("0.1"), cache_write=Decimal("1.25"))
    at = timezone.now() - timedelta(hours=1)
    served(held.key, at=at, requests=3)
    served(held.key, at=at, model="unpriced-model", requests=2, failed=True)
    return held.key


def _ann_key(fx: Callable[[str], Any]) -> ApiKey:
    fx("ann")
    return issue(1, ["ann@example.com"])[0].key


_TOO_BIG = json.dumps({"label": "x" * MAX_BODY_BYTES})

# register-key


@case("api-register-key", "post", 201)
def register_by_session(fx):
    fx("ready_keys")
    return _post(_signed_in(fx, "ann"), "/api/register-key", {"label": "ci"})


@case("api-register-key", "post", 201, "register_for_someone_by_token")
def register_by_token(fx):
    fx("ready_keys")
    return _post(_by_token(fx), "/api/register-key", {"email": "new@example.com"})


@case("api-register-key", "post", 400)
def register_bad_label(fx):
    fx("ready_keys")
    return _post(_signed_in(fx, "ann"), "/api/register-key", {"label": 5})


@case("api-register-key", "post", 401)
def register_anonymous(fx):
    return _post(Client(), "/api/register-key")


@case("api-register-key", "post", 403)
def register_for_someone_else_by_session(fx):
    fx("ready_keys")
    return _post(_signed_in(fx, "ann"), "/api/register-key", {"email": "bob@example.com"})


@case("api-register-key", "post", 403, "register_without_csrf")
def register_without_csrf(fx):
    client = Client(enforce_csrf_checks=True)
    client.force_login(fx("ann"))
    return _post(client, "/api/register-key")


@case("api-register-key", "post", 403, "register_over_a_limit")
def register_over_a_limit(fx):
    key = _ann_key(fx)
    fx("ready_keys")
    User.objects.filter(email="ann@example.com").update(limit_tokens_day=10)
    served(key, at=timezone.now(), requests=1)
    return _post(_signed_in(fx, "ann"), "/api/register-key", {"label": "ci"})


@case("api-register-key", "post", 405)
def register_by_get(fx):
    return _signed_in(fx, "ann").get("/api/register-key")


@case("api-register-key", "post", 409)
def register_for_a_deactivated_person(fx):
    fx("ready_keys")
    User.objects.create_user("gone@example.com", is_active=False)
    return _post(_by_token(fx), "/api/register-key", {"email": "gone@example.com"})


@case("api-register-key", "post", 413)
def register_too_big(fx):
    return _post(_signed_in(fx, "ann"), "/api/register-key", _TOO_BIG)


@case("api-register-key", "post", 429)
def register_too_often(fx):
    fx("ready_keys")
    fx("settings").PORTAL_RATE_KEYS_PER_PERSON = 0
    return _post(_signed_in(fx, "ann"), "/api/register-key")


@case("api-register-key", "post", 503)
def register_from_an_empty_pool(fx):
    return _post(_signed_in(fx, "ann"), "/api/register-key")


# my-keys


@case("api-my-keys", "post", 200)
def my_keys(fx):
    _ann_key(fx)
    return _post(_signed_in(fx, "ann"), "/api/my-keys")


@case("api-my-keys", "post", 400)
def my_keys_not_an_object(fx):
    return _post(_signed_in(fx, "ann"), "/api/my-keys", "[]")


@case("api-my-keys", "post", 401)
def my_keys_bad_token(fx):
    return _post(Client(HTTP_AUTHORIZATION="Bearer kpt_wrong"), "/api/my-keys")


@case("api-my-keys", "post", 403)
def my_keys_of_someone_else(fx):
    return _post(_signed_in(fx, "ann"), "/api/my-keys", {"email": "bob@example.com"})


@case("api-my-keys", "post", 404)
def my_keys_of_nobody(fx):
    return _post(_by_token(fx), "/api/my-keys", {"email": "nobody@example.com"})


@case("api-my-keys", "post", 405)
def my_keys_by_get(fx):
    return _signed_in(fx, "ann").get("/api/my-keys")


@case("api-my-keys", "post", 413)
def my_keys_form_body_over_djangos_limit(fx):
    fx("settings").DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    return _signed_in(fx, "ann").post("/api/my-keys", "a=" + "x" * 5000,
                                      content_type="application/x-www-form-urlencoded")


# revoke-key


@case("api-revoke-key", "post", 200)
def revoke(fx):
    key = _ann_key(fx)
    return _post(_signed_in(fx, "ann"), "/api/revoke-key", {"id": key.pk})


@case("api-revoke-key", "post", 400)
def revoke_without_id(fx):
    return _post(_signed_in(fx, "ann"), "/api/revoke-key", {})


@case("api-revoke-key", "post", 401)
def revoke_anonymous(fx):
    return _post(Client(), "/api/revoke-key", {"id": 1})


@case("api-revoke-key", "post", 403)
def revoke_for_someone_else(fx):
    return _post(_signed_in(fx, "ann"), "/api/revoke-key",
                 {"id": 1, "email": "bob@example.com"})


@case("api-revoke-key", "post", 404)
def revoke_someone_elses_key(fx):
    key = _ann_key(fx)
    return _post(_signed_in(fx, "bob"), "/api/revoke-key", {"id": key.pk})


@case("api-revoke-key", "post", 405)
def revoke_by_get(fx):
    return _signed_in(fx, "ann").get("/api/revoke-key")


@case("api-revoke-key", "post", 413)
def revoke_too_big(fx):
    return _post(_signed_in(fx, "ann"), "/api/revoke-key", _TOO_BIG)


# rename-key


@case("api-rename-key", "post", 200)
def rename(fx):
    key = _ann_key(fx)
    return _post(_signed_in(fx, "ann"), "/api/rename-key", {"id": key.pk, "label": "box"})


@case("api-rename-key", "post", 400)
def rename_without_label(fx):
    key = _ann_key(fx)
    return _post(_signed_in(fx, "ann"), "/api/rename-key", {"id": key.pk})


@case("api-rename-key", "post", 401)
def rename_anonymous(fx):
    return _post(Client(), "/api/rename-key", {"id": 1, "label": "x"})


@case("api-rename-key", "post", 403)
def rename_for_someone_else(fx):
    return _post(_signed_in(fx, "ann"), "/api/rename-key",
                 {"id": 1, "label": "x", "email": "bob@example.com"})


@case("api-rename-key", "post", 404)
def rename_someone_elses_key(fx):
    key = _ann_key(fx)
    return _post(_signed_in(fx, "bob"), "/api/rename-key", {"id": key.pk, "label": "x"})


@case("api-rename-key", "post", 405)
def rename_by_get(fx):
    return _signed_in(fx, "ann").get("/api/rename-key")


@case("api-rename-key", "post", 413)
def rename_too_big(fx):
    return _post(_signed_in(fx, "ann"), "/api/rename-key", _TOO_BIG)


# key-pool-status


@case("api-key-pool-status", "get", 200)
def pool_status(fx):
    fx("ready_keys")
    _ann_key(fx)
    return _by_token(fx).get("/api/key-pool-status")


@case("api-key-pool-status", "get", 401)
def pool_status_anonymous(fx):
    return Client().get("/api/key-pool-status")


@case("api-key-pool-status", "get", 403)
def pool_status_not_staff(fx):
    return _signed_in(fx, "ann").get("/api/key-pool-status")


@case("api-key-pool-status", "get", 405)
def pool_status_by_post(fx):
    return _post(_by_token(fx), "/api/key-pool-status")


# user-stats


@case("api-user-stats", "get", 200)
def user_stats(fx):
    _with_usage(fx)
    return _signed_in(fx, "ann").get("/api/user-stats/ann@example.com")


@case("api-user-stats", "get", 200, "user_stats_without_usage")
def user_stats_empty(fx):
    return _signed_in(fx, "ann").get("/api/user-stats/ann@example.com")


@case("api-user-stats", "get", 401)
def user_stats_anonymous(fx):
    return Client().get("/api/user-stats/ann@example.com")


@case("api-user-stats", "get", 403)
def user_stats_of_someone_else(fx):
    fx("ann")
    return _signed_in(fx, "bob").get("/api/user-stats/ann@example.com")


@case("api-user-stats", "get", 404)
def user_stats_of_nobody(fx):
    return _by_token(fx).get("/api/user-stats/nobody@example.com")


@case("api-user-stats", "get", 405)
def user_stats_by_post(fx):
    return _post(_signed_in(fx, "ann"), "/api/user-stats/ann@example.com")


# all-users-stats


@case("api-all-users-stats", "get", 200)
def all_users_stats(fx):
    _with_usage(fx)
    return _by_token(fx).get("/api/all-users-stats")


@case("api-all-users-stats", "get", 401)
def all_users_stats_anonymous(fx):
    return Client().get("/api/all-users-stats")


@case("api-all-users-stats", "get", 403)
def all_users_stats_not_staff(fx):
    return _signed_in(fx, "ann").get("/api/all-users-stats")


@case("api-all-users-stats", "get", 405)
def all_users_stats_by_post(fx):
    return _post(_by_token(fx), "/api/all-users-stats")


# sync-usage


@case("api-sync-usage", "post", 200)
def sync_usage(fx):
    fx("ann")
    held = issue(1, ["ann@example.com"])[0]
    proxy = fx("fake_proxy")
    proxy.add_usage(held.value)
    proxy.add_usage("operator-own-key")
    return _post(_by_token(fx), "/api/sync-usage")


@case("api-sync-usage", "post", 401)
def sync_usage_anonymous(fx):
    return _post(Client(), "/api/sync-usage")


@case("api-sync-usage", "post", 403)
def sync_usage_not_staff(fx):
    return _post(_signed_in(fx, "ann"), "/api/sync-usage")


@case("api-sync-usage", "post", 405)
def sync_usage_by_get(fx):
    return _by_token(fx).get("/api/sync-usage")


@case("api-sync-usage", "post", 409)
def sync_usage_while_another_runs(fx):
    fx("fake_proxy")
    assert lease_acquire(name=usage_services.SYNC_LEASE, ttl=timedelta(minutes=5))
    return _post(_by_token(fx), "/api/sync-usage")


@case("api-sync-usage", "post", 413)
def sync_usage_form_body_over_djangos_limit(fx):
    # The session's CSRF check reads the form body, where Django refuses the size.
    fx("settings").DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    client = Client(enforce_csrf_checks=True)
    client.force_login(fx("staff"))
    client.cookies["csrftoken"] = "a" * 32  # with a cookie, the check goes on to the form
    return client.post("/api/sync-usage", "a=" + "x" * 5000,
                       content_type="application/x-www-form-urlencoded")


@case("api-sync-usage", "post", 502)
def sync_usage_refused_by_the_proxy(fx):
    fx("fake_proxy")
    fx("settings").CLIPROXY_MANAGEMENT_KEY = "wrong-" + MANAGEMENT_KEY
    return _post(_by_token(fx), "/api/sync-usage")


# the staff reports


@case("staff-leaderboard", "get", 200)
def leaderboard(fx):
    _with_usage(fx)
    return _by_token(fx).get("/staff/leaderboard", {"period": "7d", "by": "cost"})


@case("staff-leaderboard", "get", 200, "leaderboard_all_time_by_default")
def leaderboard_all_time(fx):
    _with_usage(fx)
    return _by_token(fx).get("/staff/leaderboard", {"period": "all"})


@case("staff-leaderboard", "get", 400)
def leaderboard_unknown_period(fx):
    return _by_token(fx).get("/staff/leaderboard", {"period": "fortnight"})


@case("staff-leaderboard", "get", 401)
def leaderboard_bad_token(fx):
    return Client(HTTP_AUTHORIZATION="Bearer kpt_wrong").get("/staff/leaderboard")


@case("staff-leaderboard", "get", 405)
def leaderboard_by_post(fx):
    return _post(_by_token(fx), "/staff/leaderboard")


@case("usage-export", "get", 200)
def export(fx):
    _with_usage(fx)
    today = timezone.localdate()
    return _by_token(fx).get("/staff/export", {"from": str(today - timedelta(days=1)),
                                               "to": str(today)})


@case("usage-export", "get", 400)
def export_without_dates(fx):
    return _by_token(fx).get("/staff/export", {"from": "yesterday"})


@case("usage-export", "get", 400, "export_dates_out_of_range")
def export_dates_out_of_range(fx):
    return _by_token(fx).get("/staff/export", {"from": "9999-12-31", "to": "9999-12-31"})


@case("usage-export", "get", 401)
def export_bad_token(fx):
    return Client(HTTP_AUTHORIZATION="Bearer kpt_wrong").get("/staff/export")


@case("usage-export", "get", 405)
def export_by_post(fx):
    return _post(_by_token(fx), "/staff/export")


# the description itself


@case("api-schema", "get", 200)
def schema(fx):
    return Client().get("/api/schema")


@case("api-schema", "get", 405)
def schema_by_post(fx):
    return _post(Client(), "/api/schema")


def test_every_documented_answer_has_a_case():
    provoked = {(url_name, method, status) for url_name, method, status, _l, _f in CASES}
    assert provoked == _documented()


@pytest.mark.parametrize(
    ("url_name", "method", "status", "make"),
    [pytest.param(u, m, s, f, id=label) for u, m, s, label, f in CASES],
)
def test_real_answers_match_the_schema(request, client, url_name, method, status, make):
    doc = _schema_of(client)
    documented = _operation(doc, url_name, method)["responses"]

    response = make(request.getfixturevalue)

    assert str(response.status_code) in documented, (
        f"{url_name} answered {response.status_code}, which is not documented")
    assert response.status_code == status
    answer = documented[str(status)]
    if "headers" in answer:
        assert set(answer["headers"]) <= set(response.headers)
    content = answer.get("content")
    if not content:
        assert response.content == b""
        return
    (media, described), = content.items()
    assert response["Content-Type"].split(";")[0] == media
    schema = described["schema"]
    if media == "text/csv":
        text = b"".join(response.streaming_content).decode("utf-8-sig")  # after the BOM
        assert text.splitlines()[0].startswith("date,email,")
    elif media == OPENAPI_JSON:
        validate(json.loads(response.content))
    else:
        _validator(doc, schema["$ref"]).validate(json.loads(response.content))


def test_a_field_the_schema_does_not_list_fails_the_check(client):
    # The response objects are closed: a view that grows a field must grow the schema too.
    doc = _schema_of(client)
    pool = {"total": 1, "unused": 1, "assigned": 0}
    _validator(doc, "#/components/schemas/PoolStatus").validate(pool)
    with pytest.raises(Exception, match="extra"):
        _validator(doc, "#/components/schemas/PoolStatus").validate({**pool, "extra": 1})
    with pytest.raises(Exception, match="date-time"):
        _validator(doc, "#/components/schemas/Key").validate({
            "id": 1, "label": "", "masked": "sk…1", "status": "active", "proxy_state": "pushed",
            "issued_at": "yesterday", "last_used_at": None, "revoked_at": None,
        })


# --- the docs page --------------------------------------------------------------------------


def test_the_docs_page_lists_every_endpoint(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/api/docs")

    assert response.status_code == 200
    page = response.content.decode()
    for op in openapi.operations():
        assert f"{op.method.upper()} {openapi.path_of(op.url_name)}" in page
        assert escape(str(op.summary)) in page
    assert "Authorization: Bearer" in page and "X-CSRFTOKEN" in page
    assert escape('"error": "Authentication required."') in page
    assert "sk-kp-3f…9a1c" in page  # a made-up example, never a real key
    assert "the person named by <code>email</code>" in page and "`" not in page
    assert "string: today, 7d, 30d, all (default: 7d)" in page


def test_the_docs_page_for_a_signed_in_person(client, ann, django_assert_num_queries):
    client.force_login(ann)
    with django_assert_num_queries(2):  # the session and the person
        response = client.get("/api/docs")
    assert response.status_code == 200 and "ann@example.com" in response.content.decode()


def test_the_docs_page_keeps_the_content_security_policy(client):
    response = client.get("/api/docs")
    page = response.content.decode()
    assert "default-src 'self'" in response["Content-Security-Policy"]
    assert " style=" not in page and "<style" not in page
    assert re.findall(r"<script(?![^>]*\ssrc=)", page) == []
    assert "http://" not in page.replace("http://testserver", "")
