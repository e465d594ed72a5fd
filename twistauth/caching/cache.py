"""
The method cache: what `cached` and `invalidates` talk to.

`MethodCache` sits in front of an `ICacheBackend` and owns the rules that
are not about any one backend:

- **keys** (`twistauth.caching.keys`): namespace generation, the user's
  generation for per-user entries, method, user, canonical parameters;
- **single flight**: concurrent misses of one key in this process share
  one computation; each caller gets its own Deferred, a caller that goes
  away is dropped, and the computation is cancelled only when every caller
  has gone;
- **cascades**: invalidating a namespace bumps it and every namespace it
  cascades to (transitively), learnt from the registry's cached methods by
  `configure`, which also rejects a cascade or invalidation naming a
  namespace no cached method uses;
- **outages**: a backend failure opens a breaker for ``retry_after``
  seconds, during which methods run uncached (never an error because of the
  cache); invalidations made meanwhile are kept and applied first when the
  backend answers again, and until then nothing is read from it, so no stale
  entry is served;
- **counters** (`stats`): hits, misses, shared computations, pass-throughs,
  errors, per namespace too.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import attr
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.caching._interfaces import ICacheBackend
from twistauth.caching.keys import (
    check_namespaces,
    encode_value,
    generation_key,
    user_hash,
    value_suffix,
)

log = Logger()

CACHE_MARK = "__twistauth_cached__"
INVALIDATES_MARK = "__twistauth_invalidates__"


@attr.s(frozen=True, slots=True, kw_only=True)
class CacheSpec:
    """
    What ``@cached`` declared for one function.
    """

    ttl: float = attr.ib()
    namespace: str = attr.ib()
    per_user: bool = attr.ib()
    cascade: Tuple[str, ...] = attr.ib()
    ignore: FrozenSet[str] = attr.ib()


@attr.s(frozen=True, slots=True, kw_only=True)
class InvalidatesSpec:
    """
    What ``@invalidates`` declared for one function.
    """

    namespaces: Tuple[str, ...] = attr.ib()
    per_user: bool = attr.ib()


@attr.s(eq=False)
class _Flight:
    """
    One computation that concurrent misses of a key share.
    """

    waiters: List[Deferred[Any]] = attr.ib(factory=list)
    computation: Optional[Deferred[Any]] = attr.ib(default=None)
    done: bool = attr.ib(default=False)
    result: Any = attr.ib(default=None)
    encoded: Optional[str] = attr.ib(default=None)


@attr.s(eq=False)
class _Counts:
    hits: int = attr.ib(default=0)
    misses: int = attr.ib(default=0)


def _settled(d: Deferred[Any]) -> Any:
    """
    ``d``'s result if it has one already (raising its failure), else ``d``:
    a cache hit that is known at once answers without a Deferred.
    """
    box: List[Any] = []

    def grab(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(grab)
    if not box:
        return d
    result = box[0]
    if isinstance(result, Failure):
        d.addErrback(lambda _: None)  # raised below instead
        result.raiseException()
    return result


def _run(compute: Callable[[], Any]) -> Any:
    result = compute()
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    return result


def _copy(flight: _Flight) -> Any:
    if flight.encoded is not None:
        return json.loads(flight.encoded)
    return flight.result


@attr.s(kw_only=True, eq=False)
class MethodCache:
    """
    The app's method cache (``handler.services.method_cache``).

    :ivar backend: where entries live.
    :ivar clock: the time source of the outage breaker.
    :ivar retry_after: seconds methods run uncached after a backend failure
        before the backend is tried again.
    :ivar max_value_bytes: results larger than this (encoded) are not cached.
    :ivar namespaces: namespaces to accept in cascades and invalidations
        besides those of the registry's cached methods (for entries cached
        by code outside the registry).
    """

    backend: ICacheBackend = attr.ib()
    clock: IReactorTime = attr.ib()
    retry_after: float = attr.ib(default=5.0)
    max_value_bytes: int = attr.ib(default=256 * 1024)
    namespaces: Tuple[str, ...] = attr.ib(
        default=(), converter=lambda v: check_namespaces(v, "namespaces")
    )
    _registry: Any = attr.ib(default=None, init=False)
    _closure: Dict[str, FrozenSet[str]] = attr.ib(factory=dict, init=False)
    _shared: Optional[FrozenSet[str]] = attr.ib(default=None, init=False)
    _flights: Dict[str, _Flight] = attr.ib(factory=dict, init=False)
    _down_until: float = attr.ib(default=float("-inf"), init=False)
    _pending: Set[str] = attr.ib(factory=set, init=False)
    _flushing: bool = attr.ib(default=False, init=False)
    _counters: Dict[str, int] = attr.ib(
        factory=lambda: dict.fromkeys(
            (
                "hits",
                "misses",
                "shared",
                "passthrough",
                "uncacheable",
                "errors",
                "stores",
                "invalidations",
            ),
            0,
        ),
        init=False,
    )
    _by_namespace: Dict[str, _Counts] = attr.ib(factory=dict, init=False)

    # -- configuration -----------------------------------------------------

    def configure(self, registry: Any) -> None:
        """
        Learn the cascades from the registry's cached methods, and check
        every cascade and invalidation names a known namespace.  Call it at
        start-up, after every method is registered (the first cached call
        does it otherwise).

        :raises ValueError: a cascade or an ``invalidates`` names a namespace
            no cached method uses (the message names the method).
        """
        cached: List[Tuple[str, CacheSpec]] = []
        invalidating: List[Tuple[str, InvalidatesSpec]] = []
        for name in registry.names():
            function = registry.lookup(name).function
            spec = getattr(function, CACHE_MARK, None)
            if isinstance(spec, CacheSpec):
                cached.append((name, spec))
            inv = getattr(function, INVALIDATES_MARK, None)
            if isinstance(inv, InvalidatesSpec):
                invalidating.append((name, inv))
        known = {spec.namespace for _, spec in cached} | set(self.namespaces)

        def check(name: str, targets: Iterable[str], what: str) -> None:
            for target in targets:
                if target not in known:
                    listed = ", ".join(sorted(known)) or "none"
                    raise ValueError(
                        f"method {name!r} {what} the unknown namespace {target!r}: no cached "
                        f"method uses it (known namespaces: {listed}; declare others with "
                        f"MethodCache(namespaces=[...]))"
                    )

        graph: Dict[str, Set[str]] = {}
        for name, spec in cached:
            check(name, spec.cascade, "cascades to")
            graph.setdefault(spec.namespace, set()).update(spec.cascade)
        for name, inv in invalidating:
            check(name, inv.namespaces, "invalidates")
        closure: Dict[str, FrozenSet[str]] = {}
        for start in graph:
            seen = {start}
            stack = [start]
            while stack:
                for nxt in graph.get(stack.pop(), ()):
                    if nxt not in seen:
                        seen.add(nxt)
                        stack.append(nxt)
            closure[start] = frozenset(seen)
        self._closure = closure
        self._shared = frozenset(spec.namespace for _, spec in cached if not spec.per_user)
        self._registry = registry

    def ensure_configured(self, registry: Any) -> None:
        """
        `configure` from ``registry`` unless that was done already.
        """
        if self._registry is not registry and registry is not None:
            self.configure(registry)

    def cascade_of(self, namespace: str) -> FrozenSet[str]:
        """
        The namespaces an invalidation of ``namespace`` bumps (itself included).
        """
        return self._closure.get(namespace) or frozenset((namespace,))

    # -- counters ----------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """
        The counters, for metrics: ``hits``, ``misses``, ``shared`` (callers
        that joined a computation in flight), ``passthrough`` (calls run
        uncached because the backend was unavailable), ``uncacheable``
        (parameters or results that are not JSON), ``errors`` (backend
        failures), ``stores``, ``invalidations``; ``namespaces``: hits and
        misses per namespace; ``backend`` and ``available``.
        """
        result: Dict[str, Any] = dict(self._counters)
        result["namespaces"] = {
            ns: {"hits": c.hits, "misses": c.misses} for ns, c in sorted(self._by_namespace.items())
        }
        result["backend"] = self.backend.name
        result["available"] = self._usable()
        return result

    def _count(self, namespace: str, hit: bool) -> None:
        counts = self._by_namespace.get(namespace)
        if counts is None:
            counts = self._by_namespace[namespace] = _Counts()
        if hit:
            counts.hits += 1
            self._counters["hits"] += 1
        else:
            counts.misses += 1
            self._counters["misses"] += 1

    # -- outages -----------------------------------------------------------

    def _usable(self) -> bool:
        return self.clock.seconds() >= self._down_until and not self._pending

    def _failed(self, failure: Failure, doing: str) -> None:
        self._counters["errors"] += 1
        if self.clock.seconds() >= self._down_until:
            log.warn(
                "twistauth: cache: the {backend} backend failed ({doing}: {error}); "
                "methods run uncached for {seconds:g} s",
                backend=self.backend.name,
                doing=doing,
                error=failure.getErrorMessage(),
                seconds=self.retry_after,
            )
        self._down_until = self.clock.seconds() + self.retry_after

    def _available(self) -> bool:
        """
        Whether to use the backend now; starts applying invalidations left
        over from an outage when it may be back.
        """
        if self.clock.seconds() < self._down_until:
            return False
        if not self._pending:
            return True
        if not self._flushing:
            self._flushing = True
            keys = sorted(self._pending)

            def flushed(_: Any) -> None:
                self._pending.difference_update(keys)
                log.info(
                    "twistauth: cache: invalidations made during the outage applied "
                    "({count} generation(s) bumped)",
                    count=len(keys),
                )

            def failed(failure: Failure) -> None:
                self._failed(failure, "applying invalidations")

            def done(_: Any) -> None:
                self._flushing = False

            d = self.backend.bump(keys)
            d.addCallbacks(flushed, failed).addBoth(done)
        return not self._pending

    # -- reading -----------------------------------------------------------

    def call(
        self,
        spec: CacheSpec,
        method: str,
        parameters: Any,
        user_id: Optional[str],
        compute: Callable[[], Any],
    ) -> Any:
        """
        The cached result of ``compute()`` (a value, a Deferred or a
        coroutine) for this method, parameters and user: a value when it is
        known at once (a memory hit, or a synchronous method), else a
        Deferred.  Failures of ``compute`` are not cached and reach every
        caller that shared it.
        """
        if not self._available():
            self._counters["passthrough"] += 1
            return compute()
        user = user_hash(user_id) if spec.per_user else None
        try:
            suffix = value_suffix(method, user, parameters)
        except (TypeError, ValueError):
            self._counters["uncacheable"] += 1
            return compute()
        generations = [generation_key(spec.namespace)]
        if user is not None:
            generations.append(generation_key(spec.namespace, user))
        backend = self.backend
        if backend.immediate:
            lookup_now = getattr(backend, "lookup_now", None)
            if lookup_now is not None:
                key, value = lookup_now(generations, suffix)
                return self._looked_up((key, value), spec, compute)
        d = backend.lookup(generations, suffix)
        d.addCallbacks(
            self._looked_up,
            self._lookup_failed,
            callbackArgs=(spec, compute),
            errbackArgs=(compute,),
        )
        return _settled(d)

    def _lookup_failed(self, failure: Failure, compute: Callable[[], Any]) -> Any:
        if failure.check(CancelledError):
            return failure
        self._failed(failure, "reading")
        self._counters["passthrough"] += 1
        return _run(compute)

    def _looked_up(
        self, found: Tuple[str, Optional[str]], spec: CacheSpec, compute: Callable[[], Any]
    ) -> Any:
        key, value = found
        if value is not None:
            try:
                decoded = json.loads(value)
            except ValueError:
                log.warn(
                    "twistauth: cache: an entry of {ns} is not JSON; ignored", ns=spec.namespace
                )
            else:
                self._count(spec.namespace, True)
                return decoded
        self._count(spec.namespace, False)
        flight = self._flights.get(key)
        if flight is not None:
            self._counters["shared"] += 1
            return self._join(key, flight)
        result = compute()
        if not (isinstance(result, Deferred) or inspect.iscoroutine(result)):
            encoded = self._encode(result, spec)
            if encoded is not None:
                self._store(key, encoded, spec.ttl, None)
            return result
        flight = _Flight()
        self._flights[key] = flight
        computation = ensureDeferred(result)
        flight.computation = computation
        computation.addBoth(self._computed, key, flight, spec)
        return self._join(key, flight)

    def _join(self, key: str, flight: _Flight) -> Any:
        if flight.done:
            return succeed(_copy(flight))

        def cancel(d: Deferred[Any]) -> None:
            if d in flight.waiters:
                flight.waiters.remove(d)
            if not flight.waiters and not flight.done and flight.computation is not None:
                # Every caller has gone: stop the work.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.computation.cancel()

        mine: Deferred[Any] = Deferred(cancel)
        flight.waiters.append(mine)
        return mine

    def _computed(self, result: Any, key: str, flight: _Flight, spec: CacheSpec) -> None:
        waiters, flight.waiters = flight.waiters, []
        if isinstance(result, Failure):
            if self._flights.get(key) is flight:
                del self._flights[key]
            for d in waiters:
                d.errback(result)
            return None
        flight.done = True
        flight.result = result
        flight.encoded = self._encode(result, spec)
        if flight.encoded is not None:
            self._store(key, flight.encoded, spec.ttl, flight)
        elif self._flights.get(key) is flight:
            del self._flights[key]
        first = True
        for d in waiters:
            # The first caller gets the object the method made; the others
            # their own copies.
            d.callback(result if first else _copy(flight))
            first = False
        return None

    def _encode(self, result: Any, spec: CacheSpec) -> Optional[str]:
        try:
            encoded = encode_value(result)
        except (TypeError, ValueError):
            self._counters["uncacheable"] += 1
            return None
        if len(encoded) > self.max_value_bytes:
            self._counters["uncacheable"] += 1
            return None
        return encoded

    def _store(self, key: str, encoded: str, ttl: float, flight: Optional[_Flight]) -> None:
        def stored(_: Any) -> None:
            self._counters["stores"] += 1

        def failed(failure: Failure) -> None:
            self._failed(failure, "storing")

        def done(_: Any) -> None:
            if flight is not None and self._flights.get(key) is flight:
                del self._flights[key]

        self.backend.store(key, encoded, ttl).addCallbacks(stored, failed).addBoth(done)

    # -- invalidating ------------------------------------------------------

    def invalidate(
        self, namespaces: Iterable[str], user_id: Optional[str] = None
    ) -> Deferred[None]:
        """
        Make every entry of ``namespaces`` (and of the namespaces they
        cascade to) unreachable.  With ``user_id``, only that user's
        per-user entries, unless a namespace also holds shared entries, in
        which case all of it.  Never fails: during an outage the
        invalidation is kept and applied when the backend answers again.

        :return: Deferred firing with ``None`` once the backend has it.
        """
        user = user_hash(user_id) if user_id is not None else None
        names: Set[str] = set()
        for namespace in namespaces:
            names.update(self.cascade_of(namespace))
        keys: Set[str] = set()
        for name in names:
            if user is None or self._shared is None or name in self._shared:
                keys.add(generation_key(name))
            else:
                keys.add(generation_key(name, user))
        self._counters["invalidations"] += 1
        if self.clock.seconds() < self._down_until:
            self._pending.update(keys)
            return succeed(None)
        d = self.backend.bump(sorted(keys))

        def failed(failure: Failure) -> None:
            self._pending.update(keys)
            self._failed(failure, "invalidating")

        d.addErrback(failed)
        return d


__all__ = ["CACHE_MARK", "CacheSpec", "INVALIDATES_MARK", "InvalidatesSpec", "MethodCache"]
