"""
The login and redirect routes (`twistauth.web.auth`), end to end through
``StubTreq`` on a `Clock` against `FakeProvider`: checklist cases 3–8, 11,
14–16, 44, R10, and the users and sessions a login makes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from urllib.parse import parse_qs, urlsplit

from test_oidc_support import RP, make_harness, result_of
from test_sessions_support import capture_logs
from twisted.trial.unittest import SynchronousTestCase

from twistauth.accounts import User
from twistauth.accounts.build import make_user_store
from twistauth.errors import BackendUnavailableError
from twistauth.identity.flows import state_digest
from twistauth.identity.tokens import user_id_for

SESSION = "__Host-twistauth_session"


def _query(url: str) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _flow_cookie(state: str) -> str:
    return "__Host-twistauth_session_login_" + state_digest(state)[:16]


class LoginRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = make_harness()
        self.fake = self.h.fake
        self.browser = self.h.browser()

    def test_login_redirects_with_pkce_and_binds_the_browser(self) -> None:
        """
        ``GET /login`` answers 302 to the authorization endpoint with state,
        nonce and an S256 challenge, never caches, and sets one cookie named
        after the state: ``__Host-``, Secure, HttpOnly, SameSite=Lax, Path=/,
        Max-Age = the login TTL (#1–3).
        """
        answer = self.browser.start_login(next_path="/after")
        self.assertEqual(answer.code, 302)
        location = answer.location or ""
        self.assertTrue(location.startswith("https://fake.op.example/authorize?"))
        query = _query(location)
        self.assertEqual(query["code_challenge_method"], "S256")
        self.assertEqual(len(query["state"]), 43)
        self.assertEqual(len(query["nonce"]), 43)
        self.assertEqual(query["redirect_uri"], RP + "/redirect")
        # return_to is kept server-side, never in the state (#14).
        self.assertNotIn("after", query["state"])
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertEqual(answer.header("referrer-policy"), "no-referrer")
        [cookie] = answer.set_cookies
        name = _flow_cookie(query["state"])
        self.assertRegex(
            cookie,
            "^" + re.escape(name) + r"=[A-Za-z0-9_-]{43}; Path=/; Max-Age=600; Secure; "
            r"HttpOnly; SameSite=lax$",
        )
        self.assertEqual(self.fake.hits["authorize"], 0)
        self.assertEqual(len(self.h.oidc.login_flows.store), 1)

    def test_successful_callback(self) -> None:
        """
        The callback finishes the login: 303 to the saved return path with
        no-store and no-referrer (#15), the flow cookie cleared, a new session
        bound to the user and the provider's sid, the user created with its
        claims.
        """
        answer = self.browser.log_in(next_path="/after?x=1")
        self.assertEqual(answer.code, 303, answer.text)
        self.assertEqual(answer.location, "/after?x=1")
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertEqual(answer.header("referrer-policy"), "no-referrer")
        policy = answer.header("content-security-policy") or ""
        self.assertIn("default-src 'none'", policy)
        self.assertNotIn("http", policy)
        self.assertNotIn("<script", answer.text)
        cleared = [c for c in answer.set_cookies if c.startswith("__Host-twistauth_session_login_")]
        self.assertEqual(len(cleared), 1)
        self.assertIn("Max-Age=0", cleared[0])
        token = self.browser.cookie(SESSION)
        self.assertIsNotNone(token)
        session = result_of(self.h.sessions.load(token))
        self.assertEqual(session.user_id, "fake:alice")
        self.assertEqual(session.issuer, "https://fake.op.example")
        self.assertTrue(session.provider_sid)
        info = json.loads(self.browser.call("session.info").body)
        self.assertEqual(info["result"]["user_id"], "fake:alice")
        user = self.h.user("fake:alice")
        self.assertEqual(user.profile["oidc"]["subject"], "alice")
        self.assertEqual(user.profile["oidc"]["claims"], {})
        self.assertIsNone(user.password_hash)
        self.assertEqual(self.fake.hits["token"], 1)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_login_renews_a_pre_login_session(self) -> None:
        """
        A session the browser had before login does not survive it (fixation).
        """
        self.browser.call("session.enable_signing")  # makes an anonymous session
        before = self.browser.cookie(SESSION)
        self.assertIsNotNone(before)
        self.assertEqual(self.browser.log_in().code, 303)
        after = self.browser.cookie(SESSION)
        self.assertNotEqual(before, after)
        self.assertIsNone(result_of(self.h.sessions.load(before)))

    def test_oidc_session_method(self) -> None:
        """
        ``oidc.session`` tells the caller about its provider login, never a token.
        """
        self.browser.log_in()
        result = json.loads(self.browser.call("oidc.session").body)["result"]
        self.assertEqual(result["user_id"], "fake:alice")
        self.assertEqual(result["subject"], "alice")
        self.assertEqual(result["access_token_expires_in"], 3600)
        self.assertNotIn("token", json.dumps({k: v for k, v in result.items()
                                              if k != "access_token_expires_in"}))

    def test_unknown_provider(self) -> None:
        answer = self.browser.start_login(provider="nobody")
        self.assertEqual(answer.code, 404)
        self.assertIn("text/html", answer.header("content-type") or "")

    def test_disabled_provider(self) -> None:
        """
        Metadata naming another issuer disables the provider: login answers
        503 with a page, and sends nobody anywhere (#36).
        """
        self.fake.misbehave("discovery", "wrong_issuer")
        answer = self.browser.start_login()
        self.assertEqual(answer.code, 503)
        self.assertIsNone(answer.location)
        self.assertIn("text/html", answer.header("content-type") or "")
        self.assertEqual(len(self.h.oidc.login_flows.store), 0)

    def test_only_provider_is_the_default(self) -> None:
        self.assertEqual(self.browser.start_login(provider=None).code, 302)

    def test_head_consumes_nothing(self) -> None:
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        head = self.browser.request("HEAD", "/redirect?state=" + query["state"])
        self.assertEqual(head.code, 200)
        self.assertEqual(self.browser.finish_login(query).code, 303)

    # -- case 3 -----------------------------------------------------------

    def test_callback_after_the_ttl(self) -> None:
        """
        A callback after the login TTL is refused (400) and the token
        endpoint is never called (#3).
        """
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        self.h.clock.advance(601)
        answer = self.browser.finish_login(query)
        self.assertEqual(answer.code, 400)
        self.assertIn("start again", answer.text)
        self.assertEqual(self.fake.hits["token"], 0)
        self.assertIsNone(self.browser.cookie(SESSION))
        self.assertEqual(self.h.oidc.login_flows.store.stats()["expired"], 1)

    def test_transaction_past_ttl_but_still_stored(self) -> None:
        """
        Even a record the store still holds is refused once older than the
        TTL (the relying party checks the age itself).
        """
        self.h.parts.routes.login_flows.store.clock = _Frozen(self.h.clock.seconds())
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        self.h.clock.advance(601)
        answer = self.browser.finish_login(query)
        self.assertEqual(answer.code, 400)
        self.assertIn("expired", answer.text)
        self.assertEqual(self.fake.hits["token"], 0)

    # -- case 4 -----------------------------------------------------------

    def test_missing_state(self) -> None:
        answer = self.browser.get("/redirect?code=abc")
        self.assertEqual(answer.code, 400)
        self.assertEqual(self.fake.hits["token"], 0)

    def test_unknown_state(self) -> None:
        self.browser.start_login()
        answer = self.browser.get("/redirect?code=abc&state=" + "x" * 43)
        self.assertEqual(answer.code, 400)
        self.assertEqual(self.fake.hits["token"], 0)

    def test_state_of_another_browser(self) -> None:
        """
        Login CSRF: the attacker's callback (code and state) pushed into the
        victim's browser is refused; the token endpoint is never called (#4).
        """
        attacker = self.h.browser()
        started = attacker.start_login()
        query = self.fake.authorize(started.location or "")
        victim = self.browser
        answer = victim.finish_login(query)
        self.assertEqual(answer.code, 400)
        self.assertIn("not started in this browser", answer.text)
        self.assertEqual(self.fake.hits["token"], 0)
        self.assertIsNone(victim.cookie(SESSION))

    def test_forged_binding_cookie(self) -> None:
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        other = self.h.browser()
        other.jar.set_cookie(_cookie(_flow_cookie(query["state"]), "x" * 43))
        answer = other.finish_login(query)
        self.assertEqual(answer.code, 400)
        self.assertEqual(self.fake.hits["token"], 0)
        # The real browser cannot finish it either: the flow was used once.
        self.assertEqual(self.browser.finish_login(query).code, 400)

    # -- case 5 -----------------------------------------------------------

    def test_replayed_callback(self) -> None:
        """
        The same callback URL again (back button, leaked URL) is refused and
        makes no second code exchange (#5).
        """
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        self.assertEqual(self.browser.finish_login(query).code, 303)
        flow_cookie = _flow_cookie(query["state"])
        # Even a browser that kept the binding cookie.
        self.browser.jar.set_cookie(_cookie(flow_cookie, "y" * 43))
        again = self.browser.finish_login(query)
        self.assertEqual(again.code, 400)
        self.assertEqual(self.fake.hits["token"], 1)

    # -- case 6 -----------------------------------------------------------

    def test_parallel_tabs(self) -> None:
        """
        Two logins started in two tabs of one browser both finish, in any
        order (one cookie per flow, #6).
        """
        first = self.browser.start_login(next_path="/one")
        second = self.browser.start_login(next_path="/two")
        self.assertEqual(len(self.browser.cookie_names()), 2)
        q1 = self.fake.authorize(first.location or "")
        q2 = self.fake.authorize(second.location or "")
        answer2 = self.browser.finish_login(q2)
        answer1 = self.browser.finish_login(q1)
        self.assertEqual((answer2.code, answer2.location), (303, "/two"))
        self.assertEqual((answer1.code, answer1.location), (303, "/one"))
        self.assertEqual(self.fake.hits["token"], 2)

    def test_many_tabs(self) -> None:
        starts = [self.browser.start_login(next_path=f"/t{i}") for i in range(10)]
        queries = [self.fake.authorize(s.location or "") for s in starts]
        for i, query in reversed(list(enumerate(queries))):
            answer = self.browser.finish_login(query)
            self.assertEqual((answer.code, answer.location), (303, f"/t{i}"))

    # -- case 7 -----------------------------------------------------------

    def test_access_denied(self) -> None:
        """
        ``error=access_denied``: the state is checked first, a 4xx page shows
        the error and its description HTML-escaped, the flow is consumed and
        no session is made (#7).
        """
        self.fake.misbehave("authorize", "access_denied")
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        self.assertEqual(query["error"], "access_denied")
        answer = self.browser.finish_login(query)
        self.assertEqual(answer.code, 400)
        self.assertIn("<code>access_denied</code>", answer.text)
        self.assertIn("The user &lt;b&gt;refused&lt;/b&gt;", answer.text)
        self.assertNotIn("<b>refused", answer.text)
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertIsNone(self.browser.cookie(SESSION))
        self.assertEqual(self.fake.hits["token"], 0)
        # The flow was consumed: nothing pending, a replay is refused.
        self.assertEqual(len(self.h.oidc.login_flows.store), 0)
        self.assertEqual(self.browser.finish_login(query).code, 400)

    def test_error_with_a_foreign_state(self) -> None:
        """An error response with a state this browser never sent: 400, nothing shown from it."""
        answer = self.browser.get(
            "/redirect?error=access_denied&error_description=%3Cscript%3E&state=" + "z" * 43
        )
        self.assertEqual(answer.code, 400)
        self.assertNotIn("script", answer.text)

    # -- case 8 -----------------------------------------------------------

    def test_redirect_uri_from_configuration_only(self) -> None:
        """
        A forged Host or X-Forwarded-Host changes neither the redirect_uri of
        the authorization request nor that of the token request (#8).
        """
        forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example",
                  "X-Forwarded-Proto": "http"}
        started = self.browser.get("/login?provider=fake", headers=forged)
        self.assertEqual(_query(started.location or "")["redirect_uri"], RP + "/redirect")
        query = self.fake.authorize(started.location or "")
        self.assertEqual(self.browser.finish_login(query).code, 303)
        self.assertEqual(self.fake.token_requests[-1]["redirect_uri"], RP + "/redirect")

    # -- case 14 ----------------------------------------------------------

    def test_tampered_state(self) -> None:
        started = self.browser.start_login(next_path="/private")
        query = self.fake.authorize(started.location or "")
        query["state"] = query["state"][:-1] + ("A" if query["state"][-1] != "A" else "B")
        self.assertEqual(self.browser.finish_login(query).code, 400)
        self.assertEqual(self.fake.hits["token"], 0)

    def test_swapped_state(self) -> None:
        """
        The code of one login delivered with the state of another: the
        exchange carries the other login's verifier and is refused (#12, #14).
        """
        one = self.browser.start_login(next_path="/one")
        two = self.browser.start_login(next_path="/two")
        q1 = self.fake.authorize(one.location or "")
        q2 = self.fake.authorize(two.location or "")
        answer = self.browser.finish_login({"code": q1["code"], "state": q2["state"],
                                            "iss": q2["iss"]})
        self.assertEqual(answer.code, 400)
        self.assertIsNone(self.browser.cookie(SESSION))

    def test_open_redirect_falls_back_to_root(self) -> None:
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil", "javascript:x"):
            answer = self.browser.log_in(next_path=target)
            self.assertEqual((answer.code, answer.location), (303, "/"), target)

    # -- users ------------------------------------------------------------

    def test_local_account_is_not_taken_over(self) -> None:
        """
        A local password account whose id equals the login's user id is
        never logged into by the provider login (409).
        """
        result_of(self.h.users.create(User(user_id="fake:alice", password_hash="$argon2id$x")))
        answer = self.browser.log_in()
        self.assertEqual(answer.code, 409)
        self.assertIsNone(self.browser.cookie(SESSION))
        self.assertEqual(self.h.user("fake:alice").tokens, {})

    def test_disabled_user(self) -> None:
        self.browser.log_in()
        user = self.h.user("fake:alice")
        result_of(self.h.users.replace(user.evolve(disabled=True)))
        other = self.h.browser()
        self.assertEqual(other.log_in().code, 403)
        self.assertIsNone(other.cookie(SESSION))

    def test_roles_come_from_the_user_record(self) -> None:
        self.browser.log_in()
        user = self.h.user("fake:alice")
        result_of(self.h.users.replace(user.evolve(roles={"admin"})))
        other = self.h.browser()
        other.log_in()
        session = result_of(self.h.sessions.load(other.cookie(SESSION)))
        self.assertEqual(session.roles, frozenset({"admin"}))

    def test_user_id_for_odd_subjects(self) -> None:
        self.assertEqual(user_id_for("kc", "alice"), "kc:alice")
        long_id = user_id_for("kc", "x" * 255)
        self.assertTrue(long_id.startswith("kc:#"))
        self.assertEqual(user_id_for("kc", "a\x00b"), user_id_for("kc", "a\x00b"))
        self.assertNotEqual(user_id_for("kc", "a\x00b"), user_id_for("kc", "a\x00c"))

    # -- case 44 ----------------------------------------------------------

    def test_tokens_never_reach_the_browser_and_are_sealed(self) -> None:
        """
        No token appears in any response; the user record holds them only
        sealed (AES-GCM), bound to the user and provider (#44).
        """
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        answer = self.browser.finish_login(query)
        info = self.browser.call("oidc.session")
        tokens = result_of(self.h.tokens.get_user_context("fake:alice")).tokens
        secrets = [tokens.access_token, tokens.refresh_token, tokens.id_token]
        for response in (answer, info):
            everything = response.text + repr(response.headers)
            for secret in secrets:
                self.assertNotIn(secret, everything)
        record = json.dumps(self.h.user("fake:alice").to_record())
        for secret in secrets:
            self.assertNotIn(secret, record)
        self.assertNotIn(query["code"], record)
        entry = self.h.user("fake:alice").tokens["fake"]
        self.assertEqual(entry["alg"], "A256GCM")
        # Moved to another user, the sealed value does not open.
        intruder = User(user_id="fake:mallory", tokens={"fake": entry},
                        profile={"oidc": {"provider": "fake"}})
        result_of(self.h.users.create(intruder))
        failure = self.failureResultOf(self.h.tokens.get_user_context("fake:mallory"))
        self.assertEqual(failure.value.name, "no_provider_login")

    def test_yaml_token_file(self) -> None:
        """
        With the YAML user store the file is mode 0600 and holds no token in
        the clear (#44).
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "users.yaml")
        store = make_user_store("yaml", clock=self.h.clock, reactor=_Synchronous(), path=path)
        h = make_harness(users=store)
        browser = h.browser()
        self.assertEqual(browser.log_in().code, 303)
        tokens = result_of(h.tokens.get_user_context("fake:alice")).tokens
        content = open(path, encoding="utf-8").read()
        self.assertIn("fake:alice", content)
        for secret in (tokens.access_token, tokens.refresh_token, tokens.id_token):
            self.assertNotIn(secret, content)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    # -- case 15 and 16 -----------------------------------------------------

    def test_error_pages_are_not_cached(self) -> None:
        answer = self.browser.get("/redirect?state=nope")
        self.assertEqual(answer.code, 400)
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertEqual(answer.header("referrer-policy"), "no-referrer")

    def test_nothing_secret_is_logged(self) -> None:
        """
        A whole login, a refresh, a back-channel logout and an RP-initiated
        logout log no code, state, nonce, verifier, token, session id, logout
        token or client secret (#16).
        """
        with capture_logs() as lines:
            started = self.browser.start_login()
            auth_query = _query(started.location or "")
            query = self.fake.authorize(started.location or "")
            self.browser.finish_login(query)
            session_id = self.browser.cookie(SESSION)
            csrf = self.browser.cookie("__Host-twistauth_session_csrf")
            first = result_of(self.h.tokens.get_user_context("fake:alice")).tokens
            for _ in range(3):  # within the session's idle timeout, past the token's life
                self.h.clock.advance(1200)
                self.assertEqual(self.browser.call("oidc.session").code, 200)
            second = result_of(self.h.tokens.get_user_context("fake:alice")).tokens
            other = self.h.browser()
            other.log_in()
            other_sid = result_of(self.h.sessions.load(other.cookie(SESSION))).provider_sid
            logout_token = self.fake.issue_logout_token(sid=other_sid)
            back = other.post("/logout/backchannel", data={"logout_token": logout_token})
            self.assertEqual(back.code, 200)
            logout = self.browser.post("/logout", headers={"X-Twistauth-CSRF": csrf})
            self.assertEqual(logout.code, 302)
        self.assertNotEqual(first.access_token, second.access_token)
        text = "\n".join(lines)
        self.assertIn("logged in with fake", text)
        secrets = {
            "code": query["code"], "state": query["state"], "nonce": auth_query["nonce"],
            "challenge": auth_query["code_challenge"],
            "verifier": self.fake.token_requests[0]["code_verifier"],
            "session": session_id, "csrf": csrf, "logout_token": logout_token,
            "client_secret": self.fake.client_secret,
            "access": first.access_token, "refresh": first.refresh_token, "id": first.id_token,
            "access2": second.access_token, "id2": second.id_token,
        }
        for name, value in secrets.items():
            self.assertTrue(value, name)
            self.assertNotIn(value, text, name)
            # Nor a recognisable part of a JWT (its signature).
            if value.count(".") == 2:
                self.assertNotIn(value.split(".")[2], text, name)

    # -- R10 ------------------------------------------------------------------

    def test_session_store_failure_after_the_code_exchange(self) -> None:
        """
        The session cannot be written after the code exchange: the user is
        told to retry, no tokens are stored, and replaying the callback (as
        after a crash and restart) is refused (R10).
        """
        cache = self.h.sessions
        original = cache.save

        def failing(session: object) -> object:
            from twisted.internet.defer import fail

            return fail(BackendUnavailableError("the session cache is down"))

        cache.save = failing
        started = self.browser.start_login()
        query = self.fake.authorize(started.location or "")
        answer = self.browser.finish_login(query)
        cache.save = original
        self.assertEqual(answer.code, 503)
        self.assertIn("try again", answer.text)
        self.assertEqual(self.fake.hits["token"], 1)
        user = self.h.user("fake:alice")
        self.assertEqual(user.tokens, {})
        replay = self.browser.finish_login(query)
        self.assertEqual(replay.code, 400)
        self.assertEqual(self.fake.hits["token"], 1)
        self.assertEqual(self.h.user("fake:alice").tokens, {})
        self.assertIsNone(self.browser.cookie(SESSION))

    def test_token_store_failure_undoes_the_session(self) -> None:
        store = self.h.users
        original = store.replace

        def failing(user: object) -> object:
            from twisted.internet.defer import fail

            return fail(BackendUnavailableError("the user store is down"))

        store.replace = failing
        answer = self.browser.log_in()
        store.replace = original
        self.assertEqual(answer.code, 503)
        self.assertIsNone(self.browser.cookie(SESSION))
        self.assertEqual(len(self.h.sessions), 0)


class ProvidersTests(SynchronousTestCase):
    """Several providers: each its own redirect URI (#11), the login page."""

    def setUp(self) -> None:
        self.h = make_harness(names=("alpha", "beta"), per_provider_redirect=True)
        self.browser = self.h.browser()

    def test_each_provider_logs_in_on_its_own_redirect_uri(self) -> None:
        for name in ("alpha", "beta"):
            browser = self.h.browser()
            answer = browser.log_in(name, path=f"/redirect/{name}")
            self.assertEqual(answer.code, 303, answer.text)
            session = result_of(self.h.sessions.load(browser.cookie(SESSION)))
            self.assertEqual(session.user_id, f"{name}:alice")
            self.assertEqual(session.issuer, f"https://{name}.op.example")

    def test_response_on_another_providers_redirect_uri(self) -> None:
        """
        An authorization response for a beta login arriving on alpha's
        redirect URI (or the shared one) is refused, with no token call (#11).
        """
        for path in ("/redirect/alpha", "/redirect"):
            started = self.browser.start_login("beta")
            query = self.h.providers["beta"].authorize(started.location or "")
            answer = self.browser.finish_login(query, path=path)
            self.assertEqual(answer.code, 400, path)
            self.assertIn("another identity provider", answer.text)
        self.assertEqual(self.h.providers["beta"].hits["token"], 0)
        self.assertEqual(self.h.providers["alpha"].hits["token"], 0)

    def test_provider_name_required_with_several(self) -> None:
        self.assertEqual(self.browser.start_login(provider=None).code, 404)

    def test_login_page(self) -> None:
        """
        One styled button per provider; the page loads nothing from
        elsewhere and its style is allowed by hash only.
        """
        answer = self.browser.get("/login/page?next=/after")
        self.assertEqual(answer.code, 200)
        text = answer.text
        self.assertIn('class="twistauth-wave twistauth-wave--alpha"', text)
        self.assertIn('href="/login?provider=beta&amp;next=%2Fafter"', text)
        self.assertIn("Sign in with Alpha", text)
        policy = answer.header("content-security-policy") or ""
        self.assertIn("style-src 'sha256-", policy)
        css = re.search(r"<style>(.*?)</style>", text, re.S).group(1)  # type: ignore[union-attr]
        import base64
        import hashlib

        digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        self.assertIn(digest, policy)
        fragment = self.browser.get("/login/page?fragment=1")
        self.assertTrue(fragment.text.startswith("<style>"))
        self.assertNotIn("<html", fragment.text)
        unsafe = self.browser.get("/login/page?next=//evil.example")
        self.assertNotIn("evil", unsafe.text)

    def test_providers_json(self) -> None:
        answer = self.browser.get("/login/providers")
        self.assertEqual(answer.code, 200)
        self.assertEqual(
            json.loads(answer.body),
            {"providers": [
                {"name": "alpha", "label": "Alpha", "login_url": "/login?provider=alpha"},
                {"name": "beta", "label": "Beta", "login_url": "/login?provider=beta"},
            ]},
        )


class _Frozen:
    """A clock that never moves (the flow store never expires anything)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now


class _Synchronous:
    """A 'reactor' whose thread pool runs each call at once (the YAML store's I/O)."""

    def callFromThread(self, f, *args, **kwargs):  # noqa: ANN001, ANN201
        f(*args, **kwargs)

    def getThreadPool(self):  # noqa: ANN201
        return self

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: ANN001, ANN201
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure

            on_result(False, Failure())
        else:
            on_result(True, result)


def _cookie(name: str, value: str):  # noqa: ANN202
    from http.cookiejar import Cookie

    return Cookie(
        version=0, name=name, value=value, port=None, port_specified=False,
        domain="rp.example", domain_specified=False, domain_initial_dot=False, path="/",
        path_specified=True, secure=True, expires=None, discard=True, comment=None,
        comment_url=None, rest={}, rfc2109=False,
    )


class InstallTests(SynchronousTestCase):
    """`install_oidc` as `make_app` calls it."""

    def test_make_app_installs_the_routes(self) -> None:
        from test_sessions_support import capture_logs
        from treq.testing import StubTreq
        from twisted.internet.task import Clock

        from twistauth.app import make_app

        with capture_logs() as lines:
            app = make_app(
                clock=Clock(), session_cache="memory", user_store="memory",
                providers={"kc": {
                    "issuer": "https://id.example/realms/main", "client_id": "twistauth",
                    "client_secret": "s3cret-value", "redirect_uri": "https://app.example/cb",
                }},
            )
        text = "\n".join(lines)
        self.assertIn("redirect_uri https://app.example/cb is not served here", text)
        self.assertIn("OpenID Connect provider kc", text)
        self.assertNotIn("s3cret-value", text)
        self.assertIsNotNone(app.registry.lookup("oidc.session"))
        stub = StubTreq(app.resource())
        response = result_of(stub.get("https://app.example/login/providers"))
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(result_of(response.content()))["providers"][0]["name"], "kc")

    def test_no_providers_no_routes(self) -> None:
        from treq.testing import StubTreq
        from twisted.internet.task import Clock

        from twistauth.app import make_app

        app = make_app(clock=Clock(), session_cache="memory", user_store="memory")
        stub = StubTreq(app.resource())
        self.assertEqual(result_of(stub.get("https://app.example/login?provider=x")).code, 404)
        self.assertIsNone(app.registry.lookup("oidc.session"))
