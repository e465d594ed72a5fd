"""
The HTTP server: a `Site` that defends itself.

Twisted reads any request body whole (into memory, then a temporary file)
and stops its idle timeout while a request is handled.  This site adds:

  - a body limit checked when the headers arrive (``Content-Length``) and
    while chunked bodies stream in: 413 in the error envelope, then the
    connection is closed without reading the rest;
  - a deadline for receiving each request's headers and body (slowloris):
    408, then close;
  - a cap on open connections per client address;
  - no form parsing of POST bodies (``parsePOSTFormSubmission=False``): it
    costs ~44 µs a request and twistauth parses the one form it takes itself;
  - with a `twistauth.metrics.Metrics`, every answered request counted by
    route, method and status (``http_requests_total``), from `Site.log`,
    which Twisted calls once per finished request: no Deferred, no event;
  - a request id (``X-Request-Id``) on the answers it writes itself before
    a request is complete (413, 408); the root resource gives every other
    request its id;
  - no ``Server`` header (Twisted's names its version, which OWASP advises
    against disclosing), and a ``Date`` header formatted once a second
    rather than once a request (~2 µs of the ~80 a JSON call costs).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Set

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource as _resource
from twisted.web.http import HTTPChannel, datetimeToString, unquote
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from twistauth.errors import BodyTooLargeError, RequestTimeoutError, TwistauthError
from twistauth.observe import REQUEST_ID_HEADER, RequestIds, request_id_of

log = Logger()

_REASONS = {408: b"Request Timeout", 413: b"Content Too Large"}


class GuardedRequest(Request):
    """
    A request that refuses bodies over its route's limit and requests that
    take too long to arrive.
    """

    _limit: int = 0
    _received: int = 0
    _rejected: bool = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # The deadline runs from the request's first byte, which came before
        # its request line was complete (and this object was made); the
        # channel keeps it (a plain request made outside one has none).
        if isinstance(channel, GuardedChannel):
            channel.request_arriving(self)

    def gotLength(self, length: Optional[int]) -> None:
        site: TwistauthSite = self.channel.site  # type: ignore[attr-defined]
        self._limit = site.body_limit(getattr(self.channel, "_path", b""))
        if length is not None and length > self._limit:
            self._reject(
                BodyTooLargeError(
                    f"the body is {length} bytes; at most {self._limit} are accepted here"
                )
            )
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._reject(
                BodyTooLargeError(f"the body is over {self._limit} bytes, the most accepted here")
            )
            return
        self.content.write(data)  # type: ignore[union-attr]

    def process(self) -> None:
        """
        Find the resource and render it: Twisted's ``Request.process``, but
        with no ``Server`` header and the site's once-a-second ``Date``.
        """
        site: TwistauthSite = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        self.setHeader(b"date", site.http_date())
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            found = site.getResourceFor(self)
            if _resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(Failure())

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._arrived()
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def _arrived(self) -> None:
        channel = self.channel
        if isinstance(channel, GuardedChannel):
            channel.request_arrived(self)

    def too_slow(self) -> None:
        """
        The request's deadline passed before it arrived whole: answer 408.
        """
        self._reject(RequestTimeoutError("the request's headers and body did not arrive in time"))

    def _reject(self, error: TwistauthError) -> None:
        """
        Answer before the request is complete, then close the connection:
        the rest of the body is never read.
        """
        if self._rejected:
            return
        self._rejected = True
        self._arrived()
        # Refused at header time: no "100 Continue" may follow the answer.
        self.requestHeaders.removeHeader(b"expect")
        _refuse(self.channel, error)


def _refuse(channel: Any, error: TwistauthError) -> None:
    """
    Answer ``error`` on ``channel`` before a request is complete, then close
    the connection.
    """
    body = json.dumps({"error": error.to_json()}).encode()
    transport: Any = channel.transport
    if transport is None:
        return
    ids: Optional[RequestIds] = getattr(channel.site, "request_ids", None)
    request_id = b""
    if ids is not None:
        request_id = b"%s: %s\r\n" % (REQUEST_ID_HEADER, ids.new().encode("ascii"))
    transport.write(
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%sconnection: close\r\n\r\n%s"
        % (error.status, _REASONS.get(error.status, b"Error"), len(body), request_id, body)
    )
    channel.loseConnection()


class GuardedChannel(HTTPChannel):
    """
    Registers itself with its site while open, counted against its client
    address, so the site can cap connections and close them all on stop.
    """

    _counted_host: Optional[str] = None
    _deadline_at: Optional[float] = None
    _started_at: float = 0.0
    _arriving: Optional[GuardedRequest] = None
    _timer: Optional[IDelayedCall] = None

    # One lazy timer per connection enforces every request's deadline: a
    # request only records when its deadline is (no timer is made or
    # cancelled per request); when the timer fires it refuses a request
    # past its deadline, or waits again for the deadline of the request
    # arriving now, or stops when none is.  The deadline is as exact as
    # with a timer per request.

    def dataReceived(self, data: bytes) -> None:
        if not self.requests and self._deadline_at is None:
            # The first byte of a request: its deadline starts now, even
            # though the request line may trickle in for a while.
            self._started_at = now = self.site.clock.seconds()
            self._expect(now + self.site.request_timeout)
        super().dataReceived(data)

    def request_arriving(self, request: GuardedRequest) -> None:
        """
        ``request``'s line has arrived: its deadline runs from its first
        byte (or from now, when it came behind another request).
        """
        if self._deadline_at is None:
            self._started_at = self.site.clock.seconds()
        self._arriving = request
        self._expect(self._started_at + self.site.request_timeout)

    def request_arrived(self, request: GuardedRequest) -> None:
        """
        ``request`` has arrived whole (or was refused): no deadline now.
        """
        if self._arriving is request:
            self._arriving = None
        self._deadline_at = None

    def _expect(self, deadline: float) -> None:
        self._deadline_at = deadline
        if self._timer is None:
            clock = self.site.clock
            self._timer = clock.callLater(max(0.0, deadline - clock.seconds()), self._check)

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline_at
        if deadline is None:
            return
        remaining = deadline - self.site.clock.seconds()
        if remaining > 0:
            self._timer = self.site.clock.callLater(remaining, self._check)
            return
        self._deadline_at = None
        arriving, self._arriving = self._arriving, None
        if arriving is not None:
            arriving.too_slow()
        else:
            _refuse(self, RequestTimeoutError("the request line did not arrive in time"))

    def connectionMade(self) -> None:
        super().connectionMade()
        self._on_close: List[Deferred[None]] = []
        self.site.channel_opened(self)

    site: TwistauthSite

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._deadline_at = None
        self._arriving = None
        self.site.channel_closed(self)
        super().connectionLost(reason)
        waiting, self._on_close = self._on_close, []
        for d in waiting:
            d.callback(None)

    def closed(self) -> Deferred[None]:
        """
        A Deferred that fires when this connection is closed.
        """
        d: Deferred[None] = Deferred()
        self._on_close.append(d)
        return d


def access_log_line(timestamp: str, request: Any) -> str:
    """
    The access log's line for a request: the combined log format, but the
    query string and the referrer are left out, because they can carry
    authorization codes, state and tokens (which are never logged); the
    request id follows as ``req=ID``.
    """
    path = request.uri.split(b"?", 1)[0].decode("ascii", "replace")
    method = request.method.decode("ascii", "replace")
    protocol = request.clientproto.decode("ascii", "replace")
    agent = (request.getHeader(b"user-agent") or b"-").decode("ascii", "replace")[:200]
    address = getattr(request.getClientAddress(), "host", "-")
    request_id = request_id_of(request)
    return (
        f'"{address}" - - {timestamp} "{method} {path} {protocol}" '
        f'{request.code} {request.sentLength or "-"} "-" "{agent}"'
        + (f" req={request_id}" if request_id else "")
    ).replace("\n", " ")


class HTTPDate:
    """
    The ``Date`` header's value (RFC 9110 IMF-fixdate), formatted once per
    second of ``clock``.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._clock.seconds())
        if second != self._second:
            self._value = datetimeToString(second)
            self._second = second
        return self._value


