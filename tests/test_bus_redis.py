"""
The Redis bus against a real redis-server, across real processes: this
test process notifies, helper processes (this file run as a script, with
``sys.executable``) wait and print what they got.

Covered: ``notify_all`` reaching another process (pattern and channel
subscriptions), ``notify`` waking exactly one waiter in the deployment, a
Redis restart between subscribe and notify (the subscriber re-subscribes by
itself and later notifications arrive), a logout published while the
subscriber is disconnected caught by the durable re-check (fault test R4),
forged, re-signed, stale and replayed messages dropped and counted, and a
notify while Redis is down failing fast with local waiters still woken.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEY = bytes(range(32))


# ---------------------------------------------------------------------------
# The helper process.


def child_main(argv: List[str]) -> None:  # pragma: no cover - runs in the child
    import argparse

    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["wait", "serve"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", default="pattern")
    parser.add_argument("--keys", default="")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--min-retry", type=float, default=0.1)
    args = parser.parse_args(argv)

    from twistauth.bus.redis_bus import RedisBus

    def say(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    bus = RedisBus(
        url=args.url,
        key=KEY,
        reactor=reactor,
        mode=args.mode,
        min_retry_delay=args.min_retry,
        max_retry_delay=max(args.min_retry, 1.0),
        command_timeout=1.0,
        ping_interval=1.0,
    )
    bus.when_resumed(lambda: say(event="resumed", connections=bus.stats()["connections"]))
    extra: Dict[str, Any] = {}

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line == b"stats":
                stats = {"bus": bus.stats()}
                if "watcher" in extra:
                    stats["watcher"] = extra["watcher"].stats()
                say(event="stats", **stats)

        def connectionLost(self, reason: Any) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands())

    @defer.inlineCallbacks
    def wait() -> Any:
        yield bus.start()
        keys = args.keys.split(",")
        for _ in range(args.count):
            d = bus.wait_for_keys(keys, timeout=30)
            yield bus.listening(keys)
            say(event="ready")
            key, message = yield d
            say(event="message", key=key, message=message)

    @defer.inlineCallbacks
    def serve() -> Any:
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from twistauth import redisconn
        from twistauth.bus.logout import LogoutWatcher
        from twistauth.sessions import Session
        from twistauth.web.events import LogoutWaitResource

        connection = redisconn.connect(args.url, connect_timeout=1.0, reply_timeout=2.0)

        def resolve_session(request: Any) -> Any:
            sid = request.getHeader(b"x-session")
            user = request.getHeader(b"x-user")
            if not sid:
                return None
            say(event="watch")
            return Session(id=sid.decode(), created=0, last_seen=0, user_id=user.decode())

        def logged_out_reason(session: Any) -> Any:
            return redisconn.call(reactor, 1.0, connection.get, "mark:user:" + session.user_id)

        watcher = LogoutWatcher(bus=bus, clock=reactor, logged_out_reason=logged_out_reason)
        extra["watcher"] = watcher
        root = Resource()
        logout = Resource()
        logout.putChild(b"wait", LogoutWaitResource(watcher=watcher, resolve_session=resolve_session))
        root.putChild(b"logout", logout)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        yield bus.start()
        say(event="ready", port=port.getHost().port)

    def run() -> None:
        d = wait() if args.role == "wait" else serve()
        d.addErrback(lambda f: say(event="error", error=f.getTraceback()))

    reactor.callWhenRunning(run)
    reactor.run()


# ---------------------------------------------------------------------------
# The test side.


class Child(protocol.ProcessProtocol):
    """
    A helper process: its JSON lines arrive in a queue.
    """

    def __init__(self, *args: str) -> None:
        self.lines: defer.DeferredQueue[Dict[str, Any]] = defer.DeferredQueue()
        self.seen: List[Dict[str, Any]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.errors = b""
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._buffer = b""
        reactor.spawnProcess(
            self, sys.executable, [sys.executable, os.path.abspath(__file__), *args], env=env
        )

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            event = json.loads(line)
            self.seen.append(event)
            self.lines.put(event)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    async def expect(self, event: str, timeout: float = 15.0) -> Dict[str, Any]:
        """
        The next line of kind ``event`` (other kinds are skipped).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            d = self.lines.get()
            d.addTimeout(max(left, 0.01), reactor)
            try:
                got = await d
            except defer.TimeoutError:
                raise AssertionError(
                    f"no {event!r} from the child within {timeout} s; it said {self.seen}; "
                    f"stderr: {self.errors.decode(errors='replace')[-2000:]}"
                ) from None
            if got["event"] == "error":
                raise AssertionError(got["error"])
            if got["event"] == event:
                return got

    def send(self, line: str) -> None:
        self.transport.write(line.encode() + b"\n")

    async def stats(self) -> Dict[str, Any]:
        self.send("stats")
        return await self.expect("stats")

    async def stop(self) -> None:
        if not self.ended.called:
            self.transport.closeStdin()
            d = self.ended
            d.addTimeout(10, reactor)
            try:
                await d
            except defer.TimeoutError:
                self.transport.signalProcess("KILL")


