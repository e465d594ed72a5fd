"""
Cross-process delivery over Redis: process A notifies, process B waits.

``waiter``: B waits on a key with the Redis bus, and for every message
records ``time.monotonic() - message["t"]`` (CLOCK_MONOTONIC is shared by
every process on a machine), then waits again at once.  After ``--count``
messages, or 3 s without one once A is done, prints the delays.

``notifier``: A sends ``--count`` notifications, one every ``--interval``
seconds, each carrying its send time.

``subscribe``: the cost of registering waits in each mode: ``--count``
waits on distinct keys, then the time until the bus is listening for all
of them (channel mode: every SUBSCRIBE confirmed), and the time to cancel
them all (channel mode: an UNSUBSCRIBE each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from twisted.internet import defer, reactor, task  # noqa: E402

from twistauth.bus.redis_bus import RedisBus  # noqa: E402

KEY = bytes(32)


def say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


@defer.inlineCallbacks
def waiter(args: Any) -> Any:
    bus = RedisBus(url=args.url, key=KEY, reactor=reactor, mode=args.mode)
    yield bus.start()
    delays: List[float] = []
    yield bus.listening(["latency"])
    say(event="ready")
    while len(delays) < args.count:
        d = bus.wait_for_key("latency", timeout=3)
        try:
            message = yield d
        except Exception:
            break  # 3 s of silence: the notifier is done
        delays.append(time.monotonic() - message["t"])
    yield bus.stop()
    say(event="delays", delays=delays)


@defer.inlineCallbacks
def notifier(args: Any) -> Any:
    bus = RedisBus(url=args.url, key=KEY, reactor=reactor, mode=args.mode)
    yield bus.start()
    for i in range(args.count):
        yield bus.notify_all("latency", {"t": time.monotonic(), "i": i})
        yield task.deferLater(reactor, args.interval, lambda: None)
    yield bus.stop()
    say(event="sent", count=args.count)


@defer.inlineCallbacks
def subscribe(args: Any) -> Any:
    bus = RedisBus(url=args.url, key=KEY, reactor=reactor, mode=args.mode)
    yield bus.start()
    keys = [f"logout:session:{i:032x}" for i in range(args.count)]
    started = time.monotonic()
    waits = [bus.wait_for_key(k) for k in keys]
    registered = time.monotonic() - started
    yield defer.gatherResults([bus.listening([k]) for k in keys])
    listening = time.monotonic() - started
    started = time.monotonic()
    for d in waits:
        d.addErrback(lambda f: None)
        d.cancel()
    cancelled = time.monotonic() - started
    yield task.deferLater(reactor, 0.5, lambda: None)  # let UNSUBSCRIBEs drain
    yield bus.stop()
    say(event="subscribe", registered=registered, listening=listening, cancelled=cancelled)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["waiter", "notifier", "subscribe"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", default="pattern")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.002)
    args = parser.parse_args()
    role = {"waiter": waiter, "notifier": notifier, "subscribe": subscribe}[args.role]

    def run() -> None:
        d = role(args)
        d.addErrback(lambda f: say(event="error", error=f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main()
