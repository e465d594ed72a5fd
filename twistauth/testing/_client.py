"""
A JSON-method client for tests: calls a `twistauth.app.TwistauthApp`
through ``treq.testing.StubTreq(app.resource())``, with no sockets.

Everything runs in memory and, for methods that answer at once,
synchronously, so a trial test can use ``successResultOf`` and
``failureResultOf``::

    from twisted.internet.task import Clock
    from twisted.trial.unittest import SynchronousTestCase
    from twistauth.app import make_app
    from twistauth.errors import UnknownMethodError

    class EchoTests(SynchronousTestCase):
        def test_echo(self):
            client = MethodClient(make_app(clock=Clock()))
            self.assertEqual(self.successResultOf(client.call("echo", x=1)), {"x": 1})

        def test_unknown(self):
            client = MethodClient(make_app(clock=Clock()))
            self.failureResultOf(client.call("nope"), UnknownMethodError)

A method that answers later (a Deferred fired by the test, a ``Clock``
advanced) needs no extra step: the client moves the answer across its
in-memory connection as soon as the server finishes the request.
"""

from __future__ import annotations

import json
from http.cookiejar import CookieJar
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

import attr
from treq import content
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, getChildForRequest
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from twistauth.errors import TwistauthError, all_errors
from twistauth.methods.codec import JSON, MSGPACK, Codec
from twistauth.web.transport import CSRF_HEADER

_CODECS: Dict[str, Codec] = {"json": JSON, "msgpack": MSGPACK}

BatchEntry = Union[Tuple[str, Mapping[str, Any]], Mapping[str, Any]]
"""A batch entry: ``(method, parameters)``, or a raw call object (sent as is)."""


@attr.s(frozen=True, auto_attribs=True)
class Response:
    """
    A raw HTTP answer.

    :ivar status: the HTTP status code.
    :ivar headers: the response headers.
    :ivar body: the response body, exactly as sent.
    """

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """
        The first value of the header ``name``, or ``None``.
        """
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def content_type(self) -> Optional[str]:
        """
        The media type of the body, without parameters.
        """
        value = self.header("content-type")
        return value.split(";", 1)[0].strip().lower() if value is not None else None

    def decoded(self) -> Any:
        """
        The body decoded as the JSON or msgpack its ``Content-Type`` names.

        :raises ValueError: the body is neither.
        """
        if self.content_type == MSGPACK.content_type.decode():
            return MSGPACK.decode(self.body, 10_000)
        return json.loads(self.body.decode("utf-8"))


def error_from_json(envelope: Mapping[str, Any]) -> TwistauthError:
    """
    The `TwistauthError` an error envelope's inner object stands for: an
    instance of the subclass with that code, or, for a code this process does
    not know, a `TwistauthError` carrying the code and name it was sent with.

    :param envelope: ``{"code": ..., "name": ..., "value": ...}``.
    """
    code = envelope.get("code")
    value = envelope.get("value")
    known: Dict[int, Type[TwistauthError]] = {cls.code: cls for cls in all_errors()}
    cls = known.get(code) if isinstance(code, int) else None
    if cls is not None:
        return cls(value)
    error = TwistauthError(value)
    # A code from a newer server or an application error this process has
    # not imported: keep what was sent.
    setattr(error, "code", code)  # noqa: B010
    setattr(error, "name", envelope.get("name", TwistauthError.name))  # noqa: B010
    return error


def _outcome(envelope: Any) -> Any:
    """
    A call's answer: its result, or the error it stands for (not raised).
    """
    if isinstance(envelope, dict) and set(envelope) == {"result"}:
        return envelope["result"]
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        return error_from_json(envelope["error"])
    raise ValueError(f"not a result or error envelope: {envelope!r}")


