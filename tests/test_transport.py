"""
The session transport through the whole HTTP stack (StubTreq, Clock): cookie
and header carriers, lazy creation, fixation, logout, CSRF, CORS, request
signing, and that none of the secrets reach the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from http.cookies import SimpleCookie
from typing import Any, Dict, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.errors import AuthRequiredError
from twistauth.methods import MethodRegistry
from twistauth.web.signing import request_signature, response_signature

# These tests are not about access control: every method is callable, and
# the users they log in need not exist in a user store.
OPEN_ACCESS = {"acl_initial": ["*"], "access_account_check": False}

START = 1_800_000_000.0
URL = "http://localhost/api"


def test_methods() -> MethodRegistry:
    registry = MethodRegistry()

    @registry.method("t.login")
    async def login(handler: Any, user_id: str, remember: bool = False) -> Dict[str, Any]:
        await handler.log_in(user_id, ["user"], permanent=remember)
        return {"ok": True}

    @registry.method("t.logout")
    async def logout(handler: Any) -> None:
        await handler.log_out()

    @registry.method("t.everywhere")
    async def everywhere(handler: Any) -> int:
        if handler.session is None or handler.session.user_id is None:
            raise AuthRequiredError()
        return await handler.log_out_everywhere(handler.session.user_id)  # type: ignore[no-any-return]

    @registry.method("t.whoami")
    def whoami(handler: Any) -> Optional[str]:
        return handler.session.user_id if handler.session is not None else None

    @registry.method("t.put")
    async def put(handler: Any, key: str, value: Any) -> None:
        session = await handler.ensure_session()
        session[key] = value

    @registry.method("t.get")
    def get(handler: Any, key: str) -> Any:
        return handler.session.get(key) if handler.session is not None else None

    return registry


class Response:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def set_cookies(self) -> List[str]:
        return list(self.headers.getRawHeaders("set-cookie") or [])

    def cookie(self, name: str) -> Optional[str]:
        for line in self.set_cookies():
            jar: SimpleCookie = SimpleCookie()
            jar.load(line)
            if name in jar:
                return jar[name].value
        return None


class TransportTests(SynchronousTestCase):
    session_cache = "memory"
    settings: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        options: Dict[str, Any] = {"session_cache": self.session_cache}
        if self.session_cache == "client":
            options["session_keys"] = [secrets.token_bytes(32)]
        options.update(self.settings)
        self.app = make_app(**OPEN_ACCESS, clock=self.clock, registry=test_methods(), **options)
        self.client = StubTreq(self.app.resource())
        self.cache = self.app.api.sessions
        self.logged: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def post(
        self,
        method: str,
        parameters: Optional[Dict[str, Any]] = None,
        *,
        cookie: Optional[Tuple[str, str]] = None,
        csrf: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        body: Optional[bytes] = None,
        url: str = URL,
    ) -> Response:
        sent = {"content-type": "application/json"}
        if cookie is not None:
            sent["cookie"] = f"{cookie[0]}={cookie[1]}"
        if csrf is not None:
            sent["x-twistauth-csrf"] = csrf
        sent.update(headers or {})
        if body is None:
            body = json.dumps({"method": method, "parameters": parameters or {}}).encode()
        d = self.client.post(url, data=body, headers=sent)
        self.client.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        return Response(response.code, response.headers, content)

    def logged_in(self, user: str = "alice", remember: bool = False) -> Tuple[str, str]:
        r = self.post("t.login", {"user_id": user, "remember": remember})
        self.assertEqual(r.code, 200, r.body)
        token = r.cookie("__Host-twistauth_session")
        csrf = r.cookie("__Host-twistauth_session_csrf")
        assert token and csrf
        return token, csrf

    def call_as(self, token: str, csrf: str, method: str, parameters: Any = None) -> Response:
        return self.post(method, parameters, cookie=("__Host-twistauth_session", token), csrf=csrf)

    # -- creation --------------------------------------------------------

    def test_anonymous_call_sets_nothing(self) -> None:
        r = self.post("t.whoami")
        self.assertEqual(r.json, {"result": None})
        self.assertEqual(r.set_cookies(), [])

    def test_cookie_attributes(self) -> None:
        r = self.post("t.login", {"user_id": "alice"})
        session_line = [c for c in r.set_cookies() if c.startswith("__Host-twistauth_session=")]
        self.assertEqual(len(session_line), 1)
        attributes = [a.strip().lower() for a in session_line[0].split(";")[1:]]
        self.assertEqual(sorted(attributes), ["httponly", "path=/", "samesite=lax", "secure"])
        csrf_line = [c for c in r.set_cookies() if c.startswith("__Host-twistauth_session_csrf=")]
        self.assertNotIn("httponly", csrf_line[0].lower())

    def test_insecure_switch_drops_prefix_and_secure(self) -> None:
        app = make_app(
            **OPEN_ACCESS, clock=self.clock, registry=test_methods(), session_cookie_secure=False
        )
        client = StubTreq(app.resource())
        d = client.post(URL, data=b'{"method":"t.login","parameters":{"user_id":"a"}}')
        client.flush()
        response = self.successResultOf(d)
        lines = response.headers.getRawHeaders("set-cookie")
        self.assertTrue(any(line.startswith("twistauth_session=") for line in lines))
        self.assertFalse(any("secure" in line.lower() for line in lines))

    def test_session_ids_are_long_and_random(self) -> None:
        tokens = {self.logged_in(f"user{i}")[0] for i in range(50)}
        self.assertEqual(len(tokens), 50)
        if self.session_cache != "client":
            for token in tokens:
                self.assertGreaterEqual(len(base64.urlsafe_b64decode(token + "==")), 16)

    def test_remember_me_sets_max_age(self) -> None:
        # A remembered cookie never outlives the absolute timeout (12 h here).
        r = self.post("t.login", {"user_id": "alice", "remember": True})
        line = [c for c in r.set_cookies() if c.startswith("__Host-twistauth_session=")][0]
        self.assertIn("max-age=43200", line.lower())
        self.app = make_app(
            **OPEN_ACCESS,
            clock=self.clock,
            registry=test_methods(),
            session_absolute_timeout=30 * 86400.0,
            **(
                {"session_cache": "client", "session_keys": [secrets.token_bytes(32)]}
                if self.session_cache == "client"
                else {}
            ),
        )
        self.client = StubTreq(self.app.resource())
        r = self.post("t.login", {"user_id": "alice", "remember": True})
        line = [c for c in r.set_cookies() if c.startswith("__Host-twistauth_session=")][0]
        self.assertIn("max-age=1209600", line.lower())
        r = self.post("t.login", {"user_id": "alice"})
        line = [c for c in r.set_cookies() if c.startswith("__Host-twistauth_session=")][0]
        self.assertNotIn("max-age", line.lower())

    # -- unknown, expired, ended -----------------------------------------

    def test_forged_token_is_not_adopted(self) -> None:
        forged = "A" * 43
        r = self.post(
            "t.put", {"key": "k", "value": 1}, cookie=("__Host-twistauth_session", forged)
        )
        self.assertEqual(r.code, 200, r.body)
        new = r.cookie("__Host-twistauth_session")
        self.assertNotEqual(new, forged)
        # The forged id names nothing afterwards either.
        self.assertIsNone(self.successResultOf(self.cache.load(forged)))

    def test_dead_token_is_cleared(self) -> None:
        r = self.post("t.whoami", cookie=("__Host-twistauth_session", "A" * 43))
        self.assertEqual(r.json, {"result": None})
        line = [c for c in r.set_cookies() if c.startswith("__Host-twistauth_session=")][0]
        self.assertIn("max-age=0", line.lower())

    def test_idle_timeout_ends_the_session(self) -> None:
        token, csrf = self.logged_in()
        self.clock.advance(1800 + 1)
        r = self.call_as(token, csrf, "t.whoami")
        self.assertEqual(r.json, {"result": None})
        self.assertIn("max-age=0", r.set_cookies()[0].lower())

    def test_absolute_timeout_ends_a_busy_session(self) -> None:
        token, csrf = self.logged_in()
        for _ in range(12 * 6 + 1):
            self.clock.advance(600)
            r = self.call_as(token, csrf, "t.whoami")
            token = r.cookie("__Host-twistauth_session") or token
        self.assertEqual(r.json, {"result": None})

    def test_login_renews_the_id(self) -> None:
        r = self.post("t.put", {"key": "cart", "value": [1]})
        before = r.cookie("__Host-twistauth_session")
        csrf_before = r.cookie("__Host-twistauth_session_csrf")
        assert before and csrf_before
        r = self.call_as(before, csrf_before, "t.login", {"user_id": "alice"})
        after = r.cookie("__Host-twistauth_session")
        csrf_after = r.cookie("__Host-twistauth_session_csrf")
        assert after and csrf_after
        self.assertNotEqual(after, before)
        self.assertNotEqual(csrf_after, csrf_before)
        # The state survived; the old id is dead.
        self.assertEqual(
            self.call_as(after, csrf_after, "t.get", {"key": "cart"}).json, {"result": [1]}
        )
        self.assertEqual(self.call_as(before, csrf_before, "t.whoami").json, {"result": None})

    def test_logout_clears_and_replay_is_anonymous(self) -> None:
        token, csrf = self.logged_in()
        r = self.call_as(token, csrf, "t.logout")
        self.assertIn("max-age=0", r.set_cookies()[0].lower())
        self.assertEqual(self.call_as(token, csrf, "t.whoami").json, {"result": None})

    def test_log_out_everywhere(self) -> None:
        first = self.logged_in("bob")
        second = self.logged_in("bob")
        other = self.logged_in("carol")
        # (A login at the very instant of the revocation counts as after it.)
        self.clock.advance(1)
        self.assertEqual(self.call_as(*first, "t.everywhere").code, 200)
        self.assertEqual(self.call_as(*second, "t.whoami").json, {"result": None})
        self.assertEqual(self.call_as(*other, "t.whoami").json, {"result": "carol"})

    def test_token_only_from_carriers(self) -> None:
        token, _ = self.logged_in()
        r = self.post("t.whoami", url=URL + "?session=" + token)
        self.assertEqual(r.json, {"result": None})
        r = self.post(
            "t.whoami", body=json.dumps({"method": "t.whoami", "session": token}).encode()
        )
        self.assertEqual(r.code, 400)

    # -- CSRF and CORS -----------------------------------------------------

    def test_cookie_call_needs_csrf_token(self) -> None:
        token, csrf = self.logged_in()
        r = self.post("t.whoami", cookie=("__Host-twistauth_session", token))
        self.assertEqual((r.code, r.json["error"]["name"]), (403, "csrf_failed"))
        r = self.post("t.whoami", cookie=("__Host-twistauth_session", token), csrf="x" * 43)
        self.assertEqual(r.code, 403)
        self.assertEqual(self.call_as(token, csrf, "t.whoami").json, {"result": "alice"})

    def test_cookie_call_needs_json_content_type(self) -> None:
        token, csrf = self.logged_in()
        r = self.post(
            "t.whoami",
            cookie=("__Host-twistauth_session", token),
            csrf=csrf,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual((r.code, r.json["error"]["name"]), (415, "unsupported_media_type"))

    def test_foreign_origin_refused_even_without_session(self) -> None:
        r = self.post("t.login", {"user_id": "mallory"}, headers={"origin": "https://evil.example"})
        self.assertEqual((r.code, r.json["error"]["name"]), (403, "csrf_failed"))
        self.assertEqual(r.set_cookies(), [])
        self.assertIsNone(r.header("access-control-allow-origin"))

    def test_own_origin_allowed(self) -> None:
        r = self.post("t.whoami", headers={"origin": "http://localhost"})
        self.assertEqual(r.code, 200)
        self.assertIsNone(r.header("access-control-allow-origin"))

    def test_cors_allowlist(self) -> None:
        self.app = make_app(
            **OPEN_ACCESS,
            clock=self.clock,
            registry=test_methods(),
            allowed_origins=["https://app.example"],
        )
        self.client = StubTreq(self.app.resource())
        r = self.post("t.whoami", headers={"origin": "https://app.example"})
        self.assertEqual(r.code, 200)
        self.assertEqual(r.header("access-control-allow-origin"), "https://app.example")
        self.assertEqual(r.header("access-control-allow-credentials"), "true")
        d = self.client.request(
            "OPTIONS",
            URL,
            headers={"origin": "https://app.example", "access-control-request-method": "POST"},
        )
        self.client.flush()
        preflight = self.successResultOf(d)
        self.assertEqual(preflight.code, 204)
        self.assertIn(
            b"x-twistauth-csrf",
            preflight.headers.getRawHeaders("access-control-allow-headers")[0].encode(),
        )
        d = self.client.request("OPTIONS", URL, headers={"origin": "https://evil.example"})
        self.client.flush()
        self.assertIsNone(
            self.successResultOf(d).headers.getRawHeaders("access-control-allow-origin")
        )

    def test_oversized_cookie_header(self) -> None:
        r = self.post("t.whoami", headers={"cookie": "a=" + "x" * 9000})
        self.assertEqual((r.code, r.json["error"]["name"]), (431, "cookie_too_large"))

    # -- header mode -------------------------------------------------------

    def test_header_mode(self) -> None:
        r = self.post("t.login", {"user_id": "dave"}, headers={"x-twistauth-session": ""})
        self.assertEqual(r.set_cookies(), [])
        token = r.header("x-twistauth-session")
        assert token
        self.assertEqual(float(r.header("x-twistauth-session-expires") or 0), START + 1800)
        # No CSRF token needed without cookies; every answer repeats the token.
        self.clock.advance(10)
        r = self.post("t.whoami", headers={"x-twistauth-session": token})
        self.assertEqual(r.json, {"result": "dave"})
        self.assertTrue(r.header("x-twistauth-session"))
        r = self.post(
            "t.logout", headers={"x-twistauth-session": r.header("x-twistauth-session") or ""}
        )
        self.assertEqual(r.header("x-twistauth-session"), "")

    # -- signing -----------------------------------------------------------

    def signing_session(self) -> Tuple[str, str]:
        r = self.post("session.enable_signing", headers={"x-twistauth-session": ""})
        return r.header("x-twistauth-session") or "", r.json["result"]["signing_key"]

    def signed(
        self,
        token: str,
        key: str,
        method: str,
        parameters: Any = None,
        *,
        nonce: Optional[str] = None,
        at: Optional[float] = None,
        path: str = "/api",
        tamper: bool = False,
    ) -> Response:
        body = json.dumps({"method": method, "parameters": parameters or {}}).encode()
        nonce = nonce or secrets.token_urlsafe(16)
        stamp = b"%d" % int(self.clock.seconds() if at is None else at)
        signature = request_signature(key, b"POST", path.encode(), stamp, nonce.encode(), body)
        return self.post(
            method,
            body=body + (b" " if tamper else b""),
            url="http://localhost" + path,
            headers={
                "x-twistauth-session": token,
                "x-twistauth-timestamp": stamp.decode(),
                "x-twistauth-nonce": nonce,
                "x-twistauth-signature": signature,
            },
        )

    def test_signed_requests(self) -> None:
        token, key = self.signing_session()
        r = self.signed(token, key, "t.whoami")
        self.assertEqual(r.code, 200, r.body)
        self.assertEqual(r.json, {"result": None})

    def test_response_signature_verifies(self) -> None:
        token, key = self.signing_session()
        nonce = secrets.token_urlsafe(16)
        r = self.signed(token, key, "t.whoami", nonce=nonce)
        stamp = (r.header("x-twistauth-timestamp") or "").encode()
        expected = response_signature(key, 200, stamp, nonce.encode(), r.body)
        self.assertTrue(hmac.compare_digest(expected, r.header("x-twistauth-signature") or ""))

    def test_unsigned_request_refused(self) -> None:
        token, _ = self.signing_session()
        r = self.post("t.whoami", headers={"x-twistauth-session": token})
        self.assertEqual((r.code, r.json["error"]["name"]), (401, "signature_invalid"))

    def test_replayed_nonce_refused(self) -> None:
        token, key = self.signing_session()
        self.assertEqual(self.signed(token, key, "t.whoami", nonce="n" * 20).code, 200)
        r = self.signed(token, key, "t.whoami", nonce="n" * 20)
        self.assertEqual((r.code, r.json["error"]["name"]), (401, "signature_replayed"))

    def test_old_timestamp_refused(self) -> None:
        token, key = self.signing_session()
        ok = self.signed(token, key, "t.whoami", at=self.clock.seconds() - 299)
        self.assertEqual(ok.code, 200)
        r = self.signed(token, key, "t.whoami", at=self.clock.seconds() - 301)
        self.assertEqual((r.code, r.json["error"]["name"]), (401, "signature_expired"))
        r = self.signed(token, key, "t.whoami", at=self.clock.seconds() + 301)
        self.assertEqual(r.code, 401)

    def test_tampered_body_or_other_path_refused(self) -> None:
        token, key = self.signing_session()
        self.assertEqual(self.signed(token, key, "t.whoami", tamper=True).code, 401)
        # A signature made for another path does not verify here.
        body = json.dumps({"method": "t.whoami", "parameters": {}}).encode()
        stamp = b"%d" % int(self.clock.seconds())
        signature = request_signature(key, b"POST", b"/other", stamp, b"m" * 20, body)
        r = self.post(
            "t.whoami",
            body=body,
            headers={
                "x-twistauth-session": token,
                "x-twistauth-timestamp": stamp.decode(),
                "x-twistauth-nonce": "m" * 20,
                "x-twistauth-signature": signature,
            },
        )
        self.assertEqual(r.code, 401)

    # -- logs --------------------------------------------------------------

    def test_no_secret_reaches_the_log(self) -> None:
        token, csrf = self.logged_in("erin")
        self.call_as(token, csrf, "t.put", {"key": "a", "value": 1})
        self.call_as(token, csrf, "t.logout")
        signing_token, key = self.signing_session()
        self.signed(signing_token, key, "t.whoami")
        text = json.dumps([{k: repr(v) for k, v in event.items()} for event in self.logged])
        for secret in (token, csrf, signing_token, key):
            self.assertNotIn(secret, text)
            self.assertNotIn(hashlib.sha256(secret.encode()).hexdigest(), text)


class ClientSideTransportTests(TransportTests):
    """
    The same, with sessions sealed into the cookie or header.
    """

    session_cache = "client"
