"""
Tests for `twistauth.identity.jose`: one function verifies a JWT's signature
and claims together; ID token rules of OpenID Connect Core §3.1.3.7.

Checklist cases 20-34, 46 and R8; the OpenID conformance RP cases on ID
tokens (bad signature, alg none, wrong iss/aud, missing iat/sub, bad nonce,
kid absent) at the token level (the whole-login versions are in
test_identity_client.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Dict, List, Optional

import attr
import jwt
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity import jose
from twistauth.identity.errors import InvalidTokenError
from twistauth.identity.jose import (
    JWTRules,
    token_hash,
    validate_id_token,
    verify_jwt,
)
from twistauth.identity.jwks import JsonWebKey, parse_jwks, select_keys
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: Any) -> str:
    return _b64(json.dumps(value).encode())


class JoseTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock)
        self.rules = JWTRules(
            issuer=self.provider.issuer,
            audience=self.provider.client_id,
            algorithms=frozenset({"RS256", "PS256", "ES256"}),
            leeway=30,
        )
        self.lookups: List[Any] = []

    def keys(self, kid: Optional[str], alg: str) -> Deferred[List[JsonWebKey]]:
        self.lookups.append((kid, alg))
        return succeed(select_keys(parse_jwks(self.provider.jwks()), kid, alg)[0])

    def verify(self, token: Any, **rules: Any) -> Dict[str, Any]:
        r = attr.evolve(self.rules, **rules) if rules else self.rules
        d = Deferred.fromCoroutine(
            verify_jwt(token, rules=r, keys=self.keys, now=self.clock.seconds())
        )
        return self.successResultOf(d).claims

    def id_token_result(self, token: Any, **kwargs: Any) -> Deferred[Dict[str, Any]]:
        kwargs.setdefault("nonce", "n-0S6_WzA2Mj")
        rules = kwargs.pop("rules", self.rules)
        return Deferred.fromCoroutine(
            validate_id_token(token, rules=rules, keys=self.keys, now=self.clock.seconds(),
                              **kwargs)
        )

    def assertRejected(self, token: Any, fragment: str = "", **kwargs: Any) -> InvalidTokenError:
        failure = self.failureResultOf(self.id_token_result(token, **kwargs), InvalidTokenError)
        error = failure.value
        self.assertEqual(error.status, 400)
        self.assertIn(fragment, str(error))
        return error

    def accepted(self, token: Any, **kwargs: Any) -> Dict[str, Any]:
        return self.successResultOf(self.id_token_result(token, **kwargs))

    def id_token(self, *faults: str, **kwargs: Any) -> str:
        kwargs.setdefault("nonce", "n-0S6_WzA2Mj")
        return self.provider.issue_id_token(faults=faults, **kwargs)


class SignatureTests(JoseTestCase):
    """Checklist #20-#24: signature, algorithm and header rules."""

    def test_valid_rs256(self) -> None:
        claims = self.accepted(self.id_token())
        self.assertEqual(claims["sub"], "alice")

    def test_valid_es256(self) -> None:
        self.provider.rotate_keys(algorithm="ES256")
        claims = self.accepted(self.id_token())
        self.assertEqual(claims["iss"], self.provider.issuer)

    def test_valid_ps256(self) -> None:
        key = self.provider.signing_key
        claims = {"iss": self.provider.issuer, "sub": "alice", "aud": self.provider.client_id,
                  "iat": EPOCH, "exp": EPOCH + 60, "nonce": "n-0S6_WzA2Mj"}
        token = jwt.encode(claims, key.private_key, algorithm="PS256", headers={"kid": key.kid})
        # The published JWK says alg RS256: a PS256 token does not fit it.
        self.assertRejected(token, "no signing key")
        jwk = key.public_jwk()
        del jwk["alg"]
        parsed = parse_jwks({"keys": [jwk]})
        d = Deferred.fromCoroutine(validate_id_token(
            token, rules=self.rules, keys=lambda kid, alg: succeed(parsed),
            now=self.clock.seconds(), nonce="n-0S6_WzA2Mj",
        ))
        self.assertEqual(self.successResultOf(d)["sub"], "alice")

    def test_bad_signature_rs256(self) -> None:
        """#20, conformance oidcc-client-test-invalid-sig-rs256."""
        self.assertRejected(self.id_token("bad_signature"), "signature")

    def test_bad_signature_es256(self) -> None:
        """#20, conformance oidcc-client-test-invalid-sig-es256."""
        self.provider.rotate_keys(algorithm="ES256")
        self.assertRejected(self.id_token("bad_signature"), "signature")

    def test_alg_none(self) -> None:
        """#21, conformance oidcc-client-test-idtoken-sig-none."""
        self.assertRejected(self.id_token("alg_none"))

    def test_alg_none_with_signature(self) -> None:
        """#21: ``none`` with a trailing signature (CVE-2026-28802's shape)."""
        self.assertRejected(self.id_token("alg_none_signed"), "not signed")

    def test_alg_none_any_case(self) -> None:
        claims = {"iss": self.provider.issuer}
        for alg in ("none", "None", "NONE", "nOnE"):
            token = f"{_b64json({'alg': alg})}.{_b64json(claims)}.{_b64(b'sig')}"
            self.assertRejected(token, "not signed")

    def test_none_never_allowed_in_rules(self) -> None:
        self.assertRaises(ValueError, attr.evolve, self.rules, algorithms={"RS256", "none"})

    def test_alg_outside_allowlist(self) -> None:
        """#22: RS256 is the provider's algorithm but not configured."""
        self.assertRejected(self.id_token(), "not allowed",
                            rules=attr.evolve(self.rules, algorithms={"ES256"}))

    def test_hs256_with_public_key_as_secret(self) -> None:
        """#22: an HS256 token HMAC'd with the provider's public PEM (CVE-2022-29217)."""
        self.assertRejected(self.id_token("hs256_public_key"), "not allowed")
        # Even with HS256 configured, the key is the client secret, never a JWKS key.
        rules = attr.evolve(self.rules, algorithms={"RS256", "HS256"},
                            hmac_secret=b"the-client-secret-of-32-bytes-ok")
        self.assertRejected(self.id_token("hs256_public_key"), "signature", rules=rules)

    def test_hs256_with_client_secret_when_configured(self) -> None:
        """#22: HS* only if explicitly configured, verified with the client secret."""
        secret = b"the-client-secret-of-32-bytes-ok"
        claims = {"iss": self.provider.issuer, "sub": "alice", "aud": self.provider.client_id,
                  "iat": EPOCH, "exp": EPOCH + 60, "nonce": "n-0S6_WzA2Mj"}
        token = jwt.encode(claims, secret, algorithm="HS256")
        self.assertRejected(token, "not allowed")
        rules = attr.evolve(self.rules, algorithms={"RS256", "HS256"}, hmac_secret=secret)
        self.assertEqual(self.accepted(token, rules=rules)["sub"], "alice")
        self.assertEqual(self.lookups, [], "an HS token never consults the JWKS")
        no_secret = attr.evolve(rules, hmac_secret=None)
        self.assertRejected(token, "not allowed", rules=no_secret)

    def test_hs256_with_short_secret_refused(self) -> None:
        secret = b"short"
        claims = {"iss": self.provider.issuer, "sub": "alice", "aud": self.provider.client_id,
                  "iat": EPOCH, "exp": EPOCH + 60, "nonce": "n-0S6_WzA2Mj"}
        signing_input = f"{_b64json({'alg': 'HS256'})}.{_b64json(claims)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        rules = attr.evolve(self.rules, algorithms={"HS256"}, hmac_secret=secret)
        self.assertRejected(f"{signing_input}.{_b64(mac)}", "too weak", rules=rules)

    def test_embedded_jwk_header_ignored(self) -> None:
        """#23: a token signed by an attacker who embeds their key in ``jwk``."""
        self.assertRejected(self.id_token("jwk_header"), "signature")

    def test_jku_header_ignored(self) -> None:
        """#23: ``jku`` pointing at the attacker's key set is never fetched."""
        self.assertRejected(self.id_token("jku_header"), "signature")
        self.assertEqual(self.lookups, [(self.provider.signing_key.kid, "RS256")])

    def test_crit_rejected(self) -> None:
        """#24: ``crit`` naming an extension twistauth does not understand."""
        self.assertRejected(self.id_token("crit"), "critical")

    def test_crit_b64_rejected(self) -> None:
        token = self.provider.sign({"iss": "x"}, header={"crit": ["b64"], "b64": True})
        self.assertRejected(token, "critical")

    def test_unknown_kid_rejected(self) -> None:
        self.assertRejected(self.id_token("unknown_kid"), "no signing key")

    def test_kid_absent_single_key(self) -> None:
        """#40, conformance oidcc-client-test-kid-absent-single-jwks."""
        self.assertEqual(self.accepted(self.id_token("kid_absent"))["sub"], "alice")

    def test_kid_absent_several_keys_tried(self) -> None:
        """#40, conformance oidcc-client-test-kid-absent-multiple-jwks: we try
        the (at most four) fitting keys."""
        self.provider.rotate_keys()
        self.provider.rotate_keys()
        self.assertEqual(len(self.provider.keys), 3)
        self.assertEqual(self.accepted(self.id_token("kid_absent"))["sub"], "alice")

    def test_wrong_alg_for_key_type(self) -> None:
        """An ES256 signature under the kid of the provider's RSA key."""
        self.assertRejected(self.id_token("wrong_alg"), "no signing key")


