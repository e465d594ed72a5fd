"""
Several machines on one Redis, for real: two independent ``twistd -n
twistauth`` servers (not ``--processes``: each its own listening port and
data directory, as two machines would be) sharing one private
redis-server that wants a password.

In order, on one deployment:

- a session made through one server is valid on the other, and a logout
  through one wakes a ``/logout/wait`` pending on the other;
- Redis hung (SIGSTOP: nothing answers): both answer 503 within the Redis
  deadline, ``/healthz`` stays instant, and once the stalled connections
  have been dropped (the reply timeout) both answer 503 at once; after
  SIGCONT both recover, the session intact (checklist R3, "blackholed",
  for the deployment);
- Redis restarted with a changed password: both answer 503 at once and
  fail ``/readyz`` (``redis_auth_failed``), each logs the refused password once (never the
  password itself), and both keep trying; once the password is put back
  (CONFIG SET) both recover, the session intact, and a cross-server logout
  wakes a waiter again (R3, changed password).

The Redis-stopped case (R2) for a deployment is in
``test_workers_processes.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import time
from typing import Any, Iterator, List, Tuple
from urllib.parse import quote

import pytest
from conftest import RedisServer, free_port
from test_workers_processes import (
    CHEAP_ARGON2,
    DEPLOYMENT_KEY,
    PASSWORD,
    Client,
    Server,
    twistd,
    wait_until,
)
from timing_support import no_gc_pauses  # noqa: F401 (autouse fixture)

FIRST_PASSWORD = "first/Pa55word"
SECOND_PASSWORD = "second/Pa55word"
REDIS_TIMEOUT = 0.5
#: An HTTP call that did not wait for Redis: far below REDIS_TIMEOUT, with
#: room for a loaded 2-core machine (typically 1 to 15 ms).  The median of a
#: series must be below it, and every call below twice it.
AT_ONCE = 0.1
#: The most seconds between a connection's attempts (the default
#: max_retry_delay, 5 s, plus its jitter).
MAX_RETRY = 5.0 * 1.2


class Machines:
    def __init__(self, redis: RedisServer, servers: List[Tuple[Server, int]]) -> None:
        self.redis = redis
        self.servers = servers
        self.clients = [Client(port) for _, port in servers]
        self.password = FIRST_PASSWORD

    def redis_cli(self, *command: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(self.redis.port), "-a", self.password, "--no-auth-warning",
             "--raw", *command],
            check=True, capture_output=True, timeout=10,
        )
        return done.stdout.decode()

    def bus_channels(self) -> List[str]:
        return self.redis_cli("PUBSUB", "CHANNELS", "twistauth:bus:*").split()

    def log(self) -> str:
        return "\n".join(server.log() for server, _ in self.servers)

    def wait_ready(self) -> None:
        """
        Wait until both servers are ready (each test starts from a healthy
        deployment, whatever the one before left).
        """
        for _, port in self.servers:
            wait_until(lambda port=port: get(port, "/readyz")[0] == 200, timeout=2 * MAX_RETRY + 5,
                       what="/readyz green before the test")


def at_once(timings: List[float]) -> bool:
    """
    Whether a series of calls all answered without waiting for Redis.
    """
    ordered = sorted(timings)
    return ordered[len(ordered) // 2] < AT_ONCE and ordered[-1] < 2 * AT_ONCE


def get(port: int, path: str, timeout: float = 10.0) -> Tuple[int, Any, float]:
    """
    ``(status, decoded JSON body, seconds)`` of a GET on a new connection.
    """
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return response.status, json.loads(body) if body else None, time.monotonic() - started


@pytest.fixture(scope="module")
def machines(tmp_path_factory: Any) -> Iterator[Machines]:
    redis = RedisServer(password=FIRST_PASSWORD, persistent=True)
    redis.start()
    url = f"redis://:{quote(FIRST_PASSWORD, safe='')}@127.0.0.1:{redis.port}/0"
    servers: List[Tuple[Server, int]] = []
    try:
        for name in ("a", "b"):
            directory = str(tmp_path_factory.mktemp(f"machine-{name}"))
            port = free_port()
            server = Server(
                [twistd(), "-n", "--pidfile=", "twistauth",
                 "--listen", f"tcp:{port}:interface=127.0.0.1",
                 "--session-cache", url,
                 "--user-store", url,
                 "--method-cache", "none",
                 "--deployment-key", DEPLOYMENT_KEY,
                 "--bus-mode", "channel",
                 "--method-modules", "workers_methods",
                 "--redis-timeout", str(REDIS_TIMEOUT),
                 "--data-dir", directory,
                 *CHEAP_ARGON2],
                directory,
            )
            servers.append((server, port))
        for server, _ in servers:
            server.wait_for(r"twistauth: server \d+ ready")
        deployment = Machines(redis, servers)
        yield deployment
    finally:
        for server, _ in servers:
            server.kill()
        if redis.process is not None:
            os.kill(redis.process.pid, signal.SIGCONT)
        redis.cleanup()


def test_session_and_logout_across_machines(machines: Machines) -> None:
    """
    Two processes that share nothing but Redis: a session made through one
    is valid on the other; a logout through the first wakes a
    ``/logout/wait`` pending on the second within a second.
    """
    machines.wait_ready()
    a, b = machines.clients
    assert a.pid() != b.pid()
    answer, token = a.call("account.create", {"user_id": "alice", "password": PASSWORD})
    assert answer["result"]["user_id"] == "alice", answer
    answer, _ = b.call("session.info", token=token)
    assert answer["result"]["user_id"] == "alice", answer

    b.connection.request("GET", "/logout/wait?timeout=20", headers={"x-twistauth-session": token})
    wait_until(machines.bus_channels, what="the wait on server B")
    started = time.monotonic()
    answer, _ = a.call("account.logout", token=token)
    assert "error" not in answer, answer
    response, woken = b.receive()
    latency = time.monotonic() - started
    assert response.status == 200 and woken["logged_out"] is True, woken
    assert latency < 1.0, latency
    assert a.call("session.info", token=token)[0]["result"]["user_id"] is None
    assert b.call("session.info", token=token)[0]["result"]["user_id"] is None
    print(f"\nlogout through server A woke the wait on server B in {latency * 1000:.1f} ms")


def session_info_timed(client: Client, token: str) -> Tuple[Any, float]:
    started = time.monotonic()
    answer, _ = client.call("session.info", token=token)
    return answer, time.monotonic() - started


def test_hung_redis_across_machines(machines: Machines) -> None:
    """
    R3, a Redis that answers nothing (SIGSTOP): session calls on both
    servers answer 503 within the Redis deadline (never "logged out"),
    ``/healthz`` stays instant; once each server has dropped its stalled
    connection (reply timeout 5 s) and failed to get an answer from a new
    one within the connect deadline, calls answer 503 at once.  SIGCONT:
    both recover with the session intact.
    """
    machines.wait_ready()
    a, b = machines.clients
    answer, token = a.call("account.create", {"user_id": "carol", "password": PASSWORD})
    assert answer.get("result", {}).get("user_id") == "carol", answer
    assert b.call("session.info", token=token)[0]["result"]["user_id"] == "carol"
    mark = [server.mark() for server, _ in machines.servers]
    assert machines.redis.process is not None
    os.kill(machines.redis.process.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        first = []
        for client in (a, b):
            answer, took = session_info_timed(client, token)
            assert answer["error"]["code"] == 50335, answer  # session_store_unavailable
            assert took < REDIS_TIMEOUT + 0.5, took
            first.append(took)
        for _, port in machines.servers:
            status, _, took = get(port, "/healthz")
            assert status == 200 and took < 0.2, (status, took)
        # Then at once: each server has given up on the hung connection.
        # (Three fast calls in a row: the calls pending when the watchdog
        # drops the stalled connection fail at once too, but the next ones
        # wait for the new connection's handshake, up to REDIS_TIMEOUT.)
        fast_after = []
        for client in (a, b):
            fast = 0
            while fast < 3:
                answer, took = session_info_timed(client, token)
                assert answer["error"]["code"] == 50335, answer
                assert took < REDIS_TIMEOUT + 0.5, took
                fast = fast + 1 if took < AT_ONCE else 0
                assert time.monotonic() - stopped < 12, "calls never failed fast"
            fast_after.append(time.monotonic() - stopped)
        timings = [session_info_timed(client, token)[1] for client in (a, b) for _ in range(10)]
        assert at_once(timings), timings
    finally:
        os.kill(machines.redis.process.pid, signal.SIGCONT)
    resumed = time.monotonic()
    for client in (a, b):
        while True:
            answer, _ = client.call("session.info", token=token)
            if "result" in answer:
                assert answer["result"]["user_id"] == "carol", answer
                break
            assert time.monotonic() - resumed < 10, answer
            time.sleep(0.05)
    recovered = time.monotonic() - resumed
    for (server, _), start in zip(machines.servers, mark):
        server.wait_for(r"Redis at redis://\S+ is unavailable: connected, but no answer", start)
        assert "ended unexpectedly" not in "\n".join(server.lines[start:])
    print(f"\nhung Redis on two servers: 503 within {max(first):.3f} s (deadline "
          f"{REDIS_TIMEOUT} s), at once ({max(timings) * 1000:.1f} ms) from "
          f"{max(fast_after):.1f} s on; both recovered {recovered:.2f} s after SIGCONT")


def test_changed_password_across_machines(machines: Machines) -> None:
    """
    R3, Redis restarted with another password: both servers answer 503 at
    once, ``/readyz`` fails, each logs the refusal (and no password); once
    the password is put back, both recover within the retry delay with the
    session intact, and a cross-server logout wakes a waiter again.
    """
    machines.wait_ready()
    a, b = machines.clients
    answer, token = a.call("account.create", {"user_id": "dave", "password": PASSWORD})
    assert answer.get("result", {}).get("user_id") == "dave", answer
    assert b.call("session.info", token=token)[0]["result"]["user_id"] == "dave"
    for _, port in machines.servers:
        status, body, _ = get(port, "/readyz")
        assert status == 200, body
    mark = [server.mark() for server, _ in machines.servers]
    machines.redis.stop()
    machines.redis.password = SECOND_PASSWORD
    machines.redis.start()
    machines.password = SECOND_PASSWORD
    restarted = time.monotonic()
    for client in (a, b):
        fast = 0
        while fast < 3:  # the first calls may meet the connection Redis closed
            answer, took = session_info_timed(client, token)
            assert answer["error"]["code"] == 50335, answer
            fast = fast + 1 if took < AT_ONCE else 0
            assert time.monotonic() - restarted < 5
    timings = [session_info_timed(client, token)[1] for client in (a, b) for _ in range(10)]
    assert at_once(timings), timings
    for (server, port), start in zip(machines.servers, mark):
        server.wait_for(r"authentication failed: WRONGPASS .*readiness fails", start)
        status, body, took = get(port, "/readyz")
        assert status == 503 and "redis" in body["failed"], body
        assert took < REDIS_TIMEOUT + 1.0, took

        def says_auth_failed(port: int = port) -> bool:
            # (the log line above is the shared connection's, so this holds
            # at once; the wait covers a connection whose attempts all met
            # Redis still restarting: "unavailable" until its next attempt,
            # after up to MAX_RETRY seconds of backoff)
            status, body, _ = get(port, "/readyz")
            assert status == 503, body
            return bool(body["checks"]["redis"]["error"] == "redis_auth_failed")

        wait_until(says_auth_failed, timeout=MAX_RETRY + 2, what="/readyz to say redis_auth_failed")
    time.sleep(1.0)  # still trying (txredisapi alone would have given up)
    machines.redis_cli("CONFIG", "SET", "requirepass", FIRST_PASSWORD)
    machines.password = FIRST_PASSWORD
    put_back = time.monotonic()
    for client in (a, b):
        while True:
            answer, _ = client.call("session.info", token=token)
            if "result" in answer:
                assert answer["result"]["user_id"] == "dave", answer
                break
            assert time.monotonic() - put_back < 10, answer
            time.sleep(0.05)
    recovered = time.monotonic() - put_back
    for _, port in machines.servers:
        wait_until(lambda port=port: get(port, "/readyz")[0] == 200, what="/readyz green again")

    b.connection.request("GET", "/logout/wait?timeout=20", headers={"x-twistauth-session": token})
    wait_until(machines.bus_channels, what="the wait on server B")
    answer, _ = a.call("account.logout", token=token)
    assert "error" not in answer, answer
    _, woken = b.receive()
    assert woken["logged_out"] is True, woken

    for (server, _), start in zip(machines.servers, mark):
        log = "\n".join(server.lines[start:])
        # One line when the connection fails (the shared one: the bus
        # publishes on it too), one when it heals: not one per attempt; the
        # bus's subscriber says so at most once too, and no attempt leaves
        # a traceback.
        refused = re.findall(r"twistauth: Redis at \S+: authentication failed: WRONGPASS", log)
        healed = re.findall(
            r"twistauth: Redis at \S+: connected again after .* \(was auth_failed\)", log
        )
        assert len(refused) == len(healed) == 1, log
        subscriber = re.findall(
            r"the bus subscriber cannot subscribe at \S+: authentication failed: WRONGPASS", log
        )
        assert len(subscriber) <= 1, log
        assert "Traceback" not in log and "NoTransition" not in log, log
        assert "ended unexpectedly" not in log
    everything = machines.log()
    for secret in (FIRST_PASSWORD, SECOND_PASSWORD, quote(FIRST_PASSWORD, safe=""),
                   quote(SECOND_PASSWORD, safe=""), token):
        assert secret not in everything
    print(f"\nchanged password on two servers: 503 at once ({max(timings) * 1000:.1f} ms), "
          f"/readyz red; both recovered {recovered:.2f} s after the password was put back")
