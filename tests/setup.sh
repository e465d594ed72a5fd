#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine with Python 3.9+:
# the Debian packages the integration tests talk to, and a virtualenv in .venv
# with twistauth and its test extras installed (pip install ., never -e: an
# editable install hides the twistd plugin).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs npm)
# ip netns and veth, for the packet-dropping Redis fault test (R3).
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --force-reinstall --no-deps .
.venv/bin/python -m pip install -q '.[test]'

# The browser tests drive Debian's Chromium with playwright-core (no browser
# download); the OpenID integration tests run a real provider on Node.
for node_project in tests/browser tests/op; do
    if [ -f "$node_project/package-lock.json" ]; then
        npm ci --prefix "$node_project" --no-audit --no-fund --loglevel=error
    fi
done
