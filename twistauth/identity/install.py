"""
Wiring OpenID Connect into an application: `install_oidc` builds the
relying parties, stores and token manager from the settings and mounts the
routes (`twistauth.web.auth`) on the app's Klein routes.

What it chooses, and logs:

  - one `RelyingParty` per ``[providers.NAME]`` table, sharing one HTTP
    client (a connection pool, TLS verified);
  - login flows, the logout-token replay cache and the refresh lock in the
    deployment's shared Redis when it has one (``redis_url``, or a Redis
    session cache or user store), else in memory (one process);
  - tokens sealed with a key derived from ``deployment_key`` (a random key
    per process when unset: tokens then do not survive a restart);
  - the user store the accounts use, or one of its own when local accounts
    are off.

Settings it reads beyond ``providers`` (all optional, with these defaults;
read with ``getattr`` so they can be declared later): ``return_origins``
(``()``), ``oidc_refresh_margin`` (60 s), ``oidc_refresh_lock_lease``
(2 s), ``oidc_refresh_wait`` (5 s), ``oidc_backchannel_rate_limit`` (60
refused back-channel requests per minute per address, then 429), ``oidc_logout_landing`` (``"/"``),
``login_page_title`` and ``login_page_css``, ``oidc_button_labels`` (a
table of provider name to label).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import attr
from klein import Klein
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistauth import redisconn
from twistauth.identity.client import RelyingParty
from twistauth.identity.config import ProviderConfig
from twistauth.identity.flows import FlowBinder, MemoryFlowStore, RedisFlowStore
from twistauth.identity.jti import MemoryJtiStore, RedisJtiStore
from twistauth.identity.tokens import (
    MemoryRefreshLock,
    RedisRefreshLock,
    TokenManager,
    TokenSealer,
    UserContext,
    derive_token_key,
)
from twistauth.metrics import NullMetrics

log = Logger()


class _HTTPClientService(Service):
    """Closes the providers' HTTP connection pool when the app stops."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def stopService(self) -> Any:
        super().stopService()
        pool = getattr(getattr(self._client, "_agent", None), "_pool", None)
        if pool is not None:
            return pool.closeCachedConnections()
        return succeed(None)


def _check_paths(config: ProviderConfig) -> None:
    """
    Warn when a provider's URIs name paths no route serves.
    """
    from urllib.parse import urlsplit

    path = urlsplit(config.redirect_uri).path.rstrip("/")
    if not (path.endswith("/redirect") or path.endswith("/redirect/" + config.name)):
        log.warn(
            "twistauth: provider {name}: redirect_uri {uri} is not served here: it must end "
            "in /redirect or /redirect/{name}",
            name=config.name,
            uri=config.redirect_uri,
        )
    if config.post_logout_redirect_uri is not None and not urlsplit(
        config.post_logout_redirect_uri
    ).path.rstrip("/").endswith("/logout/return"):
        log.warn(
            "twistauth: provider {name}: post_logout_redirect_uri {uri} is not served here: "
            "it must end in /logout/return",
            name=config.name,
            uri=config.post_logout_redirect_uri,
        )


def _user_store(settings: Any, clock: IReactorTime, reactor: Any, redis: Any) -> Any:
    from twistauth.accounts.build import make_user_store

    kind = settings.user_store
    if redisconn.is_redis_url(kind):
        return make_user_store(
            "redis", clock=clock, reactor=reactor, redis=redis.get(kind),
            redis_timeout=settings.redis_timeout,
        )
    return make_user_store(kind, clock=clock, reactor=reactor, data_dir=settings.data_dir)


@attr.s(frozen=True, kw_only=True)
class OIDCParts:
    """
    What `build_oidc` makes.

    :ivar routes: the `twistauth.web.auth.OIDCRoutes` (not mounted yet).
    :ivar tokens: the `TokenManager` (for methods that need a user's tokens).
    :ivar background: services to start before listening.
    """

    routes: Any = attr.ib()
    tokens: TokenManager = attr.ib()
    background: List[IService] = attr.ib()


