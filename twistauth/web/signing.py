"""
Request signing (Toto's ``x-toto-hmac``, done right), per session.

A session that enabled signing (the ``session.enable_signing`` method hands
its key to the client once) must sign every request; an unsigned request on
such a session is refused, never downgraded.  The signature is
HMAC-SHA256, keyed with the session's own 256-bit key, over::

    METHOD \\n path?sorted-query \\n timestamp \\n nonce \\n hex(SHA-256(raw body))

sent as ``X-Twistauth-Timestamp`` (Unix seconds), ``X-Twistauth-Nonce`` (16 to
128 URL-safe characters) and ``X-Twistauth-Signature`` (lowercase hex).  It is
checked on the raw bytes before the body is parsed, with a constant-time
comparison; the timestamp must be within 300 s of the server's clock and a
nonce is accepted once within 600 s.  Responses are signed the same way over
``status \\n timestamp \\n request nonce \\n hex(SHA-256(body))``, so a response
cannot be replayed to another request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any, Dict
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from twistauth import redisconn
from twistauth.errors import AuthRequiredError

TIMESTAMP = b"x-twistauth-timestamp"
NONCE = b"x-twistauth-nonce"
SIGNATURE = b"x-twistauth-signature"
SKEW = 300
NONCE_LIFETIME = 600
_NONCE = re.compile(rb"[A-Za-z0-9_-]{16,128}\Z")


class SignatureError(AuthRequiredError):
    """The request's signature is missing or does not verify."""

    code = 40121
    name = "signature_invalid"
    default_message = "the request signature is missing or invalid"


class SignatureExpiredError(AuthRequiredError):
    """The signed request's timestamp is too far from the server's clock."""

    code = 40122
    name = "signature_expired"
    default_message = f"the request timestamp is more than {SKEW} seconds off"


class SignatureReplayedError(AuthRequiredError):
    """The signed request's nonce was used before."""

    code = 40123
    name = "signature_replayed"
    default_message = "this request nonce was already used"


class INonceStore(Interface):
    """
    Remembers nonces for a while.
    """

    def first_use(key: str, lifetime: float) -> Any:
        """
        Record ``key``.

        :return: Deferred firing with ``True`` the first time a key is seen
            within ``lifetime`` seconds, ``False`` after that.
        """


@implementer(INonceStore)
class MemoryNonceStore:
    """
    Nonces in memory, expired on the injected clock (one process).
    """

    def __init__(self, clock: IReactorTime, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._seen: Dict[str, float] = {}

    def first_use(self, key: str, lifetime: float) -> Deferred[bool]:
        now = self._clock.seconds()
        if len(self._seen) >= self._max_entries:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return succeed(False)
        self._seen[key] = now + lifetime
        return succeed(True)


@implementer(INonceStore)
class RedisNonceStore:
    """
    Nonces in Redis (``SET key 1 NX EX lifetime``), shared by every process.

    :param redis: a connection from `twistauth.redisconn.connect`.
    :param clock: the clock call deadlines run on.
    :param timeout: seconds a Redis call may take (then 503).
    """

    def __init__(
        self, redis: Any, clock: IReactorTime, timeout: float, prefix: str = "twistauth:nonce:"
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._timeout = timeout
        self._prefix = prefix

    def first_use(self, key: str, lifetime: float) -> Deferred[bool]:
        d = redisconn.call(
            self._clock,
            self._timeout,
            self._redis.execute_command,
            "SET",
            self._prefix + key,
            "1",
            "NX",
            "EX",
            str(int(lifetime)),
            what="the nonce store",
        )
        return d.addCallback(lambda answer: answer is not None)


def _key(encoded: str) -> bytes:
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def canonical_target(uri: bytes) -> bytes:
    """
    ``path?sorted-query`` of a request URI.
    """
    path, _, query = uri.partition(b"?")
    if not query:
        return path
    pairs = sorted(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    return path + b"?" + urlencode(pairs).encode("latin-1")


def request_signature(
    key: str, method: bytes, uri: bytes, timestamp: bytes, nonce: bytes, body: bytes
) -> str:
    """
    The signature a client sends (hex).
    """
    base = b"\n".join(
        [
            method.upper(),
            canonical_target(uri),
            timestamp,
            nonce,
            hashlib.sha256(body).hexdigest().encode(),
        ]
    )
    return hmac.new(_key(key), base, hashlib.sha256).hexdigest()


def response_signature(key: str, status: int, timestamp: bytes, nonce: bytes, body: bytes) -> str:
    """
    The signature of a response (hex).
    """
    base = b"\n".join([b"%d" % status, timestamp, nonce, hashlib.sha256(body).hexdigest().encode()])
    return hmac.new(_key(key), base, hashlib.sha256).hexdigest()


def verify_request(
    request: Any, body: bytes, key: str, session_id: str, clock: IReactorTime, nonces: INonceStore
) -> Deferred[bytes]:
    """
    Check a signed request.

    :return: Deferred firing with the request's nonce (to sign the response
        with) or failing with a `SignatureError` subclass.
    """
    timestamp = request.getHeader(TIMESTAMP)
    nonce = request.getHeader(NONCE)
    signature = request.getHeader(SIGNATURE)
    if timestamp is None or nonce is None or signature is None:
        raise SignatureError("this session signs its requests: the signature headers are missing")
    if not _NONCE.match(nonce):
        raise SignatureError("the nonce must be 16 to 128 URL-safe characters")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise SignatureError("the timestamp must be whole Unix seconds") from None
    expected = request_signature(key, request.method, request.uri, timestamp, nonce, body)
    if not hmac.compare_digest(signature.lower(), expected.encode("ascii")):
        raise SignatureError()
    if abs(clock.seconds() - sent_at) > SKEW:
        raise SignatureExpiredError()
    scoped = hashlib.sha256(session_id.encode() + b"\0" + nonce).hexdigest()

    def checked(first: bool) -> bytes:
        if not first:
            raise SignatureReplayedError()
        return nonce

    return nonces.first_use(scoped, NONCE_LIFETIME).addCallback(checked)


def sign_response(
    request: Any, key: str, nonce: bytes, status: int, body: bytes, clock: IReactorTime
) -> None:
    """
    Add the response signature headers.
    """
    timestamp = b"%d" % int(clock.seconds())
    request.setHeader(TIMESTAMP, timestamp)
    request.setHeader(
        SIGNATURE, response_signature(key, status, timestamp, nonce, body).encode("ascii")
    )
