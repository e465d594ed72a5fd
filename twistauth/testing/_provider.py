"""
A fake OpenID provider for tests: real protocol, real signatures, no network.

`FakeProvider` is an OpenID provider in memory, served as a ``twisted.web``
resource, for unit tests of twistauth and of the services built on it
(trial or pytest).  It issues RS256-signed (or ES256) ID, access, refresh
and logout tokens, serves discovery, JWKS, authorize, token, userinfo and
end-session, checks client authentication, redirect URIs, PKCE S256 and
single-use codes, rotates refresh tokens on request and detects their reuse.
It counts the calls to each endpoint, and it misbehaves on demand, so that
every rejection a relying party must make can be shown.

Typical use, with a `twisted.internet.task.Clock` and no sockets::

    from twisted.internet.task import Clock
    from twistauth.testing._provider import FakeProvider

    clock = Clock()
    provider = FakeProvider(clock=clock)
    rp = provider.relying_party()          # a RelyingParty on a StubTreq
    start = successResultOf(rp.start("/after-login"))
    query = provider.authorize(start.url)  # the user logs in; callback query
    result = successResultOf(rp.finish(start.transaction, query))
    assert result.subject == provider.user_sub

    provider.misbehave("id_token", "bad_signature")
    ...                                    # the next ID token is tampered with
    assert provider.hits["userinfo"] == 0

Faults, by target (`FakeProvider.misbehave`):

  - ``"id_token"`` (ID tokens from the token endpoint) and ``"logout_token"``
    (`FakeProvider.issue_logout_token`): `TOKEN_FAULTS`.
  - an endpoint (``"discovery"``, ``"jwks"``, ``"token"``, ``"userinfo"``,
    ``"end_session"``): `HTTP_FAULTS` (answer late, never, half, huge,
    garbled, 500, drop the connection) and the endpoint's own
    (`ENDPOINT_FAULTS`).
  - ``"authorize"``: ``omit_iss``, ``wrong_iss``, ``access_denied``.

The HTTP faults that answer late run on the provider's clock: advance it,
then ``flush()`` the ``StubTreq``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple
from urllib.parse import parse_qsl

import attr
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twistauth.identity._urls import add_query, query_dict

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"

TOKEN_FAULTS = frozenset({
    # signature and header
    "bad_signature", "alg_none", "alg_none_signed", "hs256_public_key", "kid_absent",
    "unknown_kid", "jwk_header", "jku_header", "crit", "wrong_alg", "untrusted_key",
    # claims
    "wrong_iss", "iss_array", "iss_trailing_slash", "wrong_aud", "extra_aud", "aud_object",
    "missing_aud", "wrong_azp", "missing_iat", "iat_old", "iat_future", "missing_exp",
    "expired", "exp_string", "missing_sub", "sub_number", "sub_too_long", "sub_changed",
    "bad_nonce", "missing_nonce", "bad_at_hash", "missing_auth_time", "old_auth_time",
    "huge",
    # logout tokens
    "no_event", "wrong_event", "event_not_object", "with_nonce", "no_sub_no_sid",
    "missing_jti", "no_exp", "no_typ",
})
"""Faults of issued tokens."""

HTTP_FAULTS = frozenset({
    "slow",        # answer normally after `slow_seconds` on the clock
    "stall",       # never answer
    "stall_body",  # send the headers and half a body, then nothing
    "huge",        # a 200 body of `huge_bytes`
    "garbled",     # a 200 body that is not JSON
    "error_500",   # 500 Internal Server Error
    "reset",       # drop the connection without answering
})
"""Faults of any endpoint's HTTP answer."""

ENDPOINT_FAULTS = {
    "discovery": frozenset({"wrong_issuer", "http_endpoint", "iss_parameter_supported",
                            "no_iss_parameter_supported"}),
    "jwks": frozenset({"weak_key", "unparseable_key", "oct_key", "empty"}),
    "token": frozenset({"invalid_grant", "invalid_client", "token_type_mac",
                        "token_type_lowercase", "missing_id_token",
                        "missing_access_token", "not_object", "no_refresh_token"}),
    "userinfo": frozenset({"sub_mismatch", "jwt_response"}),
    "end_session": frozenset(),
    "authorize": frozenset({"omit_iss", "wrong_iss", "access_denied"}),
}
"""Faults particular to one endpoint."""

_PATHS = {
    "/.well-known/openid-configuration": "discovery",
    "/jwks": "jwks",
    "/authorize": "authorize",
    "/token": "token",
    "/userinfo": "userinfo",
    "/logout": "end_session",
}

