"""
The provider's signing keys: parsing a JWK Set and caching it on the clock.

Parsing (`parse_jwks`) keeps only public signature keys twistauth can use
and skips the rest with a log line, never failing the whole set: symmetric
(``oct``) keys (an HMAC key must never come from a JWKS), ``use: enc`` keys,
keys carrying private members, RSA keys under 2048 bits, unknown curves and
anything unparseable (checklist #40).  Each kept key knows which ``alg``
values it may verify, from its type: RSA → RS*/PS*, EC → the ES* of its
curve, OKP → EdDSA; narrowed to the JWK's own ``alg`` when it names one.

`JWKSCache` (checklist #38, #39, #41):

  - keys are kept for ``max_age`` (10 min) and then fetched again, so a key
    the provider removed stops verifying;
  - an unknown ``kid`` forces a refetch, at most one per ``cooldown`` (30 s);
    concurrent misses share one in-flight fetch;
  - a failed fetch with keys in the cache keeps the cache (stale-if-error);
    with no cache it fails with `ProviderUnavailableError` (503).
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import attr
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.identity.errors import ProviderBadResponseError, ProviderUnavailableError
from twistauth.identity.http import ProviderHTTP

log = Logger(namespace="twistauth.identity.jwks")

RSA_ALGS: FrozenSet[str] = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGS: Dict[str, str] = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
OKP_CURVES: FrozenSet[str] = frozenset({"Ed25519", "Ed448"})
MIN_RSA_BITS = 2048
MAX_KEYS = 100
MAX_CANDIDATES = 4

_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def algorithms_for(kty: str, crv: Optional[str] = None) -> FrozenSet[str]:
    """
    The ``alg`` values a key of this type (and curve) may verify.

    :param kty: ``RSA``, ``EC`` or ``OKP`` (anything else: none).
    :param crv: the curve, for EC and OKP keys.
    """
    if kty == "RSA":
        return RSA_ALGS
    if kty == "EC" and crv in EC_ALGS:
        return frozenset({EC_ALGS[crv]})
    if kty == "OKP" and crv in OKP_CURVES:
        return frozenset({"EdDSA"})
    return frozenset()


@attr.s(frozen=True, kw_only=True, eq=False)
class JsonWebKey:
    """
    One usable public signature key.

    :ivar kid: its key id, or ``None``.
    :ivar kty: ``RSA``, ``EC`` or ``OKP``.
    :ivar algorithms: the ``alg`` values it may verify.
    :ivar key: the ``cryptography`` public key object.
    """

    kid: Optional[str] = attr.ib()
    kty: str = attr.ib()
    algorithms: FrozenSet[str] = attr.ib()
    key: Any = attr.ib(repr=False)


def parse_jwk(entry: Any) -> JsonWebKey:
    """
    Turn one JWK into a `JsonWebKey`.

    :raises ValueError: the key is unusable; the message says why.
    """
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    kty = entry.get("kty")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if kty == "oct":
        raise ValueError("a symmetric key never verifies tokens from a key set")
    if kty not in _PUBLIC_MEMBERS:
        raise ValueError(f"unsupported key type {kty!r}")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"the key's use is {use!r}, not 'sig'")
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("the key's key_ops do not include 'verify'")
    if any(member in entry for member in _PRIVATE_MEMBERS):
        raise ValueError("the key set publishes a private key")
    crv = entry.get("crv")
    allowed = algorithms_for(kty, crv if isinstance(crv, str) else None)
    if not allowed:
        raise ValueError(f"unsupported curve {crv!r}")
    alg = entry.get("alg")
    if alg is not None:
        if alg not in allowed:
            raise ValueError(f"the key's alg {alg!r} does not fit a {kty} key")
        allowed = frozenset({alg})
    public = {"kty": kty}
    for member in _PUBLIC_MEMBERS[kty]:
        if not isinstance(entry.get(member), str):
            raise ValueError(f"member {member!r} is missing or not a string")
        public[member] = entry[member]
    key: Any
    try:
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(public)
            if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
                raise ValueError(f"RSA keys under {MIN_RSA_BITS} bits are refused")
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(public)
        else:
            key = OKPAlgorithm.from_jwk(public)
    except (InvalidKeyError, TypeError) as e:
        raise ValueError(f"unparseable key ({type(e).__name__})") from None
    return JsonWebKey(kid=kid, kty=kty, algorithms=allowed, key=key)


def parse_jwks(document: Any, *, source: str = "jwks_uri") -> List[JsonWebKey]:
    """
    Parse a JWK Set, keeping the usable keys (at most 100).

    :param document: the decoded JSON.
    :param source: where it came from, for log lines.
    :return: the usable keys (possibly none).
    :raises ProviderBadResponseError: not an object with a ``keys`` array.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ProviderBadResponseError("the key set is not an object with a 'keys' array")
    keys: List[JsonWebKey] = []
    for index, entry in enumerate(document["keys"][:MAX_KEYS]):
        try:
            keys.append(parse_jwk(entry))
        except ValueError as e:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            log.warn("{source}: key #{index} (kid {kid!r}) skipped: {reason}",
                     source=source, index=index,
                     kid=kid if isinstance(kid, str) else None, reason=str(e))
    return keys


