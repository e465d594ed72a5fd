"""
Helpers shared by the operations tests (this module holds no tests): an
app with cheap password hashing whose background services run, every log
observer kind at once, and a capture of the global log publisher.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twistauth.observe import AlertSettings, LoggingSetup, MemoryMailSender, build_logging

#: The cheapest argon2 the settings allow (tests only).
CHEAP_ARGON2: Dict[str, Any] = {
    "argon2_memory_cost": 8192,
    "argon2_time_cost": 1,
    "argon2_parallelism": 1,
}

PASSWORD = "correct horse battery staple"


@contextmanager
def captured_events() -> Iterator[List[Dict[str, Any]]]:
    """
    Every event the global log publisher sees inside the block.
    """
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def start_background(app: Any) -> Any:
    """
    Start the app's background services; return a function that stops
    them (a Deferred).
    """
    for service in app.background:
        service.startService()

    def stop() -> Any:
        return DeferredList([maybeDeferred(s.stopService) for s in reversed(app.background)])

    return stop


class EveryObserver:
    """
    One pipeline with every observer kind, all at debug level: text and
    JSON lines on private streams, a text file and a JSON-lines file, and
    alert mail (to a recording sender, on a `Clock`).
    """

    def __init__(self, directory: Path) -> None:
        self.streams = {"stdout": io.StringIO(), "stderr": io.StringIO()}
        self.text_file = directory / "app.log"
        self.json_file = directory / "app.jsonl"
        self.mail = MemoryMailSender()
        self.clock = Clock()
        self.setup: LoggingSetup = build_logging(
            [
                "text:level=debug",
                "json:stream=stderr:level=debug",
                f"file:{self.text_file}:level=debug",
                f"file:{self.json_file}:format=json:level=debug",
                "smtp:level=debug",
            ],
            alerts=AlertSettings(
                from_address="twistauth@example.org",
                to_addresses=("ops@example.org",),
                max_events=10_000,
            ),
            mail_sender=self.mail,
            clock=self.clock,
            streams=self.streams,
        )

    def __enter__(self) -> EveryObserver:
        globalLogPublisher.addObserver(self.setup.observer)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.setup.observer)
        assert self.setup.alerts is not None
        self.setup.alerts.stop()  # the recording sender answers at once
        self.setup.observer.close()

    def outputs(self) -> Dict[str, str]:
        """
        What each observer wrote, by observer.
        """
        return {
            "text": self.streams["stdout"].getvalue(),
            "json": self.streams["stderr"].getvalue(),
            "file": self.text_file.read_text(),
            "file-json": self.json_file.read_text(),
            "smtp": "\n".join(m.decode("utf-8", "replace") for _, _, m in self.mail.sent),
        }


def metric_samples(text: str) -> Dict[Any, float]:
    """
    A Prometheus exposition parsed with ``prometheus_client``'s parser:
    ``{(sample name, ((label, value), ...)): value}``.
    """
    samples: Dict[Any, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: Dict[Any, float], name: str, **labels: str) -> Optional[float]:
    """
    One sample's value, or ``None``.
    """
    return samples.get((name, tuple(sorted(labels.items()))))


def json_lines(text: str) -> List[Dict[str, Any]]:
    """
    Every line of a JSON-lines text, parsed (each must parse).
    """
    return [json.loads(line) for line in text.splitlines() if line.strip()]
