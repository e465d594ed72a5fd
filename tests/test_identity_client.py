"""
Tests for `twistauth.identity.client.RelyingParty`: whole logins against the
fake provider, on a Clock through StubTreq.

Checklist cases 1, 2, 3 (expiry check), 7, 9, 10, 12, 17, 19, 35, 43, 45-47,
64 (the URL), 65 (the state check), R5 and R8; the OpenID conformance RP
cases of the basic, config and refresh plans that concern the client
(the token-level variants are in test_identity_jose.py).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict
from urllib.parse import parse_qsl, urlsplit

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity._urls import query_dict
from twistauth.identity.client import (
    LoginResult,
    RelyingParty,
    TokenSet,
    Transaction,
    check_logout_state,
    pkce_challenge,
    random_token,
)
from twistauth.identity.errors import (
    TRANSIENT_ERRORS,
    AuthorizationDeniedError,
    InvalidCallbackError,
    InvalidStateError,
    InvalidTokenError,
    IssuerMismatchError,
    LoginExpiredError,
    LoginFailedError,
    LoginRejectedError,
    ProviderBadResponseError,
    ProviderTimeoutError,
    RefreshRejectedError,
)
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


class ClientTestCase(SynchronousTestCase):
    provider_options: Dict[str, Any] = {}
    config_options: Dict[str, Any] = {"use_userinfo": True}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock, **self.provider_options)
        self.stub = self.provider.stub()
        self.rp: RelyingParty = self.provider.relying_party(http_client=self.stub,
                                                            **self.config_options)

    def start(self, return_to: Any = "/") -> Any:
        return self.successResultOf(self.rp.start(return_to))

    def callback(self, start: Any) -> Dict[str, str]:
        return self.provider.authorize(start.url)

    def login(self) -> LoginResult:
        return self.successResultOf(self.provider.log_in(self.rp))

    def failed_login(self, error: type, query_changes: Any = None) -> Any:
        start = self.start()
        query = self.callback(start)
        if query_changes is not None:
            query = query_changes(query)
        return self.failureResultOf(self.rp.finish(start.transaction, query), error).value


class HappyPathTests(ClientTestCase):
    def test_login(self) -> None:
        """Conformance oidcc-client-test (rp-response_type-code, rp-id_token-sig-rs256)."""
        start = self.start("/after?x=1")
        result = self.successResultOf(self.rp.finish(start.transaction, self.callback(start)))
        self.assertEqual(result.subject, "alice")
        self.assertEqual(result.issuer, self.provider.issuer)
        self.assertEqual(result.return_to, "/after?x=1")
        self.assertIsNotNone(result.sid)
        self.assertEqual(result.userinfo["email"], "alice@example.com")
        self.assertEqual(result.tokens.token_type, "Bearer")
        self.assertEqual(result.tokens.expires_at, EPOCH + 3600)
        self.assertTrue(result.tokens.refresh_token)
        self.assertEqual(result.claims["nonce"], start.transaction.nonce)
        self.assertEqual(dict(self.provider.hits), {"discovery": 1, "authorize": 1, "token": 1,
                                                    "jwks": 1, "userinfo": 1})

    def test_many_logins_one_discovery_one_jwks(self) -> None:
        for _ in range(5):
            self.login()
        self.assertEqual(self.provider.hits["discovery"], 1)
        self.assertEqual(self.provider.hits["jwks"], 1)
        self.assertEqual(self.provider.hits["token"], 5)

    def test_parallel_logins(self) -> None:
        """#6 (the client's part): two transactions in flight both finish."""
        first, second = self.start("/one"), self.start("/two")
        q1, q2 = self.callback(first), self.callback(second)
        r2 = self.successResultOf(self.rp.finish(second.transaction, q2))
        r1 = self.successResultOf(self.rp.finish(first.transaction, q1))
        self.assertEqual((r1.return_to, r2.return_to), ("/one", "/two"))

    def test_es256_provider(self) -> None:
        provider = FakeProvider(clock=self.clock, algorithm="ES256")
        result = self.successResultOf(provider.log_in(provider.relying_party()))
        self.assertEqual(result.subject, "alice")

    def test_without_userinfo(self) -> None:
        rp = self.provider.relying_party(use_userinfo=False)
        result = self.successResultOf(self.provider.log_in(rp))
        self.assertIsNone(result.userinfo)
        self.assertEqual(self.provider.hits["userinfo"], 0)

    def test_transaction_round_trip(self) -> None:
        start = self.start("/x")
        stored = start.transaction.to_dict()
        transaction = Transaction.from_dict(stored)
        self.assertEqual(transaction, start.transaction)
        self.successResultOf(self.rp.finish(transaction, self.callback(start)))
        for broken in ({}, dict(stored, created="yesterday"), dict(stored, state=None),
                       dict(stored, unknown=1)):
            self.assertRaises(InvalidStateError, Transaction.from_dict, broken)

    def test_secrets_not_in_reprs(self) -> None:
        start = self.start()
        result = self.successResultOf(self.rp.finish(start.transaction, self.callback(start)))
        text = repr(start) + repr(start.transaction) + repr(result) + repr(result.tokens)
        for secret in (start.transaction.state, start.transaction.nonce,
                       start.transaction.code_verifier, result.tokens.access_token,
                       result.tokens.refresh_token, result.tokens.id_token,
                       self.provider.client_secret):
            self.assertNotIn(secret, text)
        self.assertNotIn(self.provider.client_secret, repr(self.rp.config))

    def test_token_set_round_trip(self) -> None:
        tokens = self.login().tokens
        self.assertEqual(TokenSet.from_dict(tokens.to_dict()), tokens)
        self.assertFalse(tokens.expires_within(EPOCH, 60))
        self.assertTrue(tokens.expires_within(EPOCH + 3550, 60))


