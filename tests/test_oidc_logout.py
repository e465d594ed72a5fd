"""
Back-channel and RP-initiated logout through the routes
(`twistauth.web.auth`), on ``StubTreq`` and a `Clock` against
`FakeProvider`: checklist cases 50–65 as they concern the routes (the
token checks themselves are `twistauth.identity.jose`'s, tested there;
here each conformance case is shown to answer 400 and end nothing).
"""

from __future__ import annotations

import json
from typing import Any, List
from urllib.parse import parse_qs, urlencode, urlsplit

from test_oidc_support import RP, Browser, make_harness, result_of
from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from twistauth.bus.logout import LogoutWatcher
from twistauth.bus.memory import MemoryBus
from twistauth.errors import BackendUnavailableError

SESSION = "__Host-twistauth_session"
CSRF = "__Host-twistauth_session_csrf"


def _query(url: str) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class _Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock_bus = None
        self.h = make_harness(bus=self._bus())
        self.fake = self.h.fake

    def _bus(self) -> Any:
        return None

    def logged_in(self) -> Browser:
        browser = self.h.browser()
        self.assertEqual(browser.log_in().code, 303)
        return browser

    def session_of(self, browser: Browser) -> Any:
        token = browser.cookie(SESSION)
        return None if token is None else result_of(self.h.sessions.load(token))

    def post_token(self, token: str, path: str = "/logout/backchannel", **kwargs: Any) -> Any:
        return self.h.browser().post(path, data={"logout_token": token}, **kwargs)


