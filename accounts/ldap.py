"""Sign-in with a company account from an LDAP directory (OpenLDAP, Active Directory), with
django-auth-ldap finding the account and binding as it (python-ldap underneath).

django-auth-ldap is used for the directory half only: the search for the account's DN (as
the service account, or anonymously), the bind with the person's password, the attributes.
It is never in AUTHENTICATION_BACKENDS, so the admin's password form and anything else that
calls django.contrib.auth.authenticate() never reaches the directory: staff keep their own
password. Its own user creation (a Django user named after the LDAP username) is skipped: the
person is the directory's email address, found or created by `person_for_provider` as for an
OpenID Connect sign-in (accounts/services.py), and signed in as a person's session.

That split goes through django-auth-ldap's per-sign-in object `_LDAPUser` (its
`_authenticate_user_dn`, its attributes and connection): not its public API, hence the exact
pin in requirements.txt; tests/accounts/test_ldap.py covers each path against a real slapd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from django.views.decorators.http import require_POST

from accounts.forms import LdapLoginForm, LoginForm
from accounts.models import User
from accounts.ratelimit import ldap_attempt_limited, ldap_failure_count
from accounts.services import SignInRefused, person_for_provider, provider_signin_refused
from accounts.signin import provider_login
from keyportal.audit import client_ip

METHOD_LDAP = "ldap"
# The provider id of every LDAP sign-in's link (allauth's SocialAccount.provider) and audit row.
PROVIDER_LDAP = "ldap"
# Attributes read for a person: never `*` (a directory entry may hold a readable password
# hash or much else the portal has no use for).
_BASE_ATTRS = ("cn", "displayName", "name")


def ldap_enabled() -> bool:
    return bool(settings.PORTAL_LDAP_URL)


def ldap_server_name() -> str:
    """The directory's host, for staff (audit rows, the admin): never its credentials."""
    return urlsplit(settings.PORTAL_LDAP_URL).hostname or settings.PORTAL_LDAP_URL


class DirectoryError(Exception):
    """The directory could not be asked: down or slow (`unreachable`), or it refused the
    portal itself (the service account's password, StartTLS, a search it does not allow)."""

    def __init__(self, name: str, *, unreachable: bool) -> None:
        super().__init__(name)
        self.unreachable = unreachable


class WrongCredentials(Exception):
    """No single account matches the username, or its password is wrong (or empty)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # for the audit row: which of the two, never shown to the person


@dataclass(frozen=True)
class DirectoryAccount:
    dn: str
    username: str
    email: str  # as the directory holds it ("" when the attribute is missing or empty)
    name: str


def _backend() -> Any:
    """A django-auth-ldap backend configured from the PORTAL_LDAP_* settings at call time (a
    new one per sign-in: it holds the connection, and tests change the settings)."""
    import ldap
    from django_auth_ldap.backend import LDAPBackend, ldap_error
    from django_auth_ldap.config import LDAPSearch, LDAPSettings

    ldap_error.connect(_search_failed, sender=LDAPBackend, dispatch_uid="portal-ldap-search")
    backend = LDAPBackend()
    conf = LDAPSettings()  # django-auth-ldap's defaults; the portal sets no AUTH_LDAP_* setting
    timeout = settings.PORTAL_LDAP_TIMEOUT
    conf.SERVER_URI = settings.PORTAL_LDAP_URL
    conf.BIND_DN = settings.PORTAL_LDAP_BIND_DN
    conf.BIND_PASSWORD = settings.PORTAL_LDAP_BIND_PASSWORD
    conf.START_TLS = settings.PORTAL_LDAP_START_TLS
    attrs = sorted({settings.PORTAL_LDAP_EMAIL_ATTR, *_BASE_ATTRS})
    if settings.PORTAL_LDAP_USER_DN_TEMPLATE:
        conf.USER_DN_TEMPLATE = settings.PORTAL_LDAP_USER_DN_TEMPLATE
        conf.USER_ATTRLIST = attrs
        # Read the entry as the person, after their bind (a directory often hides entries
        # from anonymous readers, and there is no service account in this mode).
        conf.BIND_AS_AUTHENTICATING_USER = True
    else:
        conf.USER_SEARCH = LDAPSearch(
            settings.PORTAL_LDAP_USER_SEARCH_BASE, ldap.SCOPE_SUBTREE,
            settings.PORTAL_LDAP_USER_FILTER, attrlist=attrs,
        )
    options: dict[int, Any] = {
        # Every call is bounded: the TCP connect, and each operation (bind, search, StartTLS).
        ldap.OPT_NETWORK_TIMEOUT: timeout,
        ldap.OPT_TIMEOUT: timeout,
        # Active Directory answers searches at the domain's root with referrals to other
        # partitions, which libldap would chase anonymously: not followed.
        ldap.OPT_REFERRALS: 0,
    }
    if settings.PORTAL_LDAP_CA_FILE:
        options[ldap.OPT_X_TLS_CACERTFILE] = settings.PORTAL_LDAP_CA_FILE
        options[ldap.OPT_X_TLS_NEWCTX] = 0  # last: builds the TLS context with the file above
    conf.CONNECTION_OPTIONS = options
    backend.settings = conf
    return backend


def _attr(attrs: dict[str, list[str]] | None, name: str) -> str:
    """The first non-empty value of attribute `name` (directories differ in its case)."""
    for key, values in (attrs or {}).items():
        if key.lower() == name.lower():
            return next((str(v).strip() for v in values if str(v).strip()), "")
    return ""


def _search_failed(sender: Any, *, request: HttpRequest | None = None, exception: Exception,
                   **kwargs: Any) -> None:
    """A search that fails inside django-auth-ldap (the server went away, a timeout) is logged
    and reported through its ldap_error signal, then looks like "no such user": noted on the
    request, which only this sign-in holds, so that it reads as the directory's fault."""
    failures = getattr(request, "_portal_ldap_failures", None)
    if failures is not None:
        failures.append(exception)


