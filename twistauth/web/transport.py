"""
How a session travels over HTTP: a cookie for browsers, a header for other
clients; and the cross-site rules that come with cookies.

Cookie: ``__Host-<name>`` when secure (``Secure; HttpOnly; Path=/;
SameSite=Lax``, no ``Domain``), with ``Max-Age`` only for "remember me"
sessions.  A second, script-readable cookie carries the session's CSRF token
for the double-submit check.

Header: a request carrying ``X-Twistauth-Session`` (even empty, to say "I use
headers") is in header mode: its responses carry the current token and its
expiry in headers, as Toto's did, and no cookie is set.

The id is accepted only from the configured carriers, never from the URL or
the body.
"""

from __future__ import annotations

import hmac
from typing import Any, FrozenSet, Optional, Tuple

import attr

from twistauth.errors import ForbiddenError, TwistauthError, UnsupportedMediaTypeError
from twistauth.sessions._interfaces import Session
from twistauth.sessions.scope import Commit

SESSION_HEADER = b"x-twistauth-session"
EXPIRES_HEADER = b"x-twistauth-session-expires"
CSRF_HEADER = b"x-twistauth-csrf"
MAX_COOKIE_HEADER = 8192
_BODY_TYPES = (b"application/json", b"application/msgpack", b"application/x-msgpack")


class CSRFError(ForbiddenError):
    """A cookie-carried call without a valid CSRF token, or from a foreign origin."""

    code = 40320
    name = "csrf_failed"
    default_message = "cross-site request refused"


class CookieTooLargeError(TwistauthError):
    """The request's cookies are larger than the server accepts."""

    code = 43120
    name = "cookie_too_large"
    status = 431
    default_message = f"the Cookie header is over {MAX_COOKIE_HEADER} bytes"


COOKIE = "cookie"
HEADER = "header"


