#!/usr/bin/env bash
# System packages the tests need, from Debian: PostgreSQL (the database tests start a throw-away cluster),
# Chromium (the chat app's browser tests) and g++ (our C++ kernels, which the tests compare with the
# PyTorch ops). Installs only what is missing; needs root or sudo.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${need[*]} (apt)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts a cluster of its own on install; the tests start their own instead.
$SUDO service postgresql stop >/dev/null 2>&1 || true
