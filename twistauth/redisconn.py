"""
Redis connections, made one way for every room that uses Redis (sessions,
the bus, stores).

Five things, each easy to get wrong with txredisapi:

- `parse_url` reads ``redis://[[user]:password@]host[:port][/db]`` and
  ``redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``
  into a `RedisAddress` (the password is the data server's, percent-encoded
  if it holds ``@ : / ,`` or ``%``; Sentinels themselves are reached without
  one).
- `connect` makes a lazy txredisapi connection (it returns at once and
  connects in the background, reconnecting forever, with capped backoff)
  with ``convertNumbers=False`` (else ``"007"`` comes back as ``7``), a
  connect deadline that covers the TCP connect and the server's first
  answer (so a blackholed server is noticed), and a reply watchdog (which
  drops a connection whose server stopped answering, even when every call
  gave up first).  A refused password
  does not stop it (txredisapi alone stops reconnecting for good): it
  keeps trying, so restoring the password heals the process.  Through
  Sentinel it follows failovers (`_redislink` and `_redisendpoint` have
  the machinery).
- `call` puts a deadline on one Redis call and turns every way Redis can be
  unavailable (down, unreachable, hung, still loading its data, read-only
  after a failover, a rejected password) into
  `twistauth.errors.BackendUnavailableError` (or a subclass the caller
  names), so callers answer 503 instead of mistaking an outage for "no
  data".  While a connection is known to be down (its last attempt failed,
  or the password was refused) calls fail at once; while it is merely
  (re)connecting they wait, at most ``timeout`` seconds.
- `run_script` runs a Lua `Script` with the same contract as `call`, for
  a fraction of the CPU: txredisapi spends about six Deferreds, fifteen
  callbacks, a timer, a SHA1 of the source and a generic encoding of every
  argument on each ``eval``; a script's ``EVALSHA`` prefix is encoded
  once, the command goes straight to a pooled connection, and one lazy
  timer per connection keeps every call's deadline.
- `health` and `probe` say how a connection is doing: `LinkHealth` for the
  state and its reason, `probe` (``PING`` with a deadline) for readiness,
  failing with `RedisUnhealthy` named ``redis_auth_failed`` when the server
  refused the password.  `set_error_listener` gives a connection a
  callable that `call` and `run_script` tell of every failed call, by kind
  (the app counts them in ``redis_errors_total``).

txredisapi is imported only when a connection is made or a call fails:
importing it installs the default reactor, which must not happen when this
module is merely imported (``twistd --reactor=...``).  txredisapi has no
clock injection (it uses the global reactor internally); `call`,
`run_script` and `probe` take the clock their deadline runs on.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)
from urllib.parse import unquote

import attr
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.errors import BackendUnavailableError

_log = Logger()

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

#: Prefixes of Redis error replies that mean "unavailable now, retry
#: later" rather than "this call is wrong".
_UNAVAILABLE_REPLIES = (
    "LOADING",
    "BUSY",
    "READONLY",
    "MASTERDOWN",
    "NOAUTH",
    "WRONGPASS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "OOM",
    "NOREPLICAS",
)


class RedisURLError(ValueError):
    """
    A Redis URL cannot be used; the message says why (and never contains
    the password).
    """


@attr.s(frozen=True, kw_only=True, repr=False)
class RedisAddress:
    """
    Where a Redis server is, parsed from a URL by `parse_url`.

    :ivar hosts: ``(host, port)`` of the server, or of every Sentinel.
    :ivar db: the database number.
    :ivar password: the data server's password, or ``None``.
    :ivar username: the ACL user name (Redis 6+), or ``None``.
    :ivar service_name: the Sentinel service (master) name, or ``None`` for
        a plain server.
    """

    hosts: Tuple[Tuple[str, int], ...] = attr.ib()
    db: int = attr.ib(default=0)
    password: Optional[str] = attr.ib(default=None)
    username: Optional[str] = attr.ib(default=None)
    service_name: Optional[str] = attr.ib(default=None)

    @property
    def sentinel(self) -> bool:
        """
        Whether the address names Sentinels rather than the server.
        """
        return self.service_name is not None

    def redacted(self) -> str:
        """
        The address as a URL without the password: safe to log.
        """
        auth = ""
        if self.password is not None or self.username:
            auth = f"{self.username or ''}:***@"
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts)
        if self.sentinel:
            return f"redis-sentinel://{auth}{hosts}/{self.service_name}/{self.db}"
        return f"redis://{auth}{hosts}/{self.db}"

    def __repr__(self) -> str:
        return f"<RedisAddress {self.redacted()}>"


def _host_port(text: str, default_port: int) -> Tuple[str, int]:
    host, port = text, default_port
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        if end < 0:
            raise RedisURLError(f"bad host {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise RedisURLError(f"bad host {text!r}")
            port = _port(rest[1:])
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _port(port_text)
    if not host:
        raise RedisURLError("a host is missing")
    return host, port


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RedisURLError(f"bad port {text!r}")
    return int(text)


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 1_000_000:
        raise RedisURLError(f"the database must be a number, got {text!r}")
    return int(text)


def is_redis_url(value: Optional[str]) -> bool:
    """
    Whether a setting's value names a Redis server (``redis://`` or
    ``redis-sentinel://``) rather than a built-in backend.
    """
    return value is not None and value.startswith(("redis://", "redis-sentinel://"))


def parse_url(url: str) -> RedisAddress:
    """
    Parse a Redis URL.

    ``redis://[[user]:password@]host[:port][/db]`` names a server (port
    6379 and db 0 by default).
    ``redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``
    names Sentinels (port 26379 by default) that know the master of
    ``service_name``.  ``rediss://`` (TLS) is not supported: txredisapi
    does not verify server certificates.

    :raises RedisURLError: the URL is not one of these forms.
    """
    if not isinstance(url, str):
        raise RedisURLError("a Redis URL must be a string")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "redis-sentinel"):
        raise RedisURLError(
            "a Redis URL starts with redis:// or redis-sentinel://"
            + (" (rediss:// is not supported)" if scheme == "rediss" else "")
        )
    # urlsplit cannot parse several hosts in one netloc: split by hand.
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path or "?" in netloc or "#" in netloc:
        raise RedisURLError("a Redis URL takes no query or fragment")
    userinfo, at, hostlist = netloc.rpartition("@")
    password: Optional[str] = None
    username: Optional[str] = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise RedisURLError("write the password as :password@ (or user:password@)")
        username = unquote(user) or None
        password = unquote(secret)
    sentinel = scheme == "redis-sentinel"
    default_port = DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_PORT
    if not hostlist:
        raise RedisURLError("a host is missing")
    hosts = tuple(_host_port(item, default_port) for item in hostlist.split(","))
    parts = [unquote(p) for p in path.split("/")] if path else []
    while parts and parts[-1] == "":
        parts.pop()
    if sentinel:
        if not parts or not parts[0]:
            raise RedisURLError(
                "a redis-sentinel:// URL needs the service name: .../service_name[/db]"
            )
        if len(parts) > 2:
            raise RedisURLError("a redis-sentinel:// URL path is /service_name[/db]")
        service: Optional[str] = parts[0]
        db = _db(parts[1]) if len(parts) == 2 else 0
    else:
        if len(hosts) > 1:
            raise RedisURLError("a redis:// URL names one host; for several use redis-sentinel://")
        if len(parts) > 1:
            raise RedisURLError("a redis:// URL path is /db")
        service = None
        db = _db(parts[0]) if parts else 0
    return RedisAddress(
        hosts=hosts, db=db, password=password, username=username, service_name=service
    )


def connect(
    address: Union[str, RedisAddress],
    *,
    connect_timeout: float = 2.0,
    reply_timeout: float = 5.0,
    pool_size: int = 1,
    max_retry_delay: float = 5.0,
    reactor: Any = None,
) -> Any:
    """
    A lazy txredisapi connection (pool) to ``address``: returned at once,
    connected in the background, reconnected after every loss and every
    refusal.

    Commands pipeline on one connection, so ``pool_size`` 1 serves many
    concurrent requests.  While the connection is known to be down (an
    attempt to connect failed, or the server refused the password), calls
    fail at once with ``txredisapi.ConnectionError`` (`call` answers 503)
    instead of queuing until their deadline; `health` says why and `probe`
    turns it into a readiness check.

    :param address: a URL for `parse_url`, or a `RedisAddress`.
    :param connect_timeout: seconds one connection attempt may take, from
        the TCP connect (or the Sentinel query) to the server's answer to
        the handshake (``AUTH``, ``SELECT``, ``ROLE`` or ``PING``).
    :param reply_timeout: seconds a connection may go without any answer
        while commands are outstanding before it is dropped and made again
        (a hung or blackholed server; the reconnection then fails within
        ``connect_timeout`` and calls fail at once).  Keep it above the
        deadlines given to `call`: calls that miss their deadline do not
        reset it.
    :param max_retry_delay: the most seconds between reconnection attempts
        (the first retry is immediate, then the delay grows from 0.5 s).
    :param reactor: connects (``IReactorTCP``) and keeps the connect
        deadline; the global reactor by default (txredisapi's own timers
        always run on it).
    :return: the txredisapi connection handler: call Redis commands on it
        through `call` (Lua scripts through `run_script`), close it with
        `disconnect`.
    """
    if isinstance(address, str):
        address = parse_url(address)
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from twistauth import _redislink

    factory = _redislink.make_factory(
        address,
        reactor=reactor,
        connect_timeout=connect_timeout,
        reply_timeout=reply_timeout,
        pool_size=pool_size,
        max_retry_delay=max_retry_delay,
    )
    return factory.handler


def endpoint(address: Union[str, RedisAddress], *, reactor: Any, connect_timeout: float) -> Any:
    """
    A client endpoint for the data server of ``address`` (for connections
    txredisapi's pool does not make, such as the bus's pub/sub one): the
    server of a ``redis://`` URL, or the master the Sentinels of a
    ``redis-sentinel://`` URL name at each connection attempt, so a
    reconnecting client follows a failover.

    :return: an ``IStreamClientEndpoint`` with a ``close()`` method
        (returning a Deferred) that closes its Sentinel connections.
    """
    if isinstance(address, str):
        address = parse_url(address)
    from twistauth._redisendpoint import RedisEndpoint

    return RedisEndpoint(address, reactor=reactor, connect_timeout=connect_timeout)


def disconnect(connection: Any) -> defer.Deferred[None]:
    """
    Close a connection made by `connect` (and its Sentinel connections).

    :return: Deferred firing when every connection is closed.
    """
    d: defer.Deferred[None] = defer.maybeDeferred(connection.disconnect).addBoth(lambda _: None)
    return d


# -- health ------------------------------------------------------------------

#: `LinkHealth` states.  Calls wait (within their deadline) while
#: connecting, fail at once while unavailable, refused or closed.
CONNECTING = "connecting"
CONNECTED = "connected"
RECONNECTING = "reconnecting"
UNAVAILABLE = "unavailable"
AUTH_FAILED = "auth_failed"
REFUSED = "refused"
CLOSED = "closed"

_FAILS_FAST = frozenset([UNAVAILABLE, AUTH_FAILED, REFUSED, CLOSED])


@attr.s(kw_only=True, eq=False, repr=False)
class LinkHealth:
    """
    What twistauth knows of one connection made by `connect`, kept up to
    date by the connection itself (read it with `health`).

    ``state`` is one of:

    - ``connecting``: the first attempt is under way; calls wait for it.
    - ``connected``: a connection answered the handshake.
    - ``reconnecting``: the connection was lost and is being made again;
      calls wait for it (a restart or a failover usually heals at once).
    - ``unavailable``: the last attempt failed (refused, no answer within
      the connect deadline, no master named by Sentinel): calls fail at
      once until an attempt succeeds.
    - ``auth_failed``: the server refused the password; calls fail at once,
      attempts go on (with backoff) until the password matches again.
    - ``refused``: the server refused the database number.
    - ``closed``: `disconnect` was called.

    Each change of state is logged once (never the password).

    :ivar reason: why the state is what it is, briefly (safe to log).
    :ivar since: the clock's time of the last change of state.
    """

    address: RedisAddress = attr.ib()
    clock: IReactorTime = attr.ib()
    retry_every: float = attr.ib(default=5.0)
    state: str = attr.ib(default=CONNECTING)
    reason: Optional[str] = attr.ib(default="connecting")
    since: float = attr.ib(init=False, default=0.0)
    _down_since: Optional[float] = attr.ib(init=False, default=None)
    _ever_connected: bool = attr.ib(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.since = self.clock.seconds()

    def __repr__(self) -> str:
        return f"<LinkHealth {self.address.redacted()} {self.state}: {self.reason}>"

    @property
    def is_connected(self) -> bool:
        """
        Whether a connection answered and has not been lost since.
        """
        return self.state == CONNECTED

    @property
    def fails_fast(self) -> bool:
        """
        Whether calls fail at once rather than wait for a connection.
        """
        return self.state in _FAILS_FAST

    def _change(self, state: str, reason: Optional[str]) -> bool:
        changed = state != self.state
        self.reason = reason
        if changed:
            self.state = state
            self.since = self.clock.seconds()
        return changed

    def connected(self) -> None:
        """
        A connection answered the handshake.
        """
        if self.state == CLOSED:
            return
        was = self.state
        if not self._change(CONNECTED, None):
            return
        if self._down_since is not None:
            _log.info(
                "twistauth: Redis at {address}: connected again after {seconds:.1f} s (was {was})",
                address=self.address.redacted(),
                seconds=self.clock.seconds() - self._down_since,
                was=was,
            )
        elif not self._ever_connected:
            _log.info("twistauth: Redis at {address}: connected", address=self.address.redacted())
        self._down_since = None
        self._ever_connected = True

    def lost(self) -> None:
        """
        The last connection was lost; reconnection starts at once.
        """
        if self.state != CONNECTED:
            return
        self._change(RECONNECTING, "connection lost; reconnecting")
        self._down_since = self.clock.seconds()
        _log.warn(
            "twistauth: Redis at {address}: connection lost; reconnecting",
            address=self.address.redacted(),
        )

    def failed(self, state: str, reason: str) -> None:
        """
        A connection attempt failed: ``state`` is ``unavailable``,
        ``auth_failed`` or ``refused``; ``reason`` says why (no secrets).
        """
        if self.state == CLOSED:
            return
        if state == UNAVAILABLE and self.state in (AUTH_FAILED, REFUSED):
            # A refused password stays the headline until it is fixed,
            # whatever later attempts run into.
            self.reason = f"{self.reason} (last attempt: {reason})"
            return
        if self._down_since is None:
            self._down_since = self.clock.seconds()
        if not self._change(state, reason):
            return
        address = self.address.redacted()
        if state == AUTH_FAILED:
            _log.error(
                "twistauth: Redis at {address}: {reason}; calls answer 503 and readiness "
                "fails until the password matches again (retrying at least every "
                "{retry:g} s)",
                address=address,
                reason=reason,
                retry=self.retry_every,
            )
        elif state == REFUSED:
            _log.error(
                "twistauth: Redis at {address}: {reason}; calls answer 503 and readiness "
                "fails until it is fixed (retrying at least every {retry:g} s)",
                address=address,
                reason=reason,
                retry=self.retry_every,
            )
        else:
            _log.error(
                "twistauth: Redis at {address} is unavailable: {reason}; calls answer 503 at "
                "once until it is back (retrying at least every {retry:g} s)",
                address=address,
                reason=reason,
                retry=self.retry_every,
            )

    def closed(self) -> None:
        """
        `disconnect` was called.
        """
        self._change(CLOSED, "closed")


class RedisUnhealthy(Exception):
    """
    A `probe` found a Redis connection unusable.

    :ivar name: what is wrong, for ``/readyz``: ``redis_auth_failed``,
        ``redis_refused``, ``redis_unavailable``, ``redis_timeout``,
        ``redis_closed`` or ``redis_error``.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _factory_of(connection: Any) -> Any:
    # (the handler answers every missing attribute with a command wrapper)
    factory = vars(connection).get("_factory") if hasattr(connection, "__dict__") else None
    found = vars(factory).get("health") if factory is not None else None
    if not isinstance(found, LinkHealth):
        raise TypeError("not a connection made by twistauth.redisconn.connect")
    return factory


