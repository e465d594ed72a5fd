"""
Where a Redis connection goes: `RedisEndpoint` connects to the server of
a ``redis://`` address, or to the master the Sentinels of a
``redis-sentinel://`` address name, asked again before every attempt.

Sentinel failover and lost writes: when Sentinel promotes a replica, the
old master (if it is still running) goes on accepting writes until
Sentinel demotes it, about 10 s after the switch, and every write it
accepted in between is lost when it resyncs from the new master.  A logout
written there would be undone.  So the endpoint subscribes to every
Sentinel's events and:

- on ``+failover-state-select-slave`` (a failover of our master starts)
  tells its owner (``on_failover``: drop the connections, answer 503) and
  refuses to connect to that master;
- on ``+switch-master`` takes the new master, tells its owner
  (``on_master_changed``: drop connections, reconnect at once) and refuses
  the old one for a while (a Sentinel that has not heard of the switch yet
  may still name it);
- on ``-failover-abort-*`` connects to the old master again.

If the Sentinel event connection is down, the fallbacks remain: Sentinel
disconnects the old master's clients when it demotes it, and a
``READONLY`` answer drops the connection (`twistauth._redislink`).

Importing this module imports txredisapi (which installs the default
reactor).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twistauth.redisconn import RedisAddress

log = Logger()

Address = Tuple[str, int]

#: Seconds an address Sentinel is failing over from is refused (unless an
#: abort or a later switch names it first): longer than Sentinel takes to
#: demote it after the switch.
AVOID_SECONDS = 30.0

_FAILOVER_STARTS = "+failover-state-select-slave"
_SWITCH = "+switch-master"
_ABORTS = "-failover-abort-*"


def first_line(value: object, secret: Optional[str] = None) -> str:
    """
    The first line of ``str(value)`` (at most 200 characters), with
    ``secret`` masked: safe to log.
    """
    text = str(value)
    text = text.splitlines()[0] if text else type(value).__name__
    if secret:
        text = text.replace(secret, "***")
    return text[:200]


def role_name(reply: Any) -> Optional[str]:
    """
    The role (``"master"``, ``"slave"``, ...) in a ``ROLE`` reply.

    :raises Exception: the reply is an error.
    """
    if isinstance(reply, Exception):
        raise reply
    name = reply[0] if reply else None
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return None if name is None else str(name)


def describe_connect_failure(failure: Failure, timeout: float) -> str:
    """
    Why a connection attempt failed, briefly.
    """
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(error.TimeoutError, defer.TimeoutError):
        return f"no connection within {timeout:g} s (connect deadline)"
    if failure.check(error.DNSLookupError):
        return f"host name not found ({first_line(failure.value)})"
    if failure.check(txredisapi.MasterNotFoundError):
        text = str(failure.value)
        if text.startswith("No master found"):
            return "no Sentinel named a master that is up"
        return text
    return first_line(failure.value)


class _EventProtocol(txredisapi.SubscriberProtocol):
    """
    A Sentinel connection subscribed to the failover events.
    """

    endpoint: RedisEndpoint

    def connectionMade(self) -> Any:
        d = txredisapi.SubscriberProtocol.connectionMade(self)
        subscribed = defer.gatherResults(
            [self.subscribe([_FAILOVER_STARTS, _SWITCH]), self.psubscribe(_ABORTS)],
            consumeErrors=True,
        )
        subscribed.addErrback(lambda _: self.transport.loseConnection())
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.endpoint.sentinel_event(channel, message)


class _EventFactory(Factory):
    """
    Builds `_EventProtocol` (and stands in for the txredisapi factory it
    expects: Sentinels take no password, so nothing here is ever called).
    """

    noisy = False
    isLazy = True

    def __init__(self, endpoint: RedisEndpoint) -> None:
        self.endpoint = endpoint

    def buildProtocol(self, addr: Any) -> _EventProtocol:
        protocol = _EventProtocol(
            charset="utf-8", replyTimeout=None, password=None, dbid=None, convertNumbers=False
        )
        protocol.factory = self
        protocol.endpoint = self.endpoint
        return protocol

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        pass


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@implementer(IStreamClientEndpoint)
class RedisEndpoint:
    """
    Connects to the data server of a `RedisAddress` (see the module).

    :ivar on_failure: called with a description of every failed attempt.
    :ivar on_failover: called with a description when a Sentinel starts
        failing over our master.
    :ivar on_master_changed: called when the master changed.
    :ivar master: the master connected to last (Sentinel only).
    """

    def __init__(self, address: RedisAddress, *, reactor: Any, connect_timeout: float) -> None:
        self.address = address
        self._reactor = reactor
        self._timeout = connect_timeout
        self.on_failure: Optional[Callable[[str], None]] = None
        self.on_failover: Optional[Callable[[str], None]] = None
        self.on_master_changed: Optional[Callable[[], None]] = None
        self.master: Optional[Address] = None
        self._avoid: Dict[Address, float] = {}
        self._sentinel: Any = None
        self._watchers: List[ClientService] = []
        self._closed = False

    def __repr__(self) -> str:
        # (ClientService logs it with every retry: never the password)
        return f"<RedisEndpoint {self.address.redacted()}>"

    # -- connecting ------------------------------------------------------

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        if not self.address.sentinel:
            host, port = self.address.hosts[0]
            d = self._endpoint(host, port).connect(protocolFactory)
        else:
            self._watch()
            d = self._sentinels().discover_master(self.address.service_name)
            d.addCallback(self._connect_master, protocolFactory)

        def failed(failure: Failure) -> Failure:
            if not failure.check(defer.CancelledError) and self.on_failure is not None:
                self.on_failure(describe_connect_failure(failure, self._timeout))
            return failure

        return d.addErrback(failed)

    def _connect_master(self, master: Tuple[Any, Any], protocolFactory: Any) -> Any:
        host, port = _text(master[0]), int(master[1])
        if self.avoiding((host, port)):
            raise txredisapi.MasterNotFoundError(
                f"Sentinel is failing over from {host}:{port}; waiting for the new master"
            )
        self._new_master(host, port, "Sentinel names")
        return self._endpoint(host, port).connect(protocolFactory)

    def _sentinels(self) -> Any:
        """
        txredisapi's Sentinel client (connections to every Sentinel, made
        on first use), which names the master.
        """
        if self._sentinel is None:
            self._sentinel = txredisapi.Sentinel(
                list(self.address.hosts),
                connectTimeout=self._timeout,
                replyTimeout=max(self._timeout, 1.0),
                convertNumbers=False,
            )
            # Seconds to wait for a Sentinel to name a master that is up.
            self._sentinel.discovery_timeout = max(self._timeout, 1.0)
        return self._sentinel

    def _endpoint(self, host: str, port: int) -> Any:
        # HostnameEndpoint reports a refused connection only after its
        # 0.3 s Happy Eyeballs delay: for an address, connect directly, so
        # a stopped Redis is known (and calls fail fast) in a millisecond.
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)

    # -- failovers -------------------------------------------------------

    def avoiding(self, address: Optional[Address] = None) -> bool:
        """
        Whether a failover makes ``address`` (or, by default, any address)
        one not to connect to now.
        """
        now = self._reactor.seconds()
        for avoided, until in list(self._avoid.items()):
            if until <= now:
                del self._avoid[avoided]
        if address is None:
            return bool(self._avoid)
        return address in self._avoid

    def _new_master(self, host: str, port: int, how: str) -> None:
        changed = self.master is not None and self.master != (host, port)
        self.master = (host, port)
        if changed:
            log.warn(
                "twistauth: Redis at {address}: {how} a new master, {host}:{port}",
                address=self.address.redacted(),
                how=how,
                host=host,
                port=port,
            )
            if self.on_master_changed is not None:
                self.on_master_changed()

    def sentinel_event(self, channel: Any, message: Any) -> None:
        """
        A Sentinel published ``message`` on ``channel``: a failover of our
        master started (``master <name> <ip> <port>``), switched
        (``<name> <old ip> <old port> <new ip> <new port>``) or was aborted
        (``master <name> <ip> <port>``).
        """
        channel, parts = _text(channel), _text(message).split()
        service = self.address.service_name
        if channel == _SWITCH:
            if len(parts) != 5 or parts[0] != service or not parts[2].isdigit():
                return
            if not parts[4].isdigit():
                return
            old, new = (parts[1], int(parts[2])), (parts[3], int(parts[4]))
            self._avoid.pop(new, None)
            self._avoid[old] = self._reactor.seconds() + AVOID_SECONDS
            self._new_master(new[0], new[1], "a Sentinel announces")
            return
        if len(parts) < 4 or parts[0] != "master" or parts[1] != service:
            return
        if not parts[3].isdigit():
            return
        master = (parts[2], int(parts[3]))
        if channel == _FAILOVER_STARTS:
            if self.avoiding(master):
                return  # several Sentinels: heard already
            self._avoid[master] = self._reactor.seconds() + AVOID_SECONDS
            reason = f"Sentinel is failing over from {master[0]}:{master[1]}"
            log.warn(
                "twistauth: Redis at {address}: {reason}: calls answer 503 until the new "
                "master is announced",
                address=self.address.redacted(),
                reason=reason,
            )
            if self.on_failover is not None:
                self.on_failover(reason)
        elif channel.startswith("-failover-abort-") and self._avoid.pop(master, None):
            log.warn(
                "twistauth: Redis at {address}: Sentinel gave up failing over "
                "({event}); back to {host}:{port}",
                address=self.address.redacted(),
                event=channel,
                host=master[0],
                port=master[1],
            )
            if self.on_master_changed is not None:
                self.on_master_changed()

    def _watch(self) -> None:
        """
        Follow every Sentinel's failover events (once).
        """
        if self._watchers or self._closed:
            return
        for host, port in self.address.hosts:
            service = ClientService(
                self._endpoint(host, port),
                _EventFactory(self),
                retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=5.0),
                clock=self._reactor,
            )
            service.startService()
            self._watchers.append(service)

    def close(self) -> defer.Deferred[None]:
        """
        Close the Sentinel connections (nothing to do for a plain server).
        """
        self._closed = True
        stopping = [defer.maybeDeferred(w.stopService) for w in self._watchers]
        if self._sentinel is not None:
            stopping.append(defer.maybeDeferred(self._sentinel.disconnect))
        self._watchers = []
        d = defer.gatherResults(stopping, consumeErrors=True)
        return d.addBoth(lambda _: None)
