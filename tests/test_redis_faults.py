"""
Redis faults at the connection level (checklist R2 and R3), against real
servers on loopback:

- a server that accepts and never answers, and one whose accept queue is
  full (the kernel drops the SYN): calls answer 503 within the connect
  deadline, then at once, and the reason is logged;
- a hung redis-server (SIGSTOP: the kernel still acknowledges, nothing
  answers): calls answer 503 within their deadline, a readiness probe drops
  the stalled connection, calls then fail at once, and SIGCONT heals it;
- packets really dropped (a redis-server in a network namespace behind a
  veth pair whose far end goes down; needs root): the same, with real
  packet loss both ways, for a live connection and for new ones;
- Redis restarted with a changed password: txredisapi alone would stop
  reconnecting for good; here calls answer 503 at once, the probe says
  ``redis_auth_failed``, the log names the problem (never a password), and
  putting the password back (CONFIG SET or a restart) heals it with the
  session intact;
- a hung server is dropped by the reply watchdog even when every call gave
  up first; a database number the server lacks is "refused";
- Redis stopped: calls fail at once instead of waiting out their deadline
  (the numbers are printed), and the first success follows the restart
  within the retry delay.

`LinkHealth` itself is tested on a `Clock`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import pytest_twisted
from conftest import RedisServer
from test_sessions_support import capture_logs
from timing_support import no_gc_pauses  # noqa: F401 (autouse fixture)
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth import redisconn
from twistauth.errors import BackendUnavailableError
from twistauth.redisconn import LinkHealth, RedisUnhealthy, parse_url
from twistauth.sessions import RedisSessionCache, SessionStoreUnavailableError

FIRST_PASSWORD = "first-Pa55/word"
SECOND_PASSWORD = "second-Pa55/word"


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds, lambda: None)


#: A call that fails "at once": far below the 0.3 s connect deadline these
#: tests use (a call that waited for a connection attempt takes at least
#: that) and below every call deadline, with room for a loaded machine.
AT_ONCE = 0.1

#: How late a deadline's timer may fire on a loaded 2-core machine.
TIMER_SLACK = 0.5


def _runqueue_wait() -> float:
    """
    Seconds this thread has spent runnable but waiting for a CPU (Linux
    ``schedstat``), or 0 where that is not known.
    """
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class Lag:
    """
    How late a 10 ms LoopingCall runs: the reactor's responsiveness.

    ``worst`` leaves out the time the process waited for a CPU (other
    processes of a loaded machine had it): what is left is the reactor
    being blocked or busy, which is what the tests rule out.  ``raw`` is
    the wall-clock worst.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        self.raw = 0.0
        self.last = time.monotonic()
        self.waited = _runqueue_wait()
        self.loop = task.LoopingCall(self.tick)

    def tick(self) -> None:
        now, waited = time.monotonic(), _runqueue_wait()
        late = now - self.last - 0.01
        self.raw = max(self.raw, late)
        self.worst = max(self.worst, late - (waited - self.waited))
        self.last, self.waited = now, waited

    def __enter__(self) -> Lag:
        self.loop.start(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.stop()


async def timed_call(connection: Any, deadline: float, *command: Any) -> Tuple[str, float]:
    """
    ``("ok", seconds)`` or ``("503", seconds)`` for one call through
    `redisconn.call`.
    """
    started = time.monotonic()
    try:
        await redisconn.call(reactor, deadline, connection.execute_command, *command)
        return "ok", time.monotonic() - started
    except BackendUnavailableError as e:
        assert e.status == 503
        return "503", time.monotonic() - started


async def until_ok(connection: Any, limit: float, *command: Any) -> float:
    """
    Seconds until a call succeeds, polling every 20 ms.
    """
    started = time.monotonic()
    while (await timed_call(connection, 0.5, *command))[0] != "ok":
        assert time.monotonic() - started < limit, redisconn.health(connection)
        await sleep(0.02)
    return time.monotonic() - started


async def until_state(connection: Any, state: str, limit: float) -> float:
    started = time.monotonic()
    while redisconn.health(connection).state != state:
        assert time.monotonic() - started < limit, redisconn.health(connection)
        await sleep(0.01)
    return time.monotonic() - started


async def probe_error(connection: Any, timeout: float = 0.3) -> RedisUnhealthy:
    with pytest.raises(RedisUnhealthy) as caught:
        await redisconn.probe(connection, reactor, timeout)
    return caught.value


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """
    A redis-server of this test's own (the test stops, pauses or restarts it).
    """
    server = RedisServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.cleanup()


def quote(password: str) -> str:
    from urllib.parse import quote as q

    return q(password, safe="")


# -- LinkHealth on a Clock ---------------------------------------------------


class LinkHealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.health = LinkHealth(
            address=parse_url(f"redis://:{quote(FIRST_PASSWORD)}@h:1/0"), clock=self.clock
        )

    def test_transitions(self) -> None:
        """
        connecting → connected → reconnecting (calls wait) → unavailable
        (calls fail fast) → connected; each change logged once, with the
        outage's length on recovery.
        """
        health = self.health
        self.assertEqual((health.state, health.fails_fast), ("connecting", False))
        with capture_logs() as lines:
            health.connected()
            self.assertTrue(health.is_connected)
            self.clock.advance(10)
            health.lost()
            self.assertEqual((health.state, health.fails_fast), ("reconnecting", False))
            self.clock.advance(1)
            health.failed("unavailable", "connection refused")
            health.failed("unavailable", "connection refused")
            self.assertEqual(health.state, "unavailable")
            self.assertTrue(health.fails_fast)
            self.assertEqual(health.since, 11)
            self.clock.advance(2.5)
            health.connected()
        text = "\n".join(lines)
        self.assertEqual(text.count("is unavailable: connection refused"), 1, text)
        self.assertIn("connected again after 3.5 s (was unavailable)", text)
        self.assertNotIn(FIRST_PASSWORD, text)
        self.assertIn("redis://:***@h:1/0", text)

    def test_auth_failure_stays_the_headline(self) -> None:
        """
        While the password is refused, a later attempt that cannot connect
        at all does not hide the refusal.
        """
        self.health.failed("auth_failed", "authentication failed: WRONGPASS")
        self.health.failed("unavailable", "connection refused")
        self.assertEqual(self.health.state, "auth_failed")
        self.assertIn("WRONGPASS", self.health.reason or "")
        self.assertIn("connection refused", self.health.reason or "")

    def test_closed_is_final(self) -> None:
        self.health.closed()
        self.health.connected()
        self.health.failed("unavailable", "x")
        self.assertEqual(self.health.state, "closed")
        self.assertTrue(self.health.fails_fast)


# -- servers that do not answer ----------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """
    A port whose listener never accepts: the kernel completes each TCP
    handshake, then nothing is ever said.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


@pytest.fixture
def dropping_port() -> Iterator[int]:
    """
    A port whose accept queue is full: the kernel drops every new SYN.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    # Fill the queue until a connect hangs (its length for listen(0)
    # differs: one on CPython, more on PyPy).
    fillers: List[socket.socket] = []
    while True:
        assert len(fillers) < 16, "the accept queue never filled up"
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except OSError:  # really full: a connect hangs
            probe.close()
            break
        fillers.append(probe)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("kind", ["silent", "dropping"])
@pytest_twisted.ensureDeferred
async def test_no_answer_fails_within_connect_deadline(
    kind: str, request: Any
) -> None:
    """
    R3, connect phase: a server that never answers (accepted, silent) or
    never even completes TCP (SYN dropped) fails the calls waiting for it
    at the connect deadline (0.3 s, not the call's own 2 s), every later
    call at once, and the probe says why; the reactor never stalls.
    (The bounds leave room for a loaded machine: `AT_ONCE`, `TIMER_SLACK`,
    and `Lag` discounts the time the process waited for a CPU.)
    """
    port = request.getfixturevalue(f"{kind}_port")
    with capture_logs() as lines, Lag() as lag:
        connection = redisconn.connect(
            f"redis://127.0.0.1:{port}/0", connect_timeout=0.3, max_retry_delay=0.5
        )
        try:
            outcome, first = await timed_call(connection, 2.0, "GET", "k")
            assert outcome == "503"
            # At the connect deadline, well before the call's own 2 s.
            assert 0.25 < first < 0.3 + TIMER_SLACK, first
            later = [await timed_call(connection, 2.0, "GET", "k") for _ in range(20)]
            assert all(o == "503" for o, _ in later)
            worst = max(t for _, t in later)
            assert worst < AT_ONCE, worst
            health = redisconn.health(connection)
            assert health.state == "unavailable" and health.fails_fast
            expected = (
                "connected, but no answer within 0.3 s"
                if kind == "silent"
                else "no connection within 0.3 s"
            )
            assert expected in (health.reason or "")
            error = await probe_error(connection)
            assert error.name == "redis_unavailable" and expected in str(error)
        finally:
            await redisconn.disconnect(connection)
    assert lag.worst < 0.1, lag.worst
    text = "\n".join(lines)
    assert text.count(f"Redis at redis://127.0.0.1:{port}/0 is unavailable: {expected}") == 1
    print(f"\n{kind}: first 503 after {first:.3f} s (connect deadline 0.3 s, call deadline 2 s), "
          f"then within {worst * 1000:.1f} ms")


@pytest_twisted.ensureDeferred
async def test_hung_redis(private_redis: RedisServer) -> None:
    """
    R3 on a live connection: redis-server stopped with SIGSTOP (TCP still
    acknowledged, no answer).  Calls answer 503 within their deadline; a
    readiness probe misses its deadline and drops the connection; the new
    connection gets no answer within the connect deadline, so calls fail at
    once; after SIGCONT the connection heals with the data intact.
    """
    connection = redisconn.connect(
        private_redis.url, connect_timeout=0.3, reply_timeout=5.0, max_retry_delay=0.5
    )
    try:
        assert (await timed_call(connection, 0.3, "SET", "k", "v"))[0] == "ok"
        await redisconn.probe(connection, reactor, 0.3)
        assert private_redis.process is not None
        os.kill(private_redis.process.pid, signal.SIGSTOP)
        with Lag() as lag:
            outcome, took = await timed_call(connection, 0.3, "GET", "k")
            assert outcome == "503" and 0.25 < took < 0.3 + TIMER_SLACK, (outcome, took)
            error = await probe_error(connection, 0.3)
            assert error.name == "redis_timeout", error
            # The dropped connection is made again: TCP connects, the
            # handshake gets no answer within the connect deadline.
            detected = await until_state(connection, "unavailable", 2.0)
            fast = [await timed_call(connection, 0.3, "GET", "k") for _ in range(10)]
        assert all(o == "503" and t < AT_ONCE for o, t in fast), fast
        assert lag.worst < 0.1, lag.worst
        assert "no answer within 0.3 s" in (redisconn.health(connection).reason or "")
        os.kill(private_redis.process.pid, signal.SIGCONT)
        healed = await until_ok(connection, 3.0, "GET", "k")
        assert await connection.get("k") == "v"
        await redisconn.probe(connection, reactor, 0.3)
    finally:
        await redisconn.disconnect(connection)
    print(f"\nhung Redis: 503 after {took:.3f} s (deadline 0.3 s); fail-fast "
          f"{detected:.2f} s after the probe; healed {healed:.2f} s after SIGCONT")


@pytest_twisted.ensureDeferred
async def test_reply_watchdog(private_redis: RedisServer) -> None:
    """
    A hung server is dropped by the reply watchdog even with no probe and
    every call giving up at its own (shorter) deadline (txredisapi's per-call
    reply timeout was cancelled with each call, so the connection was never
    dropped and every call took its full deadline for as long as the server
    hung); the reconnection gets no answer, and calls fail at once.
    """
    connection = redisconn.connect(
        private_redis.url, connect_timeout=0.3, reply_timeout=1.0, max_retry_delay=0.5
    )
    try:
        assert (await timed_call(connection, 0.3, "SET", "k", "v"))[0] == "ok"
        assert private_redis.process is not None
        os.kill(private_redis.process.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        with capture_logs() as lines:
            while True:
                outcome, took = await timed_call(connection, 0.3, "GET", "k")
                assert outcome == "503" and took < 0.3 + TIMER_SLACK, (outcome, took)
                # (the calls pending when the watchdog drops the connection
                # fail at once too: wait for the state that fails them all)
                if took < AT_ONCE and redisconn.health(connection).fails_fast:
                    break
                assert time.monotonic() - stopped < 3.0, "calls never failed fast"
            fast = time.monotonic() - stopped
        assert 1.0 < fast < 2.0, fast  # reply timeout, then the connect deadline
        text = "\n".join(lines)
        assert "no answer for 1 s; dropping the connection" in text
        os.kill(private_redis.process.pid, signal.SIGCONT)
        await until_ok(connection, 3.0, "GET", "k")
    finally:
        await redisconn.disconnect(connection)
    print(f"\nreply watchdog: calls fail at once {fast:.2f} s after the server hung "
          "(reply timeout 1 s + connect deadline 0.3 s)")


@pytest_twisted.ensureDeferred
async def test_refused_database(private_redis: RedisServer) -> None:
    """
    A database number the server does not have: ``refused``, calls answer
    503 at once, the probe says ``redis_refused``.
    """
    url = private_redis.url.rsplit("/", 1)[0] + "/99"
    connection = redisconn.connect(url, connect_timeout=0.5, max_retry_delay=0.5)
    try:
        assert (await timed_call(connection, 1.0, "GET", "k"))[0] == "503"
        health = redisconn.health(connection)
        assert health.state == "refused", health
        assert "database 99 refused: ERR DB index is out of range" in (health.reason or "")
        assert (await probe_error(connection)).name == "redis_refused"
    finally:
        await redisconn.disconnect(connection)


# -- real packet drop (network namespace) ------------------------------------


class Blackhole:
    """
    A redis-server in its own network namespace, reached over a veth pair;
    `drop` takes the namespace's end of the pair down, so packets both ways
    are dropped (not refused), and `restore` brings it back.
    """

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"twa-{tag}"
        self.outside, self.inside = f"twa{tag}o", f"twa{tag}i"
        self.subnet = self._free_subnet()
        self.host = f"{self.subnet}.2"
        self.port = 6379
        self.directory = tempfile.mkdtemp(prefix="twistauth-blackhole-")
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._created: List[List[str]] = []

    @staticmethod
    def _free_subnet() -> str:
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        for third in range(200, 250):
            subnet = f"10.251.{third}"
            if f"inet {subnet}." not in used:
                return subnet
        raise RuntimeError("no free 10.251.x.0/30 subnet")

    def _ip(self, *args: str, inside: bool = False) -> None:
        command = ["ip"] + (["netns", "exec", self.namespace, "ip"] if inside else []) + list(args)
        subprocess.run(command, check=True, capture_output=True)

    def start(self) -> None:
        self._ip("netns", "add", self.namespace)
        self._created.append(["ip", "netns", "del", self.namespace])
        self._ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside,
                 "netns", self.namespace)
        self._created.append(["ip", "link", "del", self.outside])
        self._ip("addr", "add", f"{self.subnet}.1/30", "dev", self.outside)
        self._ip("link", "set", self.outside, "up")
        self._ip("addr", "add", f"{self.host}/30", "dev", self.inside, inside=True)
        self._ip("link", "set", self.inside, "up", inside=True)
        self._ip("link", "set", "lo", "up", inside=True)
        executable = shutil.which("redis-server")
        assert executable is not None
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, executable, "--port", str(self.port),
             "--bind", self.host, "--protected-mode", "no", "--save", "", "--dir",
             self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def drop(self) -> None:
        self._ip("link", "set", self.inside, "down", inside=True)

    def restore(self) -> None:
        self._ip("link", "set", self.inside, "up", inside=True)

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
        for command in reversed(self._created):
            subprocess.run(command, capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    # iproute2 comes from tests/setup.sh, so a missing `ip` fails here.
    # Network namespaces need root: CI runs as root and must run this; a
    # developer's unprivileged run is told why it did not.
    assert shutil.which("ip") is not None, "iproute2 is missing: run bash tests/setup.sh"
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("dropping packets needs root (ip netns, veth); CI must run as root")
        pytest.skip("dropping packets needs root (ip netns, veth); CI runs it as root")
    hole = Blackhole()
    try:
        hole.start()
        yield hole
    finally:
        hole.cleanup()


@pytest_twisted.ensureDeferred
async def test_blackholed_redis(blackhole: Blackhole) -> None:
    """
    R3 with packets really dropped: a live connection's calls answer 503
    within their deadline; the probe drops the stalled connection; new
    connections get no SYN-ACK within the connect deadline, so calls fail
    at once; once packets flow again the connection heals (TCP
    retransmission delivers nothing stale: the data is intact).
    """
    url = f"redis://{blackhole.host}:{blackhole.port}/0"
    connection = redisconn.connect(
        url, connect_timeout=0.3, reply_timeout=5.0, max_retry_delay=0.5
    )
    try:
        assert (await timed_call(connection, 0.3, "SET", "k", "v"))[0] == "ok"
        blackhole.drop()
        with Lag() as lag, capture_logs() as lines:
            outcome, took = await timed_call(connection, 0.3, "GET", "k")
            assert outcome == "503" and 0.25 < took < 0.3 + TIMER_SLACK, (outcome, took)
            error = await probe_error(connection, 0.3)
            assert error.name == "redis_timeout", error
            detected = await until_state(connection, "unavailable", 2.0)
            assert "no connection within 0.3 s" in (redisconn.health(connection).reason or "")
            fast = [await timed_call(connection, 0.3, "GET", "k") for _ in range(10)]
            assert all(o == "503" and t < AT_ONCE for o, t in fast), fast
            error = await probe_error(connection, 0.3)
            assert error.name == "redis_unavailable"
        assert lag.worst < 0.1, lag.worst
        assert f"Redis at {url} is unavailable: no connection within 0.3 s" in "\n".join(lines)
        blackhole.restore()
        healed = await until_ok(connection, 3.0, "GET", "k")
        assert await connection.get("k") == "v"
    finally:
        await redisconn.disconnect(connection)
    print(f"\nblackholed Redis: 503 after {took:.3f} s (deadline 0.3 s); fail-fast "
          f"{detected:.2f} s after the probe; healed {healed:.2f} s after packets flowed again")


# -- a changed password ------------------------------------------------------


@pytest.fixture
def auth_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=FIRST_PASSWORD, persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def restart_with(server: RedisServer, password: str) -> None:
    server.stop()
    server.password = password
    server.start()


def set_password(server: RedisServer, password: str) -> None:
    subprocess.run(
        ["redis-cli", "-p", str(server.port), "-a", server.password or "", "--no-auth-warning",
         "CONFIG", "SET", "requirepass", password],
        check=True, stdout=subprocess.DEVNULL,
    )
    server.password = password


@pytest_twisted.ensureDeferred
async def test_changed_password(auth_redis: RedisServer) -> None:
    """
    R3: Redis restarted with another password.  Calls answer 503 at once
    (a session is "unavailable", not "logged out"), the probe fails with
    ``redis_auth_failed``, one log line names the problem, and attempts go
    on: CONFIG SET back to our password heals the connection, and so does a
    restart with it.  No password reaches the log or an error.
    """
    url = f"redis://:{quote(FIRST_PASSWORD)}@127.0.0.1:{auth_redis.port}/2"
    connection = redisconn.connect(url, connect_timeout=0.5, max_retry_delay=0.5)
    cache = RedisSessionCache(redis=connection, clock=reactor, call_timeout=2.0)
    seen: List[str] = []
    kinds: List[str] = []
    redisconn.set_error_listener(connection, kinds.append)
    try:
        session = await cache.create()
        session.log_in("ann", [], now=reactor.seconds(), issuer="https://op", provider_sid="s")
        token = await cache.save(session)
        await redisconn.probe(connection, reactor, 0.5)
        with capture_logs() as lines:
            for heal in (set_password, restart_with):
                restart_with(auth_redis, SECOND_PASSWORD)
                started = time.monotonic()
                with pytest.raises(SessionStoreUnavailableError) as caught:
                    await cache.load(token)
                first = time.monotonic() - started
                seen.append(str(caught.value))
                assert first < 0.5, first
                # (that call may have met the lost connection; the
                # reconnection's refusal follows within milliseconds)
                await until_state(connection, "auth_failed", 0.5)
                health = redisconn.health(connection)
                assert health.state == "auth_failed", health
                assert "authentication failed: WRONGPASS" in (health.reason or "")
                timings = []
                for _ in range(10):
                    started = time.monotonic()
                    with pytest.raises(SessionStoreUnavailableError) as caught:
                        await cache.load(token)
                    timings.append(time.monotonic() - started)
                    seen.append(str(caught.value))
                assert max(timings) < AT_ONCE, timings
                error = await probe_error(connection)
                assert error.name == "redis_auth_failed"
                assert "authentication failed" in str(error)
                seen.append(str(error))
                # Attempts go on (txredisapi alone would have stopped).
                await sleep(1.0)
                assert redisconn.health(connection).state == "auth_failed"
                heal(auth_redis, FIRST_PASSWORD)
                put_back = time.monotonic()
                while True:
                    try:
                        loaded = await cache.load(token)
                        break
                    except SessionStoreUnavailableError:
                        assert time.monotonic() - put_back < 3.0
                        await sleep(0.02)
                healed = time.monotonic() - put_back
                assert loaded.user_id == "ann"  # logged in still: an outage is no logout
                await redisconn.probe(connection, reactor, 0.5)
                print(f"\nchanged password ({heal.__name__}): first 503 after {first:.3f} s, "
                      f"then within {max(timings) * 1000:.1f} ms; healed {healed:.2f} s after "
                      "the password was put back")
    finally:
        await redisconn.disconnect(connection)
    # The error listener heard the calls refused for the password.
    assert kinds.count("auth_failed") >= 20, kinds
    text = "\n".join(lines + seen)
    assert text.count("rejected") == 0  # the wording is "authentication failed"
    assert text.count("authentication failed: WRONGPASS") >= 2
    assert "readiness fails until the password matches again" in text
    assert "connected again after" in text
    for secret in (FIRST_PASSWORD, SECOND_PASSWORD, quote(FIRST_PASSWORD), token):
        assert secret not in text


class EchoingAuthServer(protocol.Protocol):
    """
    A fake Redis that refuses AUTH with a reply quoting the password (as
    some servers and proxies do).
    """

    def dataReceived(self, data: bytes) -> None:
        if b"AUTH" in data:
            password = data.split(b"\r\n")[-2]
            self.transport.write(b"-ERR invalid password '" + password + b"'\r\n")


@pytest_twisted.ensureDeferred
async def test_password_never_logged_even_if_echoed() -> None:
    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, protocol.Factory.forProtocol(EchoingAuthServer), interface="127.0.0.1"
    )
    url = f"redis://:{quote('hunter2-secret')}@127.0.0.1:{port.getHost().port}/0"
    try:
        with capture_logs() as lines:
            connection = redisconn.connect(url, connect_timeout=0.5, max_retry_delay=0.5)
            try:
                assert (await timed_call(connection, 1.0, "GET", "k"))[0] == "503"
                error = await probe_error(connection)
            finally:
                await redisconn.disconnect(connection)
    finally:
        await port.stopListening()
    assert error.name == "redis_auth_failed"
    text = "\n".join(lines + [str(error)])
    assert "invalid password '***'" in text
    assert "hunter2" not in text


def connections_received(server: RedisServer) -> int:
    done = subprocess.run(
        ["redis-cli", "-p", str(server.port), "-a", server.password or "", "--no-auth-warning",
         "INFO", "stats"],
        check=True, capture_output=True, text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":", 1)[1])
    raise AssertionError("no total_connections_received in INFO stats")


@pytest_twisted.ensureDeferred
async def test_bus_subscriber_with_a_refused_password(auth_redis: RedisServer) -> None:
    """
    R3 for the bus's pub/sub connection: Redis refuses its password.  The
    subscriber keeps trying with backoff, logs the refusal once (no
    traceback per attempt, no password), and once the password matches
    again (CONFIG SET) it subscribes and delivers messages.
    """
    from twistauth.bus.redis_bus import RedisBus

    set_password(auth_redis, SECOND_PASSWORD)
    url = f"redis://:{quote(FIRST_PASSWORD)}@127.0.0.1:{auth_redis.port}/0"
    redacted = f"redis://:***@127.0.0.1:{auth_redis.port}/0"
    key = bytes(range(32))
    options: Any = dict(
        key=key, reactor=reactor, connect_timeout=0.5, command_timeout=0.5,
        min_retry_delay=0.05, max_retry_delay=0.3,
    )
    bus = RedisBus(url=url, **options)
    other = RedisBus(url=url, **options)
    with capture_logs() as lines:
        subscribed = bus.start()
        other_subscribed = other.start()
        before = connections_received(auth_redis)
        await sleep(1.5)
        attempts = connections_received(auth_redis) - before
        assert not subscribed.called and bus.stats()["connected"] == 0
        set_password(auth_redis, FIRST_PASSWORD)
        put_back = time.monotonic()
        subscribed.addTimeout(5.0, reactor)
        await subscribed
        healed = time.monotonic() - put_back
        try:
            await other_subscribed
            await until_state(other._connection, "connected", 5.0)
            waiting = bus.wait_for_key("logout:user:1", timeout=5)
            await other.notify_all("logout:user:1", {"reason": "logout"})
            assert await waiting == {"reason": "logout"}
            assert bus.stats()["received"] == 1
        finally:
            await bus.stop()
            await other.stop()
    # Two buses, each a publisher and a subscriber: attempts went on.
    assert attempts >= 6, attempts
    assert healed < 1.0, healed
    text = "\n".join(lines)
    assert "NoTransition" not in text and "log_failure" not in text, text
    formatted = [line for line in lines if not line.startswith("{")]  # (not the reprs)
    refusals = [
        found.group(1)
        for found in map(re.compile(r"^the bus subscriber cannot subscribe at \S+: (.*); ").match,
                         formatted)
        if found
    ]
    assert len(refusals) == 2, refusals  # once per subscriber, not once per attempt
    assert all(r.startswith("authentication failed: WRONGPASS") for r in refusals), refusals
    assert formatted.count(f"the bus subscriber is subscribed again at {redacted}") == 2
    for secret in (FIRST_PASSWORD, SECOND_PASSWORD, quote(FIRST_PASSWORD)):
        assert secret not in text
    print(f"\nbus subscriber, password refused: {attempts} connections in 1.5 s (two buses), "
          f"one log line each; subscribed {healed:.2f} s after the password was put back")


# -- Redis stopped: fail fast ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stopped_redis_fails_fast(private_redis: RedisServer) -> None:
    """
    R2 with the production deadlines (redis_timeout 2 s: connect 2 s, reply
    5 s, retries at most every 5 s): once Redis is known to be down, calls
    answer 503 in milliseconds instead of waiting out the 2 s deadline
    (txredisapi alone queues them); the first success follows the restart
    within the retry delay.
    """
    connection = redisconn.connect(private_redis.url, connect_timeout=2.0, reply_timeout=5.0)
    try:
        assert (await timed_call(connection, 2.0, "SET", "k", "v"))[0] == "ok"
        private_redis.stop()
        with Lag() as lag:
            # The first call meets the lost connection; the immediate
            # reconnection attempt is refused within milliseconds.
            outcome, first = await timed_call(connection, 2.0, "GET", "k")
            assert outcome == "503" and first < 0.2 + TIMER_SLACK, (outcome, first)
            await until_state(connection, "unavailable", 1.0)
            timings = []
            for _ in range(50):
                outcome, took = await timed_call(connection, 2.0, "GET", "k")
                assert outcome == "503"
                timings.append(took)
            await sleep(3.0)  # reconnection goes on in the background
            later = [await timed_call(connection, 2.0, "GET", "k") for _ in range(10)]
        assert max(timings) < AT_ONCE, max(timings)
        assert all(o == "503" and t < AT_ONCE for o, t in later), later
        assert lag.worst < 0.1, lag.worst
        error = await probe_error(connection)
        assert error.name == "redis_unavailable" and "connection refused" in str(error)
        private_redis.start()
        recovered = await until_ok(connection, 10.0, "GET", "k")
        assert recovered < 6.5, recovered
    finally:
        await redisconn.disconnect(connection)
    timings.sort()
    print(f"\nRedis stopped: first 503 after {first * 1000:.1f} ms, median "
          f"{timings[len(timings) // 2] * 1000:.2f} ms, worst {timings[-1] * 1000:.2f} ms "
          f"(deadline 2 s; before fail-fast every call took the full 2 s); first success "
          f"{recovered:.2f} s after the restart; worst reactor lag {lag.worst * 1000:.1f} ms "
          f"({lag.raw * 1000:.1f} ms wall clock)")


@pytest_twisted.ensureDeferred
async def test_error_listener(private_redis: RedisServer) -> None:
    """
    `redisconn.set_error_listener`: every failed `redisconn.call` on the
    connection is reported by kind (a cancelled one is not), and only on
    that connection.
    """
    connection = redisconn.connect(private_redis.url, connect_timeout=0.3, max_retry_delay=0.5)
    other = redisconn.connect(private_redis.url, connect_timeout=0.3, max_retry_delay=0.5)
    kinds: List[str] = []
    others: List[str] = []
    redisconn.set_error_listener(connection, kinds.append)
    redisconn.set_error_listener(other, others.append)
    try:
        assert (await timed_call(connection, 1.0, "SET", "k", "v"))[0] == "ok"
        assert (await timed_call(other, 1.0, "GET", "k"))[0] == "ok"
        with pytest.raises(Exception, match="WRONGTYPE"):
            await redisconn.call(reactor, 1.0, connection.lpush, "k", "x")
        assert kinds == ["error"]
        cancelled = redisconn.call(reactor, 1.0, connection.get, "k")
        cancelled.cancel()
        with pytest.raises(defer.CancelledError):
            await cancelled
        assert private_redis.process is not None
        os.kill(private_redis.process.pid, signal.SIGSTOP)
        try:
            assert (await timed_call(connection, 0.3, "GET", "k"))[0] == "503"
        finally:
            os.kill(private_redis.process.pid, signal.SIGCONT)
        assert kinds == ["error", "timeout"]
        await until_ok(connection, 3.0, "GET", "k")
        private_redis.stop()
        await until_state(connection, "unavailable", 2.0)
        heard = len(kinds)
        assert (await timed_call(connection, 1.0, "GET", "k"))[0] == "503"
        assert kinds[heard:] == ["unavailable"], kinds
        redisconn.set_error_listener(connection, None)
        heard = len(kinds)
        assert (await timed_call(connection, 1.0, "GET", "k"))[0] == "503"
        assert len(kinds) == heard
        await redisconn.disconnect(connection)
        redisconn.set_error_listener(connection, kinds.append)
        assert (await timed_call(connection, 1.0, "GET", "k"))[0] == "503"
        assert kinds[-1] == "closed"
        assert others == []  # its own listener heard nothing: no call failed on it
    finally:
        await redisconn.disconnect(connection)
        await redisconn.disconnect(other)
    with pytest.raises(TypeError):
        redisconn.set_error_listener(object(), kinds.append)


@pytest_twisted.ensureDeferred
async def test_probe(private_redis: RedisServer) -> None:
    """
    The probe passes on a healthy connection, says ``redis_closed`` after
    `disconnect`, and refuses objects `connect` did not make.
    """
    connection = redisconn.connect(private_redis.url)
    assert await redisconn.probe(connection, reactor, 1.0) is None
    assert await redisconn.probe_all([connection, connection], reactor, 1.0) is None
    assert redisconn.health(connection).is_connected
    await redisconn.disconnect(connection)
    assert (await probe_error(connection)).name == "redis_closed"
    with pytest.raises(RedisUnhealthy):
        await redisconn.probe_all([connection], reactor, 1.0)
    with pytest.raises(TypeError):
        redisconn.health(object())
