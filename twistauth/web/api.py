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

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistauth._fired import PENDING, fired_value, is_deferred
from twistauth.errors import (
    BodyTooLargeError,
    InternalError,
    MethodNotAllowedError,
    TwistauthError,
)
from twistauth.methods.codec import JSON, Codec, request_codec, response_codec
from twistauth.methods.dispatch import Dispatcher, MaybeOutcome, Outcome, error_envelope
from twistauth.methods.envelope import Call, parse_envelope
from twistauth.observe import request_id_of
from twistauth.sessions._interfaces import ISessionCache
from twistauth.sessions.scope import UNCHANGED, Commit, SessionScope
from twistauth.web.signing import INonceStore, sign_response, verify_request
from twistauth.web.transport import COOKIE, HEADER, SessionTransport

log = Logger()

_ALLOW = b"GET, HEAD, POST"


class APIResource(Resource):
    """
    Serves JSON methods through a `Dispatcher`.
    """

    isLeaf = True

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_body_bytes: int,
        max_batch_size: int,
        max_json_depth: int,
        sessions: Optional[ISessionCache] = None,
        header_sessions: Optional[ISessionCache] = None,
        transport: Optional[SessionTransport] = None,
        nonces: Optional[INonceStore] = None,
    ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.header_sessions = header_sessions or sessions
        self.transport = transport if sessions is not None else None
        self.nonces = nonces
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
        if method == b"OPTIONS" and self.transport is not None:
            return self.transport.preflight(request)
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
        transport = self.transport
        if transport is None:
            return self._call(request, codec, None)
        try:
            if request.getHeader(b"origin") is not None:
                transport.check_origin(request)
                transport.cors(request)
            token, carrier = transport.token(request)
        except TwistauthError as e:
            return self._write(request, codec, error_envelope(e))
        cache = self.header_sessions if carrier == HEADER else self.sessions
        if token is None:
            scope = SessionScope(cache)  # type: ignore[arg-type]
            outcome = self._call(request, codec, scope, answer=False)
            if not is_deferred(outcome) and scope.untouched:
                if carrier is not None:
                    transport.apply(request, carrier, UNCHANGED, None)
                return self._write(request, codec, outcome)
            return self._respond(request, codec, self._committed(outcome, request, scope, carrier))
        loading = cache.load(token)  # type: ignore[union-attr]
        session = fired_value(loading)
        if session is PENDING:
            pending = loading.addCallback(SessionScope.loaded, cache, token).addCallback(
                self._call_with_session, request, codec, carrier
            )
            return self._respond(request, codec, pending)
        scope = SessionScope.loaded(session, cache, token)  # type: ignore[arg-type]
        return self._respond(
            request, codec, self._call_with_session(scope, request, codec, carrier)
        )

    def _respond(self, request: Any, codec: Codec, outcome: MaybeOutcome) -> Any:
        """
        Answer with ``outcome`` now if it is there (a body with a
        ``Content-Length``), else when it comes.
        """
        if is_deferred(outcome):
            value = fired_value(outcome)
            if value is PENDING:
                self._answer_later(request, codec, outcome)
                return NOT_DONE_YET
            outcome = value
        return self._write(request, codec, outcome)  # type: ignore[arg-type]

    def _call_with_session(
        self, scope: SessionScope, request: Any, codec: Codec, carrier: Optional[str]
    ) -> MaybeOutcome:
        session = scope.session
        if session is not None and carrier == COOKIE:
            try:
                self.transport.check_cookie_call(request, session)  # type: ignore[union-attr]
            except TwistauthError as e:
                return error_envelope(e)
        if session is None or session.signing_key is None:
            outcome = self._call(request, codec, scope, answer=False)
            return self._committed(outcome, request, scope, carrier)
        key = session.signing_key
        body = request.content.read()

        def verified(nonce: bytes) -> MaybeOutcome:
            request._twistauth_signing = (key, nonce)
            outcome = self._call(request, codec, scope, answer=False, body=body)
            return self._committed(outcome, request, scope, carrier)

        return maybeDeferred(  # type: ignore[call-overload]
            verify_request,
            request,
            body,
            key,
            session.id,
            self.dispatcher.services.clock,
            self.nonces,
        ).addCallback(verified)

    def _committed(
        self, outcome: MaybeOutcome, request: Any, scope: SessionScope, carrier: Optional[str]
    ) -> MaybeOutcome:
        """
        ``outcome`` once the session is committed and the client told what
        the commit decided: at once when nothing waits on I/O.
        """
        if is_deferred(outcome):
            value = fired_value(outcome)
            if value is PENDING:
                return outcome.addCallback(self._commit, request, scope, carrier)
            outcome = value
        return self._commit(outcome, request, scope, carrier)  # type: ignore[arg-type]

    def _commit(
        self, outcome: Outcome, request: Any, scope: SessionScope, carrier: Optional[str]
    ) -> MaybeOutcome:
        try:
            committing = scope.commit()
        except Exception:
            committing = fail()
        commit = fired_value(committing)
        if commit is PENDING:
            return committing.addCallback(self._tell, outcome, request, scope, carrier)
        return self._tell(commit, outcome, request, scope, carrier)

    def _tell(
        self,
        commit: Commit,
        outcome: Outcome,
        request: Any,
        scope: SessionScope,
        carrier: Optional[str],
    ) -> Outcome:
        self.transport.apply(request, carrier, commit, scope.token)  # type: ignore[union-attr]
        return outcome

    def _call(
        self,
        request: Any,
        codec: Codec,
        scope: Optional[SessionScope],
        *,
        answer: bool = True,
        body: Optional[bytes] = None,
    ) -> Any:
        """
        Decode, check and dispatch the body.  With ``answer``, write the
        outcome (or arrange for it to be written); without, return it.
        """
        if body is None:
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
            outcome: Any = error_envelope(e)
        else:
            if type(envelope) is Call:
                outcome = self.dispatcher.run(envelope, request, scope)
            else:
                outcome = self.dispatcher.run_batch(envelope, request, scope)  # type: ignore[arg-type]
        if not answer:
            return outcome
        if is_deferred(outcome):
            self._answer_later(request, codec, outcome)
            return NOT_DONE_YET
        return self._write(request, codec, outcome)

    def _answer_later(self, request: Any, codec: Codec, outcome: Deferred[Outcome]) -> None:
        request.notifyFinish().addErrback(lambda _: outcome.cancel())
        outcome.addErrback(self._backend_failed, request)
        outcome.addCallbacks(
            lambda done: self._write_late(request, codec, done), self._gone, errbackArgs=(request,)
        )

    def _backend_failed(self, failure: Failure, request: Any) -> Outcome:
        """
        A session load or commit failed: a backend outage answers 503 and
        leaves the client's token alone (an outage is not a logout).
        """
        if failure.check(CancelledError):
            return failure  # type: ignore[return-value]
        if isinstance(failure.value, TwistauthError):
            return error_envelope(failure.value)
        cid = self.dispatcher.next_id()
        log.failure(
            "session handling failed (correlation id {cid})",
            failure,
            cid=cid,
            request_id=request_id_of(request),
        )
        return error_envelope(InternalError({"message": "internal error", "correlation_id": cid}))

    def _headers(self, request: Any, codec: Codec, status: int) -> None:
        request.setResponseCode(status)
        request.setHeader(b"content-type", codec.content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")

    def _encode(
        self, codec: Codec, outcome: Outcome, request: Any
    ) -> Tuple[int, bytes, Optional[Dict[str, str]]]:
        status, envelope, headers = outcome
        try:
            return status, codec.encode(envelope), headers
        except Exception:  # TypeError, ValueError, OverflowError, RecursionError, ...
            cid = self.dispatcher.next_id()
            log.failure(
                "a method's answer cannot be encoded as {type} (correlation id {cid})",
                type=codec.content_type.decode(),
                cid=cid,
                request_id=request_id_of(request),
            )
            error = InternalError(
                {"message": "the answer could not be encoded", "correlation_id": cid}
            )
            return error.status, codec.encode({"error": error.to_json()}), None

    def _write(self, request: Any, codec: Codec, outcome: Outcome) -> bytes:
        status, body, headers = self._encode(codec, outcome, request)
        self._headers(request, codec, status)
        if headers:
            for name, value in headers.items():
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
        signing = getattr(request, "_twistauth_signing", None)
        if signing is not None:
            key, nonce = signing
            sign_response(request, key, nonce, status, body, self.dispatcher.services.clock)
        return body

    def _write_late(self, request: Any, codec: Codec, outcome: Outcome) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        try:
            body = self._write(request, codec, outcome)
        except Exception:
            cid = self.dispatcher.next_id()
            log.failure(
                "writing an answer failed (correlation id {cid})",
                cid=cid,
                request_id=request_id_of(request),
            )
            error = InternalError({"message": "internal error", "correlation_id": cid})
            request.responseHeaders.removeHeader(b"x-twistauth-signature")
            body = self._write(request, JSON, error_envelope(error))
        # A length, not a chunked body: one write, as for an answer made at once.
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _gone(self, failure: Failure, request: Any) -> None:
        """
        The client went away and the call was cancelled: nothing to answer.
        (The dispatcher turns every other failure into an envelope.)
        """
        if not failure.check(CancelledError):
            log.failure(
                "unexpected failure answering a call",
                failure=failure,
                request_id=request_id_of(request),
            )
