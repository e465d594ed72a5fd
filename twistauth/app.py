"""
The composition root: settings in, one wired application out.

This is the only module that knows every other one.  `make_app` builds the
method registry, the dispatcher, the Klein routes and the resource tree from
a `Settings`; `TwistauthApp.resource` can be served by twistauth's own
site (``twistd -n twistauth``) or mounted under a path of a host
application's site.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attr
from klein import Klein
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource

from twistauth.accounts.build import (
    make_login_throttle,
    make_password_hasher,
    make_user_store,
)
from twistauth.methods.dispatch import Dispatcher
from twistauth.methods.handler import Services
from twistauth.methods.registry import MethodRegistry
from twistauth.settings import Settings
from twistauth.web.api import APIResource
from twistauth.web.root import RootResource
from twistauth.web.routes import make_routes
from twistauth.sessions import ClientSessionCache, MemoryRevocations, MemorySessionCache
from twistauth.sessions._interfaces import ISessionCache
from twistauth.web.signing import MemoryNonceStore
from twistauth.web.site import TwistauthSite
from twistauth.web.transport import SessionTransport

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
    background: Tuple[IService, ...] = attr.ib(default=())
    """Services the app needs running (the password-hashing pool, Redis
    connections): `twistauth.service.TwistauthService` starts them before
    it listens and stops them after."""

    def resource(self) -> IResource:
        """
        The resource that serves the whole application.
        """
        return RootResource(self.settings.api_path, self.api, self.routes.resource())

    def site(self) -> TwistauthSite:
        """
        A site serving `resource` with twistauth's limits.
        """
        s = self.settings
        return TwistauthSite(
            self.resource(),
            clock=self.clock,
            max_body_bytes=s.max_body_bytes,
            request_timeout=s.request_timeout,
            idle_timeout=s.idle_timeout,
            max_connections_per_ip=s.max_connections_per_ip,
        )


def make_session_cache(settings: Settings, clock: IReactorTime) -> ISessionCache:
    """
    The session cache the settings choose.
    """
    common: Dict[str, Any] = {
        "clock": clock,
        "idle_timeout": settings.session_idle_timeout,
        "absolute_timeout": settings.session_absolute_timeout,
    }
    if settings.session_cache == "memory":
        cache: ISessionCache = MemorySessionCache(
            max_entries=settings.session_max_entries, **common
        )
    elif settings.session_cache == "client":
        cache = ClientSessionCache(
            keys=settings.session_keys,
            revocations=MemoryRevocations(clock=clock),
            carrier_name=settings.session_cookie_name,
            **common,
        )
    else:
        raise NotImplementedError("Redis session caches are wired in the next step")
    log.info(
        "twistauth: sessions: {kind} cache, idle {idle:g} s, absolute {absolute:g} s ({origin})",
        kind=cache.name,
        idle=settings.session_idle_timeout,
        absolute=settings.session_absolute_timeout,
        origin=settings.origins.get("session_cache", "default"),
    )
    return cache


def make_accounts(settings: Settings, clock: IReactorTime, reactor: Any) -> Dict[str, Any]:
    """
    The local-account parts: the user store, the password hasher (a
    service) and the failed-login throttle.
    """
    if settings.user_store not in ("yaml", "memory"):
        raise NotImplementedError("Redis user stores are wired in the next step")
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
    throttle = make_login_throttle(
        "memory",
        clock=clock,
        account_limit=settings.login_max_failures_per_account,
        address_limit=settings.login_max_failures_per_address,
        window=settings.login_failure_window,
    )
    return {"users": users, "passwords": passwords, "throttle": throttle}


def make_app(
    settings: Optional[Settings] = None,
    *,
    clock: IReactorTime,
    reactor: Any = None,
    registry: Optional[MethodRegistry] = None,
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
    sessions = make_session_cache(settings, clock)
    registry.load("twistauth.methods.builtin")
    background: List[IService] = []
    accounts: Dict[str, Any] = {}
    if settings.local_accounts:
        accounts = make_accounts(settings, clock, reactor)
        background.append(accounts["passwords"])
        registry.load("twistauth.accounts.methods")
    services = Services(
        clock=clock, settings=settings, registry=registry, sessions=sessions, **accounts
    )
    dispatcher = Dispatcher(
        registry,
        services,
        exception_hook=settings.exception_hook,
        before_hook=settings.before_hook,
        after_hook=settings.after_hook,
    )
    api = APIResource(
        dispatcher,
        max_body_bytes=settings.max_body_bytes,
        max_batch_size=settings.max_batch_size,
        max_json_depth=settings.max_json_depth,
        sessions=sessions,
        transport=SessionTransport(
            cookie_name=settings.session_cookie_name,
            secure=settings.session_cookie_secure,
            allowed_origins=frozenset(settings.allowed_origins),
            idle_timeout=settings.session_idle_timeout,
            absolute_timeout=settings.session_absolute_timeout,
            permanent_lifetime=settings.session_permanent_lifetime,
        ),
        nonces=MemoryNonceStore(clock),
    )
    log.info(
        "twistauth: JSON methods at {path}: bodies up to {size} bytes, batches up to "
        "{batch} calls, nesting up to {depth} levels",
        path=settings.api_path,
        size=settings.max_body_bytes,
        batch=settings.max_batch_size,
        depth=settings.max_json_depth,
    )
    return TwistauthApp(
        settings=settings,
        clock=clock,
        registry=registry,
        dispatcher=dispatcher,
        routes=make_routes(),
        api=api,
        services=services,
        background=tuple(background),
    )
