"""
The demo page, served as a plain ``twisted.web`` resource.

The page itself lives in ``examples/demo/`` (HTML, CSS and a little
JavaScript, no build step, nothing from a CDN).  `DemoResource` serves
those files, read once into memory when it is built (no disk reads on the
reactor thread, and no path from a request ever reaches the file system),
plus a generated ``config.json`` that tells the page where the JSON
endpoint and the logout long-poll are, what the CSRF cookie is called, and
which identity-provider buttons to show (none is fine: the page shows only
the local-account form).

Mount it anywhere (`add_demo_routes` does it on the app's Klein routes);
the page uses relative URLs for its own files and the absolute paths of
``config.json`` for the API::

    add_demo_routes(app.routes, make_demo_resource(settings), "/demo")

Every answer carries a strict ``Content-Security-Policy`` (same-origin
scripts, styles, images and connections only; no framing).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import attr
from klein import Klein
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource

from twistauth.errors import MethodNotAllowedError, NotFoundError
from twistauth.web.envelope import render_error
from twistauth.web.transport import CSRF_HEADER, SessionTransport

CONTENT_TYPES: Dict[str, bytes] = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
}
"""The kinds of file served; anything else in the directory is not."""

MAX_FILE_BYTES = 1024 * 1024
"""A demo file larger than this is refused at start-up (it is not a demo)."""

SECURITY_HEADERS: Tuple[Tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
)

PACKAGED_DIRECTORY = "demo_page"
"""Where an installed twistauth keeps the page: ``twistauth/demo_page/``
(package data copied from ``examples/demo/`` at build time)."""


def find_demo_directory(directory: Optional[str] = None) -> FilePath[str]:
    """
    The directory holding the demo page.

    :param directory: an explicit directory (a copy of ``examples/demo/``
        you changed); else the copy installed with the package, else the
        source checkout's ``examples/demo/``.
    :raises FileNotFoundError: none of them holds an ``index.html``.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if directory is not None:
        candidates = [directory]
    else:
        candidates = [
            os.path.join(package, PACKAGED_DIRECTORY),
            os.path.join(os.path.dirname(package), "examples", "demo"),
        ]
    for candidate in candidates:
        path = FilePath(candidate)
        if path.child("index.html").isfile():
            return path
    raise FileNotFoundError(
        "the demo page was not found (looked for index.html in "
        + ", ".join(candidates)
        + "); run from a source checkout or install twistauth with its demo page"
    )


def load_demo_files(directory: FilePath[str]) -> Dict[str, Tuple[bytes, bytes]]:
    """
    Read the page's files: ``{name: (content type, body)}`` for every
    regular, non-hidden file of a served kind (`CONTENT_TYPES`) directly in
    ``directory``.

    :raises ValueError: a file is over `MAX_FILE_BYTES`.
    """
    files: Dict[str, Tuple[bytes, bytes]] = {}
    for child in directory.children():
        name = child.basename()
        content_type = CONTENT_TYPES.get(os.path.splitext(name)[1].lower())
        if content_type is None or name.startswith(".") or not child.isfile():
            continue
        if child.getsize() > MAX_FILE_BYTES:
            raise ValueError(f"demo file {child.path!r} is over {MAX_FILE_BYTES} bytes")
        files[name] = (content_type, child.getContent())
    return files


def _check_path(value: str, what: str) -> str:
    if not value.startswith("/") or value.startswith("//"):
        raise ValueError(f"{what} must be an absolute path on this server, got {value!r}")
    return value


@attr.s(frozen=True, kw_only=True)
class ProviderButton:
    """
    One "sign in with ..." button of the login page.

    :ivar name: the provider's short name (``"keycloak"``).
    :ivar label: the button's text (``"Sign in with Keycloak"``).
    :ivar login_url: where the button goes, used as it is: a path on this
        server that starts the login and names where to come back to
        (``"/login?provider=keycloak&next=/demo/"``).
    """

    name: str = attr.ib()
    label: str = attr.ib()
    login_url: str = attr.ib()

    @login_url.validator
    def _check_login_url(self, attribute: Any, value: str) -> None:
        _check_path(value, "login_url")

    def to_json(self) -> Dict[str, str]:
        return {"name": self.name, "label": self.label, "login_url": self.login_url}


def _buttons(providers: Iterable[ProviderButton]) -> Tuple[ProviderButton, ...]:
    return tuple(providers)


@attr.s(frozen=True, kw_only=True)
class DemoConfig:
    """
    What the page is told in ``config.json``.

    :ivar api_path: the JSON-method endpoint (``/api``).
    :ivar logout_wait_path: the logout long-poll (``/logout/wait``).
    :ivar wait_timeout: seconds the page asks each long-poll to wait.
    :ivar csrf_cookie: the name of the script-readable CSRF cookie.
    :ivar csrf_header: the header its value is sent in.
    :ivar providers: the identity-provider buttons, in order (may be empty).
    :ivar local_accounts: show the local-account form.
    :ivar account_signup: offer "Create account".
    """

    api_path: str = attr.ib(default="/api")
    logout_wait_path: str = attr.ib(default="/logout/wait")
    wait_timeout: float = attr.ib(default=25.0)
    csrf_cookie: str = attr.ib(default="__Host-twistauth_session_csrf")
    csrf_header: str = attr.ib(default=CSRF_HEADER.decode("ascii"))
    providers: Tuple[ProviderButton, ...] = attr.ib(default=(), converter=_buttons)
    local_accounts: bool = attr.ib(default=True)
    account_signup: bool = attr.ib(default=True)

    @api_path.validator
    @logout_wait_path.validator
    def _check_paths(self, attribute: Any, value: str) -> None:
        _check_path(value, attribute.name)

    @wait_timeout.validator
    def _check_timeout(self, attribute: Any, value: float) -> None:
        if not 0 < value <= 600:
            raise ValueError(f"wait_timeout must be from 0 to 600 seconds, got {value!r}")

    def to_json(self) -> Dict[str, Any]:
        return {
            "api_path": self.api_path,
            "logout_wait_path": self.logout_wait_path,
            "wait_timeout": self.wait_timeout,
            "csrf_cookie": self.csrf_cookie,
            "csrf_header": self.csrf_header,
            "providers": [p.to_json() for p in self.providers],
            "local_accounts": self.local_accounts,
            "account_signup": self.account_signup,
        }


