"""
Operations wiring for one app: what `twistauth.app.make_app` adds so that
metrics, readiness checks and request ids reach the events they describe,
from outside the modules that produce those events.

- `counting_cache_class`: a session cache class that counts sessions
  created and ended (``create``, ``delete``, ``delete_user``,
  ``delete_provider_session``), for ``sessions_created_total`` and
  ``sessions_destroyed_total``;
- `method_metrics_hook`: the dispatcher's ``after_hook`` that times every
  call (`twistauth.metrics.Metrics.after_hook`) and counts password logins
  by outcome and reason;
- `add_readiness_checks`: ``/readyz`` checks for every Redis connection
  (PING within a deadline), the user store and the bus;
- `klein_route_name`: a route's template for the request counter.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Tuple

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from twistauth import redisconn
from twistauth.metrics import IMetrics
from twistauth.web.health import HealthChecks

#: A user id no account can have (ids cannot hold ``:``): what the user
#: store's readiness check looks up.
PROBE_USER_ID = "twistauth:readiness-probe"


# ---------------------------------------------------------------------------
# Sessions.


def counting_cache_class(base: type, metrics: IMetrics) -> type:
    """
    A subclass of the session cache class ``base`` that reports to
    ``metrics``: ``session_created(cache.name)`` when a session gets its id,
    and ``session_destroyed(reason)`` once a deletion is done: ``"logout"``
    (one session), ``"logout_everywhere"`` (a user's sessions, per session
    ended), ``"backchannel"`` (a provider session's, per session ended).
    Client-side caches cannot count the sessions a revocation ends, so
    those are not counted.  Instances are instances of ``base`` too.
    """

    def counted(reason: str) -> Callable[[Any], Any]:
        def count(ended: Any) -> Any:
            if isinstance(ended, int) and not isinstance(ended, bool):
                for _ in range(max(0, ended)):
                    metrics.session_destroyed(reason)
            return ended

        return count

    def create(self: Any, permanent: bool = False) -> Any:
        d = base.create(self, permanent)  # type: ignore[attr-defined]
        metrics.session_created(self.name)
        return d

    def delete(self: Any, session: Any) -> Any:
        def count(result: Any) -> Any:
            metrics.session_destroyed("logout")
            return result

        return base.delete(self, session).addCallback(count)  # type: ignore[attr-defined]

    def delete_user(self: Any, user_id: str) -> Any:
        d = base.delete_user(self, user_id)  # type: ignore[attr-defined]
        return d.addCallback(counted("logout_everywhere"))

    def delete_provider_session(self: Any, issuer: str, provider_sid: str) -> Any:
        d = base.delete_provider_session(self, issuer, provider_sid)  # type: ignore[attr-defined]
        return d.addCallback(counted("backchannel"))

    namespace = {
        "__slots__": (),
        "__doc__": f"`{base.__name__}` counting sessions for metrics.",
        "create": create,
        "delete": delete,
        "delete_user": delete_user,
        "delete_provider_session": delete_provider_session,
    }
    return type(f"Counted{base.__name__}", (base,), namespace)


# ---------------------------------------------------------------------------
# Dispatcher hooks.

_LOGIN_METHODS = {"account.login": "password"}


def method_metrics_hook(metrics: IMetrics) -> Callable[[Any], None]:
    """
    The dispatcher's ``after_hook`` for ``metrics``: every call's duration
    and outcome (`IMetrics.after_hook`), and for ``account.login`` a login
    by outcome (``success``/``failure``) and reason (the error's name,
    e.g. ``invalid_credentials``, ``login_throttled``).
    """
    finished = metrics.method_finished  # (what `IMetrics.after_hook` calls, one call less)
    logins = _LOGIN_METHODS

    def hook(transaction: Any) -> None:
        finished(transaction.method, transaction.duration or 0.0, transaction.outcome)
        kind = logins.get(transaction.method)
        if kind is not None:
            outcome = transaction.outcome
            if outcome == "ok":
                metrics.login("success", "ok", kind)
            elif outcome != "cancelled":
                metrics.login("failure", outcome, kind)

    return hook


# ---------------------------------------------------------------------------
# Readiness.


def ping_redis(
    clock: IReactorTime,
    timeout: float,
    connection: Any,
    address: str,
    metrics: IMetrics,
) -> Deferred[bool]:
    """
    Check a Redis connection within ``timeout`` seconds: `redisconn.probe`
    (fails at once when the connection is known to be down, saying why,
    else ``PING`` with a deadline).

    :return: Deferred firing with ``True``, or failing when Redis is down,
        unreachable, refuses our password or answers too late (counted as
        a Redis error of that kind: ``auth_failed``, ``unavailable``,
        ``timeout``...).
    """
    probe = getattr(redisconn, "probe", None)
    try:
        if probe is None:
            raise TypeError("no probe")
        d: Deferred[Any] = probe(connection, clock, timeout)
    except TypeError:
        # Not a connection made by redisconn.connect: a plain PING.
        d = redisconn.call(clock, timeout, connection.ping, what=f"Redis at {address}")

    def failed(failure: Failure) -> Failure:
        name = getattr(failure.value, "name", None)
        if isinstance(name, str) and name.startswith("redis_"):
            kind = name[len("redis_") :]
        elif "did not answer" in failure.getErrorMessage():
            kind = "timeout"
        else:
            kind = "unavailable"
        metrics.redis_error(kind)
        return failure

    return d.addCallbacks(lambda _: True, failed)


def add_readiness_checks(
    checks: HealthChecks,
    *,
    clock: IReactorTime,
    timeout: float,
    redis: Iterable[Tuple[str, Any]],
    users: Any,
    bus: Any,
    metrics: IMetrics,
) -> None:
    """
    Register ``/readyz``'s checks: ``redis`` (``redis_2``, ... when the
    deployment uses several) PINGs each connection, ``users`` looks up a
    user that cannot exist, ``bus`` asks the bus (`twistauth.bus.IBus.ping`).

    The ``redis`` and ``bus`` checks get a deadline slightly longer than
    the ``timeout`` they give Redis (`check_deadline`): the probe's own
    deadline must fire first, since only it drops a stalled connection
    (and says ``redis_timeout``); the check's would cancel the PING and
    leave the connection as it is.

    :param timeout: seconds each Redis PING may take.
    :param redis: ``(url, connection)`` pairs.
    """
    deadline = check_deadline(timeout)
    for index, (url, connection) in enumerate(redis):
        name = "redis" if index == 0 else f"redis_{index + 1}"
        address = redisconn.parse_url(url).redacted()
        checks.add(
            name, _bind_ping(clock, timeout, connection, address, metrics), timeout=deadline
        )
    if users is not None:

        def users_check() -> Deferred[Any]:
            return maybeDeferred(users.get, PROBE_USER_ID).addCallback(lambda _: True)

        checks.add("users", users_check)
    if bus is not None:
        ping = getattr(bus, "ping", None)
        if ping is not None:
            checks.add("bus", lambda: ping(timeout), timeout=deadline)


def check_deadline(timeout: float) -> float:
    """
    The deadline of a readiness check whose Redis calls have ``timeout``
    seconds: 10 % longer, by 0.05 s to 0.5 s (enough for the call's own
    deadline, on the same clock, to fire and be handled first).
    """
    return timeout + min(0.5, max(0.05, 0.1 * timeout))


def _bind_ping(
    clock: IReactorTime, timeout: float, connection: Any, address: str, metrics: IMetrics
) -> Callable[[], Deferred[bool]]:
    def check() -> Deferred[bool]:
        return ping_redis(clock, timeout, connection, address, metrics)

    return check


# ---------------------------------------------------------------------------
# Route names for the request counter.


def klein_route_name(request: Any) -> str:
    """
    The template of the Klein route that served ``request``
    (``"/redirect/<name>"``), or ``"other"``: a bounded label, never the
    raw path.
    """
    try:
        from klein.interfaces import IKleinRequest

        mapper = IKleinRequest(request).mapper
        if mapper is None:
            return "other"
        rule, _ = mapper.match(return_rule=True)
        return str(rule.rule)
    except Exception:
        return "other"


__all__ = [
    "PROBE_USER_ID",
    "add_readiness_checks",
    "check_deadline",
    "counting_cache_class",
    "klein_route_name",
    "method_metrics_hook",
    "ping_redis",
]