class AuthorizationRequestTests(ClientTestCase):
    def test_random_values(self) -> None:
        """#1: state, nonce and verifier: 32 CSPRNG bytes, 43 characters, fresh."""
        values = {random_token() for _ in range(30000)}
        self.assertEqual(len(values), 30000)
        self.assertEqual({len(v) for v in values}, {43})
        seen = set()
        for _ in range(300):
            t = self.start().transaction
            for value in (t.state, t.nonce, t.code_verifier):
                self.assertEqual(len(value), 43)
                self.assertNotIn(value, seen)
                seen.add(value)

    def test_pkce_s256(self) -> None:
        """#2: always S256; challenge = b64url(SHA-256(verifier))."""
        start = self.start()
        params = query_dict(start.url)
        self.assertEqual(params["code_challenge_method"], "S256")
        digest = hashlib.sha256(start.transaction.code_verifier.encode()).digest()
        self.assertEqual(params["code_challenge"],
                         base64.urlsafe_b64encode(digest).rstrip(b"=").decode())
        self.assertNotIn("plain", start.url)

    def test_pkce_vector(self) -> None:
        """RFC 7636 Appendix B."""
        self.assertEqual(pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
                         "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")

    def test_authorization_url(self) -> None:
        """#8, #17: response_type=code, redirect_uri from configuration."""
        start = self.start()
        parts = urlsplit(start.url)
        self.assertEqual(f"{parts.scheme}://{parts.netloc}{parts.path}",
                         self.provider.url("authorize"))
        params = dict(parse_qsl(parts.query))
        self.assertEqual(params["response_type"], "code")
        self.assertNotIn("response_mode", params)
        self.assertEqual(params["redirect_uri"], "https://rp.example/redirect")
        self.assertEqual(params["client_id"], self.provider.client_id)
        self.assertEqual(params["scope"], "openid profile email")
        self.assertEqual(params["state"], start.transaction.state)
        self.assertEqual(params["nonce"], start.transaction.nonce)
        self.assertEqual(start.transaction.issuer, self.provider.issuer)
        self.assertEqual(start.transaction.created, EPOCH)

    def test_extra_params_max_age_prompt(self) -> None:
        rp = self.provider.relying_party(extra_params={"hd": "example.com", "x": "a b&c"},
                                         max_age=300)
        start = self.successResultOf(rp.start("/", prompt="login", login_hint="alice@x"))
        params = query_dict(start.url)
        self.assertEqual((params["hd"], params["x"]), ("example.com", "a b&c"))
        self.assertEqual((params["max_age"], params["prompt"]), ("300", "login"))
        self.assertEqual(params["login_hint"], "alice@x")
        self.assertEqual(start.transaction.max_age, 300)

    def test_unsafe_return_to(self) -> None:
        """#13: the transaction keeps only safe return paths."""
        for unsafe in ("//evil.example", "/\\evil.example", "https://evil.example/",
                       "javascript:alert(1)", "/a\r\nSet-Cookie: x", None, 5):
            self.assertEqual(self.start(unsafe).transaction.return_to, "/")
        rp = RelyingParty(config=self.rp.config, http_client=self.stub, clock=self.clock,
                          return_origins=("https://app.example",))
        start = self.successResultOf(rp.start("https://app.example/dash"))
        self.assertEqual(start.transaction.return_to, "https://app.example/dash")


