"""
aiohttp with aiohttp-session, as its users would write it: the JSON echo
behind a session check.

``--store sealed``
    ``EncryptedCookieStorage`` (Fernet, from ``cryptography``) with the
    32-byte key in ``BENCH_SESSION_KEY`` (base64url).
``--store redis``
    ``RedisStorage`` over ``redis.asyncio`` at ``BENCH_REDIS_URL`` (redis-py
    parses with ``hiredis`` when it is installed).

``POST /login`` makes the session (its cookie comes back in
``Set-Cookie``); ``POST /api`` answers 401 without one.

Usage: ``python session_aiohttp.py --port N --store sealed|redis``
"""

from __future__ import annotations

import base64
import os
import sys

from _echo import answer, port_from_argv
from aiohttp import web
from aiohttp_session import get_session, new_session, setup

UNAUTHORIZED = b'{"error":{"code":40100,"value":"auth required"}}'


async def login(request: web.Request) -> web.Response:
    session = await new_session(request)
    session["user_id"] = "bench"
    return web.Response(body=b'{"result":true}', content_type="application/json")


async def api(request: web.Request) -> web.Response:
    session = await get_session(request)
    if "user_id" not in session:
        return web.Response(body=UNAUTHORIZED, status=401, content_type="application/json")
    status, body = answer(await request.read())
    return web.Response(body=body, status=status, content_type="application/json")


def main() -> None:
    kind = sys.argv[sys.argv.index("--store") + 1]
    app = web.Application()
    if kind == "sealed":
        from aiohttp_session.cookie_storage import EncryptedCookieStorage

        raw = os.environ["BENCH_SESSION_KEY"]
        key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        setup(app, EncryptedCookieStorage(key, cookie_name="sid"))
    elif kind == "redis":
        from aiohttp_session.redis_storage import RedisStorage
        from redis import asyncio as aioredis

        setup(app, RedisStorage(aioredis.from_url(os.environ["BENCH_REDIS_URL"]), cookie_name="sid"))
    else:
        raise SystemExit(f"unknown --store {kind!r}")
    app.router.add_post("/login", login)
    app.router.add_post("/api", api)
    web.run_app(app, host="127.0.0.1", port=port_from_argv(sys.argv), print=None)


if __name__ == "__main__":
    main()
