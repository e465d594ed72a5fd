"""
Worker processes for real: ``twistd -n twistauth --processes 2`` on
loopback with a private redis-server.

One deployment serves the first tests in order (the last one stops it):
both workers answer on the one port, and the parent answers nothing
itself; a session made through one worker is valid on the other, and a
logout through one wakes a ``/logout/wait`` on the other; a killed worker
is restarted; a Redis outage answers 503 fast on every worker, crashes
none, and heals (checklist R2 at the deployment level); SIGTERM answers a
pending long-poll "shutdown", lets a running method finish within
``shutdown_grace``, cuts one that runs longer, and every process exits 0.
Then: a crash loop makes the parent give up and exit 1, memory backends
refuse to start several processes, and a single process stops gracefully
on SIGTERM too.

The test methods (``public.worker_pid``, ``public.slow``) come from
``workers_methods``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from conftest import RedisServer, free_port

from twistauth.settings import ENV_PREFIX

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
DEPLOYMENT_KEY = secrets.token_urlsafe(32)
PASSWORD = "correct horse battery staple"
CHEAP_ARGON2 = [
    "--argon2-memory-cost", "8192", "--argon2-time-cost", "1", "--argon2-parallelism", "1",
]
GRACE = 2.0


def twistd() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    found = candidate if os.path.exists(candidate) else shutil.which("twistd")
    assert found is not None, "twistd is not installed"
    return found


def environ() -> Dict[str, str]:
    """
    This environment without settings, importing twistauth from this tree
    and the test methods from tests/.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join([REPOSITORY, TESTS])
    return env


class Server:
    """
    A ``twistd twistauth`` process started by a test, its log lines
    collected as they come.
    """

    def __init__(self, argv: Sequence[str], cwd: str) -> None:
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: List[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.process.pid

    def mark(self) -> int:
        """
        Where the log is now: `wait_for` from here.
        """
        with self._changed:
            return len(self.lines)

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 20.0) -> re.Match[str]:
        """
        The first log line from ``start`` on matching ``pattern``.
        """
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    found = compiled.search(self.lines[index])
                    index += 1
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and index >= len(self.lines)
                                      and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no log line matching {pattern!r}; the log ends:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_for_all(self, pattern: str, count: int, start: int = 0,
                     timeout: float = 20.0) -> List[re.Match[str]]:
        found = []
        index = start
        for _ in range(count):
            match = self.wait_for(pattern, index, timeout)
            found.append(match)
            index = self.lines.index(match.string, index) + 1
        return found

    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Client:
    """
    One keep-alive HTTP connection, carrying sessions in the header.
    """

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)

    def send(self, method: str, parameters: Optional[Dict[str, Any]] = None,
             token: str = "") -> None:
        body = json.dumps({"method": method, "parameters": parameters or {}})
        self.connection.request(
            "POST",
            "/api",
            body=body,
            headers={"content-type": "application/json", "x-twistauth-session": token},
        )

    def receive(self) -> Tuple[http.client.HTTPResponse, Any]:
        response = self.connection.getresponse()
        return response, json.loads(response.read())

    def call(self, method: str, parameters: Optional[Dict[str, Any]] = None,
             token: str = "") -> Tuple[Any, str]:
        """
        The answer and the session token the response carries.
        """
        self.send(method, parameters, token)
        response, answer = self.receive()
        return answer, response.getheader("x-twistauth-session") or token

    def pid(self) -> int:
        answer, _ = self.call("public.worker_pid")
        return int(answer["result"]["pid"])

    def close(self) -> None:
        self.connection.close()