class CallbackTests(ClientTestCase):
    def test_missing_state(self) -> None:
        """#4 (the client's check): no state → 400, no token call."""
        def drop(q: Dict[str, str]) -> Dict[str, str]:
            return {k: v for k, v in q.items() if k != "state"}

        error = self.failed_login(InvalidStateError, drop)
        self.assertEqual(error.status, 400)
        self.assertEqual(self.provider.hits["token"], 0)

    def test_other_state(self) -> None:
        """#4, #14: a state that is not the transaction's → 400, no token call."""
        self.failed_login(InvalidStateError, lambda q: dict(q, state=random_token()))
        other = self.start()
        start = self.start()
        query = self.callback(start)
        self.failureResultOf(self.rp.finish(other.transaction, query), InvalidStateError)
        self.assertEqual(self.provider.hits["token"], 0)

    def test_transaction_of_another_provider(self) -> None:
        """#11: a transaction started for another provider → 400."""
        start = self.start()
        query = self.callback(start)
        foreign = attr.evolve(start.transaction, provider="other")
        self.failureResultOf(self.rp.finish(foreign, query), InvalidStateError)
        foreign = attr.evolve(start.transaction, issuer="https://other.example")
        self.failureResultOf(self.rp.finish(foreign, query), InvalidStateError)
        self.assertEqual(self.provider.hits["token"], 0)

    def test_expired_transaction(self) -> None:
        """#3: a callback after the login TTL → 400 login expired, no token call."""
        start = self.start()
        query = self.callback(start)
        self.clock.advance(600.5)
        error = self.failureResultOf(self.rp.finish(start.transaction, query),
                                     LoginExpiredError).value
        self.assertEqual(error.status, 400)
        self.assertEqual(self.provider.hits["token"], 0)

    def test_within_ttl(self) -> None:
        start = self.start()
        self.clock.advance(599)
        query = self.callback(start)
        self.successResultOf(self.rp.finish(start.transaction, query))

    def test_iss_mismatch(self) -> None:
        """#9: the iss parameter names another issuer → 400, no token call."""
        self.provider.misbehave("authorize", "wrong_iss")
        self.failed_login(IssuerMismatchError)
        self.assertEqual(self.provider.hits["token"], 0)

    def test_iss_compared_exactly(self) -> None:
        """#9: trailing slash, case and port all count."""
        issuer = self.provider.issuer
        for iss in (issuer + "/", issuer.upper(), issuer + ":443", issuer[:-1]):
            self.failed_login(IssuerMismatchError, lambda q, iss=iss: dict(q, iss=iss))
        self.assertEqual(self.provider.hits["token"], 0)

    def test_iss_missing_while_announced(self) -> None:
        """#10: iss absent but authorization_response_iss_parameter_supported → 400."""
        self.provider.misbehave("authorize", "omit_iss")
        self.failed_login(IssuerMismatchError)
        self.assertEqual(self.provider.hits["token"], 0)

    def test_iss_missing_and_not_announced(self) -> None:
        provider = FakeProvider(clock=self.clock, iss_parameter=False)
        result = self.successResultOf(provider.log_in(provider.relying_party()))
        self.assertEqual(result.subject, "alice")

    def test_iss_checked_on_error_responses(self) -> None:
        """RFC 9207 §2.4: the error response is checked for iss too."""
        self.provider.misbehave("authorize", "access_denied", "wrong_iss")
        self.failed_login(IssuerMismatchError)

    def test_error_response(self) -> None:
        """#7: error=access_denied → 400 with the (sanitised) error, no token call."""
        self.provider.misbehave("authorize", "access_denied")
        error = self.failed_login(AuthorizationDeniedError)
        self.assertEqual(error.status, 400)
        self.assertEqual(error.error, "access_denied")
        self.assertEqual(error.description, "The user <b>refused</b>")
        self.assertEqual(self.provider.hits["token"], 0)

    def test_error_text_sanitised(self) -> None:
        def evil(q: Dict[str, str]) -> Dict[str, str]:
            out = {k: v for k, v in q.items() if k != "code"}
            out.update(error="x\r\ny\x00\"\\z" * 50, error_description="\u2028é\n" * 400)
            return out

        error = self.failed_login(AuthorizationDeniedError, evil)
        self.assertEqual(error.error, ("xyz" * 50)[:64])
        self.assertIsNone(error.description)

    def test_missing_code(self) -> None:
        self.failed_login(InvalidCallbackError,
                          lambda q: {k: v for k, v in q.items() if k != "code"})

    def test_implicit_and_hybrid_refused(self) -> None:
        """#17: tokens in the callback (implicit/hybrid) → refused."""
        for name in ("access_token", "id_token", "token_type"):
            self.failed_login(InvalidCallbackError, lambda q, n=name: dict(q, **{n: "x"}))
        self.assertEqual(self.provider.hits["token"], 0)

    def test_repeated_parameters(self) -> None:
        """RFC 6749 §3.1: a repeated parameter is refused (twisted's request.args shape)."""
        start = self.start()
        query = self.callback(start)
        args = {k.encode(): [v.encode()] for k, v in query.items()}
        args[b"code"] = [b"a", b"b"]
        self.failureResultOf(self.rp.finish(start.transaction, args), InvalidCallbackError)
        args[b"code"] = [b"\xff"]
        self.failureResultOf(self.rp.finish(start.transaction, args), InvalidCallbackError)

    def test_request_args_shape_accepted(self) -> None:
        start = self.start()
        args = {k.encode(): [v.encode()] for k, v in self.callback(start).items()}
        self.successResultOf(self.rp.finish(start.transaction, args))

    def test_code_injection_fails_pkce(self) -> None:
        """#12: a stolen code exchanged with the victim's verifier → invalid_grant → 400."""
        attacker = self.start()
        stolen = self.callback(attacker)
        victim = self.start()
        injected = dict(stolen, state=victim.transaction.state)
        error = self.failureResultOf(self.rp.finish(victim.transaction, injected),
                                     LoginRejectedError).value
        self.assertEqual(error.status, 400)

    def test_replayed_code(self) -> None:
        """#5's second line of defence: the provider refuses a used code."""
        start = self.start()
        query = self.callback(start)
        self.successResultOf(self.rp.finish(start.transaction, query))
        self.failureResultOf(self.rp.finish(start.transaction, query), LoginRejectedError)


