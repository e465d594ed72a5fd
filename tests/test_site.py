"""
Tests for `twistauth.web.site`: the site defends itself before a request
reaches the API.  Body limits at header time (checklist case 96), slow
requests and header floods (case 98), per-address connection caps, and the
app mounted under a host's own site.

The site is driven directly: ``site.buildProtocol(address)`` connected to a
``StringTransport``, bytes fed in by hand, time on a `Clock`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twistauth.app import make_app
from twistauth.methods.handler import Handler
from twistauth.methods.registry import MethodRegistry
from twistauth.web.site import TwistauthSite

# These tests are not about access control: every method is callable, and
# the users they log in need not exist in a user store.
OPEN_ACCESS = {"acl_initial": ["*"], "access_account_check": False}

LIMIT = 1000
TIMEOUT = 5.0


def address(host: str = "10.0.0.1", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def split_response(data: bytes) -> List[bytes]:
    """
    The status lines of every response in ``data``.
    """
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ran: List[Any] = []
        registry = MethodRegistry()

        @registry.method("record")
        def record(handler: Handler, **parameters: Any) -> str:
            self.ran.append(parameters)
            return "recorded"

        @registry.method("wait")
        def wait(handler: Handler) -> Deferred[str]:
            handler.on_connection_close(lambda: self.ran.append("closed"))
            call = self.clock.callLater(100, lambda: d.callback("waited"))
            d: Deferred[str] = Deferred(lambda _: (call.cancel(), self.ran.append("cancelled")))
            return d

        self.app = make_app(
            **OPEN_ACCESS,
            clock=self.clock,
            registry=registry,
            max_body_bytes=LIMIT,
            request_timeout=TIMEOUT,
            idle_timeout=60,
            max_connections_per_ip=3,
        )
        self.site: TwistauthSite = self.app.site()

    def connect(self, peer: Optional[IPv4Address] = None) -> Any:
        peer = peer or address()
        protocol = self.site.buildProtocol(peer)
        assert protocol is not None
        transport = StringTransport(peerAddress=peer, hostAddress=address("127.0.0.1", 8080))
        protocol.makeConnection(transport)
        protocol.test_transport = transport
        return protocol

    def close(self, protocol: Any) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))

    def assertClosedWith(self, protocol: Any, status: int, name: str) -> dict:
        """
        The connection answered one JSON error with ``status`` and is closing.
        """
        data = protocol.test_transport.value()
        self.assertEqual(split_response(data), [b"HTTP/1.1 %d " % status + _reason(data)])
        self.assertTrue(protocol.test_transport.disconnecting)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"content-type: application/json", head.lower())
        self.assertIn(b"connection: close", head.lower())
        error: dict = json.loads(body)["error"]
        self.assertEqual(error["name"], name)
        self.assertEqual(error["code"] // 100, status)
        return error

    def assertNothingLeft(self, protocol: Any) -> None:
        self.close(protocol)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.site.open_connections(), 0)


def _reason(data: bytes) -> bytes:
    first = data.split(b"\r\n", 1)[0]
    return first.split(b" ", 2)[2]


POST_HEAD = b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


class NormalRequestTests(_Base):
    def test_session_call_answered_in_the_same_call(self) -> None:
        """
        A call whose session needs no I/O (the memory cache) is answered
        within the bytes that complete it, with a ``Content-Length`` rather
        than a chunked body; the header-mode session headers come with it.
        """
        sessions = self.app.services.sessions
        assert sessions is not None
        session = self.successResultOf(sessions.create())
        session.log_in("alice", now=self.clock.seconds())
        token = self.successResultOf(sessions.save(session))
        assert token is not None
        protocol = self.connect()
        body = b'{"method":"record","parameters":{"x":1}}'
        protocol.dataReceived(
            POST_HEAD
            + b"X-Twistauth-Session: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (token.encode(), len(body), body)
        )
        head, _, rest = protocol.test_transport.value().partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        self.assertEqual(lines[0], b"http/1.1 200 ok")
        self.assertIn(b"content-length: %d" % len(rest), lines)
        self.assertNotIn(b"transfer-encoding: chunked", lines)
        self.assertIn(b"x-twistauth-session: " + token.lower().encode(), lines)
        self.assertEqual(json.loads(rest), {"result": "recorded"})
        self.assertEqual(self.ran, [{"x": 1}])
        self.assertNothingLeft(protocol)

    def test_request_and_keep_alive(self) -> None:
        """
        Requests are answered, the connection is kept, and each request's
        deadline ends when it has arrived.
        """
        protocol = self.connect()
        body = b'{"method":"record","parameters":{"n":1}}'
        for n in (1, 2):
            protocol.test_transport.clear()
            protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            data = protocol.test_transport.value()
            self.assertEqual(split_response(data), [b"HTTP/1.1 200 OK"])
            self.assertTrue(data.endswith(b'{"result":"recorded"}'))
            self.assertFalse(protocol.test_transport.disconnecting)
            self.clock.advance(TIMEOUT * 2)
            self.assertFalse(protocol.test_transport.disconnecting, n)
        self.assertEqual(len(self.ran), 2)
        self.assertNothingLeft(protocol)

    def test_date_without_server(self) -> None:
        """
        Answers carry no ``Server`` header (Twisted's names its version)
        and a ``Date`` of the site's clock, formatted anew each second.
        """
        protocol = self.connect()
        body = b'{"method":"record","parameters":{}}'
        request = POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        dates = []
        for advance in (0, 0.4, 0.7, 50):  # (within the idle timeout)
            self.clock.advance(advance)
            protocol.test_transport.clear()
            protocol.dataReceived(request)
            lines = protocol.test_transport.value().split(b"\r\n\r\n")[0].split(b"\r\n")
            self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
            names = [line.split(b":")[0].lower() for line in lines[1:]]
            self.assertNotIn(b"server", names)
            self.assertEqual(names.count(b"date"), 1)
            dates.append([line[6:] for line in lines if line.lower().startswith(b"date:")][0])
        self.assertEqual(
            dates,
            [
                b"Thu, 01 Jan 1970 00:00:00 GMT",
                b"Thu, 01 Jan 1970 00:00:00 GMT",
                b"Thu, 01 Jan 1970 00:00:01 GMT",
                b"Thu, 01 Jan 1970 00:00:51 GMT",
            ],
        )
        self.assertNothingLeft(protocol)

    def test_options_star(self) -> None:
        """
        ``OPTIONS *`` is answered as Twisted answers it; any other method
        on ``*`` is not allowed.
        """
        protocol = self.connect()
        protocol.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        protocol.dataReceived(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
        data = protocol.test_transport.value()
        self.assertEqual(
            split_response(data), [b"HTTP/1.1 200 OK", b"HTTP/1.1 405 Method Not Allowed"]
        )
        self.assertIn(b"Allow: OPTIONS", data)
        self.assertNothingLeft(protocol)

    def test_body_at_the_limit(self) -> None:
        protocol = self.connect()
        body = json.dumps({"method": "record", "parameters": {"x": ""}}).encode()
        body = body.replace(b'""', b'"' + b"a" * (LIMIT - len(body)) + b'"')
        self.assertEqual(len(body), LIMIT)
        protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual(split_response(protocol.test_transport.value()), [b"HTTP/1.1 200 OK"])
        self.assertNothingLeft(protocol)


class DisconnectTests(_Base):
    def test_client_goes_away_mid_call(self) -> None:
        """
        Over the real site: the method's Deferred is cancelled and its
        connection-close hook runs; nothing is written; nothing is left.
        """
        protocol = self.connect()
        body = b'{"method":"wait"}'
        protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual(protocol.test_transport.value(), b"")
        self.close(protocol)
        self.assertEqual(sorted(self.ran), ["cancelled", "closed"])
        self.assertEqual(protocol.test_transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.site.open_connections(), 0)


class BodyLimitTests(_Base):
    """
    Case 96: a body over the limit is refused when the headers arrive.
    """

    def test_content_length_over_limit_at_header_time(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n" % (LIMIT + 1))
        error = self.assertClosedWith(protocol, 413, "body_too_large")
        self.assertIn(str(LIMIT), error["value"])
        sent = protocol.test_transport.value()
        protocol.dataReceived(b'{"method":"record"}' + b" " * LIMIT)
        self.assertEqual(protocol.test_transport.value(), sent)
        self.assertEqual(self.ran, [])
        self.assertNothingLeft(protocol)

    def test_huge_content_length(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(POST_HEAD + b"Content-Length: 99999999999999999999\r\n\r\n")
        self.assertClosedWith(protocol, 413, "body_too_large")
        self.assertNothingLeft(protocol)

    def test_expect_continue_over_limit(self) -> None:
        """
        A client that waits for ``100 Continue`` gets the 413 alone.
        """
        protocol = self.connect()
        protocol.dataReceived(
            POST_HEAD + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (LIMIT * 10)
        )
        self.assertClosedWith(protocol, 413, "body_too_large")
        self.assertNotIn(b"100 Continue", protocol.test_transport.value())
        self.assertNothingLeft(protocol)

    def test_expect_continue_within_limit(self) -> None:
        protocol = self.connect()
        body = b'{"method":"record"}'
        protocol.dataReceived(
            POST_HEAD + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        self.assertEqual(protocol.test_transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(body)
        self.assertIn(b'{"result":"recorded"}', protocol.test_transport.value())
        self.assertNothingLeft(protocol)

    def test_chunked_body_crossing_the_limit(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 400
        for _ in range(2):
            protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.assertEqual(protocol.test_transport.value(), b"")
        protocol.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertClosedWith(protocol, 413, "body_too_large")
        protocol.dataReceived(b"0\r\n\r\n")
        self.assertEqual(self.ran, [])
        self.assertNothingLeft(protocol)

    def test_chunked_body_within_the_limit(self) -> None:
        protocol = self.connect()
        body = b'{"method":"record"}'
        protocol.dataReceived(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        protocol.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        self.assertIn(b'{"result":"recorded"}', protocol.test_transport.value())
        self.assertNothingLeft(protocol)

    def test_per_path_limit(self) -> None:
        """
        A path given its own smaller limit refuses at that limit; others
        keep the site's.
        """
        self.site.set_body_limit(b"/small", 10)
        protocol = self.connect()
        protocol.dataReceived(b"POST /small?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
        self.assertClosedWith(protocol, 413, "body_too_large")
        self.close(protocol)
        protocol = self.connect()
        body = b'{"method":"record"}'
        protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertIn(b"200 OK", protocol.test_transport.value())
        self.assertNothingLeft(protocol)


class SlowRequestTests(_Base):
    """
    Case 98: headers and body must arrive within ``request_timeout``.
    """

    def trickle(self, protocol: Any, data: bytes, every: float) -> None:
        for i in range(len(data)):
            if protocol.test_transport.disconnecting:
                return
            protocol.dataReceived(data[i : i + 1])
            self.clock.advance(every)

    def test_trickling_headers(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(b"POST /api HTTP/1.1\r\n")
        self.trickle(protocol, b"X-Slow: " + b"a" * 100, every=0.5)
        self.assertClosedWith(protocol, 408, "request_timeout")
        self.assertAlmostEqual(self.clock.seconds(), TIMEOUT, delta=0.5)
        self.assertNothingLeft(protocol)

    def test_trickling_request_line(self) -> None:
        protocol = self.connect()
        self.trickle(protocol, b"POST /api" + b"x" * 100, every=0.5)
        self.assertClosedWith(protocol, 408, "request_timeout")
        self.assertLessEqual(self.clock.seconds(), TIMEOUT + 0.5)
        self.assertNothingLeft(protocol)

    def test_trickling_body(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(POST_HEAD + b"Content-Length: 500\r\n\r\n")
        self.trickle(protocol, b" " * 500, every=1)
        self.assertClosedWith(protocol, 408, "request_timeout")
        self.assertEqual(self.ran, [])
        self.assertNothingLeft(protocol)

    def test_deadline_covers_the_whole_request(self) -> None:
        """
        Each byte arriving in time does not extend the deadline (as the
        idle timeout does).
        """
        protocol = self.connect()
        protocol.dataReceived(POST_HEAD + b"Content-Length: 10\r\n\r\n")
        self.clock.advance(TIMEOUT - 0.1)
        protocol.dataReceived(b"a")
        self.clock.advance(0.1)
        self.assertClosedWith(protocol, 408, "request_timeout")
        self.assertNothingLeft(protocol)

    def test_idle_keep_alive_connection_is_not_a_slow_request(self) -> None:
        """
        Between requests the idle timeout applies, not the request deadline.
        """
        protocol = self.connect()
        body = b'{"method":"record"}'
        protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        protocol.test_transport.clear()
        self.clock.advance(TIMEOUT * 3)
        self.assertFalse(protocol.test_transport.disconnecting)
        self.assertEqual(protocol.test_transport.value(), b"")
        self.clock.advance(60)
        self.assertTrue(protocol.test_transport.disconnecting)
        self.assertNothingLeft(protocol)

    def test_slow_second_request(self) -> None:
        protocol = self.connect()
        body = b'{"method":"record"}'
        protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        protocol.test_transport.clear()
        self.clock.advance(30)
        self.trickle(protocol, b"POST /api HTTP/1.1\r\nX-Slow: " + b"a" * 100, every=0.5)
        self.assertClosedWith(protocol, 408, "request_timeout")
        self.assertNothingLeft(protocol)


class HeaderFloodTests(_Base):
    """
    Case 98: Twisted's own header limits answer 400.
    """

    def test_too_many_headers(self) -> None:
        protocol = self.connect()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(501))
        protocol.dataReceived(b"GET /api HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        self.assertEqual(split_response(protocol.test_transport.value())[0][:12], b"HTTP/1.1 400")
        self.assertTrue(protocol.test_transport.disconnecting)
        self.assertNothingLeft(protocol)

    def test_headers_too_large(self) -> None:
        protocol = self.connect()
        protocol.dataReceived(b"GET /api HTTP/1.1\r\n")
        for _ in range(5):
            protocol.dataReceived(b"X-Big: " + b"a" * 4000 + b"\r\n")
        self.assertEqual(split_response(protocol.test_transport.value())[0][:12], b"HTTP/1.1 400")
        self.assertTrue(protocol.test_transport.disconnecting)
        self.assertNothingLeft(protocol)

    def test_within_header_limits(self) -> None:
        protocol = self.connect()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(400))
        protocol.dataReceived(b"GET /api HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        self.assertIn(b"200 OK", protocol.test_transport.value())
        self.assertNothingLeft(protocol)


class ConnectionCapTests(_Base):
    def test_cap_per_address(self) -> None:
        first = [self.connect(address(port=p)) for p in range(3)]
        self.assertIsNone(self.site.buildProtocol(address(port=99)))
        other = self.connect(address("10.0.0.2"))
        self.assertEqual(self.site.open_connections(), 4)
        self.close(first[0])
        self.assertEqual(self.site.open_connections(), 3)
        again = self.connect(address(port=100))
        self.assertIsNone(self.site.buildProtocol(address(port=101)))
        for protocol in first[1:] + [other, again]:
            self.close(protocol)
        self.assertEqual(self.site.open_connections(), 0)
        self.assertEqual(self.site.channels(), set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closing_twice_counts_once(self) -> None:
        protocols = [self.connect(address(port=p)) for p in range(3)]
        self.close(protocols[0])
        self.site.channel_closed(protocols[0])
        self.assertEqual(self.site.open_connections(), 2)
        self.assertIsNotNone(self.connect(address(port=50)))

    def test_unix_socket_not_counted(self) -> None:
        protocols = [self.site.buildProtocol(UNIXAddress(None)) for _ in range(5)]
        self.assertTrue(all(p is not None for p in protocols))
        self.assertEqual(self.site.open_connections(), 0)


class MountedTests(_Base):
    """
    The app under a path of a host's own site.  The host's site has no body
    limit, so the API checks the size itself (413 after reading).
    """

    def setUp(self) -> None:
        super().setUp()
        root = Resource()
        root.putChild(b"auth", self.app.resource())
        self.stub = StubTreq(root)

    def post(self, path: str, body: bytes) -> Any:
        response = self.successResultOf(
            self.stub.post("http://host.test" + path, data=body, headers={"Accept": "*/*"})
        )
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_call(self) -> None:
        status, answer = self.post("/auth/api", b'{"method":"record","parameters":{"a":1}}')
        self.assertEqual((status, answer), (200, {"result": "recorded"}))
        self.assertEqual(self.ran, [{"a": 1}])

    def test_introspection(self) -> None:
        response = self.successResultOf(self.stub.get("http://host.test/auth/api"))
        self.assertEqual(response.code, 200)
        names = [m["name"] for m in json.loads(self.successResultOf(response.content()))["result"]]
        self.assertIn("record", names)

    def test_body_limit(self) -> None:
        body = json.dumps({"method": "record", "parameters": {"x": "a" * LIMIT}}).encode()
        status, answer = self.post("/auth/api", body)
        self.assertEqual(status, 413)
        self.assertEqual(answer["error"]["name"], "body_too_large")
        self.assertEqual(self.ran, [])

    def test_other_paths(self) -> None:
        status, answer = self.post("/auth/nothing", b"{}")
        self.assertEqual(status, 404)
        self.assertEqual(answer["error"]["name"], "not_found")


class AccessLogTests(SynchronousTestCase):
    """
    The access log: off by default; to the server's log or to a file; never
    with the query string (it can carry authorization codes).
    """

    def request(self, access_log: Any) -> List[Dict[str, Any]]:
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        app = make_app(clock=Clock(), access_log=access_log, **OPEN_ACCESS)
        site = app.site()
        site.startFactory()
        self.addCleanup(site.stopFactory)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        body = b'{"method":"echo","parameters":{}}'
        channel.dataReceived(
            b"POST /api?code=SECRET-CODE HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        self.assertIn(b"200 OK", transport.value())
        channel.connectionLost(Failure(ConnectionDone()))
        return events

    def test_off_by_default(self) -> None:
        events = self.request(None)
        self.assertFalse([e for e in events if "POST /api" in formatEvent(e)])

    def test_to_the_server_log(self) -> None:
        lines = [formatEvent(e) for e in self.request("-") if "POST /api" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("SECRET-CODE", lines[0])

    def test_to_a_file(self) -> None:
        directory = tempfile.mkdtemp(prefix="twistauth-access-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "access.log")
        events = self.request(path)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn('"POST /api HTTP/1.1" 200', lines[0])
        self.assertNotIn("SECRET-CODE", lines[0])
        self.assertFalse([e for e in events if "POST /api" in formatEvent(e)])
