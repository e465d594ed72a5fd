"""
What a method receives: the `Handler` for its call, and the app's `Services`.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twistauth.errors import TwistauthError


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


@attr.s(slots=True)
class Handler:
    """
    The context of one method call (Toto's handler).

    :ivar method: the method's name.
    :ivar transaction_id: unique per call; also the correlation id of a 500.
    :ivar request: the ``twisted.web`` request, or ``None`` outside HTTP.
    :ivar services: the app's `Services`.
    :ivar session: the caller's session, or ``None``.
    """

    method: str = attr.ib()
    transaction_id: str = attr.ib()
    request: Any = attr.ib()
    services: Services = attr.ib()
    session: Any = attr.ib(default=None)
    _late: Optional["Deferred[Any]"] = attr.ib(default=None)
    _close_hooks: List[Callable[[], Any]] = attr.ib(factory=list)

    def respond_later(self) -> "Deferred[Any]":
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
        self._close_hooks.append(hook)
        if self.request is not None:
            self.request.notifyFinish().addErrback(lambda _: hook())


__all__ = ["Handler", "Services", "TwistauthError"]