class TokenResponseTests(ClientTestCase):
    """#18, #19: the token call and its answer."""

    def assertLoginFailed(self, *faults: str) -> None:
        self.provider.misbehave("token", *faults)
        error = self.failed_login(LoginFailedError)
        self.assertEqual(error.status, 502)
        self.assertEqual(error.name, "login_failed")
        self.assertEqual(self.provider.hits["userinfo"], 0)
        self.provider.behave()

    def test_client_secret_basic_by_default(self) -> None:
        """#18, conformance rp-token_endpoint-client_secret_basic."""
        self.login()
        [form] = self.provider.token_requests
        self.assertNotIn("client_secret", form)
        self.assertEqual(form["grant_type"], "authorization_code")
        self.assertEqual(form["redirect_uri"], "https://rp.example/redirect")
        self.assertEqual(len(form["code_verifier"]), 43)

    def test_client_secret_post(self) -> None:
        provider = FakeProvider(clock=self.clock, token_endpoint_auth_method="client_secret_post")
        self.successResultOf(provider.log_in(provider.relying_party()))
        self.assertEqual(provider.token_requests[0]["client_secret"], provider.client_secret)

    def test_wrong_auth_method(self) -> None:
        provider = FakeProvider(clock=self.clock, token_endpoint_auth_method="client_secret_post")
        rp = provider.relying_party(token_endpoint_auth_method="client_secret_basic")
        self.failureResultOf(provider.log_in(rp), LoginFailedError)

    def test_secret_with_special_characters(self) -> None:
        """RFC 6749 §2.3.1: id and secret are form-encoded inside Basic."""
        provider = FakeProvider(clock=self.clock, client_id="id:with/odd+chars",
                                client_secret="s3cr:t+/=é%20")
        self.successResultOf(provider.log_in(provider.relying_party()))

    def test_wrong_secret(self) -> None:
        rp = self.provider.relying_party(client_secret="not-the-secret")
        self.failureResultOf(self.provider.log_in(rp), LoginFailedError)

    def test_not_200(self) -> None:
        self.assertLoginFailed("error_500")
        self.assertLoginFailed("invalid_client")

    def test_not_json(self) -> None:
        self.assertLoginFailed("garbled")
        self.assertLoginFailed("not_object")

    def test_too_large(self) -> None:
        self.assertLoginFailed("huge")

    def test_missing_tokens(self) -> None:
        self.assertLoginFailed("missing_access_token")
        self.assertLoginFailed("missing_id_token")

    def test_token_type_not_bearer(self) -> None:
        self.assertLoginFailed("token_type_mac")

    def test_token_type_case_insensitive(self) -> None:
        self.provider.misbehave("token", "token_type_lowercase")
        self.assertEqual(self.login().tokens.token_type, "Bearer")

    def test_timeout(self) -> None:
        self.provider.misbehave("token", "stall_body")
        start = self.start()
        d = self.rp.finish(start.transaction, self.callback(start))
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, ProviderTimeoutError).value.status, 504)
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_reset(self) -> None:
        self.provider.misbehave("token", "reset")
        error = self.failed_login(Exception)
        self.assertEqual(error.status, 502)