def select_keys(
    keys: List[JsonWebKey], kid: Optional[str], alg: str
) -> Tuple[List[JsonWebKey], bool]:
    """
    The keys that may have signed a token with this header.

    With a ``kid``: the keys of that id that verify ``alg``.  Without:
    every key that verifies ``alg`` (one: use it; several: try them, at most
    `MAX_CANDIDATES`; more: none).

    :return: ``(candidates, ambiguous)``; ``ambiguous`` when there were too
        many candidates to try.
    """
    fitting = [k for k in keys if alg in k.algorithms]
    if kid is not None:
        return [k for k in fitting if k.kid == kid][:MAX_CANDIDATES], False
    if len(fitting) > MAX_CANDIDATES:
        return [], True
    return fitting, False


@attr.s(kw_only=True)
class JWKSCache:
    """
    A provider's keys, cached on the clock.

    :ivar jwks_uri: where the keys are published.
    :ivar http: the provider's HTTP client.
    :ivar clock: the cache's clock.
    :ivar max_age: seconds a fetched key set is used before it is fetched again.
    :ivar cooldown: least seconds between two fetches not due to age.
    :ivar fetches: how many fetches were started (observability, tests).
    """

    jwks_uri: str = attr.ib()
    http: ProviderHTTP = attr.ib()
    clock: IReactorTime = attr.ib()
    max_age: float = attr.ib(default=600.0)
    cooldown: float = attr.ib(default=30.0)
    fetches: int = attr.ib(default=0, init=False)
    _keys: Optional[List[JsonWebKey]] = attr.ib(default=None, init=False)
    _fetched_at: float = attr.ib(default=0.0, init=False)
    _attempted_at: Optional[float] = attr.ib(default=None, init=False)
    _inflight: bool = attr.ib(default=False, init=False)
    _waiters: List[Deferred[None]] = attr.ib(factory=list, init=False)

    def keys_for(self, kid: Optional[str], alg: str) -> Deferred[List[JsonWebKey]]:
        """
        The keys that may verify a token whose header names ``kid`` and ``alg``.

        :return: a Deferred firing with the candidates (empty: no key fits,
            reject the token), or failing with `ProviderUnavailableError`
            when there are no keys at all and none can be fetched.
        """
        return ensureDeferred(self._keys_for(kid, alg))

    def _cooled_down(self) -> bool:
        return (
            self._attempted_at is None
            or self.clock.seconds() - self._attempted_at >= self.cooldown
        )

    async def _keys_for(self, kid: Optional[str], alg: str) -> List[JsonWebKey]:
        now = self.clock.seconds()
        if self._keys is None:
            if not self._cooled_down() and not self._inflight:
                raise ProviderUnavailableError("the identity provider's keys cannot be fetched")
            await self._refresh()
        elif now - self._fetched_at >= self.max_age and (self._inflight or self._cooled_down()):
            await self._refresh()
        assert self._keys is not None
        candidates, ambiguous = select_keys(self._keys, kid, alg)
        if not candidates and not ambiguous and (self._inflight or self._cooled_down()):
            # An unknown kid: the provider may have rotated its keys.
            await self._refresh()
            candidates, _ = select_keys(self._keys, kid, alg)
        return candidates

    def _refresh(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if not self._inflight:
            self._inflight = True
            self._attempted_at = self.clock.seconds()
            self.fetches += 1
            d = self.http.get_json(self.jwks_uri, what="jwks_uri")
            d.addCallback(parse_jwks, source=self.jwks_uri)
            d.addBoth(self._fetched)
        return waiter

    def _fetched(self, result: Any) -> None:
        self._inflight = False
        waiters, self._waiters = self._waiters, []
        error: Optional[Failure] = None
        if isinstance(result, Failure):
            if self._keys is None:
                log.warn("{uri}: keys cannot be fetched ({kind}); logins answer 503",
                         uri=self.jwks_uri, kind=type(result.value).__name__)
                error = Failure(
                    ProviderUnavailableError("the identity provider's keys cannot be fetched")
                )
            else:
                log.warn("{uri}: keys cannot be fetched ({kind}); keeping the {n} cached",
                         uri=self.jwks_uri, kind=type(result.value).__name__, n=len(self._keys))
        else:
            self._keys = result
            self._fetched_at = self.clock.seconds()
            log.info("{uri}: {n} signing key(s) loaded", uri=self.jwks_uri, n=len(result))
        for waiter in waiters:
            if error is not None:
                waiter.errback(error)
            else:
                waiter.callback(None)