_KEY_POOL: Dict[str, List[Any]] = {"RS256": [], "ES256": []}


def _pooled_key(alg: str, index: int) -> Any:
    """
    The ``index``-th private key of a process-wide pool: RSA generation is
    slow, and tests create many providers.
    """
    pool = _KEY_POOL[alg]
    while len(pool) <= index:
        if alg == "RS256":
            pool.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        else:
            pool.append(ec.generate_private_key(ec.SECP256R1()))
    return pool[index]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def _hash_half(value: str) -> str:
    digest = hashlib.sha256(value.encode("ascii")).digest()
    return _b64(digest[:16])


@attr.s(kw_only=True, eq=False)
class SigningKey:
    """
    One of the provider's signing keys.

    :ivar kid: its key id.
    :ivar alg: ``RS256`` or ``ES256``.
    :ivar private_key: the ``cryptography`` private key.
    """

    kid: str = attr.ib()
    alg: str = attr.ib()
    private_key: Any = attr.ib(repr=False)

    def public_jwk(self) -> Dict[str, Any]:
        """The public JWK, as published in the JWKS."""
        algorithm = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        jwk: Dict[str, Any] = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


@attr.s(kw_only=True, eq=False)
class _Code:
    client_id: str = attr.ib()
    redirect_uri: str = attr.ib()
    challenge: str = attr.ib()
    nonce: Optional[str] = attr.ib()
    sub: str = attr.ib()
    sid: str = attr.ib()
    scope: str = attr.ib()
    auth_time: float = attr.ib()
    expires_at: float = attr.ib()
    used: bool = attr.ib(default=False)
    issued: List[str] = attr.ib(factory=list)


@attr.s(kw_only=True, eq=False)
class _Grant:
    """A refresh token's grant: one login's family of refresh tokens."""

    sub: str = attr.ib()
    sid: str = attr.ib()
    scope: str = attr.ib()
    auth_time: float = attr.ib()
    nonce: Optional[str] = attr.ib()
    revoked: bool = attr.ib(default=False)


