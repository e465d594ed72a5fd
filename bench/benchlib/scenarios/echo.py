"""
The JSON-method echo (issue 2): ``POST /api`` with
``{"method":"echo","parameters":{"x":1}}`` answers ``{"result":{"x":1}}``
as ``application/json``, on every server.

The floor is bare twisted.web served by
``Site(root, parsePOSTFormSubmission=False)``; twistauth is started the way
users start it, ``twistd -n twistauth --listen ...``, on its defaults (no
access log), with ``--access-log FILE``, and (outside the default set) with
``--access-log -``, which sends each line through twisted.logger.
"""

from __future__ import annotations

from typing import Any

from benchlib.harness import Scenario, ServerSpec
from benchlib.scenarios._commands import api_driver, python_script, twistd
from benchlib.wrk import WrkDriver

BODY = '{"method":"echo","parameters":{"x":1}}'
ANSWER = {"result": {"x": 1}}
FLOOR = "twisted-web-tuned"


def _listen(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


SERVER_SPECS = [
    ServerSpec(
        name=FLOOR,
        label="bare twisted.web, Site(parsePOSTFormSubmission=False) (floor)",
        command=lambda c, port: python_script(c, "twisted_web.py", "--port", str(port), "--tuned"),
        modules=("twisted.web",),
    ),
    ServerSpec(
        name="twisted-web",
        label="bare twisted.web, default Site",
        command=lambda c, port: python_script(c, "twisted_web.py", "--port", str(port)),
        modules=("twisted.web",),
    ),
    ServerSpec(
        name="twisted-web-tuned-no-access-log",
        label="bare twisted.web, tuned Site, Site.log a no-op",
        command=lambda c, port: python_script(
            c, "twisted_web.py", "--port", str(port), "--tuned", "--no-access-log"
        ),
        modules=("twisted.web",),
        default=False,
    ),
    ServerSpec(
        name="twisted-web-tuned-access-file",
        label="bare twisted.web, tuned Site, Site(logPath=FILE)",
        command=lambda c, port: python_script(
            c, "twisted_web.py", "--port", str(port), "--tuned",
            "--access-log-file", str(c.workdir / "twisted-web-access.log"),
        ),  # fmt: skip
        modules=("twisted.web",),
        logs_to=lambda c: c.workdir / "twisted-web-access.log",
        default=False,
    ),
    ServerSpec(
        name="twisted-web-tuned-access-buffered",
        label="bare twisted.web, tuned Site, logPath=FILE block-buffered",
        command=lambda c, port: python_script(
            c, "twisted_web.py", "--port", str(port), "--tuned", "--buffered",
            "--access-log-file", str(c.workdir / "twisted-web-buffered.log"),
        ),  # fmt: skip
        modules=("twisted.web",),
        logs_to=lambda c: c.workdir / "twisted-web-buffered.log",
        default=False,
    ),
    ServerSpec(
        name="twistauth",
        label="twistd -n twistauth (its defaults: no access log)",
        command=lambda c, port: twistd(c, "twistauth.log", "twistauth", "--listen", _listen(port)),
        modules=("twistauth.tap", "twistauth.app"),
        logs_to=lambda c: c.workdir / "twistauth.log",
    ),
    ServerSpec(
        name="twistauth-access-file",
        label="twistd -n twistauth --access-log FILE",
        command=lambda c, port: twistd(
            c, "twistauth-access-file.log", "twistauth", "--listen", _listen(port),
            "--access-log", str(c.workdir / "twistauth-access.log"),
        ),  # fmt: skip
        modules=("twistauth.tap", "twistauth.app"),
        logs_to=lambda c: c.workdir / "twistauth-access.log",
    ),
    ServerSpec(
        name="twistauth-access-twistd",
        label="twistd -n twistauth --access-log - (through twisted.logger)",
        command=lambda c, port: twistd(
            c, "twistauth-access-twistd.log", "twistauth", "--listen", _listen(port),
            "--access-log", "-",
        ),  # fmt: skip
        modules=("twistauth.tap", "twistauth.app"),
        logs_to=lambda c: c.workdir / "twistauth-access-twistd.log",
        default=False,
    ),
    ServerSpec(
        name="klein-tuned",
        label="bare Klein route, Site(parsePOSTFormSubmission=False)",
        command=lambda c, port: python_script(c, "klein_route.py", "--port", str(port), "--tuned"),
        modules=("klein",),
    ),
    ServerSpec(
        name="klein",
        label="bare Klein route, default Site",
        command=lambda c, port: python_script(c, "klein_route.py", "--port", str(port)),
        modules=("klein",),
    ),
    ServerSpec(
        name="aiohttp",
        label="aiohttp, web.run_app defaults",
        command=lambda c, port: python_script(c, "aiohttp_app.py", "--port", str(port)),
        modules=("aiohttp",),
    ),
    ServerSpec(
        name="tornado",
        label="Tornado, asyncio loop",
        command=lambda c, port: python_script(c, "tornado_app.py", "--port", str(port)),
        modules=("tornado",),
    ),
]


def build(options: Any) -> Scenario:
    return Scenario(
        name="echo",
        title="JSON-method echo",
        servers=list(SERVER_SPECS),
        floor=FLOOR,
        driver=api_driver(WrkDriver, options, BODY, ANSWER),
        notes=[
            "twistauth targets >= 0.9x the floor (issue 2)",
            "differences under ~15% are noise on this machine",
        ],
    )