def health(connection: Any) -> LinkHealth:
    """
    The `LinkHealth` of a connection made by `connect`.

    :raises TypeError: ``connection`` was not made by `connect`.
    """
    found: LinkHealth = vars(_factory_of(connection))["health"]
    return found


#: The kinds of failed calls `call` and `run_script` report to an error
#: listener.
ERROR_KINDS = ("timeout", "unavailable", "auth_failed", "refused", "closed", "error")


def set_error_listener(connection: Any, listener: Optional[Callable[[str], None]]) -> None:
    """
    Have `call` and `run_script` tell ``listener`` of every call on
    ``connection`` that fails, with its kind (one of `ERROR_KINDS`): ``timeout`` (no answer
    within the call's deadline), ``unavailable`` (down, unreachable,
    loading, read-only...), ``auth_failed`` (the password is refused),
    ``refused`` (the database is), ``closed`` (after `disconnect`), or
    ``error`` (Redis answered the call with an error).  A cancelled call
    is not reported.  One listener per connection; ``None`` removes it.

    Only calls made through `call` with one of the connection's commands
    (``connection.get``, ``connection.execute_command``...) and through
    `run_script` are reported.

    :raises TypeError: ``connection`` was not made by `connect`.
    """
    _factory_of(connection).error_listener = listener


