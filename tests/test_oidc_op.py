"""
The whole OpenID Connect flow against a real, independently written
OpenID provider: panva's ``oidc-provider`` (npm, OpenID Certified), run by
Node.js from ``tests/op`` (``npm ci --prefix tests/op`` installs it; see
``tests/op/server.js`` for its configuration) on a loopback port, and
twistauth served by its own site on another, both on the real reactor.

A scripted browser (treq with a cookie jar, following redirects and
submitting the provider's login, consent and logout forms) goes through:
login (authorization code + PKCE + ``iss``), the code exchange, UserInfo,
a JSON call with the session, a refresh after the access token expired
(rotating refresh tokens), a back-channel logout sent by the provider when
the user signs out there (waking a ``/logout/wait`` long-poll), and an
RP-initiated logout whose return state is checked.

What the real provider cannot exercise is covered with `FakeProvider` in
the other ``test_oidc_*`` modules: misbehaving tokens and endpoints, key
rotation, ``sub``-only logout tokens, replays, outages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from contextlib import ExitStack
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import pytest_twisted
from conftest import free_port, wait_for_port
from test_sessions_support import capture_logs
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from twistauth.app import make_app
from twistauth.identity.tokens import TokenSealer, derive_token_key

OP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "op")
CLIENT_SECRET = "twistauth-integration-secret-0123456789abcdef"  # noqa: S105
ACCESS_TOKEN_TTL = 4


class _Provider:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: str) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def ports() -> Tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def oidc_provider(ports: Tuple[int, int], tmp_path_factory: Any) -> Iterator[_Provider]:
    """
    oidc-provider on a free loopback port, configured for twistauth on the other.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("Node.js is not installed: run tests/setup.sh")
    if not os.path.isdir(os.path.join(OP_DIR, "node_modules", "oidc-provider")):
        raise RuntimeError("oidc-provider is not installed: run npm ci --prefix tests/op")
    op_port, rp_port = ports
    log_path = str(tmp_path_factory.mktemp("op") / "op.log")
    env = dict(os.environ, OP_PORT=str(op_port), RP_BASE=f"http://127.0.0.1:{rp_port}",
               OP_ACCESS_TOKEN_TTL=str(ACCESS_TOKEN_TTL))
    with open(log_path, "wb") as log:
        process = subprocess.Popen([node, "server.js"], cwd=OP_DIR, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_port(op_port, timeout=20)
        yield _Provider(process, op_port, log_path)
    finally:
        process.terminate()
        process.wait(10)


class _Forms(HTMLParser):
    """The forms of a page: action, method and their input fields."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: List[Dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append({"id": values.get("id"), "action": values.get("action") or "",
                               "fields": {}})
        elif tag == "input" and self.forms and values.get("name"):
            self.forms[-1]["fields"][values["name"]] = values.get("value") or ""


class ScriptedBrowser:
    """A browser: one cookie jar, redirects followed by hand, forms submitted."""

    def __init__(self, rp: str) -> None:
        self.rp = rp
        self.jar = CookieJar()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=self.pool), cookiejar=self.jar)
        self.callbacks: List[Dict[str, str]] = []

    async def request(self, method: str, url: str, **kwargs: Any) -> Tuple[int, Any, bytes]:
        kwargs.setdefault("allow_redirects", False)
        response = await self.client.request(method, url, timeout=10, **kwargs)
        body = await response.content()
        return response.code, response.headers, body

    def cookie(self, name: str) -> Optional[str]:
        for cookie in self.jar:
            if cookie.name == name:
                return str(cookie.value)
        return None

    async def follow(self, url: str, *, stop_at_rp: bool = True,
                     login: Optional[str] = None, method: str = "GET",
                     data: Any = None) -> Tuple[int, Any, bytes, str]:
        """
        Follow redirects from ``url``, filling the provider's forms, until
        a page that is not a redirect (or a redirect to the RP's own pages,
        which are not fetched).
        """
        for _ in range(20):
            code, headers, body = await self.request(method, url, data=data)
            method, data = "GET", None
            location = (headers.getRawHeaders("location") or [None])[0]
            if location is not None and code in (301, 302, 303, 307):
                target = urljoin(url, location)
                if stop_at_rp and target.startswith(self.rp) and not urlsplit(
                        target).path.startswith(("/redirect", "/logout/return")):
                    return code, headers, body, target
                url = target
                continue
            page = body.decode("utf-8", "replace")
            parser = _Forms()
            parser.feed(page)
            form = self._fillable(parser.forms, login)
            if form is None:
                return code, headers, body, url
            url, method, data = urljoin(url, form["action"]), "POST", form["fields"]
        raise AssertionError("too many redirects")

    @staticmethod
    def _fillable(forms: List[Dict[str, Any]], login: Optional[str]) -> Optional[Dict[str, Any]]:
        for form in forms:
            fields = form["fields"]
            if fields.get("prompt") == "login" and login is not None:
                return {"action": form["action"],
                        "fields": dict(fields, login=login, password="any")}  # noqa: S106
            if fields.get("prompt") == "consent":
                return form
            if form["id"] == "op.logoutForm":
                return {"action": form["action"], "fields": dict(fields, logout="yes")}
        return None

    async def call(self, method: str, **parameters: Any) -> Dict[str, Any]:
        code, _, body = await self.request(
            "POST", self.rp + "/api",
            data=json.dumps({"method": method, "parameters": parameters}).encode(),
            headers={"Content-Type": "application/json",
                     "X-Twistauth-CSRF": self.cookie("twistauth_session_csrf") or ""},
        )
        answer: Dict[str, Any] = json.loads(body)
        answer["status"] = code
        return answer

    async def log_in(self, user: str, next_path: str = "/home") -> Tuple[float, str]:
        """
        Log in as ``user``: (seconds the RP's callback took, final target).
        The callback's query is kept in `callbacks`.
        """
        code, headers, _ = await self.request(
            "GET", f"{self.rp}/login?provider=op&next={next_path}")
        assert code == 302
        url = headers.getRawHeaders("location")[0]
        # Through the provider up to (not including) the callback.
        for _ in range(20):
            code, headers, body = await self.request("GET", url)
            location = (headers.getRawHeaders("location") or [None])[0]
            if location is None:
                parser = _Forms()
                parser.feed(body.decode())
                form = self._fillable(parser.forms, user)
                assert form is not None, body[:500]
                code, headers, body = await self.request(
                    "POST", urljoin(url, form["action"]), data=form["fields"])
                location = headers.getRawHeaders("location")[0]
            url = urljoin(url, location)
            if url.startswith(self.rp + "/redirect"):
                break
        query = parse_qs(urlsplit(url).query)
        assert query.get("iss") is not None, url  # RFC 9207 from a real provider
        self.callbacks.append({k: v[0] for k, v in query.items()})
        started = time.monotonic()
        code, headers, body = await self.request("GET", url)
        took = time.monotonic() - started
        assert code == 303, body[:500]
        assert headers.getRawHeaders("cache-control") == ["no-store"]
        return took, headers.getRawHeaders("location")[0]

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


def _app(provider: _Provider, rp_port: int, key: bytes) -> Any:
    rp = f"http://127.0.0.1:{rp_port}"
    return make_app(
        clock=reactor,
        reactor=reactor,
        session_cache="memory",
        user_store="memory",
        session_cookie_secure=False,
        deployment_key=key,
        providers={"op": {
            "issuer": provider.issuer,
            "client_id": "twistauth",
            "client_secret": CLIENT_SECRET,
            "redirect_uri": rp + "/redirect",
            "post_logout_redirect_uri": rp + "/logout/return",
            "scopes": ["openid", "profile", "email", "offline_access"],
            "extra_params": {"prompt": "consent"},  # oidc-provider grants offline_access so
            "use_userinfo": True,
            "require_logout_typ": True,
        }},
    )


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_whole_flow_against_oidc_provider(
    oidc_provider: _Provider, ports: Tuple[int, int]
) -> None:
    _, rp_port = ports
    rp = f"http://127.0.0.1:{rp_port}"
    key = os.urandom(32)
    app = _app(oidc_provider, rp_port, key)
    for service in app.background:
        service.startService()
    listening = reactor.listenTCP(rp_port, app.site(), interface="127.0.0.1")
    alice, bob = ScriptedBrowser(rp), ScriptedBrowser(rp)
    sealer = TokenSealer(key=derive_token_key(key))
    secrets: Dict[str, str] = {"client_secret": CLIENT_SECRET}

    async def remember_tokens(user_id: str, label: str) -> None:
        user = await app.services.users.get(user_id)
        opened = sealer.open(user_id, "op", user.tokens["op"])["tokens"]
        for name in ("access_token", "refresh_token", "id_token"):
            secrets[f"{label} {name}"] = opened[name]

    logs = ExitStack()
    lines = logs.enter_context(capture_logs())
    try:
        # -- login, code exchange, UserInfo ---------------------------------
        started = time.monotonic()
        callback_time, landing = await alice.log_in("alice")
        login_time = time.monotonic() - started
        assert landing == "/home"
        info = await alice.call("session.info")
        assert info["result"]["user_id"] == "op:alice", info
        identity = await alice.call("oidc.session")
        assert identity["result"]["issuer"] == oidc_provider.issuer
        assert identity["result"]["claims"]["name"] == "Test alice"  # from UserInfo
        assert identity["result"]["claims"]["email"] == "alice@example.test"
        first_expiry = identity["result"]["access_token_expires_in"]
        await remember_tokens("op:alice", "login")
        secrets["code"] = alice.callbacks[0]["code"]
        secrets["state"] = alice.callbacks[0]["state"]
        secrets["session"] = alice.cookie("twistauth_session") or ""
        assert 0 < first_expiry <= ACCESS_TOKEN_TTL

        # -- a refresh once the access token is about to expire -------------
        user = await app.services.users.get("op:alice")
        before = user.tokens["op"]["updated"]
        await deferLater(reactor, ACCESS_TOKEN_TTL - 1.2, lambda: None)
        identity = await alice.call("oidc.session")
        assert identity["status"] == 200, identity
        assert identity["result"]["access_token_expires_in"] >= ACCESS_TOKEN_TTL - 1
        user = await app.services.users.get("op:alice")
        assert user.tokens["op"]["updated"] > before  # new tokens stored (sealed)
        await remember_tokens("op:alice", "refreshed")
        assert secrets["refreshed refresh_token"] != secrets["login refresh_token"]  # rotated
        await deferLater(reactor, ACCESS_TOKEN_TTL + 0.5, lambda: None)  # fully expired now
        identity = await alice.call("oidc.session")
        assert identity["status"] == 200, identity
        assert identity["result"]["access_token_expires_in"] >= ACCESS_TOKEN_TTL - 1

        # -- back-channel logout: bob signs out at the provider ------------
        await bob.log_in("bob")
        assert (await bob.call("session.info"))["result"]["user_id"] == "op:bob"
        waiting: Deferred[Any] = Deferred.fromCoroutine(
            bob.request("GET", rp + "/logout/wait?timeout=20"))
        await deferLater(reactor, 0.2, lambda: None)
        assert not waiting.called
        await bob.follow(oidc_provider.issuer + "/session/end")
        code, _, body = await waiting
        assert code == 200
        assert json.loads(body) == {"logged_out": True, "reason": "backchannel"}
        assert (await bob.call("session.info"))["result"]["user_id"] is None
        assert (await alice.call("session.info"))["result"]["user_id"] == "op:alice"

        # -- RP-initiated logout: alice logs out here ------------------------
        code, headers, _ = await alice.request(
            "POST", rp + "/logout",
            headers={"X-Twistauth-CSRF": alice.cookie("twistauth_session_csrf") or "",
                     "Origin": rp})
        assert code == 302
        end_session = headers.getRawHeaders("location")[0]
        assert end_session.startswith(oidc_provider.issuer + "/session/end?")
        assert "id_token_hint=" in end_session and "state=" in end_session
        assert (await alice.call("session.info"))["result"]["user_id"] is None
        code, headers, body, target = await alice.follow(end_session)
        assert (code, target) == (303, rp + "/"), body[:300]
        log = oidc_provider.log()
        assert log.count("backchannel.success twistauth") == 2, log
        assert "backchannel.error" not in log and "server_error" not in log, log
        assert "grant.error" not in log, log
        logs.close()
        text = "\n".join(lines)
        assert "op:alice logged in with op" in text
        for name, value in secrets.items():
            assert value and value not in text, f"{name} was logged"
        print(f"\nlogin through the stack: {login_time * 1000:.0f} ms, of which the RP's "
              f"callback (code exchange, ID token, UserInfo, session) {callback_time * 1000:.0f} ms")
    finally:
        logs.close()
        await alice.close()
        await bob.close()
        await listening.stopListening()
        for service in reversed(app.background):
            if service.running:
                await maybeDeferred(service.stopService)
