#!/usr/bin/env bash
# What bench/run.py needs beyond the test extras: wrk and redis-server
# (Debian) and the peer servers it compares against (aiohttp, aiohttp-session,
# redis-py with hiredis, tornado, from PyPI).  Installs only what is missing.  PyPy is not installed here: see docs/performance.rst.
set -euo pipefail
PYTHON=${PYTHON:-python3}

if ! command -v wrk >/dev/null || ! command -v taskset >/dev/null \
    || ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk util-linux redis-server
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