class IdTokenTests(ClientTestCase):
    """Conformance basic plan: each invalid ID token ends the login with
    nothing used (#35): no userinfo call."""

    def assertRejected(self, *faults: str) -> InvalidTokenError:
        self.provider.misbehave("id_token", *faults)
        error = self.failed_login(InvalidTokenError)
        self.assertEqual(error.status, 400)
        self.assertEqual(self.provider.hits["userinfo"], 0, "#35: nothing used")
        return error

    def test_bad_signature(self) -> None:
        """oidcc-client-test-invalid-sig-rs256."""
        self.assertRejected("bad_signature")

    def test_alg_none(self) -> None:
        """oidcc-client-test-idtoken-sig-none (we reject: the test ends 'skipped')."""
        self.assertRejected("alg_none")

    def test_hs256(self) -> None:
        """oidcc-client-test-invalid-sig-hs256."""
        self.assertRejected("hs256_public_key")

    def test_wrong_issuer(self) -> None:
        """oidcc-client-test-invalid-iss."""
        self.assertRejected("wrong_iss")

    def test_wrong_audience(self) -> None:
        """oidcc-client-test-invalid-aud."""
        self.assertRejected("wrong_aud")

    def test_missing_audience(self) -> None:
        """oidcc-client-test-missing-aud."""
        self.assertRejected("missing_aud")

    def test_missing_iat(self) -> None:
        """oidcc-client-test-missing-iat."""
        self.assertRejected("missing_iat")

    def test_missing_sub(self) -> None:
        """oidcc-client-test-missing-sub."""
        self.assertRejected("missing_sub")

    def test_bad_nonce(self) -> None:
        """oidcc-client-test-nonce-invalid: reject, no userinfo call."""
        self.assertRejected("bad_nonce")

    def test_bad_at_hash(self) -> None:
        """oidcc-client-test-invalid-athash (code flow: a present at_hash is checked)."""
        self.assertRejected("bad_at_hash")

    def test_expired(self) -> None:
        self.assertRejected("expired")

    def test_crit(self) -> None:
        self.assertRejected("crit")

    def test_embedded_jwk(self) -> None:
        self.assertRejected("jwk_header")

    def test_oversized(self) -> None:
        self.assertRejected("huge")

    def test_kid_absent_single(self) -> None:
        """oidcc-client-test-kid-absent-single-jwks: accepted."""
        self.provider.misbehave("id_token", "kid_absent")
        self.assertEqual(self.login().subject, "alice")

    def test_kid_absent_multiple(self) -> None:
        """oidcc-client-test-kid-absent-multiple-jwks: we try the candidates."""
        self.provider.rotate_keys()
        self.provider.misbehave("id_token", "kid_absent")
        self.assertEqual(self.login().subject, "alice")

    def test_key_rotation(self) -> None:
        """oidcc-client-test-signing-key-rotation: a new kid → one refetch."""
        self.login()
        self.clock.advance(60)
        self.provider.rotate_keys(keep_old=False)
        self.login()
        self.assertEqual(self.provider.hits["jwks"], 2)

    def test_max_age(self) -> None:
        """#33 end to end: max_age sent; an old auth_time refused."""
        rp = self.provider.relying_party(max_age=300)
        self.successResultOf(self.provider.log_in(rp))
        self.provider.misbehave("id_token", "old_auth_time")
        self.failureResultOf(self.provider.log_in(rp), InvalidTokenError)

    def test_jwks_unavailable_without_cache(self) -> None:
        self.provider.misbehave("jwks", "error_500")
        start = self.start()
        failure = self.failureResultOf(self.rp.finish(start.transaction, self.callback(start)))
        self.assertEqual(failure.value.status, 503)
        self.assertEqual(self.provider.hits["userinfo"], 0)

    def test_warm_jwks_cache_keeps_logins_working(self) -> None:
        """R5: jwks_uri down after the keys were cached: logins still work."""
        self.login()
        self.provider.misbehave("jwks", "stall")
        self.clock.advance(601)
        start = self.start()
        d = self.rp.finish(start.transaction, self.callback(start))
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d).subject, "alice")
        self.stub.flush()

    def test_provider_clock_ahead_within_leeway(self) -> None:
        """R8: the provider's clock 25 s ahead: accepted."""
        self.provider.clock = Clock()
        self.provider.clock.advance(EPOCH + 25)
        self.assertEqual(self.login().subject, "alice")

    def test_provider_clock_ahead_beyond_leeway(self) -> None:
        """R8: 5 min ahead: rejected with a clear error."""
        self.provider.clock = Clock()
        self.provider.clock.advance(EPOCH + 300)
        start = self.start()
        error = self.failureResultOf(self.rp.finish(start.transaction, self.callback(start)),
                                     InvalidTokenError).value
        self.assertIn("future", str(error))

    def test_provider_clock_behind(self) -> None:
        """R8: 5 min behind is fine (exp still ahead); 11 min behind is too old."""
        self.provider.clock = Clock()
        self.provider.clock.advance(EPOCH - 300)
        self.assertEqual(self.login().subject, "alice")
        self.provider.clock.advance(-360)
        self.provider.id_token_lifetime = 3600
        start = self.start()
        error = self.failureResultOf(self.rp.finish(start.transaction, self.callback(start)),
                                     InvalidTokenError).value
        self.assertIn("too long ago", str(error))


