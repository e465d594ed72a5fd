"""
Redis Sentinel failover for real: a private master, a replica and a
Sentinel (``redis-server --sentinel``) on free loopback ports, watched with
``down-after-milliseconds 500``.

- The master is killed (SIGKILL) under a running app (`make_app`, sessions
  and users on ``redis-sentinel://``): while Sentinel fails over, the
  session's calls answer 503, never "logged out"; then the same session
  works (the replica had it), new writes land on the promoted replica, and
  `redisconn.endpoint` (for connections the pool does not make, such as
  the bus's) connects to the new master.
- How the connection reacts to Sentinel's failover events, on a memory
  reactor.
- ``SENTINEL FAILOVER`` with the master alive (Sentinel demotes it only
  about 10 s after the switch, and writes it accepts meanwhile are lost):
  the connection follows Sentinel's events, so writes answer 503 during
  the failover (about a second), none acknowledged is lost, and they then
  land on the new master.
- The bus on ``redis-sentinel://`` (two apps, as two machines would be):
  a logout through one wakes a ``/logout/wait`` on the other over pub/sub,
  before and after the master is killed or failed over; both subscribers
  move to the new master (and leave the old one, though it is still a
  master), and no session is lost.

``tests/test_redisconn.py`` covers finding the master through Sentinel
without a failover.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import pytest_twisted
import treq
import txredisapi
from conftest import RedisServer, free_port, wait_for_port
from test_sessions_support import capture_logs
from timing_support import no_gc_pauses  # noqa: F401 (autouse fixture)
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistauth import redisconn
from twistauth._redisendpoint import AVOID_SECONDS, RedisEndpoint
from twistauth.app import make_app
from twistauth.redisconn import parse_url
from twistauth.sessions import RedisSessionCache, SessionStoreUnavailableError
from twistauth.testing import MethodClient

SERVICE = "mymaster"
PASSWORD = "correct horse battery staple"
CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_cost": 8192, "argon2_parallelism": 1}


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds, lambda: None)


def cli(port: int, *command: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), "--raw", *command],
        check=True, capture_output=True, timeout=10,
    )
    return done.stdout.decode()


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """
    A master, one replica and one Sentinel, each a private redis-server.
    """

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        assert executable is not None, "redis-server is not installed: run tests/setup.sh"
        self.executable = executable
        self.directory = tempfile.mkdtemp(prefix="twistauth-sentinel-")
        self.master, self.replica, self.sentinel = free_port(), free_port(), free_port()
        self.processes: Dict[int, Optional[subprocess.Popen[bytes]]] = {}

    def _redis(self, port: int, *extra: str) -> None:
        directory = os.path.join(self.directory, str(port))
        os.mkdir(directory)
        self.processes[port] = subprocess.Popen(
            [self.executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)

    def start(self) -> None:
        # (a diskless full sync waits 5 s for more replicas by default)
        self._redis(self.master, "--repl-diskless-sync-delay", "0")
        self._redis(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        wait_for(
            lambda: "master_link_status:up" in cli(self.replica, "INFO", "replication"),
            "the replica to sync",
        )
        config = os.path.join(self.directory, "sentinel.conf")
        with open(config, "w") as f:
            f.write(
                f"port {self.sentinel}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        self.processes[self.sentinel] = subprocess.Popen(
            [self.executable, config, "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.sentinel)
        wait_for(self._replica_good, "Sentinel to know the replica as a good one")

    def _replica_good(self) -> bool:
        """
        Whether Sentinel has talked to the replica and would promote it.
        """
        lines = cli(self.sentinel, "SENTINEL", "REPLICAS", SERVICE).split("\n")
        state = dict(zip(lines[0::2], lines[1::2]))
        return (
            state.get("port") == str(self.replica)
            and state.get("flags") == "slave"
            and state.get("master-link-status") == "ok"
            and int(state.get("info-refresh", "99999")) < 2000
        )

    def url(self, db: int) -> str:
        return f"redis-sentinel://127.0.0.1:{self.sentinel}/{SERVICE}/{db}"

    def master_port(self) -> int:
        answer = cli(self.sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()
        return int(answer[1])

    def replicated(self) -> None:
        """
        Wait until the replica has processed every write the master has
        (``WAIT`` is not enough right after the first sync: it can count a
        replica that has not applied the write yet).
        """

        def offset(port: int, field: str) -> int:
            for line in cli(port, "INFO", "replication").splitlines():
                if line.startswith(field + ":"):
                    return int(line.split(":", 1)[1])
            raise AssertionError(f"no {field} in INFO replication of {port}")

        written = offset(self.master, "master_repl_offset")
        wait_for(
            lambda: offset(self.replica, "slave_repl_offset") >= written,
            "the replica to apply every write",
        )

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def cleanup(self) -> None:
        for process in self.processes.values():
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class FailoverEventTests(SynchronousTestCase):
    """
    How `RedisEndpoint` reacts to Sentinel's events (on a memory reactor:
    no Sentinel needed).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = RedisEndpoint(
            parse_url("redis-sentinel://s1:26379,s2:26379/mymaster/0"),
            reactor=self.reactor,
            connect_timeout=1.0,
        )
        self.failovers: List[str] = []
        self.changes: List[Any] = []
        self.endpoint.on_failover = self.failovers.append
        self.endpoint.on_master_changed = lambda: self.changes.append(self.endpoint.master)
        self.factory = protocol.Factory.forProtocol(protocol.Protocol)

    def connect_to(self, host: str, port: int) -> Any:
        return self.endpoint._connect_master((host, port), self.factory)

    def test_failover_then_switch(self) -> None:
        self.connect_to("10.0.0.1", 6379)
        self.assertEqual(self.endpoint.master, ("10.0.0.1", 6379))
        # Every Sentinel publishes the start; the owner hears it once.
        for _ in range(2):
            self.endpoint.sentinel_event(
                "+failover-state-select-slave", "master mymaster 10.0.0.1 6379"
            )
        self.assertEqual(self.failovers, ["Sentinel is failing over from 10.0.0.1:6379"])
        self.assertTrue(self.endpoint.avoiding())
        with self.assertRaises(txredisapi.MasterNotFoundError):
            self.connect_to("10.0.0.1", 6379)
        self.endpoint.sentinel_event(
            b"+switch-master", b"mymaster 10.0.0.1 6379 10.0.0.2 6379"
        )
        self.assertEqual(self.changes, [("10.0.0.2", 6379)])
        # A Sentinel that has not heard of the switch still names the old
        # master: refused until it has been demoted.
        with self.assertRaises(txredisapi.MasterNotFoundError):
            self.connect_to("10.0.0.1", 6379)
        self.connect_to("10.0.0.2", 6379)
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.2", 6379))
        self.reactor.advance(AVOID_SECONDS)
        self.assertFalse(self.endpoint.avoiding())
        self.assertEqual(self.changes, [("10.0.0.2", 6379)])

    def test_abort(self) -> None:
        self.connect_to("10.0.0.1", 6379)
        self.endpoint.sentinel_event(
            "+failover-state-select-slave", "master mymaster 10.0.0.1 6379"
        )
        self.endpoint.sentinel_event(
            "-failover-abort-no-good-slave", "master mymaster 10.0.0.1 6379"
        )
        self.assertFalse(self.endpoint.avoiding())
        self.connect_to("10.0.0.1", 6379)
        self.assertEqual(len(self.changes), 1)  # "connect again at once"

    def test_other_services_and_garbage_ignored(self) -> None:
        self.connect_to("10.0.0.1", 6379)
        for channel, message in [
            ("+failover-state-select-slave", "master other 10.0.0.1 6379"),
            ("+switch-master", "other 10.0.0.1 6379 10.0.0.9 6379"),
            ("+switch-master", "mymaster 10.0.0.1"),
            ("+switch-master", "mymaster 10.0.0.1 6379 10.0.0.2 port"),
            ("+failover-state-select-slave", "slave 10.0.0.3:6379 10.0.0.3 6379 @ mymaster"),
            ("-failover-abort-not-elected", "master mymaster 10.0.0.1 x"),
        ]:
            self.endpoint.sentinel_event(channel, message)
        self.assertEqual((self.failovers, self.changes), ([], []))
        self.assertFalse(self.endpoint.avoiding())
        self.assertEqual(self.endpoint.master, ("10.0.0.1", 6379))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    sentinels = Cluster()
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.cleanup()


