"""
The logout endpoints through the real HTTP stack (a ``twisted.web`` `Site`
speaking HTTP/1.1 over in-memory transports, on a `Clock`): long-poll and
Server-Sent Events, client disconnects, caps, timeouts, the immediate
answer when already logged out, durable re-checks, shutdown (checklist
case 99; R4 on the waiter side; R7 at the HTTP level).
"""

from __future__ import annotations

import gc
import json
import random
import resource
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twistauth.bus import MemoryBus
from twistauth.bus.logout import LogoutWatcher, publish_logout, session_key
from twistauth.errors import BackendUnavailableError
from twistauth.sessions import Session
from twistauth.web.events import LogoutEndpoints

try:
    from test_bus_memory import FastClock, one_turn
except ImportError:  # pragma: no cover - run from another directory
    raise


class World:
    """
    Sessions and their durable logout state, as the lead will wire them.
    """

    def __init__(self) -> None:
        self.sessions: Dict[str, Session] = {}
        self.revoked: Dict[str, str] = {}
        self.users_out: Dict[str, str] = {}
        self.resolving: Optional[Deferred[Any]] = None
        self.checking: Optional[Deferred[Any]] = None
        self.resolve_calls = 0

    def add(self, session_id: str, user_id: Optional[str]) -> Session:
        session = Session(id=session_id, created=0.0, last_seen=0.0, user_id=user_id)
        self.sessions[session_id] = session
        return session

    def resolve_session(self, request: Any) -> Any:
        self.resolve_calls += 1
        if self.resolving is not None:
            return self.resolving
        sid = request.getHeader(b"x-session")
        return succeed(self.sessions.get(sid.decode()) if sid else None)

    def logged_out_reason(self, session: Session) -> Any:
        if self.checking is not None:
            return self.checking
        reason = self.revoked.get(session.id)
        if reason is None and session.user_id is not None:
            reason = self.users_out.get(session.user_id)
        return succeed(reason)


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """
    One HTTP connection to the site, over an in-memory transport.
    """

    _port = 40000

    def __init__(self, site: Site) -> None:
        Client._port += 1
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", Client._port))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.closed = False

    def get(self, path: str, headers: Optional[Dict[str, str]] = None, method: str = "GET") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())

    def raw(self) -> bytes:
        return self.transport.value()

    def response(self) -> Optional[Response]:
        raw = self.raw()
        if b"\r\n\r\n" not in raw:
            return None
        return Response(raw)

    def disconnect(self) -> None:
        self.closed = True
        self.protocol.connectionLost(Failure(ConnectionDone()))