def one_client_per_worker(port: int, workers: int, tries: int = 300) -> Dict[int, Client]:
    """
    A connection to each worker: connect until every worker has accepted
    one (the kernel picks the worker).
    """
    clients: Dict[int, Client] = {}
    for _ in range(tries):
        client = Client(port)
        pid = client.pid()
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if len(clients) == workers:
            return clients
    raise AssertionError(f"only {len(clients)} of {workers} workers answered in {tries} connections")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def bus_channels(redis: RedisServer) -> List[str]:
    """
    The bus channels someone is subscribed to (in channel mode, one per
    waited key: a wait is registered once its channel shows up).
    """
    done = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "--raw", "PUBSUB", "CHANNELS", "twistauth:bus:*"],
        check=True,
        capture_output=True,
    )
    return done.stdout.decode().split()


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_pool(redis: RedisServer, directory: str, *extra: str, processes: int = 2) -> Tuple[Server, int]:
    port = free_port()
    argv = [
        twistd(), "-n", "--pidfile=", "twistauth",
        "--processes", str(processes),
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--session-cache", redis.url,
        "--user-store", redis.url,
        "--method-cache", "none",
        "--deployment-key", DEPLOYMENT_KEY,
        "--bus-mode", "channel",
        "--method-modules", "workers_methods",
        "--shutdown-grace", str(GRACE),
        "--redis-timeout", "0.5",
        "--data-dir", directory,
        *CHEAP_ARGON2,
        *extra,
    ]
    return Server(argv, directory), port


class Pool:
    def __init__(self, server: Server, port: int, redis: RedisServer, started: float) -> None:
        self.server = server
        self.port = port
        self.redis = redis
        self.started = started
        self.clients: Dict[int, Client] = {}


@pytest.fixture(scope="module")
def pool(redis_server_session: RedisServer, tmp_path_factory: Any) -> Iterator[Pool]:
    redis = redis_server_session
    if redis.process is None:
        redis.start()
    redis.flush()
    started = time.monotonic()
    server, port = start_pool(redis, str(tmp_path_factory.mktemp("pool")))
    try:
        server.wait_for_all(r"worker \d+ ready", 2)
        deployment = Pool(server, port, redis, time.monotonic() - started)
        deployment.clients = one_client_per_worker(port, 2)
        yield deployment
    finally:
        server.kill()


def test_two_workers_serve_one_port(pool: Pool) -> None:
    """
    Connections to the one port are answered by two different processes,
    both children of the parent, which answers none itself; the log says
    how long the deployment took to be ready.
    """
    pids = sorted(pool.clients)
    assert len(set(pids)) == 2
    assert pool.server.pid not in pids
    assert [parent_of(pid) for pid in pids] == [pool.server.pid] * 2
    assert pool.started < 15, pool.started
    log = pool.server.log()
    for pid in pids:
        assert f"worker {pid} ready" in log
    print(f"parent and 2 workers ready in {pool.started:.2f} s")


def test_session_and_logout_cross_workers(pool: Pool) -> None:
    """
    A session made through one worker is valid on the other; a logout
    through the first wakes a /logout/wait pending on the second within a
    second.
    """
    (pid_a, a), (pid_b, b) = sorted(pool.clients.items())
    answer, token = a.call("account.create", {"user_id": "alice", "password": PASSWORD})
    assert answer["result"]["user_id"] == "alice", answer
    assert token
    answer, _ = b.call("session.info", token=token)
    assert answer["result"]["user_id"] == "alice", answer
    assert b.pid() == pid_b and a.pid() == pid_a

    b.connection.request("GET", "/logout/wait?timeout=20", headers={"x-twistauth-session": token})
    wait_until(lambda: bus_channels(pool.redis), what="the wait on worker B")
    started = time.monotonic()
    answer, _ = a.call("account.logout", token=token)
    assert "error" not in answer, answer
    response, woken = b.receive()
    latency = time.monotonic() - started
    assert response.status == 200
    assert woken["logged_out"] is True, woken
    assert latency < 1.0, latency
    answer, _ = b.call("session.info", token=token)
    assert answer["result"]["user_id"] is None  # the token no longer names a session
    print(f"logout on worker A woke the wait on worker B in {latency * 1000:.1f} ms")