def _error_kind(failure: Failure, factory: Any) -> Optional[str]:
    if failure.check(defer.CancelledError):
        return None
    if failure.check(defer.TimeoutError):
        return "timeout"
    if not is_unavailable(failure):
        return "error"
    link = vars(factory).get("health")
    state = link.state if isinstance(link, LinkHealth) else None
    if state in (AUTH_FAILED, REFUSED, CLOSED):
        return state
    if str(failure.value).startswith(("NOAUTH", "WRONGPASS")):
        return "auth_failed"
    return "unavailable"


def _report_failure(factory: Any, failure: Failure) -> None:
    """
    Tell the error listener of ``factory``'s connection (if any) that a
    call failed with ``failure``.
    """
    listener = vars(factory).get("error_listener") if factory is not None else None
    if listener is None:
        return
    kind = _error_kind(failure, factory)
    if kind is None:
        return
    try:
        listener(kind)
    except Exception:
        _log.failure("twistauth: a Redis error listener failed")


_STATE_ERRORS = {
    AUTH_FAILED: "redis_auth_failed",
    REFUSED: "redis_refused",
    UNAVAILABLE: "redis_unavailable",
    CLOSED: "redis_closed",
}


def probe(connection: Any, clock: IReactorTime, timeout: float) -> defer.Deferred[None]:
    """
    A readiness check of a connection made by `connect`: fails at once if
    it is known to be down (saying why), else sends ``PING`` with a
    deadline.

    A ``PING`` that misses its deadline on an established connection
    aborts that connection (a half-open or blackholed one would otherwise
    only be dropped after the reply timeout): the reconnection that follows
    shows whether the server is reachable, and calls fail fast if not.

    :param clock: the clock the deadline runs on.
    :param timeout: seconds ``PING`` may take.
    :return: Deferred firing with ``None``, or failing with `RedisUnhealthy`
        whose ``name`` says what is wrong (``redis_auth_failed`` when the
        server refused the password) and whose message says why, without
        the password.
    """
    link = health(connection)
    address = link.address.redacted()
    if link.fails_fast:
        return defer.fail(
            RedisUnhealthy(_STATE_ERRORS[link.state], f"Redis at {address}: {link.reason}")
        )
    d = defer.maybeDeferred(connection.execute_command, "PING")
    d.addTimeout(timeout, clock)

    def answered(reply: Any) -> None:
        return None

    def failed(failure: Failure) -> None:
        if failure.check(defer.TimeoutError):
            if link.is_connected:
                _log.warn(
                    "twistauth: Redis at {address}: no answer to PING within {timeout:g} s; "
                    "dropping the connection",
                    address=address,
                    timeout=timeout,
                )
                vars(connection)["_factory"].drop_connections()
            raise RedisUnhealthy(
                "redis_timeout",
                f"Redis at {address} did not answer PING within {timeout:g} s ({link.state})",
            )
        message = str(failure.value).splitlines()[0] if str(failure.value) else ""
        if link.fails_fast:
            raise RedisUnhealthy(_STATE_ERRORS[link.state], f"Redis at {address}: {link.reason}")
        if message.startswith(("NOAUTH", "WRONGPASS")):
            raise RedisUnhealthy("redis_auth_failed", f"Redis at {address}: {message}")
        if is_unavailable(failure):
            raise RedisUnhealthy("redis_unavailable", f"Redis at {address}: {message}")
        raise RedisUnhealthy("redis_error", f"Redis at {address}: {message}")

    d.addCallbacks(answered, failed)
    return d


