"""
Tests for `twistauth.web.health`: ``/healthz``, ``/readyz`` with passing,
failing and slow checks on a `Clock` (through ``StubTreq``), draining for
shutdown, ``/metrics``, and the private endpoint over a real socket.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest_twisted
import treq
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twistauth.errors import BackendUnavailableError
from twistauth.metrics import Metrics
from twistauth.web.health import HealthChecks, health_resource, health_site


class ReadinessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.checks = HealthChecks(clock=self.clock, default_timeout=2.0)
        self.metrics = Metrics(process_metrics=False)
        self.treq = StubTreq(health_resource(self.checks, self.metrics))
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def get(self, path: str, **kwargs: Any) -> Deferred[Any]:
        return self.treq.get("http://health" + path, **kwargs)  # type: ignore[no-any-return]

    def answer(self, d: Deferred[Any]) -> Any:
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response, body

    def json_answer(self, d: Deferred[Any]) -> Any:
        response, body = self.answer(d)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        return response.code, json.loads(body)

    def test_healthz(self) -> None:
        self.checks.add("redis", lambda: fail(BackendUnavailableError()))
        self.assertEqual(self.json_answer(self.get("/healthz")), (200, {"status": "ok"}))
        response, body = self.answer(self.treq.head("http://health/healthz"))
        self.assertEqual((response.code, body), (200, b""))
        response, body = self.answer(self.treq.post("http://health/healthz"))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertEqual(json.loads(body)["error"]["name"], "method_not_allowed")

    def test_ready_without_checks(self) -> None:
        self.assertEqual(self.json_answer(self.get("/readyz")), (200, {"status": "ready", "checks": {}}))

    def test_passing_failing_and_slow_checks(self) -> None:
        async def store() -> bool:
            await deferLater(self.clock, 0.5, lambda: None)
            return True

        def broken() -> None:
            raise ConnectionRefusedError("127.0.0.1:6379 refused")

        self.checks.add("store", store)
        self.checks.add("bus", lambda: succeed("PONG"))
        self.checks.add("redis", lambda: fail(BackendUnavailableError("redis is down")))
        self.checks.add("broken", broken)
        self.checks.add("false", lambda: False)
        self.checks.add("slow", Deferred, timeout=3.0)
        d = self.get("/readyz")
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.advance(2.5)
        status, body = self.json_answer(d)
        self.assertEqual(status, 503)
        self.assertEqual(body["status"], "unready")
        self.assertEqual(body["failed"], ["redis", "broken", "false", "slow"])
        self.assertEqual(
            {name: check.get("error") for name, check in body["checks"].items()},
            {
                "store": None,
                "bus": None,
                "redis": "backend_unavailable",
                "broken": "ConnectionRefusedError",
                "false": "returned false",
                "slow": "timeout",
            },
        )
        self.assertEqual(body["checks"]["store"]["seconds"], 0.5)
        self.assertEqual(body["checks"]["slow"]["seconds"], 3.0)
        # Details go to the log, not to the body.
        self.assertNotIn("6379", json.dumps(body))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ready_when_all_pass(self) -> None:
        self.checks.add("a", lambda: True)
        self.checks.add("b", lambda: succeed(None))
        status, body = self.json_answer(self.get("/readyz"))
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ready")
        self.assertNotIn("failed", body)

    def test_concurrent_probes_share_one_run(self) -> None:
        calls: List[Deferred[None]] = []

        def check() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            calls.append(d)
            return d

        self.checks.add("store", check)
        first, second = self.get("/readyz"), self.get("/readyz")
        self.assertEqual(len(calls), 1)
        calls[0].callback(None)
        self.assertEqual(self.json_answer(first)[0], 200)
        self.assertEqual(self.json_answer(second)[0], 200)
        third = self.get("/readyz")
        self.assertEqual(len(calls), 2)
        calls[1].callback(None)
        self.assertEqual(self.json_answer(third)[0], 200)

    def test_draining(self) -> None:
        self.checks.add("a", lambda: True)
        self.checks.set_draining()
        status, body = self.json_answer(self.get("/readyz"))
        self.assertEqual((status, body["status"]), (503, "draining"))
        self.assertEqual(self.json_answer(self.get("/healthz"))[0], 200)
        self.checks.set_draining(False)
        self.assertEqual(self.json_answer(self.get("/readyz"))[0], 200)

    def test_a_client_that_leaves_is_not_answered(self) -> None:
        self.checks.add("slow", Deferred, timeout=1.0)
        d = self.get("/readyz")
        d.cancel()
        self.failureResultOf(d)
        self.clock.advance(1.0)  # the run finishes; nothing is written
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.json_answer(self.get("/healthz"))[0], 200)

    def test_state_changes_are_logged_once(self) -> None:
        state = {"up": False}
        self.checks.add("redis", lambda: state["up"] or fail(BackendUnavailableError("down")))
        for _ in range(3):
            self.json_answer(self.get("/readyz"))
        state["up"] = True
        for _ in range(2):
            self.json_answer(self.get("/readyz"))
        messages = [e["log_format"] for e in self.events if e.get("check") == "redis"]
        self.assertEqual(
            messages,
            ["readiness check {check} fails: {error} ({detail})", "readiness check {check} passes again"],
        )

    def test_names_are_unique(self) -> None:
        self.checks.add("a", lambda: True)
        with self.assertRaises(ValueError):
            self.checks.add("a", lambda: True)
        self.checks.remove("a")
        self.checks.add("a", lambda: True)
        self.assertEqual(self.checks.names(), ["a"])

    def test_metrics(self) -> None:
        self.metrics.login("success")
        response, body = self.answer(self.get("/metrics"))
        self.assertEqual(response.code, 200)
        [content_type] = response.headers.getRawHeaders("content-type")
        self.assertTrue(content_type.startswith("text/plain; version=0.0.4"))
        self.assertIn(b'twistauth_logins_total{kind="password",outcome="success",reason="ok"} 1.0', body)
        response, body = self.answer(
            self.get("/metrics", headers={"Accept": ["application/openmetrics-text; version=1.0.0"]})
        )
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_mounted_in_an_application_tree(self) -> None:
        root = Resource()
        for name, child in health_resource(self.checks).children.items():
            root.putChild(name, child)
        stub = StubTreq(root)
        response = self.successResultOf(stub.get("http://app/healthz"))
        self.assertEqual(response.code, 200)
        # No metrics given: no metrics child.
        self.assertEqual(sorted(root.children), [b"healthz", b"readyz"])

    def test_other_paths_are_404(self) -> None:
        for path in ("/", "/nope", "/healthz/x"):
            response, body = self.answer(self.get(path))
            expected = 200 if path == "/healthz/x" else 404  # healthz is a leaf
            self.assertEqual(response.code, expected, path)
            if expected == 404:
                self.assertEqual(json.loads(body)["error"]["name"], "not_found")


@pytest_twisted.ensureDeferred
async def test_private_endpoint_over_a_real_socket() -> None:
    checks = HealthChecks(clock=global_reactor)
    checks.add("redis", lambda: deferLater(global_reactor, 0.01, lambda: True))
    metrics = Metrics()
    metrics.request_finished("api", b"POST", 200)
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    port = global_reactor.listenTCP(0, health_site(checks, metrics), interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}"
        response = await treq.get(base + "/healthz", timeout=5)
        assert response.code == 200 and json.loads(await response.content()) == {"status": "ok"}
        response = await treq.get(base + "/readyz", timeout=5)
        body = json.loads(await response.content())
        assert response.code == 200 and body["checks"]["redis"]["ok"] is True
        response = await treq.get(base + "/metrics", timeout=5)
        text = (await response.content()).decode()
        assert 'twistauth_http_requests_total{method="POST",route="api",status="200"} 1.0' in text
        assert "process_resident_memory_bytes" in text
    finally:
        await port.stopListening()
        globalLogPublisher.removeObserver(events.append)
    # Probes are not in the access log.
    assert not any("/healthz" in repr(e) for e in events)