def test_killed_worker_is_restarted(pool: Pool) -> None:
    """
    SIGKILL one worker: the parent logs it, starts another at once (the
    first crash waits 0.1 s), and the new process answers on the port.
    """
    victim = max(pool.clients)
    pool.clients.pop(victim).close()
    mark = pool.server.mark()
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    pool.server.wait_for(
        rf"worker {victim} ended unexpectedly \(killed by SIGKILL\); restarting it in 0.1 s", mark
    )
    ready = pool.server.wait_for(r"worker (\d+) ready", mark)
    restart = time.monotonic() - killed
    new = int(ready.group(1))
    assert new != victim
    assert restart < 10, restart
    clients = one_client_per_worker(pool.port, 2)
    assert new in clients
    assert parent_of(new) == pool.server.pid
    for pid, client in clients.items():
        if pid in pool.clients:
            client.close()
        else:
            pool.clients[pid] = client
    print(f"restart of a killed worker: {restart:.2f} s")


def test_redis_outage_across_workers(pool: Pool) -> None:
    """
    R2 for the deployment: with Redis down, session-checked calls on every
    worker answer 503 within the Redis deadline, calls that need no Redis
    answer at once, and no worker crashes; once Redis is back (empty: it
    keeps no data), accounts, sessions and a cross-worker logout wake-up
    work again within seconds.
    """
    (pid_a, a), (pid_b, b) = sorted(pool.clients.items())
    _, token = a.call("account.create", {"user_id": "erin", "password": PASSWORD})
    mark = pool.server.mark()
    pool.redis.stop()
    try:
        for client in (a, b):
            started = time.monotonic()
            answer, _ = client.call("session.info", token=token)
            took = time.monotonic() - started
            assert answer["error"]["code"] == 50335, answer  # session_store_unavailable
            assert took < 0.5 + 1.0, took
            started = time.monotonic()
            assert client.pid() in (pid_a, pid_b)
            assert time.monotonic() - started < 0.2
    finally:
        pool.redis.start()
    restarted = time.monotonic()
    while True:
        answer, token = a.call("account.create", {"user_id": "frank", "password": PASSWORD})
        if "result" in answer:
            break
        assert time.monotonic() - restarted < 10, answer
        time.sleep(0.1)
    while "result" not in b.call("session.info", token=token)[0]:
        assert time.monotonic() - restarted < 10
        time.sleep(0.1)
    recovered = time.monotonic() - restarted
    b.connection.request("GET", "/logout/wait?timeout=20", headers={"x-twistauth-session": token})
    wait_until(lambda: bus_channels(pool.redis), what="the wait on worker B")
    answer, _ = a.call("account.logout", token=token)
    _, woken = b.receive()
    assert woken["logged_out"] is True, woken
    assert "ended unexpectedly" not in "\n".join(pool.server.lines[mark:])
    print(f"Redis outage: 503 in under 1.5 s on both workers; recovered {recovered:.2f} s after restart")


def test_sigterm_stops_gracefully(pool: Pool) -> None:
    """
    SIGTERM to the parent: a pending long-poll is answered "shutdown", a
    method that takes less than shutdown_grace finishes (its response says
    Connection: close), one that takes longer is cut at the grace, every
    worker exits 0, then the parent exits 0.
    """
    (pid_a, a), (pid_b, b) = sorted(pool.clients.items())
    answer, token = a.call("account.create", {"user_id": "bob", "password": PASSWORD})
    assert answer["result"]["user_id"] == "bob", answer
    b.connection.request("GET", "/logout/wait?timeout=20", headers={"x-twistauth-session": token})
    wait_until(lambda: bus_channels(pool.redis), what="the wait on worker B")
    mark = pool.server.mark()
    quick, slow = Client(pool.port), Client(pool.port)
    quick.send("public.slow", {"seconds": 1.0})
    slow.send("public.slow", {"seconds": 30.0})
    pool.server.wait_for_all(r"slow call for .* started", 2, mark)

    stopping = time.monotonic()
    pool.server.process.send_signal(signal.SIGTERM)
    response, answer = b.receive()
    assert answer == {"logged_out": False, "reason": "shutdown"}
    response, answer = quick.receive()
    assert "pid" in answer["result"], answer
    assert response.getheader("connection") == "close"
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        slow.receive()
    cut = time.monotonic() - stopping
    assert GRACE - 0.5 < cut < GRACE + 3, cut
    assert pool.server.process.wait(GRACE + 15) == 0
    took = time.monotonic() - stopping
    log = pool.server.log()
    assert log.count("stopped (exit code 0)") == 2, log[-3000:]
    assert re.search(r"1 request\(s\) still running after 2(\.0)? s: connections closed", log)
    for pid in (pid_a, pid_b):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    print(f"graceful stop with a request cut at the grace ({GRACE} s): {took:.2f} s")


