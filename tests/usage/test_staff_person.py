"""/staff/people/<id>: one person's usage for staff (charts, keys masked, limits and quota,
audit rows), behind the staff password like the other /staff pages; linked from the
leaderboard and the person's admin page, which hides permissions for non-staff people."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import User
from keyportal.audit import Action, audit_record
from pool.models import ApiKey
from tests.accounts.test_staff_signin import sign_in_by_link
from tests.usage.conftest import issue, served

pytestmark = pytest.mark.django_db
PASSWORD = "a-long-password-1"


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("boss@example.com", password=PASSWORD, is_staff=True)


@pytest.fixture
def ann(db):
    first, second = issue(2, ["ann@example.com"])
    person = first.key.owner
    person.limit_tokens_month = 2_000_000
    person.save()
    served(first.key, at=timezone.now(), model="m-one", requests=2, input_tokens=400_000,
           output_tokens=100_000)
    served(second.key, at=timezone.now() - timedelta(days=2), model="m-two", requests=1,
           input_tokens=10, output_tokens=0)
    audit_record(action=Action.KEY_REVOKED, actor=person, target=second.key,
                 target_label=second.key.masked)
    return first, second


def url(person: User) -> str:
    return f"/staff/people/{person.pk}"


def test_people_and_anonymous_visitors_are_sent_to_the_admin_login(client, ann):
    person = ann[0].key.owner
    assert client.get(url(person))["Location"].startswith("/admin/login/")
    client.force_login(person)  # not staff, even for their own page
    response = client.get(url(person))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_staff_signed_in_by_link_are_refused_too(client, ann, staff):
    sign_in_by_link(client, staff.email)
    response = client.get(url(ann[0].key.owner))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_staff_see_charts_keys_quota_and_audit_never_a_whole_key(client, ann, staff):
    client.force_login(staff)
    response = client.get(url(ann[0].key.owner), {"days": "7"})
    page = response.content.decode()
    assert response.status_code == 200
    assert all(h.value not in page for h in ann)
    assert ann[0].key.masked in page and ann[1].key.masked in page
    keys = page.split('id="person-keys"', 1)[1].split("</table>", 1)[0]
    assert keys.count("<tr><td>") == 2
    bar = page.split('data-limit="limit_tokens_month"', 1)[1].split("</li>", 1)[0]
    assert '<span class="quota-pct">50 %</span>' in bar
    chart = page.split('id="usage-chart"', 1)[1].split("</section>", 1)[0]
    assert 'data-total="tokens">1,000,010<' in chart and "m-one" in chart and "m-two" in chart
    audit = page.split('id="person-audit"', 1)[1].split("</table>", 1)[0]
    assert "key revoked" in audit and ann[1].key.masked in audit
    assert 'id="user-tools"' in page  # in the admin frame, with the user links


def test_an_unknown_person_is_404(client, staff):
    client.force_login(staff)
    assert client.get("/staff/people/999999").status_code == 404


@pytest.mark.parametrize("extra_keys", [0, 8])
def test_the_page_costs_the_same_queries_however_many_keys(
    client, ann, staff, django_assert_num_queries, extra_keys
):
    person = ann[0].key.owner
    for held in issue(extra_keys, [person.email]) if extra_keys else []:
        served(held.key, at=timezone.now(), requests=1)
    client.force_login(staff)
    # session, staff, the person, keys with sums, audit rows, quota, daily chart, and the
    # admin sidebar's two permission reads
    with django_assert_num_queries(9):
        response = client.get(url(person))
    assert response.status_code == 200


def test_the_leaderboard_links_each_person_to_their_page(client, ann, staff):
    client.force_login(staff)
    page = client.get("/staff/leaderboard", {"period": "30d"}).content.decode()
    assert f'href="/staff/people/{ann[0].key.owner.pk}"' in page


def test_the_person_admin_page_hides_permissions_for_non_staff_and_links_usage(client, ann):
    boss = User.objects.create_superuser("root@example.com", PASSWORD)
    client.force_login(boss)
    person = ann[0].key.owner
    page = client.get(f"/admin/accounts/user/{person.pk}/change/").content.decode()
    assert 'name="is_active"' in page and 'name="is_staff"' in page
    for hidden in ("is_superuser", "groups", "user_permissions"):
        assert f'name="{hidden}"' not in page
    assert f'href="/staff/people/{person.pk}"' in page
    # Staff accounts keep them.
    page = client.get(f"/admin/accounts/user/{boss.pk}/change/").content.decode()
    assert 'name="is_superuser"' in page and 'name="user_permissions"' in page


def test_saving_a_person_without_the_hidden_fields_keeps_them_unprivileged(client, ann):
    boss = User.objects.create_superuser("root@example.com", PASSWORD)
    client.force_login(boss)
    person = ann[0].key.owner
    form = {
        "email": person.email, "name": "Ann", "is_active": "on",
        "is_superuser": "on",  # not on the form: ignored
        "limit_tokens_month": "3000000",
    }
    response = client.post(f"/admin/accounts/user/{person.pk}/change/", form)
    assert response.status_code == 302
    person.refresh_from_db()
    assert person.limit_tokens_month == 3_000_000 and not person.is_superuser
    assert ApiKey.objects.filter(owner=person).count() == 2
