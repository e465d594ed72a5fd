"""
Tests for alert mail (`twistauth.observe.AlertObserver`, `SMTPMailSender`).

On a `Clock` with a recording sender: batching, the rate limit under an
error storm, the cap on listed events, send failures and timeouts (events
dropped and counted, nothing raised), shutdown.

Against a real SMTP server on loopback (``twisted.mail``'s ESMTP server
with a delivery stub that records): delivery through the whole redacting
pipeline (checklist case 16 for the mail observer), an error storm sending
a handful of mails, STARTTLS with AUTH, implicit TLS, and the faults: a
refused connection, a server that never answers, a refused password, a
server without STARTTLS when it is required.  None of them blocks the
reactor or raises; each raises the drop counter.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import threading
import time
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery
from twisted.python import threadable
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twistauth.observe import (
    AlertObserver,
    AlertSettings,
    MemoryMailSender,
    SMTPMailSender,
    build_logging,
)
from twistauth.observe._alerts import NAMESPACE

FROM = "twistauth@example.org"
TO = ("ops@example.org", "oncall@example.org")


def _event(message: str, level: LogLevel = LogLevel.error, **fields: Any) -> Dict[str, Any]:
    """A redacted-looking event, as the pipeline hands it on."""
    event = {
        "log_level": level,
        "log_namespace": "twistauth.test",
        "log_time": 1_700_000_000.0,
        "log_text": message,
        "log_format": message,
    }
    event.update(fields)
    return event


def _body(message: bytes) -> str:
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    return parsed.get_content()  # type: ignore[no-any-return,attr-defined]


def _listed_and_more(message: bytes) -> int:
    """How many events a mail accounts for: listed plus 'and N more'."""
    body = _body(message)
    listed = body.count("[twistauth.test#")
    more = 0
    for line in body.splitlines():
        if line.startswith("... and "):
            more = int(line.split()[2])
    return listed + more


class _Capture:
    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def __enter__(self) -> List[Dict[str, Any]]:
        globalLogPublisher.addObserver(self.events.append)
        return self.events

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.events.append)


class BatchingTests(SynchronousTestCase):
    def make(self, sender: Any = None, **kwargs: Any) -> AlertObserver:
        self.clock = Clock()
        self.sender = sender if sender is not None else MemoryMailSender()
        options: Dict[str, Any] = dict(batch_delay=30.0, min_interval=300.0, max_events=50, timeout=10.0)
        options.update(kwargs)
        return AlertObserver(
            sender=self.sender,
            clock=self.clock,
            from_address=FROM,
            to_addresses=TO,
            hostname="host-1",
            **options,
        )

    def test_a_batch_is_one_mail_after_the_delay(self) -> None:
        alerts = self.make()
        alerts(_event("first"))
        self.clock.advance(10)
        alerts(_event("second"))
        alerts(_event("third"))
        self.clock.advance(19.9)
        self.assertEqual(self.sender.sent, [])
        self.clock.advance(0.1)
        [(sender, recipients, message)] = self.sender.sent
        self.assertEqual((sender, recipients), (FROM, TO))
        parsed = email.message_from_bytes(message, policy=email.policy.default)
        self.assertEqual(
            parsed["Subject"], "twistauth alert: 3 error events on host-1: first"
        )
        self.assertEqual(parsed["From"], FROM)
        self.assertEqual(parsed["To"], ", ".join(TO))
        self.assertEqual(parsed["Auto-Submitted"], "auto-generated")
        body = _body(message)
        self.assertLess(body.index("first"), body.index("second"))
        self.assertLess(body.index("second"), body.index("third"))
        self.assertEqual(alerts.stats(), {"received": 3, "sent": 1, "failed": 0, "dropped": {"send_failed": 0, "overflow": 0, "shutdown": 0}, "pending": 0})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_error_storm_sends_a_handful_of_mails(self) -> None:
        alerts = self.make()
        # 10,000 errors over one hour of clock time.
        for i in range(10_000):
            alerts(_event(f"error {i}"))
            self.clock.advance(0.36)
        self.clock.advance(300)
        mails = self.sender.sent
        # At most one mail per min_interval, plus the first.
        self.assertLessEqual(len(mails), 3600 // 300 + 1)
        self.assertGreaterEqual(len(mails), 3600 // 300)
        self.assertEqual(sum(_listed_and_more(m) for _, _, m in mails), 10_000)
        for _, _, message in mails:
            self.assertLessEqual(_body(message).count("[twistauth.test#"), 50)
        self.assertEqual(alerts.dropped["overflow"], 10_000 - 50 * len(mails))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mails_are_at_least_min_interval_apart(self) -> None:
        alerts = self.make(batch_delay=1.0, min_interval=60.0)
        alerts(_event("a"))
        self.clock.advance(1)
        self.assertEqual(len(self.sender.sent), 1)
        self.clock.advance(5)
        alerts(_event("b"))
        self.clock.advance(50)
        self.assertEqual(len(self.sender.sent), 1)
        self.clock.advance(4.9)
        self.assertEqual(len(self.sender.sent), 1)
        self.clock.advance(0.1)  # 60 s after the first mail (sent at t=1)
        self.assertEqual(len(self.sender.sent), 2)
        self.assertIn("b", _body(self.sender.sent[1][2]))

    def test_a_failed_send_drops_and_counts_and_the_next_mail_says_so(self) -> None:
        alerts = self.make(sender=MemoryMailSender(fail_with=ConnectionRefusedError("refused")))
        with _Capture() as logged:
            for i in range(70):
                alerts(_event(f"e{i}"))
            self.clock.advance(30)
        self.assertEqual(alerts.failed, 1)
        self.assertEqual(alerts.dropped["send_failed"], 70)
        [warning] = [e for e in logged if e.get("log_namespace") == NAMESPACE]
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["count"], 70)
        # The warning is not itself mailed.
        alerts(warning)
        self.assertEqual(alerts.received, 70)
        self.sender.fail_with = None
        alerts(_event("later"))
        self.clock.advance(300)
        [(_, _, message)] = self.sender.sent
        self.assertIn("70 earlier error events were dropped", _body(message))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_send_that_hangs_is_abandoned_at_the_deadline(self) -> None:
        sender = MemoryMailSender(hold=True)
        alerts = self.make(sender=sender, timeout=10.0)
        alerts(_event("x"))
        self.clock.advance(30)
        self.assertEqual(len(sender.pending), 1)
        # More events while the mail hangs: cheap, nothing else is sent.
        for i in range(1000):
            alerts(_event(f"y{i}"))
        self.clock.advance(9.9)
        self.assertEqual(alerts.failed, 0)
        self.clock.advance(0.1)
        self.assertEqual(sender.pending, [])  # cancelled
        self.assertEqual((alerts.failed, alerts.dropped["send_failed"]), (1, 1))
        # The waiting events go in the next mail, min_interval after the last.
        self.assertEqual(alerts.pending(), 1000)
        sender.hold = False
        self.clock.advance(300)
        self.assertEqual(len(sender.sent), 1)
        self.assertEqual(_listed_and_more(sender.sent[0][2]), 1000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_smtp_clients_own_log_lines_are_not_mailed(self) -> None:
        alerts = self.make()
        alerts(_event("x", log_namespace=NAMESPACE))
        alerts(_event("SMTP authentication failure", log_system="ESMTPSender,client"))
        self.assertEqual(alerts.received, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_sends_what_waits_and_leaves_nothing_behind(self) -> None:
        sender = MemoryMailSender(hold=True)
        alerts = self.make(sender=sender)
        alerts(_event("in flight"))
        self.clock.advance(30)
        alerts(_event("waiting"))
        stopped = alerts.stop()
        self.assertNoResult(stopped)
        self.assertEqual(alerts.dropped["shutdown"], 1)
        self.clock.advance(10)  # the in-flight mail's deadline
        self.successResultOf(stopped)
        alerts(_event("after stop"))
        self.assertEqual(alerts.received, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_long_event_is_cut(self) -> None:
        alerts = self.make(max_event_chars=200)
        alerts(_event("x" * 10_000))
        self.clock.advance(30)
        body = _body(self.sender.sent[0][2])
        self.assertLess(len(body), 600)
        self.assertIn("...[cut]", body)

    def test_the_observer_is_cheap(self) -> None:
        alerts = self.make(sender=MemoryMailSender(hold=True))
        started = time.perf_counter()
        for i in range(20_000):
            alerts(_event(f"e{i}"))
        per_event = (time.perf_counter() - started) / 20_000
        self.assertLess(per_event, 0.0005)  # measured ~5 us


def test_events_from_another_thread_are_scheduled_on_the_reactor_thread() -> None:
    scheduled: List[Any] = []

    class Reactor:
        def callFromThread(self, f: Any, *args: Any) -> None:
            scheduled.append(f)

    clock = Clock()
    sender = MemoryMailSender()
    alerts = AlertObserver(
        sender=sender, clock=clock, reactor=Reactor(), from_address=FROM, to_addresses=TO
    )
    saved = threadable.ioThread
    threadable.ioThread = threadable.getThreadID()
    try:
        worker = threading.Thread(target=alerts, args=(_event("from a thread"),))
        worker.start()
        worker.join()
    finally:
        threadable.ioThread = saved
    assert clock.getDelayedCalls() == []
    [schedule] = scheduled
    schedule()
    clock.advance(30)
    assert len(sender.sent) == 1


@pytest.mark.parametrize(
    "address", ["", "a@b\r\nBcc: c@d", "Ops <ops@example.org>", "a@b,c@d"]
)
def test_addresses_must_be_plain(address: str) -> None:
    with pytest.raises(ValueError):
        AlertObserver(sender=MemoryMailSender(), clock=Clock(), from_address=FROM, to_addresses=(address,))


# ---------------------------------------------------------------------------
# A real SMTP server on loopback.


@implementer(smtp.IMessage)
class _Message:
    """One recipient's copy; only the first recipient's is recorded."""

    def __init__(self, server: _Server, record: bool) -> None:
        self.server = server
        self.record = record
        self.lines: List[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        if self.record:
            self.server.received(b"\n".join(self.lines))
        return succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(IMessageDelivery)
class _Delivery:
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.first = True

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: by the test server"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        self.server.senders.append(str(origin))
        self.first = True
        return origin

    def validateTo(self, user: Any) -> Any:
        self.server.recipients.append(str(user.dest))
        record, self.first = self.first, False
        return lambda: _Message(self.server, record)


@implementer(IRealm)
class _Realm:
    def __init__(self, server: _Server) -> None:
        self.server = server

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        return IMessageDelivery, _Delivery(self.server), lambda: None


class _Server(protocol.ServerFactory):
    """An ESMTP server that records what it receives."""

    def __init__(self, *, tls: Any = None, users: Optional[Dict[bytes, bytes]] = None) -> None:
        self.messages: List[bytes] = []
        self.senders: List[str] = []
        self.recipients: List[str] = []
        self.tls = tls
        self.portal = Portal(_Realm(self), [InMemoryUsernamePasswordDatabaseDontUse(**{k.decode(): v for k, v in users.items()})]) if users else None
        self._waiting: List[Deferred[bytes]] = []

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        challengers = {b"LOGIN": smtp.LOGINCredentials, b"PLAIN": PLAINCredentials} if self.portal else {}
        p = smtp.ESMTP(challengers, self.tls)
        p.factory = self
        p.portal = self.portal
        p.host = b"smtp.test"
        p.delivery = None if self.portal else _Delivery(self)
        return p

    def received(self, message: bytes) -> None:
        self.messages.append(message)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(message)


def _listen(server: _Server, tls_listen: Any = None) -> Any:
    if tls_listen is not None:
        return global_reactor.listenSSL(0, server, tls_listen, interface="127.0.0.1")
    return global_reactor.listenTCP(0, server, interface="127.0.0.1")


async def _until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(global_reactor, 0.01, lambda: None)


def _certificate(tmp_path: Any) -> Any:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert_pem)
    return PrivateCertificate.loadPEM(cert_pem + key_pem).options(), str(ca_file)


def _pipeline(clock: Clock, port: int, **alert_options: Any) -> Any:
    options: Dict[str, Any] = dict(
        host="127.0.0.1",
        port=port,
        from_address=FROM,
        to_addresses=TO,
        batch_delay=1.0,
        min_interval=10.0,
        timeout=5.0,
    )
    options.update(alert_options)
    return build_logging(
        ["smtp"], alerts=AlertSettings(**options), reactor=global_reactor, clock=clock
    )


@pytest_twisted.ensureDeferred
async def test_alert_mail_reaches_a_real_server_redacted() -> None:
    server = _Server()
    port = _listen(server)
    try:
        clock = Clock()
        setup = _pipeline(clock, port.getHost().port)
        log = Logger(namespace="twistauth.test", observer=setup.observer)
        secret = "tok_" + "Zq8Yx1Wv2Ut3Sr4Qp5On6Ml7Kj8Ih9G"
        log.info("not an error")
        log.error("login for {user} failed: {why}", user="bob", why=f"refresh_token={secret}")
        log.failure("exchange failed", Exception(f"Authorization: Bearer {secret}"))
        clock.advance(1.0)
        await _until(lambda: setup.alerts.sent == 1)
        [message] = server.messages
        assert server.senders == [FROM] and sorted(server.recipients) == sorted(TO)
        assert message.startswith(b"Received: by the test server")
        body = _body(message)
        assert "login for bob failed: refresh_token=<redacted>" in body
        assert "exchange failed" in body and "Authorization: <redacted>" in body
        assert "not an error" not in body
        assert secret not in message.decode()
        await setup.alerts.stop()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_error_storm_against_a_real_server_sends_a_handful_of_mails() -> None:
    server = _Server()
    port = _listen(server)
    try:
        clock = Clock()
        setup = _pipeline(clock, port.getHost().port, max_events=20)
        log = Logger(namespace="twistauth.test", observer=setup.observer)
        alerts = setup.alerts
        # 5,000 errors over 60 s of clock time; each mail is delivered for
        # real before the clock moves on.
        for second in range(60):
            for i in range(5000 // 60 + 1):
                log.error("storm {second}/{i}", second=second, i=i)
            clock.advance(1.0)
            await _until(lambda: alerts._in_flight is None)
        clock.advance(10)
        await _until(lambda: alerts._in_flight is None and alerts.pending() == 0)
        assert 6 <= len(server.messages) <= 60 // 10 + 1
        assert alerts.failed == 0
        total = sum(_listed_and_more(m) for m in server.messages)
        assert total == alerts.received == 60 * (5000 // 60 + 1)
        assert clock.getDelayedCalls() == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_never_blocks_and_counts_drops() -> None:
    clock = Clock()
    setup = _pipeline(clock, free_port())  # nothing listens: refused
    log = Logger(namespace="twistauth.test", observer=setup.observer)
    with _Capture() as logged:
        started = time.perf_counter()
        for i in range(1000):
            log.error("error {i}", i=i)
        assert time.perf_counter() - started < 1.0
        clock.advance(1.0)
        await _until(lambda: setup.alerts.failed == 1)
    assert setup.alerts.dropped["send_failed"] == 1000
    [warning] = [e for e in logged if e.get("log_namespace") == NAMESPACE]
    assert "ConnectionRefusedError" in warning["error"] or "SMTPConnectError" in warning["error"]
    assert clock.getDelayedCalls() == []


class _Silent(protocol.Protocol):
    """Accepts and never says a word: no SMTP banner."""


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_is_abandoned_and_the_reactor_stays_responsive() -> None:
    factory = protocol.ServerFactory.forProtocol(_Silent)
    port = global_reactor.listenTCP(0, factory, interface="127.0.0.1")
    ticks: List[float] = []
    ticker = LoopingCall(lambda: ticks.append(time.monotonic()))
    ticker.start(0.01)
    try:
        sender = SMTPMailSender(reactor=global_reactor, host="127.0.0.1", port=port.getHost().port, timeout=0.3)
        clock = Clock()
        alerts = AlertObserver(sender=sender, clock=clock, from_address=FROM, to_addresses=TO, batch_delay=1, timeout=30)
        alerts(_event("x"))
        clock.advance(1)
        started = time.monotonic()
        await _until(lambda: alerts.failed == 1)
        assert 0.25 <= time.monotonic() - started < 3
        assert alerts.dropped["send_failed"] == 1
        # The reactor kept turning while the mail hung.
        during = [t for t in ticks if t >= started]
        assert len(during) >= 10
    finally:
        ticker.stop()
        await port.stopListening()


_SERVER_CERT_WARNINGS = pytest.mark.filterwarnings(
    # The test server's certificate is loaded through pyOpenSSL objects.
    "ignore:Passing pyOpenSSL:DeprecationWarning"
)


@_SERVER_CERT_WARNINGS
@pytest_twisted.ensureDeferred
async def test_starttls_with_auth(tmp_path: Any) -> None:
    tls, ca_file = _certificate(tmp_path)
    server = _Server(tls=tls, users={b"alerts": b"Sm7p-Pa55"})
    port = _listen(server)
    try:
        sender = SMTPMailSender(
            reactor=global_reactor,
            host="localhost",
            port=port.getHost().port,
            tls="starttls",
            username="alerts",
            password="Sm7p-Pa55",
            ca_file=ca_file,
            timeout=5,
        )
        with _Capture() as logged:
            await sender.send(FROM, TO, b"Subject: hi\n\nover TLS\n")
            assert server.messages and b"over TLS" in server.messages[0]
            wrong = SMTPMailSender(
                reactor=global_reactor,
                host="localhost",
                port=port.getHost().port,
                tls="starttls",
                username="alerts",
                password="Wr0ng-Pa55",
                ca_file=ca_file,
                timeout=5,
            )
            with pytest.raises(smtp.AUTHDeclinedError):
                await wrong.send(FROM, TO, b"Subject: no\n\nnope\n")
        assert len(server.messages) == 1
        for event in logged:
            assert "Pa55" not in repr(event)
        assert "Sm7p" not in repr(sender)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_starttls_required_but_not_offered_fails() -> None:
    server = _Server()
    port = _listen(server)
    try:
        sender = SMTPMailSender(
            reactor=global_reactor, host="localhost", port=port.getHost().port, tls="starttls", timeout=5
        )
        with pytest.raises(smtp.TLSRequiredError):
            await sender.send(FROM, TO, b"Subject: x\n\nplain\n")
        assert server.messages == []
    finally:
        await port.stopListening()


@_SERVER_CERT_WARNINGS
@pytest_twisted.ensureDeferred
async def test_implicit_tls(tmp_path: Any) -> None:
    tls, ca_file = _certificate(tmp_path)
    server = _Server()
    port = _listen(server, tls_listen=tls)
    try:
        sender = SMTPMailSender(
            reactor=global_reactor,
            host="localhost",
            port=port.getHost().port,
            tls="implicit",
            ca_file=ca_file,
            timeout=5,
        )
        await sender.send(FROM, TO, b"Subject: hi\n\nimplicit\n")
        assert b"implicit" in server.messages[0]
        # A certificate from an unknown CA is refused.
        untrusted = SMTPMailSender(
            reactor=global_reactor, host="localhost", port=port.getHost().port, tls="implicit", timeout=5
        )
        with pytest.raises(smtp.SMTPConnectError):
            await untrusted.send(FROM, TO, b"Subject: x\n\nno\n")
        assert len(server.messages) == 1
    finally:
        await port.stopListening()
