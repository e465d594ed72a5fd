"""
Bare twisted.web doing the session work of a twistauth session cache and
nothing else, then the JSON echo; served by
``Site(root, parsePOSTFormSubmission=False)`` (the tuned floor's `Site`).

``POST /login`` makes a session and answers it in ``Set-Cookie: sid=...``;
``POST /api`` answers 401 unless the ``sid`` cookie names a live session.

``--store memory``
    The session id is looked up in a dict.
``--store sealed``
    The cookie is an AES-GCM sealed session (``cryptography``): 12 bytes of
    nonce then the sealed JSON, base64url; opening it is the session work.
    The key (base64url, 32 bytes) comes from ``BENCH_SESSION_KEY``.
``--store redis``
    The session id is looked up with ``GET`` in the Redis at
    ``BENCH_REDIS_URL`` through ``txredisapi`` (``convertNumbers=False``;
    txredisapi parses with ``hiredis`` when it is installed).

Usage: ``python session_bare.py --port N --store memory|sealed|redis``
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from typing import Any, Dict, Optional
from urllib.parse import urlparse

from _echo import answer, port_from_argv
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

UNAUTHORIZED = b'{"error":{"code":40100,"value":"auth required"}}'


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Store:
    """
    Makes a session (``create``) and finds it again from its cookie
    (``load``: the session dict, or ``None``, or a Deferred of either).
    """

    def create(self, session: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def load(self, cookie: str) -> Any:
        raise NotImplementedError


class MemoryStore(Store):
    def __init__(self) -> None:
        self.sessions: Dict[str, Dict[str, Any]] = {}

    def create(self, session: Dict[str, Any]) -> str:
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = session
        return sid

    def load(self, cookie: str) -> Optional[Dict[str, Any]]:
        return self.sessions.get(cookie)


class SealedStore(Store):
    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead = AESGCM(key)

    def create(self, session: Dict[str, Any]) -> str:
        nonce = os.urandom(12)
        return _b64encode(nonce + self.aead.encrypt(nonce, json.dumps(session).encode(), None))

    def load(self, cookie: str) -> Optional[Dict[str, Any]]:
        from cryptography.exceptions import InvalidTag

        try:
            raw = _b64decode(cookie)
            value = json.loads(self.aead.decrypt(raw[:12], raw[12:], None))
        except (InvalidTag, ValueError):
            return None
        return value if isinstance(value, dict) else None


class RedisStore(Store):
    def __init__(self, url: str) -> None:
        import txredisapi

        parsed = urlparse(url)
        self.redis = txredisapi.lazyConnectionPool(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 6379,
            dbid=int((parsed.path or "/0").strip("/") or 0),
            poolsize=1,
            convertNumbers=False,
        )

    def create(self, session: Dict[str, Any]) -> Any:
        sid = secrets.token_urlsafe(32)
        d = self.redis.set("session:" + sid, json.dumps(session), expire=3600)
        return d.addCallback(lambda _: sid)

    def load(self, cookie: str) -> Any:
        def decode(raw: Any) -> Optional[Dict[str, Any]]:
            return json.loads(raw) if raw is not None else None

        return self.redis.get("session:" + cookie).addCallback(decode)


def _finish(request: Any, status: int, body: bytes, cookie: Optional[str] = None) -> None:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    if cookie is not None:
        request.addCookie(b"sid", cookie.encode(), path=b"/", httpOnly=True)
    request.write(body)
    request.finish()


class Api(Resource):
    isLeaf = True

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def render_POST(self, request: Any) -> Any:
        if request.path == b"/login":
            from twisted.internet.defer import maybeDeferred

            d = maybeDeferred(self.store.create, {"user_id": "bench"})
            d.addCallback(lambda sid: _finish(request, 200, b'{"result":true}', sid))
            return NOT_DONE_YET
        body = request.content.read()
        cookie = request.getCookie(b"sid")
        if cookie is None:
            return self._answer(request, body, None)
        found = self.store.load(cookie.decode("ascii", "replace"))
        if isinstance(found, dict) or found is None:
            return self._answer(request, body, found)
        found.addCallback(lambda session: self._later(request, body, session))
        found.addErrback(lambda f: _finish(request, 500, b'{"error":"redis"}'))
        return NOT_DONE_YET

    def _answer(self, request: Any, body: bytes, session: Optional[Dict[str, Any]]) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if session is None:
            request.setResponseCode(401)
            return UNAUTHORIZED
        status, out = answer(body)
        request.setResponseCode(status)
        return out

    def _later(self, request: Any, body: bytes, session: Optional[Dict[str, Any]]) -> None:
        if session is None:
            _finish(request, 401, UNAUTHORIZED)
        else:
            _finish(request, *answer(body))


def main() -> None:
    kind = sys.argv[sys.argv.index("--store") + 1]
    store: Store
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sealed":
        store = SealedStore(_b64decode(os.environ["BENCH_SESSION_KEY"]))
    elif kind == "redis":
        store = RedisStore(os.environ["BENCH_REDIS_URL"])
    else:
        raise SystemExit(f"unknown --store {kind!r}")
    site = Site(Api(store), parsePOSTFormSubmission=False)
    reactor.listenTCP(port_from_argv(sys.argv), site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
