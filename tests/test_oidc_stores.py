"""
The OpenID Connect stores: login flows (`twistauth.identity.flows`), the
logout replay cache (`twistauth.identity.jti`) and the refresh lock
(`twistauth.identity.tokens`), in memory on a `Clock` and in a real
redis-server; and refresh single flight between two token managers over
Redis with the provider on a real loopback socket (#48, #49, R1).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from conftest import RedisServer, cached_scripts, flush_scripts
from test_sessions_support import connect
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site

from twistauth import redisconn
from twistauth.accounts.redisstore import RedisUserStore
from twistauth.errors import BackendUnavailableError
from twistauth.identity.errors import InvalidStateError
from twistauth.identity.flows import (
    FlowBinder,
    MemoryFlowStore,
    RedisFlowStore,
    binding_matches,
    new_binding,
)
from twistauth.identity.http import make_http_client
from twistauth.identity.jti import MemoryJtiStore, RedisJtiStore, ReplayCacheFullError
from twistauth.identity.tokens import (
    RedisRefreshLock,
    TokenManager,
    TokenSealer,
    derive_token_key,
)
from twistauth.testing import FakeProvider


def _result(d: Any) -> Any:
    box: List[Any] = []
    d.addBoth(box.append)
    assert box
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


# -- memory ------------------------------------------------------------------


def test_memory_flow_store_takes_once_and_expires() -> None:
    clock = Clock()
    store = MemoryFlowStore(clock=clock)
    _result(store.put("s1", {"a": 1}, 10))
    _result(store.put("s2", {"b": 2}, 10))
    assert _result(store.take("s1")) == {"a": 1}
    assert _result(store.take("s1")) is None
    clock.advance(10)
    assert _result(store.take("s2")) is None
    _result(store.put("s3", {}, 10))
    assert store.stats() == {
        "stored": 3,
        "taken": 1,
        "missing": 2,
        "expired": 1,
        "evicted": 0,
        "pending": 1,
    }
    assert clock.getDelayedCalls() == []


def test_memory_flow_store_sweeps_and_caps() -> None:
    clock = Clock()
    store = MemoryFlowStore(clock=clock, max_entries=3)
    for i in range(3):
        _result(store.put(f"s{i}", {}, 10))
    clock.advance(11)
    _result(store.put("new", {}, 10))
    assert len(store) == 1
    assert store.stats()["expired"] == 3
    for i in range(5):
        _result(store.put(f"t{i}", {}, 10))
    assert len(store) == 3
    assert store.stats()["evicted"] == 3


def test_binder() -> None:
    store = MemoryFlowStore(clock=Clock())
    binder = FlowBinder(store=store, cookie_prefix="p_")
    secret = _result(binder.begin("state", {"kind": "login"}, 60))
    assert binder.cookie_name("state").startswith(b"p_")
    assert len(binder.cookie_name("state")) == 2 + 16
    with pytest.raises(InvalidStateError):
        _result(binder.finish("state", None))
    assert len(store) == 1  # no cookie: nothing consumed
    with pytest.raises(InvalidStateError):
        _result(binder.finish("state", "wrong"))
    assert len(store) == 0  # a wrong cookie consumes it
    secret = _result(binder.begin("state", {"kind": "login"}, 60))
    assert _result(binder.finish("state", secret)) == {"kind": "login"}
    with pytest.raises(InvalidStateError):
        _result(binder.finish("x" * 600, secret))
    secret, digest = new_binding()
    assert binding_matches(secret, digest)
    assert not binding_matches(secret + "x", digest)
    assert not binding_matches(None, digest)


def test_memory_jti_store() -> None:
    clock = Clock()
    store = MemoryJtiStore(clock=clock, max_entries=2)
    assert _result(store.seen("a", 100)) is False
    assert _result(store.seen("a", 100)) is True
    assert _result(store.seen("b", 50)) is False
    with pytest.raises(ReplayCacheFullError):
        _result(store.seen("c", 100))
    clock.advance(50)
    assert _result(store.seen("c", 100)) is False  # b expired and was dropped
    _result(store.forget("a"))
    assert _result(store.seen("a", 100)) is False
    clock.advance(100)
    assert _result(store.seen("a", 200)) is False


# -- Redis -------------------------------------------------------------------


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[Any]:
    connection = connect(redis_server)
    yield connection
    pytest_twisted.blockon(redisconn.disconnect(connection))


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_flow_store(conn: Any) -> None:
    """
    A record is kept under a hash of the state with an EX TTL and taken
    once, even by concurrent takers (#3, #5).
    """
    store = RedisFlowStore(redis=conn, clock=reactor)
    await store.put("the-state", {"kind": "login", "n": "007"}, 600)
    key = store.key("the-state")
    assert "the-state" not in key
    assert key.endswith(hashlib.sha256(b"the-state").hexdigest())
    ttl = await conn.ttl(key)
    assert 595 <= int(ttl) <= 600
    takes = await DeferredList([store.take("the-state") for _ in range(10)])
    records = [r for ok, r in takes if r is not None]
    assert records == [{"kind": "login", "n": "007"}]
    assert store.stats()["taken"] == 1 and store.stats()["missing"] == 9
    await store.put("short", {}, 0.2)
    await conn.execute_command("PEXPIRE", store.key("short"), 1)
    await deferLater(reactor, 0.05, lambda: None)
    assert await store.take("short") is None


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_jti_store(conn: Any) -> None:
    clock = Clock()
    clock.advance(1000)
    store = RedisJtiStore(redis=conn, clock=clock)
    assert await store.seen("k", 1150) is False
    assert await store.seen("k", 1150) is True
    pttl = int(await conn.execute_command("PTTL", "twistauth:oidc:jti:k"))
    assert 149_000 < pttl <= 150_000
    await store.forget("k")
    assert await store.seen("k", 1150) is False


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_outage_is_503(redis_server: RedisServer) -> None:
    connection = connect(redis_server)
    try:
        redis_server.stop()
        flows = RedisFlowStore(redis=connection, clock=reactor, timeout=0.3)
        jti = RedisJtiStore(redis=connection, clock=reactor, timeout=0.3)
        lock = RedisRefreshLock(redis=connection, clock=reactor, timeout=0.3)
        for call in (
            lambda: flows.put("s", {}, 60),
            lambda: flows.take("s"),
            lambda: jti.seen("k", time.time() + 60),
            lambda: lock.acquire("l", 1),
        ):
            with pytest.raises(BackendUnavailableError):
                await call()
    finally:
        redis_server.start()
        await redisconn.disconnect(connection)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_lock(conn: Any) -> None:
    """
    SET NX PX: one holder; renew and release by the owner only; a dead
    holder's lease expires (#49).
    """
    lock = RedisRefreshLock(redis=conn, clock=reactor)
    lease = await lock.acquire("x", 0.3)
    assert lease is not None
    assert await lock.acquire("x", 0.3) is None
    assert await lock.release("x", "not-mine") is False
    assert await lock.renew("x", "not-mine", 5) is False
    assert await lease.renew() is True
    assert 200 < int(await conn.execute_command("PTTL", lock.key("x"))) <= 300
    assert await lease.release() is True
    assert await lease.release() is False
    dead = await lock.acquire("y", 0.2)
    assert dead is not None
    await deferLater(reactor, 0.25, lambda: None)
    assert await lock.acquire("y", 0.2) is not None
    assert await dead.release() is False  # not its lock any more


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_flow_store_survives_script_flush(conn: Any) -> None:
    """
    Redis forgetting its scripts (``SCRIPT FLUSH``, a restart, a failover)
    changes no answer: the take script is loaded again.
    """
    store = RedisFlowStore(redis=conn, clock=reactor)
    await store.put("one", {"n": 1}, 60)
    assert await store.take("one") == {"n": 1}
    await flush_scripts(conn)
    await store.put("two", {"n": 2}, 60)
    takes = await gatherResults([store.take("two") for _ in range(5)])
    assert sorted(takes, key=lambda r: r is None) == [{"n": 2}, None, None, None, None]
    assert await store.take("one") is None
    assert await cached_scripts(conn) == 1


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_redis_lock_survives_script_flush(conn: Any) -> None:
    """
    The renew and release scripts are loaded again after Redis forgot
    them, with the same answers.
    """
    lock = RedisRefreshLock(redis=conn, clock=reactor)
    lease = await lock.acquire("x", 0.5)
    assert lease is not None
    assert await lease.renew() is True
    await flush_scripts(conn)
    assert await lock.renew("x", "not-mine", 5) is False
    assert await lease.renew() is True
    assert 400 < int(await conn.execute_command("PTTL", lock.key("x"))) <= 500
    await flush_scripts(conn)
    assert await lock.release("x", "not-mine") is False
    assert await lease.release() is True
    assert await lease.release() is False
    assert await cached_scripts(conn) == 1  # the release script


# -- two token managers over Redis, the provider on a real socket ----------------


class _Late(Resource):
    isLeaf = True
    target: Any = None

    def render(self, request: Any) -> Any:
        return self.target.render(request)


async def serve_provider(**options: Any) -> Any:
    """
    A `FakeProvider` on a loopback port of the real reactor; returns
    ``(provider, listening port)``.
    """
    late = _Late()
    port = reactor.listenTCP(0, Site(late), interface="127.0.0.1")
    issuer = f"http://127.0.0.1:{port.getHost().port}"
    provider = FakeProvider(
        clock=reactor, issuer=issuer, redirect_uris=("http://127.0.0.1/redirect",), **options
    )
    late.target = provider.resource()
    return provider, port


async def _expire(manager: TokenManager, sealer: TokenSealer, user_id: str) -> None:
    """Make the stored access token one that expired a second ago."""
    stored = await manager.users.get(user_id)
    context = await manager.get_user_context(user_id)
    expired = context.tokens.to_dict()
    expired["expires_at"] = reactor.seconds() - 1
    entry = dict(stored.tokens["fake"])
    entry.update(
        sealer.seal(
            user_id,
            "fake",
            {"tokens": expired, "claims": context.claims, "obtained": reactor.seconds() - 31},
        )
    )
    await manager.users.replace(stored.evolve(tokens={"fake": entry}))


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_two_managers_over_redis(redis_server: RedisServer) -> None:
    """
    Ten concurrent callers split over two token managers (two processes'
    in-process state) sharing a Redis lock and user store: one
    token-endpoint call, no reused refresh token; then a dead holder's
    lock expires and the next caller refreshes (#48, #49, R1).
    """
    provider, port = await serve_provider(rotate_refresh_tokens=True, access_token_lifetime=30)
    connections = [connect(redis_server), connect(redis_server)]
    http = make_http_client(reactor, persistent=False)
    try:
        rp = provider.relying_party(http_client=http)
        sealer = TokenSealer(key=derive_token_key(bytes(32)))
        managers = [
            TokenManager(
                users=RedisUserStore(redis=c, clock=reactor),
                parties={"fake": rp},
                sealer=sealer,
                clock=reactor,
                lock=RedisRefreshLock(redis=c, clock=reactor, timeout=2),
                end_sessions=lambda user_id, reason: None,
                lock_lease=0.3,
                poll_interval=0.01,
            )
            for c in connections
        ]
        result = await provider.log_in(rp)
        user = await managers[0].prepare_user(result)
        await managers[0].record_login(user.user_id, result, sid="s")
        await _expire(managers[0], sealer, user.user_id)
        provider.slow_seconds = 0.8  # longer than the lease: renewals must hold it
        provider.misbehave("token", "slow", once=True)
        calls = [managers[i % 2].get_user_context_and_refresh(user.user_id) for i in range(10)]
        answers = await DeferredList(calls, consumeErrors=True)
        tokens = {r.tokens.access_token for ok, r in answers if ok}
        assert all(ok for ok, _ in answers), answers
        assert len(tokens) == 1
        assert provider.hits["token"] == 2
        assert provider.reused_refresh_tokens == 0
        assert sum(m.counts["refreshed"] for m in managers) == 1

        # A holder that died: its lease runs out, then the next caller refreshes.
        name = managers[0]._lock_name(user.user_id, "fake")
        await connections[0].set("twistauth:oidc:lock:" + name, "dead", pexpire=300)
        await _expire(managers[0], sealer, user.user_id)
        started = time.monotonic()
        fresh = await managers[1].get_user_context_and_refresh(user.user_id)
        waited = time.monotonic() - started
        assert 0.25 < waited < 1.5, waited
        assert fresh.tokens.access_token not in tokens
        assert provider.hits["token"] == 3
    finally:
        await port.stopListening()
        for c in connections:
            await redisconn.disconnect(c)
        pool = http._agent._pool
        await pool.closeCachedConnections()