@attr.s(frozen=True, kw_only=True)
class SessionTransport:
    """
    The carrier rules of one deployment.

    :ivar cookie_name: the session cookie's base name.
    :ivar secure: set ``Secure`` and the ``__Host-`` prefix (switch off only
        for plain-HTTP development).
    :ivar allowed_origins: origins (``https://app.example``) allowed to make
        credentialed cross-origin calls (CORS) besides the server's own.
    :ivar idle_timeout: seconds; reported in header mode's expiry.
    :ivar absolute_timeout: seconds; also caps a remembered cookie's life.
    :ivar permanent_lifetime: ``Max-Age`` of a "remember me" cookie.
    """

    cookie_name: str = attr.ib()
    secure: bool = attr.ib()
    allowed_origins: FrozenSet[str] = attr.ib()
    idle_timeout: float = attr.ib()
    absolute_timeout: float = attr.ib()
    permanent_lifetime: float = attr.ib()

    @property
    def session_cookie(self) -> bytes:
        prefix = "__Host-" if self.secure else ""
        return (prefix + self.cookie_name).encode("ascii")

    @property
    def csrf_cookie(self) -> bytes:
        prefix = "__Host-" if self.secure else ""
        return (prefix + self.cookie_name + "_csrf").encode("ascii")

    def token(self, request: Any) -> Tuple[Optional[str], Optional[str]]:
        """
        The token a request presents and its carrier (``"header"``,
        ``"cookie"``, or ``None`` when it presents none).

        :raises CookieTooLargeError: the Cookie header is over 8 KiB.
        """
        header = request.requestHeaders.getRawHeaders(SESSION_HEADER)
        if header is not None:
            value = header[0].strip()
            return (value.decode("ascii", "replace") or None), HEADER
        cookies = request.requestHeaders.getRawHeaders(b"cookie")
        if cookies is None:
            return None, None
        if sum(len(c) for c in cookies) > MAX_COOKIE_HEADER:
            raise CookieTooLargeError()
        raw = request.received_cookies.get(self.session_cookie)
        if not raw:
            return None, None
        return raw.decode("ascii", "replace"), COOKIE

    def check_origin(self, request: Any, *, opaque_ok: bool = False) -> None:
        """
        Refuse a state-changing request whose ``Origin`` is neither the
        server's own nor allowed (login CSRF included: this runs whether or
        not a session is presented).

        :param opaque_ok: also accept ``Origin: null``, which browsers send
            for a form posted from a ``Referrer-Policy: no-referrer`` page;
            only for routes that then insist on the session's CSRF token.
        :raises CSRFError: a foreign origin.
        """
        origin = request.getHeader(b"origin")
        if origin is None or self.origin_allowed(request, origin):
            return
        if opaque_ok and origin == b"null":
            return
        raise CSRFError("requests from this origin are not allowed")

    def origin_allowed(self, request: Any, origin: bytes) -> bool:
        text = origin.decode("ascii", "replace")
        if text in self.allowed_origins:
            return True
        host = request.getHeader(b"host")
        if host is None:
            return False
        scheme = "https" if request.isSecure() else "http"
        return text == f"{scheme}://{host.decode('ascii', 'replace')}"

    def check_cookie_call(self, request: Any, session: Session) -> None:
        """
        A call authenticated by cookie must say it is JSON or msgpack (a
        cross-site form cannot) and carry the session's CSRF token in
        ``X-Twistauth-CSRF`` (double submit; constant-time comparison).

        :raises UnsupportedMediaTypeError: any other content type.
        :raises CSRFError: a missing or wrong token.
        """
        content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0]
        if content_type.strip().lower() not in _BODY_TYPES:
            raise UnsupportedMediaTypeError(
                "a call authenticated by cookie must be sent as application/json "
                "or application/msgpack"
            )
        presented = request.getHeader(CSRF_HEADER) or b""
        expected = session.csrf_token.encode("ascii")
        if not expected or not hmac.compare_digest(presented, expected):
            raise CSRFError(
                "a call authenticated by cookie needs the X-Twistauth-CSRF header "
                "(the value of the CSRF cookie)"
            )

    def cors(self, request: Any) -> bool:
        """
        Add CORS headers for an allowed foreign origin (never ``*`` with
        credentials).  :return: whether the origin is allowed.
        """
        origin = request.getHeader(b"origin")
        request.setHeader(b"vary", b"Origin")
        if origin is None or origin.decode("ascii", "replace") not in self.allowed_origins:
            return False
        request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"access-control-allow-credentials", b"true")
        request.setHeader(
            b"access-control-expose-headers",
            b"x-twistauth-session, x-twistauth-session-expires, x-request-id",
        )
        return True

    def preflight(self, request: Any) -> bytes:
        """
        Answer an ``OPTIONS`` preflight.
        """
        if self.cors(request):
            request.setHeader(b"access-control-allow-methods", b"POST, GET, HEAD")
            request.setHeader(
                b"access-control-allow-headers",
                b"content-type, x-twistauth-csrf, x-twistauth-session",
            )
            request.setHeader(b"access-control-max-age", b"600")
        request.setResponseCode(204)
        return b""

    def expires_at(self, session: Session) -> float:
        return min(session.last_seen + self.idle_timeout, session.created + self.absolute_timeout)

    def apply(
        self, request: Any, carrier: Optional[str], commit: Commit, token: Optional[str]
    ) -> None:
        """
        Tell the client what a commit decided.

        :param carrier: how the request presented its token (``None``: it
            presented none, so a new session goes in a cookie).
        :param token: the token the client holds after the commit.
        """
        if carrier == HEADER:
            if commit.clear:
                request.setHeader(SESSION_HEADER, b"")
                request.setHeader(EXPIRES_HEADER, b"0")
            elif token is not None and commit.session is not None:
                request.setHeader(SESSION_HEADER, token.encode("ascii"))
                request.setHeader(EXPIRES_HEADER, b"%d" % self.expires_at(commit.session))
            return
        if commit.clear:
            self._set_cookies(request, b"", b"", max_age=0)
        elif commit.token is not None and commit.session is not None:
            session = commit.session
            max_age = None
            if session.permanent:
                remaining = session.created + self.absolute_timeout - session.last_seen
                max_age = int(max(0, min(self.permanent_lifetime, remaining)))
            self._set_cookies(
                request,
                commit.token.encode("ascii"),
                session.csrf_token.encode("ascii"),
                max_age=max_age,
            )

    def _set_cookies(
        self, request: Any, token: bytes, csrf: bytes, *, max_age: Optional[int]
    ) -> None:
        expires = b"Thu, 01 Jan 1970 00:00:00 GMT" if max_age == 0 else None
        request.addCookie(
            self.session_cookie,
            token,
            path=b"/",
            max_age=None if max_age is None else str(max_age).encode("ascii"),
            expires=expires,
            secure=self.secure,
            httpOnly=True,
            sameSite="lax",
        )
        request.addCookie(
            self.csrf_cookie,
            csrf,
            path=b"/",
            max_age=None if max_age is None else str(max_age).encode("ascii"),
            expires=expires,
            secure=self.secure,
            httpOnly=False,
            sameSite="lax",
        )
