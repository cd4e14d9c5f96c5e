"""People: the identity is a normalised, unique email; staff use the admin with a password."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from accounts.models import User

pytestmark = pytest.mark.django_db


def test_email_is_trimmed_and_lower_cased():
    user = User.objects.create_user("  Ann.Lee@Example.COM ")
    assert user.email == "ann.lee@example.com"


def test_the_same_address_in_another_case_is_the_same_person():
    User.objects.create_user("ann@example.com")
    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.create_user("ANN@example.com")


def test_the_database_refuses_an_email_that_is_not_normalised():
    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.bulk_create([User(email="Bob@Example.com")])


def test_people_get_no_usable_password_staff_do():
    person = User.objects.create_user("ann@example.com")
    staff = User.objects.create_superuser("boss@example.com", "a-long-password-1")
    assert not person.has_usable_password()
    assert staff.is_staff and staff.check_password("a-long-password-1")


def test_natural_key_lookup_ignores_case(client):
    User.objects.create_superuser("boss@example.com", "a-long-password-1")
    assert client.login(username="BOSS@example.com", password="a-long-password-1")


def test_staff_signs_in_to_the_admin_with_a_password(client):
    User.objects.create_superuser("boss@example.com", "a-long-password-1")
    response = client.post(
        "/admin/login/?next=/admin/",
        {"username": "boss@example.com", "password": "a-long-password-1"},
    )
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


def test_a_person_without_staff_cannot_use_the_admin(client):
    person = User.objects.create_user("ann@example.com")
    client.force_login(person)
    response = client.get("/admin/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_staff_add_a_person_in_the_admin(admin_client):
    response = admin_client.post(
        "/admin/accounts/user/add/", {"email": " New@Example.com ", "name": "New One"}
    )
    assert response.status_code == 302
    person = User.objects.get(email="new@example.com")
    assert person.name == "New One" and not person.has_usable_password()


def test_adding_a_known_address_again_is_refused_on_the_field(admin_client):
    User.objects.create_user("ann@example.com")
    response = admin_client.post("/admin/accounts/user/add/", {"email": "ANN@example.com"})
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert User.objects.filter(email="ann@example.com").count() == 1


def test_adding_staff_without_a_password_is_refused(admin_client):
    response = admin_client.post(
        "/admin/accounts/user/add/", {"email": "ops@example.com", "is_staff": "on"}
    )
    assert response.status_code == 200
    assert "Staff need a password" in response.content.decode()
    assert not User.objects.filter(email="ops@example.com").exists()


def test_people_list_is_searchable(admin_client):
    User.objects.create_user("ann@example.com", name="Ann Lee")
    User.objects.create_user("bob@example.com", name="Bob Ray")
    page = admin_client.get("/admin/accounts/user/", {"q": "lee"}).content.decode()
    assert "ann@example.com" in page and "bob@example.com" not in page
