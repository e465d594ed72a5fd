"""
Metrics and health wired into the application (issue 7): ``/healthz``,
``/readyz`` and ``/metrics`` on the main site or on ``metrics_listen``;
``/metrics`` parsed with ``prometheus_client``'s own parser after real
calls over a real socket (requests by route, method and status, method
latency, logins by outcome and reason, sessions created and ended, live
waiters, cache look-ups); readiness against a real redis-server that is
stopped, and one that refuses our password; draining on stop; the metrics
shared by several processes through one directory; and what the wiring
costs a request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any, Dict, List

import pytest
import pytest_twisted
import treq
from conftest import RedisServer
from ops_support import (
    CHEAP_ARGON2,
    PASSWORD,
    captured_events,
    metric_samples,
    sample,
    start_background,
)
from timing_support import no_gc_pauses  # noqa: F401 (autouse fixture)
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.caching import cached
from twistauth.methods.dispatch import Transaction
from twistauth.methods.registry import MethodRegistry
from twistauth.metrics import (
    Metrics,
    NullMetrics,
    SharedMetricsService,
    clear_directory,
    forget_process,
)
from twistauth.observe import RequestIds
from twistauth.operations import check_deadline, method_metrics_hook
from twistauth.tap import Options, makeService
from twistauth.web.root import RootResource
from twistauth.workers import METRICS_DIR_ENV, MetricsDirectory

DEPLOYMENT_KEY = bytes(range(32))


def result_of(d: Any) -> Any:
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class MainSiteTests(SynchronousTestCase):
    def get(self, app: Any, path: str) -> Any:
        stub = StubTreq(app.resource())
        response = result_of(stub.get("https://twistauth.test" + path))
        return response.code, result_of(response.content())

    def test_health_and_metrics_on_the_main_site(self) -> None:
        app = make_app(clock=Clock(), user_store="memory")
        self.assertIsInstance(app.metrics, Metrics)
        self.assertEqual(self.get(app, "/healthz"), (200, b'{"status":"ok"}'))
        code, body = self.get(app, "/readyz")
        self.assertEqual(code, 200)
        ready = json.loads(body)
        self.assertEqual(ready["status"], "ready")
        self.assertEqual(sorted(ready["checks"]), ["bus", "users"])
        code, body = self.get(app, "/metrics")
        self.assertEqual(code, 200)
        samples = metric_samples(body.decode())
        self.assertEqual(sample(samples, "twistauth_waiters"), 0)
        self.assertIsNotNone(sample(samples, "twistauth_bus", stat="waiters"))
        self.assertIsNotNone(sample(samples, "process_resident_memory_bytes"))

    def test_metrics_listen_takes_them_off_the_main_site(self) -> None:
        app = make_app(clock=Clock(), user_store="memory", metrics_listen="tcp:0")
        for path in ("/healthz", "/readyz", "/metrics"):
            code, body = self.get(app, path)
            self.assertEqual(code, 404, path)
            self.assertEqual(json.loads(body)["error"]["name"], "not_found")
        private = StubTreq(app.health_site().resource)
        for path in ("/healthz", "/readyz", "/metrics"):
            response = result_of(private.get("http://private" + path))
            self.assertEqual(response.code, 200, path)

    def test_metrics_off(self) -> None:
        app = make_app(clock=Clock(), user_store="memory", metrics=False)
        self.assertIsInstance(app.metrics, NullMetrics)
        self.assertEqual(self.get(app, "/metrics")[0], 404)
        self.assertEqual(self.get(app, "/healthz")[0], 200)
        # Nothing counts on the method path: no hook, no Transaction made.
        self.assertIsNone(app.dispatcher.after_hook)
        self.assertIsNone(app.site().metrics)

    def test_draining_before_the_stop(self) -> None:
        self.patch(os, "environ", {})
        directory = tempfile.mkdtemp(prefix="twistauth-health-")
        self.addCleanup(shutil.rmtree, directory, True)
        options = Options()
        options.parseOptions(["--data-dir", directory, "--user-store", "memory"])
        service = makeService(options, reactor=MemoryReactorClock())
        stub = StubTreq(service.app.resource())
        self.assertEqual(result_of(stub.get("http://x/readyz")).code, 200)
        result_of(service.before_stop[0]())
        response = result_of(stub.get("http://x/readyz"))
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(result_of(response.content()))["status"], "draining")


# ---------------------------------------------------------------------------
# /metrics after real calls over a real socket.


async def _post(base: str, method: str, token: str = "", **parameters: Any) -> Any:
    response = await treq.post(
        base + "/api",
        json.dumps({"method": method, "parameters": parameters}).encode(),
        headers={"Content-Type": "application/json", "X-Twistauth-Session": token},
        timeout=10,
    )
    body = json.loads(await response.content())
    return response, body


@pytest_twisted.ensureDeferred
async def test_metrics_after_real_calls() -> None:
    registry = MethodRegistry()
    calls: List[int] = []

    @registry.method("public.square")
    @cached(ttl=60, namespace="squares")
    def square(handler: Any, n: int) -> int:
        calls.append(n)
        return n * n

    app = make_app(
        clock=global_reactor,
        reactor=global_reactor,
        registry=registry,
        user_store="memory",
        logout_max_wait=30,
        **CHEAP_ARGON2,
    )
    stop = start_background(app)
    port = global_reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        for _ in range(2):
            await _post(base, "echo", x=1)
        for _ in range(3):
            await _post(base, "public.square", n=4)
        response, answer = await _post(base, "account.create", user_id="bob", password=PASSWORD)
        assert "result" in answer, answer
        _, answer = await _post(base, "account.login", user_id="bob", password="nope " + PASSWORD)
        assert answer["error"]["name"] == "invalid_credentials"
        response, answer = await _post(base, "account.login", user_id="bob", password=PASSWORD)
        token = response.headers.getRawHeaders("x-twistauth-session")[0]
        missing = await treq.get(base + "/no/such/page", timeout=10)
        assert missing.code == 404
        await missing.content()
        waiting = treq.get(
            base + "/logout/wait?timeout=20", headers={"X-Twistauth-Session": token}, timeout=30
        )
        while app.logout.watcher.stats()["watches"] < 1:
            await deferLater(global_reactor, 0.01, lambda: None)
        scrape = await treq.get(base + "/metrics", timeout=10)
        during = metric_samples((await scrape.content()).decode())
        await _post(base, "account.logout", token)
        woken = await waiting
        assert json.loads(await woken.content())["logged_out"] is True
        scrape = await treq.get(base + "/metrics", timeout=10)
        assert scrape.headers.getRawHeaders("content-type")[0].startswith("text/plain")
        after = metric_samples((await scrape.content()).decode())
    finally:
        await port.stopListening()
        await stop()
    assert sample(during, "twistauth_waiters") == 1
    assert sample(after, "twistauth_waiters") == 0
    requests = "twistauth_http_requests_total"
    assert sample(after, requests, route="api", method="POST", status="200") == 8
    assert sample(after, requests, route="api", method="POST", status="401") == 1
    assert sample(after, requests, route="not_found", method="GET", status="404") == 1
    assert sample(after, requests, route="logout_wait", method="GET", status="200") == 1
    assert sample(after, requests, route="metrics", method="GET", status="200") == 1
    assert sample(after, "twistauth_method_duration_seconds_count", method="echo") == 2
    assert sample(after, "twistauth_method_duration_seconds_bucket", method="echo", le="+Inf") == 2
    assert sample(after, "twistauth_method_calls_total", method="account.login",
                  outcome="invalid_credentials") == 1
    logins = "twistauth_logins_total"
    assert sample(after, logins, kind="password", outcome="success", reason="ok") == 1
    assert sample(after, logins, kind="password", outcome="failure",
                  reason="invalid_credentials") == 1
    # create (a session) and the logins (each a new one: ids are renewed).
    assert (sample(after, "twistauth_sessions_created_total", cache="memory") or 0) >= 2
    assert sample(after, "twistauth_sessions_destroyed_total", reason="logout") == 1
    assert calls == [4]
    assert sample(after, "twistauth_cache_requests_total", cache="methods", result="hit") == 2
    assert sample(after, "twistauth_cache_requests_total", cache="methods", result="miss") == 1
    assert sample(after, "twistauth_logout_waits", stat="bus") == 1


# ---------------------------------------------------------------------------
# Readiness against a real Redis.


def _redis_app(url: str, **options: Any) -> Any:
    return make_app(
        clock=global_reactor,
        reactor=global_reactor,
        session_cache=url,
        user_store=url,
        method_cache="none",
        deployment_key=DEPLOYMENT_KEY,
        readiness_timeout=0.5,
        redis_timeout=0.5,
        **CHEAP_ARGON2,
        **options,
    )


async def _readyz(base: str) -> Any:
    started = time.monotonic()
    response = await treq.get(base + "/readyz", timeout=10)
    body = json.loads(await response.content())
    return response.code, body, time.monotonic() - started


async def _until_ready(base: str, ready: bool, seconds: float = 15.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        code, body, took = await _readyz(base)
        if (code == 200) == ready:
            return code, body, took
        assert time.monotonic() < deadline, body
        await deferLater(global_reactor, 0.1, lambda: None)


def _serve(app: Any) -> Any:
    """
    Listen on a free loopback port; (base URL, port).
    """
    port = global_reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}", port


@pytest_twisted.ensureDeferred
async def test_readiness_follows_a_real_redis(redis_server: RedisServer) -> None:
    app = _redis_app(redis_server.url)
    stop = start_background(app)
    base, port = _serve(app)
    try:
        code, body, _ = await _until_ready(base, True)
        assert sorted(body["checks"]) == ["bus", "redis", "users"]
        redis_server.stop()
        with captured_events() as events:
            code, body, took = await _until_ready(base, False)
        assert code == 503
        assert body["status"] == "unready"
        assert "redis" in body["failed"] and "users" in body["failed"], body
        assert took < 0.5 + 0.5, took  # each check within its deadline
        # The body names what failed, never where; the log says where.
        assert "127.0.0.1" not in json.dumps(body)
        logged = [formatEvent(e) for e in events]
        assert any("readiness check redis fails" in text for text in logged), logged
        redis_server.start()
        code, body, _ = await _until_ready(base, True)
        assert body["status"] == "ready"
        metrics = metric_samples(app.metrics.render()[0].decode())
        errors = [v for (name, _), v in metrics.items() if name == "twistauth_redis_errors_total"]
        assert sum(errors) >= 1
    finally:
        await port.stopListening()
        await stop()


@pytest_twisted.ensureDeferred
async def test_readiness_when_redis_refuses_our_password() -> None:
    server = RedisServer(password="the-right-password")
    server.start()
    try:
        wrong = f"redis://:not-the-password@127.0.0.1:{server.port}/0"
        app = _redis_app(wrong)
        stop = start_background(app)
        base, port = _serve(app)
        try:
            code, body, took = await _readyz(base)
            assert code == 503, body
            assert "redis" in body["failed"], body
            assert body["checks"]["redis"]["error"] == "redis_auth_failed", body
            assert "not-the-password" not in json.dumps(body)
            assert took < 0.5 + 0.5, took
        finally:
            await port.stopListening()
            await stop()
    finally:
        server.cleanup()


@pytest_twisted.ensureDeferred
async def test_readiness_on_a_hung_redis() -> None:
    """
    Redis hung (SIGSTOP) with ``readiness_timeout`` equal to
    ``redis_timeout``: the ``redis`` check's deadline is a little longer
    than its PING's (`check_deadline`), so the probe's own deadline fires
    first: ``/readyz`` says ``redis_timeout`` (not a bare ``timeout``), the
    stalled connection is dropped (only the probe does that), and it is
    counted as a Redis error.  SIGCONT: ready again.
    """
    server = RedisServer()
    server.start()
    assert server.process is not None
    try:
        app = _redis_app(server.url)  # readiness_timeout = redis_timeout = 0.5
        stop = start_background(app)
        base, port = _serve(app)
        try:
            await _until_ready(base, True)
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                with captured_events() as events:
                    code, body, took = await _readyz(base)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert code == 503, body
            assert body["checks"]["redis"]["error"] == "redis_timeout", body
            assert took < check_deadline(0.5) + 0.3, took
            logged = "\n".join(formatEvent(e) for e in events)
            assert "no answer to PING within 0.5 s; dropping the connection" in logged, logged
            errors = _redis_errors(app.metrics.render()[0].decode())
            assert errors.get("timeout", 0) >= 1, errors
            await _until_ready(base, True)
        finally:
            await port.stopListening()
            await stop()
    finally:
        server.cleanup()


def test_check_deadline() -> None:
    assert check_deadline(0.5) == pytest.approx(0.55)
    assert check_deadline(0.1) == pytest.approx(0.15)
    assert check_deadline(2.0) == pytest.approx(2.2)
    assert check_deadline(30.0) == pytest.approx(30.5)


def _redis_errors(text: str) -> Dict[str, float]:
    """
    ``twistauth_redis_errors_total`` of a scrape, by kind.
    """
    return {
        dict(labels)["kind"]: value
        for (name, labels), value in metric_samples(text).items()
        if name == "twistauth_redis_errors_total"
    }


@pytest_twisted.ensureDeferred
async def test_failed_redis_calls_are_counted(redis_server: RedisServer) -> None:
    """
    ``redis_errors_total`` counts every Redis call that fails, not only the
    readiness probes: session calls while Redis is stopped each add one
    (``unavailable``), in the app that made them and no other.
    """
    app = _redis_app(redis_server.url)
    other = _redis_app(redis_server.url)  # another app on the same Redis
    stops = [start_background(app), start_background(other)]
    base, port = _serve(app)
    try:
        await _until_ready(base, True)
        response, answer = await _post(base, "account.create", user_id="erin", password=PASSWORD)
        assert "result" in answer, answer
        token = response.headers.getRawHeaders("x-twistauth-session")[0]
        scrape = await treq.get(base + "/metrics", timeout=10)
        assert _redis_errors((await scrape.content()).decode()) == {}
        redis_server.stop()
        statuses = []
        for _ in range(5):
            response, answer = await _post(base, "session.info", token)
            statuses.append((response.code, answer["error"]["name"]))
        assert statuses == [(503, "session_store_unavailable")] * 5, statuses
        scrape = await treq.get(base + "/metrics", timeout=10)
        errors = _redis_errors((await scrape.content()).decode())
        assert set(errors) == {"unavailable"} and errors["unavailable"] >= 5, errors
        assert _redis_errors(other.metrics.render()[0].decode()) == {}
        redis_server.start()
    finally:
        await port.stopListening()
        for stop in stops:
            await stop()


# ---------------------------------------------------------------------------
# Several processes: one directory of counts.


class SharedMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="twistauth-shared-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_any_process_answers_with_the_sum(self) -> None:
        a = Metrics(multiprocess_dir=self.directory, pid=101)
        b = Metrics(multiprocess_dir=self.directory, pid=102)
        for metrics, waiting in ((a, 3), (b, 4)):
            metrics.request_finished("api", b"POST", 200)
            metrics.method_finished("echo", 0.0004, "ok")
            metrics.login("failure", "invalid_credentials")
            metrics.watch_waiters(lambda waiting=waiting: waiting)
        b.method_finished("echo", 0.3, "ok")
        b.snapshot()
        text, content_type = a.render()
        self.assertTrue(content_type.startswith("text/plain"))
        s = metric_samples(text.decode())
        self.assertEqual(
            sample(s, "twistauth_http_requests_total", route="api", method="POST", status="200"), 2
        )
        self.assertEqual(sample(s, "twistauth_method_duration_seconds_count", method="echo"), 3)
        self.assertEqual(
            sample(s, "twistauth_method_duration_seconds_bucket", method="echo", le="0.001"), 2
        )
        self.assertEqual(
            sample(s, "twistauth_method_duration_seconds_bucket", method="echo", le="0.5"), 3
        )
        self.assertAlmostEqual(
            sample(s, "twistauth_method_duration_seconds_sum", method="echo"), 0.3008
        )
        self.assertEqual(
            sample(s, "twistauth_logins_total", kind="password", outcome="failure",
                   reason="invalid_credentials"),
            2,
        )
        self.assertEqual(sample(s, "twistauth_waiters"), 7)
        self.assertIsNone(sample(s, "process_resident_memory_bytes"))  # one process's only
        # A process that ended: its gauges leave the sum, its counts stay.
        forget_process(self.directory, 102)
        s = metric_samples(a.render()[0].decode())
        self.assertEqual(sample(s, "twistauth_waiters"), 3)
        self.assertEqual(sample(s, "twistauth_method_duration_seconds_count", method="echo"), 3)
        a.close()
        b.close()
        clear_directory(self.directory)
        self.assertEqual(os.listdir(self.directory), [])

    def test_the_snapshot_service(self) -> None:
        clock = Clock()
        metrics = Metrics(multiprocess_dir=self.directory, pid=7)
        reader = Metrics(multiprocess_dir=self.directory, pid=8)
        service = SharedMetricsService(metrics, clock=clock, interval=1.0)
        service.startService()
        metrics.request_finished("api", b"GET", 200)

        def seen() -> Any:
            return sample(
                metric_samples(reader.render()[0].decode()),
                "twistauth_http_requests_total", route="api", method="GET", status="200",
            )

        self.assertIsNone(seen())
        clock.advance(1.0)
        self.assertEqual(seen(), 1)
        metrics.request_finished("api", b"GET", 200)
        service.stopService()  # a last snapshot
        self.assertEqual(seen(), 2)
        self.assertEqual(clock.getDelayedCalls(), [])
        reader.close()

    def test_the_parents_directory(self) -> None:
        owned = MetricsDirectory({})
        self.assertTrue(os.path.isdir(owned.path))
        owned.startService()
        owned.stopService()
        self.assertFalse(os.path.exists(owned.path))
        given = Path(self.directory) / "given"
        given.mkdir()
        (given / "counter_1.db").write_bytes(b"old")
        (given / "notes.txt").write_text("kept")
        directory = MetricsDirectory({METRICS_DIR_ENV: str(given)})
        self.assertEqual(os.listdir(given), ["notes.txt"])
        directory.startService()
        directory.stopService()
        self.assertTrue(given.exists())


# ---------------------------------------------------------------------------
# What the wiring costs a request.


def test_what_the_wiring_costs_a_request() -> None:
    """
    The per-request and per-call work added for operations, each timed on
    its own (best of 5 runs): the request id (given in the root resource),
    the request counter (in the site's ``log``), and the metrics after-hook
    (a method's duration, outcome and the login counter).  A bare
    ``twisted.web`` request costs ~60-90 us here; these must stay at a few
    microseconds.
    """
    ids = RequestIds()
    metrics = Metrics(process_metrics=False)
    hook = method_metrics_hook(metrics)
    app = make_app(clock=Clock(), user_store="memory")
    site = app.site()

    class Request:
        path = b"/api"
        method = b"POST"
        code = 200
        postpath = [b"api"]

        def setHeader(self, name: bytes, value: bytes) -> None:
            pass

    class Leaf:
        def render(self, request: Any) -> bytes:
            return b""

    root = RootResource({"/api": Leaf()}, Leaf(), request_ids=ids)  # type: ignore[dict-item]
    bare = RootResource({"/api": Leaf()}, Leaf())  # type: ignore[dict-item]
    transaction = Transaction("t-1", "echo", None, 0.0, 0.0004, "ok")
    site.log = site.log  # bound once, as Twisted calls it

    def best(statement: Any, number: int = 20_000) -> float:
        return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6

    costs = {
        "request id (root with ids - without)": best(lambda: root.render(Request()))
        - best(lambda: bare.render(Request())),
        "request counter (site.log)": best(lambda: site.log(Request())),
        "metrics after-hook": best(lambda: hook(transaction)),
    }
    print("; ".join(f"{name}: {us:.2f} us" for name, us in costs.items()))
    assert all(us < 10 for us in costs.values()), costs
