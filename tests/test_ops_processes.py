"""
Operations on real processes (issue 7).

One ``twistd -n twistauth`` logging JSON lines to a file: twistd's own
lines and twistauth's structured events land there, each login event with
the id the response's ``X-Request-Id`` carried; SIGHUP applies a new
``log_level`` (the file's observer follows it, one with its own level does
not); no password or session token reaches the file or standard output.

``--processes 2`` sharing a private redis-server: only the parent opens
the log file, and the workers' events reach it through the parent; any
worker answers ``/metrics`` on the private ``metrics_listen`` endpoint
with the counts of both (and the parent's log counts); ``/readyz`` is
there too; SIGTERM stops everything with exit 0 and removes the metrics
directory.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import RedisServer, free_port
from ops_support import json_lines, metric_samples, sample
from test_workers_processes import (
    CHEAP_ARGON2,
    DEPLOYMENT_KEY,
    PASSWORD,
    Server,
    parent_of,
    twistd,
)

pytestmark = pytest.mark.integration


def _call(port: int, method: str, token: str = "", **parameters: Any) -> Tuple[Any, Dict[str, Any]]:
    """
    One call on a new connection: (response, answer).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request(
            "POST",
            "/api",
            body=json.dumps({"method": method, "parameters": parameters}),
            headers={"content-type": "application/json", "x-twistauth-session": token},
        )
        response = connection.getresponse()
        return response, json.loads(response.read())
    finally:
        connection.close()


def _get(port: int, path: str) -> Tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _holds(pid: int, path: Path) -> bool:
    """
    Whether process ``pid`` has ``path`` open.
    """
    directory = f"/proc/{pid}/fd"
    for fd in os.listdir(directory):
        try:
            if os.readlink(os.path.join(directory, fd)) == str(path):
                return True
        except OSError:
            pass
    return False


def test_json_log_file_request_ids_and_a_log_level_reload(tmp_path: Path) -> None:
    log_file = tmp_path / "app.jsonl"
    config = tmp_path / "twistauth.toml"
    observers = f'log_observers = ["file:{log_file}:format=json", "text:level=info"]\n'
    config.write_text(observers)
    port = free_port()
    server = Server(
        [twistd(), "-n", "--pidfile=", "twistauth", "--config", str(config),
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path),
         "--user-store", "memory", *CHEAP_ARGON2],
        str(tmp_path),
    )
    try:
        server.wait_for(r"twistauth: server \d+ ready")
        created, answer = _call(port, "account.create", user_id="dora", password=PASSWORD)
        assert answer["result"]["user_id"] == "dora", answer
        token = created.getheader("x-twistauth-session")
        failed, answer = _call(port, "account.login", user_id="dora", password="x" + PASSWORD)
        assert answer["error"]["name"] == "invalid_credentials"
        login, answer = _call(port, "account.login", user_id="dora", password=PASSWORD)
        token2 = login.getheader("x-twistauth-session")
        ids = {
            "create": created.getheader("x-request-id"),
            "failed": failed.getheader("x-request-id"),
            "login": login.getheader("x-request-id"),
        }
        assert all(ids.values()), ids

        config.write_text(observers + 'log_level = "warn"\n')
        mark = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for(r"twistauth: reload: log_level is now warn", mark)
        after, answer = _call(port, "account.login", user_id="dora", password=PASSWORD)
        assert "result" in answer
        late_id = after.getheader("x-request-id")
        server.wait_for(rf"\[req {late_id}\] twistauth: dora logged in", mark)

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
    finally:
        server.kill()
    records = json_lines(log_file.read_text())
    messages = [r["message"] for r in records]
    assert any(m.startswith("twistd ") and "starting up" in m for m in messages), messages
    # After the reload the file takes warnings and above only; the
    # observer with its own level still has everything.
    assert "Server Shut Down." not in messages
    assert server.log().rstrip().endswith("Server Shut Down.")
    events = {(r.get("event"), r.get("outcome")): r for r in records if r.get("event")}
    assert events[("account_created", None)]["request_id"] == ids["create"]
    assert events[("login", "failure")]["request_id"] == ids["failed"]
    assert events[("login", "failure")]["reason"] == "invalid_credentials"
    assert events[("login", "success")]["request_id"] == ids["login"]
    assert events[("login", "success")]["level"] == "info"
    assert late_id not in log_file.read_text()
    stdout = server.log()
    for text in (log_file.read_text(), stdout):
        for secret in (PASSWORD, token, token2):
            assert secret and secret not in text
    assert "Traceback" not in stdout


