"""
Logging wired into the application (issue 7): the logging and alert
settings; a request id on every answer (JSON methods, routes, errors,
refusals before a request is whole) and on the events of that request;
structured login, logout and error events; no secret in any observer after
whole local-account and OpenID Connect flows (checklist case 16, for every
observer kind); an error in a method mailed once to a real SMTP server on
loopback; the log level reloaded on SIGHUP (and a worker's relay level);
an unwritable log file stopping start-up with a message naming the path;
the pipeline becoming twistd's one observer.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import pytest_twisted
from ops_support import (
    CHEAP_ARGON2,
    PASSWORD,
    EveryObserver,
    captured_events,
    start_background,
)
from test_oidc_support import make_harness
from twisted.application.service import Application, MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.methods.registry import MethodRegistry
from twistauth.observe import LoggingService, logging_from_settings
from twistauth.settings import Settings, SettingsError
from twistauth.tap import Options, log_observers, makeService
from twistauth.testing._client import MethodClient
from twistauth.workers import READY_KEY, Reloader, _RelayObserver, relay_level, set_relay_level

REQUEST_ID = re.compile(r"\A[0-9a-f]{16}\Z")
OPEN = {"acl_initial": ["*"], "access_account_check": False}
SECRET = "s3cret-Zq8Yx1Wv2Ut3Sr4Qp5On6Ml7Kj8Ih9G"
#: A password an exception message carries in free text.  (A password with
#: spaces would be hidden only up to its first space there: in free text
#: nothing says where it ends.)
LEAKED = "Tr0ub4dor&3-horse"


def result_of(d: Any) -> Any:
    box: List[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


# ---------------------------------------------------------------------------
# Settings.


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="twistauth-ops-"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_defaults(self) -> None:
        s = Settings.load()
        self.assertEqual(s.log_observers, ("text",))
        self.assertEqual(s.log_level, "info")
        self.assertTrue(s.metrics)
        self.assertIsNone(s.metrics_listen)
        self.assertEqual(s.readiness_timeout, 2.0)
        self.assertFalse(s.request_id_trust_header)
        self.assertIsNone(s.alert_smtp_password)
        self.assertEqual((s.alert_smtp_port, s.alert_smtp_tls), (25, "none"))

    def test_every_source(self) -> None:
        password_file = self.directory / "smtp.password"
        password_file.write_text(SECRET + "\n")
        config = self.directory / "a.toml"
        log = self.directory / "app.jsonl"
        config.write_text(
            f'log_observers = ["json", "file:{log}:format=json:level=debug"]\n'
            'alert_to = ["ops@example.org", "oncall@example.org"]\n'
            "alert_batch_delay = 5\n"
        )
        s = Settings.load(
            config_path=str(config),
            environ={"TWISTAUTH_LOG_LEVEL": "WARNING", "TWISTAUTH_METRICS": "off"},
            command_line={
                "alert_smtp_password": f"file:{password_file}",
                "metrics_listen": "tcp:9100:interface=127.0.0.1",
                "request_id_trust_header": "yes",
            },
        )
        self.assertEqual(s.log_observers, ("json", f"file:{log}:format=json:level=debug"))
        self.assertEqual(s.alert_to, ("ops@example.org", "oncall@example.org"))
        self.assertEqual(s.alert_batch_delay, 5.0)
        self.assertEqual(s.log_level, "warning")
        self.assertFalse(s.metrics)
        self.assertEqual(s.metrics_listen, "tcp:9100:interface=127.0.0.1")
        self.assertTrue(s.request_id_trust_header)
        self.assertEqual(s.alert_smtp_password, SECRET)
        self.assertFalse(log.exists())  # checked, not created

    def test_bad_values_name_the_key_and_the_source(self) -> None:
        cases = [
            ("log_observers", {"log_observers": ["syslog"]}, "unknown log observer 'syslog'"),
            ("log_observers", {"log_observers": ["file:/proc/nope/a.log"]}, "/proc/nope/a.log"),
            ("log_observers", {"log_observers": ["text:level=loud"]}, "bad level"),
            ("log_observers", {"log_observers": "text"}, "expected a list"),
            ("log_level", {"log_level": "verbose"}, "expected a log level"),
            ("alert_to", {"alert_to": ["ops@example.org, x@y"]}, "plain e-mail address"),
            ("alert_from", {"alert_from": "nobody"}, "plain e-mail address"),
            ("alert_smtp_tls", {"alert_smtp_tls": "ssl"}, "'none', 'starttls', 'implicit'"),
            ("alert_smtp_port", {"alert_smtp_port": 0}, "from 1 to 65535"),
            ("alert_smtp_password", {"alert_smtp_password": "file:/proc/nope"}, "/proc/nope"),
            ("alert_smtp_ca_file", {"alert_smtp_ca_file": "/proc/nope.pem"}, "cannot read"),
            ("metrics_listen", {"metrics_listen": "nope:9100"}, "server endpoint"),
            ("readiness_timeout", {"readiness_timeout": 0}, "from 0.05 to 60"),
            ("metrics", {"metrics": "maybe"}, "true or false"),
        ]
        for key, keywords, message in cases:
            with self.assertRaises(SettingsError) as caught:
                Settings.load(**keywords)
            self.assertEqual(caught.exception.key, key, keywords)
            self.assertIn("Python keyword", str(caught.exception))
            self.assertIn(message, str(caught.exception), keywords)
        with self.assertRaises(SettingsError) as caught:
            Settings.load(environ={"TWISTAUTH_LOG_OBSERVERS": "text,file:/proc/nope/b.log"})
        self.assertIn("environment variable TWISTAUTH_LOG_OBSERVERS", str(caught.exception))
        self.assertIn("cannot write the log file '/proc/nope/b.log'", str(caught.exception))

    def test_smtp_needs_the_alert_settings(self) -> None:
        with self.assertRaises(SettingsError) as caught:
            Settings.load(log_observers=["text", "smtp"], alert_from="a@example.org")
        self.assertEqual(caught.exception.key, "log_observers")
        self.assertIn("alert_smtp_host, alert_to", str(caught.exception))
        s = Settings.load(
            log_observers=["smtp"],
            alert_smtp_host="127.0.0.1",
            alert_from="a@example.org",
            alert_to=["b@example.org"],
        )
        self.assertEqual(s.log_observers, ("smtp",))

    def test_health_paths_cannot_be_the_api_path(self) -> None:
        with self.assertRaises(SettingsError) as caught:
            Settings.load(api_path="/metrics")
        self.assertEqual(caught.exception.key, "api_path")
        self.assertEqual(
            Settings.load(api_path="/metrics", metrics_listen="tcp:0").api_path, "/metrics"
        )

    def test_the_alert_password_is_never_shown(self) -> None:
        s = Settings.load(alert_smtp_password=SECRET)
        for text in (repr(s), str(s), s.describe("alert_smtp_password")):
            self.assertNotIn(SECRET, text)
        self.assertEqual(s.describe("alert_smtp_password"), "<hidden> (Python keyword)")
        # Nor in the reload's log line for a key that cannot change.
        config = self.directory / "b.toml"
        config.write_text(f'alert_smtp_password = "{SECRET}"\n')
        current = Settings.load(config_path=str(config))
        config.write_text('alert_smtp_password = "other-password"\n')
        with captured_events() as events:
            result = Reloader(
                current=current, load=lambda: Settings.load(config_path=str(config))
            ).reload()
        self.assertEqual(result.refused, ("alert_smtp_password",))
        self.assertNotIn(SECRET, repr(events))


# ---------------------------------------------------------------------------
# Request ids.


class RequestIdTests(SynchronousTestCase):
    def make(self, **options: Any) -> MethodClient:
        self.clock = Clock()
        self.registry = MethodRegistry()

        @self.registry.method("boom")
        def boom(handler: Any) -> None:
            self.handlers.append(handler)
            raise ZeroDivisionError(SECRET)

        self.handlers: List[Any] = []
        self.app = make_app(
            clock=self.clock, registry=self.registry, user_store="memory", **OPEN, **options
        )
        return MethodClient(self.app)

    def answer(self, client: MethodClient, method: str = "POST", body: bytes = b"",
               path: Any = None, **kwargs: Any) -> Any:
        return result_of(client.request(method, body, path=path, **kwargs))

    def test_every_answer_has_its_own_id(self) -> None:
        client = self.make()
        answers = {
            "api": self.answer(client, body=b'{"method":"echo","parameters":{"x":1}}'),
            "api error": self.answer(client, body=b"{not json"),
            "api listing": self.answer(client, "GET"),
            "route 404": self.answer(client, "GET", path="/nothing/here"),
            "route 405": self.answer(client, "PUT", path="/healthz"),
            "healthz": self.answer(client, "GET", path="/healthz"),
            "readyz": self.answer(client, "GET", path="/readyz"),
            "metrics": self.answer(client, "GET", path="/metrics"),
            "logout wait, no session": self.answer(client, "GET", path="/logout/wait"),
        }
        self.assertEqual(answers["api error"].status, 400)
        self.assertEqual(answers["route 404"].status, 404)
        self.assertEqual(answers["logout wait, no session"].status, 401)
        ids = set()
        for name, response in answers.items():
            values = response.headers.getRawHeaders("x-request-id")
            self.assertEqual(len(values or []), 1, name)
            self.assertRegex(values[0], REQUEST_ID, name)
            ids.add(values[0])
        self.assertEqual(len(ids), len(answers))

    def test_an_incoming_id_is_kept_only_when_trusted(self) -> None:
        headers = {"X-Request-Id": "from-the-proxy-1"}
        body = b'{"method":"echo","parameters":{}}'
        response = self.answer(self.make(), body=body, headers=headers)
        self.assertNotEqual(response.header("x-request-id"), "from-the-proxy-1")
        trusted = self.make(request_id_trust_header=True)
        response = self.answer(trusted, body=body, headers=headers)
        self.assertEqual(response.header("x-request-id"), "from-the-proxy-1")
        response = self.answer(trusted, body=body, headers={"X-Request-Id": "<script>"})
        self.assertRegex(response.header("x-request-id"), REQUEST_ID)

    def test_a_method_failure_is_logged_with_the_request_id(self) -> None:
        client = self.make()
        with captured_events() as events:
            response = self.answer(client, body=b'{"method":"boom","parameters":{}}')
        self.flushLoggedErrors(ZeroDivisionError)
        self.assertEqual(response.status, 500)
        request_id = response.header("x-request-id")
        cid = response.decoded()["error"]["value"]["correlation_id"]
        # The correlation id stays the dispatcher's (a batch answers several).
        self.assertEqual(cid, self.handlers[0].transaction_id)
        [failure] = [e for e in events if "log_failure" in e]
        self.assertEqual(failure["request_id"], request_id)
        self.assertEqual(failure["cid"], cid)
        self.assertEqual(failure["log_namespace"], "twistauth.methods.dispatch")
        self.assertEqual(failure["log_level"], LogLevel.critical)
        self.assertNotIn(SECRET, response.body.decode())

    def test_no_event_per_request_by_default(self) -> None:
        client = self.make()
        with captured_events() as events:
            for _ in range(3):
                self.answer(client, body=b'{"method":"echo","parameters":{}}')
            self.answer(client, "GET", path="/healthz")
        self.assertEqual(events, [])

    def test_refusals_before_the_request_is_whole_have_an_id(self) -> None:
        self.make(max_body_bytes=10)
        site = self.app.site()
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        raw = transport.value().decode()
        self.assertIn("413", raw.splitlines()[0])
        self.assertRegex(raw, r"(?i)\r\nx-request-id: [0-9a-f]{16}\r\n")
        channel.connectionLost(None)

    def test_the_access_log_line_carries_the_id(self) -> None:
        directory = tempfile.mkdtemp(prefix="twistauth-access-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "access.log")
        self.make(access_log=path)
        site = self.app.site()
        site.startFactory()
        self.addCleanup(site.stopFactory)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        body = b'{"method":"echo","parameters":{}}'
        channel.dataReceived(
            b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        request_id = re.search(rb"(?i)x-request-id: ([0-9a-f]{16})", transport.value())
        assert request_id is not None
        channel.connectionLost(None)
        with open(path) as f:
            [line] = f.read().splitlines()
        self.assertTrue(line.endswith(" req=" + request_id.group(1).decode()), line)


class OIDCEventTests(SynchronousTestCase):
    """
    The OpenID Connect routes log with the request's id, and count logins.
    """

    def test_login_events_carry_the_request_id(self) -> None:
        h = make_harness()
        browser = h.browser()
        with captured_events() as events:
            bad = browser.get("/redirect?state=nope")
            good = browser.log_in()
        self.assertEqual(bad.code, 400)
        self.assertEqual(good.code, 303)
        logins = [e for e in events if e.get("event") == "login"]
        self.assertEqual([e["outcome"] for e in logins], ["failure", "success"])
        self.assertEqual(logins[0]["reason"], "invalid_state")
        self.assertEqual(logins[0]["request_id"], bad.header("x-request-id"))
        self.assertEqual(logins[1]["request_id"], good.header("x-request-id"))
        self.assertEqual(logins[1]["kind"], "oidc")


# ---------------------------------------------------------------------------
# Local accounts: events, and checklist case 16 for every observer.


async def _account_flow(app: Any) -> Dict[str, Any]:
    """
    Create an account, fail a login, log in, call, log out; the answers'
    request ids and the session token.
    """
    client = MethodClient(app, headers={"X-Twistauth-Session": ""})
    seen: Dict[str, Any] = {}

    async def call(name: str, method: str, token: str = "", **parameters: Any) -> Any:
        body = json.dumps({"method": method, "parameters": parameters}).encode()
        response = await client.request(
            "POST", body, headers={"X-Twistauth-Session": token}
        )
        seen[name] = response.header("x-request-id")
        return response

    created = await call("create", "account.create", user_id="alice", password=PASSWORD)
    assert created.status == 200, created.body
    seen["token"] = created.header("x-twistauth-session")
    failed = await call("bad login", "account.login", user_id="alice", password="wrong " + PASSWORD)
    assert failed.status == 401, failed.body
    logged_in = await call("login", "account.login", user_id="alice", password=PASSWORD)
    assert logged_in.status == 200, logged_in.body
    token = logged_in.header("x-twistauth-session")
    seen["token2"] = token
    await call("info", "session.info", token)
    await call("logout", "account.logout", token)
    return seen


def _account_app(**options: Any) -> Any:
    return make_app(
        clock=global_reactor,
        reactor=global_reactor,
        user_store="memory",
        method_modules=[],
        **CHEAP_ARGON2,
        **options,
    )


@pytest_twisted.ensureDeferred
async def test_account_events_carry_the_request_id() -> None:
    app = _account_app()
    stop = start_background(app)
    try:
        with captured_events() as events:
            seen = await _account_flow(app)
    finally:
        await stop()
    structured = [e for e in events if e.get("event")]
    kinds = [(e["event"], e.get("outcome")) for e in structured]
    assert kinds == [
        ("account_created", None),
        ("login", "failure"),
        ("login", "success"),
        ("logout", None),
    ], kinds
    by_event = {(e["event"], e.get("outcome")): e for e in structured}
    assert by_event[("account_created", None)]["request_id"] == seen["create"]
    assert by_event[("login", "failure")]["request_id"] == seen["bad login"]
    assert by_event[("login", "failure")]["reason"] == "invalid_credentials"
    assert by_event[("login", "success")]["request_id"] == seen["login"]
    assert by_event[("logout", None)]["request_id"] == seen["logout"]
    assert all(e["user_id"] == "alice" for e in structured)


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_any_observer(tmp_path: Path) -> None:
    """
    Checklist case 16, for every observer kind: after a whole local-account
    flow, a whole OpenID Connect flow (login, refresh, back-channel and
    RP-initiated logout), a method failure whose exception carries the
    password, and events that name secrets outright, no password, session
    token, CSRF token, code, state, nonce, verifier, provider token, logout
    token or client secret is in the text, JSON, file (text and JSON) or
    alert-mail output, while each still shows the logins.
    """
    app = _account_app(**OPEN)

    @app.registry.method("leaky")
    def leaky(handler: Any, password: str) -> None:
        raise RuntimeError(f"could not use password={password} for {handler.method}")

    stop = start_background(app)
    observers = EveryObserver(tmp_path)
    try:
        with observers:
            seen = await _account_flow(app)
            client = MethodClient(app)
            refused = await client.call("leaky", password=LEAKED).addErrback(
                lambda f: f.value
            )
            secrets = _oidc_flow()
            from twisted.logger import Logger

            log = Logger(namespace="twistauth.test")
            log.info("session {session_id} header Authorization: Bearer {t}",
                     session_id=seen["token"], t=seen["token2"])
            log.error("cookie twistauth_session={token}", token=seen["token2"])
    finally:
        await stop()
    assert getattr(refused, "status", None) == 500, refused
    secrets.update(
        password=PASSWORD,
        words=PASSWORD.split(" ", 1)[1],  # no fragment of it either
        leaked=LEAKED,
        token=seen["token"],
        token2=seen["token2"],
    )
    outputs = observers.outputs()
    for name, text in outputs.items():
        assert "alice logged in" in text, name
        assert "logged in with fake" in text, name
        assert "method leaky failed" in text, name
        for what, value in secrets.items():
            assert value, what
            assert value not in text, (name, what)
            if value.count(".") == 2:  # a JWT: not even its signature
                assert value.rsplit(".", 1)[1] not in text, (name, what)
    for record in observers.outputs()["file-json"].splitlines():
        json.loads(record)


def _oidc_flow() -> Dict[str, str]:
    """
    test_oidc_login's whole flow; the secrets it handled.
    """
    from urllib.parse import parse_qs, urlsplit

    def query_of(url: str) -> Dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}

    h = make_harness()
    browser = h.browser()
    started = browser.start_login()
    auth_query = query_of(started.location or "")
    query = h.fake.authorize(started.location or "")
    assert browser.finish_login(query).code == 303
    session = browser.cookie("__Host-twistauth_session") or ""
    csrf = browser.cookie("__Host-twistauth_session_csrf") or ""
    first = result_of(h.tokens.get_user_context("fake:alice")).tokens
    for _ in range(3):  # within the session's idle timeout, past the token's life
        h.clock.advance(1200)
        assert browser.call("oidc.session").code == 200
    second = result_of(h.tokens.get_user_context("fake:alice")).tokens
    other = h.browser()
    other.log_in()
    other_sid = result_of(h.sessions.load(other.cookie("__Host-twistauth_session"))).provider_sid
    logout_token = h.fake.issue_logout_token(sid=other_sid)
    assert other.post("/logout/backchannel", data={"logout_token": logout_token}).code == 200
    assert browser.post("/logout", headers={"X-Twistauth-CSRF": csrf}).code == 302
    assert first.access_token != second.access_token
    return {
        "code": query["code"], "state": query["state"], "nonce": auth_query["nonce"],
        "challenge": auth_query["code_challenge"],
        "verifier": h.fake.token_requests[0]["code_verifier"],
        "session": session, "csrf": csrf, "logout_token": logout_token,
        "client_secret": h.fake.client_secret,
        "access": first.access_token, "refresh": first.refresh_token, "id": first.id_token,
        "access2": second.access_token, "id2": second.id_token,
    }


# ---------------------------------------------------------------------------
# Alert mail through the app, against a real SMTP server.


@pytest_twisted.ensureDeferred
async def test_an_error_in_a_method_sends_one_mail() -> None:
    from test_observe_alerts import _body, _listen, _Server, _until

    server = _Server()
    port = _listen(server)
    clock = Clock()
    settings = Settings.load(
        log_observers=["smtp"],
        alert_smtp_host="127.0.0.1",
        alert_smtp_port=port.getHost().port,
        alert_from="twistauth@example.org",
        alert_to=["ops@example.org"],
        alert_batch_delay=5,
        alert_min_interval=60,
        alert_timeout=5,
    )
    setup = logging_from_settings(settings, reactor=global_reactor, clock=clock)
    service = LoggingService(setup.observer, alerts=setup.alerts, publisher=globalLogPublisher)
    registry = MethodRegistry()

    @registry.method("boom")
    def boom(handler: Any, password: str) -> None:
        raise ValueError(f"the database refused password={password}")

    app = make_app(clock=Clock(), registry=registry, user_store="memory", **OPEN)
    client = MethodClient(app)
    service.startService()
    try:
        ids = []
        for _ in range(3):
            response = await client.request(
                "POST", json.dumps({"method": "boom", "parameters": {"password": SECRET}}).encode()
            )
            assert response.status == 500
            ids.append(response.header("x-request-id"))
        assert server.messages == []
        clock.advance(5)
        await _until(lambda: setup.alerts.sent == 1)
        await service.stopService()
    finally:
        if service.running:
            await service.stopService()
        await port.stopListening()
    [message] = server.messages
    body = _body(message)
    assert body.count("method boom failed") == 3, body
    for request_id in ids:
        assert f"[req {request_id}]" in body
    assert "ValueError" in body
    assert SECRET not in message.decode("utf-8", "replace")
    assert setup.alerts.stats()["dropped"] == {"send_failed": 0, "overflow": 0, "shutdown": 0}


# ---------------------------------------------------------------------------
# twistd: start-up errors, default observers, reload, the worker relay.


def _options(*argv: str, parent: Any = None) -> Options:
    options = Options()
    if parent is not None:
        options.parent = parent
    options.parseOptions(list(argv))
    return options


class TwistdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {})
        self.directory = Path(tempfile.mkdtemp(prefix="twistauth-ops-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.base = ["--data-dir", str(self.directory), "--user-store", "memory"]

    def test_an_unwritable_log_file_stops_start_up_naming_the_path(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            _options(*self.base, "--log-observers", "file:/proc/nope/app.log")
        self.assertEqual(caught.exception.code, 1)
        self.assertIn("log_observers", stderr.getvalue())
        self.assertIn("cannot write the log file '/proc/nope/app.log'", stderr.getvalue())

    def test_twistds_default_log_file_unwritable(self) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        twistd = {"nodaemon": False, "logfile": "/proc/nope/twistd.log", "logger": None}
        options = _options(*self.base, parent=twistd)
        with self.assertRaises(SystemExit):
            makeService(options, reactor=MemoryReactorClock())
        self.assertIn("/proc/nope/twistd.log", stderr.getvalue())

    def test_the_observers_follow_twistd_unless_set(self) -> None:
        settings = Settings.load()
        daemon = {"nodaemon": False, "logfile": None}
        self.assertEqual(log_observers(_options(*self.base), settings), ("text",))
        self.assertEqual(
            log_observers(_options(*self.base, parent={"nodaemon": True, "logfile": None}),
                          settings),
            ("text",),
        )
        [described] = log_observers(_options(*self.base, parent=daemon), settings)
        self.assertEqual(described, "file:" + os.path.abspath("twistd.log").replace(":", "\\:"))
        logfile = {"nodaemon": True, "logfile": "/var/log/a:b.log"}
        self.assertEqual(
            log_observers(_options(*self.base, parent=logfile), settings),
            ("file:/var/log/a\\:b.log",),
        )
        self.assertEqual(
            log_observers(_options(*self.base, parent={"logfile": "-"}), settings), ("text",)
        )
        explicit = Settings.load(log_observers=["json"])
        self.assertEqual(log_observers(_options(*self.base, parent=daemon), explicit), ("json",))

    def test_the_pipeline_becomes_twistds_observer(self) -> None:
        service = makeService(_options(*self.base), reactor=MemoryReactorClock())
        self.assertIsInstance(list(service)[0], LoggingService)  # first: starts first, stops last
        application = Application("t")
        service.setServiceParent(application)
        self.assertIs(ILogObserver(application), service.logging.pipeline)
        self.assertIsNone(service.logging.publisher)
        # In another program's tree the program owns logging, unless
        # log_observers was set.
        other = makeService(_options(*self.base), reactor=MemoryReactorClock())
        other.setServiceParent(MultiService())
        self.assertIsNone(other.logging.publisher)
        explicit = makeService(
            _options(*self.base, "--log-observers", "json"), reactor=MemoryReactorClock()
        )
        explicit.setServiceParent(MultiService())
        self.assertIs(explicit.logging.publisher, globalLogPublisher)
        # twistd --logger chose another observer: the pipeline is not offered.
        chosen = makeService(
            _options(*self.base, parent={"logger": "x.y"}), reactor=MemoryReactorClock()
        )
        application = Application("u")
        chosen.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))

    def test_sighup_reloads_the_log_level(self) -> None:
        config = self.directory / "twistauth.toml"
        log = self.directory / "app.log"
        config.write_text(f'log_observers = ["json", "file:{log}:level=debug"]\n')
        service = makeService(
            _options(*self.base, "--config", str(config)), reactor=MemoryReactorClock()
        )
        pipeline = service.logging.pipeline
        self.assertEqual([s.level for s in pipeline.sinks], [1, 0])
        config.write_text(
            f'log_observers = ["json", "file:{log}:level=debug"]\nlog_level = "error"\n'
        )
        result = service.reloader.reload()
        self.assertEqual(result.applied, ("log_level",))
        # The observer that names its own level keeps it.
        self.assertEqual([s.level for s in pipeline.sinks], [3, 0])
        config.write_text('log_level = "loud"\n')
        self.assertFalse(service.reloader.reload().ok)
        self.assertEqual([s.level for s in pipeline.sinks], [3, 0])
        pipeline.close()

    def test_a_worker_relays_from_the_lowest_level(self) -> None:
        self.addCleanup(set_relay_level, 0)
        self.assertEqual(relay_level(Settings.load()), 1)
        self.assertEqual(relay_level(Settings.load(log_level="error")), 3)
        self.assertEqual(
            relay_level(Settings.load(log_level="error", log_observers=["text", "json:level=debug"])),
            0,
        )
        stream = io.StringIO()
        relay = _RelayObserver(stream)
        set_relay_level(3)
        relay({"log_level": LogLevel.info, "log_format": "dropped", "log_namespace": "t"})
        relay({"log_level": LogLevel.info, "log_format": "ready", "log_namespace": "t",
               READY_KEY: True})
        relay({"log_level": LogLevel.error, "log_format": "kept", "log_namespace": "t"})
        text = stream.getvalue()
        self.assertNotIn("dropped", text)
        self.assertIn("ready", text)
        self.assertIn("kept", text)

    def test_a_worker_opens_no_log_file_and_reloads_its_relay_level(self) -> None:
        self.addCleanup(set_relay_level, 0)
        config = self.directory / "twistauth.toml"
        log = self.directory / "worker-must-not-open.log"
        config.write_text(f'log_observers = ["file:{log}"]\n')
        import socket

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        self.addCleanup(listening.close)
        fd = os.dup(listening.fileno())
        options = _options(
            *self.base, "--config", str(config),
            "--listen", f"tcp:{listening.getsockname()[1]}:interface=127.0.0.1",
            "--worker-fds", f"{fd}:inet",
        )
        service = makeService(options, reactor=MemoryReactorClock())
        os.close(fd)
        self.assertIsNone(service.logging)
        self.assertFalse(log.exists())
        config.write_text(f'log_observers = ["file:{log}"]\nlog_level = "warn"\n')
        self.assertEqual(service.reloader.reload().applied, ("log_level",))
        from twistauth import workers

        self.assertEqual(workers._relay_level[0], 2)
        self.assertFalse(log.exists())
