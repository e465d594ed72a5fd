"""
Cached methods on the memory backend, through the whole HTTP stack on a
`Clock`: hits and misses, canonical keys (parameter order, defaults,
ignored parameters), TTL expiry, per-user isolation, generation
invalidation (``@invalidates``, per user and whole), cascades (transitive),
stampede protection (N concurrent misses → one computation; callers that go
away), failures never cached, the LRU bound, the authorizer running before
any hit; decoration-time and start-up refusals; and the outage breaker of
`MethodCache` with a backend that fails.
"""

from __future__ import annotations

import datetime
import inspect
from typing import Any, Dict, List, Literal, Optional, Set, Tuple

import attr
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twistauth.access import AccessControl, require
from twistauth.app import make_app
from twistauth.caching import (
    ICacheBackend,
    MemoryCacheBackend,
    MethodCache,
    cached,
    invalidates,
    make_method_cache,
)
from twistauth.errors import BackendUnavailableError
from twistauth.methods.handler import Handler
from twistauth.methods.registry import MethodRegistry, method
from twistauth.testing._client import MethodClient, Response

SESSION = "X-Twistauth-Session"

COMPUTED: Dict[str, int] = {}
PENDING: List[Deferred[Any]] = []
CANCELLED: List[int] = []


def count(name: str) -> int:
    COMPUTED[name] = COMPUTED.get(name, 0) + 1
    return COMPUTED[name]


# -- methods -------------------------------------------------------------------


@method("public.login_as")
async def login_as(handler: Handler, user_id: str) -> None:
    await handler.log_in(user_id, ["admin"] if user_id == "root" else [])


@method("public.profile")
@cached(ttl=60, namespace="profile", per_user=True, cascade=["feed"], ignore=["nonce"])
def profile(handler: Handler, fields: List[str], depth: int = 1, nonce: str = "") -> Dict[str, Any]:
    session = handler.session
    user = session.user_id if session is not None else None
    return {"user": user, "fields": fields, "depth": depth, "n": count("profile")}


@cached(ttl=30, namespace="feed", cascade=["digest"])
@method("public.feed")
def feed(handler: Handler, page: int = 0) -> Dict[str, Any]:
    return {"page": page, "n": count("feed")}


@method("public.digest")
@cached(ttl=30, namespace="digest")
async def digest(handler: Handler) -> Dict[str, Any]:
    return {"n": count("digest")}


@method("public.slow")
@cached(ttl=60, namespace="slow")
def slow(handler: Handler, x: int) -> Deferred[Any]:
    count("slow")
    d: Deferred[Any] = Deferred(lambda _: CANCELLED.append(x))
    PENDING.append(d)
    return d


@method("public.failing")
@cached(ttl=60, namespace="failing")
def failing(handler: Handler) -> Any:
    count("failing")
    raise ValueError("boom")


@method("public.toto")
@cached(ttl=60, namespace="toto")
def toto(handler: Handler, parameters: Dict[str, Any]) -> Dict[str, Any]:
    return {"got": parameters, "n": count("toto")}


@method("public.update_profile")
@invalidates("profile", per_user=True)
def update_profile(handler: Handler) -> str:
    return "updated"


@method("public.update_feed")
@invalidates("feed")
async def update_feed(handler: Handler) -> str:
    return "updated"


@method("public.failed_update")
@invalidates("profile")
def failed_update(handler: Handler) -> str:
    raise ValueError("the write failed")


@method("public.admin_report", roles=["admin"])
@cached(ttl=60, namespace="reports")
def admin_report(handler: Handler) -> Dict[str, Any]:
    return {"report": "secret figures", "n": count("report")}


@method("public.guarded_inside")
@cached(ttl=60, namespace="reports")
@require.role("admin")
def guarded_inside(handler: Handler) -> Dict[str, Any]:
    return {"report": "inner secret", "n": count("inner")}