def install_oidc(
    *,
    routes: Klein,
    settings: Any,
    clock: IReactorTime,
    reactor: Any,
    services: Any,
    api: Any,
    redis: Any,
    http_client: Any = None,
    providers: Optional[Sequence[ProviderConfig]] = None,
    metrics: Any = None,
) -> List[IService]:
    """
    Build OpenID Connect login for an app (`build_oidc`), mount its routes
    on ``routes`` and register the ``oidc.session`` method.  Nothing happens
    when no provider is configured.

    :return: the services to start before listening.
    """
    from twistauth.web.auth import mount

    parts = build_oidc(
        settings=settings, clock=clock, reactor=reactor, services=services, api=api,
        redis=redis, http_client=http_client, providers=providers, metrics=metrics,
    )
    if parts is None:
        return []
    mount(routes, parts.routes)
    register_methods(getattr(services, "registry", None), parts.tokens)
    return parts.background


def build_oidc(
    *,
    settings: Any,
    clock: IReactorTime,
    reactor: Any,
    services: Any,
    api: Any,
    redis: Any,
    http_client: Any = None,
    providers: Optional[Sequence[ProviderConfig]] = None,
    metrics: Any = None,
) -> Optional[OIDCParts]:
    """
    Build OpenID Connect login for an app: relying parties, stores, token
    manager and the routes' handlers.

    :param settings: the `twistauth.settings.Settings`.
    :param clock: the app's clock.
    :param reactor: the reactor for outbound connections.
    :param services: the app's `twistauth.methods.handler.Services` (its
        ``users``, ``registry`` and, once wired, ``bus`` are used).
    :param api: the app's `twistauth.web.api.APIResource` (its transport
        and session caches).
    :param redis: the app's `twistauth.app.RedisConnections`.
    :param http_client: a treq client for the providers (tests: a
        ``StubTreq``); default: `twistauth.identity.make_http_client`.
    :param providers: the providers (default: ``settings.providers``).
    :param metrics: counts OpenID logins, refreshes and back-channel
        logouts (a `twistauth.metrics.IMetrics`; default: nothing counted).
    :return: the `OIDCParts`, or ``None`` when no provider is configured.
    """
    from twistauth.web.auth import LoginPage, OIDCRoutes, SessionAccess, SourceRateLimiter

    configs = tuple(settings.providers if providers is None else providers)
    if not configs:
        return None
    background: List[IService] = []
    if http_client is None:
        from twistauth.identity.http import make_http_client

        http_client = make_http_client(reactor)
        background.append(_HTTPClientService(http_client))
    return_origins = settings.return_origins
    parties: Dict[str, RelyingParty] = {
        config.name: RelyingParty(
            config=config, http_client=http_client, clock=clock, return_origins=return_origins
        )
        for config in configs
    }

    shared = settings.shared_redis_url
    timeout = settings.redis_timeout
    if shared is None:
        flow_store: Any = MemoryFlowStore(clock=clock)
        jti: Any = MemoryJtiStore(clock=clock)
        lock: Any = MemoryRefreshLock(clock=clock)
    else:
        connection = redis.get(shared)
        flow_store = RedisFlowStore(redis=connection, clock=clock, timeout=timeout)
        jti = RedisJtiStore(redis=connection, clock=clock, timeout=timeout)
        lock = RedisRefreshLock(redis=connection, clock=clock, timeout=timeout)

    users = getattr(services, "users", None)
    if users is None:
        users = _user_store(settings, clock, reactor, redis)

    deployment_key = settings.deployment_key
    if deployment_key is None:
        deployment_key = os.urandom(32)
        if users.name != "memory":
            log.warn(
                "twistauth: OpenID Connect: no deployment_key, so provider tokens are sealed "
                "with a key of this process only: after a restart users must log in again"
            )
    sealer = TokenSealer(key=derive_token_key(deployment_key))

    secure = settings.session_cookie_secure
    cookie_base = ("__Host-" if secure else "") + settings.session_cookie_name
    access = SessionAccess(
        transport=api.transport, sessions=api.sessions, header_sessions=api.header_sessions
    )

    def bus() -> Any:
        return getattr(services, "bus", None)

    def end_sessions(user_id: str, reason: str) -> Deferred[Any]:
        ending = [cache.delete_user(user_id) for cache in access.caches()]

        def ended(_: Any) -> None:
            current = bus()
            if current is not None:
                from twistauth.bus.logout import publish_logout

                publish_logout(current, reason=reason, user_id=user_id).addErrback(
                    lambda f: log.warn("twistauth: could not notify logout waiters: {e}",
                                       e=f.getErrorMessage())
                )

        return gatherResults(ending, consumeErrors=True).addCallback(ended)

    tokens = TokenManager(
        users=users,
        parties=parties,
        sealer=sealer,
        clock=clock,
        lock=lock,
        end_sessions=end_sessions,
        margin=settings.oidc_refresh_margin,
        session_lifetime=settings.session_absolute_timeout,
        metrics=metrics if metrics is not None else NullMetrics(),
    )
    page_options: Dict[str, Any] = {"title": settings.login_page_title}
    if settings.login_page_css:
        page_options["css"] = settings.login_page_css
    oidc = OIDCRoutes(
        parties=parties,
        login_flows=FlowBinder(store=flow_store, cookie_prefix=cookie_base + "_login_"),
        logout_flows=FlowBinder(store=flow_store, cookie_prefix=cookie_base + "_logout_"),
        tokens=tokens,
        jti=jti,
        access=access,
        clock=clock,
        bus=bus,
        rate_limiter=SourceRateLimiter(
            clock=clock, limit=settings.oidc_backchannel_rate_limit
        ),
        page=LoginPage(**page_options),
        logout_landing=settings.oidc_logout_landing,
        cookie_secure=secure,
        metrics=metrics if metrics is not None else NullMetrics(),
    )
    if metrics is not None:
        metrics.watch_stats("oidc", "OpenID Connect routes' counters.", lambda: dict(oidc.counts))
        metrics.watch_stats("oidc_refresh", "Token refreshes in this process.", lambda: dict(tokens.counts))
        metrics.watch_stats("oidc_flows", "Login flow store counters.", flow_store.stats)
    for config in configs:
        _check_paths(config)
        log.info(
            "twistauth: OpenID Connect provider {name}: issuer {issuer}, redirect URI "
            "{redirect}; flows, replay cache and refresh lock in {where}",
            name=config.name,
            issuer=config.issuer,
            redirect=config.redirect_uri,
            where="memory (one process)" if shared is None else "Redis",
        )
    return OIDCParts(routes=oidc, tokens=tokens, background=background)