class BackchannelTests(_Base):
    def test_sid_ends_only_that_session(self) -> None:
        """
        A valid token with a sid: exactly 200 with ``Cache-Control:
        no-store``, an empty body, and only that session ends; the unknown
        ``ignored_claim`` is ignored (#50).
        """
        one, two = self.logged_in(), self.logged_in()
        sid = self.session_of(one).provider_sid
        self.assertNotEqual(sid, self.session_of(two).provider_sid)
        answer = self.post_token(self.fake.issue_logout_token(sid=sid))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertEqual(answer.body, b"")
        self.assertIsNone(self.session_of(one))
        self.assertIsNotNone(self.session_of(two))
        self.assertEqual(one.call("session.info").code, 200)
        self.assertIsNone(json.loads(one.call("session.info").body)["result"]["user_id"])

    def test_sub_ends_every_session_of_the_user(self) -> None:
        """A token with only a sub ends every session of (iss, sub) (#51)."""
        browsers = [self.logged_in() for _ in range(3)]
        answer = self.post_token(self.fake.issue_logout_token(sub="alice"))
        self.assertEqual(answer.code, 200)
        for browser in browsers:
            self.assertIsNone(self.session_of(browser))

    def test_sub_does_not_end_later_sessions(self) -> None:
        """
        A sub-only token never ends sessions that began after it was issued
        (beyond the leeway) (#61).
        """
        early = self.logged_in()
        token = self.fake.issue_logout_token(sub="alice")
        self.h.clock.advance(60)
        late = self.logged_in()
        self.assertEqual(self.post_token(token).code, 200)
        self.assertIsNone(self.session_of(early))
        self.assertIsNotNone(self.session_of(late))

    def test_sub_of_another_user(self) -> None:
        browser = self.logged_in()
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sub="bob")).code, 200)
        self.assertIsNotNone(self.session_of(browser))

    def test_unknown_sid_user_or_already_logged_out(self) -> None:
        """Unknown sid, unknown user, a session already ended: 200 (#52)."""
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sid="nobody")).code, 200)
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sub="ghost")).code, 200)
        browser = self.logged_in()
        sid = self.session_of(browser).provider_sid
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sid=sid)).code, 200)
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sid=sid)).code, 200)

    def test_not_post(self) -> None:
        """Not POST: 405 (#53)."""
        answer = self.h.browser().get("/logout/backchannel")
        self.assertEqual(answer.code, 405)
        self.assertIn("POST", answer.header("allow") or "")

    def _refused(self, answer: Any) -> str:
        self.assertEqual(answer.code, 400, answer.text)
        self.assertEqual(answer.header("cache-control"), "no-store")
        body = json.loads(answer.body)
        self.assertEqual(body["error"], "invalid_request")
        self.assertIsInstance(body["error_description"], str)
        return str(body["error_description"])

    def test_malformed_requests(self) -> None:
        """No token, a JSON body, an undecodable token: 400 invalid_request (#53)."""
        browser = self.h.browser()
        self._refused(browser.post("/logout/backchannel", data={"other": "x"}))
        self._refused(browser.post("/logout/backchannel", data=b""))
        self._refused(browser.post("/logout/backchannel", json={"logout_token": "a.b.c"}))
        self._refused(browser.post("/logout/backchannel", data={"logout_token": "not-a-jwt"}))
        self._refused(
            browser.post("/logout/backchannel", data=urlencode(
                [("logout_token", "a.b.c"), ("logout_token", "d.e.f")]).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"})
        )
        self._refused(browser.post(
            "/logout/backchannel", data=b"\xff\xfe=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ))

    def test_invalid_tokens(self) -> None:
        """
        Each conformance case's bad logout token answers 400 and ends
        nothing: alg none (#54), wrong alg and bad signature (#55), wrong
        iss and aud (#56), no or wrong event (#57), a nonce (#58), neither
        sub nor sid, no jti, no iat (#59), expired (#60).
        """
        browser = self.logged_in()
        sid = self.session_of(browser).provider_sid
        faults = [
            "alg_none", "alg_none_signed", "wrong_alg", "bad_signature", "hs256_public_key",
            "wrong_iss", "wrong_aud", "no_event", "wrong_event", "event_not_object",
            "with_nonce", "no_sub_no_sid", "missing_jti", "missing_iat", "expired",
            "jwk_header", "crit",
        ]
        for fault in faults:
            token = self.fake.issue_logout_token(sid=sid, faults=[fault])
            self._refused(self.post_token(token))
            self.assertIsNotNone(self.session_of(browser), fault)
        self.assertEqual(self.h.oidc.counts["backchannel_refused"], len(faults))

    def test_missing_typ_is_accepted_unless_required(self) -> None:
        """``typ: logout+jwt`` is optional by default (#62)."""
        browser = self.logged_in()
        sid = self.session_of(browser).provider_sid
        token = self.fake.issue_logout_token(sid=sid, faults=["no_typ"])
        self.assertEqual(self.post_token(token).code, 200)

    def test_required_typ(self) -> None:
        h = make_harness(config_options={"require_logout_typ": True})
        browser = h.browser()
        browser.log_in()
        sid = result_of(h.sessions.load(browser.cookie(SESSION))).provider_sid
        token = h.fake.issue_logout_token(sid=sid, faults=["no_typ"])
        answer = h.browser().post("/logout/backchannel", data={"logout_token": token})
        self._refused(answer)
        token = h.fake.issue_logout_token(sid=sid)
        self.assertEqual(h.browser().post("/logout/backchannel",
                                          data={"logout_token": token}).code, 200)

    def test_replayed_jti(self) -> None:
        """The same token twice: the second is refused (#61)."""
        token = self.fake.issue_logout_token(sid="some-sid")
        self.assertEqual(self.post_token(token).code, 200)
        self.assertIn("already used", self._refused(self.post_token(token)))

    def test_jti_remembered_until_expiry(self) -> None:
        token = self.fake.issue_logout_token(sid="some-sid")
        self.assertEqual(self.post_token(token).code, 200)
        self.h.clock.advance(100)
        self._refused(self.post_token(token))
        self.assertEqual(len(self.h.oidc.jti), 1)

    def test_store_unreachable_is_never_200(self) -> None:
        """
        The session cache is down: not 200 (400 per Back-Channel Logout
        §2.8), an error is logged, and the token id is forgotten so the
        provider's retry works once the store is back (#63).
        """
        browser = self.logged_in()
        sid = self.session_of(browser).provider_sid
        token = self.fake.issue_logout_token(sid=sid)
        cache = self.h.sessions
        original = cache.delete_provider_session
        cache.delete_provider_session = lambda *a: fail(BackendUnavailableError("down"))
        from test_sessions_support import capture_logs

        with capture_logs() as lines:
            answer = self.post_token(token)
        cache.delete_provider_session = original
        self._refused(answer)
        self.assertIn("NOT carried out", "\n".join(lines))
        self.assertIsNotNone(self.session_of(browser))
        self.assertEqual(self.post_token(token).code, 200)
        self.assertIsNone(self.session_of(browser))

    def test_replay_cache_unreachable(self) -> None:
        token = self.fake.issue_logout_token(sid="x")
        self.h.oidc.jti.seen = lambda *a: fail(BackendUnavailableError("down"))
        self._refused(self.post_token(token))

    def test_body_too_large(self) -> None:
        """A body over 16 KiB: 413 before any token parsing (#63)."""
        answer = self.h.browser().post(
            "/logout/backchannel", data={"logout_token": "x" * (17 * 1024)}
        )
        self.assertEqual(answer.code, 413)
        self.assertEqual(json.loads(answer.body)["error"], "invalid_request")

    def test_rate_limit(self) -> None:
        """
        An address sending too many refused requests: 429 with Retry-After
        until the window ends (#63); genuine logouts are never counted.
        """
        limiter = self.h.oidc.rate_limiter
        limiter.limit = 3
        for i in range(5):
            self.assertEqual(self.post_token(self.fake.issue_logout_token(sid=f"s{i}")).code, 200)
        token = self.fake.issue_logout_token(sid="x", faults=["bad_signature"])
        codes = [self.post_token(token).code for _ in range(4)]
        self.assertEqual(codes, [400, 400, 400, 429])
        answer = self.post_token(self.fake.issue_logout_token(sid="good"))
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.header("retry-after"), "60")
        self.h.clock.advance(60)
        self.assertEqual(self.post_token(token).code, 400)
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sid="good")).code, 200)

    def test_provider_chosen_by_issuer(self) -> None:
        h = make_harness(names=("alpha", "beta"))
        browser = h.browser()
        self.assertEqual(browser.log_in("beta").code, 303)
        sid = result_of(h.sessions.load(browser.cookie(SESSION))).provider_sid
        token = h.providers["beta"].issue_logout_token(sid=sid)
        # On alpha's own route it fails (wrong issuer for alpha).
        answer = h.browser().post("/logout/backchannel/alpha", data={"logout_token": token})
        self.assertEqual(answer.code, 400)
        self.assertEqual(
            h.browser().post("/logout/backchannel", data={"logout_token": token}).code, 200
        )
        self.assertIsNone(result_of(h.sessions.load(browser.cookie(SESSION))))
        stranger = h.providers["beta"].sign({"iss": "https://unknown.example", "sub": "x"})
        self.assertEqual(
            h.browser().post("/logout/backchannel", data={"logout_token": stranger}).code, 400
        )


