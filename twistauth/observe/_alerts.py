"""
Alert mail: error events, batched and rate-limited, sent by SMTP.

`AlertObserver` is a log observer (it receives events already redacted and
filtered by level, usually ``error`` and above).  It never sends one mail
per event:

- the first event of a quiet period starts a batch; events keep collecting
  for ``batch_delay`` seconds, then one mail carries them all;
- two mails are at least ``min_interval`` seconds apart: during an error
  storm events keep collecting into the next mail, so a storm of *T*
  seconds sends at most ``T / min_interval + 1`` mails;
- a mail lists at most ``max_events`` events in full and counts the rest;
- one mail is in flight at a time, with a deadline (``timeout``).

Calling the observer only formats the event and appends it to a bounded
list: it never blocks and never raises.  When a mail cannot be sent (the
server is unreachable, refuses, times out, TLS or authentication fails) its
events are dropped and counted in ``dropped["send_failed"]``, a warning is
logged (never mailed: the observer ignores its own namespace and the SMTP
client's legacy log lines), and the next batch is tried as usual.

`SMTPMailSender` sends with ``twisted.mail.smtp`` (plain, STARTTLS or
implicit TLS, optional AUTH).  ``twisted.mail.smtp`` is imported when a
sender is made (at start-up), not when this module is: importing it
installs the default reactor and asks DNS for this host's name.
"""

from __future__ import annotations

import os
import socket
import threading
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from io import BytesIO
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from twistauth.observe._interfaces import IMailSender
from twistauth.observe._sinks import format_text

NAMESPACE = "twistauth.observe.alerts"
log = Logger(namespace=NAMESPACE)

#: ``log_system`` prefixes of the SMTP client's own (legacy) log lines:
#: never mailed, or a failing server would feed alerts about itself.
_OWN_SYSTEMS = ("ESMTPSender", "SMTPSender", "ESMTPClient", "SMTPClient")

_TLS_MODES = ("none", "starttls", "implicit")


@implementer(IMailSender)
@attr.s(kw_only=True)
class SMTPMailSender:
    """
    Sends mail to one SMTP server with ``twisted.mail.smtp``.

    :ivar reactor: connects (``IReactorTCP``, ``IReactorSSL`` for implicit
        TLS) and keeps the deadline (``IReactorTime``).
    :ivar tls: ``"none"``, ``"starttls"`` (required: the mail is not sent
        if the server does not offer it) or ``"implicit"`` (TLS from the
        first byte, usually port 465).
    :ivar username: AUTH user name; with it, authentication is required.
    :ivar password: AUTH password (never shown in ``repr``).
    :ivar ca_file: a PEM file of the CA to trust instead of the system's.
    :ivar timeout: seconds for the whole attempt, connection included.
    :ivar helo: the name sent in EHLO (default: this host's name).
    """

    reactor: Any = attr.ib()
    host: str = attr.ib()
    port: int = attr.ib(default=25)
    tls: str = attr.ib(default="none")
    username: Optional[str] = attr.ib(default=None)
    password: Optional[str] = attr.ib(default=None, repr=False)
    ca_file: Optional[str] = attr.ib(default=None)
    timeout: float = attr.ib(default=30.0)
    helo: Optional[str] = attr.ib(default=None)

    @tls.validator
    def _check_tls(self, attribute: Any, value: str) -> None:
        if value not in _TLS_MODES:
            raise ValueError(f"expected tls to be one of {_TLS_MODES}, got {value!r}")

    def __attrs_post_init__(self) -> None:
        # Imported now, at start-up, not at the first alert: the import
        # installs the default reactor if none is, and asks DNS for this
        # host's name (socket.getfqdn), which may block.
        import twisted.mail.smtp  # noqa: F401

    def _tls_options(self) -> Any:
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        trust = None
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        return optionsForClientTLS(self.host, trustRoot=trust)

    def send(self, sender: str, recipients: Sequence[str], message: bytes) -> Deferred[None]:
        """
        See `IMailSender.send`.
        """
        from twisted.mail.smtp import ESMTPSender, ESMTPSenderFactory

        class QuietSender(ESMTPSender):
            # The client keeps a transcript (AUTH lines included) for its
            # error messages when debug is on, as it is by default.
            debug = False

        tls_options = self._tls_options() if self.tls != "none" else None
        state: Dict[str, Any] = {}

        def cancel(d: Deferred[Any]) -> None:
            factory = state["factory"]
            factory.sendFinished = True
            protocol = factory.currentProtocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()
            else:
                state["connector"].disconnect()

        result: Deferred[Any] = Deferred(cancel)
        factory = ESMTPSenderFactory(
            self.username.encode() if self.username else None,
            self.password.encode() if self.password else None,
            sender,
            [r.encode("ascii") for r in recipients],
            BytesIO(message),
            result,
            retries=0,
            timeout=self.timeout,
            contextFactory=tls_options if self.tls == "starttls" else None,
            heloFallback=self.tls == "none" and not self.username,
            requireAuthentication=bool(self.username),
            requireTransportSecurity=self.tls == "starttls",
        )
        factory.protocol = QuietSender
        factory.domain = (self.helo or socket.gethostname()).encode("idna")
        state["factory"] = factory
        if self.tls == "implicit":
            state["connector"] = self.reactor.connectSSL(
                self.host, self.port, factory, tls_options, timeout=self.timeout
            )
        else:
            state["connector"] = self.reactor.connectTCP(
                self.host, self.port, factory, timeout=self.timeout
            )
        result.addTimeout(self.timeout, self.reactor)
        return result.addCallback(lambda _: None)