@pytest.fixture
def bus_redis() -> Iterator[RedisServer]:
    """
    A plain Redis for the deployment's bus (see the test's docstring).
    """
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest_twisted.ensureDeferred
async def test_master_killed(cluster: Cluster, bus_redis: RedisServer) -> None:
    """
    The app's sessions and users live behind Sentinel (``session_cache`` and
    ``user_store`` are ``redis-sentinel://`` URLs; the bus and the other
    shared state on a plain Redis of their own, as a deployment may choose).
    Kill the master: until Sentinel has promoted the replica, session calls
    answer 503 (never "not logged in"); then the same session works, a new
    account is written to the new master, and `redisconn.endpoint` connects
    there.  (`test_bus_follows_the_master` has the bus on Sentinel too.)
    """
    app = make_app(
        clock=reactor,
        reactor=reactor,
        session_cache=cluster.url(3),
        user_store=cluster.url(3),
        redis_url=bus_redis.url,
        redis_timeout=0.5,
        deployment_key=secrets.token_bytes(32),
        **CHEAP_ARGON2,
    )
    for service in app.background:
        service.startService()
    try:
        alice = MethodClient(app)
        await alice.call("account.create", user_id="alice", password=PASSWORD)
        assert (await alice.call("session.info"))["user_id"] == "alice"
        cluster.replicated()
        old_master = cluster.master
        with capture_logs() as lines:
            cluster.kill(old_master)
            killed = time.monotonic()
            unavailable = 0
            while True:
                response = await alice.post({"method": "session.info"})
                if response.status == 503:
                    unavailable += 1
                    assert response.header("set-cookie") is None  # no logout
                    assert time.monotonic() - killed < 15, "no failover"
                    await sleep(0.1)
                    continue
                assert response.status == 200, response.body
                assert response.decoded()["result"]["user_id"] == "alice"
                break
            recovered = time.monotonic() - killed
        assert cluster.master_port() == cluster.replica
        assert cli(cluster.replica, "ROLE").split()[0] == "master"
        bob = MethodClient(app)
        await bob.call("account.create", user_id="bob", password=PASSWORD)
        assert cli(cluster.replica, "-n", "3", "EXISTS", "twistauth:user:bob").strip() == "1"
        assert (await bob.call("session.info"))["user_id"] == "bob"
        text = "\n".join(lines)
        assert f"new master, 127.0.0.1:{cluster.replica}" in text
        assert "connected again after" in text

        endpoint = redisconn.endpoint(cluster.url(0), reactor=reactor, connect_timeout=1.0)
        try:
            connected = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            assert connected.transport.getPeer().port == cluster.replica
            connected.transport.loseConnection()
        finally:
            await endpoint.close()
    finally:
        for service in reversed(app.background):
            await defer.maybeDeferred(service.stopService)
    print(f"\nmaster killed: {unavailable} session call(s) answered 503, the session worked "
          f"again {recovered:.2f} s later (down-after-milliseconds 500)")