def probe_all(
    connections: Iterable[Any], clock: IReactorTime, timeout: float
) -> defer.Deferred[None]:
    """
    `probe` every connection at once.

    :return: Deferred firing with ``None`` when every probe passed, or
        failing with the first `RedisUnhealthy`.
    """
    probes = [probe(c, clock, timeout) for c in connections]
    d = defer.gatherResults(probes, consumeErrors=True)

    def first(failure: Failure) -> Failure:
        failure.trap(defer.FirstError)
        first_error = failure.value
        assert isinstance(first_error, defer.FirstError)
        return first_error.subFailure

    return d.addCallbacks(lambda _: None, first)


def is_unavailable(failure: Failure) -> bool:
    """
    Whether a failed Redis call failed because Redis is unavailable (down,
    unreachable, timed out, loading, read-only, refusing our password)
    rather than because the call was wrong.
    """
    if failure.check(
        defer.TimeoutError,
        error.ConnectError,
        error.ConnectionLost,
        error.ConnectionDone,
        error.TimeoutError,
    ):
        return True
    import txredisapi

    if failure.check(txredisapi.ConnectionError):
        return True
    if failure.check(txredisapi.ResponseError):
        message = str(failure.value)
        return message.startswith(_UNAVAILABLE_REPLIES)
    return False


