"""
Command lines shared by scenarios: a Python server script, and ``twistd``
(optionally under a profiler, when `Context.profile` asks for it).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Type, TypeVar

from benchlib.harness import SERVERS, Context
from benchlib.wrk import WrkDriver


def python_script(context: Context, script: str, *args: str) -> List[str]:
    """
    ``python bench/servers/<script> args...``, under cProfile when profiling.
    """
    argv = [context.python]
    if context.profile is not None:
        argv += ["-m", "cProfile", "-o", str(context.profile[1])]
    return argv + [str(SERVERS / script), *args]


def twistd(context: Context, logfile: str, *args: str) -> List[str]:
    """
    ``twistd -n --pidfile= --logfile=WORKDIR/<logfile> args...`` exactly as
    the ``twistd`` console script runs it, under the chosen interpreter.
    (Never log to /dev/null: twistd's log file rotates by renaming.)
    """
    argv = [
        context.python,
        str(SERVERS / "twistd.py"),
        "-n",
        "--pidfile=",
        f"--logfile={context.workdir / logfile}",
    ]
    if context.profile is not None:
        argv += [f"--profile={context.profile[1]}", "--profiler=cprofile", "--savestats"]
    return argv + list(args)


def expect_json(
    want: object, content_type: str = "application/json"
) -> Callable[[int, Dict[str, str], bytes], Optional[str]]:
    """
    An `benchlib.wrk.Expect` for a 200 answer whose JSON body is ``want``.
    """

    def expect(status: int, headers: Dict[str, str], body: bytes) -> Optional[str]:
        if status != 200:
            return f"status {status}, body {body[:200]!r}"
        got_type = headers.get("content-type", "")
        if not got_type.startswith(content_type):
            return f"content-type {got_type!r}, not {content_type}"
        try:
            value = json.loads(body)
        except ValueError:
            return f"body is not JSON: {body[:200]!r}"
        if value != want:
            return f"body {value!r}, not {want!r}"
        return None

    return expect


D = TypeVar("D", bound=WrkDriver)


def api_driver(cls: Type[D], options: Any, body: str, answer: object, **extra: Any) -> D:
    """
    A ``cls`` driver (a `WrkDriver`) that POSTs the JSON ``body`` to
    ``/api`` and expects the JSON ``answer``, with the command line's
    connection, thread, core and niceness options; ``extra`` fields on top.
    """
    return cls(
        path="/api",
        method="POST",
        body=body,
        headers=["Content-Type: application/json"],
        expect=expect_json(answer),
        connections=options.connections,
        threads=options.threads,
        client_core=options.client_core,
        nice=options.nice,
        **extra,
    )
