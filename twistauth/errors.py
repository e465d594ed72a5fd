"""
The twistauth error tree.

Every error a client can see is a L{TwistauthError} subclass with a stable
numeric C{code}, a stable C{name}, and the HTTP status that fits it.  Codes
are the HTTP status times ten plus a small number, so a code tells its status
at a glance and new codes never renumber old ones.  The table in
C{docs/protocol.rst} is generated from L{all_errors}; a test keeps the two in
step.

The JSON form is Toto's envelope::

    {"error": {"code": 4001, "name": "invalid_json", "value": "..."}}
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Type


class TwistauthError(Exception):
    """
    Base of every error twistauth answers a client with.

    @cvar code: the stable numeric code.
    @cvar name: the stable short name.
    @cvar status: the HTTP status used when this error answers a whole request.
    @ivar value: what the client is told: a message, or a JSON-serialisable
        object for errors that carry details.
    """

    code: ClassVar[int] = 5000
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
        The error's JSON form, without the outer C{"error"} key.
        """
        return {"code": self.code, "name": self.name, "value": self.value}


class BadRequestError(TwistauthError):
    """The request is malformed."""

    code = 4000
    name = "bad_request"
    status = 400
    default_message = "the request is malformed"


class InvalidJSONError(TwistauthError):
    """The request body is not valid JSON or msgpack."""

    code = 4001
    name = "invalid_json"
    status = 400
    default_message = "the request body is not valid JSON or msgpack"


class InvalidEnvelopeError(TwistauthError):
    """The request body is not a method call or a batch."""

    code = 4002
    name = "invalid_envelope"
    status = 400
    default_message = "the request body is not a method call or a batch"


class TooDeepError(TwistauthError):
    """The request body is nested too deeply."""

    code = 4003
    name = "too_deep"
    status = 400
    default_message = "the request body is nested too deeply"


class InvalidParametersError(TwistauthError):
    """The method's parameters are missing or of the wrong type."""

    code = 4004
    name = "invalid_parameters"
    status = 400
    default_message = "the method's parameters are missing or of the wrong type"


class AuthRequiredError(TwistauthError):
    """This call needs a logged-in session."""

    code = 4010
    name = "auth_required"
    status = 401
    default_message = "this call needs a logged-in session"


class ForbiddenError(TwistauthError):
    """This session may not make this call."""

    code = 4030
    name = "forbidden"
    status = 403
    default_message = "this session may not make this call"


class UnknownMethodError(TwistauthError):
    """No such method."""

    code = 4040
    name = "unknown_method"
    status = 404
    default_message = "no such method"


class NotFoundError(TwistauthError):
    """No such resource."""

    code = 4041
    name = "not_found"
    status = 404
    default_message = "no such resource"


class MethodNotAllowedError(TwistauthError):
    """This HTTP method is not allowed here."""

    code = 4050
    name = "method_not_allowed"
    status = 405
    default_message = "this HTTP method is not allowed here"


class NotAcceptableError(TwistauthError):
    """No acceptable response type; use application/json or msgpack."""

    code = 4060
    name = "not_acceptable"
    status = 406
    default_message = "no acceptable response type; use application/json or msgpack"


class RequestTimeoutError(TwistauthError):
    """The request was not received in time."""

    code = 4080
    name = "request_timeout"
    status = 408
    default_message = "the request was not received in time"


class BodyTooLargeError(TwistauthError):
    """The request body is too large."""

    code = 4130
    name = "body_too_large"
    status = 413
    default_message = "the request body is too large"


class BatchTooLargeError(TwistauthError):
    """The batch has too many calls."""

    code = 4131
    name = "batch_too_large"
    status = 413
    default_message = "the batch has too many calls"


class UnsupportedMediaTypeError(TwistauthError):
    """The request body's content type is not supported."""

    code = 4150
    name = "unsupported_media_type"
    status = 415
    default_message = "the request body's content type is not supported"


class RateLimitedError(TwistauthError):
    """Too many requests; retry later."""

    code = 4290
    name = "rate_limited"
    status = 429
    default_message = "too many requests; retry later"


class BadGatewayError(TwistauthError):
    """An upstream service answered badly."""

    code = 5020
    name = "bad_gateway"
    status = 502
    default_message = "an upstream service answered badly"


class BackendUnavailableError(TwistauthError):
    """A backend service is unavailable; retry later."""

    code = 5030
    name = "backend_unavailable"
    status = 503
    default_message = "a backend service is unavailable; retry later"


class GatewayTimeoutError(TwistauthError):
    """An upstream service did not answer in time."""

    code = 5040
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
