"""
Request ids, and loggers that stamp them on every event of a request.

Twisted runs many requests interleaved on one thread, so there is no
"current request" to read from (and contextvars do not follow every
Deferred chain).  The request object *is* the context in ``twisted.web``:
`RequestIds.assign` gives a request its id once (a random 64-bit id, or a
trusted proxy's ``X-Request-Id``), keeps it on the request, and sets the
``X-Request-Id`` response header.  Code handling the request logs through
`request_logger`, a `twisted.logger.Logger` that adds ``request_id`` to every
event it emits; the log formats print it and the JSON lines carry it.

`LogTag` turns an identifier that must not be logged (a session id) into a
short keyed hash that still lets one follow a session through the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
from typing import Any, Optional

from twisted.logger import Logger, LogLevel

REQUEST_ID_HEADER = b"X-Request-Id"
_ATTRIBUTE = "twistauth_request_id"
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:\-]{1,64}\Z")


class RequestIds:
    """
    Makes request ids and attaches them to requests.

    :ivar trust_incoming: keep a well-formed ``X-Request-Id`` sent by the
        client (set it only behind a proxy that sets or strips the header).
    """

    def __init__(self, *, trust_incoming: bool = False, seed: Optional[bytes] = None) -> None:
        self.trust_incoming = trust_incoming
        # Request ids are not secrets: a fast generator seeded from the OS
        # (``secrets.token_hex`` costs ~8 us a call on PyPy).
        self._random = random.Random(seed if seed is not None else os.urandom(16))  # noqa: S311

    def new(self) -> str:
        """
        A fresh id: 16 lower-case hex digits.
        """
        return f"{self._random.getrandbits(64):016x}"

    def assign(self, request: Any) -> str:
        """
        The request's id, made (or taken from a trusted header) on the first
        call; sets the ``X-Request-Id`` response header.
        """
        existing = getattr(request, _ATTRIBUTE, None)
        if existing is not None:
            return str(existing)
        request_id = None
        if self.trust_incoming:
            raw = request.getHeader(REQUEST_ID_HEADER)
            if raw is not None:
                text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
                if _ACCEPTABLE.match(text):
                    request_id = text
        if request_id is None:
            request_id = self.new()
        setattr(request, _ATTRIBUTE, request_id)
        request.setHeader(REQUEST_ID_HEADER, request_id.encode("ascii"))
        return request_id


def request_id_of(request: Any) -> Optional[str]:
    """
    The id `RequestIds.assign` gave ``request``, or ``None``.
    """
    return getattr(request, _ATTRIBUTE, None)


class RequestLogger(Logger):
    """
    A `Logger` that adds ``request_id`` to every event it emits.

    :ivar request_id: the id stamped on events (an event's own
        ``request_id`` keyword wins).
    """

    def __init__(
        self,
        namespace: Optional[str] = None,
        source: Optional[object] = None,
        observer: Any = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(namespace, source, observer)
        self.request_id = request_id

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: object) -> None:
        if self.request_id is not None and "request_id" not in kwargs:
            kwargs["request_id"] = self.request_id
        super().emit(level, format, **kwargs)


def request_logger(
    request_or_id: Any, namespace: Optional[str] = None, observer: Any = None
) -> RequestLogger:
    """
    A logger for one request's events.

    :param request_or_id: a request given an id by `RequestIds.assign`, or
        the id itself.
    :param namespace: the events' namespace (e.g. ``"twistauth.web.api"``).
    :param observer: where events go (default: the global log publisher).
    """
    if isinstance(request_or_id, str) or request_or_id is None:
        request_id = request_or_id
    else:
        request_id = request_id_of(request_or_id)
    return RequestLogger(namespace=namespace, observer=observer, request_id=request_id)


def bind_request_id(logger: Logger, request_id: Optional[str]) -> RequestLogger:
    """
    A copy of ``logger`` (same namespace, source and observer) that stamps
    ``request_id`` on its events.
    """
    return RequestLogger(
        namespace=logger.namespace,
        source=logger.source,
        observer=logger.observer,
        request_id=request_id,
    )


class LogTag:
    """
    Short keyed hashes of identifiers that must not be logged.

    ``LogTag(salt).tag(session.id)`` is the same for the same id and salt,
    so one session can be followed through the logs, but the id cannot be
    recovered from it.  Use one salt for a deployment (every process) to
    follow sessions across processes.
    """

    def __init__(self, salt: Optional[bytes] = None) -> None:
        self._salt = salt if salt is not None else os.urandom(16)

    def tag(self, identifier: str) -> str:
        """
        12 hex digits of HMAC-SHA256(salt, identifier).
        """
        digest = hmac.new(self._salt, identifier.encode("utf-8"), hashlib.sha256)
        return digest.hexdigest()[:12]
