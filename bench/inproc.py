#!/usr/bin/env python3
"""
Per-request CPU cost of the session scenario's servers, in one process,
without a network: a request's bytes go straight into the server's
``HTTPChannel`` over a ``StringTransport``, so the figure is the server's
own work (HTTP parsing, the resource, the session, the answer) and nothing
of the kernel's or of ``wrk``'s.

    python3 bench/inproc.py                       # every server, 5 rounds
    python3 bench/inproc.py --servers twistauth-memory,bare-memory --profile
    python3 bench/inproc.py --instructions 1000   # instructions, by callgrind

It complements ``bench/run.py --scenario sessions`` (which measures real
sockets under load): on a shared, noisy machine, the CPU time of a tight
in-process loop (the best of several rounds) is far steadier than req/s,
so it is the tool for finding and checking a regression; ``run.py`` remains
the figure to report.  Only the servers whose sessions answer without I/O
are here (memory and sealed cookies).

``--instructions N`` counts instead the machine instructions a request
takes, under valgrind's callgrind (Debian's ``valgrind``): the server runs
``N`` more requests in one run than in another, and the difference of the
two totals is divided by ``N``.  The count does not depend on what else
the machine is doing (it is the same, give or take a fraction of a
percent, from one run to the next), so it shows changes of 1% that timing
cannot; it does not see what makes instructions slow (cache misses,
branches), so time remains the figure to report.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import pstats
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "servers")]  # the checkout, then the bare servers

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

BODY = b'{"method":"echo","parameters":{"x":1}}'
ANSWER = b'{"result":{"x":1}}'


def _request(headers: List[Tuple[str, str]]) -> bytes:
    lines = [
        "POST /api HTTP/1.1",
        "Host: 127.0.0.1:8080",
        "Content-Type: application/json",
        f"Content-Length: {len(BODY)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY


class Connection:
    """
    One keep-alive connection into a site: `send` one request, get the
    response bytes.
    """

    def __init__(self, site: Any) -> None:
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.protocol = site.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out


def _bare(store_kind: str) -> Tuple[Any, List[Tuple[str, str]]]:
    from session_bare import Api, MemoryStore, SealedStore
    from twisted.web.server import Site

    store: Any
    if store_kind == "memory":
        store = MemoryStore()
    else:
        store = SealedStore(secrets.token_bytes(32))
    site = Site(Api(store), parsePOSTFormSubmission=False)
    return site, [("Cookie", "sid=" + store.create({"user_id": "bench"}))]


def _bare_with_headers() -> Tuple[Any, List[Tuple[str, str]]]:
    """
    bare-memory, answering with the five headers a twistauth header-mode
    answer adds (request id, session token and expiry, ``no-store``,
    ``nosniff``): what those headers alone cost, with no other twistauth
    work.
    """
    from session_bare import Api, MemoryStore
    from twisted.web.server import Site

    class HeadersApi(Api):  # type: ignore[misc]
        def _answer(self, request: Any, body: bytes, session: Any) -> bytes:
            request.setHeader(b"x-request-id", b"%016x" % secrets.randbits(64))
            request.setHeader(b"x-twistauth-session", self.token)
            request.setHeader(b"x-twistauth-session-expires", b"%d" % (time.time() + 1800))
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-content-type-options", b"nosniff")
            return super()._answer(request, body, session)

    store = MemoryStore()
    sid = store.create({"user_id": "bench"})
    api = HeadersApi(store)
    api.token = sid.encode()
    return Site(api, parsePOSTFormSubmission=False), [("Cookie", "sid=" + sid)]


class _Forgetful(dict):  # type: ignore[type-arg]
    """
    A `Sealer`'s memory of the values it opened, forgetting each at once:
    every request decrypts its token, as for a token seen the first time.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _twistauth_uncached() -> Tuple[Any, List[Tuple[str, str]]]:
    from twistauth.web.api import APIResource

    site, headers = _twistauth("client")
    for resource in site.resource._fast.values():
        if isinstance(resource, APIResource):
            resource.header_sessions._sealer._opened = _Forgetful()
    return site, headers


def _twistauth(cache: str) -> Tuple[Any, List[Tuple[str, str]]]:
    from twisted.internet import reactor

    from twistauth.app import make_app

    keys = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    app = make_app(
        clock=reactor,
        session_cache=cache,
        session_keys=[keys],
        user_store="memory",
        argon2_time_cost=1,
        argon2_memory_cost=8192,
    )
    for service in app.background:
        service.startService()
    _STARTED.extend(app.background)
    site = app.site()
    # Log in as the bench does: account.create in a header-mode session.
    connection = Connection(site)
    create = (
        b'{"method":"account.create","parameters":{"user_id":"bench","password":"benchbench1"}}'
    )
    raw = (
        b"POST /api HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"X-Twistauth-Session: \r\nContent-Length: " + str(len(create)).encode() + b"\r\n\r\n"
        + create
    )
    connection.protocol.dataReceived(raw)
    # Password hashing runs in a thread: let the reactor turn until it answers.
    deadline = time.monotonic() + 30
    while b"\r\n\r\n" not in connection.transport.value():
        reactor.iterate(0.01)  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise SystemExit(
                f"twistauth-{cache}: account.create did not answer: "
                f"{connection.transport.value()[:300]!r}"
            )
    head = connection.transport.value().split(b"\r\n\r\n", 1)[0].decode()
    token = None
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "x-twistauth-session":
            token = value.strip()
    if not token:
        raise SystemExit(f"twistauth-{cache}: no session token in {head!r}")
    return site, [("X-Twistauth-Session", token)]