class BusTests(_Base):
    """Back-channel logout wakes the logout waiters (#51)."""

    def _bus(self) -> Any:
        self.bus = _LateBus()
        return self.bus

    def test_waiters_wake(self) -> None:
        bus = MemoryBus(clock=self.h.clock)
        self.bus.real = bus
        watcher = LogoutWatcher(bus=bus, clock=self.h.clock, logged_out_reason=lambda s: None)
        answers: List[Any] = []
        browsers = [self.logged_in() for _ in range(2)]
        for browser in browsers:
            watcher.watch(self.session_of(browser), answers.append, timeout=25)
        self.h.clock.advance(0)
        self.assertEqual(answers, [])
        answer = self.post_token(self.fake.issue_logout_token(sub="alice"))
        self.assertEqual(answer.code, 200)
        self.h.clock.advance(0)
        self.assertEqual(answers, [{"logged_out": True, "reason": "backchannel"}] * 2)

    def test_sid_wakes_its_session_only(self) -> None:
        bus = MemoryBus(clock=self.h.clock)
        self.bus.real = bus
        watcher = LogoutWatcher(bus=bus, clock=self.h.clock, logged_out_reason=lambda s: None)
        one, two = self.logged_in(), self.logged_in()
        answers: List[Any] = []
        watcher.watch(self.session_of(one), lambda a: answers.append(("one", a)), timeout=25)
        watcher.watch(self.session_of(two), lambda a: answers.append(("two", a)), timeout=25)
        self.h.clock.advance(0)
        sid = self.session_of(one).provider_sid
        self.assertEqual(self.post_token(self.fake.issue_logout_token(sid=sid)).code, 200)
        self.h.clock.advance(0)
        self.assertEqual(answers, [("one", {"logged_out": True, "reason": "backchannel"})])
        self.h.clock.advance(25)