class FakeProvider:
    """
    An OpenID provider in memory.

    :ivar issuer: its issuer identifier.
    :ivar clock: the clock tokens are dated with and late answers wait on.
    :ivar client_id: the one registered client.
    :ivar client_secret: its secret.
    :ivar token_endpoint_auth_method: how the client must authenticate.
    :ivar redirect_uris: the client's registered redirect URIs.
    :ivar post_logout_redirect_uris: its registered post-logout URIs.
    :ivar user_sub: who logs in at the authorization endpoint (auto-approved).
    :ivar user_claims: that user's UserInfo claims.
    :ivar iss_parameter: add ``iss`` to authorization responses and announce it.
    :ivar rotate_refresh_tokens: issue a new refresh token on each refresh
        (and treat reuse of an old one as theft: revoke the grant).
    :ivar refresh_id_token: include an ID token in refresh responses.
    :ivar access_token_lifetime: seconds.
    :ivar id_token_lifetime: seconds.
    :ivar slow_seconds: how late ``slow`` answers.
    :ivar huge_bytes: how large ``huge`` answers are.
    :ivar hits: calls per endpoint name.
    :ivar reused_refresh_tokens: how often a rotated-out refresh token came back.
    :ivar end_session_requests: the query of each end-session call.
    :ivar ended_sessions: provider ``sid``\\s ended by end-session.
    :ivar token_requests: the form of each token request (secrets included:
        for assertions only).
    :ivar userinfo_requests: how each userinfo call carried its token
        (``"header"``, ``"query"``, ``"body"`` or ``None``).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        issuer: str = "https://op.example",
        client_id: str = "twistauth-client",
        client_secret: str = "fake-client-secret-0123456789abcdef",  # noqa: S107
        token_endpoint_auth_method: str = "client_secret_basic",  # noqa: S107
        redirect_uris: Iterable[str] = ("https://rp.example/redirect",),
        post_logout_redirect_uris: Iterable[str] = ("https://rp.example/logged-out",),
        user_sub: str = "alice",
        user_claims: Optional[Dict[str, Any]] = None,
        algorithm: str = "RS256",
        iss_parameter: bool = True,
        rotate_refresh_tokens: bool = False,
        refresh_id_token: bool = True,
        access_token_lifetime: int = 3600,
        id_token_lifetime: int = 600,
    ) -> None:
        if algorithm not in _KEY_POOL:
            raise ValueError("algorithm must be RS256 or ES256")
        self.issuer = issuer
        self.clock = clock
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_endpoint_auth_method = token_endpoint_auth_method
        self.redirect_uris = tuple(redirect_uris)
        self.post_logout_redirect_uris = tuple(post_logout_redirect_uris)
        self.user_sub = user_sub
        self.user_claims: Dict[str, Any] = (
            dict(user_claims) if user_claims is not None
            else {"name": "Alice Example", "email": "alice@example.com", "email_verified": True}
        )
        self.algorithm = algorithm
        self.iss_parameter = iss_parameter
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.refresh_id_token = refresh_id_token
        self.access_token_lifetime = access_token_lifetime
        self.id_token_lifetime = id_token_lifetime
        self.slow_seconds = 30.0
        self.huge_bytes = 1024 * 1024
        self.hits: Counter[str] = Counter()
        self.reused_refresh_tokens = 0
        self.end_session_requests: List[Dict[str, str]] = []
        self.ended_sessions: List[str] = []
        self.token_requests: List[Dict[str, str]] = []
        self.userinfo_requests: List[Optional[str]] = []
        self._faults: Dict[str, Set[str]] = {}
        self._once: Dict[str, Set[str]] = {}
        self._key_index = 0
        self.keys: List[SigningKey] = [self._new_key(algorithm)]
        self._codes: Dict[str, _Code] = {}
        self._access_tokens: Dict[str, Tuple[str, float]] = {}
        self._refresh_tokens: Dict[str, Tuple[_Grant, bool]] = {}
        self._base_path = "/" + issuer.split("://", 1)[1].partition("/")[2].strip("/")
        self._base_path = self._base_path.rstrip("/")

    # -- configuration helpers --------------------------------------------

    def url(self, endpoint: str) -> str:
        """The absolute URL of an endpoint (``"token"``, ``"jwks"``...)."""
        path = {v: k for k, v in _PATHS.items()}[endpoint]
        return self.issuer.rstrip("/") + path

    def config(self, **overrides: Any) -> Any:
        """
        A `twistauth.identity.config.ProviderConfig` for this provider's client.

        :param overrides: any `ProviderConfig` field.
        """
        from twistauth.identity.config import ProviderConfig

        values: Dict[str, Any] = {
            "name": "fake",
            "issuer": self.issuer,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uri": self.redirect_uris[0],
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "post_logout_redirect_uri": (
                self.post_logout_redirect_uris[0] if self.post_logout_redirect_uris else None
            ),
        }
        values.update(overrides)
        return ProviderConfig(**values)

    def resource(self) -> Resource:
        """The provider as a ``twisted.web`` resource (mount it at the root)."""
        return _ProviderResource(self)

    def stub(self) -> Any:
        """A ``treq.testing.StubTreq`` talking to this provider."""
        from treq.testing import StubTreq

        return StubTreq(self.resource())

    def relying_party(self, *, http_client: Any = None, **overrides: Any) -> Any:
        """
        A `twistauth.identity.client.RelyingParty` for this provider, on
        ``http_client`` (default: a new `stub`) and this provider's clock.

        :param overrides: `ProviderConfig` fields.
        """
        from twistauth.identity.client import RelyingParty

        return RelyingParty(
            config=self.config(**overrides),
            http_client=http_client if http_client is not None else self.stub(),
            clock=self.clock,
        )

    def log_in(self, rp: Any, return_to: str = "/") -> Any:
        """
        A whole login through ``rp``: start, the user approves here, finish.

        :param rp: a `twistauth.identity.client.RelyingParty` for this provider.
        :return: a Deferred firing with the `LoginResult` (or failing as
            ``rp.finish`` does).
        """
        from twisted.internet.defer import ensureDeferred

        async def run() -> Any:
            start = await rp.start(return_to)
            return await rp.finish(start.transaction, self.authorize(start.url))

        return ensureDeferred(run())

    # -- misbehaviour -----------------------------------------------------

    def misbehave(self, target: str, *faults: str, once: bool = False) -> None:
        """
        Make ``target`` misbehave until `behave` (or once, if ``once``).

        :param target: ``"id_token"``, ``"logout_token"``, or an endpoint name.
        :param faults: fault names (see the module docstring).
        :raises ValueError: an unknown target or fault.
        """
        if target in ("id_token", "logout_token"):
            allowed = TOKEN_FAULTS
        elif target in ENDPOINT_FAULTS:
            allowed = ENDPOINT_FAULTS[target] | (HTTP_FAULTS if target != "authorize" else set())
        else:
            raise ValueError(f"unknown target {target!r}")
        unknown = set(faults) - allowed
        if unknown:
            raise ValueError(f"unknown fault(s) for {target}: {', '.join(sorted(unknown))}")
        self._faults.setdefault(target, set()).update(faults)
        if once:
            self._once.setdefault(target, set()).update(faults)

    def behave(self) -> None:
        """Forget every fault."""
        self._faults.clear()
        self._once.clear()

    def _take_faults(self, target: str) -> Set[str]:
        faults = set(self._faults.get(target, ()))
        once = self._once.pop(target, set())
        if once:
            self._faults[target] -= once
        return faults

    # -- keys -------------------------------------------------------------

    def _new_key(self, alg: str) -> SigningKey:
        index = self._key_index
        self._key_index += 1
        return SigningKey(
            kid=f"key-{alg.lower()}-{index}-{secrets.token_hex(4)}",
            alg=alg,
            private_key=_pooled_key(alg, index % 6),
        )

    @property
    def signing_key(self) -> SigningKey:
        """The key that signs new tokens."""
        return self.keys[-1]

    def rotate_keys(self, *, keep_old: bool = True, algorithm: Optional[str] = None) -> SigningKey:
        """
        Start signing with a new key (new ``kid``).

        :param keep_old: keep publishing the previous keys.
        :param algorithm: ``RS256`` or ``ES256`` (default: the provider's).
        :return: the new key.
        """
        key = self._new_key(algorithm or self.algorithm)
        self.keys = (self.keys if keep_old else []) + [key]
        return key

    def jwks(self, faults: Optional[Set[str]] = None) -> Dict[str, Any]:
        """The published key set (with the ``jwks`` faults, or ``faults``)."""
        keys = [k.public_jwk() for k in self.keys]
        if faults is None:
            faults = self._faults.get("jwks", set())
        if "empty" in faults:
            keys = []
        if "weak_key" in faults:
            weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
            jwk = RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True)
            jwk.update({"kid": "weak", "alg": "RS256", "use": "sig"})
            keys.insert(0, jwk)
        if "unparseable_key" in faults:
            keys.insert(0, {"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"})
        if "oct_key" in faults:
            keys.insert(0, {"kty": "oct", "kid": "shared", "k": _b64(b"0" * 32)})
        return {"keys": keys}

    # -- signing ----------------------------------------------------------

    def sign(
        self,
        claims: Dict[str, Any],
        *,
        header: Optional[Dict[str, Any]] = None,
        key: Optional[SigningKey] = None,
    ) -> str:
        """
        Sign ``claims`` with a provider key (default: the current one).

        :param header: extra or replacing header members (``kid`` is set
            from the key unless given; ``{"kid": None}`` removes it).
        """
        key = key or self.signing_key
        fields: Dict[str, Any] = {"kid": key.kid}
        fields.update(header or {})
        fields = {k: v for k, v in fields.items() if v is not None}
        # PyJWS, not jwt.encode: the claims may be deliberately malformed
        # (an array-valued iss), which jwt.encode refuses to sign.
        payload = json.dumps(claims, separators=(",", ":")).encode("utf-8")
        return jwt.PyJWS().encode(payload, key.private_key, algorithm=key.alg, headers=fields)

    def _apply_token_faults(
        self, claims: Dict[str, Any], header: Dict[str, Any], faults: Set[str]
    ) -> str:
        now = int(self.clock.seconds())
        if "wrong_iss" in faults:
            claims["iss"] = self.issuer + ".evil.example"
        if "iss_array" in faults:
            claims["iss"] = [self.issuer]
        if "iss_trailing_slash" in faults:
            claims["iss"] = self.issuer + "/"
        if "wrong_aud" in faults:
            claims["aud"] = "another-client"
        if "extra_aud" in faults:
            claims["aud"] = [self.client_id, "another-client"]
        if "aud_object" in faults:
            claims["aud"] = {"client": self.client_id}
        if "missing_aud" in faults:
            claims.pop("aud", None)
        if "wrong_azp" in faults:
            claims["azp"] = "another-client"
        if "missing_iat" in faults:
            claims.pop("iat", None)
        if "iat_old" in faults:
            claims["iat"] = now - 3600
            claims["exp"] = now + 600
        if "iat_future" in faults:
            claims["iat"] = now + 3600
            claims["exp"] = now + 7200
        if "missing_exp" in faults or "no_exp" in faults:
            claims.pop("exp", None)
        if "expired" in faults:
            claims["exp"] = now - 3600
            claims["iat"] = now - 3660
        if "exp_string" in faults:
            claims["exp"] = str(claims.get("exp", now + 600))
        if "missing_sub" in faults:
            claims.pop("sub", None)
        if "sub_number" in faults:
            claims["sub"] = 12345
        if "sub_too_long" in faults:
            claims["sub"] = "x" * 256
        if "sub_changed" in faults:
            claims["sub"] = "mallory"
        if "bad_nonce" in faults:
            claims["nonce"] = "not-the-nonce-that-was-sent"
        if "missing_nonce" in faults:
            claims.pop("nonce", None)
        if "bad_at_hash" in faults:
            claims["at_hash"] = _hash_half("some other access token")
        if "missing_auth_time" in faults:
            claims.pop("auth_time", None)
        if "old_auth_time" in faults:
            claims["auth_time"] = now - 86400
        if "huge" in faults:
            claims["padding"] = "x" * (17 * 1024)
        if "no_event" in faults:
            claims.pop("events", None)
        if "wrong_event" in faults:
            claims["events"] = {"http://schemas.openid.net/event/something-else": {}}
        if "event_not_object" in faults:
            claims["events"] = {BACKCHANNEL_LOGOUT_EVENT: "logout"}
        if "with_nonce" in faults:
            claims["nonce"] = "a-nonce"
        if "no_sub_no_sid" in faults:
            claims.pop("sub", None)
            claims.pop("sid", None)
        if "missing_jti" in faults:
            claims.pop("jti", None)
        if "no_typ" in faults:
            header["typ"] = None
        if "crit" in faults:
            header["crit"] = ["urn:example:unknown"]
            header["urn:example:unknown"] = True

        if "kid_absent" in faults:
            header["kid"] = None
        if "unknown_kid" in faults:
            header["kid"] = "no-such-key"
        if "alg_none" in faults or "alg_none_signed" in faults:
            fields = {k: v for k, v in {"typ": "JWT", **header}.items() if v is not None}
            fields["alg"] = "none"
            fields.pop("kid", None)
            unsigned = f"{_b64json(fields)}.{_b64json(claims)}."
            if "alg_none_signed" in faults:
                return unsigned + _b64(b"\x01" * 256)
            return unsigned
        if "hs256_public_key" in faults:
            pem = self.signing_key.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            fields = {"typ": "JWT", "alg": "HS256", "kid": self.signing_key.kid}
            signing_input = f"{_b64json(fields)}.{_b64json(claims)}"
            mac = hmac.new(pem, signing_input.encode("ascii"), hashlib.sha256).digest()
            return f"{signing_input}.{_b64(mac)}"
        if "jwk_header" in faults or "jku_header" in faults or "untrusted_key" in faults:
            attacker = SigningKey(kid=self.signing_key.kid, alg="RS256",
                                  private_key=_pooled_key("RS256", 7))
            if "jwk_header" in faults:
                header["jwk"] = attacker.public_jwk()
            if "jku_header" in faults:
                header["jku"] = "https://attacker.example/jwks"
            return self.sign(claims, header=header, key=attacker)
        if "wrong_alg" in faults:
            other = "ES256" if self.signing_key.alg == "RS256" else "RS256"
            attacker = SigningKey(kid=self.signing_key.kid, alg=other,
                                  private_key=_pooled_key(other, 7))
            return self.sign(claims, header=header, key=attacker)
        token = self.sign(claims, header=header)
        if "bad_signature" in faults:
            head, body, signature = token.split(".")
            raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
            raw[len(raw) // 2] ^= 0x01
            token = f"{head}.{body}.{_b64(bytes(raw))}"
        return token

    def issue_id_token(
        self,
        *,
        sub: Optional[str] = None,
        nonce: Optional[str] = None,
        sid: Optional[str] = None,
        access_token: Optional[str] = None,
        auth_time: Optional[float] = None,
        extra: Optional[Dict[str, Any]] = None,
        faults: Iterable[str] = (),
    ) -> str:
        """
        Sign an ID token for the registered client.

        :param faults: `TOKEN_FAULTS` to apply (besides those set with
            ``misbehave("id_token", ...)``).
        """
        now = int(self.clock.seconds())
        claims: Dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub or self.user_sub,
            "aud": self.client_id,
            "exp": now + self.id_token_lifetime,
            "iat": now,
            "auth_time": int(auth_time if auth_time is not None else now),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if sid is not None:
            claims["sid"] = sid
        if access_token is not None:
            claims["at_hash"] = _hash_half(access_token)
        claims.update(extra or {})
        all_faults = set(faults) | self._take_faults("id_token")
        return self._apply_token_faults(claims, {}, all_faults)

    def issue_logout_token(
        self,
        *,
        sub: Optional[str] = None,
        sid: Optional[str] = None,
        jti: Optional[str] = None,
        extra: Optional[Dict[str, Any]] = None,
        faults: Iterable[str] = (),
    ) -> str:
        """
        Sign a back-channel logout token, shaped like the OpenID conformance
        suite's: ``typ: logout+jwt``, ``exp = iat + 120``, an unknown
        ``ignored_claim``.

        :param sub: the user (default: `user_sub`, unless only ``sid`` is given).
        :param sid: the provider session.
        :param jti: the token id (default: random).
        :param faults: `TOKEN_FAULTS` to apply.
        """
        now = int(self.clock.seconds())
        claims: Dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 120,
            "jti": jti or secrets.token_urlsafe(16),
            "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
            "ignored_claim": "ignored",
        }
        if sub is not None or sid is None:
            claims["sub"] = sub or self.user_sub
        if sid is not None:
            claims["sid"] = sid
        claims.update(extra or {})
        all_faults = set(faults) | self._take_faults("logout_token")
        return self._apply_token_faults(claims, {"typ": "logout+jwt"}, all_faults)

    # -- the authorization endpoint ---------------------------------------

    def authorize(self, url: str) -> Dict[str, str]:
        """
        Play the user's browser at the authorization endpoint: the configured
        user logs in and approves.  Counts as a hit on ``authorize``.

        :param url: the authorization URL the relying party built.
        :return: the query of the redirect back to the relying party.
        :raises ValueError: the request is so wrong that the provider would
            show an error page instead of redirecting (unknown client, bad
            redirect URI).
        """
        self.hits["authorize"] += 1
        location = self._authorize(dict(query_dict(url)))
        return dict(query_dict(location))

    def _authorize(self, params: Dict[str, str]) -> str:
        faults = self._take_faults("authorize")
        if params.get("client_id") != self.client_id:
            raise ValueError("unknown client_id")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            raise ValueError("redirect_uri is not registered")

        def back(values: List[Tuple[str, str]]) -> str:
            if "state" in params:
                values.append(("state", params["state"]))
            if "wrong_iss" in faults:
                values.append(("iss", "https://attacker.example"))
            elif self.iss_parameter and "omit_iss" not in faults:
                values.append(("iss", self.issuer))
            return add_query(redirect_uri, values)

        if params.get("response_type") != "code":
            return back([("error", "unsupported_response_type")])
        if params.get("code_challenge_method") != "S256" or len(
            params.get("code_challenge", "")
        ) != 43:
            return back([("error", "invalid_request"),
                         ("error_description", "PKCE S256 is required")])
        if "openid" not in params.get("scope", "").split():
            return back([("error", "invalid_scope")])
        if "access_denied" in faults:
            return back([("error", "access_denied"),
                         ("error_description", "The user <b>refused</b>")])
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            challenge=params["code_challenge"],
            nonce=params.get("nonce"),
            sub=self.user_sub,
            sid=secrets.token_urlsafe(12),
            scope=params["scope"],
            auth_time=self.clock.seconds(),
            expires_at=self.clock.seconds() + 60,
        )
        return back([("code", code)])

    # -- the token endpoint -----------------------------------------------

    def _client_authenticated(self, request: Request, form: Dict[str, str]) -> bool:
        header = request.getHeader("authorization")
        if header and header.lower().startswith("basic "):
            if self.token_endpoint_auth_method != "client_secret_basic":  # noqa: S105
                return False
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return False
            from urllib.parse import unquote

            client_id, _, secret = decoded.partition(":")
            return unquote(client_id) == self.client_id and hmac.compare_digest(
                unquote(secret).encode(), self.client_secret.encode()
            )
        if self.token_endpoint_auth_method != "client_secret_post":  # noqa: S105
            return False
        return form.get("client_id") == self.client_id and hmac.compare_digest(
            form.get("client_secret", "").encode(), self.client_secret.encode()
        )

    def _issue(self, grant: _Grant, *, nonce: Optional[str], with_id_token: bool,
               faults: Set[str]) -> Tuple[Dict[str, Any], str]:
        access_token = "at-" + secrets.token_urlsafe(24)
        self._access_tokens[access_token] = (
            grant.sub, self.clock.seconds() + self.access_token_lifetime
        )
        body: Dict[str, Any] = {
            "access_token": access_token,
            "token_type": (
                "MAC" if "token_type_mac" in faults
                else "bearer" if "token_type_lowercase" in faults else "Bearer"
            ),
            "expires_in": self.access_token_lifetime,
            "scope": grant.scope,
        }
        if with_id_token and "missing_id_token" not in faults:
            body["id_token"] = self.issue_id_token(
                sub=grant.sub, nonce=nonce, sid=grant.sid, access_token=access_token,
                auth_time=grant.auth_time,
            )
        if "missing_access_token" in faults:
            del body["access_token"]
        return body, access_token

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self._refresh_tokens[token] = (grant, True)
        return token

    def token_response(
        self, request: Request, form: Dict[str, str], faults: Set[str]
    ) -> Tuple[int, Any]:
        """
        The token endpoint's answer to ``form`` (status, JSON body).
        """
        self.token_requests.append(dict(form))
        if "invalid_client" in faults or not self._client_authenticated(request, form):
            return 401, {"error": "invalid_client"}
        if "invalid_grant" in faults:
            return 400, {"error": "invalid_grant", "error_description": "refused on demand"}
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            code = self._codes.get(form.get("code", ""))
            if code is None or code.expires_at < self.clock.seconds():
                return 400, {"error": "invalid_grant"}
            if code.used:
                # RFC 6749 §4.1.2: a code used twice revokes what it gave.
                for token in code.issued:
                    self._access_tokens.pop(token, None)
                return 400, {"error": "invalid_grant"}
            code.used = True
            if form.get("redirect_uri") != code.redirect_uri:
                return 400, {"error": "invalid_grant",
                             "error_description": "redirect_uri differs"}
            verifier = form.get("code_verifier", "")
            expected = _b64(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
            if not verifier or not hmac.compare_digest(expected, code.challenge):
                return 400, {"error": "invalid_grant", "error_description": "PKCE failed"}
            grant = _Grant(sub=code.sub, sid=code.sid, scope=code.scope,
                           auth_time=code.auth_time, nonce=code.nonce)
            body, access_token = self._issue(grant, nonce=code.nonce, with_id_token=True,
                                             faults=faults)
            code.issued.append(access_token)
            if "no_refresh_token" not in faults:
                body["refresh_token"] = self._new_refresh_token(grant)
        elif grant_type == "refresh_token":
            entry = self._refresh_tokens.get(form.get("refresh_token", ""))
            if entry is None:
                return 400, {"error": "invalid_grant"}
            grant, active = entry
            if not active:
                self.reused_refresh_tokens += 1
                grant.revoked = True
                return 400, {"error": "invalid_grant", "error_description": "token reused"}
            if grant.revoked:
                return 400, {"error": "invalid_grant"}
            body, _ = self._issue(grant, nonce=grant.nonce, with_id_token=self.refresh_id_token,
                                  faults=faults)
            if self.rotate_refresh_tokens and "no_refresh_token" not in faults:
                self._refresh_tokens[form["refresh_token"]] = (grant, False)
                body["refresh_token"] = self._new_refresh_token(grant)
        else:
            return 400, {"error": "unsupported_grant_type"}
        if "not_object" in faults:
            return 200, [body]
        return 200, body

    def revoke_grants(self, sub: Optional[str] = None) -> None:
        """Revoke every refresh token (of ``sub``): the next refresh gets ``invalid_grant``."""
        for grant, _ in self._refresh_tokens.values():
            if sub is None or grant.sub == sub:
                grant.revoked = True

    # -- userinfo, end session, discovery ---------------------------------

    def userinfo_response(self, request: Request, faults: Set[str]) -> Tuple[int, Any]:
        """The UserInfo endpoint's answer (status, JSON body)."""
        header = request.getHeader("authorization") or ""
        how: Optional[str] = None
        token = ""
        if header.lower().startswith("bearer "):
            how, token = "header", header[7:].strip()
        elif b"access_token" in (request.args or {}):
            how = "query"
        self.userinfo_requests.append(how)
        entry = self._access_tokens.get(token)
        if how != "header" or entry is None or entry[1] <= self.clock.seconds():
            return 401, {"error": "invalid_token"}
        sub = "someone-else" if "sub_mismatch" in faults else entry[0]
        if "jwt_response" in faults:
            return 200, self.sign({"sub": sub, "iss": self.issuer, "aud": self.client_id})
        return 200, {"sub": sub, **self.user_claims}

    def end_session_response(self, params: Dict[str, str]) -> Tuple[int, Optional[str]]:
        """The end-session endpoint's answer: (status, redirect location)."""
        self.end_session_requests.append(dict(params))
        hint = params.get("id_token_hint")
        if hint:
            try:
                claims = jwt.decode(
                    hint, self.signing_key.private_key.public_key(),
                    algorithms=[self.signing_key.alg],
                    options={"verify_exp": False, "verify_aud": False},
                )
            except jwt.PyJWTError:
                return 400, None
            if isinstance(claims.get("sid"), str):
                self.ended_sessions.append(claims["sid"])
        target = params.get("post_logout_redirect_uri")
        if target is None:
            return 200, None
        if target not in self.post_logout_redirect_uris:
            return 400, None
        values = [("state", params["state"])] if "state" in params else []
        return 302, add_query(target, values)

    def discovery(self, faults: Optional[Set[str]] = None) -> Dict[str, Any]:
        """The metadata document (with the ``discovery`` faults, or ``faults``)."""
        if faults is None:
            faults = self._faults.get("discovery", set())
        issuer = self.issuer + "/" if "wrong_issuer" in faults else self.issuer
        jwks_uri = self.url("jwks")
        if "http_endpoint" in faults:
            jwks_uri = "http://" + jwks_uri.split("://", 1)[1]
        iss_supported = self.iss_parameter
        if "iss_parameter_supported" in faults:
            iss_supported = True
        if "no_iss_parameter_supported" in faults:
            iss_supported = False
        return {
            "issuer": issuer,
            "authorization_endpoint": self.url("authorize"),
            "token_endpoint": self.url("token"),
            "userinfo_endpoint": self.url("userinfo"),
            "jwks_uri": jwks_uri,
            "end_session_endpoint": self.url("end_session"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys}),
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": iss_supported,
            "backchannel_logout_supported": True,
            "backchannel_logout_session_supported": True,
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce",
                                 "sid", "name", "email", "email_verified"],
        }


