"""
The logging pipeline: one redaction filter in front of every observer, and
the start-up wiring that builds it from plain values.

`LogPipeline` is the single `twisted.logger.ILogObserver` twistauth gives to
the logging system.  For each event it checks the level (cheaply, so
debug events cost almost nothing when nobody wants them), makes **one**
redacted copy (`Redactor`), and hands that copy to each sink whose own
level admits it.  No sink ever sees the original event.

Observers are described by short strings, in the style of Twisted's
endpoint descriptions (``:`` separates, ``\\:`` escapes)::

    text                                  text lines on stdout, default level
    text:stream=stderr:level=warn
    json                                  JSON lines on stdout
    file:/var/log/twistauth/app.log       text, rotated at 10 MiB, 5 kept
    file:path=/var/log/ta.jsonl:format=json:max_bytes=50M:count=10:level=debug
    smtp                                  alert mail (level error unless given)

`build_logging` turns such strings (and the alert-mail settings) into a
`LoggingSetup`: the pipeline, the alert observer if any, and a service
that flushes pending alerts at shutdown.  A log file that cannot be opened
raises `LogSetupError` naming the path, before anything starts.

With ``twistd``, offer the pipeline to the application
(`offer_twistd_observer`): twistd then logs *only* through it (its own
``--logfile`` observer is not installed), unless ``--logger`` was given.
A program that embeds twistauth adds `LoggingSetup.service` to its service
tree with ``publisher=globalLogPublisher``, or wraps its own observers with
`Redactor.wrap`.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, LogEvent, LogPublisher
from twisted.python.logfile import LogFile
from zope.interface import implementer

from twistauth.observe._access import AccessLog
from twistauth.observe._alerts import AlertObserver, SMTPMailSender
from twistauth.observe._interfaces import IMailSender
from twistauth.observe._redact import Redactor
from twistauth.observe._sinks import (
    FORMATS,
    LEVEL_OF,
    LEVELS,
    FileSink,
    StreamSink,
    parse_level,
)


class LogSetupError(ValueError):
    """
    The logging configuration cannot be used: a bad observer description,
    a log file that cannot be opened (the message names the path), or alert
    settings that are missing.
    """


# ---------------------------------------------------------------------------
# Observer descriptions.

_KINDS = ("text", "json", "file", "smtp")
_OPTIONS = {
    "text": ("stream", "level"),
    "json": ("stream", "level"),
    "file": ("path", "format", "max_bytes", "count", "level", "mode"),
    "smtp": ("level",),
}
_FIRST_POSITIONAL = {"text": "stream", "json": "stream", "file": "path"}


@attr.s(frozen=True, kw_only=True)
class ObserverSpec:
    """
    One observer, parsed from its description by `parse_observer_spec`.

    :ivar kind: ``"text"``, ``"json"``, ``"file"`` or ``"smtp"``.
    :ivar level: the lowest level it receives, or ``None`` for the default
        (``error`` for smtp, else the pipeline's default level).
    :ivar stream: ``"stdout"`` or ``"stderr"`` (text, json).
    :ivar path: the log file (file).
    :ivar format: ``"text"`` or ``"json"`` (file).
    :ivar max_bytes: the file is rotated when it reaches this size.
    :ivar count: rotated files kept (``app.log.1`` ... ``app.log.N``).
    :ivar mode: permissions of a new log file.
    """

    kind: str = attr.ib()
    level: Optional[str] = attr.ib(default=None)
    stream: str = attr.ib(default="stdout")
    path: Optional[str] = attr.ib(default=None)
    format: str = attr.ib(default="text")
    max_bytes: int = attr.ib(default=10 * 1024 * 1024)
    count: int = attr.ib(default=5)
    mode: int = attr.ib(default=0o640)

    @property
    def name(self) -> str:
        """
        How `LogPipeline.set_level` names this observer: the kind, plus the
        path of a file.
        """
        return f"file:{self.path}" if self.kind == "file" else self.kind


def _split(text: str) -> List[str]:
    """
    Split at ``:`` except where escaped as ``\\:``.
    """
    parts, current, escaped = [], [], False
    for c in text:
        if escaped:
            current.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower().rstrip("ib").rstrip("b") if text else text
    factor = 1
    if text and text[-1] in units:
        factor = units[text[-1]]
        text = text[:-1]
    value = int(text) * factor
    if value < 1024:
        raise ValueError("max_bytes must be at least 1024 (1K)")
    return value


def parse_observer_spec(text: str) -> ObserverSpec:
    """
    Parse one observer description (see the module docstring).

    :raises ValueError: with a message saying what is allowed.
    """
    parts = _split(text.strip())
    kind = parts[0].strip().lower()
    if kind not in _KINDS:
        raise ValueError(
            f"unknown log observer {parts[0]!r} in {text!r}: expected one of "
            f"{', '.join(_KINDS)}, e.g. 'file:/var/log/twistauth.log:level=info'"
        )
    values: Dict[str, Any] = {"kind": kind}
    allowed = _OPTIONS[kind]
    for i, part in enumerate(parts[1:]):
        name, sep, value = part.partition("=")
        if not sep:
            if i == 0 and kind in _FIRST_POSITIONAL:
                name, value = _FIRST_POSITIONAL[kind], part
            else:
                raise ValueError(
                    f"expected name=value in log observer {text!r}, got {part!r} "
                    f"(options for {kind}: {', '.join(allowed)})"
                )
        name = name.strip().lower()
        if name not in allowed:
            raise ValueError(
                f"log observer {kind!r} has no option {name!r} in {text!r} "
                f"(options: {', '.join(allowed)})"
            )
        try:
            if name == "level":
                parse_level(value)
                values["level"] = value.strip().lower()
            elif name == "stream":
                if value not in ("stdout", "stderr"):
                    raise ValueError(f"stream must be stdout or stderr, got {value!r}")
                values["stream"] = value
            elif name == "format":
                if value not in FORMATS:
                    raise ValueError(f"format must be text or json, got {value!r}")
                values["format"] = value
            elif name == "max_bytes":
                values["max_bytes"] = _size(value)
            elif name == "count":
                count = int(value)
                if not 1 <= count <= 1000:
                    raise ValueError(f"count must be from 1 to 1000, got {count}")
                values["count"] = count
            elif name == "mode":
                values["mode"] = int(value, 8)
            else:
                if not value:
                    raise ValueError("path is empty")
                values["path"] = value
        except ValueError as e:
            raise ValueError(f"bad {name} in log observer {text!r}: {e}") from None
    if kind == "file" and not values.get("path"):
        raise ValueError(
            f"log observer {text!r} needs a path, e.g. 'file:/var/log/twistauth.log'"
        )
    return ObserverSpec(**values)


def check_observer_spec(text: str) -> str:
    """
    Validate one description and return it unchanged: the item check for a
    list-of-strings setting.

    :raises ValueError: as `parse_observer_spec`.
    """
    parse_observer_spec(text)
    return text


# ---------------------------------------------------------------------------
# Alert settings.


@attr.s(frozen=True, kw_only=True)
class AlertSettings:
    """
    Where and how alert mail is sent; see `AlertObserver` and
    `SMTPMailSender` for each value's meaning.
    """

    host: Optional[str] = attr.ib(default=None)
    port: int = attr.ib(default=25)
    tls: str = attr.ib(default="none")
    username: Optional[str] = attr.ib(default=None)
    password: Optional[str] = attr.ib(default=None, repr=False)
    ca_file: Optional[str] = attr.ib(default=None)
    from_address: Optional[str] = attr.ib(default=None)
    to_addresses: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    subject: str = attr.ib(default="twistauth alert")
    batch_delay: float = attr.ib(default=30.0)
    min_interval: float = attr.ib(default=300.0)
    max_events: int = attr.ib(default=50)
    timeout: float = attr.ib(default=30.0)


# ---------------------------------------------------------------------------
# The pipeline.

Sink = Union[StreamSink, FileSink, "_AlertSink"]


class _AlertSink:
    """
    Adapts an `AlertObserver` to the pipeline's sink protocol.
    """

    def __init__(self, *, observer: AlertObserver, level: int) -> None:
        self.name = "smtp"
        self.level = level
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        self.observer(event)

    def close(self) -> None:
        """
        Nothing to close: `AlertObserver.stop` is the service's job.
        """

    def reopen(self) -> None:
        """
        Nothing to reopen.
        """


@implementer(ILogObserver)
class LogPipeline:
    """
    The one observer twistauth logs through: level check, one redaction,
    then every sink whose level admits the event.

    :ivar counts: events seen, by level name (before the level check).
    :ivar sink_errors: times a sink raised (the event is dropped for that
        sink; nothing is logged about it, to avoid a loop), or an event
        could not be redacted (the sinks get a line saying so instead).
    """

    def __init__(
        self,
        *,
        sinks: Sequence[Any],
        redactor: Optional[Redactor] = None,
        default_level_sinks: Sequence[Any] = (),
    ) -> None:
        """
        :param sinks: where redacted events go.
        :param redactor: the redaction filter (default: `Redactor()`).
        :param default_level_sinks: the sinks whose level is the default
            level (their description named none): `set_default_level`
            changes those.
        """
        self.sinks: Tuple[Any, ...] = tuple(sinks)
        self.default_level_sinks: Tuple[Any, ...] = tuple(default_level_sinks)
        self.redactor = redactor if redactor is not None else Redactor()
        self.counts: Dict[str, int] = {name: 0 for name in LEVELS}
        self.sink_errors = 0
        self._names = {number: name for name, number in LEVELS.items()}
        self._refresh()

    def _refresh(self) -> None:
        self._lowest = min((sink.level for sink in self.sinks), default=len(LEVELS))

    def __call__(self, event: LogEvent) -> None:
        level = LEVEL_OF.get(event.get("log_level"), 1)
        self.counts[self._names[level]] += 1
        if level < self._lowest:
            return
        try:
            redacted = self.redactor.redact_event(event)
        except Exception as e:
            # Never let an event through unredacted; say that one was lost.
            self.sink_errors += 1
            text = f"a log event could not be redacted and was dropped ({type(e).__name__})"
            redacted = {
                "log_level": event.get("log_level"),
                "log_namespace": "twistauth.observe",
                "log_time": event.get("log_time"),
                "log_text": text,
                "log_format": text,
            }
        for sink in self.sinks:
            if level >= sink.level:
                try:
                    sink(redacted)
                except Exception:
                    self.sink_errors += 1

    def set_level(self, level: str, sink: Optional[str] = None) -> None:
        """
        Change the level of one sink (by `ObserverSpec.name`), or of all:
        for a reload on SIGHUP.

        :raises ValueError: for an unknown level or sink name.
        """
        number = parse_level(level)
        chosen = [s for s in self.sinks if sink is None or s.name == sink]
        if not chosen:
            raise ValueError(
                f"no log observer named {sink!r}; there are: "
                f"{', '.join(s.name for s in self.sinks)}"
            )
        for s in chosen:
            s.level = number
        self._refresh()

    def set_default_level(self, level: str) -> None:
        """
        Change the level of the sinks that follow the default level (those
        whose description named no level of its own): the ``log_level``
        setting's reload on SIGHUP.

        :raises ValueError: for an unknown level.
        """
        number = parse_level(level)
        for sink in self.default_level_sinks:
            sink.level = number
        self._refresh()

    def lowest_level(self) -> int:
        """
        The lowest level any sink takes (events below it are dropped at once).
        """
        return self._lowest

    def reopen(self) -> None:
        """
        Reopen every log file (after logrotate moved them).
        """
        for sink in self.sinks:
            sink.reopen()

    def close(self) -> None:
        """
        Close every log file.
        """
        for sink in self.sinks:
            sink.close()


def _open_log_file(spec: ObserverSpec) -> LogFile:
    path = os.path.abspath(spec.path or "")
    try:
        return LogFile(
            os.path.basename(path),
            os.path.dirname(path),
            rotateLength=spec.max_bytes,
            maxRotatedFiles=spec.count,
            defaultMode=spec.mode,
        )
    except OSError as e:
        raise LogSetupError(
            f"cannot open the log file {path!r} for writing: {e.strerror or e}"
        ) from None


def check_log_files(observers: Sequence[Union[str, ObserverSpec]]) -> None:
    """
    Check every description and that every log file can be opened for
    writing, without keeping anything open and without a reactor: for
    option parsing (``twistd``'s ``postOptions``), so a bad path stops the
    program before it starts.

    :raises LogSetupError: as `build_logging` would.
    """
    for item in observers:
        try:
            spec = item if isinstance(item, ObserverSpec) else parse_observer_spec(item)
        except ValueError as e:
            raise LogSetupError(str(e)) from None
        if spec.kind == "file":
            _open_log_file(spec).close()


def build_access_log(
    description: Optional[str],
    *,
    clock: Any,
    streams: Optional[Mapping[str, IO[str]]] = None,
    flush_interval: float = 1.0,
) -> Optional[AccessLog]:
    """
    The access log a description asks for (the same descriptions as the
    observers': ``text``, ``json``, ``file:PATH:format=json:max_bytes=...``),
    or ``None`` for ``None``, ``""`` or ``"none"``.  Add it to the service
    tree (it flushes on a timer) and call `AccessLog.log` once per request.

    :raises LogSetupError: for a bad description or a file that cannot be
        opened (naming the path).
    """
    if not description or description.strip().lower() == "none":
        return None
    try:
        spec = parse_observer_spec(description)
    except ValueError as e:
        raise LogSetupError(f"bad access log: {e}") from None
    if spec.kind == "smtp":
        raise LogSetupError("the access log goes to text, json or file, not smtp")
    if spec.kind == "file":
        return AccessLog(
            target=_open_log_file(spec),
            clock=clock,
            format=spec.format,
            flush_interval=flush_interval,
        )
    chosen = dict(streams or {})
    stream = chosen.get(spec.stream) or (
        sys.__stdout__ if spec.stream == "stdout" else sys.__stderr__
    )
    assert stream is not None
    return AccessLog(target=stream, clock=clock, format=spec.kind, flush_interval=flush_interval)


@attr.s(frozen=True, kw_only=True)
class LoggingSetup:
    """
    What `build_logging` made.

    :ivar observer: the pipeline: the one observer to log through.
    :ivar alerts: the alert-mail observer, if configured (for its counters).
    """

    observer: LogPipeline = attr.ib()
    alerts: Optional[AlertObserver] = attr.ib(default=None)

    def service(self, publisher: Optional[LogPublisher] = None) -> LoggingService:
        """
        A service that sends pending alerts when it stops; with
        ``publisher``, it also adds the pipeline to it while running.
        """
        return LoggingService(self.observer, alerts=self.alerts, publisher=publisher)


def build_logging(
    observers: Sequence[Union[str, ObserverSpec]],
    *,
    default_level: str = "info",
    alerts: Optional[AlertSettings] = None,
    reactor: Any = None,
    clock: Any = None,
    mail_sender: Optional[IMailSender] = None,
    redactor: Optional[Redactor] = None,
    streams: Optional[Mapping[str, IO[str]]] = None,
) -> LoggingSetup:
    """
    Build the logging pipeline from plain values.

    :param observers: observer descriptions (or parsed specs).
    :param default_level: the level of observers that name none.
    :param alerts: the alert-mail settings; needed if an ``smtp`` observer
        is listed.
    :param reactor: connects to the mail server and takes log events from
        other threads; needed for ``smtp`` unless ``mail_sender`` is given.
    :param clock: the alert batches' clock (default: ``reactor``).
    :param mail_sender: sends alert mail instead of an `SMTPMailSender`
        (tests).
    :param redactor: the redaction filter (default: `Redactor()`).
    :param streams: ``{"stdout": ..., "stderr": ...}`` to write to instead
        of the process's original standard streams.
    :raises LogSetupError: for a bad description, a log file that cannot be
        opened (naming the path), or missing alert settings.
    """
    try:
        default = parse_level(default_level)
    except ValueError as e:
        raise LogSetupError(f"bad log level: {e}") from None
    specs: List[ObserverSpec] = []
    for item in observers:
        if isinstance(item, ObserverSpec):
            specs.append(item)
            continue
        try:
            specs.append(parse_observer_spec(item))
        except ValueError as e:
            raise LogSetupError(str(e)) from None
    chosen_streams: Dict[str, IO[str]] = {
        "stdout": sys.__stdout__ or sys.stdout,
        "stderr": sys.__stderr__ or sys.stderr,
    }
    if streams:
        chosen_streams.update(streams)
    sinks: List[Any] = []
    defaults: List[Any] = []
    opened: List[FileSink] = []
    alert_observer: Optional[AlertObserver] = None
    try:
        for spec in specs:
            level = parse_level(spec.level) if spec.level else default
            if spec.kind in ("text", "json"):
                sinks.append(
                    StreamSink(
                        name=spec.name,
                        stream=chosen_streams[spec.stream],
                        formatter=FORMATS[spec.kind],
                        level=level,
                    )
                )
                if not spec.level:
                    defaults.append(sinks[-1])
            elif spec.kind == "file":
                sink = FileSink(
                    name=spec.name,
                    logfile=_open_log_file(spec),
                    formatter=FORMATS[spec.format],
                    level=level,
                )
                opened.append(sink)
                sinks.append(sink)
                if not spec.level:
                    defaults.append(sink)
            else:
                if alert_observer is not None:
                    raise LogSetupError("the smtp log observer is listed twice")
                alert_observer = _alert_observer(
                    alerts, reactor=reactor, clock=clock, mail_sender=mail_sender
                )
                level = parse_level(spec.level) if spec.level else LEVELS["error"]
                sinks.append(_AlertSink(observer=alert_observer, level=level))
    except BaseException:
        for sink in opened:
            sink.close()
        raise
    return LoggingSetup(
        observer=LogPipeline(sinks=sinks, redactor=redactor, default_level_sinks=defaults),
        alerts=alert_observer,
    )


def _alert_observer(
    alerts: Optional[AlertSettings],
    *,
    reactor: Any,
    clock: Any,
    mail_sender: Optional[IMailSender],
) -> AlertObserver:
    missing = []
    if alerts is None or not alerts.from_address:
        missing.append("alert_from")
    if alerts is None or not alerts.to_addresses:
        missing.append("alert_to")
    if mail_sender is None and (alerts is None or not alerts.host):
        missing.append("alert_smtp_host")
    if missing:
        raise LogSetupError(
            "the smtp log observer needs these settings: " + ", ".join(missing)
        )
    assert alerts is not None
    if mail_sender is None:
        if reactor is None:
            raise LogSetupError("the smtp log observer needs a reactor")
        try:
            mail_sender = SMTPMailSender(
                reactor=reactor,
                host=alerts.host or "",
                port=alerts.port,
                tls=alerts.tls,
                username=alerts.username,
                password=alerts.password,
                ca_file=alerts.ca_file,
                timeout=alerts.timeout,
            )
        except ValueError as e:
            raise LogSetupError(f"bad alert_smtp_tls: {e}") from None
        if alerts.ca_file and not os.access(alerts.ca_file, os.R_OK):
            raise LogSetupError(f"cannot read the alert CA file {alerts.ca_file!r}")
    try:
        return AlertObserver(
            sender=mail_sender,
            clock=clock if clock is not None else reactor,
            reactor=reactor,
            from_address=alerts.from_address or "",
            to_addresses=alerts.to_addresses,
            subject=alerts.subject,
            batch_delay=alerts.batch_delay,
            min_interval=alerts.min_interval,
            max_events=alerts.max_events,
            timeout=alerts.timeout,
        )
    except ValueError as e:
        raise LogSetupError(f"bad alert address: {e}") from None


_SETTING_DEFAULTS: Dict[str, Any] = {
    "log_observers": ("text",),
    "log_level": "info",
    "alert_smtp_host": None,
    "alert_smtp_port": 25,
    "alert_smtp_tls": "none",
    "alert_smtp_username": None,
    "alert_smtp_password": None,
    "alert_smtp_ca_file": None,
    "alert_from": None,
    "alert_to": (),
    "alert_subject": "twistauth alert",
    "alert_batch_delay": 30.0,
    "alert_min_interval": 300.0,
    "alert_max_events": 50,
    "alert_timeout": 30.0,
}


def logging_from_settings(settings: Any, *, reactor: Any, **overrides: Any) -> LoggingSetup:
    """
    `build_logging` from a `twistauth.settings.Settings` (keys missing from
    it take the defaults in ``_SETTING_DEFAULTS``).

    :param overrides: passed on to `build_logging` (``streams``,
        ``mail_sender``, ``clock``).
    """

    def get(key: str) -> Any:
        return getattr(settings, key, _SETTING_DEFAULTS[key])

    password = get("alert_smtp_password")
    if isinstance(password, bytes):
        password = password.decode("utf-8")
    alerts = AlertSettings(
        host=get("alert_smtp_host"),
        port=get("alert_smtp_port"),
        tls=get("alert_smtp_tls"),
        username=get("alert_smtp_username"),
        password=password,
        ca_file=get("alert_smtp_ca_file"),
        from_address=get("alert_from"),
        to_addresses=tuple(get("alert_to")),
        subject=get("alert_subject"),
        batch_delay=get("alert_batch_delay"),
        min_interval=get("alert_min_interval"),
        max_events=get("alert_max_events"),
        timeout=get("alert_timeout"),
    )
    return build_logging(
        get("log_observers"),
        default_level=get("log_level"),
        alerts=alerts,
        reactor=reactor,
        **overrides,
    )


# ---------------------------------------------------------------------------
# Services and twistd.


class LoggingService(Service):
    """
    Runs the pipeline's alert observer: at stop, pending alerts are sent
    (within the alert timeout).  With a ``publisher``, the pipeline is added
    to it at start and removed after stop.
    """

    name = "twistauth-logging"

    def __init__(
        self,
        pipeline: LogPipeline,
        *,
        alerts: Optional[AlertObserver] = None,
        publisher: Optional[LogPublisher] = None,
    ) -> None:
        self.pipeline = pipeline
        self.alerts = alerts
        self.publisher = publisher

    def startService(self) -> None:
        super().startService()
        if self.publisher is not None:
            self.publisher.addObserver(self.pipeline)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d: Deferred[None] = self.alerts.stop() if self.alerts is not None else succeed(None)

        def detach(result: Any) -> Any:
            if self.publisher is not None:
                self.publisher.removeObserver(self.pipeline)
            return result

        return d.addBoth(detach)


def offer_twistd_observer(parent: Any, observer: Callable[[LogEvent], None]) -> bool:
    """
    Make ``observer`` twistd's log observer, if ``parent`` is twistd's
    application and no other observer was chosen.

    twistd asks the application for an ``ILogObserver`` component after
    ``makeService`` and before it starts logging; when it finds one, it
    logs only through it (its own ``--logfile``/stdout observer is not
    installed), so every line twistd and Twisted write is redacted too.
    ``twistd --logger`` still wins.  Call this from the top service's
    ``setServiceParent``.

    :return: whether the observer was installed.
    """
    get = getattr(parent, "getComponent", None)
    if get is None or get(ILogObserver, None) is not None:
        return False
    parent.setComponent(ILogObserver, observer)
    return True
