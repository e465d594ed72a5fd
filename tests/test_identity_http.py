"""
Tests for `twistauth.identity.http`: the outbound client's total deadline,
size cap, JSON decoding and error mapping.

Checklist cases 42 and 100, fault test R5 (stall, headers-then-stalled body,
huge body, connection reset), all on a Clock through StubTreq.
"""

from __future__ import annotations

from typing import Any, List

import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twistauth._version import __version__
from twistauth.identity.errors import (
    ProviderBadResponseError,
    ProviderTimeoutError,
    ProviderUnreachableError,
)
from twistauth.identity.http import USER_AGENT, ProviderHTTP, decode_json, make_http_client
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


class Recorder(Resource):
    """Answers with a fixed body and records each request's headers."""

    isLeaf = True

    def __init__(self, body: bytes = b'{"ok": true}', status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status
        self.requests: List[Request] = []
        self.bodies: List[bytes] = []

    def render(self, request: Request) -> bytes:
        self.requests.append(request)
        self.bodies.append(request.content.read() if request.content else b"")
        request.setResponseCode(self.status)
        if self.status in (301, 302):
            request.setHeader("Location", "https://elsewhere.example/")
        return self.body


class Chunked(Resource):
    """Streams ``chunks`` chunks of ``size`` bytes without a Content-Length."""

    isLeaf = True

    def __init__(self, chunks: int, size: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.size = size
        self.lost: List[Any] = []

    def render(self, request: Request) -> Any:
        request.notifyFinish().addBoth(self.lost.append)
        for _ in range(self.chunks):
            request.write(b"1" * self.size)
        request.finish()
        return NOT_DONE_YET


class HTTPTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock)
        self.stub = self.provider.stub()
        self.http = ProviderHTTP(client=self.stub, clock=self.clock, timeout=5.0)

    def tearDown(self) -> None:
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def get(self) -> Any:
        return self.http.get_json(self.provider.url("jwks"), what="jwks_uri")


class RequestTests(HTTPTestCase):
    def test_user_agent_and_accept(self) -> None:
        recorder = Recorder()
        http = ProviderHTTP(client=StubTreq(recorder), clock=self.clock)
        self.assertEqual(self.successResultOf(http.get_json("https://op.example/x", what="x")),
                         {"ok": True})
        [request] = recorder.requests
        agent = request.getHeader("user-agent")
        self.assertEqual(agent, USER_AGENT)
        self.assertIn(f"twistauth/{__version__}", agent)
        self.assertEqual(request.getHeader("accept"), "application/json")

    def test_post_with_headers(self) -> None:
        recorder = Recorder(b'{"access_token": "secret-marker"}')
        http = ProviderHTTP(client=StubTreq(recorder), clock=self.clock)
        d = http.request("POST", "https://op.example/token", what="token endpoint",
                         headers={"Content-Type": "application/x-www-form-urlencoded"},
                         body=b"a=1")
        response = self.successResultOf(d)
        self.assertEqual(response.status, 200)
        self.assertEqual(recorder.bodies, [b"a=1"])
        self.assertNotIn("secret-marker", repr(response), "the body never shows in repr")
        self.assertEqual(response.json(), {"access_token": "secret-marker"})

    def test_works_with_http_client_over_traversal_agent(self) -> None:
        agent = RequestTraversalAgent(self.provider.resource())
        http = ProviderHTTP(client=HTTPClient(agent), clock=self.clock)
        document = self.successResultOf(
            http.get_json(self.provider.url("discovery"), what="discovery endpoint")
        )
        self.assertEqual(document["issuer"], self.provider.issuer)

    def test_redirect_not_followed(self) -> None:
        recorder = Recorder(status=302)
        http = ProviderHTTP(client=StubTreq(recorder), clock=self.clock)
        failure = self.failureResultOf(http.get_json("https://op.example/x", what="x"),
                                       ProviderBadResponseError)
        self.assertIn("302", str(failure.value))
        self.assertEqual(len(recorder.requests), 1)

    def test_status_other_than_200(self) -> None:
        self.provider.misbehave("jwks", "error_500")
        failure = self.failureResultOf(self.get(), ProviderBadResponseError)
        self.assertEqual(failure.value.status, 502)
        self.assertIn("HTTP 500", str(failure.value))

    def test_make_http_client(self) -> None:
        client = make_http_client(MemoryReactorClock())
        self.assertIsInstance(client, HTTPClient)


class DeadlineTests(HTTPTestCase):
    """#42, #100, R5: one deadline for headers and body."""

    def test_stall_before_headers(self) -> None:
        self.provider.misbehave("jwks", "stall")
        d = self.get()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, ProviderTimeoutError)
        self.assertEqual(failure.value.status, 504)

    def test_headers_then_stalled_body(self) -> None:
        """treq's own timeout= would stop at the headers; ours covers the body."""
        self.provider.misbehave("jwks", "stall_body")
        d = self.get()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.failureResultOf(d, ProviderTimeoutError)

    def test_slow_answer(self) -> None:
        """R5: a 30 s stall ends at 5 s; the provider's pending answer is dropped."""
        self.provider.misbehave("jwks", "slow")
        d = self.get()
        self.clock.advance(5)
        self.failureResultOf(d, ProviderTimeoutError)

    def test_answer_within_deadline(self) -> None:
        self.provider.misbehave("jwks", "slow")
        self.provider.slow_seconds = 4
        d = self.get()
        self.clock.advance(4)
        self.stub.flush()
        self.assertIn("keys", self.successResultOf(d))

    def test_cancel_is_not_a_timeout(self) -> None:
        self.provider.misbehave("jwks", "stall")
        d = self.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)