class _LateBus:
    """Stands for ``services.bus``; the test plugs the real bus in later."""

    real: Any = None

    def notify_all(self, key: Any, message: Any) -> Any:
        return self.real.notify_all(key, message)


class RPInitiatedLogoutTests(_Base):
    def test_needs_the_csrf_token(self) -> None:
        """Without the CSRF token, or from a foreign origin: 403, session kept (#64)."""
        browser = self.logged_in()
        answer = browser.post("/logout")
        self.assertEqual(answer.code, 403)
        self.assertIsNotNone(self.session_of(browser))
        wrong = browser.post("/logout", headers={"X-Twistauth-CSRF": "nope"})
        self.assertEqual(wrong.code, 403)
        foreign = browser.post("/logout", headers={
            "X-Twistauth-CSRF": browser.cookie(CSRF), "Origin": "https://evil.example"})
        self.assertEqual(foreign.code, 403)
        self.assertIsNotNone(self.session_of(browser))
        # "Origin: null" (a form on a no-referrer page) still needs the token.
        opaque = browser.post("/logout", headers={"Origin": "null"})
        self.assertEqual(opaque.code, 403)
        self.assertIsNotNone(self.session_of(browser))

    def test_opaque_origin_with_the_csrf_token(self) -> None:
        browser = self.logged_in()
        answer = browser.post(
            "/logout", headers={"Origin": "null", "X-Twistauth-CSRF": browser.cookie(CSRF)}
        )
        self.assertEqual(answer.code, 302)
        self.assertIsNone(self.session_of(browser))

    def test_logout_then_provider(self) -> None:
        """
        The local session ends first, then a 302 to the end-session
        endpoint with id_token_hint, client_id, the registered
        post_logout_redirect_uri and a fresh state; the return checks the
        state and lands on the start page (#64).
        """
        browser = self.logged_in()
        token = browser.cookie(SESSION)
        id_token = result_of(self.h.tokens.get_user_context("fake:alice")).tokens.id_token
        answer = browser.post(
            "/logout", headers={"X-Twistauth-CSRF": browser.cookie(CSRF), "Origin": RP}
        )
        self.assertEqual(answer.code, 302, answer.text)
        self.assertIsNone(result_of(self.h.sessions.load(token)))
        self.assertIsNone(browser.cookie(SESSION))
        location = answer.location or ""
        self.assertTrue(location.startswith("https://fake.op.example/logout?"))
        query = _query(location)
        self.assertEqual(query["id_token_hint"], id_token)
        self.assertEqual(query["client_id"], self.fake.client_id)
        self.assertEqual(query["post_logout_redirect_uri"], RP + "/logout/return")
        self.assertEqual(len(query["state"]), 43)
        self.assertEqual(answer.header("cache-control"), "no-store")
        # The provider sends the browser back with the state.
        provider = self.h.provider_http
        back = result_of(provider.get(location, allow_redirects=False))
        provider.flush()
        self.assertEqual(back.code, 302)
        returned = back.headers.getRawHeaders("location")[0]
        head = browser.request("HEAD", returned)  # consumes nothing
        self.assertEqual((head.code, head.location), (200, None))
        landing = browser.get(returned)
        self.assertEqual((landing.code, landing.location), (303, "/"))
        self.assertEqual(self.fake.ended_sessions, [self.fake_sid(id_token)])
        # The same return again: a neutral page.
        again = browser.get(returned)
        self.assertEqual((again.code, again.location), (200, None))

    def fake_sid(self, id_token: str) -> str:
        import jwt

        return str(jwt.decode(id_token, options={"verify_signature": False})["sid"])

    def test_csrf_form_field(self) -> None:
        browser = self.logged_in()
        answer = browser.post("/logout", data={"csrf_token": browser.cookie(CSRF)})
        self.assertEqual(answer.code, 302)
        self.assertIsNone(browser.cookie(SESSION))

    def test_without_a_session(self) -> None:
        browser = self.h.browser()
        answer = browser.post("/logout")
        self.assertEqual((answer.code, answer.location), (303, "/"))

    def test_return_without_or_with_a_foreign_state(self) -> None:
        """
        A return with no state, another browser's, or a made-up one: a
        neutral 200 page, no redirect, never 500; the local logout stays
        done (#65).
        """
        browser = self.logged_in()
        answer = browser.post("/logout", headers={"X-Twistauth-CSRF": browser.cookie(CSRF)})
        state = _query(answer.location or "")["state"]
        stranger = self.h.browser()
        for path in ("/logout/return", "/logout/return?state=made-up",
                     f"/logout/return?state={state}&state=x",
                     "/logout/return?next=https://evil.example&state=" + "q" * 43):
            page = browser.get(path)
            self.assertEqual((page.code, page.location), (200, None), path)
            self.assertIn("logged out", page.text)
            self.assertNotIn("evil", page.text)
        page = stranger.get(f"/logout/return?state={state}")
        self.assertEqual((page.code, page.location), (200, None))
        self.assertIsNone(browser.cookie(SESSION))

    def test_provider_without_end_session(self) -> None:
        h = make_harness(config_options={"post_logout_redirect_uri": None})
        browser = h.browser()
        browser.log_in()
        answer = browser.post("/logout", headers={"X-Twistauth-CSRF": browser.cookie(CSRF)})
        # Without a registered return URI the provider is still told (no state).
        self.assertEqual(answer.code, 302)
        self.assertNotIn("state", _query(answer.location or ""))

    def test_logout_publishes(self) -> None:
        recorded: List[Any] = []

        class Recorder:
            def notify_all(self, key: Any, message: Any) -> Any:
                recorded.append((key, message))
                from twisted.internet.defer import succeed

                return succeed(0)

        h = make_harness(bus=Recorder())
        browser = h.browser()
        browser.log_in()
        browser.post("/logout", headers={"X-Twistauth-CSRF": browser.cookie(CSRF)})
        self.assertEqual(len(recorded), 1)
        self.assertTrue(recorded[0][0].startswith("logout:session:"))
        self.assertEqual(recorded[0][1], {"reason": "logout"})


