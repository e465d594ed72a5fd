"""
Tests for `twistauth.web.api` (and the root resource in front of it): HTTP
methods, client disconnects, unencodable answers, and the Klein routes
beside the API, all through ``StubTreq(app.resource())`` on a `Clock`.
"""

from __future__ import annotations

from typing import Any, Dict, List

import msgpack
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.methods.dispatch import Transaction
from twistauth.methods.handler import Handler
from twistauth.methods.registry import MethodRegistry
from twistauth.testing._client import MethodClient, Response

# These tests are not about access control: every method is callable, and
# the users they log in need not exist in a user store.
OPEN_ACCESS = {"acl_initial": ["*"], "access_account_check": False}


class _Base(SynchronousTestCase):
    api_path = "/api"

    def setUp(self) -> None:
        self.clock = Clock()
        self.ran: List[str] = []
        self.closed: List[str] = []
        self.cancelled: List[str] = []
        self.after: List[Transaction] = []
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        registry = MethodRegistry()
        clock = self.clock

        @registry.method("record")
        def record(handler: Handler) -> str:
            self.ran.append("record")
            return "recorded"

        @registry.method("wait")
        def wait(handler: Handler, seconds: float = 10) -> Deferred[str]:
            self.ran.append("wait")
            handler.on_connection_close(lambda: self.closed.append(handler.method))
            call = clock.callLater(seconds, lambda: d.callback("waited"))

            def cancel(_: Deferred[str]) -> None:
                self.cancelled.append(handler.method)
                call.cancel()

            d: Deferred[str] = Deferred(cancel)
            return d

        @registry.method("wait.coroutine")
        async def wait_coroutine(handler: Handler) -> str:
            handler.on_connection_close(lambda: self.closed.append(handler.method))
            try:
                await deferLater(clock, 10, lambda: None)
            except CancelledError:
                self.cancelled.append(handler.method)
                raise
            return "waited"

        @registry.method("late")
        def late(handler: Handler) -> Deferred[Any]:
            self.late_handler = handler
            handler.on_connection_close(lambda: self.closed.append(handler.method))
            return handler.respond_later()

        @registry.method("unencodable")
        def unencodable(handler: Handler, kind: str) -> Any:
            return {
                "set": {1, 2},
                "object": object(),
                "nan": float("nan"),
                "bytes_key": {b"k": 1},
                "deep": _deep(5_000),
                "big": 2**70,
                "circular": _circular(),
            }[kind]

        @registry.method("unencodable.later")
        def unencodable_later(handler: Handler) -> Deferred[Any]:
            return deferLater(clock, 1, lambda: _deep(5_000))

        self.app = make_app(
            **OPEN_ACCESS,
            clock=self.clock,
            registry=registry,
            api_path=self.api_path,
            after_hook=self.after.append,
        )
        self.client = MethodClient(self.app)

    def request(self, method: str, body: bytes = b"", **kw: Any) -> Response:
        return self.successResultOf(self.client.request(method, body, **kw))


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _circular() -> Any:
    value: Any = {"self": None}
    value["self"] = value
    return value


class HTTPMethodTests(_Base):
    def test_head_answers_headers_only_and_runs_nothing(self) -> None:
        response = self.request("HEAD", b'{"method":"record"}')
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.content_type, "application/json")
        self.assertEqual(response.header("cache-control"), "no-store")
        self.assertEqual(self.ran, [])
        self.assertEqual(self.after, [])

    def test_head_msgpack(self) -> None:
        response = self.request("HEAD", headers={"Accept": "application/msgpack"})
        self.assertEqual(response.content_type, "application/msgpack")
        self.assertEqual(response.body, b"")

    def test_head_not_acceptable(self) -> None:
        response = self.request("HEAD", headers={"Accept": "text/html"})
        self.assertEqual(response.status, 406)
        self.assertEqual(response.body, b"")

    def test_get_lists_and_runs_nothing(self) -> None:
        response = self.request("GET", b'{"method":"record"}')
        self.assertEqual(response.status, 200)
        names = [m["name"] for m in response.decoded()["result"]]
        self.assertEqual(names, sorted(names))
        self.assertIn("record", names)
        self.assertIn("echo", names)
        self.assertEqual(self.ran, [])

    def test_get_msgpack(self) -> None:
        response = self.request("GET", headers={"Accept": "application/msgpack"})
        self.assertIn("result", msgpack.unpackb(response.body))

    def test_other_methods_not_allowed(self) -> None:
        for method in ("PUT", "DELETE", "PATCH", "TRACE"):
            response = self.request(method, b'{"method":"record"}')
            self.assertEqual(response.status, 405, method)
            self.assertEqual(response.decoded()["error"]["name"], "method_not_allowed")
            allowed = {m.strip() for m in (response.header("allow") or "").split(",")}
            self.assertTrue({"GET", "HEAD", "POST"} <= allowed, allowed)
        self.assertEqual(self.ran, [])

    def test_post(self) -> None:
        self.assertEqual(self.successResultOf(self.client.call("record")), "recorded")
        self.assertEqual(self.ran, ["record"])

    def test_post_empty_body(self) -> None:
        response = self.request("POST", b"")
        self.assertEqual(response.status, 400)
        self.assertEqual(response.decoded()["error"]["name"], "invalid_json")

    def test_query_string_ignored_for_routing(self) -> None:
        response = self.request("POST", b'{"method":"record"}', path=self.api_path + "?x=1")
        self.assertEqual(response.decoded(), {"result": "recorded"})


