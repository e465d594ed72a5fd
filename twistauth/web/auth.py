"""
The OpenID Connect routes: login, the redirect (callback), back-channel and
RP-initiated logout, and the login page.

Thin, as every web module: each route parses the request, calls the core
(`twistauth.identity`: the relying parties, the flow store, the token
manager, the replay cache) and renders.

====================================  ===============================================
``GET /login?provider=N&next=/p``     302 to provider ``N`` (a flow stored by
                                      ``state``, its cookie set)
``GET /redirect``, ``/redirect/N``    the callback: flow taken once, login
                                      finished, user and tokens stored, a new
                                      session, 303 to the return path
``POST /logout/backchannel[/N]``      the provider's logout token: 200, or 400
                                      ``{"error": "invalid_request"}``
``POST /logout``                      CSRF-checked: the local session ends, then
                                      302 to the provider's end-session endpoint
``GET /logout/return``                the provider's return after logout (state
                                      checked; a neutral page otherwise)
``GET /login/page``                   one button per provider (``?fragment=1``:
                                      the buttons alone, for an include)
``GET /login/providers``              the same as JSON
====================================  ===============================================

Browser-facing answers (login, callback, logout return) are small HTML pages
with ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer`` and a
Content-Security-Policy that loads nothing from elsewhere (checklist #15).
Nothing here logs a code, a state, a token or a session id (#16).

`SessionAccess` is the shared helper for routes that use the session the
way the JSON endpoint does: load the request's `SessionScope`, then commit
it and tell the client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, quote

import attr
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistauth.bus.logout import publish_logout
from twistauth.errors import (
    BackendUnavailableError,
    BodyTooLargeError,
    InternalError,
    RateLimitedError,
    TwistauthError,
)
from twistauth.identity.client import RelyingParty, Transaction, check_logout_state
from twistauth.identity.errors import (
    AuthorizationDeniedError,
    IdentityError,
    InvalidLogoutTokenError,
    InvalidStateError,
    UnknownProviderError,
)
from twistauth.identity.flows import FlowBinder
from twistauth.identity.jose import jti_key
from twistauth.identity.redirects import safe_return_path
from twistauth.identity.tokens import (
    NoProviderLoginError,
    TokenManager,
    new_local_sid,
    provider_of,
    user_id_for,
)
from twistauth.metrics import IMetrics, NullMetrics
from twistauth.observe import RequestLogger, bind_request_id, request_id_of
from twistauth.sessions._interfaces import ISessionCache
from twistauth.sessions.scope import Commit, SessionScope
from twistauth.web.transport import CSRF_HEADER, HEADER, CSRFError, SessionTransport

log = Logger()


def _log(request: Any) -> RequestLogger:
    """
    This module's logger, stamping ``request``'s id on every event.
    """
    return bind_request_id(log, request_id_of(request))


def _correlation_id(request: Any) -> str:
    """
    The id a 500 answer quotes: the request's id (also in ``X-Request-Id``
    and on the request's log events), else a fresh one.
    """
    return request_id_of(request) or secrets.token_hex(8)


BACKCHANNEL_MAX_BYTES = 16 * 1024
"""The largest back-channel logout body read (checklist #63)."""

LOGOUT_FORM_MAX_BYTES = 4096
"""The largest ``POST /logout`` form read."""

_FORM = b"application/x-www-form-urlencoded"


# -- the session helper -------------------------------------------------------


@attr.s(kw_only=True, frozen=True)
class SessionAccess:
    """
    Load a request's session scope, and commit it, as ``POST /api`` does:
    the token from the configured carrier (cookie or session header), the
    cache that goes with that carrier, and the transport's rules for what
    the client is told afterwards.

    :ivar transport: the `SessionTransport`.
    :ivar sessions: the cache of cookie-carried sessions.
    :ivar header_sessions: the cache of header-carried sessions (the same
        cache except for client-side sessions).
    """

    transport: SessionTransport = attr.ib()
    sessions: ISessionCache = attr.ib()
    header_sessions: ISessionCache = attr.ib()

    def load(self, request: Any) -> Deferred[Tuple[SessionScope, Optional[str]]]:
        """
        The request's scope and carrier (``"cookie"``, ``"header"`` or ``None``).

        :return: Deferred firing with ``(scope, carrier)``, or failing with
            `twistauth.web.transport.CookieTooLargeError` (431) or the
            cache's `BackendUnavailableError` (503).
        """
        try:
            token, carrier = self.transport.token(request)
        except TwistauthError as e:
            failed: Deferred[Tuple[SessionScope, Optional[str]]] = Deferred()
            failed.errback(e)
            return failed
        cache = self.header_sessions if carrier == HEADER else self.sessions
        return SessionScope.for_token(cache, token).addCallback(
            lambda scope: (scope, carrier)
        )

    def commit(self, request: Any, scope: SessionScope, carrier: Optional[str]) -> Deferred[Commit]:
        """
        Commit ``scope`` and set (or clear) the client's token accordingly.

        :return: Deferred firing with the `Commit`.
        """

        def tell(commit: Commit) -> Commit:
            self.transport.apply(request, carrier, commit, scope.token)
            return commit

        return scope.commit().addCallback(tell)

    def caches(self) -> Tuple[ISessionCache, ...]:
        """Every distinct cache a session may live in."""
        if self.header_sessions is self.sessions:
            return (self.sessions,)
        return (self.sessions, self.header_sessions)


# -- rate limiting ------------------------------------------------------------


@attr.s(kw_only=True, eq=False)
class SourceRateLimiter:
    """
    Refused requests counted per client address in a fixed window (one
    process): an address past ``limit`` refusals is answered 429 until the
    window ends.  Accepted requests are not counted, so a provider sending
    many genuine logouts at once (a mass logout) is never turned away.

    :ivar clock: the time source.
    :ivar limit: refusals allowed per window and address.
    :ivar window: the window, in seconds.
    :ivar max_sources: addresses tracked at once (beyond: the table restarts).
    """

    clock: IReactorTime = attr.ib()
    limit: int = attr.ib(default=60)
    window: float = attr.ib(default=60.0)
    max_sources: int = attr.ib(default=10_000)
    _counts: Dict[str, Tuple[float, int]] = attr.ib(init=False, factory=dict)

    def _current(self, source: str) -> Tuple[float, int]:
        now = self.clock.seconds()
        start, count = self._counts.get(source, (now, 0))
        if now - start >= self.window:
            return now, 0
        return start, count

    def check(self, source: str) -> None:
        """
        :raises RateLimitedError: ``source`` is over the limit (with ``Retry-After``).
        """
        start, count = self._current(source)
        if count >= self.limit:
            retry = max(1, int(start + self.window - self.clock.seconds() + 0.999))
            raise RateLimitedError(
                "too many refused logout requests from this address",
                headers={"Retry-After": str(retry)},
            )

    def refused(self, source: str) -> None:
        """Count one refused request from ``source``."""
        start, count = self._current(source)
        if len(self._counts) >= self.max_sources and source not in self._counts:
            self._counts.clear()
        self._counts[source] = (start, count + 1)


# -- pages ------------------------------------------------------------------

WAVE_CSS = """
.twistauth-login{display:flex;flex-direction:column;gap:.75rem;max-width:22rem;
 font-family:system-ui,-apple-system,"Segoe UI",sans-serif}
.twistauth-wave{position:relative;display:block;overflow:hidden;padding:.8rem 1.2rem;
 border-radius:.6rem;color:#fff;font-weight:600;text-align:center;text-decoration:none;
 background:linear-gradient(120deg,#1d4ed8,#0891b2,#1d4ed8);background-size:300% 100%;
 box-shadow:0 2px 6px rgba(0,0,0,.2);animation:twistauth-wave 6s ease-in-out infinite}
.twistauth-wave:hover,.twistauth-wave:focus{background-position:100% 0;outline:3px solid #93c5fd}
@keyframes twistauth-wave{0%,100%{background-position:0 0}50%{background-position:100% 0}}
@media (prefers-reduced-motion:reduce){.twistauth-wave{animation:none}}
body.twistauth-page{margin:3rem auto;max-width:28rem;padding:0 1rem;color:#111;
 font-family:system-ui,-apple-system,"Segoe UI",sans-serif}
""".strip()
"""The default style of the login buttons (ClefStorm's "wave")."""

_PAGE_CSS = (
    "body{margin:3rem auto;max-width:34rem;padding:0 1rem;color:#111;"
    "font-family:system-ui,-apple-system,'Segoe UI',sans-serif}"
    "code{background:#f3f4f6;padding:.1rem .3rem}"
)


def _style_hash(css: str) -> str:
    digest = hashlib.sha256(css.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _security_headers(request: Any, css: str) -> None:
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"x-frame-options", b"DENY")
    policy = (
        f"default-src 'none'; style-src {_style_hash(css)}; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )
    request.setHeader(b"content-security-policy", policy.encode("ascii"))


def html_page(request: Any, status: int, title: str, body_html: str, css: str = _PAGE_CSS) -> bytes:
    """
    A small self-contained HTML page (``body_html`` is already escaped).
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    _security_headers(request, css)
    page = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{css}</style></head>"
        f"<body>{body_html}</body></html>"
    )
    return page.encode("utf-8")


def _error_page(request: Any, error: TwistauthError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    title = "Login failed" if error.status < 500 else "Login unavailable"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(str(error))}</p>"]
    if isinstance(error, AuthorizationDeniedError):
        parts.append(f"<p>The identity provider said: <code>{html.escape(error.error)}</code>")
        if error.description:
            parts.append(f" &mdash; {html.escape(error.description)}")
        parts.append("</p>")
    if error.status >= 500:
        parts.append("<p>Please try again in a moment.</p>")
    else:
        parts.append("<p>Please start again.</p>")
    parts.append(f"<p><small>Error {error.code} ({html.escape(error.name)})</small></p>")
    parts.append('<p><a href="/">Back to the start page</a></p>')
    return html_page(request, error.status, title, "".join(parts))


def _origin_of(url: str) -> str:
    """
    ``scheme://host[:port]`` of a URL (for a CSP source).
    """
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _json(request: Any, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode("utf-8")


def _single_arg(request: Any, name: bytes) -> Optional[str]:
    """
    A query parameter given once, as text; ``None`` when absent.

    :raises InvalidStateError: repeated or not UTF-8 (callback parameters).
    """
    values = (request.args or {}).get(name)
    if not values:
        return None
    if len(values) != 1:
        raise InvalidStateError(f"the {name.decode()!r} parameter is repeated")
    try:
        value: str = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidStateError(f"the {name.decode()!r} parameter is not UTF-8") from None
    return value


def _client_address(request: Any) -> str:
    return getattr(request.getClientAddress(), "host", "") or "-"


def _read_capped(request: Any, limit: int) -> bytes:
    """
    The request body, at most ``limit`` bytes.

    :raises BodyTooLargeError: it is larger (by its Content-Length, or as read).
    """
    length = request.getHeader(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise BodyTooLargeError(f"the body is over {limit} bytes")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLargeError(f"the body is over {limit} bytes")
    return body


def _is_form(request: Any) -> bool:
    content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0]
    return content_type.strip().lower() == _FORM


def _parse_form(body: bytes) -> Dict[str, List[str]]:
    """
    A urlencoded form.

    :raises ValueError: not ASCII or malformed.
    """
    return parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
                    max_num_fields=64)


def _unverified_issuer(token: str) -> Optional[str]:
    """
    The ``iss`` claim of a compact JWT, unverified: used only to choose
    which provider validates it (validation is complete either way).
    """
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 16 * 1024:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):
        return None
    issuer = payload.get("iss") if isinstance(payload, dict) else None
    return issuer if isinstance(issuer, str) else None


@attr.s(frozen=True, kw_only=True)
class LoginPage:
    """
    How ``GET /login/page`` looks.

    :ivar title: the page title.
    :ivar css: the buttons' style sheet (class ``twistauth-wave``, and
        ``twistauth-wave--NAME`` per provider, inside ``twistauth-login``).
    :ivar labels: button labels by provider name (default: the name, capitalised).
    """

    title: str = attr.ib(default="Sign in")
    css: str = attr.ib(default=WAVE_CSS)
    labels: Mapping[str, str] = attr.ib(factory=dict)

    def label(self, name: str) -> str:
        return self.labels.get(name) or name.replace("-", " ").replace("_", " ").title()


# -- the routes ---------------------------------------------------------------


@attr.s(kw_only=True, eq=False)
class OIDCRoutes:
    """
    The OpenID Connect routes' state and handlers; `mount` puts them on a
    Klein app.

    :ivar parties: the `RelyingParty` of each provider, by name (in order).
    :ivar login_flows: binds login flows to browsers.
    :ivar logout_flows: binds RP-initiated logout states to browsers.
    :ivar tokens: the `TokenManager`.
    :ivar jti: the logout-token replay cache (`twistauth.identity.jti.IJtiStore`).
    :ivar access: the `SessionAccess`.
    :ivar clock: the time source.
    :ivar bus: returns the app's bus, or ``None`` while it has none.
    :ivar rate_limiter: the back-channel per-address limit on refusals.
    :ivar page: the login page's look.
    :ivar logout_landing: where a browser goes after a verified logout return.
    :ivar cookie_secure: flow cookies are ``Secure`` with the ``__Host-`` prefix.
    :ivar metrics: counts logins (``kind="oidc"``) and back-channel logouts
        by outcome and reason.
    """

    parties: Mapping[str, RelyingParty] = attr.ib()
    login_flows: FlowBinder = attr.ib()
    logout_flows: FlowBinder = attr.ib()
    tokens: TokenManager = attr.ib()
    jti: Any = attr.ib()
    access: SessionAccess = attr.ib()
    clock: IReactorTime = attr.ib()
    bus: Callable[[], Any] = attr.ib(default=lambda: None)
    rate_limiter: Optional[SourceRateLimiter] = attr.ib(default=None)
    page: LoginPage = attr.ib(factory=LoginPage)
    logout_landing: str = attr.ib(default="/")
    cookie_secure: bool = attr.ib(default=True)
    metrics: IMetrics = attr.ib(factory=NullMetrics)
    counts: Dict[str, int] = attr.ib(
        init=False,
        factory=lambda: dict.fromkeys(
            ("logins_started", "logins_finished", "logins_failed", "backchannel_ok",
             "backchannel_refused", "logouts", "frontchannel"), 0
        ),
    )

    # -- helpers ------------------------------------------------------------

    def _party(self, name: Optional[str]) -> RelyingParty:
        if name is None:
            if len(self.parties) == 1:
                return next(iter(self.parties.values()))
            raise UnknownProviderError("say which identity provider: ?provider=NAME")
        party = self.parties.get(name)
        if party is None:
            raise UnknownProviderError()
        return party

    def _set_flow_cookie(self, request: Any, name: bytes, value: bytes, max_age: int) -> None:
        request.addCookie(
            name,
            value,
            path=b"/",
            max_age=str(max_age).encode("ascii"),
            expires=b"Thu, 01 Jan 1970 00:00:00 GMT" if max_age == 0 else None,
            secure=self.cookie_secure,
            httpOnly=True,
            sameSite="lax",
        )

    def _publish(self, **keys: Any) -> None:
        bus = self.bus()
        if bus is None:
            return
        try:
            d = publish_logout(bus, **keys)
        except Exception as e:
            log.warn("twistauth: could not notify logout waiters: {error}", error=str(e))
            return
        d.addErrback(
            lambda f: log.warn(
                "twistauth: could not notify logout waiters: {error}", error=f.getErrorMessage()
            )
        )

    # -- GET /login ---------------------------------------------------------

    def login(self, request: Any) -> Any:
        if request.method == b"HEAD":
            return html_page(request, 200, "Sign in", "")
        return ensureDeferred(self._login(request)).addErrback(self._browser_error, request)

    async def _login(self, request: Any) -> bytes:
        party = self._party(_single_arg(request, b"provider"))
        start = await party.start(_single_arg(request, b"next") or "/")
        transaction = start.transaction
        ttl = party.config.login_ttl
        secret = await self.login_flows.begin(
            transaction.state, {"kind": "login", "transaction": transaction.to_dict()}, ttl
        )
        self._set_flow_cookie(
            request, self.login_flows.cookie_name(transaction.state), secret.encode("ascii"),
            int(ttl),
        )
        self.counts["logins_started"] += 1
        body = html_page(
            request, 302, "Redirecting",
            "<p>Continue to the <a href=\"" + html.escape(start.url, quote=True)
            + "\">identity provider</a>.</p>",
        )
        request.setHeader(b"location", start.url.encode("ascii"))
        return body

    def _browser_error(self, failure: Any, request: Any) -> Any:
        if failure.check(CancelledError):
            return failure
        if failure.check(TwistauthError):
            error = failure.value
        else:
            cid = _correlation_id(request)
            _log(request).failure(
                "twistauth: an OpenID Connect route failed (correlation id {cid})", failure, cid=cid
            )
            error = InternalError(f"something went wrong; try again (correlation id {cid})")
        self.counts["logins_failed"] += 1
        return _error_page(request, error)

    def _callback_error(self, failure: Any, request: Any) -> Any:
        if not failure.check(CancelledError):
            reason = failure.value.name if failure.check(TwistauthError) else "internal_error"
            self.metrics.login("failure", reason, "oidc")
            _log(request).info(
                "twistauth: login with an identity provider failed: {reason}",
                event="login",
                outcome="failure",
                reason=reason,
                kind="oidc",
            )
        return self._browser_error(failure, request)

    # -- GET /redirect ------------------------------------------------------

    def callback(self, request: Any, name: Optional[str] = None) -> Any:
        if request.method == b"HEAD":
            # Never consume a login for a HEAD (link checkers, prefetch).
            return html_page(request, 200, "Login", "")
        return ensureDeferred(self._callback(request, name)).addErrback(
            self._callback_error, request
        )

    async def _callback(self, request: Any, name: Optional[str]) -> bytes:
        state = _single_arg(request, b"state")
        if not state:
            raise InvalidStateError("the login callback has no state; start again")
        cookie_name = self.login_flows.cookie_name(state)
        cookie = request.getCookie(cookie_name)
        if cookie is not None:
            self._set_flow_cookie(request, cookie_name, b"", 0)
        record = await self.login_flows.finish(
            state, cookie.decode("ascii", "replace") if cookie else None
        )
        if record.get("kind") != "login" or not isinstance(record.get("transaction"), dict):
            raise InvalidStateError()
        transaction = Transaction.from_dict(record["transaction"])
        party = self.parties.get(transaction.provider)
        if party is None:
            raise InvalidStateError("this login's identity provider is no longer configured")
        if name is not None and name != transaction.provider:
            # Each provider its own redirect URI (checklist #11).
            raise InvalidStateError("this login belongs to another identity provider")
        if name is None and party.config.redirect_uri.rstrip("/").endswith(
            "/redirect/" + transaction.provider
        ):
            raise InvalidStateError("this login belongs to another identity provider")
        result = await party.finish(transaction, request.args or {})
        user = await self.tokens.prepare_user(result)
        if user.disabled:
            from twistauth.accounts.errors import AccountDisabledError

            raise AccountDisabledError()
        scope, carrier = await self.access.load(request)
        sid = result.sid or new_local_sid()
        await scope.log_in(
            user.user_id,
            user.roles,
            now=self.clock.seconds(),
            issuer=result.issuer,
            provider_sid=sid,
        )
        commit = await scope.commit()
        try:
            await self.tokens.record_login(user.user_id, result, sid=sid)
        except BaseException:
            # No session without its tokens (R10): undo it, best effort.
            if scope.session is not None:
                try:
                    await scope.cache.delete(scope.session)
                except Exception:
                    _log(request).warn(
                        "twistauth: could not undo a half-finished login's session"
                    )
            raise
        self.access.transport.apply(request, carrier, commit, scope.token)
        self.counts["logins_finished"] += 1
        self.metrics.login("success", "ok", "oidc")
        _log(request).info(
            "twistauth: {user_id} logged in with {provider}",
            user_id=user.user_id,
            provider=transaction.provider,
            event="login",
            outcome="success",
            kind="oidc",
        )
        target = result.return_to
        body = html_page(
            request, 303, "Logged in",
            "<p>Logged in. <a href=\"" + html.escape(target, quote=True) + "\">Continue</a>.</p>",
        )
        request.setHeader(b"location", target.encode("ascii"))
        return body

    # -- POST /logout/backchannel ---------------------------------------------

    def backchannel(self, request: Any, name: Optional[str] = None) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        return ensureDeferred(self._backchannel(request, name)).addErrback(
            self._backchannel_error, request
        )

    def _backchannel_error(self, failure: Any, request: Any) -> Any:
        if failure.check(CancelledError):
            return failure
        self.counts["backchannel_refused"] += 1
        self.metrics.backchannel_logout(
            "failure", failure.value.name if failure.check(TwistauthError) else "internal_error"
        )
        if self.rate_limiter is not None and not failure.check(RateLimitedError):
            self.rate_limiter.refused(_client_address(request))
        if failure.check(RateLimitedError, BodyTooLargeError):
            error: TwistauthError = failure.value
            for header, value in error.headers.items():
                request.setHeader(header.encode("ascii"), value.encode("ascii"))
            code = "invalid_request" if error.status == 413 else "temporarily_unavailable"
            return _json(request, error.status, {"error": code, "error_description": str(error)})
        if failure.check(TwistauthError):
            description = str(failure.value)
            if failure.check(BackendUnavailableError):
                # Sessions may still be live: an operator must know (checklist #63).
                _log(request).error(
                    "twistauth: back-channel logout NOT carried out: {reason}",
                    reason=description,
                    event="backchannel_logout",
                    outcome="failure",
                )
            elif not failure.check(IdentityError):
                _log(request).warn(
                    "twistauth: back-channel logout refused: {reason}",
                    reason=description,
                    event="backchannel_logout",
                    outcome="failure",
                )
        else:
            _log(request).failure("twistauth: back-channel logout failed", failure)
            description = "the logout could not be carried out"
        return _json(
            request, 400, {"error": "invalid_request", "error_description": description}
        )

    async def _backchannel(self, request: Any, name: Optional[str]) -> bytes:
        if self.rate_limiter is not None:
            self.rate_limiter.check(_client_address(request))
        body = _read_capped(request, BACKCHANNEL_MAX_BYTES)
        if not _is_form(request):
            raise InvalidLogoutTokenError(
                "the body must be application/x-www-form-urlencoded with a logout_token"
            )
        try:
            form = _parse_form(body)
        except ValueError:
            raise InvalidLogoutTokenError("the body is not a urlencoded form") from None
        values = form.get("logout_token", [])
        if len(values) != 1 or not values[0]:
            raise InvalidLogoutTokenError("the form must carry one logout_token")
        token = values[0]
        if name is not None:
            party = self._party(name)
        elif len(self.parties) == 1:
            party = next(iter(self.parties.values()))
        else:
            issuer = _unverified_issuer(token)
            matches = [p for p in self.parties.values() if p.config.issuer == issuer]
            if not matches:
                raise InvalidLogoutTokenError("the logout token's issuer is not configured here")
            party = matches[0]
        request_ = await party.validate_logout_token(token, jti_seen=self.jti.seen)
        try:
            ended = await self._end_backchannel(party, request_)
        except BaseException:
            await self._forget_jti(party, token)
            raise
        self.counts["backchannel_ok"] += 1
        self.metrics.backchannel_logout("success")
        _log(request).info(
            "twistauth: back-channel logout from {provider}: {ended} login(s) ended",
            provider=party.name,
            ended=ended,
            event="backchannel_logout",
            outcome="success",
        )
        request.setResponseCode(200)
        return b""

    async def _forget_jti(self, party: RelyingParty, token: str) -> None:
        """
        The logout could not be carried out: let the provider send it again.
        """
        parts = token.split(".")
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            jti = claims["jti"]
            await self.jti.forget(jti_key(party.config.issuer, jti))
        except Exception:
            log.warn("twistauth: could not forget a failed logout's token id")

    async def _end_backchannel(self, party: RelyingParty, request: Any) -> int:
        """
        End what a valid logout token names; durable first, then the bus.

        :return: how many logins (provider sessions) were ended.
        """
        issuer = request.issuer
        caches = self.access.caches()
        if request.sid is not None:
            for cache in caches:
                await cache.delete_provider_session(issuer, request.sid)
            self._publish(reason="backchannel", provider_session=(issuer, request.sid))
            return 1
        user_id = user_id_for(party.name, request.subject)
        user = await self.tokens.users.get(user_id)
        if user is None:
            return 0
        logins, older = self.tokens.logins(user, party.name)
        # Only sessions that began before the token was issued (checklist #61).
        cutoff = request.issued_at + party.config.leeway
        ended = [sid for sid, at in logins if at <= cutoff]
        for sid in ended:
            for cache in caches:
                await cache.delete_provider_session(issuer, sid)
        everything = older is not None and older <= cutoff
        if everything:
            for cache in caches:
                await cache.delete_user(user_id)
            self._publish(reason="backchannel", user_id=user_id)
        for sid in ended:
            self._publish(reason="backchannel", provider_session=(issuer, sid))
        if ended:
            try:
                await self.tokens.forget_logins(user_id, party.name, ended)
            except Exception as e:
                log.warn("twistauth: could not forget ended logins of {user_id}: {error}",
                         user_id=user_id, error=str(e))
        return len(ended) + (1 if everything else 0)

    # -- GET /logout/frontchannel ------------------------------------------

    def frontchannel(self, request: Any) -> Any:
        d = ensureDeferred(self._frontchannel(request))

        def failed(failure: Any) -> bytes:
            # Never an error page in the provider's iframe; the logout is
            # best effort by definition (the provider may not even load it).
            if not failure.check(TwistauthError):
                _log(request).failure("twistauth: front-channel logout failed", failure)
            return html_page(request, 200, "Signed out", "")

        return d.addErrback(failed)

    async def _frontchannel(self, request: Any) -> bytes:
        """
        OpenID Connect Front-Channel Logout 1.0: the provider loads this in
        an iframe with ``iss`` and ``sid``.  Only sessions bound to exactly
        that issuer and provider session end (found server-side: the
        iframe's request often carries no cookies); anything else is
        ignored, so the page cannot be used to log arbitrary users out.
        """
        issuer = _single_arg(request, b"iss")
        sid = _single_arg(request, b"sid")
        party = next(
            (p for p in self.parties.values() if issuer is not None and p.config.issuer == issuer),
            None,
        )
        if party is not None and sid:
            for cache in self.access.caches():
                await cache.delete_provider_session(party.config.issuer, sid)
            self._publish(reason="frontchannel", provider_session=(party.config.issuer, sid))
            self.counts["frontchannel"] += 1
        body = html_page(request, 200, "Signed out", "")
        # The provider frames this page: allow its origin, and only it.
        frame = _origin_of(party.config.issuer) if party is not None else "'none'"
        request.setHeader(
            b"content-security-policy",
            f"default-src 'none'; frame-ancestors {frame}".encode("ascii"),
        )
        request.responseHeaders.removeHeader(b"x-frame-options")
        return body

    # -- POST /logout ---------------------------------------------------------

    def logout(self, request: Any) -> Any:
        return ensureDeferred(self._logout(request)).addErrback(self._logout_error, request)

    def _logout_error(self, failure: Any, request: Any) -> Any:
        if failure.check(CancelledError):
            return failure
        if failure.check(TwistauthError):
            error: TwistauthError = failure.value
            return _json(request, error.status, {"error": error.to_json()})
        cid = _correlation_id(request)
        _log(request).failure("twistauth: logout failed (correlation id {cid})", failure, cid=cid)
        return _json(request, 500, {"error": {"code": 50000, "name": "internal_error",
                                              "value": {"correlation_id": cid}}})

    async def _logout(self, request: Any) -> bytes:
        transport = self.access.transport
        # A form posted from a no-referrer page says "Origin: null"; the
        # CSRF token checked below still has to match.
        transport.check_origin(request, opaque_ok=True)
        body = _read_capped(request, LOGOUT_FORM_MAX_BYTES)
        form: Dict[str, List[str]] = {}
        if body and _is_form(request):
            try:
                form = _parse_form(body)
            except ValueError:
                form = {}
        scope, carrier = await self.access.load(request)
        session = scope.session
        if session is None:
            await self.access.commit(request, scope, carrier)
            return self._landing(request)
        presented = request.getHeader(CSRF_HEADER) or (form.get("csrf_token") or [""])[0].encode(
            "utf-8", "replace"
        )
        expected = session.csrf_token.encode("ascii")
        if not expected or not hmac.compare_digest(presented, expected):
            raise CSRFError(
                "logging out needs the session's CSRF token (the X-Twistauth-CSRF header "
                "or a csrf_token form field)"
            )
        user_id, issuer, session_id = session.user_id, session.issuer, session.id
        # The local session ends first, whatever the provider does (checklist #64).
        await scope.log_out()
        await self.access.commit(request, scope, carrier)
        self.counts["logouts"] += 1
        _log(request).info(
            "twistauth: {user_id} logged out", user_id=user_id, event="logout", kind="oidc"
        )
        self._publish(reason="logout", session_id=session_id)
        party = self._party_of(user_id, issuer)
        if party is None:
            return self._landing(request)
        hint: Optional[str] = None
        try:
            context = await self.tokens.get_user_context(user_id, party.name)  # type: ignore[arg-type]
            hint = context.tokens.id_token
        except NoProviderLoginError:
            hint = None
        try:
            redirect = await party.end_session_url(id_token=hint)
        except IdentityError as e:
            _log(request).warn("twistauth: no end-session redirect for {provider}: {reason}",
                               provider=party.name, reason=str(e))
            redirect = None
        if redirect is None:
            return self._landing(request)
        if party.config.post_logout_redirect_uri:
            secret = await self.logout_flows.begin(
                redirect.state,
                {"kind": "logout", "provider": party.name, "state": redirect.state},
                party.config.login_ttl,
            )
            self._set_flow_cookie(
                request, self.logout_flows.cookie_name(redirect.state), secret.encode("ascii"),
                int(party.config.login_ttl),
            )
        body_html = (
            "<p>Logged out here. Continue to <a href=\""
            + html.escape(redirect.url, quote=True)
            + "\">log out at the identity provider</a>.</p>"
        )
        page = html_page(request, 302, "Logging out", body_html)
        request.setHeader(b"location", redirect.url.encode("ascii"))
        return page

    def _party_of(self, user_id: Optional[str], issuer: Optional[str]) -> Optional[RelyingParty]:
        if not user_id or not issuer:
            return None
        party = self.parties.get(provider_of(user_id))
        if party is not None and party.config.issuer == issuer:
            return party
        for candidate in self.parties.values():
            if candidate.config.issuer == issuer:
                return candidate
        return None

    def _landing(self, request: Any) -> bytes:
        target = self.logout_landing
        page = html_page(
            request, 303, "Logged out",
            "<p>Logged out. <a href=\"" + html.escape(target, quote=True) + "\">Continue</a>.</p>",
        )
        request.setHeader(b"location", target.encode("ascii"))
        return page

    # -- GET /logout/return ---------------------------------------------------

    def logout_return(self, request: Any) -> Any:
        if request.method == b"HEAD":
            return html_page(request, 200, "Logged out", "")
        return ensureDeferred(self._logout_return(request))

    async def _logout_return(self, request: Any) -> bytes:
        try:
            state = _single_arg(request, b"state")
        except InvalidStateError:
            state = None
        verified = False
        if state:
            cookie_name = self.logout_flows.cookie_name(state)
            cookie = request.getCookie(cookie_name)
            if cookie is not None:
                self._set_flow_cookie(request, cookie_name, b"", 0)
            try:
                record = await self.logout_flows.finish(
                    state, cookie.decode("ascii", "replace") if cookie else None
                )
                verified = record.get("kind") == "logout" and check_logout_state(
                    record.get("state"), state
                )
            except (InvalidStateError, BackendUnavailableError):
                verified = False
        if verified:
            return self._landing(request)
        # Missing or foreign state: redirect nowhere (checklist #65).
        return html_page(
            request, 200, "Logged out",
            "<h1>Logged out</h1><p>You are logged out of this site.</p>"
            "<p><a href=\"/\">Back to the start page</a></p>",
        )

    # -- the login page -------------------------------------------------------

    def _buttons(self, request: Any) -> List[Dict[str, str]]:
        path = request.path.decode("ascii", "replace")
        base = path.rsplit("/", 1)[0] or "/login"
        requested = _single_arg(request, b"next")
        next_path = safe_return_path(requested) if requested else None
        buttons = []
        for name in self.parties:
            url = f"{base}?provider={quote(name, safe='')}"
            if next_path and next_path != "/":
                url += "&next=" + quote(next_path, safe="")
            buttons.append({"name": name, "label": self.page.label(name), "login_url": url})
        return buttons

    def login_page(self, request: Any) -> bytes:
        try:
            buttons = self._buttons(request)
        except InvalidStateError as e:
            return _error_page(request, e)
        links = "".join(
            f'<a class="twistauth-wave twistauth-wave--{html.escape(b["name"], quote=True)}" '
            f'href="{html.escape(b["login_url"], quote=True)}">'
            f'Sign in with {html.escape(b["label"])}</a>'
            for b in buttons
        ) or "<p>No identity provider is configured.</p>"
        fragment = f'<div class="twistauth-login">{links}</div>'
        if _single_arg(request, b"fragment") in ("1", "true", "yes"):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-content-type-options", b"nosniff")
            return f"<style>{self.page.css}</style>{fragment}".encode()
        body = f'<h1>{html.escape(self.page.title)}</h1>{fragment}'
        return html_page(request, 200, self.page.title, body, css=self.page.css).replace(
            b"<body>", b'<body class="twistauth-page">', 1
        )

    def providers(self, request: Any) -> bytes:
        try:
            buttons = self._buttons(request)
        except InvalidStateError:
            buttons = self._buttons_plain()
        return _json(request, 200, {"providers": buttons})

    def _buttons_plain(self) -> List[Dict[str, str]]:
        return [
            {"name": n, "label": self.page.label(n), "login_url": f"/login?provider={quote(n)}"}
            for n in self.parties
        ]


def mount(routes: Klein, oidc: OIDCRoutes, *, logout_route: bool = True) -> None:
    """
    Put the OpenID Connect routes on ``routes``.

    :param logout_route: also serve ``POST /logout`` (leave it to another
        feature by passing ``False``).
    """

    @routes.route("/login", methods=["GET"])
    def login(request: Any) -> Any:
        return oidc.login(request)

    @routes.route("/login/page", methods=["GET"])
    def login_page(request: Any) -> Any:
        return oidc.login_page(request)

    @routes.route("/login/providers", methods=["GET"])
    def providers(request: Any) -> Any:
        return oidc.providers(request)

    @routes.route("/redirect", methods=["GET"])
    def redirect(request: Any) -> Any:
        return oidc.callback(request)

    @routes.route("/redirect/<string:name>", methods=["GET"])
    def redirect_named(request: Any, name: str) -> Any:
        return oidc.callback(request, name)

    @routes.route("/logout/backchannel", methods=["POST"])
    def backchannel(request: Any) -> Any:
        return oidc.backchannel(request)

    @routes.route("/logout/backchannel/<string:name>", methods=["POST"])
    def backchannel_named(request: Any, name: str) -> Any:
        return oidc.backchannel(request, name)

    @routes.route("/logout/return", methods=["GET"])
    def logout_return(request: Any) -> Any:
        return oidc.logout_return(request)

    @routes.route("/logout/frontchannel", methods=["GET"])
    def frontchannel(request: Any) -> Any:
        return oidc.frontchannel(request)

    if logout_route:

        @routes.route("/logout", methods=["POST"])
        def logout(request: Any) -> Any:
            return oidc.logout(request)


__all__ = [
    "BACKCHANNEL_MAX_BYTES",
    "LoginPage",
    "OIDCRoutes",
    "SessionAccess",
    "SourceRateLimiter",
    "WAVE_CSS",
    "html_page",
    "mount",
]