@pytest_twisted.ensureDeferred
async def test_forced_failover(cluster: Cluster) -> None:
    """
    ``SENTINEL FAILOVER`` while the master is up.  Sentinel promotes the
    replica and announces ``+switch-master``, but demotes the old master only
    about 10 s later: a client that stays connected to it meanwhile has its
    writes accepted, then lost when it resyncs (a logout undone).  The
    connection follows Sentinel's events instead: from the start of the
    failover until the new master answers (about a second here), writes
    answer 503; no acknowledged write is lost (but for one racing the
    promotion itself: replication is asynchronous); writes then land on the
    new master.
    """
    connection = redisconn.connect(
        cluster.url(0), connect_timeout=0.5, reply_timeout=2.0, max_retry_delay=1.0
    )
    cache = RedisSessionCache(redis=connection, clock=reactor, call_timeout=0.5)
    written: List[Tuple[float, str, int]] = []
    refused: List[float] = []

    async def write() -> None:
        session = await cache.create()
        session["n"] = len(written)
        try:
            token = await cache.save(session)
        except SessionStoreUnavailableError:
            refused.append(time.monotonic())
        else:
            written.append((time.monotonic(), token, session["n"]))

    try:
        for _ in range(3):
            await write()
        cluster.replicated()
        with capture_logs() as lines:
            assert cli(cluster.sentinel, "SENTINEL", "FAILOVER", SERVICE).strip() == "OK"
            started = time.monotonic()
            switched: Optional[float] = None
            while switched is None or time.monotonic() - switched < 1.5:
                assert time.monotonic() - started < 15, "no failover"
                await write()
                if switched is None and cluster.master_port() == cluster.replica:
                    switched = time.monotonic()
                await sleep(0.02)
        on_new = set(cli(cluster.replica, "--scan", "--pattern", "twistauth:s:*").split())
        lost = [n for _, token, n in written if f"twistauth:s:{token}" not in on_new]
        assert len(lost) <= 1, lost
        assert written[-1][0] > switched, "no write reached the new master"
        for _, token, n in written:
            if n not in lost:
                assert (await cache.load(token))["n"] == n
        assert refused, "no write was refused during the failover"
        window = refused[-1] - refused[0]
        assert window < 3.0, window
        assert redisconn.health(connection).is_connected
        text = "\n".join(lines)
        assert "Sentinel is failing over from 127.0.0.1:" in text
        assert f"new master, 127.0.0.1:{cluster.replica}" in text
        # The old master was still a master all along (demoted later).
        assert cli(cluster.master, "ROLE").split()[0] == "master"
    finally:
        await redisconn.disconnect(connection)
    print(f"\nforced failover: Sentinel switched {switched - started:.2f} s after SENTINEL "
          f"FAILOVER; writes answered 503 for {window:.2f} s ({len(refused)} of them); "
          f"{len(written)} acknowledged, {len(lost)} lost")