class SizeTests(HTTPTestCase):
    """#42, #100, R5: a byte cap while reading."""

    def test_huge_with_content_length(self) -> None:
        self.provider.misbehave("jwks", "huge")
        failure = self.failureResultOf(self.get(), ProviderBadResponseError)
        self.assertIn("more than 65536 bytes", str(failure.value))

    def test_ten_megabytes(self) -> None:
        """R5's 10 MB body."""
        self.provider.misbehave("jwks", "huge")
        self.provider.huge_bytes = 10 * 1024 * 1024
        self.failureResultOf(self.get(), ProviderBadResponseError)

    def test_huge_chunked_aborted(self) -> None:
        resource = Chunked(chunks=20, size=8192)
        stub = StubTreq(resource)
        http = ProviderHTTP(client=stub, clock=self.clock)
        failure = self.failureResultOf(http.get_json("https://op.example/x", what="x"),
                                       ProviderBadResponseError)
        self.assertIn("more than", str(failure.value))

    def test_exactly_at_cap_accepted(self) -> None:
        body = b'"' + b"a" * (1000 - 2) + b'"'
        http = ProviderHTTP(client=StubTreq(Recorder(body)), clock=self.clock, max_bytes=1000)
        self.assertEqual(len(self.successResultOf(http.get_json("https://op.example/", what="x"))),
                         998)
        http = ProviderHTTP(client=StubTreq(Recorder(body + b" ")), clock=self.clock,
                            max_bytes=1000)
        self.failureResultOf(http.get_json("https://op.example/", what="x"),
                             ProviderBadResponseError)

    def test_chunked_within_cap(self) -> None:
        resource = Chunked(chunks=4, size=1000)
        http = ProviderHTTP(client=StubTreq(resource), clock=self.clock)
        self.assertEqual(self.successResultOf(http.get_json("https://op.example/x", what="x")),
                         int("1" * 4000))


class DecodingTests(HTTPTestCase):
    def test_garbled(self) -> None:
        self.provider.misbehave("jwks", "garbled")
        failure = self.failureResultOf(self.get(), ProviderBadResponseError)
        self.assertIn("JSON", str(failure.value))

    def test_not_utf8_nan_and_deep(self) -> None:
        for body in (b"\xff\xfe", b"NaN", b'{"a": Infinity}', b"[" * 100000, b""):
            self.assertRaises(ProviderBadResponseError, decode_json, body, "x")
        self.assertEqual(decode_json(b'{"a": [1, 2.5]}', "x"), {"a": [1, 2.5]})

    def test_connection_reset(self) -> None:
        """R5: the connection drops without an answer → 502 unreachable."""
        self.provider.misbehave("jwks", "reset")
        failure = self.failureResultOf(self.get(), ProviderUnreachableError)
        self.assertEqual(failure.value.status, 502)

    def test_unsupported_scheme(self) -> None:
        failure = self.failureResultOf(
            self.http.get_json("ftp://op.example/jwks", what="jwks_uri"),
            ProviderUnreachableError,
        )
        self.assertIn("jwks_uri", str(failure.value))


class _Stalling(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: List[Request] = []

    def render(self, request: Request) -> Any:
        if request.path == b"/huge":
            return b"[" + b"1," * 100_000 + b"1]"
        if request.path == b"/ok":
            request.setHeader("Content-Type", "application/json")
            return b'{"real": "socket"}'
        request.setHeader("Content-Length", "100")
        request.write(b'{"partial": ')
        request.notifyFinish().addErrback(lambda f: None)
        self.pending.append(request)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_real_sockets_deadline_and_cap() -> None:
    """#100 over real TCP with treq's real Agent (make_http_client): a body
    that stalls after the headers times out; a huge body is cut off."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.server import Site

    resource = _Stalling()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    try:
        base = f"http://127.0.0.1:{port.getHost().port}"
        http = ProviderHTTP(client=make_http_client(reactor, persistent=False), clock=reactor,
                            timeout=0.5)
        assert await http.get_json(f"{base}/ok", what="x") == {"real": "socket"}
        started = reactor.seconds()
        with pytest.raises(ProviderTimeoutError):
            await http.get_json(f"{base}/stall", what="x")
        assert 0.4 < reactor.seconds() - started < 2.0
        with pytest.raises(ProviderBadResponseError):
            await http.get_json(f"{base}/huge", what="x")
        with pytest.raises(ProviderUnreachableError):
            await http.get_json("http://127.0.0.1:1/", what="x")
    finally:
        for request in resource.pending:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
        await port.stopListening()
