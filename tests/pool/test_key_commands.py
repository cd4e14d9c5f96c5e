"""generate_keys and reconcile_keys against the fake proxy (a real HTTP server)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from pool.models import ApiKey, key_digest
from pool.services import key_value_new

pytestmark = pytest.mark.django_db

FOREIGN = ["operator-own-key-1", "operator-own-key-2"]
Status, State = ApiKey.Status, ApiKey.ProxyState


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def issue(key: ApiKey, email: str = "ann@example.com") -> ApiKey:
    """Hands a pool key to a person the way issuing does (value dropped, hash kept)."""
    owner, _ = User.objects.get_or_create(email=email)
    ApiKey.objects.filter(pk=key.pk).update(status=Status.ACTIVE, owner=owner, value=None)
    key.refresh_from_db()
    return key


def test_generate_500_keeps_foreign_keys_and_writes_once(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    out = run("generate_keys", "--count", "500")

    assert len(fake_proxy.api_keys) == 502
    assert fake_proxy.api_keys[:2] == FOREIGN
    assert fake_proxy.requests_to("/api-keys", "PUT") == 1
    assert not any(m in ("PATCH", "DELETE") for m, _ in fake_proxy.management_requests)
    assert ApiKey.objects.filter(status=Status.POOL, proxy_state=State.PUSHED).count() == 500
    assert "created 500/500 keys" in out and "Created 500 pool keys" in out
    # Nothing the portal stores or prints holds a key it pushed, beyond the pool's own rows.
    assert not any(v in out for v in fake_proxy.api_keys[2:5])


def test_reconcile_right_after_generate_changes_nothing(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "500")
    before = list(fake_proxy.api_keys)
    writes = fake_proxy.requests_to("/api-keys", "PUT")

    out = run("reconcile_keys")

    assert "No change." in out
    assert fake_proxy.api_keys == before
    assert fake_proxy.requests_to("/api-keys", "PUT") == writes


def test_generated_keys_work_at_the_proxy(fake_proxy, proxy_accepts):
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "3")
    key = ApiKey.objects.first()
    assert key.value.startswith("sk-kp-") and len(key.value) >= 6 + 32
    assert proxy_accepts(key.value)
    assert not proxy_accepts(key_value_new())


def test_pool_key_deleted_at_the_proxy_is_put_back(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "5")
    lost = fake_proxy.api_keys[3]
    fake_proxy.api_keys = [k for k in fake_proxy.api_keys if k != lost]

    out = run("reconcile_keys")

    assert lost in fake_proxy.api_keys and len(fake_proxy.api_keys) == 7
    assert "1 pool keys added to the proxy" in out
    assert fake_proxy.api_keys[:2] == FOREIGN
    assert "No change." in run("reconcile_keys")


def test_revoked_key_is_removed_and_foreign_keys_stay(fake_proxy, proxy_accepts):
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "3")
    key = issue(ApiKey.objects.first())
    plaintext = next(k for k in fake_proxy.api_keys if key_digest(k) == key.key_hash)
    assert proxy_accepts(plaintext)
    ApiKey.objects.filter(pk=key.pk).update(status=Status.REVOKED, proxy_state=State.REMOVAL_PENDING)

    out = run("reconcile_keys")

    assert plaintext not in fake_proxy.api_keys
    assert fake_proxy.api_keys[:2] == FOREIGN and len(fake_proxy.api_keys) == 4
    assert not proxy_accepts(plaintext)
    key.refresh_from_db()
    assert key.proxy_state == State.REMOVED
    assert "1 revoked, suspended or expired keys removed" in out


def test_issued_key_lost_by_the_proxy_is_marked_missing_not_pushed(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "2")
    key = issue(ApiKey.objects.first())
    fake_proxy.api_keys = [k for k in fake_proxy.api_keys if key_digest(k) != key.key_hash]

    out = run("reconcile_keys")

    key.refresh_from_db()
    assert key.proxy_state == State.MISSING
    assert len(fake_proxy.api_keys) == 3  # nothing could be pushed for it
    assert "1 issued keys found missing" in out
    assert "No change." in run("reconcile_keys")


def test_duplicate_copies_of_portal_keys_are_dropped_foreign_duplicates_kept(fake_proxy):
    fake_proxy.api_keys = ["dup-foreign", "dup-foreign"]
    run("generate_keys", "--count", "1")
    mine = fake_proxy.api_keys[-1]
    fake_proxy.api_keys = fake_proxy.api_keys + [mine]

    run("reconcile_keys")

    assert fake_proxy.api_keys == ["dup-foreign", "dup-foreign", mine]


def test_reconcile_refills_the_pool_below_the_minimum(fake_proxy, settings):
    settings.PORTAL_POOL_MIN, settings.PORTAL_POOL_TARGET = 5, 10
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "4")

    out = run("reconcile_keys")

    assert ApiKey.objects.filter(status=Status.POOL, proxy_state=State.PUSHED).count() == 10
    assert len(fake_proxy.api_keys) == 12
    assert "6 new pool keys created" in out
    assert "No change." in run("reconcile_keys")


def test_reconcile_never_leaves_the_list_empty(fake_proxy, proxy_accepts):
    run("generate_keys", "--count", "1")
    key = issue(ApiKey.objects.get())
    only = fake_proxy.api_keys[0]
    ApiKey.objects.filter(pk=key.pk).update(status=Status.REVOKED)

    run("reconcile_keys")

    assert fake_proxy.api_keys and only not in fake_proxy.api_keys
    guard = ApiKey.objects.get(status=Status.POOL)
    assert fake_proxy.api_keys == [guard.value]
    assert not proxy_accepts(only)


def test_reconcile_of_an_empty_proxy_and_portal_closes_the_proxy(fake_proxy, proxy_accepts):
    assert proxy_accepts("anything at all")  # the open-proxy trap, as the real one
    run("reconcile_keys")
    assert len(fake_proxy.api_keys) == 1
    assert not proxy_accepts("anything at all")


def test_dry_run_changes_nothing(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "3")
    lost = fake_proxy.api_keys[-1]
    fake_proxy.api_keys = fake_proxy.api_keys[:-1]
    keys_before = ApiKey.objects.count()

    out = run("reconcile_keys", "--dry-run")

    assert "Dry run" in out and "Would change: 1 pool keys added" in out
    assert lost not in fake_proxy.api_keys
    assert fake_proxy.requests_to("/api-keys", "PUT") == 1  # generate's only
    assert ApiKey.objects.count() == keys_before


def test_unknown_keys_with_the_portal_prefix_are_left_alone(fake_proxy):
    stray = key_value_new()
    fake_proxy.api_keys = [stray]
    out = run("reconcile_keys")
    assert stray in fake_proxy.api_keys
    assert "carry the portal's prefix but are unknown" in out


# --- failures -------------------------------------------------------------------------------


def test_wrong_management_key_sends_one_request_and_names_the_setting(fake_proxy, settings):
    settings.CLIPROXY_MANAGEMENT_KEY = "wrong-key"
    with pytest.raises(CommandError) as caught:
        run("generate_keys", "--count", "500")
    assert len(fake_proxy.management_requests) == 1
    assert "CLIPROXY_MANAGEMENT_KEY" in str(caught.value)
    assert "wrong-key" not in str(caught.value)
    assert ApiKey.objects.count() == 0
    # A second command (cron a minute later) sends nothing and does not walk into the ban.
    with pytest.raises(CommandError, match="Nothing was sent"):
        run("reconcile_keys")
    assert len(fake_proxy.management_requests) == 1


def test_unreachable_proxy_is_one_sentence_and_creates_nothing(settings, db):
    settings.CLIPROXY_URL = "http://127.0.0.1:9"  # discard port: nothing listens
    settings.CLIPROXY_MANAGEMENT_KEY = "k"
    with pytest.raises(CommandError, match="cannot be reached") as caught:
        run("generate_keys", "--count", "5")
    assert "127.0.0.1:9" in str(caught.value)
    assert ApiKey.objects.count() == 0
    with pytest.raises(CommandError, match="cannot be reached"):
        run("reconcile_keys")


def test_garbage_answer_is_a_clear_error_and_nothing_is_written(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    fake_proxy.inject("/api-keys", body=b"<html>oops</html>")
    with pytest.raises(CommandError, match="not JSON"):
        run("reconcile_keys")
    assert fake_proxy.api_keys == FOREIGN
    assert ApiKey.objects.count() == 0


def test_timeout_is_a_clear_error(fake_proxy, settings):
    settings.CLIPROXY_TIMEOUT = 0.3
    fake_proxy.inject("/api-keys", delay=1.0, body={"api-keys": []})
    with pytest.raises(CommandError, match="did not answer within 0.3 s"):
        run("reconcile_keys")


def test_failed_push_keeps_keys_unpushed_for_reconcile(fake_proxy):
    fake_proxy.api_keys = list(FOREIGN)
    fake_proxy.config_read_only = True
    with pytest.raises(CommandError, match="3 keys were created but not pushed.*read-only"):
        run("generate_keys", "--count", "3")
    assert ApiKey.objects.filter(proxy_state=State.UNPUSHED).count() == 3
    assert fake_proxy.api_keys == FOREIGN

    fake_proxy.config_read_only = False
    run("reconcile_keys")
    assert ApiKey.objects.filter(proxy_state=State.PUSHED).count() == 3
    assert len(fake_proxy.api_keys) == 5


def test_a_push_whose_answer_was_lost_is_recognised(fake_proxy):
    """The PUT landed but the portal never heard: reconcile finds the keys there and files
    them as pushed without writing again."""
    fake_proxy.api_keys = list(FOREIGN)
    run("generate_keys", "--count", "2")
    ApiKey.objects.update(proxy_state=State.UNPUSHED)
    writes = fake_proxy.requests_to("/api-keys", "PUT")

    out = run("reconcile_keys")

    assert fake_proxy.requests_to("/api-keys", "PUT") == writes
    assert ApiKey.objects.filter(proxy_state=State.PUSHED).count() == 2
    assert "2 key states brought in line" in out


@pytest.mark.parametrize("count", ["0", "-3", "100001"])
def test_bad_count_is_refused(fake_proxy, count):
    with pytest.raises(CommandError, match="--count"):
        run("generate_keys", "--count", count)
    assert fake_proxy.management_requests == []


def test_not_configured_names_the_setting(settings, db):
    settings.CLIPROXY_URL = ""
    with pytest.raises(CommandError, match="CLIPROXY_URL"):
        run("reconcile_keys")


def test_a_dry_run_does_not_wait_for_the_write_lease(fake_proxy, monkeypatch):
    """The status page's dry run must not queue behind (or block) a real reconcile."""
    from keyportal.locks import lease
    from pool import services

    monkeypatch.setattr(services, "PROXY_WRITE_WAIT_SECONDS", 0)
    with lease(services.PROXY_WRITE_LEASE):
        assert "Dry run: nothing was changed." in run("reconcile_keys", "--dry-run")
        with pytest.raises(CommandError, match="Another portal process"):
            run("reconcile_keys")