class FormTests(JoseTestCase):
    """Checklist #25: size and shape checked before any decoding."""

    def setUp(self) -> None:
        super().setUp()
        self.decoded: List[Any] = []
        real = jose._decode_segment

        def spy(segment: str) -> Any:
            self.decoded.append(segment)
            return real(segment)

        self.patch(jose, "_decode_segment", spy)

    def test_oversized_rejected_before_decoding(self) -> None:
        token = self.id_token(extra={"padding": "x" * (17 * 1024)})
        self.assertGreater(len(token), 16 * 1024)
        self.assertRejected(token, "longer than")
        self.assertEqual(self.decoded, [])
        self.assertEqual(self.lookups, [])

    def test_huge_header_rejected_before_decoding(self) -> None:
        header = _b64(b'{"alg":"RS256","x":"' + b"a" * 20000 + b'"}')
        self.assertRejected(f"{header}.e30.c2ln", "longer than")
        self.assertEqual(self.decoded, [])

    def test_segment_counts(self) -> None:
        valid = self.id_token()
        head, body, sig = valid.split(".")
        for token in (f"{head}.{body}", f"{head}.{body}.{sig}.{sig}", head, ""):
            self.assertRejected(token, "three segments")
        self.assertRejected(f"{head}.{body}.{sig}.{sig}.{sig}", "encrypted")
        self.assertEqual(self.decoded, [])

    def test_non_base64_rejected(self) -> None:
        head, body, sig = self.id_token().split(".")
        for token in (f"{head}.{body}.{sig}=", f"{head}!.{body}.{sig}", f"{head}.{body} .{sig}"):
            self.assertRejected(token, "base64url")
        self.assertEqual(self.decoded, [])

    def test_not_a_string(self) -> None:
        for token in (None, 12, ["a.b.c"], {"t": 1}):
            self.assertRejected(token, "not a string")
        self.assertRejected("é.b.c".encode(), "not ASCII")

    def test_header_not_json(self) -> None:
        self.assertRejected(f"{_b64(b'not json')}.e30.c2ln", "header")
        self.assertRejected(f"{_b64(b'[1]')}.e30.c2ln", "header")

    def test_bytes_token_accepted(self) -> None:
        self.assertEqual(self.accepted(self.id_token().encode())["sub"], "alice")


