"""
The failed-login throttle (checklist case 94), one contract for the memory
and the Redis implementation, on an injected `Clock`: at most N failures
per account and per address in a sliding window, 429 with ``Retry-After``,
a success clears the account but never the address's other failures, and
concurrent attempts cannot overshoot.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, List

import pytest
import pytest_twisted
import txredisapi
from conftest import cached_scripts, flush_scripts
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from twistauth import redisconn
from twistauth.accounts import ILoginThrottle, LoginThrottledError, MemoryLoginThrottle
from twistauth.accounts.throttle import Attempt, RedisLoginThrottle, address_key
from twistauth.errors import BackendUnavailableError

Factory = Callable[..., Any]


@pytest_twisted.async_yield_fixture(params=["memory", "redis", "redisconn"])
async def make(request: Any) -> AsyncIterator[Any]:
    """
    ``make(**limits)`` → ``(throttle, clock)``.  ``redisconn`` is Redis
    through `twistauth.redisconn.connect`, as in production (its scripts
    take `redisconn.run_script`'s lean path).
    """
    clock = Clock()
    clock.advance(1_700_000_000)
    connections: List[Any] = []

    def factory(**limits: Any) -> Any:
        if request.param == "memory":
            return MemoryLoginThrottle(clock=clock, **limits), clock
        server = request.getfixturevalue("redis_server")
        if request.param == "redisconn":
            connection = redisconn.connect(server.url)
        else:
            connection = txredisapi.lazyConnection("127.0.0.1", server.port, convertNumbers=False)
        connections.append(connection)
        return RedisLoginThrottle(redis=connection, clock=clock, prefix="t:", **limits), clock

    yield factory
    for connection in connections:
        if request.param == "redisconn":
            await redisconn.disconnect(connection)
        else:
            await connection.disconnect()
    assert clock.getDelayedCalls() == []


async def fail_n(throttle: Any, n: int, account: Any, address: str) -> None:
    for _ in range(n):
        await throttle.attempt(account, address)


async def refused(throttle: Any, account: Any, address: str) -> int:
    """The Retry-After of a refused attempt (the test fails if it is allowed)."""
    with pytest.raises(LoginThrottledError) as caught:
        await throttle.attempt(account, address)
    error = caught.value
    assert (error.status, error.code, error.name) == (429, 42940, "login_throttled")
    assert error.headers["Retry-After"] == str(error.retry_after)
    return error.retry_after


@pytest_twisted.ensureDeferred
async def test_provides_the_interface(make: Factory) -> None:
    throttle, _ = make()
    assert verifyObject(ILoginThrottle, throttle)


@pytest_twisted.ensureDeferred
async def test_default_is_100_failures_per_account_per_hour(make: Factory) -> None:
    throttle, clock = make()
    await fail_n(throttle, 100, "alice", "192.0.2.1")
    # From another address too: the account's limit is the account's.
    assert await refused(throttle, "alice", "198.51.100.7") == 3600
    clock.advance(3599)
    assert await refused(throttle, "alice", "198.51.100.7") == 1
    clock.advance(1)
    # All 100 leave the window together: 100 more, then refused again.
    await fail_n(throttle, 100, "alice", "198.51.100.7")
    assert await refused(throttle, "alice", "192.0.2.1") == 3600


@pytest_twisted.ensureDeferred
async def test_window_slides(make: Factory) -> None:
    throttle, clock = make(account_limit=3, window=60)
    for _ in range(3):
        await throttle.attempt("alice", "192.0.2.1")
        clock.advance(10)
    # Failures at t=0, 10, 20; now t=30: the oldest leaves at t=60.
    assert await refused(throttle, "alice", "192.0.2.1") == 30
    clock.advance(30)
    await throttle.attempt("alice", "192.0.2.1")  # t=60: one slot free
    assert await refused(throttle, "alice", "192.0.2.1") == 10  # next leaves at t=70
    clock.advance(0.5)
    assert await refused(throttle, "alice", "192.0.2.1") == 10  # 9.5 s rounds up


@pytest_twisted.ensureDeferred
async def test_refused_attempts_are_not_counted(make: Factory) -> None:
    throttle, clock = make(account_limit=2, window=100)
    await fail_n(throttle, 2, "alice", "192.0.2.1")
    for _ in range(20):
        await refused(throttle, "alice", "192.0.2.1")
    clock.advance(100)
    await fail_n(throttle, 2, "alice", "192.0.2.1")


@pytest_twisted.ensureDeferred
async def test_address_limit_spans_accounts(make: Factory) -> None:
    throttle, _ = make(address_limit=5)
    for n in range(5):
        await throttle.attempt(f"user{n}", "203.0.113.9")
    await refused(throttle, "someone-else", "203.0.113.9")
    await refused(throttle, None, "203.0.113.9")  # account creation too
    # The same accounts from elsewhere are not affected.
    await throttle.attempt("user0", "203.0.113.10")


@pytest_twisted.ensureDeferred
async def test_success_clears_the_account_but_not_the_address(make: Factory) -> None:
    throttle, _ = make(account_limit=3, address_limit=5)
    await fail_n(throttle, 2, "alice", "192.0.2.1")
    await fail_n(throttle, 2, "bob", "192.0.2.1")
    # An attacker with a valid account of their own logs in from the address.
    attempt = await throttle.attempt("mallory", "192.0.2.1")
    await throttle.succeeded(attempt)
    # The address still holds the 4 failures: one more, then refused.
    await throttle.attempt("carol", "192.0.2.1")
    await refused(throttle, "dave", "192.0.2.1")
    # Alice logs in from home: her account's failures are cleared...
    ok = await throttle.attempt("alice", "198.51.100.1")
    await throttle.succeeded(ok)
    await fail_n(throttle, 3, "alice", "198.51.100.1")
    await refused(throttle, "alice", "198.51.100.1")
    # ...but bob's are not.
    await throttle.attempt("bob", "198.51.100.2")
    await refused(throttle, "bob", "198.51.100.2")


@pytest_twisted.ensureDeferred
async def test_concurrent_attempts_cannot_overshoot(make: Factory) -> None:
    throttle, _ = make(account_limit=5)
    results = await DeferredList(
        [throttle.attempt("alice", f"192.0.2.{n}") for n in range(30)], consumeErrors=True
    )
    allowed = [ok for ok, _ in results if ok]
    refusals = [f for ok, f in results if not ok]
    assert len(allowed) == 5
    assert all(f.check(LoginThrottledError) for f in refusals)


@pytest_twisted.ensureDeferred
async def test_ipv6_counts_per_64(make: Factory) -> None:
    throttle, _ = make(address_limit=2)
    await throttle.attempt("a", "2001:db8::1")
    await throttle.attempt("b", "2001:db8::ffff:2")
    await refused(throttle, "c", "2001:db8:0:0:1234::3")
    await throttle.attempt("d", "2001:db8:0:1::1")  # another /64


def test_address_keys() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("2001:db8::1") == "2001:db8::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("") == "-"
    assert address_key("unix-socket") == "unix-socket"
    assert address_key("x" * 500) == "x" * 100


def test_limits_must_be_positive() -> None:
    for bad in ({"account_limit": 0}, {"address_limit": 0}, {"window": 0}):
        with pytest.raises(ValueError):
            MemoryLoginThrottle(clock=Clock(), **bad)


def test_memory_throttle_bounds_what_it_tracks() -> None:
    clock = Clock()
    throttle = MemoryLoginThrottle(clock=clock, max_keys=10, window=60)
    for n in range(20):
        throttle.attempt(f"user{n}", "192.0.2.1")
    assert throttle.tracked() <= 10
    clock.advance(61)
    throttle.attempt("late", "192.0.2.2")
    # Expired counts are dropped first.
    assert throttle.tracked() == 2


@pytest_twisted.ensureDeferred
async def test_redis_keys_expire_with_the_window(redis_server: Any) -> None:
    connection = txredisapi.lazyConnection("127.0.0.1", redis_server.port, convertNumbers=False)
    try:
        throttle = RedisLoginThrottle(redis=connection, clock=Clock(), window=120, prefix="p:")
        await throttle.attempt("alice", "192.0.2.1")
        for key in ("p:throttle:account:alice", "p:throttle:address:192.0.2.1"):
            ttl = await connection.execute_command("PTTL", key)
            assert 0 < ttl <= 120_000
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_outage_fails_closed(redis_server: Any) -> None:
    connection = txredisapi.lazyConnection("127.0.0.1", redis_server.port, convertNumbers=False)
    try:
        throttle = RedisLoginThrottle(redis=connection, clock=reactor, timeout=0.3)
        attempt = await throttle.attempt("alice", "192.0.2.1")
        redis_server.stop()
        with pytest.raises(BackendUnavailableError):
            await throttle.attempt("alice", "192.0.2.1")
        with pytest.raises(BackendUnavailableError):
            await throttle.succeeded(attempt)
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_survives_script_flush(redis_server: Any) -> None:
    """
    Redis forgetting its scripts (``SCRIPT FLUSH``, a restart, a failover)
    changes no answer: each script (with one key or two) is loaded again.
    """
    clock = Clock()
    clock.advance(1_700_000_000)
    connection = redisconn.connect(redis_server.url)
    try:
        throttle = RedisLoginThrottle(
            redis=connection, clock=clock, account_limit=2, address_limit=3, window=60.5
        )
        first = await throttle.attempt("alice", "192.0.2.1")
        await flush_scripts(connection)
        await throttle.attempt(None, "192.0.2.1")
        clock.advance(0.25)
        await flush_scripts(connection)
        await throttle.attempt("bob", "192.0.2.1")
        with pytest.raises(LoginThrottledError) as refused:  # the address's third
            await throttle.attempt("bob", "192.0.2.1")
        assert refused.value.retry_after == 61  # 60.25 s, rounded up
        await flush_scripts(connection)
        await throttle.succeeded(first)
        await flush_scripts(connection)
        await throttle.succeeded(Attempt(None, first.address, "unknown", first.time))
        assert await connection.zcard("twistauth:throttle:address:192.0.2.1") == 2
        assert await connection.exists("twistauth:throttle:account:alice") in (0, False)
        assert await cached_scripts(connection) == 1
    finally:
        await redisconn.disconnect(connection)


def test_account_errors_use_their_code_range_and_rebuild_from_json() -> None:
    """
    Every accounts error has ``n`` in 40-59, and can be rebuilt from its
    JSON form as the test client does (``cls(value)``).
    """
    from twistauth.accounts import errors as account_errors
    from twistauth.errors import TwistauthError

    classes = [
        cls
        for cls in vars(account_errors).values()
        if isinstance(cls, type) and issubclass(cls, TwistauthError) and cls is not TwistauthError
    ]
    assert len(classes) == 9
    for cls in classes:
        assert 40 <= cls.code % 100 <= 59, cls
        assert cls.code // 100 == cls.status, cls
        rebuilt = cls(cls.default_message)
        assert rebuilt.to_json() == {
            "code": cls.code,
            "name": cls.name,
            "value": cls.default_message,
        }
    assert LoginThrottledError(retry_after=0.2).headers == {"Retry-After": "1"}
    assert LoginThrottledError(retry_after=61.5).retry_after == 62