class TwistauthSite(Site):
    """
    The twistauth `Site`.

    :ivar clock: the clock deadlines are kept on.
    :ivar request_timeout: seconds a request's headers and body may take.
    """

    requestFactory = GuardedRequest
    protocol = GuardedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        clock: IReactorTime,
        max_body_bytes: int,
        request_timeout: float,
        idle_timeout: float,
        max_connections_per_ip: int,
        body_limits: Optional[Dict[bytes, int]] = None,
        access_log: Optional[str] = None,
        metrics: Any = None,
        route_names: Optional[Mapping[bytes, str]] = None,
        route_name: Optional[Callable[[Any], str]] = None,
        request_ids: Optional[RequestIds] = None,
    ) -> None:
        """
        :param access_log: a file to write access log lines to, ``"-"`` for
            the server's own log, or ``None`` for no access log.
        :param metrics: counts every answered request
            (`twistauth.metrics.IMetrics.request_finished`), or ``None``.
        :param route_names: the route label of exactly matched paths
            (``{b"/api": "api"}``).
        :param route_name: the route label of any other request (called
            only for those, after they are answered); 404s are
            ``"not_found"``, and ``"other"`` without it.
        :param request_ids: gives ids to the answers written before a
            request is complete.
        """
        super().__init__(
            resource,
            timeout=idle_timeout,
            parsePOSTFormSubmission=False,
            reactor=clock,
            logFormatter=access_log_line,
            logPath=access_log if access_log not in (None, "-") else None,
        )
        self._access_log = access_log
        self.clock = clock
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.max_connections_per_ip = max_connections_per_ip
        self._body_limits = dict(body_limits or {})
        self._open: Dict[str, int] = {}
        self._channels: Set[GuardedChannel] = set()
        self.metrics = metrics
        self._route_names: Dict[bytes, str] = dict(route_names or {})
        self._route_name = route_name
        self.request_ids = request_ids
        self.http_date = HTTPDate(clock)

    def log(self, request: Any) -> None:
        metrics = self.metrics
        if metrics is not None:
            code = request.code
            route = self._route_names.get(request.path)
            if route is None:
                if code == 404:
                    route = "not_found"
                elif self._route_name is not None:
                    route = self._route_name(request)
                else:
                    route = "other"
            metrics.request_finished(route, request.method, code)
        if self._access_log is not None:
            super().log(request)

    def body_limit(self, raw_path: bytes) -> int:
        """
        The largest body accepted for a request line's path.
        """
        if self._body_limits:
            path = raw_path.split(b"?", 1)[0]
            return self._body_limits.get(path, self.max_body_bytes)
        return self.max_body_bytes

    def set_body_limit(self, path: bytes, limit: int) -> None:
        """
        Give one path its own (usually smaller) body limit.
        """
        self._body_limits[path] = limit

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[GuardedChannel]:  # type: ignore[override]
        host = getattr(addr, "host", None)
        if host is not None:
            count = self._open.get(host, 0)
            if count >= self.max_connections_per_ip:
                log.warn(
                    "refused a connection: {count} already open from one address",
                    count=count,
                )
                return None
            self._open[host] = count + 1
        channel: Optional[GuardedChannel] = super().buildProtocol(addr)
        if channel is not None and host is not None:
            channel._counted_host = host
        return channel

    def channel_opened(self, channel: GuardedChannel) -> None:
        self._channels.add(channel)

    def channel_closed(self, channel: GuardedChannel) -> None:
        self._channels.discard(channel)
        host = channel._counted_host
        if host is None:
            return
        channel._counted_host = None
        count = self._open.get(host, 0) - 1
        if count > 0:
            self._open[host] = count
        else:
            self._open.pop(host, None)

    def channels(self) -> Set[GuardedChannel]:
        """
        The open connections.
        """
        return set(self._channels)

    def open_connections(self) -> int:
        """
        How many connections are counted against client addresses.
        """
        return sum(self._open.values())


SiteFactory = Callable[[IResource], TwistauthSite]