class Harness:
    def __init__(self, with_cache: bool = True, authorize: bool = True, **backend: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = MethodRegistry()
        self.registry.load(__name__)
        self.app = make_app(
            clock=self.clock,
            registry=self.registry,
            method_modules=[],
            user_store="memory",
            local_accounts=False,
        )
        self.backend = MemoryCacheBackend(clock=self.clock, **backend)
        self.cache = MethodCache(backend=self.backend, clock=self.clock) if with_cache else None
        control = AccessControl()
        self.app.dispatcher.services = attr.evolve(
            self.app.dispatcher.services, access=control, method_cache=self.cache
        )
        self.app.dispatcher.authorize = control.authorize if authorize else None
        if self.cache is not None:
            self.cache.configure(self.registry)
        self.stub = MethodClient(self.app)

    def client(self) -> Client:
        return Client(self)


class Client:
    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.token = ""

    def post(self, envelope: Any) -> Deferred[Response]:
        def keep(response: Response) -> Response:
            new = response.header(SESSION)
            if new is not None:
                self.token = new
            return response

        d: Deferred[Response] = self.harness.stub.post(envelope, headers={SESSION: self.token})
        return d.addCallback(keep)

    def call(self, name: str, **parameters: Any) -> Deferred[Response]:
        return self.post({"method": name, "parameters": parameters})


class CacheTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        COMPUTED.clear()
        del PENDING[:]
        del CANCELLED[:]
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def result(self, client: Client, name: str, **parameters: Any) -> Any:
        response = self.successResultOf(client.call(name, **parameters))
        body = response.decoded()
        self.assertEqual(response.status, 200, body)
        return body["result"]


class CachedMethodTests(CacheTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.h = Harness()
        self.anon = self.h.client()

    def login(self, user_id: str) -> Client:
        client = self.h.client()
        self.result(client, "public.login_as", user_id=user_id)
        return client

    def test_hit_and_canonical_keys(self) -> None:
        first = self.result(self.anon, "public.feed", page=2)
        self.assertEqual(first, {"page": 2, "n": 1})
        self.assertEqual(self.result(self.anon, "public.feed", page=2), first)
        self.assertEqual(self.result(self.anon, "public.feed", page=3)["n"], 2)
        # A default and the same value given share an entry.
        self.assertEqual(self.result(self.anon, "public.feed")["n"], 3)
        self.assertEqual(self.result(self.anon, "public.feed", page=0)["n"], 3)
        # Parameter order never matters; ignored parameters do not count.
        a = self.successResultOf(
            self.anon.post(
                {"method": "public.profile", "parameters": {"fields": ["a"], "depth": 2}}
            )
        )
        b = self.successResultOf(
            self.anon.post(
                {
                    "method": "public.profile",
                    "parameters": {"nonce": "xyz", "depth": 2, "fields": ["a"]},
                }
            )
        )
        self.assertEqual(a.decoded(), b.decoded())
        self.assertEqual(COMPUTED["profile"], 1)
        stats = self.h.cache.stats()
        self.assertEqual((stats["hits"], stats["misses"]), (3, 4))
        self.assertEqual(stats["namespaces"]["feed"], {"hits": 2, "misses": 3})
        self.assertEqual(stats["backend"], "memory")
        self.assertTrue(stats["available"])

    def test_ttl_expires_on_the_clock(self) -> None:
        self.assertEqual(self.result(self.anon, "public.feed")["n"], 1)
        self.h.clock.advance(29.9)
        self.assertEqual(self.result(self.anon, "public.feed")["n"], 1)
        self.h.clock.advance(0.1)
        self.assertEqual(self.result(self.anon, "public.feed")["n"], 2)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_per_user_isolation(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        a = self.result(alice, "public.profile", fields=["name"])
        b = self.result(bob, "public.profile", fields=["name"])
        self.assertEqual((a["user"], a["n"]), ("alice", 1))
        self.assertEqual((b["user"], b["n"]), ("bob", 2))
        self.assertEqual(self.result(alice, "public.profile", fields=["name"]), a)
        self.assertEqual(self.result(bob, "public.profile", fields=["name"]), b)
        anon = self.result(self.anon, "public.profile", fields=["name"])
        self.assertEqual((anon["user"], anon["n"]), (None, 3))
        # per_user=False: one entry for everyone.
        self.assertEqual(self.result(alice, "public.feed")["n"], 1)
        self.assertEqual(self.result(bob, "public.feed")["n"], 1)

    def test_invalidation_per_user_and_cascades(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        self.result(alice, "public.profile", fields=[])
        self.result(bob, "public.profile", fields=[])
        feed_before = self.result(alice, "public.feed")
        digest_before = self.result(alice, "public.digest")
        self.assertEqual(self.result(alice, "public.update_profile"), "updated")
        # Alice's profile is recomputed, Bob's is still a hit ...
        self.assertEqual(self.result(alice, "public.profile", fields=[])["n"], 3)
        self.assertEqual(self.result(bob, "public.profile", fields=[])["n"], 2)
        # ... and the cascade reached the shared feed and, through it, the digest.
        self.assertEqual(self.result(alice, "public.feed")["n"], feed_before["n"] + 1)
        self.assertEqual(self.result(alice, "public.digest")["n"], digest_before["n"] + 1)
        # Invalidating feed cascades down (digest) but never up (profile).
        self.assertEqual(self.result(alice, "public.update_feed"), "updated")
        self.assertEqual(self.result(alice, "public.digest")["n"], digest_before["n"] + 2)
        self.assertEqual(self.result(alice, "public.profile", fields=[])["n"], 3)
        # A write that fails invalidates nothing.
        invalidations = self.h.cache.stats()["invalidations"]
        response = self.successResultOf(alice.call("public.failed_update"))
        self.assertEqual(response.status, 500)
        self.flushLoggedErrors(ValueError)
        self.assertEqual(self.h.cache.stats()["invalidations"], invalidations)
        self.assertEqual(self.result(alice, "public.profile", fields=[])["n"], 3)
        self.assertEqual(self.h.cache.cascade_of("profile"), {"profile", "feed", "digest"})

    def test_whole_namespace_invalidation(self) -> None:
        alice, bob = self.login("alice"), self.login("bob")
        self.result(alice, "public.profile", fields=[])
        self.result(bob, "public.profile", fields=[])
        self.successResultOf(self.h.cache.invalidate(["profile"]))
        self.assertEqual(self.result(alice, "public.profile", fields=[])["n"], 3)
        self.assertEqual(self.result(bob, "public.profile", fields=[])["n"], 4)

    def test_stampede_shares_one_computation(self) -> None:
        clients = [self.h.client() for _ in range(25)]
        answers = [c.call("public.slow", x=7) for c in clients]
        other = self.anon.call("public.slow", x=8)
        self.assertEqual(COMPUTED["slow"], 2)  # x=7 once, x=8 once
        for d in answers:
            self.assertNoResult(d)
        PENDING[0].callback({"value": [1, 2, 3]})
        for d in answers:
            self.assertEqual(self.successResultOf(d).decoded(), {"result": {"value": [1, 2, 3]}})
        self.assertNoResult(other)
        PENDING[1].callback({"value": "eight"})
        self.successResultOf(other)
        self.assertEqual(self.result(self.anon, "public.slow", x=7), {"value": [1, 2, 3]})
        self.assertEqual(COMPUTED["slow"], 2)
        stats = self.h.cache.stats()
        self.assertEqual(stats["shared"], 24)
        self.assertEqual(stats["hits"], 1)

    def test_callers_that_go_away(self) -> None:
        first = self.anon.call("public.slow", x=1)
        second = self.h.client().call("public.slow", x=1)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(CANCELLED, [])  # the other caller still waits
        PENDING[0].callback("done")
        self.assertEqual(self.successResultOf(second).decoded(), {"result": "done"})
        # When every caller has gone, the computation is cancelled.
        lonely = self.anon.call("public.slow", x=2)
        lonely.cancel()
        self.failureResultOf(lonely, CancelledError)
        self.assertEqual(CANCELLED, [2])
        again = self.anon.call("public.slow", x=2)
        self.assertEqual(COMPUTED["slow"], 3)  # started afresh
        PENDING[2].callback("fresh")
        self.assertEqual(self.successResultOf(again).decoded(), {"result": "fresh"})

    def test_failures_are_not_cached(self) -> None:
        for _ in range(3):
            response = self.successResultOf(self.anon.call("public.failing"))
            self.assertEqual(response.status, 500)
        self.assertEqual(COMPUTED["failing"], 3)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)
        # A shared computation's failure reaches every caller.
        a = self.anon.call("public.slow", x=9)
        b = self.h.client().call("public.slow", x=9)
        PENDING[0].errback(ValueError("late boom"))
        self.assertEqual(self.successResultOf(a).status, 500)
        self.assertEqual(self.successResultOf(b).status, 500)
        self.flushLoggedErrors(ValueError)
        self.anon.call("public.slow", x=9)
        self.assertEqual(COMPUTED["slow"], 2)

    def test_toto_style_methods(self) -> None:
        self.assertEqual(self.result(self.anon, "public.toto", b=1, a=2)["n"], 1)
        self.assertEqual(self.result(self.anon, "public.toto", a=2, b=1)["n"], 1)
        self.assertEqual(self.result(self.anon, "public.toto", a=3)["n"], 2)

    def test_parameters_are_still_checked(self) -> None:
        response = self.successResultOf(self.anon.call("public.feed", page="one"))
        self.assertEqual(response.status, 400)
        self.assertEqual(response.decoded()["error"]["name"], "invalid_parameters")
        response = self.successResultOf(self.anon.call("public.profile"))
        self.assertEqual(response.status, 400)
        self.assertNotIn("feed", COMPUTED)

    def test_authorizer_runs_before_any_hit(self) -> None:
        root = self.login("root")
        self.assertEqual(self.result(root, "public.admin_report")["n"], 1)
        self.assertEqual(self.successResultOf(self.anon.call("public.admin_report")).status, 401)
        user = self.login("user")
        self.assertEqual(self.successResultOf(user.call("public.admin_report")).status, 403)
        self.assertEqual(self.result(root, "public.admin_report")["n"], 1)

    def test_inner_guard_holds_without_the_authorizer(self) -> None:
        h = Harness(authorize=False)
        root, user = h.client(), h.client()
        self.result(root, "public.login_as", user_id="root")
        self.result(user, "public.login_as", user_id="user")
        self.assertEqual(self.result(root, "public.guarded_inside")["n"], 1)
        response = self.successResultOf(user.call("public.guarded_inside"))
        self.assertEqual(response.status, 403)
        self.assertNotIn("inner secret", response.body.decode())

    def test_lru_bound(self) -> None:
        h = Harness(max_entries=3)
        c = h.client()
        for page in range(4):
            self.result(c, "public.feed", page=page)
        self.assertEqual(len(h.backend), 3)
        self.assertEqual(self.result(c, "public.feed", page=3)["n"], 4)  # kept
        self.assertEqual(self.result(c, "public.feed", page=0)["n"], 5)  # evicted

    def test_app_without_a_cache(self) -> None:
        h = Harness(with_cache=False)
        c = h.client()
        self.assertEqual(self.result(c, "public.digest")["n"], 1)
        self.assertEqual(self.result(c, "public.digest")["n"], 2)
        lines = [formatEvent(e) for e in self.events]
        self.assertTrue(
            any("public.digest is cached but the app has no method cache" in x for x in lines)
        )


# -- decoration time and start-up ----------------------------------------------


def handler_only(handler: Any) -> None: ...


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ttl": 0}, "ttl must be more than 0"),
        ({"ttl": -1}, "ttl must be more than 0"),
        ({"ttl": 86401}, "at most 86400"),
        ({"ttl": float("inf")}, "ttl must be a number"),
        ({"ttl": True}, "ttl must be a number"),
        ({"ttl": "60"}, "ttl must be a number"),
        ({"namespace": "a..b"}, "invalid namespace"),
        ({"namespace": "_x"}, "invalid namespace"),
        ({"cascade": "feed"}, "cascade must be a list"),
        ({"cascade": ["ok", "bad name"]}, "invalid namespace in cascade"),
        ({"ignore": "nonce"}, "ignore must be a list"),
        ({"ignore": ["no-such"]}, "not a parameter name"),
    ],
)
def test_bad_decorator_arguments(kwargs: Dict[str, Any], message: str) -> None:
    options: Dict[str, Any] = {"namespace": "ns"}
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        cached(**options)


def _f_bytes(handler: Any, data: bytes) -> None: ...
def _f_set(handler: Any, tags: Set[str]) -> None: ...
def _f_tuple(handler: Any, pair: Tuple[int, int]) -> None: ...
def _f_date(handler: Any, when: datetime.date) -> None: ...
def _f_intkeys(handler: Any, table: Dict[int, str]) -> None: ...
def _f_nested(handler: Any, rows: List[Dict[str, bytes]]) -> None: ...
def _f_default(handler: Any, tags: Any = frozenset()) -> None: ...
def _f_nan(handler: Any, x: float = float("nan")) -> None: ...
def _f_args(handler: Any, *rest: Any) -> None: ...
def _f_keyword_handler(*, handler: Any) -> None: ...


@pytest.mark.parametrize(
    "function, message",
    [
        (_f_bytes, "'data'.*JSON"),
        (_f_set, "'tags'.*JSON"),
        (_f_tuple, "'pair'.*JSON"),
        (_f_date, "'when'.*JSON"),
        (_f_intkeys, "'table'.*JSON"),
        (_f_nested, "'rows'.*JSON"),
        (_f_default, "default of parameter 'tags'"),
        (_f_nan, "default of parameter 'x'"),
        (_f_args, r"\*rest"),
        (_f_keyword_handler, "first positional parameter"),
    ],
)
def test_uncacheable_functions_are_refused(function: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        cached(namespace="ns")(function)


def test_ignore_names_a_parameter() -> None:
    def f(handler: Any, a: int) -> None: ...

    with pytest.raises(ValueError, match="'nonce', which is not a parameter of"):
        cached(namespace="ns", ignore=["nonce"])(f)

    def g(handler: Any, **extra: Any) -> None: ...

    cached(namespace="ns", ignore=["nonce"])(g)  # **kwargs: any name may come


def test_json_annotations_are_accepted() -> None:
    def f(
        handler: Any,
        a: str,
        b: int = 1,
        c: Optional[Dict[str, Any]] = None,
        d: List[Dict[str, List[float]]] = [],  # noqa: B006
        e: Literal["x", 1] = "x",
        f: Any = None,
        g=3,  # noqa: ANN001
    ) -> Dict[str, Any]:
        """Doc."""
        return {}

    wrapped = cached(namespace="ns")(f)
    assert inspect.signature(wrapped) == inspect.signature(f)
    assert wrapped.__doc__ == "Doc."
    registry = MethodRegistry()
    registered = registry.add("x.f", wrapped)
    assert [p.name for p in registered.parameters] == ["a", "b", "c", "d", "e", "f", "g"]
    assert registered.parameters[1].types == (int,)


def test_unknown_namespaces_are_refused_at_start_up() -> None:
    registry = MethodRegistry()

    @registry.method("a.read")
    @cached(namespace="a", cascade=["feeed"])
    def read(handler: Any) -> None: ...

    @registry.method("feed.read")
    @cached(namespace="feed")
    def feed_read(handler: Any) -> None: ...

    cache = MethodCache(backend=MemoryCacheBackend(clock=Clock()), clock=Clock())
    with pytest.raises(ValueError, match="'a.read' cascades to the unknown namespace 'feeed'"):
        cache.configure(registry)
    MethodCache(
        backend=MemoryCacheBackend(clock=Clock()), clock=Clock(), namespaces=["feeed"]
    ).configure(registry)

    writes = MethodRegistry()

    @writes.method("a.write")
    @invalidates("nothing")
    def write(handler: Any) -> None: ...

    with pytest.raises(ValueError, match="'a.write' invalidates the unknown namespace 'nothing'"):
        cache.configure(writes)
    with pytest.raises(ValueError, match="at least one namespace"):
        invalidates()


def test_make_method_cache() -> None:
    clock = Clock()
    cache, service = make_method_cache("memory", clock=clock, max_entries=5)
    assert isinstance(cache, MethodCache) and service is None
    assert cache.backend.max_entries == 5
    assert make_method_cache("none", clock=clock) == (None, None)
    with pytest.raises(ValueError, match="'memory', 'none' or a Redis URL"):
        make_method_cache("memcached://x", clock=clock)


# -- the outage breaker, with a backend that fails ----------------------------------


@implementer(ICacheBackend)
@attr.s
class Flaky:
    """A memory backend that can be switched off (answers 503)."""

    inner: MemoryCacheBackend = attr.ib()
    down: bool = attr.ib(default=False)
    calls: int = attr.ib(default=0)
    name = "flaky"
    immediate = False

    def _maybe(self, result: Any) -> Any:
        self.calls += 1
        if self.down:
            return fail(BackendUnavailableError("the cache backend is down"))
        return result

    def lookup(self, keys: Any, suffix: str) -> Any:
        return self._maybe(succeed(None)).addCallback(lambda _: self.inner.lookup_now(keys, suffix))

    def store(self, key: str, value: str, ttl: float) -> Any:
        return self._maybe(succeed(None)).addCallback(lambda _: self.inner.store(key, value, ttl))

    def bump(self, keys: Any) -> Any:
        return self._maybe(succeed(None)).addCallback(lambda _: self.inner.bump(keys))


class BreakerTests(CacheTestCase):
    def test_outage_is_a_pass_through_and_no_stale_entry_is_served(self) -> None:
        h = Harness()
        flaky = Flaky(MemoryCacheBackend(clock=h.clock))
        cache = MethodCache(backend=flaky, clock=h.clock, retry_after=5.0)
        cache.configure(h.registry)
        h.app.dispatcher.services = attr.evolve(h.app.dispatcher.services, method_cache=cache)
        c = h.client()
        self.assertEqual(self.result(c, "public.feed")["n"], 1)
        self.assertEqual(self.result(c, "public.feed")["n"], 1)
        flaky.down = True
        self.assertEqual(self.result(c, "public.feed")["n"], 2)  # computed, no error
        calls = flaky.calls
        self.assertEqual(self.result(c, "public.feed")["n"], 3)
        self.assertEqual(flaky.calls, calls)  # breaker open: the backend is not asked
        self.assertFalse(cache.stats()["available"])
        # A write during the outage: its invalidation is kept ...
        self.assertEqual(self.result(c, "public.update_feed"), "updated")
        flaky.down = False
        h.clock.advance(5)
        # ... and applied before anything is read again: the entry from
        # before the outage is never served.
        self.assertEqual(self.result(c, "public.feed")["n"], 4)
        self.assertEqual(self.result(c, "public.feed")["n"], 4)
        stats = cache.stats()
        self.assertEqual(stats["errors"], 1)
        self.assertEqual(stats["passthrough"], 2)
        self.assertTrue(stats["available"])
        lines = [formatEvent(e) for e in self.events]
        self.assertEqual(sum("methods run uncached for 5 s" in x for x in lines), 1)
        self.assertTrue(
            any("during the outage applied (2 generation(s) bumped)" in x for x in lines)
        )

    def test_results_that_are_not_json_are_not_cached(self) -> None:
        clock = Clock()
        cache = MethodCache(
            backend=MemoryCacheBackend(clock=clock), clock=clock, max_value_bytes=100
        )
        from twistauth.caching import CacheSpec

        spec = CacheSpec(ttl=10, namespace="n", per_user=False, cascade=(), ignore=frozenset())
        made: List[int] = []

        def compute(value: Any) -> Any:
            def run() -> Any:
                made.append(1)
                return value

            return run

        for _ in range(2):
            cache.call(spec, "m", {}, None, compute({1, 2}))
            cache.call(spec, "m2", {}, None, compute("x" * 200))
            cache.call(spec, "m3", {"p": b"bytes"}, None, compute("fine"))
        self.assertEqual(len(made), 6)
        self.assertEqual(cache.stats()["uncacheable"], 6)
        self.assertEqual(cache.call(spec, "m4", {}, None, compute([1])), [1])
        self.assertEqual(cache.call(spec, "m4", {}, None, compute([2])), [1])