class ClaimTests(JoseTestCase):
    """Checklist #26-#34."""

    def test_wrong_issuer(self) -> None:
        """#26, conformance oidcc-client-test-invalid-iss."""
        self.assertRejected(self.id_token("wrong_iss"), "issuer")

    def test_issuer_trailing_slash(self) -> None:
        self.assertRejected(self.id_token("iss_trailing_slash"), "issuer")

    def test_issuer_prefix_and_substring(self) -> None:
        for iss in ("https://op.exampl", "https://op.example.attacker", "op.example",
                    "HTTPS://OP.EXAMPLE"):
            self.assertRejected(self.id_token(extra={"iss": iss}), "issuer")

    def test_issuer_array(self) -> None:
        """#26: array-valued iss (CVE-2026-75509's shape)."""
        self.assertRejected(self.id_token("iss_array"), "issuer")

    def test_wrong_audience(self) -> None:
        """#27, conformance oidcc-client-test-invalid-aud."""
        self.assertRejected(self.id_token("wrong_aud"), "aud")

    def test_missing_audience(self) -> None:
        """#27, conformance oidcc-client-test-missing-aud."""
        self.assertRejected(self.id_token("missing_aud"), "aud")

    def test_untrusted_extra_audience(self) -> None:
        self.assertRejected(self.id_token("extra_aud"), "untrusted")

    def test_trusted_extra_audience(self) -> None:
        rules = attr.evolve(self.rules, trusted_audiences={"another-client"})
        token = self.id_token("extra_aud")
        self.assertEqual(self.accepted(token, rules=rules)["aud"],
                         [self.provider.client_id, "another-client"])

    def test_wrong_azp(self) -> None:
        """#28."""
        self.assertRejected(self.id_token("wrong_azp"), "azp")
        rules = attr.evolve(self.rules, trusted_audiences={"another-client"})
        self.assertRejected(self.id_token("extra_aud", "wrong_azp"), "azp", rules=rules)

    def test_azp_equal_to_client(self) -> None:
        token = self.id_token(extra={"azp": self.provider.client_id})
        self.assertEqual(self.accepted(token)["azp"], self.provider.client_id)

    def test_missing_exp(self) -> None:
        """#29."""
        self.assertRejected(self.id_token("missing_exp"), "exp")

    def test_expired(self) -> None:
        self.assertRejected(self.id_token("expired"), "expired")

    def test_missing_iat(self) -> None:
        """#29, conformance oidcc-client-test-missing-iat."""
        self.assertRejected(self.id_token("missing_iat"), "iat")

    def test_iat_in_future(self) -> None:
        self.assertRejected(self.id_token("iat_future"), "future")

    def test_iat_too_old(self) -> None:
        """#29: issued more than 10 minutes ago (plus leeway)."""
        self.assertRejected(self.id_token("iat_old"), "too long ago")
        token = self.id_token(extra={"iat": EPOCH - 600 - 29})
        self.accepted(token)

    def test_nbf_in_future(self) -> None:
        self.assertRejected(self.id_token(extra={"nbf": EPOCH + 300}), "nbf")

    def test_missing_sub(self) -> None:
        """#30, conformance oidcc-client-test-missing-sub."""
        self.assertRejected(self.id_token("missing_sub"), "sub")

    def test_sub_empty_long_or_not_ascii(self) -> None:
        """#30."""
        self.assertRejected(self.id_token(extra={"sub": ""}), "sub")
        self.assertRejected(self.id_token("sub_too_long"), "sub")
        self.assertRejected(self.id_token(extra={"sub": "ålice"}), "sub")
        self.assertRejected(self.id_token(extra={"sub": "a\nb"}), "sub")
        self.assertEqual(self.accepted(self.id_token(extra={"sub": "x" * 255}))["sub"], "x" * 255)

    def test_bad_nonce(self) -> None:
        """#31, conformance oidcc-client-test-nonce-invalid."""
        self.assertRejected(self.id_token("bad_nonce"), "nonce")

    def test_missing_nonce(self) -> None:
        self.assertRejected(self.id_token("missing_nonce"), "nonce")

    def test_nonce_compared_in_constant_time(self) -> None:
        compared: List[Any] = []
        real = hmac.compare_digest

        def spy(a: Any, b: Any) -> bool:
            compared.append((a, b))
            return real(a, b)

        self.patch(jose.hmac, "compare_digest", spy)
        self.accepted(self.id_token())
        self.assertIn((b"n-0S6_WzA2Mj", b"n-0S6_WzA2Mj"), compared)

    def test_bad_at_hash(self) -> None:
        """#32."""
        token = self.id_token("bad_at_hash", access_token="the-access-token")
        self.assertRejected(token, "at_hash", access_token="the-access-token")

    def test_at_hash_present_and_right(self) -> None:
        token = self.id_token(access_token="the-access-token")
        claims = self.accepted(token, access_token="the-access-token")
        self.assertEqual(claims["at_hash"], token_hash("the-access-token", "RS256"))
        self.assertRejected(token, "at_hash", access_token="another-access-token")

    def test_at_hash_absent_accepted(self) -> None:
        claims = self.accepted(self.id_token(), access_token="the-access-token")
        self.assertNotIn("at_hash", claims)

    def test_at_hash_vector(self) -> None:
        """OpenID Connect Core A.3's example: access token → at_hash."""
        self.assertEqual(
            token_hash("jHkWEdUXMU1BwAsC4vtUsZwnNvTIxEl0z9K3vx5KF0Y", "RS256"),
            "77QmUPtjPfzWtF2AnpK9RQ",
        )

    def test_max_age_requires_auth_time(self) -> None:
        """#33."""
        self.assertRejected(self.id_token("missing_auth_time"), "auth_time", max_age=300)
        self.assertRejected(self.id_token("old_auth_time"), "max_age", max_age=300)
        claims = self.accepted(self.id_token(auth_time=EPOCH - 200), max_age=300)
        self.assertEqual(claims["auth_time"], EPOCH - 200)
        # Without max_age, an old auth_time is fine.
        self.accepted(self.id_token("old_auth_time"))

    def test_wrong_json_types(self) -> None:
        """#34: claims of the wrong JSON type are a 400, never a 500."""
        cases = {
            "exp as string": self.id_token("exp_string"),
            "aud as object": self.id_token("aud_object"),
            "sub as number": self.id_token("sub_number"),
            "iat as bool": self.id_token(extra={"iat": True}),
            "exp as null": self.id_token(extra={"exp": None}),
            "nbf as list": self.id_token(extra={"nbf": [1]}),
            "aud list of numbers": self.id_token(extra={"aud": [1, 2]}),
            "empty aud list": self.id_token(extra={"aud": []}),
            "nonce as number": self.id_token(extra={"nonce": 5}),
            "auth_time as string": self.id_token(extra={"auth_time": "now"}),
            "azp as list": self.id_token(extra={"azp": [self.provider.client_id]}),
            "sid as number": self.id_token(extra={"sid": 7}),
            "jti as object": self.id_token(extra={"jti": {}}),
            "at_hash as number": self.id_token(extra={"at_hash": 3}),
        }
        for what, token in cases.items():
            failure = self.failureResultOf(
                self.id_token_result(token, access_token="the-access-token"), InvalidTokenError
            )
            self.assertEqual(failure.value.status, 400, what)

    def test_payload_not_an_object(self) -> None:
        key = self.provider.signing_key
        head = _b64json({"alg": "RS256", "kid": key.kid})
        body = _b64json([1, 2])
        signature = jwt.get_algorithm_by_name("RS256").sign(
            f"{head}.{body}".encode(), key.private_key
        )
        self.assertRejected(f"{head}.{body}.{_b64(signature)}", "decoded")

    def test_unknown_claims_ignored(self) -> None:
        claims = self.accepted(self.id_token(extra={"ignored_claim": {"a": [1]}}))
        self.assertEqual(claims["ignored_claim"], {"a": [1]})


