"""
Helpers shared by the OpenID Connect route tests (this module holds no
tests): a whole twistauth app with OIDC installed against one or more
`FakeProvider` s, driven through ``StubTreq`` on a `Clock`, and a
`Browser` with its own cookie jar.
"""

from __future__ import annotations

from http.cookiejar import CookieJar
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import urlencode

import attr
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq, _SynchronousProducer
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from twistauth.app import make_app
from twistauth.identity.install import OIDCParts, build_oidc, register_methods
from twistauth.testing import FakeProvider
from twistauth.web.auth import mount

RP = "https://rp.example"
EPOCH = 1_700_000_000.0


def result_of(d: Any) -> Any:
    """The result of a Deferred that has already fired (raising its failure)."""
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class _ByHost(Resource):
    """Sends each request to the provider whose issuer host it names."""

    isLeaf = True

    def __init__(self, providers: Sequence[FakeProvider]) -> None:
        super().__init__()
        self._by_host = {
            p.issuer.split("://", 1)[1].split("/", 1)[0]: p.resource() for p in providers
        }

    def render(self, request: Any) -> Any:
        host = (request.getHeader(b"host") or b"").decode("ascii")
        return self._by_host[host].render(request)


@attr.s(auto_attribs=True)
class Answer:
    """A response read whole."""

    code: int
    headers: Any
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    @property
    def location(self) -> Optional[str]:
        return self.header("location")

    @property
    def set_cookies(self) -> List[str]:
        return list(self.headers.getRawHeaders("set-cookie") or [])

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class Browser:
    """One browser: a StubTreq over the app, with its own cookie jar."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.jar = CookieJar()
        self._agent = RequestTraversalAgent(harness.app.resource())
        self.client = HTTPClient(
            agent=self._agent, cookiejar=self.jar, data_to_body_producer=_SynchronousProducer
        )

    def _wait(self, d: Any) -> Any:
        self.harness.flush()
        self._agent.flush()
        return result_of(d)

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        kwargs.setdefault("allow_redirects", False)
        url = path if path.startswith("http") else RP + path
        response = self._wait(self.client.request(method, url, **kwargs))
        body = self._wait(response.content())
        return Answer(response.code, response.headers, body)

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.request("POST", path, **kwargs)

    def cookie(self, name: str) -> Optional[str]:
        for cookie in self.jar:
            if cookie.name == name:
                return str(cookie.value)
        return None

    def cookie_names(self) -> List[str]:
        return [c.name for c in self.jar]

    def call(self, method: str, **parameters: Any) -> Answer:
        """A JSON method call with the session cookie and its CSRF token."""
        csrf = self.cookie("__Host-twistauth_session_csrf") or ""
        return self.post(
            "/api",
            json={"method": method, "parameters": parameters},
            headers={"X-Twistauth-CSRF": csrf, "Content-Type": "application/json"},
        )

    def start_login(self, provider: Optional[str] = "fake", next_path: str = "/") -> Answer:
        query = {"next": next_path}
        if provider is not None:
            query["provider"] = provider
        return self.get("/login?" + urlencode(query))

    def finish_login(self, query: Dict[str, str], path: str = "/redirect") -> Answer:
        return self.get(path + "?" + urlencode(query))

    def log_in(self, provider: str = "fake", next_path: str = "/", path: str = "/redirect") -> Answer:
        started = self.start_login(provider, next_path)
        assert started.code == 302, started.text
        query = self.harness.providers[provider].authorize(started.location or "")
        return self.finish_login(query, path)


@attr.s(auto_attribs=True)
class Harness:
    """A twistauth app with OpenID Connect on fake providers."""

    clock: Clock
    providers: Dict[str, FakeProvider]
    provider_http: StubTreq
    app: Any
    parts: OIDCParts

    @property
    def fake(self) -> FakeProvider:
        return next(iter(self.providers.values()))

    @property
    def oidc(self) -> Any:
        return self.parts.routes

    @property
    def tokens(self) -> Any:
        return self.parts.tokens

    @property
    def users(self) -> Any:
        return self.parts.tokens.users

    @property
    def sessions(self) -> Any:
        return self.app.api.sessions

    def flush(self) -> None:
        self.provider_http.flush()

    def browser(self) -> Browser:
        return Browser(self)

    def user(self, user_id: str) -> Any:
        return result_of(self.users.get(user_id))


def make_harness(
    *,
    names: Sequence[str] = ("fake",),
    per_provider_redirect: bool = False,
    provider_options: Optional[Dict[str, Any]] = None,
    config_options: Optional[Dict[str, Any]] = None,
    app_options: Optional[Dict[str, Any]] = None,
    users: Any = None,
    bus: Any = None,
) -> Harness:
    """
    Build the app and its providers.  Provider ``NAME``'s issuer is
    ``https://NAME.op.example``; its redirect URI ``/redirect`` (or
    ``/redirect/NAME`` with ``per_provider_redirect``).
    """
    clock = Clock()
    clock.advance(EPOCH)
    fakes: Dict[str, FakeProvider] = {}
    configs = []
    for name in names:
        redirect = f"{RP}/redirect/{name}" if per_provider_redirect else f"{RP}/redirect"
        fake = FakeProvider(
            clock=clock,
            issuer=f"https://{name}.op.example",
            redirect_uris=(redirect,),
            post_logout_redirect_uris=(f"{RP}/logout/return",),
            **(provider_options or {}),
        )
        fakes[name] = fake
        configs.append(fake.config(name=name, **(config_options or {})))
    provider_http = StubTreq(_ByHost(list(fakes.values())))
    options: Dict[str, Any] = {
        "session_cache": "memory",
        "user_store": "memory",
        "session_cookie_secure": True,
        "deployment_key": bytes(range(32)),
    }
    options.update(app_options or {})
    app = make_app(clock=clock, **options)
    services = app.services
    if users is not None:
        services = attr.evolve(services, users=users)
    if bus is not None:
        services = attr.evolve(services, bus=bus)
    parts = build_oidc(
        settings=app.settings,
        clock=clock,
        reactor=clock,
        services=services,
        api=app.api,
        redis=None,
        http_client=provider_http,
        providers=configs,
    )
    assert parts is not None
    mount(app.routes, parts.routes)
    register_methods(app.registry, parts.tokens)
    return Harness(clock, fakes, provider_http, app, parts)