def _bare_echo() -> Tuple[Any, List[Tuple[str, str]]]:
    from twisted.web.server import Site
    from twisted_web import Echo

    return Site(Echo(), parsePOSTFormSubmission=False), []


def _twistauth_anonymous() -> Tuple[Any, List[Tuple[str, str]]]:
    site, _ = _twistauth("memory")
    return site, []


SERVERS: Dict[str, Callable[[], Tuple[Any, List[Tuple[str, str]]]]] = {
    "bare-echo": _bare_echo,
    "twistauth-anonymous": _twistauth_anonymous,
    "bare-memory": lambda: _bare("memory"),
    "bare-memory-headers": _bare_with_headers,
    "bare-sealed": lambda: _bare("sealed"),
    "twistauth-memory": lambda: _twistauth("memory"),
    "twistauth-client": lambda: _twistauth("client"),
    "twistauth-client-uncached": _twistauth_uncached,
}

COUNTERPARTS = {
    "bare-memory-headers": "bare-memory",
    "twistauth-anonymous": "bare-echo",
    "twistauth-memory": "bare-memory",
    "twistauth-client": "bare-sealed",
    "twistauth-client-uncached": "bare-sealed",
}


_TOKEN = b"\r\nX-Twistauth-Session: "

_STARTED: List[Any] = []
"""The apps' background services, stopped at the end (the password hasher's
threads would otherwise keep the process from exiting)."""


def measure(site: Any, headers: List[Tuple[str, str]], count: int) -> float:
    """
    CPU microseconds per request over ``count`` requests on one connection.

    A header-mode client sends the token of the latest answer, as a real
    client does (a client-side session's token changes when it is
    re-sealed).
    """
    connection = Connection(site)
    data = _request(headers)
    out = connection.send(data)
    if not out.startswith(b"HTTP/1.1 200") or ANSWER not in out:
        raise SystemExit(f"unexpected answer: {out[:400]!r}")
    send = connection.send
    follows = bool(headers) and headers[0][0] == "X-Twistauth-Session"
    token = headers[0][1].encode() if follows else b""
    start = time.process_time()
    for _ in range(count):
        out = send(data)
        at = out.find(_TOKEN) if follows else -1
        if at >= 0:
            at += len(_TOKEN)
            latest = out[at : out.index(b"\r\n", at)]
            if latest != token:
                token = latest
                data = _request([(headers[0][0], token.decode())])
    return (time.process_time() - start) / count * 1e6


def instructions(name: str, count: int) -> float:
    """
    Instructions per request of the server ``name``, counted by callgrind
    over ``count`` requests (see the module's docstring).
    """

    def collected(requests: int) -> int:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--servers",
            name,
            "--count",
            str(requests),
            "--rounds",
            "1",
        ]
        # A fixed hash seed: string hashing otherwise varies the count.
        env = dict(os.environ, PYTHONHASHSEED="0")
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        found = re.search(r"Collected : (\d+)", run.stderr)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"{name}: callgrind failed:\n{run.stdout}{run.stderr[-2000:]}")
        return int(found.group(1))

    # Both runs warm up alike (the first requests fill caches), so their
    # difference is what the extra requests cost.
    warm = 200
    return (collected(warm + count) - collected(warm)) / count


def _print_table(column: str, form: str, costs: Dict[str, float]) -> None:
    """
    One row per server: its cost per request, and the ratio of its
    counterpart's cost to its own when the counterpart was measured too.
    """
    print(f"{'server':<26} {column:>21} {'vs counterpart':>15}")
    for name, cost in costs.items():
        other = COUNTERPARTS.get(name)
        ratio = f"{costs[other] / cost:.2f}x {other}" if other in costs else ""
        print(f"{name:<26} {form.format(cost):>21} {ratio:>15}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--count", type=int, default=20000, help="requests per round (20000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the best is kept (5)")
    p.add_argument("--profile", action="store_true", help="print a cProfile of each server")
    p.add_argument("--sort", default="tottime", help="the profile's order (tottime)")
    p.add_argument("--lines", type=int, default=25, help="the profile's rows (25)")
    p.add_argument(
        "--instructions",
        type=int,
        default=0,
        metavar="N",
        help="count instructions per request over N requests, by callgrind",
    )
    options = p.parse_args(argv)
    names = options.servers.split(",")
    if options.instructions:
        counted = {name: instructions(name, options.instructions) for name in names}
        _print_table("instructions/request", "{:,.0f}", counted)
        return
    built = {name: SERVERS[name]() for name in names}
    best: Dict[str, float] = {name: float("inf") for name in names}
    for _ in range(options.rounds):
        for name in names:  # round-robin, so drift hits every server alike
            site, headers = built[name]
            best[name] = min(best[name], measure(site, headers, options.count))
    _print_table("CPU µs/request", "{:.1f}", best)
    if options.profile:
        for name in names:
            site, headers = built[name]
            profiler = cProfile.Profile()
            profiler.runcall(measure, site, headers, options.count)
            print(f"\n== {name}")
            pstats.Stats(profiler).sort_stats(options.sort).print_stats(options.lines)
    for service in reversed(_STARTED):
        service.stopService()


if __name__ == "__main__":
    main()