class ClockSkewTests(JoseTestCase):
    """R8: skew within the leeway is accepted, beyond it rejected."""

    def test_iat_skew(self) -> None:
        self.accepted(self.id_token(extra={"iat": EPOCH + 29, "exp": EPOCH + 600}))
        self.assertRejected(self.id_token(extra={"iat": EPOCH + 31, "exp": EPOCH + 600}),
                            "future")

    def test_exp_skew(self) -> None:
        self.accepted(self.id_token(extra={"iat": EPOCH - 100, "exp": EPOCH - 29}))
        self.assertRejected(self.id_token(extra={"iat": EPOCH - 100, "exp": EPOCH - 30}),
                            "expired")

    def test_leeway_capped_at_60(self) -> None:
        self.assertRaises(ValueError, attr.evolve, self.rules, leeway=61)
        rules = attr.evolve(self.rules, leeway=60)
        self.accepted(self.id_token(extra={"iat": EPOCH + 59, "exp": EPOCH + 600}), rules=rules)

    def test_uses_injected_clock(self) -> None:
        """The wall clock is never read: a token valid on the clock passes
        although its dates are far in the past of the real time."""
        self.clock = Clock()
        self.clock.advance(1000)
        self.provider.clock = self.clock
        claims = self.accepted(self.id_token())
        self.assertEqual(claims["iat"], 1000)