class EventsTestCase(SynchronousTestCase):
    max_wait = 25.0
    max_per_session = 4
    max_total = 100

    def setUp(self) -> None:
        self.clock = self.make_clock()
        self.bus = MemoryBus(clock=self.clock)
        self.world = World()
        self.watcher = LogoutWatcher(
            bus=self.bus,
            clock=self.clock,
            logged_out_reason=self.world.logged_out_reason,
            max_wait=self.max_wait,
            max_per_session=self.max_per_session,
            max_total=self.max_total,
        )
        self.endpoints = LogoutEndpoints(
            watcher=self.watcher,
            resolve_session=self.world.resolve_session,
            clock=self.clock,
            heartbeat_interval=10.0,
            retry_ms=2500,
        )
        root = Resource()
        logout = Resource()
        logout.putChild(b"wait", self.endpoints.wait)
        root.putChild(b"logout", logout)
        root.putChild(b"events", self.endpoints.events)
        self.site = Site(root, timeout=None, reactor=self.clock)
        self.logged: List[str] = []
        globalLogPublisher.addObserver(self._log)
        self.addCleanup(globalLogPublisher.removeObserver, self._log)

    def make_clock(self) -> Clock:
        return Clock()

    def _log(self, event: Dict[str, Any]) -> None:
        self.logged.append(repr(event))

    def client(self) -> Client:
        return Client(self.site)

    def wait(self, session_id: Optional[str], query: str = "") -> Client:
        c = self.client()
        headers = {"x-session": session_id} if session_id else {}
        c.get("/logout/wait" + query, headers)
        return c

    def assert_idle(self) -> None:
        self.assertEqual(self.bus.stats()["waiters"], 0)
        self.assertEqual(self.bus._waiters, {})
        self.assertEqual(self.watcher.stats()["watches"], 0)
        self.assertEqual(self.watcher.stats()["sessions"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def tearDown(self) -> None:
        # No session id ever reaches the log.
        for sid in self.world.sessions:
            for line in self.logged:
                self.assertNotIn(sid, line)


class LongPollTests(EventsTestCase):
    max_total = 1000
    def test_notified_session_answers_at_once(self) -> None:
        self.world.add("s-secret-1", "alice")
        c = self.wait("s-secret-1", "?timeout=20")
        self.assertIsNone(c.response())
        # The bus key holds a hash of the session id, never the id.
        self.assertIn(session_key("s-secret-1"), self.bus._waiters)
        self.assertFalse(any("s-secret-1" in str(k) for k in self.bus._waiters))
        self.world.revoked["s-secret-1"] = "logout"
        publish_logout(self.bus, session_id="s-secret-1", reason="logout")
        self.clock.advance(0)
        r = c.response()
        assert r is not None
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json(), {"logged_out": True, "reason": "logout"})
        self.assertEqual(r.headers[b"content-type"], b"application/json")
        self.assertEqual(r.headers[b"cache-control"], b"no-store")
        self.assert_idle()

    def test_user_logout_wakes_every_session_of_the_user(self) -> None:
        self.world.add("s1", "alice")
        self.world.add("s2", "alice")
        self.world.add("s3", "bob")
        a, b, c = self.wait("s1"), self.wait("s2"), self.wait("s3")
        publish_logout(self.bus, user_id="alice", reason="backchannel")
        self.clock.advance(0)
        for client in (a, b):
            r = client.response()
            assert r is not None
            self.assertEqual(r.json(), {"logged_out": True, "reason": "backchannel"})
        self.assertIsNone(c.response())
        c.disconnect()
        self.assert_idle()

    def test_provider_session_logout(self) -> None:
        s = self.world.add("s1", "alice")
        s.issuer, s.provider_sid = "https://op.example", "op-sid-1"
        c = self.wait("s1")
        publish_logout(self.bus, provider_session=("https://op.example", "op-sid-1"), reason="backchannel")
        self.clock.advance(0)
        r = c.response()
        assert r is not None
        self.assertEqual(r.json()["reason"], "backchannel")
        self.assert_idle()

    def test_timeout_answers_still_logged_in_at_exactly_n(self) -> None:
        self.world.add("s1", "alice")
        c = self.wait("s1", "?timeout=5")
        self.clock.advance(4.5)
        self.assertIsNone(c.response())
        self.clock.advance(0.5)
        r = c.response()
        assert r is not None
        self.assertEqual((r.status, r.json()), (200, {"logged_out": False}))
        self.assertEqual(self.watcher.stats()["timeout"], 1)
        self.assert_idle()

    def test_timeout_is_capped_and_defaults_to_max_wait(self) -> None:
        self.world.add("s1", None)
        capped, default = self.wait("s1", "?timeout=9999"), self.wait("s1")
        self.clock.advance(self.max_wait - 0.5)
        self.assertIsNone(capped.response())
        self.assertIsNone(default.response())
        self.clock.advance(0.5)
        for c in (capped, default):
            r = c.response()
            assert r is not None
            self.assertEqual(r.json(), {"logged_out": False})
        self.assert_idle()

    def test_already_logged_out_answers_at_once(self) -> None:
        """
        The logout happened between page load and poll: nothing is lost.
        """
        self.world.add("s1", "alice")
        self.world.users_out["alice"] = "logout_everywhere"
        c = self.wait("s1", "?timeout=20")
        r = c.response()
        assert r is not None
        self.assertEqual(r.json(), {"logged_out": True, "reason": "logout_everywhere"})
        self.assertEqual(self.watcher.stats()["recheck"], 1)
        self.assert_idle()

    def test_missed_notification_is_caught_at_the_timeout(self) -> None:
        """
        R4 (slow or disconnected subscriber): the durable state changed but
        the notification never arrived; the timeout re-check answers.
        """
        self.world.add("s1", "alice")
        c = self.wait("s1", "?timeout=10")
        self.world.users_out["alice"] = "backchannel"  # no notify
        self.clock.advance(10)
        r = c.response()
        assert r is not None
        self.assertEqual(r.json(), {"logged_out": True, "reason": "backchannel"})
        self.assert_idle()

    def test_bus_resumption_rechecks_every_wait(self) -> None:
        """
        R4: after a bus reconnection every wait re-checks durable state.
        """
        self.world.add("s1", "alice")
        self.world.add("s2", "bob")
        a, b = self.wait("s1"), self.wait("s2")
        self.world.users_out["alice"] = "backchannel"
        self.bus.resumed()
        self.clock.advance(0)
        r = a.response()
        assert r is not None
        self.assertEqual(r.json(), {"logged_out": True, "reason": "backchannel"})
        self.assertIsNone(b.response())
        b.disconnect()
        self.assert_idle()

    def test_failing_durable_check_is_logged_without_the_session_id(self) -> None:
        self.world.add("s-very-secret", "alice")

        def broken(session: Session) -> Any:
            raise BackendUnavailableError(f"store down while checking {session.id}")

        self.watcher.logged_out_reason = broken
        c = self.wait("s-very-secret", "?timeout=3")
        self.clock.advance(3)
        r = c.response()
        assert r is not None
        self.assertEqual(r.json(), {"logged_out": False})  # the page polls again
        self.assertTrue(any("could not check" in line for line in self.logged))
        self.assertTrue(any("backend_unavailable" in line for line in self.logged))
        self.assert_idle()  # tearDown checks the id is in no log line

    def test_bad_timeouts_are_400(self) -> None:
        self.world.add("s1", "alice")
        for query in ("?timeout=abc", "?timeout=-1", "?timeout=1e3", "?timeout=nan",
                      "?timeout=inf", "?timeout=", "?timeout=1&timeout=2", "?timeout=%201"):
            c = self.wait("s1", query)
            r = c.response()
            assert r is not None, query
            self.assertEqual(r.status, 400, query)
            self.assertEqual(r.json()["error"]["name"], "invalid_timeout")
            self.assertEqual(r.json()["error"]["code"], 40061)
        self.assertEqual(self.world.resolve_calls, 0)
        self.assert_idle()

    def test_no_session_is_401(self) -> None:
        for session_id in (None, "unknown"):
            c = self.wait(session_id)
            r = c.response()
            assert r is not None
            self.assertEqual(r.status, 401)
            self.assertEqual(r.json()["error"]["name"], "auth_required")
        self.assert_idle()

    def test_other_methods_are_405(self) -> None:
        c = self.client()
        c.get("/logout/wait", method="POST")
        r = c.response()
        assert r is not None
        self.assertEqual(r.status, 405)
        self.assertEqual(r.headers[b"allow"], b"GET")
        self.assert_idle()

    def test_per_session_cap_is_429(self) -> None:
        self.world.add("s1", "alice")
        self.world.add("s2", "alice")
        held = [self.wait("s1") for _ in range(self.max_per_session)]
        over = self.wait("s1")
        r = over.response()
        assert r is not None
        self.assertEqual(r.status, 429)
        self.assertEqual(r.json()["error"]["name"], "too_many_waiters")
        self.assertEqual(r.headers[b"retry-after"], b"5")
        other = self.wait("s2")
        self.assertIsNone(other.response())
        held[0].disconnect()  # a slot frees up
        again = self.wait("s1")
        self.assertIsNone(again.response())
        for c in held[1:] + [other, again]:
            c.disconnect()
        self.assertEqual(self.watcher.stats()["refused"], 1)
        self.assert_idle()

    def test_global_cap_is_429(self) -> None:
        clients = []
        for i in range(self.max_total):
            self.world.add(f"s{i}", None)
            clients.append(self.wait(f"s{i}"))
        self.world.add("late", None)
        r = self.wait("late").response()
        assert r is not None
        self.assertEqual(r.status, 429)
        self.assertEqual(r.json()["error"]["name"], "waiters_full")
        for c in clients:
            c.disconnect()
        self.assert_idle()

    def test_client_disconnect_removes_the_waiter(self) -> None:
        self.world.add("s1", "alice")
        c = self.wait("s1", "?timeout=20")
        self.assertEqual(self.bus.stats()["waiters"], 1)
        c.disconnect()
        self.assert_idle()
        self.assertEqual(self.watcher.stats()["cancelled"], 1)
        publish_logout(self.bus, user_id="alice", reason="logout")
        self.clock.advance(0)
        self.assertEqual(c.raw(), b"")

    def test_disconnect_while_resolving_the_session(self) -> None:
        self.world.add("s1", "alice")
        cancelled: List[bool] = []
        self.world.resolving = Deferred(lambda d: cancelled.append(True))
        c = self.wait("s1")
        c.disconnect()
        self.assertEqual(cancelled, [True])
        self.assert_idle()

    def test_disconnect_while_checking_durable_state(self) -> None:
        self.world.add("s1", "alice")
        cancelled: List[bool] = []
        self.world.checking = Deferred(lambda d: cancelled.append(True))
        c = self.wait("s1")
        self.assertEqual(self.bus.stats()["waiters"], 1)
        c.disconnect()
        self.assertEqual(cancelled, [True])
        self.assert_idle()

    def test_slow_durable_check_answers_after_a_notification_once(self) -> None:
        self.world.add("s1", "alice")
        cancelled: List[bool] = []
        self.world.checking = Deferred(lambda d: cancelled.append(True))
        c = self.wait("s1")
        publish_logout(self.bus, user_id="alice", reason="bus")
        self.clock.advance(0)
        r = c.response()
        assert r is not None
        self.assertEqual(r.json()["reason"], "bus")
        self.assertEqual(cancelled, [True])  # its late answer is not needed
        self.assert_idle()

    def test_shutdown_answers_every_waiter(self) -> None:
        clients = []
        for i in range(600):
            self.world.add(f"s{i}", "u")
            clients.append(self.wait(f"s{i}"))
        done = self.endpoints.shutdown()
        self.assertNoResult(done)
        one_turn(self.clock)
        answered = sum(1 for c in clients if c.response() is not None)
        self.assertEqual(answered, 256)  # a batch per turn
        one_turn(self.clock)
        self.assertNoResult(done)
        one_turn(self.clock)
        self.successResultOf(done)
        for c in clients:
            r = c.response()
            assert r is not None
            self.assertEqual(r.json(), {"logged_out": False, "reason": "shutdown"})
        late = self.wait("s1")
        r = late.response()
        assert r is not None
        self.assertEqual(r.json(), {"logged_out": False, "reason": "shutdown"})
        self.assert_idle()


class StreamTests(EventsTestCase):
    def stream(self, session_id: str, headers: Optional[Dict[str, str]] = None) -> Client:
        c = self.client()
        c.get("/events", dict({"x-session": session_id}, **(headers or {})))
        return c

    def events(self, c: Client) -> List[Tuple[Optional[str], Any]]:
        raw = c.raw().partition(b"\r\n\r\n")[2]
        out: List[Tuple[Optional[str], Any]] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                out.append((line[6:].strip().decode(), None))
            elif line.startswith(b"data:"):
                out[-1] = (out[-1][0], json.loads(line[5:]))
        return out

    def test_stream_heartbeats_then_logout_event(self) -> None:
        self.world.add("s1", "alice")
        c = self.stream("s1")
        r = c.response()
        assert r is not None
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers[b"content-type"], b"text/event-stream; charset=utf-8")
        self.assertIn(b"retry: 2500", c.raw())
        self.assertNotIn(b"keep-alive\n", c.raw())
        self.clock.advance(10)
        self.assertEqual(c.raw().count(b": keep-alive\n\n"), 1)
        self.clock.advance(10)
        self.assertEqual(c.raw().count(b": keep-alive\n\n"), 2)
        publish_logout(self.bus, user_id="alice", reason="logout")
        self.clock.advance(0)
        self.assertEqual(self.events(c), [("logout", {"logged_out": True, "reason": "logout"})])
        self.assertIn(b"id: logout\n", c.raw())
        self.assertTrue(c.raw().endswith(b"0\r\n\r\n"))  # the chunked stream ended
        self.assert_idle()

    def test_stream_rechecks_durable_state_every_max_wait(self) -> None:
        self.world.add("s1", "alice")
        c = self.stream("s1")
        self.clock.advance(self.max_wait)
        self.assertEqual(self.events(c), [])  # still logged in: keeps streaming
        self.world.users_out["alice"] = "backchannel"  # never notified
        self.clock.advance(self.max_wait)
        self.assertEqual(
            self.events(c), [("logout", {"logged_out": True, "reason": "backchannel"})]
        )
        self.assert_idle()

    def test_stream_disconnect_stops_heartbeats_and_waiter(self) -> None:
        self.world.add("s1", "alice")
        c = self.stream("s1")
        self.clock.advance(10)
        c.disconnect()
        self.assert_idle()

    def test_stream_shutdown_event(self) -> None:
        self.world.add("s1", "alice")
        c = self.stream("s1")
        done = self.endpoints.shutdown()
        self.clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(
            self.events(c), [("shutdown", {"logged_out": False, "reason": "shutdown"})]
        )
        late = self.stream("s1")
        self.assertEqual(
            self.events(late), [("shutdown", {"logged_out": False, "reason": "shutdown"})]
        )
        self.assert_idle()

    def test_last_event_id_logout_stops_reconnects_with_204(self) -> None:
        self.world.add("s1", "alice")
        self.world.users_out["alice"] = "logout"
        c = self.stream("s1", {"Last-Event-ID": "logout"})
        r = c.response()
        assert r is not None
        self.assertEqual(r.status, 204)
        self.assert_idle()

    def test_reconnect_resumes_and_catches_a_missed_logout(self) -> None:
        self.world.add("s1", "alice")
        self.world.users_out["alice"] = "backchannel"
        c = self.stream("s1", {"Last-Event-ID": "anything-else"})
        self.assertEqual(
            self.events(c), [("logout", {"logged_out": True, "reason": "backchannel"})]
        )
        self.assert_idle()

    def test_stream_still_logged_in_after_last_event_id_keeps_streaming(self) -> None:
        self.world.add("s1", "alice")
        c = self.stream("s1", {"Last-Event-ID": "logout"})
        r = c.response()
        assert r is not None
        self.assertEqual(r.status, 200)
        c.disconnect()
        self.assert_idle()

    def test_stream_caps_and_auth(self) -> None:
        self.world.add("s1", "alice")
        held = [self.stream("s1") for _ in range(self.max_per_session)]
        r = self.stream("s1").response()
        assert r is not None
        self.assertEqual((r.status, r.json()["error"]["name"]), (429, "too_many_waiters"))
        r = self.stream("nobody").response()
        assert r is not None
        self.assertEqual(r.status, 401)
        for c in held:
            c.disconnect()
        self.assert_idle()


