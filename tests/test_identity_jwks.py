"""
Tests for `twistauth.identity.jwks`: parsing a JWK Set and the key cache.

Checklist cases 38-41 and R5's "warm JWKS cache keeps working while the
jwks_uri is down"; conformance rp-key-rotation-op-sign-key and the
kid-absent cases at the cache level.
"""

from __future__ import annotations

from typing import Any, Dict, List

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity.errors import ProviderBadResponseError, ProviderUnavailableError
from twistauth.identity.http import ProviderHTTP
from twistauth.identity.jwks import (
    JsonWebKey,
    JWKSCache,
    algorithms_for,
    parse_jwk,
    parse_jwks,
    select_keys,
)
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


def _ec_jwk(crv: Any = None, **extra: Any) -> Dict[str, Any]:
    key = ec.generate_private_key(crv or ec.SECP256R1())
    jwk: Dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(extra)
    return jwk


class ParseTests(SynchronousTestCase):
    """#40: unusable entries are skipped, never fatal."""

    def setUp(self) -> None:
        self.provider = FakeProvider(clock=Clock())
        self.good = self.provider.signing_key.public_jwk()

    def test_good_rsa_key(self) -> None:
        key = parse_jwk(self.good)
        self.assertEqual(key.kid, self.provider.signing_key.kid)
        self.assertEqual(key.algorithms, frozenset({"RS256"}))

    def test_rsa_without_alg_fits_rs_and_ps(self) -> None:
        jwk = dict(self.good)
        del jwk["alg"]
        self.assertEqual(parse_jwk(jwk).algorithms,
                         frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}))

    def test_algorithms_by_key_type(self) -> None:
        self.assertEqual(algorithms_for("EC", "P-256"), frozenset({"ES256"}))
        self.assertEqual(algorithms_for("EC", "P-384"), frozenset({"ES384"}))
        self.assertEqual(algorithms_for("EC", "P-521"), frozenset({"ES512"}))
        self.assertEqual(algorithms_for("OKP", "Ed25519"), frozenset({"EdDSA"}))
        self.assertEqual(algorithms_for("oct"), frozenset())
        self.assertEqual(algorithms_for("EC", "secp256k1"), frozenset())

    def test_ec_and_okp_keys(self) -> None:
        self.assertEqual(parse_jwk(_ec_jwk()).algorithms, frozenset({"ES256"}))
        self.assertEqual(parse_jwk(_ec_jwk(ec.SECP384R1())).algorithms, frozenset({"ES384"}))
        okp: Dict[str, Any] = OKPAlgorithm.to_jwk(
            ed25519.Ed25519PrivateKey.generate().public_key(), as_dict=True
        )
        self.assertEqual(parse_jwk(okp).algorithms, frozenset({"EdDSA"}))

    def test_unusable_entries(self) -> None:
        bad = {
            "not an object": "key",
            "no kty": {"kid": "x"},
            "oct key": {"kty": "oct", "k": "c2VjcmV0"},
            "unknown kty": {"kty": "XYZ"},
            "use enc": dict(self.good, use="enc"),
            "key_ops without verify": dict(self.good, key_ops=["encrypt"]),
            "private key published": dict(self.good, d="AQAB"),
            "alg of another type": dict(self.good, alg="ES256"),
            "alg none": dict(self.good, alg="none"),
            "HS alg on RSA": dict(self.good, alg="HS256"),
            "garbage modulus": dict(self.good, n="!!!"),
            "missing exponent": {k: v for k, v in self.good.items() if k != "e"},
            "kid not a string": dict(self.good, kid=5),
            "unknown curve": _ec_jwk(ec.SECP256K1()),
            "point off curve": dict(_ec_jwk(), y=_ec_jwk()["y"]),
        }
        for what, entry in bad.items():
            with self.subTest(what):
                self.assertRaises(ValueError, parse_jwk, entry)

    def test_weak_rsa_key_skipped(self) -> None:
        self.provider.misbehave("jwks", "weak_key", "unparseable_key", "oct_key")
        document = self.provider.jwks()
        self.assertEqual(len(document["keys"]), 4)
        keys = parse_jwks(document)
        self.assertEqual([k.kid for k in keys], [self.provider.signing_key.kid])

    def test_not_a_key_set(self) -> None:
        for document in ([], {"keys": {}}, {"nokeys": []}, "x", None):
            self.assertRaises(ProviderBadResponseError, parse_jwks, document)
        self.assertEqual(parse_jwks({"keys": []}), [])

    def test_at_most_100_keys(self) -> None:
        self.assertEqual(len(parse_jwks({"keys": [self.good] * 150})), 100)


