"""
The demo page's resource (`twistauth.web.demo`) through the HTTP stack
without sockets (``StubTreq``): what it serves, with which headers, what
it refuses, and what ``config.json`` tells the page.  Also: the page uses
nothing from another origin.  (The page itself runs in Chromium in
``tests/test_browser.py``.)
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from klein import Klein
from treq.testing import StubTreq
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twistauth.settings import Settings
from twistauth.web.demo import (
    MAX_FILE_BYTES,
    DemoConfig,
    DemoResource,
    ProviderButton,
    add_demo_routes,
    find_demo_directory,
    load_demo_files,
    make_demo_resource,
)

PAGE = Path(__file__).resolve().parent.parent.parent / "examples" / "demo"


class Client:
    def __init__(self, test: SynchronousTestCase, resource: Any) -> None:
        self.test = test
        self.stub = StubTreq(resource)

    def request(self, method: str, path: str) -> Any:
        response = self.test.successResultOf(
            self.stub.request(method, "http://demo.test" + path, allow_redirects=False)
        )
        response.body = self.test.successResultOf(response.content())
        return response

    def get(self, path: str) -> Any:
        return self.request("GET", path)


def header(response: Any, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return None if values is None else values[0]


def mounted(demo: DemoResource, path: bytes = b"demo") -> Resource:
    root = Resource()
    root.putChild(path, demo)
    return root


class DemoResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.demo = make_demo_resource(Settings.load())
        self.client = Client(self, mounted(self.demo))

    def test_index_with_security_headers(self) -> None:
        response = self.client.get("/demo/")
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "content-type"), "text/html; charset=utf-8")
        self.assertEqual(response.body, (PAGE / "index.html").read_bytes())
        csp = header(response, "content-security-policy") or ""
        self.assertIn("default-src 'none'", csp)
        self.assertIn("script-src 'self'", csp)
        self.assertIn("connect-src 'self'", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertEqual(header(response, "x-content-type-options"), "nosniff")
        self.assertEqual(header(response, "x-frame-options"), "DENY")
        self.assertEqual(header(response, "referrer-policy"), "no-referrer")
        self.assertEqual(self.client.get("/demo/index.html").body, response.body)

    def test_the_page_files(self) -> None:
        expected = {
            "demo.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8",
            "icon.svg": "image/svg+xml",
        }
        for name, content_type in expected.items():
            response = self.client.get("/demo/" + name)
            self.assertEqual(response.code, 200, name)
            self.assertEqual(header(response, "content-type"), content_type)
            self.assertEqual(response.body, (PAGE / name).read_bytes())

    def test_without_the_slash_redirects_to_it(self) -> None:
        # The page's relative URLs (demo.js, config.json) need the slash.
        response = self.client.get("/demo")
        self.assertEqual(response.code, 301)
        self.assertEqual(header(response, "location"), "demo/")

    def test_config_for_default_settings(self) -> None:
        response = self.client.get("/demo/config.json")
        self.assertEqual(header(response, "content-type"), "application/json")
        self.assertEqual(
            json.loads(response.body),
            {
                "api_path": "/api",
                "logout_wait_path": "/logout/wait",
                "wait_timeout": 25.0,
                "csrf_cookie": "__Host-twistauth_session_csrf",
                "csrf_header": "x-twistauth-csrf",
                "providers": [],
                "local_accounts": True,
                "account_signup": True,
            },
        )

    def test_config_follows_the_settings(self) -> None:
        settings = Settings.load(
            api_path="/rpc",
            session_cookie_secure=False,
            session_cookie_name="sid",
            account_signup=False,
        )
        providers = [ProviderButton(name="op", label="Sign in with OP", login_url="/login?p=op")]
        demo = make_demo_resource(
            settings, providers=providers, logout_wait_path="/auth/logout/wait", wait_timeout=10
        )
        config = json.loads(Client(self, mounted(demo)).get("/demo/config.json").body)
        self.assertEqual(config["api_path"], "/rpc")
        self.assertEqual(config["csrf_cookie"], "sid_csrf")
        self.assertEqual(config["logout_wait_path"], "/auth/logout/wait")
        self.assertEqual(config["wait_timeout"], 10)
        self.assertFalse(config["account_signup"])
        self.assertEqual(
            config["providers"],
            [{"name": "op", "label": "Sign in with OP", "login_url": "/login?p=op"}],
        )
        off = make_demo_resource(Settings.load(local_accounts=False))
        config = json.loads(Client(self, mounted(off)).get("/demo/config.json").body)
        self.assertEqual((config["local_accounts"], config["account_signup"]), (False, False))

    def assert_error(self, response: Any, status: int, name: str) -> Dict[str, Any]:
        self.assertEqual(response.code, status)
        self.assertEqual(header(response, "content-type"), "application/json")
        error: Dict[str, Any] = json.loads(response.body)["error"]
        self.assertEqual(error["name"], name)
        return error

    def test_nothing_else_is_served(self) -> None:
        for path in [
            "/demo/README.rst",  # in the directory, but not a served kind
            "/demo/nothing.js",
            "/demo/../setup.py",
            "/demo/%2e%2e/setup.py",
            "/demo/a/demo.js",
            "/demo/demo.js/",
        ]:
            self.assert_error(self.client.get(path), 404, "not_found")

    def test_only_get_and_head(self) -> None:
        for method in ("POST", "PUT", "DELETE"):
            response = self.client.request(method, "/demo/")
            self.assert_error(response, 405, "method_not_allowed")
            self.assertEqual(header(response, "allow"), "GET, HEAD")
        response = self.client.request("HEAD", "/demo/demo.js")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(header(response, "content-length"), str((PAGE / "demo.js").stat().st_size))

    def test_klein_routes_at_a_path_and_at_the_root(self) -> None:
        routes = Klein()
        add_demo_routes(routes, self.demo, "/demo")
        client = Client(self, routes.resource())
        self.assertEqual(client.get("/demo/").body, (PAGE / "index.html").read_bytes())
        self.assertEqual(client.get("/demo/style.css").body, (PAGE / "style.css").read_bytes())
        response = client.get("/demo")
        self.assertEqual((response.code, header(response, "location")), (301, "demo/"))
        self.assertEqual(client.get("/demo/x/y").code, 404)

        routes = Klein()
        add_demo_routes(routes, self.demo, "/")
        client = Client(self, routes.resource())
        self.assertEqual(client.get("/").body, (PAGE / "index.html").read_bytes())
        self.assertEqual(json.loads(client.get("/config.json").body)["api_path"], "/api")

        for bad in ("demo", "/demo/", "/<x>"):
            self.assertRaises(ValueError, add_demo_routes, Klein(), self.demo, bad)


class DemoFilesTests(SynchronousTestCase):
    def directory(self) -> FilePath[str]:
        path = tempfile.mkdtemp(prefix="twistauth-demo-")
        self.addCleanup(shutil.rmtree, path, True)
        return FilePath(path)

    def test_found_without_a_directory(self) -> None:
        # The checkout's examples/demo/, or the copy installed as package data.
        found = Path(find_demo_directory().path)
        self.assertIn(found.name, ("demo", "demo_page"))
        for name in ("index.html", "demo.js", "style.css", "icon.svg"):
            self.assertEqual((found / name).read_bytes(), (PAGE / name).read_bytes(), name)

    def test_an_explicit_directory(self) -> None:
        directory = self.directory()
        self.assertRaises(FileNotFoundError, find_demo_directory, directory.path)
        directory.child("index.html").setContent(b"<!doctype html><title>mine</title>")
        directory.child(".hidden.js").setContent(b"secret")
        directory.child("notes.txt").setContent(b"notes")
        directory.child("sub.css").makedirs()
        found = find_demo_directory(directory.path)
        files = load_demo_files(found)
        self.assertEqual(sorted(files), ["index.html"])
        demo = DemoResource(files=files, config=DemoConfig())
        self.assertIn(b"mine", Client(self, mounted(demo)).get("/demo/").body)

    def test_refuses_large_files_and_a_page_without_index(self) -> None:
        directory = self.directory()
        directory.child("index.html").setContent(b"x" * (MAX_FILE_BYTES + 1))
        self.assertRaises(ValueError, load_demo_files, directory)
        self.assertRaises(ValueError, DemoResource, files={}, config=DemoConfig())

    def test_config_checks_paths(self) -> None:
        for url in ("https://op.example/login", "//op.example/login", "login"):
            self.assertRaises(ValueError, ProviderButton, name="x", label="x", login_url=url)
        self.assertRaises(ValueError, DemoConfig, api_path="api")
        self.assertRaises(ValueError, DemoConfig, logout_wait_path="//elsewhere/wait")
        self.assertRaises(ValueError, DemoConfig, wait_timeout=0)
        self.assertRaises(ValueError, DemoConfig, wait_timeout=601)


class PageTests(SynchronousTestCase):
    """
    The page's own files: everything it loads is its own (no CDN, no
    third-party origin), and each referenced file is served.
    """

    def test_no_third_party_resources(self) -> None:
        served = load_demo_files(find_demo_directory())
        for name, (_, body) in served.items():
            text = body.decode("utf-8", "replace")
            if name.endswith(".svg"):
                text = text.replace("http://www.w3.org/2000/svg", "")  # a namespace, not a fetch
            self.assertIsNone(re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), name)
            self.assertNotIn("@import", text, name)

    def test_every_reference_is_served(self) -> None:
        served = load_demo_files(find_demo_directory())
        html = served["index.html"][1].decode()
        references = re.findall(r'(?:src|href)="([^"]+)"', html)
        self.assertEqual(sorted(references), ["demo.js", "icon.svg", "icon.svg", "style.css"])
        for reference in references:
            self.assertIn(reference, served)
        script = served["demo.js"][1].decode()
        self.assertIn("fetch('config.json'", script)
        self.assertNotIn("innerHTML", script)  # server values are shown as text only
