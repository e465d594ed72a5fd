"""
Tornado with its secure (signed) cookies, as its users would write it: the
JSON echo behind a session check, on the asyncio loop.

``--store sealed``
    The session is the ``sid`` secure cookie (``set_signed_cookie`` /
    ``get_signed_cookie``, HMAC-SHA256 with ``BENCH_SESSION_KEY``): signed,
    not encrypted, the closest Tornado comes to a client-side session.
``--store redis``
    The secure cookie holds a session id that is looked up with ``GET`` in
    the Redis at ``BENCH_REDIS_URL`` through ``redis.asyncio``.

``POST /login`` makes the session; ``POST /api`` answers 401 without one.

Usage: ``python session_tornado.py --port N --store sealed|redis``
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from typing import Any, Optional

from _echo import answer, port_from_argv
from tornado.web import Application, RequestHandler

UNAUTHORIZED = b'{"error":{"code":40100,"value":"auth required"}}'


class Base(RequestHandler):
    redis: Any = None

    def reply(self, status: int, body: bytes) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(body)


class Login(Base):
    async def post(self) -> None:
        if self.redis is None:
            self.set_signed_cookie("sid", json.dumps({"user_id": "bench"}))
        else:
            sid = secrets.token_urlsafe(32)
            await self.redis.set("session:" + sid, json.dumps({"user_id": "bench"}), ex=3600)
            self.set_signed_cookie("sid", sid)
        self.reply(200, b'{"result":true}')


class Api(Base):
    async def post(self) -> None:
        cookie = self.get_signed_cookie("sid")
        session: Optional[bytes] = None
        if cookie is not None:
            if self.redis is None:
                session = cookie
            else:
                session = await self.redis.get(b"session:" + cookie)
        if session is None or "user_id" not in json.loads(session):
            self.reply(401, UNAUTHORIZED)
            return
        self.reply(*answer(self.request.body))


async def serve(port: int, kind: str) -> None:
    if kind == "redis":
        from redis import asyncio as aioredis

        Base.redis = aioredis.from_url(os.environ["BENCH_REDIS_URL"])
    elif kind != "sealed":
        raise SystemExit(f"unknown --store {kind!r}")
    app = Application(
        [(r"/login", Login), (r"/api", Api)], cookie_secret=os.environ["BENCH_SESSION_KEY"]
    )
    app.listen(port, address="127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(serve(port_from_argv(sys.argv), sys.argv[sys.argv.index("--store") + 1]))
    except KeyboardInterrupt:
        pass
