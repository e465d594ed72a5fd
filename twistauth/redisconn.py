"""
Redis connections, made one way for every room that uses Redis (sessions,
the bus, stores).

Three things, each easy to get wrong with txredisapi:

- `parse_url` reads ``redis://[[user]:password@]host[:port][/db]`` and
  ``redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``
  into a `RedisAddress` (the password is the data server's, percent-encoded
  if it holds ``@ : / ,`` or ``%``; Sentinels themselves are reached without
  one).
- `connect` makes a lazy txredisapi connection (it returns at once and
  connects in the background, reconnecting forever) with
  ``convertNumbers=False`` (else ``"007"`` comes back as ``7``), a connect
  timeout, a reply timeout (which drops a connection whose server stopped
  answering), and a capped reconnection backoff.
- `call` puts a deadline on one Redis call and turns every way Redis can be
  unavailable (down, unreachable, hung, still loading its data, read-only
  after a failover, a rejected password) into
  `twistauth.errors.BackendUnavailableError` (or a subclass the caller
  names), so callers answer 503 instead of mistaking an outage for "no
  data".  While Redis is down txredisapi queues calls forever: the deadline
  is what makes them fail, after at most ``timeout`` seconds.

txredisapi is imported only when a connection is made or a call fails:
importing it installs the default reactor, which must not happen when this
module is merely imported (``twistd --reactor=...``).  txredisapi has no
clock injection (it uses the global reactor internally); `call` takes the
clock its deadline runs on.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Type, Union
from urllib.parse import unquote

import attr
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
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
) -> Any:
    """
    A lazy txredisapi connection (pool) to ``address``: returned at once,
    connected in the background, reconnected after every loss.

    Commands pipeline on one connection, so ``pool_size`` 1 serves many
    concurrent requests.

    :param address: a URL for `parse_url`, or a `RedisAddress`.
    :param connect_timeout: seconds one connection attempt may take.
    :param reply_timeout: seconds Redis may take to answer a command before
        txredisapi drops the connection and reconnects (a hung server).
        Keep it above the deadlines given to `call`.
    :param max_retry_delay: the most seconds between reconnection attempts
        (txredisapi backs off exponentially from one second).
    :return: the txredisapi connection handler: call Redis commands on it
        through `call`, close it with `disconnect`.
    """
    import txredisapi

    if isinstance(address, str):
        address = parse_url(address)
    options = {
        "dbid": address.db,
        "poolsize": pool_size,
        "password": address.password,
        "username": address.username,
        "replyTimeout": reply_timeout,
        "convertNumbers": False,
    }
    if address.sentinel:
        sentinel = txredisapi.Sentinel(
            list(address.hosts),
            connectTimeout=connect_timeout,
            replyTimeout=reply_timeout,
            convertNumbers=False,
        )
        sentinel.discovery_timeout = max(connect_timeout, 1.0)
        handler = sentinel.master_for(address.service_name, isLazy=True, **options)
        handler._twistauth_sentinel = sentinel
    else:
        host, port = address.hosts[0]
        handler = txredisapi.lazyConnectionPool(
            host, port, connectTimeout=connect_timeout, **options
        )
    factory = handler._factory
    factory.maxDelay = max_retry_delay
    factory.initialDelay = min(factory.initialDelay, max_retry_delay)
    if factory.deferred is not None:
        # txredisapi fails this Deferred when it gives up (a rejected
        # password); nobody else waits on it with a lazy connection.
        factory.deferred.addErrback(_gave_up, address)
    return handler


def _gave_up(failure: Failure, address: RedisAddress) -> None:
    _log.error(
        "Redis at {address} refused the connection for good: {reason}; "
        "calls will fail until this process restarts",
        address=address.redacted(),
        reason=failure.getErrorMessage(),
    )


def disconnect(connection: Any) -> defer.Deferred[None]:
    """
    Close a connection made by `connect` (and its Sentinel connections).

    :return: Deferred firing when every connection is closed.
    """
    closing = [defer.maybeDeferred(connection.disconnect)]
    # (the handler answers every missing attribute with a command wrapper)
    sentinel = vars(connection).get("_twistauth_sentinel")
    if sentinel is not None:
        closing.append(defer.maybeDeferred(sentinel.disconnect))
    d: defer.Deferred[None] = defer.gatherResults(closing, consumeErrors=True).addCallback(
        lambda _: None
    )
    return d


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
        cancels the call.
    """
    d = defer.maybeDeferred(function, *args)
    d.addTimeout(timeout, clock)

    def translate(failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError):
            raise unavailable(f"{what} did not answer within {timeout:g} s; retry later")
        if is_unavailable(failure):
            raise unavailable(f"{what} is unavailable; retry later")
        return failure

    d.addErrback(translate)
    return d
