#!/usr/bin/env bash
# Usage: apt-install.sh WHAT CHECK PACKAGE...
# Installs Debian PACKAGEs with apt-get unless the shell command CHECK already succeeds, then
# checks again. WHAT names the tool in messages. Idempotent; needs root only to install.
# scripts/browser.sh and scripts/gettext.sh use it.
set -euo pipefail

what="$1" check="$2"
shift 2
if bash -c "$check" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "$what is missing and installing it needs root: sudo apt-get install $*" >&2
  exit 1
fi
echo "== installing $what (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
bash -c "$check" >/dev/null 2>&1 || { echo "$what could not be installed" >&2; exit 1; }
