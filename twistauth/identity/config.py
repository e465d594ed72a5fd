"""
One identity provider's configuration, and its validation.

A `ProviderConfig` is what a ``[providers.NAME]`` table of the settings file
says about one OpenID provider.  `ProviderConfig.from_mapping` checks such a
table and raises `ValueError` naming the key and what is allowed, so the
settings loader can report it like any other bad setting.
"""

from __future__ import annotations

import re
from typing import Any, Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

import attr

from twistauth.identity._urls import URLProblem, check_endpoint_url

ASYMMETRIC_ALGS: FrozenSet[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Signature algorithms verified with the provider's published keys."""

HMAC_ALGS: FrozenSet[str] = frozenset({"HS256", "HS384", "HS512"})
"""Algorithms verified with the client secret: only when configured explicitly."""

DEFAULT_ALGS: Tuple[str, ...] = ("RS256", "PS256", "ES256", "RS384", "PS384", "ES384",
                                 "RS512", "PS512", "ES512", "EdDSA")
"""The default allowlist: every asymmetric algorithm; never ``none``, never HS*."""

AUTH_METHODS = ("client_secret_basic", "client_secret_post")

RESERVED_PARAMS = frozenset({
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
    "code_challenge", "code_challenge_method", "response_mode", "request", "request_uri",
})
"""Authorization parameters twistauth sets itself: not overridable by ``extra_params``."""

MAX_LEEWAY = 60.0
MAX_LOGIN_TTL = 900.0

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def _tuple(values: Iterable[str]) -> Tuple[str, ...]:
    return tuple(values)


def _read_secret(value: str) -> str:
    if value.startswith("file:"):
        path = value[len("file:"):]
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the secret file {path!r}: {e}") from None
    if not value:
        raise ValueError("the client secret is empty")
    return value


@attr.s(frozen=True, kw_only=True)
class ProviderConfig:
    """
    One OpenID provider, as configured.

    :ivar name: a short name (``[a-z0-9_-]``, ≤32): ``/login?provider=NAME``.
    :ivar issuer: the issuer identifier, compared exactly (no trailing-slash
        or case folding) with the metadata's and every token's ``iss``.
    :ivar client_id: our client id at the provider.
    :ivar client_secret: our client secret (never logged, never in ``repr``).
    :ivar redirect_uri: our callback URL as registered at the provider; from
        configuration only, never from the request's Host header.
    :ivar scopes: requested scopes; ``openid`` always among them.
    :ivar extra_params: extra authorization request parameters (``prompt``,
        ``acr_values``, ``hd``...), none of `RESERVED_PARAMS`.
    :ivar discovery: fetch ``/.well-known/openid-configuration`` (else every
        endpoint must be configured).
    :ivar authorization_endpoint: override of the discovered value.
    :ivar token_endpoint: override.
    :ivar userinfo_endpoint: override.
    :ivar jwks_uri: override.
    :ivar end_session_endpoint: override.
    :ivar token_endpoint_auth_method: ``client_secret_basic`` (default) or
        ``client_secret_post``.
    :ivar allowed_algs: the signature algorithms accepted for ID and logout
        tokens (intersected with the provider's
        ``id_token_signing_alg_values_supported``).  HS* only when listed here
        explicitly, and then verified with the client secret alone.
    :ivar use_userinfo: fetch the UserInfo endpoint after login.
    :ivar post_logout_redirect_uri: where the provider returns the browser
        after RP-initiated logout (registered at the provider).
    :ivar require_logout_typ: refuse logout tokens without
        ``typ: logout+jwt`` (ASVS L2; off by default as older providers omit it).
    :ivar leeway: clock skew tolerated on ``exp``, ``iat``, ``nbf`` (≤60 s).
    :ivar id_token_max_age: refuse ID tokens issued longer ago than this.
    :ivar logout_token_max_age: accept a logout token without ``exp`` only
        when issued within this many seconds (plus leeway).
    :ivar login_ttl: lifetime of a login transaction (≤15 min).
    :ivar max_age: when set, sent as ``max_age`` and ``auth_time`` enforced.
    :ivar trusted_audiences: other audiences an ID token may carry besides
        our client id.
    :ivar http_timeout: the total deadline of one request to the provider.
    :ivar max_response_bytes: the largest answer accepted from it.
    :ivar jwks_max_age: seconds the provider's keys are cached.
    :ivar jwks_cooldown: least seconds between two forced key fetches.
    """

    name: str = attr.ib()
    issuer: str = attr.ib()
    client_id: str = attr.ib()
    client_secret: Optional[str] = attr.ib(default=None, repr=False)
    redirect_uri: str = attr.ib()
    scopes: Tuple[str, ...] = attr.ib(default=("openid", "profile", "email"), converter=_tuple)
    extra_params: Mapping[str, str] = attr.ib(factory=dict)
    discovery: bool = attr.ib(default=True)
    authorization_endpoint: Optional[str] = attr.ib(default=None)
    token_endpoint: Optional[str] = attr.ib(default=None)
    userinfo_endpoint: Optional[str] = attr.ib(default=None)
    jwks_uri: Optional[str] = attr.ib(default=None)
    end_session_endpoint: Optional[str] = attr.ib(default=None)
    token_endpoint_auth_method: str = attr.ib(default="client_secret_basic")
    allowed_algs: Tuple[str, ...] = attr.ib(default=DEFAULT_ALGS, converter=_tuple)
    use_userinfo: bool = attr.ib(default=False)
    post_logout_redirect_uri: Optional[str] = attr.ib(default=None)
    require_logout_typ: bool = attr.ib(default=False)
    leeway: float = attr.ib(default=30.0)
    id_token_max_age: float = attr.ib(default=600.0)
    logout_token_max_age: float = attr.ib(default=120.0)
    login_ttl: float = attr.ib(default=600.0)
    max_age: Optional[int] = attr.ib(default=None)
    trusted_audiences: Tuple[str, ...] = attr.ib(default=(), converter=_tuple)
    http_timeout: float = attr.ib(default=5.0)
    max_response_bytes: int = attr.ib(default=64 * 1024)
    jwks_max_age: float = attr.ib(default=600.0)
    jwks_cooldown: float = attr.ib(default=30.0)

    def __attrs_post_init__(self) -> None:
        _validate(self)

    @property
    def endpoint_overrides(self) -> Dict[str, str]:
        """
        The endpoints configured explicitly, by metadata name.
        """
        names = ("authorization_endpoint", "token_endpoint", "userinfo_endpoint",
                 "jwks_uri", "end_session_endpoint")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def from_mapping(cls, name: str, mapping: Mapping[str, Any]) -> ProviderConfig:
        """
        Build a provider from a settings table, e.g. TOML's
        ``[providers.keycloak]``.  ``client_secret`` may be ``"file:PATH"``.

        :param name: the table's name.
        :param mapping: its keys.
        :raises ValueError: a key is unknown, missing, of the wrong type or out
            of range; the message names it.
        """
        fields = {a.name: a for a in attr.fields(cls)}
        unknown = sorted(set(mapping) - set(fields) - {"name"})
        if unknown:
            raise ValueError(f"provider {name!r}: unknown key(s) {', '.join(unknown)}")
        values: Dict[str, Any] = dict(mapping)
        for key in ("issuer", "client_id", "redirect_uri"):
            if key not in values:
                raise ValueError(f"provider {name!r}: {key!r} is required")
        if isinstance(values.get("client_secret"), str):
            try:
                values["client_secret"] = _read_secret(values["client_secret"])
            except ValueError as e:
                raise ValueError(f"provider {name!r}: client_secret: {e}") from None
        for key in ("scopes", "allowed_algs", "trusted_audiences"):
            if key in values and (
                isinstance(values[key], str)
                or not isinstance(values[key], (list, tuple))
                or not all(isinstance(v, str) for v in values[key])
            ):
                raise ValueError(f"provider {name!r}: {key!r} must be a list of strings")
        values["name"] = name
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"provider {name!r}: {e}") from None


