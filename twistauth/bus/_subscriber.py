"""
One reconnecting Redis pub/sub connection per process, which re-subscribes
by itself.

txredisapi's ``SubscriberProtocol`` speaks the protocol but forgets its
subscriptions when the connection drops, and a pub/sub connection is silent
when idle, so a half-open connection would go unnoticed forever.  This
module keeps the connection with Twisted's ``ClientService`` (capped
exponential backoff on the injected clock), and on every new connection:
authenticates, re-issues every subscription, and only then reports that
delivery has resumed (so the caller re-checks durable state for what it
may have missed).  While connected it pings every ``ping_interval`` seconds
and drops a connection that does not answer within ``command_timeout``.

Every command has a deadline: txredisapi puts none on ``SUBSCRIBE``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.redisconn import RedisAddress

log = Logger()


class _Protocol(txredisapi.SubscriberProtocol):
    """
    Hands every message to the `Subscriber`, and tells it when the
    connection is lost.
    """

    subscriber: Subscriber

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.subscriber._message(channel, message)

    def connectionLost(self, why: Any) -> None:
        try:
            super().connectionLost(why)
        finally:
            self.subscriber._lost(self)


class _Factory(Factory):
    """
    Builds `_Protocol` and stands in for the txredisapi factory the
    protocol expects (``stopTrying``, ``connectionError``, ``isLazy``).
    """

    isLazy = True
    noisy = False

    def __init__(self, subscriber: Subscriber, address: RedisAddress) -> None:
        self.subscriber = subscriber
        self.address = address

    def buildProtocol(self, addr: Any) -> _Protocol:
        protocol = _Protocol(
            charset="utf-8",
            replyTimeout=None,
            password=self.address.password,
            dbid=None,  # pub/sub ignores databases
            convertNumbers=False,
            username=self.address.username,
        )
        protocol.factory = self
        protocol.subscriber = self.subscriber
        return protocol

    def stopTrying(self) -> None:
        """
        txredisapi calls this when AUTH fails.  Keep trying (with backoff): a
        password rotated on the server heals without a restart.
        """

    def connectionError(self, why: str) -> None:
        log.error("the bus subscriber cannot use Redis: {why}", why=why)


class Subscriber:
    """
    A reconnecting pub/sub connection.

    :param address: the Redis server (a plain ``redis://`` address).
    :param reactor: connects (``IReactorTCP``) and keeps time.
    :param on_message: ``on_message(channel, payload)`` for each message;
        both are ``str`` or ``bytes``.
    :param on_ready: called each time the subscriptions are (re)established.
    :param patterns: patterns to ``PSUBSCRIBE`` on every connection.
    :param connect_timeout: seconds a connection attempt may take.
    :param command_timeout: seconds AUTH, SUBSCRIBE and PING may take before
        the connection is dropped and made again.
    :param ping_interval: seconds between health pings while connected.
    :param min_retry_delay: seconds before the first reconnection attempt.
    :param max_retry_delay: the most seconds between attempts.
    """

    def __init__(
        self,
        *,
        address: RedisAddress,
        reactor: Any,
        on_message: Callable[[Any, Any], None],
        on_ready: Callable[[], None],
        patterns: List[str],
        connect_timeout: float,
        command_timeout: float,
        ping_interval: float,
        min_retry_delay: float,
        max_retry_delay: float,
    ) -> None:
        if address.sentinel:
            raise ValueError("the Redis bus needs a redis:// URL (Sentinel is not supported)")
        host, port = address.hosts[0]
        self.clock: IReactorTime = reactor
        self._on_message = on_message
        self._on_ready = on_ready
        self._patterns = list(patterns)
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        self._service = ClientService(
            endpoint,
            _Factory(self, address),
            retryPolicy=backoffPolicy(
                initialDelay=min_retry_delay, maxDelay=max_retry_delay, factor=2.0
            ),
            clock=reactor,
            prepareConnection=self._prepare,
        )
        self._protocol: Optional[Any] = None
        self._channels: Set[str] = set()
        self._confirmed: Set[str] = set()
        self._confirming: Dict[str, List[Deferred[None]]] = {}
        self._ping: Optional[IDelayedCall] = None
        self._first_ready: List[Deferred[None]] = []
        self._stopping = False
        self.connections = 0

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start connecting.

        :return: Deferred firing when first subscribed.
        """
        self._stopping = False
        self._service.startService()
        if self._protocol is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._first_ready.append(d)
        return d

    def stop(self) -> Deferred[None]:
        """
        Disconnect and stop reconnecting.
        """
        self._stopping = True
        self._stop_ping()
        waiting, self._first_ready = self._first_ready, []
        for d in waiting:
            d.cancel()
        d = self._service.stopService()
        return d if d is not None else succeed(None)

    @property
    def connected(self) -> bool:
        """
        Whether the subscriptions are established now.
        """
        return self._protocol is not None

    # -- subscriptions ----------------------------------------------------

    def subscribe(self, channel: str) -> Deferred[None]:
        """
        Subscribe to ``channel`` now and after every reconnect.

        :return: Deferred firing once the server confirmed it, or at once if
            disconnected (the subscription is made on reconnection, and
            ``on_ready`` reports it).
        """
        self._channels.add(channel)
        if self._protocol is None:
            return succeed(None)
        return self._send_subscribe(self._protocol, channel)

    def unsubscribe(self, channel: str) -> None:
        """
        Stop subscribing to ``channel``.
        """
        self._channels.discard(channel)
        self._confirmed.discard(channel)
        if self._protocol is not None:
            self.unsubscribe_now(self._protocol, channel)

    def unsubscribe_now(self, protocol: Any, channel: str) -> None:
        d = self._deadline(maybeDeferred(protocol.unsubscribe, channel))
        d.addErrback(self._command_failed, protocol)

    def confirmed(self, channel: str) -> Deferred[None]:
        """
        A Deferred firing once ``channel``'s subscription is confirmed, or at
        once if it is, or if disconnected.
        """
        if self._protocol is None or channel in self._confirmed:
            return succeed(None)
        pending = self._confirming.get(channel)
        if pending is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        pending.append(d)
        return d

    def _send_subscribe(self, protocol: Any, channel: str) -> Deferred[None]:
        self._confirmed.discard(channel)
        waiting: List[Deferred[None]] = []
        self._confirming[channel] = waiting  # confirmed() waits for the latest
        d = self._deadline(maybeDeferred(protocol.subscribe, channel))

        def release() -> None:
            if self._confirming.get(channel) is waiting:
                del self._confirming[channel]
            for w in waiting:
                if not w.called:
                    w.callback(None)

        def done(_: Any) -> None:
            if channel in self._channels and self._protocol is protocol:
                self._confirmed.add(channel)
            release()

        def failed(failure: Failure) -> None:
            release()  # the reconnection's on_ready covers it
            self._command_failed(failure, protocol)

        d.addCallbacks(done, failed)
        result: Deferred[None] = Deferred()
        waiting.append(result)
        return result

    # -- the connection ---------------------------------------------------

    def _deadline(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(self._command_timeout, self.clock)

    def _command_failed(self, failure: Failure, protocol: Any) -> None:
        """
        A command failed or timed out: drop the connection, reconnect, and
        re-subscribe everything.
        """
        if self._stopping:
            return
        log.warn(
            "the bus subscriber dropped its Redis connection: {why}",
            why=failure.getErrorMessage(),
        )
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _prepare(self, protocol: Any) -> Deferred[None]:
        """
        ClientService's prepareConnection: authenticate, subscribe
        everything, then report delivery resumed.
        """

        def subscribe_all(_: Any) -> Deferred[Any]:
            commands = [
                self._deadline(maybeDeferred(protocol.psubscribe, pattern))
                for pattern in self._patterns
            ]
            channels = sorted(self._channels)
            self._confirmed.clear()
            commands += [
                self._deadline(maybeDeferred(protocol.subscribe, channel))
                for channel in channels
            ]
            d = gatherResults(commands, consumeErrors=True)
            d.addCallback(lambda _: channels)
            return d

        def ready(channels: List[str]) -> None:
            self._protocol = protocol
            self._confirmed.update(c for c in channels if c in self._channels)
            # Channels asked for, or given up, while this connection was
            # being prepared.
            for channel in self._channels - set(channels):
                self._send_subscribe(protocol, channel)
            for channel in set(channels) - self._channels:
                self.unsubscribe_now(protocol, channel)
            self.connections += 1
            self._schedule_ping()
            waiting, self._first_ready = self._first_ready, []
            for d in waiting:
                d.callback(None)
            self._on_ready()

        def failed(failure: Failure) -> Failure:
            self._command_failed(failure, protocol)
            return failure

        d = self._deadline(protocol.whenConnected())
        d.addCallback(subscribe_all)
        d.addCallbacks(ready, failed)
        return d

    def _lost(self, protocol: Any) -> None:
        if self._protocol is not None and self._protocol.transport is protocol.transport:
            self._protocol = None
            self._stop_ping()
            self._confirmed.clear()
            waiting, self._confirming = self._confirming, {}
            for pending in waiting.values():
                for d in pending:
                    if not d.called:
                        d.callback(None)
            if not self._stopping:
                log.warn("the bus subscriber lost its Redis connection; reconnecting")

    def _message(self, channel: Any, payload: Any) -> None:
        try:
            self._on_message(channel, payload)
        except Exception:
            log.failure("the bus failed to handle a message")

    # -- health -----------------------------------------------------------

    def _schedule_ping(self) -> None:
        self._stop_ping()
        self._ping = self.clock.callLater(self._ping_interval, self._send_ping)

    def _stop_ping(self) -> None:
        if self._ping is not None and self._ping.active():
            self._ping.cancel()
        self._ping = None

    def _send_ping(self) -> None:
        self._ping = None
        protocol = self._protocol
        if protocol is None:
            return
        d = self._deadline(maybeDeferred(protocol.ping))

        def answered(_: Any) -> None:
            if self._protocol is protocol:
                self._schedule_ping()

        d.addCallbacks(answered, self._command_failed, errbackArgs=(protocol,))