def call(
    clock: IReactorTime,
    timeout: float,
    function: Callable[..., Any],
    *args: Any,
    what: str = "Redis",
    unavailable: Type[BackendUnavailableError] = BackendUnavailableError,
) -> defer.Deferred[Any]:
    """
    Call ``function(*args)`` (a txredisapi command, or anything answering a
    Deferred) with a deadline.

    :param clock: the clock the deadline runs on.
    :param timeout: seconds the call may take.
    :param what: names the backend in the error message.
    :param unavailable: the error class to fail with when Redis is
        unavailable (a `BackendUnavailableError` subclass).
    :return: Deferred firing with the call's result, or failing with
        ``unavailable`` if it did not answer within ``timeout`` or Redis is
        unavailable; other failures pass through unchanged.  Cancelling it
        cancels the call.  Every failure but a cancellation is reported to
        the connection's error listener (`set_error_listener`).
    """
    d = defer.maybeDeferred(function, *args)
    d.addTimeout(timeout, clock)

    factory = getattr(function, "_twistauth_factory", None)
    d.addErrback(_failed_call, factory, timeout, what, unavailable)
    return d


def _failed_call(
    failure: Failure,
    factory: Any,
    timeout: float,
    what: str,
    unavailable: Type[BackendUnavailableError],
) -> Failure:
    """
    What a failed `call` or `run_script` fails with: ``unavailable`` for a
    missed deadline (`defer.TimeoutError`) or an unavailable Redis, else
    ``failure`` itself; the failure is reported to ``factory``'s error
    listener first.
    """
    _report_failure(factory, failure)
    if failure.check(defer.TimeoutError):
        return Failure(unavailable(f"{what} did not answer within {timeout:g} s; retry later"))
    if is_unavailable(failure):
        return Failure(unavailable(f"{what} is unavailable; retry later"))
    return failure


