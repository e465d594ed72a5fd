"""
A cached JSON method next to the same method uncached (issue 6).

``public.work`` does about 200 µs of CPU work per call;
``public.work_cached`` is the same function under
``@cached(ttl=60, namespace="bench")`` (``bench/servers/bench_methods.py``,
loaded with ``--method-modules``), so under load every call is a hit in the
memory method cache.  Both run in twistauth started the way users start it
(``twistd -n twistauth``), anonymously (``public.*`` is in the anonymous
ACL), next to twistauth's ``echo`` and the floor: the bare twisted.web echo
served by ``Site(root, parsePOSTFormSubmission=False)``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from benchlib.harness import SERVERS, Context, RunningServer, Scenario, ServerSpec
from benchlib.scenarios._commands import api_driver, python_script, twistd
from benchlib.wrk import Expect, WrkDriver

ECHO = '{"method":"echo","parameters":{"x":1}}'
WORK = '{"method":"public.work","parameters":{"x":1}}'
WORK_CACHED = '{"method":"public.work_cached","parameters":{"x":1}}'
FLOOR = "twisted-web-tuned"
METHODS = "twistauth.demo_methods,bench_methods"


def expect_digest(status: int, headers: Dict[str, str], body: bytes) -> Optional[str]:
    """
    A 200 JSON answer ``{"result": {"digest": <16 hex digits>}}``.
    """
    if status != 200:
        return f"status {status}, body {body[:200]!r}"
    try:
        digest = json.loads(body)["result"]["digest"]
    except (ValueError, KeyError, TypeError):
        return f"body {body[:200]!r} is not a digest"
    return None if isinstance(digest, str) and len(digest) == 16 else f"digest {digest!r}"


@dataclass
class PerServerWrkDriver(WrkDriver):
    """
    `WrkDriver` sending each server its own body (``bodies``, by server
    name; ``body`` otherwise), checked by its own ``expects``.
    """

    bodies: Dict[str, str] = field(default_factory=dict)
    expects: Dict[str, Expect] = field(default_factory=dict)

    def _for(self, server: RunningServer) -> WrkDriver:
        name = server.spec.name
        return dataclasses.replace(
            self,
            body=self.bodies.get(name, self.body),
            expect=self.expects.get(name, self.expect),
            bodies={},
            expects={},
        )

    def check(self, server: RunningServer) -> None:
        WrkDriver.check(self._for(server), server)

    def command(self, server: RunningServer, seconds: float) -> List[str]:
        return WrkDriver.command(self._for(server), server, seconds)


def _env(context: Context, port: int) -> Dict[str, str]:
    from benchlib.harness import server_env

    path = server_env(context)["PYTHONPATH"]
    return {"PYTHONPATH": str(SERVERS) + ":" + path}


def _twistauth(name: str) -> Any:
    return lambda c, port: twistd(
        c, f"{name}.log", "twistauth", "--listen", f"tcp:{port}:interface=127.0.0.1",
        f"--method-modules={METHODS}",
    )  # fmt: skip


def build(options: Any) -> Scenario:
    servers = [
        ServerSpec(
            name=FLOOR,
            label="bare twisted.web echo, Site(parsePOSTFormSubmission=False) (floor)",
            command=lambda c, port: python_script(c, "twisted_web.py", "--port", str(port), "--tuned"),
            modules=("twisted.web",),
        ),
        ServerSpec(
            name="twistauth-echo",
            label="twistd -n twistauth: echo",
            command=_twistauth("twistauth-echo"),
            modules=("twistauth.tap", "twistauth.app"),
            env=_env,
        ),
        ServerSpec(
            name="twistauth-work-cached",
            label="twistd -n twistauth: public.work_cached (@cached, memory, every call a hit)",
            command=_twistauth("twistauth-work-cached"),
            modules=("twistauth.tap", "twistauth.app", "twistauth.caching"),
            env=_env,
        ),
        ServerSpec(
            name="twistauth-work",
            label="twistd -n twistauth: public.work (~200 µs of CPU a call, uncached)",
            command=_twistauth("twistauth-work"),
            modules=("twistauth.tap", "twistauth.app"),
            env=_env,
        ),
    ]
    driver = api_driver(
        PerServerWrkDriver,
        options,
        ECHO,
        {"result": {"x": 1}},
        bodies={"twistauth-work": WORK, "twistauth-work-cached": WORK_CACHED},
        expects={"twistauth-work": expect_digest, "twistauth-work-cached": expect_digest},
    )
    return Scenario(
        name="cached",
        title="@cached JSON method vs uncached (~200 µs of work) vs echo",
        servers=servers,
        floor=FLOOR,
        driver=driver,
        notes=[
            "an uncached call costs its ~200 µs of work on top of the echo's cost; "
            "a cache hit should cost little more than the echo",
            "differences under ~15% are noise on this machine",
        ],
    )