class UserInfoTests(ClientTestCase):
    """#43."""

    def test_bearer_header_only(self) -> None:
        """Conformance oidcc-client-test-userinfo-bearer-header."""
        self.login()
        self.assertEqual(self.provider.userinfo_requests, ["header"])

    def test_sub_mismatch(self) -> None:
        """Conformance oidcc-client-test-userinfo-invalid-sub: discarded, login fails."""
        self.provider.misbehave("userinfo", "sub_mismatch")
        error = self.failed_login(LoginFailedError)
        self.assertIn("another user", str(error))

    def test_signed_userinfo_refused(self) -> None:
        self.provider.misbehave("userinfo", "jwt_response")
        self.failed_login(LoginFailedError)

    def test_userinfo_errors(self) -> None:
        for fault in ("error_500", "garbled", "huge"):
            self.provider.behave()
            self.provider.misbehave("userinfo", fault)
            self.failed_login(LoginFailedError)

    def test_userinfo_timeout(self) -> None:
        self.provider.misbehave("userinfo", "stall")
        start = self.start()
        d = self.rp.finish(start.transaction, self.callback(start))
        self.clock.advance(5)
        self.failureResultOf(d, ProviderTimeoutError)
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RefreshTests(ClientTestCase):
    """#45-#47; conformance oidcc-client-test-refresh-token(-invalid-issuer/-sub)."""

    def setUp(self) -> None:
        super().setUp()
        self.result = self.login()

    def refresh(self, tokens: Any = None) -> Any:
        return self.rp.refresh(tokens or self.result.tokens, claims=self.result.claims)

    def test_refresh(self) -> None:
        self.clock.advance(3000)
        refreshed = self.successResultOf(self.refresh())
        self.assertNotEqual(refreshed.tokens.access_token, self.result.tokens.access_token)
        self.assertEqual(refreshed.tokens.expires_at, EPOCH + 3000 + 3600)
        self.assertEqual(refreshed.claims["sub"], "alice")
        self.assertEqual(self.provider.token_requests[-1]["grant_type"], "refresh_token")

    def test_old_refresh_token_kept_without_rotation(self) -> None:
        """#45: no refresh_token in the answer → the old one is kept."""
        refreshed = self.successResultOf(self.refresh())
        self.assertEqual(refreshed.tokens.refresh_token, self.result.tokens.refresh_token)

    def test_rotated_refresh_token_replaces(self) -> None:
        """#45: a new refresh_token replaces the old one."""
        self.provider.rotate_refresh_tokens = True
        refreshed = self.successResultOf(self.refresh())
        self.assertNotEqual(refreshed.tokens.refresh_token, self.result.tokens.refresh_token)
        again = self.successResultOf(self.refresh(refreshed.tokens))
        self.assertNotEqual(again.tokens.refresh_token, refreshed.tokens.refresh_token)
        self.assertEqual(self.provider.reused_refresh_tokens, 0)

    def test_reused_refresh_token(self) -> None:
        """BCP §4.14.2: a rotated-out token used again revokes the grant."""
        self.provider.rotate_refresh_tokens = True
        refreshed = self.successResultOf(self.refresh())
        self.failureResultOf(self.refresh(), RefreshRejectedError)
        self.assertEqual(self.provider.reused_refresh_tokens, 1)
        self.failureResultOf(self.refresh(refreshed.tokens), RefreshRejectedError)

    def test_refreshed_id_token_other_sub(self) -> None:
        """#46, …-refresh-token-invalid-sub: session ended."""
        self.provider.misbehave("id_token", "sub_changed")
        error = self.failureResultOf(self.refresh(), RefreshRejectedError).value
        self.assertEqual(error.status, 401)

    def test_refreshed_id_token_wrong_issuer(self) -> None:
        """#46, …-refresh-token-invalid-issuer."""
        self.provider.misbehave("id_token", "wrong_iss")
        self.failureResultOf(self.refresh(), RefreshRejectedError)

    def test_refreshed_id_token_bad_signature(self) -> None:
        self.provider.misbehave("id_token", "bad_signature")
        self.failureResultOf(self.refresh(), RefreshRejectedError)

    def test_refresh_without_id_token(self) -> None:
        self.provider.refresh_id_token = False
        refreshed = self.successResultOf(self.refresh())
        self.assertEqual(refreshed.claims, self.result.claims)
        self.assertEqual(refreshed.tokens.id_token, self.result.tokens.id_token)

    def test_invalid_grant_is_fatal(self) -> None:
        """#47: invalid_grant → tokens dead, session ended."""
        self.provider.revoke_grants()
        self.failureResultOf(self.refresh(), RefreshRejectedError)
        self.provider.misbehave("token", "invalid_grant")
        self.failureResultOf(self.refresh(), RefreshRejectedError)

    def test_invalid_client_is_fatal(self) -> None:
        self.provider.misbehave("token", "invalid_client")
        self.failureResultOf(self.refresh(), RefreshRejectedError)

    def test_transient_failures_are_not_fatal(self) -> None:
        """#47: 5xx, garbage, timeout → not fatal (retry later)."""
        for fault in ("error_500", "garbled", "token_type_mac", "missing_access_token"):
            self.provider.behave()
            self.provider.misbehave("token", fault)
            failure = self.failureResultOf(self.refresh())
            self.assertIsInstance(failure.value, TRANSIENT_ERRORS, fault)
            self.assertNotIsInstance(failure.value, RefreshRejectedError)
        self.provider.behave()
        self.provider.misbehave("token", "stall")
        d = self.refresh()
        self.clock.advance(5)
        self.failureResultOf(d, ProviderTimeoutError)
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.provider.behave()
        self.successResultOf(self.refresh())

    def test_no_refresh_token(self) -> None:
        tokens = attr.evolve(self.result.tokens, refresh_token=None)
        self.failureResultOf(self.refresh(tokens), RefreshRejectedError)

    def test_bad_answer_is_transient(self) -> None:
        self.provider.misbehave("token", "not_object")
        self.failureResultOf(self.refresh(), ProviderBadResponseError)


