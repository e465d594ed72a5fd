"""
The txredisapi machinery behind `twistauth.redisconn.connect`: a factory
and a protocol that keep one Redis connection (pool) alive and say how it
is doing.

What txredisapi 1.6 does on its own, and what this module changes:

- A rejected password (or database) makes txredisapi stop reconnecting for
  good (``stopTrying``): a Redis restarted with a changed password would
  need every twistauth process restarted.  Here the handshake is ours: a
  refusal is recorded (`LinkHealth` ``auth_failed``), logged once, and the
  connection is tried again with backoff, so putting the password back
  heals every process.
- A connection counts as usable once the server has answered (``AUTH``,
  ``SELECT``, ``ROLE`` or ``PING``) within the connect deadline, not when
  TCP connects: a server that accepts and never answers is unavailable.
- While Redis is down txredisapi queues every call until it reconnects;
  here, once a connection attempt has failed, calls fail at once
  (``txredisapi.ConnectionError``, which `twistauth.redisconn.call` turns
  into a 503) while reconnection goes on in the background.
- Sentinel (`twistauth._redisendpoint` finds the master): the connection
  is dropped when a failover starts or the master changes, and when its
  server answers ``READONLY`` (a master demoted while we stayed
  connected), so the next attempt finds the new master.

Importing this module imports txredisapi (which installs the default
reactor): `twistauth.redisconn` imports it only when a connection is made.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth._redisendpoint import RedisEndpoint, first_line, role_name
from twistauth.redisconn import (
    AUTH_FAILED,
    REFUSED,
    UNAVAILABLE,
    LinkHealth,
    RedisAddress,
    _Deadlines,
)

log = Logger()

#: Redis error replies to the handshake that mean "not with this password".
_AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "ERR invalid password", "ERR AUTH", "ERR Client sent AUTH")


class _HandshakeError(Exception):
    """
    The server answered the handshake with a refusal, or not at all.

    :ivar state: the `LinkHealth` state it leads to.
    """

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


class _Protocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol with twistauth's handshake: authenticate, select
    the database, check the role (Sentinel) or ping, all within the
    connect deadline; a refusal is reported to the factory instead of
    stopping reconnection.
    """

    factory: _Factory

    def connectionMade(self) -> defer.Deferred[Any]:
        factory = self.factory
        d = defer.ensureDeferred(self._handshake(factory.address))
        d.addTimeout(factory.handshake_timeout, factory.clock)

        def ready(_: Any) -> Any:
            # The base class marks the connection usable (no password or
            # database is given to it: the handshake is done).
            return txredisapi.RedisProtocol.connectionMade(self)

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, _HandshakeError):
                state, reason = failure.value.state, failure.value.reason
            elif failure.check(defer.TimeoutError):
                state = UNAVAILABLE
                reason = (
                    f"connected, but no answer within {factory.handshake_timeout:g} s "
                    "(connect deadline)"
                )
            else:
                state = UNAVAILABLE
                reason = f"lost while connecting: {first_line(failure.value, None)}"
            factory.attempt_failed(state, reason)
            if self.connected and self.transport is not None:
                self.transport.abortConnection()

        return d.addCallbacks(ready, failed)

    async def _handshake(self, address: RedisAddress) -> None:
        password = address.password
        if password is not None:
            try:
                reply = await self.auth(password, address.username)
                if isinstance(reply, Exception):
                    raise reply
            except txredisapi.ResponseError as e:
                raise _HandshakeError(
                    AUTH_FAILED, f"authentication failed: {first_line(e, password)}"
                ) from None
        if address.db:
            try:
                reply = await self.select(address.db)
                if isinstance(reply, Exception):
                    raise reply
            except txredisapi.ResponseError as e:
                raise self._refusal(e, f"database {address.db} refused", REFUSED) from None
        try:
            if self.factory.expect_master:
                name = role_name(await self.role())
                if name != "master":
                    raise _HandshakeError(
                        UNAVAILABLE, f"the server Sentinel named is a {name}, not the master"
                    )
            elif address.password is None and not address.db:
                # Nothing answered yet: make sure the server does.
                reply = await self.ping()
                if isinstance(reply, Exception):
                    raise reply
        except txredisapi.ResponseError as e:
            raise self._refusal(e, "the server refused", UNAVAILABLE) from None

    def _refusal(self, e: Exception, what: str, state: str) -> _HandshakeError:
        """
        What a Redis error reply to the handshake means: a password problem
        whatever the command, else ``state`` for an ``ERR`` (a wrong
        database), else unavailable for now (``LOADING``, ``MASTERDOWN``...).
        """
        text = first_line(e, self.factory.address.password)
        if text.startswith(_AUTH_REPLIES):
            return _HandshakeError(AUTH_FAILED, f"authentication failed: {text}")
        if text.startswith("ERR"):
            return _HandshakeError(state, f"{what}: {text}")
        return _HandshakeError(UNAVAILABLE, f"{what}: {text}")

    # -- the reply watchdog ----------------------------------------------
    #
    # txredisapi's own reply timeout is per command and cancelled with the
    # command: a caller whose deadline (`twistauth.redisconn.call`) is
    # shorter cancels it every time, so a server that stopped answering was
    # never dropped.  This one watches the connection instead: commands are
    # outstanding and nothing has come back for ``reply_timeout`` seconds →
    # drop it (reconnection then shows whether the server answers).

    _stall: Any = None
    _progress: float = 0.0

    # The timer is lazy: a reply only records the time (no timer is made
    # or cancelled per command); when the timer fires it looks at how long
    # the connection has been silent and waits again for the rest.

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        idle = not self.replyQueue.waiting
        d = txredisapi.RedisProtocol.execute_command(self, *args, **kwargs)
        if self._ready:
            self._watch(idle)
        return d

    def send_encoded(self, command: bytes) -> defer.Deferred[Any]:
        """
        Send one command already encoded in RESP (``command`` is its whole
        ``*<n>`` array) and answer its reply.

        The lean path of `twistauth.redisconn.run_script`: txredisapi's
        `execute_command` encodes every argument generically and chains two
        more Deferreds and three callbacks to each reply; here the caller
        encodes (a script's ``EVALSHA`` prefix is encoded once) and gets the
        reply queue's own Deferred.  Replies stay in order with the
        commands txredisapi sends on this connection: both wait in the same
        ``replyQueue``.  The connection must be one txredisapi would hand
        out for a non-blocking command (in the pool: not in a transaction
        or a pipeline, whose commands txredisapi buffers or counts).

        :return: Deferred firing with the reply, or failing with it when
            Redis answered with an error (as txredisapi's commands do).  A
            caller that gives up on it must leave it in place (its reply
            is the next one to come) and ignore its result.
        :raises txredisapi.ConnectionError: the connection is closed.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        queue = self.replyQueue
        idle = not queue.waiting
        self.transport.write(command)
        d: defer.Deferred[Any] = queue.get()
        d.addCallback(self.handle_reply)
        if self._ready:
            self._watch(idle)
        return d

    def _watch(self, idle: bool) -> None:
        """
        A command was sent: start the watch if none is running, and count
        the silence from now if nothing else was awaited (``idle``).
        """
        if idle:
            self._progress = self.factory.clock.seconds()  # silence starts now
        if self._stall is None:
            self._stall = self.factory.clock.callLater(self.factory.reply_timeout, self._stalled)

    def _stalled(self) -> None:
        self._stall = None
        if not (self.replyQueue.waiting and self.connected and self.transport is not None):
            return  # nothing awaited: the next command starts a new watch
        silent = self.factory.clock.seconds() - self._progress
        if silent < self.factory.reply_timeout:
            self._stall = self.factory.clock.callLater(
                self.factory.reply_timeout - silent, self._stalled
            )
            return
        log.warn(
            "twistauth: Redis at {address}: no answer for {seconds:g} s; dropping the connection",
            address=self.factory.address.redacted(),
            seconds=self.factory.reply_timeout,
        )
        self.transport.abortConnection()

    def connectionLost(self, why: Any) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        txredisapi.RedisProtocol.connectionLost(self, why)

    def replyReceived(self, reply: Any) -> None:
        txredisapi.RedisProtocol.replyReceived(self, reply)
        if self._stall is not None:
            self._progress = self.factory.clock.seconds()  # progress: silence starts again
        if (
            self.factory.expect_master
            and isinstance(reply, txredisapi.ResponseError)
            and str(reply).startswith("READONLY")
            and self.transport is not None
        ):
            log.warn(
                "twistauth: Redis at {address}: the master was demoted (READONLY): "
                "asking Sentinel again",
                address=self.factory.address.redacted(),
            )
            self.transport.loseConnection()


class _Handler(txredisapi.ConnectionHandler):
    """
    txredisapi's connection handler, whose command wrappers name their
    factory (``connection.get._twistauth_factory``): `twistauth.redisconn.call`
    finds the connection's error listener through it.

    Each command's wrapper is made once and kept: txredisapi's hold no
    per-call state, and ``connection.get`` is then a plain attribute (about
    30 ns instead of 0.5 µs for a new wrapper per call).
    """

    def __getattr__(self, method: str) -> Any:
        wrapper = txredisapi.ConnectionHandler.__getattr__(self, method)
        wrapper._twistauth_factory = self._factory
        if not method.startswith("_"):  # (not probes such as __deepcopy__)
            self.__dict__[method] = wrapper
        return wrapper


class _Factory(txredisapi.RedisFactory):
    """
    A txredisapi connection pool factory that keeps trying whatever the
    server says, reports to a `LinkHealth`, and fails calls at once while
    the connection is known to be down.
    """

    protocol = _Protocol

    def __init__(
        self,
        *,
        address: RedisAddress,
        health: LinkHealth,
        clock: Any,
        pool_size: int,
        reply_timeout: float,
        handshake_timeout: float,
        max_retry_delay: float,
        expect_master: bool,
    ) -> None:
        # No password or database for txredisapi: `_Protocol` handshakes;
        # no reply timeout either: `_Protocol` watches replies itself.
        super().__init__(
            None,
            None,
            pool_size,
            False,  # isLazy: only decides whether txredisapi logs refusals itself
            _Handler,
            "utf-8",
            None,
            None,
            False,  # convertNumbers: "007" stays "007"
            None,
        )
        self.reply_timeout = reply_timeout
        self.address = address
        self.health = health
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.expect_master = expect_master
        self.maxDelay = max_retry_delay
        self.initialDelay = min(0.5, max_retry_delay)
        self.endpoint: Optional[RedisEndpoint] = None
        #: Called with a short kind for every failed `twistauth.redisconn.call`
        #: and `twistauth.redisconn.run_script` (`twistauth.redisconn.set_error_listener`).
        self.error_listener: Optional[Callable[[str], None]] = None
        #: The deadlines of the `twistauth.redisconn.run_script` calls on
        #: this pool, by the clock they run on (one lazy timer per clock).
        self.script_deadlines: Dict[Any, _Deadlines] = {}

    def retryDelay(self, attempt: int) -> float:
        """
        Seconds before connection attempt ``attempt`` (1 = the first after a
        loss or failure): the first at once (a restart or a failover is the
        likely cause, and a refusal then makes calls fail fast), then
        exponential backoff from ``initialDelay`` up to ``maxDelay``.
        txredisapi counts connections that never became usable (a refused
        password), so those back off too.
        """
        if attempt <= 1:
            return 0.0
        delay = float(super().retryDelay(attempt - 1))
        if self.endpoint is not None and self.endpoint.avoiding():
            # A Sentinel failover is under way: look for the new master
            # often (each attempt is one question to each Sentinel).
            return min(delay, 0.2)
        return delay

    def getConnection(self, peek: bool = False) -> defer.Deferred[Any]:
        if not self.size and self.health.fails_fast:
            # Fail at once, but on a later reactor turn: a caller retrying
            # in a loop still lets the reactor reconnect in between.
            d: defer.Deferred[Any] = defer.Deferred()
            reason = txredisapi.ConnectionError(f"Not connected: {self.health.reason}")
            self.clock.callLater(0, d.errback, reason)
            return d
        return super().getConnection(peek)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.health.connected()

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if not self.size and not self.disconnectCalled:
            self.health.lost()

    def attempt_failed(self, state: str, reason: str) -> None:
        """
        A connection attempt failed (``state`` says how): record it and, with
        no connection left, fail the calls waiting for one.
        """
        if self.disconnectCalled or self.size:
            # (another connection of the pool still works: it serves the
            # calls while this slot retries)
            return
        self.health.failed(state, reason)
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        queue = self.connectionQueue
        waiting: List[defer.Deferred[Any]] = list(queue.waiting) + list(queue.peekers)
        del queue.waiting[:]
        queue.peekers = []
        for d in waiting:
            d.errback(txredisapi.ConnectionError(f"Not connected: {self.health.reason}"))

    def failing_over(self, reason: str) -> None:
        """
        Sentinel started failing over our master: stop using it now (what
        it accepts from here on may be lost) and fail calls at once until
        the new master answers.
        """
        self.health.failed(UNAVAILABLE, reason)
        self.drop_connections()
        self._fail_waiting()

    def drop_connections(self) -> None:
        """
        Abort every pooled connection (a health probe found it stalled, or
        Sentinel names another master): reconnection follows at once, and
        shows whether the server is reachable.
        """
        for conn in list(self.pool):
            if conn.transport is not None:
                conn.transport.abortConnection()

    def master_changed(self) -> None:
        """
        Sentinel names another master: drop the connections to the old one,
        and try the new one now in every slot that was waiting out a
        backoff (it began while the old master was down, and would keep the
        pool failing fast for seconds after the new one is up).
        """
        self.drop_connections()
        for slot in self.slots:
            if slot.protocol is None and slot.reconnect:
                slot.service.stopService().addCallback(_restart, slot)

    def disconnect(self) -> defer.Deferred[Any]:
        self.health.closed()
        closing = [super().disconnect()]
        if self.endpoint is not None:
            closing.append(self.endpoint.close())
        d = defer.gatherResults(closing, consumeErrors=True)
        d.addBoth(self._closed)
        return d

    def _closed(self, result: Any) -> Any:
        # Every connection is closed, so every script call has failed: no
        # deadline timer may outlive the pool (on a test's reactor either).
        for deadlines in self.script_deadlines.values():
            deadlines.stop()
        return result


def _restart(_: Any, slot: Any) -> None:
    if slot.reconnect:  # not stopped for good meanwhile
        slot.service.startService()


def make_factory(
    address: RedisAddress,
    *,
    reactor: Any,
    connect_timeout: float,
    reply_timeout: float,
    pool_size: int,
    max_retry_delay: float,
) -> _Factory:
    """
    Start a connection pool to ``address``: see `twistauth.redisconn.connect`.
    """
    health = LinkHealth(address=address, clock=reactor, retry_every=max_retry_delay)
    factory = _Factory(
        address=address,
        health=health,
        clock=reactor,
        pool_size=pool_size,
        reply_timeout=reply_timeout,
        handshake_timeout=connect_timeout,
        max_retry_delay=max_retry_delay,
        expect_master=address.sentinel,
    )
    endpoint = RedisEndpoint(address, reactor=reactor, connect_timeout=connect_timeout)
    endpoint.on_failure = lambda reason: factory.attempt_failed(UNAVAILABLE, reason)
    endpoint.on_master_changed = factory.master_changed
    endpoint.on_failover = factory.failing_over
    factory.endpoint = endpoint
    factory.startConnecting(endpoint)
    return factory