@implementer(IMailSender)
@attr.s(kw_only=True)
class MemoryMailSender:
    """
    Records messages instead of sending them, for tests.

    :ivar sent: ``(sender, recipients, message)`` of every accepted message.
    :ivar pending: Deferreds of sends not answered yet, when ``hold`` is set.
    :ivar hold: leave each send unanswered (to test deadlines) instead of
        accepting it at once.
    :ivar fail_with: fail each send with this exception instead.
    """

    sent: List[Tuple[str, Tuple[str, ...], bytes]] = attr.ib(factory=list)
    pending: List[Deferred[None]] = attr.ib(factory=list)
    hold: bool = attr.ib(default=False)
    fail_with: Optional[Exception] = attr.ib(default=None)

    def send(self, sender: str, recipients: Sequence[str], message: bytes) -> Deferred[None]:
        """
        See `IMailSender.send`.
        """
        if self.fail_with is not None:
            d: Deferred[None] = Deferred()
            d.errback(self.fail_with)
            return d
        if self.hold:
            d = Deferred(lambda d: self.pending.remove(d))
            self.pending.append(d)
            return d
        self.sent.append((sender, tuple(recipients), message))
        return succeed(None)


@implementer(ILogObserver)
class AlertObserver:
    """
    Mails batches of error events; see the module docstring.

    :ivar sent: mails accepted by the server.
    :ivar failed: mails that could not be sent.
    :ivar dropped: events not delivered, by reason: ``"send_failed"`` (their
        mail could not be sent) and ``"overflow"`` (over ``max_events`` in
        one mail: counted in that mail, but not listed) and ``"shutdown"``
        (waiting when the observer stopped while a mail was in flight).
    :ivar received: events handed to the observer.
    """

    def __init__(
        self,
        *,
        sender: IMailSender,
        clock: IReactorTime,
        from_address: str,
        to_addresses: Sequence[str],
        subject: str = "twistauth alert",
        batch_delay: float = 30.0,
        min_interval: float = 300.0,
        max_events: int = 50,
        timeout: float = 60.0,
        max_event_chars: int = 4000,
        reactor: Any = None,
        hostname: Optional[str] = None,
    ) -> None:
        """
        :param sender: delivers the mails.
        :param clock: batches, rate limit and deadline run on it.
        :param from_address: the envelope and ``From`` address.
        :param to_addresses: who gets the mails.
        :param subject: the subject's beginning; the count of events and the
            host follow.
        :param batch_delay: seconds to collect events after the first.
        :param min_interval: least seconds between two mails.
        :param max_events: events listed in one mail; the rest are counted.
        :param timeout: seconds one send may take before it is abandoned.
        :param max_event_chars: an event's text (traceback included) is cut
            to this length.
        :param reactor: used only to reach the reactor thread when an event
            is logged from another thread (``callFromThread``).
        :param hostname: named in mails (default: this host's name).
        """
        if not to_addresses:
            raise ValueError("an alert observer needs at least one recipient address")
        for address in (from_address, *to_addresses):
            if not address or any(c in address for c in "\r\n,;<> \t"):
                raise ValueError(f"not a plain e-mail address: {address!r}")
        self._sender = sender
        self._clock = clock
        self._reactor = reactor
        self.from_address = from_address
        self.to_addresses = tuple(to_addresses)
        self.subject = subject
        self.batch_delay = batch_delay
        self.min_interval = min_interval
        self.max_events = max_events
        self.timeout = timeout
        self.max_event_chars = max_event_chars
        self.hostname = hostname or socket.gethostname()
        self._msgid_domain = "".join(
            c for c in self.hostname if c.isalnum() or c in ".-"
        ) or "localhost"
        self._lock = threading.Lock()
        self._events: List[str] = []
        self._overflow = 0
        self._first_at: Optional[float] = None
        self._last_sent_at: Optional[float] = None
        self._undelivered = 0
        self._timer: Optional[IDelayedCall] = None
        self._in_flight: Optional[Deferred[None]] = None
        self._stopped = False
        self.sent = 0
        self.failed = 0
        self.received = 0
        self.dropped: Dict[str, int] = {"send_failed": 0, "overflow": 0, "shutdown": 0}

    # -- the observer -------------------------------------------------------

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == NAMESPACE:
            return
        system = event.get("log_system")
        if isinstance(system, str) and system.startswith(_OWN_SYSTEMS):
            return
        text = None
        if len(self._events) < self.max_events:
            # Only events that will be listed are formatted: a storm of
            # overflowing events costs a counter each.
            text = format_text(event)
            if len(text) > self.max_event_chars:
                text = text[: self.max_event_chars] + "\n\t...[cut]\n"
        with self._lock:
            if self._stopped:
                return
            self.received += 1
            if text is not None and len(self._events) < self.max_events:
                self._events.append(text)
            else:
                self._overflow += 1
            if self._first_at is not None:
                return
            self._first_at = self._clock.seconds()
        if threadable.ioThread is None or threadable.isInIOThread() or self._reactor is None:
            self._schedule()
        else:
            self._reactor.callFromThread(self._schedule)

    # -- batching -----------------------------------------------------------

    def _due(self) -> float:
        """
        When the pending batch may be sent.
        """
        assert self._first_at is not None
        due = self._first_at + self.batch_delay
        if self._last_sent_at is not None:
            due = max(due, self._last_sent_at + self.min_interval)
        return due

    def _schedule(self) -> None:
        if self._timer is not None or self._in_flight is not None or self._first_at is None:
            return
        delay = max(0.0, self._due() - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._flush)

    def _take_batch(self) -> Tuple[List[str], int]:
        with self._lock:
            events, overflow = self._events, self._overflow
            self._events, self._overflow, self._first_at = [], 0, None
        return events, overflow

    def _flush(self) -> None:
        self._timer = None
        events, overflow = self._take_batch()
        if not events and not overflow:
            return
        self._send(events, overflow)

    def _send(self, events: List[str], overflow: int) -> Deferred[None]:
        now = self._clock.seconds()
        self._last_sent_at = now
        message = self._message(events, overflow, now)
        count = len(events) + overflow
        d: Deferred[None]
        try:
            d = self._sender.send(self.from_address, self.to_addresses, message)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        d.addTimeout(self.timeout, self._clock)
        self._in_flight = d

        def sent(_: Any) -> None:
            self.sent += 1
            self.dropped["overflow"] += overflow

        def failed(failure: Failure) -> None:
            self.failed += 1
            self.dropped["send_failed"] += count
            self._undelivered += count
            log.warn(
                "could not send an alert mail to {server}: {error}; {count} error "
                "events dropped ({total} so far)",
                server=getattr(self._sender, "host", "the mail server"),
                error=f"{getattr(failure.type, '__name__', 'error')}: {failure.getErrorMessage()}",
                count=count,
                total=self.dropped["send_failed"],
            )

        def done(_: Any) -> None:
            self._in_flight = None
            if not self._stopped:
                self._schedule()

        d.addCallbacks(sent, failed).addBoth(done)
        return d

    def _message(self, events: List[str], overflow: int, now: float) -> bytes:
        count = len(events) + overflow
        first_line = events[0].split("\n", 1)[0] if events else ""
        # The first line's message after "time [system] ".
        summary = first_line.split("] ", 1)[-1][:80]
        msg = EmailMessage()
        msg["Subject"] = f"{self.subject}: {count} error event{'s' if count != 1 else ''} on {self.hostname}: {summary}"
        msg["From"] = self.from_address
        msg["To"] = ", ".join(self.to_addresses)
        msg["Date"] = formatdate(now, usegmt=True)
        # A domain of our own: make_msgid would otherwise ask DNS (getfqdn),
        # which blocks.
        msg["Message-ID"] = make_msgid("twistauth-alert", domain=self._msgid_domain)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"
        lines = [
            f"{count} error event{'s' if count != 1 else ''} on {self.hostname} "
            f"(process {os.getpid()}).",
            "",
        ]
        for text in events:
            lines.append(text.rstrip("\n"))
            lines.append("")
        if overflow:
            lines.append(f"... and {overflow} more events, not listed.")
        if self._undelivered:
            lines.append(
                f"{self._undelivered} earlier error events were dropped because their "
                "alert mail could not be sent."
            )
            self._undelivered = 0
        msg.set_content("\n".join(lines) + "\n")
        return msg.as_bytes()

    # -- lifecycle ------------------------------------------------------------

    def pending(self) -> int:
        """
        Events waiting for the next mail.
        """
        return len(self._events) + self._overflow

    def stop(self) -> Deferred[None]:
        """
        Send what is waiting now (once, within ``timeout``) and stop
        collecting; the Deferred fires when that is done, whatever the
        outcome, and no delayed call is left behind.
        """
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waits: List[Deferred[Any]] = []
        if self._in_flight is not None:
            waits.append(self._in_flight)
        events, overflow = self._take_batch()
        if events or overflow:
            if self._in_flight is None:
                waits.append(self._send(events, overflow))
            else:
                self.dropped["shutdown"] += len(events) + overflow
        if not waits:
            return succeed(None)
        finished: Deferred[None] = Deferred()
        remaining = [len(waits)]

        def one_done(_: Any) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                finished.callback(None)

        for d in waits:
            # Each has its own deadline; ``done`` swallowed its outcome.
            d.addBoth(one_done)
        return finished

    def stats(self) -> Dict[str, Any]:
        """
        The counters, for metrics.
        """
        return {
            "received": self.received,
            "sent": self.sent,
            "failed": self.failed,
            "dropped": dict(self.dropped),
            "pending": self.pending(),
        }