def test_workers_log_through_the_parent_and_share_their_metrics(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "app.jsonl"
    port, private = free_port(), free_port()
    server = Server(
        [twistd(), "-n", "--pidfile=", "twistauth", "--processes", "2",
         "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--metrics-listen", f"tcp:{private}:interface=127.0.0.1",
         "--session-cache", redis_server.url, "--user-store", redis_server.url,
         "--method-cache", "none", "--deployment-key", DEPLOYMENT_KEY,
         "--method-modules", "workers_methods", "--data-dir", str(tmp_path),
         "--log-observers", f"file:{log_file}:format=json", "--log-observers", "text",
         *CHEAP_ARGON2],
        str(tmp_path),
    )
    try:
        server.wait_for_all(r"worker \d+ ready", 2)
        # The kernel hands connections on the shared socket to whichever
        # worker accepts first, and one worker can take hundreds in a row
        # when calls come one at a time: calls come 8 at a time until both
        # workers have answered a few.
        answered: Dict[int, int] = {}
        calls = 0
        deadline = time.monotonic() + 60
        with ThreadPoolExecutor(8) as pool:
            while len(answered) < 2 or min(answered.values()) < 3:
                for _, answer in pool.map(
                    lambda _: _call(port, "public.worker_pid"), range(8)
                ):
                    pid = answer["result"]["pid"]
                    answered[pid] = answered.get(pid, 0) + 1
                calls += 8
                assert time.monotonic() < deadline, answered
        workers = sorted(answered)
        assert [parent_of(pid) for pid in workers] == [server.pid] * 2
        # Only the parent writes the log file.
        assert _holds(server.pid, log_file)
        assert not any(_holds(pid, log_file) for pid in workers)
        directories = set()
        for pid in workers:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(
                    item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item
                )
            directories.add(environ[b"PROMETHEUS_MULTIPROC_DIR"].decode())
        [directory] = directories
        assert os.path.isdir(directory)

        # Whichever worker answers, /metrics counts both (within a flush).
        deadline = time.monotonic() + 10
        scrapes: List[Dict[Any, float]] = []
        while True:
            status, body = _get(private, "/metrics")
            assert status == 200
            samples = metric_samples(body.decode())
            scrapes.append(samples)
            counted = sample(
                samples, "twistauth_method_calls_total", method="public.worker_pid", outcome="ok"
            )
            if counted == calls and len(scrapes) >= 4:
                break
            assert time.monotonic() < deadline, (counted, calls)
            time.sleep(0.3)
        assert sample(
            samples, "twistauth_http_requests_total", route="api", method="POST", status="200"
        ) == calls
        assert (sample(samples, "twistauth_log_events_total", level="info") or 0) > 0
        assert sample(samples, "process_resident_memory_bytes") is None
        status, body = _get(private, "/readyz")
        assert status == 200, body
        assert json.loads(body)["checks"]["redis"]["ok"] is True
        assert _get(port, "/metrics")[0] == 404  # not on the public site

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    finally:
        server.kill()
    assert not os.path.exists(directory)
    records = json_lines(log_file.read_text())
    from_workers = {r.get("worker_pid") for r in records} - {None}
    assert set(workers) <= from_workers, from_workers
    serving = [r for r in records if "on the parent's socket" in r["message"]]
    assert {r["worker_pid"] for r in serving} >= set(workers)
    assert any(f"tcp:{private}" in r["message"] for r in serving)
    assert "Traceback" not in server.log()
