"""
An authenticated JSON-method call with each twistauth session cache
(issue 3): ``POST /api`` ``{"method":"echo","parameters":{"x":1}}`` sent with
a session made once per server by its ``prepare`` hook.

Each twistauth cache is compared, in the same run, with its *counterpart*:
tuned bare twisted.web (``Site(..., parsePOSTFormSubmission=False)``) doing
the same session work and nothing else (``bench/servers/session_bare.py``):

- ``twistauth-memory`` (``--session-cache=memory``) with ``bare-memory``
  (a dict lookup of the session id; the floor of the table);
- ``twistauth-redis`` (``--session-cache=redis://...``) with ``bare-redis``
  (``GET`` of the session id through txredisapi);
- ``twistauth-client`` (``--session-cache=client``) with ``bare-sealed``
  (opening an AES-GCM sealed cookie with ``cryptography``).

The peers users would pick instead: aiohttp with aiohttp-session's
``EncryptedCookieStorage`` and ``RedisStorage``, Tornado with secure
cookies and with a Redis lookup behind one.  Their ratios are printed to
the bare counterpart of the same kind.

A private ``redis-server`` on a free port (no persistence) is started by
`setup` and its URL given to every server as ``BENCH_REDIS_URL``; sealing
keys are made for the run.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from benchlib.harness import (
    BenchError,
    Context,
    RunningServer,
    Scenario,
    ServerSpec,
    free_port,
    log,
)
from benchlib.scenarios._commands import api_driver, python_script, twistd
from benchlib.wrk import FOLLOW, WrkDriver

BODY = '{"method":"echo","parameters":{"x":1}}'
ANSWER = {"result": {"x": 1}}
FLOOR = "bare-memory"
SESSION_HEADER = "X-Twistauth-Session"
ARGON2 = ("--argon2-time-cost=1", "--argon2-memory-cost=8192")

COUNTERPARTS: Dict[str, str] = {
    "twistauth-memory": "bare-memory",
    "twistauth-redis": "bare-redis",
    "twistauth-client": "bare-sealed",
    "aiohttp-encrypted-cookie": "bare-sealed",
    "aiohttp-redis": "bare-redis",
    "tornado-secure-cookie": "bare-sealed",
    "tornado-redis": "bare-redis",
}
"""Each server's bare twisted.web counterpart: the same session work only."""


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def _redis_url(context: Context) -> str:
    url = context.env.get("BENCH_REDIS_URL")
    if not url:
        raise BenchError("no BENCH_REDIS_URL: the sessions scenario's setup did not run")
    return url


def _post(server: RunningServer, path: str, body: str, headers: Dict[str, str]) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, body=body.encode(), headers=headers)
        response = conn.getresponse()
        response.read()
        return response
    except OSError as e:
        raise BenchError(f"{server.spec.name}: logging in failed: {e}") from None
    finally:
        conn.close()


def login_cookie(server: RunningServer) -> List[str]:
    """
    ``prepare`` for the baselines and peers: ``POST /login`` and send back
    the session cookie it sets.
    """
    response = _post(server, "/login", "{}", {"Content-Type": "application/json"})
    cookies = [v for k, v in response.getheaders() if k.lower() == "set-cookie"]
    if response.status != 200 or not cookies:
        raise BenchError(f"{server.spec.name}: /login answered {response.status}, no cookie")
    return ["Cookie: " + "; ".join(c.split(";", 1)[0] for c in cookies)]


def login_twistauth(server: RunningServer) -> List[str]:
    """
    ``prepare`` for twistauth: create an account in a header-mode session
    (an empty ``X-Twistauth-Session`` asks for one) and send its token,
    then the newest token each answer carries.
    """
    body = '{"method":"account.create","parameters":{"user_id":"bench","password":"benchbench1"}}'
    response = _post(
        server, "/api", body, {"Content-Type": "application/json", SESSION_HEADER: ""}
    )
    token = response.getheader(SESSION_HEADER)
    if response.status != 200 or not token:
        raise BenchError(
            f"{server.spec.name}: account.create answered {response.status} "
            f"without a {SESSION_HEADER} header"
        )
    # Like a real header-mode client, wrk keeps the newest token it is
    # given (a client-side session's changes when it is re-sealed).
    return [f"{SESSION_HEADER}: {token}", f"{FOLLOW}: {SESSION_HEADER}"]