class RefreshedIdTokenTests(JoseTestCase):
    """Checklist #46: a refreshed ID token names the same identity."""

    def setUp(self) -> None:
        super().setUp()
        self.original = self.accepted(self.id_token())

    def refreshed(self, token: str) -> Deferred[Dict[str, Any]]:
        return self.id_token_result(token, nonce=None, original=self.original)

    def test_same_identity_accepted(self) -> None:
        claims = self.successResultOf(self.refreshed(self.provider.issue_id_token()))
        self.assertEqual(claims["sub"], "alice")

    def test_other_sub_rejected(self) -> None:
        failure = self.failureResultOf(
            self.refreshed(self.provider.issue_id_token(faults=["sub_changed"])),
            InvalidTokenError,
        )
        self.assertIn("another identity", str(failure.value))

    def test_other_audience_rejected(self) -> None:
        rules = attr.evolve(self.rules, trusted_audiences={"another-client"})
        d = self.id_token_result(self.provider.issue_id_token(faults=["extra_aud"]), nonce=None,
                                 original=self.original, rules=rules)
        self.assertIn("audiences", str(self.failureResultOf(d, InvalidTokenError).value))

    def test_other_nonce_rejected(self) -> None:
        d = self.refreshed(self.provider.issue_id_token(nonce="another"))
        self.assertIn("nonce", str(self.failureResultOf(d, InvalidTokenError).value))

    def test_wrong_issuer_rejected(self) -> None:
        d = self.refreshed(self.provider.issue_id_token(faults=["wrong_iss"]))
        self.failureResultOf(d, InvalidTokenError)


class LogoutTokenAsIdTokenTests(JoseTestCase):
    def test_logout_token_is_not_an_id_token(self) -> None:
        """#58's converse: a logout token replayed as an ID token has no nonce."""
        token = self.provider.issue_logout_token()
        self.assertRejected(token, "nonce")
