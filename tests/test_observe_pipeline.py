"""
Tests for the logging pipeline: observer descriptions, the text and JSON
formats, level filters, rotating files, start-up errors, request ids, and
the wiring into twistd (a real ``twistd -y`` process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from io import StringIO
from pathlib import Path
from typing import Any, Dict, List

import pytest
from treq.testing import StubTreq
from twisted.application.service import Application
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twistauth.observe import (
    REDACTED,
    AlertSettings,
    LogSetupError,
    LogTag,
    MemoryMailSender,
    ObserverSpec,
    RequestIds,
    bind_request_id,
    build_access_log,
    build_logging,
    check_log_files,
    check_observer_spec,
    logging_from_settings,
    offer_twistd_observer,
    parse_observer_spec,
    request_id_of,
    request_logger,
)

ROOT = Path(__file__).resolve().parent.parent


def _streams() -> Dict[str, StringIO]:
    return {"stdout": StringIO(), "stderr": StringIO()}


# -- descriptions ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("text", ObserverSpec(kind="text")),
        ("text:stream=stderr:level=WARNING", ObserverSpec(kind="text", stream="stderr", level="warning")),
        ("json:stderr", ObserverSpec(kind="json", stream="stderr")),
        ("file:/var/log/t.log", ObserverSpec(kind="file", path="/var/log/t.log")),
        (
            "file:path=/var/log/t.jsonl:format=json:max_bytes=50M:count=10:level=debug:mode=600",
            ObserverSpec(
                kind="file",
                path="/var/log/t.jsonl",
                format="json",
                max_bytes=50 * 1024 * 1024,
                count=10,
                level="debug",
                mode=0o600,
            ),
        ),
        (r"file:C\:/logs/a.log:max_bytes=2KiB", ObserverSpec(kind="file", path="C:/logs/a.log", max_bytes=2048)),
        ("smtp", ObserverSpec(kind="smtp")),
        ("smtp:level=critical", ObserverSpec(kind="smtp", level="critical")),
    ],
)
def test_parse_observer_spec(text: str, expected: ObserverSpec) -> None:
    assert parse_observer_spec(text) == expected
    assert check_observer_spec(text) == text


@pytest.mark.parametrize(
    "text,message",
    [
        ("syslog", "unknown log observer 'syslog'"),
        ("text:level=loud", "bad level"),
        ("text:stream=stdlog", "stream must be stdout or stderr"),
        ("text:path=/x", "has no option 'path'"),
        ("file", "needs a path"),
        ("file:/x:format=xml", "format must be text or json"),
        ("file:/x:count=0", "count must be from 1 to 1000"),
        ("file:/x:max_bytes=10", "at least 1024"),
        ("file:/x:oops", "expected name=value"),
        ("smtp:stream=stdout", "has no option 'stream'"),
    ],
)
def test_bad_observer_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_observer_spec(text)
    with pytest.raises(LogSetupError, match=message):
        build_logging([text], streams=_streams())


# -- formats --------------------------------------------------------------------


class FormatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.streams = _streams()
        setup = build_logging(
            ["text:level=debug", "json:stream=stderr:level=debug"], streams=self.streams
        )
        self.log = Logger(namespace="twistauth.test", observer=setup.observer)

    def lines(self) -> List[str]:
        return self.streams["stdout"].getvalue().splitlines()

    def records(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.streams["stderr"].getvalue().splitlines()]

    def test_text_line(self) -> None:
        self.log.info("hello {who}", who="bob", request_id="00ff00ff00ff00ff")
        [line] = self.lines()
        stamp, rest = line.split(" ", 1)
        self.assertRegex(stamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000$")
        self.assertEqual(rest, "[twistauth.test#info] [req 00ff00ff00ff00ff] hello bob")

    def test_text_failure_and_line_injection(self) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            self.log.failure("it broke for {who}", who="eve\n2026-01-01T00:00:00 [forged#info] ok")
        text = self.streams["stdout"].getvalue()
        # Continuation lines (the forged one, the traceback) are indented.
        self.assertEqual([line for line in text.splitlines() if not line.startswith("\t")], [text.splitlines()[0]])
        self.assertIn("\tbuiltins.ZeroDivisionError: division by zero", text)
        self.assertIn("[twistauth.test#critical] it broke for eve", text)

    def test_json_record(self) -> None:
        self.log.warn(
            "slow {method}",
            method="account.create",
            seconds=1.5,
            time="clash",
            request_id="abc",
            tags=("a", "b"),
            obj=object(),
        )
        [record] = self.records()
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "twistauth.test")
        self.assertEqual(record["message"], "slow account.create")
        self.assertEqual(record["request_id"], "abc")
        self.assertEqual(record["method"], "account.create")
        self.assertEqual(record["seconds"], 1.5)
        self.assertEqual(record["field_time"], "clash")
        self.assertEqual(record["tags"], ["a", "b"])
        self.assertTrue(record["obj"].startswith("<object object at"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_json_failure(self) -> None:
        self.log.failure("boom", Failure(KeyError("k")))
        [record] = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["failure"]["type"], "builtins.KeyError")
        self.assertEqual(record["failure"]["message"], "'k'")


# -- levels -----------------------------------------------------------------------


def test_each_observer_has_its_own_level() -> None:
    streams = _streams()
    setup = build_logging(
        ["text:level=warn", "json:stream=stderr:level=debug"],
        default_level="info",
        streams=streams,
    )
    log = Logger(namespace="t", observer=setup.observer)
    for level in ("debug", "info", "warn", "error", "critical"):
        log.emit(LogLevel.levelWithName(level), level)
    assert [line.split("] ", 1)[1] for line in streams["stdout"].getvalue().splitlines()] == [
        "warn",
        "error",
        "critical",
    ]
    assert [json.loads(line)["message"] for line in streams["stderr"].getvalue().splitlines()] == [
        "debug",
        "info",
        "warn",
        "error",
        "critical",
    ]
    assert setup.observer.counts == {"debug": 1, "info": 1, "warn": 1, "error": 1, "critical": 1}


def test_default_level_and_reload() -> None:
    streams = _streams()
    setup = build_logging(["text", "json:stream=stderr"], default_level="error", streams=streams)
    pipeline = setup.observer
    log = Logger(namespace="t", observer=pipeline)
    log.info("before")
    assert streams["stdout"].getvalue() == "" and streams["stderr"].getvalue() == ""
    pipeline.set_level("debug", "text")  # e.g. on SIGHUP
    log.debug("after")
    assert "after" in streams["stdout"].getvalue()
    assert streams["stderr"].getvalue() == ""
    pipeline.set_level("info")
    log.info("both")
    assert "both" in streams["stderr"].getvalue()
    with pytest.raises(ValueError, match="no log observer named 'file:/nope'"):
        pipeline.set_level("info", "file:/nope")
    with pytest.raises(ValueError, match="expected a log level"):
        pipeline.set_level("chatty")


def test_events_below_every_level_are_not_redacted_at_all() -> None:
    class Exploding:
        def __repr__(self) -> str:
            raise AssertionError("formatted although nobody wanted it")

    setup = build_logging(["text:level=error"], streams=_streams())
    Logger(observer=setup.observer).debug("{x}", x=Exploding())
    assert setup.observer.counts["debug"] == 1


def test_a_failing_sink_does_not_stop_the_others() -> None:
    class Broken:
        def write(self, text: str) -> None:
            raise OSError("disk full")

        def flush(self) -> None:
            pass

    good = StringIO()
    setup = build_logging(["text", "json:stream=stderr"], streams={"stdout": Broken(), "stderr": good})  # type: ignore[dict-item]
    Logger(observer=setup.observer).info("still here")
    assert "still here" in good.getvalue()
    assert setup.observer.sink_errors == 1


def test_an_event_that_cannot_be_redacted_is_replaced_not_passed_on() -> None:
    class Hostile(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            raise RuntimeError("no")

    streams = _streams()
    setup = build_logging(["text"], streams=streams)
    setup.observer({"log_level": LogLevel.info, "log_namespace": "t", "log_format": "x", "d": Hostile(password="p")})
    text = streams["stdout"].getvalue()
    assert "a log event could not be redacted and was dropped (RuntimeError)" in text
    assert "password" not in text
    assert setup.observer.sink_errors == 1


# -- files ----------------------------------------------------------------------


def test_file_rotates_by_size_and_keeps_count(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    setup = build_logging([f"file:{path}:max_bytes=1K:count=2"], streams=_streams())
    log = Logger(namespace="t", observer=setup.observer)
    for i in range(200):
        log.info("event number {i:04d} " + "x" * 40, i=i)
    setup.observer.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["app.log", "app.log.1", "app.log.2"]
    sizes = [os.path.getsize(tmp_path / n) for n in ("app.log.1", "app.log.2")]
    line = 100  # each line is about this long
    assert all(1024 <= s < 1024 + line for s in sizes), sizes
    # Oldest in .2, then .1, then the current file; nothing lost in between.
    numbers = [
        int(part.split("event number ")[1][:4])
        for name in ("app.log.2", "app.log.1", "app.log")
        for part in (tmp_path / name).read_text().splitlines()
    ]
    assert numbers == list(range(numbers[0], 200))
    assert numbers[0] > 0  # older files were deleted
    assert (os.stat(path).st_mode & 0o777) == 0o640


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    setup = build_logging([f"file:path={path}:format=json"], streams=_streams())
    Logger(namespace="t", observer=setup.observer).info("one {n}", n=1, cookie="sid=abc")
    record = json.loads(path.read_text())
    assert record["message"] == "one 1" and record["cookie"] == REDACTED


def test_reopen_after_an_external_rotation(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    setup = build_logging([f"file:{path}"], streams=_streams())
    log = Logger(observer=setup.observer)
    log.info("first")
    os.rename(path, tmp_path / "app.log.old")
    setup.observer.reopen()
    log.info("second")
    assert "first" in (tmp_path / "app.log.old").read_text()
    assert "second" in path.read_text() and "first" not in path.read_text()


@pytest.mark.parametrize("where", ["under a file", "a directory", "missing directory"])
def test_an_unwritable_log_file_is_a_start_up_error_naming_the_path(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    path = {
        "under a file": blocker / "app.log",
        "a directory": tmp_path,
        "missing directory": tmp_path / "nope" / "app.log",
    }[where]
    first = tmp_path / "ok.log"
    with pytest.raises(LogSetupError) as caught:
        build_logging([f"file:{first}", f"file:{path}"], streams=_streams())
    assert str(path) in str(caught.value)
    assert "cannot open the log file" in str(caught.value)
    # The same check without building anything (for option parsing).
    with pytest.raises(LogSetupError, match="cannot open the log file") as caught:
        check_log_files(["text", f"file:{path}"])
    assert str(path) in str(caught.value)
    check_log_files(["text", f"file:{first}", "smtp"])
    with pytest.raises(LogSetupError, match="unknown log observer"):
        check_log_files(["syslog"])


def test_smtp_needs_its_settings() -> None:
    with pytest.raises(LogSetupError, match="alert_from, alert_to, alert_smtp_host"):
        build_logging(["smtp"], streams=_streams(), reactor=Clock())
    with pytest.raises(LogSetupError, match="not a plain e-mail address"):
        build_logging(
            ["smtp"],
            alerts=AlertSettings(host="mail", from_address="a@b", to_addresses=("x@y\r\nBcc: z",)),
            reactor=Clock(),
        )
    with pytest.raises(LogSetupError, match="alert_smtp_tls"):
        build_logging(
            ["smtp"],
            alerts=AlertSettings(host="mail", tls="ssl", from_address="a@b", to_addresses=("c@d",)),
            reactor=Clock(),
        )


def test_logging_from_settings_reads_the_proposed_keys(tmp_path: Path) -> None:
    class FakeSettings:
        log_observers = (f"file:{tmp_path / 'a.log'}", "smtp")
        log_level = "warn"
        alert_from = "twistauth@example.org"
        alert_to = ("ops@example.org",)
        alert_smtp_host = "127.0.0.1"
        alert_smtp_password = b"pw"
        alert_batch_delay = 5.0

    setup = logging_from_settings(FakeSettings(), reactor=Clock(), mail_sender=MemoryMailSender())
    assert [s.name for s in setup.observer.sinks] == [f"file:{tmp_path / 'a.log'}", "smtp"]
    assert [s.level for s in setup.observer.sinks] == [2, 3]
    assert setup.alerts is not None and setup.alerts.batch_delay == 5.0


# -- request ids ------------------------------------------------------------------


class _Logged(Resource):
    isLeaf = True

    def __init__(self, ids: RequestIds, observer: Any) -> None:
        super().__init__()
        self.ids = ids
        self.observer = observer

    def render_GET(self, request: Any) -> bytes:
        request_id = self.ids.assign(request)
        assert self.ids.assign(request) == request_id  # once per request
        log = request_logger(request, namespace="twistauth.web", observer=self.observer)
        log.info("handled {path}", path=request.path.decode())
        return request_id_of(request).encode()  # type: ignore[union-attr]


class RequestIdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def get(self, ids: RequestIds, headers: Any = None) -> Any:
        treq = StubTreq(_Logged(ids, self.events.append))
        response = self.successResultOf(treq.get("http://x/p", headers=headers))
        body = self.successResultOf(response.content()).decode()
        return response, body

    def test_every_event_of_a_request_carries_its_id_and_the_header_returns_it(self) -> None:
        ids = RequestIds()
        response, body = self.get(ids)
        [header] = response.headers.getRawHeaders("x-request-id")
        self.assertEqual(header, body)
        self.assertRegex(body, r"^[0-9a-f]{16}$")
        [event] = self.events
        self.assertEqual(event["request_id"], body)
        self.assertEqual(event["log_namespace"], "twistauth.web")
        _, other = self.get(ids)
        self.assertNotEqual(other, body)

    def test_incoming_ids_only_when_trusted_and_well_formed(self) -> None:
        _, body = self.get(RequestIds(), {"X-Request-Id": ["from-proxy-1"]})
        self.assertNotEqual(body, "from-proxy-1")
        _, body = self.get(RequestIds(trust_incoming=True), {"X-Request-Id": ["from-proxy-1"]})
        self.assertEqual(body, "from-proxy-1")
        for bad in ["a b", "x" * 65, "<script>", ""]:
            _, body = self.get(RequestIds(trust_incoming=True), {"X-Request-Id": [bad]})
            self.assertRegex(body, r"^[0-9a-f]{16}$")

    def test_bound_loggers(self) -> None:
        base = Logger(namespace="twistauth.methods", observer=self.events.append)
        log = bind_request_id(base, "r1")
        log.info("one")
        log.info("two", request_id="explicit")
        log.failure("three", Failure(ValueError("v")))
        self.assertEqual([e["request_id"] for e in self.events], ["r1", "explicit", "r1"])
        self.assertEqual({e["log_namespace"] for e in self.events}, {"twistauth.methods"})
        request_logger(None, observer=self.events.append).info("no id")
        self.assertNotIn("request_id", self.events[-1])

    def test_ids_are_seedable_and_distinct(self) -> None:
        self.assertEqual(RequestIds(seed=b"s").new(), RequestIds(seed=b"s").new())
        ids = RequestIds()
        self.assertEqual(len({ids.new() for _ in range(10_000)}), 10_000)


def test_log_tag() -> None:
    tag = LogTag(b"salt")
    session_id = "q0HjRr9yq8l3u7Z6W0M3k2bqF4eYd5oP1sT8vX2cA9g"
    assert tag.tag(session_id) == tag.tag(session_id)
    assert len(tag.tag(session_id)) == 12 and session_id not in tag.tag(session_id)
    assert LogTag(b"other").tag(session_id) != tag.tag(session_id)
    # A tag survives redaction: it is short hex.
    streams = _streams()
    setup = build_logging(["text"], streams=streams)
    Logger(observer=setup.observer).info("session {s}", s=tag.tag(session_id))
    assert tag.tag(session_id) in streams["stdout"].getvalue()


# -- services and twistd ----------------------------------------------------------------


class ServiceTests(SynchronousTestCase):
    def test_publisher_mode_adds_and_removes_the_pipeline(self) -> None:
        streams = _streams()
        setup = build_logging(["text"], streams=streams)
        publisher = LogPublisher()
        service = setup.service(publisher=publisher)
        log = Logger(observer=publisher)
        log.info("before start")
        service.startService()
        log.info("while running")
        self.successResultOf(service.stopService())
        log.info("after stop")
        text = streams["stdout"].getvalue()
        self.assertNotIn("before start", text)
        self.assertIn("while running", text)
        self.assertNotIn("after stop", text)

    def test_stop_sends_pending_alerts(self) -> None:
        clock = Clock()
        mail = MemoryMailSender()
        setup = build_logging(
            ["smtp"],
            alerts=AlertSettings(from_address="a@example.org", to_addresses=("b@example.org",)),
            mail_sender=mail,
            clock=clock,
        )
        service = setup.service()
        service.startService()
        Logger(observer=setup.observer).error("disk on fire")
        self.assertEqual(mail.sent, [])
        self.successResultOf(service.stopService())
        self.assertEqual(len(mail.sent), 1)
        self.assertIn(b"disk on fire", mail.sent[0][2])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_offer_twistd_observer(self) -> None:
        application = Application("t")
        setup = build_logging(["text"], streams=_streams())
        self.assertTrue(offer_twistd_observer(application, setup.observer))
        self.assertIs(ILogObserver(application), setup.observer)
        other = build_logging(["json"], streams=_streams())
        self.assertFalse(offer_twistd_observer(application, other.observer))
        self.assertIs(ILogObserver(application), setup.observer)
        self.assertFalse(offer_twistd_observer(object(), setup.observer))


TAC = """
import os
from twisted.application.service import Application, Service
from twisted.internet import reactor
from twisted.logger import Logger
from twistauth.observe import build_logging, offer_twistd_observer

