"""
Tests for `twistauth.redisconn`: URL parsing, the deadline and error
mapping of `call` (on a `Clock`), and real connections: plain, with a
password (right and wrong: R3's rejected password), to nothing, and through
a real Redis Sentinel; `run_script`'s lean path against a real
redis-server (answers, ``NOSCRIPT``, deadlines on a `Clock`, cancellation,
the fallback while Redis is down, the error listener).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator, List

import pytest
import pytest_twisted
import txredisapi
from conftest import RedisServer, free_port, wait_for_port
from test_sessions_support import capture_logs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
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


# -- run_script --------------------------------------------------------------

#: Answers its key and arguments (as Redis got them).
ECHO = redisconn.Script("return {KEYS[1], ARGV[1], ARGV[2]}", keys=1)

#: Keeps the server busy for ARGV[1] ms, then answers ARGV[2]: a call that
#: gets no answer within its deadline on a `Clock`, whose reply then comes.
SPIN = redisconn.Script(
    """
local t = redis.call('TIME')
local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop
return ARGV[2]
""",
    keys=0,
)


class ScriptTests(SynchronousTestCase):
    """
    `redisconn.Script`: the command is RESP, the hash is Redis's.
    """

    def test_command(self) -> None:
        script = redisconn.Script("return 1", keys=2)
        self.assertEqual(script.sha, hashlib.sha1(b"return 1").hexdigest())
        command = script.command(["k", b"b\r\n"], ["Zo\u00eb", 7])
        self.assertEqual(
            command,
            b"*7\r\n$7\r\nEVALSHA\r\n$40\r\n"
            + script.sha.encode()
            + b"\r\n$1\r\n2\r\n$1\r\nk\r\n$3\r\nb\r\n\r\n$4\r\nZo\xc3\xab\r\n$1\r\n7\r\n",
        )
        self.assertEqual(
            script.as_eval(command),
            b"*7\r\n$4\r\nEVAL\r\n$8\r\nreturn 1\r\n$1\r\n2\r\n$1\r\nk\r\n"
            b"$3\r\nb\r\n\r\n$4\r\nZo\xc3\xab\r\n$1\r\n7\r\n",
        )
        self.assertEqual(redisconn.Script("return 1", keys=0).command([], []).count(b"$"), 3)

    def test_for_keys(self) -> None:
        """
        One `Script` per number of keys, made once, with the same hash.
        """
        script = redisconn.Script("return #KEYS", keys=1)
        self.assertIs(script.for_keys(1), script)
        three = script.for_keys(3)
        self.assertIs(script.for_keys(3), three)
        self.assertEqual((three.keys, three.sha, three.source), (3, script.sha, script.source))
        self.assertIn(b"\r\n$1\r\n3\r\n", three.command(["a", "b", "c"], []))
        with self.assertRaises(ValueError):
            three.command(["a"], [])

    def test_refused(self) -> None:
        script = redisconn.Script("return 1", keys=1)
        with self.assertRaises(ValueError):
            script.command([], [])
        with self.assertRaises(TypeError):
            script.command(["k"], [1.5])  # a float's text is the caller's choice
        with self.assertRaises(TypeError):
            script.command(["k"], [True])
        with self.assertRaises(ValueError):
            redisconn.run_script(object(), script, [], [], clock=Clock(), timeout=1.0)


async def _connected(server: RedisServer, **kwargs: Any) -> Any:
    """
    A connection to ``server`` that has connected (so `run_script` takes
    its lean path).
    """
    options = {"connect_timeout": 0.5, "max_retry_delay": 0.3}
    options.update(kwargs)
    connection = redisconn.connect(server.url, **options)
    await redisconn.call(reactor, 5.0, connection.ping)
    assert redisconn.health(connection).is_connected
    return connection


def _lean(connection: Any, clock: Any) -> bool:
    """
    Whether `run_script` took its lean path on ``connection`` with ``clock``.
    """
    return clock in vars(connection._factory)["script_deadlines"]


@pytest.fixture
def connected(redis_server: RedisServer) -> Iterator[Any]:
    connection = pytest_twisted.blockon(_connected_deferred(redis_server))
    yield connection
    pytest_twisted.blockon(redisconn.disconnect(connection))


def _connected_deferred(server: RedisServer) -> Deferred[Any]:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(_connected(server))


@pytest_twisted.ensureDeferred
async def test_run_script_answers(connected: Any) -> None:
    """
    A script runs on the lean path and answers, keys and arguments intact
    (text as UTF-8, bytes as they are, integers in decimal); its deadline
    leaves no timer behind.
    """
    clock = Clock()
    kinds: List[str] = []
    redisconn.set_error_listener(connected, kinds.append)
    reply = await redisconn.run_script(
        connected, ECHO, ["k\u00e9"], ["Zo\u00eb \u2713", b"\r\n"], clock=clock, timeout=2.0
    )
    assert reply == ["k\u00e9", "Zo\u00eb \u2713", "\r\n"]
    assert _lean(connected, clock)
    assert await redisconn.run_script(
        connected, ECHO, ["k"], [7, "007"], clock=clock, timeout=2.0
    ) == ["k", "7", "007"]
    status = redisconn.Script("return redis.status_reply(ARGV[1])", keys=0)
    assert await redisconn.run_script(
        connected, status, [], ["fine"], clock=clock, timeout=2.0
    ) == ("fine")
    nothing = redisconn.Script("return false", keys=0)
    assert await redisconn.run_script(connected, nothing, [], [], clock=clock, timeout=2.0) is None
    assert clock.getDelayedCalls() == []
    assert kinds == []


@pytest_twisted.ensureDeferred
async def test_run_script_shares_the_connection_in_order(connected: Any) -> None:
    """
    Script calls and txredisapi's own commands pipelined on one connection
    each get their own reply.
    """
    clock = Clock()
    await connected.set("k", "v")
    calls = []
    for i in range(20):
        calls.append(connected.get("k"))
        calls.append(
            redisconn.run_script(connected, ECHO, [f"k{i}"], [str(i), ""], clock=clock, timeout=2.0)
        )
        calls.append(connected.incr("n"))
    replies = await gatherResults(calls)
    for i in range(20):
        assert replies[3 * i : 3 * i + 3] == ["v", [f"k{i}", str(i), ""], i + 1]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_run_script_loads_a_script_redis_forgot(connected: Any) -> None:
    """
    ``NOSCRIPT`` (Redis restarted, ``SCRIPT FLUSH``) is recovered
    transparently: the script is loaded and run again, within the same
    call, which reports no failure.
    """
    clock = Clock()
    kinds: List[str] = []
    redisconn.set_error_listener(connected, kinds.append)
    echo = redisconn.Script("return {KEYS[1], ARGV[1], ARGV[2], 'forgot'}", keys=1)
    await connected.execute_command("SCRIPT", "FLUSH")
    for turn in range(3):
        assert await connected.execute_command("SCRIPT", "EXISTS", echo.sha) == [0]
        reply = await redisconn.run_script(
            connected, echo, ["k"], [str(turn), "x"], clock=clock, timeout=2.0
        )
        assert reply == ["k", str(turn), "x", "forgot"]
        assert await connected.execute_command("SCRIPT", "EXISTS", echo.sha) == [1]
        # Known now: the next call is one EVALSHA.
        reply = await redisconn.run_script(
            connected, echo, ["k"], ["a", "b"], clock=clock, timeout=2.0
        )
        assert reply == ["k", "a", "b", "forgot"]
        await connected.execute_command("SCRIPT", "FLUSH")
    assert _lean(connected, clock)
    assert kinds == []
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_run_script_errors_pass_through(connected: Any) -> None:
    """
    A script that fails in Redis fails the call with Redis's error (not a
    503, not run twice), reported as ``error``.
    """
    clock = Clock()
    kinds: List[str] = []
    redisconn.set_error_listener(connected, kinds.append)
    await connected.set("k", "v")
    push = redisconn.Script("return redis.call('LPUSH', KEYS[1], 'x')", keys=1)
    with pytest.raises(txredisapi.ResponseError, match="WRONGTYPE"):
        await redisconn.run_script(connected, push, ["k"], [], clock=clock, timeout=2.0)
    assert kinds == ["error"]
    bad = redisconn.Script("return redis.call('NOSUCHCOMMAND')", keys=0)
    with pytest.raises(txredisapi.ResponseError) as caught:
        await redisconn.run_script(connected, bad, [], [], clock=clock, timeout=2.0)
    assert not isinstance(caught.value, BackendUnavailableError)
    assert kinds == ["error", "error"]
    d = redisconn.run_script(connected, ECHO, ["k"], [1.5, ""], clock=clock, timeout=2.0)
    with pytest.raises(TypeError):
        await d
    assert kinds == ["error", "error", "error"]
    assert await connected.get("k") == "v"
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_run_script_deadline_is_exact_and_late_replies_are_dropped(connected: Any) -> None:
    """
    A call that gets no answer within its deadline fails with the
    caller's 503 at exactly the deadline on the clock, reported as
    ``timeout``; its reply, when it comes, goes to nobody: the next calls
    (script or not) get their own.
    """
    clock = Clock()
    clock.advance(1_000_000)
    kinds: List[str] = []
    redisconn.set_error_listener(connected, kinds.append)
    slow = redisconn.run_script(
        connected,
        SPIN,
        [],
        ["300", "late"],
        clock=clock,
        timeout=2.0,
        what="the cache",
        unavailable=SessionStoreUnavailableError,
    )
    assert _lean(connected, clock)
    clock.advance(1.5)
    assert not slow.called
    clock.advance(0.5)
    assert slow.called
    with pytest.raises(SessionStoreUnavailableError, match="the cache did not answer within 2 s"):
        await slow
    assert kinds == ["timeout"]
    assert clock.getDelayedCalls() == []
    # (sent while Redis still runs the slow script: its reply comes first)
    following = redisconn.run_script(connected, ECHO, ["k"], ["next", ""], clock=clock, timeout=2.0)
    own = connected.get("missing")
    assert await following == ["k", "next", ""]
    assert await own is None
    assert kinds == ["timeout"]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_run_script_deadlines_of_different_lengths(connected: Any) -> None:
    """
    Calls with different timeouts each fail at their own deadline, a
    shorter one made later included (one timer keeps them all).
    """
    clock = Clock()
    long = redisconn.run_script(connected, SPIN, [], ["300", "a"], clock=clock, timeout=3.0)
    clock.advance(0.5)
    short = redisconn.run_script(connected, ECHO, ["k"], ["b", ""], clock=clock, timeout=1.0)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.75)
    assert not short.called and not long.called
    clock.advance(0.25)  # 1.5: the short one's deadline
    assert short.called and not long.called
    clock.advance(1.25)
    assert not long.called
    clock.advance(0.25)  # 3.0
    assert long.called
    for d in (long, short):
        with pytest.raises(BackendUnavailableError):
            await d
    assert clock.getDelayedCalls() == []
    assert await redisconn.run_script(
        connected, ECHO, ["k"], ["c", ""], clock=clock, timeout=1.0
    ) == ["k", "c", ""]


@pytest_twisted.ensureDeferred
async def test_run_script_cancel(connected: Any) -> None:
    """
    Cancelling a call fails it with CancelledError (not a 503, not
    reported), stops its deadline, and its reply goes to nobody.
    """
    clock = Clock()
    kinds: List[str] = []
    redisconn.set_error_listener(connected, kinds.append)
    d = redisconn.run_script(connected, SPIN, [], ["100", "cancelled"], clock=clock, timeout=2.0)
    other = redisconn.run_script(connected, ECHO, ["k"], ["other", ""], clock=clock, timeout=2.0)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert len(clock.getDelayedCalls()) == 1  # the other call's deadline
    assert await other == ["k", "other", ""]
    assert clock.getDelayedCalls() == []
    assert await redisconn.run_script(
        connected, ECHO, ["k"], ["after", ""], clock=clock, timeout=2.0
    ) == ["k", "after", ""]
    assert kinds == []


@pytest_twisted.ensureDeferred
async def test_run_script_waits_for_the_first_connection(redis_server: RedisServer) -> None:
    """
    Right after `connect` no connection is ready: the call waits for it
    (the `call` path) and answers.
    """
    connection = redisconn.connect(redis_server.url)
    try:
        assert redisconn.health(connection).state == "connecting"
        reply = await redisconn.run_script(
            connection, ECHO, ["k"], ["first", ""], clock=reactor, timeout=2.0
        )
        assert reply == ["k", "first", ""]
        assert not _lean(connection, reactor)
        assert await redisconn.run_script(
            connection, ECHO, ["k"], ["then", ""], clock=reactor, timeout=2.0
        ) == ["k", "then", ""]
        assert _lean(connection, reactor)
    finally:
        await redisconn.disconnect(connection)
    assert not [c for c in reactor.getDelayedCalls() if "_Deadlines" in repr(c)]


@pytest_twisted.ensureDeferred
async def test_run_script_while_redis_is_down(redis_server: RedisServer) -> None:
    """
    With Redis stopped, calls fail with the caller's 503 (at once once the
    connection is known to be down), each reported as ``unavailable``; they
    work again soon after Redis is back, on the lean path.
    """
    connection = await _connected(redis_server)
    kinds: List[str] = []
    redisconn.set_error_listener(connection, kinds.append)

    def run() -> Deferred[Any]:
        return redisconn.run_script(
            connection,
            ECHO,
            ["k"],
            ["x", ""],
            clock=reactor,
            timeout=2.0,
            unavailable=SessionStoreUnavailableError,
        )

    try:
        assert await run() == ["k", "x", ""]
        redis_server.stop()
        with pytest.raises(SessionStoreUnavailableError, match="Redis is unavailable"):
            await run()  # (meets the lost connection, or waits for the reconnection)
        started = time.monotonic()
        while redisconn.health(connection).state != "unavailable":
            assert time.monotonic() - started < 2.0, redisconn.health(connection)
            await deferLater(reactor, 0.01, lambda: None)
        heard = len(kinds)
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(SessionStoreUnavailableError):
                await run()
            assert time.monotonic() - started < 0.2
        assert kinds[heard:] == ["unavailable"] * 5
        redis_server.start()
        started = time.monotonic()
        while True:
            try:
                assert await run() == ["k", "x", ""]
                break
            except SessionStoreUnavailableError:
                assert time.monotonic() - started < 5.0, "Redis did not come back"
                await deferLater(reactor, 0.05, lambda: None)
        assert redisconn.health(connection).is_connected
        assert await run() == ["k", "x", ""]  # (the lean path, a new connection)
    finally:
        await redisconn.disconnect(connection)
