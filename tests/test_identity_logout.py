"""
Tests for back-channel logout token validation (Back-Channel Logout 1.0
§2.4/§2.6): checklist cases 53-62 as far as the token goes (the route's 405,
413 and the session ending are the lead's), and the OpenID conformance
``oidcc-client-test-rp-backchannel-rpinitlogout-lt-*`` cases: alg none,
wrong alg, wrong iss, wrong aud, no event, wrong event, with nonce; plus a
replayed jti.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity.errors import InvalidLogoutTokenError, InvalidTokenError
from twistauth.identity.jose import LogoutRequest, jti_key
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


class MemoryJtiStore:
    """A replay cache on the clock, as the lead's store will be (SET NX EX)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: Dict[str, float] = {}
        self.calls: List[Tuple[str, float]] = []

    def seen(self, key: str, expires_at: float) -> Deferred[bool]:
        self.calls.append((key, expires_at))
        now = self.clock.seconds()
        if key in self.entries and self.entries[key] > now:
            return succeed(True)
        self.entries[key] = expires_at
        return succeed(False)


class LogoutTokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock)
        self.rp = self.provider.relying_party()
        self.store = MemoryJtiStore(self.clock)

    def validate(self, token: Any, rp: Any = None) -> Deferred[LogoutRequest]:
        return (rp or self.rp).validate_logout_token(token, jti_seen=self.store.seen)

    def accepted(self, token: Any, rp: Any = None) -> LogoutRequest:
        return self.successResultOf(self.validate(token, rp))

    def assertRejected(self, token: Any, fragment: str = "", rp: Any = None) -> None:
        failure = self.failureResultOf(self.validate(token, rp), InvalidLogoutTokenError)
        self.assertEqual(failure.value.status, 400)
        self.assertEqual(failure.value.name, "invalid_logout_token")
        self.assertIsInstance(failure.value, InvalidTokenError)
        self.assertIn(fragment, str(failure.value))

    def token(self, *faults: str, **kwargs: Any) -> str:
        kwargs.setdefault("sid", "provider-session-1")
        return self.provider.issue_logout_token(faults=faults, **kwargs)

    # -- accepted ------------------------------------------------------

    def test_valid_with_sid(self) -> None:
        """#50: a token with sid; the unknown ``ignored_claim`` is ignored."""
        request = self.accepted(self.token())
        self.assertEqual(request.sid, "provider-session-1")
        self.assertIsNone(request.subject)
        self.assertEqual(request.issuer, self.provider.issuer)
        self.assertEqual(request.issued_at, EPOCH)

    def test_valid_with_sub_only(self) -> None:
        """#51: sub only: every session of (iss, sub)."""
        request = self.accepted(self.provider.issue_logout_token(sub="alice"))
        self.assertEqual(request.subject, "alice")
        self.assertIsNone(request.sid)

    def test_valid_with_sub_and_sid(self) -> None:
        request = self.accepted(self.token(sub="alice"))
        self.assertEqual((request.subject, request.sid), ("alice", "provider-session-1"))

    def test_sid_not_in_repr(self) -> None:
        self.assertNotIn("provider-session-1", repr(self.accepted(self.token())))

    # -- rejected (#53-#62) --------------------------------------------

    def test_undecodable(self) -> None:
        """#53: no token, not a JWT."""
        for token in (None, "", "not-a-jwt", "a.b.c", "é"):
            self.assertRejected(token)

    def test_alg_none(self) -> None:
        """#54, conformance …-lt-alg-none."""
        self.assertRejected(self.token("alg_none"))
        self.assertRejected(self.token("alg_none_signed"), "not signed")

    def test_bad_signature(self) -> None:
        """#55."""
        self.assertRejected(self.token("bad_signature"), "signature")

    def test_wrong_alg(self) -> None:
        """#55, conformance …-lt-wrong-alg: ES256 when the provider signs RS256."""
        self.assertRejected(self.token("wrong_alg"))
        rp = self.provider.relying_party(allowed_algs=["RS256"])
        self.assertRejected(self.token("wrong_alg"), "not allowed", rp=rp)

    def test_hs256_with_public_key(self) -> None:
        self.assertRejected(self.token("hs256_public_key"), "not allowed")

    def test_wrong_issuer(self) -> None:
        """#56, conformance …-lt-wrong-iss."""
        self.assertRejected(self.token("wrong_iss"), "issuer")

    def test_wrong_audience(self) -> None:
        """#56, conformance …-lt-wrong-aud."""
        self.assertRejected(self.token("wrong_aud"), "aud")
        self.assertRejected(self.token("missing_aud"), "aud")

    def test_no_event(self) -> None:
        """#57, conformance …-lt-no-event."""
        self.assertRejected(self.token("no_event"), "events")

    def test_wrong_event(self) -> None:
        """#57, conformance …-lt-wrong-event."""
        self.assertRejected(self.token("wrong_event"), "event")

    def test_event_not_an_object(self) -> None:
        """#57: the member must be a JSON object."""
        self.assertRejected(self.token("event_not_object"), "event")
        self.assertRejected(self.token(extra={"events": ["x"]}), "event")

    def test_with_nonce(self) -> None:
        """#58, conformance …-lt-with-nonce."""
        self.assertRejected(self.token("with_nonce"), "nonce")

    def test_id_token_is_not_a_logout_token(self) -> None:
        """#58: an ID token posted here fails (no events, a nonce)."""
        self.assertRejected(self.provider.issue_id_token(nonce="n", sid="s"))

    def test_neither_sub_nor_sid(self) -> None:
        """#59."""
        self.assertRejected(self.token("no_sub_no_sid"), "neither")

    def test_missing_jti(self) -> None:
        """#59."""
        self.assertRejected(self.token("missing_jti"), "jti")

    def test_missing_iat(self) -> None:
        """#59."""
        self.assertRejected(self.token("missing_iat"), "iat")

    def test_expired(self) -> None:
        """#60: exp in the past."""
        self.assertRejected(self.token("expired"), "expired")

    def test_no_exp_recent_iat_accepted(self) -> None:
        """#60: 2022-era providers omit exp: accepted within 120 s + leeway."""
        token = self.token("no_exp", extra={"iat": EPOCH - 140})
        request = self.accepted(token)
        self.assertEqual(request.expires_at, EPOCH + 30)

    def test_no_exp_old_iat_rejected(self) -> None:
        """#60."""
        self.assertRejected(self.token("no_exp", extra={"iat": EPOCH - 151}), "too long ago")

    def test_iat_in_future(self) -> None:
        self.assertRejected(self.token(extra={"iat": EPOCH + 31, "exp": EPOCH + 150}), "future")

    def test_wrong_claim_types(self) -> None:
        for extra in ({"sid": 12}, {"sub": ["alice"]}, {"jti": 7}, {"iat": "now"},
                      {"exp": "later"}, {"events": None}, {"aud": {"a": 1}}):
            self.assertRejected(self.token(extra=extra))

    def test_replayed_jti(self) -> None:
        """#61: the same jti within its lifetime is refused."""
        token = self.token(jti="logout-1")
        self.accepted(token)
        self.assertRejected(token, "already used")
        # Another token with the same jti is a replay too.
        self.assertRejected(self.token(jti="logout-1", sub="alice"), "already used")
        self.accepted(self.token(jti="logout-2"))

    def test_jti_remembered_until_exp_plus_leeway(self) -> None:
        self.accepted(self.token(jti="logout-1"))
        [(key, expires_at)] = self.store.calls
        self.assertEqual(key, jti_key(self.provider.issuer, "logout-1"))
        self.assertEqual(expires_at, EPOCH + 120 + 30)

    def test_jti_key_namespaced_by_issuer(self) -> None:
        self.assertNotEqual(jti_key("https://a.example", "x"), jti_key("https://b.example", "x"))
        self.assertEqual(len(jti_key("https://a.example", "x" * 200)), 64)

    def test_invalid_token_never_recorded(self) -> None:
        """The replay cache is consulted only for otherwise valid tokens, so
        a forged token cannot burn a real token's jti."""
        self.assertRejected(self.token("bad_signature", jti="logout-1"))
        self.assertEqual(self.store.calls, [])
        self.accepted(self.token(jti="logout-1"))

    def test_store_failure_propagates(self) -> None:
        """#63: the store unreachable is not a valid logout (the route answers non-200)."""

        class StoreDown(Exception):
            pass

        def seen(key: str, expires_at: float) -> Deferred[bool]:
            d: Deferred[bool] = Deferred()
            d.errback(StoreDown())
            return d

        d = self.rp.validate_logout_token(self.token(), jti_seen=seen)
        self.failureResultOf(d, StoreDown)

    def test_jti_seen_may_be_a_coroutine(self) -> None:
        async def seen(key: str, expires_at: float) -> bool:
            return False

        request = self.successResultOf(self.rp.validate_logout_token(self.token(), jti_seen=seen))
        self.assertEqual(request.sid, "provider-session-1")

    def test_typ_logout_jwt_accepted(self) -> None:
        """#62: typ logout+jwt accepted; without requirement, a missing typ too."""
        self.accepted(self.token())
        self.accepted(self.token("no_typ"))

    def test_require_logout_typ(self) -> None:
        """#62: with require_logout_typ, a missing or other typ is refused."""
        rp = self.provider.relying_party(require_logout_typ=True)
        self.accepted(self.token(), rp=rp)
        self.accepted(self.token(extra={}, jti="j2"), rp=rp)
        self.assertRejected(self.token("no_typ"), "typ", rp=rp)
        id_token = self.provider.issue_id_token(sid="s")  # typ JWT
        self.assertRejected(id_token, "typ", rp=rp)

    def test_unknown_kid_triggers_one_refetch(self) -> None:
        """Key rotation applies to logout tokens too."""
        self.accepted(self.token())
        self.clock.advance(31)
        self.provider.rotate_keys(keep_old=False)
        self.accepted(self.token())
        self.assertEqual(self.provider.hits["jwks"], 2)