def _check(condition: bool, config: ProviderConfig, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"provider {config.name!r}: {key!r} {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(c: ProviderConfig) -> None:
    _check(isinstance(c.name, str) and bool(_NAME.match(c.name)), c, "name",
           "must be 1-32 characters of a-z, 0-9, '_' and '-'")
    for key in ("issuer", "redirect_uri"):
        try:
            check_endpoint_url(getattr(c, key), key)
        except URLProblem as e:
            raise ValueError(f"provider {c.name!r}: {e}") from None
    for key, value in c.endpoint_overrides.items():
        try:
            check_endpoint_url(value, key)
        except URLProblem as e:
            raise ValueError(f"provider {c.name!r}: {e}") from None
    if c.post_logout_redirect_uri is not None:
        try:
            check_endpoint_url(c.post_logout_redirect_uri, "post_logout_redirect_uri")
        except URLProblem as e:
            raise ValueError(f"provider {c.name!r}: {e}") from None
    _check(isinstance(c.client_id, str) and 0 < len(c.client_id) <= 255, c, "client_id",
           "must be a non-empty string")
    _check(c.client_secret is None or (isinstance(c.client_secret, str) and bool(c.client_secret)),
           c, "client_secret", "must be a non-empty string or 'file:PATH'")
    _check(all(isinstance(s, str) and s and " " not in s for s in c.scopes) and "openid" in c.scopes,
           c, "scopes", "must be a list of scope names that includes 'openid'")
    _check(isinstance(c.extra_params, Mapping)
           and all(isinstance(k, str) and isinstance(v, str) for k, v in c.extra_params.items()),
           c, "extra_params", "must map parameter names to strings")
    reserved = sorted(set(c.extra_params) & RESERVED_PARAMS)
    _check(not reserved, c, "extra_params", f"may not set {', '.join(reserved)}")
    _check(c.token_endpoint_auth_method in AUTH_METHODS, c, "token_endpoint_auth_method",
           f"must be one of {', '.join(AUTH_METHODS)}")
    _check(c.client_secret is not None, c, "client_secret",
           "is required (twistauth is a confidential client)")
    unknown = sorted(set(c.allowed_algs) - ASYMMETRIC_ALGS - HMAC_ALGS)
    _check(bool(c.allowed_algs) and not unknown, c, "allowed_algs",
           f"must list algorithms among {', '.join(sorted(ASYMMETRIC_ALGS | HMAC_ALGS))}"
           + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    _check(_is_number(c.leeway) and 0 <= c.leeway <= MAX_LEEWAY, c, "leeway",
           f"must be from 0 to {MAX_LEEWAY:g} seconds")
    _check(_is_number(c.login_ttl) and 30 <= c.login_ttl <= MAX_LOGIN_TTL, c, "login_ttl",
           f"must be from 30 to {MAX_LOGIN_TTL:g} seconds")
    _check(_is_number(c.id_token_max_age) and 60 <= c.id_token_max_age <= 3600, c,
           "id_token_max_age", "must be from 60 to 3600 seconds")
    _check(_is_number(c.logout_token_max_age) and 10 <= c.logout_token_max_age <= 600, c,
           "logout_token_max_age", "must be from 10 to 600 seconds")
    _check(c.max_age is None or (isinstance(c.max_age, int) and not isinstance(c.max_age, bool)
                                 and c.max_age >= 0), c, "max_age",
           "must be a whole number of seconds")
    _check(_is_number(c.http_timeout) and 0 < c.http_timeout <= 60, c, "http_timeout",
           "must be from 0 to 60 seconds")
    _check(isinstance(c.max_response_bytes, int) and 1024 <= c.max_response_bytes <= 1 << 20, c,
           "max_response_bytes", "must be from 1024 to 1048576")
    _check(_is_number(c.jwks_max_age) and 30 <= c.jwks_max_age <= 86400, c, "jwks_max_age",
           "must be from 30 to 86400 seconds")
    _check(_is_number(c.jwks_cooldown) and 1 <= c.jwks_cooldown <= 3600, c, "jwks_cooldown",
           "must be from 1 to 3600 seconds")
    for key in ("discovery", "use_userinfo", "require_logout_typ"):
        _check(isinstance(getattr(c, key), bool), c, key, "must be true or false")
    if not c.discovery:
        missing = [k for k in ("authorization_endpoint", "token_endpoint", "jwks_uri")
                   if getattr(c, k) is None]
        _check(not missing, c, "discovery",
               f"is off, so these must be configured: {', '.join(missing)}")
