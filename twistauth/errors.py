"""
The twistauth error tree.

Every error a client can see is a `TwistauthError` subclass with a stable
numeric ``code``, a stable ``name``, and the HTTP status that fits it.  A code
is the HTTP status times 100 plus a number, so it tells its status at a
glance, and new codes never renumber old ones.  Numbers by area: 0-19 the
protocol and server, 20-39 sessions and transport, 40-59 accounts, 60-69 the
bus and waiters, 70-89 OpenID Connect, and 90-99 are left to applications.  Areas define their errors in their own
modules, as subclasses of `TwistauthError`; `all_errors` finds them all.  The table in
``docs/protocol.rst`` is generated from `all_errors`; a test keeps the two in
step.

The JSON form is Toto's envelope::

    {"error": {"code": 40001, "name": "invalid_json", "value": "..."}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Type


class TwistauthError(Exception):
    """
    Base of every error twistauth answers a client with.

    :cvar code: the stable numeric code.
    :cvar name: the stable short name.
    :cvar status: the HTTP status used when this error answers a whole request.
    :ivar value: what the client is told: a message, or a JSON-serialisable
        object for errors that carry details.
    """

    code: ClassVar[int] = 50000
    name: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, value: Any = None, *, headers: Optional[Dict[str, str]] = None):
        if value is None:
            value = self.default_message
        super().__init__(value)
        self.value = value
        self.headers: Dict[str, str] = dict(headers or {})

    def to_json(self) -> Dict[str, Any]:
        """
        The error's JSON form, without the outer ``"error"`` key.
        """
        return {"code": self.code, "name": self.name, "value": self.value}


class BadRequestError(TwistauthError):
    """The request is malformed."""

    code = 40000
    name = "bad_request"
    status = 400
    default_message = "the request is malformed"


class InvalidJSONError(TwistauthError):
    """The request body is not valid JSON or msgpack."""

    code = 40001
    name = "invalid_json"
    status = 400
    default_message = "the request body is not valid JSON or msgpack"


class InvalidEnvelopeError(TwistauthError):
    """The request body is not a method call or a batch."""

    code = 40002
    name = "invalid_envelope"
    status = 400
    default_message = "the request body is not a method call or a batch"


class TooDeepError(TwistauthError):
    """The request body is nested too deeply."""

    code = 40003
    name = "too_deep"
    status = 400
    default_message = "the request body is nested too deeply"


class InvalidParametersError(TwistauthError):
    """The method's parameters are missing or of the wrong type."""

    code = 40004
    name = "invalid_parameters"
    status = 400
    default_message = "the method's parameters are missing or of the wrong type"


class AuthRequiredError(TwistauthError):
    """This call needs a logged-in session."""

    code = 40100
    name = "auth_required"
    status = 401
    default_message = "this call needs a logged-in session"


class ForbiddenError(TwistauthError):
    """This session may not make this call."""

    code = 40300
    name = "forbidden"
    status = 403
    default_message = "this session may not make this call"


class UnknownMethodError(TwistauthError):
    """No such method."""

    code = 40400
    name = "unknown_method"
    status = 404
    default_message = "no such method"


class NotFoundError(TwistauthError):
    """No such resource."""

    code = 40401
    name = "not_found"
    status = 404
    default_message = "no such resource"


class MethodNotAllowedError(TwistauthError):
    """This HTTP method is not allowed here."""

    code = 40500
    name = "method_not_allowed"
    status = 405
    default_message = "this HTTP method is not allowed here"


class NotAcceptableError(TwistauthError):
    """No acceptable response type; use application/json or msgpack."""

    code = 40600
    name = "not_acceptable"
    status = 406
    default_message = "no acceptable response type; use application/json or msgpack"


class RequestTimeoutError(TwistauthError):
    """The request was not received in time."""

    code = 40800
    name = "request_timeout"
    status = 408
    default_message = "the request was not received in time"


class BodyTooLargeError(TwistauthError):
    """The request body is too large."""

    code = 41300
    name = "body_too_large"
    status = 413
    default_message = "the request body is too large"


class BatchTooLargeError(TwistauthError):
    """The batch has too many calls."""

    code = 41301
    name = "batch_too_large"
    status = 413
    default_message = "the batch has too many calls"


class UnsupportedMediaTypeError(TwistauthError):
    """The request body's content type is not supported."""

    code = 41500
    name = "unsupported_media_type"
    status = 415
    default_message = "the request body's content type is not supported"


class RateLimitedError(TwistauthError):
    """Too many requests; retry later."""

    code = 42900
    name = "rate_limited"
    status = 429
    default_message = "too many requests; retry later"


class BadGatewayError(TwistauthError):
    """An upstream service answered badly."""

    code = 50200
    name = "bad_gateway"
    status = 502
    default_message = "an upstream service answered badly"


class BackendUnavailableError(TwistauthError):
    """A backend service is unavailable; retry later."""

    code = 50300
    name = "backend_unavailable"
    status = 503
    default_message = "a backend service is unavailable; retry later"


class GatewayTimeoutError(TwistauthError):
    """An upstream service did not answer in time."""

    code = 50400
    name = "gateway_timeout"
    status = 504
    default_message = "an upstream service did not answer in time"


InternalError = TwistauthError


def all_errors() -> List[Type[TwistauthError]]:
    """
    Every error class, ordered by code: the source of the documented table.
    """
    found = {TwistauthError}
    pending = [TwistauthError]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                pending.append(sub)
    return sorted(found, key=lambda cls: cls.code)