def test_crash_loop_gives_up(redis_server: RedisServer, tmp_path: Any) -> None:
    """
    Workers that cannot start (a method module that does not import) are
    restarted with growing delays; one crash more than
    worker_restart_limit and the parent stops and exits 1.
    """
    server, _ = start_pool(
        redis_server, str(tmp_path),
        "--method-modules", "no_such_module_for_twistauth_tests",
        "--worker-restart-limit", "1",
    )
    try:
        assert server.process.wait(30) == 1
    finally:
        server.kill()
    log = server.log()
    assert "restarting it in 0.1 s" in log
    assert re.search(r"worker \d crashed 2 times within 60 s .*: giving up", log), log[-3000:]


def test_memory_backends_refuse_processes(tmp_path: Any) -> None:
    """
    The defaults (memory sessions, bus and method cache, YAML users) refuse
    --processes 2 before anything starts, naming what to set.
    """
    done = subprocess.run(
        [twistd(), "-n", "--pidfile=", "twistauth", "--processes", "2",
         "--listen", f"tcp:{free_port()}:interface=127.0.0.1", "--data-dir", str(tmp_path)],
        cwd=str(tmp_path), env=environ(), capture_output=True, timeout=60,
    )
    assert done.returncode == 1
    message = done.stderr.decode()
    for name in ("processes", "session_cache", "redis_url", "user_store", "method_cache"):
        assert name in message, message


def test_single_process_sigterm(tmp_path: Any) -> None:
    """
    One process (memory everything): SIGTERM answers a pending long-poll
    "shutdown", lets a running method finish, closes idle connections and
    exits 0 (twistd alone would die of the signal).
    """
    port = free_port()
    server = Server(
        [twistd(), "-n", "--pidfile=", "twistauth",
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path),
         "--method-modules", "workers_methods", "--method-modules", "twistauth.demo_methods",
         "--shutdown-grace", "5", *CHEAP_ARGON2],
        str(tmp_path),
    )
    try:
        server.wait_for(r"twistauth: server \d+ ready")
        idle, waiting, other, running = (Client(port) for _ in range(4))
        answer, token = idle.call("account.create", {"user_id": "dave", "password": PASSWORD})
        assert answer["result"]["user_id"] == "dave", answer
        waiting.connection.request("GET", "/logout/wait?timeout=20",
                                   headers={"x-twistauth-session": token})
        # A round trip after it: the wait was read (and registered, memory
        # sessions resolve at once) before this answer was written.
        assert other.call("echo", {"n": 1})[0] == {"result": {"n": 1}}
        mark = server.mark()
        running.send("public.slow", {"seconds": 0.5})
        server.wait_for(r"slow call for 0.5 s started", mark)

        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        _, answer = waiting.receive()
        assert answer == {"logged_out": False, "reason": "shutdown"}
        response, answer = running.receive()
        assert "pid" in answer["result"] and response.getheader("connection") == "close"
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            idle.call("echo", {"n": 2})
        assert server.process.wait(15) == 0
        took = time.monotonic() - stopping
    finally:
        server.kill()
    log = server.log()
    assert "twistauth: SIGTERM: stopping gracefully" in log
    assert re.search(r"[12] request\(s\) running, waiting up to 5", log), log
    assert "still running" not in log
    print(f"single process: SIGTERM with a 0.5 s call running: exited 0 in {took:.2f} s")
