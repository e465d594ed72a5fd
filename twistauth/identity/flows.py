"""
Logins (and RP-initiated logouts) in progress: stored server-side by
``state``, bound to the browser that started them, taken once.

A flow record is what `twistauth.identity.client.RelyingParty.start`
returns as its `Transaction` (or, for a logout, the provider and where to
return), plus the hash of a *binding secret*.  The secret itself goes to the
browser in a cookie named after the state (`flow_cookie_name`), so many tabs
may log in at once, each with its own cookie (checklist #6), and a callback
arriving in a browser that did not start the login finds no cookie or the
wrong one (#4, login CSRF).

`IFlowStore` keeps records by state with a lifetime (the provider's
``login_ttl``, at most 15 minutes: #3) and gives each back at most once
(`IFlowStore.take`: a replayed callback finds nothing, #5).  Stale records
are dropped by their TTL (Redis ``EX``) or by the memory store's sweep on
every write; neither needs a timer.  Both count what they do
(`IFlowStore.stats`) so the maintenance can be watched.

The store is keyed by a SHA-256 of the state, never the state itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twistauth import redisconn
from twistauth.identity.errors import InvalidStateError

log = Logger()

MAX_STATE_LENGTH = 512
"""Longer ``state`` values are refused before any lookup."""

#: Expired records looked at per write, from the oldest end.
_SWEEP = 8

_TAKE = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('DEL', KEYS[1]) end
return value
"""

# (module-level: its EVALSHA prefix is encoded once: see
# `redisconn.run_script`).
_TAKE_SCRIPT = redisconn.Script(_TAKE, keys=1)


def state_digest(state: str) -> str:
    """
    The store key of a state: 64 hex digits of its SHA-256.
    """
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def flow_cookie_name(prefix: str, state: str) -> bytes:
    """
    The name of the cookie that binds the flow of ``state`` to a browser:
    ``prefix`` and 16 hex digits of the state's hash (one cookie per flow,
    so parallel logins never clobber each other).
    """
    return (prefix + state_digest(state)[:16]).encode("ascii")


def new_binding() -> Tuple[str, str]:
    """
    A fresh binding secret for a flow cookie.

    :return: ``(secret, digest)``: the secret goes in the cookie, the
        digest in the stored record.
    """
    secret = secrets.token_urlsafe(32)
    return secret, hashlib.sha256(secret.encode("ascii")).hexdigest()


def binding_matches(secret: Optional[str], digest: Any) -> bool:
    """
    Whether a cookie's secret is the one whose digest the record holds
    (constant time).
    """
    if not secret or not isinstance(digest, str):
        return False
    presented = hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()
    return hmac.compare_digest(presented.encode("ascii"), digest.encode("ascii", "replace"))


class IFlowStore(Interface):
    """
    Keeps flow records (JSON objects) by state, for a limited time, each
    given back at most once.  Every method answers with a Deferred; a
    backend that cannot be reached fails it with
    `twistauth.errors.BackendUnavailableError` (503).
    """

    name: str = Attribute('The kind of store: ``"memory"`` or ``"redis"``.')

    def put(state: str, record: Dict[str, Any], ttl: float) -> Any:
        """
        Store ``record`` under ``state`` for ``ttl`` seconds.

        :return: Deferred firing with ``None``.
        """

    def take(state: str) -> Any:
        """
        Remove and return the record of ``state``, atomically: of two
        concurrent takes (in any process) at most one gets it.

        :return: Deferred firing with the record, or ``None`` when there is
            none (unknown, expired, or already taken).
        """

    def stats() -> Any:
        """
        Counters of this process's use of the store: ``stored``, ``taken``,
        ``missing`` (takes that found nothing), and for the memory store
        ``expired`` (dropped unused), ``evicted`` (dropped when full) and
        ``pending``.

        :return: a ``dict`` (not a Deferred).
        """


def _counters() -> Dict[str, int]:
    return {"stored": 0, "taken": 0, "missing": 0, "expired": 0, "evicted": 0}


@implementer(IFlowStore)
@attr.s(kw_only=True, eq=False)
class MemoryFlowStore:
    """
    Flow records in this process's memory (a deployment of one process).

    :ivar clock: the time source for expiry.
    :ivar max_entries: the most records kept; past it the oldest is
        dropped (bounds what anonymous ``GET /login`` requests can fill).
    """

    name = "memory"

    clock: IReactorTime = attr.ib()
    max_entries: int = attr.ib(default=10_000)
    _records: OrderedDict[str, Tuple[float, str]] = attr.ib(init=False, factory=OrderedDict)
    _counts: Dict[str, int] = attr.ib(init=False, factory=_counters)

    def __len__(self) -> int:
        return len(self._records)

    def _sweep(self, now: float) -> None:
        for _ in range(_SWEEP):
            if not self._records:
                return
            key, (expires_at, _) = next(iter(self._records.items()))
            if expires_at > now:
                return
            del self._records[key]
            self._counts["expired"] += 1

    def put(self, state: str, record: Dict[str, Any], ttl: float) -> Deferred[None]:
        now = self.clock.seconds()
        self._sweep(now)
        while len(self._records) >= self.max_entries:
            self._records.popitem(last=False)
            self._counts["evicted"] += 1
            if self._counts["evicted"] in (1, 100, 10_000):
                log.warn(
                    "twistauth: login flows: the memory store is full ({max} pending); "
                    "dropped the oldest",
                    max=self.max_entries,
                )
        self._records[state_digest(state)] = (now + ttl, json.dumps(record))
        self._counts["stored"] += 1
        return succeed(None)

    def take(self, state: str) -> Deferred[Optional[Dict[str, Any]]]:
        now = self.clock.seconds()
        entry = self._records.pop(state_digest(state), None)
        if entry is None:
            self._counts["missing"] += 1
            return succeed(None)
        expires_at, text = entry
        if expires_at <= now:
            self._counts["expired"] += 1
            self._counts["missing"] += 1
            return succeed(None)
        self._counts["taken"] += 1
        record: Dict[str, Any] = json.loads(text)
        return succeed(record)

    def stats(self) -> Dict[str, int]:
        return dict(self._counts, pending=len(self._records))


