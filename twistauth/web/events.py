"""
The logout endpoints: ``GET /logout/wait`` (long-poll) and ``GET /events``
(Server-Sent Events), as plain ``twisted.web`` resources over a
`twistauth.bus.logout.LogoutWatcher`.

Both find the caller's session with ``resolve_session(request)`` (a
Deferred, or a value, of a `twistauth.sessions.Session` or ``None``), and
answer errors in the JSON envelope: 400 for a bad ``timeout``, 401 without
a session, 429 beyond a waiter cap.  A client that goes away ends its wait
at once (``notifyFinish``'s errback cancels it), and the watcher's
``shutdown`` answers every open wait instead of cutting it.

``GET /logout/wait?timeout=N``
    Answers ``{"logged_out": true, "reason": "..."}`` as soon as the session
    or its user is logged out (or at once if it already is), or
    ``{"logged_out": false}`` after ``N`` seconds (at most the watcher's
    ``max_wait``; the default) so the page polls again;
    ``{"logged_out": false, "reason": "shutdown"}`` when the server stops.

``GET /events``
    A ``text/event-stream``: a ``retry:`` line, a ``: keep-alive`` comment
    every ``heartbeat_interval`` seconds, and then one final event --
    ``event: logout`` (``id: logout``, data as above) or ``event: shutdown``
    -- after which the stream ends.  Durable state is re-checked every
    ``max_wait`` seconds and after bus reconnections.  Resumption: a
    browser reconnecting with ``Last-Event-ID: logout`` has already seen the
    logout; if the session still resolves and is still logged out it gets
    ``204 No Content``, which tells ``EventSource`` to stop reconnecting.
    Any other reconnection re-checks durable state first, so an event
    missed while disconnected is never lost.

No session id is ever logged: the watcher keys waits by a hash of it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Optional

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistauth.bus.errors import InvalidTimeoutError, ShuttingDownError
from twistauth.bus.logout import LOGGED_IN, SHUTDOWN, LogoutWatcher, Watch
from twistauth.errors import (
    AuthRequiredError,
    InternalError,
    MethodNotAllowedError,
    TwistauthError,
)
from twistauth.observe import bind_request_id, request_id_of
from twistauth.web.envelope import render_error

log = Logger()

ResolveSession = Callable[[Any], Any]

_TIMEOUT = re.compile(rb"\A[0-9]{1,7}(\.[0-9]{1,6})?\Z")
_JSON = b"application/json"
_LOGGED_IN = json.dumps(LOGGED_IN).encode()
_SHUTDOWN = json.dumps(SHUTDOWN).encode()


def parse_timeout(request: Any, cap: float) -> float:
    """
    The ``timeout`` query parameter in seconds, capped at ``cap``
    (``cap`` when absent).

    :raises InvalidTimeoutError: it is not a plain non-negative decimal
        number (no sign, exponent, ``nan`` or ``inf``) or is repeated.
    """
    given = (request.args or {}).get(b"timeout")
    if not given:
        return cap
    if len(given) > 1:
        raise InvalidTimeoutError("give timeout once")
    if not _TIMEOUT.match(given[0]):
        raise InvalidTimeoutError()
    return min(float(given[0]), cap)


def _finished(request: Any) -> bool:
    return bool(request.finished or getattr(request, "_disconnected", False))


def write_error(request: Any, error: TwistauthError) -> None:
    """
    Answer ``request`` with ``error`` in the JSON envelope and finish it.
    """
    if _finished(request):
        return
    _finish_json(request, render_error(request, error))


def _finish_json(request: Any, body: bytes) -> None:
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class _Answers:
    """
    Encoded answers, shared: a fan-out to thousands of waiters encodes the
    same few bodies once.
    """

    def __init__(self) -> None:
        self._bodies: Dict[Any, bytes] = {}

    def encode(self, answer: Dict[str, Any]) -> bytes:
        if answer is LOGGED_IN:
            return _LOGGED_IN
        if answer is SHUTDOWN:
            return _SHUTDOWN
        key = answer.get("reason")
        body = self._bodies.get(key)
        if body is None or answer.get("logged_out") is not True:
            body = json.dumps(answer).encode()
            if answer.get("logged_out") is True and len(self._bodies) < 256:
                self._bodies[key] = body
        return body


class _EventsResource(Resource):
    """
    What both endpoints share: GET only, the session, the watcher.
    """

    isLeaf = True

    def __init__(self, *, watcher: LogoutWatcher, resolve_session: ResolveSession) -> None:
        super().__init__()
        self.watcher = watcher
        self.resolve_session = resolve_session
        self.answers = _Answers()

    def render(self, request: Any) -> Any:
        if request.method != b"GET":
            error = MethodNotAllowedError(headers={"Allow": "GET"})
            write_error(request, error)
            return NOT_DONE_YET
        return self.render_GET(request)

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (twisted.web's name)
        raise NotImplementedError


class _Call:
    """
    One request's progress: resolving the session, then watching.  The
    client going away cancels whichever step is pending.
    """

    __slots__ = ("resource", "request", "pending", "watch", "done")

    def __init__(self, resource: _EventsResource, request: Any) -> None:
        self.resource = resource
        self.request = request
        self.pending: Optional[Deferred[Any]] = None
        self.watch: Optional[Watch] = None
        self.done = False

    def start(self) -> None:
        self.request.notifyFinish().addErrback(self.gone)
        d = maybeDeferred(self.resource.resolve_session, self.request)
        self.pending = d
        d.addCallbacks(self._resolved, self._failed)

    def gone(self, _: Any = None) -> None:
        """
        The client went away (or the response finished): stop everything.
        """
        if self.done:
            return
        self.done = True
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.cancel()
        self.stopped()

    def stopped(self) -> None:
        """
        Hook: release what the transport holds (heartbeats).
        """

    def _resolved(self, session: Any) -> None:
        self.pending = None
        if self.done:
            return
        if session is None:
            self.fail(AuthRequiredError("log in first: this wait needs a session"))
            return
        self.resolved(session)

    def resolved(self, session: Any) -> None:
        raise NotImplementedError

    def _failed(self, failure: Failure) -> None:
        self.pending = None
        if self.done or failure.check(CancelledError):
            return
        if isinstance(failure.value, TwistauthError):
            self.fail(failure.value)
            return
        bind_request_id(log, request_id_of(self.request)).failure(
            "resolving a session for a logout wait failed", failure
        )
        self.fail(InternalError())

    def fail(self, error: TwistauthError) -> None:
        self.done = True
        self.stopped()
        write_error(self.request, error)

    def begin_watch(self, session: Any, timeout: Optional[float], continuous: bool) -> bool:
        """
        Start the watch; return ``False`` if it is already over: answered at
        once (already logged out), or refused by a cap or shutdown (then the
        error is answered).
        """
        try:
            watch = self.resource.watcher.watch(
                session, self._answered, timeout, continuous=continuous
            )
        except ShuttingDownError:
            self.answered(SHUTDOWN)
            return False
        except TwistauthError as e:
            self.fail(e)
            return False
        if not self.done:
            self.watch = watch
        return not self.done

    def _answered(self, answer: Dict[str, Any]) -> None:
        self.watch = None
        if self.done:
            return
        self.answered(answer)

    def answered(self, answer: Dict[str, Any]) -> None:
        raise NotImplementedError


class LogoutWaitResource(_EventsResource):
    """
    ``GET /logout/wait?timeout=N``: the long-poll (see the module).

    :param watcher: the `LogoutWatcher`.
    :param resolve_session: finds the caller's session.
    """

    def render_GET(self, request: Any) -> Any:  # noqa: N802
        try:
            timeout = parse_timeout(request, self.watcher.max_wait)
        except InvalidTimeoutError as e:
            write_error(request, e)
            return NOT_DONE_YET
        call = _LongPoll(self, request)
        call.timeout = timeout
        call.start()
        return NOT_DONE_YET


class _LongPoll(_Call):
    __slots__ = ("timeout",)
    timeout: float

    def resolved(self, session: Any) -> None:
        self.begin_watch(session, self.timeout, continuous=False)

    def answered(self, answer: Dict[str, Any]) -> None:
        self.done = True
        request = self.request
        if _finished(request):
            return
        _finish_json(request, self.resource.answers.encode(answer))


class EventStreamResource(_EventsResource):
    """
    ``GET /events``: the Server-Sent Events stream (see the module).

    :param watcher: the `LogoutWatcher`.
    :param resolve_session: finds the caller's session.
    :param clock: the clock for heartbeats.
    :param heartbeat_interval: seconds between ``: keep-alive`` comments
        (keep them under every proxy's idle timeout).
    :param retry_ms: the ``retry:`` a browser waits before reconnecting
        (after a shutdown, or a dropped connection).
    """

    def __init__(
        self,
        *,
        watcher: LogoutWatcher,
        resolve_session: ResolveSession,
        clock: IReactorTime,
        heartbeat_interval: float = 15.0,
        retry_ms: int = 3000,
    ) -> None:
        super().__init__(watcher=watcher, resolve_session=resolve_session)
        if not heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be positive")
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.retry_ms = int(retry_ms)

    def render_GET(self, request: Any) -> Any:  # noqa: N802
        last = request.getHeader(b"last-event-id")
        call = _Stream(self, request)
        call.seen_logout = last == b"logout"
        call.start()
        return NOT_DONE_YET


def sse_event(event: str, data: Dict[str, Any], event_id: Optional[str] = None) -> bytes:
    """
    One Server-Sent Event.
    """
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _Stream(_Call):
    __slots__ = ("seen_logout", "heartbeat", "streaming")
    seen_logout: bool
    heartbeat: Optional[IDelayedCall]
    streaming: bool
    resource: EventStreamResource

    def start(self) -> None:
        self.heartbeat = None
        self.streaming = False
        super().start()

    def resolved(self, session: Any) -> None:
        if not self.seen_logout:
            self._open(session)
            return
        # The browser has seen the logout event: 204 stops its reconnecting.
        d = maybeDeferred(self.resource.watcher.logged_out_reason, session)
        self.pending = d

        def checked(reason: Optional[str]) -> None:
            self.pending = None
            if self.done:
                return
            if reason:
                self.done = True
                self.request.setResponseCode(204)
                self.request.setHeader(b"cache-control", b"no-store")
                self.request.finish()
            else:
                self._open(session)

        d.addCallbacks(checked, self._failed)

    def _open(self, session: Any) -> None:
        if not self.begin_watch(session, None, continuous=True):
            return
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"retry: %d\n\n" % self.resource.retry_ms)
        self.streaming = True
        self._schedule()

    def _schedule(self) -> None:
        resource = self.resource
        self.heartbeat = resource.clock.callLater(resource.heartbeat_interval, self._beat)

    def _beat(self) -> None:
        self.heartbeat = None
        if self.done or _finished(self.request):
            return
        self.request.write(b": keep-alive\n\n")
        self._schedule()

    def stopped(self) -> None:
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None and heartbeat.active():
            heartbeat.cancel()

    def answered(self, answer: Dict[str, Any]) -> None:
        self.done = True
        self.stopped()
        request = self.request
        if _finished(request):
            return
        if not self.streaming:
            # Refused before the stream opened (shutdown): a plain answer.
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.write(b"retry: %d\n\n" % self.resource.retry_ms)
        if answer.get("logged_out") is True:
            request.write(sse_event("logout", answer, "logout"))
        else:
            request.write(sse_event("shutdown", answer))
        request.finish()


class LogoutEndpoints:
    """
    Both endpoints over one watcher, and their shutdown.

    :ivar wait: the `LogoutWaitResource` (mount at ``/logout/wait``).
    :ivar events: the `EventStreamResource` (mount at ``/events``).
    """

    def __init__(
        self,
        *,
        watcher: LogoutWatcher,
        resolve_session: ResolveSession,
        clock: IReactorTime,
        heartbeat_interval: float = 15.0,
        retry_ms: int = 3000,
    ) -> None:
        self.watcher = watcher
        self.wait = LogoutWaitResource(watcher=watcher, resolve_session=resolve_session)
        self.events = EventStreamResource(
            watcher=watcher,
            resolve_session=resolve_session,
            clock=clock,
            heartbeat_interval=heartbeat_interval,
            retry_ms=retry_ms,
        )

    def shutdown(self) -> Deferred[None]:
        """
        Answer every open wait and stream with the final shutdown answer
        (see `LogoutWatcher.shutdown`); new requests get it at once.
        """
        return self.watcher.shutdown()


__all__ = [
    "EventStreamResource",
    "LogoutEndpoints",
    "LogoutWaitResource",
    "parse_timeout",
    "sse_event",
    "write_error",
]