def _json_body(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")


class _ProviderResource(Resource):
    """The provider's endpoints as one leaf resource."""

    isLeaf = True

    def __init__(self, provider: FakeProvider) -> None:
        super().__init__()
        self._provider = provider

    def render(self, request: Request) -> Any:
        provider = self._provider
        path = request.path.decode("utf-8", "replace")
        if provider._base_path and path.startswith(provider._base_path):
            path = path[len(provider._base_path):]
        endpoint = _PATHS.get(path)
        if endpoint is None:
            request.setResponseCode(404)
            return b"not found"
        provider.hits[endpoint] += 1
        if endpoint == "authorize":
            params = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
            try:
                location = provider._authorize(params)
            except ValueError as e:
                request.setResponseCode(400)
                return str(e).encode()
            request.redirect(location.encode("ascii"))
            return b""
        all_faults = provider._take_faults(endpoint)
        faults = all_faults & HTTP_FAULTS
        if "reset" in faults:
            if request.channel.transport is not None:
                request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if "stall" in faults:
            request.notifyFinish().addErrback(lambda f: None)
            return NOT_DONE_YET
        status, body, content_type = self._answer(endpoint, request, all_faults)
        if "error_500" in faults:
            status, body, content_type = 500, b"<h1>Internal Server Error</h1>", "text/html"
        elif "garbled" in faults:
            status, body, content_type = 200, b"<html>not json{", "text/html"
        elif "huge" in faults:
            status, body = 200, b"[" + b"0," * (provider.huge_bytes // 2) + b"0]"
        request.setResponseCode(status)
        request.setHeader("Content-Type", content_type)
        request.setHeader("Cache-Control", "no-store")
        if "stall_body" in faults:
            request.setHeader("Content-Length", str(len(body) + 1000))
            request.write(body[: max(1, len(body) // 2)])
            request.notifyFinish().addErrback(lambda f: None)
            return NOT_DONE_YET
        if "slow" in faults:
            call: List[IDelayedCall] = []

            def finish() -> None:
                request.write(body)
                request.finish()

            def gone(failure: Failure) -> None:
                if call and call[0].active():
                    call[0].cancel()

            call.append(provider.clock.callLater(provider.slow_seconds, finish))
            request.notifyFinish().addErrback(gone)
            return NOT_DONE_YET
        return body

    def _answer(
        self, endpoint: str, request: Request, faults: Set[str]
    ) -> Tuple[int, bytes, str]:
        provider = self._provider
        if endpoint == "discovery":
            return 200, _json_body(provider.discovery(faults)), "application/json"
        if endpoint == "jwks":
            return 200, _json_body(provider.jwks(faults)), "application/jwk-set+json"
        if endpoint == "token":
            if request.method != b"POST":
                return 405, b"{}", "application/json"
            raw = request.content.read() if request.content is not None else b""
            form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
            status, value = provider.token_response(request, form, faults)
            return status, _json_body(value), "application/json"
        if endpoint == "userinfo":
            status, value = provider.userinfo_response(request, faults)
            if isinstance(value, str):
                return status, value.encode(), "application/jwt"
            return status, _json_body(value), "application/json"
        params = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
        status, location = provider.end_session_response(params)
        if location is not None:
            request.setHeader("Location", location)
        return status, b"{}" if location else b'{"logged_out": true}', "application/json"
