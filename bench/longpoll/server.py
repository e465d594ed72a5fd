"""
A long-poll server for the benchmark, of one of two kinds:

``twistauth``
    twistauth's ``GET /logout/wait`` (`twistauth.web.events`) over a
    `LogoutWatcher` and a bus (memory, or Redis with ``--redis-url``).
    Until the app wires sessions into the events resource, sessions come
    from a trivial resolver: ``x-session`` and ``x-user`` headers make a
    `twistauth.sessions.Session`; the durable check answers "not logged
    out" at once.
``bare``
    The floor: a plain ``twisted.web`` resource that keeps each request in
    a dict with a timeout, removes it when the client goes away, and
    answers everyone in one loop when notified.

Both serve on a plain ``Site`` (no twistauth limits: 19 000 connections
come from one address).  A control port answers ``GET /stats`` (RSS after
a collection, pending waiters, CPU seconds), ``POST /`` (wake every
waiter of user ``bench``) and ``GET /cpu`` (CPU seconds used since that
notify: once every client has its answer, what the whole fan-out cost,
writes to the sockets included).

Prints one JSON line when listening: ``{"port": ..., "control": ...}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Site  # noqa: E402


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BareLongPoll(Resource):
    """
    The bare Twisted long-poll: a dict of pending requests, a timeout each,
    removal on disconnect, and a naive loop to answer them all.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: Dict[Any, Any] = {}

    def render_GET(self, request: Any) -> Any:  # noqa: N802
        timer = reactor.callLater(300, self._timeout, request)
        self.pending[request] = timer
        request.notifyFinish().addErrback(self._gone, request)
        return NOT_DONE_YET

    def _gone(self, _: Any, request: Any) -> None:
        timer = self.pending.pop(request, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _timeout(self, request: Any) -> None:
        if self.pending.pop(request, None) is not None:
            self._answer(request, b'{"logged_out": false}')

    def _answer(self, request: Any, body: bytes) -> None:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def waiters(self) -> int:
        return len(self.pending)

    def notify_all(self) -> None:
        pending, self.pending = self.pending, {}
        body = json.dumps({"logged_out": True, "reason": "logout"}).encode()
        for request, timer in pending.items():
            timer.cancel()
            self._answer(request, body)


class Control(Resource):
    isLeaf = True

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/cpu":
            # No collection here: what the fan-out cost since the notify.
            now = cpu()
            return json.dumps(
                {"cpu": now, "fanout_cpu": now - self.server.notified_cpu, "done_s": self.server.done_s}
            ).encode()
        gc.collect()
        stats = {"rss_kb": rss_kb(), "waiters": self.server.waiters(), "cpu": cpu()}
        stats.update(self.server.extra_stats())
        return json.dumps(stats).encode()

    def render_POST(self, request: Any) -> bytes:  # noqa: N802
        self.server.notify()
        return b"{}"


class Server:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.notified_cpu = 0.0
        self.notified_at = 0.0
        self.done_s = None
        root = Resource()
        if args.kind == "bare":
            self.bare = BareLongPoll()
            logout = Resource()
            logout.putChild(b"wait", self.bare)
            root.putChild(b"logout", logout)
        else:
            self._build_twistauth(root)
        self.root = root

    def _build_twistauth(self, root: Resource) -> None:
        from twistauth.bus import MemoryBus
        from twistauth.bus.logout import LogoutWatcher
        from twistauth.sessions import Session
        from twistauth.web.events import LogoutEndpoints

        if self.args.redis_url:
            from twistauth.bus.redis_bus import RedisBus

            self.bus: Any = RedisBus(
                url=self.args.redis_url,
                key=bytes(32),
                reactor=reactor,
                batch_size=self.args.batch_size,
            )
            self.bus.start()
        else:
            self.bus = MemoryBus(clock=reactor, batch_size=self.args.batch_size)

        # The trivial resolver (until the lead wires the real session
        # cache): like a memory session cache, sessions exist before any
        # wait (made here, before the idle memory is measured); with
        # --per-request a Session is built for each request, as a Redis or
        # client-side cache would.
        cache: Dict[str, Any] = {}
        for i in range(self.args.offset, self.args.offset + self.args.sessions):
            sid = f"bench-session-{i}"
            cache[sid] = Session(id=sid, created=0.0, last_seen=0.0, user_id="bench")

        def resolve_session(request: Any) -> Any:
            sid = request.getHeader(b"x-session")
            if sid is None:
                return None
            session_id = sid.decode()
            session = None if self.args.per_request else cache.get(session_id)
            if session is None:
                user = request.getHeader(b"x-user")
                session = Session(
                    id=session_id, created=0.0, last_seen=0.0, user_id=user and user.decode()
                )
            return session

        self.watcher = LogoutWatcher(
            bus=self.bus,
            clock=reactor,
            logged_out_reason=lambda session: None,
            max_wait=300,
            max_per_session=4,
            max_total=30_000,
        )
        endpoints = LogoutEndpoints(
            watcher=self.watcher, resolve_session=resolve_session, clock=reactor
        )
        logout = Resource()
        logout.putChild(b"wait", endpoints.wait)
        root.putChild(b"logout", logout)

    def waiters(self) -> int:
        if self.args.kind == "bare":
            return self.bare.waiters()
        return int(self.watcher.stats()["watches"])

    def extra_stats(self) -> Dict[str, Any]:
        stats: Dict[str, Any] = {}
        if self.args.kind == "twistauth":
            stats["bus"] = self.bus.stats()
        return stats

    def notify(self) -> None:
        self.notified_cpu = cpu()
        self.notified_at = time.monotonic()
        self.done_s = None
        if self.args.kind == "bare":
            self.bare.notify_all()
            self.done_s = time.monotonic() - self.notified_at
            return
        from twistauth.bus.logout import publish_logout

        publish_logout(self.bus, user_id="bench", reason="logout").addErrback(lambda f: None)
        reactor.callLater(0.01, self._check_done)

    def _check_done(self) -> None:
        # Every 10 ms (costs nothing measurable): when the last waiter of
        # the fan-out was answered, as the server sees it.
        if self.bus.stats()["pending_deliveries"]:
            reactor.callLater(0.01, self._check_done)
        else:
            self.done_s = time.monotonic() - self.notified_at


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["bare", "twistauth"], required=True)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--sessions", type=int, default=0, help="sessions to make up front")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--per-request", action="store_true", help="a new Session per request")
    parser.add_argument("--batch-size", type=int, default=int(os.environ.get("BUS_BATCH", "256")))
    args = parser.parse_args()
    raise_nofile()
    server = Server(args)
    port = reactor.listenTCP(0, Site(server.root, timeout=None), backlog=4096, interface="127.0.0.1")
    control = reactor.listenTCP(0, Site(Control(server)), interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port, "control": control.getHost().port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