class SelectTests(SynchronousTestCase):
    """#40: which keys are tried for a header."""

    def keys(self, *specs: Any) -> List[JsonWebKey]:
        return [JsonWebKey(kid=kid, kty="RSA", algorithms=frozenset(algs), key=object())
                for kid, algs in specs]

    def test_kid_selects(self) -> None:
        keys = self.keys(("a", {"RS256"}), ("b", {"RS256"}))
        self.assertEqual([k.kid for k in select_keys(keys, "b", "RS256")[0]], ["b"])
        self.assertEqual(select_keys(keys, "b", "ES256"), ([], False))
        self.assertEqual(select_keys(keys, "c", "RS256"), ([], False))

    def test_kid_absent(self) -> None:
        keys = self.keys(("a", {"RS256"}), ("e", {"ES256"}))
        self.assertEqual([k.kid for k in select_keys(keys, None, "RS256")[0]], ["a"])
        four = self.keys(*[(str(i), {"RS256"}) for i in range(4)])
        self.assertEqual(len(select_keys(four, None, "RS256")[0]), 4)
        five = self.keys(*[(str(i), {"RS256"}) for i in range(5)])
        self.assertEqual(select_keys(five, None, "RS256"), ([], True))


class CacheTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock)
        self.stub = self.provider.stub()
        self.http = ProviderHTTP(client=self.stub, clock=self.clock)
        self.cache = JWKSCache(jwks_uri=self.provider.url("jwks"), http=self.http,
                               clock=self.clock)

    def kids(self, kid: Any, alg: str = "RS256") -> List[Any]:
        return [k.kid for k in self.successResultOf(self.cache.keys_for(kid, alg))]