async def started_bus(url: str, **kwargs: Any) -> Any:
    from twistauth.bus.redis_bus import RedisBus

    bus = RedisBus(url=url, key=kwargs.pop("key", KEY), reactor=reactor, **kwargs)
    await bus.start()
    return bus


async def until(condition: Any, timeout: float = 10.0) -> None:
    """
    Poll ``condition()`` on the real reactor (what it waits for happens in
    Redis and other processes, not on a clock of ours).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["pattern", "channel"])
@pytest_twisted.ensureDeferred
async def test_notify_all_wakes_waiters_in_another_process(redis_server: Any, mode: str) -> None:
    child = Child("wait", "--url", redis_server.url, "--mode", mode, "--keys", "logout:user:1,other")
    bus = await started_bus(redis_server.url, mode=mode)
    try:
        await child.expect("ready")
        local = bus.wait_for_key("logout:user:1", timeout=10)
        woken = await bus.notify_all("logout:user:1", {"reason": "backchannel"})
        assert woken == 1  # the local waiter; the other process's is not counted here
        got = await child.expect("message")
        assert got["key"] == "logout:user:1"
        assert got["message"] == {"reason": "backchannel"}
        assert await local == {"reason": "backchannel"}
    finally:
        await child.stop()
        await bus.stop()
    assert bus.stats()["waiters"] == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_channel_mode_unsubscribes_when_the_last_waiter_leaves(redis_server: Any) -> None:
    """
    Case 99 at the Redis level: a key's channel exists while it has local
    waiters and is gone when they have all left (notified, timed out,
    cancelled).
    """
    from zope.interface.verify import verifyObject

    from twistauth import redisconn
    from twistauth.bus import IBus

    bus = await started_bus(redis_server.url, mode="channel")
    raw = redisconn.connect(redis_server.url)

    async def subscribers(key: str) -> int:
        reply = await redisconn.call(reactor, 2.0, raw.execute_command, "PUBSUB", "NUMSUB", bus.channel(key))
        return int(reply[1])

    try:
        assert verifyObject(IBus, bus)
        a = bus.wait_for_keys(["a", "shared"])
        b = bus.wait_for_key("shared", timeout=0.2)
        c = bus.wait_for_key("c")
        await bus.listening(["a", "shared", "c"])
        assert [await subscribers(k) for k in ("a", "shared", "c")] == [1, 1, 1]
        c.cancel()
        c.addErrback(lambda f: None)
        await bus.notify_all("a", 1)
        assert await a == ("a", 1)
        try:
            await b
        except Exception as e:
            assert type(e).__name__ == "BusTimeoutError"
        await bus.listening(["a"])  # lets the UNSUBSCRIBEs be answered
        await until(lambda: bus.stats()["waiters"] == 0)
        for key in ("a", "shared", "c"):
            for _ in range(100):
                if await subscribers(key) == 0:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            assert await subscribers(key) == 0, key
        assert bus.stats()["keys"] == 0
    finally:
        await redisconn.disconnect(raw)
        await bus.stop()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_notify_wakes_exactly_one_waiter_in_the_deployment(redis_server: Any) -> None:
    children = [
        Child("wait", "--url", redis_server.url, "--keys", "job") for _ in range(2)
    ]
    bus = await started_bus(redis_server.url)
    try:
        for child in children:
            await child.expect("ready")
        assert await bus.notify("job", "first") is True
        # The one waiter the claim picked gets it; only then does a
        # notify_all go out (one that overtakes an unsettled claim may take
        # the claimant's waiter first: documented in twistauth.bus.redis_bus).
        await until(
            lambda: any(
                e.get("event") == "message" for child in children for e in child.seen
            )
        )
        assert await bus.notify_all("job", "second") == 0
        messages = sorted(
            [(await child.expect("message"))["message"] for child in children]
        )
        assert messages == ["first", "second"]
        stats = [(await child.stats())["bus"] for child in children]
        assert sorted(s["claims_won"] for s in stats) == [0, 1]
    finally:
        for child in children:
            await child.stop()
        await bus.stop()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["pattern", "channel"])
@pytest_twisted.ensureDeferred
async def test_redis_restart_between_subscribe_and_notify(redis_server: Any, mode: str) -> None:
    child = Child(
        "wait", "--url", redis_server.url, "--mode", mode, "--keys", "k1,k2", "--count", "2",
        "--min-retry", "0.1",
    )
    try:
        await child.expect("ready")
        assert (await child.stats())["bus"]["connections"] == 1
        redis_server.stop()
        redis_server.start()
        # The subscriber reconnects and re-subscribes without being asked.
        assert (await child.expect("resumed"))["connections"] == 2
        bus = await started_bus(redis_server.url, mode=mode)
        try:
            await bus.notify_all("k2", {"after": "restart"})
            got = await child.expect("message")
            assert (got["key"], got["message"]) == ("k2", {"after": "restart"})
            await child.expect("ready")
            await bus.notify_all("k1", 2)
            assert (await child.expect("message"))["message"] == 2
        finally:
            await bus.stop()
    finally:
        await child.stop()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_logout_during_outage_is_caught_by_the_durable_recheck(redis_server: Any) -> None:
    """
    R4: a logout published while the waiting process's subscriber is
    disconnected reaches the waiter anyway, through the re-check of durable
    state that follows the reconnection (well within one long-poll period).
    """
    import treq

    child = Child("serve", "--url", redis_server.url, "--min-retry", "3.0")
    try:
        ready = await child.expect("ready")
        url = f"http://127.0.0.1:{ready['port']}/logout/wait?timeout=20"
        started = time.monotonic()
        response_d = treq.get(url, headers={"x-session": "s-1", "x-user": "alice"}, timeout=30)
        await child.expect("watch")
        redis_server.stop()
        redis_server.start()
        # The child is still waiting to reconnect (3 s): publish now.
        bus = await started_bus(redis_server.url)
        try:
            from twistauth import redisconn
            from twistauth.bus.logout import publish_logout

            await redisconn.call(reactor, 2.0, bus._connection.set, "mark:user:alice", "backchannel")
            await publish_logout(bus, user_id="alice", reason="backchannel")
            before = (await child.stats())["bus"]
            assert before["connected"] == 0
            assert before["received"] == 0  # the notification was lost
            response = await response_d
            answer = await response.json()
            elapsed = time.monotonic() - started
            assert answer == {"logged_out": True, "reason": "backchannel"}
            assert elapsed < 20  # within one long-poll period
            stats = await child.stats()
            assert stats["watcher"]["recheck"] == 1
            assert stats["watcher"]["bus"] == 0
            assert stats["bus"]["connections"] == 2
        finally:
            await bus.stop()
    finally:
        await child.stop()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_forged_stale_and_replayed_messages_are_dropped(redis_server: Any) -> None:
    from twistauth import redisconn
    from twistauth.bus._signing import derive_key, seal

    bus = await started_bus(redis_server.url)
    other = await started_bus(redis_server.url, key=bytes(32))  # another deployment's key
    raw = redisconn.connect(redis_server.url)
    captured: List[Any] = []
    try:
        waiter = bus.wait_for_key("logout:user:1", timeout=30)
        channel = bus.channel("logout:user:1")
        received = bus.stats()["received"]

        async def publish(wire: Any, on: Optional[str] = None) -> None:
            nonlocal received
            await redisconn.call(reactor, 2.0, raw.publish, on or channel, wire)
            received += 1
            await until(lambda: bus.stats()["received"] >= received)

        body = {
            "v": 1, "n": "all", "o": "attacker", "i": "id-1", "t": reactor.seconds(),
            "k": "logout:user:1", "m": {"reason": "forged"}, "x": False,
        }
        text = json.dumps(body).encode()
        await publish(text)  # unsigned
        await publish(b"0" * 64 + text)  # a made-up MAC
        await publish(seal(derive_key(bytes(32)), channel.encode(), text))  # wrong key
        # Signed for another key's channel, replayed on this one.
        elsewhere = bus.channel("logout:user:2")
        await publish(seal(derive_key(KEY), elsewhere.encode(), text))
        await publish(b"\xff\xfe not even text")
        # A message signed by another deployment's process, through its bus.
        await other.notify_all("logout:user:1", {"reason": "other deployment"})
        received += 1
        await until(lambda: bus.stats()["received"] >= received)
        # Sealed for this channel, but naming another key inside.
        moved = dict(body, i="id-4", k="logout:user:2")
        await publish(seal(derive_key(KEY), channel.encode(), json.dumps(moved).encode()))
        stale = dict(body, i="id-2", t=reactor.seconds() - 1000)
        await publish(seal(derive_key(KEY), channel.encode(), json.dumps(stale).encode()))
        assert not waiter.called
        stats = bus.stats()
        # unsigned, made-up MAC, wrong key, other channel, garbage, other deployment
        assert stats["dropped_forged"] == 6
        assert stats["dropped_malformed"] == 1
        assert stats["dropped_stale"] == 1

        # A genuine message, then its replay.
        good = dict(body, i="id-3", t=reactor.seconds(), m={"reason": "genuine"})
        wire = seal(derive_key(KEY), channel.encode(), json.dumps(good).encode())
        await publish(wire)
        assert await waiter == {"reason": "genuine"}
        second = bus.wait_for_key("logout:user:1", timeout=30)
        await publish(wire)
        assert bus.stats()["dropped_replayed"] == 1
        assert not second.called
        second.cancel()
        second.addErrback(lambda f: captured.append(f))
    finally:
        await redisconn.disconnect(raw)
        await other.stop()
        await bus.stop()
    assert bus.stats()["waiters"] == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_notify_while_redis_is_down_fails_fast_and_still_wakes_local_waiters(
    redis_server: Any,
) -> None:
    from twistauth.errors import BackendUnavailableError

    bus = await started_bus(redis_server.url, command_timeout=0.5, min_retry_delay=0.2)
    try:
        redis_server.stop()
        local = bus.wait_for_key("k", timeout=10)
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await bus.notify_all("k", "m")
        assert time.monotonic() - started < 2.0
        assert await local == "m"
        assert bus.stats()["publish_failed"] == 1
        redis_server.start()
    finally:
        await bus.stop()


if __name__ == "__main__":  # pragma: no cover
    child_main(sys.argv[1:])
