"""
The Redis bus: waiters in every process of a deployment, woken over Redis
pub/sub.

Each process keeps its own waiters in a `MemoryBus` and holds one
subscriber connection (`twistauth.bus._subscriber`).  A notification wakes
the local waiters at once and is published, sealed with HMAC-SHA256 under
the deployment key (`twistauth.bus._signing`), on the key's channel
``<prefix><digest of the key>``; every other process receives it and wakes
its own waiters.  A process ignores its own messages.  Messages that fail
authentication (forged, or unsigned), that are stale (clock more than
``max_skew`` seconds away) or repeated (same id) are dropped and counted in
`RedisBus.stats`.

**Subscribing: one pattern or a channel per key.**  Publishers always use
per-key channels; a subscriber chooses (and the two kinds mix in one
deployment):

``mode="pattern"`` (the default)
    One ``PSUBSCRIBE <prefix>*`` per process.  A wait costs no Redis
    command at all, nothing is re-subscribed per key after a reconnect, and
    a wait is listening the moment it is registered (no window between
    "waiting" and "subscribed" in which a notification is lost).  Every
    process receives every notification; logouts are rare, so that traffic
    is small.
``mode="channel"``
    ``SUBSCRIBE`` a key's channel when its first local waiter arrives and
    ``UNSUBSCRIBE`` when its last one leaves.  Processes only receive
    notifications they have waiters for, at the price of two commands per
    key and wait, and a window until the server confirms the subscription
    (`listening` covers it).  Worth it only for high notification rates
    with waiters spread thinly over many processes.

``bench/longpoll/run.py`` measures both.

**Sentinel.**  With a ``redis-sentinel://`` URL both connections follow
the master the Sentinels name: the publishing one is a
`twistauth.redisconn` connection, and the subscriber leaves a master as
soon as a failover of it starts and subscribes on the new one when it is
announced (`twistauth.bus._subscriber`).  For the subscriber a failover is
a reconnection like any other: what was published meanwhile is caught by
the re-check that follows (below).

**Delivery is at most once.**  Pub/sub loses what is published while a
subscriber is disconnected.  The bus reports every (re)subscription to its
`when_resumed` observers, and waiters re-check durable state then (and at
every timeout): `twistauth.bus.logout.LogoutWatcher` does.  Write durable
state *before* notifying.

**`notify` across processes** wakes at most one waiter in the deployment:
a local waiter if this process has one (the longest-waiting); otherwise
the message is offered to the other processes, and those with a waiter for
the key race for a claim (``SET <prefix>claim:<id> NX PX``), the winner
waking its longest-waiting waiter.  Listeners everywhere see the message.
It is best effort, not exactly-once: if a `notify_all` for the same key
overtakes an unsettled claim and wakes the claimant's waiter first, the
claimed message finds no waiter and is dropped.  Use `notify` for work any
one waiter may take, and durable state for what must not be lost.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistauth import redisconn
from twistauth.bus._interfaces import IBus
from twistauth.bus._keys import (
    MAX_MESSAGE_BYTES,
    Key,
    check_key,
    check_keys,
    decode_key,
    encode_key,
    encode_message,
    key_digest,
)
from twistauth.bus._signing import derive_key, seal, unseal
from twistauth.bus._subscriber import Subscriber
from twistauth.bus.memory import MemoryBus
from twistauth.errors import BackendUnavailableError

log = Logger()

_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-")
_MAX_WIRE = 64 + MAX_MESSAGE_BYTES + 4096
_MAX_SEEN = 100_000


@implementer(IBus)
class RedisBus:
    """
    The `IBus` of a deployment with several processes or machines.

    :param url: the Redis server, ``redis://[[user]:password@]host[:port][/db]``,
        or the Sentinels that name it,
        ``redis-sentinel://[[user]:password@]host[:port][,...]/service_name[/db]``:
        publishing and subscribing both follow a failover (see
        `twistauth.redisconn` and `twistauth.bus._subscriber`).
    :param key: the deployment key (32 bytes): messages are authenticated
        with a key derived from it, so every process must share it.
    :param reactor: connects and keeps time (``IReactorTCP`` and
        ``IReactorTime``; a test passes the real reactor).
    :param mode: ``"pattern"`` or ``"channel"`` (see the module).
    :param prefix: channel names start with it; letters, digits and ``:_.-``.
    :param connection: a txredisapi connection (from
        `twistauth.redisconn.connect`) to publish on; by default the bus
        makes its own.
    :param batch_size: the most local waiters woken per reactor turn.
    :param connect_timeout: seconds a connection attempt may take.
    :param command_timeout: seconds a Redis command may take (PUBLISH fails
        with `BackendUnavailableError` after it).
    :param ping_interval: seconds between health pings on the subscriber.
    :param min_retry_delay: seconds before the subscriber's first reconnect.
    :param max_retry_delay: the most seconds between reconnects.
    :param max_skew: messages timestamped further than this from the
        receiver's clock are dropped as stale (and ids are remembered for
        twice as long to drop repeats).
    :param claim_ttl: seconds a `notify` claim key lives in Redis.
    """

    def __init__(
        self,
        *,
        url: str,
        key: bytes,
        reactor: Any,
        mode: str = "pattern",
        prefix: str = "twistauth:bus:",
        connection: Any = None,
        batch_size: int = 256,
        connect_timeout: float = 2.0,
        command_timeout: float = 2.0,
        ping_interval: float = 15.0,
        min_retry_delay: float = 0.1,
        max_retry_delay: float = 5.0,
        max_skew: float = 300.0,
        claim_ttl: float = 60.0,
    ) -> None:
        if mode not in ("pattern", "channel"):
            raise ValueError(f"mode must be 'pattern' or 'channel', got {mode!r}")
        if not prefix or not set(prefix) <= _PREFIX_CHARS:
            raise ValueError("prefix must be letters, digits and ':_.-'")
        self.address = redisconn.parse_url(url)
        self.clock = reactor
        self.mode = mode
        self.prefix = prefix
        self._mac_key = derive_key(key)
        self._origin = secrets.token_hex(8)
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._max_retry_delay = max_retry_delay
        self._max_skew = max_skew
        self._claim_ms = int(claim_ttl * 1000)
        self._connection = connection
        self._own_connection = connection is None
        channel_mode = mode == "channel"
        self._local = MemoryBus(
            clock=reactor,
            batch_size=batch_size,
            on_first_waiter=self._first_waiter if channel_mode else None,
            on_last_waiter=self._last_waiter if channel_mode else None,
        )
        self._subscriber = Subscriber(
            address=self.address,
            reactor=reactor,
            on_message=self._received,
            on_ready=self._local.resumed,
            patterns=[] if channel_mode else [prefix + "*"],
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            ping_interval=ping_interval,
            min_retry_delay=min_retry_delay,
            max_retry_delay=max_retry_delay,
        )
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._counts: Dict[str, int] = dict.fromkeys(
            (
                "published",
                "publish_failed",
                "received",
                "dropped_forged",
                "dropped_malformed",
                "dropped_stale",
                "dropped_replayed",
                "claims_won",
            ),
            0,
        )

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect the publisher and the subscriber.

        :return: Deferred firing when the subscriber is first subscribed
            (waits work locally before that; a caller need not wait).
        """
        if self._connection is None:
            self._connection = redisconn.connect(
                self.address,
                connect_timeout=self._connect_timeout,
                reply_timeout=self._command_timeout + 1.0,
                max_retry_delay=self._max_retry_delay,
                reactor=self.clock,
            )
        log.info(
            "twistauth: bus: Redis {address}, {mode} subscription",
            address=self.address.redacted(),
            mode=self.mode,
        )
        return self._subscriber.start()

    def stop(self) -> Deferred[None]:
        """
        Disconnect (and close the publisher connection if the bus made it).
        """
        stopping = [self._subscriber.stop()]
        if self._own_connection and self._connection is not None:
            stopping.append(redisconn.disconnect(self._connection))
            self._connection = None
        d = gatherResults(stopping, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def ping(self, timeout: float) -> Deferred[bool]:
        """
        See `IBus.ping`: the subscriber is subscribed, and the publishing
        connection's server answers PING within ``timeout`` seconds.
        """
        if not self._subscriber.connected:
            return fail(
                BackendUnavailableError(
                    f"the bus is not subscribed to Redis at {self.address.redacted()}"
                )
            )
        if self._connection is None:
            return fail(BackendUnavailableError("the bus is not started"))
        d = redisconn.call(
            self.clock,
            timeout,
            self._connection.ping,
            what=f"Redis at {self.address.redacted()} (bus)",
        )
        return d.addCallback(lambda _: True)

    # -- waiting: local ---------------------------------------------------

    def wait_for_key(self, key: Key, timeout: Optional[float] = None) -> Deferred[Any]:
        """
        See `IBus.wait_for_key`.
        """
        return self._local.wait_for_key(key, timeout)

    def wait_for_keys(
        self, keys: Iterable[Key], timeout: Optional[float] = None
    ) -> Deferred[Tuple[Key, Any]]:
        """
        See `IBus.wait_for_keys`.
        """
        return self._local.wait_for_keys(keys, timeout)

    def listen(self, key: Key, callback: Callable[[Any], Any]) -> Any:
        """
        See `IBus.listen`.
        """
        return self._local.listen(key, callback)

    def listening(self, keys: Iterable[Key]) -> Deferred[None]:
        """
        See `IBus.listening`: at once in pattern mode; in channel mode once
        the server confirmed every key's subscription.
        """
        if self.mode == "pattern":
            return succeed(None)
        waits = [self._subscriber.confirmed(self.channel(k)) for k in check_keys(keys)]
        d = gatherResults(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def when_resumed(self, observer: Callable[[], Any]) -> Callable[[], None]:
        """
        See `IBus.when_resumed`: called after every (re)subscription.
        """
        return self._local.when_resumed(observer)

    def channel(self, key: Key) -> str:
        """
        The channel a key's notifications are published on.
        """
        return self.prefix + key_digest(key)

    def _first_waiter(self, key: Key) -> None:
        self._subscriber.subscribe(self.channel(key))

    def _last_waiter(self, key: Key) -> None:
        self._subscriber.unsubscribe(self.channel(key))

    # -- notifying: local at once, others through Redis --------------------

    def notify_all(self, key: Key, message: Any) -> Deferred[int]:
        """
        Wake this process's waiters of ``key`` and publish to the others.

        :return: Deferred firing with the number of *local* waiters woken
            (how many other processes wake how many is not known here), or
            failing with `BackendUnavailableError` if Redis did not take the
            message (the local waiters are woken all the same).
        """
        check_key(key)
        payload = json.loads(encode_message(message))
        count = self._local.wake_all(key, payload)
        d = self._publish(key, "all", payload, False)
        d.addCallback(lambda _: count)
        return d

    def notify(self, key: Key, message: Any) -> Deferred[bool]:
        """
        Wake at most one waiter of ``key`` in the deployment (see the
        module).

        :return: Deferred firing with ``True`` if a local waiter was woken,
            or if the message reached another process (which wakes one of its
            waiters if it has any); failing with `BackendUnavailableError`
            if Redis did not take it and no local waiter was woken.
        """
        check_key(key)
        payload = json.loads(encode_message(message))
        woken = self._local.wake_one(key, payload)
        d = self._publish(key, "one", payload, woken)

        def answered(receivers: int) -> bool:
            own = 1 if self._receives_own(key) else 0
            return woken or receivers > own

        def failed(failure: Failure) -> Any:
            return True if woken else failure

        return d.addCallbacks(answered, failed)

    def _receives_own(self, key: Key) -> bool:
        if not self._subscriber.connected:
            return False
        return self.mode == "pattern" or self._local.has_waiters(key) or key in self._local._listeners

    def _publish(self, key: Key, kind: str, payload: Any, taken: bool) -> Deferred[int]:
        channel = self.channel(key)
        body = json.dumps(
            {
                "v": 1,
                "n": kind,
                "o": self._origin,
                "i": secrets.token_hex(8),
                "t": self.clock.seconds(),
                "k": encode_key(key),
                "m": payload,
                "x": taken,
            },
            separators=(",", ":"),
        ).encode("ascii")
        wire = seal(self._mac_key, channel.encode("ascii"), body)
        if self._connection is None:
            self._counts["publish_failed"] += 1
            return fail(BackendUnavailableError("the bus is not started"))
        d = redisconn.call(
            self.clock, self._command_timeout, self._connection.publish, channel, wire,
            what="Redis (bus)",
        )

        def published(receivers: Any) -> int:
            self._counts["published"] += 1
            return int(receivers)

        def failed(failure: Failure) -> Failure:
            self._counts["publish_failed"] += 1
            log.warn("the bus could not publish: {why}", why=failure.getErrorMessage())
            return failure

        d.addCallbacks(published, failed)
        return d

    # -- receiving --------------------------------------------------------

    def _received(self, channel: Any, wire: Any) -> None:
        self._counts["received"] += 1
        if isinstance(channel, str):
            channel = channel.encode("utf-8", "replace")
        if isinstance(wire, str):
            wire = wire.encode("utf-8", "replace")
        if not isinstance(wire, bytes) or len(wire) > _MAX_WIRE:
            self._drop("malformed")
            return
        body = unseal(self._mac_key, channel, wire)
        if body is None:
            self._drop("forged")
            return
        try:
            message = json.loads(body)
            version, kind, origin, ident, sent = (
                message["v"], message["n"], message["o"], message["i"], message["t"],
            )
            if version != 1 or kind not in ("all", "one") or not isinstance(ident, str):
                raise ValueError("unknown form")
            key = decode_key(message["k"])
            payload = message["m"]
            taken = message.get("x") is True
            if self.channel(key).encode("ascii") != channel:
                raise ValueError("wrong channel")
            sent = float(sent)
        except (ValueError, KeyError, TypeError):
            self._drop("malformed")
            return
        if origin == self._origin:
            return  # our own: the local waiters were woken when it was sent
        now = self.clock.seconds()
        if abs(now - sent) > self._max_skew:
            self._drop("stale")
            return
        if self._seen_before(ident, now):
            self._drop("replayed")
            return
        if kind == "all":
            self._local.wake_all(key, payload)
            return
        self._local.tell_listeners(key, payload)
        if not taken and self._local.has_waiters(key):
            self._claim(ident, key, payload)

    def _drop(self, why: str) -> None:
        count = self._counts["dropped_" + why] + 1
        self._counts["dropped_" + why] = count
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: visible, never a flood
            log.warn(
                "the bus dropped a {why} message ({count} so far)", why=why, count=count
            )

    def _seen_before(self, ident: str, now: float) -> bool:
        seen = self._seen
        horizon = now - 2 * self._max_skew
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= horizon and len(seen) < _MAX_SEEN:
                break
            del seen[oldest]
        if ident in seen:
            return True
        seen[ident] = now
        return False

    def _claim(self, ident: str, key: Key, payload: Any) -> None:
        if self._connection is None:
            return
        d = redisconn.call(
            self.clock,
            self._command_timeout,
            self._connection.set,
            self.prefix + "claim:" + ident,
            self._origin,
            None,
            self._claim_ms,
            True,
            what="Redis (bus)",
        )

        def claimed(reply: Any) -> None:
            if reply in ("OK", b"OK"):
                self._counts["claims_won"] += 1
                self._local.wake_one(key, payload, listeners=False)

        def failed(failure: Failure) -> None:
            log.warn("the bus could not claim a notification: {why}", why=failure.getErrorMessage())

        d.addCallbacks(claimed, failed)

    # -- counters ---------------------------------------------------------

    def stats(self) -> Dict[str, int]:
        """
        `IBus.stats` plus the Redis counters: ``published``,
        ``publish_failed``, ``received``, ``dropped_forged``,
        ``dropped_malformed``, ``dropped_stale``, ``dropped_replayed``,
        ``claims_won``, ``connected`` (0 or 1) and ``connections`` (how many
        times the subscriber has subscribed).
        """
        stats = self._local.stats()
        stats.update(self._counts)
        stats["connected"] = int(self._subscriber.connected)
        stats["connections"] = self._subscriber.connections
        return stats


__all__ = ["RedisBus"]