@implementer(IFlowStore)
@attr.s(kw_only=True, eq=False)
class RedisFlowStore:
    """
    Flow records in the deployment's shared Redis, under
    ``<prefix>flow:<sha256(state)>`` with ``SET ... EX ttl``; taken with a
    ``GET`` + ``DEL`` Lua script (atomic on every Redis version, like
    ``GETDEL`` on 6.2+).

    :ivar redis: a txredisapi connection (`twistauth.redisconn.connect`).
    :ivar clock: the clock deadlines run on.
    :ivar timeout: seconds a Redis call may take (then 503).
    :ivar prefix: the key prefix.
    """

    name = "redis"

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=2.0)
    prefix: str = attr.ib(default="twistauth:oidc:")
    _counts: Dict[str, int] = attr.ib(init=False, factory=_counters)

    def key(self, state: str) -> str:
        """The Redis key of a state's record."""
        return self.prefix + "flow:" + state_digest(state)

    def _call(self, function: Any, *args: Any) -> Deferred[Any]:
        return redisconn.call(
            self.clock, self.timeout, function, *args, what="the login flow store (Redis)"
        )

    def put(self, state: str, record: Dict[str, Any], ttl: float) -> Deferred[None]:
        d = self._call(self.redis.set, self.key(state), json.dumps(record), max(1, math.ceil(ttl)))

        def stored(_: Any) -> None:
            self._counts["stored"] += 1

        return d.addCallback(stored)

    def take(self, state: str) -> Deferred[Optional[Dict[str, Any]]]:
        d = redisconn.run_script(
            self.redis,
            _TAKE_SCRIPT,
            (self.key(state),),
            (),
            clock=self.clock,
            timeout=self.timeout,
            what="the login flow store (Redis)",
        )

        def taken(value: Any) -> Optional[Dict[str, Any]]:
            if value is None:
                self._counts["missing"] += 1
                return None
            self._counts["taken"] += 1
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            try:
                record = json.loads(value)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None

        return d.addCallback(taken)

    def stats(self) -> Dict[str, int]:
        return dict(self._counts)


@attr.s(kw_only=True, eq=False)
class FlowBinder:
    """
    Binds stored flows to browsers: stores a record with a binding digest
    and hands out the cookie that proves the browser started it; takes it
    back only with that cookie.

    :ivar store: the `IFlowStore`.
    :ivar cookie_prefix: the flow cookies' name prefix (e.g.
        ``__Host-twistauth_login_``).
    """

    store: Any = attr.ib()
    cookie_prefix: str = attr.ib()

    def cookie_name(self, state: str) -> bytes:
        """The name of the cookie that binds ``state``'s flow."""
        return flow_cookie_name(self.cookie_prefix, state)

    def begin(self, state: str, record: Dict[str, Any], ttl: float) -> Deferred[str]:
        """
        Store a new flow.

        :return: Deferred firing with the binding secret to set in the
            browser's `cookie_name` cookie.
        """
        secret, digest = new_binding()
        stored = dict(record, binding=digest)
        return self.store.put(state, stored, ttl).addCallback(lambda _: secret)

    def finish(self, state: Any, secret: Optional[str]) -> Deferred[Dict[str, Any]]:
        """
        Take the flow of ``state`` if ``secret`` (the browser's cookie) binds it.

        A browser without the cookie is refused before the store is asked
        (nothing consumed); a record is consumed by the first take whatever
        the cookie, so a replay finds nothing.

        :return: Deferred firing with the record (without its binding), or
            failing with `InvalidStateError` (400).
        """
        if not isinstance(state, str) or not state or len(state) > MAX_STATE_LENGTH:
            d: Deferred[Dict[str, Any]] = Deferred()
            d.errback(InvalidStateError())
            return d
        if not secret:
            d = Deferred()
            d.errback(InvalidStateError("this login was not started in this browser; start again"))
            return d

        def check(record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
            if record is None:
                raise InvalidStateError()
            if not binding_matches(secret, record.pop("binding", None)):
                raise InvalidStateError("this login was not started in this browser; start again")
            return record

        return self.store.take(state).addCallback(check)


__all__ = [
    "FlowBinder",
    "IFlowStore",
    "MAX_STATE_LENGTH",
    "MemoryFlowStore",
    "RedisFlowStore",
    "binding_matches",
    "flow_cookie_name",
    "new_binding",
    "state_digest",
]
