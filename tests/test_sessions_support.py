"""
Helpers shared by the session-cache tests (this module holds no tests).

`make_harness` builds any of the caches over a `Clock`, the Redis-backed
ones over a real private redis-server; `capture_logs` collects everything
logged through Twisted's and the standard library's loggers, so a test can
check that no token, id or key ever reaches a log.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from twistauth import redisconn
from twistauth.sessions import (
    ClientSessionCache,
    MemoryRevocations,
    MemorySessionCache,
    RedisRevocations,
    RedisSessionCache,
)

IDLE = 1800.0
ABSOLUTE = 43200.0
KEYS = [bytes(range(32)), bytes(range(100, 132))]

SERVER_KINDS = ["memory", "redis"]
ALL_KINDS = ["memory", "redis", "client-memory", "client-redis"]


def result_of(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has already fired (raising its failure).
    """
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def connect(server: Any, **kwargs: Any) -> Any:
    """
    A redisconn connection to a conftest `RedisServer`, reconnecting fast.
    """
    options = {"connect_timeout": 1.0, "reply_timeout": 5.0, "max_retry_delay": 0.3}
    options.update(kwargs)
    return redisconn.connect(server.url, **options)


@attr.s(auto_attribs=True)
class Harness:
    """
    One cache under test.

    :ivar kind: which cache.
    :ivar cache: the cache.
    :ivar clock: its clock (a `Clock`).
    :ivar redis: the Redis connection behind it, if any.
    """

    kind: str
    cache: Any
    clock: Clock
    redis: Any = None
    revocations: Any = None

    @property
    def server_side(self) -> bool:
        return self.kind in SERVER_KINDS

    async def stored(self) -> int:
        """
        How many records the cache's backend holds (sessions, indexes or
        revocations): a load of an unknown token must not change it.
        """
        if self.redis is not None:
            return int(await self.redis.dbsize())
        if self.kind == "memory":
            return len(self.cache)
        return len(self.revocations)

    async def use(self, token: str) -> Any:
        """
        What the transport does with a token: load the session, save it if
        the cache marked it dirty, answer ``(session, token)``.
        """
        session = await self.cache.load(token)
        if session is not None and session.dirty:
            token = await self.cache.save(session)
        return session, token


def make_harness(
    kind: str,
    server: Optional[Any] = None,
    *,
    idle: float = IDLE,
    absolute: float = ABSOLUTE,
    **kwargs: Any,
) -> Harness:
    """
    Build a cache of ``kind`` over a fresh `Clock` (``server`` is the
    redis-server for the Redis-backed kinds).
    """
    clock = Clock()
    clock.advance(1_000_000)  # a realistic, non-zero epoch
    timeouts = {"idle_timeout": idle, "absolute_timeout": absolute}
    if kind == "memory":
        return Harness(kind, MemorySessionCache(clock=clock, **timeouts, **kwargs), clock)
    redis = connect(server) if kind in ("redis", "client-redis") else None
    if kind == "redis":
        cache = RedisSessionCache(redis=redis, clock=clock, **timeouts, **kwargs)
        return Harness(kind, cache, clock, redis)
    if kind == "client-memory":
        revocations: Any = MemoryRevocations(clock=clock)
    else:
        revocations = RedisRevocations(redis=redis, clock=clock)
    cache = ClientSessionCache(
        keys=kwargs.pop("keys", KEYS), revocations=revocations, clock=clock, **timeouts, **kwargs
    )
    return Harness(kind, cache, clock, redis, revocations)


def close(harness: Harness) -> None:
    """
    Close a harness's Redis connection (blocking on the test reactor).
    """
    import pytest_twisted

    if harness.redis is not None:
        pytest_twisted.blockon(ensureDeferred(_disconnect(harness.redis)))


async def _disconnect(connection: Any) -> None:
    await redisconn.disconnect(connection)


@contextmanager
def capture_logs() -> Iterator[List[str]]:
    """
    Collect the text of every Twisted log event and standard-library log
    record emitted inside the block.
    """
    lines: List[str] = []

    def observe(event: Any) -> None:
        lines.append(repr(event))
        lines.append(str(formatEvent(event)))

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            lines.append(repr(record.args))

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)
        root.removeHandler(handler)
        root.setLevel(old_level)