setup = build_logging(["file:" + os.environ["LOG_PATH"] + ":format=json", "text:stream=stderr"])
application = Application("observe-test")
offer_twistd_observer(application, setup.observer)

class Once(Service):
    def startService(self):
        Logger(namespace="twistauth.test").info(
            "login for {user} with {password}", user="bob", password=os.environ["SECRET"])
        print("printed Authorization: Bearer " + os.environ["SECRET"])
        reactor.callLater(0.05, reactor.stop)

Once().setServiceParent(application)
"""


@pytest.mark.integration
def test_twistd_logs_only_through_the_pipeline(twistd_path: str, tmp_path: Path) -> None:
    tac = tmp_path / "observe.tac"
    tac.write_text(textwrap.dedent(TAC))
    log_path = tmp_path / "twistd.jsonl"
    secret = "s3cret-Tok3n-Val-ue-That-Is-Long-9"
    environ = dict(os.environ, LOG_PATH=str(log_path), SECRET=secret)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [twistd_path, "-n", "--pidfile=", "-y", str(tac)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    messages = [r["message"] for r in records]
    # twistd's own lines and printed output (stdio is redirected) pass through too.
    assert any(m.startswith("twistd ") and "starting up" in m for m in messages), messages
    assert "login for bob with <redacted>" in messages
    assert "printed Authorization: <redacted>" in messages
    assert "Server Shut Down." in messages
    assert "login for bob" in stderr
    # twistd installed no observer of its own: nothing unredacted anywhere.
    assert stdout == ""
    for text in (stdout, stderr, log_path.read_text()):
        assert secret not in text


# -- the access log -----------------------------------------------------------------


class AccessLogTests(SynchronousTestCase):
    def make(self, description: str, **kwargs: Any) -> Any:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.25)
        self.streams = _streams()
        access = build_access_log(description, clock=self.clock, streams=self.streams, **kwargs)
        assert access is not None
        access.startService()
        return access

    def test_lines_are_written_in_batches_without_query_or_secrets(self) -> None:
        access = self.make("text")
        token = "Zq8Yx1Wv2Ut3Sr4Qp5On6Ml7Kj8Ih9Gf0Ed"
        access.log(
            method=b"GET",
            path=b"/redirect?code=abc&state=xyz",
            status=303,
            length=0,
            seconds=0.00042,
            client="10.0.0.1",
            request_id="00ff00ff00ff00ff",
            user_agent=b'evil"agent',
        )
        access.log(method="POST", path=f"/reset/{token}", status=200, client="10.0.0.2")
        self.assertEqual(self.streams["stdout"].getvalue(), "")
        self.clock.advance(1.0)
        lines = self.streams["stdout"].getvalue().splitlines()
        self.assertEqual(
            lines[0],
            '2023-11-14T22:13:20.250Z 10.0.0.1 req=00ff00ff00ff00ff "GET /redirect" 303 0 0.42ms "evil\\"agent"',
        )
        self.assertEqual(lines[1], '2023-11-14T22:13:20.250Z 10.0.0.2 "POST /reset/<redacted>" 200 - - "-"')
        self.assertEqual(access.lines, 2)
        access.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_json_lines_and_the_size_trigger(self) -> None:
        access = self.make("json:stream=stderr")
        access.max_buffer = 500
        for i in range(10):
            access.log(method=b"POST", path=b"/api", status=200, length=18, seconds=0.001, request_id=str(i))
        written = self.streams["stderr"].getvalue().splitlines()
        self.assertGreater(len(written), 0)  # flushed before the timer
        access.stopService()
        records = [json.loads(line) for line in self.streams["stderr"].getvalue().splitlines()]
        self.assertEqual([r["request_id"] for r in records], [str(i) for i in range(10)])
        self.assertEqual(records[0]["ms"], 1.0)
        self.assertEqual(records[0]["path"], "/api")

    def test_file_rotates(self) -> None:
        path = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, path, True)
        access = self.make(f"file:{path / 'access.log'}:max_bytes=1K:count=2")
        for _ in range(100):
            access.log(method=b"GET", path=b"/healthz", status=200)
            access.flush()
        access.stopService()
        access.close()
        self.assertEqual(sorted(p.name for p in path.iterdir()), ["access.log", "access.log.1", "access.log.2"])

    def test_descriptions(self) -> None:
        self.assertIsNone(build_access_log(None, clock=Clock()))
        self.assertIsNone(build_access_log("none", clock=Clock()))
        with self.assertRaises(LogSetupError):
            build_access_log("smtp", clock=Clock())
        with self.assertRaises(LogSetupError):
            build_access_log("file:/proc/nope/access.log", clock=Clock())

    def test_a_failing_target_drops_the_batch_and_counts(self) -> None:
        class Broken:
            def write(self, text: str) -> None:
                raise OSError("disk full")

        access = self.make("text")
        access._target = Broken()
        access.log(method=b"GET", path=b"/", status=200)
        self.clock.advance(1.0)
        self.assertEqual((access.errors, access.lines), (1, 0))
        access.stopService()

    def test_cost_per_request(self) -> None:
        import time as _time

        access = self.make("text")
        best = []
        for _ in range(5):
            started = _time.perf_counter()
            for _ in range(5000):
                access.log(
                    method=b"POST",
                    path=b"/api",
                    status=200,
                    length=18,
                    seconds=0.0004,
                    client="127.0.0.1",
                    request_id="00ff00ff00ff00ff",
                    user_agent=b"wrk/4.2.0",
                )
            best.append((_time.perf_counter() - started) / 5000)
            access.flush()
        access.stopService()
        self.assertLess(min(best), 20e-6)  # measured ~3 us