@contextlib.contextmanager
def redis_server(context: Context) -> Iterator[None]:
    """
    A private ``redis-server`` on a free loopback port, without persistence,
    for the run; its URL goes to every server as ``BENCH_REDIS_URL``.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("the sessions scenario needs redis-server (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(  # noqa: S603
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(context.workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                conn = http.client.socket.create_connection(("127.0.0.1", port), timeout=1)
                conn.close()
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise BenchError(f"redis-server did not listen on {port}")
            time.sleep(0.05)
        log(f"redis-server on port {port}")
        context.env["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _twistauth(name: str, cache: str, context: Context, port: int, *extra: str) -> List[str]:
    return twistd(
        context, f"{name}.log", "twistauth",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        f"--session-cache={cache}", "--user-store=memory", *ARGON2, *extra,
    )  # fmt: skip


@dataclass
class PairedWrkDriver(WrkDriver):
    """
    `WrkDriver` that also remembers each server's summary, so the notes can
    give every server's ratio to its own bare counterpart.
    """

    summaries: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def measure(self, server: RunningServer, seconds: float) -> Dict[str, Any]:
        sample = super().measure(server, seconds)
        sample["server"] = server.spec.name
        return sample

    def summarize(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        summary = super().summarize(samples)
        if samples and "server" in samples[0]:
            self.summaries[samples[0]["server"]] = summary
        return summary


def counterpart_ratios(
    summaries: Dict[str, Dict[str, Any]], pairs: Dict[str, str]
) -> List[Tuple[str, str, Optional[float], Optional[float]]]:
    """
    ``(server, counterpart, req/s ratio, CPU ratio)`` for every measured pair.
    """
    out = []
    for name, other in pairs.items():
        mine, theirs = summaries.get(name), summaries.get(other)
        if not mine or not theirs:
            continue
        rps = mine["rps_median"] / theirs["rps_median"] if theirs.get("rps_median") else None
        cpu = None
        if mine.get("cpu_us_per_request") and theirs.get("cpu_us_per_request"):
            cpu = theirs["cpu_us_per_request"] / mine["cpu_us_per_request"]
        out.append((name, other, rps, cpu))
    return out


class RatioNotes:
    """
    The scenario's notes: fixed lines, then (once the run is summarized)
    one line per server with its ratios to its counterpart.
    """

    def __init__(self, driver: PairedWrkDriver, pairs: Dict[str, str], fixed: List[str]) -> None:
        self.driver = driver
        self.pairs = pairs
        self.fixed = fixed

    def __iter__(self) -> Iterator[str]:
        yield from self.fixed
        for name, other, rps, cpu in counterpart_ratios(self.driver.summaries, self.pairs):
            yield (
                f"{name} / {other}: "
                + (f"{rps:.2f}x req/s" if rps is not None else "- req/s")
                + (f", {cpu:.2f}x by CPU per request" if cpu is not None else "")
            )


def build(options: Any) -> Scenario:
    session_key = os.environ.get("BENCH_SESSION_KEY") or _key()
    keys = {"BENCH_SESSION_KEY": session_key}
    client_keys = _key()
    deployment_key = _key()

    def env(context: Context, port: int) -> Dict[str, str]:
        return dict(keys)

    def bare(store: str) -> Any:
        return lambda c, port: python_script(
            c, "session_bare.py", "--port", str(port), "--store", store
        )

    servers = [
        ServerSpec(
            name="bare-memory",
            label="bare twisted.web, tuned Site, session id looked up in a dict (floor)",
            command=bare("memory"),
            modules=("twisted.web",),
            env=env,
            prepare=login_cookie,
        ),
        ServerSpec(
            name="bare-sealed",
            label="bare twisted.web, tuned Site, AES-GCM sealed cookie opened",
            command=bare("sealed"),
            modules=("twisted.web", "cryptography"),
            env=env,
            prepare=login_cookie,
        ),
        ServerSpec(
            name="bare-redis",
            label="bare twisted.web, tuned Site, session id GET from Redis (txredisapi)",
            command=bare("redis"),
            modules=("twisted.web", "txredisapi"),
            env=env,
            prepare=login_cookie,
        ),
        ServerSpec(
            name="twistauth-memory",
            label="twistd -n twistauth --session-cache=memory",
            command=lambda c, port: _twistauth("twistauth-memory", "memory", c, port),
            modules=("twistauth.tap", "twistauth.app"),
            prepare=login_twistauth,
        ),
        ServerSpec(
            name="twistauth-redis",
            label="twistd -n twistauth --session-cache=redis://...",
            command=lambda c, port: _twistauth(
                "twistauth-redis", _redis_url(c), c, port, f"--deployment-key={deployment_key}"
            ),
            modules=("twistauth.tap", "twistauth.app", "txredisapi"),
            prepare=login_twistauth,
        ),
        ServerSpec(
            name="twistauth-client",
            label="twistd -n twistauth --session-cache=client (sealed cookie)",
            command=lambda c, port: _twistauth(
                "twistauth-client", "client", c, port, f"--session-keys={client_keys}"
            ),
            modules=("twistauth.tap", "twistauth.app"),
            prepare=login_twistauth,
        ),
        ServerSpec(
            name="aiohttp-encrypted-cookie",
            label="aiohttp + aiohttp-session EncryptedCookieStorage",
            command=lambda c, port: python_script(
                c, "session_aiohttp.py", "--port", str(port), "--store", "sealed"
            ),
            modules=("aiohttp", "aiohttp_session", "cryptography"),
            env=env,
            prepare=login_cookie,
        ),
        ServerSpec(
            name="aiohttp-redis",
            label="aiohttp + aiohttp-session RedisStorage (redis.asyncio)",
            command=lambda c, port: python_script(
                c, "session_aiohttp.py", "--port", str(port), "--store", "redis"
            ),
            modules=("aiohttp", "aiohttp_session", "redis"),
            env=env,
            prepare=login_cookie,
        ),
        ServerSpec(
            name="tornado-secure-cookie",
            label="Tornado, session in a secure (signed) cookie",
            command=lambda c, port: python_script(
                c, "session_tornado.py", "--port", str(port), "--store", "sealed"
            ),
            modules=("tornado",),
            env=env,
            prepare=login_cookie,
        ),
        ServerSpec(
            name="tornado-redis",
            label="Tornado, secure cookie holding an id GET from Redis (redis.asyncio)",
            command=lambda c, port: python_script(
                c, "session_tornado.py", "--port", str(port), "--store", "redis"
            ),
            modules=("tornado", "redis"),
            env=env,
            prepare=login_cookie,
        ),
    ]
    driver = api_driver(PairedWrkDriver, options, BODY, ANSWER)
    notes = RatioNotes(
        driver,
        COUNTERPARTS,
        [
            "twistauth targets >= 0.9x its bare counterpart for each cache (issue 3)",
            "differences under ~15% are noise on this machine",
        ],
    )
    return Scenario(
        name="sessions",
        title="authenticated JSON-method echo, per session cache",
        servers=servers,
        floor=FLOOR,
        driver=driver,
        setup=redis_server,
        notes=notes,  # type: ignore[arg-type]
    )
