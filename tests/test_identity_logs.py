"""
Codes, tokens, verifiers and secrets never reach the log (checklist #16 for
the identity layer; issue 5's "a log-capture test over a full
login/refresh/logout run finds none").

Every event published while a full run happens - logins, failures of every
kind, refreshes, back-channel logout, RP-initiated logout - is captured and
rendered (message, every field's repr, and any failure's traceback), then
searched for each secret the run handled.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistauth.identity.errors import IdentityError
from twistauth.testing._provider import FakeProvider

EPOCH = 1_700_000_000


def render(event: Dict[str, Any]) -> str:
    parts = [formatEvent(event)]
    for key, value in event.items():
        parts.append(f"{key}={value!r}")
        if isinstance(value, Failure):
            parts.append(value.getTraceback())
            parts.append(str(value.value))
    return "\n".join(parts)


class LogCaptureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.secrets: Set[str] = set()

    def remember_start(self, start: Any) -> None:
        t = start.transaction
        self.secrets.update({t.state, t.nonce, t.code_verifier})

    def remember_tokens(self, tokens: Any) -> None:
        for value in (tokens.access_token, tokens.refresh_token, tokens.id_token):
            if value:
                self.secrets.add(value)
                self.secrets.add(value[-24:])

    def run_login(self, provider: FakeProvider, rp: Any, ok: bool = True) -> Any:
        start = self.successResultOf(rp.start("/after"))
        self.remember_start(start)
        query = provider.authorize(start.url)
        if "code" in query:
            self.secrets.add(query["code"])
        d = rp.finish(start.transaction, query)
        if ok:
            result = self.successResultOf(d)
            self.remember_tokens(result.tokens)
            return result
        self.failureResultOf(d, IdentityError)
        return None

    def test_full_run_logs_no_secret(self) -> None:
        provider = FakeProvider(clock=self.clock, rotate_refresh_tokens=True,
                                client_secret="client-secret-9f8e7d6c5b4a")
        self.secrets.add(provider.client_secret)
        basic = base64.b64encode(f"{provider.client_id}:{provider.client_secret}".encode())
        self.secrets.add(basic.decode())
        stub = provider.stub()
        rp = provider.relying_party(http_client=stub, use_userinfo=True)

        # A good login, then refreshes.
        result = self.run_login(provider, rp)
        self.secrets.add(result.sid)
        refreshed = self.successResultOf(rp.refresh(result.tokens, claims=result.claims))
        self.remember_tokens(refreshed.tokens)
        # A reused refresh token, a revoked grant, a 500 while refreshing.
        self.failureResultOf(rp.refresh(result.tokens, claims=result.claims), IdentityError)
        provider.misbehave("token", "error_500", once=True)
        self.failureResultOf(rp.refresh(refreshed.tokens, claims=result.claims), IdentityError)

        # Failed logins of every kind.
        for target, fault in (("id_token", "bad_signature"), ("id_token", "bad_nonce"),
                              ("token", "error_500"), ("token", "invalid_grant"),
                              ("token", "garbled"), ("userinfo", "sub_mismatch"),
                              ("authorize", "wrong_iss")):
            provider.misbehave(target, fault, once=True)
            self.run_login(provider, rp, ok=False)
        provider.misbehave("token", "stall", once=True)
        start = self.successResultOf(rp.start("/"))
        self.remember_start(start)
        query = provider.authorize(start.url)
        self.secrets.add(query["code"])
        d = rp.finish(start.transaction, query)
        self.clock.advance(5)
        self.failureResultOf(d, IdentityError)
        stub.flush()

        # A key rotation, so the key cache logs too.
        self.clock.advance(60)
        provider.rotate_keys(keep_old=False)
        self.run_login(provider, rp)

        # Back-channel logout: valid, replayed, forged.
        seen: Set[str] = set()

        def jti_seen(key: str, expires_at: float) -> Deferred[bool]:
            known = key in seen
            seen.add(key)
            return succeed(known)

        logout_token = provider.issue_logout_token(sid=result.sid, jti="jti-secret-value-1")
        self.secrets.update({logout_token, logout_token[-24:]})
        self.successResultOf(rp.validate_logout_token(logout_token, jti_seen=jti_seen))
        self.failureResultOf(rp.validate_logout_token(logout_token, jti_seen=jti_seen))
        forged = provider.issue_logout_token(sid=result.sid, faults=["bad_signature"])
        self.secrets.add(forged)
        self.failureResultOf(rp.validate_logout_token(forged, jti_seen=jti_seen))

        # RP-initiated logout.
        redirect = self.successResultOf(rp.end_session_url(id_token=refreshed.tokens.id_token))
        self.secrets.add(redirect.state)

        # Discovery and key failures on a second provider.
        other = FakeProvider(clock=self.clock, issuer="https://other.example")
        other.misbehave("jwks", "error_500")
        other_rp = other.relying_party()
        self.run_login(other, other_rp, ok=False)

        text = "\n".join(render(e) for e in self.events)
        self.assertIn("login at fake finished", text)
        self.assertIn("answered HTTP 500", text)
        self.assertIn("signing key(s) loaded", text)
        self.assertGreater(len(self.events), 10)
        self.assertGreater(len(self.secrets), 40)
        leaked = sorted(s for s in self.secrets if s and s in text)
        self.assertEqual(leaked, [])
