"""
Tests for the fake OpenID provider itself (`twistauth.testing._provider`):
it is a public testing tool, so it must enforce what a real provider
enforces (client authentication, registered redirect URIs, PKCE S256,
single-use codes, refresh token rotation and reuse detection), or tests
written against it would pass against nothing.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity._urls import add_query, query_dict
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


class ProviderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.provider = FakeProvider(clock=self.clock)
        self.stub = self.provider.stub()

    def authorize_url(self, **changes: Any) -> str:
        params: Dict[str, Any] = {
            "response_type": "code",
            "client_id": self.provider.client_id,
            "redirect_uri": self.provider.redirect_uris[0],
            "scope": "openid",
            "state": "st",
            "nonce": "nn",
            "code_challenge": CHALLENGE,
            "code_challenge_method": "S256",
        }
        params.update(changes)
        return add_query(self.provider.url("authorize"),
                         [(k, v) for k, v in params.items() if v is not None])

    def token(self, form: Dict[str, str], secret: Any = None) -> Any:
        secret = self.provider.client_secret if secret is None else secret
        basic = base64.b64encode(f"{self.provider.client_id}:{secret}".encode()).decode()
        d = self.stub.post(self.provider.url("token"), data=form,
                           headers={"Authorization": f"Basic {basic}"})
        response = self.successResultOf(d)
        return response.code, self.successResultOf(response.json())

    def code_form(self, code: str, **changes: str) -> Dict[str, str]:
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.provider.redirect_uris[0], "code_verifier": VERIFIER}
        form.update(changes)
        return form

    def test_authorize_over_http(self) -> None:
        response = self.successResultOf(self.stub.get(self.authorize_url(),
                                                      allow_redirects=False))
        self.assertEqual(response.code, 302)
        location = response.headers.getRawHeaders("location")[0]
        params = query_dict(location)
        self.assertEqual((params["state"], params["iss"]), ("st", self.provider.issuer))
        self.assertIn("code", params)
        self.assertEqual(self.provider.hits["authorize"], 1)

    def test_authorize_refusals(self) -> None:
        self.assertRaises(ValueError, self.provider.authorize,
                          self.authorize_url(client_id="someone-else"))
        self.assertRaises(ValueError, self.provider.authorize,
                          self.authorize_url(redirect_uri="https://evil.example/cb"))
        cases = {
            "unsupported_response_type": {"response_type": "token"},
            "invalid_request": {"code_challenge_method": "plain"},
            "invalid_scope": {"scope": "profile"},
        }
        for error, changes in cases.items():
            self.assertEqual(self.provider.authorize(self.authorize_url(**changes))["error"],
                             error)
        missing = self.provider.authorize(self.authorize_url(code_challenge=None))
        self.assertEqual(missing["error"], "invalid_request")

    def test_code_exchange(self) -> None:
        code = self.provider.authorize(self.authorize_url())["code"]
        status, body = self.token(self.code_form(code))
        self.assertEqual(status, 200)
        self.assertEqual(body["token_type"], "Bearer")
        self.assertEqual(set(body), {"access_token", "token_type", "expires_in", "scope",
                                     "id_token", "refresh_token"})

    def test_pkce_enforced(self) -> None:
        code = self.provider.authorize(self.authorize_url())["code"]
        status, body = self.token(self.code_form(code, code_verifier="x" * 43))
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        code = self.provider.authorize(self.authorize_url())["code"]
        form = self.code_form(code)
        del form["code_verifier"]
        self.assertEqual(self.token(form)[1]["error"], "invalid_grant")

    def test_code_single_use_and_expiry(self) -> None:
        code = self.provider.authorize(self.authorize_url())["code"]
        self.assertEqual(self.token(self.code_form(code))[0], 200)
        self.assertEqual(self.token(self.code_form(code))[1]["error"], "invalid_grant")
        code = self.provider.authorize(self.authorize_url())["code"]
        self.clock.advance(61)
        self.assertEqual(self.token(self.code_form(code))[1]["error"], "invalid_grant")

    def test_redirect_uri_must_match(self) -> None:
        code = self.provider.authorize(self.authorize_url())["code"]
        form = self.code_form(code, redirect_uri="https://rp.example/other")
        self.assertEqual(self.token(form)[1]["error"], "invalid_grant")

    def test_client_authentication(self) -> None:
        code = self.provider.authorize(self.authorize_url())["code"]
        status, body = self.token(self.code_form(code), secret="wrong")
        self.assertEqual((status, body["error"]), (401, "invalid_client"))
        response = self.successResultOf(
            self.stub.post(self.provider.url("token"), data=self.code_form(code))
        )
        self.assertEqual(response.code, 401)

    def test_refresh_rotation_and_reuse(self) -> None:
        self.provider.rotate_refresh_tokens = True
        code = self.provider.authorize(self.authorize_url())["code"]
        first = self.token(self.code_form(code))[1]["refresh_token"]
        status, body = self.token({"grant_type": "refresh_token", "refresh_token": first})
        self.assertEqual(status, 200)
        second = body["refresh_token"]
        self.assertNotEqual(first, second)
        self.assertEqual(self.token({"grant_type": "refresh_token",
                                     "refresh_token": first})[1]["error"], "invalid_grant")
        self.assertEqual(self.provider.reused_refresh_tokens, 1)
        # Reuse revoked the whole grant.
        self.assertEqual(self.token({"grant_type": "refresh_token",
                                     "refresh_token": second})[1]["error"], "invalid_grant")

    def test_userinfo_needs_bearer_header(self) -> None:
        code = self.provider.authorize(self.authorize_url())["code"]
        access_token = self.token(self.code_form(code))[1]["access_token"]
        url = self.provider.url("userinfo")
        response = self.successResultOf(self.stub.get(add_query(url, [("access_token",
                                                                       access_token)])))
        self.assertEqual(response.code, 401)
        response = self.successResultOf(
            self.stub.get(url, headers={"Authorization": f"Bearer {access_token}"})
        )
        self.assertEqual(self.successResultOf(response.json())["sub"], "alice")
        self.assertEqual(self.provider.userinfo_requests, ["query", "header"])

    def test_once_faults(self) -> None:
        self.provider.misbehave("token", "error_500", once=True)
        code = self.provider.authorize(self.authorize_url())["code"]
        response = self.successResultOf(self.stub.post(self.provider.url("token"), data={}))
        self.assertEqual(response.code, 500)
        self.assertEqual(self.token(self.code_form(code))[0], 200)

    def test_unknown_faults_refused(self) -> None:
        self.assertRaises(ValueError, self.provider.misbehave, "token", "bad_signature")
        self.assertRaises(ValueError, self.provider.misbehave, "id_token", "slow")
        self.assertRaises(ValueError, self.provider.misbehave, "nowhere", "slow")
        self.assertRaises(ValueError, self.provider.misbehave, "authorize", "slow")

    def test_end_session(self) -> None:
        url = add_query(self.provider.url("end_session"),
                        [("post_logout_redirect_uri", "https://evil.example/"), ("state", "s")])
        self.assertEqual(self.successResultOf(self.stub.get(url, allow_redirects=False)).code,
                         400)
        url = add_query(self.provider.url("end_session"), [("id_token_hint", "garbage")])
        self.assertEqual(self.successResultOf(self.stub.get(url, allow_redirects=False)).code,
                         400)

    def test_issuer_with_path(self) -> None:
        provider = FakeProvider(clock=self.clock, issuer="https://op.example/realms/test")
        result = self.successResultOf(provider.log_in(provider.relying_party()))
        self.assertEqual(result.issuer, "https://op.example/realms/test")
        self.assertEqual(provider.hits["discovery"], 1)

    def test_logout_token_shape(self) -> None:
        """Like the conformance suite's: typ logout+jwt, exp = iat + 120, ignored_claim."""
        import jwt

        token = self.provider.issue_logout_token(sid="s1")
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        self.assertEqual(header["typ"], "logout+jwt")
        self.assertEqual(claims["exp"] - claims["iat"], 120)
        self.assertEqual(claims["ignored_claim"], "ignored")
        self.assertEqual(claims["sid"], "s1")
        self.assertNotIn("sub", claims)
        self.assertNotIn("nonce", claims)

    def test_challenge_helper_matches(self) -> None:
        digest = hashlib.sha256(VERIFIER.encode()).digest()
        self.assertEqual(base64.urlsafe_b64encode(digest).rstrip(b"=").decode(), CHALLENGE)