class OtherPathTests(_Base):
    def test_unknown_path_is_json_404(self) -> None:
        for path in ("/", "/nothing", self.api_path + "/more", self.api_path + "x"):
            response = self.request("POST", b'{"method":"record"}', path=path)
            self.assertEqual(response.status, 404, path)
            self.assertEqual(response.decoded()["error"]["name"], "not_found")
        self.assertEqual(self.ran, [])


class ConfiguredPathTests(OtherPathTests):
    api_path = "/v1/methods"

    def test_configured_path(self) -> None:
        self.assertEqual(self.client.api_path, "/v1/methods")
        self.assertEqual(self.successResultOf(self.client.call("record")), "recorded")
        response = self.request("POST", b'{"method":"record"}', path="/api")
        self.assertEqual(response.status, 404)


class DisconnectTests(_Base):
    """
    A client that goes away cancels its call's Deferred and runs the
    method's connection-close hooks; nothing is left on the clock.
    """

    def test_deferred_method(self) -> None:
        d = self.client.call("wait")
        self.assertEqual(self.ran, ["wait"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.cancelled, ["wait"])
        self.assertEqual(self.closed, ["wait"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([(t.method, t.outcome) for t in self.after], [("wait", "cancelled")])

    def test_coroutine_method(self) -> None:
        d = self.client.call("wait.coroutine")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.cancelled, ["wait.coroutine"])
        self.assertEqual(self.closed, ["wait.coroutine"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_respond_later(self) -> None:
        d = self.client.call("late")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.closed, ["late"])
        self.late_handler.respond("too late")  # ignored, no error
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_batch(self) -> None:
        d = self.client.batch(
            {"a": ("wait", {}), "b": ("wait", {"seconds": 5}), "c": ("record", {})}
        )
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(sorted(self.cancelled), ["wait", "wait"])
        self.assertEqual(sorted(self.closed), ["wait", "wait"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            sorted(t.outcome for t in self.after if t.method == "wait"), ["cancelled", "cancelled"]
        )

    def test_finished_call_runs_no_close_hook(self) -> None:
        d = self.client.call("wait", seconds=1)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), "waited")
        self.assertEqual(self.closed, [])
        self.assertEqual(self.cancelled, [])

    def test_server_keeps_serving(self) -> None:
        d = self.client.call("wait")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.successResultOf(self.client.call("record")), "recorded")


class UnencodableTests(_Base):
    """
    A result the response format cannot carry is a 500 with a correlation
    id (case 91), logged under that id.
    """

    def check_500(self, response: Response) -> None:
        self.assertEqual(response.status, 500)
        error = response.decoded()["error"]
        self.assertEqual(error["name"], "internal_error")
        cid = error["value"]["correlation_id"]
        logged = [e for e in self.events if e.get("cid") == cid and "log_failure" in e]
        self.assertEqual(len(logged), 1)
        for leak in ("Traceback", "TypeError", "ValueError", "RecursionError", ".py", "object"):
            self.assertNotIn(leak, response.body.decode("utf-8", "replace"))

    def test_unencodable_json(self) -> None:
        for kind in ("set", "object", "nan", "bytes_key", "deep", "circular"):
            response = self.request(
                "POST", b'{"method":"unencodable","parameters":{"kind":"%s"}}' % kind.encode()
            )
            self.check_500(response)
        self.flushLoggedErrors(TypeError, ValueError, RecursionError)

    def test_unencodable_msgpack(self) -> None:
        for kind in ("set", "object", "big"):
            response = self.request(
                "POST",
                b'{"method":"unencodable","parameters":{"kind":"%s"}}' % kind.encode(),
                headers={"Accept": "application/msgpack"},
            )
            self.assertEqual(response.status, 500)
            cid = msgpack.unpackb(response.body)["error"]["value"]["correlation_id"]
            self.assertTrue([e for e in self.events if e.get("cid") == cid])
        self.flushLoggedErrors(TypeError, ValueError, OverflowError)

    def test_unencodable_later(self) -> None:
        d = self.client.request("POST", b'{"method":"unencodable.later"}')
        self.clock.advance(1)
        self.check_500(self.successResultOf(d))
        self.flushLoggedErrors(RecursionError)


class ClientSessionTests(SynchronousTestCase):
    """
    `MethodClient` keeps the cookies the app sets and echoes the CSRF
    cookie, so a session carries over from one call to the next.
    """

    def test_session_carries_over(self) -> None:
        registry = MethodRegistry()

        @registry.method("mine")
        def mine(handler: Handler) -> Deferred[str]:
            return handler.ensure_session().addCallback(lambda session: session.id)

        client = MethodClient(make_app(**OPEN_ACCESS, clock=Clock(), registry=registry))
        first = self.successResultOf(client.call("mine"))
        self.assertTrue([c for c in client.cookies if c.name.endswith("_csrf")])
        self.assertEqual(self.successResultOf(client.call("mine")), first)
        stranger = MethodClient(make_app(**OPEN_ACCESS, clock=Clock(), registry=MethodRegistry()))
        self.assertEqual(list(stranger.cookies), [])
