#!/usr/bin/env bash
# What bench/run.py needs beyond the test extras: wrk, redis-server and
# valgrind (Debian) and the peer servers it compares against (aiohttp, aiohttp-session,
# redis-py with hiredis, tornado, from PyPI).  Installs only what is missing.
#
#   PYTHON=.venv/bin/python bash bench/setup.sh          the CPython side
#   PYTHON=.venv/bin/python bash bench/setup.sh --pypy   the same, plus the PyPy side
#
# --pypy also prepares .venv-pypy (the venv tests/pypy.sh uses): Debian's
# pypy3 (PyPy 3.9), pypy3-venv and pypy3-dev (headers: argon2-cffi-bindings
# builds from source for PyPy 3.9), then twistauth's dependencies (Twisted,
# Klein, txredisapi, prometheus_client ...; cryptography as a wheel only,
# --only-binary: its newest releases have no PyPy 3.9 wheel and building one
# needs Rust).  The bench needs no peers (aiohttp, tornado) under PyPy: the
# scenarios leave out a server whose modules are missing.  See
# docs/performance.rst ("CPython or PyPy").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYPY=no
[ "${1:-}" = "--pypy" ] && PYPY=yes
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v valgrind >/dev/null || need_apt+=(valgrind)  # bench/inproc.py --instructions
if [ "$PYPY" = yes ]; then
    if ! command -v pypy3 >/dev/null || ! pypy3 -c 'import ensurepip, venv' 2>/dev/null; then
        need_apt+=(pypy3 pypy3-venv)
    fi
    dpkg -s pypy3-dev >/dev/null 2>&1 || need_apt+=(pypy3-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

need_pip=()
"$PYTHON" -c "import aiohttp" 2>/dev/null || need_pip+=(aiohttp)
"$PYTHON" -c "import tornado" 2>/dev/null || need_pip+=(tornado)
"$PYTHON" -c "import twisted, klein" 2>/dev/null || need_pip+=(twisted klein)
# The sessions scenario: aiohttp-session's EncryptedCookieStorage (Fernet,
# from cryptography) and RedisStorage (redis.asyncio); hiredis speeds up
# both redis-py and txredisapi.
"$PYTHON" -c "import aiohttp_session" 2>/dev/null || need_pip+=(aiohttp-session)
"$PYTHON" -c "import cryptography" 2>/dev/null || need_pip+=(cryptography)
"$PYTHON" -c "import redis, hiredis" 2>/dev/null || need_pip+=("redis[hiredis]")
if [ ${#need_pip[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q "${need_pip[@]}"
fi
echo "bench: wrk, taskset, redis-server, aiohttp, aiohttp-session, redis, tornado, twisted and klein are ready for $PYTHON"

if [ "$PYPY" = yes ]; then
    VENV=.venv-pypy
    [ -x "$VENV/bin/python" ] || pypy3 -m venv "$VENV"
    # The servers import twistauth from the work tree (bench/run.py puts it
    # first on PYTHONPATH); installing the package brings its dependencies.
    if ! "$VENV/bin/python" -c "import twisted, klein, txredisapi, prometheus_client, argon2, attrs" \
            2>/dev/null; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            --only-binary cryptography .
    fi
    echo "bench: $VENV/bin/python is ready ($("$VENV/bin/python" -c \
        'import sys, twisted; print("PyPy", sys.version.split()[0], "Twisted", twisted.__version__)'))"
fi
