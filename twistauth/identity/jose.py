"""
JWT verification: one function checks the signature and the claims together.

`verify_jwt` is the only way twistauth reads a JWT: it cannot return claims
whose signature was not checked, nor a signature check whose claims were not.
In order, before any base64 or JSON decoding: the token is a string of at
most 16 KiB with exactly three segments of base64url characters (a JWE's
five segments are refused: encryption is never negotiated) (checklist #25).
Then the header: ``alg`` must be in the allowlist (never ``none``; HS* only
when configured, and then verified with the client secret alone) (#21, #22);
``crit`` is refused, as no extension is understood (#24); ``jku``, ``x5u``,
``jwk`` and ``x5c`` are never read: keys come only from the provider's
``jwks_uri`` (#23).  The signature is checked by PyJWT with
``algorithms=[alg]``, the key's own algorithm list, and ``require``.  Then
the common claims, with the injected clock's time: ``iss`` equal to the
issuer (a string; arrays refused) (#26), ``aud`` containing the client id and
no untrusted audience (#27), ``exp``/``iat``/``nbf`` numbers within the
leeway (≤60 s) (#29), ``sub`` 1-255 printable ASCII characters (#30).  A
claim of the wrong JSON type fails like any bad claim: 400, never 500 (#34).

`validate_id_token` adds OpenID Connect Core §3.1.3.7: ``iat`` not older than
10 minutes, ``azp`` (#28), ``nonce`` compared in constant time (#31),
``at_hash`` when present (#32), ``auth_time`` with ``max_age`` (#33), and on
refresh the same ``iss``/``sub``/``aud`` as the original (#46).

`validate_logout_token` follows Back-Channel Logout 1.0 §2.6 (#53-#62).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
)

import attr
import jwt
from jwt.exceptions import InvalidSignatureError, PyJWTError
from twisted.internet.defer import Deferred

from twistauth.identity.config import HMAC_ALGS, MAX_LEEWAY
from twistauth.identity.errors import InvalidLogoutTokenError, InvalidTokenError
from twistauth.identity.jwks import JsonWebKey

MAX_TOKEN_CHARS = 16 * 1024
"""Largest compact JWT accepted, checked before anything is decoded."""

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_TYPES = frozenset({"logout+jwt", "application/logout+jwt"})

_SEGMENT = re.compile(r"^[A-Za-z0-9_-]*$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]{1,255}$")

KeyLookup = Callable[[Optional[str], str], "Deferred[List[JsonWebKey]]"]
"""``keys(kid, alg)``: the candidate keys for a token's header, e.g.
`twistauth.identity.jwks.JWKSCache.keys_for`."""


def _frozen(values: Iterable[str]) -> FrozenSet[str]:
    return frozenset(values)


def _tuple(values: Iterable[str]) -> Tuple[str, ...]:
    return tuple(values)


@attr.s(frozen=True, kw_only=True)
class JWTRules:
    """
    What a token must satisfy, fixed by configuration (never by the token).

    :ivar issuer: the exact ``iss``.
    :ivar audience: our client id: must be in ``aud``.
    :ivar trusted_audiences: other audiences tolerated in ``aud``.
    :ivar algorithms: the allowed ``alg`` values.
    :ivar required: claims that must be present (PyJWT's ``require``).
    :ivar leeway: clock skew tolerated, at most 60 s.
    :ivar hmac_secret: the client secret, used for HS* only (and only if
        HS* is in ``algorithms``).
    :ivar types: accepted ``typ`` header values (``None``: not checked).
    """

    issuer: str = attr.ib()
    audience: str = attr.ib()
    trusted_audiences: FrozenSet[str] = attr.ib(default=frozenset(), converter=_frozen)
    algorithms: FrozenSet[str] = attr.ib(converter=_frozen)
    required: Tuple[str, ...] = attr.ib(default=("iss", "aud"), converter=_tuple)
    leeway: float = attr.ib(default=30.0)
    hmac_secret: Optional[bytes] = attr.ib(default=None, repr=False)
    types: Optional[FrozenSet[str]] = attr.ib(default=None)

    @leeway.validator
    def _check_leeway(self, attribute: Any, value: float) -> None:
        if not 0 <= value <= MAX_LEEWAY:
            raise ValueError(f"leeway must be from 0 to {MAX_LEEWAY:g} seconds")

    @algorithms.validator
    def _check_algorithms(self, attribute: Any, value: FrozenSet[str]) -> None:
        if "none" in {a.lower() for a in value}:
            raise ValueError("'none' is never an allowed algorithm")


@attr.s(frozen=True, kw_only=True, repr=False)
class VerifiedJWT:
    """
    A token whose signature and common claims were checked.

    :ivar header: the protected header.
    :ivar claims: the claims.
    """

    header: Dict[str, Any] = attr.ib()
    claims: Dict[str, Any] = attr.ib()

    def __repr__(self) -> str:
        return f"<VerifiedJWT alg={self.header.get('alg')!r}>"


def _number(claims: Mapping[str, Any], name: str, error: Type[InvalidTokenError]) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"the token's {name!r} claim is not a number")
    return float(value)


def _string(
    claims: Mapping[str, Any], name: str, error: Type[InvalidTokenError]
) -> str:
    value = claims[name]
    if not isinstance(value, str) or not _PRINTABLE_ASCII.match(value):
        raise error(f"the token's {name!r} claim is not 1-255 printable ASCII characters")
    return value


def _audiences(claims: Mapping[str, Any], error: Type[InvalidTokenError]) -> List[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        return list(aud)
    raise error("the token's 'aud' claim is missing or not a string or array of strings")


def _precheck(token: Any, error: Type[InvalidTokenError]) -> str:
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise error("the token is not ASCII") from None
    if not isinstance(token, str):
        raise error("the token is not a string")
    if len(token) > MAX_TOKEN_CHARS:
        raise error(f"the token is longer than {MAX_TOKEN_CHARS} characters")
    segments = token.split(".")
    if len(segments) == 5:
        raise error("encrypted tokens (JWE) are not accepted")
    if len(segments) != 3:
        raise error("the token does not have three segments")
    if not all(_SEGMENT.match(s) for s in segments) or not segments[0] or not segments[2]:
        raise error("the token's segments are not base64url")
    return token


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_segment(segment: str) -> Any:
    """
    Decode one base64url JSON segment; ``None`` when it is not one.
    """
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _header(token: str, rules: JWTRules, error: Type[InvalidTokenError]) -> Dict[str, Any]:
    header = _decode_segment(token.split(".", 1)[0])
    if not isinstance(header, dict):
        raise error("the token's header cannot be decoded")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise error("the token is not signed")
    if alg not in rules.algorithms:
        raise error(f"the token's algorithm {alg!r} is not allowed")
    if "crit" in header:
        raise error("the token names critical header extensions")
    if "b64" in header:
        raise error("unencoded payloads are not accepted")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > 255):
        raise error("the token's key id is not a string")
    if rules.types is not None:
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in rules.types:
            raise error("the token's type (typ header) is not accepted here")
    return header


def _decode(token: str, key: Any, alg: str, rules: JWTRules) -> Dict[str, Any]:
    options = {
        "verify_signature": True,
        "require": list(rules.required),
        "enforce_minimum_key_length": True,
        # Time, issuer and audience are checked below, on the injected clock
        # and with stricter rules; PyJWT reads the wall clock.
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_iss": False,
        "verify_aud": False,
        "verify_sub": False,
        "verify_jti": False,
    }
    decoded = jwt.decode_complete(token, key=key, algorithms=[alg], options=options)  # type: ignore[arg-type]
    payload: Dict[str, Any] = decoded["payload"]
    return payload


async def verify_jwt(
    token: Any,
    *,
    rules: JWTRules,
    keys: KeyLookup,
    now: float,
    error: Type[InvalidTokenError] = InvalidTokenError,
) -> VerifiedJWT:
    """
    Verify a compact JWT: signature and common claims, never one without the
    other.

    :param token: the compact serialization, as received.
    :param rules: what it must satisfy.
    :param keys: finds the candidate keys for its ``kid`` and ``alg``.
    :param now: the current time (the injected clock's ``seconds()``).
    :param error: the error class to raise (`InvalidTokenError` or
        `InvalidLogoutTokenError`).
    :return: the verified header and claims.
    :raises InvalidTokenError: (or ``error``) the token is invalid; the
        message says which check failed and never quotes the token.
    :raises ProviderUnavailableError: no keys can be had at all.
    """
    token = _precheck(token, error)
    header = _header(token, rules, error)
    alg: str = header["alg"]

    candidates: List[Any]
    if alg in HMAC_ALGS:
        if rules.hmac_secret is None:
            raise error(f"the token's algorithm {alg!r} is not allowed")
        candidates = [rules.hmac_secret]
    else:
        found = await keys(header.get("kid"), alg)
        candidates = [k.key for k in found if alg in k.algorithms]
        if not candidates:
            raise error("no signing key of the provider fits the token")

    claims: Optional[Dict[str, Any]] = None
    for key in candidates:
        try:
            claims = _decode(token, key, alg, rules)
            break
        except InvalidSignatureError:
            continue
        except jwt.MissingRequiredClaimError as e:
            raise error(f"the token lacks the {e.claim!r} claim") from None
        except jwt.InvalidKeyError:
            raise error("the signing key is too weak for the token's algorithm") from None
        except PyJWTError:
            raise error("the token cannot be decoded") from None
    if claims is None:
        raise error("the token's signature is not valid")

    _check_common_claims(claims, rules, now, error)
    return VerifiedJWT(header=header, claims=claims)


def _check_common_claims(
    claims: Dict[str, Any], rules: JWTRules, now: float, error: Type[InvalidTokenError]
) -> None:
    for name in rules.required:
        if claims.get(name) is None:
            raise error(f"the token lacks the {name!r} claim")
    iss = claims.get("iss")
    if not isinstance(iss, str) or iss != rules.issuer:
        raise error("the token's issuer is not the provider's")
    audiences = _audiences(claims, error)
    if rules.audience not in audiences:
        raise error("the token is not meant for this client (aud)")
    untrusted = set(audiences) - {rules.audience} - rules.trusted_audiences
    if untrusted:
        raise error("the token is also meant for untrusted audiences (aud)")
    leeway = rules.leeway
    if "exp" in claims and _number(claims, "exp", error) <= now - leeway:
        raise error("the token has expired")
    if "iat" in claims and _number(claims, "iat", error) > now + leeway:
        raise error("the token was issued in the future (iat)")
    if "nbf" in claims and _number(claims, "nbf", error) > now + leeway:
        raise error("the token is not valid yet (nbf)")
    if "sub" in claims:
        _string(claims, "sub", error)
    if "jti" in claims:
        _string(claims, "jti", error)


def token_hash(value: str, alg: str) -> str:
    """
    The ``at_hash`` (or ``c_hash``) of ``value`` for a token signed with
    ``alg``: the left half of its hash, base64url without padding (Core §3.1.3.6).

    :raises ValueError: no hash is defined for ``alg``.
    """
    if alg.endswith("256"):
        digest = hashlib.sha256(value.encode("ascii")).digest()
    elif alg.endswith("384"):
        digest = hashlib.sha384(value.encode("ascii")).digest()
    elif alg.endswith("512") or alg == "EdDSA":
        # EdDSA: SHA-512 for Ed25519 (OpenID Connect Core errata).
        digest = hashlib.sha512(value.encode("ascii")).digest()
    else:
        raise ValueError(f"no token hash for {alg!r}")
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


ID_TOKEN_CLAIMS = ("iss", "sub", "aud", "exp", "iat")


async def validate_id_token(
    token: Any,
    *,
    rules: JWTRules,
    keys: KeyLookup,
    now: float,
    nonce: Optional[str],
    access_token: Optional[str] = None,
    max_age: Optional[int] = None,
    max_iat_age: float = 600.0,
    original: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """
    Validate an ID token (OpenID Connect Core §3.1.3.7 and §12.2).

    :param token: the ``id_token`` of a token response.
    :param rules: the provider's rules (``required`` is extended with the
        ID token claims).
    :param keys: the provider's key lookup.
    :param now: the current time.
    :param nonce: the login transaction's nonce; ``None`` on refresh.
    :param access_token: the access token of the same response, for ``at_hash``.
    :param max_age: the ``max_age`` sent with the authorization request.
    :param max_iat_age: refuse tokens issued longer ago than this.
    :param original: on refresh, the claims of the login's ID token: ``iss``,
        ``sub``, ``aud`` must be the same, and ``nonce`` if present.
    :return: the claims.
    :raises InvalidTokenError: any check failed.
    """
    rules = attr.evolve(rules, required=tuple(dict.fromkeys(rules.required + ID_TOKEN_CLAIMS)))
    verified = await verify_jwt(token, rules=rules, keys=keys, now=now)
    claims = verified.claims
    if _number(claims, "iat", InvalidTokenError) < now - max_iat_age - rules.leeway:
        raise InvalidTokenError("the ID token was issued too long ago (iat)")
    audiences = _audiences(claims, InvalidTokenError)
    azp = claims.get("azp")
    if azp is not None and azp != rules.audience:
        raise InvalidTokenError("the ID token was issued to another party (azp)")
    if len(audiences) > 1 and azp is None and not set(audiences) <= (
        {rules.audience} | rules.trusted_audiences
    ):
        raise InvalidTokenError("the ID token has several audiences and no azp")
    if nonce is not None:
        got = claims.get("nonce")
        if not isinstance(got, str) or not hmac.compare_digest(
            got.encode("utf-8"), nonce.encode("utf-8")
        ):
            raise InvalidTokenError("the ID token's nonce is not this login's")
    if "at_hash" in claims and access_token is not None:
        at_hash = claims["at_hash"]
        try:
            expected = token_hash(access_token, verified.header["alg"])
        except (ValueError, UnicodeEncodeError):
            raise InvalidTokenError("the ID token's at_hash cannot be checked") from None
        if not isinstance(at_hash, str) or not hmac.compare_digest(
            at_hash.encode("utf-8"), expected.encode("ascii")
        ):
            raise InvalidTokenError("the ID token's at_hash does not match the access token")
    if "auth_time" in claims:
        auth_time = _number(claims, "auth_time", InvalidTokenError)
        if max_age is not None and now - auth_time > max_age + rules.leeway:
            raise InvalidTokenError("the login is older than max_age allows (auth_time)")
    elif max_age is not None:
        raise InvalidTokenError("the ID token lacks auth_time, which max_age requires")
    if "sid" in claims:
        _string(claims, "sid", InvalidTokenError)
    if original is not None:
        if claims["iss"] != original.get("iss") or claims["sub"] != original.get("sub"):
            raise InvalidTokenError("the refreshed ID token names another identity")
        original_aud = original.get("aud")
        original_audiences = [original_aud] if isinstance(original_aud, str) else original_aud
        if not isinstance(original_audiences, list) or set(audiences) != set(original_audiences):
            raise InvalidTokenError("the refreshed ID token has other audiences")
        if "nonce" in claims and claims["nonce"] != original.get("nonce"):
            raise InvalidTokenError("the refreshed ID token carries another nonce")
    return claims


@attr.s(frozen=True, kw_only=True)
class LogoutRequest:
    """
    A valid back-channel logout: end the sessions it names.

    :ivar issuer: the provider.
    :ivar subject: the ``sub`` whose sessions end (all of them at this
        issuer when ``sid`` is ``None``), or ``None``.
    :ivar sid: the provider session whose sessions end, or ``None``.
    :ivar issued_at: the token's ``iat``: a sub-only logout never ends
        sessions created after it.
    :ivar expires_at: until when its ``jti`` is remembered.
    """

    issuer: str = attr.ib()
    subject: Optional[str] = attr.ib()
    sid: Optional[str] = attr.ib(repr=False)
    issued_at: float = attr.ib()
    expires_at: float = attr.ib()


LOGOUT_TOKEN_CLAIMS = ("iss", "aud", "iat", "jti", "events")

JtiSeen = Callable[[str, float], "Deferred[bool] | Awaitable[bool]"]
"""``jti_seen(key, expires_at)``: atomically record ``key`` until
``expires_at`` (clock seconds) and answer whether it was already recorded."""


def jti_key(issuer: str, jti: str) -> str:
    """
    The replay-cache key of a logout token: a hash of issuer and ``jti``
    (fixed length; two providers' ``jti`` never collide).
    """
    digest = hashlib.sha256(issuer.encode("utf-8") + b"\x00" + jti.encode("utf-8"))
    return digest.hexdigest()


async def validate_logout_token(
    token: Any,
    *,
    rules: JWTRules,
    keys: KeyLookup,
    now: float,
    jti_seen: JtiSeen,
    max_iat_age: float = 120.0,
) -> LogoutRequest:
    """
    Validate a back-channel logout token (Back-Channel Logout 1.0 §2.4, §2.6).

    :param token: the ``logout_token`` form field.
    :param rules: the provider's rules (``types`` set to `LOGOUT_TYPES`
        when ``typ: logout+jwt`` is required).
    :param keys: the provider's key lookup.
    :param now: the current time.
    :param jti_seen: the replay cache, called last, only for a token that
        passed every other check: ``jti_seen(jti_key(iss, jti), expires_at)``.
    :param max_iat_age: a token without ``exp`` is accepted only when issued
        this recently (plus leeway).
    :return: what to log out.
    :raises InvalidLogoutTokenError: any check failed, or the ``jti`` was seen.
    """
    error = InvalidLogoutTokenError
    # exp is not required: 2022-era providers omit it (checked below).
    rules = attr.evolve(rules, required=LOGOUT_TOKEN_CLAIMS)
    verified = await verify_jwt(token, rules=rules, keys=keys, now=now, error=error)
    claims = verified.claims
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
        raise error("the logout token lacks the back-channel logout event")
    if "nonce" in claims:
        raise error("a logout token must not carry a nonce")
    subject = _string(claims, "sub", error) if "sub" in claims else None
    sid = _string(claims, "sid", error) if "sid" in claims else None
    if subject is None and sid is None:
        raise error("the logout token names neither a sub nor a sid")
    jti = _string(claims, "jti", error)
    issued_at = _number(claims, "iat", error)
    if "exp" in claims:
        expires_at = _number(claims, "exp", error)
    else:
        if issued_at < now - max_iat_age - rules.leeway:
            raise error("the logout token has no exp and was issued too long ago")
        expires_at = issued_at + max_iat_age
    expires_at = max(expires_at, now) + rules.leeway
    seen = await jti_seen(jti_key(rules.issuer, jti), expires_at)
    if seen:
        raise error("the logout token was already used (jti)")
    return LogoutRequest(
        issuer=rules.issuer, subject=subject, sid=sid, issued_at=issued_at, expires_at=expires_at
    )
