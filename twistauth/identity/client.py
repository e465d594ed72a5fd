"""
The relying party: start a login, finish it, refresh tokens, log out.

`RelyingParty` is the OpenID Connect client of one provider, shaped like
wxc_sdk's ``user_context`` without its stores: `RelyingParty.start` returns
the authorization URL and a `Transaction` for the caller to persist (keyed
by its ``state``, bound to the browser, with a TTL);
`RelyingParty.finish` takes that transaction back with the callback's query
and returns a `LoginResult` only when every check passed (checklist #35):
nothing is fetched from UserInfo, and nothing is returned to be stored,
before the ID token is valid.  `RelyingParty.refresh` exchanges a refresh
token and tells a dead grant (`RefreshRejectedError`: end the session) from
a passing failure (502/503/504: keep it, retry later).

The caller owns persistence: the transaction store (take-once by state),
the token store, the session, and the back-channel ``jti`` replay cache.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote, urlencode

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.identity._urls import add_query
from twistauth.identity.config import HMAC_ALGS, ProviderConfig
from twistauth.identity.discovery import MetadataSource, ProviderMetadata
from twistauth.identity.errors import (
    AuthorizationDeniedError,
    IdentityError,
    InvalidCallbackError,
    InvalidStateError,
    InvalidTokenError,
    IssuerMismatchError,
    LoginExpiredError,
    LoginFailedError,
    LoginRejectedError,
    ProviderBadResponseError,
    RefreshRejectedError,
)
from twistauth.identity.http import HTTPResponse, ProviderHTTP
from twistauth.identity.jose import (
    LOGOUT_TYPES,
    JtiSeen,
    JWTRules,
    LogoutRequest,
    validate_id_token,
    validate_logout_token,
)
from twistauth.identity.jwks import JsonWebKey, JWKSCache
from twistauth.identity.redirects import safe_return_path

log = Logger(namespace="twistauth.identity.client")

MAX_CODE_LENGTH = 4096
MAX_TOKEN_LENGTH = 16 * 1024
FATAL_REFRESH_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})
# RFC 6749 §4.1.2.1: error and error_description are %x20-21 / %x23-5B / %x5D-7E.
_ERROR_TEXT = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_IMPLICIT_PARAMS = ("access_token", "id_token", "token_type", "expires_in")


def random_token() -> str:
    """
    32 bytes from the CSPRNG as base64url: 43 characters, 256 bits.  Used for
    ``state``, ``nonce`` and the PKCE ``code_verifier`` (checklist #1).
    """
    return secrets.token_urlsafe(32)


def pkce_challenge(verifier: str) -> str:
    """
    The S256 code challenge: base64url(SHA-256(verifier)) without padding
    (RFC 7636 §4.2; checklist #2).
    """
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _clean_error_text(value: Optional[str], limit: int) -> Optional[str]:
    if value is None:
        return None
    return _ERROR_TEXT.sub("", value)[:limit] or None


@attr.s(frozen=True, kw_only=True, repr=False)
class Transaction:
    """
    One login in progress, for the caller to keep server-side (keyed by
    ``state``, bound to the browser by a cookie, deleted on first use,
    expiring with ``login_ttl``).

    :ivar provider: the provider's configured name.
    :ivar state: the OAuth ``state``.
    :ivar nonce: the ID token nonce.
    :ivar code_verifier: the PKCE verifier.
    :ivar issuer: the issuer the login was sent to (RFC 9207 check).
    :ivar redirect_uri: the redirect URI sent (sent again with the code).
    :ivar return_to: where to send the browser afterwards (already safe).
    :ivar created: clock seconds when the login started.
    :ivar max_age: the ``max_age`` sent, or ``None``.
    """

    provider: str = attr.ib()
    state: str = attr.ib()
    nonce: str = attr.ib()
    code_verifier: str = attr.ib()
    issuer: str = attr.ib()
    redirect_uri: str = attr.ib()
    return_to: str = attr.ib()
    created: float = attr.ib()
    max_age: Optional[int] = attr.ib(default=None)

    def __repr__(self) -> str:
        return f"<Transaction provider={self.provider!r} created={self.created}>"

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-serialisable form, for the transaction store."""
        return attr.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transaction:
        """
        Rebuild a transaction from `to_dict`'s form.

        :raises InvalidStateError: the stored form is not a transaction.
        """
        try:
            transaction = cls(**dict(data))
        except TypeError:
            raise InvalidStateError("the stored login is malformed") from None
        strings = (transaction.provider, transaction.state, transaction.nonce,
                   transaction.code_verifier, transaction.issuer, transaction.redirect_uri,
                   transaction.return_to)
        if not all(isinstance(s, str) for s in strings) or isinstance(transaction.created, bool) \
                or not isinstance(transaction.created, (int, float)):
            raise InvalidStateError("the stored login is malformed")
        return transaction


@attr.s(frozen=True, kw_only=True)
class LoginStart:
    """
    What `RelyingParty.start` returns.

    :ivar url: the authorization URL to redirect the browser to (never log it:
        it carries the state and nonce).
    :ivar transaction: what to persist until the callback.
    """

    url: str = attr.ib(repr=False)
    transaction: Transaction = attr.ib()


@attr.s(frozen=True, kw_only=True, repr=False)
class TokenSet:
    """
    A user's tokens at one provider.  Encrypt at rest; never send to the browser.

    :ivar access_token: the access token.
    :ivar token_type: ``Bearer``.
    :ivar refresh_token: or ``None``.
    :ivar id_token: the latest ID token (for ``id_token_hint``), or ``None``.
    :ivar expires_at: clock seconds when the access token expires, or ``None``.
    :ivar scope: the granted scope, or ``None``.
    """

    access_token: str = attr.ib()
    token_type: str = attr.ib(default="Bearer")
    refresh_token: Optional[str] = attr.ib(default=None)
    id_token: Optional[str] = attr.ib(default=None)
    expires_at: Optional[float] = attr.ib(default=None)
    scope: Optional[str] = attr.ib(default=None)

    def __repr__(self) -> str:
        return (f"<TokenSet expires_at={self.expires_at} refresh="
                f"{'yes' if self.refresh_token else 'no'}>")

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-serialisable form, for the token store."""
        return attr.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        """Rebuild from `to_dict`'s form.  :raises TypeError: malformed."""
        return cls(**dict(data))

    def expires_within(self, now: float, margin: float) -> bool:
        """Whether the access token expires within ``margin`` seconds of ``now``."""
        return self.expires_at is not None and self.expires_at - now <= margin


@attr.s(frozen=True, kw_only=True, repr=False)
class LoginResult:
    """
    A finished, fully validated login.

    :ivar provider: the provider's name.
    :ivar issuer: its issuer.
    :ivar subject: the user's ``sub`` at that issuer.
    :ivar sid: the provider session id (``sid`` claim), for back-channel logout.
    :ivar claims: the ID token's claims.
    :ivar userinfo: the UserInfo claims (same ``sub``), or ``None``.
    :ivar tokens: the tokens to store.
    :ivar return_to: where to send the browser (303).
    """

    provider: str = attr.ib()
    issuer: str = attr.ib()
    subject: str = attr.ib()
    sid: Optional[str] = attr.ib()
    claims: Dict[str, Any] = attr.ib()
    userinfo: Optional[Dict[str, Any]] = attr.ib()
    tokens: TokenSet = attr.ib()
    return_to: str = attr.ib()

    def __repr__(self) -> str:
        return f"<LoginResult provider={self.provider!r}>"


@attr.s(frozen=True, kw_only=True, repr=False)
class RefreshResult:
    """
    A successful refresh.

    :ivar tokens: the new tokens (the old refresh token kept when the
        provider sent none).
    :ivar claims: the refreshed ID token's claims, or the original ones when
        no ID token came back.
    """

    tokens: TokenSet = attr.ib()
    claims: Dict[str, Any] = attr.ib()

    def __repr__(self) -> str:
        return "<RefreshResult>"


@attr.s(frozen=True, kw_only=True)
class LogoutRedirect:
    """
    Where to send the browser for RP-initiated logout.

    :ivar url: the provider's end-session URL with its parameters.
    :ivar state: the fresh ``state`` to keep and check on return.
    """

    url: str = attr.ib(repr=False)
    state: str = attr.ib(repr=False)


QueryValue = Union[str, bytes, Sequence[Union[str, bytes]]]


def _single_params(query: Mapping[Any, QueryValue]) -> Dict[str, str]:
    """
    Normalise a callback query (``request.args`` or a ``dict``): one value
    per parameter (RFC 6749 §3.1: no repeats), text.
    """
    params: Dict[str, str] = {}
    for raw_name, raw_value in query.items():
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else raw_name
        values: List[Union[str, bytes]]
        if isinstance(raw_value, (str, bytes)):
            values = [raw_value]
        else:
            values = list(raw_value)
        if len(values) != 1:
            raise InvalidCallbackError(f"the callback repeats the {name!r} parameter")
        value = values[0]
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidCallbackError(
                    f"the callback's {name!r} parameter is not UTF-8"
                ) from None
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidCallbackError("the callback's parameters are malformed")
        params[name] = value
    return params


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@attr.s(kw_only=True)
class RelyingParty:
    """
    The OpenID Connect client of one provider.

    :ivar config: the provider's configuration.
    :ivar http_client: a treq ``HTTPClient`` (``StubTreq`` in tests).
    :ivar clock: the clock for deadlines, caches and token times.
    :ivar return_origins: origins a ``next`` URL may point to besides this one.
    """

    config: ProviderConfig = attr.ib()
    http_client: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    return_origins: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    http: ProviderHTTP = attr.ib(init=False)
    metadata: MetadataSource = attr.ib(init=False)
    _jwks: Optional[JWKSCache] = attr.ib(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.http = ProviderHTTP(
            client=self.http_client,
            clock=self.clock,
            timeout=self.config.http_timeout,
            max_bytes=self.config.max_response_bytes,
        )
        self.metadata = MetadataSource(config=self.config, http=self.http, clock=self.clock)

    @property
    def name(self) -> str:
        """The provider's configured name."""
        return self.config.name

    def _log_failure(self, failure: Failure, what: str) -> Failure:
        """
        One log line per failed operation: the error's name and message
        (which never quote tokens, codes or secrets).
        """
        if failure.check(IdentityError):
            error = failure.value
            log.warn("{what} at {provider} failed: {name} ({status}): {reason}",
                     what=what, provider=self.config.name, name=error.name,  # type: ignore[union-attr]
                     status=error.status, reason=str(error))  # type: ignore[union-attr]
        return failure

    # -- keys and rules ---------------------------------------------------

    def jwks(self, metadata: ProviderMetadata) -> JWKSCache:
        """The provider's key cache (created on first use)."""
        if self._jwks is None:
            self._jwks = JWKSCache(
                jwks_uri=metadata.jwks_uri,
                http=self.http,
                clock=self.clock,
                max_age=self.config.jwks_max_age,
                cooldown=self.config.jwks_cooldown,
            )
        return self._jwks

    def rules(self, metadata: ProviderMetadata, *, logout: bool = False) -> JWTRules:
        """
        The token rules: the configured algorithms, narrowed to those the
        provider announces (when it announces any), never ``none``.
        """
        algorithms = set(self.config.allowed_algs)
        announced = set(metadata.id_token_signing_alg_values_supported)
        if announced:
            algorithms &= announced
        secret = self.config.client_secret
        return JWTRules(
            issuer=self.config.issuer,
            audience=self.config.client_id,
            trusted_audiences=frozenset(self.config.trusted_audiences),
            algorithms=frozenset(algorithms),
            leeway=self.config.leeway,
            hmac_secret=secret.encode("utf-8") if secret and algorithms & HMAC_ALGS else None,
            types=LOGOUT_TYPES if logout and self.config.require_logout_typ else None,
        )

    def _key_lookup(self, metadata: ProviderMetadata) -> Any:
        cache = self.jwks(metadata)

        def keys(kid: Optional[str], alg: str) -> Deferred[List[JsonWebKey]]:
            return cache.keys_for(kid, alg)

        return keys

    # -- login ------------------------------------------------------------

    def start(
        self,
        return_to: Any = "/",
        *,
        prompt: Optional[str] = None,
        login_hint: Optional[str] = None,
    ) -> Deferred[LoginStart]:
        """
        Begin a login (authorization code flow with PKCE S256 and a nonce).

        :param return_to: the requested ``next``; unsafe values become ``"/"``.
        :param prompt: an OpenID ``prompt`` value, e.g. ``"login"``.
        :param login_hint: an OpenID ``login_hint``.
        :return: a Deferred firing with a `LoginStart`, or failing with
            `ProviderDisabledError` / `ProviderUnavailableError` (503).
        """
        return ensureDeferred(self._start(return_to, prompt, login_hint))

    async def _start(
        self, return_to: Any, prompt: Optional[str], login_hint: Optional[str]
    ) -> LoginStart:
        metadata = await self.metadata.get()
        transaction = Transaction(
            provider=self.config.name,
            state=random_token(),
            nonce=random_token(),
            code_verifier=random_token(),
            issuer=self.config.issuer,
            redirect_uri=self.config.redirect_uri,
            return_to=safe_return_path(return_to, allowed_origins=self.return_origins),
            created=self.clock.seconds(),
            max_age=self.config.max_age,
        )
        params: List[Tuple[str, str]] = [
            ("response_type", "code"),
            ("client_id", self.config.client_id),
            ("redirect_uri", transaction.redirect_uri),
            ("scope", " ".join(self.config.scopes)),
            ("state", transaction.state),
            ("nonce", transaction.nonce),
            ("code_challenge", pkce_challenge(transaction.code_verifier)),
            ("code_challenge_method", "S256"),
        ]
        if transaction.max_age is not None:
            params.append(("max_age", str(transaction.max_age)))
        if prompt is not None:
            params.append(("prompt", prompt))
        if login_hint is not None:
            params.append(("login_hint", login_hint))
        params.extend(sorted(self.config.extra_params.items()))
        url = add_query(metadata.authorization_endpoint, params)
        return LoginStart(url=url, transaction=transaction)

    def finish(
        self, transaction: Transaction, query: Mapping[Any, QueryValue]
    ) -> Deferred[LoginResult]:
        """
        Finish a login from the provider's callback.

        The caller has taken ``transaction`` from its store (once: a replayed
        callback finds nothing) by the callback's ``state`` and the browser's
        cookie.  Checks, in order: ``state`` equal to the transaction's;
        transaction younger than ``login_ttl``; no implicit/hybrid parameters;
        ``iss`` equal to the transaction's issuer (required when the provider
        announces it); ``error=``; then the code exchange, the token response,
        the ID token, and UserInfo (same ``sub``).

        :param transaction: the login's `Transaction`.
        :param query: the callback's query (``request.args`` or a mapping).
        :return: a Deferred firing with a `LoginResult`, or failing with
            `InvalidStateError`, `LoginExpiredError`, `InvalidCallbackError`,
            `IssuerMismatchError`, `AuthorizationDeniedError`,
            `LoginRejectedError`, `InvalidTokenError` (4xx) or
            `LoginFailedError`, `ProviderTimeoutError`, ... (5xx).
        """
        return ensureDeferred(self._finish(transaction, query)).addErrback(
            self._log_failure, "login"
        )

    async def _finish(
        self, transaction: Transaction, query: Mapping[Any, QueryValue]
    ) -> LoginResult:
        params = _single_params(query)
        state = params.get("state")
        if state is None or not _equal(state, transaction.state):
            raise InvalidStateError()
        if transaction.provider != self.config.name or transaction.issuer != self.config.issuer:
            raise InvalidStateError("this login belongs to another identity provider")
        if self.clock.seconds() - transaction.created > self.config.login_ttl:
            raise LoginExpiredError()
        if any(name in params for name in _IMPLICIT_PARAMS):
            raise InvalidCallbackError("only the authorization code flow is accepted")
        metadata = await self.metadata.get()
        iss = params.get("iss")
        if iss is not None:
            if iss != transaction.issuer:
                raise IssuerMismatchError()
        elif metadata.iss_parameter_supported:
            raise IssuerMismatchError(
                "the authorization response lacks the iss parameter its provider announces"
            )
        if "error" in params:
            raise AuthorizationDeniedError(
                _clean_error_text(params["error"], 64) or "invalid_request",
                _clean_error_text(params.get("error_description"), 300),
            )
        code = params.get("code")
        if not code or len(code) > MAX_CODE_LENGTH:
            raise InvalidCallbackError("the callback has no authorization code")

        try:
            response = await self._token_request(metadata, [
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", transaction.redirect_uri),
                ("code_verifier", transaction.code_verifier),
            ])
        except ProviderBadResponseError as e:
            raise LoginFailedError(str(e)) from None
        body = self._token_body(response, refresh=False)
        tokens = self._token_set(body, previous=None)
        assert tokens.id_token is not None
        claims = await validate_id_token(
            tokens.id_token,
            rules=self.rules(metadata),
            keys=self._key_lookup(metadata),
            now=self.clock.seconds(),
            nonce=transaction.nonce,
            access_token=tokens.access_token,
            max_age=transaction.max_age,
            max_iat_age=self.config.id_token_max_age,
        )
        userinfo = None
        if self.config.use_userinfo and metadata.userinfo_endpoint:
            userinfo = await self._userinfo(metadata, tokens.access_token, claims["sub"])
        log.info("login at {provider} finished", provider=self.config.name)
        return LoginResult(
            provider=self.config.name,
            issuer=self.config.issuer,
            subject=claims["sub"],
            sid=claims.get("sid"),
            claims=claims,
            userinfo=userinfo,
            tokens=tokens,
            return_to=transaction.return_to,
        )

    # -- the token endpoint -----------------------------------------------

    async def _token_request(
        self, metadata: ProviderMetadata, form: List[Tuple[str, str]]
    ) -> HTTPResponse:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        secret = self.config.client_secret or ""
        if self.config.token_endpoint_auth_method == "client_secret_basic":  # noqa: S105
            # RFC 6749 §2.3.1: both form-urlencoded before the Basic encoding.
            pair = f"{quote(self.config.client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode(
                "ascii"
            )
        else:
            form = form + [("client_id", self.config.client_id), ("client_secret", secret)]
        return await self.http.request(
            "POST",
            metadata.token_endpoint,
            what="token endpoint",
            headers=headers,
            body=urlencode(form).encode("ascii"),
        )

    def _token_body(self, response: HTTPResponse, *, refresh: bool) -> Dict[str, Any]:
        """
        Judge a token endpoint answer (checklist #19, #47).
        """
        if response.status != 200:
            error = None
            if response.status in (400, 401):
                try:
                    body = response.json()
                except ProviderBadResponseError:
                    body = None
                if isinstance(body, dict) and isinstance(body.get("error"), str):
                    error = body["error"]
                elif response.status == 401:
                    error = "invalid_client"
            log.warn("token endpoint of {provider} answered HTTP {status} ({error})",
                     provider=self.config.name, status=response.status,
                     error=_clean_error_text(error, 64) or "no error code")
            if refresh and error in FATAL_REFRESH_ERRORS:
                raise RefreshRejectedError()
            if not refresh and error == "invalid_grant":
                raise LoginRejectedError()
            if refresh:
                raise ProviderBadResponseError(
                    f"the token endpoint answered HTTP {response.status}"
                )
            raise LoginFailedError(f"the token endpoint answered HTTP {response.status}")
        try:
            body = response.json()
        except ProviderBadResponseError:
            if refresh:
                raise
            raise LoginFailedError("the token endpoint did not answer with JSON") from None
        if not isinstance(body, dict):
            raise self._bad_tokens("the token response is not a JSON object", refresh)
        return body

    def _bad_tokens(self, message: str, refresh: bool) -> Exception:
        log.warn(
            "token endpoint of {provider}: {reason}", provider=self.config.name, reason=message
        )
        if refresh:
            return ProviderBadResponseError(message)
        return LoginFailedError(message)

    def _token_set(self, body: Dict[str, Any], *, previous: Optional[TokenSet]) -> TokenSet:
        refresh = previous is not None
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token \
                or len(access_token) > MAX_TOKEN_LENGTH:
            raise self._bad_tokens("the token response has no access_token", refresh)
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise self._bad_tokens("the token response's token_type is not Bearer", refresh)
        id_token = body.get("id_token")
        if id_token is None and not refresh:
            raise self._bad_tokens("the token response has no id_token", refresh)
        if id_token is not None and (not isinstance(id_token, str) or not id_token):
            raise self._bad_tokens("the token response's id_token is not a string", refresh)
        refresh_token = body.get("refresh_token")
        if refresh_token is not None and (
            not isinstance(refresh_token, str) or not refresh_token
            or len(refresh_token) > MAX_TOKEN_LENGTH
        ):
            raise self._bad_tokens("the token response's refresh_token is not a string", refresh)
        expires_in = body.get("expires_in")
        expires_at: Optional[float] = None
        if expires_in is not None:
            if isinstance(expires_in, str) and expires_in.isdigit():
                expires_in = int(expires_in)
            if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
                    or not 0 <= expires_in < 10 ** 9:
                raise self._bad_tokens("the token response's expires_in is not a number",
                                       refresh)
            expires_at = self.clock.seconds() + expires_in
        scope = body.get("scope")
        if scope is not None and not isinstance(scope, str):
            raise self._bad_tokens("the token response's scope is not a string", refresh)
        return TokenSet(
            access_token=access_token,
            token_type="Bearer",  # noqa: S106
            refresh_token=refresh_token or (previous.refresh_token if previous else None),
            id_token=id_token or (previous.id_token if previous else None),
            expires_at=expires_at,
            scope=scope if scope is not None else (previous.scope if previous else None),
        )

    async def _userinfo(
        self, metadata: ProviderMetadata, access_token: str, subject: str
    ) -> Dict[str, Any]:
        assert metadata.userinfo_endpoint is not None
        try:
            response = await self.http.request(
                "GET",
                metadata.userinfo_endpoint,
                what="userinfo endpoint",
                headers={"Authorization": f"Bearer {access_token}"},
            )
        except ProviderBadResponseError as e:
            raise LoginFailedError(str(e)) from None
        if response.status != 200:
            raise LoginFailedError(f"the userinfo endpoint answered HTTP {response.status}")
        content_type = (response.header("Content-Type") or "").lower()
        if content_type.startswith("application/jwt"):
            raise LoginFailedError("signed UserInfo responses are not supported")
        try:
            body = response.json()
        except ProviderBadResponseError:
            raise LoginFailedError("the userinfo endpoint did not answer with JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("sub"), str):
            raise LoginFailedError("the userinfo response has no sub")
        if not _equal(body["sub"], subject):
            log.warn("userinfo of {provider} names another subject: discarded, login failed",
                     provider=self.config.name)
            raise LoginFailedError("the userinfo response is about another user")
        return body

    # -- refresh ----------------------------------------------------------

    def refresh(
        self, tokens: TokenSet, *, claims: Mapping[str, Any]
    ) -> Deferred[RefreshResult]:
        """
        Exchange the refresh token for new tokens.

        :param tokens: the user's current tokens (with a refresh token).
        :param claims: the claims of the ID token of the login: a refreshed ID
            token must have the same ``iss``, ``sub`` and ``aud``.
        :return: a Deferred firing with a `RefreshResult`, or failing with
            `RefreshRejectedError` (the grant is dead, or the new ID token
            names someone else: end the session), or with a transient error
            (`twistauth.identity.errors.TRANSIENT_ERRORS`: keep the session,
            retry later).
        """
        return ensureDeferred(self._refresh(tokens, claims)).addErrback(
            self._log_failure, "refresh"
        )

    async def _refresh(self, tokens: TokenSet, claims: Mapping[str, Any]) -> RefreshResult:
        if not tokens.refresh_token:
            raise RefreshRejectedError("there is no refresh token")
        metadata = await self.metadata.get()
        response = await self._token_request(
            metadata,
            [("grant_type", "refresh_token"), ("refresh_token", tokens.refresh_token)],
        )
        body = self._token_body(response, refresh=True)
        new_tokens = self._token_set(body, previous=tokens)
        new_claims = dict(claims)
        if isinstance(body.get("id_token"), str):
            try:
                new_claims = await validate_id_token(
                    body["id_token"],
                    rules=self.rules(metadata),
                    keys=self._key_lookup(metadata),
                    now=self.clock.seconds(),
                    nonce=None,
                    access_token=new_tokens.access_token,
                    max_iat_age=self.config.id_token_max_age,
                    original=claims,
                )
            except InvalidTokenError as e:
                log.warn("refreshed ID token of {provider} rejected: {reason}",
                         provider=self.config.name, reason=str(e))
                raise RefreshRejectedError("the refreshed ID token is not valid") from None
        return RefreshResult(tokens=new_tokens, claims=new_claims)

    # -- logout -----------------------------------------------------------

    def end_session_url(
        self, *, id_token: Optional[str] = None, ui_locales: Optional[str] = None
    ) -> Deferred[Optional[LogoutRedirect]]:
        """
        The RP-initiated logout redirect (RP-Initiated Logout 1.0 §2), with
        ``id_token_hint``, ``client_id``, the configured
        ``post_logout_redirect_uri`` and a fresh ``state``.

        :param id_token: the user's latest ID token, as hint.
        :param ui_locales: optional ``ui_locales``.
        :return: a Deferred firing with a `LogoutRedirect`, or ``None`` when
            the provider has no end-session endpoint (log out locally only).
        """
        return ensureDeferred(self._end_session_url(id_token, ui_locales))

    async def _end_session_url(
        self, id_token: Optional[str], ui_locales: Optional[str]
    ) -> Optional[LogoutRedirect]:
        metadata = await self.metadata.get()
        if metadata.end_session_endpoint is None:
            return None
        state = random_token()
        params: List[Tuple[str, str]] = []
        if id_token:
            params.append(("id_token_hint", id_token))
        params.append(("client_id", self.config.client_id))
        if self.config.post_logout_redirect_uri:
            params.append(("post_logout_redirect_uri", self.config.post_logout_redirect_uri))
            params.append(("state", state))
        if ui_locales:
            params.append(("ui_locales", ui_locales))
        return LogoutRedirect(url=add_query(metadata.end_session_endpoint, params), state=state)

    def validate_logout_token(
        self, token: Any, *, jti_seen: JtiSeen
    ) -> Deferred[LogoutRequest]:
        """
        Validate a back-channel logout token from this provider.

        :param token: the ``logout_token`` form field.
        :param jti_seen: the replay cache (see
            `twistauth.identity.jose.validate_logout_token`).
        :return: a Deferred firing with a `LogoutRequest`, or failing with
            `InvalidLogoutTokenError` (400), or the store's error.
        """
        return ensureDeferred(self._validate_logout_token(token, jti_seen)).addErrback(
            self._log_failure, "back-channel logout"
        )

    async def _validate_logout_token(self, token: Any, jti_seen: JtiSeen) -> LogoutRequest:
        metadata = await self.metadata.get()
        return await validate_logout_token(
            token,
            rules=self.rules(metadata, logout=True),
            keys=self._key_lookup(metadata),
            now=self.clock.seconds(),
            jti_seen=jti_seen,
            max_iat_age=self.config.logout_token_max_age,
        )


def check_logout_state(expected: Optional[str], received: Any) -> bool:
    """
    Whether the ``state`` on return from the provider's logout is the one
    sent (constant time).  A missing or foreign state: show a neutral page,
    redirect nowhere (checklist #65).
    """
    if not expected or not isinstance(received, str):
        return False
    return _equal(expected, received)