# -- the bus on Sentinel -----------------------------------------------------


async def until(predicate: Any, what: str, timeout: float = 10.0) -> float:
    """
    Seconds until ``predicate()`` holds, polled every 20 ms on the reactor.
    """
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.02)
    return time.monotonic() - started


class Machine:
    """
    One app serving on a loopback port, sessions carried in the header.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        for service in app.background:
            service.startService()
        self.port = reactor.listenTCP(0, app.site(), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def post(self, method: str, token: str = "", **parameters: Any) -> Tuple[int, Any, str]:
        """
        ``(status, answer, token)`` of one JSON call.
        """
        response = await treq.post(
            self.base + "/api",
            json.dumps({"method": method, "parameters": parameters}).encode(),
            headers={"Content-Type": "application/json", "X-Twistauth-Session": token},
            timeout=10,
        )
        answer = json.loads(await response.content())
        carried = response.headers.getRawHeaders("x-twistauth-session", [token])[0]
        return response.code, answer, carried

    async def user_of(self, token: str, limit: float = 15.0) -> Optional[str]:
        """
        The session's user, retrying while Redis answers 503 (a failover).
        """
        started = time.monotonic()
        while True:
            status, answer, _ = await self.post("session.info", token)
            if status != 503:
                assert status == 200, answer
                user: Optional[str] = answer["result"]["user_id"]
                return user
            assert time.monotonic() - started < limit, "sessions answered 503 for too long"
            await sleep(0.05)

    def wait_for_logout(self, token: str) -> Any:
        return treq.get(
            self.base + "/logout/wait?timeout=20",
            headers={"X-Twistauth-Session": token},
            timeout=30,
        )

    def watcher(self) -> Dict[str, int]:
        stats: Dict[str, int] = self.app.logout.watcher.stats()
        return stats

    async def stop(self) -> None:
        await self.port.stopListening()
        for service in reversed(self.app.background):
            await defer.maybeDeferred(service.stopService)


async def logout_wakes(a: Machine, b: Machine, token: str) -> float:
    """
    Log ``token`` out through ``a`` while ``b`` has a ``/logout/wait`` on
    it; the seconds from sending the logout to ``b``'s answer, which must
    come over the bus (not from a re-check of the session).
    """
    before = b.watcher()
    waiting = b.wait_for_logout(token)
    await until(lambda: b.watcher()["watches"] == before["watches"] + 1, "the wait on B")
    sent = time.monotonic()
    status, answer, _ = await a.post("account.logout", token)
    assert status == 200 and "result" in answer, answer
    response = await waiting
    latency = time.monotonic() - sent
    assert response.code == 200
    assert json.loads(await response.content()) == {"logged_out": True, "reason": "logout"}
    after = b.watcher()
    assert after["bus"] == before["bus"] + 1, (before, after)
    assert after["recheck"] == before["recheck"], (before, after)
    return latency


def pattern_subscribers(port: int) -> int:
    """
    How many connections to the server at ``port`` are subscribed to a
    pattern (the buses'; Sentinel's own subscribe to a channel).
    """
    clients = cli(port, "CLIENT", "LIST").splitlines()
    return sum(1 for line in clients if " psub=1 " in f" {line} ")


@pytest.mark.parametrize("fault", ["killed", "failover"])
@pytest_twisted.ensureDeferred
async def test_bus_follows_the_master(cluster: Cluster, fault: str) -> None:
    """
    Two apps (two machines) with everything on ``redis-sentinel://``,
    the bus included.  A logout through A wakes a ``/logout/wait`` on B
    over the bus; then the master is killed, or failed over while it stays
    up (``SENTINEL FAILOVER``: the old master goes on accepting and
    publishing for about 10 s before Sentinel demotes it, so a subscriber
    that stayed there would hear nothing published on the new one).  Both
    subscribers move to the new master, every session made before is still
    valid on both apps, and a logout through A wakes a wait on B again,
    over the bus, within a second.
    """
    settings = dict(
        session_cache=cluster.url(3),
        user_store=cluster.url(3),
        redis_url=cluster.url(0),
        redis_timeout=0.5,
        deployment_key=secrets.token_bytes(32),
        **CHEAP_ARGON2,
    )
    machines: List[Machine] = []
    try:
        with capture_logs() as lines:
            for _ in range(2):
                machines.append(Machine(make_app(clock=reactor, reactor=reactor, **settings)))
            a, b = machines
            buses = [m.app.services.bus for m in machines]
            await until(lambda: all(bus.stats()["connected"] for bus in buses), "subscribed")
            assert pattern_subscribers(cluster.master) == 2
            tokens: Dict[str, str] = {}
            for user in ("alice", "bob", "carol", "dave"):
                status, answer, token = await a.post(
                    "account.create", user_id=user, password=PASSWORD
                )
                assert status == 200 and answer["result"]["user_id"] == user, answer
                tokens[user] = token
            for user, token in tokens.items():
                assert await b.user_of(token) == user
            before = await logout_wakes(a, b, tokens.pop("alice"))

            cluster.replicated()
            old, new = cluster.master, cluster.replica
            subscribed = [bus.stats()["connections"] for bus in buses]
            started = time.monotonic()
            if fault == "killed":
                cluster.kill(old)
            else:
                assert cli(cluster.sentinel, "SENTINEL", "FAILOVER", SERVICE).strip() == "OK"
            await until(lambda: cluster.master_port() == new, "Sentinel to switch", 15.0)
            # Sessions answer 503 until the new master does, never "logged out".
            for machine in machines:
                assert await machine.user_of(tokens["bob"]) == "bob"
            await until(
                lambda: pattern_subscribers(new) == 2
                and all(bus.stats()["connected"] for bus in buses),
                "both subscribers on the new master",
                timeout=15.0,
            )
            moved = time.monotonic()
            assert all(bus.stats()["connections"] > n for bus, n in zip(buses, subscribed))
            if fault == "failover":
                # The old master is still a master, but nobody listens there.
                assert cli(old, "ROLE").split()[0] == "master"
                assert pattern_subscribers(old) == 0
            for user, token in tokens.items():
                for machine in machines:
                    assert await machine.user_of(token) == user, (user, machine.base)
            after = await logout_wakes(a, b, tokens.pop("bob"))
            assert before < 1.0 and after < 1.0, (before, after)
            # The logout is durable on the new master: no machine takes it back.
            assert await a.user_of(tokens["carol"]) == "carol"
    finally:
        for machine in machines:
            await machine.stop()
    text = "\n".join(lines)
    assert "NoTransition" not in text and "log_failure" not in text, text
    assert "the bus subscriber" in text
    print(f"\nbus on Sentinel, master {fault}: logout woke the wait on the other app in "
          f"{before * 1000:.1f} ms before, {after * 1000:.1f} ms after; both subscribers on "
          f"the new master {moved - started:.2f} s after the {fault.replace('killed', 'kill')}")
