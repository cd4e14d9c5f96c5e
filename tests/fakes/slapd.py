"""A real OpenLDAP server (Debian's slapd) for tests, started by the test run on 127.0.0.1 with
a throw-away configuration and database in a temporary directory: a base DN, an OU of people
with passwords, and a service account. `make test` installs slapd (scripts/ldap.sh); a run
outside it skips these tests when slapd is missing, with the reason."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
BASE_DN = "dc=example,dc=com"
PEOPLE_DN = f"ou=people,{BASE_DN}"
SERVICE_DN = f"cn=portal,{BASE_DN}"
SERVICE_PASSWORD = "service-secret"
STARTUP_DEADLINE = 30  # seconds slapd gets to answer, generously: a loaded CI machine


@dataclass(frozen=True)
class Person:
    uid: str
    password: str
    mail: str | None
    cn: str

    @property
    def dn(self) -> str:
        return f"uid={self.uid},{PEOPLE_DN}"


PEOPLE = (
    Person("ann", "ann-secret", "Ann.Lee@Example.com", "Ann Lee"),
    Person("bo", "bo-secret", "bo@example.com", "Bo Chen"),
    Person("cy", "cy-secret", None, "Cy Nomail"),  # no mail attribute at all
    Person("dee", "dee-secret", "dee@elsewhere.org", "Dee Out"),
    Person("eve", "eve-secret", "eve@example.com", "Eve Gone"),
)


@dataclass(frozen=True)
class Slapd:
    url: str
    port: int
    ca_file: str = ""  # with tls=True: the CA that signed the server's certificate


def slapd_or_skip() -> None:
    """Skips without slapd, except under `make test` (scripts/test.sh), which installs it and
    where a missing slapd must fail loudly instead of passing by skipping."""
    if Path(SLAPD).is_file() and Path(SLAPADD).is_file():
        return
    message = ("Debian's slapd is not installed (`make test` installs it: scripts/ldap.sh; "
               "or apt-get install slapd ldap-utils)")
    if os.environ.get("KEYPORTAL_REQUIRE_SLAPD"):
        pytest.fail(message)
    pytest.skip(message)


def _ldif() -> str:
    entries = [
        f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
        "o: Example\n",
        f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: portal\nuserPassword: {SERVICE_PASSWORD}\n",
    ]
    for p in PEOPLE:
        entry = (f"dn: {p.dn}\nobjectClass: inetOrgPerson\nuid: {p.uid}\ncn: {p.cn}\n"
                 f"sn: {p.cn.split()[-1]}\nuserPassword: {p.password}\n")
        if p.mail:
            entry += f"mail: {p.mail}\n"
        entries.append(entry)
    return "\n".join(entries)


def _certificates(root: Path) -> Path:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it (for StartTLS); returns
    the CA's file, which the portal is given as PORTAL_LDAP_CA_FILE."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test directory CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (root / "ca.pem").write_bytes(ca.public_bytes(pem))
    (root / "cert.pem").write_bytes(cert.public_bytes(pem))
    (root / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return root / "ca.pem"


def _config(root: Path, *, anonymous_search: bool, tls: bool) -> str:
    # Passwords are readable by nobody and usable for binds; the people's entries by the
    # service account always, and by anonymous readers only when the test says so (many
    # directories, Active Directory among them, refuse anonymous searches).
    anonymous = "by anonymous read" if anonymous_search else "by anonymous none"
    tls_lines = (f"TLSCACertificateFile {root}/ca.pem\nTLSCertificateFile {root}/cert.pem\n"
                 f"TLSCertificateKeyFile {root}/key.pem\n") if tls else ""
    return tls_lines + f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
database mdb
maxsize 10485760
suffix "{BASE_DN}"
rootdn "cn=admin,{BASE_DN}"
rootpw admin-secret
directory {root}/db
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{SERVICE_DN}" read by self read {anonymous} by * read
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    import ldap

    connection = ldap.initialize(url)
    connection.set_option(ldap.OPT_NETWORK_TIMEOUT, 2)
    connection.set_option(ldap.OPT_TIMEOUT, 2)
    try:
        connection.simple_bind_s(SERVICE_DN, SERVICE_PASSWORD)
        return True
    except ldap.LDAPError:
        return False
    finally:
        try:
            connection.unbind_s()
        except ldap.LDAPError:
            pass


@contextmanager
def running_slapd(*, anonymous_search: bool = True, tls: bool = False) -> Iterator[Slapd]:
    slapd_or_skip()
    with tempfile.TemporaryDirectory(prefix="keyportal-slapd-") as tmp:
        root = Path(tmp)
        (root / "db").mkdir()
        conf = root / "slapd.conf"
        ca_file = str(_certificates(root)) if tls else ""
        conf.write_text(_config(root, anonymous_search=anonymous_search, tls=tls))
        (root / "people.ldif").write_text(_ldif())
        subprocess.run([SLAPADD, "-f", str(conf), "-l", str(root / "people.ldif")],
                       check=True, capture_output=True, timeout=60)
        port = _free_port()
        url = f"ldap://127.0.0.1:{port}"
        # -d 0: stays in the foreground (no fork), so the test run owns the process and ends it.
        process = subprocess.Popen(
            [SLAPD, "-f", str(conf), "-h", f"{url}/", "-d", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + STARTUP_DEADLINE
            while not _answers(url):
                if process.poll() is not None:
                    raise RuntimeError(f"slapd exited: {process.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"slapd did not answer on {url} in {STARTUP_DEADLINE}s")
                time.sleep(0.05)  # polling for a state, bounded by the deadline above
            yield Slapd(url=url, port=port, ca_file=ca_file)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
