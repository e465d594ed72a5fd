"""
The Klein routes: every page and endpoint except the JSON-method hot path.

Each feature adds its routes to the one `Klein` app built by
`make_routes`.  Errors answer in the JSON error envelope, never with a
traceback.
"""

from __future__ import annotations

import secrets
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from twistauth.errors import InternalError, MethodNotAllowedError, NotFoundError, TwistauthError
from twistauth.observe import request_id_of
from twistauth.web.envelope import render_error

log = Logger()


def make_routes() -> Klein:
    """
    The Klein app with the error handling every route shares.
    """
    app = Klein()

    @app.handle_errors(NotFound)
    def not_found(request: Any, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")[:200]
        return render_error(request, NotFoundError(f"nothing is served at {path!r}"))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(request: Any, failure: Failure) -> bytes:
        error = MethodNotAllowedError()
        allowed = getattr(failure.value, "valid_methods", None)
        if allowed:
            error.headers["Allow"] = ", ".join(allowed)
        return render_error(request, error)

    @app.handle_errors(TwistauthError)
    def twistauth_error(request: Any, failure: Failure) -> bytes:
        error: TwistauthError = failure.value  # type: ignore[assignment]
        return render_error(request, error)

    @app.handle_errors(RequestRedirect)
    def redirect(request: Any, failure: Failure) -> bytes:
        # werkzeug's "add the trailing slash" redirect: a path, never a host.
        target = failure.value.new_url  # type: ignore[union-attr]
        path = target.split("://", 1)[-1].partition("/")[2]
        request.setResponseCode(308)
        request.setHeader(b"location", ("/" + path).encode("utf-8"))
        return b""

    @app.handle_errors(Exception)
    def unexpected(request: Any, failure: Failure) -> bytes:
        # The request id, when it has one, is the correlation id.
        request_id = request_id_of(request)
        cid = request_id or secrets.token_hex(8)
        log.failure(
            "route {path} failed (correlation id {cid})",
            failure,
            path=request.path,
            cid=cid,
            request_id=request_id,
        )
        return render_error(
            request,
            InternalError({"message": "internal error", "correlation_id": cid}),
        )

    return app
