"""
What a method receives: the `Handler` for its call, and the app's `Services`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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

    def log_out(self) -> Deferred[None]:
        """
        End the caller's session; the client's token is cleared.
        """
        return self._scope().log_out()

    def log_out_everywhere(self, user_id: str) -> Deferred[int]:
        """
        End every session of ``user_id``, on every process.

        :return: Deferred firing with how many ended (-1: unknown, for
            client-side sessions, which are revoked instead).
        """
        cache = self._scope().cache
        return cache.delete_user(user_id)

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
