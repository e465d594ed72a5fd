"""
Tests for `twistauth.redisconn`: URL parsing, the deadline and error
mapping of `call` (on a `Clock`), and real connections: plain, with a
password (right and wrong: R3's rejected password), to nothing, and through
a real Redis Sentinel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
import txredisapi
from conftest import RedisServer, free_port, wait_for_port
from test_sessions_support import capture_logs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth import redisconn
from twistauth.errors import BackendUnavailableError
from twistauth.redisconn import RedisAddress, RedisURLError, parse_url
from twistauth.sessions import RedisSessionCache, SessionStoreUnavailableError


class ParseURLTests(SynchronousTestCase):
    def test_plain(self) -> None:
        address = parse_url("redis://127.0.0.1:6380/2")
        self.assertEqual(address.hosts, (("127.0.0.1", 6380),))
        self.assertEqual(address.db, 2)
        self.assertIsNone(address.password)
        self.assertFalse(address.sentinel)

    def test_defaults(self) -> None:
        address = parse_url("redis://cache.internal")
        self.assertEqual(address.hosts, (("cache.internal", 6379),))
        self.assertEqual(address.db, 0)
        self.assertEqual(parse_url("redis://h/").db, 0)

    def test_password_and_user(self) -> None:
        address = parse_url("redis://:s%40cr%3At%2F@h:1/3")
        self.assertEqual(address.password, "s@cr:t/")
        self.assertIsNone(address.username)
        address = parse_url("redis://app:pw@h:1/0")
        self.assertEqual((address.username, address.password), ("app", "pw"))
        self.assertEqual(parse_url("redis://:@h").password, "")

    def test_ipv6(self) -> None:
        self.assertEqual(parse_url("redis://[::1]:7000/1").hosts, (("::1", 7000),))
        self.assertEqual(parse_url("redis://[::1]/1").hosts, (("::1", 6379),))

    def test_sentinel(self) -> None:
        address = parse_url("redis-sentinel://:pw@s1:26380,s2,10.0.0.3:5000/mymaster/4")
        self.assertTrue(address.sentinel)
        self.assertEqual(address.hosts, (("s1", 26380), ("s2", 26379), ("10.0.0.3", 5000)))
        self.assertEqual(address.service_name, "mymaster")
        self.assertEqual(address.db, 4)
        self.assertEqual(address.password, "pw")
        self.assertEqual(parse_url("redis-sentinel://s1/m").db, 0)

    def test_refused(self) -> None:
        for url in [
            "http://h",
            "rediss://h",
            "redis//h",
            "redis://",
            "redis://h:0",
            "redis://h:70000",
            "redis://h:port",
            "redis://h/db",
            "redis://h/1/2",
            "redis://h?x=1",
            "redis://a,b/0",
            "redis://pw@h",
            "redis://[::1/0",
            "redis-sentinel://s1",
            "redis-sentinel://s1/",
            "redis-sentinel://s1/m/x",
            "redis-sentinel://s1/m/1/2",
            "redis://h:1,/0",
        ]:
            with self.assertRaises(RedisURLError, msg=url):
                parse_url(url)
        with self.assertRaises(RedisURLError):
            parse_url(None)  # type: ignore[arg-type]

    def test_password_never_shown(self) -> None:
        address = parse_url("redis://:hunter2@h:1/0")
        self.assertNotIn("hunter2", repr(address))
        self.assertNotIn("hunter2", address.redacted())
        self.assertEqual(address.redacted(), "redis://:***@h:1/0")
        sentinel = parse_url("redis-sentinel://:hunter2@a:1,b:2/m/3")
        self.assertEqual(sentinel.redacted(), "redis-sentinel://:***@a:1,b:2/m/3")
        try:
            parse_url("redis://:hunter2@h:bad/0")
        except RedisURLError as e:
            self.assertNotIn("hunter2", str(e))


class CallTests(SynchronousTestCase):
    """
    `redisconn.call` on a `Clock`: deadlines, error mapping, cleanup.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_success_leaves_no_timer(self) -> None:
        d = redisconn.call(self.clock, 2.0, succeed, "ok")
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline(self) -> None:
        """
        A call that never answers (txredisapi queues calls while Redis is
        down) fails at its deadline with a 503 and is cancelled.
        """
        cancelled = []
        pending: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
        d = redisconn.call(self.clock, 2.0, lambda: pending, what="the cache")
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, BackendUnavailableError)
        self.assertIn("the cache did not answer within 2 s", str(failure.value))
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unavailable_failures(self) -> None:
        for error in [
            txredisapi.ConnectionError("Not connected"),
            txredisapi.TimeoutError("Not received Redis response"),
            txredisapi.ResponseError("LOADING Redis is loading the dataset in memory"),
            txredisapi.ResponseError("READONLY You can't write against a read only replica."),
            txredisapi.ResponseError("NOAUTH Authentication required."),
            txredisapi.ResponseError("MASTERDOWN Link with MASTER is down"),
            txredisapi.ResponseError("BUSY Redis is busy running a script."),
            txredisapi.ResponseError("OOM command not allowed"),
        ]:
            d = redisconn.call(self.clock, 2.0, fail, error)
            self.failureResultOf(d, BackendUnavailableError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_failures_pass_through(self) -> None:
        for error in [
            txredisapi.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
            txredisapi.ResponseError("Error running script (call to f_x): bad"),
            ValueError("a bug"),
        ]:
            d = redisconn.call(self.clock, 2.0, fail, error)
            failure = self.failureResultOf(d)
            self.assertIs(failure.value, error)

    def test_synchronous_exception(self) -> None:
        def broken() -> Any:
            raise txredisapi.ConnectionError("Not connected")

        self.failureResultOf(redisconn.call(self.clock, 1.0, broken), BackendUnavailableError)

    def test_error_class_is_the_callers(self) -> None:
        d = redisconn.call(
            self.clock, 1.0, lambda: Deferred(), unavailable=SessionStoreUnavailableError
        )
        self.clock.advance(1)
        failure = self.failureResultOf(d, SessionStoreUnavailableError)
        self.assertEqual(failure.value.code, 50335)
        self.assertEqual(failure.value.headers, {"Retry-After": "2"})

    def test_cancelling_is_not_an_outage(self) -> None:
        """
        A caller that cancels (its client went away) gets CancelledError,
        not a 503.
        """
        d = redisconn.call(self.clock, 1.0, lambda: Deferred())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- real connections ------------------------------------------------------


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret/pw@x")
    server.start()
    yield server
    server.cleanup()


@pytest_twisted.ensureDeferred
async def test_numbers_stay_strings(redis_server: RedisServer) -> None:
    connection = redisconn.connect(redis_server.url)
    try:
        await connection.set("k", "007")
        assert await connection.get("k") == "007"
        await connection.set("f", "1.50")
        assert await connection.get("f") == "1.50"
    finally:
        await redisconn.disconnect(connection)


@pytest_twisted.ensureDeferred
async def test_password(password_redis: RedisServer) -> None:
    from urllib.parse import quote

    url = f"redis://:{quote(password_redis.password or '', safe='')}@127.0.0.1:{password_redis.port}/1"
    connection = redisconn.connect(url)
    try:
        d = redisconn.call(reactor, 2.0, connection.set, "k", "v")
        assert await d == "OK"
        assert await connection.get("k") == "v"
    finally:
        await redisconn.disconnect(connection)


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_unavailable(password_redis: RedisServer) -> None:
    """
    R3: a rejected password (twistauth keeps retrying: see test_redis_faults.py) makes
    every call fail at its deadline with a 503, never hang.
    """
    url = f"redis://:Wr0ngPa55@127.0.0.1:{password_redis.port}/0"
    with capture_logs() as lines:
        connection = redisconn.connect(url)
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                await redisconn.call(reactor, 0.3, connection.get, "k")
            assert time.monotonic() - started < 0.6
        finally:
            await redisconn.disconnect(connection)
    text = "\n".join(lines)
    assert "authentication failed: WRONGPASS" in text
    assert "Wr0ngPa55" not in text


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_unavailable() -> None:
    connection = redisconn.connect(f"redis://127.0.0.1:{free_port()}/0", max_retry_delay=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await redisconn.call(reactor, 0.3, connection.get, "k")
        assert time.monotonic() - started < 0.6
    finally:
        await redisconn.disconnect(connection)


@pytest.fixture(scope="module")
def sentinel(redis_server_session: RedisServer) -> Iterator[int]:
    """
    A real Redis Sentinel (redis-server in sentinel mode) watching the
    session's private redis-server as the master of service ``mymaster``.
    """
    executable = shutil.which("redis-sentinel") or shutil.which("redis-server")
    assert executable is not None
    directory = tempfile.mkdtemp(prefix="twistauth-sentinel-")
    port = free_port()
    config = os.path.join(directory, "sentinel.conf")
    with open(config, "w") as f:
        f.write(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor mymaster 127.0.0.1 {redis_server_session.port} 1\n"
        )
    process = subprocess.Popen(
        [executable, config, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_sentinel(redis_server: RedisServer, sentinel: int) -> None:
    """
    A ``redis-sentinel://`` URL finds the master through Sentinel, and the
    session cache works over it.
    """
    address = parse_url(f"redis-sentinel://127.0.0.1:{sentinel}/mymaster/2")
    assert isinstance(address, RedisAddress)
    connection = redisconn.connect(address)
    try:
        assert await redisconn.call(reactor, 5.0, connection.set, "k", "007") == "OK"
        assert await connection.get("k") == "007"
        cache = RedisSessionCache(redis=connection, clock=reactor, call_timeout=5.0)
        session = await cache.create()
        session["a"] = 1
        token = await cache.save(session)
        assert (await cache.load(token))["a"] == 1
    finally:
        await redisconn.disconnect(connection)
    # It really was the master's database 2.
    direct = redisconn.connect(redis_server.url.rsplit("/", 1)[0] + "/2")
    try:
        assert await direct.get("k") == "007"
    finally:
        await redisconn.disconnect(direct)