def _raise_for(error: Exception) -> NoReturn:
    import ldap

    if isinstance(error, ldap.NO_SUCH_OBJECT):
        # The search base is not there, or not visible to whoever searched (OpenLDAP answers
        # so when its rules hide the base from anonymous readers): nobody to find.
        raise WrongCredentials(f"search found no base: {type(error).__name__}") from None
    # libldap answers CONNECT_ERROR when TLS fails (an untrusted certificate): the portal's
    # settings to fix, not a directory that is down (SERVER_DOWN) or slow.
    unreachable = (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.TIMELIMIT_EXCEEDED)
    raise DirectoryError(
        type(error).__name__, unreachable=isinstance(error, unreachable)
    ) from None


@sensitive_variables()  # every local: the password also passes through django-auth-ldap's frames
def directory_account(*, request: HttpRequest, username: str, password: str) -> DirectoryAccount:
    """The directory account `username` names, once the directory accepted `password` for it.

    Raises WrongCredentials (unknown username, several accounts for it, wrong or empty
    password) or DirectoryError (the directory could not be asked). An empty password is
    refused here, before any bind: LDAP takes a simple bind with a DN and no password as an
    anonymous bind, which "succeeds"."""
    import ldap
    from django_auth_ldap.backend import _LDAPUser

    username = username.strip()
    if not username or not password:
        raise WrongCredentials("empty username or password")
    backend = _backend()
    user = _LDAPUser(backend, username=username, request=request)
    failures: list[Exception] = []
    request._portal_ldap_failures = failures  # type: ignore[attr-defined]
    try:
        # Searches for the DN (bound as the service account or anonymously), then binds as it.
        user._authenticate_user_dn(password)
        attrs = user.attrs
    except _LDAPUser.AuthenticationFailed as failed:
        if failures:  # the search itself failed: said below
            _raise_for(failures[0])
        raise WrongCredentials(str(failed)) from None
    except ldap.LDAPError as error:
        _raise_for(error)
    finally:
        del request._portal_ldap_failures  # type: ignore[attr-defined]
        connection = user._connection
        if connection is not None:
            try:
                connection.unbind_s()
            except ldap.LDAPError:
                pass
    if failures:
        _raise_for(failures[0])
    return DirectoryAccount(
        dn=str(user.dn), username=username,
        email=_attr(attrs, settings.PORTAL_LDAP_EMAIL_ATTR),
        name=_attr(attrs, "displayName") or _attr(attrs, "cn") or _attr(attrs, "name"),
    )


# --- The sign-in ------------------------------------------------------------------------------


def _is_email(value: str) -> bool:
    try:
        validate_email(value)
    except ValidationError:
        return False
    return True


