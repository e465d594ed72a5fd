#!/usr/bin/env bash
# Run twistauth's tests under PyPy (Debian's pypy3, PyPy 3.9) in .venv-pypy.
#
#   bash tests/pypy.sh              the PyPy subset below (about 2 minutes)
#   bash tests/pypy.sh --all        every test file
#   bash tests/pypy.sh [--all] ARGS extra pytest arguments (e.g. -x, -k name);
#                                   test files among them: run only those
#
# The subset: the core (settings, method registry, codecs, envelope,
# dispatch, the JSON endpoint, transport, every session cache through the
# conformance suite, logout wiring, the memory bus) and everything else that
# runs in a few seconds, including the worker-process, graceful-stop and
# SIGHUP tests and the Redis-backed ones (redis-server from tests/setup.sh).
# Left out, for time only: each passes under PyPy, but spends its time in
# interpreter start-ups of many short-lived child processes or in
# wall-clock outage and browser scenarios that test nothing
# interpreter-specific (run them with --all):
#   test_accounts_yamlfile  (~30 s on PyPy, 11 s on CPython: dozens of child processes)
#   test_bus_redis          (~15 s either way: Redis restarts and reconnect back-off)
#   test_browser, test_oidc_op  (Chromium and a Node OpenID provider)
#   test_oidc_processes     (worker processes racing a refresh)
#
# Dependencies: cryptography is taken as a wheel only (--only-binary): the
# newest releases have no PyPy 3.9 wheel and building one needs a Rust
# toolchain and the network, so pip picks the newest release that has one.
# The venv is reused: dependencies are installed again only when setup.py or
# this script change, and twistauth itself when its files change (~8 s).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
if ! command -v pypy3 >/dev/null || ! pypy3 -c 'import ensurepip, venv' 2>/dev/null; then
    need_apt+=(pypy3 pypy3-venv)
fi
command -v redis-server >/dev/null || need_apt+=(redis-server)
# PyPy's headers: argon2-cffi-bindings has no PyPy 3.9 wheel and builds.
dpkg -s pypy3-dev >/dev/null 2>&1 || need_apt+=(pypy3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

VENV=.venv-pypy
PY=$VENV/bin/python
[ -x "$PY" ] || pypy3 -m venv "$VENV"

# The test tools (setup.py's test extra also has mypy, ruff and Sphinx,
# which CI runs on CPython only).
TOOLS=(pytest pytest-twisted hypothesis)
deps=$(cat setup.py "$0" | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.twistauth-deps" 2>/dev/null)" != "$deps" ]; then
    "$PY" -m pip install -q --disable-pip-version-check "${TOOLS[@]}"
    "$PY" -m pip install -q --disable-pip-version-check --only-binary cryptography .
    echo "$deps" > "$VENV/.twistauth-deps"
fi
# The tests import twistauth from this tree, but the twistd smoke test runs
# the installed package and plugin, as a user would: reinstall it (never
# -e: an editable install hides the plugin) whenever the tree changed.
tree=$(find twistauth twisted/plugins -name '*.py' -o -name '*.html' -o -name '*.css' \
           -o -name '*.js' -o -name '*.svg' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.twistauth-tree" 2>/dev/null)" != "$tree" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall .
    echo "$tree" > "$VENV/.twistauth-tree"
fi

SUBSET=(
    # the core
    tests/test_settings.py tests/test_registry.py tests/test_codec.py
    tests/test_envelope.py tests/test_dispatch.py tests/test_api.py
    tests/test_transport.py tests/test_sessions_conformance.py
    tests/test_logout_wiring.py tests/test_bus_memory.py
    # operations: worker processes, graceful stop, reload
    tests/test_workers.py tests/test_workers_processes.py
    tests/test_reload.py tests/test_reload_processes.py tests/test_tap.py
    # operations: logging, metrics, health, Redis faults, several machines
    tests/test_app_observe.py tests/test_app_health.py tests/test_ops_processes.py
    tests/test_redis_faults.py tests/test_sentinel.py tests/test_machines.py
    tests/test_bench.py
    # everything else that is quick
    tests/test_errors.py tests/test_site.py tests/test_smoke.py
    tests/test_access.py tests/test_access_rules.py
    tests/test_accounts_build.py tests/test_accounts_methods.py
    tests/test_accounts_passwords.py tests/test_accounts_store.py
    tests/test_accounts_throttle.py tests/test_app_redis.py
    tests/test_bus_handlers.py tests/test_events_http.py
    tests/test_caching.py tests/test_caching_redis.py tests/test_redisconn.py
    tests/test_sessions_client.py tests/test_sessions_memory.py
    tests/test_sessions_redis.py tests/test_sessions_sealing.py
    tests/test_identity_client.py tests/test_identity_config.py
    tests/test_identity_discovery.py tests/test_identity_http.py
    tests/test_identity_jose.py tests/test_identity_jwks.py
    tests/test_identity_logout.py tests/test_identity_logs.py
    tests/test_identity_provider.py tests/test_identity_redirects.py
    tests/test_oidc_login.py tests/test_oidc_logout.py tests/test_oidc_stores.py
    tests/test_oidc_tokens.py
    tests/test_health.py tests/test_metrics.py tests/test_observe_alerts.py
    tests/test_observe_pipeline.py tests/test_observe_redact.py
)
targets=("${SUBSET[@]}")
if [ "${1:-}" = "--all" ]; then
    shift
    targets=(tests)
fi
for arg in "$@"; do
    # Test files or directories given: run just those.
    if [ -e "${arg%%::*}" ]; then
        targets=()
        break
    fi
done

# What the issue measured: PyPy's default nursery let a server's memory grow
# under load on these VMs; 4MB keeps it flat.  The servers these tests start
# inherit it (and a --processes parent sets it for its workers on PyPy).
export PYPY_GC_NURSERY=${PYPY_GC_NURSERY:-4MB}
echo "+ $("$PY" -c 'import sys, twisted; print(sys.version.split()[0], sys.version.split("[")[1].rstrip("]"), "Twisted", twisted.__version__)')"
exec "$PY" -m pytest -q "${targets[@]}" "$@"