class FrontchannelTests(_Base):
    """
    Front-Channel Logout 1.0 (checklist #66): the provider loads
    ``/logout/frontchannel?iss=&sid=`` in an iframe, usually without cookies.
    """

    def frontchannel(self, **query: str) -> Any:
        # A fresh browser: the iframe's request carries no session cookie.
        return self.h.browser().get("/logout/frontchannel?" + urlencode(query))

    def test_matching_iss_and_sid_ends_that_session(self) -> None:
        one, two = self.logged_in(), self.logged_in()
        sid = self.session_of(one).provider_sid
        answer = self.frontchannel(iss=self.fake.issuer, sid=sid)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("cache-control"), "no-store")
        policy = answer.header("content-security-policy") or ""
        issuer = urlsplit(self.fake.issuer)
        self.assertIn(f"frame-ancestors {issuer.scheme}://{issuer.netloc}", policy)
        self.assertIsNone(answer.header("x-frame-options"))
        self.assertIsNone(self.session_of(one))
        self.assertIsNotNone(self.session_of(two))

    def test_mismatch_is_ignored(self) -> None:
        one = self.logged_in()
        sid = self.session_of(one).provider_sid
        for query in (
            {"iss": self.fake.issuer + "/other", "sid": sid},
            {"iss": self.fake.issuer, "sid": sid + "x"},
            {"iss": self.fake.issuer},
            {"sid": sid},
            {},
        ):
            answer = self.frontchannel(**query)
            self.assertEqual(answer.code, 200, query)
            self.assertIn("frame-ancestors", answer.header("content-security-policy") or "")
        self.assertIsNotNone(self.session_of(one))

    def test_repeated_parameters_are_ignored(self) -> None:
        one = self.logged_in()
        sid = self.session_of(one).provider_sid
        answer = self.h.browser().get(
            "/logout/frontchannel?" + urlencode([("iss", self.fake.issuer), ("sid", sid), ("sid", sid)])
        )
        self.assertEqual(answer.code, 200)
        self.assertIsNotNone(self.session_of(one))
