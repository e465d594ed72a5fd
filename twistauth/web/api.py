"""
The JSON-method endpoint: ``POST /api``.

A plain ``twisted.web`` resource rather than a Klein route: this is the hot
path, and it needs none of Klein's routing.  It reads the body, decodes it
(JSON or msgpack), checks the envelope, dispatches, and encodes the answer in
the format the client accepts.  ``GET`` lists the registered methods;
``HEAD`` answers the headers a ``POST`` would, and runs nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistauth.errors import (
    BodyTooLargeError,
    InternalError,
    MethodNotAllowedError,
    TwistauthError,
)
from twistauth.methods.codec import JSON, Codec, request_codec, response_codec
from twistauth.methods.dispatch import Dispatcher, Outcome, error_envelope
from twistauth.methods.envelope import Call, parse_envelope

log = Logger()

_ALLOW = b"GET, HEAD, POST"


class APIResource(Resource):
    """
    Serves JSON methods through a `Dispatcher`.
    """

    isLeaf = True

    def __init__(
        self, dispatcher: Dispatcher, *, max_body_bytes: int, max_batch_size: int, max_json_depth: int
    ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.max_body_bytes = max_body_bytes
        self.max_batch_size = max_batch_size
        self.max_json_depth = max_json_depth

    def render(self, request: Any) -> Any:
        method = request.method
        if method == b"POST":
            return self._post(request)
        try:
            codec = response_codec(request.getHeader(b"accept"))
        except TwistauthError as e:
            return self._write(request, JSON, error_envelope(e))
        if method == b"GET":
            methods = self.dispatcher.registry.describe()
            return self._write(request, codec, (200, {"result": methods}, None))
        if method == b"HEAD":
            self._headers(request, codec, 200)
            return b""
        error = MethodNotAllowedError(
            f"{method.decode('ascii', 'replace')[:20]} is not allowed; use POST"
        )
        error.headers["Allow"] = _ALLOW.decode()
        return self._write(request, codec, error_envelope(error))

    def _post(self, request: Any) -> Any:
        try:
            codec = response_codec(request.getHeader(b"accept"))
        except TwistauthError as e:
            return self._write(request, JSON, error_envelope(e))
        body = request.content.read()
        try:
            if len(body) > self.max_body_bytes:
                # Reached only when mounted in a host's Site, which has no limit.
                raise BodyTooLargeError(
                    f"the body is {len(body)} bytes; at most {self.max_body_bytes} are accepted"
                )
            decoded = request_codec(request.getHeader(b"content-type")).decode(
                body, self.max_json_depth
            )
            envelope = parse_envelope(decoded, self.max_batch_size)
        except TwistauthError as e:
            return self._write(request, codec, error_envelope(e))
        if type(envelope) is Call:
            outcome = self.dispatcher.run(envelope, request)
        else:
            outcome = self.dispatcher.run_batch(envelope, request)  # type: ignore[arg-type]
        if isinstance(outcome, Deferred):
            request.notifyFinish().addErrback(lambda _: outcome.cancel())
            outcome.addCallbacks(
                lambda done: self._write_late(request, codec, done), self._gone
            )
            return NOT_DONE_YET
        return self._write(request, codec, outcome)

    def _headers(self, request: Any, codec: Codec, status: int) -> None:
        request.setResponseCode(status)
        request.setHeader(b"content-type", codec.content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")

    def _encode(self, codec: Codec, outcome: Outcome) -> Tuple[int, bytes, Optional[Dict[str, str]]]:
        status, envelope, headers = outcome
        try:
            return status, codec.encode(envelope), headers
        except (TypeError, ValueError, OverflowError):
            cid = self.dispatcher.next_id()
            log.failure(
                "a method's answer cannot be encoded as {type} (correlation id {cid})",
                type=codec.content_type.decode(),
                cid=cid,
            )
            error = InternalError(
                {"message": "the answer could not be encoded", "correlation_id": cid}
            )
            return error.status, codec.encode({"error": error.to_json()}), None

    def _write(self, request: Any, codec: Codec, outcome: Outcome) -> bytes:
        status, body, headers = self._encode(codec, outcome)
        self._headers(request, codec, status)
        if headers:
            for name, value in headers.items():
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return body

    def _write_late(self, request: Any, codec: Codec, outcome: Outcome) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.write(self._write(request, codec, outcome))
        request.finish()

    def _gone(self, failure: Failure) -> None:
        """
        The client went away and the call was cancelled: nothing to answer.
        (The dispatcher turns every other failure into an envelope.)
        """
        if not failure.check(CancelledError):
            log.failure("unexpected failure answering a call", failure=failure)
