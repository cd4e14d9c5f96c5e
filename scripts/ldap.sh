#!/usr/bin/env bash
# Usage: ldap.sh build | server
#   build:  what pip needs to build python-ldap (no wheel exists for Linux): OpenLDAP's and
#           Cyrus SASL's headers (libldap2-dev, libsasl2-dev) and a C compiler. The Makefile runs
#           it before installing requirements.txt, for `make run` and `make test` alike.
#   server: Debian's OpenLDAP server and tools (slapd, ldap-utils) for tests/accounts/test_ldap.py,
#           which starts its own slapd on 127.0.0.1 with a throw-away configuration. slapd's
#           package may set up and start a default directory of its own; the tests never use it.
# Idempotent; needs root only when something is missing.
set -euo pipefail
here="$(dirname "$0")"
case "${1:-}" in
  build)
    exec bash "$here/apt-install.sh" "python-ldap's build dependencies" \
      "test -f /usr/include/ldap.h && test -f /usr/include/sasl/sasl.h && command -v gcc" \
      libldap2-dev libsasl2-dev gcc
    ;;
  server)
    exec bash "$here/apt-install.sh" "slapd (OpenLDAP server)" \
      "test -x /usr/sbin/slapd && test -x /usr/sbin/slapadd && command -v ldapsearch" \
      slapd ldap-utils
    ;;
  *)
    echo "usage: $0 build|server" >&2
    exit 2
    ;;
esac
