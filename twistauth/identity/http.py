"""
Outbound HTTP to identity providers: one deadline, one size cap, clear errors.

treq's ``timeout=`` stops counting when the response headers arrive and
``treq.content`` reads a body of any size: a provider that sends its headers
and then trickles (or floods) the body would hold a login, and memory, for as
long as it likes.  `ProviderHTTP` bounds the whole exchange instead:

  - a **total deadline** (connect, headers and body) with
    ``Deferred.addTimeout(timeout, clock)``; cancelling the exchange aborts
    the connection;
  - a **byte cap** while the body is read: beyond it the transfer is aborted
    (a ``Content-Length`` over the cap is refused before a byte is read);
  - redirects are not followed (a provider's endpoints answer directly);
  - every request names twistauth and its version in ``User-Agent``.

Failures become the errors of `twistauth.identity.errors`: a deadline passed
is `ProviderTimeoutError` (504); a refused connection, a DNS or TLS failure is
`ProviderUnreachableError` (502); a bad status, an oversized body or a body
that is not JSON is `ProviderBadResponseError` (502).  Messages name the
endpoint ("token endpoint"), never a body, a token or a secret.

The HTTP client is injected: production code passes `make_http_client`'s
treq ``HTTPClient`` (TLS certificates verified with service-identity); tests
pass ``treq.testing.StubTreq(resource)`` or an ``HTTPClient`` over a
``RequestTraversalAgent``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

import attr
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from twistauth._version import __version__
from twistauth.identity.errors import (
    ProviderBadResponseError,
    ProviderTimeoutError,
    ProviderUnreachableError,
)

log = Logger(namespace="twistauth.identity.http")

USER_AGENT = f"twistauth/{__version__} (OpenID Connect relying party; Twisted)"
"""The ``User-Agent`` of every request twistauth makes to a provider."""

DEFAULT_TIMEOUT = 5.0
"""Seconds for a whole exchange: connect, headers and body (checklist #42)."""

DEFAULT_MAX_BYTES = 64 * 1024
"""Largest response body accepted from a provider (checklist #42)."""


def make_http_client(
    reactor: Any, *, connect_timeout: float = 5.0, persistent: bool = True
) -> Any:
    """
    Build the treq client twistauth uses in production: a connection pool
    and TLS certificates verified like a browser does
    (``BrowserLikePolicyForHTTPS``, hostnames checked by service-identity).

    :param reactor: the reactor (the caller's: library code never imports it).
    :param connect_timeout: seconds to establish a TCP connection.
    :param persistent: keep connections open for reuse (up to 60 s idle).
    :return: a ``treq.client.HTTPClient``.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = 4
    pool.cachedConnectionTimeout = 60
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(),
        connectTimeout=connect_timeout,
        pool=pool,
    )
    return HTTPClient(agent)


@attr.s(frozen=True, kw_only=True, repr=False)
class HTTPResponse:
    """
    A provider's answer, read whole (within the cap).

    :ivar status: the HTTP status code.
    :ivar headers: the response headers.
    :ivar body: the body bytes.
    :ivar what: the endpoint's name, for messages ("token endpoint").
    """

    status: int = attr.ib()
    headers: Headers = attr.ib()
    body: bytes = attr.ib()
    what: str = attr.ib()

    def __repr__(self) -> str:
        # Never the body: it may hold tokens.
        return f"<HTTPResponse {self.what} {self.status} {len(self.body)} bytes>"

    def header(self, name: str) -> Optional[str]:
        """
        The last value of a response header, or ``None``.
        """
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def json(self) -> Any:
        """
        The body decoded as JSON (UTF-8; ``NaN`` and ``Infinity`` refused).

        :raises ProviderBadResponseError: the body is not JSON.
        """
        return decode_json(self.body, self.what)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(body: bytes, what: str) -> Any:
    """
    Decode a provider's JSON body.

    :param body: the bytes.
    :param what: the endpoint's name, for the message.
    :raises ProviderBadResponseError: not UTF-8, not JSON, or nested too deeply.
    """
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProviderBadResponseError(f"the {what} did not answer with JSON") from None


class _CappedBody(Protocol):
    """
    Collects a response body up to a byte cap; beyond it, aborts the transfer.
    """

    def __init__(self, max_bytes: int, what: str) -> None:
        self._max_bytes = max_bytes
        self._what = what
        self._chunks: List[bytes] = []
        self._size = 0
        self._done = False
        self.finished: Deferred[bytes] = Deferred(canceller=self._cancel)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._done = True
        self._abort()

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > self._max_bytes:
            self._done = True
            self._chunks = []
            self._abort()
            self.finished.errback(
                ProviderBadResponseError(
                    f"the {self._what} answered with more than {self._max_bytes} bytes"
                )
            )
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done:
            return
        self._done = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(
                ProviderBadResponseError(f"the {self._what}'s answer was cut off")
            )


class _Discard(Protocol):
    """
    Receives a body only to abort it at once.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def read_body(response: IResponse, max_bytes: int, what: str) -> Deferred[bytes]:
    """
    Read a response body, at most ``max_bytes`` of it.

    :param response: the response whose body to read (once).
    :param max_bytes: the cap.
    :param what: the endpoint's name, for the message.
    :return: a Deferred firing with the body, or failing with
        `ProviderBadResponseError` when it is larger than the cap or cut off.
        Cancelling it aborts the transfer.
    """
    if response.length is not UNKNOWN_LENGTH and response.length > max_bytes:
        response.deliverBody(_Discard())
        return defer.fail(
            ProviderBadResponseError(f"the {what} answered with more than {max_bytes} bytes")
        )
    if response.length == 0:
        return defer.succeed(b"")
    protocol = _CappedBody(max_bytes, what)
    response.deliverBody(protocol)
    return protocol.finished


_NETWORK_ERRORS = (
    ConnectError,
    ConnectionClosed,
    ResponseFailed,
    SchemeNotSupported,
)
"""Failures that mean "could not talk to it" (ResponseNeverReceived and
RequestTransmissionFailed are ResponseFailed's siblings, caught by name below)."""


def _is_network_error(failure: Failure) -> bool:
    if failure.check(*_NETWORK_ERRORS):
        return True
    # twisted.web.client's ResponseNeverReceived / RequestTransmissionFailed.
    return type(failure.value).__name__ in ("ResponseNeverReceived", "RequestTransmissionFailed")


@attr.s(kw_only=True)
class ProviderHTTP:
    """
    The outbound HTTP client of one identity provider.

    :ivar client: a treq ``HTTPClient`` (or ``StubTreq`` in tests).
    :ivar clock: the clock the deadline runs on.
    :ivar timeout: seconds for a whole exchange.
    :ivar max_bytes: largest body accepted.
    """

    client: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=DEFAULT_TIMEOUT)
    max_bytes: int = attr.ib(default=DEFAULT_MAX_BYTES)

    def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
    ) -> Deferred[HTTPResponse]:
        """
        Make one request and read its whole answer, within the deadline and
        the cap.  Any status is returned: the caller judges it.

        :param method: ``"GET"`` or ``"POST"``.
        :param url: the absolute URL.
        :param what: the endpoint's name for messages and logs ("token endpoint").
        :param headers: extra request headers.
        :param body: the request body (its ``Content-Type`` in ``headers``).
        :return: a Deferred firing with an `HTTPResponse`, or failing with
            `ProviderTimeoutError`, `ProviderUnreachableError` or
            `ProviderBadResponseError`.
        """
        d = ensureDeferred(self._request(method, url, what, headers, body))

        def timed_out(result: Any, timeout: float) -> Failure:
            # Called only when the deadline cancelled the exchange, whatever
            # the cancellation turned into on its way up (treq wraps it).
            log.warn(
                "{what} ({method} {url}) did not answer within {timeout} s",
                what=what, method=method, url=url, timeout=timeout,
            )
            return Failure(ProviderTimeoutError(f"the {what} did not answer within {timeout:g} s"))

        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=timed_out)
        d.addErrback(self._translate, method, url, what)
        return d

    async def _request(
        self,
        method: str,
        url: str,
        what: str,
        headers: Optional[Mapping[str, str]],
        body: Optional[bytes],
    ) -> HTTPResponse:
        sent: Dict[str, List[str]] = {"User-Agent": [USER_AGENT], "Accept": ["application/json"]}
        for name, value in (headers or {}).items():
            sent[name] = [value]
        kwargs: Dict[str, Any] = {"headers": sent, "allow_redirects": False, "unbuffered": True}
        if body is not None:
            kwargs["data"] = body
        response = await self.client.request(method, url, **kwargs)
        data = await read_body(response, self.max_bytes, what)
        return HTTPResponse(status=response.code, headers=response.headers, body=data, what=what)

    def _translate(self, failure: Failure, method: str, url: str, what: str) -> Failure:
        if failure.check(ProviderTimeoutError, CancelledError):
            return failure
        reasons = getattr(failure.value, "reasons", None) or []
        if any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons):
            # The caller cancelled; treq reports it wrapped.
            return Failure(CancelledError())
        if failure.check(ProviderBadResponseError):
            log.warn("{what} ({method} {url}): {reason}",
                     what=what, method=method, url=url, reason=str(failure.value))
            return failure
        if _is_network_error(failure) or failure.check(ValueError):
            log.warn(
                "{what} ({method} {url}) cannot be reached: {kind}",
                what=what, method=method, url=url, kind=type(failure.value).__name__,
            )
            return Failure(ProviderUnreachableError(f"the {what} cannot be reached"))
        return failure

    def get_json(
        self, url: str, *, what: str, headers: Optional[Mapping[str, str]] = None
    ) -> Deferred[Any]:
        """
        GET a JSON document that must answer 200.

        :param url: the absolute URL.
        :param what: the endpoint's name.
        :param headers: extra request headers.
        :return: a Deferred firing with the decoded JSON value, or failing as
            `request` does, and with `ProviderBadResponseError` for another status.
        """

        def check(response: HTTPResponse) -> Any:
            if response.status != 200:
                log.warn("{what} ({url}) answered HTTP {status}",
                         what=what, url=url, status=response.status)
                raise ProviderBadResponseError(
                    f"the {what} answered HTTP {response.status}, expected 200"
                )
            return response.json()

        return self.request("GET", url, what=what, headers=headers).addCallback(check)