class CacheTests(CacheTestCase):
    def test_first_use_fetches_once(self) -> None:
        kid = self.provider.signing_key.kid
        self.assertEqual(self.kids(kid), [kid])
        self.assertEqual(self.kids(kid), [kid])
        self.assertEqual(self.provider.hits["jwks"], 1)
        self.assertEqual(self.cache.fetches, 1)

    def test_unknown_kid_one_refetch(self) -> None:
        """#38, conformance rp-key-rotation-op-sign-key: a new kid forces one
        refetch, after which the new key verifies."""
        self.kids(self.provider.signing_key.kid)
        self.clock.advance(60)
        new = self.provider.rotate_keys()
        self.assertEqual(self.kids(new.kid), [new.kid])
        self.assertEqual(self.provider.hits["jwks"], 2)

    def test_still_unknown_kid_rejected(self) -> None:
        """#38: still unknown after the refetch → no key (the token is rejected)."""
        self.kids(self.provider.signing_key.kid)
        self.clock.advance(60)
        self.assertEqual(self.kids("no-such-kid"), [])
        self.assertEqual(self.provider.hits["jwks"], 2)

    def test_rotation_just_before_signing(self) -> None:
        """Conformance …-signing-key-rotation-just-before-signing: the very first
        token already carries a new kid; the first fetch finds it."""
        new = self.provider.rotate_keys(keep_old=False)
        self.assertEqual(self.kids(new.kid), [new.kid])
        self.assertEqual(self.provider.hits["jwks"], 1)

    def test_flood_of_random_kids(self) -> None:
        """#39: ≤1 fetch per cooldown for any number of unknown kids."""
        self.kids(self.provider.signing_key.kid)
        for i in range(200):
            self.assertEqual(self.kids(f"random-{i}"), [])
        self.assertEqual(self.provider.hits["jwks"], 1, "the first fetch was <30 s ago")
        self.clock.advance(30)
        for i in range(200):
            self.kids(f"random-again-{i}")
        self.assertEqual(self.provider.hits["jwks"], 2)
        self.clock.advance(29)
        self.kids("one-more")
        self.assertEqual(self.provider.hits["jwks"], 2)

    def test_concurrent_misses_share_one_fetch(self) -> None:
        """#39: misses while a fetch is in flight wait for that fetch."""
        self.kids(self.provider.signing_key.kid)
        self.clock.advance(31)
        new = self.provider.rotate_keys()
        self.provider.misbehave("jwks", "slow")
        self.provider.slow_seconds = 1
        pending = [self.cache.keys_for(new.kid if i % 2 else f"x{i}", "RS256")
                   for i in range(20)]
        for d in pending:
            self.assertNoResult(d)
        self.assertEqual(self.provider.hits["jwks"], 2)
        self.clock.advance(1)
        self.stub.flush()
        results = [self.successResultOf(d) for d in pending]
        self.assertEqual([len(r) for r in results], [0, 1] * 10)
        self.assertEqual(self.provider.hits["jwks"], 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_max_age_refresh_drops_removed_keys(self) -> None:
        """#41: after 10 minutes the keys are fetched again; a removed key
        stops verifying."""
        old = self.provider.signing_key.kid
        self.kids(old)
        self.provider.rotate_keys(keep_old=False)
        self.clock.advance(599)
        self.assertEqual(self.kids(old), [old])
        self.assertEqual(self.provider.hits["jwks"], 1)
        self.clock.advance(1)
        self.assertEqual(self.kids(old), [])
        self.assertEqual(self.provider.hits["jwks"], 2)

    def test_stale_if_error(self) -> None:
        """#41, R5: a failed refetch keeps the cached keys."""
        kid = self.provider.signing_key.kid
        self.kids(kid)
        self.clock.advance(601)
        self.provider.misbehave("jwks", "error_500")
        self.assertEqual(self.kids(kid), [kid])
        self.assertEqual(self.provider.hits["jwks"], 2)
        # ... and does not hammer the provider meanwhile.
        self.assertEqual(self.kids(kid), [kid])
        self.assertEqual(self.provider.hits["jwks"], 2)
        self.clock.advance(30)
        self.provider.behave()
        self.assertEqual(self.kids(kid), [kid])
        self.assertEqual(self.provider.hits["jwks"], 3)

    def test_stale_if_timeout(self) -> None:
        """R5: jwks_uri stalls; after the 5 s deadline the cached keys serve."""
        kid = self.provider.signing_key.kid
        self.kids(kid)
        self.clock.advance(601)
        self.provider.misbehave("jwks", "stall")
        d = self.cache.keys_for(kid, "RS256")
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual([k.kid for k in self.successResultOf(d)], [kid])
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_cache_and_failure_is_503(self) -> None:
        """#41: no keys at all → 503, never 500."""
        self.provider.misbehave("jwks", "error_500")
        failure = self.failureResultOf(self.cache.keys_for("k", "RS256"),
                                       ProviderUnavailableError)
        self.assertEqual(failure.value.status, 503)
        # Within the cooldown it fails fast, without asking again.
        self.failureResultOf(self.cache.keys_for("k", "RS256"), ProviderUnavailableError)
        self.assertEqual(self.provider.hits["jwks"], 1)
        self.clock.advance(30)
        self.provider.behave()
        kid = self.provider.signing_key.kid
        self.assertEqual(self.kids(kid), [kid])

    def test_garbled_key_set_with_no_cache(self) -> None:
        self.provider.misbehave("jwks", "garbled")
        self.failureResultOf(self.cache.keys_for("k", "RS256"), ProviderUnavailableError)

    def test_kid_absent_single_and_multiple(self) -> None:
        """#40 at the cache: kid absent → the fitting keys (≤4)."""
        self.assertEqual(len(self.kids(None)), 1)
        self.assertEqual(self.kids(None, "ES256"), [])
        self.clock.advance(31)
        for _ in range(4):
            self.provider.rotate_keys()
        self.assertEqual(len(self.provider.keys), 5)
        self.clock.advance(600)
        self.assertEqual(self.kids(None), [], "five candidates: too many to try")

    def test_cancel_one_waiter(self) -> None:
        """A caller that gives up does not cancel the shared fetch."""
        self.provider.misbehave("jwks", "slow")
        self.provider.slow_seconds = 1
        first = self.cache.keys_for(None, "RS256")
        second = self.cache.keys_for(None, "RS256")
        first.cancel()
        self.failureResultOf(first)
        self.clock.advance(1)
        self.stub.flush()
        self.assertEqual(len(self.successResultOf(second)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