class EndSessionTests(ClientTestCase):
    """#64 (the redirect URL) and #65 (the state check)."""

    def test_end_session_url(self) -> None:
        result = self.login()
        redirect = self.successResultOf(self.rp.end_session_url(id_token=result.tokens.id_token))
        params = query_dict(redirect.url)
        self.assertTrue(redirect.url.startswith(self.provider.url("end_session") + "?"))
        self.assertEqual(params["id_token_hint"], result.tokens.id_token)
        self.assertEqual(params["post_logout_redirect_uri"], "https://rp.example/logged-out")
        self.assertEqual(params["client_id"], self.provider.client_id)
        self.assertEqual(params["state"], redirect.state)
        self.assertEqual(len(redirect.state), 43)
        other = self.successResultOf(self.rp.end_session_url(id_token=result.tokens.id_token))
        self.assertNotEqual(other.state, redirect.state)

    def test_round_trip_through_provider(self) -> None:
        result = self.login()
        redirect = self.successResultOf(self.rp.end_session_url(id_token=result.tokens.id_token))
        response = self.successResultOf(self.stub.get(redirect.url, allow_redirects=False))
        self.assertEqual(response.code, 302)
        location = response.headers.getRawHeaders("location")[0]
        self.assertTrue(location.startswith("https://rp.example/logged-out?"))
        returned = query_dict(location)["state"]
        self.assertTrue(check_logout_state(redirect.state, returned))
        self.assertEqual(self.provider.ended_sessions, [result.sid])

    def test_state_check(self) -> None:
        """#65: a missing or foreign state fails the check."""
        state = random_token()
        self.assertFalse(check_logout_state(state, None))
        self.assertFalse(check_logout_state(state, random_token()))
        self.assertFalse(check_logout_state(None, state))
        self.assertFalse(check_logout_state(state, ["x"]))
        self.assertTrue(check_logout_state(state, state))

    def test_no_end_session_endpoint(self) -> None:
        rp = self.provider.relying_party(
            discovery=False, authorization_endpoint=self.provider.url("authorize"),
            token_endpoint=self.provider.url("token"), jwks_uri=self.provider.url("jwks"),
        )
        self.assertIsNone(self.successResultOf(rp.end_session_url(id_token="x")))
