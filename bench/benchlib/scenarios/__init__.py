"""
The scenarios ``bench/run.py`` knows, by name.

Each module has ``build(options) -> Scenario`` (``options`` is the parsed
command line: ``connections``, ``client_core`` ...).  To add one, write the
module and name it in `SCENARIOS`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from benchlib.harness import Scenario
from benchlib.scenarios import cached, echo, sessions, workers

SCENARIOS: Dict[str, Callable[[Any], Scenario]] = {
    "echo": echo.build,
    "sessions": sessions.build,
    "cached": cached.build,
    "workers": workers.build,
}
