"""
The Redis method-cache backend against a real private redis-server: two
processes (two connections, two `MethodCache` s) sharing entries and
invalidations, TTLs set in Redis, invalidation without scanning (old keys
stay, unreachable), cascades, stampede protection, large and non-ASCII
values, and outages: a stopped server makes the cache a pass-through within
its deadline (never an error), a paused one too, and invalidations made
during an outage are applied before anything is read again.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, List, Optional

import attr
import pytest
import pytest_twisted
from conftest import RedisServer
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults

from twistauth import redisconn
from twistauth.app import make_app
from twistauth.caching import (
    CacheSpec,
    MethodCache,
    RedisCacheBackend,
    cached,
    make_method_cache,
)
from twistauth.caching.redis import _LOOKUP_SCRIPT, STATUS_MAX
from twistauth.methods.registry import MethodRegistry
from twistauth.testing._client import MethodClient

TIMEOUT = 0.2
RETRY = 0.5


def spec(namespace: str = "ns", ttl: float = 60, per_user: bool = False, cascade: Any = ()) -> Any:
    return CacheSpec(
        ttl=ttl, namespace=namespace, per_user=per_user, cascade=tuple(cascade), ignore=frozenset()
    )


def connect(server: RedisServer) -> Any:
    return redisconn.connect(
        server.url, connect_timeout=1.0, reply_timeout=5.0, max_retry_delay=0.3
    )


@pytest.fixture
def connections(redis_server: RedisServer) -> Iterator[List[Any]]:
    made: List[Any] = []
    yield made
    for connection in made:
        pytest_twisted.blockon(redisconn.disconnect(connection))


def make_cache(
    server: RedisServer, connections: List[Any], registry: Optional[MethodRegistry] = None
) -> MethodCache:
    connection = connect(server)
    connections.append(connection)
    cache = MethodCache(
        backend=RedisCacheBackend(redis=connection, clock=reactor, timeout=TIMEOUT),
        clock=reactor,
        retry_after=RETRY,
    )
    if registry is not None:
        cache.configure(registry)
    return cache


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def make(self, value: Any = None) -> Callable[[], Any]:
        def compute() -> Any:
            self.n += 1
            return {"n": self.n} if value is None else value

        return compute


async def fetch(cache: MethodCache, *args: Any) -> Any:
    """`MethodCache.call`, awaited whether it answered at once or later."""
    result = cache.call(*args)
    if isinstance(result, Deferred):
        result = await result
    return result


async def wait(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_two_processes_share_entries_and_invalidations(
    redis_server: RedisServer, connections: List[Any]
) -> None:
    registry = MethodRegistry()

    @registry.method("p.read")
    @cached(namespace="profile", cascade=["feed"], per_user=True)
    def read(handler: Any) -> None: ...

    @registry.method("f.read")
    @cached(namespace="feed")
    def feed(handler: Any) -> None: ...

    one = make_cache(redis_server, connections, registry)
    two = make_cache(redis_server, connections, registry)
    counter = Counter()
    profile, shared = spec("profile", per_user=True), spec("feed")
    assert await fetch(one, profile, "p.read", {"b": 1, "a": [1]}, "alice", counter.make()) == {
        "n": 1
    }
    await wait(0.02)  # the store is written after the answer
    # The other process hits the same entry (parameter order does not matter).
    assert await fetch(two, profile, "p.read", {"a": [1], "b": 1}, "alice", counter.make()) == {
        "n": 1
    }
    assert await fetch(two, profile, "p.read", {"a": [1], "b": 1}, "bob", counter.make()) == {
        "n": 2
    }
    assert await fetch(one, shared, "f.read", {}, None, counter.make()) == {"n": 3}
    await wait(0.02)
    assert await fetch(two, shared, "f.read", {}, None, counter.make()) == {"n": 3}
    # One process invalidates alice's profile; the other sees it, and the cascade.
    await one.invalidate(["profile"], "alice")
    assert await fetch(two, profile, "p.read", {"a": [1], "b": 1}, "alice", counter.make()) == {
        "n": 4
    }
    assert await fetch(two, profile, "p.read", {"a": [1], "b": 1}, "bob", counter.make()) == {
        "n": 2
    }
    assert await fetch(two, shared, "f.read", {}, None, counter.make()) == {"n": 5}
    assert two.stats()["hits"] == 3 and one.stats()["misses"] == 2


@pytest_twisted.ensureDeferred
async def test_ttls_and_no_scanning(redis_server: RedisServer, connections: List[Any]) -> None:
    cache = make_cache(redis_server, connections)
    conn = connect(redis_server)
    connections.append(conn)
    counter = Counter()
    short = spec("short", ttl=0.25)
    await fetch(cache, short, "m", {"x": 1}, None, counter.make())
    await wait(0.02)
    keys = await conn.keys("twistauth:cache:*")
    values = [k for k in keys if k.startswith("twistauth:cache:v:")]
    generations = [k for k in keys if k.startswith("twistauth:cache:g:")]
    assert len(values) == 1 and generations == ["twistauth:cache:g:short"]
    assert 0 < await conn.execute_command("PTTL", values[0]) <= 250
    assert 86400 < await conn.ttl(generations[0]) <= 2 * 86400
    assert (await fetch(cache, short, "m", {"x": 1}, None, counter.make()))["n"] == 1
    await wait(0.3)
    assert (await fetch(cache, short, "m", {"x": 1}, None, counter.make()))["n"] == 2
    # Invalidation replaces the generation; the old entry stays until its
    # TTL, unreachable: nothing is scanned or deleted.
    long = spec("long")
    await fetch(cache, long, "m", {}, None, counter.make())
    await wait(0.02)
    before = set(await conn.keys("twistauth:cache:v:*"))
    old_generation = await conn.get("twistauth:cache:g:long")
    await cache.invalidate(["long"])
    assert await conn.get("twistauth:cache:g:long") != old_generation
    assert before <= set(await conn.keys("twistauth:cache:v:*"))
    assert (await fetch(cache, long, "m", {}, None, counter.make()))["n"] == 4


@pytest_twisted.ensureDeferred
async def test_stampede_and_values(redis_server: RedisServer, connections: List[Any]) -> None:
    cache = make_cache(redis_server, connections)
    pending: List[Deferred[Any]] = []
    computations = []

    def slow() -> Deferred[Any]:
        computations.append(1)
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    calls = [cache.call(spec(), "slow", {"q": 1}, None, slow) for _ in range(30)]
    while not pending:
        await wait(0.005)
    await wait(0.05)
    assert len(computations) == 1
    big = {"text": "é€😀" * 3000, "list": list(range(2000))}
    pending[0].callback(big)
    answers = await gatherResults(calls)
    assert all(a == big for a in answers)
    assert answers[0] is big and answers[1] is not big  # each caller its own copy
    await wait(0.05)
    assert len("".join(str(big))) > STATUS_MAX  # the bulk-reply path
    assert await fetch(cache, spec(), "slow", {"q": 1}, None, slow) == big
    assert len(computations) == 1
    assert cache.stats()["shared"] == 29


@pytest_twisted.ensureDeferred
async def test_stopped_redis_is_a_pass_through(
    redis_server: RedisServer, connections: List[Any]
) -> None:
    cache = make_cache(redis_server, connections)
    counter = Counter()
    s = spec("outage")
    assert await fetch(cache, s, "m", {}, None, counter.make()) == {"n": 1}
    await wait(0.02)
    assert await fetch(cache, s, "m", {}, None, counter.make()) == {"n": 1}
    redis_server.stop()
    started = time.monotonic()
    assert await fetch(cache, s, "m", {}, None, counter.make()) == {"n": 2}  # no error
    first = time.monotonic() - started
    assert first < TIMEOUT + 0.5
    started = time.monotonic()
    for _ in range(5):
        assert (await fetch(cache, s, "m", {}, None, counter.make()))["n"] > 2
    assert time.monotonic() - started < 0.05  # breaker open: Redis is not waited for
    await cache.invalidate(["outage"])  # kept for later, never an error
    stats = cache.stats()
    assert stats["errors"] >= 1 and stats["passthrough"] == 6 and not stats["available"]
    redis_server.start()
    deadline = time.monotonic() + 10
    while True:
        await wait(RETRY)
        n = counter.n
        result = await fetch(cache, s, "m", {}, None, counter.make())
        if cache.stats()["available"] and counter.n == n + 1:
            break
        assert time.monotonic() < deadline, cache.stats()
    await wait(0.05)
    assert await fetch(cache, s, "m", {}, None, counter.make()) == result  # a hit again


@pytest.fixture(scope="module")
def persistent_redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.cleanup()


@pytest_twisted.ensureDeferred
async def test_invalidations_from_an_outage_are_applied_first(
    persistent_redis: RedisServer, connections: List[Any]
) -> None:
    persistent_redis.flush()
    cache = make_cache(persistent_redis, connections)
    other = make_cache(persistent_redis, connections)
    counter = Counter()
    s = spec("kept")
    assert await fetch(cache, s, "m", {}, None, counter.make()) == {"n": 1}
    await wait(0.02)
    persistent_redis.stop()
    await cache.invalidate(["kept"])  # the write happened during the outage
    assert await fetch(cache, s, "m", {}, None, counter.make()) == {"n": 2}
    persistent_redis.start()  # comes back with the entry from before
    deadline = time.monotonic() + 10
    while not cache.stats()["available"] or cache.stats()["errors"] == 0:
        await wait(RETRY)
        result = await fetch(cache, s, "m", {}, None, counter.make())
        assert result != {"n": 1}  # the stale entry is never served
        if time.monotonic() > deadline:
            raise AssertionError(cache.stats())
    await wait(0.05)
    assert await fetch(other, s, "m", {}, None, counter.make()) != {"n": 1}


@pytest_twisted.ensureDeferred
async def test_through_the_http_stack_and_the_builder(redis_server: RedisServer) -> None:
    cache, service = make_method_cache(redis_server.url, clock=reactor, timeout=0.5)
    assert service is not None
    service.startService()
    try:
        registry = MethodRegistry()
        made = []

        @registry.method("public.figures")
        @cached(namespace="figures", ttl=60)
        async def figures(handler: Any, year: int) -> Any:
            made.append(year)
            return {"year": year, "total": 42}

        app = make_app(clock=reactor, registry=registry, method_modules=[], local_accounts=False)

        app.dispatcher.services = attr.evolve(app.dispatcher.services, method_cache=cache)
        client = MethodClient(app)
        for _ in range(3):
            assert await client.call("public.figures", year=2026) == {"year": 2026, "total": 42}
            await wait(0.02)
        assert made == [2026]
        assert cache.stats()["hits"] == 2
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_lookups_survive_script_flush_and_any_key_count(
    redis_server: RedisServer, connections: List[Any]
) -> None:
    """
    Lookups run by ``EVALSHA`` (`redisconn.run_script`): after ``SCRIPT
    FLUSH`` the script is loaded again and the answers do not change, for
    shared and per-user entries, and for a lookup of more generations than
    the cache's methods use (`redisconn.Script.for_keys`).
    """
    conn = connect(redis_server)
    connections.append(conn)
    backend = RedisCacheBackend(redis=conn, clock=reactor, timeout=1.0)
    for generations in (["g:a"], ["g:a", "g:a:u"], ["g:a", "g:b", "g:c"]):
        key, value = await backend.lookup(generations, "s")
        assert value is None and key.endswith(":s")
        await backend.store(key, "v1", 60)
        assert await backend.lookup(generations, "s") == (key, "v1")
        sha = _LOOKUP_SCRIPT.sha
        assert await conn.execute_command("SCRIPT", "EXISTS", sha) == [1]
        await conn.execute_command("SCRIPT", "FLUSH")
        assert await conn.execute_command("SCRIPT", "EXISTS", sha) == [0]
        assert await backend.lookup(generations, "s") == (key, "v1")
        assert await conn.execute_command("SCRIPT", "EXISTS", sha) == [1]
