"""
Sinks: where redacted log events are written, and in which format.

A sink receives events that the pipeline has already redacted and filtered
by level; it only formats and writes.  The formats:

- **text**: one line per event (plus the traceback of a failure), like
  Twisted's classic log format, with the request id after the system::

      2026-11-22T10:00:00.123+0000 [twistauth.web#info] [req 1f0c...] login ok

- **json**: JSON lines, one object per event::

      {"time": "2026-11-22T10:00:00.123Z", "level": "info",
       "namespace": "twistauth.web", "message": "login ok",
       "request_id": "1f0c...", "user": "bob"}

  with ``"failure": {"type", "message", "traceback"}`` when the event
  carries one.  Fields whose names clash with these keys are written as
  ``field_<name>``.

Files rotate by size and keep a number of old files
(`twisted.python.logfile.LogFile`).
"""

from __future__ import annotations

import json
import threading
import time as _time
from typing import IO, Any, Callable, Dict, List, Optional

from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.python.reflect import qual

#: Levels in rising order; the pipeline compares these numbers.
LEVELS: Dict[str, int] = {"debug": 0, "info": 1, "warn": 2, "error": 3, "critical": 4}
_LEVEL_ALIASES = {"warning": "warn", "fatal": "critical", "err": "error"}
LEVEL_OF: Dict[Any, int] = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}
_NAMES = {number: name for name, number in LEVELS.items()}


def parse_level(text: str) -> int:
    """
    The number of a level name (``debug``, ``info``, ``warn``/``warning``,
    ``error``, ``critical``).

    :raises ValueError: for any other name.
    """
    name = _LEVEL_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in LEVELS:
        raise ValueError(
            f"expected a log level (debug, info, warn, error, critical), got {text!r}"
        )
    return LEVELS[name]


def level_name(event: LogEvent) -> str:
    """
    The event's level as a lower-case name.
    """
    return _NAMES.get(LEVEL_OF.get(event.get("log_level"), 1), "info")


_RESERVED = frozenset({"time", "level", "namespace", "message", "request_id", "failure"})


_second: List[Any] = [None, ""]


def _iso_time(when: Optional[float], utc_suffix: str = "Z") -> str:
    """
    ISO 8601 UTC time with milliseconds; the formatted second is cached.
    """
    if when is None:
        return "-"
    seconds = int(when)
    cached = _second
    if cached[0] != seconds:
        cached[1] = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds))
        cached[0] = seconds
    millis = int((when - seconds) * 1000)
    return f"{cached[1]}.{millis:03d}{utc_suffix}"


def format_text(event: LogEvent) -> str:
    """
    One redacted event as text: a line, then the failure's traceback if any.
    """
    system = event.get("log_system")
    if not isinstance(system, str):
        system = f"{event.get('log_namespace', '-')}#{level_name(event)}"
    request_id = event.get("request_id")
    prefix = f"[req {request_id}] " if request_id else ""
    message = event.get("log_text")
    if not isinstance(message, str):
        message = str(event.get("log_format") or "")
    text = f"{_iso_time(event.get('log_time'), '+0000')} [{system}] {prefix}{message}"
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text = text + "\n" + failure.getTraceback().rstrip("\n")
    # Continuation lines are indented, so a message cannot forge a line.
    return text.replace("\r", "\\r").replace("\n", "\n\t") + "\n"


def event_as_dict(event: LogEvent) -> Dict[str, Any]:
    """
    One redacted event as the JSON object `format_json` writes.
    """
    out: Dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": level_name(event),
        "namespace": event.get("log_namespace", "-"),
        "message": event.get("log_text", ""),
    }
    request_id = event.get("request_id")
    if request_id:
        out["request_id"] = request_id
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["failure"] = {
            "type": qual(failure.type) if isinstance(failure.type, type) else str(failure.type),
            "message": failure.getErrorMessage(),
            "traceback": failure.getTraceback(),
        }
    for name, value in event.items():
        if name.startswith("log_") or name == "request_id":
            continue
        out["field_" + name if name in _RESERVED else name] = value
    return out


def format_json(event: LogEvent) -> str:
    """
    One redacted event as a JSON line.
    """
    return json.dumps(event_as_dict(event), default=str, separators=(",", ":")) + "\n"


FORMATS: Dict[str, Callable[[LogEvent], str]] = {"text": format_text, "json": format_json}


class StreamSink:
    """
    Writes formatted events to an open text stream (stdout, stderr).

    :ivar level: the lowest level written.
    """

    def __init__(
        self,
        *,
        name: str,
        stream: IO[str],
        formatter: Callable[[LogEvent], str],
        level: int,
    ) -> None:
        self.name = name
        self.level = level
        self._stream = stream
        self._format = formatter
        self._lock = threading.Lock()

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        with self._lock:
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        """
        Streams belong to the process: nothing to close.
        """

    def reopen(self) -> None:
        """
        Nothing to reopen.
        """


class FileSink:
    """
    Writes formatted events to a file that rotates by size.

    :ivar path: the file's path.
    :ivar level: the lowest level written.
    """

    def __init__(
        self,
        *,
        name: str,
        logfile: LogFile,
        formatter: Callable[[LogEvent], str],
        level: int,
    ) -> None:
        self.name = name
        self.level = level
        self.path = logfile.path
        self._file = logfile
        self._format = formatter
        self._lock = threading.Lock()

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        with self._lock:
            if not self._file.closed:
                self._file.write(text)

    def close(self) -> None:
        """
        Close the file; later events are not written.
        """
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def reopen(self) -> None:
        """
        Reopen the file (after an external tool moved it).
        """
        with self._lock:
            if not self._file.closed:
                self._file.reopen()