@implementer(IResource)
class _FlushOnFinish:
    """
    Wraps the app's resource so that a request answered later is pushed
    through StubTreq's in-memory connection the moment it finishes.
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, client: MethodClient) -> None:
        self._wrapped = wrapped
        self._client = client

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("mount resources on the app's own resource")

    def render(self, request: Any) -> Any:
        answer = getChildForRequest(self._wrapped, request).render(request)
        if answer is NOT_DONE_YET:
            request.notifyFinish().addBoth(self._client._finished)
        return answer


class MethodClient:
    """
    Calls JSON methods on a twistauth app without sockets.

    :param app: the `twistauth.app.TwistauthApp` (anything with
        ``resource()`` and ``settings.api_path``).
    :param codec: ``"json"`` or ``"msgpack"``: the format of request bodies
        and the one asked for in ``Accept``.
    :param headers: headers sent with every request (e.g. a session header).
    :param secure: speak to the app as over HTTPS (the default, as in
        production: ``request.isSecure()`` is true and ``Secure`` cookies
        are sent back), or as over plain HTTP.

    Cookies the app sets are kept and sent back, as a browser would, and
    the session's CSRF cookie is echoed in the CSRF header, as the app's
    script would (double submit).

    :ivar cookies: the cookies the client holds now.
    """

    def __init__(
        self,
        app: Any,
        *,
        codec: str = "json",
        headers: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
        secure: bool = True,
    ) -> None:
        if codec not in _CODECS:
            raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {codec!r}")
        self.codec = _CODECS[codec]
        self.api_path: str = app.settings.api_path
        self.headers: Dict[str, Union[str, Sequence[str]]] = dict(headers or {})
        self.origin = ("https" if secure else "http") + "://twistauth.test"
        self.cookies: CookieJar = CookieJar()
        # StubTreq sets its request functions per instance: typed as Any.
        self._stub: Any = StubTreq(_FlushOnFinish(app.resource(), self))
        self._flushing = False

    def flush(self) -> None:
        """
        Move pending bytes across every in-memory connection.  Rarely needed:
        the client flushes when a late answer finishes.
        """
        self._stub.flush()

    def _finished(self, result: Any) -> None:
        # Called from inside the server's finish(); the pump does not mind
        # being run from there, but must not run inside itself.
        if not self._flushing:
            self._flushing = True
            try:
                self._stub.flush()
            finally:
                self._flushing = False

    def request(
        self,
        method: str = "POST",
        body: bytes = b"",
        *,
        path: Optional[str] = None,
        headers: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
    ) -> Deferred[Response]:
        """
        Send a raw request and collect the whole answer.

        :param method: the HTTP method.
        :param body: the exact request body.
        :param path: the URL path (and query); the API path by default.
        :param headers: headers for this request, added to (and overriding)
            the client's own.
        :return: a Deferred firing with a `Response`.  Cancelling it drops
            the connection, as a client that goes away does; it then fails
            with ``CancelledError``.
        """
        sent: Dict[str, Any] = {"Accept": self.codec.content_type.decode()}
        if body:
            sent["Content-Type"] = self.codec.content_type.decode()
        for cookie in self.cookies:
            if cookie.name.endswith("_csrf") and cookie.value:
                sent[CSRF_HEADER.decode("ascii")] = cookie.value
        sent.update(self.headers)
        sent.update(headers or {})
        normalized = {
            name: [value] if isinstance(value, str) else list(value)
            for name, value in sent.items()
            if value is not None
        }
        url = self.origin + (path if path is not None else self.api_path)
        d: Deferred[Any] = self._stub.request(
            method, url, data=body if body else None, headers=normalized
        )

        def collect(response: Any) -> Deferred[Response]:
            def done(data: bytes) -> Response:
                self.cookies = response.cookies()
                self._finished(None)  # let the closed connection go
                return Response(response.code, response.headers, data)

            return content(response).addCallback(done)

        d.addCallback(collect)
        cancelling = []

        def cancel(_: Deferred[Response]) -> None:
            # Drop the connection the way a client going away does, and let
            # the server see it at once.
            cancelling.append(True)
            d.cancel()
            self._finished(None)

        answer: Deferred[Response] = Deferred(cancel)

        def forward(result: Any) -> None:
            if not cancelling:
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)

        d.addBoth(forward)
        return answer

    def post(
        self, envelope: Any, *, headers: Optional[Mapping[str, Union[str, Sequence[str]]]] = None
    ) -> Deferred[Response]:
        """
        POST ``envelope``, encoded with the client's codec, to the API path.
        """
        return self.request("POST", self.codec.encode(envelope), headers=headers)

    def call(
        self, name: str, parameters: Optional[Mapping[str, Any]] = None, /, **keywords: Any
    ) -> Deferred[Any]:
        """
        Call the method ``name``.

        Parameters are given as a mapping, as keywords, or both
        (``call("echo", x=1)``; ``call("echo", {"method": 1})`` for names
        that are not Python identifiers).

        :return: a Deferred firing with the method's result, or failing with
            the `TwistauthError` subclass the server answered with (its
            ``value`` is the message or object sent; an HTTP status that does
            not match the error's is a `ValueError`).  Cancelling it drops
            the connection, as a client going away does.
        """
        params = dict(parameters or {})
        params.update(keywords)
        d = self.post({"method": name, "parameters": params})

        def answer(response: Response) -> Any:
            outcome = _outcome(response.decoded())
            if isinstance(outcome, TwistauthError):
                if response.status != outcome.status:
                    raise ValueError(
                        f"HTTP status {response.status} does not fit the error {outcome.name}"
                    )
                raise outcome
            if response.status != 200:
                raise ValueError(f"a result came with HTTP status {response.status}")
            return outcome

        return d.addCallback(answer)

    def batch(self, calls: Mapping[str, BatchEntry]) -> Deferred[Dict[str, Any]]:
        """
        Send one batch.

        :param calls: key → ``(method, parameters)``, or key → a raw call
            object sent as it is (to test malformed entries).
        :return: a Deferred firing with key → result, or key → the
            `TwistauthError` that entry failed with (returned, not raised);
            failing with a `TwistauthError` if the batch as a whole was
            refused (too large, malformed).
        """
        entries: Dict[str, Any] = {}
        for key, entry in calls.items():
            if isinstance(entry, tuple):
                name, params = entry
                entries[key] = {"method": name, "parameters": dict(params)}
            else:
                entries[key] = entry
        d = self.post({"batch": entries})

        def answer(response: Response) -> Dict[str, Any]:
            decoded = response.decoded()
            if isinstance(decoded, dict) and "error" in decoded:
                raise _outcome(decoded)
            if response.status != 200 or not isinstance(decoded, dict):
                raise ValueError(f"unexpected batch answer {response.status}: {decoded!r}")
            return {key: _outcome(envelope) for key, envelope in decoded["batch"].items()}

        return d.addCallback(answer)


__all__ = ["BatchEntry", "MethodClient", "Response", "error_from_json"]
