"""
Building the method cache the settings choose.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistauth import redisconn
from twistauth.caching.cache import MethodCache
from twistauth.caching.memory import MemoryCacheBackend
from twistauth.caching.redis import RedisCacheBackend

log = Logger()


class _RedisConnectionService(Service):
    """
    Closes the cache's Redis connection when the server stops.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        return redisconn.disconnect(self.connection)


def make_method_cache(
    backend: str = "memory",
    *,
    clock: IReactorTime,
    max_entries: int = 10_000,
    timeout: float = 0.25,
    retry_after: float = 5.0,
    prefix: str = "twistauth:cache:",
    namespaces: Iterable[str] = (),
) -> Tuple[Optional[MethodCache], Optional[IService]]:
    """
    The method cache ``backend`` names, and the service (if any) that must
    run while it is used.

    :param backend: ``"memory"`` (one process), ``"none"`` (cached methods
        run uncached), or a Redis URL (``redis://``, ``redis-sentinel://``).
    :param clock: the time source of TTLs, deadlines and the breaker.
    :param max_entries: the memory backend's bound.
    :param timeout: seconds each Redis call may take.
    :param retry_after: seconds methods run uncached after a backend failure.
    :param prefix: the Redis key prefix.
    :param namespaces: extra namespaces cascades and invalidations may name.
    :return: ``(cache, service)``: the cache (``None`` for ``"none"``) and a
        service to add to the app's background services (``None`` unless
        Redis), which closes the connection when stopped.
    :raises ValueError: an unknown backend or a bad Redis URL.
    """
    service: Optional[IService] = None
    if backend == "none":
        log.info("twistauth: cache: none (cached methods run uncached)")
        return None, None
    if backend == "memory":
        store: Any = MemoryCacheBackend(clock=clock, max_entries=max_entries)
        where = f"memory, up to {max_entries} entries"
    elif redisconn.is_redis_url(backend):
        address = redisconn.parse_url(backend)
        connection = redisconn.connect(
            address, connect_timeout=2.0, reply_timeout=max(5.0, timeout * 4)
        )
        store = RedisCacheBackend(redis=connection, clock=clock, timeout=timeout, prefix=prefix)
        service = _RedisConnectionService(connection)
        where = f"Redis at {address.redacted()}, calls within {timeout:g} s"
    else:
        raise ValueError(
            f"the method cache must be 'memory', 'none' or a Redis URL, got {backend!r}"
        )
    log.info(
        "twistauth: cache: {where}; uncached for {retry:g} s after a backend failure",
        where=where,
        retry=retry_after,
    )
    return MethodCache(
        backend=store, clock=clock, retry_after=retry_after, namespaces=tuple(namespaces)
    ), service


__all__ = ["make_method_cache"]