def current_rss() -> int:
    """
    The process's resident memory now, in KiB.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover


class ChurnTests(EventsTestCase):
    """
    R7 through HTTP: 10 000 long-polls with random disconnects and
    timeouts; logout fan-out to 1 000 waiters of one user; the registry
    returns to 0 and memory does not grow from one round to the next.
    """

    max_total = 10_000

    def make_clock(self) -> Clock:
        return FastClock()

    def round(self, rng: random.Random) -> float:
        clients = []
        for i in range(10_000):
            sid = f"churn-{i}"
            user = "fan" if i < 1000 else f"u{i % 97}"
            if sid not in self.world.sessions:
                self.world.add(sid, user)
            clients.append(self.wait(sid, f"?timeout={rng.choice([5, 10, 20])}"))
        self.assertEqual(self.bus.stats()["waiters"], 10_000)
        for c in rng.sample(clients, 2500):
            c.disconnect()
        started = time.perf_counter()
        publish_logout(self.bus, user_id="fan", reason="logout")
        while self.clock.getDelayedCalls() and self.clock.getDelayedCalls()[0].getTime() <= self.clock.seconds():
            self.clock.advance(0)
        fan_out = time.perf_counter() - started
        for c in clients[:1000]:
            if not c.closed:
                r = c.response()
                assert r is not None
                self.assertEqual(r.json(), {"logged_out": True, "reason": "logout"})
        self.clock.advance(6)
        for c in rng.sample(clients, 1000):
            if not c.closed:
                c.disconnect()
        self.clock.advance(20)
        for c in clients:
            if not c.closed:
                c.disconnect()
        self.assert_idle()
        return fan_out

    def test_churn_returns_to_zero(self) -> None:
        rng = random.Random(99)
        # Automatic collections only slow the rounds down; gc.collect()
        # runs before each measure, so cyclic garbage is not counted.
        gc.disable()
        self.addCleanup(gc.enable)
        self.round(rng)
        gc.collect()
        rss_1 = current_rss()
        fan_out = self.round(rng)
        gc.collect()
        rss_2 = current_rss()
        self.assertLess(fan_out, 1.0)
        self.assertLessEqual(abs(rss_2 - rss_1), rss_1 * 0.05)
        self.assertEqual(self.bus.stats(), {"waiters": 0, "keys": 0, "listeners": 0, "pending_deliveries": 0})
