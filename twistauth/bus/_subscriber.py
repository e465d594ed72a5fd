"""
One reconnecting Redis pub/sub connection per process, which re-subscribes
by itself.

txredisapi's ``SubscriberProtocol`` speaks the protocol but forgets its
subscriptions when the connection drops, and a pub/sub connection is silent
when idle, so a half-open connection would go unnoticed forever.  This
module keeps the connection with Twisted's ``ClientService`` (capped
exponential backoff on the injected clock) through
`twistauth.redisconn.endpoint` (the server of a ``redis://`` URL, or the
master the Sentinels of a ``redis-sentinel://`` URL name), and on every new
connection: authenticates, checks that a server Sentinel named is the
master, re-issues every subscription, and only then reports that delivery
has resumed (so the caller re-checks durable state for what it may have
missed).  While connected it pings every ``ping_interval`` seconds and
drops a connection that does not answer within ``command_timeout``.

**The handshake is ours, not txredisapi's nor ClientService's.**  The
protocol is given no password: txredisapi's own ``AUTH`` closes the
connection on a refusal while ``ClientService`` still waits for it, and
ClientService's ``prepareConnection`` cannot reject a connection either
(losing it afterwards is an input its state machine has no transition for:
a ``NoTransition`` traceback per attempt).  So ClientService sees a TCP
connection, and the handshake runs on it: a refusal or a missed deadline
drops the connection like any loss, is logged once (never the password),
and the attempts go on with backoff (counted here: ClientService counts a
connection as a success), so a password put back heals the process.
``SELECT`` is not sent: pub/sub channels are not per database.

**Sentinel failover.**  When the Sentinels announce a failover of the
master or a new master, the connection is dropped and made again at once
(refused while the failover is under way, retried every 0.2 s at most), so
the subscriber follows the master the publishers write to.  Subscribing to
a master that was demoted would look healthy and receive nothing.

Every command has a deadline: txredisapi puts none on ``SUBSCRIBE``.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Optional, Set

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.defer import (
    Deferred,
    ensureDeferred,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth import redisconn
from twistauth._redisendpoint import first_line, role_name
from twistauth.redisconn import RedisAddress

log = Logger()

#: Seconds between attempts, at most, while Sentinel fails over.
FAILOVER_RETRY = 0.2


class _Refused(Exception):
    """
    The server answered the handshake with a refusal; the message says
    why, without the password.
    """


class _Protocol(txredisapi.SubscriberProtocol):
    """
    Hands every message to the `Subscriber`, and tells it when the
    connection is made (for the handshake) and lost.
    """

    subscriber: Subscriber

    def connectionMade(self) -> Any:
        # No password, no database: txredisapi marks it usable at once.
        d = txredisapi.SubscriberProtocol.connectionMade(self)
        self.subscriber._connected(self)
        return d

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

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber

    def buildProtocol(self, addr: Any) -> _Protocol:
        protocol = _Protocol(
            charset="utf-8",
            replyTimeout=None,
            password=None,  # the subscriber authenticates (see the module)
            dbid=None,  # pub/sub ignores databases
            convertNumbers=False,
        )
        protocol.factory = self
        protocol.subscriber = self.subscriber
        return protocol

    def stopTrying(self) -> None:
        """
        txredisapi calls this on ``QUIT`` (never sent here): keep trying.
        """

    def connectionError(self, why: str) -> None:
        """
        txredisapi's handshake failure report (never called: the
        subscriber handshakes itself).
        """


class Subscriber:
    """
    A reconnecting pub/sub connection.

    :param address: the Redis server, or the Sentinels that name it.
    :param reactor: connects (``IReactorTCP``) and keeps time.
    :param on_message: ``on_message(channel, payload)`` for each message;
        both are ``str`` or ``bytes``.
    :param on_ready: called each time the subscriptions are (re)established.
    :param patterns: patterns to ``PSUBSCRIBE`` on every connection.
    :param connect_timeout: seconds a connection attempt may take (TCP, and
        asking the Sentinels).
    :param command_timeout: seconds AUTH, ROLE, SUBSCRIBE and PING may take
        before the connection is dropped and made again.
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
        self.address = address
        self.clock: IReactorTime = reactor
        self._reactor = reactor
        self._on_message = on_message
        self._on_ready = on_ready
        self._patterns = list(patterns)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        self._min_retry_delay = min_retry_delay
        self._max_retry_delay = max(min_retry_delay, max_retry_delay)
        self._endpoint: Any = None
        self._service: Optional[ClientService] = None
        self._protocol: Optional[Any] = None
        self._handshaking: Optional[Any] = None
        self._channels: Set[str] = set()
        self._confirmed: Set[str] = set()
        self._confirming: Dict[str, List[Deferred[None]]] = {}
        self._ping: Optional[IDelayedCall] = None
        self._first_ready: List[Deferred[None]] = []
        self._stopping = False
        self._failures = 0
        self._problem: Optional[str] = None
        self.connections = 0

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start connecting.

        :return: Deferred firing when first subscribed.
        """
        self._stopping = False
        if self._service is None:
            endpoint = redisconn.endpoint(
                self.address, reactor=self._reactor, connect_timeout=self._connect_timeout
            )
            endpoint.on_failure = self._connect_failed
            endpoint.on_failover = self._failing_over
            endpoint.on_master_changed = self._master_changed
            self._endpoint = endpoint
            self._service = ClientService(
                endpoint, _Factory(self), retryPolicy=self._retry_delay, clock=self._reactor
            )
        self._service.startService()
        if self._protocol is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._first_ready.append(d)
        return d

    def stop(self) -> Deferred[None]:
        """
        Disconnect, stop reconnecting, and close the Sentinel connections.
        """
        self._stopping = True
        self._stop_ping()
        waiting, self._first_ready = self._first_ready, []
        for d in waiting:
            d.cancel()
        service, self._service = self._service, None
        endpoint, self._endpoint = self._endpoint, None
        stopping: List[Deferred[Any]] = []
        if service is not None:
            stopping.append(maybeDeferred(service.stopService))
        if endpoint is not None:
            stopping.append(endpoint.close())
        stopped: Deferred[None] = gatherResults(stopping, consumeErrors=True).addCallback(
            lambda _: None
        )
        return stopped

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

    def _retry_delay(self, attempt: int) -> float:
        """
        ClientService's retry policy: seconds before attempt ``attempt``
        (failed attempts in a row, by ClientService's count or by the
        handshake's, whichever is more), from ``min_retry_delay`` doubling
        up to ``max_retry_delay``, plus up to 20 % jitter; at most 0.2 s
        while Sentinel fails over (the new master is usually named within
        a second).
        """
        failed = max(attempt, self._failures, 1)
        delay = min(self._min_retry_delay * 2.0 ** min(failed - 1, 30), self._max_retry_delay)
        delay *= 1.0 + 0.2 * random.random()  # noqa: S311 (jitter, not a secret)
        endpoint = self._endpoint
        if endpoint is not None and endpoint.avoiding():
            delay = min(delay, FAILOVER_RETRY)
        return delay

    def _command_failed(self, failure: Failure, protocol: Any) -> None:
        """
        A command failed or timed out: drop the connection, reconnect, and
        re-subscribe everything.
        """
        if self._stopping:
            return
        log.warn(
            "the bus subscriber dropped its Redis connection: {why}",
            why=first_line(failure.value, self.address.password),
        )
        self._drop(protocol)

    def _drop(self, protocol: Any) -> None:
        transport = getattr(protocol, "transport", None)
        if transport is not None and protocol.connected:
            transport.abortConnection()

    def _report(self, problem: str) -> None:
        """
        An attempt failed: log why, once until it changes or is healed.
        """
        if self._stopping or problem == self._problem:
            return
        self._problem = problem
        log.warn(
            "the bus subscriber cannot subscribe at {address}: {problem}; retrying "
            "(at least every {retry:g} s)",
            address=self.address.redacted(),
            problem=problem,
            retry=self._max_retry_delay,
        )

    def _connect_failed(self, reason: str) -> None:
        """
        The endpoint could not connect (refused, no answer, no master).
        """
        self._report(reason)

    def _connected(self, protocol: Any) -> None:
        """
        A TCP connection to the server is made: authenticate, check the
        role, subscribe, within ``command_timeout`` each.
        """
        if self._stopping:
            self._drop(protocol)
            return
        self._handshaking = protocol
        d = ensureDeferred(self._handshake(protocol))
        d.addCallbacks(
            self._ready, self._handshake_failed, callbackArgs=(protocol,), errbackArgs=(protocol,)
        )

    async def _handshake(self, protocol: Any) -> List[str]:
        address = self.address
        try:
            if address.password is not None:
                reply = await self._deadline(
                    maybeDeferred(protocol.auth, address.password, address.username)
                )
                if isinstance(reply, Exception):
                    raise reply
            if address.sentinel:
                name = role_name(await self._deadline(maybeDeferred(protocol.role)))
                if name != "master":
                    raise _Refused(f"the server Sentinel named is a {name}, not the master")
        except txredisapi.ResponseError as e:
            text = first_line(e, address.password)
            if text.startswith(("NOAUTH", "WRONGPASS", "ERR invalid password", "ERR AUTH")):
                text = f"authentication failed: {text}"
            raise _Refused(text) from None
        commands = [
            self._deadline(maybeDeferred(protocol.psubscribe, pattern))
            for pattern in self._patterns
        ]
        channels = sorted(self._channels)
        self._confirmed.clear()
        commands += [
            self._deadline(maybeDeferred(protocol.subscribe, channel)) for channel in channels
        ]
        await gatherResults(commands, consumeErrors=True)
        return channels

    def _handshake_failed(self, failure: Failure, protocol: Any) -> None:
        if self._handshaking is protocol:
            self._handshaking = None
        if self._stopping:
            self._drop(protocol)
            return
        self._failures += 1
        value = failure.value
        if isinstance(value, defer.FirstError):  # of gatherResults
            value = value.subFailure.value
        if isinstance(value, _Refused):
            problem = str(value)
        elif isinstance(value, defer.TimeoutError):
            problem = f"connected, but no answer within {self._command_timeout:g} s"
        else:
            problem = f"lost while subscribing: {first_line(value, self.address.password)}"
        self._report(problem)
        self._drop(protocol)

    def _ready(self, channels: List[str], protocol: Any) -> None:
        """
        The handshake is done: delivery resumes.
        """
        if self._handshaking is protocol:
            self._handshaking = None
        if self._stopping or not protocol.connected:
            return
        self._protocol = protocol
        self._failures = 0
        if self._problem is not None:
            log.info(
                "the bus subscriber is subscribed again at {address}",
                address=self.address.redacted(),
            )
            self._problem = None
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

    # -- Sentinel ---------------------------------------------------------

    def _failing_over(self, reason: str) -> None:
        """
        Sentinel started failing over the master: leave it (what it
        receives from now on may never reach the new master's subscribers).
        """
        self._leave_master()

    def _master_changed(self) -> None:
        """
        Sentinel names another master: subscribe there, now, even when a
        retry was waiting out a backoff begun while the old one was down.
        """
        self._leave_master()
        service = self._service
        if service is not None and self._protocol is None and self._handshaking is None:
            service.stopService().addCallback(self._restart, service)

    def _restart(self, _: Any, service: ClientService) -> None:
        if service is self._service and not self._stopping:
            service.startService()

    def _leave_master(self) -> None:
        for protocol in (self._protocol, self._handshaking):
            if protocol is not None:
                self._drop(protocol)

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


__all__ = ["Subscriber"]