# -- scripts -----------------------------------------------------------------


def _bulk(data: bytes) -> bytes:
    """
    ``data`` as a RESP bulk string.
    """
    return b"$%d\r\n%s\r\n" % (len(data), data)


@attr.s(frozen=True, eq=False, repr=False)
class Script:
    """
    A Lua script to run with `run_script`, made once (at import time) and
    used for every call.

    Its SHA1 and its ``EVALSHA <sha> <numkeys>`` command prefix are
    computed here, once: txredisapi's ``eval`` hashes the source and
    encodes every argument generically on every call, a good part of the
    CPU a call cost.

    :ivar source: the Lua source.
    :ivar keys: how many ``KEYS`` every call passes (Redis's ``numkeys``).
    :ivar sha: the SHA1 hex digest of the source: what Redis names the
        script by once it has it.
    """

    source: str = attr.ib()
    keys: int = attr.ib(default=1)
    sha: str = attr.ib(init=False)
    _evalsha: bytes = attr.ib(init=False)
    _eval: bytes = attr.ib(init=False)
    _variants: Dict[int, Script] = attr.ib(init=False, factory=dict)

    @sha.default
    def _hash(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8"), usedforsecurity=False).hexdigest()

    @_evalsha.default
    def _evalsha_prefix(self) -> bytes:
        return _bulk(b"EVALSHA") + _bulk(self.sha.encode("ascii")) + _bulk(b"%d" % self.keys)

    @_eval.default
    def _eval_prefix(self) -> bytes:
        return _bulk(b"EVAL") + _bulk(self.source.encode("utf-8")) + _bulk(b"%d" % self.keys)

    def __repr__(self) -> str:
        return f"<Script {self.sha[:12]} keys={self.keys}>"

    def for_keys(self, keys: int) -> Script:
        """
        This script taking ``keys`` keys (for a caller whose number of keys
        varies: it is part of the ``EVALSHA`` prefix), made once per number.
        """
        if keys == self.keys:
            return self
        found = self._variants.get(keys)
        if found is None:
            found = self._variants[keys] = Script(self.source, keys)
        return found

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
        """
        The RESP encoding of ``EVALSHA <sha> <numkeys> *keys *args``.

        Keys and arguments are text (sent as UTF-8), bytes (as they are)
        or integers (in decimal).  No float: txredisapi would send six
        decimals, losing precision silently; the caller says how to write
        one.

        :raises ValueError: ``keys`` are not `keys` keys, or a text holds a
            lone surrogate.
        :raises TypeError: a key or argument of another type.
        """
        if len(keys) != self.keys:
            raise ValueError(f"the script takes {self.keys} keys, not {len(keys)}")
        parts = [b"*%d\r\n" % (3 + self.keys + len(args)), self._evalsha]
        append = parts.append
        for values in (keys, args):
            for value in values:
                if value.__class__ is str:
                    value = value.encode("utf-8")
                elif not isinstance(value, bytes):
                    if not isinstance(value, int) or isinstance(value, bool):
                        raise TypeError(f"cannot send a {type(value).__name__} to Redis")
                    value = b"%d" % value
                append(b"$%d\r\n" % len(value))
                append(value)
                append(b"\r\n")
        return b"".join(parts)

    def as_eval(self, command: bytes) -> bytes:
        """
        ``command`` (made by `command`) turned into an ``EVAL`` of the
        whole source, with the same keys and arguments: what Redis needs
        when it does not know the script (it was restarted, or its scripts
        flushed); it loads the script too.
        """
        header = command.index(b"\r\n") + 2
        return command[:header] + self._eval + command[header + len(self._evalsha) :]


class _ScriptCall:
    """
    One `run_script` call on a pooled connection: passes the reply on to
    the caller's Deferred, at most once (a reply that comes after the
    deadline or a cancellation is dropped), loads the script and runs it
    again when Redis does not know it, reports failures to the error
    listener, and tells its `_Deadlines` when it is over.
    """

    __slots__ = (
        "result",
        "deadline",
        "_deadlines",
        "_protocol",
        "_command",
        "_script",
        "_factory",
        "_timeout",
        "_what",
        "_unavailable",
        "_retried",
    )

    def __init__(
        self,
        deadlines: _Deadlines,
        protocol: Any,
        command: bytes,
        script: Script,
        factory: Any,
        timeout: float,
        what: str,
        unavailable: Type[BackendUnavailableError],
    ) -> None:
        self.result: defer.Deferred[Any] = defer.Deferred(self._cancelled)
        self.deadline = 0.0
        self._deadlines = deadlines
        self._protocol = protocol
        self._command = command
        self._script = script
        self._factory = factory
        self._timeout = timeout
        self._what = what
        self._unavailable = unavailable
        self._retried = False

    def answered(self, reply: Any) -> None:
        if not self.result.called:
            # (over first: the caller's code may wait for the clock to
            # have no call left, as a test does)
            self._deadlines.over()
            self.result.callback(reply)

    def failed(self, failure: Failure) -> None:
        result = self.result
        if result.called:
            return  # too late: the deadline passed, or the caller cancelled
        if not self._retried and str(failure.value).startswith("NOSCRIPT"):
            # Redis does not know the script (restarted, SCRIPT FLUSH, a
            # failover): EVAL its source, which loads it, once.
            self._retried = True
            try:
                reply = self._protocol.send_encoded(self._script.as_eval(self._command))
            except Exception:
                failure = Failure()
            else:
                reply.addCallbacks(self.answered, self.failed)
                return
        self._deadlines.over()
        result.errback(self._translated(failure))

    def expire(self) -> None:
        """
        The deadline passed without an answer: fail the call (its reply,
        when it comes, will be dropped).
        """
        if self.result.called:
            return  # cancelled meanwhile
        self._deadlines.over()
        self.result.errback(self._translated(Failure(defer.TimeoutError())))

    def _translated(self, failure: Failure) -> Failure:
        return _failed_call(failure, self._factory, self._timeout, self._what, self._unavailable)

    def _cancelled(self, result: defer.Deferred[Any]) -> None:
        # (the Deferred then fails with CancelledError; the reply, when it
        # comes, is dropped: Redis runs the script anyway)
        self._deadlines.over()


class _Deadlines:
    """
    The deadlines of the `run_script` calls on one connection (pool), on
    one clock, kept by one lazy timer.

    A call only records its deadline: no timer is made and cancelled per
    call (as `defer.Deferred.addTimeout` does) while calls overlap.  When
    the timer fires it fails the calls past their deadline, then waits
    again for the earliest deadline left.  Deadlines are as exact as with
    a timer per call.  The timer is stopped when no call is outstanding,
    so none is left on the clock once every call is over (a connection
    used one call at a time makes and cancels one per call, as before).

    Calls wait in one queue per timeout, in the order they were made, so
    the first of a queue has its earliest deadline.  Calls that are over
    leave their queue when the timer fires or when a call is added behind
    them, so the queues hold about the calls outstanding.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queues: Dict[float, Deque[_ScriptCall]] = {}
        self._outstanding = 0
        self._timer: Optional[IDelayedCall] = None
        self._at = 0.0

    def add(self, call: _ScriptCall, timeout: float) -> None:
        """
        Fail ``call`` if it is not over ``timeout`` seconds from now; it
        calls `over` when it is.
        """
        deadline = call.deadline = self._clock.seconds() + timeout
        self._outstanding += 1
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        else:
            while queue and queue[0].result.called:
                queue.popleft()
        queue.append(call)
        timer = self._timer
        if timer is None:
            self._at = deadline
            self._timer = self._clock.callLater(timeout, self._expire)
        elif deadline < self._at:  # a shorter timeout than those waiting
            self._at = deadline
            timer.reset(timeout)

    def over(self) -> None:
        """
        A call is over (answered, failed, expired or cancelled).
        """
        self._outstanding -= 1
        if self._outstanding <= 0:
            self.stop()

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        expired: List[_ScriptCall] = []
        earliest: Optional[float] = None
        for timeout in list(self._queues):
            queue = self._queues[timeout]
            while queue:
                call = queue[0]
                if not call.result.called:
                    if call.deadline > now:
                        break
                    expired.append(call)
                queue.popleft()
            if not queue:
                del self._queues[timeout]
            elif earliest is None or queue[0].deadline < earliest:
                earliest = queue[0].deadline
        if earliest is not None:
            self._at = earliest
            self._timer = self._clock.callLater(earliest - now, self._expire)
        # (last: failing a call runs its caller's code, which may add calls)
        for call in expired:
            call.expire()

    def stop(self) -> None:
        """
        Stop the timer and forget every call: none is outstanding, or the
        connection is closed (so they have all failed).
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self._queues.clear()
        self._outstanding = 0


_NO_ATTRIBUTES: Dict[str, Any] = {}


def _pooled(factory: Any) -> Any:
    """
    A pooled connection of ``factory`` ready for a command, without
    Deferreds (what txredisapi's ``getConnection(peek=True)`` would hand
    out), or ``None`` when none is.
    """
    pending = factory.connectionQueue.pending
    while pending:
        # (as txredisapi does: any connection not taken by a blocking
        # command or a transaction; random spreads the load, no security)
        protocol = pending[0] if len(pending) == 1 else random.choice(pending)  # noqa: S311
        if protocol.connected:
            return protocol
        pending.remove(protocol)  # lost: discarded, as getConnection does
    return None


def run_script(
    connection: Any,
    script: Script,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    clock: IReactorTime,
    timeout: float,
    what: str = "Redis",
    unavailable: Type[BackendUnavailableError] = BackendUnavailableError,
) -> defer.Deferred[Any]:
    """
    Run ``script`` with ``keys`` and ``args`` on ``connection``, with a
    deadline: `call` of ``connection.eval``, for a fraction of the CPU.

    When the connection is up, the command (only the keys and arguments
    are encoded per call: see `Script.command`) is written straight to a
    pooled connection and the caller gets the reply through one Deferred;
    the deadline is kept by one lazy timer per connection and clock.  When
    Redis does not know the script (``NOSCRIPT``: restarted, its scripts
    flushed), it is loaded and run again, once, within the same deadline.
    Otherwise (connecting, reconnecting, known to be down, Sentinel
    failing over, no connection free) it is `call` of
    ``connection.eval``, which waits for a connection or fails fast.

    :param connection: a connection made by `connect` (anything else with
        an ``eval`` command takes the `call` path).
    :param keys: exactly ``script.keys`` keys; keys and arguments are text,
        bytes or integers.
    :param clock: the clock the deadline runs on.
    :param timeout: seconds the call may take.
    :param what: names the backend in the error message.
    :param unavailable: the error class to fail with when Redis is
        unavailable (a `BackendUnavailableError` subclass).
    :return: as `call`: Deferred firing with the script's answer, or
        failing with ``unavailable`` if it did not answer within
        ``timeout`` or Redis is unavailable; other failures (a script
        error, a key of the wrong type) pass through unchanged.
        Cancelling it fails it with `defer.CancelledError` (the reply, when
        it comes, is dropped).  Every failure but a cancellation is
        reported to the connection's error listener.
    :raises ValueError: ``keys`` are not ``script.keys`` keys.
    """
    if len(keys) != script.keys:
        raise ValueError(f"the script takes {script.keys} keys, not {len(keys)}")
    factory: Any = getattr(connection, "__dict__", _NO_ATTRIBUTES).get("_factory")
    deadlines: Any = getattr(factory, "__dict__", _NO_ATTRIBUTES).get("script_deadlines")
    try:
        # (first, whichever path: a value of the wrong type fails the same)
        command = script.command(keys, args)
        protocol = None
        if deadlines is not None and factory.health.state == CONNECTED:
            protocol = _pooled(factory)
        if protocol is None:
            return call(
                clock,
                timeout,
                connection.eval,
                script.source,
                keys,
                args,
                what=what,
                unavailable=unavailable,
            )
        reply = protocol.send_encoded(command)
    except Exception:
        return defer.fail(_failed_call(Failure(), factory, timeout, what, unavailable))
    keeper = deadlines.get(clock)
    if keeper is None:
        keeper = deadlines[clock] = _Deadlines(clock)
    pending = _ScriptCall(keeper, protocol, command, script, factory, timeout, what, unavailable)
    keeper.add(pending, timeout)
    reply.addCallbacks(pending.answered, pending.failed)
    return pending.result