def register_methods(registry: Any, tokens: TokenManager) -> None:
    """
    Add the ``oidc.session`` JSON method to ``registry`` (if given).
    """
    if registry is None or registry.lookup("oidc.session") is not None:
        return

    async def oidc_session(handler: Any) -> Dict[str, Any]:
        """
        The caller's identity-provider login: provider, issuer, subject,
        display claims and how long its access token lasts (refreshed first
        when about to expire).  Never a token.  401 without such a login.
        """
        from twistauth.errors import AuthRequiredError

        session = handler.session
        if session is None or session.user_id is None:
            raise AuthRequiredError()
        context: UserContext = await tokens.get_user_context_and_refresh(session.user_id)
        user = await tokens.users.get(session.user_id)
        identity = (user.profile.get("oidc") if user is not None else None) or {}
        expires_at = context.tokens.expires_at
        return {
            "user_id": context.user_id,
            "provider": context.provider,
            "issuer": identity.get("issuer"),
            "subject": identity.get("subject"),
            "claims": identity.get("claims", {}),
            "access_token_expires_in": (
                None if expires_at is None else max(0, int(expires_at - tokens.clock.seconds()))
            ),
        }

    registry.add("oidc.session", oidc_session)


__all__ = ["OIDCParts", "build_oidc", "install_oidc", "register_methods"]
