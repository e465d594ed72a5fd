"""
The composition root: settings in, one wired application out.

This is the only module that knows every other one.  `make_app` builds the
method registry, the dispatcher, the Klein routes and the resource tree from
a `Settings`; `TwistauthApp.resource` can be served by twistauth's own
site (``twistd -n twistauth``) or mounted under a path of a host
application's site.

It also wires operations (`twistauth.operations`): the app's `Metrics` (or
`NullMetrics` when ``metrics`` is off) fed by the dispatcher's hooks, the
session caches, the logout watcher, the bus and the method cache; the
readiness checks behind ``/readyz``; and request ids, given to every
request and returned in ``X-Request-Id``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

import attr
from klein import Klein
from twisted.application.service import IService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource

from twistauth import redisconn
from twistauth.access import AccessControl
from twistauth.accounts.build import (
    make_login_throttle,
    make_password_hasher,
    make_user_store,
)
from twistauth.bus.logout import LogoutWatcher
from twistauth.bus.memory import MemoryBus
from twistauth.caching.build import make_method_cache
from twistauth.identity.install import install_oidc
from twistauth.methods.dispatch import Dispatcher
from twistauth.methods.handler import Services
from twistauth.methods.registry import MethodRegistry
from twistauth.metrics import IMetrics, Metrics, NullMetrics, chain_hooks
from twistauth.observe import RequestIds
from twistauth.operations import (
    add_readiness_checks,
    counting_cache_class,
    klein_route_name,
    method_metrics_hook,
)
from twistauth.sessions._interfaces import IRevocations, ISessionCache
from twistauth.sessions.client import ClientSessionCache
from twistauth.sessions.memory import MemorySessionCache
from twistauth.sessions.redis import RedisSessionCache
from twistauth.sessions.revocation import MemoryRevocations, RedisRevocations
from twistauth.settings import Settings
from twistauth.web.api import APIResource
from twistauth.web.auth import BACKCHANNEL_MAX_BYTES
from twistauth.web.demo import ProviderButton, add_demo_routes, make_demo_resource
from twistauth.web.events import LogoutEndpoints
from twistauth.web.health import (
    HealthChecks,
    HealthSite,
    HealthzResource,
    MetricsResource,
    ReadyzResource,
    health_site,
)
from twistauth.web.root import RootResource
from twistauth.web.routes import make_routes
from twistauth.web.signing import INonceStore, MemoryNonceStore, RedisNonceStore
from twistauth.web.site import TwistauthSite
from twistauth.web.transport import HEADER, SESSION_HEADER, SessionTransport

log = Logger()


@attr.s(frozen=True, kw_only=True)
class TwistauthApp:
    """
    A wired twistauth application.

    :ivar registry: the JSON methods it answers; add to it before serving.
    :ivar routes: the Klein app for every route but the JSON endpoint.
    """

    settings: Settings = attr.ib()
    clock: IReactorTime = attr.ib()
    registry: MethodRegistry = attr.ib()
    dispatcher: Dispatcher = attr.ib()
    routes: Klein = attr.ib()
    api: APIResource = attr.ib()
    services: Services = attr.ib()
    """The parts methods see: sessions, users, passwords, throttle, bus."""
    logout: Optional[LogoutEndpoints] = attr.ib(default=None)
    """``/logout/wait`` and ``/events``."""
    background: Tuple[IService, ...] = attr.ib(default=())
    """Services the app needs running (the password-hashing pool, Redis
    connections): `twistauth.service.TwistauthService` starts them before
    it listens and stops them after."""
    metrics: IMetrics = attr.ib(factory=NullMetrics)
    """What ``/metrics`` shows: a `twistauth.metrics.Metrics`, or a
    `NullMetrics` when the ``metrics`` setting is off."""
    health: Optional[HealthChecks] = attr.ib(default=None)
    """The readiness checks behind ``/readyz``."""
    request_ids: Optional[RequestIds] = attr.ib(default=None)
    """Gives every request its id (the ``X-Request-Id`` header)."""

    def _fast_paths(self) -> Dict[str, Tuple[str, IResource]]:
        """
        The exactly matched paths, by path: (route name, resource).
        """
        fast: Dict[str, Tuple[str, IResource]] = {self.settings.api_path: ("api", self.api)}
        if self.logout is not None:
            fast["/logout/wait"] = ("logout_wait", self.logout.wait)
            fast["/events"] = ("events", self.logout.events)
        if self.settings.metrics_listen is None and self.health is not None:
            fast["/healthz"] = ("healthz", HealthzResource())
            fast["/readyz"] = ("readyz", ReadyzResource(self.health))
            if isinstance(self.metrics, Metrics):
                fast["/metrics"] = ("metrics", MetricsResource(self.metrics))
        return fast

    def resource(self) -> IResource:
        """
        The resource that serves the whole application: the exact paths
        (the JSON endpoint, the logout waits, and health and metrics unless
        ``metrics_listen`` serves them) without routing, Klein for the rest.
        """
        fast = {path: resource for path, (_, resource) in self._fast_paths().items()}
        return RootResource(fast, self.routes.resource(), request_ids=self.request_ids)

    def health_site(self) -> HealthSite:
        """
        A site for the private ``metrics_listen`` endpoint: ``/healthz``,
        ``/readyz`` and (with metrics on) ``/metrics``.
        """
        checks = self.health if self.health is not None else HealthChecks(clock=self.clock)
        metrics = self.metrics if isinstance(self.metrics, Metrics) else None
        return health_site(checks, metrics, clock=self.clock)

    def shutdown(self) -> Deferred[None]:
        """
        Answer every pending logout wait with its final "shutdown" answer
        (call before connections are closed).
        """
        if self.logout is None:
            return succeed(None)
        return self.logout.shutdown()

    def site(self) -> TwistauthSite:
        """
        A site serving `resource` with twistauth's limits.
        """
        s = self.settings
        # Logout tokens are small: refuse large bodies there at header time.
        body_limits = {b"/logout/backchannel": BACKCHANNEL_MAX_BYTES}
        for provider in s.providers:
            body_limits[b"/logout/backchannel/" + provider.name.encode("ascii")] = (
                BACKCHANNEL_MAX_BYTES
            )
        return TwistauthSite(
            self.resource(),
            clock=self.clock,
            max_body_bytes=s.max_body_bytes,
            request_timeout=s.request_timeout,
            idle_timeout=s.idle_timeout,
            max_connections_per_ip=s.max_connections_per_ip,
            body_limits=body_limits,
            access_log=s.access_log,
            metrics=self.metrics if isinstance(self.metrics, Metrics) else None,
            route_names={
                path.encode("ascii"): name for path, (name, _) in self._fast_paths().items()
            },
            route_name=klein_route_name,
            request_ids=self.request_ids,
        )


class RedisConnections(Service):
    """
    One Redis connection per URL, shared by everything that uses that URL,
    closed when the service stops.

    :param on_error: told of every failed Redis call on these connections,
        with its kind (`twistauth.redisconn.set_error_listener`): the app's
        `IMetrics.redis_error`.
    """

    def __init__(
        self, settings: Settings, on_error: Optional[Callable[[str], None]] = None
    ) -> None:
        self._settings = settings
        self._on_error = on_error
        self._connections: Dict[str, Any] = {}

    def get(self, url: str) -> Any:
        connection = self._connections.get(url)
        if connection is None:
            timeout = self._settings.redis_timeout
            connection = redisconn.connect(
                url, connect_timeout=timeout, reply_timeout=max(5.0, 2.5 * timeout)
            )
            if self._on_error is not None:
                redisconn.set_error_listener(connection, self._on_error)
            self._connections[url] = connection
            log.info(
                "twistauth: Redis: connecting to {address}",
                address=redisconn.parse_url(url).redacted(),
            )
        return connection

    def connections(self) -> List[Tuple[str, Any]]:
        """
        The connections made so far, as ``(url, connection)`` pairs.
        """
        return list(self._connections.items())

    def stopService(self) -> Any:
        super().stopService()
        closing = [redisconn.disconnect(c) for c in self._connections.values()]
        self._connections.clear()
        return DeferredList(closing)


def make_session_caches(
    settings: Settings,
    clock: IReactorTime,
    redis: RedisConnections,
    metrics: Optional[IMetrics] = None,
) -> Tuple[ISessionCache, ISessionCache]:
    """
    The session caches the settings choose: one for tokens carried in the
    cookie and one for the header (the same cache, except for client-side
    sessions, whose seal binds the carrier's name).

    :param metrics: counts sessions created and ended
        (`twistauth.operations.counting_cache_class`).
    """

    def kind(base: Any) -> Any:
        return base if metrics is None else counting_cache_class(base, metrics)

    common: Dict[str, Any] = {
        "clock": clock,
        "idle_timeout": settings.session_idle_timeout,
        "absolute_timeout": settings.session_absolute_timeout,
    }
    if settings.session_cache == "memory":
        cache: ISessionCache = kind(MemorySessionCache)(
            max_entries=settings.session_max_entries, **common
        )
        header_cache = cache
    elif settings.session_cache == "client":
        shared = settings.shared_redis_url
        revocations: IRevocations
        if shared is not None:
            revocations = RedisRevocations(
                redis=redis.get(shared), clock=clock, call_timeout=settings.redis_timeout
            )
        else:
            revocations = MemoryRevocations(clock=clock)
        prefix = "__Host-" if settings.session_cookie_secure else ""
        cache = kind(ClientSessionCache)(
            keys=settings.session_keys,
            revocations=revocations,
            carrier_name=prefix + settings.session_cookie_name,
            **common,
        )
        header_cache = kind(ClientSessionCache)(
            keys=settings.session_keys,
            revocations=revocations,
            carrier_name=SESSION_HEADER.decode("ascii"),
            **common,
        )
    else:
        cache = kind(RedisSessionCache)(
            redis=redis.get(settings.session_cache),
            call_timeout=settings.redis_timeout,
            **common,
        )
        header_cache = cache
    log.info(
        "twistauth: sessions: {kind} cache, idle {idle:g} s, absolute {absolute:g} s ({origin})",
        kind=cache.name,
        idle=settings.session_idle_timeout,
        absolute=settings.session_absolute_timeout,
        origin=settings.origins.get("session_cache", "default"),
    )
    return cache, header_cache


def make_accounts(
    settings: Settings, clock: IReactorTime, reactor: Any, redis: RedisConnections
) -> Dict[str, Any]:
    """
    The local-account parts: the user store, the password hasher (a
    service) and the failed-login throttle.
    """
    if redisconn.is_redis_url(settings.user_store):
        users = make_user_store(
            "redis",
            clock=clock,
            reactor=reactor,
            redis=redis.get(settings.user_store),
            redis_timeout=settings.redis_timeout,
        )
    else:
        users = make_user_store(
            settings.user_store, clock=clock, reactor=reactor, data_dir=settings.data_dir
        )
    passwords = make_password_hasher(
        reactor=reactor,
        min_length=settings.password_min_length,
        max_bytes=settings.password_max_bytes,
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_cost,
        parallelism=settings.argon2_parallelism,
        threads=settings.password_hash_threads,
        max_pending=settings.password_hash_queue,
    )
    shared = settings.shared_redis_url
    throttle = make_login_throttle(
        "memory" if shared is None else "redis",
        clock=clock,
        account_limit=settings.login_max_failures_per_account,
        address_limit=settings.login_max_failures_per_address,
        window=settings.login_failure_window,
        redis=None if shared is None else redis.get(shared),
        redis_timeout=settings.redis_timeout,
    )
    return {"users": users, "passwords": passwords, "throttle": throttle}


class BusService(Service):
    """
    Starts and stops the notification bus with the server.
    """

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def startService(self) -> None:
        super().startService()
        # The server does not wait for the first subscription (waits work
        # locally meanwhile, and readiness says whether it is there); a stop
        # before it cancels the wait, which is no error.
        started: Deferred[None] = self.bus.start()
        started.addErrback(lambda failure: failure.trap(CancelledError))

    def stopService(self) -> Any:
        super().stopService()
        return self.bus.stop()


def make_bus(settings: Settings, reactor: Any, redis: RedisConnections) -> Any:
    """
    The notification bus: over the shared Redis when the deployment has one
    (so a logout on one process wakes waiters on all), else in memory.  It
    publishes on the shared connection (``redis``) and subscribes on a
    connection of its own; both follow a Sentinel failover.
    """
    shared = settings.shared_redis_url
    if shared is None:
        log.info("twistauth: bus: memory (one process)")
        return MemoryBus(clock=reactor)
    from twistauth.bus.redis_bus import RedisBus

    # (RedisBus.start logs where it connects and how it subscribes)
    return RedisBus(
        url=shared,
        key=settings.deployment_key,  # type: ignore[arg-type]
        reactor=reactor,
        mode=settings.bus_mode,
        connection=redis.get(shared),
        connect_timeout=settings.redis_timeout,
        command_timeout=settings.redis_timeout,
    )


def make_logout_endpoints(
    settings: Settings,
    clock: IReactorTime,
    bus: Any,
    transport: SessionTransport,
    sessions: ISessionCache,
    header_sessions: ISessionCache,
) -> LogoutEndpoints:
    """
    ``/logout/wait`` and ``/events``: the caller's session, found as the
    JSON endpoint finds it, waits for its logout on the bus; a lost
    notification is caught by re-checking the session in its cache.
    """

    def resolve_session(request: Any) -> Deferred[Any]:
        token, carrier = transport.token(request)
        if token is None:
            return succeed(None)
        cache = header_sessions if carrier == HEADER else sessions
        return cache.load(token, touch=False)

    def logged_out_reason(session: Any) -> Deferred[Optional[str]]:
        if isinstance(sessions, ClientSessionCache):
            if clock.seconds() >= transport.expires_at(session):
                return succeed("expired")
            revoked: Deferred[bool] = sessions.revocations.is_revoked(session)
            return revoked.addCallback(lambda gone: "revoked" if gone else None)
        found: Deferred[Any] = sessions.load(session.id, touch=False)
        return found.addCallback(lambda live: None if live is not None else "logged_out")

    watcher = LogoutWatcher(
        bus=bus,
        clock=clock,
        logged_out_reason=logged_out_reason,
        max_wait=settings.logout_max_wait,
        max_per_session=settings.logout_max_waiters_per_session,
        max_total=settings.logout_max_waiters,
    )
    return LogoutEndpoints(
        watcher=watcher,
        resolve_session=resolve_session,
        clock=clock,
        heartbeat_interval=settings.events_heartbeat_interval,
    )


def make_nonce_store(
    settings: Settings, clock: IReactorTime, redis: RedisConnections
) -> INonceStore:
    """
    Where signed requests' nonces are remembered: the shared Redis when the
    deployment has one (a nonce must be refused on every process).
    """
    shared = settings.shared_redis_url
    if shared is None:
        return MemoryNonceStore(clock)
    return RedisNonceStore(redis.get(shared), clock, settings.redis_timeout)


def make_app(
    settings: Optional[Settings] = None,
    *,
    clock: IReactorTime,
    reactor: Any = None,
    registry: Optional[MethodRegistry] = None,
    metrics_instance: Optional[IMetrics] = None,
    **keywords: Any,
) -> TwistauthApp:
    """
    Build a twistauth application.

    :param settings: loaded settings; or leave it out and pass settings as
        ``keywords`` (validated as `Settings.load` does).
    :param clock: the reactor (or a ``Clock`` in tests): all time comes from it.
    :param reactor: the reactor that runs threads (password hashing) and
        connections; ``clock`` when not given.
    :param registry: a registry of your own methods; the ``method_modules``
        setting's modules are loaded into it.
    :param metrics_instance: where the app counts (e.g. a `Metrics`
        sharing a multi-process directory); default: a new `Metrics`, or
        `NullMetrics` when the ``metrics`` setting is off.
    :raises twistauth.settings.SettingsError: for invalid keywords.
    :raises ImportError: a method module cannot be imported.
    :raises ValueError: two methods share a name.
    """
    if settings is None:
        settings = Settings.load(**keywords)
    elif keywords:
        raise TypeError("pass either settings or setting keywords, not both")
    if registry is None:
        registry = MethodRegistry()
    for module in settings.method_modules:
        names = registry.load(module)
        log.info(
            "twistauth: methods: {count} from {module} ({origin})",
            count=len(names),
            module=module,
            origin=settings.origins.get("method_modules", "default"),
        )
    if reactor is None:
        reactor = clock
    metrics: IMetrics
    if metrics_instance is not None:
        metrics = metrics_instance
    else:
        metrics = Metrics() if settings.metrics else NullMetrics()
    counting = metrics if settings.metrics else None
    redis = RedisConnections(
        settings, on_error=metrics.redis_error if counting is not None else None
    )
    background: List[IService] = [redis]
    sessions, header_sessions = make_session_caches(settings, clock, redis, counting)
    registry.load("twistauth.methods.builtin")
    accounts: Dict[str, Any] = {}
    if settings.local_accounts:
        accounts = make_accounts(settings, clock, reactor, redis)
        background.append(accounts["passwords"])
        registry.load("twistauth.accounts.methods")
    bus = make_bus(settings, reactor, redis)
    background.append(BusService(bus))
    access = AccessControl.from_settings(settings)
    access.check_registry(registry)
    method_cache, cache_service = make_method_cache(
        settings.method_cache,
        clock=clock,
        max_entries=settings.method_cache_max_entries,
        timeout=settings.redis_timeout,
    )
    if method_cache is not None:
        method_cache.configure(registry)
    if cache_service is not None:
        background.append(cache_service)
    services = Services(
        clock=clock,
        settings=settings,
        registry=registry,
        sessions=sessions,
        bus=bus,
        access=access,
        method_cache=method_cache,
        **accounts,
    )
    dispatcher = Dispatcher(
        registry,
        services,
        exception_hook=settings.exception_hook,
        before_hook=settings.before_hook,
        after_hook=chain_hooks(
            method_metrics_hook(metrics) if counting is not None else None,
            settings.after_hook,
        ),
        authorize=access.authorize,
    )
    api = APIResource(
        dispatcher,
        max_body_bytes=settings.max_body_bytes,
        max_batch_size=settings.max_batch_size,
        max_json_depth=settings.max_json_depth,
        sessions=sessions,
        header_sessions=header_sessions,
        transport=SessionTransport(
            cookie_name=settings.session_cookie_name,
            secure=settings.session_cookie_secure,
            allowed_origins=frozenset(settings.allowed_origins),
            idle_timeout=settings.session_idle_timeout,
            absolute_timeout=settings.session_absolute_timeout,
            permanent_lifetime=settings.session_permanent_lifetime,
        ),
        nonces=make_nonce_store(settings, clock, redis),
    )
    log.info(
        "twistauth: JSON methods at {path}: bodies up to {size} bytes, batches up to "
        "{batch} calls, nesting up to {depth} levels",
        path=settings.api_path,
        size=settings.max_body_bytes,
        batch=settings.max_batch_size,
        depth=settings.max_json_depth,
    )
    logout = make_logout_endpoints(
        settings, clock, bus, api.transport, sessions, header_sessions  # type: ignore[arg-type]
    )
    routes = make_routes()
    background += install_oidc(
        routes=routes,
        settings=settings,
        clock=clock,
        reactor=reactor,
        services=services,
        api=api,
        redis=redis,
        metrics=metrics,
    )
    if settings.demo:
        buttons = [
            ProviderButton(
                name=provider.name,
                label=f"Sign in with {provider.name}",
                login_url=f"/login?provider={quote(provider.name)}&next=/demo/",
            )
            for provider in settings.providers
        ]
        add_demo_routes(
            routes,
            make_demo_resource(settings, providers=buttons, logout_wait_path="/logout/wait"),
            "/demo",
        )
        log.info("twistauth: demo page at /demo/ ({origin})", origin=settings.origins["demo"])
    health = HealthChecks(clock=clock, default_timeout=settings.readiness_timeout)
    add_readiness_checks(
        health,
        clock=clock,
        # A Redis answer later than redis_timeout fails every call anyway.
        timeout=min(settings.readiness_timeout, settings.redis_timeout),
        redis=redis.connections(),
        users=accounts.get("users"),
        bus=bus,
        metrics=metrics,
    )
    metrics.watch_waiters(lambda: int(logout.watcher.stats()["watches"]))
    metrics.watch_stats(
        "logout_waits", "Logout waits and long-polls: open, and how they ended.",
        logout.watcher.stats,
    )
    metrics.watch_stats("bus", "Notification bus counters.", bus.stats)
    if method_cache is not None:
        metrics.watch_cache("methods", method_cache.stats)
    return TwistauthApp(
        settings=settings,
        clock=clock,
        registry=registry,
        dispatcher=dispatcher,
        routes=routes,
        api=api,
        services=services,
        background=tuple(background),
        logout=logout,
        metrics=metrics,
        health=health,
        request_ids=RequestIds(trust_incoming=settings.request_id_trust_header),
    )
