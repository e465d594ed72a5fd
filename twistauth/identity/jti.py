"""
The back-channel logout replay cache: which logout tokens (``jti``) were
already used.

Back-Channel Logout 1.0 §2.6 asks the relying party to refuse a logout
token it has seen before (checklist #61).  `IJtiStore.seen` records a key
(`twistauth.identity.jose.jti_key`: a hash of the issuer and the ``jti``)
until the token's expiry and answers, atomically, whether it was already
there.  `MemoryJtiStore` is for one process; `RedisJtiStore` is shared by
every process of a deployment (``SET key 1 NX PX ttl``).

The lifetime is given as clock seconds and sent to Redis as a relative
``PX`` (not ``EXAT``): the injected clock need not be the wall clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from twistauth import redisconn
from twistauth.errors import BackendUnavailableError

#: Expired entries looked at per write, from the oldest end.
_SWEEP = 8


class ReplayCacheFullError(BackendUnavailableError):
    """The in-memory replay cache holds its most entries: logouts answer 400/503 until some expire."""

    code = 50373
    name = "replay_cache_full"
    status = 503
    default_message = "the logout replay cache is full; retry later"


class IJtiStore(Interface):
    """
    Remembers used logout tokens until they expire.  Every method answers
    with a Deferred; a store that cannot be reached fails it with
    `twistauth.errors.BackendUnavailableError` (never "not seen").
    """

    def seen(key: str, expires_at: float) -> Any:
        """
        Record ``key`` until ``expires_at`` (clock seconds), atomically with
        the question whether it was already recorded (and not yet expired).

        :return: Deferred firing with ``True`` when it was already recorded
            (a replay), ``False`` when this call recorded it.
        """

    def forget(key: str) -> Any:
        """
        Remove ``key`` (a logout that was recorded but could not be carried
        out, so that the provider may send it again).

        :return: Deferred firing with ``None``.
        """


@implementer(IJtiStore)
@attr.s(kw_only=True, eq=False)
class MemoryJtiStore:
    """
    Used logout tokens in this process's memory.

    :ivar clock: the time source for expiry.
    :ivar max_entries: the most keys kept; when full (every entry still
        live) `seen` fails with `ReplayCacheFullError` rather than forget a
        live key.
    """

    clock: IReactorTime = attr.ib()
    max_entries: int = attr.ib(default=100_000)
    _entries: OrderedDict[str, float] = attr.ib(init=False, factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep(self, now: float, limit: int) -> None:
        for _ in range(limit):
            if not self._entries:
                return
            key, expires_at = next(iter(self._entries.items()))
            if expires_at > now:
                return
            del self._entries[key]

    def seen(self, key: str, expires_at: float) -> Deferred[bool]:
        now = self.clock.seconds()
        self._sweep(now, _SWEEP)
        known = self._entries.get(key)
        if known is not None and known > now:
            return succeed(True)
        if known is None and len(self._entries) >= self.max_entries:
            # Full: drop whatever expired anywhere before refusing.
            for old in [k for k, t in self._entries.items() if t <= now]:
                del self._entries[old]
            if len(self._entries) >= self.max_entries:
                return fail(ReplayCacheFullError())
        self._entries.pop(key, None)
        self._entries[key] = expires_at
        return succeed(False)

    def forget(self, key: str) -> Deferred[None]:
        self._entries.pop(key, None)
        return succeed(None)


@implementer(IJtiStore)
@attr.s(kw_only=True, eq=False)
class RedisJtiStore:
    """
    Used logout tokens in the deployment's shared Redis, under
    ``<prefix>jti:<key>``.

    :ivar redis: a txredisapi connection (`twistauth.redisconn.connect`).
    :ivar clock: the clock the deadline and the lifetimes are measured on.
    :ivar timeout: seconds a Redis call may take (then 503).
    :ivar prefix: the key prefix.
    """

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=2.0)
    prefix: str = attr.ib(default="twistauth:oidc:")

    def _key(self, key: str) -> str:
        return self.prefix + "jti:" + key

    def seen(self, key: str, expires_at: float) -> Deferred[bool]:
        ttl_ms = max(1000, math.ceil((expires_at - self.clock.seconds()) * 1000))
        d = redisconn.call(
            self.clock,
            self.timeout,
            self.redis.set,
            self._key(key),
            "1",
            None,
            ttl_ms,
            True,
            what="the logout replay cache (Redis)",
        )
        # SET ... NX answers OK when it set the key, nil when it existed.
        return d.addCallback(lambda reply: reply is None)

    def forget(self, key: str) -> Deferred[None]:
        d = redisconn.call(
            self.clock,
            self.timeout,
            self.redis.delete,
            self._key(key),
            what="the logout replay cache (Redis)",
        )
        return d.addCallback(lambda _: None)


__all__ = ["IJtiStore", "MemoryJtiStore", "RedisJtiStore", "ReplayCacheFullError"]