class DemoResource(Resource):
    """
    Serves the demo page: ``index.html`` at the mount point itself (a
    request without the trailing slash is redirected to it, so relative
    URLs work), the page's other files by name, and ``config.json``.
    ``GET`` and ``HEAD`` only; anything else is answered in the JSON error
    envelope (404, 405).

    :param files: what `load_demo_files` returns.
    :param config: what the page is told.
    """

    isLeaf = True

    def __init__(self, *, files: Dict[str, Tuple[bytes, bytes]], config: DemoConfig) -> None:
        super().__init__()
        if "index.html" not in files:
            raise ValueError("the demo page needs an index.html")
        self.files = dict(files)
        self.config = config
        self.files["config.json"] = (
            b"application/json",
            json.dumps(config.to_json(), indent=2).encode("utf-8"),
        )

    def render(self, request: Any) -> bytes:
        for header, value in SECURITY_HEADERS:
            request.setHeader(header, value)
        if request.method not in (b"GET", b"HEAD"):
            return render_error(request, MethodNotAllowedError(headers={"Allow": "GET, HEAD"}))
        postpath = list(request.postpath or [])
        if not postpath:
            # ".../demo" without the slash: the page's relative URLs need it.
            segment = request.prepath[-1] if request.prepath else b""
            request.setResponseCode(301)
            request.setHeader(b"location", segment + b"/")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"moved to " + segment + b"/\n"
        if len(postpath) != 1:
            return render_error(request, NotFoundError())
        name = postpath[0].decode("utf-8", "replace") or "index.html"
        found = self.files.get(name)
        if found is None:
            return render_error(request, NotFoundError())
        content_type, body = found
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method == b"HEAD":
            return b""
        return body


def add_demo_routes(routes: Klein, demo: DemoResource, path: str = "/demo") -> None:
    """
    Serve ``demo`` at ``path`` on a Klein app: ``path + "/"`` and every
    file below it, and ``path`` itself (redirected to ``path + "/"`` by
    `DemoResource`, so it never depends on how Klein's router redirects).

    :param path: ``"/"`` or a path without a trailing slash (``"/demo"``).
    :raises ValueError: for any other path.
    """
    if path != "/" and (not path.startswith("/") or path.endswith("/") or "<" in path):
        raise ValueError(f"mount the demo at '/' or a path such as '/demo', not {path!r}")
    if path == "/":
        routes.route("/", branch=True, endpoint="twistauth_demo")(lambda request: demo)
        return
    routes.route(path + "/", branch=True, endpoint="twistauth_demo")(lambda request: demo)
    routes.route(path, endpoint="twistauth_demo_bare")(lambda request: demo)


def make_demo_resource(
    settings: Any,
    *,
    providers: Sequence[ProviderButton] = (),
    logout_wait_path: str = "/logout/wait",
    wait_timeout: float = 25.0,
    directory: Optional[str] = None,
) -> DemoResource:
    """
    The demo page for an app built from ``settings`` (a
    `twistauth.settings.Settings`): its API path, its cookie names and
    whether it serves local accounts and sign-up.

    :param providers: the identity-provider buttons to show.
    :param logout_wait_path: where the app serves the logout long-poll
        (a path on the server, as mounted).
    :param wait_timeout: seconds each long-poll is asked to wait (the
        server caps it).
    :param directory: a directory holding the page instead of the one that
        comes with twistauth (see `find_demo_directory`).
    :raises FileNotFoundError: the page's files are not found.
    """
    transport = SessionTransport(
        cookie_name=settings.session_cookie_name,
        secure=settings.session_cookie_secure,
        allowed_origins=frozenset(),
        idle_timeout=settings.session_idle_timeout,
        absolute_timeout=settings.session_absolute_timeout,
        permanent_lifetime=settings.session_permanent_lifetime,
    )
    config = DemoConfig(
        api_path=settings.api_path,
        logout_wait_path=logout_wait_path,
        wait_timeout=wait_timeout,
        csrf_cookie=transport.csrf_cookie.decode("ascii"),
        providers=tuple(providers),
        local_accounts=bool(settings.local_accounts),
        account_signup=bool(settings.local_accounts and settings.account_signup),
    )
    files = load_demo_files(find_demo_directory(directory))
    return DemoResource(files=files, config=config)


__all__ = [
    "DemoConfig",
    "DemoResource",
    "ProviderButton",
    "add_demo_routes",
    "find_demo_directory",
    "load_demo_files",
    "make_demo_resource",
]