@sensitive_variables()  # every local: the password also passes through django-auth-ldap's frames
def ldap_sign_in(*, request: HttpRequest, username: str, password: str) -> User:
    """The person whose company account this is, after the directory accepted the password;
    created on their first sign-in (accounts/services.py `person_for_provider`). Refusals are
    audited and raise WrongCredentials, DirectoryError or SignInRefused (its message is
    for the person); nothing is created then."""
    ip = client_ip(request)
    server = ldap_server_name()
    try:
        account = directory_account(request=request, username=username, password=password)
    except WrongCredentials as wrong:
        ldap_failure_count(username=username)
        provider_signin_refused(provider=PROVIDER_LDAP, email="", ip=ip,
                                reason=f"user {username.strip()[:100]!r}: {wrong.reason}")
        raise
    except DirectoryError as error:
        state = "unreachable" if error.unreachable else "refused the portal"
        provider_signin_refused(provider=PROVIDER_LDAP, email="", ip=ip,
                                reason=f"directory {server} {state}: {error}")
        raise
    if not _is_email(account.email):
        # Missing, empty, or not an address at all (an attribute that holds a name): the
        # address is who the person is, so without one nobody is signed in or created.
        provider_signin_refused(
            provider=PROVIDER_LDAP, email="", ip=ip,
            reason=f"{account.dn}: no valid {settings.PORTAL_LDAP_EMAIL_ATTR} attribute",
        )
        raise SignInRefused(_(
            "Your company account has no email address in the directory, so the portal cannot "
            "tell who you are. Ask your administrator to add one, or sign in with an emailed "
            "link."
        ))
    return person_for_provider(
        # The directory's address is set by its administrators, not typed in by the person:
        # it counts as verified (docs/sign-in.md says what that trusts).
        provider=PROVIDER_LDAP, provider_name=server, uid=account.dn, email=account.email,
        email_verified=True, name=account.name,
        claims={"dn": account.dn, "username": account.username, "email": account.email},
        method=METHOD_LDAP, ip=ip,
    )


def _login_page(request: HttpRequest, ldap_form: LdapLoginForm, status: int) -> HttpResponse:
    # The same page as /login, with the emailed-link form and the provider buttons beside.
    from accounts.views import login_page_context, with_provider_policy

    link_form = LoginForm()
    # The cursor goes back to this form (its password), not to the emailed-link form's address.
    link_form.fields["email"].widget.attrs.pop("autofocus", None)
    ldap_form.fields["password"].widget.attrs["autofocus"] = True
    return with_provider_policy(render(
        request, "accounts/login.html",
        login_page_context(request, form=link_form, ldap_form=ldap_form), status=status,
    ))


@never_cache
@sensitive_post_parameters("ldap-password")
@require_POST
def ldap_login(request: HttpRequest) -> HttpResponse:
    """The /login page's company-account form."""
    if not ldap_enabled():
        raise Http404
    form = LdapLoginForm(request.POST)
    if not form.is_valid():
        return _login_page(request, form, 400)
    username = form.cleaned_data["username"]
    if ldap_attempt_limited(ip=client_ip(request), username=username):
        form.add_error(None, _("Too many attempts. Please wait %(minutes)d minutes and try again.")
                       % {"minutes": settings.PORTAL_RATE_WINDOW_SECONDS // 60})
        return _login_page(request, form, 429)
    try:
        user = ldap_sign_in(request=request, username=username,
                            password=form.cleaned_data["password"])
    except WrongCredentials:
        form.add_error(None, _("The username or password is wrong."))
        return _login_page(request, form, 400)
    except DirectoryError as error:
        if error.unreachable:
            form.add_error(None, _("The company directory cannot be reached right now. Please "
                                   "try again later, or sign in with an emailed link."))
        else:  # the portal's own settings or rights at the directory: staff must act
            form.add_error(None, _("The company directory refused the portal's request. Please "
                                   "tell your administrator, or sign in with an emailed link."))
        return _login_page(request, form, 503)
    except SignInRefused as refused:
        return render(request, "accounts/signin_refused.html",
                      {"provider": _("your company account"), "message": refused.message},
                      status=403)
    provider_login(request, user, method=METHOD_LDAP)
    return HttpResponseRedirect(reverse("my-keys"), status=303)
