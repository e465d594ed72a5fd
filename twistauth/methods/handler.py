"""
What a method receives: the `Handler` for its call, and the app's `Services`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistauth.bus import handlers as bus_handlers
from twistauth.bus.logout import publish_logout
from twistauth.errors import BackendUnavailableError, TwistauthError
from twistauth.sessions._interfaces import ISessionCache, Session
from twistauth.sessions.scope import SessionScope

log = Logger()


@attr.s(frozen=True, kw_only=True)
class Services:
    """
    The application's shared parts, as methods see them.  Built once by
    `twistauth.app`; each later layer (sessions, bus, stores) adds a field.
    """

    clock: IReactorTime = attr.ib()
    settings: Any = attr.ib()
    """The `twistauth.settings.Settings` the app was built with."""
    registry: Any = attr.ib()
    """The `twistauth.methods.registry.MethodRegistry`: for introspection."""
    sessions: Optional[ISessionCache] = attr.ib(default=None)
    """The session cache."""
    users: Any = attr.ib(default=None)
    """The user store (``twistauth.accounts``), or ``None``."""
    passwords: Any = attr.ib(default=None)
    """The password hasher (``twistauth.accounts``), or ``None``."""
    throttle: Any = attr.ib(default=None)
    """The failed-login throttle (``twistauth.accounts``), or ``None``."""
    bus: Any = attr.ib(default=None)
    """The notification bus (``twistauth.bus``), or ``None``."""
    access: Any = attr.ib(default=None)
    """The access control (``twistauth.access.AccessControl``), or ``None``."""
    method_cache: Any = attr.ib(default=None)
    """The cache of ``@cached`` methods (``twistauth.caching``), or ``None``."""


@attr.s(slots=True)
class Handler:
    """
    The context of one method call (Toto's handler).

    :ivar method: the method's name.
    :ivar transaction_id: unique per call; also the correlation id of a 500.
    :ivar request: the ``twisted.web`` request, or ``None`` outside HTTP.
    :ivar services: the app's `Services`.
    :ivar scope: the request's `SessionScope` (shared by the calls of a
        batch), or ``None`` when the app has no session cache.
    """

    method: str = attr.ib()
    transaction_id: str = attr.ib()
    request: Any = attr.ib()
    services: Services = attr.ib()
    scope: Optional[SessionScope] = attr.ib(default=None)
    _late: Optional[Deferred[Any]] = attr.ib(default=None)

    @property
    def session(self) -> Optional[Session]:
        """
        The caller's live session, or ``None`` (anonymous and none yet).
        """
        return self.scope.session if self.scope is not None else None

    @property
    def client_address(self) -> str:
        """
        The client's address as the server sees it (``""`` outside HTTP).
        """
        if self.request is None:
            return ""
        return getattr(self.request.getClientAddress(), "host", "") or ""

    def _scope(self) -> SessionScope:
        if self.scope is None:
            raise BackendUnavailableError("sessions are not available to this call")
        return self.scope

    def ensure_session(self) -> Deferred[Session]:
        """
        The caller's session, created if it has none (saved after the call).
        """
        return self._scope().ensure()

    def log_in(
        self,
        user_id: str,
        roles: Iterable[str] = (),
        permanent: bool = False,
        *,
        issuer: Optional[str] = None,
        provider_sid: Optional[str] = None,
    ) -> Deferred[Session]:
        """
        Log the caller in as ``user_id``: the session gets a new id (an id
        from before login never survives it) and is bound to the user.

        :param permanent: "remember me": the cookie outlives the browser.
        """
        return self._scope().log_in(
            user_id,
            roles,
            now=self.services.clock.seconds(),
            permanent=permanent,
            issuer=issuer,
            provider_sid=provider_sid,
        )

    def renew_session(self) -> Deferred[Any]:
        """
        Give the caller's session a new id (after any privilege change).
        """
        return self._scope().renew()

    @inlineCallbacks
    def log_out(self) -> Any:
        """
        End the caller's session (the client's token is cleared) and wake
        its logout waiters on every process.
        """
        scope = self._scope()
        ended = scope.session
        yield scope.log_out()
        if ended is not None:
            yield self._publish(session_id=ended.id, reason="logout")

    @inlineCallbacks
    def log_out_everywhere(self, user_id: str, reason: str = "logout_everywhere") -> Any:
        """
        End every session of ``user_id``, on every process, and wake their
        logout waiters.

        :return: Deferred firing with how many ended (-1: unknown, for
            client-side sessions, which are revoked instead).
        """
        count = yield self._scope().cache.delete_user(user_id)
        yield self._publish(user_id=user_id, reason=reason)
        return count

    def _publish(self, **logout: Any) -> Deferred[Any]:
        """
        Tell the logout waiters.  The logout itself is already durable, and
        waiters re-check it, so a bus failure is logged, not raised.
        """
        bus = self.services.bus
        if bus is None:
            return succeed(None)
        d: Deferred[Any] = maybeDeferred(publish_logout, bus, **logout)
        d.addErrback(lambda f: log.failure("could not publish a logout", f))
        return d

    def wait_for_key(self, key: Any, timeout: Optional[float] = None) -> Deferred[Any]:
        """
        Wait for a message on the bus (cancelled if the client goes away).
        """
        return bus_handlers.wait_for_key(self, key, timeout)

    def wait_for_keys(self, keys: Any, timeout: Optional[float] = None) -> Deferred[Any]:
        """
        Wait for the first message on any of ``keys``: ``(key, message)``.
        """
        return bus_handlers.wait_for_keys(self, keys, timeout)

    def register_event_handler(
        self, key: Any, callback: Callable[..., Any], deregister_on_finish: bool = False
    ) -> Any:
        """
        Call ``callback(message)`` for every message on ``key`` (Toto's
        event framework); never after this request finished when
        ``deregister_on_finish``.  :return: a handle for
        `deregister_event_handler`.
        """
        return bus_handlers.register_event_handler(self, key, callback, deregister_on_finish)

    def deregister_event_handler(self, handle: Any) -> None:
        bus_handlers.deregister_event_handler(handle)

    def send_event(self, key: Any, message: Any, broadcast: bool = True) -> Deferred[Any]:
        """
        Send ``message`` on ``key``: to every waiter, or to one.
        """
        return bus_handlers.send_event(self, key, message, broadcast)

    def respond_later(self) -> Deferred[Any]:
        """
        For long-running methods (Toto's ``@asynchronous``): return the
        Deferred this gives, and answer later with `respond` or
        `respond_error`.  It is cancelled if the client goes away.
        """
        if self._late is None:
            self._late = Deferred()
        return self._late

    def respond(self, result: Any = None) -> None:
        """
        Answer a call that returned `respond_later` with ``result``.
        """
        if self._late is not None and not self._late.called:
            self._late.callback(result)

    def respond_error(self, error: Exception) -> None:
        """
        Answer a call that returned `respond_later` with an error.
        """
        if self._late is not None and not self._late.called:
            self._late.errback(error)

    def on_connection_close(self, hook: Callable[[], Any]) -> None:
        """
        Call ``hook()`` if the client goes away before the call is answered
        (Toto's ``on_connection_close``).  Cancellation of the method's
        Deferred happens as well; use this hook for anything else.
        """
        if self.request is None:
            return

        def closed(reason: Any) -> None:
            try:
                hook()
            except Exception:
                log.failure("a connection-close hook of {method} failed", method=self.method)

        self.request.notifyFinish().addErrback(closed)


__all__ = ["Handler", "Services", "TwistauthError"]
